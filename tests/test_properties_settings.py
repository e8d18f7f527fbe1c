"""Property-based settings tier (issue 26): every settings field of every program, given values drawn from its
type and the edges of its range (0, negatives, NaN, inf, huge, empty, whitespace, wrong type, NUL, '/', '..',
long strings), on the command line and as a pipeline TOML key, is accepted or refused with a one-line error
that names the flag or key: never a traceback. The fields are enumerated from the settings classes, so a new
field is covered without touching this file.

The command-line properties run each program's `main` up to its first real work (loading the data, replaced
by a sentinel); the end-to-end examples at the bottom run `main` on tiny data with values that pass a range
check but could only fail later."""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from pathlib import Path

import pytest
from conftest import PIPELINE_CONFIG, ReachedWork, run_program, tiny_flags
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import buffer
import distill
import evaluate
import reduce
from comparison import config as pipeline_config, pipeline
from experts import cycler
from reduction import webdata
from experts.files import buffer_dir, claim_metadata, describe_experts, load_expert_pair, save_expert
from networks import build_model, trainable_parameters
from networks.text_encoders import text_encoder_identity
from settings import programs
from settings.base import _base_type
from utils.cli import UserError

pytestmark = pytest.mark.props

MAINS = {"buffer": buffer.main, "distill": distill.main, "evaluate": evaluate.main, "reduce": reduce.main}
TARGET = {"evaluate": ["--full"]}  # evaluate.py needs something to judge before its other flags matter
TEXT_DIM = 384  # minilm
PROPERTY = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def program_fields(program: str) -> list[dataclasses.Field]:
    return [f for cls in programs.group_classes(program).values() for f in cls.specs()]


FIELDS = [(program, f) for program in programs.PROGRAMS for f in program_fields(program)]

# ---- values ------------------------------------------------------------------------------------------------

INT_EDGES = ["0", "-1", "1", "2", str(2**31), str(2**63 - 1), str(2**63), str(-2**63 - 1), "9" * 5000, "1e3", "1.5",
             "0x10", "nan", "True", "", " "]
FLOAT_EDGES = ["0", "-0.0", "-1", "1e-320", "nan", "-nan", "inf", "-inf", "1e308", "1e309", "-1e308", str(2**63),
               str(2**1100), "1_000", "0x10", "True", "", " "]
STRING_EDGES = ["", " ", "\t\n", "a\nb", "\x00", "a\x00b", ".", "..", "../x", "a/../b", "a/b", "x" * 300, "a/" * 2100,
                "-", "--", "ü", "\udcff", "nan", "0", "True", "C:\\x", "$HOME", "a b"]
BOOL_EDGES = ["True", "False", "true", "0", "1", "yes", "", " ", "maybe", "2", "nan", "\x00"]


def cli_edges(f: dataclasses.Field) -> list[str]:
    kind, _, _ = _base_type(f.type)
    edges = {int: INT_EDGES, float: FLOAT_EDGES, bool: BOOL_EDGES}.get(kind, STRING_EDGES)
    choices = f.metadata["choices"]
    return [*edges, *(str(c) for c in choices or ())] + (INT_EDGES if f.metadata["parse"] else [])


def cli_values(f: dataclasses.Field) -> st.SearchStrategy[str]:
    """Command-line text for field `f`: its edges, numbers of every size, and arbitrary text."""
    numbers = st.one_of(st.integers().map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                        st.integers(min_value=0, max_value=2**70).map(str))
    # relative paths only: an absolute one would be written to outside the sandbox
    text = st.text(st.characters(codec="utf-8"), max_size=40).map(lambda s: s.lstrip("/~"))
    return st.one_of(st.sampled_from(cli_edges(f)), numbers, text)


# ---- running a program up to its first work ------------------------------------------------------------------


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    """A folder deep enough that relative paths with '..' stay inside the test's temporary folder."""
    root = tmp_path_factory.mktemp("props_settings")
    deep = root / "a" / "b" / "c" / "d"
    deep.mkdir(parents=True)
    return deep


