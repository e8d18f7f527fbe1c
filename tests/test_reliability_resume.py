"""Reliability of distill.py's saves and resumes: an interrupted run continues exactly, evaluation never
moves the distillation's random streams, the best and last files agree after any interruption, nothing
non-finite is ever written, and damaged resume files are refused with a clear message."""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import distill_flags

import distill
from data.distilled_set import load_distilled_set, save_distilled_set
from evaluation import protocol
from matching import distiller, run_writer
from matching.distiller import Distiller
from matching.resume import ResumePoint
from matching.run_files import RunFiles
from matching.run_writer import RunWriter
from matching.timing import TIMING_NAME, RunTiming
from utils.cli import UserError
from utils.device import seed_everything
from utils.distributed import ProcessGroupInfo
from utils.rng import global_streams_kept, global_streams_seeded


def learned(path):
    payload = load_distilled_set(path)
    sim = payload.get("sim_params", [])
    return payload["image_syn"], payload["text_syn"], payload["syn_lr_img"], payload["syn_lr_txt"], sim


def assert_identical(a, b):
    a, b = learned(a), learned(b)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2:4] == b[2:4]
    assert len(a[4]) == len(b[4]) and all(torch.equal(x, y) for x, y in zip(a[4], b[4]))


# Where a Ctrl-C can land: at the start of a step, after the step drew its random numbers and took the next
# expert, after the optimisers moved the set (before the check), inside an evaluation after a model trained
# (its seeding done), inside a file write.
INTERRUPT_POINTS = {"step": (Distiller, "step"), "gradient": (distiller, "matching_gradients"),
                    "applied": (Distiller, "state_problem"), "evaluate": (protocol, "evaluate_retrieval"),
                    "save": (run_writer, "save_distilled_set")}


