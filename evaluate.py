"""Judge a distilled set, a coreset of real pairs, or full-data training with the evaluation protocol.

Exactly one of:
  --distilled PATH        a saved distilled set (or a saved coreset: the same file format). Data set,
                          encoders, image size and evaluation settings come from the file unless
                          given on the command line; the learning rate is the learned step size.
  --coreset METHOD        choose --num_queries real training pairs (random, herding, kcenter,
                          forgetting, kmeans), save them as a set file, and evaluate them the same way;
                          `centroids` (frozen trunk only) is the k-means feature-centroid set instead:
                          per cluster the mean trunk output and the mean text embedding of its pairs.
  --full                  train on the whole training split (the upper bound), same protocol.
--num_eval fresh models (seeds --seed, --seed+1, ...) train --epoch_eval_train epochs (SGD, momentum
0.9, weight decay 5e-4, lr x0.1 half way); the table shows mean ± std over them. With --lr_grid the
learning rate is chosen first on --eval_split (val: the split for choices) by --tune_models models per
value; the reported numbers are on --report_split (auto: the test split when its annotation file is
present, e.g. flickr8k_test.json beside the others, else --eval_split; the output says which).
--eval_image_encoder trains another image encoder than the set was made with (cross-architecture
transfer). --out writes every metric, its runs, the choices and the full configuration as JSON.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from data.build import has_split, load_retrieval_data
from data.distilled_set import load_distilled_set, save_distilled_set
from data.feature_cache import trunk_key
from data.model_inputs import inputs_from_args
from data.transforms import renormalize
from experts.cycler import check_buffer_matches, locate_buffer
from networks import build_model, image_norm, trainable_parts
from networks.image_encoders import IMAGE_ENCODERS
from evaluation import coresets
from experts.files import read_metadata
from utils.cli import UserError, run_cli
from settings.flags import (
    add_data_args,
    add_eval_args,
    add_model_args,
    add_runtime_args,
    check_model_args,
    new_parser,
)
from utils.device import pick_device, seed_everything
from evaluation.protocol import judge, pair_batches
from utils.io import atomic_torch_save, atomic_write_json, safe_torch_load
from evaluation.metrics import format_table
from utils.wandb_logging import start_run

# Settings a distilled-set file supplies unless the command line gives them.
FILE_SETTINGS = ("dataset", "image_root", "ann_root", "cache_dir", "eval_split", "max_train_images", "text_encoder",
                 "text_model", "image_encoder", "image_size", "image_pretrained", "image_weights", "image_norm",
                 "train_stages", "feature_views", "num_eval", "epoch_eval_train", "batch_train", "dsa", "dsa_strategy",
                 "image_projection", "lora_rank", "loss_type")
# Settings that decide the forgetting counts (shared by coresets of every size).
FORGETTING_KEYS = ("seed", "dataset", "text_identity", "image_encoder", "image_size", "image_pretrained",
                   "image_weights", "forgetting_epochs", "forgetting_batch", "lr_teacher_img", "lr_teacher_txt",
                   "num_train_pairs")
# Settings that decide which pairs a coreset holds (per method); a saved coreset is reused only when
# all of them agree.
SELECTION_KEYS = ("source", "num_queries", "seed", "dataset", "text_identity", "image_size", "num_train_pairs",
                  "image_norm")
MODEL_KEYS = ("image_encoder", "image_pretrained", "image_weights", "train_stages", "image_projection")
EXPERT_KEYS = MODEL_KEYS + ("buffer_path", "expert_number", "expert_epoch")
METHOD_KEYS = {"random": (), "herding": EXPERT_KEYS, "kcenter": EXPERT_KEYS, "kmeans": EXPERT_KEYS,
               "centroids": MODEL_KEYS + ("feature_views",),
               "forgetting": MODEL_KEYS + ("forgetting_epochs", "forgetting_batch", "lr_teacher_img", "lr_teacher_txt",
                                           "feature_views")}
# Methods that rank training pairs by features: an expert's joint embedding, or the frozen trunk's outputs.
FEATURE_METHODS = ("herding", "kcenter", "kmeans", "centroids")
CENTROIDS = "centroids"


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(__doc__)
    what = parser.add_argument_group("what to evaluate (exactly one)").add_mutually_exclusive_group(required=True)
    what.add_argument("--distilled", default=None, help="a distilled-set (or coreset) .pt file")
    what.add_argument("--coreset", default=None, choices=(*coresets.METHODS, CENTROIDS),
                      help="select real pairs with this method (centroids: the k-means feature-centroid set)")
    what.add_argument("--full", action="store_true", help="train on the whole training split")
    group = parser.add_argument_group("evaluation choices")
    group.add_argument("--num_queries", type=int, default=None, help="coreset size N (pairs)")
    group.add_argument("--lr_eval", type=float, default=None,
                       help="learning rate of the evaluation models (default: the set's learned step size; "
                            "for coresets and --full, --lr_teacher_img)")
    group.add_argument("--lr_grid", type=float, nargs="+", default=None, metavar="LR",
                       help="choose the learning rate from these values on --eval_split (the same budget for every "
                            "set judged); without it the rate is --lr_eval or the default above")
    group.add_argument("--tune_models", type=int, default=1, help="models per --lr_grid value")
    group.add_argument("--report_split", default="auto", choices=("auto", "val", "test"),
                       help="split the final numbers are reported on: auto = test when its annotation file exists, "
                            "else --eval_split")
    group.add_argument("--eval_image_encoder", default=None, choices=IMAGE_ENCODERS,
                       help="train this image encoder instead of the one the set was made with")
    group.add_argument("--out", default=None, help="write the metrics and configuration to this JSON file")
    group = parser.add_argument_group("coreset selection")
    group.add_argument("--buffer_path", default="./buffers",
                       help="experts that embed pairs for herding / kcenter (root or the folder of the files)")
    group.add_argument("--expert_number", type=int, default=None, help="expert file pair to use (default: lowest)")
    group.add_argument("--expert_epoch", type=int, default=None, help="snapshot of that expert (default: last)")
    group.add_argument("--forgetting_epochs", type=int, default=2, help="epochs of the expert that counts forgetting")
    group.add_argument("--forgetting_batch", type=int, default=128, help="batch size of that expert")
    group.add_argument("--lr_teacher_img", type=float, default=0.1,
                       help="image-encoder learning rate of the forgetting expert; default --lr_eval of real sets")
    group.add_argument("--lr_teacher_txt", type=float, default=0.1, help="text-head learning rate of that expert")
    group.add_argument("--coreset_file", default=None,
                       help="where the selected coreset is saved (default runs/<dataset>/coresets/<method>_<N>_"
                            "seed<seed>.pt); an existing file made with the same settings is reused")
    add_data_args(parser)
    add_model_args(parser)
    add_eval_args(parser, batch_train_default=64)
    add_runtime_args(parser)
    return parser


def explicit_flags(parser: argparse.ArgumentParser, argv) -> set[str]:
    """Destinations the command line sets itself (so file settings do not override them)."""
    quiet = argparse.ArgumentParser(add_help=False)
    for action in parser._actions:
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            kwargs = {"dest": action.dest, "default": argparse.SUPPRESS}
            if action.nargs == 0:
                kwargs["action"] = "store_true"
            else:
                kwargs["nargs"] = action.nargs
            quiet.add_argument(*action.option_strings, **kwargs)
    return set(vars(quiet.parse_known_args(argv)[0]))


def parse_args(argv=None):
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.explicit = sorted(explicit_flags(parser, argv))
    return args


def check_args(args) -> None:
    if args.coreset and args.num_queries is None:
        raise UserError("--coreset needs --num_queries N (how many real pairs to select)")
    if not args.coreset and args.num_queries is not None:
        raise UserError("--num_queries only applies to --coreset (a distilled set has its own size)")
    for name in ("num_eval", "epoch_eval_train", "batch_train", "forgetting_epochs", "forgetting_batch",
                 "image_size", "tune_models"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.coreset == "forgetting" and args.forgetting_epochs < 2:
        raise UserError("--forgetting_epochs must be at least 2: a pair has to be seen twice to be forgotten")
    if args.lr_eval is not None and not args.lr_eval > 0:
        raise UserError(f"--lr_eval must be positive, got {args.lr_eval}")
    if args.lr_grid is not None:
        if not all(lr > 0 for lr in args.lr_grid):
            raise UserError(f"every --lr_grid value must be positive, got {args.lr_grid}")
        if args.lr_eval is not None:
            raise UserError("--lr_eval fixes the learning rate, --lr_grid chooses it: give one of them")


def apply_file_settings(args, config: dict) -> None:
    """Take data, encoder and protocol settings from a set file where the command line is silent."""
    for key in FILE_SETTINGS:
        if key in config and key not in args.explicit:
            setattr(args, key, config[key])
    if "image_norm" not in config and "image_norm" not in args.explicit:
        args.image_norm = "clip"  # sets written before the setting existed hold CLIP-normalised pixels


def resolve_report_split(args) -> str:
    """The split the final numbers are reported on (`--report_split auto`: test when it is there)."""
    if args.report_split != "auto":
        if args.report_split != args.eval_split and not has_split(args, args.report_split):
            raise UserError(f"--report_split {args.report_split}: its annotation file is not in the annotation folder")
        return args.report_split
    return "test" if args.eval_split != "test" and has_split(args, "test") else args.eval_split


def coreset_path(args) -> Path:
    if args.coreset_file:
        return Path(args.coreset_file)
    return Path("runs") / args.dataset / "coresets" / f"{args.coreset}_{args.num_queries}_seed{args.seed}.pt"


def selection_config(args, data) -> dict:
    config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}
    config.update(source=f"coreset:{args.coreset}", text_identity=data.text_identity,
                  num_train_pairs=len(data.train.captions), image_norm=image_norm(args))
    return config


def forgetting_counts(args, inputs, model, device: torch.device, config: dict) -> coresets.ForgettingCounter:
    """Forgetting events of an expert trained for the purpose; cached beside the coreset file, since
    coresets of every size (and their re-runs) can share one count."""
    path = coreset_path(args).parent / f"forgetting_counts_seed{args.seed}.pt"
    key = {k: config.get(k) for k in FORGETTING_KEYS + ("image_norm", "train_stages", "image_projection",
                                                         "feature_views")}
    if path.exists():
        saved = safe_torch_load(path, "forgetting counts")
        if isinstance(saved, dict) and saved.get("key") == key:
            print(f"reusing the forgetting counts in {path}")
            return coresets.ForgettingCounter.from_counts(saved["events"], saved["ever_learned"])
    loader = inputs.train_batches(args.forgetting_batch, args.seed)
    counter = coresets.count_forgetting(args, inputs.data, model, device, args.forgetting_epochs, loader,
                                        args.progress)
    atomic_torch_save({"key": key, "events": counter.events, "ever_learned": counter.ever_learned}, path)
    return counter


def expert_pair_features(args, data, model, device: torch.device, config: dict) -> torch.Tensor:
    """Joint embeddings of the training pairs under a buffer expert (the encoder trains: no frozen features)."""
    directory = locate_buffer(args.buffer_path, args.dataset, args.image_encoder, args.text_encoder)
    meta = read_metadata(directory)
    expected = {"dataset": args.dataset, "image_encoder": args.image_encoder, "text_encoder": args.text_encoder,
                "text_model": data.text_identity, "image_size": args.image_size, "text_dim": data.text_dim,
                "image_norm": image_norm(args), "trainable_parts": trainable_parts(args)}
    if meta and "train_pairs" in meta:  # buffers written before the key existed do not record it
        expected["train_pairs"] = len(data.train.captions)
    check_buffer_matches(meta, directory, expected)
    features, (number, epoch) = coresets.expert_pair_features(model, directory, meta, data, args, device,
                                                              args.expert_number, args.expert_epoch)
    config["expert_used"] = {"directory": str(directory.resolve()), "number": number, "epoch": epoch}
    return features


def select_coreset(args, inputs, device: torch.device, config: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Indices of the chosen training pairs (captions), and for `centroids` the cluster of every pair;
    fills what was used into `config`."""
    data = inputs.data
    # One random stream per method, so that e.g. forgetting's tie-breaks are not the random coreset.
    method_index = (*coresets.METHODS, CENTROIDS).index(args.coreset)
    generator = torch.Generator().manual_seed(args.seed + method_index)
    num_pairs = len(data.train.captions)
    if args.coreset == "random":
        return coresets.select_random(num_pairs, args.num_queries, generator), None
    seed_everything(args.seed)
    model = build_model(args, data.text_dim).to(device)
    if args.coreset == "forgetting":
        counter = forgetting_counts(args, inputs, model, device, config)
        config["forgetting"] = {"pairs_with_events": int((counter.events > 0).sum()),
                                "never_learned": int((~counter.ever_learned).sum())}
        return coresets.select_most_forgotten(counter.events, counter.ever_learned, args.num_queries, generator), None
    if inputs.cached:  # a frozen trunk: its outputs and the raw text embeddings, no expert needed
        features = coresets.frozen_pair_features(inputs.train_outputs[0], data)
        config["features"] = "frozen trunk outputs + text-encoder embeddings"
    else:
        if args.coreset == CENTROIDS:
            raise UserError("--coreset centroids is a set of features, which only a frozen trunk can train on: use "
                            "--train_stages K or --image_projection True")
        features = expert_pair_features(args, data, model, device, config)
    if args.coreset == "herding":
        return coresets.select_herding(features, args.num_queries), None
    if args.coreset == "kmeans":
        return coresets.select_kmeans(features, args.num_queries, args.seed), None
    if args.coreset == CENTROIDS:  # the pairs nearest to the centroids are recorded with the set
        centroids, assignments = coresets.kmeans_clusters(features, args.num_queries, args.seed)
        return coresets.nearest_distinct(features, centroids), assignments
    first = int(torch.randint(num_pairs, (1,), generator=generator))
    return coresets.select_kcenter(features, args.num_queries, first), None


