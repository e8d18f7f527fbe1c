"""The extensions at their neutral settings are the base method to the last bit, and a set is judged with both of
its learned step sizes.

LoRS with its similarity frozen at the identity (--lr_sim 0) and RepBlend with blending off learn exactly what the
base method learns at the same seed: the similarity's initial parameters come from a generator of their own, so the
run's generator (segments, minibatches, augmentation and dropout seeds) draws the same numbers whatever --sim_type.
"""
from __future__ import annotations

import json

import pytest
import torch
from conftest import distill_flags, tiny_flags

import buffer
import distill
import evaluate
from data.distilled_set import load_distilled_set, save_distilled_set
from evaluation import protocol
from matching import distiller
from networks.similarity import TargetSimilarity
from settings import programs
from utils.seeds import similarity_init_seed

LEARNED = ("image_syn", "text_syn", "syn_lr_img", "syn_lr_txt")
# 3 iterations, evaluated at 0 and 3 by one model of one epoch; distinct initial step sizes, so that which of them
# an evaluation uses shows.
RUN = ("--Iteration", "3", "--eval_it", "3", "--num_eval", "1", "--epoch_eval_train", "1", "--draw", "False",
       "--student_lr_img", "0.1", "--student_lr_txt", "0.05", "--loss_type", "infonce")
NEUTRAL_LORS = {"lowrank": ("--sim_type", "lowrank", "--sim_rank", "2", "--lr_sim", "0"),
                "full": ("--sim_type", "full", "--lr_sim", "0")}
FROZEN = ("--image_projection", "True", "--train_stages", "0", "--feature_views", "1")


def spy_on_evaluation_lrs(monkeypatch) -> list[tuple[float, float]]:
    """(image lr, text lr) of every evaluation model's optimisers."""
    seen, sgd_pair = [], protocol.sgd_pair

    def recording(model, lr_img, lr_txt, *args, **kwargs):
        seen.append((lr_img, lr_txt))
        return sgd_pair(model, lr_img, lr_txt, *args, **kwargs)

    monkeypatch.setattr(protocol, "sgd_pair", recording)
    return seen


def spy_on_draws(monkeypatch) -> list:
    """What the run's generators draw for every segment: its start epoch and its minibatches."""
    draws, pick_segment, draw_minibatches = [], distiller.pick_segment, distiller.draw_minibatches

    def picking(*args, **kwargs):
        segment = pick_segment(*args, **kwargs)
        draws.append(("start epoch", segment.start_epoch))
        return segment

    def drawing(*args, **kwargs):
        batches = draw_minibatches(*args, **kwargs)
        draws.append(("minibatches", [b.tolist() for b in batches]))
        return batches

    monkeypatch.setattr(distiller, "pick_segment", picking)
    monkeypatch.setattr(distiller, "draw_minibatches", drawing)
    return draws


def saved(folder, name="distilled_last.pt") -> dict:
    return load_distilled_set(folder / name)


def learned(folder, name="distilled_last.pt") -> dict:
    return {key: saved(folder, name)[key] for key in LEARNED}


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a["syn_lr_img"] == b["syn_lr_img"] and a["syn_lr_txt"] == b["syn_lr_txt"]
    assert torch.equal(a["image_syn"], b["image_syn"]) and torch.equal(a["text_syn"], b["text_syn"])


@pytest.fixture(scope="module")
def base_run(tiny_shapes, cache_dir, experts, tmp_path_factory):
    """The base method (--sim_type none), 3 iterations: its folder, the (image, text) lrs its evaluations trained
    with, and what its generator drew."""
    folder = tmp_path_factory.mktemp("base")
    with pytest.MonkeyPatch.context() as monkeypatch:
        lrs, draws = spy_on_evaluation_lrs(monkeypatch), spy_on_draws(monkeypatch)
        assert distill.main(distill_flags(tiny_shapes, cache_dir, experts, folder, *RUN)) == 0
    return folder, lrs, draws


@pytest.mark.parametrize("sim_type", ["lowrank", "full"])
def test_lors_with_the_identity_frozen_learns_exactly_the_base_set(base_run, sim_type, tiny_shapes, cache_dir,
                                                                   experts, tmp_path, monkeypatch):
    draws = spy_on_draws(monkeypatch)
    assert distill.main(distill_flags(tiny_shapes, cache_dir, experts, tmp_path, *RUN, *NEUTRAL_LORS[sim_type])) == 0
    assert len(draws) == 6 and draws == base_run[2]  # the same segments and minibatches as the base run
    payload = saved(tmp_path)
    assert payload["config"]["sim_type"] == sim_type and payload["config"]["lr_sim"] == 0
    assert torch.equal(payload["similarity"], torch.eye(8))
    base = learned(base_run[0])
    assert not torch.equal(base["image_syn"], learned(base_run[0], "distilled_000000.pt")["image_syn"])  # it learned
    # Bit for bit: the soft-target InfoNCE against S = I (networks/contrastive.py soft_target_loss) gives the same
    # gradients and meta-gradients as the hard-label InfoNCE (measured on CPU; its earlier `.mean()` reduction
    # passed this test too), and the run's generator draws the same numbers.
    assert_bit_identical(learned(tmp_path), base)


