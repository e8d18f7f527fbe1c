"""Kill buffer.py and distill.py at random moments and check everything they leave behind.

For each program: one uninterrupted reference run, then `--kills` runs each stopped at a random moment
(uniform over the reference's wall time) by SIGKILL (`kill -9`: no chance to save) or SIGINT (Ctrl-C:
the program saves and exits). After every stop it checks each file in the output folder (loads with
`torch.load(weights_only=True)`, every tensor finite; for distill.py the best set agrees with the last
state's best r_mean; no temporary files are left once the program has been run again), then finishes
the run (distill.py `--resume distilled_last.pt`, buffer.py simply rerun) and compares the result with
the reference, tensor for tensor.

    python -m bench.fault_injection --kills 20 --work_dir /tmp/faults

Prints a markdown table (kills, files checked, corrupt, iterations lost, resumed run identical) and writes
<work_dir>/fault_injection.json with one record per kill. The tiny data set and the settings are fixed
below so that the figures are comparable between machines.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from data.shapes import ensure_shapes

DATA_FLAGS = ["--dataset", "shapes", "--image_encoder", "convnet", "--image_size", "16", "--image_pretrained",
              "False", "--text_encoder", "minilm", "--num_workers", "0", "--wandb_mode", "disabled"]
BUFFER_FLAGS = ["--num_experts", "3", "--train_epochs", "6", "--batch_train", "25"]
DISTILL_FLAGS = ["--syn_steps", "8", "--expert_epochs", "1", "--max_start_epoch", "2", "--num_pairs", "20",
                 "--mini_batch_size", "10", "--lr_img", "100", "--lr_txt", "100", "--lr_lr", "1e-5",
                 "--iterations", "40", "--eval_it", "10", "--num_eval", "1", "--epoch_eval_train", "3",
                 "--batch_train", "10", "--draw", "False"]
# The distill progress bar as tqdm draws it on stderr: "distill:  40%|####      | 16/40 [...]".
PROGRESS = re.compile(r"distill:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")


def tensors_in(obj):
    """Every tensor inside nested dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from tensors_in(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from tensors_in(value)


def check_file(path: Path) -> str | None:
    """What is wrong with a saved .pt file (None: it loads and every floating-point tensor is finite)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any failure to load is what this benchmark counts
        return f"does not load ({type(err).__name__})"
    for tensor in tensors_in(payload):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return "holds non-finite values"
    return None


def best_agrees_with_last(folder: Path) -> str | None:
    """The best file holds the best evaluation that the last file's state records, or a newer one (the best
    file is written first, so a stop between the two writes leaves it one evaluation ahead)."""
    last, best = folder / "distilled_last.pt", folder / "distilled_best.pt"
    if not last.is_file():
        return None
    last_payload = torch.load(last, map_location="cpu", weights_only=True)
    state = last_payload.get("state", {})
    if state.get("best_r_mean", -1.0) < 0:
        return None
    if not best.is_file():
        return "the last state records a best r_mean but there is no best file"
    best_payload = torch.load(best, map_location="cpu", weights_only=True)
    if best_payload["iteration"] > last_payload["iteration"]:
        return None
    r_mean = best_payload.get("metrics", {}).get("r_mean", {}).get("mean")
    if r_mean != state["best_r_mean"] or best_payload["iteration"] != state.get("best_iteration"):
        return (f"best file (iteration {best_payload['iteration']}, r_mean {r_mean}) is not the best the last state "
                f"records (iteration {state.get('best_iteration')}, r_mean {state['best_r_mean']})")
    return None


class Runner:
    """Start a program on the tiny data set, optionally stopping it after `after` seconds."""

    def __init__(self, work: Path):
        self.data = ensure_shapes(work / "data", num_train=60, num_val=10, num_test=10, image_px=32, progress=False)
        self.common = DATA_FLAGS + ["--image_root", str(self.data), "--cache_dir", str(work / "cache")]

    def run(self, program: str, flags: list[str], after: float | None = None, sig=signal.SIGKILL) -> dict:
        command = [sys.executable, "-m", program, *self.common, *flags]
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)
        stopped = False
        if after is not None:
            try:
                process.wait(timeout=after)
            except subprocess.TimeoutExpired:
                process.send_signal(sig)
                stopped = True
        out, err = process.communicate()
        seconds = time.perf_counter() - started
        if not stopped and process.returncode != 0:
            raise SystemExit(f"{program} failed (exit {process.returncode}):\n{err[-3000:]}")
        return {"stopped": stopped, "code": process.returncode, "seconds": seconds, "stdout": out, "stderr": err}


def learned_tensors(path: Path) -> list[torch.Tensor]:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    keys = ("image_syn", "text_syn")
    return [payload[k] for k in keys] + [torch.tensor([payload["syn_lr_img"], payload["syn_lr_txt"]])] + \
        list(payload.get("sim_params", []))


def same_tensors(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


def expert_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*_replay_buffer_*.pt"))


def temporaries(folder: Path) -> list[Path]:
    """Temporary files and partial-expert folders: none may be left once a run has finished."""
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name
            or p.name.startswith(".partial_")]


def kill_buffer(runner: Runner, work: Path, reference: Path, seconds: float, rng: random.Random, sig) -> dict:
    folder = work / "buffers"
    shutil.rmtree(folder, ignore_errors=True)
    after = rng.uniform(0.0, seconds)
    first = runner.run("buffer", BUFFER_FLAGS + ["--buffer_path", str(folder)], after=after, sig=sig)
    files = [p for p in folder.rglob("*.pt")]
    corrupt = {str(p.relative_to(folder)): problem for p in files if (problem := check_file(p))}
    runner.run("buffer", BUFFER_FLAGS + ["--buffer_path", str(folder)])  # rerun: must finish what is missing
    left = temporaries(folder)
    # Every expert file of the reference must be there again with the same bytes (a rerun may add more).
    identical = all((folder / p.relative_to(reference)).is_file()
                    and (folder / p.relative_to(reference)).read_bytes() == p.read_bytes()
                    for p in expert_files(reference))
    return {"program": "buffer", "signal": sig.name, "after": round(after, 2), "stopped": first["stopped"],
            "files": len(files), "corrupt": corrupt, "temporaries_left": [str(p) for p in left],
            "lost": None, "identical": identical}


def kill_distill(runner: Runner, work: Path, experts: Path, reference: Path, seconds: float,
                 rng: random.Random, sig) -> dict:
    folder = work / "distill"
    shutil.rmtree(folder, ignore_errors=True)
    flags = DISTILL_FLAGS + ["--buffer_path", str(experts), "--save_dir", str(folder)]
    after = rng.uniform(0.0, seconds)
    first = runner.run("distill", flags + ["--progress", "True"], after=after, sig=sig)
    files = sorted(folder.glob("*.pt")) if folder.is_dir() else []
    corrupt = {p.name: problem for p in files if (problem := check_file(p))}
    disagreement = None if corrupt else best_agrees_with_last(folder)
    done = [int(m[1]) for m in PROGRESS.finditer(first["stderr"])]
    last = folder / "distilled_last.pt"
    saved = torch.load(last, map_location="cpu", weights_only=True)["iteration"] if last.is_file() and not corrupt \
        else 0
    lost = (max(done) if done else 0) - saved
    # (a damaged last file cannot be resumed: start over there, which distill.py allows only when told)
    resume = ["--resume", str(last)] if last.is_file() and not corrupt else ["--overwrite", "True"]
    runner.run("distill", flags + ["--progress", "False", *resume])
    left = temporaries(folder)
    identical = all(same_tensors(learned_tensors(folder / name), learned_tensors(reference / name))
                    for name in ("distilled_last.pt", "distilled_best.pt"))
    return {"program": "distill", "signal": sig.name, "after": round(after, 2), "stopped": first["stopped"],
            "files": len(files), "corrupt": corrupt, "best_vs_last": disagreement,
            "temporaries_left": [str(p) for p in left], "lost": max(lost, 0), "saved_iteration": saved,
            "resumed": bool(resume), "identical": identical}


def summarise(records: list[dict]) -> list[str]:
    lines = ["| program | signal | kills (stopped while running) | files checked | corrupt | best ≠ last | "
             "temporaries left | iterations lost (mean / max) | finished run identical |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for program in ("buffer", "distill"):
        for sig in ("SIGKILL", "SIGINT"):
            rows = [r for r in records if r["program"] == program and r["signal"] == sig]
            if not rows:
                continue
            lost = [r["lost"] for r in rows if r["lost"] is not None]
            lost_text = f"{sum(lost) / len(lost):.1f} / {max(lost)}" if lost else "n/a"
            same = sum(r["identical"] for r in rows)
            lines.append(f"| {program}.py | {sig} | {len(rows)} ({sum(r['stopped'] for r in rows)}) | "
                         f"{sum(r['files'] for r in rows)} | {sum(len(r['corrupt']) for r in rows)} | "
                         f"{sum(bool(r.get('best_vs_last')) for r in rows)} | "
                         f"{sum(len(r['temporaries_left']) for r in rows)} | {lost_text} | "
                         f"{'yes' if same == len(rows) else 'no'} ({same}/{len(rows)}) |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20, help="stops per program (half SIGKILL, half SIGINT)")
    parser.add_argument("--work_dir", default="outputs/fault_injection", help="scratch folder (reused data, cache)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random stopping moments")
    parser.add_argument("--programs", nargs="+", default=["buffer", "distill"], choices=["buffer", "distill"])
    args = parser.parse_args(argv)
    if args.kills < 1:
        parser.error(f"--kills {args.kills}: must be at least 1")
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    runner, rng = Runner(work), random.Random(args.seed)

    reference_buffers = work / "reference_buffers"
    shutil.rmtree(reference_buffers, ignore_errors=True)
    buffer_seconds = runner.run("buffer", BUFFER_FLAGS + ["--buffer_path", str(reference_buffers)])["seconds"]
    reference_distill = work / "reference_distill"
    shutil.rmtree(reference_distill, ignore_errors=True)
    distill_seconds = runner.run("distill", DISTILL_FLAGS + ["--buffer_path", str(reference_buffers), "--save_dir",
                                                             str(reference_distill)])["seconds"]
    print(f"reference runs: buffer.py {buffer_seconds:.1f} s, distill.py {distill_seconds:.1f} s", flush=True)

    records = []
    for program in args.programs:
        for k in range(args.kills):
            sig = signal.SIGKILL if k % 2 == 0 else signal.SIGINT
            if program == "buffer":
                record = kill_buffer(runner, work, reference_buffers, buffer_seconds, rng, sig)
            else:
                record = kill_distill(runner, work, reference_buffers, reference_distill, distill_seconds, rng, sig)
            records.append(record)
            print(f"{program} {sig.name} after {record['after']:.1f}s: files {record['files']}, corrupt "
                  f"{len(record['corrupt'])}, lost {record['lost']}, identical {record['identical']}", flush=True)
    (work / "fault_injection.json").write_text(json.dumps(records, indent=1))
    print("\n".join(summarise(records)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