@pytest.fixture(scope="module")
def fake_experts(sandbox) -> Path:
    """A buffer folder with metadata and one 3-snapshot expert of random weights for the tiny flags' model
    (convnet, 16 px, minilm): distill.py checks it before it loads the data."""
    root = sandbox.parent / "buffers"
    settings_ = programs.parse("buffer", "", tiny_flags(sandbox, sandbox))
    model = build_model(settings_.model, TEXT_DIM)
    directory = buffer_dir(root, "shapes", "convnet", "minilm")
    directory.mkdir(parents=True)
    claim_metadata(directory, describe_experts(settings_.data, settings_.model, model,
                                               text_encoder_identity("minilm", None), TEXT_DIM, 200))
    trajectory = [[[p.detach() + step for p in trainable_parameters(part)] for step in range(3)]
                  for part in (model.image_part, model.text_projection)]
    save_expert(directory, 0, *trajectory)
    return root


@pytest.fixture(scope="module")
def base_flags(sandbox, fake_experts) -> dict[str, list[str]]:
    data, cache = str(sandbox.parent / "data"), str(sandbox.parent / "cache")
    return {"buffer": tiny_flags(data, cache, "--buffer_path", "experts_out"),
            "distill": tiny_flags(data, cache, "--buffer_path", str(fake_experts), "--max_start_epoch", "1",
                                  "--expert_epochs", "1", "--num_pairs", "8", "--mini_batch_size", "4",
                                  "--batch_train", "4", "--save_dir", "run_out"),
            "evaluate": tiny_flags(data, cache, "--full"),
            "reduce": tiny_flags(data, cache, "--method", "random", "--keep", "0.5", "--out", "reduced.json")}


@functools.cache
def _expert_pair(image_path: Path, text_path: Path, meta: str):
    return load_expert_pair(image_path, text_path, json.loads(meta))


def cached_expert_pair(image_path: Path, text_path: Path, meta: dict):
    """load_expert_pair, read once per file pair (the test's expert files never change)."""
    return _expert_pair(image_path, text_path, json.dumps(meta, sort_keys=True))


@pytest.fixture()
def up_to_work(monkeypatch, sandbox):
    """Programs stop with ReachedWork where they would load the data, and run in the sandbox."""
    def reached(*args, **kwargs):
        raise ReachedWork
    for module in (buffer, distill, evaluate):
        monkeypatch.setattr(module, "load_retrieval_data", reached)
    monkeypatch.setattr(reduce, "annotated_features", reached)
    monkeypatch.setattr(webdata, "reduce_shards", reached)
    monkeypatch.setattr(cycler, "load_expert_pair", cached_expert_pair)
    monkeypatch.chdir(sandbox)


def names_the_input(message: str, names: list[str], value) -> bool:
    """Whether an error message names the flag or key (or an alias), or shows the value given."""
    text = str(value).replace("\r", "\\r").replace("\n", "\\n")  # as run_cli prints it
    shown = text.strip() and text in message
    return bool(shown) or any(re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", message) for name in names)


BASE_ACCEPTED: set[str] = set()  # the programs whose base flags were seen to reach their work


def assert_one_line_or_accepted(program: str, f: dataclasses.Field, value: str, base: list[str]) -> None:
    if program not in BASE_ACCEPTED:
        baseline = run_program(MAINS[program], base)
        assert baseline is None, f"the base flags of {program}.py are refused: {baseline}"
        BASE_ACCEPTED.add(program)
    message = run_program(MAINS[program], [*base, f"--{f.name}={value}"])
    names = [f.name, *(a.lstrip("-") for a in f.metadata["aliases"])]
    assert message is None or names_the_input(message, names, value), f"{program}.py --{f.name}={value!r}: {message}"


@pytest.mark.parametrize("program, field", FIELDS, ids=[f"{p}-{f.name}" for p, f in FIELDS])
def test_every_edge_value_of_every_flag_is_accepted_or_one_line_naming_it(program, field, base_flags, up_to_work):
    for value in cli_edges(field):
        assert_one_line_or_accepted(program, field, value, base_flags[program])


@PROPERTY
@given(data=st.data())
def test_any_value_of_any_flag_is_accepted_or_one_line_naming_it(data, base_flags, up_to_work):
    program, field = data.draw(st.sampled_from(FIELDS), label="field")
    value = data.draw(cli_values(field), label="value")
    assert_one_line_or_accepted(program, field, value, base_flags[program])


# ---- pipeline TOML ---------------------------------------------------------------------------------------------

CONFIG = 'out_dir = "out"\n' + PIPELINE_CONFIG

TOML_EDGES = [0, -1, 1, 2**63 - 1, -2**63, 0.0, -0.0, math.nan, math.inf, -math.inf, 1e308, 5e-324, "", " ", "\x00",
              "/", "..", "a/../b", "x" * 300, "a/" * 2100, True, False, [], [1], ["a"], [[1]], [math.nan], {},
              {"a": 1}, "1", "nan", "all"]


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


TOML_VALUES = st.recursive(
    st.one_of(st.sampled_from(TOML_EDGES), st.integers(min_value=-2**63, max_value=2**63 - 1), st.floats(),
              st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=20), st.booleans()),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from(["a", "all", "100"]), inner, max_size=2)),
    max_leaves=4)

