"""PyTorch datasets over a parsed split.

Training iterates over captions (one image-caption pair per caption, as the reference does) and
returns the caption's cached frozen text embedding instead of its string, so no text encoder runs
during training. Evaluation iterates over unique images. The checks that decide which images are
usable live here too, beside the one function that reads them.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
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


# Modes with an alpha channel (premultiplied: "RGBa", "La"); a palette, grey or RGB image may instead name one
# transparent entry or colour in `info["transparency"]`.
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def _grey(values: np.ndarray) -> Image.Image:
    """Grey levels already on the 0-255 scale (clipped), rounded, as RGB."""
    return Image.fromarray(np.rint(np.clip(values, 0, 255)).astype(np.uint8)).convert("RGB")


def to_rgb8(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB, whatever its mode; every image the data sets read goes through here.

    - 16-bit and 32-bit integer greyscale ("I;16", "I;16B", "I;16L", and "I", which is what older Pillow makes of
      16-bit PNGs): v -> round(v / 257) with v clipped to 0..65535, so 65535 -> 255 and 32896 -> 128 (Pillow's own
      conversion clips at 255: every such image came out white).
    - Float greyscale ("F"): on the 0-1 scale when every value lies in [0, 1], else on the 0-255 scale; clipped,
      NaN -> 0.
    - Alpha (RGBA, LA, PA, premultiplied RGBa / La, and palette, grey or RGB images with a transparent entry or
      colour): composited over white, c * a / 255 + 255 * (1 - a / 255) rounded to the nearest integer, so
      (255, 0, 0, alpha 128) -> (255, 127, 127) and a fully transparent pixel is white.
    - Anything else (RGB, L, 1, P, CMYK, YCbCr, ...) by Pillow: palette entries give their colours, CMYK is
      R = 255 (1 - C/255)(1 - K/255) rounded (Pillow un-inverts Adobe's inverted CMYK JPEGs when it reads them).
      Pillow opens 16-bit RGB PNGs as 8-bit RGB (the high byte of each value) and 16-bit RGBA ones as RGBA.
    """
    mode = image.mode
    if mode == "I" or mode.startswith("I;16"):
        return _grey(np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 257)
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        values = np.where(np.isnan(values), 0.0, values)
        unit_scale = values.size > 0 and values.min() >= 0 and values.max() <= 1
        return _grey(values * 255 if unit_scale else values)
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.uint32)
        colour, alpha = rgba[..., :3], rgba[..., 3:]
        return Image.fromarray(((colour * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8))
    return image.convert("RGB")


def load_rgb(path: Path) -> Image.Image:
    """The image at `path` as 8-bit RGB (`to_rgb8`); any failure is a UserError naming the file and what is wrong with it.

    The split's images were checked when it was read (data/annotations.py), so this only fails for a file
    changed since."""
    try:
        with Image.open(path) as image:
            return to_rgb8(image)
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
