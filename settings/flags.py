"""The command-line surface shared by buffer.py, distill.py and evaluate.py.

Flag names and defaults follow the reference implementation, so its README commands work here.
"""
from __future__ import annotations

import argparse
import datetime

from data.build import DATASETS, default_cache_dir
from networks.contrastive import LOSS_TYPES
from networks.image_encoders import IMAGE_ENCODERS, IMAGE_NORMS
from networks.lora import LORA_TARGETS
from networks.text_encoders import TEXT_ENCODERS
from networks import effective_train_stages
from utils.cli import UserError, add_bool_flag


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def new_parser(description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)


def add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default="flickr", choices=DATASETS,
                       help="flickr = Flickr30K, coco = COCO (Karpathy split), flickr8k, or shapes (embedded, "
                            "generated on first use, no download)")
    group.add_argument("--image_root", default=None,
                       help="folder the annotation 'image' paths are relative to (shapes: generated in --cache_dir)")
    group.add_argument("--ann_root", default=None,
                       help="folder of the annotation JSON files (IMAGE_ROOT/annotations when not given)")
    group.add_argument("--eval_split", default="val", choices=("test", "val"),
                       help="split for the evaluations that make choices (experts' epochs, distillation's best "
                            "iteration, learning rates); evaluate.py reports final numbers on --report_split (the "
                            "reference evaluates on test)")
    group.add_argument("--max_train_images", type=int, default=None,
                       help="train on the first K training images only (with all their captions): CPU-sized runs")
    add_bool_flag(group, "--skip_bad_images", False, "leave out pairs whose image is missing instead of stopping")
    group.add_argument("--cache_dir", default=default_cache_dir(),
                       help="where the generated shapes data set and text-embedding caches live "
                            "(env VL_DISTILL_CACHE)")
    group.add_argument("--feature_views", type=int, default=2,
                       help="with a frozen trunk (--train_stages K / --image_projection): augmented views cached per "
                            "training image besides the plain one; training draws one view per pair and epoch "
                            "(0 = the plain view only, no augmentation)")
    group.add_argument("--num_workers", type=int, default=2, help="data-loading worker processes")
    group.add_argument("--batch_size_test", type=int, default=128, help="batch size when embedding evaluation images")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--image_encoder", default="nfnet", choices=IMAGE_ENCODERS, help="image encoder")
    group.add_argument("--text_encoder", default="bert", choices=TEXT_ENCODERS,
                       help="frozen text encoder (bert = BERT-base; minilm = packaged all-MiniLM-L6-v2)")
    group.add_argument("--text_model", default=None,
                       help="hub id or local folder of the text model (bert default: bert-base-uncased, "
                            "must already be on disk)")
    group.add_argument("--image_size", type=int, default=224, help="image side in pixels")
    add_bool_flag(group, "--image_pretrained", True,
                  "start the image encoder from pretrained weights (offline: packaged for efficientnet_lite0, "
                  "else --image_weights)")
    group.add_argument("--image_weights", default=None, help="local checkpoint for the image encoder")
    group.add_argument("--image_norm", default="auto", choices=IMAGE_NORMS,
                       help="input normalisation: auto = what the encoder's pretrained weights expect (timm's "
                            "pretrained_cfg: inception = mean/std 0.5 for efficientnet_lite0 and vit, imagenet for "
                            "the others), the reference's clip statistics for an encoder trained from scratch; or "
                            "a name to force one (clip reproduces the reference everywhere)")
    group.add_argument("--train_stages", type=train_stages_value, default=None, metavar="all|K",
                       help="how much of the image encoder trains: all (the paper), or only its last K stages (the "
                            "frozen stages below run once per image and their outputs are cached, so experts and "
                            "evaluation train over cached tensors); 0 = frozen, with --image_projection. Default: "
                            "all, or 0 with --image_projection")
    add_bool_flag(group, "--image_projection", False,
                  "RepBlend's symmetric projection matching: freeze the image encoder at its (pretrained) weights and "
                  "train an image projection head beside the text head; experts and distillation then hold the two "
                  "heads only")
    group.add_argument("--lora_rank", type=int, default=0,
                       help="rank of LoRA adapters on the attention and MLP layers of a transformer image encoder "
                            "(vit); the backbone is frozen and the adapters are what experts train and distillation "
                            "matches (0 = off, the whole encoder trains)")
    group.add_argument("--loss_type", default="infonce", choices=LOSS_TYPES,
                       help="contrastive loss: infonce = cross-entropy over rows and columns (the paper); with a "
                            "learned similarity (--sim_type) the soft-target losses of LoRS: wbce, bce, kl, mse")


