"""Initial values of the learned synthetic set (docs/method.md)."""
from __future__ import annotations

import torch

from data.build import RetrievalData
from data.datasets import load_rgb
from data.transforms import test_transform, train_transform
from utils.cli import UserError

# Mean and std of BERT-base [CLS] embeddings used by the reference for `--txt_init noise`.
BERT_TEXT_MEAN, BERT_TEXT_STD = -0.0094, 0.5253


def real_pairs(data: RetrievalData, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(image indices, caption indices) of `count` training pairs with distinct images, at random."""
    num_images = len(data.train.image_paths)
    if count > num_images:
        raise UserError(f"--num_pairs {count} is larger than the {num_images} training images")
    images = torch.randperm(num_images, generator=generator)[:count]
    captions = torch.tensor([data.train.img2txt[i][int(torch.randint(len(data.train.img2txt[i]), (1,),
                                                                      generator=generator))]
                             for i in images.tolist()], dtype=torch.long)
    return images, captions


def transformed_images(data: RetrievalData, image_indices: torch.Tensor, image_size: int,
                       augment: bool = True, norm: str = "clip") -> torch.Tensor:
    """Training images through the training transform (the reference's real initialisation), or
    through the deterministic test transform with `augment=False`."""
    transform = train_transform(image_size, norm) if augment else test_transform(image_size, norm)
    return torch.stack([transform(load_rgb(data.train.image_paths[i])) for i in image_indices.tolist()])


def initial_synthetic_set(data: RetrievalData, count: int, image_size: int, pix_init: str, txt_init: str,
                          text_encoder: str, generator: torch.Generator, norm: str = "clip",
                          chosen: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`real`: random training pairs (augmented images, as the reference); `clean`: the same pairs
    through the test transform (no augmentation); `kmeans`: the `chosen` training pairs (captions, e.g. the
    k-means coreset) through the test transform; `noise`: Gaussian pixels with the real per-channel statistics
    and Gaussian text embeddings (the reference's BERT statistics for bert, the cached ones otherwise)."""
    if pix_init == "kmeans":
        if chosen is None or len(chosen) != count:
            raise ValueError(f"--pix_init kmeans needs the {count} chosen pairs")
        caption_indices = chosen.long()
        image_indices = torch.tensor(data.train.txt2img, dtype=torch.long)[caption_indices]
        pix_init = "clean"
    else:
        image_indices, caption_indices = real_pairs(data, count, generator)
    if pix_init in ("real", "clean"):
        images = transformed_images(data, image_indices, image_size, augment=pix_init == "real", norm=norm)
    else:
        sample = transformed_images(data, real_pairs(data, min(count, 256), generator)[0], image_size, norm=norm)
        mean, std = sample.mean(dim=(0, 2, 3)), sample.std(dim=(0, 2, 3))
        noise = torch.randn(count, 3, image_size, image_size, generator=generator)
        images = noise * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)
    if txt_init == "real":
        texts = data.train_text[caption_indices].clone()
    else:
        mean, std = ((BERT_TEXT_MEAN, BERT_TEXT_STD) if text_encoder == "bert"
                     else (data.train_text.mean().item(), data.train_text.std().item()))
        texts = torch.randn(count, data.text_dim, generator=generator) * std + mean
    return images, texts
