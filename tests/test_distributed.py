"""Data-parallel distillation (torchrun, gloo on the CPU): K processes drawing one segment each give the
update of one process drawing K segments (--trajectories_per_iteration K), files are written once, a
multi-process run resumes in one process, and the collectives do what they say."""
from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import distill_flags

import distill
from data.distilled_set import load_distilled_set
from matching.distiller import Distiller
from utils import distributed
from utils.cli import UserError

pytestmark = pytest.mark.distributed  # processes of their own, under torchrun or torch.multiprocessing

REPO = Path(__file__).resolve().parents[1]
# LoRS (a low-rank similarity) and RepBlend on: every learned tensor is averaged over the processes.
OPTIONS = ("--sim_type", "lowrank", "--sim_rank", "2", "--lr_sim", "0.1", "--blend_alpha", "0.5")


def torchrun(flags: list[str], processes: int) -> subprocess.CompletedProcess:
    """distill.py under `torchrun --standalone --nproc_per_node processes` (gloo on the CPU)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(REPO / "distill.py"), *flags, "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


@contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def learned_state(path):
    payload = load_distilled_set(path)
    return [payload["image_syn"], payload["text_syn"], torch.tensor(payload["syn_lr_img"]),
            torch.tensor(payload["syn_lr_txt"]), *payload.get("sim_params", [])], payload


def assert_same_sets(a, b):
    (tensors_a, payload_a), (tensors_b, payload_b) = learned_state(a), learned_state(b)
    assert len(tensors_a) == len(tensors_b)
    for x, y in zip(tensors_a, tensors_b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert payload_a["iteration"] == payload_b["iteration"]
    return payload_a, payload_b


@pytest.mark.parametrize("matching", ["unroll", "exact_lowmem", "tesla"])
def test_two_processes_give_the_update_of_one_process_with_two_segments(matching, tiny_shapes, cache_dir, experts,
                                                                         tmp_path):
    flags = lambda out, *extra: distill_flags(tiny_shapes, cache_dir, experts, out, "--Iteration", "3",
                                              "--matching", matching, *OPTIONS, *extra)
    with one_thread():  # as each torchrun process: the same summation order inside every kernel
        assert distill.main(flags(tmp_path / "one", "--trajectories_per_iteration", "2")) == 0
    done = torchrun(flags(tmp_path / "two"), processes=2)

    one, two = assert_same_sets(tmp_path / "one" / "distilled_last.pt", tmp_path / "two" / "distilled_last.pt")
    # The evaluation models, shared out over the two processes, give the numbers one process gets.
    assert one["metrics"]["r_mean"]["runs"] == pytest.approx(two["metrics"]["r_mean"]["runs"], abs=1e-4)
    assert len(two["state"]["streams"]) == 1  # segment stream 1 (rank 1's) is saved with rank 0's
    # Files are written once, by rank 0: the same files as the single process's; one summary line.
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert done.stdout.count("done: 3 iterations") == 1
    assert "2 trajectory segments per update" in done.stdout


def test_lora_matching_is_averaged_over_processes_too(tiny_shapes, cache_dir, lora_experts, tmp_path):
    """LoRA matching (ViT adapters): 2 processes equal 1 process with 2 segments."""
    flags = lambda out, *extra: distill_flags(tiny_shapes, cache_dir, lora_experts, out, "--Iteration", "2",
                                              "--image_encoder", "vit", "--lora_rank", "2", "--max_start_epoch", "1",
                                              "--matching", "exact_lowmem", *extra)
    with one_thread():
        assert distill.main(flags(tmp_path / "one", "--trajectories_per_iteration", "2")) == 0
    torchrun(flags(tmp_path / "two"), processes=2)
    assert_same_sets(tmp_path / "one" / "distilled_last.pt", tmp_path / "two" / "distilled_last.pt")


def test_a_two_process_run_resumes_in_one_process_exactly(tiny_shapes, cache_dir, experts, tmp_path, capsys):
    """Segment streams are numbered over the run: 2 processes x 1 segment and 1 process x 2 segments draw the
    same, so either continues the other; with another number of segments per update, a note says so."""
    flags = lambda out, *extra: distill_flags(tiny_shapes, cache_dir, experts, out, "--Iteration", "4", *OPTIONS,
                                              *extra)
    torchrun(flags(tmp_path / "two"), processes=2)
    halfway = tmp_path / "two" / "distilled_000002.pt"
    with one_thread():
        assert distill.main(flags(tmp_path / "resumed", "--resume", str(halfway), "--trajectories_per_iteration", "2")) == 0
    assert "differ" not in capsys.readouterr().out
    assert_same_sets(tmp_path / "two" / "distilled_last.pt", tmp_path / "resumed" / "distilled_last.pt")

    assert distill.main(flags(tmp_path / "fewer", "--resume", str(halfway))) == 0
    assert "drew 2 segment(s) per update, this one draws 1" in capsys.readouterr().out
    assert distill.main(flags(tmp_path / "more", "--resume", str(halfway), "--trajectories_per_iteration", "3")) == 0
    assert "segment streams 2..2 start fresh" in capsys.readouterr().out
    assert len(load_distilled_set(tmp_path / "more" / "distilled_last.pt")["state"]["streams"]) == 2


def test_more_segments_per_update_change_the_update(tiny_shapes, cache_dir, experts, tmp_path):
    """--trajectories_per_iteration is not ignored, and slot 0 alone is the plain run."""
    flags = lambda out, *extra: distill_flags(tiny_shapes, cache_dir, experts, out, "--Iteration", "2", *extra)
    for name, extra in (("plain", ()), ("one", ("--trajectories_per_iteration", "1")),
                        ("two", ("--trajectories_per_iteration", "2"))):
        assert distill.main(flags(tmp_path / name, *extra)) == 0
    plain, one, two = (learned_state(tmp_path / n / "distilled_last.pt")[0][0] for n in ("plain", "one", "two"))
    assert torch.equal(plain, one) and not torch.allclose(plain, two)


def _collectives(rank: int, world_size: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    group = distributed.ProcessGroupInfo(rank, world_size)
    summed = distributed.sum_over_ranks([torch.full((2, 3), float(rank + 1)), torch.tensor(10.0 * rank)], group)
    gathered = distributed.gather_objects({"rank": rank}, group)
    state = {"image_syn": torch.arange(6.0), "lr": 0.5}
    same = distributed.differing_ranks(state, group)
    if rank == 1:
        state["image_syn"][3] = torch.nextafter(state["image_syn"][3], torch.tensor(9.0))  # one rounding step
    drifted = distributed.differing_ranks(state, group)
    results[rank] = (summed[0].tolist(), summed[1].item(), gathered, same, drifted)
    dist.destroy_process_group()


def test_the_collectives_over_two_gloo_processes(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_collectives, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    for rank in (0, 1):
        summed, scalar, gathered, same, drifted = results[rank]
        assert summed == [[3.0] * 3] * 2 and scalar == 10.0
        assert gathered == [{"rank": 0}, {"rank": 1}]
        assert same == [] and drifted == [1]


def test_single_process_collectives_do_no_communication():
    group = distributed.ProcessGroupInfo()
    tensors = [torch.ones(2)]
    assert distributed.sum_over_ranks(tensors, group)[0] is tensors[0]
    assert distributed.gather_objects(3, group) == [3] and distributed.differing_ranks(3, group) == []
    assert distributed.digest({"a": torch.zeros(2)}) != distributed.digest({"a": torch.zeros(2, dtype=torch.float64)})


def test_sigterm_saves_the_run_like_ctrl_c(tiny_shapes, cache_dir, experts, tmp_path):
    """torchrun sends SIGTERM to the other processes when one fails, SLURM before it ends a job: the run
    saves where it is and says how to continue, as on Ctrl-C."""
    command = [sys.executable, str(REPO / "distill.py"),
               *distill_flags(tiny_shapes, cache_dir, experts, tmp_path / "run", "--Iteration", "100000")]
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = tmp_path / "run" / "distilled_000000.pt"
    deadline = time.time() + 120
    while not first.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-3000:]
    assert "interrupted: saved iteration" in out
    saved = load_distilled_set(tmp_path / "run" / "distilled_last.pt")
    assert saved["iteration"] >= 0 and saved["state"]["rng"]


def _drifting_run(rank: int, port: int, flags: list[str], results) -> None:
    """distill.main as rank `rank` of 2 (what torchrun's environment says); rank 1's pixels drift after a step."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    if rank == 1:
        original = Distiller.step

        def step(self, *args, **kwargs):
            stats = original(self, *args, **kwargs)
            with torch.no_grad():
                self.image_syn[0, 0, 0, 0] += 1e-3
            return stats

        Distiller.step = step
    try:
        distill.main(flags)
        results[rank] = "finished"
    except UserError as err:
        results[rank] = str(err)


def test_processes_whose_sets_drift_apart_stop_with_a_clear_error(tiny_shapes, cache_dir, experts, tmp_path):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    flags = distill_flags(tiny_shapes, cache_dir, experts, tmp_path / "run", "--Iteration", "4", "--sync_check_it", "2",
                          "--device", "cpu")
    results = mp.Manager().dict()
    mp.spawn(_drifting_run, args=(port, flags, results), nprocs=2, join=True)
    for rank in (0, 1):
        assert "synthetic sets differ at iteration 2 (ranks 1 against rank 0)" in results[rank]


def test_random_states_touch_only_this_process_gpu(monkeypatch):
    """On an 8-GPU machine under torchrun every process sees all 8 GPUs: saving and restoring random states
    must ask only the process's own GPU (asking another opens a CUDA context on it). CUDA is faked here."""
    from utils import rng

    asked, set_on = [], []
    fake = {"is_available": lambda: True, "is_initialized": lambda: True, "current_device": lambda: 3,
            "device_count": lambda: 8, "get_rng_state": lambda index: asked.append(index) or torch.full((4,), index),
            "set_rng_state": lambda state, index: set_on.append(index),
            "get_rng_state_all": lambda: pytest.fail("asked every GPU")}
    for name, function in fake.items():
        monkeypatch.setattr(torch.cuda, name, function)
    state = rng.rng_state(torch.Generator())
    assert asked == [3] and list(state["cuda"]) == [3]
    rng.restore_rng(state, torch.Generator())
    assert set_on == [3]
    rng.restore_rng({**state, "cuda": [torch.zeros(4)] * 2})  # a file from before: every device's stream
    assert set_on == [3, 0, 1]
    assert rng.cuda_devices_in_use() == [3]