def train_stages_value(text: str) -> str | int:
    """`--train_stages`: "all" or a whole number of stages K >= 0."""
    if str(text).strip().lower() == "all":
        return "all"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected all or a number of stages, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"the number of trainable stages cannot be negative, got {value}")
    return value


def add_eval_args(parser: argparse.ArgumentParser, batch_train_default: int = 64) -> None:
    """The evaluation protocol: fresh models trained on a (synthetic or real) set, then retrieval."""
    group = parser.add_argument_group("evaluation (train fresh models on the set, then test retrieval)")
    group.add_argument("--num_eval", type=int, default=5, help="fresh models per evaluation (mean ± std over them)")
    group.add_argument("--epoch_eval_train", type=int, default=50, help="epochs each evaluation model trains")
    group.add_argument("--batch_train", type=int, default=batch_train_default,
                       help="batch size when training evaluation models")
    add_bool_flag(group, "--dsa", False,
                  "differentiable augmentation of synthetic images in student steps and evaluation training "
                  "(the reference parses --dsa but never applies it; off by default as there)")
    group.add_argument("--dsa_strategy", default="color_crop_cutout_flip_scale_rotate",
                       help="DSA operations, joined by _")


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("runtime and logging")
    group.add_argument("--seed", type=int, default=0, help="random seed")
    group.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    group.add_argument("--wandb_mode", default="offline", choices=("online", "offline", "disabled"),
                       help="wandb logging mode; offline needs no account or network (sync later with `wandb sync`)")
    group.add_argument("--wandb_project", default="vl-distill", help="wandb project")
    group.add_argument("--wandb_entity", default=None, help="wandb entity (team or user)")
    group.add_argument("--name", default=datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S"),
                       help="wandb run name")
    add_bool_flag(group, "--progress", True, "show progress bars")


def check_model_args(args) -> None:
    """Model flags that cannot go together, as one-line errors."""
    if args.lora_rank < 0:
        raise UserError(f"--lora_rank must be 0 (off) or positive, got {args.lora_rank}")
    if args.lora_rank and args.image_encoder not in LORA_TARGETS:
        raise UserError(f"--lora_rank is for transformer encoders ({', '.join(LORA_TARGETS)}), "
                        f"not --image_encoder {args.image_encoder}")
    if args.image_projection and not (args.image_pretrained or args.image_weights):
        raise UserError("--image_projection freezes the image encoder at its pretrained weights: it needs "
                        "--image_pretrained True (packaged weights) or --image_weights; a frozen random encoder "
                        "would differ between the experts and every evaluation model")
    stages = effective_train_stages(args)
    if stages == 0 and not args.image_projection:
        raise UserError("--train_stages 0 freezes the whole image encoder: add --image_projection True so that an "
                        "image head trains on top of it")
    if stages is not None and not (args.image_pretrained or args.image_weights):
        raise UserError(f"--train_stages {stages} keeps the lower part of the image encoder frozen at its "
                        f"pretrained weights: it needs --image_pretrained True or --image_weights")
    if stages is not None and args.lora_rank:
        raise UserError("--lora_rank and --train_stages exclude each other: adapters train inside the whole encoder")
    if getattr(args, "feature_views", 0) < 0:
        raise UserError(f"--feature_views must be 0 or more, got {args.feature_views}")
    if args.lora_rank and args.image_projection:
        raise UserError("--lora_rank and --image_projection exclude each other: adapters train inside the encoder, "
                        "the projection keeps it frozen")
