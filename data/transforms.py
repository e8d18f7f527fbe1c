"""Train and test image transforms of SPEC §5 (torchvision)."""
from __future__ import annotations

from torchvision import transforms
from torchvision.transforms import InterpolationMode

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize() -> transforms.Normalize:
    return transforms.Normalize(CLIP_MEAN, CLIP_STD)


def train_transform(image_size: int) -> transforms.Compose:
    """RandomResizedCrop(0.5–1, bicubic), horizontal flip, RandAugment(2, 5), tensor, CLIP normalisation."""
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(0.5, 1.0), interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.RandAugment(num_ops=2, magnitude=5),
        transforms.ToTensor(),
        normalize(),
    ])


def test_transform(image_size: int) -> transforms.Compose:
    """Resize to a square (bicubic), tensor, CLIP normalisation."""
    return transforms.Compose([
        transforms.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        normalize(),
    ])
