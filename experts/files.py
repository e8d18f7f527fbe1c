"""Expert trajectory buffers: layout, metadata, atomic saving and validated loading (docs/file-formats.md).

Layout: `<buffer_path>/<dataset>/<image_encoder>/<text_encoder>/` holds `img_replay_buffer_<n>.pt`
and `txt_replay_buffer_<n>.pt` (each a list of trajectories; a trajectory is a list of snapshots;
a snapshot is a list of CPU tensors in `module.parameters()` order) and `buffer_meta.json`, which
says what produced them so that later scripts can refuse an incompatible buffer. The safetensors layout
(`expert_<n>.safetensors` and `buffer_index.json`, experts/safetensors_buffer.py) holds the same; a folder
holds one layout, and the functions here (listing, numbering, metadata, saving, `load_expert_weights`) serve
both, telling them apart by the files present.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch
from torch import nn

from experts import safetensors_buffer
from experts.safetensors_buffer import INDEX_NAME, is_expert_file, open_expert
from networks import image_norm, trainable_parameters, trainable_parts
from settings.choices import BUFFER_FORMATS, check_registry
from settings.data import DataSettings
from settings.model import ModelSettings
from utils.cli import UserError
from utils.errors import SettingError
from experts.reference import REFERENCE_FORMAT, derived_metadata, shape_problem
from utils.io import (MAX_ABS_VALUE, as_float32, atomic_torch_save, atomic_write_json, read_json_if_present,
                      safe_torch_load, tensor_problem)

META_NAME = "buffer_meta.json"
PT, SAFETENSORS = "pt", "safetensors"  # the layouts (--buffer_format)
check_registry("buffer formats", BUFFER_FORMATS, (PT, SAFETENSORS))
MODEL_KEY = "model_settings"  # in `expected_metadata`: the settings that build the model
FORMAT_VERSION = 1
# Metadata entries that must agree for two sets of experts to share a folder or be matched against.
COMPATIBILITY_KEYS = ("dataset", "train_pairs", "image_encoder", "text_encoder", "text_model", "image_size", "text_dim",
                      "image_dim", "image_norm", "trainable_parts", "image_pretrained", "loss_type", "feature_views",
                      "image_param_shapes", "text_param_shapes")


def buffer_dir(buffer_path, dataset: str, image_encoder: str, text_encoder: str) -> Path:
    return Path(buffer_path) / dataset / image_encoder / text_encoder


def parameter_shapes(module: nn.Module) -> list[list[int]]:
    return [list(p.shape) for p in trainable_parameters(module)]


def parameter_names(module: nn.Module) -> list[str]:
    """The names of the trainable parameters, in the order of `parameter_shapes`."""
    return [name for name, p in module.named_parameters() if p.requires_grad]


def feature_views(data: DataSettings, settings: ModelSettings) -> int | None:
    """The augmented views experts train over when a frozen trunk's outputs are cached (None: no trunk)."""
    return data.feature_views if settings.trainable_stages is not None else None


def describe_experts(data: DataSettings, settings: ModelSettings, model, text_identity: str, text_dim: int,
                     train_pairs: int) -> dict:
    """Metadata for experts of `model` (built from `settings`) trained on `train_pairs` training pairs."""
    return {
        "format": FORMAT_VERSION,
        "dataset": data.dataset,
        "train_pairs": train_pairs,
        "image_encoder": settings.image_encoder,
        "text_encoder": settings.text_encoder,
        "text_model": text_identity,
        "image_size": settings.image_size,
        "text_dim": text_dim,
        "image_dim": model.image_dim,
        "image_pretrained": settings.pretrained,
        "image_norm": image_norm(settings),
        "trainable_parts": trainable_parts(settings),
        "feature_views": feature_views(data, settings),
        "loss_type": settings.loss_type,
        "image_param_shapes": parameter_shapes(model.image_part),
        "text_param_shapes": parameter_shapes(model.text_projection),
        "image_param_names": parameter_names(model.image_part),
        "text_param_names": parameter_names(model.text_projection),
        "image_param_count": sum(p.numel() for p in trainable_parameters(model.image_part)),
        "text_param_count": sum(p.numel() for p in trainable_parameters(model.text_projection)),
    }


