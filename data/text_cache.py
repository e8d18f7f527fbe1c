"""Frozen text-encoder embeddings, computed once per (dataset, split, encoder) and cached on disk.

Because the text encoder is frozen, caching is exact. Only distinct captions are encoded. The
cache key includes a hash of the caption list, so edited annotations never reuse stale vectors.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import torch

from utils.cli import os_error_reason
from utils.errors import SettingError
from utils.io import MAX_ABS_VALUE, atomic_torch_save, load_cache, tensor_problem


def caption_digest(captions: list[str]) -> str:
    h = hashlib.sha1()
    for caption in captions:
        h.update(caption.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def cache_path(cache_dir, dataset: str, split: str, encoder_identity: str, captions: list[str]) -> Path:
    return Path(cache_dir) / "text_embeddings" / f"{dataset}_{split}_{encoder_identity}_{caption_digest(captions)}.pt"


def cached_text_embeddings(captions: list[str], path: Path, make_encoder: Callable[[], object],
                           progress: bool = True) -> torch.Tensor:
    """Embeddings of `captions` ([N, D] float32, CPU) from `path`, computing and saving them if absent.

    `make_encoder()` is only called on a cache miss; it returns an object with
    `encode(list[str], progress=...) -> Tensor`.
    """
    cached = _usable_cache(path, len(captions))
    if cached is not None:
        return cached
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # a folder that cannot be made fails before the encoding
    except OSError as err:
        raise _unwritable(path, err) from None
    unique = sorted(set(captions), key=lambda c: (len(c), c))  # similar lengths batch with little padding
    position = {caption: i for i, caption in enumerate(unique)}
    unique_embeddings = make_encoder().encode(unique, progress=progress)
    embeddings = unique_embeddings[torch.tensor([position[c] for c in captions], dtype=torch.long)]
    try:
        atomic_torch_save(embeddings.contiguous(), path)
    except OSError as err:
        raise _unwritable(path, err) from None
    return embeddings


def _unwritable(path: Path, err: OSError) -> SettingError:
    return SettingError("cache_dir", str(path), f"the text-embedding cache {path} cannot be written: "
                                                f"{os_error_reason(err)}; choose a cache folder that can be written")


def _usable_cache(path: Path, count: int) -> torch.Tensor | None:
    """The embeddings cached in `path` as float32, or None when there are none or they are damaged (not
    `count` rows of finite floating-point numbers, or unreadable): then they are computed again, with a note."""
    cached = load_cache(path, "text-embedding cache")
    if cached is None:
        return None
    problem = tensor_problem(cached, dims=2, max_abs=MAX_ABS_VALUE) or (
        None if len(cached) == count else f"has {len(cached)} rows for {count} captions")
    if problem:
        print(f"note: the text-embedding cache {path} {problem}; computing it again")
        return None
    return cached.float()
