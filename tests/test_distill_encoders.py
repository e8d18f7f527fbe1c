"""distill.py --extra_image_encoders: one set distilled against the experts of several image encoders."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import buffer
import distill
from conftest import distill_flags, run_program, tiny_flags
from data.distilled_set import load_distilled_set
from data.transforms import renormalize
from experts.files import expert_files, load_expert_pair, read_metadata
from matching import distiller as distiller_module
from matching.encoders import Arm, build_arm, scheduled_arms
from matching.trajectory import draw_minibatches, pick_segment
from networks.normalization import NORMALIZATIONS

QUICK = ("--Iteration", "4", "--eval_it", "4")


@pytest.fixture(scope="module")
def two_encoders(experts, tiny_shapes, cache_dir, tmp_path_factory):
    """The session's convnet experts and two convnet_w32 experts beside them, in one buffer root."""
    root = tmp_path_factory.mktemp("two_encoders") / "buffers"
    shutil.copytree(experts, root)
    buffer.main(tiny_flags(tiny_shapes, cache_dir, "--buffer_path", str(root), "--batch_train", "50",
                           "--num_experts", "2", "--train_epochs", "3", "--image_encoder", "convnet_w32"))
    return root


def encoders_used(monkeypatch) -> list[str]:
    """The encoder of every segment the run matches, in order."""
    seen = []
    original = distiller_module.Distiller._meta_gradient

    def spy(self, arm, *args):
        seen.append(arm.encoder)
        return original(self, arm, *args)

    monkeypatch.setattr(distiller_module.Distiller, "_meta_gradient", spy)
    return seen


@pytest.mark.parametrize("schedule, expected", [
    ("cycle", ["convnet", "convnet_w32", "convnet", "convnet_w32"]),
    ("mean", ["convnet", "convnet_w32"] * 4)])
def test_each_schedule_matches_the_encoders_it_says(two_encoders, tiny_shapes, cache_dir, tmp_path, monkeypatch,
                                                    schedule, expected):
    seen = encoders_used(monkeypatch)
    assert distill.main(distill_flags(tiny_shapes, cache_dir, two_encoders, tmp_path / "run", *QUICK,
                                      "--extra_image_encoders", "convnet_w32", "--encoder_schedule", schedule)) == 0
    assert seen == expected
    saved = load_distilled_set(tmp_path / "run" / "distilled_last.pt")
    assert saved["config"]["extra_image_encoders"] == ["convnet_w32"] and saved["iteration"] == 4
    assert set(saved["state"]["experts"]) >= {"order", "encoders"} and len(saved["state"]["experts"]["encoders"]) == 1


def test_the_schedule_spreads_the_encoders_over_streams_and_iterations():
    assert [scheduled_arms(3, "cycle", i, 0) for i in range(4)] == [[0], [1], [2], [0]]
    assert [scheduled_arms(3, "cycle", 0, slot) for slot in range(3)] == [[0], [1], [2]]
    assert scheduled_arms(3, "mean", 5, 1) == [0, 1, 2] and scheduled_arms(1, "cycle", 7, 3) == [0]


def test_a_two_encoder_run_resumes_bit_for_bit(two_encoders, tiny_shapes, cache_dir, tmp_path):
    flags = ("--extra_image_encoders", "convnet_w32", "--eval_it", "2")
    assert distill.main(distill_flags(tiny_shapes, cache_dir, two_encoders, tmp_path / "whole", "--Iteration", "4",
                                      *flags)) == 0
    assert distill.main(distill_flags(tiny_shapes, cache_dir, two_encoders, tmp_path / "parts", "--Iteration", "2",
                                      *flags)) == 0
    assert distill.main(distill_flags(tiny_shapes, cache_dir, two_encoders, tmp_path / "parts", "--Iteration", "4",
                                      "--resume", str(tmp_path / "parts" / "distilled_last.pt"), *flags)) == 0
    whole, parts = (load_distilled_set(tmp_path / name / "distilled_last.pt") for name in ("whole", "parts"))
    assert torch.equal(whole["image_syn"], parts["image_syn"]) and torch.equal(whole["text_syn"], parts["text_syn"])
    assert whole["syn_lr_img"] == parts["syn_lr_img"]


