"""Frozen-encoder features of a large data set, on disk, one part per input shard.

A store is a folder:

- `identity.json`: the encoder identity (a dict the caller gives: encoder names, weights digest, image size,
  ...), written by the first process that writes a part; every later writer and reader must ask for the same.
- per part `<name>.image.npy` [rows, d_image] and `<name>.text.npy` [rows, d_text], float32, then
  `<name>.keys.json` (written last, so its presence marks a finished part): the identity, the sample keys in
  row order, the shard, the row count, the dims, what was skipped and a SHA-256 of each array.
- `store.json`, written last of all (`merge_index`): the identity, the dims, the total rows, the parts in order
  with their rows and shards, and the skipped counts summed.

Every file is written under a temporary name and renamed (utils/io.py): a killed extraction leaves whole parts
only, which a new run reuses (`part_done`). Reading (`open`) maps each part's arrays (np.load with mmap_mode)
only when rows of it are asked for, and keeps a bounded number of them mapped, so that a store far larger than
memory is read in chunks.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from utils.cli import UserError, os_error_reason
from utils.io import atomic_write, atomic_write_json, read_json_if_present, remove_stale_temporaries

STORE_FORMAT = "vl-distill/feature-store"
PART_FORMAT = "vl-distill/feature-part"
VERSION = 1
INDEX = "store.json"
IDENTITY = "identity.json"
MAPPED_PARTS = 32  # arrays kept mapped at once per view (each holds a file descriptor)
_TAR_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tar")


def _normal(identity: dict) -> dict:
    """`identity` as JSON gives it back (tuples as lists, keys as strings), so that a stored one compares equal."""
    if not isinstance(identity, dict) or not identity:
        raise ValueError("the encoder identity must be a non-empty dict (encoder names, weights digest, ...)")
    return json.loads(json.dumps(identity, sort_keys=True))


def _describe(identity: dict, fields: list[str]) -> str:
    return ", ".join(f"{name}={json.dumps(identity.get(name, None))}" for name in fields)


def identity_mismatch(folder: Path, found: dict, asked: dict) -> UserError:
    """The error for a store (or one of its parts) made by another encoder: the fields that differ, both ways."""
    fields = sorted(name for name in {*found, *asked} if found.get(name) != asked.get(name))
    return UserError(f"the feature cache in {folder} was made by encoder {_describe(found, fields)}, not "
                     f"{_describe(asked, fields)}; use another folder or delete it")


def part_names(shards: Sequence[str]) -> list[str]:
    """A file-name-safe part name per shard: its name without folder and tar suffix, or, where two shards in
    different folders share that name, the name followed by a digest of the folder (the same on every rank)."""
    stems = []
    for shard in shards:
        name = Path(shard).name
        for suffix in _TAR_SUFFIXES:
            if name.lower().endswith(suffix) and len(name) > len(suffix):
                name = name[: -len(suffix)]
                break
        stems.append(re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "part")
    names = []
    for shard, stem in zip(shards, stems):
        if stems.count(stem) > 1:
            folder = os.path.abspath(os.path.dirname(str(shard)))
            stem = f"{stem}-{hashlib.sha1(folder.encode()).hexdigest()[:8]}"
        names.append(stem)
    repeated = [name for name in names if names.count(name) > 1]
    if repeated:
        raise UserError(f"two shards would share the feature part {repeated[0]}: is a shard named twice?")
    return names


def _npy_header(path: Path) -> tuple[tuple, np.dtype]:
    """(shape, dtype) of a .npy file from its header alone; a UserError naming the file when it has none."""
    try:
        with open(path, "rb") as handle:
            major, _ = np.lib.format.read_magic(handle)
            reader = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = reader(handle)
    except FileNotFoundError:
        raise UserError(f"feature file not found: {path}; run the extraction again") from None
    except OSError as err:
        raise UserError(f"feature file {path} cannot be read: {os_error_reason(err)}") from None
    except ValueError as err:
        raise UserError(f"feature file {path} is not a .npy array ({err}); delete it and run the extraction "
                        f"again") from None
    if fortran:
        raise UserError(f"feature file {path} is stored in column order; this store writes row order")
    return tuple(shape), dtype


def _check_array_file(path: Path, rows: int, dim: int | None) -> int:
    """The width of the float32 [rows, d] array in `path` (d must equal `dim` when given, unless rows is 0)."""
    shape, dtype = _npy_header(path)
    if dtype != np.float32:
        raise UserError(f"feature file {path} holds {dtype} values, not float32; delete it and run the extraction "
                        f"again")
    if len(shape) != 2 or shape[0] != rows or (dim is not None and rows and shape[1] != dim):
        expected = f"({rows}, {dim})" if dim is not None else f"({rows}, d)"
        raise UserError(f"feature file {path} has shape {shape}, not {expected} as its part says; delete the part "
                        f"and run the extraction again")
    return shape[1]


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _as_rows(values, rows: int, what: str, name: str) -> np.ndarray:
    array = np.asarray(values.detach().cpu().float().numpy() if hasattr(values, "detach") else values)
    if rows == 0 and array.size == 0:
        return np.zeros((0, array.shape[1] if array.ndim == 2 else 0), dtype=np.float32)
    if array.ndim != 2 or array.shape[0] != rows:
        raise ValueError(f"the {what} features of part {name} have shape {array.shape}, not ({rows}, d)")
    return np.ascontiguousarray(array, dtype=np.float32)


class FeatureStore:
    """A feature folder for one encoder identity: finished parts, writing a part, the index, reading.

    A folder (its identity.json or store.json) made by another encoder is refused at once, with a message that
    names the fields that differ."""

    def __init__(self, folder, identity: dict):
        self.folder = Path(folder)
        self.identity = _normal(identity)
        if self.folder.exists() and not self.folder.is_dir():
            raise UserError(f"the feature cache {self.folder} is a file, not a folder")
        for name in (IDENTITY, INDEX):
            found = read_json_if_present(self.folder / name)
            if found is not None:
                self._check_identity(found, self.folder / name)
        if self.folder.is_dir():
            remove_stale_temporaries(self.folder)
        self._claimed = False

    def _check_identity(self, document, path: Path) -> None:
        if not isinstance(document, dict) or not isinstance(document.get("identity"), dict):
            raise UserError(f"{path} is not a file of a feature store; use another folder or delete it")
        if document["identity"] != self.identity:
            raise identity_mismatch(self.folder, document["identity"], self.identity)

    def paths(self, name: str) -> tuple[Path, Path, Path]:
        """(image array, text array, keys file) of the part `name`."""
        return (self.folder / f"{name}.image.npy", self.folder / f"{name}.text.npy",
                self.folder / f"{name}.keys.json")

    def _claim(self) -> None:
        """Create the folder and its identity.json (the first writer wins; the others check against it)."""
        if self._claimed:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"the feature cache {self.folder} cannot be created: {os_error_reason(err)}") from None
        document = {"format": STORE_FORMAT, "version": VERSION, "identity": self.identity}
        text = json.dumps(document, indent=2, sort_keys=True) + "\n"
        try:
            atomic_write(self.folder / IDENTITY, lambda tmp: tmp.write_text(text), overwrite=False)
        except FileExistsError:
            self._check_identity(read_json_if_present(self.folder / IDENTITY), self.folder / IDENTITY)
        self._claimed = True

    def part_info(self, name: str) -> dict | None:
        """The keys file of part `name` (None when absent), checked against this store's identity."""
        path = self.paths(name)[2]
        document = read_json_if_present(path)
        if document is None:
            return None
        if not isinstance(document, dict) or document.get("format") != PART_FORMAT \
                or not isinstance(document.get("keys"), list) or not isinstance(document.get("rows"), int):
            raise UserError(f"{path} is not the keys file of a feature part; delete it and run the extraction again")
        if document.get("identity") != self.identity:
            raise identity_mismatch(self.folder, document.get("identity") or {}, self.identity)
        if len(document["keys"]) != document["rows"]:
            raise UserError(f"{path} lists {len(document['keys'])} keys for {document['rows']} rows; delete it and "
                            f"run the extraction again")
        return document

    def part_done(self, name: str) -> bool:
        """Whether part `name` is finished: its keys file and both arrays are there and agree. A part made by
        another encoder is an error; an incomplete one (an array deleted, say) is done again, with a note."""
        info = self.part_info(name)
        if info is None:
            return False
        image_path, text_path, _ = self.paths(name)
        try:
            _check_array_file(image_path, info["rows"], info.get("image_dim"))
            _check_array_file(text_path, info["rows"], info.get("text_dim"))
        except UserError as err:
            print(f"note: feature part {name} is incomplete ({str(err).split(';')[0]}); computing it again")
            return False
        return True

    def write_part(self, name: str, keys: Sequence[str], image_feats, text_feats, info: dict | None = None) -> int:
        """Write part `name`: the two float32 arrays (row i is sample keys[i]), then its keys file; returns the row
        count. `info` may give "shard" (its path) and "skipped" ({kind: count}); anything else is kept under
        "info". Non-finite features are a UserError naming the sample."""
        info = dict(info or {})
        keys = [str(key) for key in keys]
        if len(set(keys)) != len(keys):
            raise ValueError(f"part {name} lists a key twice")
        image = _as_rows(image_feats, len(keys), "image", name)
        text = _as_rows(text_feats, len(keys), "text", name)
        shard = info.pop("shard", None)
        for what, array in (("image", image), ("text", text)):
            finite = np.isfinite(array).all(axis=1)
            if not finite.all():
                row = int(np.flatnonzero(~finite)[0])
                where = f" of shard {shard}" if shard else ""
                raise UserError(f"the {what} features of sample {keys[row]}{where} hold NaN or infinite values "
                                f"({int((~finite).sum())} of {len(keys)} samples); the encoder failed on them")
        self._claim()
        image_path, text_path, keys_path = self.paths(name)
        for path, array in ((image_path, image), (text_path, text)):
            atomic_write(path, lambda tmp, array=array: _save_npy(tmp, array))
        document = {"format": PART_FORMAT, "version": VERSION, "identity": self.identity, "name": name,
                    "shard": None if shard is None else str(shard), "rows": len(keys),
                    "image_dim": int(image.shape[1]), "text_dim": int(text.shape[1]),
                    "skipped": dict(info.pop("skipped", {}) or {}), "info": info,
                    "sha256": {"image": _digest(image), "text": _digest(text)}, "keys": keys}
        atomic_write_json(document, keys_path)
        return len(keys)

    def merge_index(self, part_names: Sequence[str]) -> dict:
        """Check every part (present, this identity, arrays of the stated shapes, one dim throughout) and write
        store.json listing them in the given order; returns the index. Run by one process (rank 0) once all
        parts are written."""
        part_names = list(part_names)
        if len(set(part_names)) != len(part_names):
            raise ValueError("a part is named twice")
        parts, skipped = [], {}
        dims: dict[str, int | None] = {"image": None, "text": None}
        for name in part_names:
            info = self.part_info(name)
            if info is None:
                raise UserError(f"feature part {name} is missing ({self.paths(name)[2]} not found); run the "
                                f"extraction again")
            for what, path in zip(("image", "text"), self.paths(name)[:2]):
                width = _check_array_file(path, info["rows"], dims[what])
                if info["rows"]:
                    dims[what] = width
            parts.append({"name": name, "rows": info["rows"], "shard": info.get("shard")})
            for kind, count in (info.get("skipped") or {}).items():
                skipped[kind] = skipped.get(kind, 0) + count
        index = {"format": STORE_FORMAT, "version": VERSION, "identity": self.identity,
                 "image_dim": dims["image"] or 0, "text_dim": dims["text"] or 0,
                 "rows": sum(part["rows"] for part in parts), "parts": parts, "skipped": skipped}
        self._claim()
        atomic_write_json(index, self.folder / INDEX)
        return index

    def open(self) -> StoreView:
        """The finished store, read lazily (see StoreView); a missing index, part or array file, a shape or dtype
        other than the index says, or another encoder's store is a UserError naming the file."""
        index = read_json_if_present(self.folder / INDEX)
        if index is None:
            raise UserError(f"{self.folder} holds no {INDEX}: the feature extraction did not finish; run it again")
        self._check_identity(index, self.folder / INDEX)
        fields = {"parts": list, "image_dim": int, "text_dim": int, "rows": int}
        if any(not isinstance(index.get(name), kind) for name, kind in fields.items()) or any(
                not isinstance(part, dict) or not isinstance(part.get("rows"), int) or "name" not in part
                for part in index["parts"]):
            raise UserError(f"{self.folder / INDEX} is not a feature store index; delete it and run the extraction "
                            f"again")
        for part in index["parts"]:
            image_path, text_path, keys_path = self.paths(part["name"])
            if not keys_path.is_file():
                raise UserError(f"{keys_path}, listed in {self.folder / INDEX}, is missing; run the extraction again")
            _check_array_file(image_path, part["rows"], index["image_dim"])
            _check_array_file(text_path, part["rows"], index["text_dim"])
        return StoreView(self, index)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:  # a handle: np.save would add ".npy" to the temporary name
        np.save(handle, array, allow_pickle=False)


