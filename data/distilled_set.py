"""The distilled-set file (docs/file-formats.md): one `.pt` of tensors and plain Python values.

Keys: `format`, `version`, `image_syn` [N,3,H,W] (normalised pixels; `config["image_norm"]` says with
which statistics) or, for a set of features that only a frozen trunk can use (the k-means feature
centroids), `image_features` [N, ...] (trunk outputs; `config["trunk"]` says which trunk), `text_syn` [N,D] (text-encoder
embeddings), `syn_lr_img`, `syn_lr_txt` (floats), `iteration`, `config` (every setting needed to
evaluate it: data set, encoders, image size, text model, ...), `metrics` (evaluation summary at
that iteration, may be empty), and, for resuming, `state` (optimiser momentum, RNG states, expert
position). Coresets of real pairs are written in the same format with `config["source"]` saying how
they were chosen. Files load with `torch.load(path, weights_only=True)`: no pickled code.
"""
from __future__ import annotations

from pathlib import Path

import torch

from utils.cli import UserError
from utils.io import atomic_torch_save, safe_torch_load

FORMAT = "vl-distill/distilled-set"
VERSION = 1
REQUIRED = ("text_syn", "syn_lr_img", "syn_lr_txt", "iteration", "config")


def save_distilled_set(path, image_syn: torch.Tensor | None, text_syn: torch.Tensor, syn_lr_img: float,
                       syn_lr_txt: float, iteration: int, config: dict, metrics: dict | None = None,
                       state: dict | None = None, image_features: torch.Tensor | None = None, **extra) -> Path:
    """Atomically write a distilled set (pixels `image_syn`, or trunk outputs `image_features`); `extra` holds
    anything a method learns besides (e.g. a similarity)."""
    if (image_syn is None) == (image_features is None):
        raise ValueError("a set holds either pixels (image_syn) or trunk outputs (image_features)")
    images = {"image_syn": image_syn} if image_syn is not None else {"image_features": image_features}
    payload = {
        "format": FORMAT, "version": VERSION,
        **{k: v.detach().to("cpu", copy=True) for k, v in images.items()},
        "text_syn": text_syn.detach().to("cpu", copy=True),
        "syn_lr_img": float(syn_lr_img), "syn_lr_txt": float(syn_lr_txt),
        "iteration": int(iteration), "config": dict(config), "metrics": dict(metrics or {}),
        "state": state or {},
        **{k: (v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v) for k, v in extra.items()},
    }
    return atomic_torch_save(payload, Path(path))


def load_distilled_set(path) -> dict:
    """Load and check a distilled-set file; a clear error for anything else."""
    payload = safe_torch_load(path, "distilled set")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path} is not a vl-distill distilled set (no '{FORMAT}' format tag)")
    missing = [k for k in REQUIRED if k not in payload]
    if missing:
        raise UserError(f"distilled set {path} lacks {', '.join(missing)}")
    if ("image_syn" in payload) == ("image_features" in payload):
        raise UserError(f"distilled set {path} must hold either image_syn (pixels) or image_features")
    images, texts = payload.get("image_syn", payload.get("image_features")), payload["text_syn"]
    if not isinstance(images, torch.Tensor) or not isinstance(texts, torch.Tensor):
        raise UserError(f"distilled set {path} does not hold tensors for its images and texts")
    if ("image_syn" in payload and images.dim() != 4) or texts.dim() != 2 or len(images) != len(texts):
        raise UserError(f"distilled set {path} has inconsistent shapes: images {tuple(images.shape)}, "
                        f"texts {tuple(texts.shape)}")
    return payload
