"""Judging a set of image-text pairs (distilled or real): train fresh models on it, test retrieval.

This is the evaluation protocol of SPEC §2, used by distill.py during distillation and by
evaluate.py afterwards: `num_eval` fresh models (each from its own seed) are trained for
`epoch_eval_train` epochs with SGD (momentum 0.9, weight decay 5e-4, the given learning rate for
both the image encoder and the text head, ×0.1 half way through), batch `batch_train`, then
evaluated on the evaluation split; every metric is reported as mean ± std over the models.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from data.build import train_loader
from networks import build_model
from utils.device import seed_everything
from utils.dsa import dsa_augment
from utils.metrics import summarize_runs
from utils.training import (
    evaluate_retrieval,
    scale_learning_rates,
    sgd_pair,
    train_one_epoch,
)

EVAL_MOMENTUM = 0.9
EVAL_WEIGHT_DECAY = 5e-4
# Evaluation model `seed` is initialised from seed SEED_OFFSET + seed, never from the seeds of the
# experts (buffer.py: seed * 100_003 + expert number). A model initialised like an expert starts at
# the very point the distilled data was matched from and scores far higher than a fresh one (the
# demo's 100 distilled pairs: r_mean 11.8-20.4 from the inits of experts 0-2, 4.8-5.6 from others;
# BENCHMARKS.md §7), which is not what a distilled set is judged on.
SEED_OFFSET = 1_000_000_007


def _pairs_loader(images, texts, batch_size: int, seed: int, dsa_strategy: str | None) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    counter = iter(range(1 << 62))

    def collate(items):
        batch_images = torch.stack([i for i, _, _ in items])
        batch_texts = torch.stack([t for _, t, _ in items])
        indices = torch.stack([k for _, _, k in items])
        if dsa_strategy:
            batch_images = dsa_augment(batch_images, dsa_strategy, seed * 7919 + next(counter))
        return batch_images, batch_texts, indices

    drop_last = len(images) % batch_size == 1 and len(images) > 1  # a batch of one has no negatives
    return DataLoader(TensorDataset(images, texts, torch.arange(len(images))), batch_size=batch_size, shuffle=True,
                      generator=generator, drop_last=drop_last, collate_fn=collate)


def train_fresh_model(args, loader, lr: float, text_dim: int, device: torch.device, seed: int,
                      similarity: torch.Tensor | None = None):
    """A fresh model (encoders from `args`) trained on `loader` batches with the evaluation protocol:
    `args.loss_type`, against `similarity[idx, idx]` when the set has a learned similarity."""
    seed_everything(SEED_OFFSET + seed)
    model = build_model(args, text_dim).to(device)
    optimizers = sgd_pair(model, lr, lr, EVAL_MOMENTUM, EVAL_WEIGHT_DECAY)
    for epoch in range(args.epoch_eval_train):
        if epoch == args.epoch_eval_train // 2:
            scale_learning_rates(optimizers, 0.1)
        train_one_epoch(model, loader, optimizers, device, progress=False,
                        loss_type=getattr(args, "loss_type", "infonce"), similarity=similarity)
    return model


def evaluate_models(args, make_loader: Callable[[int], DataLoader], lr: float, data, eval_loader,
                    device: torch.device, num_eval: int, seed: int, progress: bool = True,
                    similarity: torch.Tensor | None = None) -> dict:
    """Mean, std and per-run values of every retrieval metric over `num_eval` freshly trained models;
    model `k` is seeded with `seed + k` and trains on `make_loader(seed + k)`."""
    runs = []
    bar = tqdm(range(num_eval), desc="evaluation models", unit="model", leave=False, disable=not progress)
    for run in bar:
        model = train_fresh_model(args, make_loader(seed + run), lr, data.text_dim, device, seed + run, similarity)
        runs.append(evaluate_retrieval(model, eval_loader, data.eval_text, data.eval_txt2img, device, progress=False))
        bar.set_postfix(r_mean=f"{runs[-1]['r_mean']:.2f}")
    return summarize_runs(runs)


def evaluate_pairs(args, images: torch.Tensor, texts: torch.Tensor, lr: float, data, eval_loader,
                   device: torch.device, num_eval: int, seed: int, progress: bool = True,
                   similarity: torch.Tensor | None = None) -> dict:
    """The protocol on a fixed set of (image tensor, text embedding) pairs: a distilled set or a coreset,
    with its learned [N, N] target similarity if it has one."""
    images, texts = images.detach().cpu(), texts.detach().cpu()
    similarity = None if similarity is None else similarity.detach().to(device)
    strategy = args.dsa_strategy if getattr(args, "dsa", False) else None
    return evaluate_models(args, lambda s: _pairs_loader(images, texts, args.batch_train, s, strategy), lr, data,
                           eval_loader, device, num_eval, seed, progress, similarity)


def evaluate_full_data(args, data, lr: float, eval_loader, device: torch.device, num_eval: int, seed: int,
                       progress: bool = True) -> dict:
    """The protocol on the whole training split, streamed with the training augmentation (the upper bound)."""
    return evaluate_models(args, lambda s: train_loader(data, args.image_size, args.batch_train, args.num_workers, s),
                           lr, data, eval_loader, device, num_eval, seed, progress)