class _Maps:
    """The memory maps of one kind of array, at most MAPPED_PARTS at a time (least recently used dropped)."""

    def __init__(self, paths: list[Path]):
        self.paths, self.open = paths, OrderedDict()

    def __call__(self, part: int) -> np.ndarray:
        if part in self.open:
            self.open.move_to_end(part)
            return self.open[part]
        try:
            array = np.load(self.paths[part], mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise UserError(f"feature file {self.paths[part]} cannot be read ({err}); run the extraction again") \
                from None
        self.open[part] = array
        if len(self.open) > MAPPED_PARTS:
            self.open.popitem(last=False)
        return array


class LazyRows:
    """The rows of every part, end to end, as one [rows, dim] float32 matrix that is never held in memory:
    indexing (an int, a slice, an array of indices or a boolean mask) and `chunks(size)` read only the rows
    asked for, and check them (NaN or infinity: a UserError naming the file)."""

    def __init__(self, paths: list[Path], offsets: np.ndarray, dim: int):
        self._maps, self._offsets, self.dim = _Maps(paths), offsets, dim
        self._paths = paths

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.dim)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32)

    def _checked(self, part: int, rows: np.ndarray, local) -> np.ndarray:
        """`rows` (read from part `part` at `local`: a slice or an array of row numbers) if all finite."""
        finite = np.isfinite(rows).all(axis=1)
        if not finite.all():
            first = int(np.flatnonzero(~finite)[0])
            row = local.start + first if isinstance(local, slice) else int(local[first])
            raise UserError(f"feature file {self._paths[part]} holds NaN or infinite values (row {row}); delete the "
                            f"part and run the extraction again")
        return rows

    def _part_of(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self._offsets, rows, side="right") - 1

    def _range(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((max(stop - start, 0), self.dim), dtype=np.float32)
        position = start
        while position < stop:
            part = int(self._part_of(np.array([position]))[0])
            begin, end = int(self._offsets[part]), int(self._offsets[part + 1])
            upto = min(stop, end)
            local = slice(position - begin, upto - begin)
            out[position - start: upto - start] = self._checked(part, np.asarray(self._maps(part)[local]), local)
            position = upto
        return out

    def _take(self, indices: np.ndarray) -> np.ndarray:
        total = len(self)
        indices = np.where(indices < 0, indices + total, indices)
        if indices.size and (indices.min() < 0 or indices.max() >= total):
            raise IndexError(f"row index out of range for {total} rows")
        out = np.empty((indices.size, self.dim), dtype=np.float32)
        parts = self._part_of(indices)
        for part in np.unique(parts):
            where = np.flatnonzero(parts == part)
            local = indices[where] - self._offsets[part]
            order = np.argsort(local, kind="stable")  # read each part's rows front to back
            rows = np.asarray(self._maps(int(part))[local[order]])
            out[where[order]] = self._checked(int(part), rows, local[order])
        return out

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, (int, np.integer)):
            position = int(index) + (len(self) if index < 0 else 0)
            if not 0 <= position < len(self):
                raise IndexError(f"row {index} out of range for {len(self)} rows")
            return self._range(position, position + 1)[0]
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step == 1:
                return self._range(start, stop)
            return self._take(np.arange(start, stop, step))
        indices = np.asarray(index)
        if indices.dtype == bool:
            if indices.shape != (len(self),):
                raise IndexError(f"a boolean mask of shape {indices.shape} for {len(self)} rows")
            indices = np.flatnonzero(indices)
        if indices.ndim != 1 or not (indices.size == 0 or np.issubdtype(indices.dtype, np.integer)):
            raise IndexError("index the rows with an int, a slice, a 1-d array of ints or a boolean mask")
        return self._take(indices.astype(np.int64))

    def chunks(self, size: int) -> Iterator[np.ndarray]:
        """The rows in order, `size` at a time (the last chunk may be shorter)."""
        if size < 1:
            raise ValueError("chunk size must be positive")
        for start in range(0, len(self), size):
            yield self._range(start, min(start + size, len(self)))