def _read_meta_file(directory: Path) -> dict | None:
    path = Path(directory) / META_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as err:  # invalid JSON, not UTF-8, nested too deeply
        raise UserError(f"buffer metadata {path} is not valid JSON ({str(err) or 'nested too deeply'}); delete it "
                        f"only if you know which settings made the experts beside it") from None


def read_metadata(directory: Path) -> dict | None:
    """The folder's buffer_meta.json; for expert files without one (the reference implementation's
    format) what their tensors tell (`reference_metadata`); None for a folder without experts. In the
    safetensors layout it must agree with buffer_index.json, whose copy stands in for a missing one."""
    found = _read_meta_file(directory)
    if buffer_layout(directory) == SAFETENSORS:
        return _indexed_metadata(directory, found)
    if found is None and expert_files(directory):
        return reference_metadata(directory)
    return found


def _indexed_metadata(directory: Path, found) -> dict | None:
    """`found` (buffer_meta.json) checked against the copy and the shapes in the folder's index."""
    index = safetensors_buffer.read_index(directory)
    if index is None:
        return found
    path = Path(directory) / INDEX_NAME
    if found is None and index["meta"] is None:
        raise UserError(f"{directory} holds safetensors experts but no {META_NAME}, and {path} keeps no copy of it: "
                        f"restore the {META_NAME} the experts were made with")
    if found is None:
        found = index["meta"]
    elif not isinstance(found, dict):
        raise UserError(f"buffer metadata {Path(directory) / META_NAME} is not a JSON object")
    elif index["meta"] is not None:
        problems = [f"{key}: {index['meta'].get(key)!r} there, {found.get(key)!r} in {META_NAME}"
                    for key in COMPATIBILITY_KEYS if index["meta"].get(key) != found.get(key)]
        if problems:
            raise UserError(f"expert index {path} disagrees with {META_NAME} beside it ({'; '.join(problems[:2])}); "
                            f"one of them was replaced: delete the index and let buffer.py rebuild it, or restore "
                            f"the {META_NAME} the experts were made with")
    for number, entry in sorted(index["experts"].items()):
        for part, key in safetensors_buffer.PARTS.items():
            if entry[part]["shapes"] != found.get(key):
                raise UserError(f"expert index {path}: expert {number}'s {part} parameter shapes disagree with "
                                f"{key} in {META_NAME} (experts of another model?)")
    return found


# What buffers written before a metadata entry existed hold: the setting's only value, or its default, then.
# image_pretrained is in every buffer_meta.json buffer.py wrote (its flag's default was True); loss_type came
# with the losses other than InfoNCE (8d0dcb7); feature_views with the frozen trunk (dfcde2c), before which
# no expert trained over cached trunk outputs.
LEGACY_DEFAULTS = {"trainable_parts": ["image_encoder", "text_projection"], "image_norm": "clip",
                   "image_pretrained": True, "loss_type": "infonce", "feature_views": None}


def mismatches(found: dict, expected: dict) -> list[str]:
    """The one compatibility check: every COMPATIBILITY_KEYS entry that `expected` states and `found` (a
    buffer's metadata) disagrees with."""
    found = {**LEGACY_DEFAULTS, **found}
    return [f"{key}: buffer has {found.get(key)!r}, this run asks for {expected[key]!r}"
            for key in COMPATIBILITY_KEYS if key in expected and found.get(key) != expected[key]]


