"""Degenerate training is refused up front or reported (issue 26, item 3): a contrastive batch, set or training
split of fewer than 2 pairs, a batch size over the data size, a last batch of one pair, DSA that names no
operation, and training runs (experts, evaluation models) whose parameters did not move."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import distill_flags, tiny_flags

import buffer
import distill
import evaluate
from data.build import RetrievalData, train_loader
from data.annotations import read_split
from data.distilled_set import save_distilled_set
from evaluation import protocol, training
from evaluation.protocol import _pairs_loader
from evaluation.training import TrainingWatch, sgd_pair, train_one_epoch, trainable_copy
from networks.contrastive import contrastive_loss, soft_target_loss, similarity_logits
from settings import programs
from utils.cli import UserError

MAINS = {"buffer": buffer.main, "distill": distill.main, "evaluate": evaluate.main}


def constant_loss(image_features, text_features, *args, **kwargs):
    """A loss that does not depend on the weights: its gradient is exactly zero, as InfoNCE's over one pair."""
    return (image_features.sum() + text_features.sum()) * 0.0 + 1.0


# ---- why: one pair trains nothing -----------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["infonce", "kl"])
def test_a_contrastive_loss_over_one_pair_is_zero_with_zero_gradient(loss_type):
    torch.manual_seed(0)
    images, texts = torch.randn(1, 8, requires_grad=True), torch.randn(1, 8, requires_grad=True)
    loss = contrastive_loss(images, texts, loss_type=loss_type)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(images.grad) == 0 and torch.count_nonzero(texts.grad) == 0
    two_images, two_texts = torch.randn(2, 8, requires_grad=True), torch.randn(2, 8, requires_grad=True)
    logits = similarity_logits(two_images, two_texts)
    soft_target_loss(logits, torch.eye(2), loss_type).backward()
    assert torch.count_nonzero(two_images.grad) > 0  # two pairs: something to learn


# ---- settings: batch sizes and set sizes >= 2, DSA with operations ----------------------------------------------


REFUSED = [
    ("buffer", ["--expert_batch", "1"], "--expert_batch must be at least 2, got 1"),
    ("buffer", ["--batch_train", "1"], "--expert_batch must be at least 2, got 1"),
    ("distill", ["--mini_batch_size", "1"], "--mini_batch_size must be at least 2, got 1"),
    ("distill", ["--num_pairs", "1", "--mini_batch_size", "1"], "--num_pairs must be at least 2, got 1"),
    ("distill", ["--num_queries", "1"], "--num_pairs must be at least 2, got 1"),
    ("distill", ["--batch_train", "1"], "--eval_batch must be at least 2, got 1"),
    ("evaluate", ["--full", "--batch_train", "1"], "--eval_batch must be at least 2, got 1"),
    ("evaluate", ["--coreset", "forgetting", "--coreset_size", "4", "--forgetting_batch", "1"],
     "--forgetting_batch must be at least 2, got 1"),
    ("evaluate", ["--coreset", "random", "--coreset_size", "1"], "--coreset_size must be at least 2, got 1"),
    ("evaluate", ["--coreset", "random", "--num_queries", "1"], "--coreset_size must be at least 2, got 1"),
    ("distill", ["--dsa", "True", "--dsa_strategy", ""], "--dsa_strategy '' (with --dsa True): no operation is named"),
    ("evaluate", ["--full", "--dsa", "True", "--dsa_strategy", "  "], "--dsa_strategy '  ' (with --dsa True): no "
                                                                      "operation is named"),
    ("evaluate", ["--full", "--dsa", "True", "--dsa_strategy", "_"], "--dsa_strategy '_' (with --dsa True): no operation"),
    ("distill", ["--dsa", "True", "--dsa_strategy", "color_zoom"], "--dsa_strategy 'color_zoom' (with --dsa True): "
                                                                   "unknown DSA operation(s) ['zoom']"),
]


@pytest.mark.parametrize("program, flags, message", REFUSED, ids=[f"{p} {' '.join(f)}" for p, f, _ in REFUSED])
def test_degenerate_settings_are_refused_before_any_work(program, flags, message, tmp_path):
    """(There is no data under tmp_path: had the program started loading it, the error would be another.)"""
    with pytest.raises(UserError) as caught:
        MAINS[program](tiny_flags(tmp_path / "data", tmp_path / "cache", *flags))
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("program, flag", [("buffer", "--expert_batch"), ("distill", "--mini_batch_size"),
                                           ("distill", "--num_pairs"), ("distill", "--batch_train"),
                                           ("evaluate", "--batch_train"), ("evaluate", "--forgetting_batch"),
                                           ("evaluate", "--coreset_size")])
