"""LoRS, RepBlend and LoRA matching through the three programs: each option changes what is learned,
is saved with the set and used again by evaluate.py, and a buffer that does not fit is refused."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import distill_flags, tiny_flags

import buffer
import distill
import evaluate
from data.distilled_set import load_distilled_set, save_distilled_set
from experts.files import expert_files, load_expert_pair, read_metadata
from utils.cli import UserError

FAST = ("--Iteration", "2", "--draw", "False")
LITE0 = ("--image_projection", "True", "--image_encoder", "efficientnet_lite0", "--image_pretrained", "True")


@pytest.fixture(scope="module")
def projection_experts(tiny_shapes, cache_dir, tmp_path_factory):
    """Two experts that train an image head over the frozen pretrained EfficientNet-Lite0, and the text head."""
    root = tmp_path_factory.mktemp("projection_buffers")
    buffer.main(tiny_flags(tiny_shapes, cache_dir, "--buffer_path", str(root), "--batch_train", "50",
                           "--num_experts", "2", "--train_epochs", "2", *LITE0))
    return root


def _set(folder, name="distilled_last.pt"):
    return load_distilled_set(folder / name)


def test_lowrank_similarity_is_learned_saved_resumed_and_used_by_evaluate(run4, tiny_shapes, cache_dir, experts,
                                                                         tmp_path):
    lors = ("--sim_type", "lowrank", "--sim_rank", "2", "--loss_type", "kl", "--lr_sim", "500")  # kl: a mean over N² entries
    assert distill.main(distill_flags(tiny_shapes, cache_dir, experts, tmp_path / "lors", *FAST, *lors,
                                      "--Iteration", "4")) == 0
    learned = _set(tmp_path / "lors")
    start = _set(tmp_path / "lors", "distilled_000000.pt")
    assert torch.equal(start["similarity"], torch.eye(8))
    assert learned["similarity"].shape == (8, 8) and not torch.allclose(learned["similarity"], torch.eye(8))
    diagonal, left, right = learned["sim_params"]
    torch.testing.assert_close(learned["similarity"], torch.diag(diagonal) + 0.5 * left @ right.t())
    assert learned["config"]["sim_type"] == "lowrank" and learned["config"]["loss_type"] == "kl"
    base = _set(run4, "distilled_000004.pt")  # same seed and flags without the similarity
    assert not torch.equal(learned["image_syn"], base["image_syn"])

    # resumed at iteration 2, it learns exactly the same similarity
    assert distill.main(distill_flags(tiny_shapes, cache_dir, experts, tmp_path / "part", *FAST, *lors)) == 0
    assert distill.main(distill_flags(tiny_shapes, cache_dir, experts, tmp_path / "resumed", *FAST, *lors,
                                      "--Iteration", "4", "--resume", str(tmp_path / "part" / "distilled_last.pt"))) == 0
    resumed = _set(tmp_path / "resumed")
    assert torch.equal(resumed["similarity"], learned["similarity"])
    assert torch.equal(resumed["image_syn"], learned["image_syn"])

    # evaluate.py trains with the saved S and loss: replacing S by the identity changes the result
    identity = {k: v for k, v in learned.items() if k not in ("format", "version", "similarity")}
    save_distilled_set(tmp_path / "identity.pt", identity.pop("image_syn"), identity.pop("text_syn"),
                       identity.pop("syn_lr_img"), identity.pop("syn_lr_txt"), identity.pop("iteration"),
                       identity.pop("config"), similarity=torch.eye(8))
    outputs = {}
    for name, path in (("learned", tmp_path / "lors" / "distilled_last.pt"), ("identity", tmp_path / "identity.pt")):
        assert evaluate.main(["--distilled", str(path), "--num_eval", "1", "--progress", "False", "--num_workers",
                              "0", "--wandb_mode", "disabled", "--out", str(tmp_path / f"{name}.json")]) == 0
        outputs[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert outputs["learned"]["config"]["loss_type"] == "kl"
    assert outputs["learned"]["metrics"] != outputs["identity"]["metrics"]


def test_blending_changes_what_is_learned(run4, tiny_shapes, cache_dir, experts, tmp_path):
    assert distill.main(distill_flags(tiny_shapes, cache_dir, experts, tmp_path, *FAST, "--blend_alpha", "0.5")) == 0
    blended, base = _set(tmp_path), _set(run4, "distilled_000002.pt")
    assert blended["config"]["blend_alpha"] == 0.5
    assert not torch.equal(blended["image_syn"], base["image_syn"])
    assert not torch.equal(blended["text_syn"], base["text_syn"])


def test_projection_experts_hold_the_two_heads_and_the_encoder_stays_frozen(projection_experts, tiny_shapes,
                                                                           cache_dir, tmp_path):
    folder = projection_experts / "shapes" / "efficientnet_lite0" / "minilm"
    meta = read_metadata(folder)
    assert meta["trainable_parts"] == ["image_projection", "text_projection"]
    dim = meta["image_dim"]
    assert meta["image_param_shapes"] == [[dim, dim], [dim], [dim, dim], [dim], [dim], [dim]]
    (image_traj, text_traj), = load_expert_pair(*expert_files(folder)[0][1:], meta)
    assert len(image_traj) == 3 and not torch.equal(image_traj[0][0], image_traj[-1][0])  # the image head trained

    # RepBlend: symmetric projection matching + blending + low-rank similarity, in both matching modes
    flags = (*FAST, *LITE0, "--blend_alpha", "0.5", "--sim_type", "lowrank", "--sim_rank", "2",
             "--lr_lr", "1e-8")
    for mode in ("unroll", "exact_lowmem"):
        assert distill.main(distill_flags(tiny_shapes, cache_dir, projection_experts, tmp_path / mode, *flags,
                                          "--matching", mode)) == 0
    unrolled, exact = _set(tmp_path / "unroll"), _set(tmp_path / "exact_lowmem")
    start = _set(tmp_path / "unroll", "distilled_000000.pt")
    moved = (unrolled["image_syn"] - start["image_syn"]).norm()
    assert moved > 0 and (exact["image_syn"] - unrolled["image_syn"]).norm() < 1e-4 * moved
    assert evaluate.main(["--distilled", str(tmp_path / "unroll" / "distilled_last.pt"), "--num_eval", "1",
                          "--progress", "False", "--num_workers", "0", "--wandb_mode", "disabled"]) == 0


def test_buffers_that_train_other_parts_are_refused(experts, projection_experts, lora_experts, tiny_shapes,
                                                     cache_dir, tmp_path):
    with pytest.raises(UserError, match=r"trainable_parts: buffer has \['image_encoder', 'text_projection'\], this run "
                                        r"asks for \['image_projection', 'text_projection'\].*--image_projection"):
        distill.main(distill_flags(tiny_shapes, cache_dir, experts, tmp_path, *FAST, "--image_projection", "True",
                                   "--image_weights", "unused.pt"))
    with pytest.raises(UserError, match=r"trainable_parts: buffer has \['image_projection'"):
        distill.main(distill_flags(tiny_shapes, cache_dir, projection_experts, tmp_path, *FAST, "--image_encoder",
                                   "efficientnet_lite0", "--image_pretrained", "True"))
    vit = ("--image_encoder", "vit")
    with pytest.raises(UserError, match=r"buffer has \['image_encoder.lora_r2', 'text_projection'\], this run asks "
                                        r"for \['image_encoder', 'text_projection'\]"):
        distill.main(distill_flags(tiny_shapes, cache_dir, lora_experts, tmp_path, *FAST, *vit))
    from networks.convnet import ConvNet

    torch.save(ConvNet(16).state_dict(), tmp_path / "convnet.pt")
    with pytest.raises(UserError, match=r"made with other settings \(trainable_parts"):  # buffer.py into that folder
        buffer.main(tiny_flags(tiny_shapes, cache_dir, "--buffer_path", str(experts), "--num_experts", "1",
                               "--train_epochs", "1", "--image_projection", "True", "--image_weights",
                               str(tmp_path / "convnet.pt")))


@pytest.mark.parametrize("extra,message", [
    (("--lora_rank", "2"), r"--lora_rank is for transformer encoders \(vit\), not --image_encoder convnet"),
    (("--image_encoder", "vit", "--lora_rank", "2", "--image_projection", "True", "--image_weights", "w.pt"),
     "exclude each other"),
    (("--image_projection", "True"), "needs --image_pretrained True"),
    (("--blend_alpha", "-1"), "--blend_alpha must be 0"),
    (("--sim_type", "lowrank", "--sim_rank", "0"), "--sim_rank must be at least 1"),
])
def test_bad_combinations_are_refused(experts, tiny_shapes, cache_dir, tmp_path, extra, message):
    with pytest.raises(UserError, match=message):
        distill.main(distill_flags(tiny_shapes, cache_dir, experts, tmp_path, *FAST, *extra))


def test_lora_experts_train_only_the_adapters_and_distillation_matches_them(lora_experts, tiny_shapes, cache_dir,
                                                                           tmp_path):
    folder = lora_experts / "shapes" / "vit" / "minilm"
    meta = read_metadata(folder)
    assert meta["trainable_parts"] == ["image_encoder.lora_r2", "text_projection"]
    # 12 blocks x (qkv, proj, fc1, fc2) x (A, B), each A of rank 2 x in, each B of out x rank 2
    per_block = 2 * ((192 + 576) + (192 + 192) + (192 + 768) + (768 + 192))
    assert meta["image_param_count"] == 12 * per_block and len(meta["image_param_shapes"]) == 12 * 4 * 2
    (image_traj, _), = load_expert_pair(*expert_files(folder)[0][1:], meta)
    b_matrices = [i for i, shape in enumerate(meta["image_param_shapes"]) if shape[1] == 2]
    assert all(image_traj[0][i].abs().sum() == 0 for i in b_matrices)  # B starts at zero ...
    assert any(image_traj[-1][i].abs().sum() > 0 for i in b_matrices)  # ... and is trained
    assert distill.main(distill_flags(tiny_shapes, cache_dir, lora_experts, tmp_path, *FAST, "--image_encoder", "vit",
                                      "--lora_rank", "2", "--max_start_epoch", "1")) == 0
    learned, start = _set(tmp_path), _set(tmp_path, "distilled_000000.pt")
    assert learned["config"]["lora_rank"] == 2 and not torch.equal(learned["image_syn"], start["image_syn"])