def locate_buffer(buffer_path, dataset: str, image_encoder: str, text_encoder: str) -> Path:
    """`--buffer_path` may be the folder holding the files or the buffer root (then the layout is appended)."""
    given = Path(buffer_path)
    if (given / META_NAME).is_file() or any(given.glob("img_replay_buffer_*.pt")) or safetensors_buffer.present(given):
        return given
    return buffer_dir(given, dataset, image_encoder, text_encoder)


def expected_metadata(data: DataSettings, settings: ModelSettings, text_identity: str, text_dim: int | None = None,
                      train_pairs: int | None = None) -> dict:
    """What a run with these settings needs its experts' metadata to say (checked by `check_buffer_matches`)."""
    expected = {"dataset": data.dataset, "image_encoder": settings.image_encoder, "text_encoder": settings.text_encoder,
                "text_model": text_identity, "image_size": settings.image_size, "image_norm": image_norm(settings),
                "trainable_parts": trainable_parts(settings), "image_pretrained": settings.pretrained,
                "loss_type": settings.loss_type, "feature_views": feature_views(data, settings),
                MODEL_KEY: settings}  # not a metadata entry: builds the model a buffer without metadata must fit
    if text_dim is not None:
        expected["text_dim"] = text_dim
    if train_pairs is not None:
        expected["train_pairs"] = train_pairs
    return expected


# What to pass when a key disagrees (the first key of this order that does).
MISMATCH_HINTS = {
    "trainable_parts": " (the experts must train what distillation matches: the same --train_stages, "
                       "--image_projection and --lora_rank)",
    "image_norm": " (pass the --image_norm the experts were trained with)",
    "image_pretrained": " (pass the --image_pretrained / --image_weights the experts were trained with)",
    "loss_type": " (pass the --loss_type the experts were trained with)",
    "feature_views": " (pass the --feature_views and --train_stages the experts were trained with)",
    "train_pairs": " (the experts trained on another training split: pass the --max_train_images buffer.py had)",
    "text_dim": " (the experts' text head takes embeddings of another size: pass the --text_encoder and "
                "--text_model buffer.py had)",
}


def check_buffer_matches(meta: dict | None, directory: Path, expected: dict) -> None:
    """Refuse a buffer made with other encoders, image size, text dimension or data set than asked."""
    if meta is None:
        half = [p.name for p in unpaired_files(directory)] if Path(directory).is_dir() else []
        unlisted = [p.name for p in safetensors_buffer.unlisted_files(directory)] if Path(directory).is_dir() else []
        found = (f"only {', '.join(half[:3])} without its partner (an interrupted write)" if half else
                 f"only {', '.join(unlisted[:3])}, not listed in {INDEX_NAME} (an interrupted write)" if unlisted else
                 "no img_replay_buffer_<n>.pt / txt_replay_buffer_<n>.pt pair" if Path(directory).is_dir() else
                 "no such folder")
        raise UserError(f"no experts in {directory} ({found}): run buffer.py with the same --dataset, "
                        f"--image_encoder and --text_encoder first, or point --buffer_path at its output")
    if meta.get("format") == REFERENCE_FORMAT:
        adopt_reference_buffer(meta, directory, expected)
    refuse_mismatches(meta, directory, expected)


def check_data_matches(meta: dict, directory: Path, train_pairs: int, text_dim: int) -> None:
    """The rest of `check_buffer_matches`, once the run's data is loaded: the experts trained on a training
    split of `train_pairs` pairs (not checked where their metadata does not say) and on `text_dim`-dimensional
    text embeddings."""
    expected = {"text_dim": text_dim}
    if meta.get("train_pairs") is not None:  # buffers written before the entry existed
        expected["train_pairs"] = train_pairs
    refuse_mismatches(meta, directory, expected)


def refuse_mismatches(meta: dict, directory: Path, expected: dict) -> None:
    """A UserError naming the first few entries where `meta` disagrees with `expected`, with a hint."""
    problems = mismatches(meta, expected)[:3]  # the hint is for a key the message shows
    if problems:
        hint = next((hint for key, hint in MISMATCH_HINTS.items() if any(p.startswith(key + ":") for p in problems)),
                    "")
        raise UserError(f"the experts in {directory} do not fit this run ({'; '.join(problems)}){hint}")


