"""The pipeline's reduction comparison ([reduce]): every method at every kept fraction reduced by reduce.py and judged
by evaluate.py --subset with the epochs rule, the table and plot, reuse on a second run, and one clear error per bad
[reduce] table."""
from __future__ import annotations

import json

import pytest

from comparison import pipeline, programs
from comparison.config import load_config
from comparison.reduced import reduce_section
from tests.test_pipeline import TOY, launch_in_process
from utils.cli import UserError

REDUCE = """
[reduce]
methods = ["random", "semdedup+balanced"]
keep = [0.5]
reduce = {clusters = 4}
"""


def reduce_text(tiny_shapes, cache_dir, weights, out) -> str:
    """The toy table with a frozen ConvNet trunk (reduce.py reads its cached outputs), no distillation, no grid."""
    text = TOY.format(out=out, root=tiny_shapes, cache=cache_dir)
    for old, new in (('image_pretrained = false\n', f'image_pretrained = false\nimage_weights = "{weights}"\n'
                                                    'train_stages = 1\nfeature_views = 1\n'),
                     ("ladder = [6, 12, 24]", "ladder = [6, 24]\nmethods = []"), ('coreset_methods = ["kmeans"]\n', ""),
                     ("lr_grid = [0.03, 0.1]\n", ""), ("[evaluate]\nnum_eval = 2", "[evaluate]\nnum_eval = 1"), ("epoch_scales = [1, 2]\nwiden_grid = 1\n", "")):
        assert old in text
        text = text.replace(old, new)
    return text + REDUCE


