"""Typed settings: flags, TOML keys and saved configurations all come from one dataclass field."""
from __future__ import annotations

import dataclasses
import datetime
import types
from pathlib import Path

import pytest

from settings import DataSettings, DistillSettings, ModelSettings, RuntimeSettings, programs
from settings import runtime as runtime_settings
from settings.programs import check_section
from utils.cli import UserError, suggestion


class Clock:
    """A stand-in for `datetime.datetime` whose `now()` is the time set by the test (`at`)."""

    def __init__(self, at: datetime.datetime):
        self.at = at

    def now(self) -> datetime.datetime:
        return self.at


@pytest.fixture()
def clock(monkeypatch) -> Clock:
    """settings/runtime.py's clock, held where the test puts it."""
    clock = Clock(datetime.datetime(2024, 5, 6, 7, 8, 9))
    monkeypatch.setattr(runtime_settings, "datetime", types.SimpleNamespace(datetime=clock))
    return clock


def test_every_flag_default_is_its_field_default(clock):  # (the clock stands still: the run name is the time)
    for program in programs.PROGRAMS:
        parser = programs.build_parser(program, "")
        namespace = parser.parse_args([])
        for cls in programs.group_classes(program).values():
            for f in dataclasses.fields(cls):
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                assert getattr(namespace, f.name) == default, (program, f.name)


def test_reference_flag_names_are_aliases_of_the_names_that_say_what_they_mean():
    distill = programs.parse("distill", "", ["--num_queries", "8", "--mini_batch_size", "4", "--lr_teacher_img",
                                             "0.2"])
    assert distill.distill.num_pairs == 8 and distill.distill.student_lr_img == 0.2
    buffer = programs.parse("buffer", "", ["--lr_teacher_img", "0.3", "--batch_train", "7"])
    assert buffer.experts.expert_lr_img == 0.3 and buffer.experts.expert_batch == 7
    evaluate = programs.parse("evaluate", "", ["--coreset", "random", "--num_queries", "5", "--batch_train", "2"])
    assert evaluate.judging.coreset_size == 5 and evaluate.protocol.eval_batch == 2


def test_the_command_line_says_which_settings_it_gives_itself():
    namespace, given = programs.parse_command_line("evaluate", "", ["--full", "--num_queries", "5", "--dsa", "False",
                                                                    "--lr_grid", "0.1", "0.3"])
    assert given == {"full", "coreset_size", "dsa", "lr_grid"}  # aliases under the field's name, bare booleans too
    assert namespace.coreset_size == 5 and namespace.dsa is False and namespace.lr_grid == [0.1, 0.3]
    assert namespace.image_size == ModelSettings().image_size  # the rest keep their defaults
    assert programs.parse_command_line("evaluate", "", [])[1] == frozenset()