# Every key a section takes: a program's settings fields in its section, the pipeline's own keys in theirs.
SECTION_KEYS = [(program, f.name) for program in pipeline_config.PROGRAM_SECTIONS for f in program_fields(program)] + \
               [("distill", "seeds")] + [("compare", key) for key in pipeline_config.COMPARE_KEYS] + [(None, "out_dir")]


def with_key(section: str | None, key: str, value) -> str:
    line = f"{key} = {toml_value(value)}\n"
    if section is None:
        return line + CONFIG.replace('out_dir = "out"\n', "")
    header = f"[{section}]\n"
    return CONFIG.replace(header, header + line) if header in CONFIG else CONFIG + header + line


def assert_toml_accepted_or_one_line(section: str | None, key: str, value, folder: Path) -> None:
    path = folder / "config.toml"
    path.write_text(with_key(section, key, value))
    message = run_program(pipeline.main, [str(path)])
    assert message is None or (str(path) in message or "--out_dir" in message) and (
        names_the_input(message, [key, f"[{section}]"], value) or "not valid TOML" in message), message


@pytest.fixture()
def pipeline_up_to_work(monkeypatch, sandbox):
    """pipeline.py stops with ReachedWork where it would run buffer.py, and runs in the sandbox."""
    def reached(*args, **kwargs):
        raise ReachedWork
    monkeypatch.setattr(pipeline, "experts_stage", reached)
    monkeypatch.chdir(sandbox)


@pytest.mark.parametrize("section, key", SECTION_KEYS, ids=[f"{s}-{k}" for s, k in SECTION_KEYS])
def test_every_edge_value_of_every_pipeline_key_is_accepted_or_one_line_naming_it(section, key, sandbox,
                                                                                   pipeline_up_to_work):
    for value in TOML_EDGES:
        assert_toml_accepted_or_one_line(section, key, value, sandbox)


@PROPERTY
@given(where=st.sampled_from(SECTION_KEYS), value=TOML_VALUES)
def test_any_value_of_any_pipeline_key_is_accepted_or_one_line_naming_it(where, value, sandbox, pipeline_up_to_work):
    assert_toml_accepted_or_one_line(*where, value, sandbox)


# ---- what the properties found, as examples -----------------------------------------------------------------

