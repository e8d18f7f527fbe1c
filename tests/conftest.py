"""Shared fixtures: a tiny generated data set in the Karpathy layout and a shared embedding cache."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from data.shapes import ensure_shapes

os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory) -> Path:
    """40 train images (200 pairs), 10 val and 10 test images at 32 px."""
    return ensure_shapes(tmp_path_factory.mktemp("data") / "shapes", num_train=40, num_val=10, num_test=10,
                         image_px=32, progress=False)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture()
def dataset_copy(tiny_shapes, tmp_path) -> Path:
    """A private copy of the tiny data set that a test may damage."""
    return Path(shutil.copytree(tiny_shapes, tmp_path / "shapes"))


def tiny_flags(image_root, cache_dir, *extra) -> list[str]:
    """Command-line flags for a fast run on the tiny data set (convnet, 16 px, minilm, no logging)."""
    return ["--dataset", "shapes", "--image_root", str(image_root), "--cache_dir", str(cache_dir),
            "--image_encoder", "convnet", "--image_size", "16", "--image_pretrained", "False",
            "--text_encoder", "minilm", "--num_workers", "0", "--wandb_mode", "disabled",
            "--progress", "False", *extra]
