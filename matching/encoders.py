"""Distilling for several image encoders at once (distill.py --extra_image_encoders): one set of pixels and texts
matched against the experts of each encoder.

Each encoder is an `Arm`: its own student (the trainable part over its own encoder, the text head), its own
experts (a folder beside --image_encoder's in the buffer root) and its input normalisation. The pixels are kept
in --image_encoder's normalisation and re-expressed in each arm's (an affine map per channel, so the gradient
goes back through it exactly); arms whose normalisation is the same see the pixels as they are. With
--encoder_schedule cycle a segment stream draws, at iteration i, the segment of arm (i + slot) mod K: over K
iterations every arm is matched once per stream, at the cost of one encoder; with `mean` every segment is the
mean of one segment of each arm, at K times the cost. A run without extra encoders has one arm and draws exactly
what it always drew.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from data.transforms import renormalize
from experts.cycler import ExpertCycler
from matching.trajectory import Students
from networks import build_model, check_image_size, image_norm
from reparam_module import ReparamModule
from settings.distillation import DistillSettings
from settings.model import ModelSettings
from settings.programs import DistillRunSettings
from utils.cli import UserError


@dataclass
class Arm:
    """One image encoder the set is distilled for: its student, its input normalisation and its experts."""

    encoder: str
    students: Students
    norm: str
    directory: Path | None = None
    meta: dict | None = None

    def pixels(self, image_syn: torch.Tensor, stored_norm: str) -> torch.Tensor:
        """The learned pixels (kept in `stored_norm`) as this encoder takes them; differentiable."""
        return renormalize(image_syn, stored_norm, self.norm)


def arm_model_settings(model: ModelSettings, encoder: str) -> ModelSettings:
    """--image_encoder's model settings with another encoder (its own normalisation when --image_norm is auto)."""
    return replace(model, image_encoder=encoder)


def check_extra_encoders(model: ModelSettings, distill: DistillSettings) -> None:
    """Before any work (distill.py, and the pipeline for each distillation it will run): the extra encoders differ
    from --image_encoder and each other, take --image_size, and come with settings that can apply to every
    encoder."""
    extras = distill.extra_image_encoders or []
    if not extras:
        return
    named = [model.image_encoder, *extras]
    repeated = sorted({name for name in named if named.count(name) > 1})
    if repeated:
        raise UserError(f"--extra_image_encoders names {', '.join(repeated)} twice (with --image_encoder): give each "
                        f"encoder once")
    if model.image_weights:
        raise UserError("--image_weights is a checkpoint of one encoder and cannot start the others of "
                        "--extra_image_encoders; use packaged weights (--image_pretrained True) or none")
    if model.lora_rank:
        raise UserError("--lora_rank adapters are made for one encoder; --extra_image_encoders does not take them")
    for encoder in extras:
        check_image_size(encoder, model.image_size, "extra_image_encoders")


def build_arm(settings: DistillRunSettings, encoder: str, text_dim: int, device: torch.device,
              directory: Path | None = None, meta: dict | None = None) -> tuple[Arm, torch.nn.Module]:
    """The arm of `encoder` (a fresh student model of the run's settings with that encoder) and its model."""
    model_settings = arm_model_settings(settings.model, encoder)
    model = build_model(model_settings, text_dim).to(device).train()
    students = Students(ReparamModule(model.image_part), ReparamModule(model.text_projection),
                        model.trunk if model.has_trunk else None)
    return Arm(encoder, students, image_norm(model_settings), directory, meta), model


class EncoderCyclers:
    """One segment stream's expert cyclers, one per arm; the state of the first is the state a single-encoder run
    saves, the others' follow under "encoders"."""

    def __init__(self, cyclers: list[ExpertCycler]):
        self.cyclers = cyclers
        self.files = cyclers[0].files

    def next(self, arm: int = 0) -> tuple[list, list]:
        return self.cyclers[arm].next()

    def peek_check(self) -> None:
        for cycler in self.cyclers:
            cycler.peek_check()

    def state(self) -> dict:
        return {**self.cyclers[0].state(), "encoders": [cycler.state() for cycler in self.cyclers[1:]]}

    def restore(self, state: dict) -> None:
        others = state.get("encoders")
        if not isinstance(others, list) or len(others) != len(self.cyclers) - 1 \
                or not all(isinstance(entry, dict) for entry in others):
            raise UserError(f"the file's expert positions are for {1 + len(others or [])} encoder(s), this run "
                            f"matches {len(self.cyclers)}: resume with the same --extra_image_encoders")
        self.cyclers[0].restore(state)
        for cycler, entry in zip(self.cyclers[1:], others):
            cycler.restore(entry)


def scheduled_arms(count: int, schedule: str, iteration: int, slot: int) -> list[int]:
    """The arms whose segments stream `slot` draws at `iteration` (see the module docstring)."""
    if count == 1 or schedule == "mean":
        return list(range(count))
    return [(iteration + slot) % count]
