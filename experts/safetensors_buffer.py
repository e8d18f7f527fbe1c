"""Expert trajectories in safetensors: one file per expert, a JSON index, memory-mapped reading, conversion.

The layout (docs/file-formats.md), beside buffer_meta.json and instead of the .pt file pairs (a folder
holds one layout):
- `expert_<n>.safetensors`: every snapshot of expert n, the tensor `<part>/<t>/<e>/<i>` being parameter i
  (parameter order) of the image side (`image`) or text head (`text`) after epoch e (0: before training) of
  trajectory t of the file (buffer.py writes one; a converted reference file may hold several). The header's
  metadata names the format, the snapshots of each trajectory and the parameter names;
- `buffer_index.json`: per expert its file, trajectories, snapshots, parameter names and shapes and dtype,
  plus a copy of the buffer metadata. It is made from the files' headers and rewritten (atomically, under a
  lock) after every expert written: an expert counts once the index lists it, so an interrupted write never
  shows half of one, and a rerun of buffer.py lists what a killed run wrote but did not index.

Opening an expert reads its header only; the tensors of a snapshot are read when a trajectory is indexed,
from a fresh memory map of the file that lives as long as those tensors. So a reader holds the snapshots
it uses and nothing more: distill.py holds the segment it matches, not the trajectory, nor other experts.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from utils.cli import UserError, os_error_reason
from utils.io import (MAX_ABS_VALUE, as_float32, atomic_write, atomic_write_bytes, atomic_write_json,
                      staged_folder, tensor_problem)

INDEX_NAME = "buffer_index.json"
FILE_FORMAT = "vl-distill/expert-trajectories"  # in each file's header, under HEADER_KEY
HEADER_KEY = "vl-distill"
INDEX_FORMAT = "vl-distill/expert-index"
VERSION = 1
PARTS = {"image": "image_param_shapes", "text": "text_param_shapes"}  # part -> its shapes in buffer_meta.json
_FILE = re.compile(r"expert_(\d+)\.safetensors")
_LOCK = ".buffer_index.lock"
# safetensors' dtype codes: the floating ones are read (as float32), the others refused.
_FLOATS = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
           "F8_E5M2": "float8_e5m2"}
_OTHERS = {"I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32",
           "U16": "uint16", "U8": "uint8", "BOOL": "bool", "C64": "complex64"}


def file_name(number: int) -> str:
    return f"expert_{number}.safetensors"


def is_expert_file(path: Path) -> bool:
    return _FILE.fullmatch(Path(path).name) is not None


def tensor_name(part: str, trajectory: int, epoch: int, param: int) -> str:
    return f"{part}/{trajectory}/{epoch}/{param}"


def numbered_files(directory: Path) -> dict[int, Path]:
    """Every expert file in `directory` by number, listed in the index or not."""
    found = {}
    for path in Path(directory).glob("expert_*.safetensors"):
        match = _FILE.fullmatch(path.name)
        if match:
            found[int(match[1])] = path
    return found


def present(directory: Path) -> bool:
    """Whether `directory` holds experts in this layout (an index or an expert file)."""
    return (Path(directory) / INDEX_NAME).is_file() or bool(numbered_files(directory))


def parameter_names(meta: dict | None, part: str, count: int) -> list[str]:
    """The names of a part's `count` trainable parameters where buffer_meta.json gives them, else their indices."""
    names = meta.get(f"{part}_param_names") if isinstance(meta, dict) else None
    return list(names) if isinstance(names, list) and len(names) == count else [str(i) for i in range(count)]


# ---- writing ---------------------------------------------------------------------------------------------

def _check_trajectories_agree(image_trajectories: list, text_trajectories: list, path: Path) -> list[int]:
    """The snapshots of each trajectory (image and text must agree)."""
    snapshots = [len(t) for t in image_trajectories]
    if not snapshots or snapshots != [len(t) for t in text_trajectories]:
        raise UserError(f"cannot write {path}: its image and text trajectories disagree in number or length "
                        f"({snapshots} against {[len(t) for t in text_trajectories]} snapshots)")
    return snapshots


