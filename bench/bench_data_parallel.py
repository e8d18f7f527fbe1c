"""Data-parallel distillation on this machine: iteration time with 1 and 2 processes (torchrun, gloo on
the CPU) against one process averaging the same number of segments, and what the all_reduce moves.

Runs `make demo`'s distillation (configs/demo.toml: frozen EfficientNet-Lite0 + image and text heads,
64 px, 100 pairs, 10 student steps) for a few iterations in each configuration, alternating them over
the repeats, and reads distill.py's own timing.json (matching iterations only; evaluations excluded;
the part spent in the all_reduce separately). Experts come from the demo's [buffer] settings (trained
once into --out, reused afterwards).

    python -m bench.bench_data_parallel                      # 10 iterations, 3 repeats
    python -m bench.bench_data_parallel --iterations 4 --repeats 1 --out /tmp/dp
    python -m bench.bench_data_parallel --allreduce_only     # only the all_reduce itself, 2 gloo processes

distill.py's all_reduce time includes waiting for the slower process; the second table times the
all_reduce alone (2 gloo processes on this machine, a barrier before each call) for the demo's buffer
and for the paper's (100 pairs at 224 px with BERT-base's 768-d texts).

A machine with 2 cores is the limit of what this shows: 2 processes x 1 thread use the same two cores
as 1 process x 2 threads, so the table measures overhead and the accounting, not a speed-up.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from comparison.config import distill_settings, load_config
from comparison.stages import as_flags, claim_output_folder, experts_stage
from data.distilled_set import load_distilled_set

REPO = Path(__file__).resolve().parents[1]
# (label, processes, segments per process, threads per process)
CONFIGURATIONS = (
    ("1 process x 2 threads", 1, 1, 2),
    ("1 process x 1 thread", 1, 1, 1),
    ("1 process x 2 threads, --trajectories_per_iteration 2", 1, 2, 2),
    ("1 process x 1 thread, --trajectories_per_iteration 2", 1, 2, 1),
    ("torchrun: 2 processes x 1 thread", 2, 1, 1),
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.toml"))
    parser.add_argument("--out", default=str(REPO / "outputs" / "bench_data_parallel"))
    parser.add_argument("--iterations", type=int, default=10, help="matching iterations per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration (alternating)")
    parser.add_argument("--allreduce_only", action="store_true", help="only time the all_reduce alone")
    return parser.parse_args(argv)


# Floats all-reduced per iteration: the demo (100 pairs, 3 x 64 x 64 pixels, 384-d texts, 2 step sizes, 2
# loss terms) and the paper (100 pairs at 3 x 224 x 224, 768-d BERT-base texts).
BUFFERS = {"demo (100 pairs, 64 px, 384-d)": 100 * 3 * 64 * 64 + 100 * 384 + 4,
           "paper (100 pairs, 224 px, 768-d)": 100 * 3 * 224 * 224 + 100 * 768 + 4}


def _time_allreduce(rank: int, init_file: str, repeats: int, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    for label, numel in BUFFERS.items():
        buffer, times = torch.ones(numel), []
        for _ in range(repeats + 1):
            dist.barrier()
            began = time.perf_counter()
            dist.all_reduce(buffer)
            times.append(time.perf_counter() - began)
        if rank == 0:
            results[label] = times[1:]  # the first call sets up the connections
    dist.destroy_process_group()


def allreduce_alone(out: Path, repeats: int = 20) -> None:
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    init = out / "allreduce_init"
    init.unlink(missing_ok=True)
    mp.spawn(_time_allreduce, args=(str(init), repeats, results), nprocs=2, join=True)
    print(f"\nall_reduce alone, 2 gloo processes on this machine, {repeats} calls after a warm-up; median (min-max)\n")
    print("| buffer | MB | ms per all_reduce | MB/s |")
    print("|---|---:|---:|---:|")
    for label, numel in BUFFERS.items():
        times = results[label]
        median = statistics.median(times)
        print(f"| {label} | {4 * numel / 1e6:.1f} | {median * 1000:.1f} ({min(times) * 1000:.1f}-"
              f"{max(times) * 1000:.1f}) | {4 * numel / 1e6 / median:.0f} |")


def run_once(flags: list[str], processes: int, per_process: int, threads: int, save_dir: Path) -> dict:
    program = [str(REPO / "distill.py")]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    command = [*launcher, *program, *flags, "--save_dir", str(save_dir), "--trajectories_per_iteration",
               str(per_process)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"distill.py failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    timing = json.loads((save_dir / "timing.json").read_text())
    saved = load_distilled_set(save_dir / "distilled_last.pt")
    floats = saved["image_syn"].numel() + saved["text_syn"].numel() + 4 + sum(t.numel() for t in saved.get("sim_params", []))
    return {"per_iteration": timing["seconds"] / timing["iterations"],
            "sync_per_iteration": timing.get("sync_seconds", 0.0) / timing["iterations"],
            "allreduce_bytes": 4 * floats if processes > 1 else 0}


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    claim_output_folder(out, "--out")  # its experts stage deletes outputs of other flags: only in a folder of its own
    if args.allreduce_only:
        allreduce_alone(out)
        return 0
    config = load_config(args.config, None)
    expert_dir = experts_stage(config, out)
    settings, _ = distill_settings(config)
    settings.update({"iterations": args.iterations, "eval_it": args.iterations, "num_eval": 1,
                     "epoch_eval_train": 1, "draw": False, "wandb_mode": "disabled", "progress": False})
    flags = as_flags(config["common"]) + as_flags(settings) + ["--buffer_path", str(expert_dir)]
    results = {label: [] for label, *_ in CONFIGURATIONS}
    for repeat in range(args.repeats):
        for index, (label, processes, per_process, threads) in enumerate(CONFIGURATIONS):
            result = run_once(flags + ["--wandb_mode", "disabled"], processes, per_process, threads,
                              out / f"run_{index}_{repeat}")
            results[label].append(result)
            print(f"[repeat {repeat}] {label}: {result['per_iteration']:.3f} s/iteration "
                  f"(all_reduce {result['sync_per_iteration'] * 1000:.1f} ms)", flush=True)
    print(f"\n{args.iterations} iterations per run, {args.repeats} runs per configuration; median (min-max)\n")
    print("| configuration | segments per update | s / iteration | s / segment | all_reduce ms / iteration | "
          "MB all-reduced / iteration |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, processes, per_process, _ in CONFIGURATIONS:
        times = [r["per_iteration"] for r in results[label]]
        sync = statistics.median(r["sync_per_iteration"] for r in results[label])
        segments = processes * per_process
        print(f"| {label} | {segments} | {statistics.median(times):.3f} ({min(times):.3f}-{max(times):.3f}) | "
              f"{statistics.median(times) / segments:.3f} | {sync * 1000:.1f} | "
              f"{results[label][0]['allreduce_bytes'] / 1e6:.2f} |")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    allreduce_alone(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
