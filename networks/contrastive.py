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


LOSS_TYPES = ("infonce", "wbce", "bce", "kl", "mse")
KL_TARGET_SHARPNESS = 10.0  # `kl`: a row of S becomes the distribution softmax(10 · row), as in LoRS


def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def _kl(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(KL_TARGET_SHARPNESS * targets, dim=1),
                    reduction="batchmean", log_target=True)


def _weighted_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE averaged over the positives (target > 0.5) and over the negatives separately, then averaged."""
    losses = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    positive = targets.detach() > 0.5
    parts = [losses[mask].mean() for mask in (positive, ~positive) if mask.any()]
    return sum(parts) / len(parts)


def soft_target_loss(logits: torch.Tensor, targets: torch.Tensor, loss_type: str) -> torch.Tensor:
    """The contrastive loss of [images, texts] logits against a target similarity matrix (`--loss_type`):
    infonce = cross-entropy against the rows and the columns of the targets, averaged; wbce = weighted
    binary cross-entropy of sigmoid(logits); bce = plain binary cross-entropy; kl = KL divergence from
    softmax(10 · targets) to softmax(logits), rows and columns; mse = squared error of sigmoid(logits)."""
    if loss_type == "infonce":
        return (_soft_cross_entropy(logits, targets) + _soft_cross_entropy(logits.t(), targets.t())) / 2
    if loss_type == "kl":
        return (_kl(logits, targets) + _kl(logits.t(), targets.t())) / 2
    if loss_type == "wbce":
        return _weighted_bce(logits, targets)
    if loss_type == "bce":
        return F.binary_cross_entropy_with_logits(logits, targets)
    if loss_type == "mse":
        return F.mse_loss(torch.sigmoid(logits), targets)
    raise ValueError(f"unknown loss type {loss_type!r}; choose from {', '.join(LOSS_TYPES)}")


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, targets: torch.Tensor | None = None,
                     loss_type: str = "infonce", temperature: float = TEMPERATURE) -> torch.Tensor:
    """The paper's loss by default: the mean of the row-wise and column-wise cross-entropies with the
    diagonal as targets. `targets` (a [images, texts] similarity, e.g. a learned S[idx, idx]) and
    `loss_type` give the soft-target losses of LoRS; no targets means the identity."""
    logits = similarity_logits(image_features, text_features, temperature)
    if targets is None and loss_type == "infonce":
        labels = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    if targets is None:
        targets = torch.eye(len(logits), dtype=logits.dtype, device=logits.device)
    return soft_target_loss(logits, targets, loss_type)


def in_batch_accuracy(image_features: torch.Tensor, text_features: torch.Tensor) -> float:
    """Fraction of images whose most similar text in the batch is their own caption."""
    logits = similarity_logits(image_features.detach(), text_features.detach())
    return (logits.argmax(dim=1) == torch.arange(len(logits), device=logits.device)).float().mean().item()


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters that training changes (all of them, but for frozen backbones and adapters)."""
    return [p for p in module.parameters() if p.requires_grad]


class ImageTextModel(nn.Module):
    """Trainable parts of the retrieval model: the image side and the text projection head.

    The frozen text encoder is not part of it: texts enter as cached text-encoder embeddings. The
    image side is the whole image encoder (the paper), or with `image_projection` a projection head
    (the text head's design, image_dim -> image_dim) over a frozen encoder run in eval mode
    (RepBlend's symmetric projection matching). `image_part` is the module whose trainable
    parameters experts record and distillation matches on the image side.
    """

    def __init__(self, image_encoder: nn.Module, text_dim: int, dropout: float = 0.1, image_projection: bool = False):
        super().__init__()
        self.image_encoder = image_encoder
        self.image_dim = image_encoder.num_features
        self.image_projection = ProjectionHead(self.image_dim, self.image_dim, dropout) if image_projection else None
        self.text_projection = ProjectionHead(text_dim, self.image_dim, dropout)
        if image_projection:
            for param in image_encoder.parameters():
                param.requires_grad_(False)

    @property
    def image_part(self) -> nn.Module:
        return self.image_projection if self.image_projection is not None else self.image_encoder

    def train(self, mode: bool = True):
        super().train(mode)
        if self.image_projection is not None:
            self.image_encoder.eval()  # frozen: its BatchNorm keeps its pretrained statistics
        return self

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        features = self.image_encoder(images)
        return features if self.image_projection is None else self.image_projection(features)

    def forward(self, images: torch.Tensor, text_embeddings: torch.Tensor):
        """Returns (image features, projected text features)."""
        return self.encode_image(images), self.text_projection(text_embeddings)
