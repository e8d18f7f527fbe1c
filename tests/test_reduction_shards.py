"""Large-data input for reduction/: webdataset tar shards, the on-disk feature store, and the extraction loop
(resumed after a kill, and over two torchrun processes)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reduction.extract import extract_features
from reduction.feature_store import FeatureStore, part_names
from reduction.shards import (EMPTY_CAPTION, NO_CAPTION, NO_IMAGE, UNDECODABLE_IMAGE, expand_shards, iter_shard,
                              read_kept_keys, shard_samples, write_kept_keys, write_shards)
from utils.errors import UserError

REPO = Path(__file__).resolve().parents[1]
IDENTITY = {"image_encoder": "mean-colour", "text_encoder": "sha256", "image_size": 8}


def encoded(colour, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format=fmt)
    return buffer.getvalue()


def make_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A tar file holding each sample's members (`key.ext`) in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as archive:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size, info.mtime = len(data), 1_700_000_000
                archive.addfile(info, io.BytesIO(data))
    return path


def pair(key: str, colour, caption: str, fmt: str = "png", meta: dict | None = None):
    members = {fmt: encoded(colour, "JPEG" if fmt == "jpg" else "PNG"), "txt": caption.encode()}
    if meta is not None:
        members["json"] = json.dumps(meta).encode()
    return key, members


def shard_set(folder: Path, count: int = 4, per_shard: int = 3) -> list[str]:
    """`count` shards of `per_shard` pairs each (one JPEG per shard, a json on every first pair)."""
    shards = []
    for s in range(count):
        samples = [pair(f"{s:03d}{i:03d}", (40 * s, 20 * i, 100), f"shard {s} picture {i}",
                        fmt="jpg" if i == 1 else "png", meta={"url": f"http://x/{s}/{i}"} if i == 0 else None)
                   for i in range(per_shard)]
        shards.append(str(make_shard(folder / f"{s:05d}.tar", samples)))
    return shards


class Encoders:
    """Fake frozen encoders (mean colour; caption hash) that count their calls and can fail after some."""

    def __init__(self, fail_after: int | None = None):
        self.image_calls = self.text_calls = 0
        self.fail_after = fail_after

    def images(self, images) -> np.ndarray:
        self.image_calls += 1
        if self.fail_after is not None and self.image_calls > self.fail_after:
            raise KeyboardInterrupt  # the run is killed here
        return np.stack([np.tile(np.asarray(im, dtype=np.float32).mean(axis=(0, 1)) / 255, 2) for im in images])

    def texts(self, captions) -> np.ndarray:
        self.text_calls += 1
        return np.stack([np.frombuffer(hashlib.sha256(c.encode()).digest()[:4], dtype=np.uint8).astype(np.float32)
                         for c in captions])


def run(shards, folder, encoders=None, **options):
    encoders = encoders or Encoders()
    options = {"batch_size": 2, "progress": False, **options}
    return extract_features(shards, FeatureStore(folder, IDENTITY), encoders.images, encoders.texts, **options)


def store_files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if not path.name.startswith(".")}


def test_expand_shards_reads_braces_and_names_the_missing_shard(tmp_path):
    shards = shard_set(tmp_path / "data", count=3, per_shard=1)
    assert expand_shards(str(tmp_path / "data" / "{00000..00002}.tar")) == shards
    assert expand_shards(f"{shards[0]}::{tmp_path}/data/{{00001,00002}}.tar") == shards
    with pytest.raises(UserError, match=r"2 of the 5 shards .* the first: .*00003\.tar \(not found\)"):
        expand_shards(str(tmp_path / "data" / "{00000..00004}.tar"))
    with pytest.raises(UserError, match="unbalanced braces"):
        expand_shards(str(tmp_path / "data" / "{00000..00002.tar"))
    with pytest.raises(UserError, match="more than once"):
        expand_shards(f"{shards[0]}::{shards[0]}")


def test_iter_shard_gives_the_pairs_in_order(tmp_path):
    shard = make_shard(tmp_path / "a.tar", [pair("b07", (255, 0, 0), " A red square \n", meta={"w": 8}),
                                            pair("a01", (0, 0, 255), "a blue one", fmt="jpg"),
                                            ("sub/c", {"PNG": encoded((0, 255, 0)), "txt": b"green",
                                                       "cls": b"3"})])
    samples = list(iter_shard(shard))
    assert [(s.key, s.image_ext, s.caption, s.meta) for s in samples] == [
        ("b07", "png", "A red square", {"w": 8}), ("a01", "jpg", "a blue one", None), ("sub/c", "png", "green", None)]
    assert Image.open(io.BytesIO(samples[0].image_bytes)).getpixel((0, 0)) == (255, 0, 0)
    assert shard_samples(shard) == ["b07", "a01", "sub/c"]


def test_a_truncated_shard_is_an_error_naming_the_shard_and_the_last_good_key(tmp_path):
    shard = Path(shard_set(tmp_path, count=1, per_shard=3)[0])
    whole = shard.read_bytes()
    with tarfile.open(shard) as archive:
        members = archive.getmembers()
    third_image = members[5]  # 000000.png, .txt, .json, 000001.jpg, .txt, 000002.png
    for cut, last in ((third_image.offset_data + 10, "000001"), (third_image.offset, "000000"),  # 000001 may lack a member
                      (members[1].offset_data + 5, None)):
        shard.write_bytes(whole[:cut])
        after = f"after sample {last}" if last else "before its first sample"
        with pytest.raises(UserError, match=rf"shard {shard} is truncated or damaged {after}"):
            list(iter_shard(shard))
    shard.write_bytes(b"not a tar file at all" * 40)
    with pytest.raises(UserError, match="is not a tar file"):
        list(iter_shard(shard))


def test_a_sample_without_caption_or_image_is_named_or_skipped_and_counted(tmp_path):
    shard = make_shard(tmp_path / "a.tar", [pair("k1", (1, 2, 3), "fine"),
                                            ("k2", {"png": encoded((0, 0, 0))}),
                                            ("k3", {"txt": b"a caption, no image", "json": b"{}"}),
                                            pair("k4", (1, 2, 3), " ... "),
                                            pair("k5", (9, 9, 9), "fine too")])
    with pytest.raises(UserError, match=rf"sample k2 in shard {shard} has no caption"):
        list(iter_shard(shard))
    no_caption = make_shard(tmp_path / "b.tar", [("k3", {"txt": b"text", "json": b"{}"})])
    with pytest.raises(UserError, match=rf"sample k3 in shard {no_caption} has no image"):
        list(iter_shard(no_caption))
    counts: dict = {}
    assert [s.key for s in iter_shard(shard, skip_bad=True, counts=counts)] == ["k1", "k5"]
    assert counts == {NO_CAPTION: 1, NO_IMAGE: 1, EMPTY_CAPTION: 1}


def test_an_undecodable_image_is_named_or_skipped_by_the_extraction(tmp_path):
    shard = make_shard(tmp_path / "a.tar", [pair("k1", (1, 2, 3), "fine"),
                                            ("k2", {"jpg": encoded((5, 5, 5), "JPEG")[:40], "txt": b"cut"}),
                                            pair("k3", (9, 9, 9), "fine too")])
    with pytest.raises(UserError, match=rf"the image of sample k2 in shard {shard} cannot be decoded"):
        run([str(shard)], tmp_path / "store")
    summary = run([str(shard)], tmp_path / "store", skip_bad=True)
    assert summary.skipped == {UNDECODABLE_IMAGE: 1} and summary.samples == 2
    view = FeatureStore(tmp_path / "store", IDENTITY).open()
    assert list(view.keys) == [("a", "k1"), ("a", "k3")] and view.index["skipped"] == {UNDECODABLE_IMAGE: 1}


def test_the_feature_store_gives_back_what_was_written(tmp_path):
    rng = np.random.default_rng(0)
    store = FeatureStore(tmp_path / "store", IDENTITY)
    parts = {"p0": 3, "p1": 0, "p2": 5, "p3": 2}
    images = {name: rng.normal(size=(rows, 6)).astype(np.float32) for name, rows in parts.items()}
    texts = {name: rng.normal(size=(rows, 4)).astype(np.float32) for name, rows in parts.items()}
    for name, rows in parts.items():
        assert not store.part_done(name)
        store.write_part(name, [f"{name}-{i}" for i in range(rows)],
                         images[name] if rows else np.zeros((0, 0)), texts[name] if rows else np.zeros((0, 0)),
                         {"shard": f"/data/{name}.tar", "skipped": {"no image": 1}})
        assert store.part_done(name)
    index = store.merge_index(list(parts))
    assert (index["rows"], index["image_dim"], index["text_dim"]) == (10, 6, 4)
    assert index["skipped"] == {"no image": 4} and [p["shard"] for p in index["parts"]][0] == "/data/p0.tar"

    view = FeatureStore(tmp_path / "store", IDENTITY).open()
    image = np.concatenate([images[n] for n in parts])
    text = np.concatenate([texts[n] for n in parts])
    assert len(view) == len(view.image) == 10 and view.image.shape == (10, 6) and view.text.shape == (10, 4)
    assert np.array_equal(view.image[:], image) and np.array_equal(view.text[2:9], text[2:9])
    picks = np.array([9, 0, 4, 3, -1, 4])
    assert np.array_equal(view.image[picks], image[picks]) and np.array_equal(view.text[::3], text[::3])
    mask = np.arange(10) % 2 == 0
    assert np.array_equal(view.image[mask], image[mask]) and np.array_equal(view.image[7], image[7])
    assert np.array_equal(np.concatenate(list(view.text.chunks(4))), text)
    assert [len(chunk) for chunk in view.image.chunks(4)] == [4, 4, 2]
    assert view.keys[3] == ("p2", "p2-0") and view.keys[-1] == ("p3", "p3-1") and len(list(view.keys)) == 10
    assert list(view.part_rows("p2")) == [3, 4, 5, 6, 7]
    assert part_names(["/a/00001.tar", "/b/00001.tar", "/a/x y.tar.gz"])[2] == "x_y"
    assert len(set(part_names(["/a/00001.tar", "/b/00001.tar"]))) == 2


def test_a_store_of_another_encoder_is_refused(tmp_path):
    store = FeatureStore(tmp_path / "store", IDENTITY)
    store.write_part("p0", ["k"], np.ones((1, 3)), np.ones((1, 2)), {"shard": "x.tar"})
    other = {**IDENTITY, "image_encoder": "vit"}
    message = (rf"the feature cache in {tmp_path / 'store'} was made by encoder image_encoder=\"mean-colour\", not "
               r"image_encoder=\"vit\"; use another folder or delete it")
    with pytest.raises(UserError, match=message):
        FeatureStore(tmp_path / "store", other)
    (tmp_path / "store" / "identity.json").unlink()  # a part alone still says who made it
    with pytest.raises(UserError, match=message):
        FeatureStore(tmp_path / "store", other).part_done("p0")
    store.merge_index(["p0"])
    (tmp_path / "store" / "identity.json").unlink(missing_ok=True)  # the index alone says it too
    with pytest.raises(UserError, match=message):
        FeatureStore(tmp_path / "store", other)


def test_a_damaged_store_is_an_error_naming_the_file(tmp_path):
    folder = tmp_path / "store"
    store = FeatureStore(folder, IDENTITY)
    for name in ("p0", "p1"):
        store.write_part(name, ["a", "b"], np.ones((2, 3)), np.ones((2, 2)), {"shard": f"{name}.tar"})
    store.merge_index(["p0", "p1"])
    saved = store_files(folder)

    with pytest.raises(UserError, match="holds no store.json"):
        FeatureStore(tmp_path / "empty", IDENTITY).open()
    (folder / "p1.image.npy").unlink()
    with pytest.raises(UserError, match=rf"feature file not found: {folder / 'p1.image.npy'}"):
        store.open()
    assert not store.part_done("p1")  # done again by the next extraction
    with pytest.raises(UserError, match=r"feature part p2 is missing"):
        store.merge_index(["p0", "p2"])

    np.save(folder / "p1.image.npy", np.ones((3, 3), dtype=np.float32))
    with pytest.raises(UserError, match=rf"{folder / 'p1.image.npy'} has shape \(3, 3\), not \(2, 3\)"):
        store.open()
    np.save(folder / "p1.image.npy", np.ones((2, 3)))
    with pytest.raises(UserError, match=rf"{folder / 'p1.image.npy'} holds float64 values, not float32"):
        store.open()
    nan = np.ones((2, 3), dtype=np.float32)
    nan[1, 2] = np.nan
    np.save(folder / "p1.image.npy", nan)
    view = store.open()
    assert np.array_equal(view.image[:2], np.ones((2, 3)))
    with pytest.raises(UserError, match=rf"{folder / 'p1.image.npy'} holds NaN"):
        view.verify()
    np.save(folder / "p1.image.npy", np.full((2, 3), 2, dtype=np.float32))
    with pytest.raises(UserError, match=rf"{folder / 'p1.image.npy'} differs from what was written"):
        store.open().verify()
    np.save(folder / "p1.image.npy", nan)
    with pytest.raises(UserError, match=rf"{folder / 'p1.image.npy'} holds NaN or infinite values \(row 1\)"):
        list(view.image.chunks(3))
    with pytest.raises(UserError, match="hold NaN or infinite values"):
        store.write_part("p9", ["x"], nan[1:], np.ones((1, 2)), {"shard": "p9.tar"})
    assert store_files(folder)["p0.keys.json"] == saved["p0.keys.json"]


def test_a_killed_extraction_reuses_its_finished_parts_and_ends_as_an_uninterrupted_one(tmp_path, capsys):
    shards = shard_set(tmp_path / "data", count=4, per_shard=3)  # 2 batches of 2 per shard
    whole = Encoders()
    run(shards, tmp_path / "whole", whole)
    assert whole.image_calls == 8 and whole.text_calls == 8

    killed = Encoders(fail_after=5)  # dies in the middle of the third shard
    with pytest.raises(KeyboardInterrupt):
        run(shards, tmp_path / "resumed", killed)
    assert sorted(p.name for p in (tmp_path / "resumed").glob("*.keys.json")) == ["00000.keys.json",
                                                                                   "00001.keys.json"]
    assert not (tmp_path / "resumed" / "store.json").exists()
    again = Encoders()
    summary = run(shards, tmp_path / "resumed", again)
    assert (summary.parts_reused, summary.parts_written, summary.samples) == (2, 2, 6)
    assert again.image_calls == 4 and "reusing 2 finished feature part(s) of 4" in capsys.readouterr().out
    assert store_files(tmp_path / "resumed") == store_files(tmp_path / "whole")

    finished = Encoders()
    assert run(shards, tmp_path / "resumed", finished).parts_reused == 4 and finished.image_calls == 0
    view = FeatureStore(tmp_path / "whole", IDENTITY).open()
    assert view.image.shape == (12, 6) and view.keys[4] == ("00001", "001001")
    assert np.allclose(view.image[0], np.tile(np.array([0, 0, 100]) / 255, 2))


def test_ranks_run_as_independent_jobs_write_the_index_once_every_part_is_there(tmp_path, capsys):
    """Without a process group (e.g. a job array given rank and world size), nothing waits for the other ranks."""
    shards = shard_set(tmp_path / "data", count=3, per_shard=1)
    first = run(shards, tmp_path / "store", rank=0, world_size=2)
    assert first.parts_written == 2 and first.index is None and "1 of 3 feature parts are not written yet" in \
        capsys.readouterr().out
    assert run(shards, tmp_path / "store", rank=1, world_size=2).index is None  # only rank 0 writes it
    last = run(shards, tmp_path / "store", rank=0, world_size=2)
    assert last.parts_reused == 2 and last.index["rows"] == 3
    run(shards, tmp_path / "whole")
    assert store_files(tmp_path / "store") == store_files(tmp_path / "whole")


def test_the_kept_samples_are_written_as_keys_and_as_shards_with_every_member(tmp_path):
    shards = shard_set(tmp_path / "data", count=3, per_shard=3)
    kept = {shards[0]: ["000000", "000002"], shards[2]: ["002001"]}
    listed = write_kept_keys(kept, tmp_path / "kept.json")
    assert json.loads(listed.read_text())["total"] == 3 and read_kept_keys(listed) == kept

    written = write_shards(shards, kept, tmp_path / "out")
    assert [p.name for p in written] == ["00000.tar", "00001.tar", "00002.tar"]

    def members(path) -> dict[str, bytes]:
        with tarfile.open(path) as archive:
            return {m.name: archive.extractfile(m).read() for m in archive.getmembers()}

    source = {name: data for shard in shards for name, data in members(shard).items()}
    out = members(written[0])
    assert list(out) == ["000000.png", "000000.txt", "000000.json", "000002.png", "000002.txt"]
    assert all(out[name] == source[name] for name in out)
    assert members(written[1]) == {} and list(members(written[2])) == ["002001.jpg", "002001.txt"]
    assert [s.key for s in iter_shard(written[0])] == ["000000", "000002"]

    packed = write_shards(shards, kept, tmp_path / "packed", samples_per_shard=2)
    assert [p.name for p in packed] == ["00000.tar", "00001.tar"]
    assert shard_samples(packed[0]) == ["000000", "000002"] and shard_samples(packed[1]) == ["002001"]
    with pytest.raises(UserError, match=rf"1 kept key\(s\) are not in shard {shards[1]}, e.g. nope"):
        write_shards(shards, {shards[1]: ["nope"]}, tmp_path / "bad")


def test_the_reduced_set_never_overwrites_an_input(tmp_path):
    shards = shard_set(tmp_path / "data", count=2, per_shard=1)
    before = {shard: Path(shard).read_bytes() for shard in shards}
    kept = {shards[0]: ["000000"]}
    with pytest.raises(UserError, match=rf"output folder {tmp_path / 'data'} holds the input shard"):
        write_shards(shards, kept, tmp_path / "data")
    with pytest.raises(UserError, match=rf"would overwrite the input shard {shards[1]}"):
        write_kept_keys({shards[0]: ["000000"], shards[1]: []}, shards[1])
    with pytest.raises(UserError, match="not among the 1 input shards"):
        write_shards(shards[:1], {shards[1]: ["000100"]}, tmp_path / "out")
    other = make_shard(tmp_path / "elsewhere" / "00000.tar", [pair("x", (0, 0, 0), "x")])
    with pytest.raises(UserError, match="would both be written as 00000.tar"):
        write_shards([shards[0], str(other)], kept, tmp_path / "out")
    assert {shard: Path(shard).read_bytes() for shard in shards} == before


@pytest.mark.distributed
def test_two_torchrun_processes_store_what_one_process_stores(tmp_path):
    shards = shard_set(tmp_path / "data", count=4, per_shard=3)
    worker = str(REPO / "tests" / "reduction_extract_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for variable in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(variable, None)
    commands = {"one": [sys.executable, worker, str(tmp_path / "one"), *shards],
                "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", worker,
                        str(tmp_path / "two"), *shards]}
    outputs = {}
    for name, command in commands.items():
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
        outputs[name] = done.stdout
    assert "rank 0: wrote 2, reused 0, index written" in outputs["two"]
    assert "rank 1: wrote 2, reused 0, index not written" in outputs["two"]
    one, two = store_files(tmp_path / "one"), store_files(tmp_path / "two")
    assert len(one) == 4 * 3 + 2 and one == two
