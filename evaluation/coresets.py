"""Coresets of real training pairs, the baselines a distilled set is compared with (docs/evaluation-protocol.md).

A pair is one training caption with its image. Five ways to choose N of them:
- `random`: uniform without replacement.
- `herding`: greedy; each pick keeps the running mean of the chosen pairs' joint embeddings as
  close as possible to the mean over all pairs.
- `kcenter`: greedy farthest-point traversal of the joint embeddings (the k-center heuristic).
- `forgetting`: the pairs forgotten most often (correct -> incorrect retrieval of their partner
  inside the training batch) while a fresh expert trains on the whole training set.
- `kmeans`: k-means (scikit-learn, k-means++ seeding) on the joint embeddings with N clusters;
  each cluster is represented by the real pair nearest its centroid, all N pairs distinct.
The joint embedding of a pair is [normalised image embedding, normalised projected text
embedding] under a trained expert from the buffer. The selected pairs become tensors (images
through the deterministic test transform, cached text embeddings) and are saved in the
distilled-set file format, so evaluation treats a coreset exactly like a distilled set.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F
from torch.optim.swa_utils import update_bn
from tqdm import tqdm

from data.build import RetrievalData
from data.datasets import ImageDataset, load_rgb
from data.transforms import test_transform
from experts.files import load_expert_weights
from networks import image_norm
from networks.contrastive import similarity_logits
from settings.data import DataSettings
from settings.model import ModelSettings
from settings.choices import CORESET_METHODS
from utils.cli import UserError
from evaluation.training import sgd_pair, train_one_epoch

# New methods go at the end: callers seed with METHODS.index(method), so existing offsets must not move.
METHODS = CORESET_METHODS


def select_random(num_pairs: int, count: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randperm(num_pairs, generator=generator)[:count]


def select_herding(features: torch.Tensor, count: int) -> torch.Tensor:
    """Greedy herding: pick k+1 minimises ‖mean(all) − (sum of picks + x_i)/(k+1)‖ over unpicked i."""
    # In the features' own dtype: one pass over [pairs, dim] per pick is the whole cost (memory-bound).
    features = features.contiguous()
    mean = features.mean(dim=0)
    norms = (features * features).sum(dim=1)
    total = torch.zeros_like(mean)
    taken = torch.zeros(len(features), dtype=torch.bool)
    picks = []
    for k in range(count):
        # ‖(total + x)/(k+1) − mean‖² up to terms that do not depend on x, times (k+1)².
        cost = norms + 2 * features @ (total - (k + 1) * mean)
        cost[taken] = float("inf")
        i = int(torch.argmin(cost))
        picks.append(i)
        taken[i] = True
        total += features[i]
    return torch.tensor(picks, dtype=torch.long)


def select_kcenter(features: torch.Tensor, count: int, first: int) -> torch.Tensor:
    """Farthest-point order from `first`: each pick is the point farthest from all earlier picks."""
    # In the features' own dtype: one pass over [pairs, dim] per pick is the whole cost (memory-bound).
    features = features.contiguous()
    norms = (features * features).sum(dim=1)

    def squared_distance_to(i: int) -> torch.Tensor:
        return (norms - 2 * features @ features[i] + norms[i]).clamp_min_(0)

    picks = [first]
    distance = squared_distance_to(first)
    for _ in range(count - 1):
        i = int(torch.argmax(distance))
        picks.append(i)
        distance = torch.minimum(distance, squared_distance_to(i))
    return torch.tensor(picks, dtype=torch.long)


def select_most_forgotten(events: torch.Tensor, ever_learned: torch.Tensor, count: int,
                          generator: torch.Generator) -> torch.Tensor:
    """The `count` pairs forgotten most often; pairs never retrieved at all rank first (as if forgotten
    infinitely often, as Toneva et al. count them); ties are broken at random (under `generator`)."""
    score = torch.where(ever_learned, events.double(), torch.tensor(float("inf"), dtype=torch.double))
    order = torch.randperm(len(events), generator=generator)
    ranked = order[torch.sort(score[order], descending=True, stable=True).indices]
    return ranked[:count]


def joint_features(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """[pairs, Di+Dt] float32: each pair's image row and text row scaled to unit length, side by side."""
    if len(image_features) != len(text_features):
        raise ValueError(f"{len(image_features)} image rows but {len(text_features)} text rows")
    return torch.cat([F.normalize(image_features.float(), dim=1), F.normalize(text_features.float(), dim=1)], dim=1)


