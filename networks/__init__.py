"""Models: image encoders, frozen text encoders, the projection head and the contrastive model."""
from networks.contrastive import (
    LOSS_TYPES,
    ImageTextModel,
    contrastive_loss,
    in_batch_accuracy,
    similarity_logits,
    trainable_parameters,
)
from networks.image_encoders import IMAGE_ENCODERS, create_image_encoder, resolve_image_norm
from networks.lora import add_lora
from networks.projection import ProjectionHead
from networks.text_encoders import TEXT_ENCODERS, FrozenTextEncoder, text_encoder_identity

__all__ = ["LOSS_TYPES", "ImageTextModel", "contrastive_loss", "trainable_parameters", "trainable_parts",
           "in_batch_accuracy", "similarity_logits", "IMAGE_ENCODERS", "create_image_encoder", "ProjectionHead",
           "TEXT_ENCODERS", "FrozenTextEncoder", "text_encoder_identity", "build_model", "add_lora",
           "effective_train_stages", "image_norm"]


def effective_train_stages(args) -> int | None:
    """`--train_stages` (None when not given, "all", or K) as the model takes it: None = the whole encoder
    trains; not given means all, or a frozen encoder (0) with `--image_projection`."""
    stages = getattr(args, "train_stages", None)
    if stages is None:
        return 0 if getattr(args, "image_projection", False) else None
    return None if stages == "all" else int(stages)


def build_model(args, text_dim: int) -> ImageTextModel:
    """A fresh image-text model from the shared flags (image encoder, size, pretrained weights,
    `--lora_rank` adapters, `--train_stages`, `--image_projection`)."""
    encoder = create_image_encoder(args.image_encoder, args.image_size,
                                   pretrained=args.image_pretrained, weights=args.image_weights)
    if getattr(args, "lora_rank", 0):
        encoder = add_lora(encoder, args.image_encoder, args.lora_rank)
    return ImageTextModel(encoder, text_dim, image_projection=getattr(args, "image_projection", False),
                          train_stages=effective_train_stages(args), encoder_name=args.image_encoder)


def trainable_parts(args) -> list[str]:
    """What experts train and buffers hold, image side first (recorded in buffer_meta.json)."""
    stages = effective_train_stages(args)
    projection = ["image_projection"] if getattr(args, "image_projection", False) else []
    if stages:
        return [f"image_encoder.last{stages}_stages", *projection, "text_projection"]
    if stages == 0:
        return [*projection, "text_projection"]
    if getattr(args, "lora_rank", 0):
        return [f"image_encoder.lora_r{args.lora_rank}", "text_projection"]
    return ["image_encoder", *projection, "text_projection"]


def image_norm(args) -> str:
    """The input normalisation of this run's images (`--image_norm`, resolved for `auto`)."""
    return resolve_image_norm(getattr(args, "image_norm", "clip"), args.image_encoder,
                              bool(args.image_pretrained or args.image_weights))
