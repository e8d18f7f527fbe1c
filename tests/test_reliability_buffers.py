"""Issue 16, expert buffers and file writing: interrupted buffer.py runs, leftovers, umask, identical
bytes, the output folder, a full disk, reference-format buffers and zero-length segments."""
from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import distill_flags, tiny_flags

import buffer
from experts.cycler import ExpertCycler
from experts.files import check_buffer_matches, expert_files, read_expert_metrics, read_metadata
from utils.cli import UserError
from utils.io import STALE_AFTER_SECONDS, atomic_torch_save, atomic_write_json, remove_stale_temporaries

LAYOUT = ("shapes", "convnet", "minilm")


def _buffer_flags(tiny_shapes, cache_dir, root, *extra):
    """The flags of conftest's `experts` fixture (2 experts of 3 epochs), with another --buffer_path."""
    return tiny_flags(tiny_shapes, cache_dir, "--buffer_path", str(root), "--batch_train", "50",
                      "--train_epochs", "3", *extra)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# --- writing files -------------------------------------------------------------------------------

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        atomic_torch_save([torch.ones(2)], tmp_path / "a.pt")
        atomic_write_json({"a": 1}, tmp_path / "a.json")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.pt").stat().st_mode & 0o777 == mode
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == mode


def test_equal_data_gives_equal_bytes_whatever_the_file_name(tmp_path):
    data = [[torch.arange(6.0).reshape(2, 3), torch.zeros(4)]]
    first, second = atomic_torch_save(data, tmp_path / "one.pt"), atomic_torch_save(data, tmp_path / "two.pt")
    assert first.read_bytes() == second.read_bytes()


def test_only_temporaries_of_finished_writers_are_removed(tmp_path):
    host, dead, live = socket.gethostname(), _dead_pid(), os.getppid()
    names = {"dead": f".x.pt~{host}~{dead}~ab.tmp", "live": f".x.pt~{host}~{live}~cd.tmp",
             "other_host_new": ".x.pt~elsewhere~1~ef.tmp", "other_host_old": ".y.pt~elsewhere~1~gh.tmp",
             "unowned_new": ".x.pt.k2j3.tmp", "unowned_old": ".y.pt.k2j3.tmp"}
    for name in names.values():
        (tmp_path / name).write_bytes(b"")
    old = time.time() - STALE_AFTER_SECONDS - 60
    for key in ("other_host_old", "unowned_old"):
        os.utime(tmp_path / names[key], (old, old))
    removed = {p.name for p in remove_stale_temporaries(tmp_path)}
    assert removed == {names["dead"], names["other_host_old"], names["unowned_old"]}
    assert {p.name for p in tmp_path.iterdir()} == {names["live"], names["other_host_new"], names["unowned_new"]}


def test_a_full_disk_names_the_file_and_keeps_the_previous_one(tmp_path, monkeypatch):
    path = atomic_torch_save([torch.ones(3)], tmp_path / "kept.pt")
    before = path.read_bytes()

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(UserError, match=r"disk is full .*kept\.pt; the previous kept\.pt is intact"):
        atomic_torch_save([torch.zeros(3)], path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["kept.pt"]


def test_buffer_py_on_a_full_disk_stops_with_a_clear_message(tiny_shapes, cache_dir, tmp_path, monkeypatch):
    real_save = torch.save

    def no_space_in_the_buffer(obj, file, *args, **kwargs):
        if str(getattr(file, "name", file)).startswith(str(tmp_path)):  # the caches may still be written
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", no_space_in_the_buffer)
    with pytest.raises(UserError, match=r"the disk is full \(ENOSPC\) while writing .*snapshot_0\.pt"):
        buffer.main(_buffer_flags(tiny_shapes, cache_dir, tmp_path, "--num_experts", "1"))
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob("*_replay_buffer_*"))


def test_a_bad_buffer_path_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(buffer, "load_retrieval_data", lambda *a, **k: pytest.fail("work started"))
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(UserError, match=r"--buffer_path .*file is a file, not a folder"):
        buffer.main(["--buffer_path", str(afile)])
    with pytest.raises(UserError, match=r"--buffer_path .*file/sub/dir: .*file is a file, not a folder"):
        buffer.main(["--buffer_path", str(afile / "sub" / "dir")])
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(UserError, match=r"--buffer_path .*locked cannot be written to"):
            buffer.main(["--buffer_path", str(locked)])


# --- interrupted runs ----------------------------------------------------------------------------

