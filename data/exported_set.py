"""The exported set folder (export.py; docs/file-formats.md): a distilled set or a coreset in formats that load
without this project, and back.

What the folder holds for this project (`write_set_tensors`, `load_exported_set`): the exact tensors in
safetensors files, `pixels.safetensors` (`pixels` [N,3,H,W], in the encoder's input space: normalised with the
statistics `config["image_norm"]` names), `text_embeddings.safetensors` (`text_embeddings` [N,D]) and
`learned.safetensors` (the learned step sizes `syn_lr_img` / `syn_lr_txt` as float64 scalars, and what a method
learns besides: `similarity` [N,N] and `sim_params/<i>` for LoRS, `caption_indices` for a coreset), and the index
`vl_distill.json` (format tag, the set's iteration, config and metrics, and per file its tensors' shapes and
dtypes and its SHA-256). The images, captions and dataset card beside them are for people and other code
(sharing/set_folder.py writes them); loading reads only the safetensors files and the index, so an evaluation of
the folder is the evaluation of the .pt it came from, to the last digit. The folder holds no optimiser state:
distill.py cannot --resume from it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from data.distilled_set import FORMAT as SET_FORMAT, VERSION as SET_VERSION, set_problem
from utils.cli import UserError
from utils.io import atomic_write_json

FORMAT = "vl-distill/exported-set"
VERSION = 1
INDEX = "vl_distill.json"
CARD = "README.md"  # the dataset card (sharing/card.py): for people, checked only against the index
PIXELS, TEXTS, LEARNED = "pixels.safetensors", "text_embeddings.safetensors", "learned.safetensors"
LEARNED_LRS = ("syn_lr_img", "syn_lr_txt")
# What a set file holds besides its tensors of pairs: read from the index, never from a tensor file.
PLAIN_KEYS = ("format", "version", "iteration", "config", "metrics", "state")


def is_exported_folder(path) -> bool:
    """Whether `path` is a folder holding an export index (what `--distilled FOLDER` accepts)."""
    try:
        return Path(path).is_dir() and (Path(path) / INDEX).is_file()
    except (OSError, ValueError):
        return False


def set_tensors(payload: dict) -> dict[str, dict[str, torch.Tensor]]:
    """A loaded set's tensors, by the safetensors file that holds them. A feature-centroid set (trunk outputs, no
    pixels) is refused: it has nothing to look at, and only the trunk that made it can use it."""
    if "image_syn" not in payload:
        raise UserError("this set holds trunk outputs (the feature-centroid set), not pixels: only the frozen trunk "
                        "that made it can use them, so it is not exported; export a distilled set or a coreset")
    learned = {key: torch.tensor(float(payload[key]), dtype=torch.float64) for key in LEARNED_LRS}
    for key, value in payload.items():
        if key in (*PLAIN_KEYS, *LEARNED_LRS, "image_syn", "text_syn"):
            continue
        if isinstance(value, torch.Tensor):
            learned[key] = value
        elif isinstance(value, list) and all(isinstance(t, torch.Tensor) for t in value):  # e.g. LoRS's factors
            learned.update({f"{key}/{i}": t for i, t in enumerate(value)})
        else:
            raise UserError(f"the set holds {key!r}, which is neither a tensor nor a list of tensors; this export "
                            f"does not know where to put it")
    return {PIXELS: {"pixels": payload["image_syn"]}, TEXTS: {"text_embeddings": payload["text_syn"]},
            LEARNED: learned}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_set_tensors(payload: dict, folder: Path, **described) -> dict:
    """Write the set's safetensors files and the index into `folder` (a new folder the caller owns; the caller makes
    the whole export appear at once); `described` adds entries to the index (e.g. what made the set). Returns
    the index."""
    files = {}
    for name, tensors in set_tensors(payload).items():
        tensors = {key: value.detach().to("cpu").contiguous() for key, value in tensors.items()}
        save_file(tensors, str(folder / name))
        files[name] = {"sha256": sha256(folder / name),
                       "tensors": {key: {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
                                   for key, value in tensors.items()}}
    index = {"format": FORMAT, "version": VERSION, "set_version": payload.get("version", SET_VERSION),
             "num_pairs": len(payload["text_syn"]), "iteration": payload["iteration"],
             "syn_lr_img": float(payload["syn_lr_img"]), "syn_lr_txt": float(payload["syn_lr_txt"]),
             "config": payload["config"], "metrics": payload.get("metrics", {}), "files": files, **described}
    atomic_write_json(index, folder / INDEX)
    return index


def read_index(folder: Path) -> dict:
    path = folder / INDEX
    if not path.exists():
        raise UserError(f"{folder} is a folder, neither a set file nor an exported set folder (no {INDEX}); give a "
                        f".pt set or the folder export.py wrote")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(f"{path} cannot be read ({err.strerror or err}): is {folder} an exported set folder?") from None
    except (ValueError, RecursionError) as err:
        raise UserError(f"{path} is not valid JSON ({str(err) or 'nested too deeply'}): the export is damaged; "
                        f"export the set again") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise UserError(f"{path} is not the index of an exported vl-distill set (no '{FORMAT}' format tag)")
    if index.get("version") != VERSION:
        raise UserError(f"{path} has version {index.get('version')!r}; this program reads version {VERSION}")
    files = index.get("files")
    if not isinstance(files, dict) or not {PIXELS, TEXTS, LEARNED} <= set(files) or \
            not all(isinstance(entry, dict) and isinstance(entry.get("tensors"), dict) for entry in files.values()):
        raise UserError(f"{path} does not list {PIXELS}, {TEXTS} and {LEARNED} with their tensors: the export is "
                        f"damaged; export the set again")
    for key, kind in (("config", dict), ("metrics", dict), ("iteration", int)):
        if not isinstance(index.get(key), kind):
            raise UserError(f"{path} has no {key} of the right type: the export is damaged; export the set again")
    return index


def read_tensor_file(folder: Path, name: str, entry: dict) -> dict[str, torch.Tensor]:
    """The tensors of one listed file, checked against what the index says of them (names, shapes, dtypes) and
    its checksum; a clear error naming the file otherwise."""
    path = folder / name
    if not path.is_file():
        raise UserError(f"{path} is missing: {folder / INDEX} lists it; copy the whole exported folder")
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path} is not a readable safetensors file ({str(err).splitlines()[0][:200]}); export the "
                        f"set again") from None
    expected = entry["tensors"]
    if set(tensors) != set(expected):
        raise UserError(f"{path} holds tensors {sorted(tensors)}, but {INDEX} lists {sorted(expected)}: it comes "
                        f"from another export")
    for key, tensor in tensors.items():
        shape, dtype = list(tensor.shape), str(tensor.dtype).removeprefix("torch.")
        if shape != expected[key].get("shape") or dtype != expected[key].get("dtype"):
            raise UserError(f"{path}: tensor {key} is {dtype} {shape}, but {INDEX} says {expected[key].get('dtype')} "
                            f"{expected[key].get('shape')}: it comes from another export or was changed")
        floating = key != "caption_indices"
        if tensor.is_floating_point() != floating:
            raise UserError(f"{path}: tensor {key} is {dtype}; it must hold "
                            + ("floating-point numbers" if floating else "whole numbers"))
    if entry.get("sha256") != sha256(path):
        raise UserError(f"{path} does not match the SHA-256 recorded in {INDEX}: it was changed or damaged; export "
                        f"the set again")
    return tensors


def load_exported_set(folder) -> dict:
    """An exported folder as the payload `data.distilled_set.load_distilled_set` gives for a .pt file (without
    `state`), checked like one; a clear error naming the file for a missing file, a tensor of the wrong shape or
    dtype, a changed file, an index that disagrees with the tensors, or a card that describes another set."""
    folder = Path(folder)
    index = read_index(folder)
    card = folder / CARD
    problem = card_problem(card.read_text(encoding="utf-8", errors="replace"), index) if card.is_file() else None
    if problem:
        raise UserError(f"{card} {problem}: the card comes from another export; export the set again")
    tensors = {name: read_tensor_file(folder, name, index["files"][name]) for name in (PIXELS, TEXTS, LEARNED)}
    learned = tensors[LEARNED]
    missing = [key for key in LEARNED_LRS if key not in learned or learned[key].dim() != 0]
    if missing:
        raise UserError(f"{folder / LEARNED} lacks the learned step sizes {', '.join(missing)} (scalars)")
    payload = {"format": SET_FORMAT, "version": index.get("set_version", SET_VERSION),
               "image_syn": tensors[PIXELS]["pixels"].float(), "text_syn": tensors[TEXTS]["text_embeddings"].float(),
               **{key: float(learned[key]) for key in LEARNED_LRS},
               "iteration": index["iteration"], "config": index["config"], "metrics": index["metrics"], "state": {}}
    lists = {}
    for key, value in learned.items():  # "<name>/<i>": item i of a list of tensors (e.g. LoRS's sim_params)
        name, _, position = key.partition("/")
        if key in LEARNED_LRS:
            continue
        if name in payload or not (position.isdigit() or not position):
            raise UserError(f"{folder / LEARNED} holds a tensor named {key!r}, which no set holds: it comes from "
                            f"another program")
        if position:
            lists.setdefault(name, {})[int(position)] = value
        else:
            payload[key] = value
    payload.update({name: [items[i] for i in sorted(items)] for name, items in lists.items()})
    problem = set_problem(payload)
    if problem:
        raise UserError(f"exported set {folder} {problem}")
    return payload


# The entries of the front matter's `vl_distill` table, read from the set's config (or the index).
CARD_KEYS = ("dataset", "image_encoder", "text_encoder", "text_identity", "image_size", "image_norm")


def card_facts(index: dict) -> dict:
    """What the card's front matter states of the set (its `vl_distill` table)."""
    config = index["config"]
    facts = {key: config.get(key) for key in CARD_KEYS}
    facts.update(num_pairs=index["num_pairs"], source=config.get("source", "distilled"), iteration=index["iteration"])
    return facts


def card_problem(card_text: str, index: dict) -> str | None:
    """Where a card's front matter disagrees with the index it sits beside (a card from another export), as a
    phrase; None when they agree or the card has no vl_distill table (edited by hand: it is for people)."""
    if not card_text.startswith("---\n"):
        return None
    try:
        matter = yaml.safe_load(card_text[4:].split("\n---", 1)[0])
    except yaml.YAMLError:
        return "has front matter that is not valid YAML"
    stated = matter.get("vl_distill") if isinstance(matter, dict) else None
    if not isinstance(stated, dict):
        return None
    facts = card_facts(index)
    wrong = [f"{key} {stated[key]!r} (the set: {facts[key]!r})" for key in facts
             if key in stated and stated[key] != facts[key] and key != "iteration"]
    return f"describes another set: {', '.join(wrong)}" if wrong else None
