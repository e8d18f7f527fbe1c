"""The whole pipeline at the paper's model size, as a quick check of a machine (GPU or CPU).

buffer.py -> distill.py with each --matching mode -> evaluate.py on the embedded `shapes` data,
NFNet-l0 from scratch at 224 px with BERT-base text embeddings (MiniLM, 384-d, when bert-base-uncased is
not on disk), printing per-iteration time and peak GPU memory of every mode, then the same
distillation under torchrun on every visible GPU when there are two or more. Each program runs as a
user would run it (a subprocess with flags), in a scratch folder.

    bash bench/gpu_check.sh                 # paper size: <= 5 minutes on one modern GPU
    bash bench/gpu_check.sh --size ci --processes 2   # seconds on a CPU: what the test suite runs

The ci size swaps NFNet-l0 for the small ConvNet at 16 px: on a CPU, NFNet-l0's second-order backward
takes about a minute for a single 2-step iteration on 4 pairs even at 32 px (its weight-standardised
convolutions), far beyond a test. A mode that runs out of GPU memory is reported as such, and the
others still run.

Exit status 0 when every program ran; the table is the report.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MODES = ("unroll", "exact_lowmem", "tesla")
# Model and run size per check size. paper: the paper's encoder and image size, 100 synthetic pairs (its
# smallest Flickr30K budget) and a few iterations; ci: the same programs in seconds on a CPU.
SIZES = {
    "paper": {"image_encoder": "nfnet", "image_size": 224, "train_images": 1000, "epochs": 2, "experts": 1,
              "pairs": 100, "batch": 50, "syn_steps": 4, "iterations": 6, "eval_epochs": 20},
    "ci": {"image_encoder": "convnet", "image_size": 16, "train_images": 40, "epochs": 2, "experts": 1,
           "pairs": 4, "batch": 4, "syn_steps": 2, "iterations": 2, "eval_epochs": 1},
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="paper", help="paper (GPU) or ci (CPU, seconds)")
    parser.add_argument("--work_dir", default=None, help="scratch folder (default: a temporary one, removed after)")
    parser.add_argument("--image_root", default=None, help="an existing shapes folder (default: generated in the "
                                                           "scratch cache)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    parser.add_argument("--processes", type=int, default=None, help="processes of the torchrun row (default: every "
                                                                   "visible GPU, none on a CPU; 0 = no such row)")
    return parser.parse_args(argv)


def text_encoder() -> str:
    """bert when bert-base-uncased is on disk (the paper's), else minilm."""
    try:
        from transformers import AutoConfig
        AutoConfig.from_pretrained("bert-base-uncased", local_files_only=True)
        return "bert"
    except Exception:  # not in the local cache: nothing may be downloaded
        return "minilm"


class Check:
    def __init__(self, args, work: Path):
        self.args, self.work, self.size = args, work, SIZES[args.size]
        self.text = text_encoder()
        self.env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    "WANDB_MODE": "disabled"}

    def common(self) -> list[str]:
        size = self.size
        flags = ["--dataset", "shapes", "--cache_dir", str(self.work / "cache"), "--image_encoder", size["image_encoder"],
                 "--image_pretrained", "False", "--image_size", str(size["image_size"]), "--text_encoder", self.text,
                 "--max_train_images", str(size["train_images"]), "--num_workers", "0", "--progress", "False",
                 "--wandb_mode", "disabled", "--buffer_path", str(self.work / "buffers")]
        if self.args.image_root:
            flags += ["--image_root", self.args.image_root]
        if self.args.device:
            flags += ["--device", self.args.device]
        return flags

    def distill_flags(self, mode: str, save_dir: Path) -> list[str]:
        size = self.size
        return [*self.common(), "--matching", mode, "--save_dir", str(save_dir), "--num_pairs", str(size["pairs"]),
                "--mini_batch_size", str(size["batch"]), "--syn_steps", str(size["syn_steps"]), "--expert_epochs", "1",
                "--max_start_epoch", "1", "--iterations", str(size["iterations"]), "--eval_it", str(size["iterations"]),
                "--num_eval", "1", "--epoch_eval_train", str(size["eval_epochs"]), "--lr_img", "100",
                "--lr_txt", "100", "--lr_lr", "1e-5", "--draw", "False"]

    def run(self, label: str, command: list[str], may_run_out_of_memory: bool = False) -> float | None:
        """Run one program; its wall time, or None when it ran out of GPU memory and that is allowed."""
        began = time.perf_counter()
        done = subprocess.run(command, cwd=REPO, env=self.env, capture_output=True, text=True)
        seconds = time.perf_counter() - began
        if done.returncode != 0 and may_run_out_of_memory and "out of memory" in done.stderr.lower():
            print(f"  {label}: out of GPU memory", flush=True)
            return None
        if done.returncode != 0:
            print(done.stdout[-4000:], done.stderr[-4000:], sep="\n", file=sys.stderr)
            raise SystemExit(f"gpu_check: {label} failed (exit {done.returncode}); its output is above")
        print(f"  {label}: {seconds:.0f}s", flush=True)
        return seconds

    def program(self, name: str, flags: list[str]) -> list[str]:
        return [sys.executable, str(REPO / f"{name}.py"), *flags]