def write_expert(path: Path, image_trajectories: list, text_trajectories: list, meta: dict,
                 overwrite: bool = True) -> Path:
    """Write one expert's trajectories (each a list of snapshots, a snapshot a list of tensors) to `path`,
    atomically; tensors keep their dtype. With `overwrite=False` an existing file raises FileExistsError."""
    snapshots = _check_trajectories_agree(image_trajectories, text_trajectories, path)
    counts = {"image": len(image_trajectories[0][0]), "text": len(text_trajectories[0][0])}
    tensors, seen = {}, set()
    for part, trajectories in (("image", image_trajectories), ("text", text_trajectories)):
        for t, trajectory in enumerate(trajectories):
            for e, snapshot in enumerate(trajectory):
                for i, tensor in enumerate(snapshot):
                    tensor = tensor.detach().cpu().contiguous()
                    if tensor.untyped_storage().data_ptr() in seen:  # safetensors refuses shared memory
                        tensor = tensor.clone()
                    seen.add(tensor.untyped_storage().data_ptr())
                    tensors[tensor_name(part, t, e, i)] = tensor
    # One metadata entry: safetensors writes several in an order of its own, which would make equal experts
    # differ in their bytes.
    header = {HEADER_KEY: json.dumps({"format": FILE_FORMAT, "version": VERSION, "snapshots": snapshots,
                                      **{f"{part}_names": parameter_names(meta, part, counts[part])
                                         for part in PARTS}},
                                     sort_keys=True)}
    return atomic_write(path, partial(_save_file, tensors, header), overwrite=overwrite)


def _save_file(tensors: dict, header: dict, tmp: Path) -> None:
    """safetensors' save_file, keeping the mode the temporary file was made with (the umask's): safetensors
    makes its file readable by the owner only."""
    mode = tmp.stat().st_mode & 0o777
    save_file(tensors, tmp, metadata=header)
    os.chmod(tmp, mode)


def _dtype_name(code: str) -> str:
    return _FLOATS.get(code) or _OTHERS.get(code) or code.lower()


def _header(path: Path) -> dict:
    """What the header of expert file `path` says (no tensor data read): snapshots, names, shapes, dtypes."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            slices = {key: handle.get_slice(key) for key in handle.keys()}
            tensors = {key: (piece.get_shape(), piece.get_dtype()) for key, piece in slices.items()}
    except FileNotFoundError:
        raise UserError(f"buffer file not found: {path}") from None
    except Exception as err:  # safetensors raises its own error type for a damaged or foreign file
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise UserError(f"buffer file {path} is corrupt, truncated or not a safetensors file ({reason}); "
                        f"delete it and create it again") from None
    try:
        described = json.loads(metadata.get(HEADER_KEY, "null"))
    except ValueError:
        described = None
    if not isinstance(described, dict) or described.get("format") != FILE_FORMAT:
        raise UserError(f"buffer file {path} is not an expert file of this project (its header does not name the "
                        f"format {FILE_FORMAT!r})")
    snapshots = described.get("snapshots")
    names = {part: described.get(f"{part}_names") for part in PARTS}
    if not (isinstance(snapshots, list) and snapshots and all(type(s) is int for s in snapshots)
            and all(isinstance(n, list) for n in names.values())):
        raise UserError(f"buffer file {path}: its header's snapshots {snapshots!r} or parameter names are malformed")
    return {"snapshots": snapshots, "names": names, "tensors": tensors}


def _index_entry(path: Path) -> dict:
    """The index's description of expert file `path`, from its header."""
    header = _header(path)
    entry = {"file": path.name, "trajectories": len(header["snapshots"]), "snapshots": header["snapshots"]}
    for part, names in header["names"].items():
        firsts = [header["tensors"].get(tensor_name(part, 0, 0, i)) for i in range(len(names))]
        if None in firsts:
            raise UserError(f"buffer file {path} lacks a {part} tensor its header names")
        entry[part] = {"names": names, "shapes": [list(shape) for shape, _ in firsts]}
    dtypes = sorted({_dtype_name(code) for _, code in header["tensors"].values()})
    entry["dtype"] = dtypes[0] if len(dtypes) == 1 else dtypes
    return entry


