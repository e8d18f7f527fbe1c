"""Time and peak memory of one distillation iteration: distill.py's unrolled matching against the
straightforward reference loop of tests/test_matching.py, each configuration in a fresh process.

One iteration = unroll --syn_steps student steps (graph kept) + the backward pass to the synthetic
images, texts and step sizes. Synthetic data and expert segments are random (no data set or buffer
needed); the model is built exactly as distill.py builds it.

    python bench/bench_distill_iteration.py                       # demo configuration, steps 2 4 8 16
    python bench/bench_distill_iteration.py --image_encoder convnet --image_size 32 --steps 2 4
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests"), str(HERE)]

import torch  # noqa: E402

from matching.trajectory import Segment, Students, draw_minibatches, unrolled_matching_loss  # noqa: E402
from networks import ImageTextModel, create_image_encoder  # noqa: E402
from peak_memory import PeakMemory  # noqa: E402
from reparam_module import ReparamModule, flatten  # noqa: E402
from utils.device import pick_device  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image_encoder", default="convnet_w32")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--text_dim", type=int, default=384)
    parser.add_argument("--num_queries", type=int, default=100)
    parser.add_argument("--mini_batch_size", type=int, default=50)
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=5, help="timed iterations per process (after a warm-up)")
    parser.add_argument("--processes", type=int, default=5,
                        help="fresh processes per configuration; the table shows medians over them")
    parser.add_argument("--device", default=None)
    parser.add_argument("--worker", choices=("ours", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--syn_steps", type=int, help=argparse.SUPPRESS)
    return parser.parse_args()


def one_configuration(args) -> dict:
    """Runs inside a fresh process: one warm-up iteration, then `repeats` timed ones."""
    from test_matching import reference_matching_loss

    device = pick_device(args.device)
    torch.manual_seed(0)
    model = ImageTextModel(create_image_encoder(args.image_encoder, args.image_size), args.text_dim).to(device).train()
    image_syn = torch.randn(args.num_queries, 3, args.image_size, args.image_size, device=device, requires_grad=True)
    text_syn = torch.randn(args.num_queries, args.text_dim, device=device, requires_grad=True)
    lr_img = torch.tensor(0.01, device=device, requires_grad=True)
    lr_txt = torch.tensor(0.01, device=device, requires_grad=True)
    start = {part: [p.detach().clone() for p in getattr(model, part).parameters()]
             for part in ("image_encoder", "text_projection")}
    target = {part: [p + 0.01 * torch.randn_like(p) for p in ps] for part, ps in start.items()}
    students = Students(ReparamModule(model.image_encoder), ReparamModule(model.text_projection))
    segment = Segment(flatten(start["image_encoder"]), flatten(start["text_projection"]),
                      flatten(target["image_encoder"]), flatten(target["text_projection"]), 0)
    generator = torch.Generator().manual_seed(0)

    def iteration():
        batches = draw_minibatches(args.num_queries, args.mini_batch_size, args.syn_steps, generator)
        if args.worker == "ours":
            loss = unrolled_matching_loss(students, image_syn, text_syn, lr_img, lr_txt, segment, batches).total
        else:
            loss = reference_matching_loss(model, image_syn, text_syn, lr_img, lr_txt, start, target, batches)
        torch.autograd.grad(loss, (image_syn, text_syn, lr_img, lr_txt))
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with PeakMemory(device) as memory:
        iteration()
    times = []
    for _ in range(args.repeats):
        began = time.perf_counter()
        iteration()
        times.append(time.perf_counter() - began)
    return {"seconds": statistics.median(times), "host_mb": memory.host_mb, "cuda_mb": memory.cuda_mb,
            "device": str(device)}


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
    command = [sys.executable, __file__, "--worker", worker, "--syn_steps", str(steps)]
    for name in ("image_encoder", "image_size", "text_dim", "num_queries", "mini_batch_size", "repeats"):
        command += [f"--{name}", str(getattr(args, name))]
    if args.device:
        command += ["--device", args.device]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


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