def reference_metadata(directory: Path) -> dict:
    """Metadata derived from the first expert file pair of a folder without buffer_meta.json."""
    _, image_path, text_path = expert_files(directory)[0]
    return derived_metadata(image_path, text_path)


def adopt_reference_buffer(meta: dict, directory: Path, expected: dict) -> None:
    """Check a reference-format buffer's shapes against the model this run builds and complete `meta` in place
    with this run's settings (what the files cannot tell), with a warning that those are not checked."""
    settings = expected.get(MODEL_KEY)
    if settings is None:
        raise UserError(f"{directory} has expert files but no {META_NAME}, and this program cannot check them "
                        f"without it")
    problem = shape_problem(meta, settings)
    if problem:
        raise UserError(f"the experts in {directory} (no {META_NAME}: read as the reference implementation's "
                        f"format) do not fit this run: {problem}")
    meta.update({key: expected[key] for key in COMPATIBILITY_KEYS
                 if key in expected and key not in ("text_dim", "train_pairs")})
    print(f"warning: {directory} has no {META_NAME}: read as the reference implementation's format; the "
          f"parameter shapes fit this run's model, the data set, text model, image normalisation, pretraining, "
          f"loss and feature views the experts were trained with cannot be checked", file=sys.stderr)


def claim_metadata(directory: Path, meta: dict, layout: str = PT) -> None:
    """Write `meta` beside new experts in `layout`, or check it and the layout agree with the experts already there."""
    held = buffer_layout(directory)
    if held not in (None, layout):
        raise SettingError("buffer_format", layout, f"{directory} holds experts in the {held} layout, and a folder "
                                                    f"holds one layout: write {held} there, choose another folder, or "
                                                    f"convert this one first (export.py buffer)", ("buffer_path",))
    found = _read_meta_file(directory)
    if found is None:
        if used_numbers(directory):
            raise UserError(f"{directory} holds expert files but no {META_NAME}; write new experts elsewhere")
        atomic_write_json(meta, Path(directory) / META_NAME)
        return
    problems = mismatches(found, meta)
    if problems:
        raise UserError(f"the experts in {directory} were made with other settings ({'; '.join(problems[:3])}); "
                        f"use another --buffer_path or the same settings")


def buffer_layout(directory: Path) -> str | None:
    """The layout of the experts in `directory` (PT or SAFETENSORS; None: no experts), refusing a folder that
    mixes the two."""
    pt = sorted(p.name for p in [*_numbered(directory, "img").values(), *_numbered(directory, "txt").values()])
    if not safetensors_buffer.present(directory):
        return PT if pt else None
    if pt:
        numbered = safetensors_buffer.numbered_files(directory)
        other = safetensors_buffer.file_name(min(numbered)) if numbered else INDEX_NAME
        raise UserError(f"{directory} mixes the two expert layouts ({pt[0]} and {other}): a folder holds one; "
                        f"move one set to a folder of its own (export.py buffer converts a folder to the other)")
    return SAFETENSORS


def _numbered(directory: Path, prefix: str) -> dict[int, Path]:
    found = {}
    for path in Path(directory).glob(f"{prefix}_replay_buffer_*.pt"):
        match = re.fullmatch(rf"{prefix}_replay_buffer_(\d+)\.pt", path.name)
        if match:
            found[int(match[1])] = path
    return found


def expert_files(directory: Path) -> list[tuple[int, Path, Path]]:
    """(n, image file, text file) for every complete numbered pair, in order of n; in the safetensors layout
    every expert the index lists, its one file standing for both."""
    if buffer_layout(directory) == SAFETENSORS:
        return [(n, path, path) for n, path in safetensors_buffer.listed_experts(directory)]
    images, texts = _numbered(directory, "img"), _numbered(directory, "txt")
    return [(n, images[n], texts[n]) for n in sorted(images.keys() & texts.keys())]


