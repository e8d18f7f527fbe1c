"""Judge a distilled set, a coreset of real pairs, or full-data training with the evaluation protocol.

Exactly one of:
  --distilled PATH        a saved distilled set (or a saved coreset: the same file format). Data set,
                          encoders, image size and evaluation settings come from the file unless
                          given on the command line; the learning rate is the learned step size.
  --coreset METHOD        choose --num_queries real training pairs (random, herding, kcenter,
                          forgetting), save them as a set file, and evaluate them the same way.
  --full                  train on the whole training split (the upper bound).
--num_eval fresh models (seeds --seed, --seed+1, ...) train --epoch_eval_train epochs (SGD, momentum
0.9, weight decay 5e-4, lr x0.1 half way) and are tested on --eval_split; the table shows mean ± std
over them. --eval_image_encoder trains another image encoder than the set was made with
(cross-architecture transfer). --out writes every metric, its runs and the full configuration as JSON.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from data.build import eval_image_loader, load_retrieval_data
from data.distilled_set import load_distilled_set, save_distilled_set
from matching.experts import check_buffer_matches, load_expert_weights, locate_buffer
from networks import build_model
from networks.image_encoders import IMAGE_ENCODERS
from utils import coresets
from utils.buffers import read_metadata
from utils.cli import UserError, run_cli
from utils.config import (
    add_data_args,
    add_eval_args,
    add_model_args,
    add_runtime_args,
    check_model_args,
    new_parser,
)
from utils.device import pick_device, seed_everything
from utils.evaluation import evaluate_full_data, evaluate_pairs
from utils.io import atomic_torch_save, atomic_write_json, safe_torch_load
from utils.metrics import format_table
from utils.wandb_logging import start_run

# Settings a distilled-set file supplies unless the command line gives them.
FILE_SETTINGS = ("dataset", "image_root", "ann_root", "cache_dir", "eval_split", "max_train_images", "text_encoder", "text_model",
                 "image_encoder", "image_size", "image_pretrained", "image_weights", "num_eval",
                 "epoch_eval_train", "batch_train", "dsa", "dsa_strategy", "image_projection", "lora_rank",
                 "loss_type")
# Settings that decide the forgetting counts (shared by coresets of every size).
FORGETTING_KEYS = ("seed", "dataset", "text_identity", "image_encoder", "image_size", "image_pretrained",
                   "image_weights", "forgetting_epochs", "forgetting_batch", "lr_teacher_img", "lr_teacher_txt",
                   "num_train_pairs")
# Settings that decide which pairs a coreset holds (per method); a saved coreset is reused only when
# all of them agree.
SELECTION_KEYS = ("source", "num_queries", "seed", "dataset", "text_identity", "image_size", "num_train_pairs")
MODEL_KEYS = ("image_encoder", "image_pretrained", "image_weights")
METHOD_KEYS = {"random": (), "herding": MODEL_KEYS + ("buffer_path", "expert_number", "expert_epoch"),
               "kcenter": MODEL_KEYS + ("buffer_path", "expert_number", "expert_epoch"),
               "forgetting": MODEL_KEYS + ("forgetting_epochs", "forgetting_batch", "lr_teacher_img", "lr_teacher_txt")}


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(__doc__)
    what = parser.add_argument_group("what to evaluate (exactly one)").add_mutually_exclusive_group(required=True)
    what.add_argument("--distilled", default=None, help="a distilled-set (or coreset) .pt file")
    what.add_argument("--coreset", default=None, choices=coresets.METHODS, help="select real pairs with this method")
    what.add_argument("--full", action="store_true", help="train on the whole training split")
    group = parser.add_argument_group("evaluation choices")
    group.add_argument("--num_queries", type=int, default=None, help="coreset size N (pairs)")
    group.add_argument("--lr_eval", type=float, default=None,
                       help="learning rate of the evaluation models (default: the set's learned step size; "
                            "for coresets and --full, --lr_teacher_img)")
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
                 "image_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.coreset == "forgetting" and args.forgetting_epochs < 2:
        raise UserError("--forgetting_epochs must be at least 2: a pair has to be seen twice to be forgotten")
    if args.lr_eval is not None and not args.lr_eval > 0:
        raise UserError(f"--lr_eval must be positive, got {args.lr_eval}")


def apply_file_settings(args, config: dict) -> None:
    """Take data, encoder and protocol settings from a set file where the command line is silent."""
    for key in FILE_SETTINGS:
        if key in config and key not in args.explicit:
            setattr(args, key, config[key])


def coreset_path(args) -> Path:
    if args.coreset_file:
        return Path(args.coreset_file)
    return Path("runs") / args.dataset / "coresets" / f"{args.coreset}_{args.num_queries}_seed{args.seed}.pt"


def selection_config(args, data) -> dict:
    config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}
    config.update(source=f"coreset:{args.coreset}", text_identity=data.text_identity,
                  num_train_pairs=len(data.train.captions))
    return config


def forgetting_counts(args, data, model, device: torch.device, config: dict) -> coresets.ForgettingCounter:
    """Forgetting events of an expert trained for the purpose; cached beside the coreset file, since
    coresets of every size (and their re-runs) can share one count."""
    path = coreset_path(args).parent / f"forgetting_counts_seed{args.seed}.pt"
    key = {k: config[k] for k in FORGETTING_KEYS}
    if path.exists():
        saved = safe_torch_load(path, "forgetting counts")
        if isinstance(saved, dict) and saved.get("key") == key:
            print(f"reusing the forgetting counts in {path}")
            return coresets.ForgettingCounter.from_counts(saved["events"], saved["ever_learned"])
    counter = coresets.count_forgetting(args, data, model, device, args.forgetting_epochs, args.seed, args.progress)
    atomic_torch_save({"key": key, "events": counter.events, "ever_learned": counter.ever_learned}, path)
    return counter


def select_coreset(args, data, device: torch.device, config: dict) -> torch.Tensor:
    """Indices of the chosen training pairs (captions); fills the expert used into `config`."""
    # One random stream per method, so that e.g. forgetting's tie-breaks are not the random coreset.
    generator = torch.Generator().manual_seed(args.seed + coresets.METHODS.index(args.coreset))
    num_pairs = len(data.train.captions)
    if args.coreset == "random":
        return coresets.select_random(num_pairs, args.num_queries, generator)
    seed_everything(args.seed)
    model = build_model(args, data.text_dim).to(device)
    if args.coreset == "forgetting":
        counter = forgetting_counts(args, data, model, device, config)
        config["forgetting"] = {"pairs_with_events": int((counter.events > 0).sum()),
                                "never_learned": int((~counter.ever_learned).sum())}
        return coresets.select_most_forgotten(counter.events, counter.ever_learned, args.num_queries, generator)
    directory = locate_buffer(args.buffer_path, args.dataset, args.image_encoder, args.text_encoder)
    meta = read_metadata(directory)
    expected = {"dataset": args.dataset, "image_encoder": args.image_encoder, "text_encoder": args.text_encoder,
                "text_model": data.text_identity, "image_size": args.image_size, "text_dim": data.text_dim}
    if meta and "train_pairs" in meta:  # buffers written before the key existed do not record it
        expected["train_pairs"] = len(data.train.captions)
    check_buffer_matches(meta, directory, expected)
    number, epoch = load_expert_weights(model, directory, meta, args.expert_number, args.expert_epoch)
    config["expert_used"] = {"directory": str(directory.resolve()), "number": number, "epoch": epoch}
    features = coresets.pair_features(model, data, args.image_size, args.batch_size_test, args.num_workers, device,
                                      args.progress)
    if args.coreset == "herding":
        return coresets.select_herding(features, args.num_queries)
    first = int(torch.randint(num_pairs, (1,), generator=generator))
    return coresets.select_kcenter(features, args.num_queries, first)


def coreset_set(args, data, device: torch.device) -> tuple[dict, Path]:
    """The coreset as a set payload: reused from --coreset_file when it was made the same way."""
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
    indices = select_coreset(args, data, device, config)
    chosen = coresets.coreset_pairs(data, indices, args.image_size)
    config["selection_seconds"] = round(time.time() - started, 1)
    lr_img, lr_txt = args.lr_eval or args.lr_teacher_img, args.lr_eval or args.lr_teacher_txt
    save_distilled_set(path, chosen.images, chosen.texts, lr_img, lr_txt, 0, config,
                       caption_indices=chosen.caption_indices)
    print(f"selected {args.num_queries} pairs by {args.coreset} in {config['selection_seconds']:.0f}s -> {path}")
    return load_distilled_set(path), path


def evaluation_model_check(args, text_dim: int, images: torch.Tensor) -> None:
    """Fail early, with a clear message, when the evaluation encoder cannot take the set's images."""
    if images.shape[-1] != args.image_size or images.shape[-2] != args.image_size:
        raise UserError(f"the set's images are {images.shape[-2]}x{images.shape[-1]} px but --image_size is "
                        f"{args.image_size}; evaluate at the set's size")
    model = build_model(args, text_dim).eval()
    try:
        with torch.no_grad():
            model.image_encoder(images[:2].float().cpu())
    except RuntimeError as err:
        raise UserError(f"image encoder {args.image_encoder} cannot take the set's {images.shape[-2]}x"
                        f"{images.shape[-1]} px images ({str(err).splitlines()[0]})") from None


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
    data = load_retrieval_data(args, device, progress=args.progress)
    if payload is None and args.coreset:
        payload, set_path = coreset_set(args, data, device)
    if payload is not None:
        file_identity = payload["config"].get("text_identity")
        if file_identity and file_identity != data.text_identity:
            raise UserError(f"{set_path} holds embeddings of text model {file_identity}, but the data is embedded "
                            f"with {data.text_identity}; pass the --text_encoder/--text_model it was made with")
        if payload["text_syn"].shape[1] != data.text_dim:
            raise UserError(f"{set_path} holds {payload['text_syn'].shape[1]}-d text embeddings, the text encoder "
                            f"gives {data.text_dim}-d")
    trained_with = args.image_encoder
    if args.eval_image_encoder:
        args.image_encoder = args.eval_image_encoder
    if payload is not None:
        evaluation_model_check(args, data.text_dim, payload["image_syn"])
    lr = args.lr_eval or (payload["syn_lr_img"] if args.distilled else args.lr_teacher_img)

    eval_loader = eval_image_loader(data, args.image_size, args.batch_size_test, args.num_workers)
    if payload is not None:
        what = f"{len(payload['image_syn'])} pairs from {set_path} ({payload['config'].get('source', 'distilled')})"
        print(f"evaluating {what} with {args.num_eval} x {args.image_encoder} on {args.eval_split}, lr {lr:.4g}")
        summary = evaluate_pairs(args, payload["image_syn"], payload["text_syn"], lr, data, eval_loader, device,
                                 args.num_eval, args.seed, args.progress, similarity=payload.get("similarity"))
        label = f"{payload['config'].get('source', 'distilled')}-{len(payload['image_syn'])}"
        label += f" on {args.image_encoder}" if args.eval_image_encoder else ""
    else:
        print(f"evaluating full-data training ({len(data.train.captions)} pairs) with {args.num_eval} x "
              f"{args.image_encoder} on {args.eval_split}, lr {lr:.4g}")
        summary = evaluate_full_data(args, data, lr, eval_loader, device, args.num_eval, args.seed, args.progress)
        label = f"full-{len(data.train.captions)}"
    seconds = time.time() - started
    run = start_run(args, "evaluate")
    run.log({**{f"eval/{k}": v["mean"] for k, v in summary.items()},
             **{f"eval/{k}_std": v["std"] for k, v in summary.items()}})
    run.finish()
    print(format_table({label: summary}))
    print(f"{args.num_eval} models, {seconds:.0f}s")
    if args.out:
        config = {k: v for k, v in vars(args).items() if k != "explicit"}
        config.update(set_file=str(set_path) if set_path else None, set_config=payload["config"] if payload else None,
                      set_size=len(payload["image_syn"]) if payload else len(data.train.captions),
                      lr_used=lr, image_encoder_of_set=trained_with, text_identity=data.text_identity,
                      device=str(device), command=[Path(sys.argv[0]).name, *sys.argv[1:]] if argv is None else argv)
        atomic_write_json({"label": label, "metrics": summary, "config": config, "seconds": round(seconds, 1)},
                          Path(args.out))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
