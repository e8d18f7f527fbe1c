"""Training and evaluation loops shared by buffer.py, distill.py and evaluate.py."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm import tqdm

from networks.contrastive import contrastive_loss, in_batch_accuracy, trainable_parameters
from evaluation.metrics import retrieval_metrics
from settings.base import MIN_PAIRS


def batch_note(flag: str, batch_size: int, pairs: int, what: str) -> str | None:
    """Say (print, and return) what happens when a batch size exceeds the pairs it batches: every epoch is one batch
    of all of them."""
    if batch_size <= pairs:
        return None
    note = f"note: {flag} {batch_size} is more than the {pairs} pairs of {what}: every epoch is one batch of all {pairs}"
    print(note)
    return note


class TrainingWatch:
    """Counts a training run's optimiser steps and those whose gradient was non-zero, to tell whether it trained.

    A run did not train when (exactly) it took no optimiser step, or no step's loss gave a non-zero gradient to any
    trainable tensor (InfoNCE over a batch of one pair is 0 whatever the weights), or every trainable tensor ended
    bit-identical to its start (steps too small to change a float). The gradient is checked besides the weights
    because weight decay moves weights that no loss moves. Counting costs no device synchronisation per step."""

    def __init__(self, steps: int = 0, gradient_steps: int = 0, every_step: bool = True):
        self.steps = steps
        self._gradient_steps = torch.tensor(gradient_steps)
        # every_step=False: stop looking at gradients once a step had one (all that problem() needs; reading every
        # gradient is a quarter of a small model's step on a CPU); gradient_steps then counts up to that step.
        self._every_step, self._seen = every_step, False

    def count(self, optimizers: list[torch.optim.Optimizer]) -> None:
        """Call after backward, before the optimisers step."""
        self.steps += 1
        if self._seen:
            return
        grads = [p.grad for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]
                 if p.grad is not None]
        if grads:  # the largest |gradient| entry; != 0 is also true for NaN (a gradient, if a broken one)
            largest = torch.nn.utils.get_total_norm(grads, norm_type=float("inf"))
            self._gradient_steps = self._gradient_steps.to(largest.device) + (largest != 0).long()
            if not self._every_step and (largest.device.type == "cpu" or self.steps % 64 == 0):  # no GPU sync per step
                self._seen = self.gradient_steps > 0

    @property
    def gradient_steps(self) -> int:
        return int(self._gradient_steps.item())

    def problem(self, start: list[torch.Tensor], end: list[torch.Tensor]) -> str | None:
        """Why the run did not train (the definition above), or None; `start` and `end` are its trainable tensors
        before and after training."""
        if self.steps == 0:
            return f"it took no optimiser step (no batch of {MIN_PAIRS} or more pairs)"
        if self.gradient_steps == 0:
            return (f"none of its {self.steps} optimiser steps had a non-zero gradient: its loss does not depend on "
                    f"the weights (e.g. a batch of one pair)")
        if len(start) == len(end) and all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(start, end)):
            return (f"every trainable tensor is bit-identical to its start after {self.steps} optimiser steps (a "
                    f"learning rate too small to change a float32 weight?)")
        return None


def trainable_copy(model: nn.Module) -> list[torch.Tensor]:
    """Copies of the model's trainable tensors (to compare with after training)."""
    return [p.detach().clone() for p in trainable_parameters(model)]


def sgd_pair(model: nn.Module, lr_img: float, lr_txt: float, momentum: float = 0.0,
             weight_decay: float = 0.0) -> list[torch.optim.SGD]:
    """One SGD optimiser for the image side (encoder, adapters or image head) and one for the text head."""
    return [torch.optim.SGD(trainable_parameters(model.image_part), lr=lr_img, momentum=momentum,
                            weight_decay=weight_decay),
            torch.optim.SGD(trainable_parameters(model.text_projection), lr=lr_txt, momentum=momentum,
                            weight_decay=weight_decay)]


def scale_learning_rates(optimizers: list[torch.optim.Optimizer], factor: float) -> None:
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] *= factor


def train_one_epoch(model: nn.Module, loader, optimizers: list[torch.optim.Optimizer], device: torch.device,
                    progress: bool = True, desc: str = "train",
                    on_batch: Callable[[tuple, torch.Tensor, torch.Tensor], None] | None = None,
                    loss_type: str = "infonce", similarity: torch.Tensor | None = None,
                    watch: TrainingWatch | None = None) -> dict[str, float]:
    """One pass of contrastive SGD over `loader` batches of (images, text embeddings, indices, ...);
    the images are trunk outputs when the loader says `from_trunk`. `on_batch(batch, image_features,
    text_features)` sees each batch's (detached) features. With a `similarity` matrix over the set, a
    batch's targets are similarity[indices, indices] (LoRS). `watch` counts the steps and their gradients.
    The loaders never give a batch of one pair (they drop a last batch of one: it has no negatives)."""
    model.train()
    total_loss = total_acc = seen = 0.0
    from_trunk = getattr(loader, "from_trunk", False)  # batches of cached trunk outputs instead of pixels
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress)
    for batch in bar:
        images, texts = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        image_features, text_features = model(images, texts, from_trunk=from_trunk)
        targets = None
        if similarity is not None:
            indices = batch[2].to(similarity.device)
            targets = similarity[indices][:, indices].to(device)
        loss = contrastive_loss(image_features, text_features, targets, loss_type)
        if on_batch is not None:
            on_batch(batch, image_features.detach(), text_features.detach())
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if watch is not None:
            watch.count(optimizers)
        for optimizer in optimizers:
            optimizer.step()
        n = len(images)
        total_loss += loss.item() * n
        total_acc += in_batch_accuracy(image_features, text_features) * n
        seen += n
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return {"train_loss": total_loss / max(seen, 1), "train_acc": total_acc / max(seen, 1)}


@torch.no_grad()
def embed_eval_split(model: nn.Module, eval_images, eval_text: torch.Tensor, device: torch.device,
                     progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Image features of every evaluation image (in order; `eval_images` is a data.model_inputs.EvalImages)
    and projected features of every caption."""
    image_features = eval_images.embed(model, device, progress)
    text_features = model.text_projection(eval_text.to(device))
    return image_features, text_features


@torch.no_grad()
def evaluate_retrieval(model: nn.Module, eval_images, eval_text: torch.Tensor, txt2img: torch.Tensor,
                       device: torch.device, progress: bool = True) -> dict[str, float]:
    """Retrieval metrics (evaluation/metrics.py) of `model` on an evaluation split (cosine similarity scores)."""
    image_features, text_features = embed_eval_split(model, eval_images, eval_text, device, progress)
    image_features = torch.nn.functional.normalize(image_features, dim=1)
    text_features = torch.nn.functional.normalize(text_features, dim=1)
    return retrieval_metrics(image_features @ text_features.t(), txt2img.to(device))
