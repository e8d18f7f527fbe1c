"""pipeline.py over several set sizes and methods ([compare] budgets / methods): the paper's table at toy size."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from comparison import pipeline, programs, stages
from data.distilled_set import load_distilled_set
from evaluation.budgets import paper_table, r_mean_table
from tests.test_pipeline import TOY, launch_in_process
from utils.cli import UserError


@pytest.fixture(autouse=True)
def programs_in_process(monkeypatch):
    monkeypatch.setattr(programs, "launch", launch_in_process)


def budget_config(text: str) -> str:
    """The toy pipeline config distilling 4 and 6 pairs (one seed), LoRS at 6 pairs only."""
    for old, new in (("seeds = [0, 1]", "seeds = [0]"), ("num_pairs = 6\n", ""),
                     ("ladder = [6, 12, 24]", "ladder = [4, 6, 12]"), ("lr_grid = [0.03, 0.1]\n", ""),
                     ("epoch_scales = [1, 2]\nwiden_grid = 1\n", "")):
        assert old in text
        text = text.replace(old, new)
    text = text.replace('coreset_methods = ["kmeans"]', 'coreset_methods = ["kmeans"]\nbudgets = [4, 6]\n'
                                                        'methods = ["base", "lors"]')
    return text + ('[methods.lors]\ndistill = {sim_type = "lowrank", sim_rank = 2, lr_sim = 1.0}\nbudgets = [6]\n'
                   '[budgets.6]\ndistill = {mini_batch_size = 4}\n')


@pytest.fixture(scope="module")
def budget_run(tiny_shapes, cache_dir, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(programs, "launch", launch_in_process)
        out = tmp_path_factory.mktemp("budgets")
        config = out / "table.toml"
        config.write_text(budget_config(TOY.format(out=out / "run", root=tiny_shapes, cache=cache_dir)))
        assert pipeline.main([str(config)]) == 0
    return config, out / "run"


def test_every_method_distils_at_its_sizes_with_that_sizes_settings(budget_run):
    _, out = budget_run
    found = sorted(str(p.parent.relative_to(out / "distill")) for p in out.glob("distill/**/distilled_last.pt"))
    assert found == ["base-4/seed0", "base-6/seed0", "lors-6/seed0"]
    sets = {name: load_distilled_set(out / "distill" / name / "distilled_last.pt") for name in found}
    assert [len(sets[name]["text_syn"]) for name in found] == [4, 6, 6]
    assert [sets[name]["config"]["mini_batch_size"] for name in found] == [3, 4, 4]  # [budgets.6] at 6 pairs only
    assert "similarity" not in sets["base-6/seed0"] and sets["lors-6/seed0"]["similarity"].shape == (6, 6)
    rows = json.loads((out / "results.json").read_text())["rows"]
    for label in ("distilled-4 (seed 0)", "distilled-6 (seed 0)", "lors-6 (seed 0)", "kmeans-4", "kmeans-6",
                  "random-4", "random-12", "full data"):
        assert label in rows
    report = json.loads((out / "results" / "lors-6 (seed 0).json").read_text())
    assert report["config"]["distilled"].endswith("lors-6/seed0/distilled_best.pt")


def test_the_table_has_sets_as_rows_and_sizes_as_column_groups(budget_run):
    _, out = budget_run
    rows = json.loads((out / "results.json").read_text())["rows"]
    text = (out / "table.md").read_text()
    assert text.startswith("Reported on the test split (choices on val)")
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header[:2] == ["set", "4: IR@1"] and header[8] == "6: IR@1" and len(header) == 1 + 2 * 7
    table = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")[1:]] for line in lines[2:6]}
    assert list(table) == ["distilled", "lors", "random", "kmeans"]
    summary = rows["distilled-6 (seed 0)"]["r_mean"]
    assert table["distilled"][13] == f"{summary['mean']:.2f} ± {summary['std']:.2f}"
    assert table["lors"][:7] == ["–"] * 7 and table["lors"][13] != "–"  # LoRS ran at 6 pairs only
    assert table["random"][6] == f"{rows['random-4']['r_mean']['mean']:.2f} ± {rows['random-4']['r_mean']['std']:.2f}"
    # what each distillation cost: its own timing.json, and its row's evaluation time
    cost = text.split("What each set cost on this machine:")[1]
    costs = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")[1:]]
             for line in cost.splitlines()[4:] if line.startswith("|")}
    assert list(costs) == ["distilled-4 (seed 0)", "distilled-6 (seed 0)", "lors-6 (seed 0)"]
    timing = json.loads((out / "distill" / "lors-6" / "seed0" / "timing.json").read_text())
    judged = json.loads((out / "results" / "lors-6 (seed 0).json").read_text())["wall_seconds"]
    assert costs["lors-6 (seed 0)"] == ["2", f"{timing['seconds'] / 2:.2f}", f"{timing['seconds'] / 60:.1f}",
                                        f"{judged / 60:.1f}"]
    with Image.open(out / "budgets.png") as image:
        assert image.size == (750, 500)


def test_a_rerun_reuses_every_run_also_with_the_configs_keys_in_another_order(budget_run, capsys):
    config, out = budget_run
    before = (out / "distill" / "lors-6" / "seed0" / "distilled_last.pt").stat().st_mtime_ns
    text = config.read_text()
    for key in ("lr_img = 10\n", "text_encoder = \"minilm\"\n", "batch_train = 4\n"):  # [distill], [common], [evaluate]
        start = text.index(key)
        end = text.index("\n[", start) + 1  # the next section
        text = text[:start] + text[start + len(key):end] + key + text[end:]
    assert text != config.read_text()
    config.write_text(text)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(programs, "launch", launch_in_process)
        assert pipeline.main([str(config)]) == 0
    text = capsys.readouterr().out
    assert text.count("distillation: reusing") == 3 and "distill.py" not in text and "buffer.py" not in text
    assert (out / "distill" / "lors-6" / "seed0" / "distilled_last.pt").stat().st_mtime_ns == before


def test_stage_flags_compare_as_the_programs_read_them():
    assert stages.flag_values(["--a", "1", "--b", "x", "y"]) == stages.flag_values(["--b", "x", "y", "--a", "1"])
    assert stages.flag_values(["--a", "1", "--a", "2"]) == {"--a": ("2",)}  # the last one wins
    assert stages.flag_values(["--a", "1", "--a", "2"]) != stages.flag_values(["--a", "2", "--a", "1"])
    assert stages.flag_values(["--b", "x", "y"]) != stages.flag_values(["--b", "y", "x"])


@pytest.mark.parametrize("change, message", [
    (("budgets = [4, 6]", "budgets = [4, 6]\nnum_pairs_typo = 1"), "unknown key 'num_pairs_typo'"),
    (("[budgets.6]", "[budgets.7]"), r"\[budgets\]: '7' is not one of the set sizes \[4, 6\]"),
    (("budgets = [6]\n", "budgets = [5]\n"), r"\[methods.lors\]: budgets must be a non-empty list of the set sizes"),
    (('methods = ["base", "lors"]', 'methods = ["base", "lorz"]'), "unknown method 'lorz'"),
    (('methods = ["base", "lors"]', 'methods = ["base", "base"]'), "methods must be a non-empty list"),
    (("budgets = [4, 6]", "budgets = [4, 4]"), "budgets must list each set size once"),
    (("budgets = [4, 6]", "budgets = [1, 6]"), "budgets"),
    (("[distill]\n", "[distill]\nnum_pairs = 4\n"), "not both"),
    (("distill = {mini_batch_size = 4}", "distill = {mini_batch_size = 9}"), "larger than --num_pairs 6"),
    (("budgets = [6]\n", "budgets = [6]\nepochs = 3\n"), r"\[methods.lors\]: unknown key 'epochs'"),
])
def test_a_bad_budget_or_method_setting_is_refused_before_any_work(tiny_shapes, cache_dir, tmp_path, monkeypatch,
                                                                   change, message):
    monkeypatch.setattr(programs, "launch", lambda *a, **k: pytest.fail("a program ran"))
    text = budget_config(TOY.format(out=tmp_path / "run", root=tiny_shapes, cache=cache_dir))
    assert change[0] in text
    config = tmp_path / "bad.toml"
    config.write_text(text.replace(change[0], change[1], 1))
    with pytest.raises(UserError, match=message):
        pipeline.main([str(config)])
    assert not (tmp_path / "run").exists()


def summary(mean: float, std: float = 0.5) -> dict:
    return {key: {"mean": mean + k, "std": std} for k, key in
            enumerate(["img_r1", "img_r5", "img_r10", "txt_r1", "txt_r5", "txt_r10", "r_mean"])}


def test_the_tables_print_every_cell_and_mark_missing_ones():
    rows = {"distilled": {100: summary(10.0), 200: summary(20.0)}, "lors": {200: summary(30.0)}}
    lines = paper_table(rows, [100, 200]).splitlines()
    assert lines[0] == ("| set | 100: IR@1 | IR@5 | IR@10 | TR@1 | TR@5 | TR@10 | r_mean | 200: IR@1 | IR@5 | IR@10 | "
                        "TR@1 | TR@5 | TR@10 | r_mean |")
    assert lines[2].split(" | ")[1:3] == ["10.00 ± 0.50", "11.00 ± 0.50"] and "26.00 ± 0.50" in lines[2]
    assert lines[3].split(" | ")[1:8] == ["–"] * 7 and lines[3].endswith("36.00 ± 0.50 |")
    compact = r_mean_table(rows, [100, 200], {"distilled": {200: "1,000"}}).splitlines()
    assert compact[0] == "| set | 100 pairs | 200 pairs |"
    assert compact[2] == "| distilled | 16.00 ± 0.50 | 26.00 ± 0.50 (worth 1,000) |"
    assert compact[3] == "| lors | – | 36.00 ± 0.50 |"


def test_a_sweep_runs_each_variant_on_the_pipelines_experts_and_tables_its_val_curve(budget_run, capsys):
    from comparison import sweep

    config, out = budget_run
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(programs, "launch", launch_in_process)
        assert sweep.main([str(config), "--variants", "base", "--size", "6", "--iterations", "2"]) == 0
        assert sweep.main([str(config), "--variants", "lors", "--size", "6", "--iterations", "2"]) == 0
    printed = capsys.readouterr().out
    assert "experts: 2 of 2 trained, reusing them" in printed
    result = json.loads((out / "sweep" / "sweep-6.json").read_text())
    assert list(result["variants"]) == ["base", "lors"] and result["split"] == "val"  # the earlier variant is kept
    for name in ("base", "lors"):
        folder = out / "sweep" / f"{name}-6-it2" / "seed0"
        variant = result["variants"][name]
        assert set(variant["curve"]) == {"0", "2"} and variant["settings"]["mini_batch_size"] == 4  # [budgets.6]
        assert variant["curve"]["2"] == load_distilled_set(folder / "distilled_000002.pt")["metrics"]["r_mean"]["mean"]
        assert variant["best_r_mean"] == max(variant["curve"].values())
    assert "similarity" in load_distilled_set(out / "sweep" / "lors-6-it2" / "seed0" / "distilled_last.pt")
    lines = (out / "sweep" / "sweep-6.md").read_text().splitlines()
    assert lines[2] == "| variant | it 0 | it 2 | best | protocol at best | s / iteration |"
    judged = json.loads((out / "sweep" / "lors-6-it2" / "seed0" / "protocol" / "best.json").read_text())
    assert judged["config"]["distilled"].endswith("lors-6-it2/seed0/distilled_best.pt")
    assert result["variants"]["lors"]["protocol_r_mean"] == judged["selection_metrics"]["r_mean"]["mean"]
    assert (f"| {judged['selection_metrics']['r_mean']['mean']:.2f} (lr {judged['lr']:g}, {judged['epochs']} epochs) |"
            in lines[5])
    assert [line.split("|")[1].strip() for line in lines[4:]] == ["base", "lors"]
    # the judgement is reused while the protocol is unchanged and made again when it changes
    best = out / "sweep" / "lors-6-it2" / "seed0" / "protocol" / "best.json"
    stamp = best.stat().st_mtime_ns
    changed = config.with_name("changed.toml")
    changed.write_text(config.read_text().replace("batch_train = 4\n", "batch_train = 4\ntune_models = 2\n", 1))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(programs, "launch", launch_in_process)
        assert sweep.main([str(config), "--variants", "lors", "--size", "6", "--iterations", "2"]) == 0
        assert best.stat().st_mtime_ns == stamp
        assert sweep.main([str(changed), "--variants", "lors", "--size", "6", "--iterations", "2"]) == 0
        assert best.stat().st_mtime_ns != stamp and json.loads(best.read_text())["config"]["tune_models"] == 2
        assert sweep.main([str(config), "--variants", "lors", "--size", "6", "--iterations", "2"]) == 0  # back again


def test_a_variant_that_stops_is_judged_by_the_best_set_it_saved_and_marked(budget_run, monkeypatch):
    from comparison import sweep

    config, out = budget_run
    real = sweep.distill_stage

    def diverging(settings, folder, expert_dir, seed, name, retry_stopped):
        final, _ = real(settings, folder, expert_dir, seed, name)  # a complete run, then as if it had stopped
        raise UserError("distill.py failed (exit 2); the output above says why")

    monkeypatch.setattr(programs, "launch", launch_in_process)
    monkeypatch.setattr(sweep, "distill_stage", diverging)
    assert sweep.main([str(config), "--variants", "base", "--size", "4", "--iterations", "2"]) == 0
    variant = json.loads((out / "sweep" / "sweep-4.json").read_text())["variants"]["base"]
    assert variant["stopped"].startswith("distill.py failed") and variant["last_iteration"] == 2
    assert variant["protocol_r_mean"] is not None
    assert "| base (stopped at 2) |" in (out / "sweep" / "sweep-4.md").read_text()


def test_a_run_that_stopped_is_not_run_again_by_the_sweep_while_its_settings_are_unchanged(budget_run, monkeypatch):
    config_path, out = budget_run
    config = pipeline.load_config(str(config_path), None)
    monkeypatch.setattr(programs, "launch", launch_in_process)
    expert_dir = stages.experts_stage(config, out)
    calls = []

    def diverging(program, flags):
        calls.append(program)
        Path(flags[flags.index("--save_dir") + 1]).mkdir(parents=True, exist_ok=True)  # as distill.py does first
        raise UserError("distill.py failed (exit 2): diverged at iteration 3")

    monkeypatch.setattr(stages, "run", diverging)
    folder = out / "sweep" / "stops" / "seed0"
    # the second call raises the stored error and says how to retry, without running; the third retries
    for retry, runs, stored in ((False, 1, False), (False, 1, True), (True, 2, False)):
        with pytest.raises(UserError, match="diverged at iteration 3") as raised:
            stages.distill_stage(config, out / "sweep", expert_dir, 0, "stops/seed0", retry_stopped=retry)
        assert len(calls) == runs and json.loads((folder / "stopped.json").read_text())["error"].endswith("3")
        assert str(raised.value).endswith(f"delete {folder / 'stopped.json'} to try again)") == stored
    config["distill"]["lr_img"] = 7.0  # other settings: a new run
    with pytest.raises(UserError):
        stages.distill_stage(config, out / "sweep", expert_dir, 0, "stops/seed0", retry_stopped=False)
    assert len(calls) == 3
