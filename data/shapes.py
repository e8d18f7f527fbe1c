"""Procedurally generated image-caption retrieval dataset ("shapes").

Every image shows one to three coloured geometric objects on a plain or striped
background; every image comes with five differently worded English captions.
The data set is written to disk once by :func:`ensure_shapes` in the same
layout as the real retrieval data sets, so the project runs without downloads:

* ``annotations/shapes_train.json``: one entry per caption,
  ``{"image": "images/train/00000.png", "caption": "...", "image_id": "train_00000"}``
* ``annotations/shapes_{val,test}.json``: one entry per image,
  ``{"image": "images/val/00000.png", "caption": [five captions]}``
* ``shapes_meta.json``: the generation parameters, written last.

Everything is derived from ``seed``: image ``i`` of a split draws its scene and
captions from ``default_rng([seed, split_index, i])`` and its pixel noise from
``default_rng([seed, split_index, i, 1])``, so the files are byte-identical
between runs and val/test do not depend on ``num_train``. :func:`make_example`
rebuilds the scene record and captions of any image without reading files.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
CAPTIONS_PER_IMAGE = 5

# Vocabularies (tune freely; bump FORMAT_VERSION when the output changes).
SHAPES = ("circle", "square", "triangle", "diamond", "star", "hexagon", "cross")
COLOURS = {
    "red": (215, 35, 35), "green": (50, 185, 60), "blue": (40, 100, 235),
    "yellow": (245, 220, 40), "purple": (150, 60, 205), "orange": (250, 140, 25),
    "white": (245, 245, 245), "pink": (250, 135, 195),
}
# name -> (base colour, stripe colour or None)
BACKGROUNDS = {
    "black": ((20, 20, 20), None), "grey": ((120, 120, 120), None),
    "dark blue": ((25, 35, 100), None), "brown": ((100, 62, 32), None),
    "dark green": ((22, 78, 42), None),
    "striped grey": ((120, 120, 120), (70, 70, 70)),
}
SIZES = {"small": 0.08, "medium": 0.115, "large": 0.15}  # radius / image side
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "center", "right")
MAX_OBJECTS = 3
JITTER = 0.05          # random shift of an object centre, fraction of the side
MIN_CONTRAST = 180     # minimum "redmean" colour distance object vs background
NOISE_STD = 5.0        # Gaussian pixel noise, in 0..255 units
SUPERSAMPLE = 2        # draw at this multiple, then box-downsample
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object: its named attributes and exact geometry (fractions)."""

    shape: str
    colour: str
    size: str
    row: int
    col: int
    cx: float
    cy: float
    radius: float

    @property
    def position(self) -> str:
        """Coarse position name from the 3x3 grid, e.g. 'top left' or 'center'."""
        row, col = ROWS[self.row], COLUMNS[self.col]
        if row == "middle":
            return col
        return row if col == "center" else f"{row} {col}"


@dataclass(frozen=True)
class Scene:
    """Everything shown in one image."""

    objects: tuple[ShapeObject, ...]
    background: str


def _pick(rng: np.random.Generator, options: Iterable[str]) -> str:
    """One element of a sequence, drawn uniformly (faster than rng.choice)."""
    options = list(options)
    return options[int(rng.integers(len(options)))]


