"""Issue 26, one boundary per program: what the user gave (paths, file contents, values) is one line naming the
input, a bug keeps its traceback and says so; every tensor file is checked for dtype, shape, finiteness and size
when it loads, naming the file (and for experts the expert and the epoch)."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import distill_flags, tiny_flags

import evaluate
from comparison.pipeline import load_config
from data.annotations import read_split
from data.distilled_set import FORMAT, VERSION, load_distilled_set
from data.text_cache import cached_text_embeddings
from experts.files import expert_files, load_expert_pair, read_metadata
from utils.cli import UserError, run_cli

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = ("shapes", "convnet", "minilm")
LONG = "x" * 300  # one path component longer than any file system's 255 bytes


def run_boundary(main, capsys) -> tuple[int, str]:
    """(exit status, stderr) of `main` run through the programs' boundary."""
    with pytest.raises(SystemExit) as stopped:
        run_cli(main)
    return stopped.value.code, capsys.readouterr().err


def one_line_error(main, capsys) -> str:
    status, err = run_boundary(main, capsys)
    assert status == 2 and "Traceback" not in err and err.count("\n") == 1 and err.startswith("error: "), err
    return err


# ---- the boundary: OS errors, decoding, nesting, bugs ------------------------------------------------

def test_a_path_component_too_long_is_one_line_naming_the_file(tmp_path, capsys):
    path = tmp_path / LONG / "a.json"
    err = one_line_error(lambda: path.read_text(), capsys)
    assert str(path) in err and "a path component is longer than the file system allows" in err and "300 bytes" in err


def test_a_folder_under_a_regular_file_names_the_file_in_the_way(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    err = one_line_error(lambda: (tmp_path / "notes.txt" / "cache").mkdir(parents=True), capsys)
    assert f"{tmp_path / 'notes.txt'} is a regular file" in err


def test_a_folder_where_a_file_belongs_and_a_permission_error_are_one_line(tmp_path, capsys):
    assert "it is a folder, where a file is expected" in one_line_error(lambda: open(tmp_path), capsys)

    def denied():
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "locked.pt"))
    assert f"{tmp_path / 'locked.pt'}: permission denied" in one_line_error(denied, capsys)


def test_a_nul_byte_in_a_path_undecodable_text_and_deep_json_are_one_line(tmp_path, capsys):
    assert "NUL byte" in one_line_error(lambda: open("images/a\0b.png"), capsys)
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    assert "not UTF-8 text" in one_line_error(lambda: (tmp_path / "latin1.txt").read_text(encoding="utf-8"), capsys)
    assert "nested too deeply" in one_line_error(lambda: json.loads("[" * 100_000), capsys)


def test_a_bug_keeps_its_traceback_and_says_it_is_a_bug(capsys):
    from utils.cli import BUG

    def recurse(n):
        return recurse(n + 1)
    for bug, name in ((lambda: 1 / 0, "ZeroDivisionError"), (lambda: recurse(0), "RecursionError"),
                      (lambda: {}["key"], "KeyError")):
        status, err = run_boundary(bug, capsys)
        assert status == 1 and "Traceback" in err and name in err
        assert err.strip().splitlines()[-1] == f"error: {BUG}"


def test_user_errors_and_ctrl_c_are_unchanged(capsys):
    def refused():
        raise UserError("--flag 3 is not allowed")
    assert run_boundary(refused, capsys) == (2, "error: --flag 3 is not allowed\n")

    def interrupted():
        raise KeyboardInterrupt
    interrupted_line = "interrupted: everything saved so far is complete and reloadable\n"
    assert run_boundary(interrupted, capsys) == (130, interrupted_line)


