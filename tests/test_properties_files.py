"""Property-based file-format tier (issue 26): every file format the project reads, damaged at random
(truncated, bits flipped, tensors of another dtype or shape, NaN / inf / huge values inserted, JSON and TOML
values of the wrong type), is refused with a one-line error naming the file, or (caches) computed again;
never a traceback, and never used when what was read breaks the format's rules.

One valid small file per format is made once per module; each example damages a copy of it."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import PIPELINE_CONFIG
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from comparison import config as pipeline_config, pipeline
from data.annotations import read_split
from data.distilled_set import load_distilled_set, resume_state_problem, save_distilled_set
from data.feature_cache import _load_quietly
from data.shapes import ensure_shapes
from data.text_cache import _usable_cache
from experts.files import META_NAME, load_expert_pair, read_metadata
from experts.reference import derived_metadata
from utils.cli import UserError
from utils.io import MAX_ABS_VALUE

pytestmark = pytest.mark.props

PROPERTY = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# ---- damage -------------------------------------------------------------------------------------------------


@st.composite
def damaged_bytes(draw, data: bytes) -> bytes:
    """`data` cut short, with bits flipped, or with a stretch overwritten."""
    kind = draw(st.sampled_from(["truncate", "flip", "overwrite"]))
    if kind == "truncate":
        return data[:draw(st.integers(0, len(data) - 1))]
    out = bytearray(data)
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            out[draw(st.integers(0, len(out) - 1))] ^= 1 << draw(st.integers(0, 7))
        return bytes(out)
    start = draw(st.integers(0, len(out) - 1))
    patch = draw(st.binary(min_size=1, max_size=64))
    out[start:start + len(patch)] = patch
    return bytes(out[:len(data)])


BAD_NUMBERS = [math.nan, math.inf, -math.inf, 1e30, -1e30, 3e38]


@st.composite
def damaged_tensor(draw, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in another dtype, of another shape, or with a NaN, an infinity or a huge value inside."""
    kind = draw(st.sampled_from(["dtype", "shape", "value"]))
    if kind == "dtype":
        dtype = draw(st.sampled_from([torch.float16, torch.float64, torch.bfloat16, torch.int64, torch.int8,
                                      torch.bool, torch.complex64, torch.uint8]))
        return tensor.to(dtype)
    if kind == "shape":
        how = draw(st.sampled_from(["flat", "extra", "fewer", "more", "empty", "scalar"]))
        return {"flat": lambda t: t.reshape(-1), "extra": lambda t: t.unsqueeze(0), "fewer": lambda t: t[:-1],
                "more": lambda t: torch.cat([t, t[:1]]), "empty": lambda t: t[:0],
                "scalar": lambda t: t.reshape(-1)[0]}[how](tensor)
    out = tensor.clone().float()
    index = draw(st.integers(0, out.numel() - 1))
    out.view(-1)[index] = draw(st.sampled_from(BAD_NUMBERS))
    return out


WRONG_VALUES = [None, True, 0, -1, 2**63, 1e308, math.nan, "", "x", "\x00", [], [1], {}, {"a": 1}, [[[[[]]]]]]


def assert_one_line_naming(err: UserError, path: Path) -> None:
    message = str(err)
    assert "\n" not in message and (str(path) in message or path.name in message), message