FOUND = [
    # argparse turns `--flag=--` into an empty list: a TypeError deep inside the program before
    ("buffer", "--image_root=--", "--image_root needs a str value, got []"),
    ("evaluate", "--train_stages=--", "--train_stages needs a str or int value, got []"),
    # paths no system takes: OSError (file name too long) tracebacks before, or a file named ' '
    ("buffer", "--buffer_path=" + "x" * 300, "--buffer_path has a file or folder name longer than 255 bytes"),
    ("evaluate", "--image_root=" + "a/" * 2100, "--image_root is 4200 bytes long, more than a path may be (4095)"),
    ("distill", "--resume=\t", "--resume must not be empty, got '\\t'"),
    ("evaluate", "--out=a\x00b", "--out holds a NUL byte, which no path can contain"),
    # values inside their old range that only failed at run time (a traceback after loading the data, a
    # process per worker until the system refused)
    ("buffer", f"--image_size={2**40}", f"--image_size must be at most 1024, got {2**40}"),
    ("buffer", "--num_workers=100000", "--num_workers must be at most 64, got 100000"),
    ("buffer", "--feature_views=1000000", "--feature_views must be at most 100, got 1000000"),
    ("distill", "--sim_type=lowrank --sim_rank=1000000000",
     "--sim_type lowrank: --sim_rank 1000000000 is larger than --num_pairs 8 (the low-rank similarity of N pairs "
     "has rank at most N)"),
]


@pytest.mark.parametrize("program, flags, message", FOUND, ids=[f"{p} {f[:30]}" for p, f, _ in FOUND])
def test_what_the_properties_found_is_one_line_naming_the_flag(program, flags, message, base_flags, up_to_work):
    line = run_program(MAINS[program], [*base_flags[program], *flags.split(" ")])
    assert line is not None and line.startswith(f"error: {message}"), line


def test_a_line_break_in_a_path_stays_on_the_one_error_line(base_flags, up_to_work):
    # (a name no other test of the sandbox creates: a folder of that name would be named as a folder)
    assert run_program(distill.main, [*base_flags["distill"], "--resume=no\nsuch.pt"]) == \
        "error: distilled set not found: no\\nsuch.pt"


def test_a_pipeline_out_dir_that_is_no_path_names_the_config_file(sandbox, pipeline_up_to_work):
    path = sandbox / "config.toml"
    for value, problem in ((0, "must be a string, got 0"), ('"x\\u0000"', "holds a NUL byte, which no path can "
                                                                          "contain, got 'x\\x00'")):
        path.write_text(CONFIG.replace('out_dir = "out"', f"out_dir = {value}"))
        assert run_program(pipeline.main, [str(path)]) == f"error: config file {path}: out_dir {problem}"


# ---- end to end on tiny data: values that pass a range check but could only fail later ------------------------

END_TO_END = [
    ("buffer", ["--image_size", str(2**40)], f"--image_size must be at most 1024, got {2**40}"),
    ("evaluate", ["--coreset", "random", "--coreset_size", str(10**9)],
     "--coreset_size 1000000000 is larger than the 200 training pairs"),
    ("distill", ["--num_pairs", str(10**9), "--mini_batch_size", "2"],
     "--num_pairs 1000000000 is larger than the 40 training images"),
    ("distill", ["--sim_type", "lowrank", "--sim_rank", str(10**9)], "--sim_type lowrank: --sim_rank 1000000000 is"),
]


@pytest.mark.parametrize("program, flags, message", END_TO_END, ids=[f"{p} {f[-2]}" for p, f, _ in END_TO_END])
def test_absurd_counts_and_sizes_stop_with_one_line_on_real_data(program, flags, message, tiny_shapes, cache_dir,
                                                                  fake_experts, sandbox, monkeypatch):
    monkeypatch.chdir(sandbox)
    extra = {"distill": ["--buffer_path", str(fake_experts), "--max_start_epoch", "1", "--expert_epochs", "1",
                         "--num_pairs", "8", "--mini_batch_size", "4", "--batch_train", "4", "--save_dir", "e2e"],
             "buffer": ["--buffer_path", "e2e_experts", "--num_experts", "1", "--train_epochs", "1"],
             "evaluate": ["--num_eval", "1", "--epoch_eval_train", "1", "--coreset_file", "e2e_coreset.pt"]}
    line = run_program(MAINS[program], tiny_flags(tiny_shapes, cache_dir, *extra[program], *flags))
    assert line is not None and line.startswith(f"error: {message}"), line