def test_a_run_of_one_encoder_cannot_resume_a_two_encoder_file(two_encoders, tiny_shapes, cache_dir, tmp_path):
    assert distill.main(distill_flags(tiny_shapes, cache_dir, two_encoders, tmp_path / "two", "--Iteration", "2",
                                      "--eval_it", "2", "--extra_image_encoders", "convnet_w32")) == 0
    error = run_program(distill.main, distill_flags(tiny_shapes, cache_dir, two_encoders, tmp_path / "one",
                                                    "--Iteration", "4", "--resume",
                                                    str(tmp_path / "two" / "distilled_last.pt")))
    assert error is not None and "extra_image_encoders" in error


@pytest.mark.parametrize("extra, says", [
    (["convnet"], "twice"), (["convnet_w32", "convnet_w32"], "twice"), (["no_such_encoder"], "is not one of")])
def test_bad_extra_encoders_are_refused_before_any_work(two_encoders, tiny_shapes, cache_dir, tmp_path, extra, says):
    error = run_program(distill.main, distill_flags(tiny_shapes, cache_dir, two_encoders, tmp_path / "run", *QUICK,
                                                    "--extra_image_encoders", *extra))
    assert error is not None and says in error


def test_an_encoder_without_experts_is_named(experts, tiny_shapes, cache_dir, tmp_path):
    error = run_program(distill.main, distill_flags(tiny_shapes, cache_dir, experts, tmp_path / "run", *QUICK,
                                                    "--extra_image_encoders", "convnet_w64"))
    assert error is not None and "convnet_w64" in error and "no experts" in error