def test_an_interrupted_run_is_finished_by_rerunning_bit_for_bit(experts, tiny_shapes, cache_dir, tmp_path,
                                                                 monkeypatch, capsys):
    root = tmp_path / "b"
    directory = root.joinpath(*LAYOUT)
    calls, real_epoch = [], buffer.train_one_epoch

    def interrupt_in_expert_1_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # expert 0 ran its 3 epochs, expert 1 its first
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(buffer, "train_one_epoch", interrupt_in_expert_1_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        buffer.main(_buffer_flags(tiny_shapes, cache_dir, root, "--num_experts", "2"))
    monkeypatch.setattr(buffer, "train_one_epoch", real_epoch)
    assert [n for n, _, _ in expert_files(directory)] == [0]
    partial, = directory.glob(".partial_1~*")
    assert sorted(p.name for p in partial.iterdir()) == ["snapshot_0.pt", "snapshot_1.pt", "state.pt"]
    # what a killed process leaves besides: a temporary file, and the first half of the pair it was writing
    (directory / f".txt_replay_buffer_1.pt~{socket.gethostname()}~{_dead_pid()}~00.tmp").write_bytes(b"half")
    (directory / "img_replay_buffer_1.pt").write_bytes(b"written before the text file")

    capsys.readouterr()
    assert buffer.main(_buffer_flags(tiny_shapes, cache_dir, root, "--num_experts", "1")) == 0
    out = capsys.readouterr().out
    assert "removed img_replay_buffer_1.pt" in out and "expert 1: continuing" in out and "after epoch 1" in out
    reference = Path(experts).joinpath(*LAYOUT)
    for name in ("img_replay_buffer_0.pt", "txt_replay_buffer_0.pt", "img_replay_buffer_1.pt", "txt_replay_buffer_1.pt"):
        assert (directory / name).read_bytes() == (reference / name).read_bytes(), name  # two runs, same bytes
    assert sorted(p.name for p in directory.iterdir() if p.name.startswith(".")) == []
    strip = lambda report: {k: v for k, v in report.items() if k != "seconds"}  # noqa: E731
    assert ({n: strip(r) for n, r in read_expert_metrics(directory).items()}
            == {n: strip(r) for n, r in read_expert_metrics(reference).items()})


def test_a_live_runs_partial_expert_is_left_alone(experts, tiny_shapes, cache_dir, tmp_path):
    from experts.checkpoint import numbers_to_train, tidy

    directory = tmp_path
    live = directory / f".partial_0~{socket.gethostname()}~{os.getppid()}"
    live.mkdir()
    (live / f".state.pt~{socket.gethostname()}~{os.getppid()}~aa.tmp").write_bytes(b"")
    dead = directory / f".partial_4~{socket.gethostname()}~{_dead_pid()}"
    dead.mkdir()
    tidy(directory)
    assert live.is_dir() and len(list(live.iterdir())) == 1
    assert numbers_to_train(directory, 3) == [4, 1, 2]  # the dead run's expert 4 first; 0 trains elsewhere


# --- reading buffers -----------------------------------------------------------------------------

def _reference_folder(experts: Path, folder: Path, edit=None) -> Path:
    """The tiny experts rewritten as the reference writes them: one file pair holding both experts, nested
    lists saved with torch.save, no buffer_meta.json."""
    source = Path(experts).joinpath(*LAYOUT)
    folder.mkdir(parents=True)
    for part in ("img", "txt"):
        trajectories = [torch.load(source / f"{part}_replay_buffer_{n}.pt", weights_only=True)[0] for n in (0, 1)]
        if edit is not None:
            edit(part, trajectories)
        torch.save(trajectories, folder / f"{part}_replay_buffer_0.pt")
    return folder


def test_a_reference_format_buffer_is_distilled_from(experts, tiny_shapes, cache_dir, tmp_path, capsys):
    import distill

    folder = _reference_folder(experts, tmp_path / "reference")
    meta = read_metadata(folder)
    assert meta["format"] == 0 and meta["text_dim"] == 384 and meta["image_dim"] == 512
    save_dir = tmp_path / "run"
    assert distill.main(distill_flags(tiny_shapes, cache_dir, folder, save_dir, "--Iteration", "1")) == 0
    assert (save_dir / "distilled_last.pt").is_file()
    assert "no buffer_meta.json: read as the reference implementation's format" in capsys.readouterr().err


@pytest.mark.parametrize("flags, named", [(("--image_size", "32"), r"--image_size 32 gives 2048: check --image_size"),
                                          (("--text_encoder", "bert"), r"--text_encoder bert gives 768: check "
                                                                       r"--text_encoder")])
def test_a_reference_buffer_with_other_flags_names_the_flag(experts, tiny_shapes, cache_dir, tmp_path, flags, named):
    import distill

    folder = _reference_folder(experts, tmp_path / "reference")
    with pytest.raises(UserError, match=r"no buffer_meta.json: read as the reference implementation's format\) do "
                                        r"not fit this run: .*" + named):
        distill.main(distill_flags(tiny_shapes, cache_dir, folder, tmp_path / "run", *flags))


def test_a_zero_length_segment_is_refused_when_the_experts_load(experts, tiny_shapes, cache_dir, tmp_path):
    import distill

    def freeze_second_expert_epoch_2(part, trajectories):
        if part == "txt":
            trajectories[1][2] = [t.clone() for t in trajectories[1][1]]

    folder = _reference_folder(experts, tmp_path / "reference", freeze_second_expert_epoch_2)
    with pytest.raises(UserError, match=r"txt_replay_buffer_0.pt, expert 1 of the file: the snapshots of epochs 1 "
                                        r"and 2 are identical"):
        distill.main(distill_flags(tiny_shapes, cache_dir, folder, tmp_path / "run"))
    meta = read_metadata(folder)  # the shapes are all the cycler needs
    cycler = lambda epochs: ExpertCycler(folder, meta, torch.Generator(), 3, expert_epochs=epochs)  # noqa: E731
    with pytest.raises(UserError, match=r"epochs 1 and 2 are identical"):
        cycler(1).peek_check()  # start epoch 1 with one expert epoch: drawn, refused
    cycler(2).peek_check()  # start 0 to target 2 moved: fine


def test_a_half_written_pair_is_ignored_with_a_warning(experts, tmp_path, capsys):
    folder = _reference_folder(experts, tmp_path / "reference")
    (folder / "img_replay_buffer_7.pt").write_bytes(b"")
    meta = read_metadata(folder)
    cycler = ExpertCycler(folder, meta, torch.Generator(), 3)
    assert len(cycler.files) == 1
    err = capsys.readouterr().err
    assert "warning: ignoring" in err and "img_replay_buffer_7.pt (its img/txt partner is missing" in err
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / "img_replay_buffer_0.pt").write_bytes(b"")
    with pytest.raises(UserError, match=r"no experts in .*lonely \(only img_replay_buffer_0.pt without its partner"):
        check_buffer_matches(read_metadata(lonely), lonely, {})