class StoreKeys(Sequence):
    """(part name, sample key) of every row, in row order; each part's keys file is read only when asked for
    (a few kept at once), so that millions of keys are not all held in memory."""

    def __init__(self, store: FeatureStore, names: list[str], offsets: np.ndarray):
        self._store, self._names, self._offsets = store, names, offsets
        self._cache: OrderedDict[int, list[str]] = OrderedDict()

    def part_keys(self, part: int) -> list[str]:
        if part not in self._cache:
            info = self._store.part_info(self._names[part])
            rows = int(self._offsets[part + 1] - self._offsets[part])
            if info is None or info["rows"] != rows:
                raise UserError(f"{self._store.paths(self._names[part])[2]} does not match {INDEX} (missing, or "
                                f"another row count); run the extraction again")
            self._cache[part] = info["keys"]
            if len(self._cache) > 4:
                self._cache.popitem(last=False)
        return self._cache[part]

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        position = int(index) + (len(self) if index < 0 else 0)
        if not 0 <= position < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows")
        part = int(np.searchsorted(self._offsets, position, side="right") - 1)
        return self._names[part], self.part_keys(part)[position - int(self._offsets[part])]

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for part, name in enumerate(self._names):
            if self._offsets[part + 1] > self._offsets[part]:
                yield from ((name, key) for key in self.part_keys(part))


