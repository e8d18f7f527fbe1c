"""Expert buffers in safetensors (experts/safetensors_buffer.py): conversion both ways bit for bit, distill.py
and buffer.py on the layout, damaged input as one-line errors naming the file, and memory-mapped reading that
holds one expert's snapshots at most."""
from __future__ import annotations

import ctypes
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from conftest import distill_flags, tiny_flags
from safetensors.torch import save_file

import buffer
import distill
from data.distilled_set import load_distilled_set
from experts.cycler import ExpertCycler
from experts.files import (buffer_layout, claim_metadata, expert_files, load_expert_pair, load_expert_weights,
                           read_metadata, save_expert, save_expert_metrics, tidy_index)
from experts.safetensors_buffer import INDEX_NAME, convert_buffer, file_name, open_expert, write_expert
from matching import distiller, trajectory
from networks import build_model
from settings import ModelSettings
from utils.cli import UserError
from utils.errors import SettingError

LAYOUT = ("shapes", "convnet", "minilm")
SHAPES = {"image_param_shapes": [[4, 3], [4]], "text_param_shapes": [[2, 4]]}


def _trajectory(shapes, snapshots: int, seed: int, dtype=torch.float32) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(*shape, generator=generator).to(dtype) for shape in shapes] for _ in range(snapshots)]


def _synthetic_buffer(folder: Path, layout: str = "pt", count: int = 2, snapshots: int = 4,
                      dtype=torch.float32) -> Path:
    """`count` random experts of a tiny model written as buffer.py writes them, metrics included."""
    meta = {"format": 1, "dataset": "shapes", **SHAPES, "image_param_names": ["encoder.weight", "encoder.bias"]}
    folder.mkdir(parents=True, exist_ok=True)
    claim_metadata(folder, meta, layout)
    for n in range(count):
        image, text = (_trajectory(SHAPES[key], snapshots, 10 * n + side, dtype)
                       for side, key in enumerate(("image_param_shapes", "text_param_shapes")))
        save_expert(folder, n, image, text, layout)
        save_expert_metrics(folder, n, [{"epoch": 1, "r_mean": 1.0 + n}], {"seconds": 1.0})
    return folder


def _read_everything(folder: Path) -> list[tuple[list, list]]:
    """Every snapshot of every expert of `folder`, as distill.py would read them (float32)."""
    meta = read_metadata(folder)
    found = []
    for _, image_path, text_path in expert_files(folder):
        pairs = open_expert(image_path, meta) if buffer_layout(folder) == "safetensors" else \
            load_expert_pair(image_path, text_path, meta)
        found += [([*image], [*text]) for image, text in pairs]
    return found


def _assert_same_experts(first: list, second: list) -> None:
    assert len(first) == len(second)
    for (image_a, text_a), (image_b, text_b) in zip(first, second):
        for a, b in ((image_a, image_b), (text_a, text_b)):
            assert len(a) == len(b)
            for snapshot_a, snapshot_b in zip(a, b):
                assert len(snapshot_a) == len(snapshot_b)
                assert all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(snapshot_a, snapshot_b))


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.startswith(".")}


# ---- conversion ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_pt_to_safetensors_to_pt_is_bit_identical(tmp_path, dtype):
    source = _synthetic_buffer(tmp_path / "pt", dtype=dtype)
    assert convert_buffer(source, tmp_path / "st", to="safetensors") == [0, 1]
    st = tmp_path / "st"
    assert sorted(_files(st)) == ["buffer_index.json", "buffer_meta.json", "expert_0.safetensors",
                                  "expert_1.safetensors", "metrics_0.json", "metrics_1.json"]
    index = json.loads((st / INDEX_NAME).read_text())
    assert index["meta"] == read_metadata(source)
    assert index["experts"]["1"] == {
        "file": "expert_1.safetensors", "trajectories": 1, "snapshots": [4], "dtype": str(dtype).split(".")[1],
        "image": {"names": ["encoder.weight", "encoder.bias"], "shapes": [[4, 3], [4]]},
        "text": {"names": ["0"], "shapes": [[2, 4]]}}  # no names in the metadata: indices
    _assert_same_experts(_read_everything(st), _read_everything(source))  # both as float32
    for (_, image, text), (_, st_file, _) in zip(expert_files(source), expert_files(st)):  # and as stored
        _assert_same_experts(load_expert_pair(image, text, read_metadata(source), raw=True),
                             [([*i], [*t]) for i, t in open_expert(st_file, read_metadata(st), raw=True)])
    assert convert_buffer(st, tmp_path / "back", to="pt") == [0, 1]
    assert _files(tmp_path / "back") == _files(source)  # torch.save of equal tensors writes equal bytes
    assert convert_buffer(tmp_path / "back", tmp_path / "st2") == [0, 1]
    assert _files(tmp_path / "st2") == _files(st)  # and so does safetensors


