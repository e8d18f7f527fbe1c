"""Benchmark utils.metrics.retrieval_metrics against a per-row numpy argsort loop.

Run from the repository root::

    .venv/bin/python bench/bench_metrics.py [--images 1000] [--captions-per-image 5]

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

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from utils.metrics import retrieval_metrics  # noqa: E402

KS = (1, 5, 10)


def reference_metrics(scores: np.ndarray, txt2img: np.ndarray) -> dict[str, float]:
    """Reference-style implementation: one stable descending argsort per row and column."""
    num_images, num_captions = scores.shape
    txt_rank = np.empty(num_images, dtype=np.int64)
    for i in range(num_images):
        order = np.argsort(-scores[i], kind="stable")
        position = np.empty(num_captions, dtype=np.int64)
        position[order] = np.arange(num_captions)
        txt_rank[i] = position[txt2img == i].min()
    img_rank = np.empty(num_captions, dtype=np.int64)
    for t in range(num_captions):
        order = np.argsort(-scores[:, t], kind="stable")
        img_rank[t] = int(np.flatnonzero(order == txt2img[t])[0])

    out: dict[str, float] = {}
    for k in KS:
        out[f"txt_r{k}"] = 100.0 * int((txt_rank < k).sum()) / num_images
    for k in KS:
        out[f"img_r{k}"] = 100.0 * int((img_rank < k).sum()) / num_captions
    out["txt_r_mean"] = sum(out[f"txt_r{k}"] for k in KS) / len(KS)
    out["img_r_mean"] = sum(out[f"img_r{k}"] for k in KS) / len(KS)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


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

    ours = retrieval_metrics(scores, txt2img, ks=KS)
    ref = reference_metrics(scores_np, txt2img_np)
    assert ours == ref, f"mismatch:\n torch {ours}\n numpy {ref}"

    def run_ours() -> object:
        return retrieval_metrics(scores, txt2img, ks=KS)

    t_ref = best_time(lambda: reference_metrics(scores_np, txt2img_np), args.ref_repeats)
    torch.set_num_threads(args.threads)
    t_ours = best_time(run_ours, args.repeats)
    label = "utils.metrics.retrieval_metrics, {} thread(s)"
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