def coreset_set(args, inputs, model, device: torch.device) -> tuple[dict, Path]:
    """The coreset as a set payload: reused from --coreset_file when it was made the same way."""
    data = inputs.data
    coresets.check_count(args.num_queries, len(data.train.captions))
    path = coreset_path(args)
    config = selection_config(args, data)
    if path.exists():
        saved = load_distilled_set(path)
        if all(saved["config"].get(k) == config.get(k) for k in SELECTION_KEYS + METHOD_KEYS[args.coreset]):
            print(f"reusing the {args.coreset} coreset in {path}")
            return saved, path
        print(f"{path} was selected with other settings; selecting again")
    started = time.time()
    indices, assignments = select_coreset(args, inputs, device, config)
    config["selection_seconds"] = round(time.time() - started, 1)
    lr_img, lr_txt = args.lr_eval or args.lr_teacher_img, args.lr_eval or args.lr_teacher_txt
    if assignments is not None:  # the feature-centroid set: mean trunk output and text embedding per cluster
        txt2img = torch.tensor(data.train.txt2img, dtype=torch.long)
        outputs = inputs.train_outputs[0][txt2img]
        image_features, texts = coresets.centroid_pairs(outputs.flatten(1), data.train_text, assignments,
                                                        args.num_queries)
        config["trunk"] = inputs_trunk_key(args, model, device)
        save_distilled_set(path, None, texts, lr_img, lr_txt, 0, config, caption_indices=indices,
                           image_features=image_features.view(len(texts), *outputs.shape[1:]))
    else:
        chosen = coresets.coreset_pairs(data, indices, args.image_size, image_norm(args))
        save_distilled_set(path, chosen.images, chosen.texts, lr_img, lr_txt, 0, config,
                           caption_indices=chosen.caption_indices)
    print(f"selected {args.num_queries} pairs by {args.coreset} in {config['selection_seconds']:.0f}s -> {path}")
    return load_distilled_set(path), path


