"""The distilled-set file (docs/file-formats.md): one `.pt` of tensors and plain Python values.

Keys: `format`, `version`, `image_syn` [N,3,H,W] (normalised pixels; `config["image_norm"]` says with
which statistics) or, for a set of features that only a frozen trunk can use (the k-means feature
centroids), `image_features` [N, ...] (trunk outputs; `config["trunk"]` says which trunk), `text_syn` [N,D] (text-encoder
embeddings), `syn_lr_img`, `syn_lr_txt` (floats), `iteration`, `config` (every setting needed to
evaluate it: data set, encoders, image size, text model, ...), `metrics` (evaluation summary at
that iteration, may be empty), and, for resuming, `state` (optimiser momentum, RNG states, expert
position). Coresets of real pairs are written in the same format with `config["source"]` saying how
they were chosen. Files load with `torch.load(path, weights_only=True)`: no pickled code.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
from pathlib import Path

import torch

from settings.base import WEIGHT_LR_MAX, coerce, value_problem
from settings.programs import PROGRAMS, group_classes
from utils.cli import UserError
from utils.io import MAX_ABS_VALUE, as_float32, atomic_torch_save, safe_torch_load, tensor_problem

FORMAT = "vl-distill/distilled-set"
VERSION = 1
REQUIRED = ("text_syn", "syn_lr_img", "syn_lr_txt", "iteration", "config")


def non_finite(value, name: str = "") -> str | None:
    """The name (a dotted path) of the first floating-point tensor in `value`, searched through dicts, lists
    and tuples, that holds a NaN or an infinity; None when there is none."""
    if isinstance(value, torch.Tensor):
        return name if value.is_floating_point() and not bool(torch.isfinite(value).all()) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        found = non_finite(item, f"{name}.{key}" if name else str(key))
        if found:
            return found
    return None


def save_distilled_set(path, image_syn: torch.Tensor | None, text_syn: torch.Tensor, syn_lr_img: float,
                       syn_lr_txt: float, iteration: int, config: dict, metrics: dict | None = None,
                       state: dict | None = None, image_features: torch.Tensor | None = None, **extra) -> Path:
    """Atomically write a distilled set (pixels `image_syn`, or trunk outputs `image_features`); `extra` holds
    anything a method learns besides (e.g. a similarity). A set with a NaN or an infinity anywhere (tensors,
    optimiser state, step sizes) is refused with ValueError and nothing is written."""
    if (image_syn is None) == (image_features is None):
        raise ValueError("a set holds either pixels (image_syn) or trunk outputs (image_features)")
    images = {"image_syn": image_syn} if image_syn is not None else {"image_features": image_features}
    payload = {
        "format": FORMAT, "version": VERSION,
        **{k: v.detach().to("cpu", copy=True) for k, v in images.items()},
        "text_syn": text_syn.detach().to("cpu", copy=True),
        "syn_lr_img": float(syn_lr_img), "syn_lr_txt": float(syn_lr_txt),
        "iteration": int(iteration), "config": dict(config), "metrics": dict(metrics or {}),
        "state": state or {},
        **{k: (v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v) for k, v in extra.items()},
    }
    bad = non_finite(payload) or next((k for k in ("syn_lr_img", "syn_lr_txt") if not math.isfinite(payload[k])), None)
    if bad:
        raise ValueError(f"{bad} holds non-finite values: a set with NaN or infinity is never written ({path})")
    return atomic_torch_save(payload, Path(path))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_float_tensor(value, dims: int | None = None) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point() and (dims is None or value.dim() == dims)


def set_problem(payload: dict) -> str | None:
    """What is wrong with a loaded set file's contents (None: nothing); see docs/file-formats.md."""
    if payload.get("version") != VERSION or not _is_int(payload.get("version")):
        return f"has version {payload.get('version')!r}; this program reads version {VERSION}"
    missing = [k for k in REQUIRED if k not in payload]
    if missing:
        return f"lacks {', '.join(missing)}"
    if ("image_syn" in payload) == ("image_features" in payload):
        return "must hold either image_syn (pixels) or image_features"
    image_key = "image_syn" if "image_syn" in payload else "image_features"
    images, texts = payload[image_key], payload["text_syn"]
    if not _is_float_tensor(images) or not _is_float_tensor(texts):
        return f"does not hold floating-point tensors for its images and texts ({image_key}, text_syn)"
    for key in (image_key, "text_syn", "similarity"):  # what models compute with: finite, of a sane size
        problem = tensor_problem(payload[key], max_abs=MAX_ABS_VALUE) if payload.get(key) is not None else None
        if problem:
            return f"{key} {problem}"
    if (image_key == "image_syn" and (images.dim() != 4 or images.shape[1] != 3)) or images.dim() < 2 \
            or texts.dim() != 2 or len(images) != len(texts) or len(texts) == 0:
        return f"has inconsistent shapes: {image_key} {tuple(images.shape)}, text_syn {tuple(texts.shape)}"
    for key in ("syn_lr_img", "syn_lr_txt"):  # whether a value is usable is for its user to say (learned_lr_problem)
        if not isinstance(payload[key], (int, float)) or isinstance(payload[key], bool):
            return f"has {key} {payload[key]!r}, not a number"
    if not _is_int(payload["iteration"]) or payload["iteration"] < 0:
        return f"has iteration {payload['iteration']!r}, not a whole number >= 0"
    for key in ("config", "metrics", "state"):
        if not isinstance(payload.get(key, {}), dict):
            return f"has a {key} that is not a dictionary"
    problem = config_problem(payload["config"])
    if problem:
        return problem
    count = len(texts)
    similarity = payload.get("similarity")
    if similarity is not None and not (_is_float_tensor(similarity, 2) and similarity.shape == (count, count)):
        return f"has a similarity that is not a {count} x {count} matrix"
    sim_params = payload.get("sim_params", [])
    if not isinstance(sim_params, list) or not all(_is_float_tensor(t) for t in sim_params):
        return "has sim_params that are not a list of floating-point tensors"
    indices = payload.get("caption_indices")
    if indices is not None and not (isinstance(indices, torch.Tensor) and not indices.is_floating_point()
                                    and indices.shape == (count,)):
        return f"has caption_indices that are not {count} whole numbers"
    bad = non_finite(payload)
    return f"{bad} holds non-finite values (NaN or infinity)" if bad else None


