"""The image-text model (image encoder + text projection head) and its contrastive loss (docs/method.md)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from networks.projection import ProjectionHead
from networks.split import split_encoder
from settings.base import MIN_PAIRS
from settings.choices import LOSS_TYPES
from utils.errors import SettingError, UserError

TEMPERATURE = 0.07


def check_pair_count(pairs: int, what: str) -> None:
    """Refuse to train contrastively on fewer than MIN_PAIRS (2) pairs; `what` names the set or split.

    Over a batch of one pair InfoNCE's only logit is its own target: the loss is 0 whatever the weights and its
    gradient is exactly zero (so is `kl`'s), and even the sigmoid losses see no negative to push away."""
    if pairs < MIN_PAIRS:
        raise UserError(f"{what} has {pairs} image-caption pair{'s' if pairs != 1 else ''}: contrastive training "
                        f"needs at least {MIN_PAIRS} (over one pair the loss is 0 whatever the weights, so nothing "
                        f"would train)")


def similarity_logits(image_features: torch.Tensor, text_features: torch.Tensor,
                      temperature: float = TEMPERATURE) -> torch.Tensor:
    """Cosine similarities scaled by 1/temperature: [images, texts]."""
    return F.normalize(image_features, dim=1) @ F.normalize(text_features, dim=1).t() / temperature


KL_TARGET_SHARPNESS = 10.0  # `kl`: a row of S becomes the distribution softmax(10 · row), as in LoRS


def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-(1/N) Σ_i Σ_j t_ij log softmax(logits_i)_j: the cross-entropy of each row against its target row.

    The mean over the rows is taken by `F.nll_loss` over one class (the row sums as that class's log
    probabilities), the reduction `F.cross_entropy` with class labels uses. With identity targets a row
    sum is exactly its diagonal log-probability (the other terms are ±0), so the value and the gradients
    (first and second order) are bit-identical to the hard-label path (`F.cross_entropy(logits, arange)`;
    tested on CPU, tests/test_extensions_properties.py); `.mean()` or
    `F.cross_entropy(logits, targets)` with probability targets sum in another order and differ in the
    last bits of the value."""
    row_sums = (targets * F.log_softmax(logits, dim=1)).sum(dim=1, keepdim=True)
    return F.nll_loss(row_sums, torch.zeros(len(row_sums), dtype=torch.long, device=logits.device))


def _kl(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """KL(softmax(10 · targets) ‖ softmax(logits)) of the rows, averaged over all N·M entries (LoRS's
    `KLDivLoss(reduction="mean")`: the sum over the matrix divided by its size, not by the N rows). The
    mean is taken here: PyTorch warns that its `reduction="mean"` will come to mean "batchmean"."""
    return F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(KL_TARGET_SHARPNESS * targets, dim=1),
                    reduction="none", log_target=True).mean()


def _weighted_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(mean BCE over the positives (target > 0.5) + mean BCE over the negatives) / 2, as in LoRS; a part
    with no entries counts as 0 (no positives: half the negatives' mean).

    Deliberate differences from LoRS's code: the BCE is `binary_cross_entropy_with_logits` (exact and
    stable for large |logits|) rather than -t·log(σ + 1e-6) - (1-t)·log(1 - σ + 1e-6), whose 1e-6 caps
    an entry's loss near -log(1e-6) ≈ 13.8 and shifts it where σ or 1 - σ comes near 1e-6 (|logit| ≳ 10;
    elsewhere the two agree to about 1e-6 relative); and each part is divided by its count, not by
    count + 1e-6 (a relative 1e-6 / count)."""
    losses = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    positive = targets.detach() > 0.5
    parts = [torch.where(mask, losses, 0.0).sum() / mask.sum().clamp(min=1) for mask in (positive, ~positive)]
    return (parts[0] + parts[1]) / 2


def soft_target_loss(logits: torch.Tensor, targets: torch.Tensor, loss_type: str) -> torch.Tensor:
    """The contrastive loss of [images, texts] logits against a target similarity matrix (`--loss_type`):
    infonce = cross-entropy against the rows and the columns of the targets, averaged; wbce = weighted
    binary cross-entropy of sigmoid(logits); bce = plain binary cross-entropy; kl = KL divergence from
    softmax(10 · targets) to softmax(logits), rows and columns, each averaged over the matrix's entries;
    mse = squared error of sigmoid(logits)."""
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
    raise SettingError("loss_type", loss_type, f"unknown loss type {loss_type!r}; choose from {', '.join(LOSS_TYPES)}")


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
    image side is `image_tower(trunk(images))`: `trunk` is the frozen lower part of the image encoder
    (evaluation mode; nothing, when the whole encoder trains), `image_tower` the trainable rest: the
    encoder's top stages (networks/split.py), followed by an image projection head (the text head's
    design, image_dim -> image_dim) with `image_projection` (RepBlend's symmetric projection matching).

    - `train_stages=None`: the whole encoder trains (the paper); no trunk.
    - `train_stages=0`: the encoder is frozen; needs `image_projection` (something must train).
    - `train_stages=K`: the encoder's last K stages train, the stages below are the trunk.
    `train_stages="auto"` (the default) means a frozen encoder (0) with `image_projection`, else None. `image_part` (the tower) is the
    module whose trainable parameters experts record and distillation matches on the image side.
    """

    def __init__(self, image_encoder: nn.Module, text_dim: int, dropout: float = 0.1, image_projection: bool = False,
                 train_stages: int | None | str = "auto", encoder_name: str = "this encoder"):
        super().__init__()
        if train_stages == "auto":
            train_stages = 0 if image_projection else None
        if train_stages == 0 and not image_projection:
            raise SettingError("train_stages", 0, "a frozen image encoder (0 stages train) needs an image projection "
                                                  "head to train", see_also=("image_projection",))
        self.image_encoder = image_encoder
        self.image_dim = image_encoder.num_features
        self.train_stages = train_stages
        trunk, top = split_encoder(image_encoder, train_stages, encoder_name)
        self.trunk = trunk
        self.image_projection = ProjectionHead(self.image_dim, self.image_dim, dropout) if image_projection else None
        self.image_tower = top if self.image_projection is None else nn.Sequential(top, self.image_projection)
        self.text_projection = ProjectionHead(text_dim, self.image_dim, dropout)
        for param in trunk.parameters():
            param.requires_grad_(False)
        self.trunk.eval()

    @property
    def has_trunk(self) -> bool:
        """Whether a frozen lower part exists whose outputs can be computed once and cached."""
        return self.train_stages is not None

    @property
    def image_part(self) -> nn.Module:
        return self.image_tower

    def train(self, mode: bool = True):
        super().train(mode)
        self.trunk.eval()  # frozen: its BatchNorm keeps its pretrained statistics, no dropout
        return self

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_tower(self.trunk(images))

    def encode_trunk_output(self, trunk_output: torch.Tensor) -> torch.Tensor:
        """Image features from the trunk's output (cached features): the tower alone."""
        return self.image_tower(trunk_output)

    def forward(self, images: torch.Tensor, text_embeddings: torch.Tensor, from_trunk: bool = False):
        """Returns (image features, projected text features); `from_trunk`: `images` are trunk outputs."""
        image_features = self.encode_trunk_output(images) if from_trunk else self.encode_image(images)
        return image_features, self.text_projection(text_embeddings)
