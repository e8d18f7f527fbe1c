"""Expert-training throughput and where the time goes.

Takes buffer.py's flags (same defaults) and times, on this machine: the data pipeline alone (decode
+ augmentation in the loader workers), the model step alone (forward, backward, SGD on tensors
already in memory), the two together as buffer.py runs them, and one retrieval evaluation.

    python -m bench.bench_experts --dataset shapes --image_encoder convnet_w32 --image_pretrained False \
        --text_encoder minilm --image_size 32 --batches 40
"""
from __future__ import annotations

import itertools
import sys
import time


import torch

import buffer
from data.build import eval_image_loader, load_retrieval_data, train_loader
from networks import build_model
from networks.contrastive import contrastive_loss
from utils.device import pick_device, seed_everything
from evaluation.metrics import retrieval_metrics
from evaluation.training import embed_eval_split, sgd_pair, train_one_epoch


def main() -> None:
    argv = sys.argv[1:]
    batches = 40
    if "--batches" in argv:
        at = argv.index("--batches")
        batches = int(argv[at + 1])
        del argv[at:at + 2]
    settings = buffer.parse_args(argv + ["--wandb_mode", "disabled"])
    model_settings, batch = settings.model, settings.experts.expert_batch
    device = pick_device(settings.runtime.device)
    seed_everything(0)
    data = load_retrieval_data(settings.data, model_settings, device, progress=False)
    loader = train_loader(data, model_settings.image_size, batch, settings.data.num_workers, seed=0)
    model = build_model(model_settings, data.text_dim).to(device)
    optimizers = sgd_pair(model, settings.experts.expert_lr_img, settings.experts.expert_lr_txt)
    pairs = batches * batch

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    next(iter(loader))  # start the workers
    data_s = timed(lambda: [None for _ in itertools.islice(loader, batches)])
    images = torch.randn(batch, 3, model_settings.image_size, model_settings.image_size, device=device)
    texts = data.train_text[:batch].to(device)

    def model_steps():
        model.train()
        for _ in range(batches):
            loss = contrastive_loss(*model(images, texts))
            for opt in optimizers:
                opt.zero_grad()
            loss.backward()
            for opt in optimizers:
                opt.step()

    model_steps()  # warm-up
    model_s = timed(model_steps)
    both_s = timed(lambda: train_one_epoch(model, itertools.islice(loader, batches), optimizers, device, False))
    eval_loader = eval_image_loader(data, model_settings.image_size, settings.data.batch_size_test, settings.data.num_workers)
    features = {}
    embed_s = timed(lambda: features.update(zip(("img", "txt"), embed_eval_split(model, eval_loader, data.eval_text,
                                                                                 device, False))))
    scores = torch.nn.functional.normalize(features["img"], dim=1) @ torch.nn.functional.normalize(features["txt"], dim=1).t()
    metric_s = timed(lambda: retrieval_metrics(scores, data.eval_txt2img.to(device)))
    epoch_pairs = len(data.train.captions)
    print(f"{settings.data.dataset}, {model_settings.image_encoder} at {model_settings.image_size}px, batch {batch}, "
          f"{settings.data.num_workers} loader workers, {torch.get_num_threads()} torch threads, device {device}")
    print("| part | time | throughput |\n|---|---:|---:|")
    print(f"| data pipeline alone ({pairs} pairs) | {data_s:.1f} s | {pairs / data_s:.0f} pairs/s |")
    print(f"| model step alone ({pairs} pairs) | {model_s:.1f} s | {pairs / model_s:.0f} pairs/s |")
    print(f"| training as buffer.py runs it ({pairs} pairs) | {both_s:.1f} s | {pairs / both_s:.0f} pairs/s |")
    print(f"| embed {len(data.eval.image_paths)} eval images + {len(data.eval.captions)} captions | {embed_s:.1f} s | |")
    print(f"| retrieval metrics {tuple(scores.shape)} | {metric_s * 1000:.1f} ms | |")
    print(f"projected epoch ({epoch_pairs} pairs) + evaluation: {epoch_pairs / (pairs / both_s) + embed_s:.0f} s")


if __name__ == "__main__":
    main()
