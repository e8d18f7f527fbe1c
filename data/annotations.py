"""Reading image-caption annotations in the BLIP / Karpathy JSON layout (docs/file-formats.md).

Train file: one entry per caption, ``{"image": relative path, "caption": str, "image_id": str}``.
Val/test file: one entry per image, ``{"image": relative path, "caption": [str, ...]}``.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from data.captions import clean_caption
from data.datasets import describe_problem, image_problem
from utils.cli import NAME_MAX, UserError, os_error_reason
from utils.io import atomic_write_json

# Annotation file name prefix of each dataset; files are `<prefix>_<split>.json` in --ann_root.
ANNOTATION_PREFIX = {
    "flickr": "flickr30k",
    "coco": "coco_karpathy",
    "flickr8k": "flickr8k",
    "shapes": "shapes",
    "webdata": "webdata",  # webdataset shards unpacked by `export.py shards` (reduction/shards.unpack_shards)
}

WHERE_TO_GET = (
    "Use the BLIP/Karpathy-split annotation files (flickr30k_{train,val,test}.json, "
    "coco_karpathy_{train,val,test}.json; the BLIP project publishes them) or any file in the same "
    "layout (see README 'Data' and docs/file-formats.md), and pass the folder holding them as --ann_root"
)


@dataclass
class CaptionedImages:
    """One split: unique images, their cleaned captions, and the caption <-> image mapping.

    `skipped` counts the images left out by --skip_bad_images, by kind of problem; `empty_captions` the
    captions left out because nothing remained after cleaning, and `captionless_images` the images left
    out because all their captions were empty. `origins` says where each caption came from in the annotation
    file: (entry index, index in the entry's caption list or 0), so that a subset of pairs can be written back
    in the file's own layout (reduce.py)."""

    image_paths: list[Path]
    captions: list[str]
    txt2img: list[int]
    img2txt: list[list[int]] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    empty_captions: int = 0
    captionless_images: int = 0
    origins: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self):
        if not self.img2txt:
            self.img2txt = [[] for _ in self.image_paths]
            for t, i in enumerate(self.txt2img):
                self.img2txt[i].append(t)

    @property
    def skipped_images(self) -> int:
        return sum(self.skipped.values())


def annotation_file(dataset: str, split: str, ann_root) -> Path:
    if dataset not in ANNOTATION_PREFIX:
        raise UserError(f"unknown dataset {dataset!r}; choose one of {sorted(ANNOTATION_PREFIX)}")
    return Path(ann_root) / f"{ANNOTATION_PREFIX[dataset]}_{split}.json"