@pytest.mark.parametrize("frozen", [False, True], ids=["trained encoder", "frozen trunk"])
def test_the_pixels_gradient_goes_back_through_another_normalisation(experts, trunk_experts, convnet_weights,
                                                                     tiny_shapes, cache_dir, tmp_path, frozen):
    """An arm that takes the pixels in another normalisation gets the gradient of a run that stores them in that
    normalisation, times the map's per-channel slope (std of the stored / std of the arm's): an independent
    computation of the chain rule through `renormalize`, for a student that trains the encoder and for a head
    over a frozen trunk (whose pass runs on the renormalised pixels)."""
    if frozen:
        experts = trunk_experts
    trunk = ("--image_weights", str(convnet_weights), "--train_stages", "1", "--feature_views", "1") if frozen else ()
    settings, other = (distill.parse_args(distill_flags(tiny_shapes, cache_dir, experts, tmp_path / "out",
                                                        "--image_norm", norm, *trunk)) for norm in ("clip", "imagenet"))
    torch.manual_seed(0)
    arm, _ = build_arm(settings, "convnet", 384, torch.device("cpu"))
    assert (arm.students.frozen_encoder is not None) == frozen
    pixels, texts = torch.randn(8, 3, 16, 16), torch.randn(8, 384)
    folder = next(experts.glob("**/buffer_meta.json")).parent
    _, image_path, text_path = expert_files(folder)[0]
    image_traj, text_traj = load_expert_pair(image_path, text_path, read_metadata(folder))[0]

    def gradient(run_settings, stored, arm_norm):
        learner = distiller_module.Distiller(run_settings, stored.detach().clone(), texts.clone(), torch.device("cpu"),
                                             arm.students)
        generator = torch.Generator().manual_seed(1)
        segment = pick_segment(image_traj, text_traj, 2, 1, generator, torch.device("cpu"))
        batches = draw_minibatches(8, 4, 2, generator)
        torch.manual_seed(2)  # the same dropout draws in both computations
        result, image_grad = learner._meta_gradient(Arm("convnet", arm.students, arm_norm), segment, batches, None,
                                                    None)
        return result.image_term + result.text_term, image_grad

    loss_across, grad_across = gradient(settings, pixels, "imagenet")  # stored in clip, taken in imagenet
    loss_direct, grad_direct = gradient(other, renormalize(pixels, "clip", "imagenet"), "imagenet")
    slope = (torch.tensor(NORMALIZATIONS["clip"][1]) / torch.tensor(NORMALIZATIONS["imagenet"][1])).view(1, 3, 1, 1)
    assert torch.allclose(loss_across, loss_direct, rtol=1e-5)
    assert torch.allclose(grad_across, grad_direct * slope, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(grad_across, grad_direct, rtol=1e-3)  # the slope is not 1: the test can fail


def test_buffer_path_may_be_the_main_encoders_folder(two_encoders, tiny_shapes, cache_dir, tmp_path, monkeypatch):
    seen = encoders_used(monkeypatch)
    leaf = two_encoders / "shapes" / "convnet" / "minilm"
    assert distill.main(distill_flags(tiny_shapes, cache_dir, leaf, tmp_path / "run", "--Iteration", "2", "--eval_it",
                                      "2", "--extra_image_encoders", "convnet_w32")) == 0
    assert seen == ["convnet", "convnet_w32"]


def test_the_pipeline_trains_the_extra_encoders_experts_beside_the_main_ones(tiny_shapes, cache_dir, tmp_path,
                                                                             monkeypatch):
    from comparison import pipeline, programs
    from tests.test_pipeline import TOY, launch_in_process

    launched = []

    def launch(program, flags, log=None):
        launched.append((program, flags))
        return launch_in_process(program, flags, log)

    monkeypatch.setattr(programs, "launch", launch)
    text = TOY.format(out=tmp_path / "run", root=tiny_shapes, cache=cache_dir).replace("seeds = [0, 1]", "seeds = [0]")
    text = text.replace('coreset_methods = ["kmeans"]', 'coreset_methods = []\nmethods = ["base", "two", "w32"]')
    config = tmp_path / "two.toml"
    config.write_text(text + '[methods.two]\ndistill = {extra_image_encoders = ["convnet_w32"]}\n'
                             '[methods.w32]\ncommon = {image_encoder = "convnet_w32"}\n')
    assert pipeline.main([str(config)]) == 0
    out = tmp_path / "run"
    w32 = out / "buffers" / "shapes" / "convnet_w32" / "minilm"
    assert len(expert_files(w32)) == len(expert_files(out / "buffers" / "shapes" / "convnet" / "minilm")) > 0
    # a method that only changes the encoder distils from those same experts: trained once, not under methods/
    assert [program for program, _ in launched].count("buffer.py") == 2 and not (out / "methods").exists()
    own = load_distilled_set(out / "distill" / "w32-6" / "seed0" / "distilled_last.pt")
    assert own["config"]["image_encoder"] == "convnet_w32" and Path(own["config"]["buffer_path"]).resolve() in (
        w32.resolve(), (out / "buffers").resolve())
    judged = json.loads((out / "results" / "w32-6 (seed 0).json").read_text())
    assert judged["config"]["image_encoder"] == "convnet_w32"
    two = load_distilled_set(out / "distill" / "two-6" / "seed0" / "distilled_last.pt")
    assert two["config"]["extra_image_encoders"] == ["convnet_w32"]
    assert "two-6 (seed 0)" in (out / "results.md").read_text()
    stamps = sorted(p.name for p in (out / "stamps").iterdir())
    assert "experts_convnet_w32.json" in stamps and "experts.json" in stamps


@pytest.mark.parametrize("extra", ['["convnet"]', '["convnet_w32", "convnet_w32"]'])
def test_a_pipeline_method_with_bad_extra_encoders_is_refused_before_any_work(tiny_shapes, cache_dir, tmp_path,
                                                                              extra):
    from comparison import pipeline
    from tests.test_pipeline import TOY

    text = TOY.format(out=tmp_path / "run", root=tiny_shapes, cache=cache_dir)
    text = text.replace('coreset_methods = ["kmeans"]', 'coreset_methods = ["kmeans"]\nmethods = ["base", "two"]')
    config = tmp_path / "two.toml"
    config.write_text(text + f'[methods.two]\ndistill = {{extra_image_encoders = {extra}}}\n')
    error = run_program(pipeline.main, [str(config)])
    assert error is not None and "twice" in error and "[methods.two]" in error
    assert not (tmp_path / "run").exists()