def test_a_reference_folder_with_several_experts_per_file_round_trips(tmp_path):
    """The reference's file pair holds several trajectories and no buffer_meta.json: all are kept, the derived
    metadata goes into the index only, and distillation's reader takes the safetensors folder."""
    source = tmp_path / "reference"
    source.mkdir()
    for part, key in (("img", "image_param_shapes"), ("txt", "text_param_shapes")):
        torch.save([_trajectory(SHAPES[key], 3, seed) for seed in (1, 2)], source / f"{part}_replay_buffer_0.pt")
    convert_buffer(source, tmp_path / "st")
    st = tmp_path / "st"
    assert sorted(_files(st)) == ["buffer_index.json", "expert_0.safetensors"]
    assert read_metadata(st)["format"] == 0 and json.loads((st / INDEX_NAME).read_text())["experts"]["0"][
        "snapshots"] == [3, 3]
    _assert_same_experts(_read_everything(st), _read_everything(source))
    cycler = ExpertCycler(st, read_metadata(st), torch.Generator().manual_seed(0), 3)
    assert [torch.equal(cycler.next()[0][2][0], found[0][2][0]) for found in _read_everything(st)] == [True, True]
    convert_buffer(st, tmp_path / "back", to="pt")
    assert sorted(_files(tmp_path / "back")) == sorted(_files(source))  # still no buffer_meta.json
    for part in ("img", "txt"):  # (not the same bytes: torch.save names the archive inside after a path given)
        _assert_same_experts(*([(t, t) for t in torch.load(folder / f"{part}_replay_buffer_0.pt", weights_only=True)]
                               for folder in (source, tmp_path / "back")))


def test_conversion_refuses_bad_input_with_one_line_naming_it(tmp_path):
    source = _synthetic_buffer(tmp_path / "pt")
    cases = [((tmp_path / "nowhere", tmp_path / "t1", "safetensors"), r"buffer folder .*nowhere does not exist"),
             ((tmp_path / "empty", tmp_path / "t2", "safetensors"), r"no experts in .*empty"),
             ((source, tmp_path / "t3", "pt"), r"experts in .*pt are already in the pt layout"),
             ((source, tmp_path / "t4", "npz"), r"cannot convert to 'npz': the layouts are pt, safetensors"),
             ((source, source, "safetensors"), r"target .*pt already holds experts"),
             ((source, source / "metrics_0.json", "safetensors"), r"target .*metrics_0.json is a file")]
    (tmp_path / "empty").mkdir()
    for arguments, message in cases:
        with pytest.raises(UserError, match=message) as caught:
            convert_buffer(*arguments)
        assert "\n" not in str(caught.value)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match=r"target .*busy is not empty \(notes.txt\)"):
        convert_buffer(source, tmp_path / "busy")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # nothing half-written left behind
    (tmp_path / "empty_target").mkdir()
    assert convert_buffer(source, tmp_path / "empty_target") == [0, 1]  # an empty folder is fine


# ---- damaged input ---------------------------------------------------------------------------------------

def _remove_listed_file(folder: Path) -> Path:
    (folder / file_name(1)).unlink()
    return folder / file_name(1)


def _replace_with_other_shapes(folder: Path) -> Path:
    """Expert 1 replaced by one of another model, the index left as it was."""
    other = {**SHAPES, "image_param_shapes": [[4, 3], [5]]}
    return write_expert(folder / file_name(1), [_trajectory(other["image_param_shapes"], 4, 0)],
                        [_trajectory(other["text_param_shapes"], 4, 1)], other)


def _write_raw_expert(folder: Path, tensors: dict) -> Path:
    """Expert 1's file with its header kept and `tensors` changed."""
    path = folder / file_name(1)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        header, found = handle.metadata(), {key: handle.get_tensor(key).clone() for key in handle.keys()}
    save_file({**found, **tensors}, path, metadata=header)
    return path


def _integer_tensor(folder: Path) -> Path:
    return _write_raw_expert(folder, {"image/0/2/0": torch.ones(4, 3, dtype=torch.int64)})


def _nan_tensor(folder: Path) -> Path:
    return _write_raw_expert(folder, {"text/0/3/0": torch.full((2, 4), float("nan"))})


