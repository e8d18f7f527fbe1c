"""Keep a well-chosen fraction of a large set of real image-text pairs (data reduction; docs/reduction.md).

  python reduce.py --dataset flickr8k --image_root DATA --image_encoder efficientnet_lite0 --train_stages 0 \
      --image_projection True --text_encoder minilm --buffer_path buffers --method semdedup+balanced \
      --keep 0.25 --out flickr8k_train_25.json

reads the training split, computes (or reuses from the caches every program shares) each pair's frozen image and
text features, scores the pairs and keeps --keep of them, and writes the kept pairs to --out in the input's own
layout: the annotation file's entries, so that any trainer (this project's: `evaluate.py --subset`, buffer.py with
the file as its training split; or another) reads it unchanged. With --shards PATTERN the input is webdataset tar
shards ({key}.jpg + {key}.txt per sample, img2dataset's layout): the features go to a store of their own, one part
per shard (under torchrun each process takes its shards; a killed run continues where it stopped), and --out is the
list of kept keys per shard (with --write_shards DIR also new shards holding only them).

--buffer_path names experts of buffer.py: their trained heads put images and texts in one space, where a pair's
alignment (the cosine of its image and its text) means something; alignment and balanced need it.
OUT.report.json and OUT.report.png say how many pairs stayed, per cluster, and how the last method's score is
spread over the kept and the dropped pairs. Nothing is generated: new captions would need a captioning model.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import utils.cli  # noqa: F401 (first: a Ctrl-C while the libraries below load is one line, not a traceback)

from data.annotations import annotation_file, entries_of_pairs
from data.build import dataset_roots
from reduction.keep import choose
from reduction.shards import expand_shards
from reduction.select import NEEDS_ALIGNMENT
from reduction.pairs import annotated_features
from reduction.report import summary, write_report
from settings import programs
from settings.programs import ReduceSettings
from utils.cli import UserError, run_cli
from utils.device import pick_device
from utils.io import atomic_write_json
from utils.paths import ensure_output_file, json_object_in, refuse_outputs_over_inputs

# What marks an --out file as reduce.py's own (replaced without --overwrite): its report beside it.
REPORT_SUFFIX = ".report.json"


def check_settings(settings: ReduceSettings) -> None:
    """Rules between the flags, before any work."""
    reduction = settings.reduction
    if reduction.keep is None:
        raise UserError("--keep FRACTION is needed: the fraction of the pairs to keep, in (0, 1]")
    if reduction.out is None:
        raise UserError("--out FILE is needed: where the kept pairs are written")
    methods = reduction.method.split("+")
    aligned = [m for m in methods if m in NEEDS_ALIGNMENT] + (["--captions_per_image"] if reduction.captions_per_image else [])
    if aligned and reduction.buffer_path is None:
        raise UserError(f"{' and '.join(aligned)} {'ranks' if len(aligned) == 1 else 'rank'} pairs by how well image "
                        f"and text agree, which needs an aligned space: give --buffer_path (experts of buffer.py "
                        f"trained with these encoders)")
    if reduction.write_shards and not reduction.shards:
        raise UserError("--write_shards writes new webdataset shards: it needs --shards")


def check_paths(settings: ReduceSettings) -> list[str]:
    """No output over an input; an existing --out is replaced only when reduce.py wrote it, or with --overwrite.
    Returns the shards --shards names, each checked to exist (none without --shards)."""
    reduction = settings.reduction
    shards: list[str] = []
    out = ensure_output_file(reduction.out, "--out")  # (a folder, or no file name at all, is refused here)
    inputs = settings.data_paths()
    if reduction.shards:  # every shard is there, and no output is one of them (before any model loads)
        try:
            shards = expand_shards(reduction.shards)
        except UserError as err:
            raise UserError(f"--shards: {err}") from None
        inputs.update({f"the shard {shard}": shard for shard in shards})
        if reduction.write_shards and any(Path(shard).resolve().parent == Path(reduction.write_shards).resolve()
                                          for shard in shards):
            raise UserError(f"--write_shards {reduction.write_shards} holds input shards; write the reduced shards "
                            f"to another folder")
    else:
        _, ann_root = dataset_roots(settings.data, progress=False)
        inputs["the training annotation file"] = annotation_file(settings.data.dataset, "train", ann_root)
    refuse_outputs_over_inputs({"--out": out, "its report": out.with_name(out.name + REPORT_SUFFIX)},
                               {**inputs, "--buffer_path": reduction.buffer_path})
    report = json_object_in(out.with_name(out.name + REPORT_SUFFIX))
    if out.exists() and not reduction.overwrite and not (report and "method" in report and "kept" in report):
        raise UserError(f"--out {out} exists and was not written by reduce.py; give --out another path, or "
                        f"--overwrite True to replace it")
    return shards


def main(argv=None) -> int:
    started = time.time()
    settings = programs.parse("reduce", __doc__, argv)
    check_settings(settings)
    shards = check_paths(settings)
    reduction = settings.reduction
    if shards:
        from reduction.webdata import reduce_shards  # (webdataset is read only here)

        return reduce_shards(settings, shards, started)
    device = pick_device(settings.runtime.device)
    features, data, info = annotated_features(settings.data, settings.model, reduction.buffer_path,
                                              reduction.expert_number, device, settings.runtime.progress)
    total = len(features.embedding)
    print(f"choosing {reduction.keep:g} of {total:,} pairs ({len(data.train.image_paths):,} images) by "
          f"{reduction.method} in the space of {info['space']}")
    chosen = choose(reduction, features, settings.runtime.seed, settings.runtime.progress)
    _, ann_root = dataset_roots(settings.data, progress=False)
    source = annotation_file(settings.data.dataset, "train", ann_root)
    entries = entries_of_pairs(source, [data.train.origins[i] for i in chosen.kept])
    out = Path(reduction.out)
    atomic_write_json(entries, out)
    report = summary(chosen, total, reduction.keep, reduction.method, {**info, "source": str(source),
                                                                       "command": ["reduce.py", *(sys.argv[1:] if argv is None else argv)]})
    report["seconds"] = round(time.time() - started, 1)
    paths = write_report(report, chosen, out) if reduction.report else ()
    stages = "; ".join(f"{s['method']} {s['pairs_in']:,} -> {s['pairs_out']:,}" for s in chosen.stages)
    print(f"kept {len(chosen.kept):,} of {total:,} pairs ({stages}) in {len(entries):,} entries of {source.name}'s "
          f"layout: wrote {out}" + (f" and {', '.join(str(p) for p in paths)}" if paths else ""))
    return 0


def cli() -> None:
    """Entry point of the installed command."""
    run_cli(main)


if __name__ == "__main__":
    cli()
