"""Peak memory and time of one distillation iteration for each `--matching` mode against `--syn_steps`.

Every (mode, syn_steps) configuration runs in fresh processes (the modes alternating, so that slow
drifts of the machine hit all alike); the table shows medians over them. One iteration = the
matching loss and its meta-gradient w.r.t. the synthetic images, texts and both step sizes, with
the same random model, synthetic set and minibatches for every mode. Peak memory is what tensors
hold above the level before the iteration (`utils.tensor_memory.TensorPeak`: the torch profiler's
allocation events on the CPU, the CUDA allocator's peak on a GPU), with its min–max over the
processes; the resident set's high-water mark (noisy) is an extra column.

    python -m bench.bench_matching_modes                                # demo model, steps 2 4 8 16 32
    python -m bench.bench_matching_modes --steps 2 4 --processes 1 --plot /tmp/modes.png

The last line prints the ratios the low-memory mode is judged by: exact_lowmem's tensor peak at the
largest step count over its peak at 4 steps, and its time over unroll's at 4 steps and at worst.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent

import torch

from matching.meta_gradient import MATCHING_MODES, matching_gradients
from matching.trajectory import contrastive_step_loss, draw_minibatches
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
    add_problem_args(parser, mini_batch_size=100)  # the demo's: the whole synthetic set in every student step
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--modes", nargs="+", default=list(MATCHING_MODES), choices=MATCHING_MODES)
    parser.add_argument("--repeats", type=int, default=3, help="timed iterations per process (after a warm-up)")
    parser.add_argument("--processes", type=int, default=3, help="fresh processes per configuration")
    parser.add_argument("--plot", default=str(HERE / "figures" / "matching_modes.png"), help="PNG to write")
    parser.add_argument("--json", default=None, help="also write every measurement to this JSON file")
    parser.add_argument("--worker", choices=MATCHING_MODES, help=argparse.SUPPRESS)
    parser.add_argument("--syn_steps", type=int, help=argparse.SUPPRESS)
    return parser.parse_args()


def one_configuration(args) -> dict:
    """Runs inside a fresh process: one iteration of mode `--worker` at `--syn_steps`."""
    device = pick_device(args.device)
    problem = random_problem(args.image_encoder, args.image_size, args.text_dim, args.num_queries, device)
    generator = torch.Generator().manual_seed(0)

    def iteration():
        batches = draw_minibatches(args.num_queries, args.mini_batch_size, args.syn_steps, generator)
        step_loss = contrastive_step_loss(problem.students, batches)
        matching_gradients(args.worker, problem.students, step_loss, args.syn_steps,
                           (problem.image_syn, problem.text_syn), problem.lr_img, problem.lr_txt, problem.segment)

    return measure_iteration(iteration, device, args.repeats)


def measure_all(args) -> dict:
    """{mode: {steps: median measurement}}."""
    results = {mode: {} for mode in args.modes}
    for steps in args.steps:
        runs = {mode: [] for mode in args.modes}
        for _ in range(args.processes):
            for mode in args.modes:
                runs[mode].append(run_worker(__spec__.name, ["--worker", mode, "--syn_steps", str(steps), "--repeats",
                                                        str(args.repeats), *problem_flags(args)]))
        for mode, measured in runs.items():
            results[mode][steps] = {"device": measured[0]["device"]}
            for key in ("seconds", "tensor_mb", "host_mb"):
                values = [r[key] for r in measured]
                results[mode][steps].update({key: statistics.median(values), f"{key}_min": min(values),
                                             f"{key}_max": max(values)})
        print(f"syn_steps {steps}: " + ", ".join(f"{m} {r[steps]['seconds']:.3f} s {r[steps]['tensor_mb']:.1f} MiB"
                                                  for m, r in results.items()), flush=True)
    return results


def _spread(measured: dict, key: str, digits: int) -> str:
    """median (min–max over the processes)."""
    low, high = measured[f"{key}_min"], measured[f"{key}_max"]
    return f"{measured[key]:.{digits}f} ({low:.{digits}f}–{high:.{digits}f})"


def table(results: dict, steps: list[int], cuda: bool) -> str:
    modes = list(results)
    where = "CUDA" if cuda else "tensor"
    head = (["syn_steps"] + [f"{m} s/it" for m in modes] + [f"{m} {where} peak MiB" for m in modes]
            + [f"{m} RSS peak MiB" for m in modes])
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for n in steps:
        cells = [str(n)] + [_spread(results[m][n], "seconds", 3) for m in modes]
        cells += [_spread(results[m][n], "tensor_mb", 1) for m in modes]
        cells += [_spread(results[m][n], "host_mb", 0) for m in modes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, steps: list[int], path: str, title: str, cuda: bool) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    memory_label = "CUDA peak MiB" if cuda else "peak MiB held by tensors"
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, by_steps in results.items():
        left.plot(steps, [by_steps[n]["tensor_mb"] for n in steps], marker="o", label=mode)
        right.plot(steps, [by_steps[n]["seconds"] for n in steps], marker="o", label=mode)
    for axis, label in ((left, memory_label), (right, "seconds per iteration")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(steps, [str(n) for n in steps])
        axis.set_xlabel("--syn_steps")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(one_configuration(args)))
        return
    title = (f"{args.image_encoder} at {args.image_size}px, N={args.num_queries}, minibatch {args.mini_batch_size}, "
             f"text dim {args.text_dim}; medians over {args.processes} fresh processes x {args.repeats} iterations")
    print(title, flush=True)
    results = measure_all(args)
    cuda = next(iter(next(iter(results.values())).values()))["device"].startswith("cuda")
    print(table(results, args.steps, cuda))
    plot(results, args.steps, args.plot, title, cuda)
    if args.json:
        Path(args.json).write_text(json.dumps({"title": title, "results": results}, indent=1))
    print(f"wrote {args.plot}")
    if "exact_lowmem" in results and "unroll" in results and 4 in args.steps:
        exact, unrolled = results["exact_lowmem"], results["unroll"]
        largest = max(args.steps)
        memory_ratio = exact[largest]["tensor_mb"] / exact[4]["tensor_mb"]
        time_ratios = {n: exact[n]["seconds"] / unrolled[n]["seconds"] for n in args.steps}
        worst = max(time_ratios, key=time_ratios.get)
        print(f"exact_lowmem tensor peak at {largest} steps / at 4 steps = {memory_ratio:.3f} (target <= 1.3); "
              f"exact_lowmem / unroll time ratio at 4 steps = {time_ratios[4]:.3f}, worst = {time_ratios[worst]:.3f} "
              f"at {worst} steps (target <= 1.6)")


if __name__ == "__main__":
    main()
