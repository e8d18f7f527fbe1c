"""Models: image encoders, frozen text encoders, the projection heads and the contrastive model."""
from __future__ import annotations

from networks.contrastive import (
    LOSS_TYPES,
    ImageTextModel,
    contrastive_loss,
    in_batch_accuracy,
    similarity_logits,
    trainable_parameters,
)
from networks.image_encoders import IMAGE_ENCODERS, check_image_size, create_image_encoder, resolve_image_norm
from networks.lora import add_lora
from networks.projection import ProjectionHead
from networks.text_encoders import TEXT_ENCODERS, FrozenTextEncoder, text_encoder_identity
from settings.model import ModelSettings

__all__ = [
    "LOSS_TYPES", "ImageTextModel", "contrastive_loss", "trainable_parameters", "trainable_parts",
    "in_batch_accuracy", "similarity_logits", "IMAGE_ENCODERS", "create_image_encoder", "ProjectionHead",
    "TEXT_ENCODERS", "FrozenTextEncoder", "text_encoder_identity", "build_model", "add_lora", "image_norm",
    "check_image_size",
]


def build_model(settings: ModelSettings, text_dim: int) -> ImageTextModel:
    """A fresh image-text model (image encoder, size, pretrained weights, `--lora_rank` adapters,
    `--train_stages`, `--image_projection`)."""
    encoder = create_image_encoder(settings.image_encoder, settings.image_size, pretrained=settings.image_pretrained,
                                   weights=settings.image_weights)
    if settings.lora_rank:
        encoder = add_lora(encoder, settings.image_encoder, settings.lora_rank)
    return ImageTextModel(encoder, text_dim, image_projection=settings.image_projection,
                          train_stages=settings.trainable_stages, encoder_name=settings.image_encoder)


def trainable_parts(settings: ModelSettings) -> list[str]:
    """What experts train and buffers hold, image side first (recorded in buffer_meta.json)."""
    stages = settings.trainable_stages
    projection = ["image_projection"] if settings.image_projection else []
    if stages:
        return [f"image_encoder.last{stages}_stages", *projection, "text_projection"]
    if stages == 0:
        return [*projection, "text_projection"]
    if settings.lora_rank:
        return [f"image_encoder.lora_r{settings.lora_rank}", "text_projection"]
    return ["image_encoder", *projection, "text_projection"]


def image_norm(settings: ModelSettings) -> str:
    """The input normalisation of this run's images (`--image_norm`, resolved for `auto`)."""
    return resolve_image_norm(settings.image_norm, settings.image_encoder, settings.pretrained)
