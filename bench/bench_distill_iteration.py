"""Time and peak memory of one distillation iteration: distill.py's unrolled matching against the
straightforward reference loop of tests/test_matching.py, each configuration in a fresh process.

One iteration = unroll --syn_steps student steps (graph kept) + the backward pass to the synthetic
images, texts and step sizes. Synthetic data and expert segments are random (no data set or buffer
needed); the model is built exactly as distill.py builds it.

    python -m bench.bench_distill_iteration                       # demo configuration, steps 2 4 8 16
    python -m bench.bench_distill_iteration --image_encoder convnet --image_size 32 --steps 2 4
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent

import torch

from matching.trajectory import draw_minibatches, unrolled_matching_loss
from bench.matching_problem import (
    add_problem_args,
    measure_iteration,
    problem_flags,
    random_problem,
    run_worker,
)
from utils.device import pick_device


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_problem_args(parser, mini_batch_size=50)
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=5, help="timed iterations per process (after a warm-up)")
    parser.add_argument("--processes", type=int, default=5,
                        help="fresh processes per configuration; the table shows medians over them")
    parser.add_argument("--worker", choices=("ours", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--syn_steps", type=int, help=argparse.SUPPRESS)
    return parser.parse_args()


def one_configuration(args) -> dict:
    """Runs inside a fresh process: one warm-up iteration, then `repeats` timed ones."""
    from test_matching import reference_matching_loss

    device = pick_device(args.device)
    problem = random_problem(args.image_encoder, args.image_size, args.text_dim, args.num_queries, device)
    model, students, segment = problem.model, problem.students, problem.segment
    image_syn, text_syn, lr_img, lr_txt = problem.image_syn, problem.text_syn, problem.lr_img, problem.lr_txt
    start, target = problem.start, problem.target
    generator = torch.Generator().manual_seed(0)

    def iteration():
        batches = draw_minibatches(args.num_queries, args.mini_batch_size, args.syn_steps, generator)
        if args.worker == "ours":
            loss = unrolled_matching_loss(students, image_syn, text_syn, lr_img, lr_txt, segment, batches).total
        else:
            loss = reference_matching_loss(model, image_syn, text_syn, lr_img, lr_txt, start, target, batches)
        torch.autograd.grad(loss, (image_syn, text_syn, lr_img, lr_txt))

    return measure_iteration(iteration, device, args.repeats)


def run_pair(args, steps: int) -> tuple[dict, dict]:
    """Median time and peak memory over `--processes` fresh processes per implementation, the two
    implementations alternating so that slow drifts of the machine hit both alike."""
    runs = {"ours": [], "reference": []}
    for _ in range(args.processes):
        for worker in runs:
            runs[worker].append(_one_process(args, worker, steps))
    return tuple({key: (statistics.median(r[key] for r in rs) if key != "device" else rs[0][key]) for key in rs[0]}
                 for rs in runs.values())


def _one_process(args, worker: str, steps: int) -> dict:
    return run_worker(__spec__.name, ["--worker", worker, "--syn_steps", str(steps), "--repeats", str(args.repeats),
                                 *problem_flags(args)])


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(one_configuration(args)))
        return
    print(f"{args.image_encoder} at {args.image_size}px, N={args.num_queries}, minibatch {args.mini_batch_size}, "
          f"text dim {args.text_dim}; medians over {args.processes} fresh processes x {args.repeats} iterations")
    rows, worst_time, worst_memory = [], 0.0, 0.0
    for steps in args.steps:
        ours, reference = run_pair(args, steps)
        time_ratio = ours["seconds"] / reference["seconds"]
        memory_ratio = ours["host_mb"] / reference["host_mb"]
        worst_time, worst_memory = max(worst_time, time_ratio), max(worst_memory, memory_ratio)
        cuda = f" | {ours['cuda_mb']:.0f} / {reference['cuda_mb']:.0f}" if ours["device"].startswith("cuda") else ""
        rows.append(f"| {steps} | {ours['seconds']:.3f} | {reference['seconds']:.3f} | {time_ratio:.3f} | "
                    f"{ours['host_mb']:.0f} | {reference['host_mb']:.0f} | {memory_ratio:.3f}{cuda} |")
    cuda_head = " | CUDA peak MiB ours / ref" if "cuda" in (args.device or ("cuda" if torch.cuda.is_available() else "")) else ""
    print(f"| syn_steps | ours s/it | reference s/it | time ratio | ours peak MiB | reference peak MiB | memory ratio{cuda_head} |")
    print("|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if cuda_head else ""))
    print("\n".join(rows))
    print(f"worst time ratio {worst_time:.3f} (target <= 1.05), worst memory ratio {worst_memory:.3f} (target <= 1.0)")


if __name__ == "__main__":
    main()
