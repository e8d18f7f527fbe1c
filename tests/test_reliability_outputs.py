"""Outputs never destroy inputs (issue 26, item 1): every program refuses, before any work, an output path that is
one of its inputs (also through a symbolic or hard link); a file that is not the program's own kind of output is
never replaced without a flag; the pipeline empties only a folder it marked as its own; run names are file names."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_flags

import buffer
import distill
import evaluate
from comparison import pipeline, programs, stages
from data.distilled_set import save_distilled_set
from settings import programs as program_settings
from utils.cli import UserError
from utils.paths import refuse_outputs_over_inputs


class WorkStarted(Exception):
    """Raised where a program's first real work would begin: the checks before it all passed."""


@pytest.fixture()
def no_work(monkeypatch):
    """Loading data (and, for distill.py, the run itself) is the first work: reaching it raises WorkStarted."""
    def started(*args, **kwargs):
        raise WorkStarted
    for module in (buffer, evaluate):
        monkeypatch.setattr(module, "load_retrieval_data", started)
    monkeypatch.setattr(distill, "distill", started)
    monkeypatch.setattr(programs, "launch", started)


def tiny_set(path: Path, source: str = "distilled") -> bytes:
    """A valid 2-pair set file as distill.py (or, with source "coreset:<method>", evaluate.py) writes it; its bytes."""
    save_distilled_set(path, torch.zeros(2, 3, 16, 16), torch.ones(2, 384), 0.1, 0.1, 0,
                       {"dataset": "shapes", "source": source, "image_encoder": "convnet", "image_size": 16})
    return path.read_bytes()


def alias(kind: str, target: Path) -> Path:
    """Another name for `target`: the same string, a symbolic link, a hard link, or a path through `..`."""
    if kind == "same":
        return target
    if kind == "dotdot":
        return target.parent / ".." / target.parent.name / target.name
    other = target.parent / f"alias-{kind}{target.suffix}"
    (os.symlink if kind == "symlink" else os.link)(target, other)
    return other


