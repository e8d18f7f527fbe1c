"""The whole comparison in one command: experts -> real-data rows -> distilled sets -> one table, worth-N, a plot.

    python pipeline.py configs/demo.toml            # what `make demo` runs
    python pipeline.py configs/flickr8k.toml --data ../shared/data/flickr8k

The TOML file holds every setting: `[common]` flags go to every program (data set, encoders, image
size, how much of the encoder trains, ...), `[buffer]` to buffer.py, `[distill]` to distill.py
(`seeds = [0, 1]`: one distillation per seed), `[evaluate]` to every evaluate.py call (the protocol:
models, epochs, batch, the grid of learning rates and `epoch_scales` tuned on the selection split and
`widen_grid`, how far it may be widened past an edge), and `[compare]` says
which rows to build:

- `ladder`: sizes N of random real coresets (e.g. [100, 200, 500, 1000, 2000, 5000]); with the
  full-data row on top (`full = "train"`: evaluate.py --full, the same protocol) they form the curve
  that every other set is read against: its worth-N is the number of random real pairs that reach
  the same r_mean (evaluation/worth.py);
- `coreset_methods` at `coreset_sizes` (default: the distilled size), and `centroids = true` for the
  k-means feature-centroid set (frozen trunk only);
- `epochs_per_size = {5000 = 10, all = 4}`: `--epoch_eval_train` of rows of that many pairs (CPU budgets;
  with `epoch_scales` the grid's epochs are multiples of it);
- `budgets = [100, 200, 500, 1000]` and `methods = ["base", "lors", "repblend"]`: distil every size with every
  method (comparison/config.py: per-size `[budgets.<N>]` flags, per-method `[methods.<name>]` tables), then also
  write table.md in the papers' layout (sets as rows, sizes as column groups, r_mean with worth-N per size) and
  budgets.png (r_mean against the set size, log axis).
- `export = true` (the default): export.py writes the base method's best set at the smallest size (the seed that
  scored highest on the selection split) to out_dir/export, a folder that loads without this project (README
  "Sharing a distilled set"), with the table on its card; false skips it.
- `default_experts = 3`: how many experts are trained when `[buffer]` leaves `num_experts` out (the
  pipeline's own default, not buffer.py's 100: the papers' count, days on a CPU).

`[transfer.<name>]` tables (any number) then judge every set with another encoder: `image_encoder = "..."` (with
how much of it trains, and `image_size` to judge at another size) or `text_encoder = "..."`, optionally
`evaluate = {...}`, `ladder` and `epochs_per_size` of its own; each gets its own random ladder and full data
(`full = "none"`: none), so worth-N is per encoder, and transfer.md holds the matrix of sets by encoder
(comparison/transfer.py).

`[reduce]` (methods = [...], keep = [fractions], reduce = {reduce.py flags}) adds the reduction comparison: each
method keeps each fraction of the training pairs (reduce.py, with the pipeline's experts as the aligned space) and
each kept set is judged like full data (evaluate.py --subset; round(E / keep) epochs, E full data's); the rows join
the table, and reduce.md / reduce.png show them as methods × fractions (comparison/reduced.py). A config that only
reduces sets [compare] methods = [] (no distillation).

Choices are made on the selection split (`--eval_split`, val): the distillation's best iteration and every
row's learning rate and epochs; the table is on the report split (test when its annotation file is present).
Each stage records the flags it ran with; re-running reuses every stage whose flags are unchanged and
redoes a changed stage and everything after it. --fresh starts over. The pipeline takes only a new or
empty `out_dir` (or one it made before, which holds its marker file .vl-distill-pipeline), never one holding
the config file or the data: stages and --fresh delete what is in it.

Writes to `out_dir` (a relative one is taken from the directory pipeline.py starts in): results.md (the
table with worth-N), results.json (every metric with its runs, the choices, worth-N), worth_n.png (r_mean
against N), the distilled images and nearest captions of the first seed, and buffers/, distill/, results/
with everything behind them. Every setting (each section's keys, [compare], the seeds, the output folder)
is checked before the first program runs.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from comparison.config import distill_runs, load_config, selection_split
from comparison.report import write_outputs
from comparison.stages import (MARKER, as_flags, distilled_row, empty_output_folder, experts_stage, export_stage,
                               holding, output_folder, real_data_rows, with_pooled)
from comparison.reduced import reduce_section, reduction_rows, write_reduction
from comparison.report import full_row, worth_column
from comparison.transfer import transfer_rows, transfer_targets
from settings.programs import Parser


def parse_args(argv=None):
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, prog="pipeline.py")
    parser.add_argument("config", help="TOML file with [common], [buffer], [distill], [evaluate], [compare]")
    parser.add_argument("--out_dir", default=None, help="output folder (default: out_dir in the config)")
    parser.add_argument("--data", default=None, help="image root of the data set (sets common.image_root)")
    parser.add_argument("--fresh", action="store_true", help="delete everything in the output folder first (only a "
                                                              "folder the pipeline made: it holds " + MARKER + ")")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    config = load_config(args.config, args.data)
    targets = transfer_targets(config, f"config file {args.config}")
    reduction = reduce_section(config, f"config file {args.config}")
    out = output_folder(args.out_dir, config, args.config)
    with holding(out, "--out_dir" if args.out_dir is not None else "out_dir"):
        return run_stages(args, config, out, targets, reduction)


def run_stages(args, config: dict, out: Path, targets=(), reduction: dict | None = None) -> int:
    if args.fresh:
        empty_output_folder(out)
    started, times = time.time(), {}
    runs = distill_runs(config)

    expert_dir = experts_stage(config, out)
    times["data + experts"] = time.time() - started

    # Real-data rows first: they depend only on the experts and the protocol, so a distillation that
    # fails or is retuned never costs them.
    evaluate_flags = as_flags(config["common"]) + as_flags(config["evaluate"]) + ["--buffer_path", str(expert_dir)]
    real = real_data_rows(config, out, expert_dir, evaluate_flags)
    times["ladder, coresets, full data"] = time.time() - started - sum(times.values())
    reduced = reduction_rows(config, out, expert_dir, evaluate_flags, reduction) if reduction else []
    if reduction:
        times["reduction"] = time.time() - started - sum(times.values())

    distilled, run_seconds = [], {}
    for item in runs:
        began = time.time()
        distilled.append(distilled_row(config, item, out, expert_dir, evaluate_flags, out / "results"))
        run_seconds[item.label] = round(time.time() - began, 1)
    times["distillation + its evaluation"] = time.time() - started - sum(times.values())
    table = {}
    for row in [*with_pooled(distilled), *real, *reduced]:  # a label asked for twice (random-N on the ladder and among
        table[row.label] = row                     # coreset_methods) is one row: the later one, in the first's place
    rows = list(table.values())
    write_outputs(out, out / "distill" / runs[0].folder / "distilled_best.pt" if runs else None, rows, times, config,
                  run_seconds)
    if reduction:
        write_reduction(out, reduced, worth_column(rows), full_row(rows), reduction,
                        full_row(rows).report.get("split", "?"), selection_split(config))
    export_stage(config, out, runs)
    transfer_rows(config, out, list(targets), list(table.values()), runs)  # after the table: it waits for none of them
    return 0
