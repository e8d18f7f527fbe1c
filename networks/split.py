"""Splitting an image encoder into a frozen trunk and a trainable top (the train_stages setting).

An encoder is seen as a chain `stem -> stage 1 -> ... -> stage S -> neck`, whose composition is the
encoder's own forward pass (the neck is what follows the last stage: a final convolution, pooling,
flattening). Training "the last K stages" means the trunk `stem -> stage 1 .. S-K` is frozen
(evaluation mode, pretrained weights and BatchNorm statistics) and the top
`stage S-K+1 .. S -> neck` trains. Because the trunk never changes, its outputs for the training
images can be computed once and cached (data/feature_cache.py); experts, evaluation models and the
distillation's student then run the top alone.

- `None` (all stages train): no trunk; the whole encoder is the top (the paper).
- `0`: the whole encoder is the trunk (frozen; a trainable image projection head sits on top).
- `1 .. S`: the last K stages train (the neck always trains with them).

The stages are the encoder family's own units: timm EfficientNet `blocks[i]`, ResNet `layer1..4`,
NF-Net `stages[i]`, the project's ConvNet conv blocks. Other encoders (ViT) take `None` or `0`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from networks.convnet import ConvNet
from utils.errors import SettingError


class PoolHead(nn.Module):
    """Global pooling (flattened) followed by the encoder's feature dropout, as timm's `forward_head`
    does with `num_classes=0`; the dropout follows this module's own train/eval mode."""

    def __init__(self, global_pool: nn.Module, drop_rate: float):
        super().__init__()
        self.global_pool = global_pool
        self.drop_rate = float(drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.global_pool(x)
        return F.dropout(x, p=self.drop_rate, training=self.training) if self.drop_rate > 0 else x


def encoder_chain(encoder: nn.Module) -> tuple[nn.Module, list[nn.Module], nn.Module] | None:
    """(stem, stages, neck) sharing the encoder's own modules, or None for a family that is not split."""
    from timm.models.efficientnet import EfficientNet
    from timm.models.nfnet import NormFreeNet
    from timm.models.resnet import ResNet

    if isinstance(encoder, EfficientNet):
        return (nn.Sequential(encoder.conv_stem, encoder.bn1), list(encoder.blocks),
                nn.Sequential(encoder.conv_head, encoder.bn2, PoolHead(encoder.global_pool, encoder.drop_rate)))
    if isinstance(encoder, ResNet):
        return (nn.Sequential(encoder.conv1, encoder.bn1, encoder.act1, encoder.maxpool),
                [encoder.layer1, encoder.layer2, encoder.layer3, encoder.layer4],
                PoolHead(encoder.global_pool, encoder.drop_rate))
    if isinstance(encoder, NormFreeNet):
        return (encoder.stem, list(encoder.stages),
                nn.Sequential(encoder.final_conv, encoder.final_act, encoder.head))
    if isinstance(encoder, ConvNet):
        layers = list(encoder.features)
        per_block = len(layers) // encoder.depth
        stages = [nn.Sequential(*layers[i:i + per_block]) for i in range(0, len(layers), per_block)]
        return nn.Identity(), stages, nn.Flatten(1)
    return None


def num_stages(encoder: nn.Module) -> int | None:
    chain = encoder_chain(encoder)
    return None if chain is None else len(chain[1])


def split_encoder(encoder: nn.Module, train_stages: int | None, name: str = "this encoder") -> tuple[nn.Module, nn.Module]:
    """(trunk, top) with `top(trunk(x)) == encoder(x)`; the trunk is what stays frozen."""
    if train_stages is None:
        return nn.Identity(), encoder
    if train_stages == 0:
        return encoder, nn.Identity()
    chain = encoder_chain(encoder)
    if chain is None:
        raise SettingError("train_stages", train_stages,
                           f"{name} cannot be split into stages, so {train_stages} cannot train: give all "
                           f"(everything trains) or 0 (frozen, with an image projection head)",
                           see_also=("image_projection",))
    stem, stages, neck = chain
    if not 0 < train_stages <= len(stages):
        raise SettingError("train_stages", train_stages, f"{name} has {len(stages)} stages, not {train_stages}: "
                                                         f"give 0 to {len(stages)} or all")
    cut = len(stages) - train_stages
    return nn.Sequential(stem, *stages[:cut]), nn.Sequential(*stages[cut:], neck)
