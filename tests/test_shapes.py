"""Tests for the embedded procedural shapes dataset (data/shapes.py)."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.shapes import (BACKGROUNDS, COLOURS, SHAPES, SIZES, allowed_colours, describe,
                         ensure_shapes, make_example, sample_scene)

SMALL = dict(num_train=12, num_val=4, num_test=4, image_px=32, progress=False)


def _words(caption: str) -> set[str]:
    return set(re.sub(r"[^a-z ]", " ", caption.lower()).split())


def _files(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file below ``root``."""
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _load(root: Path, split: str) -> list:
    return json.loads((root / "annotations" / f"shapes_{split}.json").read_text())


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """One tiny generated dataset shared by the read-only tests."""
    return ensure_shapes(tmp_path_factory.mktemp("shapes") / "root", seed=0, **SMALL)


def test_layout(small):
    train = _load(small, "train")
    assert len(train) == 12 * 5
    for i in range(12):
        block = train[5 * i: 5 * i + 5]
        assert {e["image"] for e in block} == {f"images/train/{i:05d}.png"}
        assert {e["image_id"] for e in block} == {f"train_{i:05d}"}
        assert all(set(e) == {"image", "caption", "image_id"} for e in block)
        assert all(isinstance(e["caption"], str) and e["caption"] for e in block)
    for split in ("val", "test"):
        entries = _load(small, split)
        assert [e["image"] for e in entries] == [f"images/{split}/{i:05d}.png" for i in range(4)]
        for e in entries:
            assert set(e) == {"image", "caption"}
            assert len(e["caption"]) == 5 and all(isinstance(c, str) for c in e["caption"])
    for split in ("train", "val", "test"):
        for image in {e["image"] for e in _load(small, split)}:
            with Image.open(small / image) as im:
                assert im.format == "PNG" and im.mode == "RGB" and im.size == (32, 32)
    meta = json.loads((small / "shapes_meta.json").read_text())
    assert meta["seed"] == 0 and meta["num_train"] == 12 and meta["image_px"] == 32
    assert isinstance(meta["format_version"], int)


def test_deterministic(tmp_path, small):
    again = ensure_shapes(tmp_path / "again", seed=0, **SMALL)
    assert _files(again) == _files(small)
    other = ensure_shapes(tmp_path / "other", seed=1, **SMALL)
    pngs = [k for k in _files(small) if k.endswith(".png")]
    assert all(_files(other)[k] != _files(small)[k] for k in pngs)


def test_val_test_independent_of_num_train(tmp_path, small):
    bigger = ensure_shapes(tmp_path / "bigger", seed=0, **{**SMALL, "num_train": 20})
    a, b = _files(small), _files(bigger)
    for key in a:
        if "/val/" in key or "/test/" in key or key.endswith(("_val.json", "_test.json")):
            assert a[key] == b[key], key


def test_idempotent_and_other_settings(tmp_path):
    root = ensure_shapes(tmp_path / "ds", seed=0, **SMALL)
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert ensure_shapes(str(root), seed=0, **SMALL) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamps
    with pytest.raises(ValueError, match=re.escape(str(root))) as err:
        ensure_shapes(root, seed=0, **{**SMALL, "num_train": 13})
    assert "\n" not in str(err.value) and "num_train" in str(err.value)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamps


def test_interrupted_run_is_regenerated(tmp_path, small):
    root = tmp_path / "ds"
    (root / "images" / "train").mkdir(parents=True)
    (root / "images" / "train" / "00000.png").write_bytes(b"half a png")
    (root / "annotations").mkdir()
    (root / "annotations" / "shapes_train.json").write_text("[")
    ensure_shapes(root, seed=0, **SMALL)
    assert _files(root) == _files(small)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temporary folder left


def test_refuses_to_delete_unrelated_folder(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="pass another folder"):
        ensure_shapes(root, **SMALL)
    assert (root / "notes.txt").read_text() == "keep me"


def test_json_captions_match_records(small):
    for split, n in (("train", 12), ("val", 4), ("test", 4)):
        entries = _load(small, split)
        for i in range(n):
            _, captions = make_example(0, split, i)
            got = ([e["caption"] for e in entries[5 * i: 5 * i + 5]] if split == "train"
                   else entries[i]["caption"])
            assert got == captions


def test_captions_name_the_objects():
    for index in range(300):
        _check_captions(*make_example(7, "train", index))


def _check_captions(scene, captions):
    words = [_words(c) for c in captions]
    assert len(set(captions)) == 5
    assert all(len(c.split()) <= 32 for c in captions)
    assert 1 <= len(scene.objects) <= 3
    everything = set().union(*words)
    for obj in scene.objects:
        assert obj.colour in allowed_colours(scene.background)
        # every caption names each object by colour or shape ...
        assert all(obj.colour in w or obj.shape in w for w in words), captions
        # ... and together the captions name all of its attributes
        assert {obj.colour, obj.shape, obj.size} <= everything
        for word in obj.position.split():  # "center" may be worded "middle"
            assert word in everything or (word == "center" and "middle" in everything)
    assert set(scene.background.split()) <= everything


def test_vocabularies_and_describe():
    assert len(SHAPES) >= 7 and len(COLOURS) >= 8 and len(BACKGROUNDS) >= 4 and len(SIZES) >= 2
    assert all(len(allowed_colours(bg)) >= 6 for bg in BACKGROUNDS)
    rng = np.random.default_rng(3)
    scene = sample_scene(rng)
    first = describe(scene.objects, scene.background, np.random.default_rng(5))
    assert describe(scene.objects, scene.background, np.random.default_rng(5)) == first
    assert len(first) == 5


def test_png_round_trip_has_noise(small):
    with Image.open(small / "images" / "val" / "00000.png") as im:
        pixels = np.asarray(im)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # not a flat drawing
    assert not os.path.exists(str(small) + f".tmp-{os.getpid()}")