def _truncated_file(folder: Path) -> Path:
    path = folder / file_name(1)
    path.write_bytes(path.read_bytes()[:200])
    return path


def _broken_index(folder: Path) -> Path:
    (folder / INDEX_NAME).write_text('{"experts": {')
    return folder / INDEX_NAME


def _index_of_other_experts(folder: Path) -> Path:
    meta = json.loads((folder / "buffer_meta.json").read_text())
    (folder / "buffer_meta.json").write_text(json.dumps({**meta, "dataset": "coco"}))
    return folder / INDEX_NAME


def _index_of_another_model(folder: Path) -> Path:
    index = json.loads((folder / INDEX_NAME).read_text())
    index["experts"]["0"]["text"]["shapes"] = [[3, 4]]
    (folder / INDEX_NAME).write_text(json.dumps(index))
    return folder / INDEX_NAME


def _mixed(folder: Path) -> Path:
    torch.save([_trajectory([[4, 3], [4]], 4, 0)], folder / "img_replay_buffer_5.pt")
    return folder


@pytest.mark.parametrize("damage, message", [
    (_remove_listed_file, r"buffer file not found: .*expert_1.safetensors, which .*buffer_index.json lists"),
    (_replace_with_other_shapes, r"buffer file .*expert_1.safetensors: trajectory 0, snapshot 0 does not match the "
                                 r"parameter shapes in buffer_meta.json .*image/0/0/1 has \[5\]"),
    (_integer_tensor, r"buffer file .*expert_1.safetensors: tensor image/0/2/0 holds int64 values, not floating"),
    (_nan_tensor, r"buffer file .*expert_1.safetensors: expert 0 of the file, snapshot of epoch 3: text parameter "
                  r"tensor 0 has 8 NaN"),
    (_truncated_file, r"buffer file .*expert_1.safetensors is corrupt, truncated or not a safetensors file"),
    (_broken_index, r"expert index .*buffer_index.json is not valid JSON"),
    (_index_of_other_experts, r"expert index .*buffer_index.json disagrees with buffer_meta.json beside it "
                              r"\(dataset: 'shapes' there, 'coco' in buffer_meta.json\)"),
    (_index_of_another_model, r"expert index .*buffer_index.json: expert 0's text parameter shapes disagree"),
    (_mixed, r"st mixes the two expert layouts \(img_replay_buffer_5.pt and expert_0.safetensors\)"),
])
def test_damaged_input_is_one_line_naming_the_file(tmp_path, damage, message):
    folder = _synthetic_buffer(tmp_path / "st", "safetensors")
    named = damage(folder)
    with pytest.raises(UserError, match=message) as caught:
        _read_everything(folder)
    assert str(named) in str(caught.value) and "\n" not in str(caught.value)


def test_a_folder_takes_one_layout_and_a_float64_buffer_reads_as_float32(tmp_path):
    folder = _synthetic_buffer(tmp_path / "st", "safetensors", dtype=torch.float64)
    with pytest.raises(SettingError, match=r"st holds experts in the safetensors layout, and a folder holds one"):
        claim_metadata(folder, read_metadata(folder), "pt")
    with pytest.raises(SettingError, match=r"pt holds experts in the pt layout"):
        claim_metadata(_synthetic_buffer(tmp_path / "pt"), read_metadata(tmp_path / "pt"), "safetensors")
    assert {t.dtype for image, text in _read_everything(folder) for s in [*image, *text] for t in s} == {torch.float32}


def test_zero_length_segments_and_unlisted_files_as_with_pt(tmp_path, capsys):
    folder = _synthetic_buffer(tmp_path / "st", "safetensors", count=1)
    frozen = _trajectory([[2, 4]], 4, 5)
    frozen[2] = [t.clone() for t in frozen[1]]
    save_expert(folder, 1, _trajectory(SHAPES["image_param_shapes"], 4, 3), frozen, "safetensors")
    meta = read_metadata(folder)
    order_first_1 = next(seed for seed in range(50) if torch.randperm(2, generator=torch.Generator().manual_seed(
        seed)).tolist()[0] == 1)
    cycler = ExpertCycler(folder, meta, torch.Generator().manual_seed(order_first_1), 3, expert_epochs=1)
    with pytest.raises(UserError, match=r"expert_1.safetensors, expert 0 of the file: the snapshots of epochs 1 and 2 "
                                        r"are identical, so the segment between them has zero length"):
        cycler.peek_check()
    ExpertCycler(folder, meta, torch.Generator().manual_seed(order_first_1), 3, expert_epochs=2).peek_check()
    with pytest.raises(UserError, match=r"expert_1.safetensors holds trajectories of 4 snapshots, but "
                                        r"--max_start_epoch and --expert_epochs need 5"):
        ExpertCycler(folder, meta, torch.Generator().manual_seed(order_first_1), 5).peek_check()
    index = (folder / INDEX_NAME).read_bytes()
    save_expert(folder, 2, *(_trajectory(SHAPES[k], 4, 7) for k in ("image_param_shapes", "text_param_shapes")),
                "safetensors")
    (folder / INDEX_NAME).write_bytes(index)  # killed after writing expert 2, before listing it
    capsys.readouterr()
    assert len(ExpertCycler(folder, meta, torch.Generator(), 3, expert_epochs=2).files) == 2
    assert "warning: ignoring" in (err := capsys.readouterr().err) and "expert_2.safetensors (buffer_index.json " \
                                                                     "does not list it" in err
    tidy_index(folder)  # what a rerun of buffer.py does first
    assert [n for n, _, _ in expert_files(folder)] == [0, 1, 2]


