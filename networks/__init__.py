"""Models: image encoders, frozen text encoders, the projection head and the contrastive model."""
from networks.contrastive import (
    LOSS_TYPES,
    ImageTextModel,
    contrastive_loss,
    in_batch_accuracy,
    similarity_logits,
    trainable_parameters,
)
from networks.image_encoders import IMAGE_ENCODERS, create_image_encoder
from networks.lora import add_lora
from networks.projection import ProjectionHead
from networks.text_encoders import TEXT_ENCODERS, FrozenTextEncoder, text_encoder_identity

__all__ = ["LOSS_TYPES", "ImageTextModel", "contrastive_loss", "trainable_parameters", "trainable_parts",
           "in_batch_accuracy", "similarity_logits", "IMAGE_ENCODERS", "create_image_encoder", "ProjectionHead",
           "TEXT_ENCODERS", "FrozenTextEncoder", "text_encoder_identity", "build_model", "add_lora"]


def build_model(args, text_dim: int) -> ImageTextModel:
    """A fresh image-text model from the shared flags (image encoder, size, pretrained weights,
    `--lora_rank` adapters, `--image_projection`)."""
    encoder = create_image_encoder(args.image_encoder, args.image_size,
                                   pretrained=args.image_pretrained, weights=args.image_weights)
    if getattr(args, "lora_rank", 0):
        encoder = add_lora(encoder, args.image_encoder, args.lora_rank)
    return ImageTextModel(encoder, text_dim, image_projection=getattr(args, "image_projection", False))


def trainable_parts(args) -> list[str]:
    """What experts train and buffers hold, image side first (recorded in buffer_meta.json)."""
    if getattr(args, "image_projection", False):
        return ["image_projection", "text_projection"]
    if getattr(args, "lora_rank", 0):
        return [f"image_encoder.lora_r{args.lora_rank}", "text_projection"]
    return ["image_encoder", "text_projection"]
