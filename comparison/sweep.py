"""Choosing a method's distillation settings on the selection split: one short distill.py run per variant.

    python -m bench.sweep configs/flickr8k_table.toml --data ../shared/data/flickr8k \
        --variants base lors lors_authors --size 100 --iterations 100

Reads the pipeline's TOML file (pipeline.py). A variant is a method of the config (comparison/config.py):
`base` is [distill] itself, any other name its `[methods.<name>]` table on top (`budgets` there is ignored: the
sweep runs at `--size`, with that size's `[budgets.<N>]` flags). Every variant distills `--size` pairs for the
same `--iterations` on the pipeline's experts (trained first if missing) with `--seed`, and is judged by
distill.py's own evaluations every `eval_it` iterations on the selection split (`eval_split`, val: these are
choices), with `num_eval` models trained at the learned step sizes; the best evaluated set is then judged with
the [evaluate] protocol on the same split (its learning rate, and epochs with `epoch_scales`, chosen from the grid
by one model per cell, then one fresh model with them: its r_mean; judged again when [evaluate] changes), since a set's learned step sizes can be poor learning rates for models
trained on it. The table (sweep-<size>.md and .json in
out_dir/sweep/, which keep the variants of earlier invocations at that size and seed) gives each variant's r_mean at every evaluated iteration, its best, and seconds per matching
iteration (evaluations excluded). A variant whose run is complete is reused; an interrupted one resumes; one that stops (e.g. diverges) is
judged by the best set it saved and marked in the table, and is not run again while its settings are unchanged.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from comparison.config import (DistillRun, distill_settings, load_config, method_config, row_name, selection_split,
                               set_sizes)
from comparison.stages import Stage, as_flags, distill_stage, experts_stage, output_folder, seconds_per_iteration
from comparison.programs import run_configuration
from data.distilled_set import load_distilled_set
from evaluation.metrics import markdown_table
from settings.programs import Parser
from settings.runtime import RuntimeSettings
from utils.cli import UserError
from utils.io import read_json_if_present


def parse_args(argv=None):
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, prog="python -m bench.sweep")
    parser.add_argument("config", help="the pipeline's TOML file")
    parser.add_argument("--variants", nargs="+", required=True, help="methods of the config to run: base, or names "
                                                                      "of [methods.<name>] tables")
    parser.add_argument("--size", type=int, default=None, help="pairs to distil (default: the config's first size)")
    parser.add_argument("--iterations", type=int, default=100, help="matching iterations of every variant")
    parser.add_argument("--seed", type=int, default=RuntimeSettings().seed, help="distillation seed of every variant")
    parser.add_argument("--out_dir", default=None, help="output folder (default: out_dir in the config)")
    parser.add_argument("--data", default=None, help="image root of the data set (sets common.image_root)")
    args = parser.parse_args(argv)
    if args.iterations < 1:
        parser.error(f"--iterations must be at least 1, got {args.iterations}")
    if len(set(args.variants)) != len(args.variants):
        parser.error(f"--variants lists a name more than once: {args.variants}")
    return args


def variant_run(config: dict, name: str, size: int, seed: int, iterations: int) -> DistillRun:
    merged = method_config(config, name, size, f"variant {name}")
    merged["distill"].update({"iterations": iterations, "seed": seed})
    merged["distill"].pop("seeds", None)
    distill_settings(merged, f"variant {name}")
    return DistillRun(name, size, seed, merged, f"{name}-{size}-it{iterations}/seed{seed}",
                      f"{row_name(name, size)} (seed {seed})")


def curve(save_dir: Path) -> dict[int, float]:
    """Iteration -> r_mean of distill.py's evaluations, read from the sets it saved at each of them."""
    points = {}
    for path in sorted(save_dir.glob("distilled_[0-9]*.pt")):
        payload = load_distilled_set(path)
        if payload.get("metrics"):
            points[int(payload["iteration"])] = payload["metrics"]["r_mean"]["mean"]
    return points


