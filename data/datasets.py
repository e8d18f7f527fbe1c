"""PyTorch datasets over a parsed split.

Training iterates over captions (one image-caption pair per caption, as the reference does) and
returns the caption's cached frozen text embedding instead of its string, so no text encoder runs
during training. Evaluation iterates over unique images. The checks that decide which images are
usable live here too, beside the one function that reads them.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from utils.cli import UserError

if TYPE_CHECKING:  # annotations.py checks images with the functions below
    from data.annotations import CaptionedImages

# What can be wrong with an image file, in the words the messages and the --skip_bad_images report use.
MISSING = "missing"
NOT_AN_IMAGE = "not an image"
BOMB = "too many pixels (decompression bomb)"
DAMAGED = "corrupt or truncated"


def problem_kind(err: BaseException) -> str:
    """Which of the kinds above a failure to open or decode an image is."""
    if isinstance(err, FileNotFoundError):
        return MISSING
    if isinstance(err, Image.DecompressionBombError):
        return BOMB
    if isinstance(err, UnidentifiedImageError):
        return NOT_AN_IMAGE
    return DAMAGED


def _detail(err: BaseException) -> str:
    """PIL's words for a failure, where they add something to the kind (its 'cannot identify' repeats the path)."""
    if isinstance(err, (FileNotFoundError, UnidentifiedImageError)):
        return ""
    return str(err) or type(err).__name__


def image_problem(path: Path) -> tuple[str, str] | None:
    """(kind, PIL's words) of what stops `path` from decoding, or None when it decodes.

    Every byte is decoded, so a truncated file shows; JPEGs decode at 1/8 scale (the entropy-coded data is
    still read to the end), which is cheaper than a full decode: about 0.4 ms per Flickr8k image here.
    """
    if not path.is_file():
        return MISSING, ""
    try:
        with Image.open(path) as image:
            if image.format == "JPEG":
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... for damaged files
        return problem_kind(err), _detail(err)
    return None


def describe_problem(path: Path, kind: str, detail: str) -> str:
    """One phrase naming the file and what is wrong with it."""
    if kind == MISSING:
        return f"image not found: {path}"
    return f"cannot read image {path}: {kind}" + (f" ({detail})" if detail else "")


def load_rgb(path: Path) -> Image.Image:
    """The image at `path` in RGB; any failure is a UserError naming the file and what is wrong with it.

    The split's images were checked when it was read (data/annotations.py), so this only fails for a file
    changed since."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception as err:  # the same spread of PIL exception types as above
        problem = describe_problem(path, problem_kind(err), _detail(err))
        raise UserError(f"{problem}; fix or remove it, or pass --skip_bad_images True to leave such pairs "
                        f"out") from None


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
