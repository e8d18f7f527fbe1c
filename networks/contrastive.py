"""The image-text model (image encoder + text projection head) and its contrastive loss (SPEC §3-4)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from networks.projection import ProjectionHead

TEMPERATURE = 0.07


def similarity_logits(image_features: torch.Tensor, text_features: torch.Tensor,
                      temperature: float = TEMPERATURE) -> torch.Tensor:
    """Cosine similarities scaled by 1/temperature: [images, texts]."""
    return F.normalize(image_features, dim=1) @ F.normalize(text_features, dim=1).t() / temperature


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                     temperature: float = TEMPERATURE) -> torch.Tensor:
    """Mean of the row-wise and column-wise cross-entropies with the diagonal as targets."""
    logits = similarity_logits(image_features, text_features, temperature)
    targets = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


def in_batch_accuracy(image_features: torch.Tensor, text_features: torch.Tensor) -> float:
    """Fraction of images whose most similar text in the batch is their own caption."""
    logits = similarity_logits(image_features.detach(), text_features.detach())
    return (logits.argmax(dim=1) == torch.arange(len(logits), device=logits.device)).float().mean().item()


class ImageTextModel(nn.Module):
    """Trainable parts of the retrieval model: the image encoder and the text projection head.

    The frozen text encoder is not part of it: texts enter as cached text-encoder embeddings.
    """

    def __init__(self, image_encoder: nn.Module, text_dim: int, dropout: float = 0.1):
        super().__init__()
        self.image_encoder = image_encoder
        self.image_dim = image_encoder.num_features
        self.text_projection = ProjectionHead(text_dim, self.image_dim, dropout)

    def forward(self, images: torch.Tensor, text_embeddings: torch.Tensor):
        """Returns (image features, projected text features)."""
        return self.image_encoder(images), self.text_projection(text_embeddings)