def main(argv=None) -> int:
    args = parse_args(argv)
    config = load_config(args.config, args.data)
    size = args.size if args.size is not None else set_sizes(config)[0]
    runs = [variant_run(config, name, size, args.seed, args.iterations) for name in args.variants]  # all checked first
    out = output_folder(args.out_dir, config, args.config)
    expert_dir = experts_stage(config, out)
    evaluate_flags = as_flags(config["common"]) + as_flags(config["evaluate"]) + ["--buffer_path", str(expert_dir)]
    results = {}
    for item in runs:
        if item.config["common"] != config["common"]:
            raise UserError(f"variant {item.method} changes [common]: its experts would differ from the pipeline's; "
                            f"sweep variants that share the experts")
        try:
            final, remade = distill_stage(item.config, out / "sweep", expert_dir, item.seed, item.folder,
                                          retry_stopped=False)
            stopped = None
        except UserError as err:  # e.g. diverged: the variant's result is what it saved before it stopped
            final, remade, stopped = out / "sweep" / item.folder / "distilled_last.pt", True, str(err)
            if not (final.parent / "distilled_best.pt").is_file():
                raise
            print(f"variant {item.method} stopped ({stopped}); judging the best set it saved", flush=True)
        points = curve(final.parent)
        best = max(points, key=points.get) if points else None
        # the best set under the protocol ([evaluate]: its grid, on the selection split), judged again whenever the
        # set or the protocol's flags change
        judged = final.parent / "protocol"
        stage = Stage(out / "sweep", f"protocol_{item.folder.replace('/', '_')}", evaluate_flags, [judged])
        if remade:
            stage.invalidate()
        stage.begin()
        judged.mkdir(exist_ok=True)
        report = run_configuration("best", ["--distilled", str(final.parent / "distilled_best.pt"), "--num_eval", "1"],
                                   evaluate_flags, judged)
        results[item.method] = {"curve": points, "best_iteration": best, "best_r_mean": points.get(best),
                                "protocol_lr": report["lr"], "protocol_epochs": report.get("epochs"),
                                "protocol_r_mean": report["selection_metrics"]["r_mean"]["mean"],
                                "seconds_per_iteration": seconds_per_iteration(final),
                                "settings": item.config["distill"], "stopped": stopped,
                                "last_iteration": load_distilled_set(final)["iteration"]}
    folder = out / "sweep"
    earlier = read_json_if_present(folder / f"sweep-{size}.json") or {}
    if earlier.get("seed") == args.seed:  # variants of earlier invocations at this size and seed stay in the table
        results = {**{k: v for k, v in earlier.get("variants", {}).items() if k not in results}, **results}
    iterations = sorted({int(i) for r in results.values() for i in r["curve"]})
    for r in results.values():
        r["curve"] = {int(i): v for i, v in r["curve"].items()}
    rows = [[name + (f" (stopped at {r['last_iteration']})" if r.get("stopped") else "")] +
            [f"{r['curve'][i]:.2f}" if i in r["curve"] else "" for i in iterations] +
            [f"{r['best_r_mean']:.2f} (it {r['best_iteration']})" if r["best_iteration"] is not None else "",
             f"{r['protocol_r_mean']:.2f} (lr {r['protocol_lr']:g}"
             + (f", {r['protocol_epochs']} epochs)" if r.get("protocol_epochs") else ")"),
             f"{r['seconds_per_iteration']:.2f}"]
            for name, r in results.items()]
    split = selection_split(config)
    table = markdown_table(["variant"] + [f"it {i}" for i in iterations] + ["best", "protocol at best", "s / iteration"], rows)
    (folder / f"sweep-{size}.md").write_text(
        f"{size} pairs, seed {args.seed}, {args.iterations} iterations; r_mean on {split}: distill.py's evaluations "
        f"(learned step sizes) at each iteration, and the best iteration's set under the protocol (the grid's best "
        f"learning rate and epochs, then one fresh model with them).\n\n{table}\n")
    (folder / f"sweep-{size}.json").write_text(json.dumps({"size": size, "seed": args.seed, "split": split,
                                                           "variants": results}, indent=1))
    print(table)
    print(f"wrote {folder / f'sweep-{size}.md'}, {folder / f'sweep-{size}.json'}")
    return 0