def inputs_trunk_key(args, model, device: torch.device) -> dict:
    return trunk_key(args.image_encoder, model.trunk.to(device), model.train_stages, args.image_size, image_norm(args))


def evaluation_model_check(args, model, images: torch.Tensor) -> None:
    """Fail early, with a clear message, when the evaluation encoder cannot take the set's images."""
    if images.shape[-1] != args.image_size or images.shape[-2] != args.image_size:
        raise UserError(f"the set's images are {images.shape[-2]}x{images.shape[-1]} px but --image_size is "
                        f"{args.image_size}; evaluate at the set's size")
    model.eval()
    try:
        with torch.no_grad():
            model.image_encoder(images[:2].float().cpu())
    except RuntimeError as err:
        raise UserError(f"image encoder {args.image_encoder} cannot take the set's {images.shape[-2]}x"
                        f"{images.shape[-1]} px images ({str(err).splitlines()[0]})") from None


def set_inputs(args, payload: dict, set_path: Path, model, device: torch.device) -> dict:
    """What the evaluation models train on from a set file: pixels in this run's normalisation, or trunk outputs
    (only for the trunk that made them)."""
    if "image_features" in payload:
        if not model.has_trunk or payload["config"].get("trunk") != inputs_trunk_key(args, model, device):
            raise UserError(f"{set_path} holds trunk outputs (a feature-level set), which only the frozen trunk that "
                            f"made them can train on: evaluate it with the same --image_encoder, --image_size, "
                            f"--image_norm and --train_stages")
        return {"trunk_outputs": payload["image_features"]}
    images = renormalize(payload["image_syn"], payload["config"].get("image_norm", "clip"), image_norm(args))
    evaluation_model_check(args, model, images)
    return {"images": images}