@pytest.mark.parametrize("program", ["buffer.py", "distill.py", "evaluate.py", "pipeline.py"])
def test_ctrl_c_while_a_program_loads_its_libraries_is_one_line(program, tmp_path):
    """Ctrl-C in the seconds torch takes to import (before main runs): one line, no traceback, and Python's own
    way of ending on SIGINT (the shell shows status 130)."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise KeyboardInterrupt\n")  # the interrupt lands here
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, str(ROOT / program), "--help"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == -signal.SIGINT
    assert done.stderr == "interrupted while starting: nothing was written\n"


# ---- where the input is read: the message names the file ------------------------------------------

def _annotations(dataset_copy, edit) -> Path:
    path = dataset_copy / "annotations" / "shapes_train.json"
    entries = json.loads(path.read_text())
    text = edit(entries)
    path.write_text(text if isinstance(text, str) else json.dumps(entries))
    return path


@pytest.mark.parametrize("name, problem", [("images/train/000\x0003.png", r"holds a NUL byte"),
                                           (f"images/{LONG}.png", r"has a path component of 304 bytes, longer than "
                                                                  r"the file system allows \(255\)")])
def test_an_impossible_image_path_in_an_annotation_names_the_file_and_entry(dataset_copy, name, problem):
    path = _annotations(dataset_copy, lambda entries: entries[3].update(image=name))
    with pytest.raises(UserError, match=rf"annotation file {path}, entry 3: the image path .* {problem}"):
        read_split("shapes", "train", path.parent, dataset_copy)


def test_an_annotation_file_nested_too_deeply_is_named(dataset_copy):
    path = _annotations(dataset_copy, lambda entries: "[" * 100_000)
    with pytest.raises(UserError, match=rf"annotation file {path} is nested too deeply"):
        read_split("shapes", "train", path.parent, dataset_copy)


def test_a_config_path_that_is_a_folder_or_not_utf8_is_named(tmp_path):
    with pytest.raises(UserError, match=rf"config file {tmp_path} cannot be read: it is a folder"):
        load_config(str(tmp_path), None)
    latin1 = tmp_path / "demo.toml"
    latin1.write_bytes(b"# caf\xe9\n[common]\n")
    with pytest.raises(UserError, match=rf"config file {latin1} is not UTF-8 text \(byte b'\\xe9' at position 5\)"):
        load_config(str(latin1), None)


class CountingEncoder:
    """A stand-in text encoder: caption -> [len, first letter code, 1.0]; counts its calls."""

    calls = 0

    def encode(self, captions, progress=False):
        CountingEncoder.calls += 1
        return torch.tensor([[float(len(c)), float(ord(c[0])), 1.0] for c in captions])


def test_a_cache_folder_under_a_regular_file_names_the_file(tmp_path):
    (tmp_path / "notes.txt").write_text("")
    path = tmp_path / "notes.txt" / "cache" / "text_embeddings" / "x.pt"
    with pytest.raises(UserError, match=rf"text-embedding cache {path} cannot be written: {tmp_path / 'notes.txt'} "
                                        r"is a regular file.*cache folder") as caught:
        cached_text_embeddings(["a cat"], path, CountingEncoder, progress=False)
    assert caught.value.field == "cache_dir"


def test_a_cache_dir_under_a_regular_file_stops_buffer_py_with_one_line(tiny_shapes, tmp_path, capsys):
    import buffer

    (tmp_path / "notes.txt").write_text("")
    flags = tiny_flags(tiny_shapes, tmp_path / "notes.txt" / "cache", "--buffer_path", str(tmp_path / "b"))
    line = one_line_error(lambda: buffer.main(flags), capsys)
    assert f"{tmp_path / 'notes.txt'}" in line and line.startswith("error: --cache_dir: ")


DAMAGE = {
    "truncated": lambda path, good: path.write_bytes(path.read_bytes()[:100]),
    "NaN": lambda path, good: torch.save(torch.where(good == 1.0, float("nan"), good), path),
    "one dimension": lambda path, good: torch.save(good.flatten(), path),
    "other rows": lambda path, good: torch.save(good[:2], path),
    "whole numbers": lambda path, good: torch.save(good.long(), path),
    "huge": lambda path, good: torch.save(good * 1e30, path),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_text_embedding_cache_is_computed_again(tmp_path, damage, capsys):
    captions, path = ["a cat", "two dogs", "a cat"], tmp_path / "text_embeddings" / "x.pt"
    good = cached_text_embeddings(captions, path, CountingEncoder, progress=False)
    assert good.tolist() == [[5.0, 97.0, 1.0], [8.0, 116.0, 1.0], [5.0, 97.0, 1.0]]
    DAMAGE[damage](path, good)
    calls = CountingEncoder.calls
    assert torch.equal(cached_text_embeddings(captions, path, CountingEncoder, progress=False), good)
    out = capsys.readouterr().out
    assert CountingEncoder.calls == calls + 1 and out.startswith("note: ") and str(path) in out
    assert torch.equal(torch.load(path, weights_only=True), good)  # and written again
    assert cached_text_embeddings(captions, path, CountingEncoder, progress=False).dtype == torch.float32


def test_a_float16_text_embedding_cache_is_used_as_float32(tmp_path):
    captions, path = ["a cat", "two dogs"], tmp_path / "x.pt"
    torch.save(torch.tensor([[0.5, 1.0], [2.0, 4.0]], dtype=torch.float16), path)
    loaded = cached_text_embeddings(captions, path, CountingEncoder, progress=False)
    assert loaded.dtype == torch.float32 and loaded.tolist() == [[0.5, 1.0], [2.0, 4.0]]


# ---- distilled sets ---------------------------------------------------------------------------------

def tiny_set(**change) -> dict:
    """A 4-pair set of 16 px pixels and 384-d (minilm) text embeddings, its config left to the command line."""
    generator = torch.Generator().manual_seed(0)
    payload = {"format": FORMAT, "version": VERSION, "image_syn": torch.randn(4, 3, 16, 16, generator=generator),
               "text_syn": torch.randn(4, 384, generator=generator), "syn_lr_img": 0.05, "syn_lr_txt": 0.05,
               "iteration": 0, "config": {}, "metrics": {}, "state": {}}
    return {**payload, **change}


def evaluate_flags(tiny_shapes, cache_dir, tmp_path, set_path) -> list[str]:
    return tiny_flags(tiny_shapes, cache_dir, "--distilled", str(set_path), "--num_eval", "1", "--epoch_eval_train",
                      "1", "--batch_train", "4", "--out", str(tmp_path / "report.json"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.bfloat16])
def test_a_set_stored_in_another_float_type_is_evaluated_in_float32(tiny_shapes, cache_dir, tmp_path, dtype):
    original = tiny_set()
    path = tmp_path / "set.pt"
    torch.save(tiny_set(image_syn=original["image_syn"].to(dtype), text_syn=original["text_syn"].to(dtype)), path)
    loaded = load_distilled_set(path)
    assert loaded["image_syn"].dtype == loaded["text_syn"].dtype == torch.float32
    assert torch.equal(loaded["text_syn"], original["text_syn"].to(dtype).float())
    assert evaluate.main(evaluate_flags(tiny_shapes, cache_dir, tmp_path, path)) == 0
    assert json.loads((tmp_path / "report.json").read_text())["metrics"]["r_mean"]["mean"] >= 0


@pytest.mark.parametrize("key, value, named", [
    ("image_syn", torch.full((4, 3, 16, 16), 1e30), r"image_syn holds values up to 1e\+30 in magnitude, beyond the "
                                                     r"bound \+-1e\+08"),
    ("text_syn", torch.full((4, 384), -3e9), r"text_syn holds values up to 3e\+09 in magnitude, beyond the bound"),
    ("text_syn", torch.ones(4, 384, dtype=torch.int32), r"does not hold floating-point tensors"),
])
def test_absurd_or_whole_number_set_tensors_are_refused_with_the_bound(tmp_path, key, value, named):
    path = tmp_path / "set.pt"
    torch.save(tiny_set(**{key: value}), path)
    with pytest.raises(UserError, match=rf"distilled set {path} {named}"):
        load_distilled_set(path)


def test_an_absurd_learned_step_size_is_refused_with_its_range(tiny_shapes, cache_dir, tmp_path):
    path = tmp_path / "set.pt"
    torch.save(tiny_set(syn_lr_img=1e30), path)
    with pytest.raises(UserError, match=rf"distilled set {path} has syn_lr_img 1e\+30, not a finite positive step "
                                        r"size of at most 100 \(the range of --lr_eval\)"):
        evaluate.main(evaluate_flags(tiny_shapes, cache_dir, tmp_path, path))


@pytest.mark.parametrize("value, problem", [("abc", r"image_size must be a int, got 'abc'"),
                                            ([16], r"image_size must be a int, got \[16\]"),
                                            (0, r"image_size must be at least 1, got 0")])
def test_a_wrong_type_in_a_sets_saved_config_names_the_file_and_key(tiny_shapes, cache_dir, tmp_path, value, problem):
    path = tmp_path / "set.pt"
    torch.save(tiny_set(config={"image_size": value, "text_identity": "anything"}), path)
    with pytest.raises(UserError, match=rf"distilled set {path} has a wrong value in its saved config: {problem}"):
        evaluate.main(evaluate_flags(tiny_shapes, cache_dir, tmp_path, path))


# ---- expert buffers ---------------------------------------------------------------------------------

def damaged_buffer(experts, tmp_path, edit) -> Path:
    """A copy of the experts fixture's folder with `edit(part, number, trajectories)` applied to every file."""
    folder = tmp_path / "buffer" / Path(*LAYOUT)
    shutil.copytree(Path(experts, *LAYOUT), folder)
    for number, image_path, text_path in expert_files(folder):
        for part, path in (("img", image_path), ("txt", text_path)):
            trajectories = torch.load(path, weights_only=True)
            edit(part, number, trajectories)
            torch.save(trajectories, path)
    return folder


