"""Red-team cases for evaluate.py and pipeline.py (issue 26): each failed before its fix."""
from __future__ import annotations

import pytest

from comparison import config as pipeline_config, pipeline, stages
from utils.cli import UserError


def test_fresh_never_empties_a_folder_with_stamps_and_other_files(tmp_path):
    """A folder holding stamps/*.json beside a user's own file is not an old pipeline folder: it used to be
    marked and --fresh deleted the user's file."""
    folder = tmp_path / "work"
    (folder / "stamps").mkdir(parents=True)
    (folder / "stamps" / "x.json").write_text("{}")
    (folder / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match="thesis.tex"):
        stages.claim_output_folder(folder)
    assert not (folder / stages.MARKER).exists()
    assert (folder / "thesis.tex").read_text() == "precious"


def test_an_old_pipeline_folder_is_still_taken(tmp_path):
    folder = tmp_path / "old"
    (folder / "stamps").mkdir(parents=True)
    (folder / "stamps" / "experts.json").write_text('["--dataset", "shapes"]')
    (folder / "buffers").mkdir()
    (folder / "results.md").write_text("table")
    assert stages.claim_output_folder(folder) == folder
    assert (folder / stages.MARKER).is_file()


def test_a_failed_row_says_why_on_its_one_line(tmp_path, monkeypatch):
    """A ladder size above the data failed with only 'see <log>'; the line now carries the program's error."""
    from comparison import programs

    def fail(program, flags, log=None):
        log.write("loading...\nerror: --coreset_size 500 is larger than the 100 training pairs\n")
        return 2
    monkeypatch.setattr(programs, "launch", fail)
    with pytest.raises(UserError) as err:
        programs.run_configuration("random-500", ["--coreset", "random"], [], tmp_path)
    assert str(err.value) == (f"[random-500] evaluate.py failed (exit 2): --coreset_size 500 is larger than the 100 "
                              f"training pairs; see {tmp_path / 'random-500.log'}")


def test_forgetting_epochs_of_one_is_refused_by_its_range(tmp_path):
    """--help said '>= 1' while evaluate.py refused 1, and a pipeline [evaluate] forgetting_epochs = 1 passed the
    checks before work and failed at the forgetting row, after the experts and the ladder."""
    from settings.programs import check_section

    with pytest.raises(UserError, match=r"^cfg \[evaluate\]: forgetting_epochs must be at least 2"):
        check_section("evaluate", {"forgetting_epochs": 1}, "cfg [evaluate]")
    assert check_section("evaluate", {"forgetting_epochs": 2}, "cfg [evaluate]") == {"forgetting_epochs": 2}


def test_a_second_pipeline_on_a_folder_in_use_is_refused(tmp_path, monkeypatch):
    """Two pipelines started at once on one out_dir both trained every expert (4 of 2 wanted) and distilled into
    the same folder; the second is now refused while the first holds the folder, and a finished run frees it."""
    config = tmp_path / "toy.toml"
    config.write_text('[common]\ndataset = "shapes"\n')
    out = tmp_path / "out"
    seen = []

    def second_run(config_, out_):
        with pytest.raises(UserError, match=rf"^--out_dir {out} is in use by another pipeline\.py run"):
            pipeline.main([str(config), "--out_dir", str(out)])
        seen.append(out_)
        raise KeyboardInterrupt
    monkeypatch.setattr(pipeline, "experts_stage", second_run)
    with pytest.raises(KeyboardInterrupt):
        pipeline.main([str(config), "--out_dir", str(out)])
    assert seen == [out]
    monkeypatch.setattr(pipeline, "experts_stage", lambda config_, out_: seen.append("again") or 1 / 0)
    with pytest.raises(ZeroDivisionError):  # the first run's end freed the folder
        pipeline.main([str(config), "--out_dir", str(out)])
    assert seen == [out, "again"]


def test_experts_too_short_for_the_distillation_are_refused_before_work(tmp_path):
    """A config without [distill] (max_start_epoch 25, expert_epochs 3) over experts of 2 epochs trained the
    experts and then failed in distill.py; it is now refused with the config, naming the keys."""
    config = {"common": {"dataset": "shapes"}, "buffer": {"train_epochs": 2}, "distill": {}, "evaluate": {},
              "compare": {}}
    with pytest.raises(UserError, match=r"^cfg: \[buffer\] train_epochs 2 gives 3 snapshots per expert, but "
                                        r"\[distill\] max_start_epoch 25 and expert_epochs 3 need 28"):
        pipeline_config.check_sections(config, "cfg")
    config["distill"] = {"max_start_epoch": 1, "expert_epochs": 2}
    pipeline_config.check_sections(config, "cfg")  # start epoch 0, target 2: the 3 snapshots suffice


def test_a_seed_given_twice_is_refused_with_the_config():
    """`seeds = [0, 0]` ran one distillation and pooled it as if it were one row of one seed, silently."""
    config = {"common": {}, "distill": {"seeds": [0, 3, 0]}}
    with pytest.raises(UserError, match=r"config \[distill\]: seeds lists 0 more than once, got \[0, 3, 0\]"):
        pipeline_config.distill_settings(config)
    assert pipeline_config.distill_settings({"common": {}, "distill": {"seeds": [0, 3]}})[1] == [0, 3]


def test_a_cache_dir_in_the_default_annotation_folder_is_refused(tiny_shapes, cache_dir, tmp_path):
    """--cache_dir <image_root>/annotations wrote caches among the annotation files when --ann_root was not
    given (the same folder given as --ann_root was refused)."""
    import shutil

    from conftest import tiny_flags
    import evaluate

    data = tmp_path / "shapes"
    shutil.copytree(tiny_shapes, data)
    before = sorted(p.name for p in (data / "annotations").iterdir())
    with pytest.raises(UserError, match=r"--cache_dir .* the annotation folder \(--ann_root, default "
                                        r"IMAGE_ROOT/annotations\)"):
        evaluate.main(tiny_flags(data, data / "annotations", "--coreset", "random", "--coreset_size", "4",
                                 "--num_eval", "1", "--epoch_eval_train", "1", "--out", str(tmp_path / "r.json"),
                                 "--coreset_file", str(tmp_path / "c.pt")))
    assert sorted(p.name for p in (data / "annotations").iterdir()) == before
