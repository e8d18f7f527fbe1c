"""Every setting is checked before any work starts: out-of-range, non-finite or impossible values of any flag
of buffer.py, distill.py and evaluate.py (and the same keys in a pipeline config) are one clear error that
names the flag, the value and what is allowed, raised before data is loaded or anything is written."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import PIPELINE_CONFIG, tiny_flags

import buffer
import distill
import evaluate
from comparison import pipeline
from comparison import programs as comparison_programs
from settings import programs
from settings.base import INT64_MAX, _base_type
from settings.runtime import MAX_SEED
from utils.cli import UserError, user_message
from utils.errors import SettingError
from utils.device import pick_device, seed_everything
from utils.seeds import EVAL_MODEL_OFFSET, TUNING_SEED_OFFSET, distill_eval_seed, eval_model_seed, expert_seed

MAINS = {"buffer": buffer.main, "distill": distill.main, "evaluate": evaluate.main}
TARGET = {"evaluate": ["--full"]}  # evaluate.py needs something to judge before its other flags matter
LR_BEYOND = "must be positive and at most 100 (a finite number)"
DATA_LR_BEYOND = "must be positive and at most 1e+06 (a finite number)"

BAD = [
    # learning rates: every one of every program, non-finite or absurd
    ("buffer", ["--expert_lr_img", "nan"], f"--expert_lr_img {LR_BEYOND}, got nan"),
    ("buffer", ["--lr_teacher_txt", "1e12"], f"--expert_lr_txt {LR_BEYOND}, got 1000000000000.0"),
    ("distill", ["--lr_img", "nan"], f"--lr_img {DATA_LR_BEYOND}, got nan"),
    ("distill", ["--lr_img", "1e12"], f"--lr_img {DATA_LR_BEYOND}"),
    ("distill", ["--lr_txt=-inf"], f"--lr_txt {DATA_LR_BEYOND}"),
    ("distill", ["--lr_lr", "1e12"], f"--lr_lr {LR_BEYOND}"),
    ("distill", ["--lr_sim", "inf"], "--lr_sim must be from 0 to 1e+06, got inf"),  # 0 is allowed: S held fixed
    ("distill", ["--student_lr_img", "0"], f"--student_lr_img {LR_BEYOND}"),
    ("distill", ["--lr_teacher_txt", "1e3"], f"--student_lr_txt {LR_BEYOND}"),
    ("evaluate", ["--lr_eval", "nan"], f"--lr_eval {LR_BEYOND}"),
    ("evaluate", ["--lr_grid", "0.1", "1e12"], f"--lr_grid {LR_BEYOND}, each of them, got [0.1, 1000000000000.0]"),
    ("evaluate", ["--forgetting_lr_img", "nan"], f"--forgetting_lr_img {LR_BEYOND}"),
    ("evaluate", ["--forgetting_lr_txt", "-1"], f"--forgetting_lr_txt {LR_BEYOND}"),
    # SGD settings
    ("buffer", ["--mom", "1"], "--expert_momentum must be from 0 to 1 (1 excluded), got 1.0"),
    ("buffer", ["--expert_momentum", "-0.1"], "--expert_momentum must be from 0 to 1"),
    ("buffer", ["--l2", "-1"], "--expert_weight_decay must be from 0 to 1, got -1.0"),
    ("buffer", ["--expert_weight_decay", "nan"], "--expert_weight_decay must be from 0 to 1, got nan"),
    # runtime
    ("buffer", ["--seed", str(2**66)], f"--seed must be a whole number from 0 to {MAX_SEED}, got {2**66}"),
    ("distill", ["--seed", str(MAX_SEED + 1)], "--seed must be a whole number from 0"),
    ("evaluate", ["--seed", "-1"], "--seed must be a whole number from 0"),
    ("buffer", ["--device", "tpu"], "--device is not a device name (the devices here are cpu"),
    ("distill", ["--name", " "], "--name must not be empty"),
    # counts that must be positive (or at least 0)
    ("buffer", ["--num_workers", "-1"], "--num_workers must be at least 0, got -1"),
    ("evaluate", ["--batch_size_test", "0"], "--batch_size_test must be at least 1, got 0"),
    ("buffer", ["--num_experts", "0"], "--num_experts must be at least 1"),
    ("buffer", ["--train_epochs", "0"], "--train_epochs must be at least 1"),
    ("buffer", ["--batch_train", "0"], "--expert_batch must be at least 2"),
    ("buffer", ["--image_size", "0"], "--image_size must be at least 1"),
    ("distill", ["--max_files", "0"], "--max_files must be at least 1, got 0"),
    ("distill", ["--max_experts", "0"], "--max_experts must be at least 1, got 0"),
    ("distill", ["--max_experts", "-2"], "--max_experts must be at least 1, got -2"),
    ("distill", ["--Iteration", "0"], "--iterations must be at least 1"),
    ("distill", ["--syn_steps", "0"], "--syn_steps must be at least 1"),
    ("distill", ["--syn_steps", str(2**63)], "--syn_steps must be at most 9223372036854775807 (2**63 - 1)"),
    ("distill", ["--num_pairs", "0"], "--num_pairs must be at least 2"),
    ("distill", ["--expert_epochs", "0"], "--expert_epochs must be at least 1"),
    ("distill", ["--num_eval", "0"], "--num_eval must be at least 1"),
    ("distill", ["--epoch_eval_train", "0"], "--epoch_eval_train must be at least 1"),
    ("distill", ["--eval_it", "0"], "--eval_it must be at least 1"),
    ("evaluate", ["--tune_models", "0"], "--tune_models must be at least 1"),
    ("evaluate", ["--expert_number", "-1"], "--expert_number must be at least 0"),
    # other floats that must be finite
    ("distill", ["--skip_spikes", "nan"], "--skip_spikes must be 0 or positive (and finite), got nan"),
    ("distill", ["--time_budget", "inf"], "--time_budget must be positive (and finite), got inf"),
    ("distill", ["--sim_alpha", "nan"], "--sim_alpha must be positive (and finite)"),
    ("distill", ["--blend_alpha", "-1"], "--blend_alpha must be 0 or positive"),
    # an image size the encoder cannot take (networks' rule, checked before the data are read)
    ("buffer", ["--image_size", "20"], "--image_size: image encoder convnet needs an image size divisible by 8, got 20"),
    ("distill", ["--image_encoder", "vit", "--image_size", "40"],
     "--image_size: image encoder vit needs an image size divisible by 16"),
    ("evaluate", ["--image_size", "12"], "--image_size: image encoder convnet needs an image size divisible by 8, got 12"),
    # argparse's own errors end as the same one-line error
    ("distill", ["--syn_steps", "x"], "argument --syn_steps: invalid int value: 'x' (see distill.py --help)"),
]


@pytest.fixture()
def no_work(monkeypatch):
    """Loading data is the first work every program does: reaching it fails the test."""
    def started(*args, **kwargs):
        raise AssertionError("work started before the settings were checked")
    for module in (buffer, distill, evaluate):
        monkeypatch.setattr(module, "load_retrieval_data", started)


@pytest.mark.parametrize("program, flags, message", BAD, ids=[f"{p} {' '.join(f)}" for p, f, _ in BAD])
def test_a_bad_value_is_one_clear_error_before_any_work(program, flags, message, no_work, tmp_path):
    argv = tiny_flags(tmp_path / "data", tmp_path / "cache", *TARGET.get(program, []), *flags)
    with pytest.raises(UserError) as caught:
        MAINS[program](argv)
    assert message in user_message(caught.value)  # as run_cli prints it (a SettingError with its flag first)
    assert "\n" not in user_message(caught.value)
    assert not (tmp_path / "cache").exists()


@pytest.mark.skipif(torch.cuda.device_count() > 7, reason="this machine has a cuda:7")
def test_a_missing_gpu_is_named_with_the_devices_there_are(no_work, tmp_path):
    with pytest.raises(UserError, match=r"--device names a CUDA GPU that is not there \(\d+ visible; the devices "
                                        r"here are cpu.*\), got 'cuda:7'"):
        distill.main(tiny_flags(tmp_path, tmp_path, "--device", "cuda:7"))
    with pytest.raises(SettingError, match="cuda:7 names a CUDA GPU that is not there") as caught:
        pick_device("cuda:7")
    assert (caught.value.field, caught.value.value) == ("device", "cuda:7")
    with pytest.raises(SettingError, match="tpu is not a device name") as caught:
        pick_device("tpu")
    assert user_message(caught.value).startswith("--device: tpu is not a device name")
    assert pick_device("cpu") == torch.device("cpu") and pick_device(None).type in ("cpu", "cuda")


GOOD = [
    ("distill", ["--lr_img", "1e6", "--lr_txt", "1e-8", "--lr_lr", "100", "--lr_sim", "1e6", "--student_lr_img", "100",
                 "--max_files", "1", "--max_experts", "1", "--skip_spikes", "0", "--seed", str(MAX_SEED),
                 "--device", "cpu", "--num_workers", "0", "--batch_size_test", "1", "--mini_batch_size", "2"]),
    ("buffer", ["--expert_lr_img", "100", "--mom", "0", "--l2", "1", "--seed", "0", "--num_experts", "1"]),
    ("buffer", ["--mom", "0.999", "--l2", "0", "--lr_teacher_txt", "1e-6"]),
    ("evaluate", ["--full", "--lr_grid", "1e-6", "100", "--forgetting_lr_img", "100", "--expert_number", "0"]),
]


@pytest.mark.parametrize("program, flags", GOOD)
def test_the_boundary_values_are_accepted(program, flags):
    programs.parse(program, "", flags)


def test_the_seeds_derived_from_the_largest_seed_are_valid_torch_seeds():
    largest = [expert_seed(MAX_SEED, 10**6), eval_model_seed(MAX_SEED + TUNING_SEED_OFFSET + 1000),
               distill_eval_seed(MAX_SEED, 10**9), EVAL_MODEL_OFFSET + MAX_SEED]
    for seed in largest:
        torch.Generator().manual_seed(seed)
    seed_everything(max(largest))


def numeric_fields():
    for program in programs.PROGRAMS:
        for cls in programs.group_classes(program).values():
            for f in cls.specs():
                kind, _, many = _base_type(f.type)
                if kind in (int, float):
                    yield program, cls, f, kind, many


@pytest.mark.parametrize("program, cls, field, kind, many", list(numeric_fields()),
                         ids=lambda v: v.name if isinstance(v, dataclasses.Field) else "")
def test_every_number_flag_has_a_range_that_refuses_absurd_values(program, cls, field, kind, many):
    """Systematic: every int and float field of every program refuses non-finite, negative and huge values (and
    learning rates 1e12); its --help says what it allows."""
    check = field.metadata["check"]
    assert check is not None and getattr(check, "allowed", None), f"--{field.name} has no documented range"
    absurd = [float("nan"), float("inf"), -1.0] if kind is float else [-1, INT64_MAX + 1]
    if "lr" in field.name:
        absurd.append(1e12)
    for value in absurd:
        assert check([value] if many else value), f"--{field.name} accepts {value}"
    assert f"allowed: {check.allowed}" in " ".join(programs.build_parser(program, "").format_help().split())


CONFIG = PIPELINE_CONFIG


@pytest.mark.parametrize("old, new, message", [
    ("num_pairs = 6", "num_pairs = 6\nlr_img = nan", f"[distill]: lr_img {DATA_LR_BEYOND}, got nan"),
    ("num_experts = 2", "num_experts = 2\nmom = 1.0", "[buffer]: mom must be from 0 to 1 (1 excluded), got 1.0"),
    ("num_experts = 2", "num_experts = 2\nlr_teacher_img = 1e12", f"[buffer]: lr_teacher_img {LR_BEYOND}"),
    ("num_eval = 2", "num_eval = 2\nlr_grid = [0.1, 1e12]", f"[evaluate]: lr_grid {LR_BEYOND}, each of them"),
    ("num_eval = 2", "num_eval = 2\nlr_grid = []", "[evaluate]: lr_grid needs at least one value"),
    ("num_eval = 2", "num_eval = 0", "[evaluate]: num_eval must be at least 1, got 0"),
    ('dataset = "shapes"', 'dataset = "shapes"\nseed = -1', "[common]: seed must be a whole number from 0"),
    ('dataset = "shapes"', 'dataset = "shapes"\ndevice = "tpu"', "[common]: device is not a device name"),
    ('dataset = "shapes"', 'dataset = "shapes"\nnum_workers = -1', "[common]: num_workers must be at least 0"),
    ("mini_batch_size = 3", "mini_batch_size = 3\nmax_experts = 0", "[distill]: max_experts must be at least 1"),
    ("mini_batch_size = 3", "mini_batch_size = 3\nseeds = [0, 4294967296]",
     "[distill]: seeds: each must be a whole number from 0 to 4294967295"),
    # rules between flags, on what a program will be given ([common] with its section)
    ("mini_batch_size = 3", "mini_batch_size = 7", "[common] with [distill]: --mini_batch_size 7 is larger than "
                                                   "--num_pairs 6"),
    ("image_pretrained = false", "image_pretrained = false\ntrain_stages = 0",
     "[common] with [buffer]: --train_stages 0 freezes the whole image encoder"),
    # [compare]: what becomes evaluate.py's flags passes the same checks
    ("ladder = [6, 12]", "ladder = [6, 0]", "[compare]: ladder must be at least 2, got 0"),
    ("ladder = [6, 12]", 'ladder = [6, "12"]', "[compare]: ladder must be a int, got '12'"),
    ("ladder = [6, 12]", 'ladder = [6]\ncoreset_methods = ["herdin"]', "[compare]: coreset_methods 'herdin' is not "
                                                                       "one of random, herding"),
    ("ladder = [6, 12]", "ladder = [6]\nepochs_per_size = {all = 0}",
     "[compare]: epochs_per_size.all must be at least 1, got 0"),
    ("ladder = [6, 12]", "ladder = [6]\nepochs_per_size = {lots = 2}", "epochs_per_size keys are set sizes or 'all'"),
    ("ladder = [6, 12]", 'ladder = [6]\nfull = "both"', "[compare]: full must be 'train'"),
    ("ladder = [6, 12]", "ladder = [6]\ndefault_experts = 0", "[compare]: default_experts must be at least 1, got 0"),
    ("ladder = [6, 12]", "ladders = [6]", "[compare]: unknown key 'ladders'; did you mean 'ladder'?"),
])
def test_a_bad_pipeline_config_value_is_refused_before_any_work(old, new, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(comparison_programs, "launch", lambda *a, **k: pytest.fail("a program ran"))
    config = tmp_path / "bad.toml"
    assert old in CONFIG
    config.write_text(CONFIG.replace(old, new))
    with pytest.raises(UserError) as caught:
        pipeline.main([str(config), "--out_dir", "out"])
    assert message in str(caught.value) and str(config) in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_the_comparison_jobs_check_every_method_and_regime_first(tmp_path, monkeypatch):
    from comparison import methods, regimes

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(comparison_programs, "launch", lambda *a, **k: pytest.fail("a program ran"))
    config = tmp_path / "c.toml"
    config.write_text(CONFIG + '[methods.wild]\ndistill = {lr_img = 1e12}\n[regimes.tiny]\nbuffer = {l2 = 2.0}\n')
    with pytest.raises(UserError, match=r"method wild .*\[distill\]: lr_img must be positive and at most 1e\+06"):
        methods.main([str(config), "--methods", "base", "wild"])
    with pytest.raises(UserError, match=r"regime tiny .*\[buffer\]: l2 must be from 0 to 1, got 2.0"):
        regimes.main([str(config), "--regimes", "tiny"])
    with pytest.raises(UserError, match=r"--budget must be a positive number of minutes, got inf"):
        regimes.main([str(config), "--budget", "inf"])
    with pytest.raises(UserError, match=r"unrecognized arguments: --bogus \(see pipeline.py --help\)"):
        pipeline.main([str(config), "--bogus"])
    assert not (tmp_path / "outputs").exists()