def test_a_buffer_in_float16_or_float64_loads_as_float32(experts, tmp_path):
    def retype(part, number, trajectories):
        for trajectory in trajectories:
            trajectory[:] = [[t.to(torch.float16 if part == "img" else torch.float64) for t in s] for s in trajectory]
    folder = damaged_buffer(experts, tmp_path, retype)
    original = load_expert_pair(*expert_files(Path(experts, *LAYOUT))[0][1:], read_metadata(Path(experts, *LAYOUT)))
    loaded = load_expert_pair(*expert_files(folder)[0][1:], read_metadata(folder))
    assert all(t.dtype == torch.float32 for image, text in loaded for s in image + text for t in s)
    assert torch.equal(loaded[0][1][2][0], original[0][1][2][0].double().float())
    assert torch.equal(loaded[0][0][2][0], original[0][0][2][0].half().float())


def test_a_buffer_of_whole_numbers_is_refused_naming_file_expert_and_epoch(experts, tmp_path):
    def to_int(part, number, trajectories):
        if part == "txt" and number == 1:
            trajectories[0][2] = [t.long() for t in trajectories[0][2]]
    folder = damaged_buffer(experts, tmp_path, to_int)
    with pytest.raises(UserError, match=r"buffer file .*txt_replay_buffer_1.pt: expert 0 of the file, snapshot of "
                                        r"epoch 2: parameter tensor 0 holds int64 values, not floating-point numbers"):
        load_expert_pair(*expert_files(folder)[1][1:], read_metadata(folder))


