"""The whole chain (pipeline.py, what `make demo` runs) at toy size: table, artefacts, reuse."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from comparison import pipeline, programs, report, stages
from comparison.config import load_config
from comparison.programs import launch as real_launch
from comparison.rows import Kind, Row, row_from_label
from data.distilled_set import load_distilled_set
from utils.cli import UserError

TOY = """
out_dir = "{out}"
[common]
dataset = "shapes"
image_root = "{root}"
cache_dir = "{cache}"
image_encoder = "convnet"
image_size = 16
image_pretrained = false
text_encoder = "minilm"
eval_split = "val"
num_workers = 0
wandb_mode = "disabled"
progress = false
[buffer]
num_experts = 2
train_epochs = 2
batch_train = 50
[distill]
seeds = [0, 1]
num_pairs = 6
syn_steps = 2
expert_epochs = 1
max_start_epoch = 1
mini_batch_size = 3
lr_img = 10
lr_txt = 10
lr_lr = 1e-6
Iteration = 2
eval_it = 2
num_eval = 1
epoch_eval_train = 1
batch_train = 3
[evaluate]
num_eval = 2
epoch_eval_train = 1
batch_train = 4
lr_grid = [0.03, 0.1]
epoch_scales = [1, 2]
widen_grid = 1
[compare]
ladder = [6, 12, 24]
coreset_methods = ["kmeans"]
full = "train"
epochs_per_size = {{12 = 2, all = 1}}
"""


def launch_in_process(program: str, flags: list[str], log=None) -> int:
    """comparison.programs.launch without a new Python process (the same programs' main(), seconds faster each)."""
    import contextlib
    import importlib

    module = importlib.import_module(program.removesuffix(".py"))
    if log is None:
        print("$ " + " ".join([program, *flags]), flush=True)
    with contextlib.redirect_stdout(log) if log else contextlib.nullcontext():
        try:
            return module.main(list(flags)) or 0
        except UserError as err:
            print(f"error: {err}")
            return 2


@pytest.fixture(scope="module", autouse=True)
def programs_in_process():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(programs, "launch", launch_in_process)
        yield


@pytest.fixture(scope="module")
def toy_run(tiny_shapes, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    config = out / "toy.toml"
    config.write_text(TOY.format(out=out / "run", root=tiny_shapes, cache=cache_dir))
    assert pipeline.main([str(config)]) == 0
    return config, out / "run"


ROWS = ["distilled-6 (2 seeds)", "distilled-6 (seed 0)", "distilled-6 (seed 1)", "kmeans-6", "random-6",
        "random-12", "random-24", "full data"]


def test_table_has_every_row_metric_worth_and_choice(toy_run):
    _, out = toy_run
    text = (out / "results.md").read_text()
    assert text.startswith("Reported on the test split; choices on val.")
    lines = [line for line in text.splitlines()[2:] if line.startswith("|")]
    assert lines[0] == "| set | IR@1 | IR@5 | IR@10 | TR@1 | TR@5 | TR@10 | r_mean | worth-N | lr | epochs |"
    labels = [line.split("|")[1].strip() for line in lines[2:]]
    assert labels == ROWS
    for line in lines[2:]:
        assert all(" ± " in cell for cell in line.strip("|").split("|")[1:8])
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert list(rows) == labels and results["split"] == "test"
    seeds = [rows[f"distilled-6 (seed {s})"]["r_mean"]["runs"] for s in (0, 1)]
    assert rows["distilled-6 (2 seeds)"]["r_mean"]["runs"] == seeds[0] + seeds[1]  # pooled over both seeds
    assert len(rows["full data"]["r_mean"]["runs"]) == 2
    epochs = {label: json.loads((out / "results" / f"{label}.json").read_text())["config"]["epoch_eval_train"]
              for label in ("distilled-6 (seed 0)", "random-6", "random-12", "full")}
    assert epochs == {"distilled-6 (seed 0)": 1, "random-6": 1, "random-12": 2, "full": 1}
    # every row chose its learning rate and epochs from the same grid on val (epochs: 1x and 2x its own), widened
    # by at most one cell, and says what it chose
    for label in ("distilled-6 (seed 0)", "kmeans-6", "random-12", "full"):
        report = json.loads((out / "results" / f"{label}.json").read_text())
        own = report["config"]["epoch_eval_train"]
        cells = [(c["lr"], c["epochs"]) for c in report["tuning"]]
        assert cells[:4] == [(0.03, own), (0.1, own), (0.03, 2 * own), (0.1, 2 * own)] and len(cells) <= 5
        best = max(report["tuning"], key=lambda c: c["r_mean"])
        assert (report["lr"], report["epochs"]) == (best["lr"], best["epochs"])
        assert report["split"] == "test" and report["selection_split"] == "val"
        assert results["choices"][label if label != "full" else "full data"]["epochs"] == report["epochs"]
        row = next(line for line in lines[2:] if line.split("|")[1].strip() == (label if label != "full" else
                                                                                  "full data"))
        assert row.rstrip("| ").endswith(f"| {report['lr']:.3g} | {report['epochs']}")
        assert (f"{label if label != 'full' else 'full data'} (" in text.split("\n\n")[-1]) == bool(report["at_edge"])
    # worth-N: the ladder's random rows and full data (200 pairs) against each other set
    assert set(results["ladder"]) == {"6", "12", "24", "200"}
    worth = results["worth_n"]
    assert worth["random-6"] is None and worth["full data"] is None and worth["kmeans-6"] is not None
    for label in ("distilled-6 (2 seeds)", "kmeans-6"):
        from evaluation.worth import worth_n
        expected = worth_n({int(k): v for k, v in results["ladder"].items()}, rows[label]["r_mean"]["mean"],
                           rows[label]["r_mean"]["std"]).as_dict()
        assert worth[label] == expected
    with Image.open(out / "worth_n.png") as image:
        assert image.size == (700, 450)
    # each row's kind is recorded, and a folder written before kinds were (read by its labels) says the same
    kinds = results["kinds"]
    assert [kinds[label]["kind"] for label in ROWS] == ["distilled"] * 3 + ["coreset"] + ["ladder"] * 3 + ["full"]
    assert (kinds["distilled-6 (2 seeds)"]["seeds"], kinds["distilled-6 (seed 1)"]["seed"]) == (2, 1)
    for label in ROWS:
        assert row_from_label(label, {}).record() == kinds[label], label


def test_every_artefact_is_written_and_reloads(toy_run):
    _, out = toy_run
    for seed in (0, 1):
        distilled = load_distilled_set(out / "distill" / f"seed{seed}" / "distilled_last.pt")
        assert distilled["iteration"] == 2 and distilled["image_syn"].shape == (6, 3, 16, 16)
        assert distilled["config"]["seed"] == seed
    assert not torch.equal(*(load_distilled_set(out / "distill" / f"seed{s}" / "distilled_last.pt")["image_syn"]
                             for s in (0, 1)))
    for label in ("random-6", "random-12"):
        coreset = load_distilled_set(out / "results" / "coresets" / f"{label}.pt")
        assert coreset["config"]["source"] == "coreset:random"
    assert load_distilled_set(out / "results" / "coresets" / "kmeans-6.pt")["config"]["source"] == "coreset:kmeans"
    report = json.loads((out / "results" / "distilled-6 (seed 0).json").read_text())
    assert report["metrics"] == json.loads((out / "results.json").read_text())["rows"]["distilled-6 (seed 0)"]
    assert report["config"]["distilled"].endswith("seed0/distilled_best.pt")  # the iteration chosen on val
    with Image.open(out / "synthetic_images_plain.png") as image:
        assert image.size[0] > 16
    assert len((out / "nearest_captions.txt").read_text().splitlines()) == 7
    assert torch.load(out / "distill" / "seed0" / "distilled_last.pt", weights_only=True)["config"]["source"] == \
        "distilled"


def test_the_pipeline_exports_the_seed_that_scored_best_on_val_with_its_table(toy_run):
    from data.exported_set import load_exported_set

    _, out = toy_run
    scores = {seed: load_distilled_set(out / "distill" / f"seed{seed}" / "distilled_best.pt")["metrics"]["r_mean"]["mean"]
              for seed in (0, 1)}
    best = max(scores, key=lambda seed: (scores[seed], -seed))
    shared = load_exported_set(out / "export")
    assert torch.equal(shared["image_syn"],
                       load_distilled_set(out / "distill" / f"seed{best}" / "distilled_best.pt")["image_syn"])
    card = (out / "export" / "README.md").read_text()
    assert (out / "results.md").read_text().strip() in card and "## The comparison it comes from" in card


def test_a_rerun_reuses_every_stage(toy_run, capsys):
    config, out = toy_run
    before = (out / "results" / "random-12.json").stat().st_mtime_ns
    assert pipeline.main([str(config)]) == 0
    text = capsys.readouterr().out
    assert "experts: 2 of 2 trained, reusing them" in text and text.count("distillation: reusing") == 2
    assert "buffer.py" not in text and "distill.py" not in text and "done before" in text
    assert (out / "results" / "random-12.json").stat().st_mtime_ns == before


def test_bad_config_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        pipeline.main([str(tmp_path / "none.toml")])
    (tmp_path / "bad.toml").write_text("[common\n")
    with pytest.raises(UserError, match="not valid TOML"):
        pipeline.main([str(tmp_path / "bad.toml")])
    (tmp_path / "odd.toml").write_text("[distil]\nsyn_steps = 2\n")
    with pytest.raises(UserError, match="unknown sections"):
        pipeline.main([str(tmp_path / "odd.toml")])
    assert not Path(tmp_path / "outputs").exists()


def fresh_run(tiny_shapes, cache_dir, tmp_path) -> tuple[Path, Path]:
    """A smaller toy run of its own (one seed, two ladder rungs, no grid), for tests that change it."""
    config = tmp_path / "toy.toml"
    text = TOY.format(out=tmp_path / "run", root=tiny_shapes, cache=cache_dir)
    for old, new in (("seeds = [0, 1]", "seeds = [1]"), ("ladder = [6, 12, 24]", "ladder = [6, 12]"),
                     ('coreset_methods = ["kmeans"]\n', ""), ("lr_grid = [0.03, 0.1]\n", "")):
        assert old in text
        text = text.replace(old, new)
    config.write_text(text)
    assert pipeline.main([str(config)]) == 0
    return config, tmp_path / "run"


def test_interrupted_experts_resume_and_a_distill_change_redoes_only_its_row(tiny_shapes, cache_dir, tmp_path,
                                                                               capsys):
    config, out = fresh_run(tiny_shapes, cache_dir, tmp_path)
    expert_dir = next(out.glob("buffers/**/buffer_meta.json")).parent
    kept = (expert_dir / "img_replay_buffer_0.pt").read_bytes()
    for name in ("img_replay_buffer_1.pt", "txt_replay_buffer_1.pt"):
        (expert_dir / name).unlink()  # as if the run stopped during the second expert
    capsys.readouterr()
    assert pipeline.main([str(config)]) == 0
    assert "experts: 1 of 2 trained" in capsys.readouterr().out
    assert (expert_dir / "img_replay_buffer_0.pt").read_bytes() == kept
    assert (expert_dir / "img_replay_buffer_1.pt").is_file()

    coreset_row = (out / "results" / "random-12.json").read_text()
    assert not (out / "results" / "kmeans-6.json").exists() and not (out / "distill" / "seed0").exists()
    # a checkout that kept the reports but not the distilled sets (bench/results/ leaves them out): the set is
    # distilled again, to the same bits, and its judged row is kept rather than judged again
    distilled_row = (out / "results" / "distilled-6 (seed 1).json").read_text()
    best = out / "distill" / "seed1" / "distilled_best.pt"
    before = load_distilled_set(best)
    for path in (out / "distill").rglob("*.pt"):  # the ignored files; timing.json and the grids stay
        path.unlink()
    capsys.readouterr()
    assert pipeline.main([str(config)]) == 0
    printed = capsys.readouterr().out
    assert "$ distill.py" in printed and "$ evaluate.py" not in printed
    assert torch.equal(load_distilled_set(best)["image_syn"], before["image_syn"])
    assert (out / "results" / "distilled-6 (seed 1).json").read_text() == distilled_row
    old_row = json.loads(distilled_row)
    config.write_text(config.read_text().replace("lr_img = 10\n", "lr_img = 1000\n"))
    assert pipeline.main([str(config)]) == 0
    text = capsys.readouterr().out
    assert "distill.py" in text and "buffer.py" not in text
    assert (out / "results" / "random-12.json").read_text() == coreset_row  # not redone
    new_row = json.loads((out / "results" / "distilled-6 (seed 1).json").read_text())
    assert old_row["config"]["set_config"]["lr_img"] == 10 and new_row["config"]["set_config"]["lr_img"] == 1000
    assert json.loads((out / "results.json").read_text())["rows"]["distilled-6 (seed 1)"] == new_row["metrics"]


def test_methods_benchmark_reuses_the_base_experts_and_tables_every_method(toy_run, capsys):
    from comparison import methods as bench_methods

    config, out = toy_run
    text = config.read_text().replace('lr_lr = 1e-6', 'lr_lr = 1e-9') + (
        '[methods.lors]\ndistill = {sim_type = "lowrank", sim_rank = 2, lr_sim = 1.0}\n'
        '[methods.repblend]\ncommon = {image_projection = true, image_encoder = "efficientnet_lite0", '
        'image_pretrained = true}\n'
        'distill = {sim_type = "lowrank", sim_rank = 2, lr_sim = 1.0, blend_alpha = 1.0}\n')
    methods_config = config.with_name("methods.toml")
    methods_config.write_text(text)
    capsys.readouterr()
    assert bench_methods.main([str(methods_config)]) == 0
    printed = capsys.readouterr().out
    assert "experts: 2 of 2 trained, reusing them" in printed  # base and lors share the pipeline's experts
    lines = (out / "methods.md").read_text().splitlines()
    assert lines[0] == "| set | IR@1 | IR@5 | IR@10 | TR@1 | TR@5 | TR@10 | r_mean | r_mean at start | s / iteration |"
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["base", "lors", "repblend"]
    sets = {name: load_distilled_set(out / "methods" / name / "distill" / "distilled_last.pt")
            for name in ("base", "lors", "repblend")}
    assert "similarity" not in sets["base"] and sets["lors"]["similarity"].shape == (6, 6)
    assert sets["repblend"]["config"]["image_projection"] is True and sets["repblend"]["config"]["blend_alpha"] == 1.0
    meta = json.loads(next((out / "methods" / "repblend").glob("buffers/**/buffer_meta.json")).read_text())
    assert meta["trainable_parts"] == ["image_projection", "text_projection"]
    report = json.loads((out / "methods" / "repblend" / "results" / "repblend.json").read_text())
    assert report["config"]["set_config"]["image_projection"] is True
    table = json.loads((out / "methods.json").read_text())
    assert all(r["seconds_per_iteration"] > 0 for r in table.values())
    # each method's initial set is judged with the same protocol: base and LoRS start from the same pairs
    starts = {name: json.loads((out / "methods" / name / "results" / f"{name}-start.json").read_text())
              for name in ("base", "lors")}
    assert starts["base"]["config"]["distilled"].endswith("distill/distilled_000000.pt")
    assert table["base"]["start_metrics"] == starts["base"]["metrics"]
    assert table["base"]["start_metrics"]["r_mean"]["runs"] == table["lors"]["start_metrics"]["r_mean"]["runs"]
    assert table["base"]["start_metrics"] != table["base"]["metrics"]

    # --time_iterations: fresh back-to-back runs give the speed column, the table's sets stay as they were
    before = (out / "methods" / "lors" / "distill" / "distilled_last.pt").stat().st_mtime
    assert bench_methods.main([str(methods_config), "--methods", "base", "lors", "--time_iterations", "2"]) == 0
    speeds = json.loads((out / "methods.json").read_text())
    for name in ("base", "lors"):
        timed = load_distilled_set(out / "methods" / name / "timing" / "distilled_last.pt")
        timing = json.loads((out / "methods" / name / "timing" / "timing.json").read_text())
        assert timed["iteration"] == 2 and timing["iterations"] == 2 and "timing" not in timed["state"]
        assert speeds[name]["seconds_per_iteration"] == timing["seconds"] / 2
    assert (out / "methods" / "lors" / "distill" / "distilled_last.pt").stat().st_mtime == before


def test_regimes_benchmark_gives_each_regime_its_budget_and_tables_them(tiny_shapes, cache_dir, convnet_weights,
                                                                        tmp_path):
    from comparison import regimes as bench_regimes

    config = tmp_path / "regimes.toml"
    text = TOY.format(out=tmp_path / "run", root=tiny_shapes, cache=cache_dir)
    text = text.replace('image_pretrained = false\n', f'image_weights = "{convnet_weights}"\nimage_projection = true\n')
    config.write_text(text + '[regimes.all]\nbuffer = {num_experts = 1}\nevaluate = {num_eval = 1}\n')
    assert bench_regimes.main([str(config), "--budget", "5", "--max_iterations", "2", "--regimes", "last_stage",
                               "all"]) == 0
    results = json.loads((tmp_path / "run" / "regimes.json").read_text())
    assert list(results) == ["last_stage", "all"]
    for name, stages in (("last_stage", 1), ("all", "all")):
        folder = tmp_path / "run" / "regimes" / name
        last = load_distilled_set(folder / "distill" / "distilled_last.pt")
        assert last["config"]["train_stages"] == stages and last["iteration"] == 2 == results[name]["iterations"]
        assert results[name]["total_minutes"] < 5 and results[name]["metrics"]["r_mean"]["runs"]
        cached = list((folder / "cache" / "trunk_features").glob("*.pt")) if (folder / "cache").is_dir() else []
        assert (len(cached) > 0) == (name != "all")  # each frozen regime paid for its own trunk outputs
    # a regime's own [evaluate] settings apply to it alone
    assert [len(results[n]["metrics"]["r_mean"]["runs"]) for n in ("last_stage", "all")] == [2, 1]
    meta = json.loads(next((tmp_path / "run" / "regimes" / "all").glob("buffers/**/buffer_meta.json")).read_text())
    assert meta["trainable_parts"] == ["image_encoder", "image_projection", "text_projection"]
    lines = (tmp_path / "run" / "regimes.md").read_text().splitlines()
    assert lines[0].startswith("| regime | experts (min) | iterations | s / iteration |") and len(lines) == 4
    # the speed column is distill.py's own timing.json beside each regime's sets: measured, never a 0 placeholder
    for name, line in zip(("last_stage", "all"), lines[2:]):
        timing = json.loads((tmp_path / "run" / "regimes" / name / "distill" / "timing.json").read_text())
        assert results[name]["seconds_per_iteration"] == timing["seconds"] / timing["iterations"] > 0
        assert line.split("|")[4].strip() == f"{results[name]['seconds_per_iteration']:.2f}" != "0.00"


def test_the_programs_run_in_processes_of_their_own(tmp_path):
    # The other tests of this module run the programs in-process; here the real launcher.
    with open(tmp_path / "log.txt", "w") as log:
        assert real_launch("evaluate", ["--help"], log) == 0
        assert real_launch("evaluate", ["--coreset", "random"], log) == 2
    text = (tmp_path / "log.txt").read_text()
    assert "usage: evaluate.py" in text and "error: --coreset needs --coreset_size" in text


class StopAfterExperts(Exception):
    pass


def test_a_relative_out_dir_is_taken_from_the_callers_directory(tiny_shapes, cache_dir, tmp_path, monkeypatch):
    """Resolved once, from where pipeline.py was started: programs launched from another directory still write
    where the pipeline looks for their outputs."""
    caller, elsewhere = tmp_path / "caller", tmp_path / "elsewhere"
    caller.mkdir(), elsewhere.mkdir()
    config = caller / "toy.toml"
    config.write_text(TOY.format(out="rel/run", root=tiny_shapes, cache=cache_dir))

    def launch_elsewhere(program, flags, log=None):
        with monkeypatch.context() as inside:
            inside.chdir(elsewhere)
            return launch_in_process(program, flags, log)

    real_experts_stage = pipeline.experts_stage

    def experts_then_stop(config, out):
        found = real_experts_stage(config, out)
        raise StopAfterExperts(found)

    monkeypatch.setattr(programs, "launch", launch_elsewhere)
    monkeypatch.setattr(pipeline, "experts_stage", experts_then_stop)
    monkeypatch.chdir(caller)
    with pytest.raises(StopAfterExperts) as stopped:
        pipeline.main([str(config)])
    found = stopped.value.args[0]
    assert found.is_absolute() and found.is_relative_to(caller / "rel" / "run" / "buffers")
    assert (found / "img_replay_buffer_1.pt").is_file() and not (elsewhere / "rel").exists()


def test_an_out_dir_that_cannot_be_a_folder_is_refused_before_any_work(tiny_shapes, cache_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(programs, "launch", lambda *a, **k: pytest.fail("a program ran"))
    (tmp_path / "taken").write_text("a file")
    config = tmp_path / "toy.toml"
    config.write_text(TOY.format(out=tmp_path / "taken" / "run", root=tiny_shapes, cache=cache_dir))
    with pytest.raises(UserError, match=r"out_dir .*taken/run: .*taken is a file, not a folder"):
        pipeline.main([str(config)])
    with pytest.raises(UserError, match=r"--out_dir .*taken: .*taken is a file, not a folder"):
        pipeline.main([str(config), "--out_dir", str(tmp_path / "taken"), "--fresh"])
    assert (tmp_path / "taken").read_text() == "a file"


@pytest.mark.parametrize("buffer_line, compare_line, trained", [
    ("", "", "3"),                                           # the pipeline's own default, not buffer.py's 100
    ("", "default_experts = 5", "5"),                        # a config may change it in [compare]
    ("num_experts = 2", "default_experts = 5", "2"),         # [buffer] num_experts, when given, is what trains
])
def test_the_experts_the_pipeline_trains_without_num_experts_are_compare_default_experts(
        buffer_line, compare_line, trained, tiny_shapes, cache_dir, tmp_path, monkeypatch):
    text = TOY.format(out=tmp_path / "run", root=tiny_shapes, cache=cache_dir)
    text = text.replace("num_experts = 2\n", buffer_line + "\n").replace("[compare]\n", f"[compare]\n{compare_line}\n")
    (tmp_path / "toy.toml").write_text(text)
    config = load_config(str(tmp_path / "toy.toml"), None)
    out = stages.output_folder(None, config)
    asked = []

    def buffer_then_stop(program, flags):
        asked.append(flags[flags.index("--num_experts") + 1])
        raise StopAfterExperts

    monkeypatch.setattr(stages, "run", buffer_then_stop)
    with pytest.raises(StopAfterExperts):
        stages.experts_stage(config, out)
    assert asked == [trained]


def r_mean(mean: float, std: float) -> dict:
    return {"metrics": {"r_mean": {"mean": mean, "std": std}}}


def test_the_summary_reads_margins_in_stds_or_in_points_when_there_is_no_spread():
    rows = [Row("distilled-6 (seed 0)", Kind.DISTILLED, r_mean(12.3, 0.0), "base", 6, seed=0),
            Row("random-6", Kind.LADDER, r_mean(10.0, 0.0), "random", 6),
            Row("random-12", Kind.LADDER, r_mean(11.3, 0.5), "random", 12),
            Row("full data", Kind.FULL, r_mean(14.3, 1.0))]
    lines = report.verdict(rows, {row.label: None for row in rows}).splitlines()
    assert lines == ["distilled-6 (seed 0) r_mean 12.30 vs random-6 10.00: +2.30 points (no spread: both std 0)",
                     "distilled-6 (seed 0) r_mean 12.30 vs random-12 11.30: +2.0 std",
                     "distilled-6 (seed 0) r_mean 12.30 vs full data 14.30: -2.0 std"]


def test_rows_are_read_by_kind_not_by_label():
    """A distillation method may be called anything, "random" included: its rows are still distilled sets, compared
    with the base method's and given a worth-N, and a random coreset asked for among coreset_methods gets none."""
    rows = [Row("distilled-6 (seed 0)", Kind.DISTILLED, r_mean(12.3, 1.0), "base", 6, seed=0),
            Row("random-6 (2 seeds)", Kind.DISTILLED, r_mean(11.0, 1.0), "random", 6, seeds=2),
            Row("random-6", Kind.CORESET, r_mean(9.0, 1.0), "random", 6),
            Row("kmeans-6", Kind.CORESET, r_mean(9.5, 1.0), "kmeans", 6),
            Row("full data", Kind.FULL, r_mean(14.3, 1.0))]
    assert [row.gets_worth for row in rows] == [True, True, False, True, False]
    worth = {row.label: {"text": "~6"} if row.gets_worth else None for row in rows}
    lines = report.verdict(rows, worth).splitlines()
    assert [line.split(" vs ")[1].split(" ")[0] for line in lines[:4]] == ["random-6", "random-6", "kmeans-6", "full"]
    assert lines[4:] == ["random-6 (2 seeds) is worth ~6 random real pairs", "kmeans-6 is worth ~6 random real pairs"]
    assert row_from_label("random-6 (2 seeds)", {}).kind is Kind.DISTILLED
    assert row_from_label("full data (2 experts, 3 ep)", {}).kind is Kind.FULL
    assert row_from_label("not a row", {}) is None


def test_a_distillation_its_time_budget_ended_is_reused_not_given_another_budget(tiny_shapes, cache_dir, experts,
                                                                                  tmp_path, monkeypatch):
    config_path = tmp_path / "budget.toml"
    text = TOY.format(out=tmp_path / "run", root=tiny_shapes, cache=cache_dir)
    config_path.write_text(text.replace("Iteration = 2\n", "Iteration = 50\ntime_budget = 1e-9\n"))
    config = load_config(str(config_path), None)
    (tmp_path / "run").mkdir()
    out = stages.claim_output_folder(tmp_path / "run")
    final, made = stages.distill_stage(config, out, experts, seed=0)
    assert made and load_distilled_set(final)["iteration"] == 1  # stopped on its budget after one iteration
    launched = []
    monkeypatch.setattr(programs, "launch", lambda program, flags, log=None: launched.append(program) or 0)
    again, made = stages.distill_stage(config, out, experts, seed=0)
    assert (again, made, launched) == (final, False, [])
    # a run interrupted before its budget ended (no budget_stop in timing.json) is carried on, not reused
    timing = final.parent / "timing.json"
    timing.write_text(json.dumps({k: v for k, v in json.loads(timing.read_text()).items() if k != "budget_stop"}))
    stages.distill_stage(config, out, experts, seed=0)
    assert launched == ["distill.py"]
