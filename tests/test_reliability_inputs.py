"""Damaged inputs get one clear message (issue 16): images that do not decode, empty captions, a set judged
with another data set / text encoder / image encoder, broken learned step sizes, unwritable outputs."""
from __future__ import annotations

import io
import json
import math
import struct
import zlib

import pytest
import torch
from PIL import Image

import evaluate
from data import annotations
from data.annotations import read_split
from data.build import report_left_out
from data.datasets import load_rgb
from data.distilled_set import load_distilled_set
from utils.cli import UserError

QUIET = ("--num_workers", "0", "--progress", "False", "--wandb_mode", "disabled")


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header announcing `width` x `height` pixels (no pixel data behind it)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def truncated(path, fmt: str) -> bytes:
    """The image at `path` re-encoded as `fmt`, cut half way through its pixel data (the header stays whole)."""
    buffer = io.BytesIO()
    with Image.open(path) as image:
        image.convert("RGB").save(buffer, fmt)
    data = buffer.getvalue()
    pixels = data.index({"PNG": b"IDAT", "JPEG": b"\xff\xda"}[fmt])
    return data[:pixels + (len(data) - pixels) // 2]


def train_image(root, number: int):
    return root / "images" / "train" / f"{number:05d}.png"


def read_train(root, **kwargs):
    return read_split("shapes", "train", root / "annotations", root, **kwargs)


# ---- images -----------------------------------------------------------------------------------------


def test_a_decompression_bomb_is_named_not_a_traceback(dataset_copy):
    train_image(dataset_copy, 4).write_bytes(png_claiming(100_000, 100_000))
    with pytest.raises(UserError, match=r"00004\.png: too many pixels \(decompression bomb\).*--skip_bad_images"):
        read_train(dataset_copy)
    with pytest.raises(UserError, match=r"cannot read image .*00004\.png: too many pixels"):
        load_rgb(train_image(dataset_copy, 4))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_truncated_image_is_found_when_the_split_is_read(dataset_copy, fmt):
    path = train_image(dataset_copy, 7)
    path.write_bytes(truncated(path, fmt))
    with Image.open(path):  # the header alone looks fine: only decoding shows the damage
        pass
    with pytest.raises(UserError, match=r"cannot read image .*00007\.png: corrupt or truncated .*1 of the 40"):
        read_train(dataset_copy)


def test_load_rgb_turns_any_pil_error_into_a_named_user_error(tiny_shapes, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a 32x32 image is now more than twice the limit
    with pytest.raises(UserError, match=r"cannot read image .*00000\.png: too many pixels"):
        load_rgb(train_image(tiny_shapes, 0))


def test_skip_bad_images_leaves_out_every_kind_and_says_how_many(dataset_copy, capsys):
    train_image(dataset_copy, 1).unlink()
    train_image(dataset_copy, 2).write_text("caption text, not pixels")
    train_image(dataset_copy, 3).write_bytes(truncated(train_image(dataset_copy, 3), "PNG"))
    train_image(dataset_copy, 4).write_bytes(png_claiming(100_000, 100_000))
    with pytest.raises(UserError, match=r"image not found: .*00001\.png \(4 of the 40 images .*1 missing, 1 not an"):
        read_train(dataset_copy)
    split = read_train(dataset_copy, skip_bad_images=True)
    assert split.skipped == {"missing": 1, "not an image": 1, "corrupt or truncated": 1,
                             "too many pixels (decompression bomb)": 1}
    assert len(split.image_paths) == 36 and len(split.captions) == 180
    assert not {train_image(dataset_copy, n) for n in (1, 2, 3, 4)} & set(split.image_paths)
    for path in split.image_paths:  # what is left reads
        load_rgb(path)
    report_left_out(split, dataset_copy / "annotations" / "shapes_train.json")
    err = capsys.readouterr().err
    assert "left out 4 images listed in" in err and "1 corrupt or truncated, 1 missing, 1 not an image" in err


def test_images_that_decoded_are_not_decoded_again_until_they_change(dataset_copy, tmp_path, monkeypatch):
    real = annotations.image_problem
    checked = []
    monkeypatch.setattr(annotations, "image_problem", lambda path: checked.append(path.name) or real(path))
    read_train(dataset_copy, record_dir=tmp_path)
    assert len(checked) == 40
    checked.clear()
    read_train(dataset_copy, record_dir=tmp_path)
    assert checked == []
    train_image(dataset_copy, 5).write_bytes(truncated(train_image(dataset_copy, 5), "PNG"))
    with pytest.raises(UserError, match=r"00005\.png: corrupt or truncated"):
        read_train(dataset_copy, record_dir=tmp_path)
    assert checked == ["00005.png"]


def test_max_images_checks_only_the_images_it_keeps(dataset_copy):
    train_image(dataset_copy, 30).unlink()
    split = read_train(dataset_copy, max_images=7)
    assert len(split.image_paths) == 7 and len(split.captions) == 35


# ---- captions ---------------------------------------------------------------------------------------


def rewrite_captions(root, split: str, change) -> None:
    path = root / "annotations" / f"shapes_{split}.json"
    entries = json.loads(path.read_text())
    for k, entry in enumerate(entries):
        entry["caption"] = change(k, entry["caption"])
    path.write_text(json.dumps(entries))


def test_an_annotation_file_of_empty_captions_is_refused(dataset_copy):
    rewrite_captions(dataset_copy, "val", lambda k, captions: ["", " ... "] * (len(captions) // 2))
    with pytest.raises(UserError, match=r"shapes_val\.json: all its 4\d captions are empty"):
        read_split("shapes", "val", dataset_copy / "annotations", dataset_copy)


def test_empty_captions_are_left_out_with_a_warning(dataset_copy, capsys):
    # Image 2 loses all its captions, image 3 one of them.
    rewrite_captions(dataset_copy, "test", lambda k, captions: (
        [""] * len(captions) if k == 2 else ["!!"] + captions[1:] if k == 3 else captions))
    split = read_split("shapes", "test", dataset_copy / "annotations", dataset_copy)
    assert split.empty_captions == 6 and split.captionless_images == 1
    assert len(split.image_paths) == 9 and len(split.captions) == 44 and all(split.captions)
    assert all(split.img2txt) and dataset_copy / "images" / "test" / "00002.png" not in split.image_paths
    report_left_out(split, dataset_copy / "annotations" / "shapes_test.json")
    assert "warning: 6 captions in" in capsys.readouterr().err


# ---- evaluate.py ------------------------------------------------------------------------------------


class WorkStarted(Exception):
    pass


@pytest.fixture()
def no_work(monkeypatch):
    """Reading the data is the first piece of work evaluate.py does: reaching it raises WorkStarted."""
    def refuse(*args, **kwargs):
        raise WorkStarted
    monkeypatch.setattr(evaluate, "load_retrieval_data", refuse)


def test_another_image_encoder_is_named_in_the_result(run4, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert evaluate.main(["--distilled", str(run4 / "distilled_000004.pt"), "--image_encoder", "convnet_w32",
                          "--num_eval", "1", "--epoch_eval_train", "1", *QUIET, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["image_encoder"] == "convnet_w32" and report["label"].endswith("on convnet_w32")
    assert report["config"]["image_encoder_of_set"] == "convnet"
    printed = capsys.readouterr().out
    assert "1 x convnet_w32 (the set was made with convnet)" in printed and "on convnet_w32 (test)" in printed


@pytest.mark.parametrize("flags, message", [
    (("--dataset", "flickr8k"), r"made from --dataset shapes, but this run asks for --dataset flickr8k"),
    (("--text_encoder", "bert"), r"embeddings of text model minilm-.*, but this run would embed the captions with bert"),
])
def test_another_data_set_or_text_encoder_is_refused(run4, no_work, flags, message):
    with pytest.raises(UserError, match=message):
        evaluate.main(["--distilled", str(run4 / "distilled_last.pt"), *QUIET, *flags])


@pytest.mark.parametrize("name, value", [("syn_lr_img", 0.0), ("syn_lr_txt", -0.01), ("syn_lr_img", math.nan)])
def test_a_broken_learned_step_size_is_refused_before_any_work(run4, tmp_path, no_work, name, value):
    payload = load_distilled_set(run4 / "distilled_last.pt")
    path = tmp_path / "broken.pt"
    torch.save({**payload, name: value}, path)  # as a diverged run (or another program) could have left it
    with pytest.raises(UserError, match=rf"broken\.pt has {name} {value!r}, not a finite positive step size"):
        evaluate.main(["--distilled", str(path), *QUIET])


@pytest.mark.parametrize("given", [("--lr_eval", "0.05"), ("--lr_grid", "0.01", "0.1")])
def test_a_given_evaluation_rate_makes_the_learned_one_irrelevant(run4, tmp_path, no_work, given):
    """With the rate given, a set whose learned step sizes are NaN and 0 loads and the work starts."""
    payload = load_distilled_set(run4 / "distilled_last.pt")
    path = tmp_path / "broken.pt"
    torch.save({**payload, "syn_lr_img": math.nan, "syn_lr_txt": 0.0}, path)
    with pytest.raises(WorkStarted):
        evaluate.main(["--distilled", str(path), *QUIET, *given])
    with pytest.raises(UserError, match="syn_lr_img nan and syn_lr_txt 0.0, not a finite positive"):
        evaluate.main(["--distilled", str(path), *QUIET])


@pytest.mark.parametrize("target, flag", [(("--full",), "--out"), (("--coreset", "random", "--coreset_size", "4"),
                                                                     "--coreset_file")])
def test_an_unwritable_output_is_refused_before_any_work(tiny_shapes, cache_dir, tmp_path, no_work, target, flag):
    from conftest import tiny_flags

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    outputs = {"--out": str(tmp_path / "out.json"), "--coreset_file": str(tmp_path / "set.pt"),
               flag: str(blocker / "inside.x")}
    with pytest.raises(UserError, match=rf"{flag} .*a_file is a file, not a folder"):
        evaluate.main(tiny_flags(tiny_shapes, cache_dir, *target, *[x for item in outputs.items() for x in item]))
    assert not (tmp_path / "out.json").exists()
