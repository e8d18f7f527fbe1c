"""What distilling for several image encoders costs per iteration: one encoder, --encoder_schedule cycle and mean,
side by side in one invocation (each a distill.py process of its own, run one after the other).

    python -m bench.bench_encoder_cost --data ../shared/data/flickr8k --buffer_path outputs/multi_encoder/buffers \\
        --extra efficientnet_lite1 --iterations 6

The settings are configs/flickr8k_table.toml's at 100 pairs (frozen Lite0 trunk with an image head, MiniLM, 10
student steps over minibatches of 100, one-epoch segments from start epochs 0-1); every run starts from the same
seed. Seconds per iteration are timing.json's (matching only; the evaluation at iteration 0 is excluded); peak
resident memory is the process's (ru_maxrss). Timings are comparable only when nothing else runs on the machine.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

TABLE = ["--dataset", "flickr8k", "--image_encoder", "efficientnet_lite0", "--image_pretrained", "True",
         "--image_norm", "auto", "--image_projection", "True", "--train_stages", "0", "--feature_views", "2",
         "--text_encoder", "minilm", "--image_size", "128", "--eval_split", "val", "--wandb_mode", "disabled",
         "--syn_steps", "10", "--expert_epochs", "1", "--max_start_epoch", "2", "--mini_batch_size", "100",
         "--pix_init", "clean", "--lr_img", "100", "--lr_txt", "1000", "--lr_lr", "1e-3", "--num_pairs", "100",
         "--num_eval", "1", "--epoch_eval_train", "1", "--draw", "False", "--progress", "False"]
PEAK = ("import resource, runpy, sys; sys.argv = ['distill.py', *sys.argv[1:]]\n"
        "try:\n    runpy.run_module('distill', run_name='__main__')\n"
        "finally:\n    print('PEAK_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the Flickr8k folder (images/ and annotations/)")
    parser.add_argument("--buffer_path", required=True, help="a buffer root holding the experts of every encoder")
    parser.add_argument("--extra", nargs="+", default=["efficientnet_lite1"], help="the extra image encoders")
    parser.add_argument("--iterations", type=int, default=6, help="matching iterations per run")
    return parser.parse_args()


def timed_run(args, folder: Path, extra: list[str]) -> dict:
    """One distill.py run; its seconds per iteration and peak memory."""
    flags = [*TABLE, "--image_root", args.data, "--buffer_path", args.buffer_path, "--save_dir", str(folder),
             "--iterations", str(args.iterations), "--eval_it", str(args.iterations + 1), *extra]
    done = subprocess.run([sys.executable, "-c", PEAK, *flags], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"distill.py failed:\n{done.stderr[-2000:]}")
    timing = json.loads((folder / "timing.json").read_text())
    peak = next(int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("PEAK_KIB"))
    return {"s_per_iteration": timing["seconds"] / timing["iterations"], "peak_mib": peak / 1024}


def main() -> None:
    args = parse_args()
    runs = {"one encoder (Lite0)": [],
            f"cycle over Lite0 + {', '.join(args.extra)}": ["--extra_image_encoders", *args.extra],
            f"mean over Lite0 + {', '.join(args.extra)}": ["--extra_image_encoders", *args.extra,
                                                          "--encoder_schedule", "mean"]}
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for number, (name, extra) in enumerate(runs.items()):
            results[name] = timed_run(args, Path(scratch) / str(number), extra)
            print(f"{name}: {results[name]['s_per_iteration']:.2f} s / iteration, peak {results[name]['peak_mib']:.0f} MiB",
                  flush=True)
    first = next(iter(results.values()))
    print("\n| run | s / iteration | × one encoder | peak memory (MiB) |\n|---|---:|---:|---:|")
    for name, found in results.items():
        print(f"| {name} | {found['s_per_iteration']:.2f} | {found['s_per_iteration'] / first['s_per_iteration']:.2f} "
              f"| {found['peak_mib']:.0f} |")


if __name__ == "__main__":
    main()