def test_help_shows_the_contrastive_batch_range(program, flag):
    assert programs.flag_help(program, flag).endswith("(allowed: >= 2)")


def test_dsa_off_ignores_its_strategy_and_two_pairs_are_accepted():
    programs.parse("distill", "", ["--dsa", "False", "--dsa_strategy", "", "--mini_batch_size", "2",
                                   "--num_pairs", "2", "--batch_train", "2"])


# ---- data sizes: a split or a set of one pair, a batch over the data ---------------------------------------------


def one_pair_split(root, captions: list[str]) -> None:
    """Make the training split of the data set at `root` the first image with `captions`."""
    ann = root / "annotations" / "shapes_train.json"
    first = json.loads(ann.read_text())[0]
    ann.write_text(json.dumps([{**first, "caption": caption} for caption in captions]))


def test_a_training_split_of_one_pair_is_refused_naming_the_file(dataset_copy, cache_dir, tmp_path):
    one_pair_split(dataset_copy, ["a red circle"])
    for program, extra in (("buffer", ["--buffer_path", str(tmp_path / "b")]), ("evaluate", ["--full"])):
        with pytest.raises(UserError, match=r"the training split .*shapes_train\.json has 1 image-caption pair: "
                                            r"contrastive training needs at least 2"):
            MAINS[program](tiny_flags(dataset_copy, cache_dir, *extra))
    assert not (tmp_path / "b" / "shapes").exists()  # no expert folder


def test_max_train_images_leaving_one_pair_is_refused_naming_the_flag(dataset_copy, cache_dir, tmp_path):
    ann = dataset_copy / "annotations" / "shapes_train.json"
    entries = json.loads(ann.read_text())
    first = entries[0]["image"]
    ann.write_text(json.dumps([entries[0]] + [e for e in entries if e["image"] != first]))  # image 0: one caption
    with pytest.raises(UserError, match=r"shapes_train\.json \(--max_train_images 1\) has 1 image-caption pair"):
        buffer.main(tiny_flags(dataset_copy, cache_dir, "--buffer_path", str(tmp_path), "--max_train_images", "1"))


def test_a_set_of_one_pair_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "one.pt"
    save_distilled_set(path, torch.zeros(1, 3, 16, 16), torch.ones(1, 384), 0.1, 0.1, 0,
                       {"dataset": "shapes", "image_encoder": "convnet", "image_size": 16, "text_encoder": "minilm"})
    with pytest.raises(UserError, match=rf"--distilled {path} has 1 image-caption pair: contrastive training needs "
                                        r"at least 2"):  # before the (absent) data is read
        evaluate.main(tiny_flags(tmp_path / "data", tmp_path / "cache", "--distilled", str(path)))


def test_a_batch_over_the_training_split_is_one_batch_per_epoch_and_says_so(tiny_shapes, cache_dir, tmp_path,
                                                                            capsys):
    assert buffer.main(tiny_flags(tiny_shapes, cache_dir, "--buffer_path", str(tmp_path), "--num_experts", "1",
                                  "--train_epochs", "2", "--max_train_images", "2", "--expert_batch", "64")) == 0
    assert "note: --expert_batch 64 is more than the 10 pairs of the training split: every epoch is one batch of " \
           "all 10" in capsys.readouterr().out
    report = json.loads(next(tmp_path.glob("**/metrics_0.json")).read_text())
    assert [(e["steps"], e["gradient_steps"]) for e in report["epochs"]] == [(1, 1), (1, 1)]
    assert "did_not_train" not in report


# ---- a last batch of one pair is dropped --------------------------------------------------------------------


def test_the_pixel_loaders_never_give_a_batch_of_one_pair(tiny_shapes):
    images, texts = torch.zeros(5, 3, 4, 4), torch.arange(5.0).unsqueeze(1)
    assert [len(b[1]) for b in _pairs_loader(images, texts, 2, 0, None)] == [2, 2]  # 5 = 2 + 2 + 1: the 1 dropped
    assert [len(b[1]) for b in _pairs_loader(images, texts, 4, 0, None)] == [4]
    assert [len(b[1]) for b in _pairs_loader(images, texts, 8, 0, None)] == [5]  # one batch of all
    split = read_split("shapes", "train", tiny_shapes / "annotations", tiny_shapes, max_images=2)  # 10 pairs
    data = RetrievalData(split, torch.zeros(len(split.captions), 4), "none", {}, "val")
    assert [len(b[1]) for b in train_loader(data, 16, 3, 0, seed=0)] == [3, 3, 3]  # 10 = 3 + 3 + 3 + 1
    assert [len(b[1]) for b in train_loader(data, 16, 4, 0, seed=0)] == [4, 4, 2]


