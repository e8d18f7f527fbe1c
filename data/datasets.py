"""PyTorch datasets over a parsed split.

Training iterates over captions (one image-caption pair per caption, as the reference does) and
returns the caption's cached frozen text embedding instead of its string, so no text encoder runs
during training. Evaluation iterates over unique images.
"""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from data.annotations import CaptionedImages
from utils.cli import UserError


def load_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise UserError(f"cannot read image {path} ({err}); fix or remove it, or pass "
                        f"--skip_bad_images True") from None


class PairDataset(Dataset):
    """(transformed image, frozen text embedding of one of its captions, caption index)."""

    def __init__(self, split: CaptionedImages, text_embeddings: torch.Tensor, transform):
        if len(text_embeddings) != len(split.captions):
            raise ValueError(f"{len(text_embeddings)} embeddings for {len(split.captions)} captions")
        self.split = split
        self.text_embeddings = text_embeddings
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split.captions)

    def __getitem__(self, index: int):
        image = self.transform(load_rgb(self.split.image_paths[self.split.txt2img[index]]))
        return image, self.text_embeddings[index], index


class ImageDataset(Dataset):
    """(transformed image, image index) over the unique images of a split."""

    def __init__(self, split: CaptionedImages, transform):
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split.image_paths)

    def __getitem__(self, index: int):
        return self.transform(load_rgb(self.split.image_paths[index])), index
