"""Frozen text-encoder embeddings, computed once per (dataset, split, encoder) and cached on disk.

Because the text encoder is frozen, caching is exact. Only distinct captions are encoded. The
cache key includes a hash of the caption list, so edited annotations never reuse stale vectors.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import torch

from utils.io import atomic_torch_save, safe_torch_load


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
    if path.is_file():
        cached = safe_torch_load(path, "text-embedding cache")
        if isinstance(cached, torch.Tensor) and len(cached) == len(captions):
            return cached
    unique = sorted(set(captions), key=lambda c: (len(c), c))  # similar lengths batch with little padding
    position = {caption: i for i, caption in enumerate(unique)}
    unique_embeddings = make_encoder().encode(unique, progress=progress)
    embeddings = unique_embeddings[torch.tensor([position[c] for c in captions], dtype=torch.long)]
    atomic_torch_save(embeddings.contiguous(), path)
    return embeddings