def test_a_partial_expert_of_other_settings_is_trained_afresh(tmp_path, capsys):
    from experts.checkpoint import ExpertCheckpoint

    model = torch.nn.Linear(2, 2)
    optimizers = [torch.optim.SGD(model.parameters(), lr=0.1)]
    loader = torch.utils.data.DataLoader(range(4), shuffle=True, generator=torch.Generator().manual_seed(0))
    first, state = ExpertCheckpoint.claim(tmp_path, 3, {"expert_lr_img": 0.1})
    assert state is None
    first.save_snapshot(0, [model.weight.detach().clone()], [])
    first.save_snapshot(1, [model.weight.detach().clone()], [])
    first.save(1, model, optimizers, loader, [{"epoch": 1}], 1.0)
    again, state = ExpertCheckpoint.claim(tmp_path, 3, {"expert_lr_img": 0.1})  # same settings: continued
    assert again.folder == first.folder and state["epochs_done"] == 1
    assert [len(t) for t in again.restore(state, model, optimizers, loader)] == [2, 2]
    other, state = ExpertCheckpoint.claim(tmp_path, 3, {"expert_lr_img": 0.2})
    assert state is None and list(other.folder.iterdir()) == []
    assert "made with other settings (expert_lr_img); training it afresh" in capsys.readouterr().out


def _nan_in_snapshot(folder):
    torch.save([[torch.tensor([float("nan")])], []], folder / "snapshot_1.pt")


def _state_edit(edit):
    def apply(folder):
        state = torch.load(folder / "state.pt", weights_only=True)
        torch.save(edit(state), folder / "state.pt")
    return apply


@pytest.mark.parametrize("damage, named", [
    (lambda folder: (folder / "snapshot_1.pt").unlink(), "lack a readable snapshot of epoch 1"),
    (lambda folder: (folder / "snapshot_0.pt").write_bytes(b"torn"), "lack a readable snapshot of epoch 0"),
    (_nan_in_snapshot, "hold a snapshot of epoch 1 that is not two lists of finite tensors"),
    (_state_edit(lambda s: {k: v for k, v in s.items() if k != "optimizers"}), "lacks the keys"),
    (_state_edit(lambda s: [s]), "lack the keys"),
    (_state_edit(lambda s: {**s, "epochs_done": -1}), "hold epochs_done -1"),
    (_state_edit(lambda s: {**s, "model": {"weight": torch.full((2, 2), float("inf"))}}), "hold a model state that is not a dict of finite tensors"),
])
def test_a_damaged_partial_expert_is_trained_afresh(tmp_path, capsys, damage, named):
    """A partial state that cannot be continued (torn or missing snapshot, NaN, another layout) is named and the
    expert trained afresh, instead of a traceback when buffer.py restores it."""
    from experts.checkpoint import ExpertCheckpoint

    model = torch.nn.Linear(2, 2)
    optimizers = [torch.optim.SGD(model.parameters(), lr=0.1)]
    loader = torch.utils.data.DataLoader(range(4), shuffle=True, generator=torch.Generator().manual_seed(0))
    first, _ = ExpertCheckpoint.claim(tmp_path, 3, {"expert_lr_img": 0.1})
    first.save_snapshot(0, [model.weight.detach().clone()], [])
    first.save_snapshot(1, [model.weight.detach().clone()], [])
    first.save(1, model, optimizers, loader, [{"epoch": 1}], 1.0)
    damage(first.folder)
    again, state = ExpertCheckpoint.claim(tmp_path, 3, {"expert_lr_img": 0.1})
    assert state is None and list(again.folder.iterdir()) == []
    assert f"expert 3: the interrupted run's partial expert cannot be continued (state.pt or its snapshots {named}" \
        in capsys.readouterr().out