# ---- training that did not move: experts and evaluation models -----------------------------------------------


class Tiny(torch.nn.Module):
    """The two parts sgd_pair trains, over 4-d inputs."""

    def __init__(self):
        super().__init__()
        self.image_part = torch.nn.Linear(4, 4)
        self.text_projection = torch.nn.Linear(4, 4)

    def forward(self, images, texts, from_trunk=False):
        return self.image_part(images), self.text_projection(texts)


def watched_epoch(lr: float, weight_decay: float = 0.0, every_step: bool = True):
    torch.manual_seed(0)
    model = Tiny()
    optimizers = sgd_pair(model, lr, lr, weight_decay=weight_decay)
    batches = [(torch.randn(3, 4), torch.randn(3, 4), torch.arange(3)) for _ in range(2)]
    start, watch = trainable_copy(model), TrainingWatch(every_step=every_step)
    train_one_epoch(model, batches, optimizers, torch.device("cpu"), progress=False, watch=watch)
    return watch, watch.problem(start, trainable_copy(model)), start, trainable_copy(model)


def test_a_training_run_that_moves_is_not_reported():
    watch, problem, _, _ = watched_epoch(0.1)
    assert (watch.steps, watch.gradient_steps, problem) == (2, 2, None)


def test_a_loss_that_does_not_depend_on_the_weights_is_reported_even_when_weight_decay_moves_them(monkeypatch):
    monkeypatch.setattr(training, "contrastive_loss", constant_loss)
    watch, problem, start, end = watched_epoch(0.1, weight_decay=0.5)
    assert not all(torch.equal(a, b) for a, b in zip(start, end))  # the decay moved them ...
    assert (watch.steps, watch.gradient_steps) == (2, 0)  # ... no loss did
    assert problem.startswith("none of its 2 optimiser steps had a non-zero gradient")


def test_the_watch_that_stops_at_the_first_gradient_gives_the_same_verdicts(monkeypatch):
    # the evaluation models' watch (every_step=False) stops reading gradients after the first step that had one
    for lr in (0.1, 1e-45):
        full, quick = watched_epoch(lr), watched_epoch(lr, every_step=False)
        assert full[1] == quick[1] and (quick[0].steps, quick[0].gradient_steps) == (2, 1)
    calls = []

    def zero_first(*args, **kwargs):  # the first step's loss does not depend on the weights, the second's does
        calls.append(1)
        return (constant_loss if len(calls) == 1 else original)(*args, **kwargs)
    original = training.contrastive_loss
    monkeypatch.setattr(training, "contrastive_loss", zero_first)
    watch, problem, _, _ = watched_epoch(0.1, every_step=False)
    assert (watch.steps, watch.gradient_steps, problem) == (2, 1, None)
    monkeypatch.setattr(training, "contrastive_loss", constant_loss)
    assert watched_epoch(0.1, weight_decay=0.5, every_step=False)[1] == watched_epoch(0.1, weight_decay=0.5)[1]


def test_steps_too_small_to_change_a_weight_are_reported():
    watch, problem, start, end = watched_epoch(1e-45)  # rounds to the smallest float32: every update is 0
    assert watch.gradient_steps == 2 and all(torch.equal(a, b) for a, b in zip(start, end))
    assert problem.startswith("every trainable tensor is bit-identical to its start after 2 optimiser steps")


def test_no_step_at_all_is_reported():
    model = Tiny()
    assert TrainingWatch().problem(trainable_copy(model), trainable_copy(model)).startswith(
        "it took no optimiser step")


EXPERT = ("--num_experts", "1", "--train_epochs", "2", "--max_train_images", "2", "--expert_batch", "5")


