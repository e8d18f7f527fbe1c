"""Reading image-caption annotations in the BLIP / Karpathy JSON layout (docs/file-formats.md).

Train file: one entry per caption, ``{"image": relative path, "caption": str, "image_id": str}``.
Val/test file: one entry per image, ``{"image": relative path, "caption": [str, ...]}``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from data.captions import clean_caption
from utils.cli import UserError

# Annotation file name prefix of each dataset; files are `<prefix>_<split>.json` in --ann_root.
ANNOTATION_PREFIX = {
    "flickr": "flickr30k",
    "coco": "coco_karpathy",
    "flickr8k": "flickr8k",
    "shapes": "shapes",
}

WHERE_TO_GET = (
    "Use the BLIP/Karpathy-split annotation files (flickr30k_{train,val,test}.json, "
    "coco_karpathy_{train,val,test}.json; the BLIP project publishes them) or any file in the same "
    "layout (see README 'Data' and docs/file-formats.md), and pass the folder holding them as --ann_root"
)


@dataclass
class CaptionedImages:
    """One split: unique images, their cleaned captions, and the caption <-> image mapping."""

    image_paths: list[Path]
    captions: list[str]
    txt2img: list[int]
    img2txt: list[list[int]] = field(default_factory=list)
    skipped_images: int = 0

    def __post_init__(self):
        if not self.img2txt:
            self.img2txt = [[] for _ in self.image_paths]
            for t, i in enumerate(self.txt2img):
                self.img2txt[i].append(t)


def annotation_file(dataset: str, split: str, ann_root) -> Path:
    if dataset not in ANNOTATION_PREFIX:
        raise UserError(f"unknown dataset {dataset!r}; choose one of {sorted(ANNOTATION_PREFIX)}")
    return Path(ann_root) / f"{ANNOTATION_PREFIX[dataset]}_{split}.json"


def _read_json_list(path: Path) -> list:
    if not path.is_file():
        raise UserError(f"annotation file not found: {path}. {WHERE_TO_GET}")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"annotation file {path} is not valid JSON ({err})") from None
    if not isinstance(entries, list) or not entries:
        raise UserError(f"annotation file {path} must hold a non-empty JSON list of entries")
    return entries


def _entry_field(entry, key: str, kind, path: Path, index: int):
    value = entry.get(key) if isinstance(entry, dict) else None
    if not isinstance(value, kind):
        raise UserError(f"annotation file {path}, entry {index}: expected a {key!r} field of type "
                        f"{getattr(kind, '__name__', kind)}, got {entry!r:.120}")
    return value


def _check_images(paths: list[Path], skip_bad: bool, ann_path: Path) -> set[int]:
    """Indices of images that are missing; an error unless `skip_bad`."""
    missing = {i for i, p in enumerate(paths) if not p.is_file()}
    if missing and not skip_bad:
        first = paths[min(missing)]
        raise UserError(f"image not found: {first} ({len(missing)} of {len(paths)} images listed in "
                        f"{ann_path} are missing; check --image_root, or pass --skip_bad_images True "
                        f"to leave those pairs out)")
    return missing


def read_split(dataset: str, split: str, ann_root, image_root, skip_bad_images: bool = False,
               max_words: int = 30) -> CaptionedImages:
    """Parse one split into unique images + cleaned captions, checking that every image exists."""
    path = annotation_file(dataset, split, ann_root)
    entries = _read_json_list(path)
    image_root = Path(image_root)
    image_index: dict[str, int] = {}
    image_names: list[str] = []
    raw_pairs: list[tuple[int, str]] = []
    for k, entry in enumerate(entries):
        name = _entry_field(entry, "image", str, path, k)
        caption = entry.get("caption") if isinstance(entry, dict) else None
        captions = caption if isinstance(caption, list) else [caption]
        if not captions or not all(isinstance(c, str) for c in captions):
            raise UserError(f"annotation file {path}, entry {k}: 'caption' must be a string or a "
                            f"non-empty list of strings, got {caption!r:.120}")
        if name not in image_index:
            image_index[name] = len(image_names)
            image_names.append(name)
        raw_pairs.extend((image_index[name], c) for c in captions)

    paths = [image_root / name for name in image_names]
    bad = _check_images(paths, skip_bad_images, path)
    keep = [i for i in range(len(paths)) if i not in bad]
    new_index = {old: new for new, old in enumerate(keep)}
    captions, txt2img = [], []
    for img, cap in raw_pairs:
        if img in new_index:
            captions.append(clean_caption(cap, max_words))
            txt2img.append(new_index[img])
    if not keep:
        raise UserError(f"no usable image in {path} (all {len(paths)} skipped)")
    return CaptionedImages([paths[i] for i in keep], captions, txt2img, skipped_images=len(bad))


def first_images(split: CaptionedImages, count: int) -> CaptionedImages:
    """The first `count` images of a split (annotation order) with all their captions."""
    if count >= len(split.image_paths):
        return split
    pairs = [(c, i) for c, i in zip(split.captions, split.txt2img) if i < count]
    return CaptionedImages(split.image_paths[:count], [c for c, _ in pairs], [i for _, i in pairs],
                           skipped_images=split.skipped_images)
