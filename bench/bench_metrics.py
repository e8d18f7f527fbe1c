"""Benchmark evaluation.metrics.retrieval_metrics against a per-row numpy argsort loop.

Run from the repository root::

    .venv/bin/python -m bench.bench_metrics [--images 1000] [--captions-per-image 5]

Builds random float32 scores (fixed seed), checks that the vectorised torch
implementation and the reference loop give identical metrics, and prints a
markdown table of the best-of-N wall-clock times plus a final ``speedup: N.Nx``
line.

The headline speed-up is like-for-like: the numpy loop is single-threaded, so
torch is timed with ``--threads`` (default 1) intra-op threads. torch with its
default thread count is timed as well and shown in the table (informational:
on a machine whose cores are busy with other work, multi-threaded torch can be
far slower than single-threaded because its worker threads get descheduled).
"""

from __future__ import annotations



import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

from evaluation.metrics_reference import reference_metrics
from evaluation.metrics import retrieval_metrics

def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Best wall-clock time of ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=10, help="repeats for the torch version")
    parser.add_argument("--ref-repeats", type=int, default=3, help="repeats for the numpy loop")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads for the headline timing"
    )
    args = parser.parse_args()
    default_threads = torch.get_num_threads()

    num_images = args.images
    num_captions = num_images * args.captions_per_image
    rng = np.random.default_rng(args.seed)
    scores_np = rng.standard_normal((num_images, num_captions)).astype(np.float32)
    txt2img_np = np.arange(num_captions) // args.captions_per_image
    scores = torch.from_numpy(scores_np)
    txt2img = torch.from_numpy(txt2img_np)

    ours = retrieval_metrics(scores, txt2img)
    ref = reference_metrics(scores_np, txt2img_np)
    assert ours == ref, f"mismatch:\n torch {ours}\n numpy {ref}"

    def run_ours() -> object:
        return retrieval_metrics(scores, txt2img)

    t_ref = best_time(lambda: reference_metrics(scores_np, txt2img_np), args.ref_repeats)
    torch.set_num_threads(args.threads)
    t_ours = best_time(run_ours, args.repeats)
    label = "evaluation.metrics.retrieval_metrics, {} thread(s)"
    rows = [(label.format(args.threads), args.repeats, t_ours)]
    if default_threads != args.threads:
        torch.set_num_threads(default_threads)
        rows.append((label.format(default_threads), args.repeats, best_time(run_ours, args.repeats)))
    speedup = t_ref / t_ours

    print(
        f"scores {num_images}x{num_captions} float32, {args.captions_per_image} captions/image, "
        f"seed {args.seed}, torch {torch.__version__}, numpy {np.__version__}"
    )
    print(f"r_mean {ours['r_mean']:.4f}; metrics identical to the reference: {ours == ref}")
    print()
    print("| implementation | best time (ms) | speed-up vs numpy |")
    print("|---|---:|---:|")
    print(f"| numpy per-row argsort loop (best of {args.ref_repeats}) | {t_ref * 1e3:.1f} | 1.0x |")
    for name, repeats, seconds in rows:
        print(f"| {name} (best of {repeats}) | {seconds * 1e3:.1f} | {t_ref / seconds:.1f}x |")
    print()
    print(f"speedup: {speedup:.1f}x")


if __name__ == "__main__":
    main()