def _read_json_list(path: Path) -> list:
    try:
        if not path.is_file():
            raise UserError(f"annotation file not found: {path}. {WHERE_TO_GET}")
        entries = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(f"annotation file {path} cannot be read: {os_error_reason(err)}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"annotation file {path} is not valid JSON ({err})") from None
    except RecursionError:
        raise UserError(f"annotation file {path} is nested too deeply to read (thousands of [ or {{ inside each "
                        f"other): it is damaged or not an annotation file. {WHERE_TO_GET}") from None
    if not isinstance(entries, list) or not entries:
        raise UserError(f"annotation file {path} must hold a non-empty JSON list of entries")
    return entries


def _entry_field(entry, key: str, kind, path: Path, index: int):
    value = entry.get(key) if isinstance(entry, dict) else None
    if not isinstance(value, kind):
        raise UserError(f"annotation file {path}, entry {index}: expected a {key!r} field of type "
                        f"{getattr(kind, '__name__', kind)}, got {entry!r:.120}")
    return value


def _image_name_problem(name: str) -> str | None:
    """Why the relative image path `name` can name no file (a NUL byte, or a component too long), or None."""
    if "\0" in name:
        return "holds a NUL byte (\\0), which no file name can contain"
    longest = max((len(os.fsencode(part)) for part in Path(name).parts), default=0)
    if longest > NAME_MAX:
        return f"has a path component of {longest} bytes, longer than the file system allows ({NAME_MAX})"
    return None


def _read_record(record: Path | None) -> dict:
    try:
        saved = json.loads(record.read_text(encoding="utf-8")) if record else {}
    except (OSError, ValueError):
        return {}  # no record yet, or a damaged one: check again
    return saved if isinstance(saved, dict) else {}


def _write_record(record: Path | None, known: dict) -> None:
    try:
        if record:
            atomic_write_json(known, record)
    except (OSError, UserError):
        pass  # the record only saves time: a read-only cache folder means checking again next run


def _usable_images(paths: list[Path], wanted: list[int], record: Path | None, limit: int | None,
                   progress: bool) -> tuple[list[int], dict[int, tuple[str, str]]]:
    """The indices in `wanted` whose image decodes (at most `limit` of them, in order) and the problem of
    each one that does not.

    An image that decoded once is remembered in `record` by size and modification time, so a split is
    decoded only the first time (about 3 s for Flickr8k's 8,000 images) and after its files change."""
    known = _read_record(record)
    good, problems, learned = [], {}, False
    for i in tqdm(wanted, desc="checking images", unit="image", disable=not progress, leave=False):
        if limit is not None and len(good) == limit:
            break
        path = paths[i]
        try:
            stat = path.stat()
            stamp = [stat.st_size, stat.st_mtime_ns]
        except OSError:
            stamp = None
        if stamp is None or known.get(str(path)) != stamp:
            problem = image_problem(path)
            if problem:
                problems[i] = problem
                continue
            known[str(path)], learned = stamp, True
        good.append(i)
    if learned:
        _write_record(record, known)
    return good, problems


def _refuse_bad_images(problems: dict[int, tuple[str, str]], counts: dict[str, int], paths: list[Path],
                       ann_path: Path) -> None:
    first = min(problems)
    raise UserError(f"{describe_problem(paths[first], *problems[first])} ({len(problems)} of the {len(paths)} "
                    f"images listed in {ann_path} cannot be used: {kinds_phrase(counts)}); check --image_root, fix "
                    f"or remove the files, or pass --skip_bad_images True to leave those pairs out")


def kinds_phrase(counts: dict[str, int]) -> str:
    """'2 missing, 1 corrupt or truncated'."""
    return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))


def read_split(dataset: str, split: str, ann_root, image_root, skip_bad_images: bool = False,
               max_words: int = 30, max_images: int | None = None, record_dir: Path | None = None,
               progress: bool = False) -> CaptionedImages:
    """Parse one split into unique images + cleaned captions, checking that every image decodes.

    Captions that clean to nothing are left out (all of them empty is an error); images that are missing or
    do not decode are an error naming the first, or with `skip_bad_images` left out with their captions,
    so that no later reader meets them. `max_images` keeps the first usable images only (checking no
    further); `record_dir` is where the images that decoded are remembered between runs."""
    path = annotation_file(dataset, split, ann_root)
    entries = _read_json_list(path)
    image_root = Path(image_root)
    image_index: dict[str, int] = {}
    image_names: list[str] = []
    pairs: list[tuple[int, str]] = []
    origins: list[tuple[int, int]] = []
    empty = 0
    for k, entry in enumerate(entries):
        name = _entry_field(entry, "image", str, path, k)
        problem = _image_name_problem(name)
        if problem:
            raise UserError(f"annotation file {path}, entry {k}: the image path {name!r:.120} {problem}; fix the entry")
        caption = entry.get("caption") if isinstance(entry, dict) else None
        captions = caption if isinstance(caption, list) else [caption]
        if not captions or not all(isinstance(c, str) for c in captions):
            raise UserError(f"annotation file {path}, entry {k}: 'caption' must be a string or a "
                            f"non-empty list of strings, got {caption!r:.120}")
        if name not in image_index:
            image_index[name] = len(image_names)
            image_names.append(name)
        cleaned = [clean_caption(c, max_words) for c in captions]
        empty += sum(not c for c in cleaned)
        pairs.extend((image_index[name], c) for c in cleaned if c)
        origins.extend((k, j) for j, c in enumerate(cleaned) if c)
    if not pairs:
        raise UserError(f"annotation file {path}: all its {empty} captions are empty (nothing is left after "
                        f"cleaning); it needs a caption text for each image")

    paths = [image_root / name for name in image_names]
    captioned = sorted({img for img, _ in pairs})
    record = Path(record_dir) / f"{path.stem}-{_digest(image_root)}.json" if record_dir else None
    keep, problems = _usable_images(paths, captioned, record, max_images, progress)
    counts = dict(Counter(kind for kind, _ in problems.values()))
    if problems and not skip_bad_images:
        _refuse_bad_images(problems, counts, paths, path)
    if not keep:
        raise UserError(f"no usable image in {path} (all {len(captioned)} skipped: {kinds_phrase(counts)})")
    new_index = {old: new for new, old in enumerate(keep)}
    kept = [(new_index[img], cap, origin) for (img, cap), origin in zip(pairs, origins) if img in new_index]
    return CaptionedImages([paths[i] for i in keep], [c for _, c, _ in kept], [i for i, _, _ in kept],
                           skipped=counts, empty_captions=empty,
                           captionless_images=len(paths) - len(captioned), origins=[o for _, _, o in kept])


