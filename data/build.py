"""From the shared flags to ready-to-use splits, cached text embeddings and data loaders."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from data.annotations import CaptionedImages, annotation_file, kinds_phrase, read_split
from data.datasets import ImageDataset, PairDataset
from data.text_cache import cache_path, cached_text_embeddings
from data.transforms import test_transform, train_transform
from networks.contrastive import check_pair_count
from networks.text_encoders import FrozenTextEncoder, text_encoder_identity
from settings.choices import DATASETS
from settings.data import DataSettings, default_cache_dir
from settings.model import ModelSettings
from utils.cli import UserError
from utils.errors import SettingError

__all__ = ["DATASETS", "default_cache_dir", "RetrievalData", "EvalSplit", "load_retrieval_data", "has_split",
           "dataset_roots", "train_loader", "eval_image_loader"]


@dataclass
class EvalSplit:
    """An evaluation split: its images and captions, and the captions' frozen text embeddings."""

    name: str
    images: CaptionedImages
    text: torch.Tensor  # [captions, text_dim], CPU

    @property
    def txt2img(self) -> torch.Tensor:
        return torch.tensor(self.images.txt2img, dtype=torch.long)


@dataclass
class RetrievalData:
    """A training split and one or more evaluation splits with their frozen text embeddings.

    `eval` is `--eval_split`, the split on which choices are made (best iteration, learning rate);
    `splits` holds it and any other evaluation split loaded (e.g. test, for the final numbers)."""

    train: CaptionedImages
    train_text: torch.Tensor  # [train captions, text_dim], CPU
    text_identity: str
    splits: dict[str, EvalSplit]
    eval_name: str
    dataset: str = ""

    @property
    def text_dim(self) -> int:
        return self.train_text.shape[1]

    @property
    def eval(self) -> CaptionedImages:
        return self.splits[self.eval_name].images

    @property
    def eval_text(self) -> torch.Tensor:
        return self.splits[self.eval_name].text

    @property
    def eval_txt2img(self) -> torch.Tensor:
        return self.splits[self.eval_name].txt2img

    def split(self, name: str) -> EvalSplit:
        return self.splits[name]


def dataset_roots(settings: DataSettings, progress: bool = True) -> tuple[Path, Path]:
    """(image_root, ann_root); the embedded `shapes` data set is generated in the cache on first use."""
    if settings.dataset not in DATASETS:
        raise SettingError("dataset", settings.dataset,
                           f"unknown data set {settings.dataset!r}; choose one of {', '.join(DATASETS)}")
    image_root = settings.image_root
    if image_root is None and settings.dataset == "shapes":
        from data.shapes import ensure_shapes

        try:
            image_root = ensure_shapes(Path(settings.cache_dir) / "shapes", progress=progress)
        except ValueError as err:
            raise UserError(str(err)) from None
    if image_root is None:
        raise SettingError("image_root", None, f"data set {settings.dataset} needs the folder the annotation 'image' "
                                               f"paths are relative to (and the folder of the annotation JSON files, "
                                               f"when not its annotations/)", see_also=("ann_root",))
    ann_root = settings.ann_root or Path(image_root) / "annotations"
    return Path(image_root), Path(ann_root)


def has_split(settings: DataSettings, split: str) -> bool:
    """Whether the annotation file of `split` is present (e.g. flickr8k_test.json beside the others)."""
    _, ann_root = dataset_roots(settings)
    return annotation_file(settings.dataset, split, ann_root).is_file()


def report_left_out(parsed: CaptionedImages, ann_path: Path) -> None:
    """Say on stderr which pairs of a split were left out, and why."""
    if parsed.skipped_images:
        print(f"--skip_bad_images: left out {parsed.skipped_images} images listed in {ann_path} "
              f"({kinds_phrase(parsed.skipped)}) with "
              f"their captions", file=sys.stderr)
    if parsed.empty_captions:
        alone = (f"; {parsed.captionless_images} images had no other caption and are left out too"
                 if parsed.captionless_images else "")
        print(f"warning: {parsed.empty_captions} captions in {ann_path} are empty after cleaning; those pairs are "
              f"left out{alone}", file=sys.stderr)


def load_retrieval_data(settings: DataSettings, model: ModelSettings, device: torch.device, progress: bool = True,
                        extra_splits: tuple[str, ...] = (), train_only: bool = False) -> RetrievalData:
    """Parse the train split, `--eval_split` and `extra_splits` and attach cached text embeddings of
    `model`'s text encoder; `train_only`: the training split alone (its `splits` is empty), e.g. for the nearest
    real captions of a set."""
    image_root, ann_root = dataset_roots(settings, progress)
    splits = {}
    roles = [("train", "train")] + ([] if train_only else [("eval", settings.eval_split)])
    roles += [(name, name) for name in extra_splits if name != settings.eval_split]
    for role, split in roles:
        limit = settings.max_train_images if role == "train" else None
        parsed = read_split(settings.dataset, split, ann_root, image_root, settings.skip_bad_images,
                            max_images=limit, record_dir=Path(settings.cache_dir) / "image_checks", progress=progress)
        report_left_out(parsed, annotation_file(settings.dataset, split, ann_root))
        if role == "train":  # nothing trains contrastively on one pair
            where = f"the training split {annotation_file(settings.dataset, split, ann_root)}"
            check_pair_count(len(parsed.captions), where + (f" (--max_train_images {limit})" if limit else ""))
        splits[role] = (split, parsed)
    identity = text_encoder_identity(model.text_encoder, model.text_model)
    encoder = []  # loaded at most once, and only on a cache miss

    def make_encoder():
        if not encoder:
            encoder.append(FrozenTextEncoder(model.text_encoder, model.text_model, device, settings.cache_dir))
        return encoder[0]

    texts = {}
    for role, (split, parsed) in splits.items():
        path = cache_path(settings.cache_dir, settings.dataset, split, identity, parsed.captions)
        texts[role] = cached_text_embeddings(parsed.captions, path, make_encoder, progress)
    evals = {split: EvalSplit(split, parsed, texts[role]) for role, (split, parsed) in splits.items() if role != "train"}
    return RetrievalData(splits["train"][1], texts["train"], identity, evals, settings.eval_split, settings.dataset)


def _loader(dataset, batch_size: int, shuffle: bool, workers: int, seed: int | None = None,
            drop_last: bool = False) -> DataLoader:
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      drop_last=drop_last, generator=generator, persistent_workers=workers > 0)


def train_loader(data: RetrievalData, image_size: int, batch_size: int, workers: int,
                 seed: int | None = None, norm: str = "clip") -> DataLoader:
    """Shuffled real pairs with the training augmentation; drops a last batch smaller than 2."""
    dataset = PairDataset(data.train, data.train_text, train_transform(image_size, norm))
    return _loader(dataset, batch_size, True, workers, seed, drop_last=len(dataset) % batch_size == 1)


def eval_image_loader(data: RetrievalData, image_size: int, batch_size: int, workers: int,
                      norm: str = "clip", split: str | None = None) -> DataLoader:
    """An evaluation split's unique images (default `--eval_split`), in order, with the test transform."""
    images = data.eval if split is None else data.split(split).images
    return _loader(ImageDataset(images, test_transform(image_size, norm)), batch_size, False, workers)