@functools.cache
def saved_setting_fields() -> dict:
    """Every setting of every program, by name (a saved configuration's keys)."""
    return {f.name: f for program in PROGRAMS for cls in group_classes(program).values() for f in cls.specs()}


def config_problem(config: dict) -> str | None:
    """What is wrong with a set's saved configuration, as a phrase (None: nothing): every key that is a setting
    (a flag of buffer.py, distill.py or evaluate.py) must hold a value of the setting's type and range, as the
    programs wrote it; other keys (what a run resolved, e.g. text_identity) are the programs' own to read."""
    fields = saved_setting_fields()
    for key, value in config.items():
        if key in fields:
            try:
                problem = value_problem(fields[key], coerce(fields[key], value, "its saved config", key))
            except UserError as err:
                return f"has a wrong value in {err}: fix the key or make the set again"
            if problem:
                return f"has a wrong value in its saved config: {key} {problem}: fix the key or make the set again"
    return None


def learned_lr_problem(payload: dict) -> str | None:
    """Which learned step size of a loaded set cannot serve as a learning rate (zero, negative, NaN, or beyond
    the range of --lr_eval: a file not written by distill.py, which never saves such a value), as a phrase;
    None when both can."""
    bad = [f"{key} {payload[key]!r}" for key in ("syn_lr_img", "syn_lr_txt")
           if not (_is_number(payload[key]) and 0 < payload[key] <= WEIGHT_LR_MAX)]
    return (f"has {' and '.join(bad)}, not a finite positive step size of at most {WEIGHT_LR_MAX:g} (the range of "
            f"--lr_eval)" if bad else None)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _generator_state_problem(rng) -> str | None:
    if not isinstance(rng, dict):
        return "has no random-number state (rng)"
    size = torch.Generator().get_state().numel()
    for key in ("generator", "torch"):
        value = rng.get(key)
        if not (isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.shape == (size,)):
            return f"has no valid random-number state rng.{key} (a CPU generator state of {size} bytes)"
    return None


def _expert_position_problem(position) -> str | None:
    if not isinstance(position, dict):
        return "has no expert position (experts)"
    order, count = position.get("order"), position.get("num_files")
    shuffled = isinstance(order, list) and all(_is_int(i) for i in order) and sorted(order) == list(range(len(order)))
    if not (shuffled and count == len(order) > 0):
        return f"has an expert order {order!r} that is not a shuffle of its {count!r} files"
    if not (_is_int(position.get("file_pos")) and 0 <= position["file_pos"] < count):
        return f"has an expert file position {position.get('file_pos')!r} outside 0..{count - 1}"
    if not (_is_int(position.get("traj_pos")) and position["traj_pos"] >= 0):
        return f"has a trajectory position {position.get('traj_pos')!r} that is not a whole number >= 0"
    return None