def _digest(folder: Path) -> str:
    return hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:12]


def entries_of_pairs(path: Path, origins: list[tuple[int, int]]) -> list:
    """The entries of annotation file `path` that hold exactly the pairs at `origins` (`CaptionedImages.origins`),
    in the file's own layout and order: an entry with one caption is copied whole (every field kept), an entry
    with a list of captions keeps the listed ones only. What reduce.py writes, so that any trainer reads it."""
    entries = _read_json_list(Path(path))
    wanted: dict[int, set[int]] = {}
    for k, j in origins:
        wanted.setdefault(k, set()).add(j)
    out = []
    for k in sorted(wanted):
        entry = entries[k]
        if isinstance(entry.get("caption"), list):
            out.append({**entry, "caption": [c for j, c in enumerate(entry["caption"]) if j in wanted[k]]})
        else:
            out.append(entry)
    return out


def pairs_listed_in(path: Path, split: CaptionedImages, image_root, max_words: int = 30) -> list[int]:
    """The indices of `split`'s pairs that annotation file `path` lists (a file in the annotation layout whose
    every caption is one of the split's pairs, e.g. reduce.py's output), in the file's order. A pair is matched by
    its image path and its cleaned caption; a pair listed twice counts twice only if the split holds it twice."""
    entries = _read_json_list(Path(path))
    image_root = Path(image_root)
    available: dict[tuple[Path, str], list[int]] = {}
    for index in range(len(split.captions) - 1, -1, -1):  # popped from the end: the first occurrence first
        available.setdefault((split.image_paths[split.txt2img[index]], split.captions[index]), []).append(index)
    chosen = []
    for k, entry in enumerate(entries):
        name = _entry_field(entry, "image", str, path, k)
        caption = entry.get("caption")
        captions = caption if isinstance(caption, list) else [caption]
        if not captions or not all(isinstance(c, str) for c in captions):
            raise UserError(f"annotation file {path}, entry {k}: 'caption' must be a string or a non-empty list of "
                            f"strings, got {caption!r:.120}")
        for text in captions:
            cleaned = clean_caption(text, max_words)
            if not cleaned:
                continue
            matches = available.get((image_root / name, cleaned))
            if not matches:
                raise UserError(f"annotation file {path}, entry {k}: the pair (image {name!r:.120}, caption "
                                f"{text!r:.80}) is not a pair of the training split (or is listed more often than "
                                f"the split holds it); a subset file lists pairs of the training split only")
            chosen.append(matches.pop())
    if not chosen:
        raise UserError(f"annotation file {path} lists no pair with a caption")
    return chosen


def with_pairs(split: CaptionedImages, indices: list[int]) -> CaptionedImages:
    """`split` training on the pairs at `indices` only (in that order). Every image stays listed, also those
    left without a caption (never drawn), so that the split's images, and with them the trunk-output caches
    keyed by them, are the full split's."""
    return CaptionedImages(split.image_paths, [split.captions[i] for i in indices], [split.txt2img[i] for i in indices],
                           skipped=dict(split.skipped), empty_captions=split.empty_captions,
                           captionless_images=split.captionless_images,
                           origins=[split.origins[i] for i in indices] if split.origins else [])