def test_infinity_in_one_snapshot_stops_distillation_naming_file_expert_and_epoch(experts, tiny_shapes, cache_dir,
                                                                                  tmp_path):
    import distill

    def one_infinity(part, number, trajectories):
        if part == "img":
            trajectories[0][1][3].view(-1)[5] = float("inf")
    folder = damaged_buffer(experts, tmp_path, one_infinity)
    with pytest.raises(UserError, match=r"buffer file .*img_replay_buffer_[01].pt: expert 0 of the file, snapshot of "
                                        r"epoch 1: parameter tensor 3 has 1 NaN or infinite value \(of \d+\)"):
        distill.main(distill_flags(tiny_shapes, cache_dir, folder, tmp_path / "run"))
    assert not (tmp_path / "run" / "distilled_last.pt").exists()


def test_a_nan_in_every_experts_snapshot_names_the_buffer_file_not_the_learning_rates(experts, tiny_shapes,
                                                                                       cache_dir, tmp_path):
    import distill

    def nan_everywhere(part, number, trajectories):
        if part == "txt":
            for snapshot in trajectories[0]:
                snapshot[0].view(-1)[0] = float("nan")
    folder = damaged_buffer(experts, tmp_path, nan_everywhere)
    with pytest.raises(UserError, match=r"buffer file .*txt_replay_buffer_[01].pt: expert 0 of the file, snapshot of "
                                        r"epoch 0: parameter tensor 0 has 1 NaN or infinite value") as refused:
        distill.main(distill_flags(tiny_shapes, cache_dir, folder, tmp_path / "run", "--Iteration", "2"))
    assert not str(refused.value).startswith("distillation diverged") and "--lr_img" not in str(refused.value)