def finite_float32(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.float32 and bool(torch.isfinite(value).all()) \
        and (value.numel() == 0 or float(value.abs().max()) <= MAX_ABS_VALUE)


# ---- distilled sets and resume states ----------------------------------------------------------------------


def valid_state() -> dict:
    return {"optimizers": {}, "guard": {}, "best_r_mean": 1.0, "best_iteration": 0,
            "rng": {"generator": torch.Generator().get_state(), "torch": torch.get_rng_state()},
            "experts": {"order": [0], "num_files": 1, "file_pos": 0, "traj_pos": 0}}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("props_files")


@pytest.fixture(scope="module")
def set_file(folder) -> Path:
    torch.manual_seed(0)
    return save_distilled_set(folder / "set.pt", torch.randn(4, 3, 8, 8), torch.randn(4, 16), 0.1, 0.1, 3,
                              {"dataset": "shapes", "image_size": 8, "source": "distilled"}, {"r_mean": 1.0},
                              valid_state())


def check_loaded_set(path: Path) -> None:
    """A set either loads and keeps the format's rules, or is one line naming it."""
    try:
        payload = load_distilled_set(path)
    except UserError as err:
        assert_one_line_naming(err, path)
        return
    for key in ("image_syn", "text_syn"):
        assert finite_float32(payload[key]), f"{key} used: {payload[key].dtype} {payload[key].flatten()[:4]}"
    assert payload["image_syn"].dim() == 4 and len(payload["image_syn"]) == len(payload["text_syn"]) > 0
    problem = resume_state_problem(payload["state"])  # what distill.py --resume checks first
    assert problem is None or "\n" not in problem


@PROPERTY
@given(data=st.data())
def test_a_damaged_set_file_is_one_line_naming_it_or_a_valid_set(data, set_file, tmp_path_factory):
    damaged = tmp_path_factory.mktemp("set") / "set.pt"
    damaged.write_bytes(data.draw(damaged_bytes(set_file.read_bytes())))
    check_loaded_set(damaged)


@PROPERTY
@given(data=st.data())
def test_a_set_with_damaged_tensors_or_values_is_one_line_naming_it_or_a_valid_set(data, set_file,
                                                                                     tmp_path_factory):
    payload = torch.load(set_file, weights_only=True)
    key = data.draw(st.sampled_from(["image_syn", "text_syn", "syn_lr_img", "syn_lr_txt", "iteration", "config",
                                     "metrics", "state", "version", "format", "config.image_size",
                                     "config.dataset", "state.best_r_mean", "state.experts", "state.rng"]))
    where, _, inner = key.partition(".")
    if isinstance(payload[where], torch.Tensor):
        payload[where] = data.draw(damaged_tensor(payload[where]))
    elif inner:
        payload[where][inner] = data.draw(st.sampled_from(WRONG_VALUES))
    else:
        payload[where] = data.draw(st.sampled_from(WRONG_VALUES))
    damaged = tmp_path_factory.mktemp("set") / "set.pt"
    torch.save(payload, damaged)
    check_loaded_set(damaged)


# ---- expert buffers and buffer_meta.json -------------------------------------------------------------------

SHAPES = {"image": [[4, 3], [4]], "text": [[2, 4]]}


@pytest.fixture(scope="module")
def expert_pair(folder) -> tuple[Path, Path, dict]:
    """One expert of 3 snapshots (a tiny 'model': two image tensors, one text tensor) and its metadata."""
    torch.manual_seed(0)
    paths = []
    for side, shapes in SHAPES.items():
        trajectory = [[torch.randn(*shape) for shape in shapes] for _ in range(3)]
        paths.append(folder / f"{side[:3]}_replay_buffer_0.pt")
        torch.save([trajectory], paths[-1])
    return paths[0], paths[1], {"image_param_shapes": SHAPES["image"], "text_param_shapes": SHAPES["text"]}


def check_loaded_experts(image_path: Path, text_path: Path, meta: dict, damaged: Path) -> None:
    try:
        pairs = load_expert_pair(image_path, text_path, meta)
    except UserError as err:
        assert_one_line_naming(err, damaged)
        return
    for image_trajectory, text_trajectory in pairs:
        for snapshot in (*image_trajectory, *text_trajectory):
            assert all(finite_float32(t) for t in snapshot), f"a damaged snapshot used: {snapshot}"


def copy_with_one_file_chosen(data, image_path: Path, text_path: Path, tmp_path_factory) -> tuple[Path, Path]:
    """A fresh copy of the expert folder, and one of its two files (drawn) to damage."""
    copy = Path(shutil.copytree(image_path.parent, tmp_path_factory.mktemp("buf") / "b"))
    return copy, copy / data.draw(st.sampled_from([image_path.name, text_path.name]))

@PROPERTY
@given(data=st.data())
def test_a_damaged_buffer_file_is_one_line_naming_it_or_valid(data, expert_pair, tmp_path_factory):
    image_path, text_path, meta = expert_pair
    copy, damaged = copy_with_one_file_chosen(data, image_path, text_path, tmp_path_factory)
    damaged.write_bytes(data.draw(damaged_bytes(damaged.read_bytes())))
    check_loaded_experts(copy / image_path.name, copy / text_path.name, meta, damaged)


@PROPERTY
@given(data=st.data())
def test_a_buffer_with_damaged_snapshots_is_one_line_naming_it_or_valid(data, expert_pair, tmp_path_factory):
    image_path, text_path, meta = expert_pair
    copy, damaged = copy_with_one_file_chosen(data, image_path, text_path, tmp_path_factory)
    trajectories = torch.load(damaged, weights_only=True)
    snapshot = trajectories[0][data.draw(st.integers(0, 2))]
    index = data.draw(st.integers(0, len(snapshot) - 1))
    snapshot[index] = data.draw(damaged_tensor(snapshot[index]))
    torch.save(trajectories, damaged)
    check_loaded_experts(copy / image_path.name, copy / text_path.name, meta, damaged)
    try:  # the reference implementation's format (no buffer_meta.json): the metadata comes from the tensors
        derived_metadata(copy / image_path.name, copy / text_path.name)
    except UserError as err:
        assert_one_line_naming(err, damaged)


META_KEYS = ["format", "dataset", "train_pairs", "image_encoder", "text_encoder", "text_model", "image_size",
             "text_dim", "image_dim", "image_norm", "trainable_parts", "image_param_shapes", "text_param_shapes"]


@PROPERTY
@given(key=st.sampled_from(META_KEYS), value=st.sampled_from(WRONG_VALUES), cut=st.integers(0, 400))
def test_a_damaged_buffer_meta_json_is_one_line_naming_it(key, value, cut, expert_pair, tmp_path_factory):
    image_path, _, meta = expert_pair
    copy = Path(shutil.copytree(image_path.parent, tmp_path_factory.mktemp("buf") / "b"))
    path = copy / META_NAME
    text = json.dumps({**{k: 1 for k in META_KEYS}, **meta, "format": 1, key: value})
    path.write_text(text[:cut] if cut < len(text) else text)
    try:
        found = read_metadata(copy)
    except UserError as err:
        assert_one_line_naming(err, path)
        return
    assert isinstance(found, dict), f"{path} read as {found!r}"


# ---- caches: damaged means computed again ---------------------------------------------------------------------


def damaged_copy(data, original: Path, folder: Path, key: str | None) -> Path:
    """A copy of the tensor file `original` in `folder`: its bytes damaged, or its tensor (the payload, or the
    payload's `key`)."""
    damaged = folder / original.name
    if data.draw(st.booleans(), label="bytes"):
        damaged.write_bytes(data.draw(damaged_bytes(original.read_bytes())))
        return damaged
    payload = torch.load(original, weights_only=True)
    if key is None:
        payload = data.draw(damaged_tensor(payload))
    else:
        payload[key] = data.draw(damaged_tensor(payload[key]))
    torch.save(payload, damaged)
    return damaged


@pytest.fixture(scope="module")
def text_cache(folder) -> Path:
    path = folder / "text_cache.pt"
    torch.save(torch.randn(5, 16), path)
    return path


@PROPERTY
@given(data=st.data())
def test_a_damaged_text_cache_is_computed_again_or_valid(data, text_cache, tmp_path_factory):
    damaged = damaged_copy(data, text_cache, tmp_path_factory.mktemp("cache"), None)
    cached = _usable_cache(damaged, 5)
    assert cached is None or (finite_float32(cached) and cached.shape == (5, 16)), cached


@pytest.fixture(scope="module")
def feature_cache(folder) -> Path:
    path = folder / "features.pt"
    torch.save({"format": "vl-distill/trunk-features", "version": 1, "key": {"view": 0},
                "features": torch.randn(3, 4, 2, 2)}, path)
    return path


@PROPERTY
@given(data=st.data())
def test_a_damaged_feature_cache_is_computed_again_or_valid(data, feature_cache, tmp_path_factory):
    damaged = damaged_copy(data, feature_cache, tmp_path_factory.mktemp("cache"), "features")
    payload = _load_quietly(damaged, 3)
    assert payload is None or (finite_float32(payload["features"]) and len(payload["features"]) == 3), payload


# ---- annotation JSON -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes_root(folder) -> Path:
    return ensure_shapes(folder / "shapes", num_train=4, num_val=2, num_test=2, image_px=16, progress=False)


@st.composite
def damaged_annotations(draw, text: str) -> bytes:
    entries = json.loads(text)
    kind = draw(st.sampled_from(["bytes", "entry", "field", "deep", "top"]))
    if kind == "bytes":
        return draw(damaged_bytes(text.encode()))
    if kind == "deep":
        depth = draw(st.sampled_from([100, 5000, 100_000]))
        return ("[" * depth + "]" * depth).encode()
    if kind == "top":
        return json.dumps(draw(st.sampled_from(WRONG_VALUES))).encode()
    index = draw(st.integers(0, len(entries) - 1))
    if kind == "entry":
        entries[index] = draw(st.sampled_from(WRONG_VALUES))
    else:
        entries[index][draw(st.sampled_from(["image", "caption"]))] = draw(st.sampled_from(
            [*WRONG_VALUES, "../../x.png", "/etc/passwd", "x" * 300, "a\x00b.png", ["a", 1]]))
    return json.dumps(entries).encode()


@PROPERTY
@given(data=st.data())
def test_a_damaged_annotation_file_is_one_line_naming_it_or_valid(data, shapes_root, tmp_path_factory):
    annotations = tmp_path_factory.mktemp("ann")
    original = shapes_root / "annotations" / "shapes_train.json"
    damaged = annotations / original.name
    damaged.write_bytes(data.draw(damaged_annotations(original.read_text())))
    try:
        split = read_split("shapes", "train", annotations, shapes_root)
    except UserError as err:
        assert_one_line_naming(err, damaged)
        return
    assert split.captions and all(isinstance(c, str) and c.strip() for c in split.captions)
    assert all(Path(p).is_file() for p in split.image_paths)


# ---- pipeline TOML -----------------------------------------------------------------------------------------------

CONFIG = 'out_dir = "out"\n' + PIPELINE_CONFIG.replace("mini_batch_size = 3", "mini_batch_size = 3\nseeds = [0, 1]").replace(
    "num_eval = 2", "num_eval = 2\nlr_grid = [0.01, 0.1]") + "epochs_per_size = {12 = 2, all = 1}\n"


@PROPERTY
@given(data=st.data())
def test_a_damaged_pipeline_config_is_one_line_naming_it_or_valid(data, tmp_path_factory):
    path = tmp_path_factory.mktemp("toml") / "config.toml"
    path.write_bytes(data.draw(damaged_bytes(CONFIG.encode())))
    try:
        config = pipeline.load_config(str(path), None)
    except UserError as err:
        assert_one_line_naming(err, path)
        return
    assert all(isinstance(config[section], dict) for section in pipeline_config.SECTIONS)