def test_a_flags_help_is_what_help_shows(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100000")  # one line per flag: nothing wrapped
    for program in programs.PROGRAMS:
        text = programs.build_parser(program, "").format_help()
        for cls in programs.group_classes(program).values():
            for f in dataclasses.fields(cls):
                assert programs.flag_help(program, f"--{f.name}").replace("%%", "%") in text, (program, f.name)
    assert programs.flag_help("evaluate", "--num_queries") == programs.flag_help("evaluate", "--coreset_size")
    with pytest.raises(KeyError):
        programs.flag_help("evaluate", "--no_such_flag")


@pytest.mark.parametrize("flags,message", [
    (["--lr_img", "nan"], "--lr_img must be positive"),
    (["--lr_img", "inf"], "--lr_img must be positive"),
    (["--num_workers", "-1"], "--num_workers must be at least 0"),
    (["--seed", str(2**66)], "--seed must be a whole number"),
    (["--mini_batch_size", "200"], "--mini_batch_size 200 is larger than --num_pairs 100"),
    (["--train_stages", "0"], "add --image_projection True"),
    (["--syn_steps", "x"], "invalid int value"),
])
def test_bad_values_are_refused_before_any_work_with_the_flag_named(flags, message):
    with pytest.raises(UserError, match=message):
        programs.parse("distill", "", flags)


def test_a_toml_section_is_checked_against_the_program_settings():
    assert check_section("distill", {"num_queries": 10, "lr_img": 100}, "[distill]") == {"num_pairs": 10,
                                                                                         "lr_img": 100.0}
    with pytest.raises(UserError, match=r"\[distill\]: unknown key 'lr_imgg' for distill.py; did you mean 'lr_img'"):
        check_section("distill", {"lr_imgg": 1}, "[distill]")
    with pytest.raises(UserError, match=r"\[distill\]: syn_steps must be a int, got '20'"):
        check_section("distill", {"syn_steps": "20"}, "[distill]")
    with pytest.raises(UserError, match="train_stages: expected all or a number of stages"):
        check_section("buffer", {"train_stages": "some"}, "[common]")
    assert check_section("distill", {"seeds": [0, 1]}, "[distill]", extra=("seeds",)) == {"seeds": [0, 1]}


def test_an_unknown_name_gets_the_nearest_choice_or_the_valid_list():
    assert suggestion("lr_imgg", ["lr_img", "lr_txt"]) == "; did you mean 'lr_img'?"
    assert suggestion("zzz", ["lr_img", "lr_txt"]) == ""
    assert suggestion("zzz", ["lr_img", "lr_txt"], ["lr_img"]) == " (valid keys: lr_img)"
    with pytest.raises(UserError, match=r"\[data\]: unknown key 'zzz' \(valid keys: dataset, "):
        DataSettings.from_mapping({"zzz": 1}, "[data]")


def test_saved_configurations_rebuild_the_same_settings():
    model = ModelSettings(image_encoder="convnet", image_size=16, image_pretrained=False, train_stages="all")
    config = {**model.to_dict(), **DataSettings(dataset="shapes").to_dict(), "text_identity": "x"}
    assert ModelSettings.from_saved(config) == model
    assert DistillSettings.from_saved({"num_queries": 4, "mini_batch_size": 2}).num_pairs == 4


def test_wandb_mode_flag_wins_then_the_environment_then_offline(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert RuntimeSettings().logging_mode == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert RuntimeSettings().logging_mode == "disabled"
    assert RuntimeSettings(wandb_mode="online").logging_mode == "online"
    for program in programs.PROGRAMS:  # the same order when the mode comes from a command line
        argv = ["--full"] if program == "evaluate" else []
        assert programs.parse(program, "", [*argv, "--wandb_mode", "offline"]).runtime.logging_mode == "offline"
        assert programs.parse(program, "", argv).runtime.logging_mode == "disabled"
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(UserError, match="WANDB_MODE='sometimes'"):
        RuntimeSettings().logging_mode


def test_the_default_run_name_is_the_time_each_settings_object_is_made(clock):
    first = RuntimeSettings()
    assert first.name == "2024-05-06_07-08-09"
    clock.at += datetime.timedelta(minutes=1, seconds=2)
    assert RuntimeSettings().name == "2024-05-06_07-09-11" and first.name == "2024-05-06_07-08-09"
    assert RuntimeSettings(name="mine").name == "mine"
    clock.at += datetime.timedelta(hours=1)  # and on a command line, the time it is parsed
    assert programs.parse("distill", "", []).runtime.name == "2024-05-06_08-09-11"
    assert programs.parse("distill", "", ["--name", "mine"]).runtime.name == "mine"


def test_the_default_cache_dir_follows_the_environment_when_the_settings_are_made(monkeypatch, tmp_path):
    monkeypatch.setenv("VL_DISTILL_CACHE", str(tmp_path / "first"))
    assert DataSettings().cache_dir == str(tmp_path / "first")
    monkeypatch.setenv("VL_DISTILL_CACHE", str(tmp_path / "second"))
    assert DataSettings().cache_dir == str(tmp_path / "second")
    assert programs.parse("buffer", "", []).data.cache_dir == str(tmp_path / "second")
    assert programs.parse("buffer", "", ["--cache_dir", "mine"]).data.cache_dir == "mine"
    monkeypatch.delenv("VL_DISTILL_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert DataSettings().cache_dir == str(Path(tmp_path / "home" / ".cache" / "vl-distill"))


# ---- renamed settings: the old names keep working everywhere a user or an old file gives them -----------------

def test_every_renamed_setting_keeps_its_old_name_as_an_alias_of_the_new_one():
    from settings.base import RENAMED

    for program in ("buffer", "distill", "evaluate"):
        keys = programs.known_keys(program)
        for old, new in RENAMED.items():
            if new in keys.values():
                assert keys.get(old) == new, (program, old)
    assert programs.parse("distill", "", ["--Iteration", "7", "--batch_train", "5"]).distill.iterations == 7
    assert programs.parse("distill", "", ["--Iteration", "7", "--batch_train", "5"]).protocol.eval_batch == 5
    experts = programs.parse("buffer", "", ["--mom", "0.5", "--l2", "0.1", "--batch_train", "9"]).experts
    assert (experts.expert_momentum, experts.expert_weight_decay, experts.expert_batch) == (0.5, 0.1, 9)


def test_the_reference_teacher_rates_are_not_the_forgetting_experts_rate():
    """--lr_teacher_img means the experts' rate (buffer.py) and the student's first step size (distill.py), as in
    the reference; evaluate.py's forgetting expert is another model and takes only its own flag."""
    assert programs.parse("buffer", "", ["--lr_teacher_img", "0.3"]).experts.expert_lr_img == 0.3
    assert programs.parse("distill", "", ["--lr_teacher_img", "0.3"]).distill.student_lr_img == 0.3
    assert "lr_teacher_img" not in programs.known_keys("evaluate")


def test_files_and_stamps_written_under_old_names_are_read_under_the_new_ones():
    import evaluate
    from comparison.stages import flag_values
    from settings.base import current_names

    old = {"Iteration": 200, "batch_train": 32, "mom": 0.0, "l2": 0.0, "num_queries": 100, "dataset": "flickr8k"}
    assert current_names(old) == {"iterations": 200, "eval_batch": 32, "expert_momentum": 0.0,
                                  "expert_weight_decay": 0.0, "num_pairs": 100, "dataset": "flickr8k"}
    # evaluate.py takes a set's protocol from its file unless the command line gives it
    assert evaluate.with_file_settings({"eval_batch": 64}, {"batch_train": 32}, frozenset())["eval_batch"] == 32
    assert evaluate.with_file_settings({"eval_batch": 64}, {"batch_train": 32}, frozenset({"eval_batch"}))[
        "eval_batch"] == 64
    # a pipeline stage stamped before the rename is the same stage (reused, not redone)
    assert flag_values(["--Iteration", "200", "--batch_train", "32"]) == \
        flag_values(["--batch_train", "32", "--iterations", "200"]) == {"--iterations": ("200",), "--eval_batch": ("32",)}
