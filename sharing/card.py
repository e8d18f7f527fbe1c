"""The dataset card of an exported set (README.md in the folder): YAML front matter in the Hugging Face Hub's
convention, then how the set was made, how it scores, what it looks like and how to load it without this project.

The front matter's `vl_distill` entry repeats what the index says of the set's encoders and size; loading a folder
checks the two agree (data/exported_set.card_problem), so a card copied from another export is caught.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from data.distilled_set import coreset_method
from data.exported_set import card_facts
from experts.files import expert_files

# The terms of the data the pairs come from: a set made from photos is bound by their terms.
DATA_TERMS = {
    "flickr8k": "Flickr8k (Hodosh et al., JAIR 2013): photos from Flickr, released for research use only",
    "flickr": "Flickr30K (Young et al., TACL 2014): photos from Flickr, for non-commercial research and "
              "educational use under Flickr's terms",
    "coco": "MS COCO (Lin et al., ECCV 2014): annotations CC BY 4.0; the images are under Flickr's terms of use",
    "shapes": "the shapes data set that vl-distill generates (no third-party images or text)",
    "webdata": "image-text pairs unpacked from webdataset shards: their terms are those of their source (state them "
               "before publishing)",
}
LOAD_EXAMPLE = """```python
from datasets import load_dataset
from safetensors.torch import load_file
pairs = load_dataset("imagefolder", data_dir="FOLDER")["train"]  # 8-bit PNGs with caption, nearest_captions
pixels = load_file("FOLDER/pixels.safetensors")["pixels"]        # the exact learned pixels [N,3,H,W]
texts = load_file("FOLDER/text_embeddings.safetensors")["text_embeddings"]  # [N,D] text-encoder embeddings
```"""


def size_category(count: int) -> str:
    return "n<1K" if count < 1000 else "1K<n<10K" if count < 10_000 else "10K<n<100K"


def front_matter(index: dict) -> dict:
    dataset = index["config"].get("dataset", "")
    method = coreset_method(index["config"].get("source"))
    return {"license": "other",
            "license_name": f"{dataset}-terms",
            "license_details": DATA_TERMS.get(dataset, f"the terms of the {dataset} data set"),
            "pretty_name": f"{dataset} {'coreset (' + method + ')' if method else 'distilled set'} of "
                           f"{index['num_pairs']} image-text pairs",
            "size_categories": [size_category(index["num_pairs"])],
            "task_categories": ["image-to-text", "text-to-image"],
            "tags": ["dataset-distillation" if method is None else "coreset", "vision-language",
                     "image-text-retrieval", "vl-distill"] + (["synthetic"] if method is None else []),
            "vl_distill": card_facts(index)}


def code_version() -> str:
    """The commit of the code that exports (a checkout of this project), or 'unknown' outside one."""
    try:
        found = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, text=True,
                               capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return found.stdout.strip() if found.returncode == 0 and found.stdout.strip() else "unknown"


def experts_line(config: dict) -> str:
    """What the card says of the experts a distilled set was matched against (a coreset has none)."""
    folder = config.get("buffer_path")
    if coreset_method(config.get("source")) or not folder:
        return ""
    found = expert_files(Path(folder)) if Path(folder).is_dir() else []
    count = f"{len(found)} experts" if found else "experts no longer at hand"
    return (f"Experts: {count} in {folder} ({config.get('expert_epochs')} epoch segments from start epochs below "
            f"{config.get('max_start_epoch')}, {config.get('syn_steps')} student steps).")


def metric_line(metrics: dict) -> str:
    names = ("img_r1", "img_r5", "img_r10", "txt_r1", "txt_r5", "txt_r10", "r_mean")
    cells = [f"{metrics[n]['mean']:.2f} ± {metrics[n]['std']:.2f}" if isinstance(metrics.get(n), dict) else "–"
             for n in names]
    return "| " + " | ".join(names) + " |\n|" + "---|" * len(names) + "\n| " + " | ".join(cells) + " |"


def dataset_card(index: dict, rows: list[dict], results: str | None = None) -> str:
    """README.md of an export: front matter, how it was made, its scores, its picture, the first captions and
    how to load it."""
    config, facts = index["config"], card_facts(index)
    method = coreset_method(config.get("source"))
    what = (f"{index['num_pairs']} real pairs chosen by the {method} coreset method" if method else
            f"{index['num_pairs']} synthetic image-text pairs learned by trajectory matching (iteration "
            f"{index['iteration']}, the best on the selection split)")
    settings = "\n".join(f"| {key} | {value!r} |" for key, value in sorted(config.items()))
    captions = "\n".join(f"| {row['index']} | {row['caption']} | {row['similarity'][0]:.3f} |" for row in rows[:10])
    parts = [
        "---\n" + yaml.safe_dump(front_matter(index), sort_keys=False, allow_unicode=True) + "---",
        f"# {front_matter(index)['pretty_name']}",
        f"{what}, made from the {facts['dataset']} training split with vl-distill for image encoder "
        f"{facts['image_encoder']} at {facts['image_size']} px and text encoder {facts['text_encoder']} "
        f"({facts['text_identity']}); exported at commit {code_version()}. {experts_line(config)} Terms of the source "
        f"data: {DATA_TERMS.get(facts['dataset'], 'see its source')}.",
        "## Files\n"
        "- `images/NNNNN.png` with `metadata.jsonl`: the images as 8-bit PNGs (the normalisation undone and clipped: "
        "for looking at and for other code) and, per image, its caption (a coreset's own; a synthetic text's nearest "
        "real training caption) and the nearest real training captions with their cosine similarity;\n"
        "- `pixels.safetensors` (`pixels`, the exact learned tensors in the image encoder's input space: normalised "
        f"with the `{facts['image_norm']}` statistics), `text_embeddings.safetensors` (`text_embeddings`, in the text "
        "encoder's space), `learned.safetensors` (the learned step sizes `syn_lr_img` and `syn_lr_txt`, and a "
        "method's own tensors, e.g. LoRS's `similarity`);\n"
        "- `vl_distill.json`: every setting, the evaluation at the exported iteration, each file's tensors and SHA-256; "
        "`vl-evaluate --distilled FOLDER` judges the folder exactly as the .pt file it came from.",
        f"## Scores\nRetrieval (recall@K, %) of models trained on the set, on the {config.get('eval_split', 'val')} "
        f"split at the exported iteration ({config.get('num_eval', '?')} models):\n\n"
        + metric_line(index.get("metrics") or {}),
    ]
    if results:
        parts.append("## The comparison it comes from\n" + results.strip())
    parts += [
        f"## What it looks like\n![the first {min(len(rows), 100)} images](grid.png)\n\n| index | caption | cosine |\n"
        f"|---|---|---|\n{captions}",
        "## Loading it without vl-distill\n" + LOAD_EXAMPLE.replace("FOLDER", "."),
        "## Every setting\n| setting | value |\n|---|---|\n" + settings,
    ]
    return "\n\n".join(parts) + "\n"
