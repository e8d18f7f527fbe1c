"""distill.py end to end on a tiny buffer: saved sets, reload, evaluation, resume, bad inputs."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import distill_flags

import distill
from data.build import load_retrieval_data
from data.distilled_set import load_distilled_set
from data.model_inputs import inputs_for
from settings import DataSettings, ModelSettings, ProtocolSettings
from utils.seeds import distill_eval_seed
from networks import build_model
from utils.cli import UserError
from evaluation.protocol import evaluate_pairs
from experts.files import check_data_matches
from matching import distiller


def test_saves_sets_grids_and_captions_that_reload_safely(run4):
    names = {p.name for p in run4.iterdir()}
    for it in ("000000", "000002", "000004"):
        assert {f"distilled_{it}.pt", f"synthetic_images_plain_{it}.png", f"synthetic_images_clipped_{it}.png",
                f"nearest_captions_{it}.txt"} <= names
    assert {"distilled_last.pt", "distilled_best.pt"} <= names
    raw = torch.load(run4 / "distilled_last.pt", weights_only=True)
    assert raw["iteration"] == 4 and raw["image_syn"].shape == (8, 3, 16, 16) and raw["text_syn"].shape == (8, 384)
    assert raw["config"]["image_encoder"] == "convnet" and raw["config"]["text_identity"].startswith("minilm")
    assert isinstance(raw["syn_lr_img"], float) and set(raw["metrics"]) >= {"img_r1", "txt_r10", "r_mean"}
    first = load_distilled_set(run4 / "distilled_000000.pt")
    assert not torch.equal(first["image_syn"], raw["image_syn"])  # the pixels were learned
    assert not torch.equal(first["text_syn"], raw["text_syn"])
    assert raw["syn_lr_img"] != first["syn_lr_img"]
    best = load_distilled_set(run4 / "distilled_best.pt")
    assert best["metrics"]["r_mean"]["mean"] == max(
        load_distilled_set(run4 / f"distilled_{i}.pt")["metrics"]["r_mean"]["mean"] for i in ("000000", "000002", "000004"))
    lines = (run4 / "nearest_captions_000004.txt").read_text().splitlines()
    assert len(lines) == 9 and lines[1].startswith("0\t")


def test_reloaded_set_evaluates_to_the_same_metrics(run4, tiny_shapes, cache_dir):
    payload = load_distilled_set(run4 / "distilled_000004.pt")
    config = payload["config"]
    data_settings, model_settings, protocol = (cls.from_saved(config) for cls in
                                               (DataSettings, ModelSettings, ProtocolSettings))
    data = load_retrieval_data(data_settings, model_settings, torch.device("cpu"), progress=False)
    model = build_model(model_settings, data.text_dim)
    inputs = inputs_for(data_settings, model_settings, data, model, torch.device("cpu"), progress=False,
                        need_train=False)
    summary = evaluate_pairs(model_settings, protocol, payload["image_syn"], payload["text_syn"],
                             payload["syn_lr_img"], inputs, torch.device("cpu"), protocol.num_eval,
                             seed=distill_eval_seed(config["seed"], 4), progress=False, lr_txt=payload["syn_lr_txt"])
    assert summary == payload["metrics"]


def test_resume_continues_at_the_right_iteration_with_the_same_state(run4, tiny_shapes, cache_dir, experts, tmp_path):
    first = tmp_path / "part"
    assert distill.main(distill_flags(tiny_shapes, cache_dir, experts, first, "--Iteration", "2")) == 0
    resumed = tmp_path / "resumed"
    assert distill.main(distill_flags(tiny_shapes, cache_dir, experts, resumed, "--Iteration", "4",
                                      "--resume", str(first / "distilled_last.pt"))) == 0
    assert not (resumed / "distilled_000000.pt").exists()  # it did not start over
    a, b = load_distilled_set(resumed / "distilled_last.pt"), load_distilled_set(run4 / "distilled_last.pt")
    assert a["iteration"] == b["iteration"] == 4
    assert torch.equal(a["image_syn"], b["image_syn"]) and torch.equal(a["text_syn"], b["text_syn"])
    assert a["syn_lr_img"] == b["syn_lr_img"] and a["metrics"] == b["metrics"]
    momentum = a["state"]["optimizers"]["img"]["state"][0]["momentum_buffer"]
    assert torch.equal(momentum, b["state"]["optimizers"]["img"]["state"][0]["momentum_buffer"])


@pytest.mark.parametrize("extra,message", [
    (("--mini_batch_size", "9"), "--mini_batch_size 9 is larger than --num_pairs 8"),
    (("--lr_img", "0"), "--lr_img must be positive"),
    (("--lr_lr", "-1"), "--lr_lr must be positive"),
    (("--max_start_epoch", "3", "--expert_epochs", "2"), r"holds trajectories of 4 snapshots, but .*need 5"),
    (("--image_size", "32"), r"do not fit this run \(image_size: buffer has 16, this run asks for 32"),
    (("--max_train_images", "10"), r"train_pairs: buffer has 200, this run asks for 50\) \(the experts trained on "
                                   r"another training split: pass the --max_train_images buffer.py had"),
])
def test_bad_settings_are_refused_with_a_message(tiny_shapes, cache_dir, experts, tmp_path, extra, message):
    with pytest.raises(UserError, match=message):
        distill.main(distill_flags(tiny_shapes, cache_dir, experts, tmp_path, "--Iteration", "1", *extra))


def test_missing_or_foreign_buffers_are_refused(tiny_shapes, cache_dir, experts, tmp_path):
    with pytest.raises(UserError, match=r"no experts in .*run buffer.py"):
        distill.main(distill_flags(tiny_shapes, cache_dir, tmp_path / "empty", tmp_path / "o", "--Iteration", "1"))
    folder = experts / "shapes" / "convnet" / "minilm"
    other = tmp_path / "other"
    other.mkdir()
    meta = json.loads((folder / "buffer_meta.json").read_text())
    (other / "buffer_meta.json").write_text(json.dumps({**meta, "image_encoder": "resnet18"}))
    with pytest.raises(UserError, match=r"image_encoder: buffer has 'resnet18', this run asks for 'convnet'"):
        distill.main(distill_flags(tiny_shapes, cache_dir, other, tmp_path / "o", "--Iteration", "1"))
    (other / "buffer_meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"no expert files .* run buffer.py first"):
        distill.main(distill_flags(tiny_shapes, cache_dir, other, tmp_path / "o", "--Iteration", "1"))


@pytest.mark.parametrize("text_dim, message", [
    (None, r"text_dim: buffer has None, this run asks for 384"),  # was a KeyError (a traceback)
    (768, r"text_dim: buffer has 768, this run asks for 384\) \(the experts' text head takes embeddings of another "
          r"size: pass the --text_encoder and --text_model buffer.py had"),
])
def test_experts_of_another_text_dimension_are_refused_by_the_compatibility_check(tiny_shapes, cache_dir, experts,
                                                                                  tmp_path, text_dim, message):
    """The text dimension is known once the data is loaded; its check is the one compatibility check's."""
    folder = tmp_path / "buffer"
    shutil.copytree(experts / "shapes" / "convnet" / "minilm", folder)
    meta = json.loads((folder / "buffer_meta.json").read_text())
    meta.pop("text_dim") if text_dim is None else meta.update(text_dim=text_dim)
    (folder / "buffer_meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=rf"the experts in {folder} do not fit this run \({message}"):
        distill.main(distill_flags(tiny_shapes, cache_dir, folder, tmp_path / "o", "--Iteration", "1"))


def test_the_data_check_names_what_disagrees_and_skips_what_old_buffers_do_not_record(tmp_path):
    meta = {"train_pairs": 200, "text_dim": 384}
    check_data_matches(meta, tmp_path, 200, 384)
    check_data_matches({"text_dim": 384}, tmp_path, 50, 384)  # written before train_pairs existed
    check_data_matches({"train_pairs": None, "text_dim": 384}, tmp_path, 50, 384)
    with pytest.raises(UserError, match=r"\(train_pairs: buffer has 200, this run asks for 50; text_dim: buffer has "
                                        r"384, this run asks for 512\) \(the experts trained on another training"):
        check_data_matches(meta, tmp_path, 50, 512)


def test_resume_file_that_does_not_match_is_refused(run4, tiny_shapes, cache_dir, experts, tmp_path):
    with pytest.raises(UserError, match=r"does not match this run \(num_pairs: file has 8, this run has 6"):
        distill.main(distill_flags(tiny_shapes, cache_dir, experts, tmp_path, "--Iteration", "4", "--num_queries", "6",
                                   "--resume", str(run4 / "distilled_last.pt")))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(UserError, match=r"junk.pt is not a tensor file \(a .pt file written by this project\)"):
        distill.main(distill_flags(tiny_shapes, cache_dir, experts, tmp_path, "--Iteration", "4",
                                   "--resume", str(tmp_path / "junk.pt")))


def corrupt_call(monkeypatch, number: int, corrupt) -> None:
    """Make the `number`-th meta-gradient of a run (1-based) pass through `corrupt(result)`."""
    real = distiller.matching_gradients
    calls = []

    def wrapped(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == number:
            corrupt(result)
        return result

    monkeypatch.setattr(distiller, "matching_gradients", wrapped)


def learned_state(path):
    payload = load_distilled_set(path)
    return payload["image_syn"], payload["text_syn"], payload["syn_lr_img"], payload["syn_lr_txt"]


def assert_same_state(a, b):
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2:] == b[2:]


def nan_term(result):
    result.image_term = result.image_term * float("nan")


def negative_step_size(result):  # a gradient of 1e6 on syn_lr_img: one SGD step takes it far below zero
    result.lr_img_grad = result.lr_img_grad + 1e6


@pytest.mark.parametrize("corrupt, reason", [(nan_term, "non-finite matching loss (image term nan)"),
                                             (negative_step_size, "step size not positive (syn_lr_img would become -")])
def test_a_bad_step_is_skipped_counted_and_leaves_the_set_as_it_was(corrupt, reason, tiny_shapes, cache_dir, experts,
                                                                    tmp_path, monkeypatch, capsys):
    corrupt_call(monkeypatch, 3, corrupt)  # the third iteration: iteration 2
    assert distill.main(distill_flags(tiny_shapes, cache_dir, experts, tmp_path, "--Iteration", "4",
                                      "--eval_it", "1", "--draw", "False")) == 0
    assert f"iteration 2: step skipped: {reason}" in capsys.readouterr().out
    assert_same_state(learned_state(tmp_path / "distilled_000002.pt"), learned_state(tmp_path / "distilled_000003.pt"))
    before, after = learned_state(tmp_path / "distilled_000003.pt"), learned_state(tmp_path / "distilled_000004.pt")
    assert not torch.equal(before[0], after[0])  # the next step is applied again
    final = load_distilled_set(tmp_path / "distilled_last.pt")
    assert sum(final["state"]["guard"]["skipped"].values()) == 1 and final["state"]["guard"]["consecutive"] == 0
    assert all(torch.isfinite(final[key]).all() for key in ("image_syn", "text_syn")) and final["syn_lr_img"] > 0


def test_too_many_skips_in_a_row_stop_with_the_last_good_set(tiny_shapes, cache_dir, experts, tmp_path, monkeypatch):
    corrupt_call(monkeypatch, 3, nan_term)
    with pytest.raises(UserError, match=r"diverged at iteration 2 \(1 steps in a row skipped, the last for non-finite "
                                        r"matching loss.*distilled_last.pt \(iteration 2\)"):
        distill.main(distill_flags(tiny_shapes, cache_dir, experts, tmp_path, "--Iteration", "6", "--max_skips", "1"))
    saved = load_distilled_set(tmp_path / "distilled_last.pt")
    assert saved["iteration"] == 2
    assert_same_state(learned_state(tmp_path / "distilled_last.pt"), learned_state(tmp_path / "distilled_000002.pt"))


def test_a_gradient_spike_is_skipped_after_the_warm_up(tiny_shapes, cache_dir, experts, tmp_path, monkeypatch, capsys):
    def spike(result):
        result.learned_grads[0] = result.learned_grads[0] * 1e4
    corrupt_call(monkeypatch, 8, spike)  # 7 steps applied before it (the guard's warm-up is 5)
    assert distill.main(distill_flags(tiny_shapes, cache_dir, experts, tmp_path, "--Iteration", "9", "--eval_it", "9",
                                      "--draw", "False")) == 0
    assert "iteration 7: step skipped: gradient spike (pixels norm" in capsys.readouterr().out
    assert load_distilled_set(tmp_path / "distilled_last.pt")["state"]["guard"]["skipped"] == {"gradient spike": 1}


def test_dsa_is_opt_in_and_changes_the_learned_pixels(run4, tiny_shapes, cache_dir, experts, tmp_path):
    flags = ("--Iteration", "2", "--draw", "False")
    assert distill.main(distill_flags(tiny_shapes, cache_dir, experts, tmp_path / "dsa", *flags, "--dsa", "True")) == 0
    with_dsa = load_distilled_set(tmp_path / "dsa" / "distilled_last.pt")
    plain = load_distilled_set(run4 / "distilled_000002.pt")  # same seed and flags, --dsa False (default)
    assert with_dsa["config"]["dsa"] is True and plain["config"]["dsa"] is False
    first = load_distilled_set(run4 / "distilled_000000.pt")
    assert torch.equal(load_distilled_set(tmp_path / "dsa" / "distilled_000000.pt")["image_syn"], first["image_syn"])
    assert not torch.equal(with_dsa["image_syn"], plain["image_syn"])


def test_exact_lowmem_matching_learns_the_same_set_as_unroll(run4, tiny_shapes, cache_dir, experts, tmp_path):
    flags = ("--Iteration", "2", "--draw", "False")
    for mode in ("exact_lowmem", "tesla"):
        assert distill.main(distill_flags(tiny_shapes, cache_dir, experts, tmp_path / mode, *flags,
                                          "--matching", mode)) == 0
    exact, tesla = (load_distilled_set(tmp_path / mode / "distilled_last.pt") for mode in ("exact_lowmem", "tesla"))
    unrolled = load_distilled_set(run4 / "distilled_000002.pt")  # same seed and flags, --matching unroll
    assert exact["config"]["matching"] == "exact_lowmem" and unrolled["config"]["matching"] == "unroll"
    start = load_distilled_set(run4 / "distilled_000000.pt")
    for key in ("image_syn", "text_syn"):
        moved = (unrolled[key] - start[key]).norm()
        assert moved > 0
        assert (exact[key] - unrolled[key]).norm() < 1e-4 * moved  # float32: equal up to summation order
        assert (tesla[key] - unrolled[key]).norm() > 1e-3 * moved  # the approximation changes the result
    assert exact["syn_lr_img"] == pytest.approx(unrolled["syn_lr_img"], rel=1e-6)
    assert exact["syn_lr_txt"] == pytest.approx(unrolled["syn_lr_txt"], rel=1e-6)


def test_a_time_budget_stops_after_the_iteration_that_exceeds_it_and_saves(tiny_shapes, cache_dir, experts, tmp_path,
                                                                          capsys):
    assert distill.main(distill_flags(tiny_shapes, cache_dir, experts, tmp_path, "--Iteration", "50",
                                      "--time_budget", "1e-9", "--draw", "False")) == 0
    assert "--time_budget 1e-09 min reached after iteration 1: stopping" in capsys.readouterr().out
    last = load_distilled_set(tmp_path / "distilled_last.pt")
    assert last["iteration"] == 1 and last["metrics"]  # evaluated and saved as at the end of a run
    assert (tmp_path / "distilled_000001.pt").is_file()
    with pytest.raises(UserError, match="--time_budget must be positive"):
        distill.main(distill_flags(tiny_shapes, cache_dir, experts, tmp_path, "--time_budget", "0"))


def test_each_iteration_logs_clear_keys_and_the_references_names_with_the_same_values(tiny_shapes, cache_dir, experts,
                                                                                    tmp_path, monkeypatch):
    from matching.run_writer import REFERENCE_WANDB_KEYS
    from utils.wandb_logging import NullRun

    logged = []

    class Recorder(NullRun):
        def log(self, record, step=None):
            logged.append((step, dict(record)))

    monkeypatch.setattr(distill, "start_run", lambda *args, **kwargs: Recorder())
    assert distill.main(distill_flags(tiny_shapes, cache_dir, experts, tmp_path, "--Iteration", "2",
                                      "--draw", "False")) == 0
    steps = [(step, record) for step, record in logged if "matching/loss" in record]
    assert [step for step, _ in steps] == [0, 1]
    for _, record in steps:
        assert set(REFERENCE_WANDB_KEYS) | set(REFERENCE_WANDB_KEYS.values()) <= set(record)
        for ours, theirs in REFERENCE_WANDB_KEYS.items():
            assert record[ours] == record[theirs]
        assert record["matching/loss"] == pytest.approx(record["matching/image_loss"] + record["matching/text_loss"])
    assert any("eval/r_mean" in record for _, record in logged)
