"""Share what was distilled in formats that load without this project.

    python export.py set outputs/demo/distill/seed0/distilled_best.pt --out shared/demo-set
    python export.py buffer buffers/flickr8k/efficientnet_lite0/minilm buffers-st --to safetensors

`set SET --out FOLDER`: a distilled set or a coreset (a .pt file, or an exported folder) becomes a folder that the
Hugging Face `datasets` library loads as an image folder (`load_dataset("imagefolder", data_dir=FOLDER)`):
images/NNNNN.png (8-bit, for looking at and for other code) with metadata.jsonl (caption, nearest real captions and
their cosine), the exact tensors in safetensors (pixels, text embeddings, learned step sizes, a method's own
tensors such as LoRS's similarity), vl_distill.json (settings, scores, checksums), grid.png, and a dataset card
README.md in the Hub's convention. `evaluate.py --distilled FOLDER` judges it exactly as the .pt file (same
numbers to the last digit); distill.py cannot --resume from it (it holds no optimiser state). The data set and
text encoder the set was made with must be at hand: the card and metadata name the nearest real captions
(--image_root / --ann_root / --cache_dir as for evaluate.py when the set's own paths do not hold on this machine).
The folder appears whole or not at all; an earlier export is replaced only with --overwrite True, anything else
never.

`buffer SOURCE TARGET --to safetensors|pt`: an expert buffer folder in the other layout (docs/file-formats.md):
per expert one memory-mapped safetensors file with a JSON index, or the reference's .pt file pairs. TARGET is a
new folder; SOURCE is never changed.

`shards PATTERN --out FOLDER --split train|val|test [--keys KEPT]`: webdataset shards (img2dataset's layout, brace
notation) unpacked so that every program reads them as `--dataset webdata --image_root FOLDER`: the images under
FOLDER/images/<shard>/ byte for byte and FOLDER/annotations/webdata_<split>.json; with --keys only the samples a
reduce.py --shards run kept. Run it once per split (the training shards, a held-out shard for val and test).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import utils.cli  # noqa: F401 (first: a Ctrl-C while the libraries below load is one line, not a traceback)
import torch

from data.annotations import annotation_file
from data.build import load_retrieval_data
from data.exported_set import is_exported_folder
from evaluate import checked_settings
from experts.safetensors_buffer import convert_buffer
from reduction.shards import expand_shards, read_kept_keys, unpack_shards
from settings.programs import Parser
from sharing.set_folder import claim_export_folder, export_set
from utils.cli import UserError, run_cli, str2bool
from utils.paths import refuse_outputs_over_inputs

DATA_FLAGS = ("image_root", "ann_root", "cache_dir")  # where the set's data lies on this machine, as evaluate.py


def parse_args(argv=None) -> argparse.Namespace:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, prog="export.py")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{set,buffer,shards}")
    one = commands.add_parser("set", help="a distilled set or coreset -> a shareable folder",
                              description="Export a distilled set or a coreset as a folder (see export.py --help).")
    one.add_argument("set", help="the set: a .pt file distill.py or evaluate.py wrote, or an exported folder")
    one.add_argument("--out", required=True, help="the folder to write (new or empty; an earlier export only "
                                                  "with --overwrite True)")
    one.add_argument("--captions", type=int, default=5, help="nearest real captions listed per image (default 5)")
    one.add_argument("--results", default=None, help="a markdown table to show on the card (e.g. the pipeline's "
                                                     "results.md)")
    one.add_argument("--overwrite", type=str2bool, default=False, metavar="True|False",
                     help="replace an earlier export in --out (default False)")
    one.add_argument("--progress", type=str2bool, default=True, metavar="True|False", help="progress bars")
    for flag in DATA_FLAGS:
        one.add_argument(f"--{flag}", default=None, help=f"as evaluate.py --{flag} (default: the set's own)")
    buffer = commands.add_parser("buffer", help="an expert buffer -> the other layout (.pt <-> safetensors)",
                                 description="Convert an expert buffer folder (see export.py --help).")
    buffer.add_argument("source", help="the folder of the expert files (img_replay_buffer_<n>.pt ... or "
                                       "expert_<n>.safetensors ...)")
    buffer.add_argument("target", help="a new folder for the converted buffer")
    buffer.add_argument("--to", choices=("safetensors", "pt"), default="safetensors", help="the layout to write")
    shards = commands.add_parser("shards", help="webdataset shards -> an image folder with annotation files",
                                 description="Unpack webdataset shards for --dataset webdata (see export.py --help).")
    shards.add_argument("shards", help="the shards, in brace notation (data/{00000..00099}.tar)")
    shards.add_argument("--out", required=True, help="the folder (--image_root of --dataset webdata)")
    shards.add_argument("--split", choices=("train", "val", "test"), default="train", help="which split they are")
    shards.add_argument("--keys", default=None, help="only the samples of this list of kept keys (reduce.py --out "
                                                     "of a --shards run)")
    shards.add_argument("--skip_bad", type=str2bool, default=False, metavar="True|False",
                        help="skip (and count) samples without an image or caption instead of stopping")
    shards.add_argument("--overwrite", type=str2bool, default=False, metavar="True|False",
                        help="replace the split's existing annotation file (default False)")
    shards.add_argument("--progress", type=str2bool, default=True, metavar="True|False", help="progress bars")
    args = parser.parse_args(argv)
    if args.command == "set" and args.captions < 1:
        raise UserError(f"--captions must be at least 1, got {args.captions}")
    return args


def read_results(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"--results {path} cannot be read as text ({getattr(err, 'strerror', None) or err})") from None


def export_one_set(args: argparse.Namespace) -> Path:
    given = [item for flag in DATA_FLAGS if getattr(args, flag) is not None for item in (f"--{flag}", getattr(args, flag))]
    settings, payload, set_path = checked_settings(["--distilled", args.set, "--progress", str(args.progress), *given])
    claim_export_folder(Path(args.out), [set_path], args.overwrite)
    results = read_results(args.results)
    data = load_retrieval_data(settings.data, settings.model, torch.device("cpu"), args.progress, train_only=True)
    kind = "an exported folder" if is_exported_folder(set_path) else "a set file"
    out = export_set(payload, data, Path(args.out), captions=args.captions, results=results,
                     made_from=f"{kind}: {set_path.resolve()}", inputs=[set_path], overwrite=args.overwrite)
    print(f"exported {len(payload['text_syn'])} pairs to {out}")
    return out


def unpack(args: argparse.Namespace) -> Path:
    """export.py shards: the shards (or their kept keys) as FOLDER/images and FOLDER/annotations/webdata_<split>.json."""
    shards = expand_shards(args.shards)
    annotation = annotation_file("webdata", args.split, Path(args.out) / "annotations")
    refuse_outputs_over_inputs({"--out": args.out, "the annotation file": annotation},
                               {**{f"shard {i}": shard for i, shard in enumerate(shards)}, "--keys": args.keys})
    if annotation.exists() and not args.overwrite:
        raise UserError(f"{annotation} exists; give --overwrite True to replace it, or another --out")
    kept = read_kept_keys(args.keys) if args.keys else None
    pairs, skipped = unpack_shards(shards, Path(args.out), args.split, annotation, kept=kept, skip_bad=args.skip_bad,
                                   progress=args.progress)
    print(f"unpacked {pairs} pairs of {len(shards)} shards to {args.out} ({annotation.name})"
          + (f"; skipped {skipped}" if skipped else "") + f": use --dataset webdata --image_root {args.out}")
    return annotation


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == "set":
        export_one_set(args)
    elif args.command == "shards":
        unpack(args)
    else:
        numbers = convert_buffer(Path(args.source), Path(args.target), to=args.to)
        print(f"converted {len(numbers)} experts in {args.source} to the {args.to} layout in {args.target}")
    return 0


def cli() -> None:
    """Entry point of the installed command."""
    run_cli(main)


if __name__ == "__main__":
    cli()