def timing_of(save_dir: Path, seconds: float | None) -> dict | None:
    """distill.py's timing.json of a finished run (None: the run ran out of memory)."""
    return None if seconds is None else json.loads((save_dir / "timing.json").read_text())


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="vl-distill-gpu-check-"))
    check = Check(args, work)
    size = check.size
    cuda = torch.cuda.is_available() and (args.device or "cuda").startswith("cuda")
    processes = args.processes if args.processes is not None else (torch.cuda.device_count() if cuda else 0)
    print(f"gpu_check ({args.size}): {size['image_encoder']} from scratch at {size['image_size']} px, text {check.text}; "
          f"{size['pairs']} pairs, {size['syn_steps']} student steps, {size['iterations']} iterations per mode; "
          f"device {args.device or ('cuda' if cuda else 'cpu')}; scratch {work}", flush=True)
    rows = []
    try:
        check.run("buffer.py", check.program("buffer", [*check.common(), "--num_experts", str(size["experts"]),
                                                        "--train_epochs", str(size["epochs"])]))
        for mode in MODES:
            save_dir = work / f"distill_{mode}"
            seconds = check.run(f"distill.py --matching {mode}", check.program("distill", check.distill_flags(mode, save_dir)),
                                may_run_out_of_memory=cuda)
            rows.append((mode, 1, timing_of(save_dir, seconds)))
        if processes >= 2:
            save_dir = work / "distill_torchrun"
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                       str(REPO / "distill.py"), *check.distill_flags("exact_lowmem", save_dir)]
            seconds = check.run(f"torchrun x {processes} distill.py --matching exact_lowmem", command,
                                may_run_out_of_memory=cuda)
            rows.append(("exact_lowmem", processes, timing_of(save_dir, seconds)))
        evaluated = next((work / f"distill_{mode}" for mode, _, timing in rows if timing), None)
        if evaluated is None:
            raise SystemExit("gpu_check: every distillation ran out of GPU memory; nothing to evaluate")
        check.run("evaluate.py", check.program("evaluate", [*check.common(), "--distilled",
                                                            str(evaluated / "distilled_last.pt"),
                                                            "--num_eval", "1", "--epoch_eval_train",
                                                            str(size["eval_epochs"]),
                                                            "--out", str(work / "evaluate.json")]))
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print("\n| matching | processes | segments/update | s/iteration | sync s/iteration | peak GPU MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode, count, timing in rows:
        if timing is None:
            print(f"| {mode} | {count} | {count} | out of memory | | |")
            continue
        iterations = max(timing["iterations"], 1)
        peak = f"{timing['peak_gpu_mib']:.0f}" if "peak_gpu_mib" in timing else "n/a (CPU)"
        print(f"| {mode} | {count} | {count} | {timing['seconds'] / iterations:.3f} | "
              f"{timing.get('sync_seconds', 0.0) / iterations:.4f} | {peak} |")
    print("gpu_check: every program ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
