"""What the previous reliability change left open (issue 26, item 6): two buffer.py processes started together
on one folder never train the same expert number; buffers trained with another loss, pretraining or number of
feature views are refused; a set saved on divergence resumes with a fresh run of skips; the forgetting model
and the coreset probe draw from random streams of their own."""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch
from conftest import distill_flags, tiny_flags

import buffer
import distill
import evaluate
from data.distilled_set import load_distilled_set
from evaluation import coresets
from experts import checkpoint
from experts.files import META_NAME, mismatches
from matching.distiller import Distiller
from matching.guard import StepGuard
from networks import build_model
from settings import programs
from utils import seeds
from utils.cli import UserError
from utils.device import seed_everything

LAYOUT = ("shapes", "convnet", "minilm")


# --- 1. two runs claiming expert numbers at once -------------------------------------------------------------

def _claim_in_a_process(directory, count, ready, results, done):
    ready.wait()  # both processes scan the folder at the same moment
    results.put((os.getpid(), checkpoint.numbers_to_train(Path(directory), count)))
    done.wait()  # stay alive: a live process's claims are not taken over


def test_two_processes_started_together_claim_different_numbers(tmp_path):
    context = multiprocessing.get_context("fork")
    ready, done, results = context.Barrier(2), context.Event(), context.Queue()
    workers = [context.Process(target=_claim_in_a_process, args=(str(tmp_path), 3, ready, results, done))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    try:
        claimed = dict(results.get(timeout=30) for _ in workers)
    finally:
        done.set()
        for worker in workers:
            worker.join(timeout=30)
    first, second = claimed.values()
    assert not set(first) & set(second), claimed
    assert sorted(first + second) == list(range(6))
    for pid, numbers in claimed.items():  # each number's partial folder is its claimer's
        assert sorted(int(p.name.split("~")[0][len(".partial_"):]) for p in tmp_path.glob(f".partial_*~{pid}")) \
            == sorted(numbers)


def _live_owner(pid: int) -> str:
    return f"{socket.gethostname()}~{pid}"


def test_a_claimer_arriving_between_anothers_scan_and_claim_takes_other_numbers(tmp_path, monkeypatch):
    """Deterministic interleaving: run A looks at the folder, then run B claims before A does. Both owners are
    live processes (this test's parent and init), as two buffer.py runs would be."""
    runs = {"A": _live_owner(os.getppid()), "B": _live_owner(1)}
    current = {"owner": runs["A"]}
    monkeypatch.setattr(checkpoint, "owner_tag", lambda: current["owner"])
    real_used, got = checkpoint.used_numbers, {}

    def used_then_b_arrives(directory):
        found = real_used(directory)
        if current["owner"] == runs["A"] and "B" not in got:  # A has looked; B claims now
            current["owner"] = runs["B"]
            got["B"] = checkpoint.numbers_to_train(directory, 2)
            current["owner"] = runs["A"]
        return found

    monkeypatch.setattr(checkpoint, "used_numbers", used_then_b_arrives)
    got["A"] = checkpoint.numbers_to_train(tmp_path, 2)
    assert not set(got["A"]) & set(got["B"]), got
    assert sorted(got["A"] + got["B"]) == [0, 1, 2, 3]


def test_a_claim_left_by_a_process_killed_while_claiming_is_cleared(tmp_path):
    fresh = tmp_path / ".claiming_0"
    fresh.mkdir()  # another process is claiming 0 this very moment
    assert checkpoint.numbers_to_train(tmp_path, 1) == [1]
    old = tmp_path / ".claiming_2"
    old.mkdir()
    os.utime(old, (time.time() - 3600, time.time() - 3600))  # left by a process killed inside its claim
    checkpoint.tidy(tmp_path)
    assert fresh.is_dir() and not old.exists()


# --- 2. compatibility keys ------------------------------------------------------------------------------------

NEW_KEYS = {"loss_type": ("wbce", "'wbce'", "'infonce'", "--loss_type"),
            "image_pretrained": (True, "True", "False", "--image_pretrained"),
            "feature_views": (3, "3", "None", "--feature_views")}


def _buffer_with(experts: Path, root: Path, **changes) -> Path:
    """A copy of the tiny experts whose buffer_meta.json says `changes` (None: the key left out)."""
    shutil.copytree(experts, root)
    meta_path = root.joinpath(*LAYOUT, META_NAME)
    meta = json.loads(meta_path.read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    meta_path.write_text(json.dumps(meta))
    return root


class _Checked(Exception):
    """Raised where distill.py starts reading data: the buffer passed the compatibility check."""


@pytest.mark.parametrize("key", NEW_KEYS)
def test_distill_refuses_experts_of_another_setting(key, experts, tiny_shapes, cache_dir, tmp_path):
    value, buffer_has, run_has, flag = NEW_KEYS[key]
    root = _buffer_with(experts, tmp_path / "b", **{key: value})
    with pytest.raises(UserError, match=rf"{key}: buffer has {buffer_has}, this run asks for {run_has}.*{flag}"):
        distill.main(distill_flags(tiny_shapes, cache_dir, root, tmp_path / "run", "--Iteration", "1"))


@pytest.mark.parametrize("key", NEW_KEYS)
def test_buffer_refuses_to_add_experts_of_another_setting(key, experts, tiny_shapes, cache_dir, tmp_path, monkeypatch):
    value, buffer_has, run_has, _ = NEW_KEYS[key]
    root = _buffer_with(experts, tmp_path / "b", **{key: value})
    monkeypatch.setattr(buffer, "train_expert", lambda *a, **k: pytest.fail("an expert trained"))
    with pytest.raises(UserError, match=rf"other settings \(.*{key}: buffer has {buffer_has}, this run asks for "
                                        rf"{run_has}"):
        buffer.main(tiny_flags(tiny_shapes, cache_dir, "--buffer_path", str(root), "--batch_train", "50",
                               "--train_epochs", "3", "--num_experts", "1"))


def test_a_learned_similarity_may_train_with_another_loss_than_the_experts(experts, tiny_shapes, cache_dir, tmp_path,
                                                                          monkeypatch):
    """LoRS: the student's loss against the learned similarity is the method's choice, not the experts'."""
    monkeypatch.setattr(distill, "load_retrieval_data", lambda *a, **k: (_ for _ in ()).throw(_Checked()))
    with pytest.raises(_Checked):
        distill.main(distill_flags(tiny_shapes, cache_dir, experts, tmp_path / "run", "--loss_type", "kl",
                                   "--sim_type", "lowrank", "--sim_rank", "2"))
    with pytest.raises(UserError, match=r"loss_type: buffer has 'infonce', this run asks for 'kl'"):
        distill.main(distill_flags(tiny_shapes, cache_dir, experts, tmp_path / "run", "--loss_type", "kl"))


def test_metadata_written_before_the_keys_existed_holds_their_defaults_then():
    old = {"dataset": "shapes"}  # buffer_meta.json from before loss_type, feature_views
    defaults = {"loss_type": "infonce", "image_pretrained": True, "feature_views": None}
    assert mismatches(old, defaults) == []
    assert mismatches(old, {"loss_type": "kl", "image_pretrained": False, "feature_views": 2}) == [
        "image_pretrained: buffer has True, this run asks for False",
        "loss_type: buffer has 'infonce', this run asks for 'kl'",
        "feature_views: buffer has None, this run asks for 2"]


def test_distill_takes_a_missing_key_as_its_default_then(experts, tiny_shapes, cache_dir, tmp_path, monkeypatch):
    """The tiny experts are infonce, without a trunk and not pretrained; buffer_meta.json without the keys is
    taken to say infonce, no views and pretrained (the defaults when each key was introduced)."""
    monkeypatch.setattr(distill, "load_retrieval_data", lambda *a, **k: (_ for _ in ()).throw(_Checked()))
    root = _buffer_with(experts, tmp_path / "b", loss_type=None, feature_views=None)
    with pytest.raises(_Checked):
        distill.main(distill_flags(tiny_shapes, cache_dir, root, tmp_path / "run"))
    root = _buffer_with(experts, tmp_path / "c", image_pretrained=None)
    with pytest.raises(UserError, match=r"image_pretrained: buffer has True, this run asks for False"):
        distill.main(distill_flags(tiny_shapes, cache_dir, root, tmp_path / "run"))


# --- 3. the run of skipped steps after a divergence ------------------------------------------------------------

def _six(tiny_shapes, cache_dir, experts, out, *extra):
    """Six iterations evaluated at 0, 2, 4, 6, every step applied unless forced (as in test_reliability_resume)."""
    return distill_flags(tiny_shapes, cache_dir, experts, out, "--Iteration", "6", "--draw", "False",
                         "--sim_type", "lowrank", "--sim_rank", "2", "--lr_sim", "0.1", "--max_skips", "3", *extra)


def _explode(monkeypatch, calls):
    """Every step whose number (counting from 1 in this run) is in `calls` produces infinite pixels."""
    original, count = Distiller.step, {"n": 0}

    def exploding(self, *args, **kwargs):
        count["n"] += 1
        lr = self.optimizers["img"].param_groups[0]["lr"]
        if count["n"] in calls:
            self.optimizers["img"].param_groups[0]["lr"] = float("inf")
        try:
            return original(self, *args, **kwargs)
        finally:  # (a refused step puts the optimiser back with new parameter groups)
            self.optimizers["img"].param_groups[0]["lr"] = lr

    monkeypatch.setattr(Distiller, "step", exploding)


def _learned(path):
    payload = load_distilled_set(path)
    return [payload["image_syn"], payload["text_syn"], torch.tensor([payload["syn_lr_img"], payload["syn_lr_txt"]]),
            *payload["sim_params"]]


def test_a_set_saved_on_divergence_resumes_with_no_skips_behind_it(tiny_shapes, cache_dir, experts, tmp_path,
                                                                   monkeypatch):
    first, second, third = tmp_path / "first", tmp_path / "second", tmp_path / "third"
    # Steps 3 on blow up: iterations 2 and 3 are refused, the evaluation file of iteration 4 has 2 skips behind it.
    _explode(monkeypatch, range(3, 100))
    with pytest.raises(UserError, match="diverged at iteration 4"):
        distill.main(_six(tiny_shapes, cache_dir, experts, first))
    assert load_distilled_set(first / "distilled_000004.pt")["state"]["guard"]["consecutive"] == 2
    # Resumed from that file and still blowing up: it stops at its first step and saves the state to go on from.
    with pytest.raises(UserError, match=r"diverged at iteration 4 .*continue from it with --resume and lower"):
        distill.main(_six(tiny_shapes, cache_dir, experts, second, "--resume", str(first / "distilled_000004.pt")))
    saved = load_distilled_set(second / "distilled_last.pt")
    assert saved["iteration"] == 4 and saved["state"]["guard"]["consecutive"] == 0
    assert saved["state"]["guard"]["skipped"] == {"non-finite values": 2}  # the total is kept
    before_refusal = _learned(first / "distilled_000002.pt")  # skipped steps never moved the set
    assert all(torch.equal(a, b) for a, b in zip(_learned(second / "distilled_last.pt"), before_refusal))
    # What the message advises: resume with a lower --lr_img. One more refused step no longer stops the run.
    monkeypatch.undo()
    _explode(monkeypatch, {1})
    restored = []
    real_restore = StepGuard.restore
    monkeypatch.setattr(StepGuard, "restore", lambda self, state: (restored.append(state["consecutive"]),
                                                                   real_restore(self, state))[1])
    assert distill.main(_six(tiny_shapes, cache_dir, experts, third, "--lr_img", "10",
                             "--resume", str(second / "distilled_last.pt"))) == 0
    assert restored == [0]
    guard = load_distilled_set(third / "distilled_last.pt")["state"]["guard"]
    assert guard["skipped"] == {"non-finite values": 3} and guard["consecutive"] == 0


# --- 4. the forgetting model's and the coreset probe's seeds ----------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 12345, 2**32 - 1])
def test_forgetting_and_probe_seeds_are_their_own(seed):
    forgetting, probe = seeds.forgetting_seed(seed), seeds.coreset_probe_seed(seed)
    # what else a run seeds: evaluation and tuning models (their loaders take the base seed + k), and
    # distill.py's evaluations
    bases = [seed, seed + seeds.TUNING_SEED_OFFSET, *(seeds.distill_eval_seed(seed, i) for i in range(2000))]
    others = {s for base in bases for k in range(20) for s in (base + k, seeds.eval_model_seed(base + k))}
    assert len({forgetting, probe} | others) == len(others) + 2
    for derived in (forgetting, probe):  # no expert of this run (numbers below 10,000) starts from it
        assert not 0 <= derived - seeds.expert_seed(seed, 0) < 10_000
        assert derived < 2**63  # torch.Generator.manual_seed takes it
    assert (seeds.forgetting_seed(seed), seeds.coreset_probe_seed(seed)) == (forgetting, probe)  # stable


def _coreset_run(tiny_shapes, cache_dir, experts, out: Path, method: str):
    flags = tiny_flags(tiny_shapes, cache_dir, "--num_eval", "1", "--epoch_eval_train", "1", "--batch_train", "4",
                       "--coreset", method, "--num_queries", "6", "--buffer_path", str(experts),
                       "--coreset_file", str(out / f"{method}.pt"), "--out", str(out / f"{method}.json"))
    assert evaluate.main(flags) == 0
    return load_distilled_set(out / f"{method}.pt")["caption_indices"], flags


def _built_after(seed: int, flags) -> list[torch.Tensor]:
    seed_everything(seed)
    return [p.detach().clone() for p in build_model(programs.parse("evaluate", "", flags).model, 384).parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_the_forgetting_model_draws_from_its_own_seed(tiny_shapes, cache_dir, experts, tmp_path, monkeypatch):
    seen, real = [], coresets.count_forgetting

    def recording(lr_img, lr_txt, data, model, device, epochs, loader, progress):
        seen.append(([p.detach().clone() for p in model.parameters()], loader.generator.initial_seed()))
        return real(lr_img, lr_txt, data, model, device, epochs, loader, progress)

    monkeypatch.setattr(coresets, "count_forgetting", recording)
    chosen, flags = _coreset_run(tiny_shapes, cache_dir, experts, tmp_path / "a", "forgetting")
    again, _ = _coreset_run(tiny_shapes, cache_dir, experts, tmp_path / "b", "forgetting")
    assert torch.equal(chosen, again)  # same seed, same coreset
    (weights, order), (weights_again, order_again) = seen
    assert not _same(weights, _built_after(0, flags)) and order != 0  # not the plain seed (expert 0 started there)
    assert _same(weights, weights_again) and order == order_again == seeds.forgetting_seed(0)
    assert _same(weights, _built_after(seeds.forgetting_seed(0), flags))
    assert not _same(weights, _built_after(seeds.coreset_probe_seed(0), flags))


def test_the_coreset_probe_draws_from_its_own_seed(tiny_shapes, cache_dir, experts, tmp_path, monkeypatch):
    seen, real = [], coresets.expert_pair_features

    def recording(model, *args, **kwargs):
        seen.append([p.detach().clone() for p in model.parameters()])
        return real(model, *args, **kwargs)

    monkeypatch.setattr(coresets, "expert_pair_features", recording)
    chosen, flags = _coreset_run(tiny_shapes, cache_dir, experts, tmp_path / "a", "kcenter")
    again, _ = _coreset_run(tiny_shapes, cache_dir, experts, tmp_path / "b", "kcenter")
    assert torch.equal(chosen, again) and _same(*seen)
    assert not _same(seen[0], _built_after(0, flags))
    assert _same(seen[0], _built_after(seeds.coreset_probe_seed(0), flags))
