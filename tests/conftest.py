"""Shared fixtures: a tiny generated data set in the Karpathy layout and a shared embedding cache."""
from __future__ import annotations

import contextlib
import io
import os
import shutil
from pathlib import Path

import pytest

from data.shapes import ensure_shapes
from utils.cli import run_cli

os.environ.setdefault("WANDB_MODE", "disabled")


def pytest_collection_modifyitems(items):
    """Tiers: `e2e` for a test that runs a program, `fast` for the rest (tests/tiers.py reads which)."""
    import tiers

    tiers.assign(items)


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory) -> Path:
    """40 train images (200 pairs), 10 val and 10 test images at 32 px."""
    return ensure_shapes(tmp_path_factory.mktemp("data") / "shapes", num_train=40, num_val=10, num_test=10,
                         image_px=32, progress=False)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def mpnet_cache(tmp_path_factory):
    """A cache folder in which the packaged all-mpnet-base-v2 is assembled once for the session (~420 MB, removed
    at its end rather than left to pytest's kept temporary folders)."""
    from networks.packaged_text import MPNET, packaged_model_folder

    folder = tmp_path_factory.mktemp("mpnet_cache")
    packaged_model_folder(MPNET, folder)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture()
def dataset_copy(tiny_shapes, tmp_path) -> Path:
    """A private copy of the tiny data set that a test may damage."""
    return Path(shutil.copytree(tiny_shapes, tmp_path / "shapes"))


@pytest.fixture(scope="session")
def experts(tiny_shapes, cache_dir, tmp_path_factory) -> Path:
    """Two experts of 3 epochs on the tiny data set (convnet, 16 px), as buffer.py writes them."""
    import buffer

    root = tmp_path_factory.mktemp("buffers")
    buffer.main(tiny_flags(tiny_shapes, cache_dir, "--buffer_path", str(root), "--batch_train", "50",
                           "--num_experts", "2", "--train_epochs", "3"))
    return root


def tiny_flags(image_root, cache_dir, *extra) -> list[str]:
    """Command-line flags for a fast run on the tiny data set (convnet, 16 px, minilm, no logging)."""
    return ["--dataset", "shapes", "--image_root", str(image_root), "--cache_dir", str(cache_dir),
            "--image_encoder", "convnet", "--image_size", "16", "--image_pretrained", "False",
            "--text_encoder", "minilm", "--num_workers", "0", "--wandb_mode", "disabled",
            "--progress", "False", *extra]


def distill_flags(tiny_shapes, cache_dir, experts, save_dir, *extra):
    return tiny_flags(tiny_shapes, cache_dir, "--buffer_path", str(experts), "--save_dir", str(save_dir),
                      "--syn_steps", "2", "--expert_epochs", "1", "--max_start_epoch", "2", "--num_queries", "8",
                      "--mini_batch_size", "4", "--lr_img", "100", "--lr_txt", "100", "--lr_lr", "1e-5",
                      "--eval_it", "2", "--num_eval", "2", "--epoch_eval_train", "2", "--batch_train", "4", *extra)


@pytest.fixture(scope="session")
def run4(tiny_shapes, cache_dir, experts, tmp_path_factory) -> Path:
    """A 4-iteration distill.py run on the tiny experts (8 pairs, evaluated at 0, 2 and 4)."""
    import distill

    save_dir = tmp_path_factory.mktemp("run4")
    assert distill.main(distill_flags(tiny_shapes, cache_dir, experts, save_dir, "--Iteration", "4")) == 0
    return save_dir


@pytest.fixture(scope="session")
def convnet_weights(tmp_path_factory) -> Path:
    """A 'pretrained' ConvNet checkpoint (random weights, seed 0), for runs that keep part of it frozen."""
    import torch

    from networks.convnet import ConvNet

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "convnet.pt"
    torch.save(ConvNet(16).state_dict(), path)
    return path


def trunk_flags(tiny_shapes, cache_dir, convnet_weights, *extra) -> list[str]:
    """tiny_flags with the first two conv blocks frozen (their outputs cached) and the last one trained."""
    return tiny_flags(tiny_shapes, cache_dir, "--image_weights", str(convnet_weights), "--train_stages", "1",
                      "--feature_views", "1", *extra)


@pytest.fixture(scope="session")
def trunk_experts(tiny_shapes, cache_dir, convnet_weights, tmp_path_factory) -> Path:
    """Two experts of 3 epochs over cached trunk outputs (--train_stages 1)."""
    import buffer

    root = tmp_path_factory.mktemp("trunk_buffers")
    buffer.main(trunk_flags(tiny_shapes, cache_dir, convnet_weights, "--buffer_path", str(root), "--batch_train", "50",
                            "--num_experts", "2", "--train_epochs", "3"))
    return root


@pytest.fixture(scope="session")
def lora_experts(tiny_shapes, cache_dir, tmp_path_factory):
    """One ViT expert with rank-2 adapters (the backbone frozen)."""
    import buffer

    root = tmp_path_factory.mktemp("lora_buffers")
    buffer.main(tiny_flags(tiny_shapes, cache_dir, "--buffer_path", str(root), "--batch_train", "50",
                           "--num_experts", "1", "--train_epochs", "2", "--image_encoder", "vit",
                           "--lora_rank", "2"))
    return root


# A small pipeline config (the tiny flags as TOML) that tests change one key of.
PIPELINE_CONFIG = """
[common]
dataset = "shapes"
image_encoder = "convnet"
image_size = 16
image_pretrained = false
text_encoder = "minilm"
[buffer]
num_experts = 2
[distill]
num_pairs = 6
mini_batch_size = 3
[evaluate]
num_eval = 2
[compare]
ladder = [6, 12]
"""


# ---- a program run up to its first work, through the programs' boundary --------------------------------------

class ReachedWork(BaseException):
    """The program accepted its settings and started loading the data (not an Exception: no handler takes it)."""


def run_program(main, argv: list[str]) -> str | None:
    """None when the program accepted `argv` (reached its first work), else the one error line it printed
    through `run_cli` (exit status 2); anything else (a traceback, another status) fails the test."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            run_cli(lambda: main(argv))
    except ReachedWork:
        return None
    except SystemExit as stop:
        lines = stderr.getvalue().splitlines()
        assert stop.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), \
            f"exit status {stop.code}, not one error line: {stderr.getvalue()!r}"
        return lines[0]
    raise AssertionError(f"{argv[-1]!r}: returned without reaching its work")
