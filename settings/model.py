"""The image-text model: image encoder, how much of it trains, frozen text encoder, contrastive loss."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from settings.base import Settings, a_path, at_least, setting
from settings.choices import IMAGE_ENCODERS, IMAGE_NORMS, LORA_ENCODERS, LOSS_TYPES, TEXT_ENCODERS
from utils.cli import UserError


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


# The encoders here are made for 224-384 px; a side beyond this is a typo whose first batch would not fit in memory.
MAX_IMAGE_SIZE = 1024


@dataclass
class ModelSettings(Settings):
    title = "model"

    image_encoder: str = setting("nfnet", "image encoder", choices=IMAGE_ENCODERS)
    text_encoder: str = setting("bert", "frozen text encoder (bert = BERT-base; minilm = packaged all-MiniLM-L6-v2; "
                                        "mpnet = packaged all-mpnet-base-v2, assembled in --cache_dir on first use)",
                                choices=TEXT_ENCODERS)
    text_model: str | None = setting(None, "hub id or local folder of the text model (bert default: "
                                           "bert-base-uncased, must already be on disk)", check=a_path)
    image_size: int = setting(224, "image side in pixels", check=at_least(1, MAX_IMAGE_SIZE))
    image_pretrained: bool = setting(True, "start the image encoder from pretrained weights (offline: packaged for "
                                           "efficientnet_lite0/1/2, else --image_weights)")
    image_weights: str | None = setting(None, "local checkpoint for the image encoder", check=a_path)
    image_norm: str = setting("auto", "input normalisation: auto = what the encoder's pretrained weights expect "
                                      "(timm's pretrained_cfg: inception = mean/std 0.5 for efficientnet_lite0/1/2 and vit, "
                                      "imagenet for the others), the reference's clip statistics for an encoder "
                                      "trained from scratch; or a name to force one (clip reproduces the reference "
                                      "everywhere)", choices=IMAGE_NORMS)
    train_stages: str | int | None = setting(
        None, "how much of the image encoder trains: all (the paper), or only its last K stages (the frozen stages "
              "below run once per image and their outputs are cached, so experts and evaluation train over cached "
              "tensors); 0 = frozen, with --image_projection. Default: all, or 0 with --image_projection",
        parse=train_stages_value, metavar="all|K")
    image_projection: bool = setting(False, "RepBlend's symmetric projection matching: freeze the image encoder at "
                                            "its (pretrained) weights and train an image projection head beside the "
                                            "text head; experts and distillation then hold the two heads only")
    lora_rank: int = setting(0, "rank of LoRA adapters on the attention and MLP layers of a transformer image encoder "
                                "(vit); the backbone is frozen and the adapters are what experts train and "
                                "distillation matches (0 = off, the whole encoder trains)", check=at_least(0))
    loss_type: str = setting("infonce", "contrastive loss: infonce = cross-entropy over rows and columns (the paper); "
                                        "with a learned similarity (--sim_type) the soft-target losses of LoRS: wbce, "
                                        "bce, kl, mse", choices=LOSS_TYPES)

    @property
    def pretrained(self) -> bool:
        """Whether the image encoder starts from pretrained weights (packaged or --image_weights)."""
        return bool(self.image_pretrained or self.image_weights)

    @property
    def trainable_stages(self) -> int | None:
        """`--train_stages` as the model takes it: None = the whole encoder trains; not given means all, or a
        frozen encoder (0) with `--image_projection`."""
        if self.train_stages is None:
            return 0 if self.image_projection else None
        return None if self.train_stages == "all" else int(self.train_stages)

    def check(self) -> None:
        if self.lora_rank and self.image_encoder not in LORA_ENCODERS:
            raise UserError(f"--lora_rank is for transformer encoders ({', '.join(LORA_ENCODERS)}), "
                            f"not --image_encoder {self.image_encoder}")
        if self.image_projection and not self.pretrained:
            raise UserError("--image_projection freezes the image encoder at its pretrained weights: it needs "
                            "--image_pretrained True (packaged weights) or --image_weights; a frozen random encoder "
                            "would differ between the experts and every evaluation model")
        stages = self.trainable_stages
        if stages == 0 and not self.image_projection:
            raise UserError("--train_stages 0 freezes the whole image encoder: add --image_projection True so that "
                            "an image head trains on top of it")
        if stages is not None and not self.pretrained:
            raise UserError(f"--train_stages {stages} keeps the lower part of the image encoder frozen at its "
                            f"pretrained weights: it needs --image_pretrained True or --image_weights")
        if stages is not None and self.lora_rank:
            raise UserError("--lora_rank and --train_stages exclude each other: adapters train inside the whole "
                            "encoder")
        if self.lora_rank and self.image_projection:
            raise UserError("--lora_rank and --image_projection exclude each other: adapters train inside the "
                            "encoder, the projection keeps it frozen")