def update_index(directory: Path, meta: dict | None) -> dict:
    """Rewrite buffer_index.json from the expert files in `directory` and `meta` (buffer_meta.json's content;
    None keeps the copy the index holds), under a lock so that processes writing experts side by side never
    lose each other's entries. A damaged index is replaced; a file whose header cannot be read is left out,
    with a warning. Returns the index."""
    directory, path = Path(directory), Path(directory) / INDEX_NAME
    with open(directory / _LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when the process dies
        try:
            before = read_index(directory)
        except UserError:
            before = None
        experts = {}
        for number, expert_path in sorted(numbered_files(directory).items()):
            try:
                experts[str(number)] = _index_entry(expert_path)
            except UserError as err:
                print(f"warning: {err}; left out of {INDEX_NAME}", file=sys.stderr)
        kept = before["meta"] if meta is None and before is not None else meta
        index = {"format": INDEX_FORMAT, "version": VERSION, "meta": kept, "experts": experts}
        if index != before:
            atomic_write_json(index, path)
    return index


# ---- the index -------------------------------------------------------------------------------------------

def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as err:  # invalid JSON, not UTF-8, nested too deeply
        raise UserError(f"expert index {path} is not valid JSON ({str(err) or 'nested too deeply'}); delete it: "
                        f"buffer.py rebuilds it from the expert files beside it") from None


def _entry_problem(number: str, entry) -> str | None:
    if not isinstance(entry, dict):
        return f"expert {number} is not an object"
    if entry.get("file") != file_name(int(number)):
        return f"expert {number} names the file {entry.get('file')!r}, not {file_name(int(number))}"
    snapshots, count = entry.get("snapshots"), entry.get("trajectories")
    if not (type(count) is int and isinstance(snapshots, list) and len(snapshots) == count >= 1
            and all(type(s) is int for s in snapshots)):
        return f"expert {number} has trajectories {count!r} and snapshots {snapshots!r}"
    for part in PARTS:
        described = entry.get(part)
        if not (isinstance(described, dict) and isinstance(described.get("names"), list)
                and isinstance(described.get("shapes"), list)):
            return f"expert {number} lacks the names and shapes of its {part} parameters"
    return None


def read_index(directory: Path) -> dict | None:
    """The folder's buffer_index.json, checked for its form (None when there is none)."""
    path = Path(directory) / INDEX_NAME
    if not path.is_file():
        return None
    index = _read_json(path)
    experts = index.get("experts") if isinstance(index, dict) else None
    problem = ("it is not an expert index" if not isinstance(experts, dict) or index.get("format") != INDEX_FORMAT
               else "its meta is not an object" if not isinstance(index.get("meta"), (dict, type(None)))
               else next((p for n, entry in experts.items() for p in
                          [f"{n!r} is not an expert number" if not (n.isascii() and n.isdigit())
                           else _entry_problem(n, entry)] if p),
                         None))
    if problem:
        raise UserError(f"expert index {path} is damaged ({problem}); delete it: buffer.py rebuilds it from the "
                        f"expert files beside it")
    return index


def listed_experts(directory: Path) -> list[tuple[int, Path]]:
    """(n, file) for every expert the index lists, in order of n; a listed file that is missing is an error."""
    index = read_index(directory)
    if index is None:
        return []
    listed = sorted((int(n), Path(directory) / entry["file"]) for n, entry in index["experts"].items())
    for _, path in listed:
        if not path.is_file():
            raise UserError(f"buffer file not found: {path}, which {Path(directory) / INDEX_NAME} lists (deleted or "
                            f"moved?): put it back, or delete the index and let buffer.py rebuild it")
    return listed


def unlisted_files(directory: Path) -> list[Path]:
    """Expert files the index does not list (a write interrupted before the index was updated): readers skip
    them, and the next buffer.py run on the folder lists them."""
    index = read_index(directory)
    listed = {int(n) for n in index["experts"]} if index else set()
    return [path for n, path in sorted(numbered_files(directory).items()) if n not in listed]


# ---- reading ---------------------------------------------------------------------------------------------

class ExpertFile:
    """One expert file, its header checked against the buffer metadata; snapshots are read on demand."""

    def __init__(self, path: Path, meta: dict):
        self.path = Path(path)
        header = _header(self.path)
        self.snapshots = header["snapshots"]
        for key in PARTS.values():
            if not (isinstance(meta.get(key), list) and all(isinstance(shape, list) for shape in meta[key])):
                raise UserError(f"the buffer metadata of {path} holds no list of shapes under {key}")
        self.counts = {part: len(meta[key]) for part, key in PARTS.items()}
        self._checked: set[tuple[str, int, int]] = set()  # snapshots whose values were checked
        for t, count in enumerate(self.snapshots):
            if count < 2:
                raise UserError(f"buffer file {path}: trajectory {t} is not a list of at least 2 snapshots")
        expected = {tensor_name(part, t, e, i): shape for part, key in PARTS.items() for t, count in
                    enumerate(self.snapshots) for e in range(count) for i, shape in enumerate(meta[key])}
        unexpected = sorted(header["tensors"].keys() - expected.keys())
        if unexpected:
            raise UserError(f"buffer file {path} holds tensors its header does not describe (e.g. {unexpected[0]}): "
                            f"not written by this project, or damaged")
        for name, want in expected.items():
            found = header["tensors"].get(name)
            if found is None or list(found[0]) != list(want):
                _, t, e, i = name.split("/")
                got = "no such tensor" if found is None else f"{list(found[0])}"
                raise UserError(f"buffer file {path}: trajectory {t}, snapshot {e} does not match the parameter "
                                f"shapes in buffer_meta.json (a different model made it): {name} has {got}, "
                                f"the metadata says {list(want)}")
            if found[1] not in _FLOATS:
                raise UserError(f"buffer file {path}: tensor {name} holds {_dtype_name(found[1])} values, not "
                                f"floating-point numbers")

    def read(self, part: str, trajectory: int, epoch: int, raw: bool = False) -> list[torch.Tensor]:
        """The snapshot's tensors, as float32 (`raw`: in the file's dtype), values checked on their first read."""
        names = [tensor_name(part, trajectory, epoch, i) for i in range(self.counts[part])]
        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as handle:
                tensors = [handle.get_tensor(name) for name in names]
        except Exception as err:  # the file went away or was damaged since it was opened
            raise UserError(f"buffer file {self.path} cannot be read ({str(err).strip()[:200]})") from None
        if (part, trajectory, epoch) not in self._checked:
            for i, tensor in enumerate(tensors):  # a NaN here would surface as a diverging distillation
                problem = tensor_problem(tensor, max_abs=MAX_ABS_VALUE)
                if problem:
                    raise UserError(f"buffer file {self.path}: expert {trajectory} of the file, snapshot of epoch "
                                    f"{epoch}: {part} parameter tensor {i} {problem}; the expert diverged or the file "
                                    f"is damaged: train it again, or move the file out of the folder")
            self._checked.add((part, trajectory, epoch))
        return tensors if raw else as_float32(tensors)


class StoredTrajectory(Sequence):
    """One trajectory of an expert file as a sequence of snapshots, each read from the file when indexed."""

    def __init__(self, expert: ExpertFile, part: str, trajectory: int, raw: bool = False):
        self.expert, self.part, self.trajectory, self.raw = expert, part, trajectory, raw

    def __len__(self) -> int:
        return self.expert.snapshots[self.trajectory]

    def __getitem__(self, epoch):
        if isinstance(epoch, slice):
            return [self[e] for e in range(len(self))[epoch]]
        if not -len(self) <= epoch < len(self):
            raise IndexError(f"snapshot {epoch} of {len(self)}")
        return self.expert.read(self.part, self.trajectory, epoch % len(self), self.raw)


def open_expert(path: Path, meta: dict, raw: bool = False) -> list[tuple[StoredTrajectory, StoredTrajectory]]:
    """The (image trajectory, text trajectory) pairs of one expert file, checked against `meta` (shapes, dtypes)
    and read lazily: what load_expert_pair returns for a .pt pair, without reading the tensors."""
    expert = ExpertFile(path, meta)
    return [(StoredTrajectory(expert, "image", t, raw), StoredTrajectory(expert, "text", t, raw))
            for t in range(len(expert.snapshots))]


# ---- converting ------------------------------------------------------------------------------------------

LAYOUTS = ("pt", "safetensors")


def _refuse_target(target: Path) -> None:
    if target.exists() and not target.is_dir():
        raise UserError(f"the target {target} is a file, not a folder")
    held = sorted(p.name for p in target.iterdir()) if target.is_dir() else []
    experts = [name for name in held if name.endswith((".pt", ".safetensors")) or name == INDEX_NAME]
    if experts:
        raise UserError(f"the target {target} already holds experts ({', '.join(experts[:3])}); converting never "
                        f"writes over a buffer: choose a new or empty folder")
    if held:
        raise UserError(f"the target {target} is not empty ({', '.join(held[:3])}); choose a new or empty folder")


def convert_buffer(source_dir, target_dir, to: str = "safetensors") -> list[int]:
    """Write the experts of the buffer folder `source_dir` into the new folder `target_dir` in the layout `to`
    ("safetensors" or "pt"), every tensor bit for bit in its dtype, with buffer_meta.json and each
    metrics_<n>.json copied; returns the expert numbers written.

    The source is only read, one expert at a time. The target must be new or empty: it is filled under a
    temporary name beside it and renamed when complete, so an interrupted conversion leaves no half buffer.
    A reference-format folder (no buffer_meta.json) converts too: its metadata, derived from the tensors, goes
    into the index only, so converting back gives a folder without buffer_meta.json again. Every problem
    with the input (no experts, a damaged expert, a target holding files) is a UserError."""
    from experts import files  # (here: that module reads and writes both layouts through this one)

    if to not in LAYOUTS:
        raise UserError(f"cannot convert to {to!r}: the layouts are {', '.join(LAYOUTS)}")
    source, target = Path(source_dir), Path(target_dir)
    if not source.is_dir():
        raise UserError(f"the buffer folder {source} does not exist" if not source.exists()
                        else f"{source} is a file, not a buffer folder")
    layout = files.buffer_layout(source)
    experts = files.expert_files(source)
    if layout is None or not experts:
        raise UserError(f"no experts in {source} (no img_replay_buffer_<n>.pt / txt_replay_buffer_<n>.pt pair, "
                        f"no expert listed in {INDEX_NAME}): give the folder that holds the expert files")
    if layout == to:
        raise UserError(f"the experts in {source} are already in the {to} layout")
    _refuse_target(target)
    meta = files.read_metadata(source)
    try:
        with staged_folder(target) as work:
            for number, image_path, text_path in experts:  # one expert in memory at a time, in its own dtype
                if to == "safetensors":
                    pairs = files.load_expert_pair(image_path, text_path, meta, raw=True)
                    write_expert(work / file_name(number), [i for i, _ in pairs], [t for _, t in pairs], meta)
                else:
                    pairs = open_expert(image_path, meta, raw=True)
                    files.write_pt_pair(work, number, [list(i) for i, _ in pairs], [list(t) for _, t in pairs])
            numbers = [number for number, _, _ in experts]
            for name in [files.META_NAME, *(f"metrics_{n}.json" for n in numbers)]:
                if (source / name).is_file():
                    atomic_write_bytes((source / name).read_bytes(), work / name)
            if to == "safetensors":
                update_index(work, meta)
    except OSError as err:  # (a full disk is a UserError already)
        raise UserError(f"cannot write the target {target}: {os_error_reason(err)}") from None
    return numbers