def kmeans_clusters(features: torch.Tensor, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding (scikit-learn, one initialisation, fixed by `seed`).

    Returns the [count, D] float32 centroids and each row's cluster as a [pairs] long tensor."""
    from sklearn.cluster import KMeans  # imported here: only this method needs scikit-learn

    num_pairs = len(features)
    if count < 1:
        raise UserError(f"k-means needs at least 1 cluster, got {count}")
    if count > num_pairs:
        raise UserError(f"k-means cannot make {count} clusters from only {num_pairs} pairs")
    points = features.detach().cpu().float().numpy()
    fitted = KMeans(n_clusters=count, n_init=1, random_state=seed).fit(points)
    centroids = torch.from_numpy(fitted.cluster_centers_.astype("float32", copy=False))
    return centroids, torch.from_numpy(fitted.labels_).long()


def nearest_distinct(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """For each centroid in turn, the row of `features` closest to it (Euclidean) among the rows not
    yet given to an earlier centroid; exact ties go to the lower index. [centroids] long, all distinct."""
    if len(centroids) > len(features):
        raise ValueError(f"{len(centroids)} centroids cannot each get their own row of {len(features)}")
    # Squared distances up to the per-centroid constant ‖c‖², in float64 so near ties rank correctly;
    # centroids go in blocks so that a [block, pairs] matrix stays around 16M entries.
    points = features.detach().cpu().double()
    centres = centroids.detach().cpu().double()
    norms = (points * points).sum(dim=1)
    taken = torch.zeros(len(points), dtype=torch.bool)
    picks = []
    block = max(1, (1 << 24) // max(1, len(points)))
    for start in range(0, len(centres), block):
        distances = norms - 2 * centres[start:start + block] @ points.T
        for row in distances:
            row[taken] = float("inf")
            i = int(torch.argmin(row))
            picks.append(i)
            taken[i] = True
    return torch.tensor(picks, dtype=torch.long)


def select_kmeans(features: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """`count` distinct pairs: k-means on `features`, then the pair nearest each centroid (in
    centroid order; a pair already claimed by an earlier centroid passes to the next nearest one)."""
    centroids, _ = kmeans_clusters(features, count, seed)
    return nearest_distinct(features, centroids)


def centroid_pairs(image_features: torch.Tensor, text_features: torch.Tensor, assignments: torch.Tensor,
                   count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The feature-centroid set: per cluster, the average of its members' raw (not normalised) image
    features and of their raw text features. Returns ([count, Di], [count, Dt]) in the inputs' dtypes."""
    assignments = assignments.detach().cpu().long()
    if not len(image_features) == len(text_features) == len(assignments):
        raise ValueError(f"{len(image_features)} image rows, {len(text_features)} text rows and "
                         f"{len(assignments)} assignments do not match")
    if len(assignments) and (int(assignments.min()) < 0 or int(assignments.max()) >= count):
        raise ValueError(f"cluster assignments must lie in [0, {count}), got {int(assignments.min())}.."
                         f"{int(assignments.max())}")
    sizes = torch.bincount(assignments, minlength=count)
    empty = (sizes == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"{len(empty)} of {count} clusters have no members (first: {empty[:5]})")

    def means(rows: torch.Tensor) -> torch.Tensor:
        rows = rows.detach().cpu()
        totals = torch.zeros(count, rows.shape[1], dtype=torch.double).index_add_(0, assignments, rows.double())
        return (totals / sizes.unsqueeze(1).double()).to(rows.dtype)

    return means(image_features), means(text_features)


class ForgettingCounter:
    """Counts, per pair, transitions from 'partner retrieved' to 'partner not retrieved' in its batch.

    A pair counts as retrieved when, inside its training batch, its image's most similar text is its
    own caption and its caption's most similar image is its own image.
    """

    def __init__(self, num_pairs: int):
        self.events = torch.zeros(num_pairs, dtype=torch.long)
        self.was_correct = torch.zeros(num_pairs, dtype=torch.bool)
        self.ever_learned = torch.zeros(num_pairs, dtype=torch.bool)

    @classmethod
    def from_counts(cls, events: torch.Tensor, ever_learned: torch.Tensor) -> ForgettingCounter:
        counter = cls(len(events))
        counter.events, counter.ever_learned = events.clone(), ever_learned.clone()
        return counter

    def update(self, pair_indices: torch.Tensor, image_features: torch.Tensor, text_features: torch.Tensor) -> None:
        logits = similarity_logits(image_features, text_features)
        target = torch.arange(len(logits), device=logits.device)
        correct = ((logits.argmax(dim=1) == target) & (logits.argmax(dim=0) == target)).cpu()
        pair_indices = pair_indices.cpu()
        self.events[pair_indices] += (self.was_correct[pair_indices] & ~correct).long()
        self.was_correct[pair_indices] = correct
        self.ever_learned[pair_indices] |= correct


def count_forgetting(lr_img: float, lr_txt: float, data: RetrievalData, model, device: torch.device, epochs: int,
                     loader, progress: bool = True) -> ForgettingCounter:
    """Train `model` on all training pairs (`loader`: shuffled batches of pixels or cached trunk outputs)
    like an expert (plain SGD at `lr_img` / `lr_txt`) and count each pair's forgetting events."""
    counter = ForgettingCounter(len(data.train.captions))
    optimizers = sgd_pair(model, lr_img, lr_txt)
    for epoch in tqdm(range(epochs), desc="forgetting expert", unit="epoch", disable=not progress):
        train_one_epoch(model, loader, optimizers, device, progress, desc=f"epoch {epoch}",
                        on_batch=lambda batch, img, txt: counter.update(batch[2], img, txt))
    return counter


def pooled_trunk_outputs(trunk_outputs: torch.Tensor) -> torch.Tensor:
    """[items, D]: a frozen trunk's outputs, average-pooled over space when they are feature maps."""
    return trunk_outputs.flatten(2).mean(dim=2) if trunk_outputs.dim() > 2 else trunk_outputs


def frozen_pair_features(trunk_outputs: torch.Tensor, data: RetrievalData) -> torch.Tensor:
    """[pairs, D_trunk + D_text] joint features without any training: each pair's image as the frozen
    trunk sees it (its plain-view output, pooled) beside its raw text-encoder embedding, each part
    L2-normalised."""
    images = pooled_trunk_outputs(trunk_outputs)
    txt2img = torch.tensor(data.train.txt2img, dtype=torch.long)
    return joint_features(images[txt2img], data.train_text)


@torch.no_grad()
def pair_features(model, data: RetrievalData, image_size: int, batch_size: int, workers: int,
                  device: torch.device, progress: bool = True, norm: str = "clip") -> torch.Tensor:
    """[pairs, 2·image_dim] joint embeddings: normalised image features beside normalised projected texts.

    Parameter snapshots hold no normalisation statistics, so encoders with BatchNorm first get
    their running statistics recomputed on the training images."""
    loader = torch.utils.data.DataLoader(ImageDataset(data.train, test_transform(image_size, norm)),
                                         batch_size=batch_size, shuffle=False, num_workers=workers)
    model.to(device)
    trained_encoder = not model.has_trunk  # a frozen encoder keeps its pretrained statistics
    if trained_encoder and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                               for m in model.image_encoder.modules()):
        update_bn(tqdm(loader, desc="BatchNorm statistics", unit="batch", leave=False, disable=not progress),
                  model.image_encoder, device)
    model.eval()
    images = torch.cat([model.encode_image(x.to(device)).cpu() for x, _ in
                        tqdm(loader, desc="embed train images", unit="batch", leave=False, disable=not progress)])
    texts = torch.cat([model.text_projection(t.to(device)).cpu() for t in data.train_text.split(4096)])
    txt2img = torch.tensor(data.train.txt2img, dtype=torch.long)
    return torch.cat([F.normalize(images, dim=1)[txt2img], F.normalize(texts, dim=1)], dim=1)


def expert_pair_features(model, directory, meta: dict, data: RetrievalData, settings: DataSettings,
                         model_settings: ModelSettings, device: torch.device, number: int | None = None,
                         epoch: int | None = None, progress: bool = True) -> tuple[torch.Tensor, tuple[int, int]]:
    """Joint embeddings of the training pairs under buffer expert `number` at snapshot `epoch` (default: the
    lowest expert, its last snapshot), and the (number, epoch) used."""
    used = load_expert_weights(model, directory, meta, number, epoch)
    features = pair_features(model, data, model_settings.image_size, settings.batch_size_test, settings.num_workers,
                             device, progress, image_norm(model_settings))
    return features, used


@dataclass
class Coreset:
    caption_indices: torch.Tensor  # training pairs chosen, in selection order
    images: torch.Tensor  # [N, 3, H, W] test-transformed pixels
    texts: torch.Tensor  # [N, text_dim] cached text embeddings


def coreset_pairs(data: RetrievalData, caption_indices: torch.Tensor, image_size: int, norm: str = "clip") -> Coreset:
    transform = test_transform(image_size, norm)
    images = torch.stack([transform(load_rgb(data.train.image_paths[data.train.txt2img[c]]))
                          for c in caption_indices.tolist()])
    return Coreset(caption_indices, images, data.train_text[caption_indices].clone())


def check_count(count: int, num_pairs: int) -> None:
    if count < 1:
        raise UserError(f"--coreset_size must be at least 1, got {count}")
    if count > num_pairs:
        raise UserError(f"--coreset_size {count} is larger than the {num_pairs} training pairs")
