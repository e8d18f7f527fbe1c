"""The frozen trunk's forward and backward pass over N synthetic images, in one pass or in chunks (FrozenPass).

    python -m bench.bench_frozen_pass --sizes 100 450 --chunks 100000 128 --repeats 2

EfficientNet-Lite0 (ImageNet weights, frozen, eval mode) at --image_size on random pixels; every image used, as
when the minibatches of an iteration cover the set. Prints the seconds of each (size, chunk), alternating.
"""
from __future__ import annotations

import argparse
import time

import torch

from matching.trajectory import FrozenPass
from networks import build_model
from settings import ModelSettings
from settings.programs import Parser
from utils.cli import run_cli


def main(argv=None) -> int:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                    prog="python -m bench.bench_frozen_pass")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 450])
    parser.add_argument("--chunks", type=int, nargs="+", default=[100000, 128])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--image_size", type=int, default=128)
    args = parser.parse_args(argv)
    settings = ModelSettings(image_encoder="efficientnet_lite0", image_pretrained=True, image_projection=True,
                             train_stages=0, image_size=args.image_size)
    trunk = build_model(settings, text_dim=384).trunk.eval()
    generator = torch.Generator().manual_seed(0)
    for size in args.sizes:
        leaf = torch.randn(size, 3, args.image_size, args.image_size, generator=generator, requires_grad=True)
        for _ in range(args.repeats):
            for chunk in args.chunks:
                began = time.perf_counter()
                frozen = FrozenPass(trunk, leaf, [torch.arange(size)], chunk)
                frozen.pixel_gradient(leaf, torch.randn_like(frozen.features))
                print(f"n {size} chunk {chunk}: {time.perf_counter() - began:.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
