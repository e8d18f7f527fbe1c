"""Expert trajectory buffers: layout, metadata, atomic saving and validated loading (SPEC §2, §6).

Layout: `<buffer_path>/<dataset>/<image_encoder>/<text_encoder>/` holds `img_replay_buffer_<n>.pt`
and `txt_replay_buffer_<n>.pt` (each a list of trajectories; a trajectory is a list of snapshots;
a snapshot is a list of CPU tensors in `module.parameters()` order) and `buffer_meta.json`, which
says what produced them so that later scripts can refuse an incompatible buffer.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from networks import image_norm, trainable_parameters, trainable_parts
from utils.cli import UserError
from utils.io import atomic_torch_save, atomic_write_json, safe_torch_load

META_NAME = "buffer_meta.json"
FORMAT_VERSION = 1
_FILE = re.compile(r"img_replay_buffer_(\d+)\.pt")
# Metadata entries that must agree for two sets of experts to share a folder or be matched against.
COMPATIBILITY_KEYS = ("dataset", "train_pairs", "image_encoder", "text_encoder", "text_model", "image_size", "text_dim",
                      "image_dim", "image_norm", "trainable_parts", "image_param_shapes", "text_param_shapes")


def buffer_dir(buffer_path, dataset: str, image_encoder: str, text_encoder: str) -> Path:
    return Path(buffer_path) / dataset / image_encoder / text_encoder


def parameter_shapes(module: nn.Module) -> list[list[int]]:
    return [list(p.shape) for p in trainable_parameters(module)]


def describe_experts(args, model, text_identity: str, text_dim: int, train_pairs: int) -> dict:
    """Metadata for experts of `model` trained with `args` on `train_pairs` training pairs."""
    return {
        "format": FORMAT_VERSION,
        "dataset": args.dataset,
        "train_pairs": train_pairs,
        "image_encoder": args.image_encoder,
        "text_encoder": args.text_encoder,
        "text_model": text_identity,
        "image_size": args.image_size,
        "text_dim": text_dim,
        "image_dim": model.image_dim,
        "image_pretrained": bool(args.image_pretrained or args.image_weights),
        "image_norm": image_norm(args),
        "trainable_parts": trainable_parts(args),
        "feature_views": getattr(args, "feature_views", 0) if model.has_trunk else None,
        "loss_type": getattr(args, "loss_type", "infonce"),
        "image_param_shapes": parameter_shapes(model.image_part),
        "text_param_shapes": parameter_shapes(model.text_projection),
        "image_param_count": sum(p.numel() for p in trainable_parameters(model.image_part)),
        "text_param_count": sum(p.numel() for p in trainable_parameters(model.text_projection)),
    }


def read_metadata(directory: Path) -> dict | None:
    path = Path(directory) / META_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"buffer metadata {path} is not valid JSON ({err}); delete it only if you know "
                        f"which settings made the experts beside it") from None


# What buffers written before a metadata entry existed hold.
LEGACY_DEFAULTS = {"trainable_parts": ["image_encoder", "text_projection"], "image_norm": "clip"}


def mismatches(found: dict, expected: dict) -> list[str]:
    found = {**LEGACY_DEFAULTS, **found}
    return [f"{key}: buffer has {found.get(key)!r}, this run has {expected.get(key)!r}"
            for key in COMPATIBILITY_KEYS if found.get(key) != expected.get(key)]


def claim_metadata(directory: Path, meta: dict) -> None:
    """Write `meta` beside new experts, or check it agrees with the experts already there."""
    found = read_metadata(directory)
    if found is None:
        if any(Path(directory).glob("img_replay_buffer_*.pt")):
            raise UserError(f"{directory} holds expert files but no {META_NAME}; write new experts elsewhere")
        atomic_write_json(meta, Path(directory) / META_NAME)
        return
    problems = mismatches(found, meta)
    if problems:
        raise UserError(f"the experts in {directory} were made with other settings ({'; '.join(problems[:3])}); "
                        f"use another --buffer_path or the same settings")


def expert_files(directory: Path) -> list[tuple[int, Path, Path]]:
    """(n, image file, text file) for every complete numbered pair, in order of n."""
    found = []
    for path in Path(directory).glob("img_replay_buffer_*.pt"):
        match = _FILE.fullmatch(path.name)
        txt = path.with_name(f"txt_replay_buffer_{match[1]}.pt") if match else None
        if txt is not None and txt.is_file():
            found.append((int(match[1]), path, txt))
    return sorted(found)


def next_free_index(directory: Path) -> int:
    used = {int(m[1]) for p in Path(directory).glob("*_replay_buffer_*.pt")
            if (m := re.fullmatch(r"(?:img|txt)_replay_buffer_(\d+)\.pt", p.name))}
    n = 0
    while n in used:
        n += 1
    return n


def save_expert(directory: Path, n: int, image_trajectory, text_trajectory) -> int:
    """Write one expert as file pair `n` (or the next free number if taken meanwhile); returns the number.

    The image file is created without overwriting (it claims the number), then the text file; a
    reader only counts complete pairs, so an interruption never exposes half an expert.
    """
    directory.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            atomic_torch_save([image_trajectory], directory / f"img_replay_buffer_{n}.pt", overwrite=False)
            break
        except FileExistsError:
            n = next_free_index(directory)
    atomic_torch_save([text_trajectory], directory / f"txt_replay_buffer_{n}.pt")
    return n


def save_expert_metrics(directory: Path, n: int, history: list[dict], info: dict) -> Path:
    """`metrics_<n>.json` beside expert n: its evaluation after every epoch (the full-data reference)."""
    return atomic_write_json({"expert": n, **info, "epochs": history}, Path(directory) / f"metrics_{n}.json")


def read_expert_metrics(directory: Path) -> dict[int, dict]:
    """The metrics files of the complete experts in `directory`, by expert number."""
    found = {}
    for n, _, _ in expert_files(directory):
        path = Path(directory) / f"metrics_{n}.json"
        if path.is_file():
            found[n] = json.loads(path.read_text())
    return found


def _check_trajectories(trajectories, shapes: list[list[int]], path: Path) -> None:
    if not isinstance(trajectories, list) or not trajectories:
        raise UserError(f"buffer file {path} does not hold a list of trajectories")
    for t, trajectory in enumerate(trajectories):
        if not isinstance(trajectory, list) or len(trajectory) < 2:
            raise UserError(f"buffer file {path}: trajectory {t} is not a list of at least 2 snapshots")
        for s, snapshot in enumerate(trajectory):
            got = [list(x.shape) for x in snapshot] if isinstance(snapshot, list) and all(
                isinstance(x, torch.Tensor) for x in snapshot) else None
            if got != shapes:
                raise UserError(f"buffer file {path}: trajectory {t}, snapshot {s} does not match the "
                                f"parameter shapes in {META_NAME} (a different model made it)")


def load_expert_pair(image_path: Path, text_path: Path, meta: dict) -> list[tuple[list, list]]:
    """The (image trajectory, text trajectory) pairs stored in one numbered file pair, validated."""
    image_trajs = safe_torch_load(image_path, "buffer file")
    text_trajs = safe_torch_load(text_path, "buffer file")
    _check_trajectories(image_trajs, meta["image_param_shapes"], image_path)
    _check_trajectories(text_trajs, meta["text_param_shapes"], text_path)
    if len(image_trajs) != len(text_trajs) or any(len(a) != len(b) for a, b in zip(image_trajs, text_trajs)):
        raise UserError(f"buffer files {image_path.name} and {text_path.name} disagree in their trajectories")
    return list(zip(image_trajs, text_trajs))