def complete_numbers(directory: Path) -> set[int]:
    """Numbers of the experts written completely: pairs, or safetensors files (listed in the index or not yet)."""
    images, texts = _numbered(directory, "img"), _numbered(directory, "txt")
    return (images.keys() & texts.keys()) | safetensors_buffer.numbered_files(directory).keys()


def used_numbers(directory: Path) -> set[int]:
    """Numbers with an image or a text file (a complete pair or half of one), or a safetensors file."""
    return (_numbered(directory, "img").keys() | _numbered(directory, "txt").keys()
            | safetensors_buffer.numbered_files(directory).keys())


def unpaired_files(directory: Path) -> list[Path]:
    """Buffer files whose partner is missing (an interrupted write, or a deleted file): readers skip them."""
    images, texts = _numbered(directory, "img"), _numbered(directory, "txt")
    return sorted([images[n] for n in images.keys() - texts.keys()] + [texts[n] for n in texts.keys() - images.keys()])


def next_free_index(directory: Path) -> int:
    used = used_numbers(directory)
    n = 0
    while n in used:
        n += 1
    return n


def save_expert(directory: Path, n: int, image_trajectory, text_trajectory, layout: str = PT) -> int:
    """Write one expert as number `n` (or the next free number if taken meanwhile) in `layout`; returns the number.

    .pt: the image file is created without overwriting (it claims the number), then the text file; a
    reader only counts complete pairs. safetensors: the file is created without overwriting, then the
    index lists it; a reader only counts listed experts. So an interruption never exposes half an expert.
    """
    directory.mkdir(parents=True, exist_ok=True)
    meta = _read_meta_file(directory)
    while True:
        try:
            if layout == SAFETENSORS:
                safetensors_buffer.write_expert(directory / safetensors_buffer.file_name(n), [image_trajectory],
                                                [text_trajectory], meta, overwrite=False)
            else:
                atomic_torch_save([image_trajectory], directory / f"img_replay_buffer_{n}.pt", overwrite=False)
            break
        except FileExistsError:
            n = next_free_index(directory)
    if layout == SAFETENSORS:
        safetensors_buffer.update_index(directory, meta)
    else:
        atomic_torch_save([text_trajectory], directory / f"txt_replay_buffer_{n}.pt")
    return n


def write_pt_pair(directory: Path, n: int, image_trajectories: list, text_trajectories: list) -> None:
    """File pair `n` holding these trajectories (several in a reference-format file), replacing any there."""
    atomic_torch_save(image_trajectories, Path(directory) / f"img_replay_buffer_{n}.pt")
    atomic_torch_save(text_trajectories, Path(directory) / f"txt_replay_buffer_{n}.pt")


def saved_files(directory: Path, n: int, layout: str) -> str:
    """Where expert `n` was written, for a message."""
    if layout == SAFETENSORS:
        return str(Path(directory) / safetensors_buffer.file_name(n))
    return f"{directory}/{{img,txt}}_replay_buffer_{n}.pt"


def tidy_index(directory: Path) -> None:
    """List in a safetensors folder's index the experts a killed run wrote but did not list, and drop the
    entries of files gone."""
    if buffer_layout(directory) == SAFETENSORS:
        safetensors_buffer.update_index(directory, _read_meta_file(directory))


def save_expert_metrics(directory: Path, n: int, history: list[dict], info: dict) -> Path:
    """`metrics_<n>.json` beside expert n: its evaluation after every epoch (the full-data reference)."""
    return atomic_write_json({"expert": n, **info, "epochs": history}, Path(directory) / f"metrics_{n}.json")