def test_an_expert_that_did_not_train_is_a_warning_printed_and_in_its_metrics(tiny_shapes, cache_dir, tmp_path,
                                                                               monkeypatch, capsys):
    monkeypatch.setattr(training, "contrastive_loss", constant_loss)
    assert buffer.main(tiny_flags(tiny_shapes, cache_dir, "--buffer_path", str(tmp_path), *EXPERT)) == 0
    printed = capsys.readouterr()
    assert "WARNING: expert 0 did not train: none of its 4 optimiser steps had a non-zero gradient" in printed.err
    assert "WARNING: experts 0 did not train" in printed.out
    report = json.loads(next(tmp_path.glob("**/metrics_0.json")).read_text())
    assert report["did_not_train"].startswith("none of its 4 optimiser steps had a non-zero gradient")
    assert [(e["steps"], e["gradient_steps"]) for e in report["epochs"]] == [(2, 0), (2, 0)]


def test_an_expert_whose_weights_stay_bit_identical_is_reported(tiny_shapes, cache_dir, tmp_path, capsys):
    assert buffer.main(tiny_flags(tiny_shapes, cache_dir, "--buffer_path", str(tmp_path), *EXPERT,
                                  "--expert_lr_img", "1e-45", "--expert_lr_txt", "1e-45")) == 0
    assert "WARNING: expert 0 did not train: every trainable tensor is bit-identical" in capsys.readouterr().err
    report = json.loads(next(tmp_path.glob("**/metrics_0.json")).read_text())
    assert report["did_not_train"].startswith("every trainable tensor is bit-identical to its start after 4")


def evaluate_coreset(tiny_shapes, cache_dir, tmp_path, *extra) -> dict:
    out = tmp_path / "report.json"
    assert evaluate.main(tiny_flags(tiny_shapes, cache_dir, "--coreset", "random", "--coreset_size", "6",
                                    "--coreset_file", str(tmp_path / "coreset.pt"), "--num_eval", "1",
                                    "--epoch_eval_train", "1", "--batch_train", "3", "--out", str(out), *extra)) == 0
    return json.loads(out.read_text())


def test_evaluation_models_that_did_not_train_are_a_warning_printed_and_in_the_report(tiny_shapes, cache_dir,
                                                                                       tmp_path, monkeypatch, capsys):
    trained = evaluate_coreset(tiny_shapes, cache_dir, tmp_path)
    assert trained["untrained_models"] == [] and trained["warning"] is None
    assert "did not train" not in capsys.readouterr().out
    monkeypatch.setattr(training, "contrastive_loss", constant_loss)
    report = evaluate_coreset(tiny_shapes, cache_dir, tmp_path, "--lr_grid", "0.1", "0.01")
    problem = "none of its 2 optimiser steps had a non-zero gradient"  # 6 pairs in batches of 3, 1 epoch
    # the grid's cells in increasing rate; every score ties, so the first cell's rate is the choice
    assert [(m["lr"], m["seed"], m["epochs"]) for m in report["untrained_models"]] == [(0.01, 500_000, 1),
                                                                                         (0.1, 500_000, 1), (0.01, 0, 1)]
    assert all(m["problem"].startswith(problem) for m in report["untrained_models"])
    assert report["warning"].startswith("WARNING: 3 of 3 evaluation models did not train")
    assert report["warning"] in capsys.readouterr().out


def test_distillation_evaluations_that_did_not_train_are_a_warning(tiny_shapes, cache_dir, experts, tmp_path,
                                                                    monkeypatch, capsys):
    monkeypatch.setattr(training, "contrastive_loss", constant_loss)  # evaluation models only: not the students
    assert distill.main(distill_flags(tiny_shapes, cache_dir, experts, tmp_path, "--Iteration", "1", "--eval_it", "1",
                                      "--num_eval", "1", "--epoch_eval_train", "1", "--draw", "False")) == 0
    printed = capsys.readouterr().out
    assert printed.count("WARNING: 1 of 1 evaluation models did not train") == 2  # iterations 0 and 1


def test_the_protocol_returns_the_problem_of_a_model_that_did_not_train(monkeypatch):
    calls = []
    monkeypatch.setattr(protocol, "train_one_epoch", lambda *args, **kwargs: calls.append(kwargs["watch"]))
    settings = programs.parse("evaluate", "", ["--full", "--image_encoder", "convnet", "--image_size", "16",
                                               "--image_pretrained", "False"])
    _, problem = protocol.train_fresh_model(settings.model, settings.protocol, None, 0.1, 8, torch.device("cpu"),
                                            seed=0, epochs=2)
    assert len(calls) == 2 and problem.startswith("it took no optimiser step")
