"""The features reduce.py chooses pairs by: what a frozen encoder sees of each pair, and, with an expert of
buffer.py, where its trained heads put the image and the text in one space.

Without an expert a pair is its frozen image trunk's (pooled) output beside its frozen text embedding, each scaled
to unit length: good for clustering and near-duplicates, but an image and a text cannot be compared there, so the
methods that rank by alignment need the expert. With one, the image head (on the trunk output) and the text head
(on the text embedding) map both into the space the expert learned contrastively; the pair's embedding is the two
unit vectors side by side and its alignment their cosine.
"""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from data.build import RetrievalData, load_retrieval_data
from data.feature_cache import cached_trunk_outputs, trunk_key
from evaluation.coresets import joint_features, pooled_trunk_outputs
from experts.files import check_buffer_matches, expected_metadata, load_expert_weights, locate_buffer, read_metadata
from networks import build_model, image_norm
from reduction.select import PairFeatures
from settings.data import DataSettings
from settings.model import ModelSettings
from utils.errors import SettingError

CHUNK = 65_536  # rows per pass through the heads: bounded memory at any data size


def frozen_model(model_settings: ModelSettings, text_dim: int):
    """The model whose frozen trunk gives the image features; an encoder that trains whole has none to reuse."""
    model = build_model(model_settings, text_dim)
    if not model.has_trunk:
        raise SettingError("train_stages", model_settings.train_stages,
                           "reduce.py reads the features of a frozen image encoder: give --train_stages 0 (the whole "
                           "encoder frozen) with --image_projection True, or --train_stages K for a frozen lower part",
                           see_also=("image_projection",))
    return model.eval()


def load_expert(model, model_settings: ModelSettings, data_settings: DataSettings, data: RetrievalData,
                buffer_path: str, number: int | None) -> dict:
    """Copy an expert's trained heads into `model` (its last snapshot); returns what was used, for the report.
    The expert must have been trained with this data set and these encoders (checked as distill.py does)."""
    directory = locate_buffer(buffer_path, data_settings.dataset, model_settings.image_encoder,
                              model_settings.text_encoder)
    meta = read_metadata(directory)
    check_buffer_matches(meta, directory, expected_metadata(data_settings, model_settings, data.text_identity,
                                                            data.text_dim))
    used, epoch = load_expert_weights(model, directory, meta, number)
    return {"directory": str(directory.resolve()), "number": used, "epoch": epoch}


@torch.no_grad()
def aligned(model, image_rows: torch.Tensor, text_rows: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-length image and text embeddings through the expert's heads, chunk by chunk."""
    images = torch.cat([F.normalize(model.encode_trunk_output(c.to(device)).float(), dim=1).cpu()
                        for c in image_rows.split(CHUNK)])
    texts = torch.cat([F.normalize(model.text_projection(c.to(device)).float(), dim=1).cpu()
                       for c in text_rows.split(CHUNK)])
    return images, texts


def side_by_side(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """[pairs, Di + Dt] float32: the coresets' joint features (each pair's unit image row beside its unit text
    row), scaled to unit length: a pair's embedding for the reduction methods."""
    return joint_features(images, texts) / math.sqrt(2.0)


def annotated_features(data_settings: DataSettings, model_settings: ModelSettings, buffer_path: str | None,
                       expert_number: int | None, device: torch.device,
                       progress: bool = True) -> tuple[PairFeatures, RetrievalData, dict]:
    """The training split of an annotated data set (Flickr, COCO, flickr8k, shapes), each pair's features, and
    what made them. The trunk outputs and text embeddings come from the caches every program shares (computed on
    a miss), the plain view only."""
    data = load_retrieval_data(data_settings, model_settings, device, progress, train_only=True)
    model = frozen_model(model_settings, data.text_dim).to(device)
    key = trunk_key(model_settings.image_encoder, model.trunk, model.train_stages, model_settings.image_size,
                    image_norm(model_settings))
    outputs = cached_trunk_outputs(model.trunk, key, data.train, data.dataset, "train", [0], data_settings.cache_dir,
                                   device, data_settings.batch_size_test, data_settings.num_workers, progress)[0]
    txt2img = torch.tensor(data.train.txt2img, dtype=torch.long)
    info = {"pairs": len(txt2img), "images": len(data.train.image_paths), "image_encoder": model_settings.image_encoder,
            "text_encoder": data.text_identity}
    if buffer_path is None:
        images = pooled_trunk_outputs(outputs)
        features = PairFeatures(embedding=side_by_side(images[txt2img], data.train_text).numpy(), alignment=None,
                                image_of_pair=txt2img.numpy(), cluster_features=F.normalize(images, dim=1)[txt2img].numpy())
        return features, data, {**info, "space": "frozen encoders (no expert): image trunk beside text encoder"}
    info["expert"] = load_expert(model, model_settings, data_settings, data, buffer_path, expert_number)
    images, texts = aligned(model, outputs, data.train_text, device)
    per_pair = images[txt2img]
    features = PairFeatures(embedding=side_by_side(per_pair, texts).numpy(), alignment=(per_pair * texts).sum(dim=1).numpy(),
                            image_of_pair=txt2img.numpy(), cluster_features=per_pair.numpy())
    return features, data, {**info, "space": "an expert's trained image and text heads"}
