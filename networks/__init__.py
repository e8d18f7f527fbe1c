"""Models: image encoders, frozen text encoders, the projection head and the contrastive model."""
from networks.contrastive import ImageTextModel, contrastive_loss, in_batch_accuracy, similarity_logits
from networks.image_encoders import IMAGE_ENCODERS, create_image_encoder
from networks.projection import ProjectionHead
from networks.text_encoders import TEXT_ENCODERS, FrozenTextEncoder, text_encoder_identity

__all__ = ["ImageTextModel", "contrastive_loss", "in_batch_accuracy", "similarity_logits", "IMAGE_ENCODERS",
           "create_image_encoder", "ProjectionHead", "TEXT_ENCODERS", "FrozenTextEncoder", "text_encoder_identity",
           "build_model"]


def build_model(args, text_dim: int) -> ImageTextModel:
    """A fresh image-text model from the shared flags (image encoder, size, pretrained weights)."""
    encoder = create_image_encoder(args.image_encoder, args.image_size,
                                   pretrained=args.image_pretrained, weights=args.image_weights)
    return ImageTextModel(encoder, text_dim)
