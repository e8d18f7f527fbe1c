"""How much of the image encoder should train? Frozen / last stage / all, at equal CPU time.

    python -m bench.bench_regimes configs/flickr8k.toml --data ../shared/data/flickr8k --budget 15

Reads the pipeline's TOML file (pipeline.py). Each regime gets the same wall-clock budget in
minutes for everything it needs before the set is judged: its experts (buffer.py, including
computing the frozen trunk's cached outputs, which are deleted first so that every regime pays for
its own) and then distillation, which runs for whatever time is left (distill.py --time_budget).
The best iteration on the selection split is judged with the config's `[evaluate]` protocol, and so
is the initial set (same protocol), so that each regime is read against its own start.

Regimes (`[regimes.<name>]` tables in the config add `common`, `buffer`, `distill` and `evaluate` settings):
- `frozen`: `--train_stages 0` (the encoder is frozen; heads train over cached outputs);
- `last_stage`: `--train_stages 1` (its last stage trains too, over cached outputs of the stage below);
- `all`: `--train_stages all` (the whole encoder trains on pixels: the paper).
All three keep the config's `--image_projection`, so that only the encoder part differs.
Writes `regimes.md` and `regimes.json` to the config's out_dir.
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from pathlib import Path

from comparison.programs import run, run_configuration
from comparison.config import check_sections, distill_settings, load_config
from comparison.stages import as_flags, banner, expert_folder, output_folder, seconds_per_iteration
from data.build import default_cache_dir
from data.distilled_set import load_distilled_set
from evaluation.metrics import markdown_table
from settings.programs import Parser
from utils.cli import UserError

DEFAULT_REGIMES = {
    "frozen": {"common": {"train_stages": 0}},
    "last_stage": {"common": {"train_stages": 1}},
    "all": {"common": {"train_stages": "all"}},
}


def parse_args(argv=None):
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                    prog="python -m bench.bench_regimes")
    parser.add_argument("config", help="the pipeline's TOML file")
    parser.add_argument("--budget", type=float, default=15.0, help="minutes per regime (experts + distillation)")
    parser.add_argument("--regimes", nargs="+", default=list(DEFAULT_REGIMES), help="regimes to run, in order")
    parser.add_argument("--max_iterations", type=int, default=1_000_000,
                        help="stop distillation after this many iterations even within the budget")
    parser.add_argument("--out_dir", default=None, help="output folder (default: out_dir in the config)")
    parser.add_argument("--data", default=None, help="image root of the data set (sets common.image_root)")
    args = parser.parse_args(argv)
    if not 0 < args.budget < float("inf"):
        parser.error(f"--budget must be a positive number of minutes, got {args.budget}")
    if args.max_iterations < 1:
        parser.error(f"--max_iterations must be at least 1, got {args.max_iterations}")
    return args


def regime_config(config: dict, name: str) -> dict:
    extra = config.get("regimes", {}).get(name, DEFAULT_REGIMES.get(name))
    if extra is None:
        raise UserError(f"unknown regime {name!r}: give it a [regimes.{name}] table (known: {', '.join(DEFAULT_REGIMES)})")
    merged = copy.deepcopy(config)
    for section in ("common", "buffer", "distill", "evaluate"):
        merged.setdefault(section, {})
        merged[section].update({**DEFAULT_REGIMES.get(name, {}).get(section, {}), **extra.get(section, {})})
    return check_sections(merged, f"regime {name} ([regimes.{name}] on top of the config)")


def run_regime(config: dict, name: str, out: Path, budget: float, max_iterations: int) -> dict:
    banner(f"regime {name}: {budget:g} minutes")
    settings = regime_config(config, name)
    folder = out / "regimes" / name
    shutil.rmtree(folder, ignore_errors=True)
    cache = folder / "cache"  # a cache of its own: this regime pays for its trunk outputs
    text_cache = Path(settings["common"].get("cache_dir", default_cache_dir())) / "text_embeddings"
    if text_cache.is_dir():  # text embeddings are the same for every regime: shared, not timed
        shutil.copytree(text_cache, cache / "text_embeddings")
    common = as_flags({**settings["common"], "cache_dir": str(cache)})
    buffer_flags = dict(settings["buffer"])
    started = time.time()
    run("buffer.py", common + as_flags(buffer_flags) + ["--buffer_path", str(folder / "buffers")])
    expert_minutes = (time.time() - started) / 60
    left = budget - expert_minutes
    if left <= 0:
        raise UserError(f"regime {name}: its experts took {expert_minutes:.1f} of the {budget:g} minutes; raise --budget "
                        f"or make them cheaper in [regimes.{name}] buffer")
    distill_flags = dict(distill_settings(settings)[0])
    distill_flags.update(iterations=max_iterations, time_budget=round(left, 3))
    expert_dir = expert_folder(folder / "buffers")
    run("distill.py", common + as_flags(distill_flags) + ["--buffer_path", str(expert_dir), "--save_dir",
                                                           str(folder / "distill"), "--draw", "False"])
    total = (time.time() - started) / 60
    evaluate_flags = common + as_flags(settings["evaluate"]) + ["--buffer_path", str(expert_dir)]
    best = load_distilled_set(folder / "distill" / "distilled_best.pt")
    last_path = folder / "distill" / "distilled_last.pt"
    last = load_distilled_set(last_path)
    report = run_configuration(name, ["--distilled", str(folder / "distill" / "distilled_best.pt")], evaluate_flags,
                               folder)
    start = run_configuration(f"{name}-start", ["--distilled", str(folder / "distill" / "distilled_000000.pt")],
                              evaluate_flags, folder)
    return {"metrics": report["metrics"], "start": start["metrics"], "split": report.get("split"),
            "expert_minutes": expert_minutes, "total_minutes": total, "iterations": last["iteration"],
            "best_iteration": best["iteration"], "seconds_per_iteration": seconds_per_iteration(last_path)}


def main(argv=None) -> int:
    args = parse_args(argv)
    config = load_config(args.config, args.data)
    for name in args.regimes:  # every regime's settings checked before any work starts
        regime_config(config, name)
    out = output_folder(args.out_dir, config, args.config)
    results = {name: run_regime(config, name, out, args.budget, args.max_iterations) for name in args.regimes}
    cell = lambda s: f"{s['r_mean']['mean']:.2f} ± {s['r_mean']['std']:.2f}"  # noqa: E731
    rows = [[name, f"{r['expert_minutes']:.1f}", str(r["iterations"]), f"{r['seconds_per_iteration']:.2f}",
             str(r["best_iteration"]), cell(r["start"]), cell(r["metrics"]), f"{r['total_minutes']:.1f}"]
            for name, r in results.items()]
    split = next(iter(results.values()))["split"]
    table = markdown_table(["regime", "experts (min)", "iterations", "s / iteration", "best iteration (val)",
                            f"r_mean at start ({split})", f"r_mean ({split})", "total (min)"], rows)
    (out / "regimes.md").write_text(table + "\n")
    (out / "regimes.json").write_text(json.dumps(results, indent=1))
    banner(f"regimes at {args.budget:g} minutes each")
    print(table)
    print(f"wrote {out / 'regimes.md'}, {out / 'regimes.json'}")
    return 0

