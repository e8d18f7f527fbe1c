"""Pictures and readable views of a synthetic set: image grids and nearest real captions."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image


def image_grids(image_syn: torch.Tensor, nrow: int = 10, clip_std: float = 2.5) -> dict[str, torch.Tensor]:
    """Two grids of the synthetic images, each image scaled to [0, 1] on its own: as they are, and
    clipped to mean ± `clip_std` standard deviations first (outlier pixels otherwise wash out the rest)."""
    images = torch.nan_to_num(image_syn.detach().float().cpu())
    mean, std = images.mean(), images.std()
    clipped = images.clamp(mean - clip_std * std, mean + clip_std * std)
    return {"plain": make_grid(images, nrow=nrow, normalize=True, scale_each=True),
            "clipped": make_grid(clipped, nrow=nrow, normalize=True, scale_each=True)}


def save_image_grids(image_syn: torch.Tensor, directory: Path, tag: str) -> dict[str, Path]:
    paths = {}
    for kind, grid in image_grids(image_syn).items():
        paths[kind] = Path(directory) / f"synthetic_images_{kind}_{tag}.png"
        save_image(grid, paths[kind])
    return paths


def nearest_caption_indices(text_syn: torch.Tensor, real_text: torch.Tensor,
                            count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each synthetic text embedding, the index of the real caption embedding with the highest cosine
    similarity, and that similarity; with `count`, the `count` nearest ([N, count], nearest first)."""
    sims = F.normalize(text_syn.detach().float().cpu(), dim=1) @ F.normalize(real_text.float().cpu(), dim=1).t()
    best, index = sims.max(dim=1) if count is None else sims.topk(min(count, sims.shape[1]), dim=1)
    return index, best


def nearest_captions(text_syn: torch.Tensor, real_text: torch.Tensor, captions: list[str]) -> list[tuple[str, float]]:
    """For each synthetic text embedding, the real training caption with the highest cosine similarity."""
    index, best = nearest_caption_indices(text_syn, real_text)
    return [(captions[i], float(s)) for i, s in zip(index.tolist(), best.tolist())]


def write_nearest_captions(pairs: list[tuple[str, float]], path: Path) -> Path:
    lines = [f"{k}\t{sim:.4f}\t{caption}" for k, (caption, sim) in enumerate(pairs)]
    Path(path).write_text("synthetic_index\tcosine\tnearest_real_caption\n" + "\n".join(lines) + "\n")
    return Path(path)