def read_expert_metrics(directory: Path) -> dict[int, dict]:
    """The metrics files of the complete experts in `directory`, by expert number."""
    found = {}
    for n, _, _ in expert_files(directory):
        saved = read_json_if_present(Path(directory) / f"metrics_{n}.json")
        if saved is not None:
            found[n] = saved
    return found


def _check_trajectories(trajectories, shapes: list[list[int]], path: Path) -> None:
    if not isinstance(trajectories, list) or not trajectories:
        raise UserError(f"buffer file {path} does not hold a list of trajectories")
    for t, trajectory in enumerate(trajectories):
        if not isinstance(trajectory, list) or len(trajectory) < 2:
            raise UserError(f"buffer file {path}: trajectory {t} is not a list of at least 2 snapshots")
        for s, snapshot in enumerate(trajectory):
            got = [list(x.shape) for x in snapshot] if isinstance(snapshot, list) and all(
                isinstance(x, torch.Tensor) for x in snapshot) else None
            if got != shapes:
                raise UserError(f"buffer file {path}: trajectory {t}, snapshot {s} does not match the "
                                f"parameter shapes in {META_NAME} (a different model made it)")
            for i, tensor in enumerate(snapshot):  # a NaN here would surface as a diverging distillation
                problem = tensor_problem(tensor, max_abs=MAX_ABS_VALUE)  # a bit flip can make 1e30: NaN later
                if problem:
                    raise UserError(f"buffer file {path}: expert {t} of the file, snapshot of epoch {s}: parameter "
                                    f"tensor {i} {problem}; the expert diverged or the file is damaged: train it "
                                    f"again, or move its file pair out of the folder")


def load_expert_pair(image_path: Path, text_path: Path, meta: dict, raw: bool = False) -> list[tuple[list, list]]:
    """The (image trajectory, text trajectory) pairs stored in one numbered file pair, validated, as float32
    (`raw`: in the files' dtype)."""
    image_trajs, text_trajs = safe_torch_load(image_path, "buffer file"), safe_torch_load(text_path, "buffer file")
    if not raw:  # float16/64 files are used in float32
        image_trajs, text_trajs = as_float32(image_trajs), as_float32(text_trajs)
    _check_trajectories(image_trajs, meta["image_param_shapes"], image_path)
    _check_trajectories(text_trajs, meta["text_param_shapes"], text_path)
    if len(image_trajs) != len(text_trajs) or any(len(a) != len(b) for a, b in zip(image_trajs, text_trajs)):
        raise UserError(f"buffer files {image_path.name} and {text_path.name} disagree in their trajectories")
    return list(zip(image_trajs, text_trajs))


def load_expert_weights(model, directory: Path, meta: dict, number: int | None = None,
                        epoch: int | None = None) -> tuple[int, int]:
    """Copy expert `number`'s snapshot at `epoch` (default: the first file's expert, its last snapshot)
    into the trainable parameters of `model.image_part` and `model.text_projection`; returns (number, epoch) used."""
    files = {n: (img, txt) for n, img, txt in expert_files(directory)}
    if not files:
        raise UserError(f"no expert files in {directory}: run buffer.py first")
    number = min(files) if number is None else number
    if number not in files:
        raise UserError(f"no expert file pair number {number} in {directory} (have {sorted(files)})")
    image_path, text_path = files[number]
    pairs = (open_expert(image_path, meta) if is_expert_file(image_path)  # one snapshot read, not the trajectory
             else load_expert_pair(image_path, text_path, meta))
    image_traj, text_traj = pairs[0]
    epoch = len(image_traj) - 1 if epoch is None else epoch
    if not 0 <= epoch < len(image_traj):
        raise UserError(f"expert {number} has snapshots 0..{len(image_traj) - 1}, asked for epoch {epoch}")
    with torch.no_grad():
        for module, snapshot in ((model.image_part, image_traj[epoch]), (model.text_projection, text_traj[epoch])):
            for param, value in zip(trainable_parameters(module), snapshot):
                param.copy_(value)
    return number, epoch
