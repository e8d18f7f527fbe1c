"""A set file (a distilled set, a coreset or a feature-centroid set) as evaluate.py judges it: whether it may be
judged with this run's data, text encoder and learning rates, and what its pairs train on (docs/file-formats.md)."""
from __future__ import annotations

from pathlib import Path

import torch

from data.distilled_set import learned_lr_problem
from data.feature_cache import trunk_key
from data.transforms import renormalize, resize_images
from networks import image_norm
from networks.text_encoders import text_encoder_identity
from settings.data import DataSettings
from settings.judging import JudgingSettings
from settings.model import ModelSettings
from utils.cli import UserError


def check_set_origin(data_settings: DataSettings, model_settings: ModelSettings, config: dict, set_path: Path) -> None:
    """Refuse to judge a set on another data set or text encoder than it was made with: its text embeddings
    (and the captions they stand for) only mean something there. Another image encoder is allowed (transfer)."""
    made_on = config.get("dataset")
    if made_on and made_on != data_settings.dataset:
        raise UserError(f"{set_path} was made from --dataset {made_on}, but this run asks for --dataset "
                        f"{data_settings.dataset}; a set is judged on the data set it was distilled from: drop --dataset")
    made_with = config.get("text_identity")
    asked = text_encoder_identity(model_settings.text_encoder, model_settings.text_model)
    if made_with and made_with != asked:
        raise UserError(f"{set_path} holds embeddings of text model {made_with}, but this run would embed the "
                        f"captions with {asked}; embeddings of two text models are not comparable: drop "
                        f"--text_encoder/--text_model or pass the ones the set was made with (--eval_text_encoder NAME judges "
                        f"it with another encoder through real captions)")


def check_learned_lrs(judging: JudgingSettings, payload: dict, set_path: Path) -> None:
    """A set's learned step sizes become the evaluation learning rate unless --lr_eval/--lr_grid choose it;
    a diverged distillation leaves them zero, negative or NaN."""
    if judging.lr_eval is not None or judging.lr_grid:
        return
    problem = learned_lr_problem(payload)
    if problem:
        raise UserError(f"distilled set {set_path} {problem} (did the distillation diverge?); pass --lr_eval LR or "
                        f"--lr_grid LR [LR ...] to choose the evaluation learning rate instead")


def check_text_dim(payload: dict | None, set_path: Path | None, text_dim: int) -> None:
    """The set's text embeddings (if there is a set) have the text encoder's width."""
    if payload is not None and payload["text_syn"].shape[1] != text_dim:
        raise UserError(f"{set_path} holds {payload['text_syn'].shape[1]}-d text embeddings, the text encoder "
                        f"gives {text_dim}-d")


def set_trunk_key(model_settings: ModelSettings, model, device: torch.device) -> dict:
    """The key of the frozen trunk whose outputs a feature-level set holds (see data/feature_cache.py)."""
    return trunk_key(model_settings.image_encoder, model.trunk.to(device), model.train_stages, model_settings.image_size,
                     image_norm(model_settings))


def evaluation_model_check(model_settings: ModelSettings, model, images: torch.Tensor) -> None:
    """Fail early, with a clear message, when the evaluation encoder cannot take the set's images."""
    if images.shape[-1] != model_settings.image_size or images.shape[-2] != model_settings.image_size:
        raise UserError(f"the set's images are {images.shape[-2]}x{images.shape[-1]} px but --image_size is "
                        f"{model_settings.image_size}; evaluate at the set's size, or give --eval_image_size "
                        f"{model_settings.image_size} to resize its pixels")
    model.eval()
    try:
        with torch.no_grad():
            model.image_encoder(images[:2].float().cpu())
    except RuntimeError as err:
        raise UserError(f"image encoder {model_settings.image_encoder} cannot take the set's {images.shape[-2]}x"
                        f"{images.shape[-1]} px images ({str(err).splitlines()[0]})") from None


def set_inputs(model_settings: ModelSettings, payload: dict, set_path: Path, model, device: torch.device,
               resize: bool = False) -> dict:
    """What the evaluation models train on from a set file: pixels in this run's normalisation (with `resize`, at
    this run's image size: evaluate.py --eval_image_size), or trunk outputs (only for the trunk that made them)."""
    if "image_features" in payload:
        if not model.has_trunk or payload["config"].get("trunk") != set_trunk_key(model_settings, model, device):
            raise UserError(f"{set_path} holds trunk outputs (a feature-level set), which only the frozen trunk that "
                            f"made them can train on: evaluate it with the same --image_encoder, --image_size, "
                            f"--image_norm and --train_stages")
        return {"trunk_outputs": payload["image_features"]}
    images = renormalize(payload["image_syn"], payload["config"].get("image_norm", "clip"), image_norm(model_settings))
    if resize:
        images = resize_images(images, model_settings.image_size)
    evaluation_model_check(model_settings, model, images)
    return {"images": images}
