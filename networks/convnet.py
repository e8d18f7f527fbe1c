"""The standard dataset-distillation ConvNet (depth 3, width 128, instance norm, ReLU, avg-pool)."""
from __future__ import annotations

import torch
from torch import nn

from utils.errors import SettingError


class ConvNet(nn.Module):
    """`depth` blocks of conv3x3 -> instance norm -> ReLU -> 2x2 average pooling, then flatten.

    Instance norm is a GroupNorm with one group per channel (affine), as in the dataset
    distillation literature; it has no running statistics, so the network behaves the same in
    train and eval mode. The feature size follows from the input size:
    ``width * (image_size // 2**depth) ** 2``.
    """

    def __init__(self, image_size: int, channels: int = 3, width: int = 128, depth: int = 3):
        super().__init__()
        if image_size % (2 ** depth):
            raise SettingError("image_size", image_size, f"the ConvNet of depth {depth} needs an image size "
                                                         f"divisible by {2 ** depth}, got {image_size}")
        layers: list[nn.Module] = []
        in_ch = channels
        for _ in range(depth):
            layers += [nn.Conv2d(in_ch, width, kernel_size=3, padding=1),
                       nn.GroupNorm(width, width, affine=True),
                       nn.ReLU(inplace=False),
                       nn.AvgPool2d(kernel_size=2, stride=2)]
            in_ch = width
        self.features = nn.Sequential(*layers)
        self.depth = depth
        self.num_features = width * (image_size // 2 ** depth) ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.features(x), 1)
