"""Export a distilled set or a coreset as a folder that loads without this project (export.py, the pipeline).

The folder (docs/file-formats.md) is a Hugging Face image folder, `datasets.load_dataset("imagefolder",
data_dir=FOLDER)`: `images/NNNNN.png` (the pixels de-normalised to 8 bits: for looking at and for other code;
the exact pixels are in pixels.safetensors) and `metadata.jsonl` (per image its file, index, caption and the
nearest real training captions with their cosine similarity), beside the exact tensors and the index that
data/exported_set.py writes and reads, a picture of the whole set (`grid.png`) and the dataset card (README.md,
sharing/card.py). The folder appears whole or not at all (utils/io.staged_folder).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from data.build import RetrievalData
from data.exported_set import INDEX, is_exported_folder, write_set_tensors
from networks.normalization import NORMALIZATIONS
from sharing.card import dataset_card
from utils.cli import UserError
from utils.visualize import nearest_caption_indices
from utils.io import atomic_write_text, staged_folder

IMAGES = "images"
METADATA = "metadata.jsonl"
GRID = "grid.png"
CARD = "README.md"
GRID_IMAGES = 100  # the grid shows the first 100 images (10 x 10)


def to_8bit(images: torch.Tensor, norm: str) -> torch.Tensor:
    """Normalised pixels [N,3,H,W] as 8-bit RGB [N,3,H,W] (uint8): the normalisation undone, clipped to the
    displayable range, rounded."""
    mean, std = (images.new_tensor(values).view(1, 3, 1, 1) for values in NORMALIZATIONS[norm])
    return (images.float() * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)


def caption_rows(payload: dict, data: RetrievalData, count: int) -> list[dict]:
    """metadata.jsonl's rows: per pair its image file, its caption (a coreset's own; a synthetic text's nearest
    real caption) and the `count` nearest real training captions by cosine similarity in the text encoder's
    space."""
    nearest, best = nearest_caption_indices(payload["text_syn"], data.train_text, count)
    own = payload.get("caption_indices")
    rows = []
    for i in range(len(nearest)):
        neighbours = [data.train.captions[j] for j in nearest[i].tolist()]
        caption = data.train.captions[int(own[i])] if own is not None else neighbours[0]
        rows.append({"file_name": f"{IMAGES}/{i:05d}.png", "index": i, "caption": caption,
                     "nearest_captions": neighbours, "similarity": [round(s, 6) for s in best[i].tolist()]})
    return rows


def claim_export_folder(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """Before any work: `out` is new, empty, or an earlier export replaced only with `overwrite`; never one of the
    `inputs` or a folder holding them."""
    out = out.resolve()
    for given in inputs:
        given = given.resolve()
        if given == out or out in given.parents:
            raise UserError(f"--out {out} would replace {given}, which this export reads; give another folder")
    if out.is_file():
        raise UserError(f"--out {out} is a file; give a folder name")
    if out.is_dir() and any(out.iterdir()):
        if not is_exported_folder(out):
            raise UserError(f"--out {out} already holds files that export.py did not write (no {INDEX}); give a new "
                            f"or empty folder")
        if not overwrite:
            raise UserError(f"--out {out} holds an earlier export; pass --overwrite True to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out {out}: its parent folder cannot be made ({err.strerror or err})") from None
    if not os.access(out.parent, os.W_OK):
        raise UserError(f"--out {out}: its parent folder {out.parent} cannot be written")


def export_set(payload: dict, data: RetrievalData, out: Path, *, captions: int = 5, results: str | None = None,
               made_from: str = "", inputs: tuple[Path, ...] = (), overwrite: bool = False) -> Path:
    """Write the export of the loaded set `payload` (data/distilled_set.load_distilled_set) to the folder `out`;
    `data` gives the training captions and their embeddings (the set's data set and text encoder), `results` a
    markdown table for the card (the pipeline's results.md), `made_from` the file it was read from; `out` is
    claimed as `claim_export_folder` says (`inputs`: what the export reads)."""
    out = Path(out).resolve()
    claim_export_folder(out, list(inputs), overwrite)
    with staged_folder(out) as staging:
        index = write_set_tensors(payload, staging, exported_from=made_from)
        (staging / IMAGES).mkdir()
        pixels = to_8bit(payload["image_syn"], payload["config"].get("image_norm", "clip"))
        for i, image in enumerate(pixels):
            save_image(image.float() / 255, staging / IMAGES / f"{i:05d}.png")
        rows = caption_rows(payload, data, captions)
        atomic_write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), staging / METADATA)
        grid = pixels[:GRID_IMAGES].float() / 255
        save_image(make_grid(grid, nrow=min(10, len(grid)), padding=2, pad_value=1.0), staging / GRID)
        atomic_write_text(dataset_card(index, rows, results), staging / CARD)
    return out