@pytest.fixture(scope="module")
def frozen_experts(tiny_shapes, cache_dir, convnet_weights, tmp_path_factory):
    """One expert that trains an image head over a frozen ConvNet (no pretrained download), and the text head."""
    root = tmp_path_factory.mktemp("frozen_buffers")
    buffer.main(tiny_flags(tiny_shapes, cache_dir, "--image_weights", str(convnet_weights), *FROZEN,
                           "--buffer_path", str(root), "--batch_train", "50", "--num_experts", "1",
                           "--train_epochs", "2"))
    return root


def test_repblend_with_blending_off_learns_exactly_the_base_set(frozen_experts, convnet_weights, tiny_shapes,
                                                                cache_dir, tmp_path, monkeypatch):
    def run(folder, *extra):
        assert distill.main(distill_flags(tiny_shapes, cache_dir, frozen_experts, folder, *RUN, "--image_weights",
                                          str(convnet_weights), *FROZEN, *extra)) == 0
        return learned(folder)

    base = run(tmp_path / "base")
    repblend = run(tmp_path / "repblend", "--blend_alpha", "0", *NEUTRAL_LORS["lowrank"])
    assert not torch.equal(base["image_syn"], learned(tmp_path / "base", "distilled_000000.pt")["image_syn"])
    assert_bit_identical(repblend, base)


def test_the_similarity_draws_from_a_generator_of_its_own(tiny_shapes, tmp_path):
    def sim_params(seed: int) -> list[torch.Tensor]:
        settings = distill.parse_args(distill_flags(tiny_shapes, tmp_path, tmp_path, tmp_path / "out", "--seed",
                                                    str(seed), *NEUTRAL_LORS["lowrank"]))
        return distiller.Distiller(settings, torch.zeros(8, 3, 16, 16), torch.zeros(8, 384), torch.device("cpu"),
                                 None).sim_params

    own = torch.Generator().manual_seed(similarity_init_seed(3))
    expected = TargetSimilarity("lowrank", 8, 2).initial_params(own, torch.device("cpu"))
    first = sim_params(3)
    assert len(first) == 3 and all(torch.equal(a, b) for a, b in zip(first, expected))
    assert torch.equal(sim_params(3)[1], first[1]) and not torch.equal(sim_params(4)[1], first[1])  # the seed decides L


def test_distill_evaluates_with_both_learned_step_sizes(base_run):
    folder, lrs, _ = base_run
    first, last = (load_distilled_set(folder / name) for name in ("distilled_000000.pt", "distilled_last.pt"))
    assert lrs[0] == (first["syn_lr_img"], first["syn_lr_txt"]) == pytest.approx((0.1, 0.05))
    assert lrs[-1] == (last["syn_lr_img"], last["syn_lr_txt"]) and len(lrs) == 2


def test_evaluation_trains_the_text_head_at_its_own_rate(tiny_shapes, cache_dir):
    settings = programs.parse("evaluate", "", tiny_flags(tiny_shapes, cache_dir, "--full", "--epoch_eval_train", "1"))
    loader = protocol._pairs_loader(torch.randn(6, 3, 16, 16), torch.randn(6, 384), 3, 0, None)

    def trained(epochs=None, **lrs):
        return protocol.train_fresh_model(settings.model, settings.protocol, loader, 0.1, 384, torch.device("cpu"), 0,
                                          epochs=epochs, **lrs)[0]

    start, model = trained(epochs=0), trained(lr_txt=0.0)  # the same initialisation (the model's seed)
    for before, after in zip(start.text_projection.parameters(), model.text_projection.parameters()):
        assert torch.equal(before, after)  # lr 0: the text head did not move
    assert any(not torch.equal(a, b) for a, b in zip(start.image_part.parameters(), model.image_part.parameters()))
    both = trained()  # without lr_txt both sides train at the one rate
    assert any(not torch.equal(a, b) for a, b in zip(start.text_projection.parameters(),
                                                     both.text_projection.parameters()))


def test_evaluate_uses_and_records_both_learned_step_sizes(base_run, tmp_path, monkeypatch):
    payload = load_distilled_set(base_run[0] / "distilled_last.pt")
    path = tmp_path / "set.pt"
    save_distilled_set(path, payload["image_syn"], payload["text_syn"], payload["syn_lr_img"], 0.0123,
                       payload["iteration"], payload["config"])
    lrs = spy_on_evaluation_lrs(monkeypatch)
    common = ["--distilled", str(path), "--num_eval", "1", "--progress", "False", "--num_workers", "0",
              "--wandb_mode", "disabled"]
    assert evaluate.main([*common, "--out", str(tmp_path / "learned.json")]) == 0
    report = json.loads((tmp_path / "learned.json").read_text())
    assert lrs == [(payload["syn_lr_img"], 0.0123)]
    assert report["lr"] == payload["syn_lr_img"] and report["lr_txt"] == 0.0123
    assert report["config"]["lr_used"] == payload["syn_lr_img"] and report["config"]["lr_txt_used"] == 0.0123
    # --lr_eval (the protocol's one rate) trains both sides at it
    assert evaluate.main([*common, "--lr_eval", "0.05", "--out", str(tmp_path / "fixed.json")]) == 0
    report = json.loads((tmp_path / "fixed.json").read_text())
    assert lrs[1:] == [(0.05, 0.05)] and report["lr"] == 0.05 and report["lr_txt"] == 0.05