def folder_state(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


# ---- the helper ---------------------------------------------------------------------------------------


def test_the_helper_compares_resolved_paths_links_and_folders_it_may_empty(tmp_path):
    data = tmp_path / "data.bin"
    data.write_bytes(b"input")
    os.link(data, tmp_path / "hard.bin")
    os.symlink(data, tmp_path / "soft.bin")
    os.symlink(tmp_path, tmp_path / "here")
    for output in (data, tmp_path / "hard.bin", tmp_path / "soft.bin", tmp_path / "here" / "data.bin"):
        with pytest.raises(UserError, match=rf"--out {output} is the same path as --data {data}, which this run reads"):
            refuse_outputs_over_inputs({"--out": output}, {"--data": data})
    with pytest.raises(UserError, match=r"--out .*a\.json is the same path as --report .*which this run also writes"):
        refuse_outputs_over_inputs({"--out": tmp_path / "a.json", "--report": tmp_path / "x" / ".." / "a.json"}, {})
    refuse_outputs_over_inputs({"--out": tmp_path / "new.bin", "--none": None}, {"--data": data, "--unset": None})
    refuse_outputs_over_inputs({"--dir": tmp_path}, {"--data": data})  # only written into: a file inside it is fine
    with pytest.raises(UserError, match=rf"--dir {tmp_path} holds --data {data}, and this run may delete"):
        refuse_outputs_over_inputs({"--dir": tmp_path}, {"--data": data}, emptied=("--dir",))
    with pytest.raises(UserError, match="--out 'a\\\\x00b' holds a NUL byte"):
        refuse_outputs_over_inputs({"--out": "a\0b"}, {})
    assert data.read_bytes() == b"input"


# ---- the examples -------------------------------------------------------------------------------

@pytest.fixture()
def config(tiny_shapes, tmp_path) -> Path:
    """A pipeline config (no program runs in these tests: only the data folder matters)."""
    path = tmp_path / "toy.toml"
    path.write_text(f'[common]\ndataset = "shapes"\nimage_root = "{tiny_shapes}"\n')
    return path


@pytest.fixture()
def documents(tmp_path) -> Path:
    """A folder of a user's unrelated files, one of them in results/ (a name the pipeline also uses)."""
    folder = tmp_path / "documents"
    (folder / "results").mkdir(parents=True)
    (folder / "thesis.tex").write_text("chapter one")
    (folder / "results" / "table.csv").write_text("1,2,3")
    return folder


@pytest.mark.parametrize("fresh", [["--fresh"], []], ids=["--fresh", "stages"])
def test_the_pipeline_never_empties_a_folder_of_unrelated_documents(config, documents, no_work, fresh):
    before = folder_state(documents)
    with pytest.raises(UserError, match=rf"--out_dir {documents} already holds files that pipeline\.py did not "
                                        rf"write \(it has no \.vl-distill-pipeline\); give a new or empty folder"):
        pipeline.main([str(config), "--out_dir", str(documents), *fresh])
    assert folder_state(documents) == before


@pytest.mark.parametrize("kind", ["same", "symlink", "hardlink", "dotdot"])
def test_evaluate_out_naming_the_set_it_judges_is_refused(tiny_shapes, cache_dir, tmp_path, no_work, kind):
    distilled = tmp_path / "distilled_best.pt"
    kept = tiny_set(distilled)
    out = alias(kind, distilled)
    with pytest.raises(UserError, match=rf"--out {out} is the same path as --distilled {distilled}, which this run reads"):
        evaluate.main(tiny_flags(tiny_shapes, cache_dir, "--distilled", str(distilled), "--out", str(out)))
    assert distilled.read_bytes() == kept


def test_coreset_file_naming_a_distilled_set_is_refused(tiny_shapes, cache_dir, tmp_path, no_work):
    distilled = tmp_path / "distilled_best.pt"
    kept = tiny_set(distilled)
    with pytest.raises(UserError, match=r"--coreset_file .*distilled_best\.pt exists and is not a coreset written by "
                                        r"evaluate\.py \(a set made by distilled\); it is never replaced"):
        evaluate.main(tiny_flags(tiny_shapes, cache_dir, "--coreset", "random", "--coreset_size", "4",
                                 "--coreset_file", str(distilled)))
    assert distilled.read_bytes() == kept


def test_a_run_name_that_is_a_path_is_refused_and_nothing_is_written(tiny_shapes, cache_dir, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # distill.py's default --save_dir is runs/<dataset>/<name>, from here
    with pytest.raises(UserError, match=r"--name must be a file name, not a path .*got '\.\./\.\./\.\./x'"):
        distill.main(tiny_flags(tiny_shapes, cache_dir, "--buffer_path", str(tmp_path / "none"), "--name", "../../../x"))
    assert not (tmp_path / "x").exists() and not (work / "runs").exists()


@pytest.mark.parametrize("name, problem", [
    ("a/b", "must be a file name, not a path"), ("a\\b", "must be a file name, not a path"),
    (".", "must be a file name, not a path"), ("..", "must be a file name, not a path"),
    ("a\0b", "must be a file name, not a path"), ("", "must not be empty"),
    ("x" * 256, "must be at most 255 bytes long"), ("é" * 128, "must be at most 255 bytes long")])
@pytest.mark.parametrize("program", ["buffer", "distill", "evaluate"])
def test_every_program_takes_only_a_file_name_as_run_name(program, name, problem):
    with pytest.raises(UserError, match=f"--name {problem}"):
        program_settings.parse(program, "", [*(["--full"] if program == "evaluate" else []), "--name", name])


def test_a_timestamp_or_any_other_file_name_is_a_run_name():
    for name in (None, "2024-01-31_23-59-59", "run..2", "x" * 255, "é" * 127):
        settings = program_settings.parse("distill", "", [] if name is None else ["--name", name])
        assert name is None or settings.runtime.name == name


# ---- per program: an output that is an input is refused before any work -----------------------------


@pytest.mark.parametrize("kind", ["same", "symlink", "dotdot"])
def test_buffer_path_naming_the_data_folder_is_refused(dataset_copy, cache_dir, no_work, kind):
    buffer_path = alias(kind, dataset_copy)
    before = folder_state(dataset_copy)
    with pytest.raises(UserError, match=r"--buffer_path .* is the same path as --image_root .*which this run reads"):
        buffer.main(tiny_flags(dataset_copy, cache_dir, "--buffer_path", str(buffer_path)))
    assert folder_state(dataset_copy) == before


@pytest.fixture()
def expert_folder(tmp_path) -> Path:
    """A folder standing for a buffer folder (distill.py's input); its one file is compared afterwards."""
    folder = tmp_path / "experts"
    folder.mkdir()
    (folder / "buffer_meta.json").write_text('{"dataset": "shapes"}')
    return folder


@pytest.mark.parametrize("kind", ["same", "symlink", "dotdot"])
def test_distill_save_dir_naming_the_expert_folder_is_refused(tiny_shapes, cache_dir, expert_folder, no_work, kind):
    save_dir = alias(kind, expert_folder)
    with pytest.raises(UserError, match=r"--save_dir .* is the same path as --buffer_path .*experts, which this run"):
        distill.main(tiny_flags(tiny_shapes, cache_dir, "--buffer_path", str(expert_folder), "--save_dir", str(save_dir)))
    assert folder_state(expert_folder) == {"buffer_meta.json": b'{"dataset": "shapes"}'}


@pytest.mark.parametrize("name, make", [
    ("distilled_best.pt", lambda p: tiny_set(p, "coreset:random")), ("distilled_000010.pt", lambda p: p.write_text("notes")),
    ("distilled_last.pt", lambda p: torch.save({"weights": torch.ones(2)}, p)),
    ("timing.json", lambda p: p.write_text("[1, 2]"))])
def test_distill_never_replaces_a_file_in_save_dir_that_it_did_not_write(tiny_shapes, cache_dir, expert_folder,
                                                                        tmp_path, no_work, name, make):
    save_dir = tmp_path / "run"
    save_dir.mkdir()
    make(save_dir / name)
    kept = (save_dir / name).read_bytes()
    flags = tiny_flags(tiny_shapes, cache_dir, "--buffer_path", str(expert_folder), "--save_dir", str(save_dir))
    with pytest.raises(UserError, match=rf"--save_dir {save_dir} holds {name}, which is not .*distill\.py"):
        distill.main(flags)
    assert (save_dir / name).read_bytes() == kept


def test_distill_continues_in_a_save_dir_of_its_own_sets(tiny_shapes, cache_dir, expert_folder, tmp_path, no_work):
    save_dir = tmp_path / "run"
    save_dir.mkdir()
    tiny_set(save_dir / "distilled_last.pt")
    tiny_set(save_dir / "distilled_000002.pt")
    (save_dir / "timing.json").write_text('{"seconds": 1.0, "iterations": 2}')
    (save_dir / "distilled_notes.pt").write_text("not a name distill.py writes")
    with pytest.raises(WorkStarted):
        distill.main(tiny_flags(tiny_shapes, cache_dir, "--buffer_path", str(expert_folder), "--save_dir", str(save_dir),
                                "--resume", str(save_dir / "distilled_last.pt")))


def test_evaluate_out_over_a_file_that_is_no_report_needs_overwrite(tiny_shapes, cache_dir, tmp_path, no_work):
    distilled = tmp_path / "set.pt"
    tiny_set(distilled)
    flags = tiny_flags(tiny_shapes, cache_dir, "--distilled", str(distilled), "--out")
    notes = tmp_path / "notes.json"
    for content in (b'["not", "a", "report"]', b'{"label": "x"}', b"\xff\xfe\x00 not text", b"[" * 100_000):
        notes.write_bytes(content)
        with pytest.raises(UserError, match=rf"--out {notes} exists and is not an evaluate\.py report .*--overwrite "
                                            r"True to replace it"):
            evaluate.main([*flags, str(notes)])
        assert notes.read_bytes() == content
    with pytest.raises(WorkStarted):
        evaluate.main([*flags, str(notes), "--overwrite", "True"])
    report = tmp_path / "report.json"  # a report evaluate.py wrote before is replaced without the flag
    report.write_text(json.dumps({"label": "distilled-2", "metrics": {}, "config": {}, "seconds": 1.0}))
    with pytest.raises(WorkStarted):
        evaluate.main([*flags, str(report)])


def test_evaluate_out_and_coreset_file_must_differ(tiny_shapes, cache_dir, tmp_path, no_work):
    path = tmp_path / "both.pt"
    with pytest.raises(UserError, match=r"--out .*both\.pt is the same path as --coreset_file .*which this run also "
                                        r"writes"):
        evaluate.main(tiny_flags(tiny_shapes, cache_dir, "--coreset", "random", "--coreset_size", "4",
                                 "--coreset_file", str(path), "--out", str(path)))
    assert not path.exists()


def test_evaluate_reuses_or_replaces_only_its_own_coresets(tiny_shapes, cache_dir, tmp_path, no_work):
    coreset = tmp_path / "random_4.pt"
    tiny_set(coreset, "coreset:kmeans")  # another method's coreset: evaluate.py's own kind, selected again
    with pytest.raises(WorkStarted):
        evaluate.main(tiny_flags(tiny_shapes, cache_dir, "--coreset", "random", "--coreset_size", "4",
                                 "--coreset_file", str(coreset)))
    counts = tmp_path / "forgetting_counts_seed0.pt"  # kept beside the coreset file
    counts.write_text("a user's file")
    with pytest.raises(UserError, match=r"forgetting_counts_seed0\.pt \(the forgetting counts kept beside "
                                        r"--coreset_file\) exists and is not written by evaluate\.py"):
        evaluate.main(tiny_flags(tiny_shapes, cache_dir, "--coreset", "forgetting", "--coreset_size", "4",
                                 "--coreset_file", str(tmp_path / "forgetting_4.pt")))
    assert counts.read_text() == "a user's file"


@pytest.mark.parametrize("kind", ["same", "symlink", "dotdot"])
def test_pipeline_out_dir_naming_the_data_folder_is_refused(config, dataset_copy, no_work, kind):
    out = alias(kind, dataset_copy)
    before = folder_state(dataset_copy)
    with pytest.raises(UserError, match=r"--out_dir .* is the same path as \[common\] image_root .*which this run "
                                        r"reads"):
        pipeline.main([str(config), "--out_dir", str(out), "--data", str(dataset_copy), "--fresh"])
    assert folder_state(dataset_copy) == before


def test_pipeline_out_dir_holding_the_config_file_or_the_data_is_refused(config, tmp_path, no_work):
    kept = config.read_text()
    with pytest.raises(UserError, match=rf"--out_dir {tmp_path} holds the config file {config}, and this run may "
                                        r"delete what is in --out_dir"):
        pipeline.main([str(config), "--out_dir", str(tmp_path), "--fresh"])
    assert config.read_text() == kept
    data = tmp_path / "out" / "data"
    data.mkdir(parents=True)
    with pytest.raises(UserError, match=rf"--out_dir {tmp_path / 'out'} holds \[common\] image_root {data}, and this "
                                        r"run may delete"):
        pipeline.main([str(config), "--out_dir", str(tmp_path / "out"), "--data", str(data)])
    assert data.is_dir()


def test_fresh_empties_a_folder_the_pipeline_made_and_takes_one_from_before_the_marker(config, tmp_path, no_work,
                                                                                       monkeypatch):
    def stop(config, out):
        raise WorkStarted
    monkeypatch.setattr(pipeline, "experts_stage", stop)
    out = tmp_path / "run"
    with pytest.raises(WorkStarted):  # a new folder is taken and marked
        pipeline.main([str(config), "--out_dir", str(out)])
    assert folder_state(out) == {".vl-distill-pipeline": (out / ".vl-distill-pipeline").read_bytes()}
    kept = tmp_path / "kept.txt"
    kept.write_text("outside")
    (out / "results").mkdir()
    (out / "results" / "random-6.json").write_text("{}")
    os.symlink(kept, out / "link.txt")
    with pytest.raises(WorkStarted):
        pipeline.main([str(config), "--out_dir", str(out), "--fresh"])
    assert sorted(p.name for p in out.iterdir()) == [".vl-distill-pipeline"] and kept.read_text() == "outside"

    old = tmp_path / "old"  # written before the marker existed: its stage stamps say whose it is
    (old / "stamps").mkdir(parents=True)
    (old / "stamps" / "experts.json").write_text("[]")
    with pytest.raises(WorkStarted):
        pipeline.main([str(config), "--out_dir", str(old), "--fresh"])
    assert sorted(p.name for p in old.iterdir()) == [".vl-distill-pipeline"]


def test_a_stage_deletes_outputs_only_in_a_folder_the_pipeline_claimed(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "table.csv").write_text("1,2,3")
    with pytest.raises(RuntimeError, match="never claimed by the pipeline"):
        stages.Stage(tmp_path, "evaluate", ["--flag"], [tmp_path / "results"]).begin()
    assert (tmp_path / "results" / "table.csv").read_text() == "1,2,3"


def test_a_run_without_resume_never_replaces_an_earlier_run_in_its_save_dir(run4, tiny_shapes, cache_dir, experts,
                                                                               tmp_path):
    """Forgetting --resume after Ctrl-C used to replace the earlier run's last and best sets with a new run's:
    now refused (naming --resume), unless --overwrite True; --resume continues it as before."""
    from conftest import distill_flags
    import shutil

    earlier = tmp_path / "run"
    shutil.copytree(run4, earlier)
    before = {p.name: p.read_bytes() for p in earlier.glob("distilled_*.pt")}
    with pytest.raises(UserError, match=rf"--save_dir {earlier} holds an earlier run \(distilled_last.pt\), which this "
                                        rf"run would replace: continue it with --resume {earlier / 'distilled_last.pt'}"):
        distill.main(distill_flags(tiny_shapes, cache_dir, experts, earlier, "--Iteration", "2"))
    assert {p.name: p.read_bytes() for p in earlier.glob("distilled_*.pt")} == before
    assert distill.main(distill_flags(tiny_shapes, cache_dir, experts, earlier, "--Iteration", "6", "--resume",
                                      str(earlier / "distilled_last.pt"))) == 0
    assert torch.load(earlier / "distilled_last.pt", weights_only=True)["iteration"] == 6
    assert distill.main(distill_flags(tiny_shapes, cache_dir, experts, earlier, "--Iteration", "2",
                                      "--overwrite", "True")) == 0
    assert torch.load(earlier / "distilled_last.pt", weights_only=True)["iteration"] == 2
