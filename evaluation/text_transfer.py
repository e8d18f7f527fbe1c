"""Judging a set with another text encoder than it was made with (evaluate.py --eval_text_encoder).

A set's text embeddings live in its own encoder's space. They go over to another encoder through real
captions: a distilled set's (or a feature-centroid set's) synthetic texts as their nearest real training
captions (cosine, in the set's own space, over that encoder's cached caption embeddings; the search that
writes nearest_captions_*.txt), a coreset's texts as its own captions; either re-encoded with the new
encoder (its cached embeddings of the training captions)."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from data.build import RetrievalData, load_retrieval_data
from data.distilled_set import coreset_method
from settings.choices import CENTROIDS
from utils.cli import UserError
from utils.visualize import nearest_caption_indices


@dataclass(frozen=True)
class TextTransfer:
    """How a set's texts went over to another text encoder: from and to (identities), the captions used and how
    they were chosen ("nearest" or "own"), and the cosine of each synthetic text to its caption (nearest only)."""

    encoder: str
    from_identity: str
    to_identity: str
    how: str
    caption_indices: list[int]
    cosines: list[float] | None

    @property
    def phrase(self) -> str:
        what = "their nearest real captions" if self.how == "nearest" else "their own captions"
        return f"texts as {what} re-encoded with {self.encoder}"

    def report(self) -> dict:
        return {"encoder": self.encoder, "from": self.from_identity, "to": self.to_identity, "how": self.how,
                "description": self.phrase, "caption_indices": self.caption_indices, "cosines": self.cosines}


def own_captions(payload: dict) -> bool:
    """Whether the set's texts are real captions of its own (a coreset of real pairs), not synthetic ones."""
    return coreset_method(payload["config"].get("source")) not in (None, CENTROIDS)


def caption_choice(payload: dict, set_path, data: RetrievalData) -> tuple[torch.Tensor, list[float] | None, str]:
    """Which training captions stand for the set's texts, their cosines (nearest only), and how they were chosen."""
    count = len(data.train.captions)
    if own_captions(payload):
        indices = payload.get("caption_indices")
        if indices is None:
            raise UserError(f"{set_path} is a coreset ({payload['config'].get('source')}) without caption_indices: "
                            f"its captions cannot be re-encoded for --eval_text_encoder; select it again")
        how, cosines = "own", None
    else:
        indices, best = nearest_caption_indices(payload["text_syn"], data.train_text)
        how, cosines = "nearest", [round(float(c), 6) for c in best]
    indices = torch.as_tensor(indices, dtype=torch.long)
    if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= count):
        raise UserError(f"{set_path} has caption_indices outside the {count} training captions of this run: "
                        f"evaluate it with the data settings it was made with")
    return indices, cosines, how


def transfer_texts(settings, payload: dict, set_path, data: RetrievalData, device: torch.device,
                   extra_splits: tuple[str, ...]) -> tuple[object, dict, RetrievalData, TextTransfer]:
    """The settings, set payload and data of the evaluation with `settings.judging.eval_text_encoder`: the set's
    texts replaced by re-encoded real captions, every split embedded by the new encoder."""
    encoder = settings.judging.eval_text_encoder
    indices, cosines, how = caption_choice(payload, set_path, data)
    model = replace(settings.model, text_encoder=encoder, text_model=None)
    settings = replace(settings, model=model)
    new_data = load_retrieval_data(settings.data, model, device, progress=settings.runtime.progress,
                                   extra_splits=extra_splits)
    if new_data.train.captions != data.train.captions:  # the same data settings: never expected
        raise RuntimeError("the training captions differ between the two text encoders' loads")
    texts = new_data.train_text[indices].clone()
    transfer = TextTransfer(encoder, data.text_identity, new_data.text_identity, how, indices.tolist(), cosines)
    return settings, {**payload, "text_syn": texts}, new_data, transfer
