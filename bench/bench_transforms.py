"""Per-image cost of the training data pipeline: opening + decoding, and each transform step.

    python -m bench.bench_transforms --image_root ~/.cache/vl-distill/shapes --image_size 32
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from data.datasets import load_rgb
from data.transforms import normalize, train_transform


def per_image_ms(fn, items) -> float:
    start = time.perf_counter()
    for item in items:
        fn(item)
    return (time.perf_counter() - start) / len(items) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image_root", default=str(Path.home() / ".cache/vl-distill/shapes"))
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--count", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one loader worker's view
    files = sorted(Path(args.image_root).rglob("*.png"))[:args.count] or sorted(Path(args.image_root).rglob("*.jpg"))[:args.count]
    images = [load_rgb(f) for f in files]
    resized = [T.Resize((args.image_size, args.image_size))(im) for im in images]
    crop = T.RandomResizedCrop(args.image_size, scale=(0.5, 1.0), interpolation=InterpolationMode.BICUBIC)
    rows = [("open + decode + RGB", per_image_ms(load_rgb, files)),
            ("RandomResizedCrop", per_image_ms(crop, images)),
            ("RandAugment(2, 5)", per_image_ms(T.RandAugment(2, 5), resized)),
            ("ToTensor + Normalize", per_image_ms(lambda im: normalize()(T.ToTensor()(im)), resized)),
            ("whole training transform", per_image_ms(train_transform(args.image_size), images))]
    print(f"{len(files)} images from {args.image_root}, output {args.image_size} px, 1 thread")
    print("| step | ms per image |\n|---|---:|")
    for name, ms in rows:
        print(f"| {name} | {ms:.2f} |")


if __name__ == "__main__":
    main()
