"""Milliseconds per training step of an evaluation model's two heads (frozen-trunk regime), by part.

    python -m bench.bench_eval_step

The image head (1280 -> 1280) and the text head (384 -> 1280) of the frozen EfficientNet-Lite0 + MiniLM setting,
one batch of 64 pairs, InfoNCE, SGD with momentum and weight decay as the protocol trains them: forward, backward,
the did-not-train watch (evaluation.training.TrainingWatch, reading every gradient) and the optimiser step,
averaged over 50 steps after 10 warm-up steps; then the same without the watch.
"""
from __future__ import annotations

import time

import torch

from evaluation.training import TrainingWatch
from networks.projection import ProjectionHead


def measure(watch: bool, steps: int = 60, warmup: int = 10) -> dict[str, float]:
    torch.manual_seed(0)
    heads = ProjectionHead(1280, 1280), ProjectionHead(384, 1280)
    images, texts = torch.randn(64, 1280), torch.randn(64, 384)
    optimizers = [torch.optim.SGD(h.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4) for h in heads]
    counter, parts = TrainingWatch(), dict.fromkeys(("forward", "backward", "watch", "step"), 0.0)
    for k in range(steps):
        a = time.perf_counter()
        image_emb = torch.nn.functional.normalize(heads[0](images), dim=1)
        text_emb = torch.nn.functional.normalize(heads[1](texts), dim=1)
        loss = torch.nn.functional.cross_entropy(image_emb @ text_emb.T * 10, torch.arange(64))
        for optimizer in optimizers:
            optimizer.zero_grad()
        b = time.perf_counter()
        loss.backward()
        c = time.perf_counter()
        if watch:
            counter.count(optimizers)
        d = time.perf_counter()
        for optimizer in optimizers:
            optimizer.step()
        e = time.perf_counter()
        if k >= warmup:
            for name, seconds in zip(parts, (b - a, c - b, d - c, e - d)):
                parts[name] += seconds
    return {name: 1000 * seconds / (steps - warmup) for name, seconds in parts.items()}


def main() -> int:
    print(f"torch threads: {torch.get_num_threads()}")
    for watch in (True, False):
        parts = measure(watch)
        print(("with" if watch else "without") + " the watch: " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items())
              + f"; total {sum(parts.values()):.1f} ms per step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