class StoreView:
    """A finished store opened for reading: `image` and `text` (LazyRows), `keys` (StoreKeys), `parts` (the
    index's list: name, rows, shard), `part_rows(name)` (its row range), `identity`, `index`."""

    def __init__(self, store: FeatureStore, index: dict):
        self._store = store
        self.index = index
        self.identity = index["identity"]
        self.parts = index["parts"]
        names = [part["name"] for part in self.parts]
        self.offsets = np.concatenate([[0], np.cumsum([part["rows"] for part in self.parts])]).astype(np.int64)
        self.image = LazyRows([store.paths(name)[0] for name in names], self.offsets, index["image_dim"])
        self.text = LazyRows([store.paths(name)[1] for name in names], self.offsets, index["text_dim"])
        self.keys = StoreKeys(store, names, self.offsets)
        self._position = {name: i for i, name in enumerate(names)}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def verify(self, progress: bool = False) -> None:
        """Read every part whole, one at a time, and check it against the SHA-256 its keys file records (and for
        NaN or infinity): a UserError naming the first file that differs."""
        for part, entry in enumerate(tqdm(self.parts, desc="checking features", unit="part", disable=not progress)):
            info = self._store.part_info(entry["name"])
            if info is None:
                raise UserError(f"{self._store.paths(entry['name'])[2]}, listed in {INDEX}, is missing")
            for what, rows in (("image", self.image), ("text", self.text)):
                if not entry["rows"]:
                    continue
                array = rows._checked(part, np.asarray(rows._maps(part)), slice(0, entry["rows"]))
                if _digest(array) != info["sha256"][what]:
                    raise UserError(f"feature file {rows._paths[part]} differs from what was written (its SHA-256 "
                                    f"does not match {self._store.paths(entry['name'])[2].name}); delete the part and "
                                    f"run the extraction again")

    def part_rows(self, name: str) -> range:
        """The rows of part `name`."""
        part = self._position[name]
        return range(int(self.offsets[part]), int(self.offsets[part + 1]))
