"""Frozen-encoder features of every pair in a list of shards, into a FeatureStore, over one or more processes.

The shards are split statically: rank r of a `torchrun` launch of W processes takes shards r, r + W, r + 2W, ...
Each shard becomes one part of the store, encoded in batches that start at the shard's first sample, so a part's
content does not depend on how many processes ran or which one wrote it: 1 and 2 processes give the same store,
and a killed run, started again with any number of processes, reuses every part already finished.

The encoders are the caller's: `encode_images(list of RGB PIL images) -> [n, d_image]` and
`encode_texts(list of captions) -> [n, d_text]` (numpy arrays or tensors). Captions are passed as stored in the
shard, stripped of surrounding white space; cleaning them is the text encoder's business.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from reduction.feature_store import FeatureStore, part_names
from reduction.shards import SampleProblem, decode_image, iter_shard
from utils import distributed
from utils.distributed import ProcessGroupInfo, init_from_env

ImageEncoder = Callable[[list[Image.Image]], "np.ndarray"]
TextEncoder = Callable[[list[str]], "np.ndarray"]


@dataclass
class ExtractSummary:
    """What one process did: parts written and reused, samples encoded, samples skipped by kind (in the parts
    it wrote), and on rank 0 the store's index once merged (None elsewhere, or while parts are missing)."""
    rank: int
    world_size: int
    parts_written: int = 0
    parts_reused: int = 0
    samples: int = 0
    skipped: dict = field(default_factory=dict)
    index: dict | None = None


def process_group_from_env(device: str | torch.device = "cpu") -> ProcessGroupInfo:
    """This process's rank and the world size as `torchrun` sets them (joining its process group: gloo on the
    CPU, nccl on CUDA); rank 0 of 1 when not launched by torchrun."""
    return init_from_env(torch.device(device))


def _matrix(values, rows: int, what: str) -> np.ndarray:
    """An encoder's output as a float32 [rows, d] array; another shape is the caller's bug."""
    array = np.asarray(values.detach().cpu().float().numpy() if hasattr(values, "detach") else values,
                       dtype=np.float32)
    if array.ndim != 2 or array.shape[0] != rows:
        raise ValueError(f"the {what} encoder returned shape {array.shape} for {rows} inputs, not ({rows}, d)")
    return array


def _encode_shard(shard: str, encode_images: ImageEncoder, encode_texts: TextEncoder, batch_size: int,
                  skip_bad: bool, bar) -> tuple[list[str], np.ndarray, np.ndarray, dict]:
    """(keys, image features, text features, skipped counts) of one shard, encoded batch by batch."""
    skipped: dict[str, int] = {}
    keys: list[str] = []
    image_parts: list[np.ndarray] = []
    text_parts: list[np.ndarray] = []
    batch: list[tuple[str, Image.Image, str]] = []

    def flush() -> None:
        if not batch:
            return
        image_parts.append(_matrix(encode_images([image for _, image, _ in batch]), len(batch), "image"))
        text_parts.append(_matrix(encode_texts([caption for _, _, caption in batch]), len(batch), "text"))
        keys.extend(key for key, _, _ in batch)
        bar.update(len(batch))
        batch.clear()

    for sample in iter_shard(shard, skip_bad=skip_bad, counts=skipped):
        try:
            image = decode_image(sample, shard)
        except SampleProblem as problem:
            if not skip_bad:
                raise SampleProblem(f"{problem}; fix the shard or skip such samples", problem.kind) from None
            skipped[problem.kind] = skipped.get(problem.kind, 0) + 1
            continue
        batch.append((sample.key, image, sample.caption))
        if len(batch) == batch_size:
            flush()
    flush()
    for what, parts in (("image", image_parts), ("text", text_parts)):
        widths = {part.shape[1] for part in parts}
        if len(widths) > 1:
            raise ValueError(f"the {what} encoder returned {sorted(widths)} features per sample in different "
                             f"batches of shard {shard}")
    image = np.concatenate(image_parts) if image_parts else np.zeros((0, 0), dtype=np.float32)
    text = np.concatenate(text_parts) if text_parts else np.zeros((0, 0), dtype=np.float32)
    return keys, image, text, skipped


def extract_features(shards: Sequence[str], store: FeatureStore, encode_images: ImageEncoder,
                     encode_texts: TextEncoder, *, batch_size: int = 64, rank: int = 0, world_size: int = 1,
                     skip_bad: bool = False, progress: bool = True) -> ExtractSummary:
    """Encode the pairs of this rank's shards (i % world_size == rank) into `store`, one part per shard, reusing
    finished parts; then, once every rank is done (a barrier under torchrun), rank 0 writes the store's index.

    Without a process group (independent jobs given rank and world size by hand) nothing waits: rank 0 writes
    the index only when every part is there, and otherwise says how many are missing; a later run (any rank
    count) reuses the parts and writes it."""
    shards = [str(shard) for shard in shards]
    if not shards:
        raise ValueError("no shards to extract")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of {world_size} processes")
    if batch_size < 1:
        raise ValueError(f"batch size {batch_size}")
    names = part_names(shards)
    mine = list(range(rank, len(shards), world_size))
    summary = ExtractSummary(rank, world_size)
    label = f"rank {rank}: " if world_size > 1 else ""
    todo = []
    for i in mine:
        if store.part_done(names[i]):
            summary.parts_reused += 1
        else:
            todo.append(i)
    if summary.parts_reused:
        print(f"{label}reusing {summary.parts_reused} finished feature part(s) of {len(mine)} in {store.folder}")
    with tqdm(total=len(todo), desc=f"{label}features", unit="shard", disable=not progress,
              position=rank if world_size > 1 else None, dynamic_ncols=True) as shard_bar, \
            tqdm(desc=f"{label}samples", unit="pair", disable=not progress, leave=False,
                 position=(world_size + rank) if world_size > 1 else None, dynamic_ncols=True) as sample_bar:
        for i in todo:
            keys, image, text, skipped = _encode_shard(shards[i], encode_images, encode_texts, batch_size, skip_bad,
                                                       sample_bar)
            store.write_part(names[i], keys, image, text, {"shard": shards[i], "skipped": skipped})
            summary.parts_written += 1
            summary.samples += len(keys)
            for kind, count in skipped.items():
                summary.skipped[kind] = summary.skipped.get(kind, 0) + count
            shard_bar.update(1)
    grouped = world_size > 1 and dist.is_available() and dist.is_initialized()
    if grouped:
        distributed.barrier()
    if rank == 0:
        missing = [] if grouped or world_size == 1 else [name for name in names if not store.part_done(name)]
        if not missing:
            summary.index = store.merge_index(names)
        else:
            print(f"note: {len(missing)} of {len(names)} feature parts are not written yet (other ranks); run the "
                  f"extraction again once they finish to write {store.folder / 'store.json'}")
    if grouped:
        distributed.barrier()  # no rank reads the store before its index exists
    return summary
