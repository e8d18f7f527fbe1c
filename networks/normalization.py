"""Input normalisation statistics by name (`--image_norm`): what each set of encoder weights expects.

`clip` is what the reference applies to every encoder; ImageNet weights mostly expect `imagenet`;
the TensorFlow-ported EfficientNet-Lite0 and ViT weights expect `inception` (mean 0.5, std 0.5), as
timm's `pretrained_cfg` says (networks/image_encoders.py reads it for `--image_norm auto`).
"""
from settings.choices import NORMALIZATIONS as NAMES, check_registry

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NORMALIZATIONS = {
    "clip": (CLIP_MEAN, CLIP_STD),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}

check_registry("image normalisations", NAMES, NORMALIZATIONS)