def colour_distance(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    """Cheap perceptual colour distance ("redmean" weighted Euclidean)."""
    r = (a[0] + b[0]) / 2
    dr, dg, db = (x - y for x, y in zip(a, b))
    return math.sqrt((2 + r / 256) * dr * dr + 4 * dg * dg + (2 + (255 - r) / 256) * db * db)


def allowed_colours(background: str) -> list[str]:
    """Object colours that stand out clearly from every colour of ``background``."""
    bg_colours = [c for c in BACKGROUNDS[background] if c is not None]
    return [name for name, rgb in COLOURS.items()
            if all(colour_distance(rgb, c) >= MIN_CONTRAST for c in bg_colours)]


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw a background and 1..MAX_OBJECTS objects in distinct grid cells."""
    background = _pick(rng, BACKGROUNDS)
    colours = allowed_colours(background)
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    cells = rng.permutation(len(ROWS) * len(COLUMNS))[:n]
    objects, seen = [], set()
    for cell in cells:
        while True:  # no two objects with the same shape and colour
            shape, colour = _pick(rng, SHAPES), _pick(rng, colours)
            if (shape, colour) not in seen:
                seen.add((shape, colour))
                break
        size = _pick(rng, SIZES)
        radius = SIZES[size] * rng.uniform(0.9, 1.1)
        row, col = divmod(int(cell), len(COLUMNS))
        edge = 1.15 * radius  # the outermost point of any shape (star, triangle)
        cx = np.clip((col + 0.5) / 3 + rng.uniform(-JITTER, JITTER), edge, 1 - edge)
        cy = np.clip((row + 0.5) / 3 + rng.uniform(-JITTER, JITTER), edge, 1 - edge)
        objects.append(ShapeObject(shape, colour, size, row, col, float(cx), float(cy), float(radius)))
    return Scene(tuple(objects), background)


# ----------------------------------------------------------------- drawing

def _regular(cx: float, cy: float, radii: list[float], start_deg: float) -> list[tuple[float, float]]:
    """Polygon with vertices evenly spaced in angle, cycling through ``radii``."""
    n = len(radii)
    return [(cx + radii[k] * math.cos(math.radians(start_deg + 360 * k / n)),
             cy + radii[k] * math.sin(math.radians(start_deg + 360 * k / n))) for k in range(n)]


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Outline of ``shape`` centred at (cx, cy) with nominal radius r (pixels)."""
    if shape == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return _regular(cx, cy, [1.1 * r] * 4, -90)
    if shape == "triangle":
        return _regular(cx, cy + 0.15 * r, [1.15 * r] * 3, -90)
    if shape == "hexagon":
        return _regular(cx, cy, [r] * 6, 0)
    if shape == "star":
        return _regular(cx, cy, [1.15 * r, 0.48 * r] * 5, -90)
    if shape == "cross":
        w = 0.35 * r
        arm = [(w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r)]
        half = [(cx + x, cy + y) for x, y in arm]
        return half + [(cx - x, cy - y) for x, y in arm]
    raise ValueError(f"no polygon for shape {shape!r}")


def render(scene: Scene, image_px: int, rng: np.random.Generator) -> Image.Image:
    """Draw ``scene`` as an RGB image of ``image_px`` pixels, with pixel noise."""
    side = image_px * SUPERSAMPLE
    base, stripe = BACKGROUNDS[scene.background]
    img = Image.new("RGB", (side, side), base)
    draw = ImageDraw.Draw(img)
    if stripe is not None:
        period = max(2, side // 8)
        for x in range(0, side, period):
            draw.rectangle([x, 0, x + period // 2 - 1, side - 1], fill=stripe)
    for obj in scene.objects:
        cx, cy, r = obj.cx * side, obj.cy * side, obj.radius * side
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLOURS[obj.colour])
        else:
            draw.polygon(shape_polygon(obj.shape, cx, cy, r), fill=COLOURS[obj.colour])
    pixels = np.asarray(img.reduce(SUPERSAMPLE), dtype=np.float32)
    pixels += rng.normal(0.0, NOISE_STD, size=pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


# ----------------------------------------------------------------- captions

def _a(phrase: str) -> str:
    """Prefix the right indefinite article."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _where(obj: ShapeObject, rng: np.random.Generator, vague: bool = False,
           terse: bool = False) -> str:
    """Position phrase; ``vague`` may name only the row or column of a corner,
    ``terse`` avoids the longer wordings."""
    pos = obj.position
    if vague and " " in pos:
        pos = _pick(rng, pos.split())
    if pos == "center":
        return _pick(rng, ["in the center", "in the middle"])
    if pos in ("left", "right"):
        return _pick(rng, [f"on the {pos}", f"at the {pos}"])
    if pos in ("top", "bottom"):
        return _pick(rng, [f"at the {pos}", f"near the {pos}"])
    return f"in the {pos}" if terse else _pick(rng, [f"in the {pos}", f"in the {pos} corner"])


def _join(parts: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _listing(objs: list[ShapeObject], rng: np.random.Generator, style: str) -> str:
    """Describe all objects in the given detail ``style``."""
    phrases = {
        "full": lambda o: _a(f"{o.size} {o.colour} {o.shape}") + " " + _where(o, rng, terse=True),
        "colour_shape": lambda o: _a(f"{o.colour} {o.shape}"),
        "size_shape": lambda o: _a(f"{o.size} {o.shape}"),
        "size_colour_shape": lambda o: _a(f"{o.size} {o.colour} {o.shape}"),
        "where": lambda o: _a(f"{o.colour} {o.shape}") + " " + _where(o, rng, vague=True),
    }[style]
    return _join([phrases(o) for o in objs])


def _bg(background: str, rng: np.random.Generator) -> str:
    """Background phrase, e.g. 'a grey background' or 'a plain grey background'."""
    if "striped" in background:
        return f"a {background} background"
    return _pick(rng, [f"{_a(background)} background", f"a plain {background} background"])


def describe(objects: tuple[ShapeObject, ...] | list[ShapeObject], background: str,
             rng: np.random.Generator) -> list[str]:
    """Five pairwise different captions for one image.

    The first caption names every attribute (each object's size, colour, shape
    and position, and the background). The other four come from distinct,
    randomly chosen templates that leave some attributes out and list the
    objects in random order; each of them still names every object's colour
    or shape.
    """
    objs = list(objects)
    n = len(objs)
    if n == 1:
        count = "a single shape"
    else:
        count = f"{NUMBER_WORDS.get(n, str(n))} {_pick(rng, ['shapes', 'objects', 'figures'])}"

    def listing(style: str) -> str:
        return _listing([objs[k] for k in rng.permutation(n)], rng, style)

    def bg() -> str:
        return _bg(background, rng)

    templates = [
        lambda: f"there is {listing('where')}" if n == 1 else f"there are {count}: {listing('where')}",
        lambda: f"{count}: {listing('colour_shape')}",
        lambda: f"an image showing {listing('size_colour_shape')} on {bg()}",
        lambda: f"a picture of {listing('where')}",
        lambda: f"{listing('colour_shape')} against {bg()}",
        lambda: f"{bg()} with {listing('size_shape' if n > 1 else 'size_colour_shape')}",
        lambda: listing("full"),
    ]
    if n == 1:
        first = f"{_listing(objs, rng, 'full')} on {bg()}"
    else:
        first = f"{bg()} with {_listing(objs, rng, 'full')}"
    picks = rng.permutation(len(templates))[:CAPTIONS_PER_IMAGE - 1]
    captions = [first] + [templates[int(k)]() for k in picks]
    if len(set(captions)) != len(captions):  # templates differ in wording, so never
        raise RuntimeError(f"duplicate captions generated: {captions}")
    return captions


# ----------------------------------------------------------------- files

def make_example(seed: int, split: str, index: int) -> tuple[Scene, list[str]]:
    """Scene and captions of image ``index`` of ``split``, from its own stream.

    The pixel noise of that image uses a separate stream, so this is cheap.
    """
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    scene = sample_scene(rng)
    return scene, describe(scene.objects, scene.background, rng)


def _params(seed: int, num_train: int, num_val: int, num_test: int, image_px: int) -> dict:
    return {"format_version": FORMAT_VERSION, "seed": seed, "num_train": num_train,
            "num_val": num_val, "num_test": num_test, "image_px": image_px}


def _read_marker(root: Path) -> dict | None:
    marker = root / "shapes_meta.json"
    return json.loads(marker.read_text()) if marker.is_file() else None


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def _generate(folder: Path, params: dict, progress: bool) -> None:
    """Write every image and annotation file into ``folder``, marker last."""
    counts = {s: params[f"num_{s}"] for s in SPLITS}
    bar = tqdm(total=sum(counts.values()), desc="shapes dataset", disable=not progress)
    (folder / "annotations").mkdir(parents=True)
    for split_index, split in enumerate(SPLITS):
        (folder / "images" / split).mkdir(parents=True)
        entries: list[dict] = []
        for i in range(counts[split]):
            scene, captions = make_example(params["seed"], split, i)
            pixel_rng = np.random.default_rng([params["seed"], split_index, i, 1])
            rel = f"images/{split}/{i:05d}.png"
            render(scene, params["image_px"], pixel_rng).save(folder / rel, format="PNG", compress_level=6)
            if split == "train":
                entries += [{"image": rel, "caption": c, "image_id": f"train_{i:05d}"} for c in captions]
            else:
                entries.append({"image": rel, "caption": captions})
            bar.update(1)
        _write_json(folder / "annotations" / f"shapes_{split}.json", entries)
    bar.close()
    _write_json(folder / "shapes_meta.json", params)


def ensure_shapes(root: str | os.PathLike, seed: int = 0, num_train: int = 10000,
                  num_val: int = 1000, num_test: int = 1000, image_px: int = 64,
                  progress: bool = True) -> Path:
    """Generate the shapes data set into ``root`` unless it is already there.

    Returns ``root`` as a Path. Raises ValueError if ``root`` holds a shapes data
    set made with other parameters, or unrelated files without a marker.
    """
    root = Path(root)
    params = _params(seed, num_train, num_val, num_test, image_px)
    existing = _read_marker(root)
    if existing == params:
        return root
    if existing is not None:
        diff = ", ".join(f"{k}={existing.get(k)} (wanted {v})"
                         for k, v in params.items() if existing.get(k) != v)
        raise ValueError(f"{root} holds a shapes dataset made with other settings ({diff}); "
                         "pass another folder or delete it")
    if root.exists():  # left over from an interrupted run: no marker
        unknown = {p.name for p in root.iterdir()} - {"annotations", "images", "shapes_meta.json"}
        if unknown:
            raise ValueError(f"{root} has no shapes marker but holds other files "
                             f"({sorted(unknown)[:3]}); pass another folder or delete it")
        shutil.rmtree(root)
    tmp = root.absolute().parent / f"{root.absolute().name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _generate(tmp, params, progress)
        os.replace(tmp, root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if _read_marker(root) == params:  # another process finished first
            return root
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
