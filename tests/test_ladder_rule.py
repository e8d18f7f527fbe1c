"""comparison/ladder_rule.py (python -m bench.ladder_rule): each rule's choice read off the same tuning cells, and worth-N under each."""
from __future__ import annotations

import json

import pytest

from comparison import ladder_rule
from utils.cli import UserError


def report(label: str, size: int, epochs: int, cells: list[tuple[float, int, float]]) -> dict:
    return {"label": label, "config": {"epoch_eval_train": epochs, "lr_grid": [0.1, 0.3], "set_size": size},
            "tuning": [{"lr": lr, "epochs": e, "r_mean": r} for lr, e, r in cells]}


def test_old_rule_is_its_own_epochs_and_first_grid_new_rule_is_every_cell(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    rows = {
        # old: best at 10 epochs among 0.1 / 0.3 = 5.0; new: 2x epochs = 7.0
        "random-100": report("r", 100, 10, [(0.1, 10, 5.0), (0.3, 10, 4.0), (0.1, 20, 7.0), (0.3, 20, 6.0)]),
        # old 10.0 (lr 0.3); a widened rate 0.9 (not in the first grid) is 12.0
        "random-1000": report("r", 1000, 4, [(0.1, 4, 9.0), (0.3, 4, 10.0), (0.9, 4, 12.0)]),
        "kmeans-100": report("k", 100, 10, [(0.1, 10, 7.5), (0.1, 20, 9.0)]),
    }
    for name, r in rows.items():
        (results / f"{name}.json").write_text(json.dumps(r))
    (results / "old-format.json").write_text(json.dumps({"tuning": {"0.1": 3.0}}))  # skipped
    assert ladder_rule.main([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:]}
    assert table["random-100"][:4] == ["0.1 / 10", "5.00", "0.1 / 20", "7.00"]
    assert table["random-1000"][:4] == ["0.3 / 4", "10.00", "0.9 / 4", "12.00"]
    # kmeans-100 old 7.5 on the ladder 100: 5, 1000: 10 -> 10 ** (2 + 2.5 / 5) = 316; new 9.0 on 100: 7, 1000: 12
    # -> 10 ** (2 + 2 / 5) = 251
    assert table["kmeans-100"][4:] == ["316", "251"]


def test_the_kinds_results_json_records_are_read_and_an_older_folder_by_its_names(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    rows = {"random-100": report("r", 100, 10, [(0.1, 10, 5.0)]), "full": report("f", 1000, 10, [(0.1, 10, 10.0)]),
            "lors-100 (seed 0)": report("d", 100, 10, [(0.1, 10, 7.5)])}
    for name, r in rows.items():
        (results / f"{name}.json").write_text(json.dumps(r))

    def table() -> dict:
        assert ladder_rule.main([str(tmp_path)]) == 0
        lines = capsys.readouterr().out.splitlines()
        return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]][4:] for line in lines[2:]}

    by_names = table()  # no results.json yet (a run still going)
    assert by_names == {"full": ["", ""], "lors-100 (seed 0)": ["316", "316"], "random-100": ["", ""]}
    # a results.json as the pipeline wrote it before rows had kinds: read by the reports' names, the same
    summaries = {label: {"r_mean": {"mean": 1.0, "std": 0.0, "runs": [1.0]}}
                 for label in ("random-100", "full data", "lors-100 (seed 0)")}
    (tmp_path / "results.json").write_text(json.dumps(
        {"split": "test", "rows": summaries, "worth_n": {label: None for label in summaries},
         "ladder": {"100": summaries["random-100"]["r_mean"]}, "choices": {}, "stage_seconds": {},
         "distillation_seconds": {}}))
    assert table() == by_names
    kinds = {"random-100": {"kind": "ladder", "method": "random", "size": 100, "file": "random-100"},
             "full data": {"kind": "full", "file": "full"},
             "lors-100 (seed 0)": {"kind": "distilled", "method": "lors", "size": 100, "seed": 0,
                                   "file": "lors-100 (seed 0)"}}
    (tmp_path / "results.json").write_text(json.dumps({"kinds": kinds}))
    assert table() == by_names
    kinds["random-100"]["kind"] = "coreset"  # what results.json says wins over the name
    kinds["random-100"]["method"] = "herding"
    (tmp_path / "results.json").write_text(json.dumps({"kinds": kinds}))
    assert table()["random-100"] == ["", ""]  # the ladder now has one rung: no worth-N for anything
    assert table()["lors-100 (seed 0)"] == ["", ""]


def test_no_reports_is_a_clear_error(tmp_path):
    (tmp_path / "results").mkdir()
    with pytest.raises(UserError, match="no evaluate.py report with tuning cells"):
        ladder_rule.main([str(tmp_path)])
