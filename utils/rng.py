"""Saving and restoring random-number streams (resume, and replaying a student step exactly)."""
from __future__ import annotations

import torch


def rng_state(generator: torch.Generator | None = None) -> dict:
    """The global CPU stream, every CUDA device's stream, and `generator`'s, as one picklable dict."""
    state = {"torch": torch.get_rng_state()}
    if generator is not None:
        state["generator"] = generator.get_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, generator: torch.Generator | None = None) -> None:
    """Put back what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    if generator is not None:
        generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def device_rng_state(device: torch.device) -> tuple:
    """The global CPU stream and the stream of `device` (when it is a CUDA device)."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def set_device_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
