"""Peak resident memory of distill.py's walk over a 20-expert buffer, .pt pairs against safetensors.

    python -m bench.bench_buffer_memory                         # the Flickr8k table's experts, 20 of them
    python -m bench.bench_buffer_memory --snapshots 51 --experts 5 --folder /tmp/buffers --keep

The experts have the shapes of configs/flickr8k_table.toml's (EfficientNet-Lite0 frozen, the image and text
heads trained: 3.28 M + 2.14 M parameters, 20.7 MiB a snapshot; train_epochs 4, so 5 snapshots), or those of
the buffer_meta.json given with --shapes_from. Every snapshot is a constant of its own: cheap to write, as
costly to read as trained weights. The buffer is written once per layout into --folder (kept with --keep and
reused then). A fresh process per layout then walks it as distill.py does with the table's --max_start_epoch 2
--expert_epochs 1: the cycler hands out an expert, a segment (start and target snapshots, flattened) is
drawn from it and kept until the next visit begins; two passes over all experts (the first runs the checks). The
table gives the peak resident set above the level before the walk (VmHWM, Linux) and the seconds per visit.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.matching_problem import run_worker
from bench.peak_memory import PeakRss
from experts.cycler import ExpertCycler
from experts.files import claim_metadata, expert_files, read_metadata, save_expert
from matching.trajectory import pick_segment

# configs/flickr8k_table.toml's experts (outputs/flickr8k_table/buffers/.../buffer_meta.json): the image head
# over Lite0's 1280 features and the text head over MiniLM's 384.
HEAD = [[1280, 1280], [1280], [1280, 1280], [1280], [1280], [1280]]
SHAPES = {"image_param_shapes": HEAD, "text_param_shapes": [[1280, 384], *HEAD[1:]]}
LAYOUTS = ("pt", "safetensors")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=20)
    parser.add_argument("--snapshots", type=int, default=5, help="per trajectory (train_epochs + 1)")
    parser.add_argument("--max_start_epoch", type=int, default=2)
    parser.add_argument("--expert_epochs", type=int, default=1)
    parser.add_argument("--shapes_from", type=Path, help="a buffer_meta.json whose parameter shapes to use (read only)")
    parser.add_argument("--folder", type=Path, help="where the two buffers go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the buffers (and reuse them on the next run)")
    parser.add_argument("--processes", type=int, default=1, help="fresh processes per layout; medians shown")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def write_buffer(folder: Path, layout: str, shapes: dict, experts: int, snapshots: int) -> None:
    """`experts` experts of `snapshots` snapshots with these shapes, unless the folder holds them already."""
    if len(expert_files(folder)) == experts:
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    claim_metadata(folder, {"format": 1, **shapes}, layout)
    for n in range(experts):
        image, text = ([[torch.full(shape, 1000.0 * n + e) for shape in shapes[key]] for e in range(snapshots)]
                       for key in ("image_param_shapes", "text_param_shapes"))
        save_expert(folder, n, image, text, layout)


def walk(folder: Path, args) -> dict:
    """Runs in a fresh process: two passes of distill.py's use of the experts, their peak memory and time."""
    meta = read_metadata(folder)
    generator = torch.Generator().manual_seed(0)
    cycler = ExpertCycler(folder, meta, generator, args.max_start_epoch + args.expert_epochs,
                          expert_epochs=args.expert_epochs)
    visits, seconds = len(cycler.files), []
    segment = None
    with PeakRss() as rss:
        for _ in range(2):
            began = time.perf_counter()
            for _ in range(visits):
                segment = None  # distill.py drops a segment once its step is done
                image, text = cycler.next()
                segment = pick_segment(image, text, args.max_start_epoch, args.expert_epochs, generator,
                                       torch.device("cpu"))
                del image, text
            seconds.append((time.perf_counter() - began) / visits)
    assert segment is not None
    return {"peak_mb": rss.host_mb, "first_s": seconds[0], "second_s": seconds[1]}


def megabytes(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 2**20


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(walk(args.worker, args)))
        return
    shapes = SHAPES
    if args.shapes_from:
        found = json.loads(args.shapes_from.read_text())
        shapes = {key: found[key] for key in SHAPES}
    root = args.folder or Path(tempfile.mkdtemp(prefix="bench_buffer_memory_"))
    snapshot_mb = sum(torch.Size(s).numel() for part in shapes.values() for s in part) * 4 / 2**20
    print(f"{args.experts} experts x {args.snapshots} snapshots of {snapshot_mb:.1f} MiB; segments of "
          f"--max_start_epoch {args.max_start_epoch} --expert_epochs {args.expert_epochs}; torch {torch.__version__}")
    rows = []
    try:
        for layout in LAYOUTS:
            began = time.perf_counter()
            write_buffer(root / layout, layout, shapes, args.experts, args.snapshots)
            written = time.perf_counter() - began
            flags = ["--worker", str(root / layout), "--max_start_epoch", str(args.max_start_epoch),
                     "--expert_epochs", str(args.expert_epochs)]
            runs = [run_worker(__spec__.name, flags) for _ in range(args.processes)]
            found = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            trajectory = snapshot_mb * args.snapshots
            rows.append(f"| {layout} | {megabytes(root / layout):,.0f} | {trajectory:.0f} | {found['peak_mb']:.0f} | "
                        f"{found['peak_mb'] / trajectory:.2f} | {found['first_s']:.3f} | {found['second_s']:.3f} | "
                        f"{written:.0f} |")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print("| layout | buffer on disk (MiB) | one trajectory (MiB) | peak RSS above start (MiB) | peak / trajectory "
          "| s per visit, 1st pass | s per visit, 2nd pass | s to write |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
