"""From the shared flags to ready-to-use splits, cached text embeddings and data loaders."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from data.annotations import CaptionedImages, first_images, read_split
from data.datasets import ImageDataset, PairDataset
from data.text_cache import cache_path, cached_text_embeddings
from data.transforms import test_transform, train_transform
from networks.text_encoders import FrozenTextEncoder, text_encoder_identity
from utils.cli import UserError

DATASETS = ("flickr", "coco", "flickr8k", "shapes")


def default_cache_dir() -> str:
    return os.environ.get("VL_DISTILL_CACHE", str(Path.home() / ".cache" / "vl-distill"))


@dataclass
class RetrievalData:
    """A training split and an evaluation split with their frozen text embeddings."""

    train: CaptionedImages
    eval: CaptionedImages
    train_text: torch.Tensor  # [train captions, text_dim], CPU
    eval_text: torch.Tensor  # [eval captions, text_dim], CPU
    text_identity: str

    @property
    def text_dim(self) -> int:
        return self.train_text.shape[1]

    @property
    def eval_txt2img(self) -> torch.Tensor:
        return torch.tensor(self.eval.txt2img, dtype=torch.long)


def dataset_roots(args) -> tuple[Path, Path]:
    """(image_root, ann_root); the embedded `shapes` data set is generated in the cache on first use."""
    if args.dataset not in DATASETS:
        raise UserError(f"unknown --dataset {args.dataset!r}; choose one of {', '.join(DATASETS)}")
    image_root = args.image_root
    if image_root is None and args.dataset == "shapes":
        from data.shapes import ensure_shapes

        try:
            image_root = ensure_shapes(Path(args.cache_dir) / "shapes", progress=True)
        except ValueError as err:
            raise UserError(str(err)) from None
    if image_root is None:
        raise UserError(f"--dataset {args.dataset} needs --image_root (the folder the annotation "
                        f"'image' paths are relative to) and --ann_root (the folder of the annotation JSON files)")
    ann_root = args.ann_root or Path(image_root) / "annotations"
    return Path(image_root), Path(ann_root)


def load_retrieval_data(args, device: torch.device, progress: bool = True) -> RetrievalData:
    """Parse the train and `--eval_split` splits and attach cached text embeddings."""
    image_root, ann_root = dataset_roots(args)
    splits = {}
    for role, split in (("train", "train"), ("eval", args.eval_split)):
        parsed = read_split(args.dataset, split, ann_root, image_root, args.skip_bad_images)
        limit = getattr(args, "max_train_images", None)
        if role == "train" and limit is not None:
            if limit < 1:
                raise UserError(f"--max_train_images must be at least 1, got {limit}")
            parsed = first_images(parsed, limit)
        if parsed.skipped_images:
            print(f"--skip_bad_images: left out {parsed.skipped_images} missing images of the {split} split")
        splits[role] = (split, parsed)
    identity = text_encoder_identity(args.text_encoder, args.text_model)
    encoder = []  # loaded at most once, and only on a cache miss

    def make_encoder():
        if not encoder:
            encoder.append(FrozenTextEncoder(args.text_encoder, args.text_model, device))
        return encoder[0]

    texts = {}
    for role, (split, parsed) in splits.items():
        path = cache_path(args.cache_dir, args.dataset, split, identity, parsed.captions)
        texts[role] = cached_text_embeddings(parsed.captions, path, make_encoder, progress)
    return RetrievalData(splits["train"][1], splits["eval"][1], texts["train"], texts["eval"], identity)


def _loader(dataset, batch_size: int, shuffle: bool, workers: int, seed: int | None = None,
            drop_last: bool = False) -> DataLoader:
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      drop_last=drop_last, generator=generator, persistent_workers=workers > 0)


def train_loader(data: RetrievalData, image_size: int, batch_size: int, workers: int,
                 seed: int | None = None) -> DataLoader:
    """Shuffled real pairs with the training augmentation; drops a last batch smaller than 2."""
    dataset = PairDataset(data.train, data.train_text, train_transform(image_size))
    return _loader(dataset, batch_size, True, workers, seed, drop_last=len(dataset) % batch_size == 1)


def eval_image_loader(data: RetrievalData, image_size: int, batch_size: int, workers: int) -> DataLoader:
    """The evaluation split's unique images, in order, with the test transform."""
    return _loader(ImageDataset(data.eval, test_transform(image_size)), batch_size, False, workers)
