"""A random trajectory-matching problem at a given model size, and running a benchmark worker in a fresh process.

Shared by the benchmarks of one distillation iteration: synthetic data and the expert segment are
random (no data set or buffer needed); the model is built exactly as distill.py builds it.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from bench.peak_memory import PeakRss
from matching.trajectory import Segment, Students
from networks import ImageTextModel, create_image_encoder
from reparam_module import ReparamModule, flatten
from utils.tensor_memory import TensorPeak


@dataclass
class MatchingProblem:
    model: ImageTextModel
    students: Students
    image_syn: torch.Tensor
    text_syn: torch.Tensor
    lr_img: torch.Tensor
    lr_txt: torch.Tensor
    start: dict  # part name -> list of parameter tensors (the reference loop's layout)
    target: dict
    segment: Segment


def random_problem(image_encoder: str, image_size: int, text_dim: int, num_queries: int,
                   device: torch.device, seed: int = 0) -> MatchingProblem:
    torch.manual_seed(seed)
    model = ImageTextModel(create_image_encoder(image_encoder, image_size), text_dim).to(device).train()
    image_syn = torch.randn(num_queries, 3, image_size, image_size, device=device, requires_grad=True)
    text_syn = torch.randn(num_queries, text_dim, device=device, requires_grad=True)
    lr_img = torch.tensor(0.01, device=device, requires_grad=True)
    lr_txt = torch.tensor(0.01, device=device, requires_grad=True)
    start = {part: [p.detach().clone() for p in getattr(model, part).parameters()]
             for part in ("image_encoder", "text_projection")}
    target = {part: [p + 0.01 * torch.randn_like(p) for p in ps] for part, ps in start.items()}
    students = Students(ReparamModule(model.image_encoder), ReparamModule(model.text_projection))
    segment = Segment(flatten(start["image_encoder"]), flatten(start["text_projection"]),
                      flatten(target["image_encoder"]), flatten(target["text_projection"]), 0)
    return MatchingProblem(model, students, image_syn, text_syn, lr_img, lr_txt, start, target, segment)


def run_worker(module: str, flags: list[str]) -> dict:
    """Run module `module` (python -m) with `flags` in a fresh Python process; its last stdout line is a JSON object."""
    output = subprocess.run([sys.executable, "-m", module, *flags], check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def measure_iteration(iteration, device: torch.device, repeats: int) -> dict:
    """Peak resident set of a first (warm-up) call of `iteration`, the peak bytes of tensors in a second
    call (under the profiler on the CPU, so untimed), then the median time of `repeats` more.

    `cuda_mb` is the tensor peak on a GPU and 0 on the CPU (the key that bench_distill_iteration reads).
    """
    def synchronised():
        iteration()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with PeakRss() as rss:
        synchronised()
    with TensorPeak(device) as tensors:
        synchronised()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        synchronised()
        times.append(time.perf_counter() - began)
    return {"seconds": statistics.median(times), "host_mb": rss.host_mb, "tensor_mb": tensors.mib,
            "cuda_mb": tensors.mib if device.type == "cuda" else 0.0, "device": str(device)}


PROBLEM_FLAGS = ("image_encoder", "image_size", "text_dim", "num_queries", "mini_batch_size")


def add_problem_args(parser, mini_batch_size: int) -> None:
    """The model and synthetic-set size of the problem (demo configuration by default)."""
    parser.add_argument("--image_encoder", default="convnet_w32")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--text_dim", type=int, default=384)
    parser.add_argument("--num_queries", type=int, default=100)
    parser.add_argument("--mini_batch_size", type=int, default=mini_batch_size)
    parser.add_argument("--device", default=None)


def problem_flags(args) -> list[str]:
    """The flags that hand the same problem to a worker process."""
    flags = [f"--{name}={getattr(args, name)}" for name in PROBLEM_FLAGS]
    return flags + ([f"--device={args.device}"] if args.device else [])
