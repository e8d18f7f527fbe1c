"""The evaluation protocol (choices on val, numbers on test) and the frozen-trunk regime end to end."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import distill_flags, tiny_flags, trunk_flags

import distill
import evaluate
from data.distilled_set import load_distilled_set
from utils.cli import UserError
from utils.seeds import DISTILL_EVAL_OFFSET, TUNING_SEED_OFFSET

QUICK = ("--num_eval", "2", "--epoch_eval_train", "2", "--batch_train", "4")


def evaluate_json(flags, out) -> dict:
    assert evaluate.main([*flags, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_numbers_are_reported_on_test_when_its_file_is_there_else_on_val(dataset_copy, cache_dir, tmp_path, capsys):
    flags = tiny_flags(dataset_copy, cache_dir, *QUICK, "--coreset", "random", "--num_queries", "8",
                       "--coreset_file", str(tmp_path / "random.pt"))
    with_test = evaluate_json(flags, tmp_path / "a.json")
    assert with_test["split"] == "test" and with_test["selection_split"] == "val"
    assert "reporting on test" in capsys.readouterr().out
    (dataset_copy / "annotations" / "shapes_test.json").unlink()
    without = evaluate_json(flags, tmp_path / "b.json")
    assert without["split"] == "val" and without["metrics"] == with_test["selection_metrics"]  # same models
    assert "reporting on val (no shapes test split beside the others" in capsys.readouterr().out
    with pytest.raises(UserError, match="--report_split test: its annotation file is not"):
        evaluate.main([*flags, "--report_split", "test"])


def test_the_learning_rate_is_chosen_on_val_from_the_grid(tiny_shapes, cache_dir, tmp_path):
    base = tiny_flags(tiny_shapes, cache_dir, *QUICK, "--coreset", "random", "--num_queries", "8",
                      "--coreset_file", str(tmp_path / "random.pt"))
    report = evaluate_json([*base, "--lr_grid", "0.3", "0.01", "--tune_models", "2"], tmp_path / "grid.json")
    tuning = {cell["lr"]: cell["r_mean"] for cell in report["tuning"]}
    assert [(c["lr"], c["epochs"]) for c in report["tuning"]] == [(0.01, 2), (0.3, 2)]
    assert report["lr"] == max((0.01, 0.3), key=tuning.get) and report["epochs"] == 2 and report["widened"] == 0
    assert report["at_edge"] == ["lr"]  # two values: the choice is at one end, and nothing widened it
    same_set = ["--distilled", str(tmp_path / "random.pt"), "--num_workers", "0", "--progress", "False",
                "--wandb_mode", "disabled"]
    for lr in (0.01, 0.3):  # each tuning value is 2 models from the tuning seeds, scored on val
        single = evaluate_json([*same_set, "--lr_eval", str(lr), "--seed", str(TUNING_SEED_OFFSET), "--num_eval", "2"],
                               tmp_path / f"{lr}.json")
        assert tuning[lr] == single["selection_metrics"]["r_mean"]["mean"]
    chosen = evaluate_json([*same_set, "--lr_eval", str(report["lr"])], tmp_path / "chosen.json")
    assert chosen["metrics"] == report["metrics"]  # the reported models: the usual seeds at the chosen rate
    with pytest.raises(UserError, match="give one of them"):
        evaluate.main([*base, "--lr_grid", "0.1", "--lr_eval", "0.1"])
    with pytest.raises(UserError, match="must be positive"):
        evaluate.main([*base, "--lr_grid", "0.1", "-1"])


def test_epochs_are_chosen_with_the_rate_and_the_grid_widens_past_its_edge(tiny_shapes, cache_dir, tmp_path):
    base = tiny_flags(tiny_shapes, cache_dir, "--num_eval", "2", "--epoch_eval_train", "2", "--coreset", "random",
                      "--num_queries", "8", "--coreset_file", str(tmp_path / "random.pt"))
    report = evaluate_json([*base, "--lr_grid", "0.01", "0.1", "--epoch_scales", "0.5", "1", "--widen_grid", "3"],
                           tmp_path / "grid.json")
    cells = [(c["lr"], c["epochs"]) for c in report["tuning"]]
    assert cells[:4] == [(0.01, 1), (0.1, 1), (0.01, 2), (0.1, 2)] and report["widened"] == len(cells) - 4 <= 3
    assert report["widened"] >= 1  # on this tiny set the grid's largest rate wins, so 0.1 * 0.1 / 0.01 = 1 is tried
    best = max(report["tuning"], key=lambda c: c["r_mean"])
    assert (report["lr"], report["epochs"]) == (best["lr"], best["epochs"])
    same_set = ["--distilled", str(tmp_path / "random.pt"), "--num_workers", "0", "--progress", "False",
                "--wandb_mode", "disabled"]
    for cell in report["tuning"]:  # every cell, widened ones included: one model from the tuning seed, scored on val
        single = evaluate_json([*same_set, "--lr_eval", str(cell["lr"]), "--epoch_eval_train", str(cell["epochs"]),
                                "--seed", str(TUNING_SEED_OFFSET), "--num_eval", "1"], tmp_path / "cell.json")
        assert cell["r_mean"] == single["selection_metrics"]["r_mean"]["mean"]
    chosen = evaluate_json([*same_set, "--lr_eval", str(report["lr"]), "--epoch_eval_train", str(report["epochs"]),
                            "--num_eval", "2"], tmp_path / "chosen.json")
    assert chosen["metrics"] == report["metrics"] and report["config"]["epochs_used"] == report["epochs"]
    with pytest.raises(UserError, match="epoch_scales"):
        evaluate.main([*base, "--epoch_scales", "0"])
    with pytest.raises(UserError, match="widen_grid"):
        evaluate.main([*base, "--widen_grid", "-1"])


@pytest.fixture(scope="module")
def trunk_run(tiny_shapes, cache_dir, convnet_weights, trunk_experts, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("trunk_run")
    flags = distill_flags(tiny_shapes, cache_dir, trunk_experts, save_dir, "--Iteration", "3", "--eval_it", "3",
                          "--image_weights", str(convnet_weights), "--train_stages", "1", "--feature_views", "1")
    assert distill.main(flags) == 0
    return save_dir


def test_distillation_through_a_frozen_trunk_learns_pixels_and_reloads(trunk_run, tmp_path):
    first, last = (load_distilled_set(trunk_run / f"distilled_{i:06d}.pt") for i in (0, 3))
    assert last["config"]["train_stages"] == 1 and last["config"]["image_norm"] == "clip"
    assert not torch.equal(first["image_syn"], last["image_syn"])  # the gradient reached the pixels
    report = evaluate_json(["--distilled", str(trunk_run / "distilled_last.pt"), "--num_workers", "0", "--progress",
                            "False", "--wandb_mode", "disabled", "--seed", str(DISTILL_EVAL_OFFSET + 3)], tmp_path / "e.json")
    assert report["selection_metrics"] == last["metrics"]  # evaluate.py reproduces distill.py's own evaluation


def test_kmeans_and_centroid_sets_over_frozen_features(tiny_shapes, cache_dir, convnet_weights, trunk_experts,
                                                        tmp_path):
    flags = trunk_flags(tiny_shapes, cache_dir, convnet_weights, *QUICK, "--buffer_path", str(trunk_experts))
    kmeans = evaluate_json([*flags, "--coreset", "kmeans", "--num_queries", "6", "--coreset_file",
                            str(tmp_path / "kmeans.pt")], tmp_path / "kmeans.json")
    chosen = load_distilled_set(tmp_path / "kmeans.pt")
    assert chosen["config"]["features"].startswith("frozen trunk outputs") and "expert_used" not in chosen["config"]
    assert len(set(chosen["caption_indices"].tolist())) == 6 and kmeans["label"] == "coreset:kmeans-6"
    centroids = evaluate_json([*flags, "--coreset", "centroids", "--num_queries", "6", "--coreset_file",
                               str(tmp_path / "centroids.pt")], tmp_path / "centroids.json")
    feature_set = load_distilled_set(tmp_path / "centroids.pt")
    assert "image_syn" not in feature_set and feature_set["image_features"].shape == (6, 128, 4, 4)
    assert feature_set["text_syn"].shape == (6, 384) and centroids["label"] == "coreset:centroids-6"
    # the same set file evaluates alone, and only with the trunk that made it
    again = evaluate_json(["--distilled", str(tmp_path / "centroids.pt"), "--num_workers", "0", "--progress", "False",
                           "--wandb_mode", "disabled"], tmp_path / "again.json")
    assert again["metrics"] == centroids["metrics"]
    with pytest.raises(UserError, match="only the frozen trunk that made them can train on"):
        evaluate.main(["--distilled", str(tmp_path / "centroids.pt"), "--train_stages", "2", "--wandb_mode",
                       "disabled", "--progress", "False", "--num_workers", "0"])
    with pytest.raises(UserError, match="only a frozen trunk can train on"):
        evaluate.main(tiny_flags(tiny_shapes, cache_dir, *QUICK, "--coreset", "centroids", "--num_queries", "6",
                                 "--coreset_file", str(tmp_path / "c2.pt")))


def test_full_data_over_cached_trunk_outputs(tiny_shapes, cache_dir, convnet_weights, tmp_path, monkeypatch):
    from data import feature_cache

    flags = trunk_flags(tiny_shapes, cache_dir, convnet_weights, *QUICK, "--full")
    first = evaluate_json(flags, tmp_path / "full.json")
    assert first["label"] == "full-200" and len(first["metrics"]["r_mean"]["runs"]) == 2
    monkeypatch.setattr(feature_cache, "compute_trunk_outputs", lambda *a, **k: pytest.fail("recomputed"))
    assert evaluate_json(flags, tmp_path / "again.json")["metrics"] == first["metrics"]  # cached, and seeded


@pytest.mark.parametrize("regime", ["frozen trunk", "whole encoder"])
def test_kmeans_initialisation_starts_from_the_kmeans_coreset(regime, tiny_shapes, cache_dir, convnet_weights,
                                                             experts, trunk_experts, tmp_path):
    if regime == "frozen trunk":
        buffers, extra = trunk_experts, ("--image_weights", str(convnet_weights), "--train_stages", "1",
                                         "--feature_views", "1")
    else:
        buffers, extra = experts, ()
    assert distill.main(distill_flags(tiny_shapes, cache_dir, buffers, tmp_path / "run", "--Iteration", "1",
                                      "--pix_init", "kmeans", "--draw", "False", *extra)) == 0
    start = load_distilled_set(tmp_path / "run" / "distilled_000000.pt")
    evaluate_json(tiny_flags(tiny_shapes, cache_dir, *QUICK, *extra, "--coreset", "kmeans", "--num_queries", "8",
                             "--buffer_path", str(buffers), "--coreset_file", str(tmp_path / "kmeans.pt")),
                  tmp_path / "kmeans.json")
    coreset = load_distilled_set(tmp_path / "kmeans.pt")
    assert torch.equal(start["image_syn"], coreset["image_syn"]) and torch.equal(start["text_syn"], coreset["text_syn"])