def interrupt_at_call(monkeypatch, call: int, where: str = "step"):
    """Raise KeyboardInterrupt (Ctrl-C) at the `call`-th call of the function at INTERRUPT_POINTS[where]."""
    target = INTERRUPT_POINTS[where]
    original, calls = getattr(*target), {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(*target, wrapped)


def six(tiny_shapes, cache_dir, experts, out, *extra):
    """Six iterations (evaluated at 0, 2, 4, 6) with the LoRS similarity learned too; --lr_sim 0.1 keeps every
    step applied (with the default 10 most steps are skipped, and a skipped step proves nothing about resuming)."""
    return distill_flags(tiny_shapes, cache_dir, experts, out, "--Iteration", "6", "--draw", "False",
                         "--sim_type", "lowrank", "--sim_rank", "2", "--lr_sim", "0.1", *extra)


@pytest.fixture(scope="module")
def reference6(tiny_shapes, cache_dir, experts, tmp_path_factory):
    """The uninterrupted run that every interrupted one is compared with."""
    out = tmp_path_factory.mktemp("reference6")
    assert distill.main(six(tiny_shapes, cache_dir, experts, out)) == 0
    last = load_distilled_set(out / "distilled_last.pt")
    assert last["state"]["guard"]["skipped"] == {}  # every step moved the set: the comparisons have teeth
    assert last["state"]["best_iteration"] > 0  # and the best file was replaced after the start
    return out


def interrupted_then_resumed(monkeypatch, flags, out, call, where):
    interrupt_at_call(monkeypatch, call, where)
    with pytest.raises(KeyboardInterrupt):
        distill.main(flags)
    monkeypatch.undo()
    saved = load_distilled_set(out / "distilled_last.pt")
    assert distill.main([*flags, "--resume", str(out / "distilled_last.pt")]) == 0
    return saved


@pytest.mark.parametrize("call, where", [(4, "step"), (2, "step"), (3, "gradient"), (2, "applied"), (3, "evaluate"),
                                         (4, "save")])  # "evaluate" 3: the first model judged at iteration 2
def test_ctrl_c_then_resume_gives_the_uninterrupted_result_bit_for_bit(call, where, reference6, tiny_shapes, cache_dir,
                                                                       experts, tmp_path, monkeypatch):
    out = tmp_path / "run"
    saved = interrupted_then_resumed(monkeypatch, six(tiny_shapes, cache_dir, experts, out), out, call, where)
    assert saved["iteration"] < 6
    assert_identical(out / "distilled_last.pt", reference6 / "distilled_last.pt")
    assert_identical(out / "distilled_best.pt", reference6 / "distilled_best.pt")
    a, b = load_distilled_set(out / "distilled_last.pt"), load_distilled_set(reference6 / "distilled_last.pt")
    assert a["metrics"] == b["metrics"] and a["state"]["best_r_mean"] == b["state"]["best_r_mean"]
    assert a["state"]["guard"] == b["state"]["guard"]


def test_evaluations_do_not_change_what_is_learned(tiny_shapes, cache_dir, experts, tmp_path):
    """Evaluating every iteration or only at the start and the end learns the same set (evaluation draws
    its own random numbers and leaves the distillation's streams alone)."""
    often, rarely = tmp_path / "often", tmp_path / "rarely"
    quick = ("--dsa", "True", "--num_eval", "1", "--epoch_eval_train", "1")
    assert distill.main(six(tiny_shapes, cache_dir, experts, often, "--eval_it", "1", *quick)) == 0
    assert distill.main(six(tiny_shapes, cache_dir, experts, rarely, "--eval_it", "100", *quick)) == 0
    assert_identical(often / "distilled_last.pt", rarely / "distilled_last.pt")


def test_resume_after_an_evaluation_off_the_eval_it_grid(reference6, tiny_shapes, cache_dir, experts, tmp_path):
    """--time_budget stops after iteration 1 and evaluates there (not a multiple of --eval_it 2); continuing from
    that file learns what the uninterrupted run learned."""
    out = tmp_path / "run"
    assert distill.main(six(tiny_shapes, cache_dir, experts, out, "--time_budget", "1e-9")) == 0
    stopped = load_distilled_set(out / "distilled_last.pt")
    assert stopped["iteration"] == 1 and stopped["metrics"]
    assert RunTiming.budget_stop(out) == 1  # what a pipeline re-run reads to take this set as finished
    assert distill.main(six(tiny_shapes, cache_dir, experts, out, "--resume", str(out / "distilled_last.pt"))) == 0
    assert RunTiming.budget_stop(out) is None  # the continued run reached --Iteration: no longer a budget stop
    assert_identical(out / "distilled_last.pt", reference6 / "distilled_last.pt")
    a, b = load_distilled_set(out / "distilled_last.pt"), load_distilled_set(reference6 / "distilled_last.pt")
    assert a["metrics"] == b["metrics"]


def test_the_writer_saves_the_timing_record_it_owns_beside_every_set(tiny_shapes, tmp_path):
    """Saving a point needs nothing the loop defines later: the writer owns the timing record (distill()'s nested
    save once read a `timing` variable assigned only further down), and writes it as it stands at each save."""
    settings = distill.parse_args(distill_flags(tiny_shapes, tmp_path, tmp_path, tmp_path / "out"))
    learner = Distiller(settings, torch.zeros(8, 3, 16, 16), torch.zeros(8, 384), torch.device("cpu"), None)
    timing = RunTiming({"seconds": 1.5, "iterations": 3, "sync_seconds": 0.25})
    files = RunFiles(tmp_path / "out")
    writer = RunWriter(settings, files, distill.run_config(settings, "minilm"), learner, timing, run=None, inputs=None,
                       data=None, model=None, group=ProcessGroupInfo(), device=torch.device("cpu"))
    point = ResumePoint(3, learner.learned_copy(), [{"rng": {}, "experts": {}}], learner.guard.state())
    writer.save(files.last, point)
    assert json.loads((files.dir / TIMING_NAME).read_text()) == {"seconds": 1.5, "iterations": 3, "sync_seconds": 0.25}
    assert torch.load(files.last, weights_only=True)["iteration"] == 3
    timing.record["iterations"] = 4
    writer.save(files.at(4), replace(point, iteration=4))
    assert json.loads((files.dir / TIMING_NAME).read_text())["iterations"] == 4
    assert RunTiming.continued(str(files.last), main_process=True).record == timing.record
    assert RunTiming.continued(str(files.last), main_process=False).record["iterations"] == 0


def test_a_ctrl_c_before_any_iteration_is_timed_saves_the_set_and_the_timing_record(tiny_shapes, cache_dir, experts,
                                                                                   tmp_path, monkeypatch):
    """Ctrl-C in the first evaluation of a run (iteration 0, nothing timed yet) writes a resumable start and the
    zero timing record; a resumed run stopped in its first step keeps the record it continued."""
    out, timing = tmp_path / "run", tmp_path / "run" / TIMING_NAME
    flags = six(tiny_shapes, cache_dir, experts, out, "--Iteration", "2")
    interrupt_at_call(monkeypatch, 1, "evaluate")
    with pytest.raises(KeyboardInterrupt):
        distill.main(flags)
    monkeypatch.undo()
    saved = load_distilled_set(out / "distilled_last.pt")
    assert saved["iteration"] == 0 and not saved["metrics"] and saved["state"]["best_iteration"] == -1
    assert json.loads(timing.read_text()) == {"seconds": 0.0, "iterations": 0, "sync_seconds": 0.0}
    assert distill.main([*flags, "--resume", str(out / "distilled_last.pt")]) == 0
    record = json.loads(timing.read_text())
    assert record["iterations"] == 2 and record["seconds"] > 0
    interrupt_at_call(monkeypatch, 1, "step")
    with pytest.raises(KeyboardInterrupt):
        distill.main([*flags, "--Iteration", "4", "--resume", str(out / "distilled_last.pt")])
    assert load_distilled_set(out / "distilled_last.pt")["iteration"] == 2
    assert json.loads(timing.read_text()) == record


def test_the_best_file_is_written_before_the_last_file(tiny_shapes, cache_dir, experts, tmp_path, monkeypatch):
    """A kill between two writes leaves a best file at least as new as every resumable file, never a stale one:
    the best file is written first, then the iteration's file, then the last file."""
    order = []
    original = run_writer.save_distilled_set

    def recording(path, *args, **kwargs):
        order.append(os.path.basename(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(run_writer, "save_distilled_set", recording)
    assert distill.main(six(tiny_shapes, cache_dir, experts, tmp_path, "--Iteration", "2")) == 0
    assert order[:3] == ["distilled_best.pt", "distilled_000000.pt", "distilled_last.pt"]
    best, last = load_distilled_set(tmp_path / "distilled_best.pt"), load_distilled_set(tmp_path / "distilled_last.pt")
    assert best["metrics"]["r_mean"]["mean"] == last["state"]["best_r_mean"]
    assert last["state"]["best_iteration"] == best["iteration"]


def test_a_blow_up_keeps_the_state_before_it_and_nothing_non_finite_is_saved(tiny_shapes, cache_dir, experts,
                                                                             tmp_path, monkeypatch):
    """Force the pixels to infinity in the third step: the step is refused, every file written is finite, and
    the run stopped by the guard keeps the set from before the step that broke it."""
    original, calls = Distiller.step, {"n": 0}

    def exploding(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 3:
            with torch.no_grad():  # as if the optimiser step had produced inf
                self.optimizers["img"].param_groups[0]["lr"] = float("inf")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Distiller, "step", exploding)
    with pytest.raises(UserError, match="diverged at iteration 3"):
        distill.main(six(tiny_shapes, cache_dir, experts, tmp_path, "--max_skips", "2"))
    for path in tmp_path.glob("*.pt"):
        payload = load_distilled_set(path)
        assert torch.isfinite(payload["image_syn"]).all() and torch.isfinite(payload["text_syn"]).all(), path
    assert_identical(tmp_path / "distilled_last.pt", tmp_path / "distilled_000002.pt")
    last = load_distilled_set(tmp_path / "distilled_last.pt")
    assert last["iteration"] == 2 and last["state"]["guard"]["consecutive"] == 0  # a resume may skip again


NAN = float("nan")


@pytest.mark.parametrize("where, extra", [
    ("image_syn", {"image_syn": torch.full((2, 3, 4, 4), NAN)}),
    ("text_syn", {"text_syn": torch.tensor([[0.0, NAN], [0.0, 0.0]])}),
    ("similarity", {"similarity": torch.tensor([[1.0, float("inf")], [0.0, 1.0]])}),
    ("state.optimizers.img.state.0.momentum_buffer",
     {"state": {"optimizers": {"img": {"state": {0: {"momentum_buffer": torch.full((2, 3, 4, 4), NAN)}}}}}}),
])
def test_saving_a_non_finite_set_is_refused(where, extra, tmp_path):
    arguments = {"image_syn": torch.zeros(2, 3, 4, 4), "text_syn": torch.zeros(2, 2), "syn_lr_img": 0.1,
                 "syn_lr_txt": 0.1, "iteration": 0, "config": {}, **extra}
    with pytest.raises(ValueError, match=rf"^{where} holds non-finite values"):
        save_distilled_set(tmp_path / "x.pt", **arguments)
    assert not list(tmp_path.iterdir())


def test_two_runs_with_the_same_seed_write_byte_identical_sets(tiny_shapes, cache_dir, experts, tmp_path):
    """Both runs write to the same folder (the folder is one of the settings saved with every set)."""
    out, written = tmp_path / "run", []
    for _ in range(2):
        assert distill.main(six(tiny_shapes, cache_dir, experts, out, "--Iteration", "2", "--name", "same")) == 0
        written.append({path.name: path.read_bytes() for path in sorted(out.glob("*.pt"))})
        shutil.rmtree(out)
    assert len(written[0]) >= 4 and written[0].keys() == written[1].keys()
    for name, data in written[0].items():
        assert data == written[1][name], f"{name} differs between two runs with the same seed"


def _momentum(payload, name="img"):
    return payload["state"]["optimizers"][name]["state"][0]


DAMAGES = {
    "no state": lambda p: p.pop("state"),
    "state without rng": lambda p: p["state"].pop("rng"),
    "rng of the wrong type": lambda p: p["state"]["rng"].update(generator=[1, 2, 3]),
    "state without the expert position": lambda p: p["state"].pop("experts"),
    "expert position out of range": lambda p: p["state"]["experts"].update(file_pos=7),
    "state without best_r_mean": lambda p: p["state"].pop("best_r_mean"),
    "guard history not numbers": lambda p: p["state"]["guard"].update(history={"pixels": ["x"]}),
    "wrong version": lambda p: p.update(version=99),
    "text dtype": lambda p: p.update(text_syn=p["text_syn"].to(torch.int64)),
    "text rows": lambda p: p.update(text_syn=p["text_syn"][:7]),
    "image size": lambda p: p.update(image_syn=p["image_syn"][:, :, :8, :8].contiguous()),
    "text width": lambda p: p.update(text_syn=p["text_syn"][:, :5].contiguous()),
    "non-finite pixels": lambda p: p["image_syn"].view(-1)[0].fill_(NAN),
    "optimizer state of wrong shape": lambda p: _momentum(p).update(momentum_buffer=torch.zeros(1)),
    "non-finite momentum": lambda p: _momentum(p, "txt")["momentum_buffer"].view(-1)[0].fill_(NAN),
    "optimizer missing": lambda p: p["state"]["optimizers"].pop("sim"),
    "similarity parameters of wrong shape": lambda p: p.update(sim_params=p["sim_params"][:1]),
    "iteration not a number": lambda p: p.update(iteration="seven"),
    "iteration negative": lambda p: p.update(iteration=-1),
    "step size NaN": lambda p: p.update(syn_lr_img=NAN),
    "step size negative": lambda p: p.update(syn_lr_txt=-0.1),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_resume_file_is_refused_naming_the_file(damage, reference6, tiny_shapes, cache_dir, experts,
                                                          tmp_path):
    payload = torch.load(reference6 / "distilled_last.pt", weights_only=True)
    DAMAGES[damage](payload)
    path = tmp_path / "damaged.pt"
    torch.save(payload, path)
    with pytest.raises(UserError, match=re.escape(str(path))):
        distill.main(six(tiny_shapes, cache_dir, experts, tmp_path / "out", "--Iteration", "8", "--resume", str(path)))


def test_a_truncated_resume_file_is_refused(reference6, tiny_shapes, cache_dir, experts, tmp_path):
    path = tmp_path / "truncated.pt"
    path.write_bytes((reference6 / "distilled_last.pt").read_bytes()[:500])
    with pytest.raises(UserError, match=r"truncated.pt is corrupt, truncated"):
        distill.main(six(tiny_shapes, cache_dir, experts, tmp_path / "out", "--resume", str(path)))


@pytest.mark.parametrize("make_bad, message", [
    (lambda p: (p / "file").write_text("x") and p / "file", "is a file, not a folder"),
    (lambda p: (p / "file").write_text("x") and p / "file" / "sub", "is a file, not a folder"),
])
def test_a_bad_save_dir_is_refused_before_any_work(make_bad, message, tiny_shapes, cache_dir, experts, tmp_path,
                                                    monkeypatch):
    monkeypatch.setattr(distill, "load_retrieval_data", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(UserError, match=message):
        distill.main(six(tiny_shapes, cache_dir, experts, make_bad(tmp_path)))


def test_evaluation_keeps_the_global_streams_and_a_step_seeds_its_own():
    """What protocol.train_fresh_model runs in (every evaluation model) and what a distillation step runs in."""
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    with global_streams_kept():
        seed_everything(5)
        torch.rand(3), random.random(), np.random.rand()
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert (np.random.get_state()[1] == before[2]).all()
    draws = []
    for _ in range(2):
        with global_streams_seeded(7, torch.device("cpu")):
            draws.append(torch.nn.functional.dropout(torch.ones(20), 0.5))
        torch.rand(5)  # whatever else draws in between
    assert torch.equal(*draws) and not torch.equal(torch.get_rng_state(), before[0])


def test_a_resume_with_a_lower_learning_rate_uses_it(reference6, tiny_shapes, cache_dir, experts, tmp_path):
    """What the divergence message advises (--resume with lower --lr_img) must take effect: the optimiser
    state in the file brings its momentum, not its learning rate."""
    out = tmp_path / "run"
    assert distill.main(six(tiny_shapes, cache_dir, experts, out, "--lr_img", "1",
                            "--resume", str(reference6 / "distilled_000004.pt"))) == 0
    groups = load_distilled_set(out / "distilled_last.pt")["state"]["optimizers"]["img"]["param_groups"]
    assert [group["lr"] for group in groups] == [1.0]
    assert not torch.equal(learned(out / "distilled_last.pt")[0], learned(reference6 / "distilled_last.pt")[0])