def test_a_herding_coreset_refuses_experts_of_nan_weights_naming_the_file(experts, tiny_shapes, cache_dir, tmp_path):
    def all_nan(part, number, trajectories):
        if part == "img":
            for snapshot in trajectories[0]:
                for tensor in snapshot:
                    tensor.fill_(float("nan"))
    folder = damaged_buffer(experts, tmp_path, all_nan)
    flags = tiny_flags(tiny_shapes, cache_dir, "--coreset", "herding", "--coreset_size", "8", "--buffer_path",
                       str(folder), "--num_eval", "1", "--epoch_eval_train", "1", "--out", str(tmp_path / "r.json"),
                       "--coreset_file", str(tmp_path / "coreset.pt"))
    with pytest.raises(UserError, match=r"buffer file .*img_replay_buffer_0.pt: expert 0 of the file, snapshot of "
                                        r"epoch \d: parameter tensor 0 has \d+ NaN or infinite values"):
        evaluate.main(flags)
    assert not (tmp_path / "coreset.pt").exists() and not (tmp_path / "r.json").exists()


SECOND_EXPERT = 1  # damaged; with this seed the cycler visits expert 0 first (iteration 0), then it
SEED_VISITING_EXPERT_0_FIRST = 0


def test_a_damaged_expert_reached_mid_run_keeps_what_was_learned(experts, tiny_shapes, cache_dir, tmp_path):
    """distill.py loads expert files as the cycler reaches them: a damaged one found after some iterations stops
    the run with one line, and the iterations learned so far are saved and resumable (not lost)."""
    import distill

    def damage_second(part, number, trajectories):
        if part == "txt" and number == SECOND_EXPERT:
            trajectories[0][1][0].view(-1)[0] = float("inf")
    folder = damaged_buffer(experts, tmp_path, damage_second)
    run = tmp_path / "run"
    with pytest.raises(UserError, match=rf"txt_replay_buffer_{SECOND_EXPERT}.pt: expert 0 of the file.*; saved "
                                        rf"iteration 1 to {re.escape(str(run / 'distilled_last.pt'))}: once that "
                                        r"is fixed, continue with --resume"):
        distill.main(distill_flags(tiny_shapes, cache_dir, folder, run, "--Iteration", "4", "--eval_it", "10",
                                   "--seed", str(SEED_VISITING_EXPERT_0_FIRST)))
    saved = torch.load(run / "distilled_last.pt", weights_only=True)
    assert saved["iteration"] == 1 and torch.isfinite(saved["image_syn"]).all()
    # the same run on undamaged experts continues from it
    distill.main(distill_flags(tiny_shapes, cache_dir, Path(experts, *LAYOUT), tmp_path / "resumed", "--Iteration",
                               "2", "--eval_it", "10", "--seed", str(SEED_VISITING_EXPERT_0_FIRST),
                               "--resume", str(run / "distilled_last.pt")))
    assert torch.load(tmp_path / "resumed" / "distilled_last.pt", weights_only=True)["iteration"] == 2

