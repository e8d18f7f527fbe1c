"""Buffers in the reference implementation's format: expert files without buffer_meta.json.

The reference writes `img_replay_buffer_<n>.pt` / `txt_replay_buffer_<n>.pt`, each a list of experts,
an expert a list of per-epoch snapshots, a snapshot a list of parameter tensors, and nothing else.
What such a folder can tell is the tensors' shapes: `derived_metadata` reads them (the text head's
first weight is [image feature size, text embedding size]), and `shape_problem` compares them with
the model the command-line flags build, naming the flag that disagrees.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from networks import build_model, trainable_parameters, trainable_parts
from networks.image_encoders import create_image_encoder
from settings.model import ModelSettings
from utils.cli import UserError
from utils.io import safe_torch_load

REFERENCE_FORMAT = 0  # the "format" of metadata derived from the files (buffer_meta.json says 1 and up)
# Embedding sizes of the default text models (a --text_model of one's own is checked once loaded).
TEXT_DIMS = {"bert": 768, "minilm": 384, "mpnet": 768}


def _first_snapshot(path: Path) -> list[torch.Tensor]:
    try:
        trajectories = safe_torch_load(path, "buffer file", mmap=True)  # shapes only: no need to read the data
    except UserError:
        trajectories = safe_torch_load(path, "buffer file")  # an old (not zip) file cannot be mapped
    snapshot = trajectories[0][0] if (isinstance(trajectories, list) and trajectories
                                      and isinstance(trajectories[0], list) and trajectories[0]) else None
    if not (isinstance(snapshot, list) and snapshot and all(isinstance(t, torch.Tensor) for t in snapshot)):
        raise UserError(f"buffer file {path} does not hold a list of experts, each a list of snapshots of "
                        f"parameter tensors (the reference implementation's format)")
    return snapshot


def derived_metadata(image_path: Path, text_path: Path) -> dict:
    """What the first expert of a file pair says about the model that made it."""
    image_shapes = [list(t.shape) for t in _first_snapshot(image_path)]
    text_shapes = [list(t.shape) for t in _first_snapshot(text_path)]
    if len(text_shapes[0]) != 2:
        raise UserError(f"buffer file {text_path}: the first text head parameter has shape {text_shapes[0]}, "
                        f"expected a [features, text dimension] weight")
    image_dim, text_dim = text_shapes[0]
    return {"format": REFERENCE_FORMAT, "derived_from": image_path.name, "image_param_shapes": image_shapes,
            "text_param_shapes": text_shapes, "image_dim": image_dim, "text_dim": text_dim}


def _flags(settings: ModelSettings) -> str:
    return f"--image_encoder {settings.image_encoder} --image_size {settings.image_size}"


def _feature_size_hint(settings: ModelSettings) -> str:
    """Which flag sets the image feature size: --image_size as well when the encoder's output depends on it."""
    at_double = create_image_encoder(settings.image_encoder, 2 * settings.image_size).num_features
    at_size = create_image_encoder(settings.image_encoder, settings.image_size).num_features
    return ("check --image_size (this encoder's feature size depends on it) and --image_encoder"
            if at_double != at_size else "check --image_encoder")


def shape_problem(meta: dict, settings: ModelSettings) -> str | None:
    """How the derived `meta` disagrees with the model `settings` build (None when it fits)."""
    known_dim = TEXT_DIMS.get(settings.text_encoder) if settings.text_model is None else None
    if known_dim is not None and known_dim != meta["text_dim"]:
        return (f"the experts' text head takes {meta['text_dim']}-dimensional text embeddings, --text_encoder "
                f"{settings.text_encoder} gives {known_dim}: check --text_encoder")
    # Shapes do not depend on the weights: build without them (no download, no weights file needed).
    model = build_model(replace(settings, image_pretrained=False, image_weights=None), meta["text_dim"])
    if meta["image_dim"] != model.image_dim:
        return (f"the experts' features have {meta['image_dim']} dimensions, {_flags(settings)} gives "
                f"{model.image_dim}: {_feature_size_hint(settings)}")
    named = [(name, list(p.shape)) for name, p in model.image_part.named_parameters() if p.requires_grad]
    found = meta["image_param_shapes"]
    if len(found) != len(named):
        return (f"the experts' image side has {len(found)} trained parameter tensors, {_flags(settings)} training "
                f"{', '.join(trainable_parts(settings))} has {len(named)}: check --image_encoder, --train_stages, "
                f"--image_projection and --lora_rank")
    for (name, want), got in zip(named, found):
        if got != want:
            return (f"image parameter {name} has shape {got} in the experts and {want} with {_flags(settings)}: "
                    f"check --image_encoder and --image_size")
    text = [list(p.shape) for p in trainable_parameters(model.text_projection)]
    if meta["text_param_shapes"] != text:
        return (f"the experts' text head has shapes {meta['text_param_shapes']}, this project's head {text}: "
                f"not experts of this model design")
    return None
