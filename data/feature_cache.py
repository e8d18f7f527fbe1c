"""Outputs of a frozen image trunk, computed once per image and view and cached on disk.

With a frozen lower part of the image encoder (`--train_stages K`, `--image_projection`), every
training image's trunk output never changes, so experts, coreset selection and evaluation models
train only the rest of the model over cached tensors. A *view* is one way of turning an image into
pixels: view 0 is the deterministic test transform, views 1..V are draws of the training
augmentation, each fixed per (view, image) so that a view means the same pixels in every process.

One file per (split, view) in `<cache_dir>/trunk_features/`, named by a digest of everything that
decides its content: the trunk (encoder, the digest of its weights and statistics, trainable stages),
the image size and normalisation, the images (relative paths, sizes and modification times) and the
view. A changed encoder, weights, size, normalisation, image or view is therefore a new file, never a
stale one. Files are written to a temporary name and renamed (utils/io.py): an interrupted run
leaves no partial file, and two processes computing the same file both write the same content.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from data.annotations import CaptionedImages
from data.datasets import load_rgb
from data.transforms import test_transform, train_transform
from utils.cli import os_error_reason
from utils.errors import SettingError
from utils.io import MAX_ABS_VALUE, atomic_torch_save, load_cache, tensor_problem

FORMAT = "vl-distill/trunk-features"
VERSION = 1


def weights_digest(module: nn.Module) -> str:
    """A digest of a module's parameters and buffers (names, shapes, dtypes and values)."""
    h = hashlib.sha1()
    for name, tensor in module.state_dict().items():
        value = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
        h.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def images_digest(split: CaptionedImages) -> str:
    """A digest of a split's images: their paths, sizes and modification times (an edited image changes it)."""
    h = hashlib.sha1()
    for path in split.image_paths:
        stat = os.stat(path)
        h.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


class SeededView(Dataset):
    """(pixels of image i under view v, i): view 0 = test transform; view v >= 1 = the training
    augmentation with the random stream fixed by (v, i), independent of workers and order."""

    def __init__(self, split: CaptionedImages, view: int, image_size: int, norm: str):
        self.split, self.view = split, view
        self.transform = test_transform(image_size, norm) if view == 0 else train_transform(image_size, norm)

    def __len__(self) -> int:
        return len(self.split.image_paths)

    def __getitem__(self, index: int):
        image = load_rgb(self.split.image_paths[index])
        if self.view == 0:
            return self.transform(image), index
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.view * 1_000_003 + index)
            return self.transform(image), index


def cache_file(cache_dir, dataset: str, split_name: str, key: dict) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir) / "trunk_features" / f"{dataset}_{split_name}_view{key['view']}_{digest}.pt"


@torch.no_grad()
def compute_trunk_outputs(trunk: nn.Module, dataset: Dataset, device: torch.device, batch_size: int,
                          workers: int, progress: bool, desc: str) -> torch.Tensor:
    """The trunk (in evaluation mode) on every item of `dataset`, in order: [items, ...] float32 on the CPU."""
    trunk.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    chunks = [trunk(images.to(device)).float().cpu()
              for images, _ in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress)]
    return torch.cat(chunks)


def cached_trunk_outputs(trunk: nn.Module, trunk_key: dict, split: CaptionedImages, dataset_name: str,
                         split_name: str, views: list[int], cache_dir, device: torch.device, batch_size: int = 128,
                         workers: int = 0, progress: bool = True) -> torch.Tensor:
    """[len(views), images, ...] trunk outputs of `split`'s images under each view, from the cache or
    computed (and cached) on a miss. `trunk_key` describes the trunk (see `trunk_key`)."""
    per_view = []
    images = images_digest(split)
    for view in views:
        key = {**trunk_key, "images": images, "num_images": len(split.image_paths), "view": view}
        path = cache_file(cache_dir, dataset_name, split_name, key)
        payload = _load_quietly(path, len(split.image_paths))
        if not (isinstance(payload, dict) and payload.get("format") == FORMAT and payload.get("key") == key):
            dataset = SeededView(split, view, trunk_key["image_size"], trunk_key["image_norm"])
            what = "plain" if view == 0 else f"augmented view {view}"
            outputs = compute_trunk_outputs(trunk, dataset, device, batch_size, workers, progress,
                                            f"trunk outputs, {split_name} ({what})")
            payload = {"format": FORMAT, "version": VERSION, "key": key, "features": outputs}
            try:
                atomic_torch_save(payload, path)
            except OSError as err:
                raise SettingError("cache_dir", str(path), f"the trunk-feature cache {path} cannot be written: "
                                   f"{os_error_reason(err)}; choose a cache folder that can be written") from None
        per_view.append(payload["features"])
    return torch.stack(per_view)


def _load_quietly(path: Path, count: int):
    """A cache file's payload (its features as float32), or None when it is missing, unreadable or damaged (not
    `count` rows of finite floating-point numbers): then it is computed again."""
    payload = load_cache(path, "trunk-feature cache")
    if not isinstance(payload, dict):
        return None
    features = payload.get("features")
    problem = tensor_problem(features, max_abs=MAX_ABS_VALUE) or (
        None if features.dim() >= 2 and len(features) == count
        else f"has shape {tuple(features.shape)} for {count} images")
    if problem:
        print(f"note: the trunk-feature cache {path}: features {problem}; computing it again")
        return None
    return {**payload, "features": features.float()}


def trunk_key(encoder_name: str, trunk: nn.Module, train_stages: int, image_size: int, image_norm: str) -> dict:
    """What decides a trunk's outputs (besides the images and the view)."""
    return {"format": VERSION, "image_encoder": encoder_name, "weights": weights_digest(trunk),
            "train_stages": train_stages, "image_size": image_size, "image_norm": image_norm}


@dataclass
class FeatureBatches:
    """Shuffled batches of (trunk outputs, text embeddings, pair indices) over cached tensors.

    `features` is [views, images, ...]; pair p is image `txt2img[p]` with text `texts[p]`. Every
    epoch (every iteration over the object) draws a new order and, per pair, one of the views, from
    one generator seeded once, like a shuffling DataLoader. A last batch of one pair (no negatives)
    is dropped. `from_trunk` tells training that the inputs are trunk outputs, not pixels.
    """

    features: torch.Tensor
    txt2img: torch.Tensor
    texts: torch.Tensor
    batch_size: int
    seed: int
    from_trunk: bool = True

    def __post_init__(self):
        self.generator = torch.Generator().manual_seed(self.seed)
        self.txt2img = torch.as_tensor(self.txt2img, dtype=torch.long)

    def __len__(self) -> int:
        full, rest = divmod(len(self.txt2img), self.batch_size)
        return full + (rest > 1)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.txt2img), generator=self.generator)
        views = torch.randint(len(self.features), (len(self.txt2img),), generator=self.generator)
        for chunk in order.split(self.batch_size):
            if len(chunk) < 2:
                continue
            yield self.features[views[chunk], self.txt2img[chunk]], self.texts[chunk], chunk