def main(argv=None) -> int:
    args = parse_args(argv)
    check_args(args)
    check_model_args(args)
    device = pick_device(args.device)
    started = time.time()
    payload, set_path = None, None
    if args.distilled:
        payload, set_path = load_distilled_set(args.distilled), Path(args.distilled)
        apply_file_settings(args, payload["config"])
    report_split = resolve_report_split(args)
    data = load_retrieval_data(args, device, progress=args.progress, extra_splits=(report_split,))
    model = inputs = None
    if payload is None and args.coreset:
        model = build_model(args, data.text_dim)
        needs_train = model.has_trunk and args.coreset in ("forgetting", *FEATURE_METHODS)
        inputs = inputs_from_args(args, data, model, device, args.progress, need_train=needs_train)
        payload, set_path = coreset_set(args, inputs, model, device)
    if payload is not None:
        file_identity = payload["config"].get("text_identity")
        if file_identity and file_identity != data.text_identity:
            raise UserError(f"{set_path} holds embeddings of text model {file_identity}, but the data is embedded "
                            f"with {data.text_identity}; pass the --text_encoder/--text_model it was made with")
        if payload["text_syn"].shape[1] != data.text_dim:
            raise UserError(f"{set_path} holds {payload['text_syn'].shape[1]}-d text embeddings, the text encoder "
                            f"gives {data.text_dim}-d")
    trained_with = args.image_encoder
    if args.eval_image_encoder and args.eval_image_encoder != args.image_encoder:
        args.image_encoder = args.eval_image_encoder
        model = inputs = None
    if model is None:
        model = build_model(args, data.text_dim)
    if inputs is None or (args.full and model.has_trunk and not inputs.cached):
        inputs = inputs_from_args(args, data, model, device, args.progress, need_train=args.full and model.has_trunk)
    lr = args.lr_eval or (payload["syn_lr_img"] if args.distilled else args.lr_teacher_img)
    lrs = args.lr_grid or [lr]

    if payload is not None:
        pairs = set_inputs(args, payload, set_path, model, device)
        source = payload["config"].get("source", "distilled")
        what = f"{len(payload['text_syn'])} pairs from {set_path} ({source})"
        make_loader = pair_batches(args, model, inputs, device, payload["text_syn"], **pairs)
        label = f"{source}-{len(payload['text_syn'])}"
        label += f" on {args.image_encoder}" if args.eval_image_encoder else ""
    else:
        what = f"full-data training ({len(data.train.captions)} pairs)"
        make_loader = lambda seed: inputs.train_batches(args.batch_train, seed)  # noqa: E731
        label = f"full-{len(data.train.captions)}"
    choice = f"lr chosen from {lrs} on {args.eval_split}" if len(lrs) > 1 else f"lr {lrs[0]:.4g}"
    print(f"evaluating {what} with {args.num_eval} x {args.image_encoder}: {choice}; reporting on {report_split}"
          + (f" (no {args.dataset} test split beside the others: the split used for choices)"
             if args.report_split == "auto" and report_split == args.eval_split != "test" else ""))
    result = judge(args, make_loader, lrs, inputs, device, args.num_eval, args.seed, report_split, args.tune_models,
                   args.progress, similarity=payload.get("similarity") if payload is not None else None)
    summary = result["metrics"]
    seconds = time.time() - started
    run = start_run(args, "evaluate")
    run.log({**{f"eval/{k}": v["mean"] for k, v in summary.items()},
             **{f"eval/{k}_std": v["std"] for k, v in summary.items()}})
    run.finish()
    print(format_table({f"{label} ({report_split})": summary}))
    print(f"{args.num_eval} models at lr {result['lr']:.4g}, {seconds:.0f}s")
    if args.out:
        config = {k: v for k, v in vars(args).items() if k != "explicit"}
        config.update(set_file=str(set_path) if set_path else None, set_config=payload["config"] if payload else None,
                      set_size=len(payload["text_syn"]) if payload else len(data.train.captions),
                      lr_used=result["lr"], image_encoder_of_set=trained_with, text_identity=data.text_identity,
                      image_norm_used=image_norm(args), device=str(device),
                      command=[Path(sys.argv[0]).name, *sys.argv[1:]] if argv is None else argv)
        atomic_write_json({"label": label, "metrics": summary, "split": report_split, "lr": result["lr"],
                           "tuning": result["tuning"], "selection_split": args.eval_split,
                           "selection_metrics": result["selection_metrics"], "config": config,
                           "seconds": round(seconds, 1)}, Path(args.out))
        print(f"wrote {args.out}")
    return 0


def cli() -> None:
    """Entry point of the installed command."""
    run_cli(main)


if __name__ == "__main__":
    cli()