@pytest.fixture(scope="module")
def reduce_run(tiny_shapes, cache_dir, convnet_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("reduce_pipeline")
    config = out / "toy.toml"
    config.write_text(reduce_text(tiny_shapes, cache_dir, convnet_weights, out / "run"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(programs, "launch", launch_in_process)
        assert pipeline.main([str(config)]) == 0
    return config, out / "run"


def test_every_method_and_fraction_is_reduced_and_judged_with_as_many_steps_as_full_data(reduce_run):
    _, out = reduce_run
    record = json.loads((out / "results.json").read_text())
    rows = record["reduce"]["rows"]
    assert sorted(rows) == ["random 50%", "semdedup+balanced 50%"]
    for label, row in rows.items():
        name = label.replace("+", "_").replace(" ", "-").replace("%", "pct")
        kept = json.loads((out / "reduce" / f"{name}.json").read_text())
        assert row["pairs"] == len(kept) == round(row["keep"] * 200)  # one caption per training entry
        report = json.loads((out / "results" / f"reduce_{name}.json").read_text())
        command = report["config"]["command"]
        assert command[command.index("--subset") + 1] == str(out / "reduce" / f"{name}.json")
        # full data trains 1 epoch (epochs_per_size all = 1): a fraction k trains round(1 / k) (the last flag given)
        last = len(command) - 1 - command[::-1].index("--epoch_eval_train")
        assert command[last + 1] == str(round(1 / row["keep"])) and report["epochs"] == round(1 / row["keep"])
        assert report["config"]["set_size"] == row["pairs"]
        assert record["kinds"][label]["kind"] == "reduced"
    table = (out / "reduce.md").read_text()
    assert "| random |" in table and "| semdedup+balanced |" in table and "keep 50%" in table
    assert (out / "reduce.png").read_bytes()[:4] == b"\x89PNG"
    assert "random 50%" in (out / "results.md").read_text()


def relaunch(config, text: str | None = None) -> list[str]:
    """Run the pipeline again (with `text` as its config when given); the programs it launched, in order."""
    if text is not None:
        config.write_text(text)
    launched = []

    def counting(program, flags, log=None):
        launched.append(program.removesuffix(".py"))
        return launch_in_process(program, flags, log)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(programs, "launch", counting)
        assert pipeline.main([str(config)]) == 0
    return launched


def test_a_second_run_reuses_every_reduction_and_row(reduce_run):
    config, _ = reduce_run
    assert relaunch(config) == []


# The three tests below change the module's folder in turn, in this order.
def test_a_method_added_later_runs_alone_beside_the_finished_rows(reduce_run):
    config, out = reduce_run
    before = {p.name: p.read_bytes() for p in (out / "results").glob("reduce_*.json")}
    text = config.read_text()
    assert relaunch(config, text.replace('methods = ["random", "semdedup+balanced"]',
                                         'methods = ["random", "semdedup+balanced", "alignment"]')) \
        == ["reduce", "evaluate"]
    assert {p.name: p.read_bytes() for p in (out / "results").glob("reduce_*.json") if p.name in before} == before
    rows = json.loads((out / "results.json").read_text())["reduce"]["rows"]
    assert sorted(rows) == ["alignment 50%", "random 50%", "semdedup+balanced 50%"]
    assert "| alignment |" in (out / "reduce.md").read_text()


def test_a_judged_row_is_reused_without_its_kept_pairs_file(reduce_run):
    config, out = reduce_run
    table = (out / "reduce.md").read_text()
    kept = [p for p in (out / "reduce").glob("*.json") if not p.name.endswith(".report.json")]
    assert len(kept) == 3
    for path in kept:
        path.unlink()
    assert relaunch(config) == []
    assert (out / "reduce.md").read_text() == table


def test_other_reduce_flags_redo_every_row_and_its_report(reduce_run):
    config, out = reduce_run
    text = config.read_text()
    # each row is reduced and judged again: a report of the old clustering is not reused
    assert relaunch(config, text.replace("reduce = {clusters = 4}", "reduce = {clusters = 3}")) \
        == ["reduce", "evaluate"] * 3
    assert all(json.loads((out / "reduce" / f"{name}.json.report.json").read_text())["options"]["clusters"] == 3
               for name in ("random-50pct", "semdedup_balanced-50pct", "alignment-50pct"))


@pytest.mark.parametrize("table, message", [
    ("[reduce]\nmethods = [\"random\"]\nkeep = [0.5]\nkeeps = [1]", "unknown key 'keeps'"),
    ("[reduce]\nmethods = [\"random\"]\nkeep = [0]", "keep must list fractions in (0, 1]"),
    ("[reduce]\nmethods = [\"random\"]\nkeep = [1.5]", "keep must list fractions in (0, 1]"),
    ("[reduce]\nmethods = [\"random\"]\nkeep = []", "keep must list fractions in (0, 1]"),
    ("[reduce]\nmethods = [\"random\", \"random\"]\nkeep = [0.5]", "methods must list reduce.py methods, each once"),
    ("[reduce]\nmethods = [\"semdedupe\"]\nkeep = [0.5]", "'semdedupe' is not a method"),
    ("[reduce]\nmethods = [\"random\"]\nkeep = [0.5]\nreduce = {out = \"x.json\"}", "out is set by the pipeline"),
    ("[reduce]\nmethods = [\"random\"]\nkeep = [0.5]\nreduce = {epsilon = 2}", "epsilon"),
])
def test_a_bad_reduce_table_is_one_clear_error(table, message, tiny_shapes, cache_dir, convnet_weights, tmp_path):
    path = tmp_path / "toy.toml"
    path.write_text(reduce_text(tiny_shapes, cache_dir, convnet_weights, tmp_path / "run").replace(REDUCE, "\n" + table + "\n"))
    with pytest.raises(UserError, match=None) as caught:
        reduce_section(load_config(str(path), None), "config")
    assert message in str(caught.value)


def test_a_config_without_methods_needs_a_reduce_table(tiny_shapes, cache_dir, convnet_weights, tmp_path):
    path = tmp_path / "toy.toml"
    path.write_text(reduce_text(tiny_shapes, cache_dir, convnet_weights, tmp_path / "run").replace(REDUCE, ""))
    with pytest.raises(UserError, match="empty only in a config that reduces"):
        load_config(str(path), None)