# ---- the programs ----------------------------------------------------------------------------------------

def _segments(monkeypatch) -> list:
    """What distillation draws: (start epoch, the four flat tensors) per segment."""
    drawn = []

    def record(*args, **kwargs):
        segment = trajectory.pick_segment(*args, **kwargs)
        drawn.append((segment.start_epoch, segment.start_img, segment.start_txt, segment.target_img,
                      segment.target_txt))
        return segment
    monkeypatch.setattr(distiller, "pick_segment", record)
    return drawn


def test_distill_learns_the_same_set_from_both_layouts(experts, tiny_shapes, cache_dir, tmp_path, monkeypatch):
    pt = Path(experts).joinpath(*LAYOUT)
    convert_buffer(pt, tmp_path / "st" / Path(*LAYOUT))
    st = tmp_path / "st" / Path(*LAYOUT)
    assert len(expert_files(st)) == 2 and buffer_layout(st) == "safetensors"  # what the pipeline counts
    runs = {}
    for name, buffer_path in (("pt", experts), ("st", tmp_path / "st")):
        drawn = _segments(monkeypatch)
        assert distill.main(distill_flags(tiny_shapes, cache_dir, buffer_path, tmp_path / f"run_{name}", "--Iteration",
                                          "3", "--eval_it", "10", "--num_eval", "1", "--epoch_eval_train", "1")) == 0
        runs[name] = drawn, load_distilled_set(tmp_path / f"run_{name}" / "distilled_last.pt")
    (pt_drawn, pt_set), (st_drawn, st_set) = runs["pt"], runs["st"]
    assert len(pt_drawn) == 3 and [d[0] for d in pt_drawn] == [d[0] for d in st_drawn]
    assert all(torch.equal(a, b) for x, y in zip(pt_drawn, st_drawn) for a, b in zip(x[1:], y[1:]))
    for key in ("image_syn", "text_syn"):
        assert torch.equal(pt_set[key], st_set[key])
    assert pt_set["syn_lr_img"] == st_set["syn_lr_img"] and pt_set["syn_lr_txt"] == st_set["syn_lr_txt"]
    convert_buffer(st, tmp_path / "back", to="pt")
    assert _files(tmp_path / "back") == _files(pt)  # buffer.py's own files round-trip to the byte
    model = build_model(ModelSettings(image_encoder="convnet", image_size=16, image_pretrained=False), text_dim=384)
    weights = []
    for folder in (pt, st):  # evaluate.py's coreset selection reads an expert's weights through the same call
        assert load_expert_weights(model, folder, read_metadata(folder), 1, 2) == (1, 2)
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))


class _StopAtCall:
    """A training epoch that raises KeyboardInterrupt (a Ctrl-C) at its call number `stop`, counted from 1."""

    def __init__(self, train_one_epoch, stop: int):
        self.train_one_epoch, self.stop, self.calls = train_one_epoch, stop, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.stop:
            raise KeyboardInterrupt
        return self.train_one_epoch(*args, **kwargs)


