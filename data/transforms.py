"""Train and test image transforms (torchvision), with the input normalisation an encoder expects.

Normalisation statistics by name (`--image_norm`): `clip` is what the reference applies to every
encoder; pretrained weights expect the statistics they were trained with (timm's `pretrained_cfg`:
`imagenet` for most ImageNet weights, `inception` = mean 0.5 / std 0.5 for the TensorFlow-ported
EfficientNet-Lite0 and ViT weights). networks/image_encoders.py picks one for `--image_norm auto`; the statistics
themselves live in networks/normalization.py.
"""
from __future__ import annotations

from torch.nn import functional as F
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from networks.normalization import NORMALIZATIONS


def normalize(norm: str = "clip") -> transforms.Normalize:
    if norm not in NORMALIZATIONS:
        raise ValueError(f"unknown image normalisation {norm!r}; choose one of {', '.join(NORMALIZATIONS)}")
    return transforms.Normalize(*NORMALIZATIONS[norm])


def train_transform(image_size: int, norm: str = "clip") -> transforms.Compose:
    """RandomResizedCrop(0.5–1, bicubic), horizontal flip, RandAugment(2, 5), tensor, normalisation."""
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(0.5, 1.0), interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.RandAugment(num_ops=2, magnitude=5),
        transforms.ToTensor(),
        normalize(norm),
    ])


def test_transform(image_size: int, norm: str = "clip") -> transforms.Compose:
    """Resize to a square (bicubic), tensor, normalisation."""
    return transforms.Compose([
        transforms.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        normalize(norm),
    ])


def renormalize(images, source: str, target: str):
    """Pixels normalised with `source` statistics, re-expressed with `target`'s (same raw image)."""
    if source == target:
        return images
    (m0, s0), (m1, s1) = NORMALIZATIONS[source], NORMALIZATIONS[target]
    view = lambda values: images.new_tensor(values).view(1, 3, 1, 1)  # noqa: E731
    return (images * view(s0) + view(m0) - view(m1)) / view(s1)


def resize_images(images, size: int):
    """[N, C, size, size]: square images (any normalisation: both modes are linear in the pixels) resized, each
    output pixel the mean of the input area it covers when shrinking (exact average pooling for a whole factor),
    bilinear when growing."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    mode = {"mode": "area"} if size < images.shape[-1] else {"mode": "bilinear", "align_corners": False}
    return F.interpolate(images.float(), size=(size, size), **mode).to(images.dtype)
