"""The paper's method against LoRS and RepBlend (+LoRS), same data, same iteration budget, one table.

    python bench/bench_methods.py configs/demo.toml                       # after (or instead of) make demo
    python bench/bench_methods.py configs/flickr8k.toml --data ../shared/data/flickr8k

Reads the pipeline's TOML file (bench/pipeline.py): `[common]`, `[buffer]`, `[distill]` and `[evaluate]`
are every method's settings; an optional `[methods.<name>]` table per method adds `common = {...}` and
`distill = {...}` on top (defaults below). Each method gets its experts (the base experts are the
pipeline's, in the same out_dir; RepBlend trains its own, with a frozen image encoder and an image
head), distills with the same --Iteration, and its final set is judged by evaluate.py with the
`[evaluate]` protocol. The table has IR/TR@1/5/10 and r_mean (mean ± std over the evaluation models)
and the seconds per matching iteration (evaluations excluded). Everything is reused on a re-run
while its settings are unchanged (the pipeline's stage stamps).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_coresets import run_configuration  # noqa: E402
from bench.pipeline import as_flags, banner, distill_stage, experts_stage, load_config  # noqa: E402
from data.distilled_set import load_distilled_set  # noqa: E402
from utils.cli import UserError, run_cli  # noqa: E402
from utils.metrics import markdown_table, table_cells  # noqa: E402

LORS = {"sim_type": "lowrank", "sim_rank": 10, "sim_alpha": 1.0, "lr_sim": 10.0, "loss_type": "infonce"}
DEFAULT_METHODS = {
    "base": {},
    "lors": {"distill": dict(LORS)},
    "repblend": {"common": {"image_projection": True}, "distill": {**LORS, "blend_alpha": 1.0}},
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="the pipeline's TOML file")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), help="methods to run, in order")
    parser.add_argument("--out_dir", default=None, help="output folder (default: out_dir in the config)")
    parser.add_argument("--data", default=None, help="image root of the data set (sets common.image_root)")
    return parser.parse_args(argv)


def method_config(config: dict, name: str) -> dict:
    """The pipeline config with the method's `common` and `distill` settings on top."""
    extra = config.get("methods", {}).get(name, DEFAULT_METHODS.get(name))
    if extra is None:
        raise UserError(f"unknown method {name!r}: give it a [methods.{name}] table in the config "
                        f"(known: {', '.join(DEFAULT_METHODS)})")
    merged = copy.deepcopy(config)
    for section in ("common", "distill"):
        merged[section].update(extra.get(section, {}))
    return merged


def run_method(config: dict, name: str, out: Path) -> dict:
    settings = method_config(config, name)
    own_experts = settings["common"] != config["common"]  # other trainable parts or encoder: other experts
    banner(f"method {name}")
    expert_dir = experts_stage(settings, out / "methods" / name if own_experts else out)
    folder = out / "methods" / name
    final, _ = distill_stage(settings, folder, expert_dir)
    payload = load_distilled_set(final)
    timing = payload["state"].get("timing", {})
    evaluate_flags = as_flags(settings["common"]) + as_flags(settings["evaluate"]) + ["--buffer_path", str(expert_dir)]
    (folder / "results").mkdir(parents=True, exist_ok=True)
    result = folder / "results" / f"{name}.json"
    if result.exists() and result.stat().st_mtime < final.stat().st_mtime:
        result.unlink()  # a set distilled since: judge it again
    report = run_configuration(name, ["--distilled", str(final)], evaluate_flags, folder / "results")
    report["seconds_per_iteration"] = timing.get("seconds", float("nan")) / max(timing.get("iterations", 0), 1)
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    config = load_config(args.config, args.data)
    out = Path(args.out_dir or config.get("out_dir", "outputs/pipeline"))
    reports = {name: run_method(config, name, out) for name in args.methods}
    header, cells = table_cells({name: r["metrics"] for name, r in reports.items()})
    rows = [row + [f"{r['seconds_per_iteration']:.2f}"] for row, r in zip(cells, reports.values())]
    table = markdown_table(header + ["s / iteration"], rows)
    (out / "methods.md").write_text(table + "\n")
    (out / "methods.json").write_text(json.dumps(
        {name: {"metrics": r["metrics"], "seconds_per_iteration": r["seconds_per_iteration"]}
         for name, r in reports.items()}, indent=1))
    banner(f"methods at {config['distill'].get('num_queries', 100)} pairs, {config['distill'].get('Iteration')} "
           f"iterations each")
    print(table)
    print(f"wrote {out / 'methods.md'}, {out / 'methods.json'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