def test_buffer_writes_safetensors_and_resumes_an_interrupted_expert(experts, tiny_shapes, cache_dir, tmp_path,
                                                                    monkeypatch, capsys):
    root = tmp_path / "b"
    folder = root.joinpath(*LAYOUT)
    flags = tiny_flags(tiny_shapes, cache_dir, "--buffer_path", str(root), "--batch_train", "50", "--train_epochs",
                       "3", "--buffer_format", "safetensors")
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):  # Ctrl-C in expert 1's second epoch
        patch.setattr(buffer, "train_one_epoch", _StopAtCall(buffer.train_one_epoch, 5))
        buffer.main(flags + ["--num_experts", "2"])
    assert [n for n, _, _ in expert_files(folder)] == [0] and list(folder.glob(".partial_1~*"))
    (folder / INDEX_NAME).unlink()  # as if killed after writing expert 0, before listing it
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (folder / f".expert_1.safetensors~{socket.gethostname()}~{dead.pid}~00.tmp").write_bytes(b"half")
    capsys.readouterr()
    assert buffer.main(flags + ["--num_experts", "1"]) == 0
    out = capsys.readouterr().out
    assert "expert 1: continuing" in out and f"saved expert 1 -> {folder / 'expert_1.safetensors'}" in out
    assert sorted(_files(folder)) == ["buffer_index.json", "buffer_meta.json", "expert_0.safetensors",
                                      "expert_1.safetensors", "metrics_0.json", "metrics_1.json"]
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".partial")]
    reference = Path(experts).joinpath(*LAYOUT)
    _assert_same_experts(_read_everything(folder), _read_everything(reference))  # the same experts, bit for bit
    assert json.loads((folder / INDEX_NAME).read_text())["experts"]["0"]["image"]["names"][0] == "features.0.weight"
    assert distill.main(distill_flags(tiny_shapes, cache_dir, root, tmp_path / "run", "--Iteration", "1")) == 0
    with pytest.raises(SettingError, match=r"holds experts in the safetensors layout"):
        buffer.main(tiny_flags(tiny_shapes, cache_dir, "--buffer_path", str(root), "--num_experts", "1"))


# ---- memory ----------------------------------------------------------------------------------------------

SNAPSHOT = 256 * 1024  # floats in an image snapshot: 1 MiB
SNAPSHOTS = 12  # a trajectory: 12 MiB; 20 experts: 240 MiB


def _mapped_expert_files() -> int:
    with open("/proc/self/maps") as maps:
        return len({line.split()[-1] for line in maps if line.rstrip().endswith(".safetensors")})


def _give_back_freed_memory() -> None:
    """Return the C heap's free memory to the system (glibc), so that the resident set starts from what is held."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # another C library: the margin below covers its caching
        pass


def _walk(cycler: ExpertCycler, generator: torch.Generator, visits: int, after_each) -> set[int]:
    """Visit `visits` experts as distill.py does: keep the segment drawn, drop the trajectories. Returns the
    experts seen."""
    seen = set()
    for _ in range(visits):
        image, text = cycler.next()
        start = int(torch.randint(0, SNAPSHOTS - 2, (1,), generator=generator))
        segment = [torch.cat([image[start][0], image[start + 2][0]]), text[start]]
        seen.add(int(segment[0][0]) // 100)
        del image, text
        after_each()
    return seen


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc (Linux)")
def test_walking_twenty_safetensors_experts_holds_one_experts_snapshots_at_most(tmp_path):
    folder = tmp_path / "st"
    meta = {"format": 1, "image_param_shapes": [[SNAPSHOT]], "text_param_shapes": [[8, 4]]}
    folder.mkdir()
    claim_metadata(folder, meta, "safetensors")
    for n in range(20):  # cheap to make: each snapshot a constant of its own
        save_expert(folder, n, [[torch.full((SNAPSHOT,), 100.0 * n + e)] for e in range(SNAPSHOTS)],
                    [[torch.full((8, 4), 100.0 * n + e)] for e in range(SNAPSHOTS)], "safetensors")
    trajectory = SNAPSHOT * 4 * SNAPSHOTS
    generator = torch.Generator().manual_seed(0)
    cycler = ExpertCycler(folder, read_metadata(folder), generator, SNAPSHOTS, expert_epochs=2)
    process = psutil.Process(os.getpid())
    _walk(cycler, generator, 20, lambda: None)  # a first pass loads what reading needs (libraries' code pages)
    _give_back_freed_memory()
    base, peak = process.memory_info().rss, [0]

    def measure():
        peak[0] = max(peak[0], process.memory_info().rss - base)
        assert _mapped_expert_files() <= 1  # no expert stays mapped once its tensors are gone

    assert _walk(cycler, generator, 20, measure) == set(range(20))  # every expert visited, one at a time
    # The segment kept, the one before it and the checks' temporaries: about 7 MiB, below one trajectory (the
    # margin is for the allocator's caching). Reading the 20 experts whole would hold 240 MiB.
    assert peak[0] < 2 * trajectory, f"{peak[0] / 2**20:.1f} MiB above the start, a trajectory is 12 MiB"