def resume_state_problem(state) -> str | None:
    """What is wrong with the `state` a run resumes from (None: nothing) as far as the file alone tells: every
    part present with the right type. Whether the optimiser states fit the run's tensors is the run's check."""
    if not isinstance(state, dict):
        return "is not a dictionary"
    missing = [k for k in ("optimizers", "rng", "experts", "best_r_mean", "best_iteration", "guard") if k not in state]
    if missing:
        return f"lacks {', '.join(missing)} (written by an older or a different program)"
    if not isinstance(state["optimizers"], dict) or not isinstance(state["guard"], dict):
        return "has optimiser or guard states that are not dictionaries"
    if not _is_number(state["best_r_mean"]):
        return f"has best_r_mean {state['best_r_mean']!r}, not a finite number"
    if not (_is_int(state["best_iteration"]) and state["best_iteration"] >= -1):
        return f"has best_iteration {state['best_iteration']!r}, not a whole number >= -1"
    problem = _generator_state_problem(state["rng"]) or _expert_position_problem(state["experts"])
    if problem or "streams" not in state:
        return problem
    streams = state["streams"]  # segment streams 1.. (distill.py --trajectories_per_iteration, torchrun)
    if not (isinstance(streams, list) and all(isinstance(s, dict) for s in streams)):
        return "has segment streams (streams) that are not a list of dictionaries"
    for slot, stream in enumerate(streams, start=1):
        problem = _generator_state_problem(stream.get("rng")) or _expert_position_problem(stream.get("experts"))
        if problem:
            return f"segment stream {slot} {problem}"
    return None


def load_distilled_set(path) -> dict:
    """Load and check a distilled-set file, or a folder export.py wrote (data/exported_set.py); a clear error
    naming the file for anything else."""
    if Path(path).is_dir():
        from data.exported_set import load_exported_set  # the folder format builds on this module's checks
        return load_exported_set(path)
    payload = safe_torch_load(path, "distilled set")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path} is not a vl-distill distilled set (no '{FORMAT}' format tag)")
    payload = as_float32(payload)  # a set saved in float16 or float64 is used in float32
    problem = set_problem(payload)
    if problem:
        raise UserError(f"distilled set {path} {problem}")
    return payload


def coreset_source(method: str) -> str:
    """The `source` of a coreset file selected by `method`."""
    return f"coreset:{method}"


def coreset_method(source: str | None) -> str | None:
    """The selection method of a coreset file's `source` ("coreset:<method>"); None for any other set."""
    return source.removeprefix("coreset:") if isinstance(source, str) and source.startswith("coreset:") else None


def set_source(path) -> str | None:
    """What made the set file at `path` (its config's `source`: "distilled", "coreset:<method>"; "distilled" in
    files from before the key), read without loading its tensors; None when it is not a distilled-set file."""
    try:
        payload = safe_torch_load(path, "distilled set", mmap=True)
    except UserError:
        return None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or not isinstance(payload.get("config"), dict):
        return None
    source = payload["config"].get("source", "distilled")
    return source if isinstance(source, str) else None


# What a set file's config holds that differs between two runs making the same set: the run's name (its start
# time), where its report went, whether it showed progress, how long it took.
RUN_ONLY_KEYS = ("name", "out", "progress")


def content_digest(path) -> str:
    """SHA-256 of what judging a set file depends on: its tensors, step sizes and iteration, and its config less
    the keys of RUN_ONLY_KEYS and the timings (*_seconds). A coreset selected again to the same pairs, or a
    distillation redone to the same bits, keeps its digest although the file's bytes differ."""
    payload = load_distilled_set(path)
    digest = hashlib.sha256()
    for key in sorted(payload):
        value = payload[key]
        if key in ("metrics", "state"):  # what the run measured and its optimiser's state: not the set
            continue
        if key == "config":
            value = {k: v for k, v in value.items() if k not in RUN_ONLY_KEYS and not k.endswith("_seconds")}
        digest.update(key.encode())
        if torch.is_tensor(value):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        else:
            digest.update(json.dumps(value, sort_keys=True, default=str).encode())
    return digest.hexdigest()
