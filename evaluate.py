"""Judge a distilled set, a coreset of real pairs, or full-data training with the evaluation protocol.

Exactly one of:
  --distilled PATH        a saved distilled set (or a saved coreset: the same file format). Data set,
                          encoders, image size and evaluation settings come from the file unless
                          given on the command line; the learning rates are the learned step sizes:
                          the image side trains at syn_lr_img, the text head at syn_lr_txt.
  --coreset METHOD        choose --coreset_size real training pairs (random, herding, kcenter,
                          forgetting, kmeans), save them as a set file, and evaluate them the same way;
                          `centroids` (frozen trunk only) is the k-means feature-centroid set instead:
                          per cluster the mean trunk output and the mean text embedding of its pairs.
  --full                  train on the whole training split (the upper bound), same protocol.
  --subset FILE           train on the training pairs an annotation file lists (e.g. reduce.py's output), as --full.
--num_eval fresh models (seeds --seed, --seed+1, ...) train --epoch_eval_train epochs (SGD, momentum
0.9, weight decay 5e-4, lr x0.1 half way); the table shows mean ± std over them. --lr_eval LR trains both
the image side and the text head at LR (coresets and --full: at 0.1 by default). With --lr_grid one
learning rate for both is chosen first on --eval_split (val: the split for choices) by --tune_models models per
value; --epoch_scales 0.5 1 2 chooses the number of epochs jointly (multiples of --epoch_eval_train), and
--widen_grid K scores up to K more cells one step past the grid's edge where the best sits on one (the JSON's
"at_edge" says where it still does). The reported numbers are on --report_split (auto: the test split when its annotation file is
present, e.g. flickr8k_test.json beside the others, else --eval_split; the output says which).
--eval_image_encoder (or --image_encoder) trains another image encoder than the set was made with
(cross-architecture transfer; the set file's --image_weights stay with its own encoder); the label, the printed
lines and the JSON name the encoder used. Another --dataset or --text_encoder than the set's is refused: its
text embeddings mean nothing elsewhere.
--eval_text_encoder NAME judges the set with another text encoder (text-side transfer): a distilled set's
synthetic texts go over as their nearest real training captions (cosine, in the set's own text space), a
coreset's as its own captions, each re-encoded with NAME; the evaluation models take NAME's width, every split is
embedded by NAME, and the label, the printed lines and the JSON ("text_transfer") say so.
--out writes every metric, its runs, the choices and the full configuration as JSON; it (and
--coreset_file) are checked for writability before any work.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import utils.cli  # noqa: F401 (first: a Ctrl-C while the libraries below load is one line, not a traceback)
import torch

from data.build import dataset_roots, load_retrieval_data
from data.annotations import pairs_listed_in, with_pairs
from data.distilled_set import load_distilled_set
from data.model_inputs import inputs_for
from evaluation import coreset_files, set_files
from evaluation.text_transfer import transfer_texts
from evaluation.grid import scaled_epochs
from evaluation.metrics import format_table
from evaluation.protocol import judge, lr_label, pair_batches, reported_split, untrained_warning
from evaluation.training import batch_note
from networks import build_model, check_image_size, image_norm
from networks.contrastive import check_pair_count
from settings import DEFAULT_REAL_LR, programs
from settings.base import current_names
from settings.judging import TargetSettings
from settings.programs import EvaluateSettings
from utils.cli import UserError, run_cli
from utils.errors import SettingError
from utils.device import pick_device
from utils.io import atomic_write_json
from utils.paths import ensure_output_file, json_object_in, refuse_outputs_over_inputs
from utils.wandb_logging import start_run

# Settings a distilled-set file supplies unless the command line gives them.
FILE_SETTINGS = ("dataset", "image_root", "ann_root", "cache_dir", "eval_split", "max_train_images", "text_encoder",
                 "text_model", "image_encoder", "image_size", "image_pretrained", "image_weights", "image_norm",
                 "train_stages", "feature_views", "num_eval", "epoch_eval_train", "eval_batch", "dsa", "dsa_strategy",
                 "image_projection", "lora_rank", "loss_type")
# The keys by which an existing --out file is recognised as an evaluate.py report (replaced without --overwrite).
REPORT_KEYS = ("label", "metrics", "config")


def parse_args(argv=None) -> tuple[argparse.Namespace, frozenset[str]]:
    """The parsed command line and the flags it gives itself (so that a set file's settings do not override them)."""
    return programs.parse_command_line("evaluate", __doc__, argv)


def with_file_settings(values: dict, config: dict, given: frozenset[str]) -> dict:
    """The command line's values with a set file's data, encoder and protocol settings where it is silent."""
    config = current_names(config)  # (a set written before a setting was renamed)
    not_from_file = set(given)
    trains = values.get("eval_image_encoder") or (values["image_encoder"] if "image_encoder" in given else None)
    if trains and trains != config.get("image_encoder"):  # the set's weights fit its own encoder, not this one
        not_from_file.add("image_weights")
    values = {**values, **{key: config[key] for key in FILE_SETTINGS if key in config and key not in not_from_file}}
    if "image_norm" not in config and "image_norm" not in given:
        values["image_norm"] = "clip"  # sets written before the setting existed hold CLIP-normalised pixels
    return values


def check_settings(settings: EvaluateSettings) -> None:
    """Rules between the groups, after every group passed its own checks."""
    coreset, size = settings.target.coreset, settings.judging.coreset_size
    if coreset and size is None:
        raise UserError("--coreset needs --coreset_size N (how many real pairs to select; --num_queries is the same)")
    if not coreset and size is not None:
        raise UserError("--coreset_size only applies to --coreset (a distilled set has its own size)")
    if settings.judging.eval_text_encoder and (settings.target.full or settings.target.subset):
        raise UserError("--eval_text_encoder re-encodes a set's texts; --full and --subset train on real captions: "
                        "give --text_encoder instead")
    if settings.judging.eval_image_size is not None and not settings.target.distilled:
        raise UserError("--eval_image_size resizes the pixels of a --distilled set file; real pairs (--coreset, "
                        "--full, --subset) load at --image_size: give that instead")
    if settings.judging.eval_image_size is not None and settings.target.distilled:  # the size was asked for
        encoder = settings.judging.eval_image_encoder or settings.model.image_encoder
        try:
            check_image_size(encoder, settings.model.image_size)
        except SettingError as err:
            raise SettingError("eval_image_size", settings.model.image_size, err.message) from None
    if settings.judging.eval_image_encoder:  # the encoder that trains
        check_image_size(settings.judging.eval_image_encoder, settings.model.image_size, "eval_image_encoder")
    else:
        check_image_size(settings.model.image_encoder, settings.model.image_size)


def check_paths(settings: EvaluateSettings) -> None:
    """Before any work: no file this run writes is one it reads, and an existing file it would replace is
    evaluate.py's own kind (a report, a coreset, forgetting counts); --overwrite True lets --out replace another."""
    coreset = settings.target.coreset
    coreset_file = coreset_files.coreset_path(settings) if coreset else None
    forgetting = coreset_files.forgetting_path(settings) if coreset == "forgetting" else None
    experts = settings.coreset.buffer_path if coreset in ("herding", "kcenter", "kmeans") else None
    refuse_outputs_over_inputs({"--out": settings.judging.out, "--coreset_file": coreset_file,
                                "the forgetting counts": forgetting, "--cache_dir": settings.data.cache_dir},
                               {"--distilled": settings.target.distilled, "--subset": settings.target.subset,
                                "--buffer_path": experts,
                                **settings.data_paths()})
    out = Path(settings.judging.out) if settings.judging.out else None
    if out is not None and out.is_file() and not settings.judging.overwrite:
        report = json_object_in(out)
        if report is None or not all(key in report for key in REPORT_KEYS):
            raise UserError(f"--out {out} exists and is not an evaluate.py report (a JSON object with "
                            f"{', '.join(REPORT_KEYS)}); give --out another path, or --overwrite True to replace it")
    coreset_files.check_saved_files(coreset_file, forgetting)


def check_outputs(settings: EvaluateSettings) -> None:
    """Every file this run writes can be written, before any work (not after the last model trained)."""
    if settings.judging.out:
        ensure_output_file(settings.judging.out, "--out")
    if settings.target.coreset:  # the forgetting counts are kept beside it
        ensure_output_file(coreset_files.coreset_path(settings), "--coreset_file")


def checked_settings(argv) -> tuple[EvaluateSettings, dict | None, Path | None]:
    """The run's settings (a --distilled file's own where the command line is silent) and that file's payload
    and path (None for --coreset and --full), every check passed before any work."""
    namespace, given = parse_args(argv)
    TargetSettings.from_namespace(namespace)  # exactly one thing to judge, before any file is read
    payload, set_path, values = None, None, vars(namespace)
    if namespace.distilled:
        payload, set_path = load_distilled_set(namespace.distilled), Path(namespace.distilled)
        check_pair_count(len(payload["text_syn"]), f"--distilled {set_path}")
        values = with_file_settings(values, payload["config"], given)
    settings = programs.from_namespace("evaluate", argparse.Namespace(**values))
    if settings.judging.eval_image_size is not None and settings.target.distilled:  # the models and val images
        settings = replace(settings, model=replace(settings.model, image_size=settings.judging.eval_image_size))
    check_paths(settings)
    check_settings(settings)
    if payload is not None:
        set_files.check_set_origin(settings.data, settings.model, payload["config"], set_path)
        set_files.check_learned_lrs(settings.judging, payload, set_path)
    check_outputs(settings)
    return settings, payload, set_path


def subset_of(data, path: str, data_settings):
    """`data` training on the pairs that annotation file `path` lists (every one a pair of its training split)."""
    image_root, _ = dataset_roots(data_settings, progress=False)
    indices = pairs_listed_in(Path(path), data.train, image_root)
    check_pair_count(len(indices), f"--subset {path}")
    return replace(data, train=with_pairs(data.train, indices), train_text=data.train_text[torch.tensor(indices)])


def training_model(settings: EvaluateSettings, data, device: torch.device, model=None, inputs=None):
    """The settings, model and inputs the evaluation trains with: --eval_image_encoder may replace the encoder
    that made (or, for a coreset, selected) the set; a model and inputs of that encoder are kept."""
    encoder = settings.judging.eval_image_encoder
    if encoder and encoder != settings.model.image_encoder:
        settings = replace(settings, model=replace(settings.model, image_encoder=encoder))
        model = inputs = None
    if model is None:
        model = build_model(settings.model, data.text_dim)
    full_over_trunk = (settings.target.full or settings.target.subset) and model.has_trunk
    if inputs is None or (full_over_trunk and not inputs.cached):
        inputs = inputs_for(settings.data, settings.model, data, model, device, settings.runtime.progress,
                            need_train=full_over_trunk)
    return settings, model, inputs


def training_pairs(settings: EvaluateSettings, payload: dict | None, set_path: Path | None, model, inputs,
                   device: torch.device, made_with: str | None, text_transfer=None):
    """The row's label, what trains (in words) and its batches by seed: the set's pairs, or the training split."""
    if payload is None:
        pairs, subset = len(inputs.data.train.captions), settings.target.subset
        batch_note("--eval_batch", settings.protocol.eval_batch, pairs, "the training pairs")
        label, what = (f"subset-{pairs}", f"{pairs} training pairs listed in {subset}") if subset else (
            f"full-{pairs}", f"full-data training ({pairs} pairs)")
        return label, what, partial(inputs.train_batches, settings.protocol.eval_batch)
    pairs, source = len(payload["text_syn"]), payload["config"].get("source", "distilled")
    label = f"{source}-{pairs}" + (f" on {settings.model.image_encoder}" if settings.model.image_encoder != made_with else "")
    label += f" at {settings.judging.eval_image_size} px" if settings.judging.eval_image_size is not None else ""
    label += f" ({text_transfer.phrase})" if text_transfer else ""
    make_loader = pair_batches(settings.protocol, model, inputs, device, payload["text_syn"],
                               **set_files.set_inputs(settings.model, payload, set_path, model, device,
                                                      resize=settings.judging.eval_image_size is not None))
    batch_note("--eval_batch", settings.protocol.eval_batch, pairs, "the set")
    return label, f"{pairs} pairs from {set_path} ({source})", make_loader


def choices_line(settings: EvaluateSettings, lrs: list[float], lr_txt: float | None, epochs: list[int]) -> str:
    """How the learning rate and the number of epochs are fixed or chosen, in words."""
    grid = len(lrs) * len(epochs) > 1
    choice = " and ".join(([f"lr chosen from {lrs}"] if len(lrs) > 1 else [lr_label(lrs[0], lr_txt)]) +
                          ([f"epochs from {epochs}"] if len(epochs) > 1 else []))
    choice += f" on {settings.data.eval_split}" if grid else f", {epochs[0]} epochs"
    return choice + (f" (widened by up to {settings.judging.widen_grid} cells past an edge)"
                     if settings.judging.widen_grid and grid else "")


def print_result(settings: EvaluateSettings, result: dict, label: str, report_split: str, seconds: float) -> str | None:
    """The table and the notes on the choice; returns the warning about models that did not train, if any."""
    judging = settings.judging
    print(format_table({f"{label} ({report_split})": result["metrics"]}))
    print(f"{settings.protocol.num_eval} models at {lr_label(result['lr'], result['lr_txt'])}, {result['epochs']} "
          f"epochs, {seconds:.0f}s")
    if result["at_edge"]:
        print(f"note: the choice sits at the grid's edge in {' and '.join(result['at_edge'])}" +
              (f" after {result['widened']} more cells (--widen_grid {judging.widen_grid})" if judging.widen_grid
               else " (--widen_grid K would try up to K values past it)"))
    warning = untrained_warning(result["untrained_models"], settings.protocol.num_eval + judging.tune_models * len(result["tuning"]))
    if warning:
        print(warning)
    return warning


def write_report(settings: EvaluateSettings, result: dict, label: str, report_split: str, warning: str | None,
                 seconds: float, payload: dict | None, set_path: Path | None, data, made_with: str | None,
                 device: torch.device, argv, text_transfer=None) -> None:
    """--out: every metric with its runs, the choices and the full configuration."""
    config = settings.flat_config()
    config.update(set_file=str(set_path) if set_path else None, set_config=payload["config"] if payload else None,
                  set_size=len(payload["text_syn"]) if payload else len(data.train.captions),
                  lr_used=result["lr"], lr_txt_used=result["lr_txt"], epochs_used=result["epochs"], image_encoder_of_set=made_with,
                  text_identity=data.text_identity,
                  image_norm_used=image_norm(settings.model), device=str(device),
                  command=[Path(sys.argv[0]).name, *sys.argv[1:]] if argv is None else argv)
    atomic_write_json({"label": label, "image_encoder": settings.model.image_encoder, "metrics": result["metrics"],
                       "split": report_split, "lr": result["lr"], "lr_txt": result["lr_txt"], "epochs": result["epochs"],
                       "tuning": result["tuning"], "widened": result["widened"], "at_edge": result["at_edge"],
                       "selection_split": settings.data.eval_split,
                       "selection_metrics": result["selection_metrics"], "config": config,
                       "untrained_models": result["untrained_models"], "warning": warning,
                       "text_transfer": text_transfer.report() if text_transfer else None,
                       "seconds": round(seconds, 1)}, Path(settings.judging.out))
    print(f"wrote {settings.judging.out}")


def main(argv=None) -> int:
    started = time.time()
    settings, payload, set_path = checked_settings(argv)
    device = pick_device(settings.runtime.device)
    report_split = reported_split(settings.data, settings.judging.report_split)
    data = load_retrieval_data(settings.data, settings.model, device, progress=settings.runtime.progress, extra_splits=(report_split,))
    if settings.target.subset:
        data = subset_of(data, settings.target.subset, settings.data)
    model = inputs = None
    if payload is None and settings.target.coreset:
        model = build_model(settings.model, data.text_dim)
        inputs = inputs_for(settings.data, settings.model, data, model, device, settings.runtime.progress,
                            need_train=model.has_trunk and coreset_files.needs_train_outputs(settings.target.coreset))
        payload, set_path = coreset_files.coreset_set(settings, inputs, model, device)
    set_files.check_text_dim(payload, set_path, data.text_dim)
    text_transfer = None
    if settings.judging.eval_text_encoder:  # the set's texts go over to another text encoder (docstring)
        settings, payload, data, text_transfer = transfer_texts(settings, payload, set_path, data, device,
                                                                (report_split,))
        model = inputs = None  # built for the set's text width
    # The encoder the set was made with (a coreset: the one this run selected with).
    made_with = payload["config"].get("image_encoder", settings.model.image_encoder) if payload else None
    settings, model, inputs = training_model(settings, data, device, model, inputs)
    # A set's learned step sizes: the image side trains at one, the text head at the other (LoRS and RepBlend
    # evaluate theirs so); --lr_eval and --lr_grid give one rate for both (the protocol's choice).
    learned = settings.target.distilled and settings.judging.lr_eval is None and not settings.judging.lr_grid
    lrs = settings.judging.lr_grid or [settings.judging.lr_eval or (payload["syn_lr_img"] if settings.target.distilled else DEFAULT_REAL_LR)]
    lr_txt = payload["syn_lr_txt"] if learned else None
    label, what, make_loader = training_pairs(settings, payload, set_path, model, inputs, device, made_with,
                                              text_transfer)
    epochs = scaled_epochs(settings.protocol.epoch_eval_train, settings.judging.epoch_scales)
    transfer = f" (the set was made with {made_with})" if made_with and made_with != settings.model.image_encoder else ""
    if text_transfer:
        transfer += f" ({text_transfer.phrase}; the set's text encoder is {text_transfer.from_identity})"
    print(f"evaluating {what} with {settings.protocol.num_eval} x {settings.model.image_encoder}{transfer}: "
          f"{choices_line(settings, lrs, lr_txt, epochs)}; reporting on {report_split}"
          + (f" (no {settings.data.dataset} test split beside the others: the split used for choices)"
             if settings.judging.report_split == "auto" and report_split == settings.data.eval_split != "test" else ""))
    result = judge(settings.model, settings.protocol, make_loader, lrs, inputs, device, settings.protocol.num_eval,
                   settings.runtime.seed, report_split, settings.judging.tune_models, settings.runtime.progress,
                   similarity=payload.get("similarity") if payload is not None else None, lr_txt=lr_txt,
                   epochs=epochs, widen=settings.judging.widen_grid)
    seconds = time.time() - started
    runtime = settings.runtime
    run = start_run(runtime.logging_mode, runtime.wandb_project, runtime.wandb_entity, runtime.name, settings.flat_config(), "evaluate")
    run.log({**{f"eval/{k}": v["mean"] for k, v in result["metrics"].items()},
             **{f"eval/{k}_std": v["std"] for k, v in result["metrics"].items()}})
    run.finish()
    warning = print_result(settings, result, label, report_split, seconds)
    if settings.judging.out:
        write_report(settings, result, label, report_split, warning, seconds, payload, set_path, data, made_with,
                     device, argv, text_transfer)
    return 0


def cli() -> None:
    """Entry point of the installed command."""
    run_cli(main)


if __name__ == "__main__":
    cli()
