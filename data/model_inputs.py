"""What the model trains and is tested on: pixels through data loaders, or cached trunk outputs.

When the image encoder trains whole (the paper), training streams augmented images and evaluation
embeds the test-transformed images of the split. With a frozen trunk (networks/split.py), both use
the trunk's cached outputs instead (data/feature_cache.py): training batches draw one of the cached
views per pair, evaluation uses the plain view. `ModelInputs` hides the difference from the
training and evaluation loops.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from data.build import RetrievalData, eval_image_loader, train_loader
from data.feature_cache import FeatureBatches, cached_trunk_outputs, compute_trunk_outputs, trunk_key
from networks import image_norm
from settings.data import DataSettings
from settings.model import ModelSettings


@dataclass
class EvalImages:
    """An evaluation split's images as the model takes them: a loader of pixels or cached trunk outputs."""

    loader: object | None = None
    trunk_outputs: torch.Tensor | None = None

    @torch.no_grad()
    def embed(self, model, device: torch.device, progress: bool = False, batch_size: int = 1024) -> torch.Tensor:
        """Image features of every image of the split, in order (the model in evaluation mode)."""
        model.eval()
        if self.trunk_outputs is not None:
            return torch.cat([model.encode_trunk_output(chunk.to(device)) for chunk in self.trunk_outputs.split(batch_size)])
        return torch.cat([model.encode_image(images.to(device)) for images, _ in
                          tqdm(self.loader, desc="eval images", unit="batch", leave=False, disable=not progress)])


@dataclass
class ModelInputs:
    """The training pairs and evaluation splits of a run, as pixels or as cached trunk outputs."""

    data: RetrievalData
    image_size: int
    image_norm: str
    workers: int
    train_outputs: torch.Tensor | None = None  # [views, train images, ...] when the model has a trunk
    evals: dict[str, EvalImages] = field(default_factory=dict)

    @property
    def cached(self) -> bool:
        return self.train_outputs is not None

    def train_batches(self, batch_size: int, seed: int | None = None):
        """Shuffled training pairs: augmented pixels (a DataLoader) or cached trunk outputs (one view per pair)."""
        if self.cached:
            return FeatureBatches(self.train_outputs, self.data.train.txt2img, self.data.train_text, batch_size,
                                  0 if seed is None else seed)
        return train_loader(self.data, self.image_size, batch_size, self.workers, seed, self.image_norm)

    def eval_images(self, split: str | None = None) -> EvalImages:
        return self.evals[split or self.data.eval_name]


def prepare_inputs(data: RetrievalData, model, encoder_name: str, image_size: int, image_norm: str, views: int,
                   cache_dir, device: torch.device, batch_size: int, workers: int, progress: bool = True,
                   need_train: bool = True) -> ModelInputs:
    """Inputs for `model`'s structure: with a trunk, its outputs for the training images (views 0..`views`)
    and for every evaluation split, from the cache or computed once; else pixel loaders."""
    inputs = ModelInputs(data, image_size, image_norm, workers)
    if not model.has_trunk:
        inputs.evals = {name: EvalImages(loader=eval_image_loader(data, image_size, batch_size, workers, image_norm,
                                                                  name)) for name in data.splits}
        return inputs
    trunk = model.trunk.to(device)
    key = trunk_key(encoder_name, trunk, model.train_stages, image_size, image_norm)
    common = dict(cache_dir=cache_dir, device=device, batch_size=batch_size, workers=workers, progress=progress)
    if need_train:
        inputs.train_outputs = cached_trunk_outputs(trunk, key, data.train, data.dataset, "train",
                                                    list(range(views + 1)), **common)
    for name, split in data.splits.items():
        outputs = cached_trunk_outputs(trunk, key, split.images, data.dataset, name, [0], **common)
        inputs.evals[name] = EvalImages(trunk_outputs=outputs[0])
    return inputs


@torch.no_grad()
def trunk_outputs_of(model, images: torch.Tensor, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """The trunk's outputs for a set's pixels (a distilled set or a coreset), on the CPU."""
    dataset = torch.utils.data.TensorDataset(images.detach().cpu(), torch.arange(len(images)))
    return compute_trunk_outputs(model.trunk.to(device), dataset, device, batch_size, 0, False, "trunk outputs")


def inputs_for(settings: DataSettings, model_settings: ModelSettings, data: RetrievalData, model,
               device: torch.device, progress: bool = True, need_train: bool = True) -> ModelInputs:
    """`prepare_inputs` with a run's settings (encoder, size, normalisation, views, cache, batch, workers)."""
    return prepare_inputs(data, model, model_settings.image_encoder, model_settings.image_size,
                          image_norm(model_settings), settings.feature_views, settings.cache_dir, device,
                          settings.batch_size_test, settings.num_workers, progress, need_train)
