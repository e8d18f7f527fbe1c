"""buffer.py end to end on the tiny data set: files, snapshots, metadata, re-runs, bad buffers, torchrun."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from argparse import Namespace

from settings import ModelSettings
from pathlib import Path

import pytest
import torch

import buffer
from networks import build_model
from experts.files import expert_files, load_expert_pair, read_metadata
from utils.cli import UserError

from conftest import tiny_flags

REPO = Path(__file__).resolve().parents[1]


def _flags(tiny_shapes, cache_dir, buffer_path, *extra):
    return tiny_flags(tiny_shapes, cache_dir, "--buffer_path", str(buffer_path), "--batch_train", "50", *extra)


@pytest.fixture(scope="module")
def two_experts(tiny_shapes, cache_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("buffers")
    assert buffer.main(_flags(tiny_shapes, cache_dir, root, "--num_experts", "2", "--train_epochs", "2")) == 0
    return root / "shapes" / "convnet" / "minilm"


def test_writes_one_expert_per_file_pair_with_epochs_plus_one_snapshots(two_experts):
    files = expert_files(two_experts)
    assert [n for n, _, _ in files] == [0, 1]
    model = build_model(ModelSettings(image_encoder="convnet", image_size=16, image_pretrained=False), text_dim=384)
    shapes = {"img": [p.shape for p in model.image_encoder.parameters()],
              "txt": [p.shape for p in model.text_projection.parameters()]}
    for _, img_path, txt_path in files:
        for part, path in (("img", img_path), ("txt", txt_path)):
            trajectories = torch.load(path, weights_only=True)
            assert isinstance(trajectories, list) and len(trajectories) == 1
            trajectory = trajectories[0]
            assert len(trajectory) == 3  # before training + after each of 2 epochs
            for snapshot in trajectory:
                assert [t.shape for t in snapshot] == shapes[part]
                assert all(t.device.type == "cpu" and not t.requires_grad for t in snapshot)
            assert any(not torch.equal(a, b) for a, b in zip(trajectory[0], trajectory[-1]))  # it trained
    first, second = (torch.load(p, weights_only=True)[0][0] for _, p, _ in files)
    assert not torch.equal(first[0], second[0])  # each expert starts from its own initialisation


def test_each_expert_writes_its_per_epoch_retrieval(two_experts):
    from experts.files import read_expert_metrics

    found = read_expert_metrics(two_experts)
    assert sorted(found) == [0, 1]
    for n, report in found.items():
        assert report["expert"] == n and [e["epoch"] for e in report["epochs"]] == [1, 2]
        assert {"train_loss", "img_r1", "txt_r10", "r_mean"} <= set(report["epochs"][-1])
        assert report["eval_split"] == "val" and report["seconds"] > 0  # choices are made on val by default
    assert found[0]["epochs"][-1]["r_mean"] != found[1]["epochs"][-1]["r_mean"]


def test_metadata_describes_the_experts(two_experts):
    meta = read_metadata(two_experts)
    assert meta["image_encoder"] == "convnet" and meta["text_encoder"] == "minilm"
    assert meta["image_size"] == 16 and meta["text_dim"] == 384 and meta["image_dim"] == 512
    assert meta["image_param_count"] == sum(torch.Size(s).numel() for s in meta["image_param_shapes"])
    pairs = load_expert_pair(*expert_files(two_experts)[0][1:], meta)
    assert len(pairs) == 1 and len(pairs[0][0]) == 3


def test_rerun_adds_experts_and_refuses_other_settings(two_experts, tiny_shapes, cache_dir, tmp_path):
    root = tmp_path / "b"
    shutil.copytree(two_experts, root / "shapes" / "convnet" / "minilm")
    assert buffer.main(_flags(tiny_shapes, cache_dir, root, "--num_experts", "1", "--train_epochs", "1")) == 0
    assert [n for n, _, _ in expert_files(root / "shapes" / "convnet" / "minilm")] == [0, 1, 2]
    with pytest.raises(UserError, match=r"made with other settings \(image_size: buffer has 16, this run asks for 32"):
        buffer.main(_flags(tiny_shapes, cache_dir, root, "--num_experts", "1", "--image_size", "32"))


def test_corrupt_truncated_or_foreign_buffer_files_are_rejected(two_experts, tmp_path):
    meta = read_metadata(two_experts)
    _, img_path, txt_path = expert_files(two_experts)[0]
    truncated = tmp_path / "img_replay_buffer_0.pt"
    truncated.write_bytes(img_path.read_bytes()[:1000])
    with pytest.raises(UserError, match=r"corrupt, truncated"):
        load_expert_pair(truncated, txt_path, meta)
    foreign = tmp_path / "img_replay_buffer_1.pt"
    torch.save([[[torch.zeros(3)], [torch.zeros(3)]]], foreign)
    with pytest.raises(UserError, match=r"does not match the parameter shapes"):
        load_expert_pair(foreign, txt_path, meta)
    pickled = tmp_path / "img_replay_buffer_2.pt"
    torch.save([[Namespace(a=1)]], pickled)  # arbitrary pickled objects are never executed
    with pytest.raises(UserError, match=r"corrupt, truncated or not a tensor file"):
        load_expert_pair(pickled, txt_path, meta)


def _run(args, **kw):
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, **kw)


def test_bad_input_is_one_line_without_traceback(tmp_path):
    result = _run([sys.executable, "buffer.py", "--dataset", "flickr", "--image_root", str(tmp_path),
                   "--text_encoder", "minilm", "--wandb_mode", "disabled"])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: annotation file not found: {tmp_path}/annotations/flickr30k_train.json. "
        + result.stderr.split(". ", 1)[1].strip()]
    result = _run([sys.executable, "buffer.py", "--train_epochs", "0"])
    assert result.returncode == 2 and "--train_epochs must be at least 1" in result.stderr


def test_torchrun_splits_experts_over_two_processes(tiny_shapes, cache_dir, tmp_path):
    result = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                   "buffer.py", *_flags(tiny_shapes, cache_dir, tmp_path, "--num_experts", "2",
                                        "--train_epochs", "1")])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "[rank 0]" in result.stdout and "[rank 1]" in result.stdout
    directory = tmp_path / "shapes" / "convnet" / "minilm"
    files = expert_files(directory)
    assert [n for n, _, _ in files] == [0, 1]
    assert all(len(torch.load(p, weights_only=True)[0]) == 2 for _, p, _ in files)


@pytest.mark.parametrize("decay", [True, False])
def test_decay_scales_both_learning_rates_after_epoch_half_plus_one(tiny_shapes, cache_dir, tmp_path, monkeypatch, decay):
    seen, epochs_done = [], []
    real_scale, real_epoch = buffer.scale_learning_rates, buffer.train_one_epoch

    def record(optimizers, factor):
        seen.append((len(epochs_done), factor, [g["lr"] for o in optimizers for g in o.param_groups]))
        real_scale(optimizers, factor)

    def count(model, loader, optimizers, *args, **kwargs):
        epochs_done.append([g["lr"] for o in optimizers for g in o.param_groups])
        return real_epoch(model, loader, optimizers, *args, **kwargs)

    monkeypatch.setattr(buffer, "scale_learning_rates", record)
    monkeypatch.setattr(buffer, "train_one_epoch", count)
    flags = _flags(tiny_shapes, cache_dir, tmp_path, "--num_experts", "1", "--train_epochs", "5",
                   "--lr_teacher_img", "0.2", "--lr_teacher_txt", "0.3")
    assert buffer.main(flags + (["--decay"] if decay else [])) == 0
    # 5 epochs: the decay comes after epoch index 5 // 2 + 1 = 3, so only the last epoch runs decayed
    assert seen == ([(4, 0.1, [0.2, 0.3])] if decay else [])
    assert epochs_done[-1] == pytest.approx([0.02, 0.03] if decay else [0.2, 0.3])
    assert epochs_done[:4] == [[0.2, 0.3]] * 4
