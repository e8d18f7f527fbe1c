"""Low-rank adapters for transformer image encoders (the lora_rank setting, the paper's TMLR extension
for ViT).

With adapters, the backbone's own weights stay frozen; rank-r LoRA matrices on every attention
(qkv, proj) and MLP (fc1, fc2) linear layer are what experts train, buffers store and distillation
matches. The adapters come from `peft`; B starts at zero, so an adapted encoder starts as the backbone.
"""
from __future__ import annotations

from torch import nn

from settings.choices import LORA_ENCODERS, check_registry
from utils.errors import SettingError

# Encoders that take adapters, and which of their linear layers get them (a regex over module names).
LORA_TARGETS = {"vit": r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"}
check_registry("LoRA encoders", LORA_ENCODERS, LORA_TARGETS)


def add_lora(encoder: nn.Module, encoder_name: str, rank: int) -> nn.Module:
    """Freeze `encoder` and inject rank-`rank` adapters (scale alpha / r = 1); only they are trainable."""
    if encoder_name not in LORA_TARGETS:
        raise SettingError("lora_rank", rank, f"adapters are for transformer encoders ({', '.join(LORA_TARGETS)}), "
                                              f"not image encoder {encoder_name}", see_also=("image_encoder",))
    if rank < 1:
        raise SettingError("lora_rank", rank, f"must be at least 1 to add adapters, got {rank}")
    from peft import LoraConfig, inject_adapter_in_model

    for param in encoder.parameters():
        param.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=LORA_TARGETS[encoder_name])
    encoder = inject_adapter_in_model(config, encoder)
    for name, param in encoder.named_parameters():
        param.requires_grad_("lora_" in name)
    return encoder
