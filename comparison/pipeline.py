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
import contextlib
import fcntl
import json
import shutil
import time
from pathlib import Path

from comparison.config import (  # noqa: F401  (load_config, check_sections: the names callers know this module by)
    BASE,
    FULL,
    PROGRAM_SECTIONS,
    DistillRun,
    budgets_of,
    check_sections,
    distill_runs,
    distill_settings,
    load_config,
    method_names,
    row_name,
    set_sizes,
)
from comparison.programs import run, run_configuration
from data.distilled_set import load_distilled_set
from evaluation.budgets import cell, paper_table, plot_budgets, r_mean_table
from evaluation.metrics import format_table, markdown_table, summarize_runs, table_cells
from evaluation.worth import plot_worth, worth_n
from experts.files import expert_files, read_expert_metrics
from settings.programs import Parser
from utils.cli import UserError
from utils.io import atomic_write_json, read_json_if_present
from utils.paths import ensure_output_dir, refuse_outputs_over_inputs

NOT_METRICS = ("epoch", "train_loss", "train_acc", "steps", "gradient_steps")  # buffer.py's epoch keys besides metrics
# The file that marks a folder as the pipeline's own: only such a folder is emptied (--fresh) or has stage outputs
# deleted. A folder from before the marker existed is recognised by its stage stamps.
MARKER = ".vl-distill-pipeline"
# What the pipeline writes in its folder: a folder from before the marker holds nothing else.
PIPELINE_WRITES = {"buffers", "distill", "results", "stamps", "methods", "sweep", "results.md", "results.json", "worth_n.png",
                   "table.md", "budgets.png", "nearest_captions.txt", "synthetic_images_plain.png", "synthetic_images_clipped.png"}
# The keys of any section that name something the programs read.
INPUT_KEYS = ("image_root", "ann_root", "image_weights", "text_model")


def parse_args(argv=None):
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, prog="pipeline.py")
    parser.add_argument("config", help="TOML file with [common], [buffer], [distill], [evaluate], [compare]")
    parser.add_argument("--out_dir", default=None, help="output folder (default: out_dir in the config)")
    parser.add_argument("--data", default=None, help="image root of the data set (sets common.image_root)")
    parser.add_argument("--fresh", action="store_true", help="delete everything in the output folder first (only a "
                                                              "folder the pipeline made: it holds " + MARKER + ")")
    return parser.parse_args(argv)


def output_folder(flag: str | None, config: dict, config_file: str | None = None) -> Path:
    """The output folder (--out_dir, else the config's out_dir), made absolute once from the current directory:
    every stage and every program it runs then names the same folder, whatever directory they run in. Before any
    work starts it is checked writable, refused when it holds the config file or anything the programs read (its
    contents may be deleted), and claimed as the pipeline's own (`claim_output_folder`)."""
    given, name = (flag, "--out_dir") if flag is not None else (config.get("out_dir", "outputs/pipeline"), "out_dir")
    if not isinstance(given, str) or not given.strip():
        raise UserError(f"{name} must be a folder name, got {given!r}")
    inputs = {f"[{section}] {key}": config[section][key] for section in ("common", *PROGRAM_SECTIONS)
              for key in INPUT_KEYS if isinstance(config.get(section, {}).get(key), str)}
    refuse_outputs_over_inputs({name: given}, {"the config file": config_file, **inputs}, emptied=(name,))
    return claim_output_folder(ensure_output_dir(Path(given).expanduser().resolve(), name), name)


def claim_output_folder(out: Path, name: str = "out_dir") -> Path:
    """Make the existing folder `out` the pipeline's own, or refuse it: an empty folder is marked with MARKER, a
    marked one is taken, a pipeline folder from before the marker (stage stamps, and only names the pipeline
    writes) is marked and taken; any other folder is refused, since stages and --fresh delete what is in it."""
    marker = out / MARKER
    if marker.is_file():
        return out
    foreign = sorted(entry.name for entry in out.iterdir() if entry.name not in PIPELINE_WRITES)
    stamps = list((out / "stamps").glob("*")) if (out / "stamps").is_dir() else []
    if foreign or not all(is_stamp(stamp) for stamp in stamps) or (any(out.iterdir()) and not stamps):
        named = f" (it holds {', '.join(foreign[:3])})" if foreign else ""
        raise UserError(f"{name} {out} already holds files that pipeline.py did not write (it has no {MARKER}); "
                        f"give a new or empty folder{named}")
    marker.write_text("This folder is pipeline.py's output: --fresh and changed stages delete what is in it.\n")
    return out


@contextlib.contextmanager
def holding(out: Path, name: str):
    """One pipeline at a time in a folder: an exclusive lock on its marker for the whole run (the system drops
    it when the process ends, also by kill -9), so a second run started on it is refused, not mixed in."""
    with open(out / MARKER, "rb") as marker:
        try:
            fcntl.flock(marker, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{name} {out} is in use by another pipeline.py run; wait for it to end or give "
                            f"another folder") from None
        yield


def is_stamp(path: Path) -> bool:
    """Whether `path` is a stage stamp: a .json file holding the list of flags the stage ran with."""
    try:
        return path.suffix == ".json" and isinstance(json.loads(path.read_bytes()), list)
    except (OSError, ValueError, RecursionError):
        return False


def owned_by_pipeline(path: Path) -> bool:
    """Whether `path` lies in a folder that the pipeline claimed (`claim_output_folder`)."""
    return any((folder / MARKER).is_file() for folder in (path, *path.parents))


def empty_output_folder(out: Path) -> None:
    """--fresh: delete everything in the pipeline's folder `out` except its marker (links are removed, never
    followed)."""
    if not owned_by_pipeline(out):
        raise RuntimeError(f"{out} was never claimed by the pipeline; refusing to empty it")
    for entry in out.iterdir():
        if entry.name == MARKER:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def as_flags(section: dict) -> list[str]:
    flags = []
    for key, value in section.items():
        if isinstance(value, list):
            flags += [f"--{key}", *(str(v) for v in value)]
        else:
            flags += [f"--{key}", str(value)]  # TOML booleans print as True/False, as the programs expect
    return flags


def flag_values(flags: list[str]) -> dict[str, tuple[str, ...]]:
    """A program's flags as --flag -> its values, the last of a repeated flag winning (as the programs read them):
    the order in which a config lists its keys does not change what a stage runs."""
    values, current = {}, None
    for token in flags:
        if token.startswith("--"):
            current = token
            values[current] = ()
        else:
            values[current] = (*values.get(current, ()), token)
    return values


class Stage:
    """One step whose outputs are reused while the flags it ran with are unchanged (in any order); `tail`: what else
    it depends on (e.g. how many experts there are), recorded after the flags and compared as it is."""

    def __init__(self, out: Path, name: str, flags: list[str], outputs: list[Path], tail: list[str] = ()):
        self.out = out
        self.stamp = out / "stamps" / f"{name}.json"
        self.name, self.given, self.tail, self.outputs = name, flags, list(tail), outputs
        self.flags = flags + self.tail

    def unchanged(self) -> bool:
        if not is_stamp(self.stamp):
            return False
        stored = json.loads(self.stamp.read_text())
        if not all(isinstance(token, str) for token in stored):
            return False
        cut = len(stored) - len(self.tail)
        return cut >= 0 and stored[cut:] == self.tail and flag_values(stored[:cut]) == flag_values(self.given)

    def invalidate(self) -> None:
        if not owned_by_pipeline(self.out):  # output_folder claims every folder before a stage runs in it
            raise RuntimeError(f"stage {self.name}: {self.out} was never claimed by the pipeline; refusing to delete "
                               f"its outputs")
        for path in self.outputs:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        self.stamp.unlink(missing_ok=True)

    def begin(self) -> None:
        """Outputs made with other flags are deleted; the stamp is written before any work, so that
        whatever an interrupted run leaves behind (finished experts, a resumable distilled set,
        finished rows) is known to belong to these flags and is reused by the next run."""
        if not self.unchanged():
            self.invalidate()
            self.stamp.parent.mkdir(parents=True, exist_ok=True)
            self.stamp.write_text(json.dumps(self.flags))


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def experts_stage(config: dict, out: Path) -> Path:
    common, settings = as_flags(config["common"]), dict(config["buffer"])
    wanted = int(settings.pop("num_experts", 3))
    buffers = out / "buffers"
    Stage(out, "experts", common + as_flags(settings), [buffers]).begin()
    meta_dirs = [p.parent for p in buffers.glob("**/buffer_meta.json")]
    have = len(expert_files(meta_dirs[0])) if meta_dirs else 0
    banner(f"experts: {have} of {wanted} trained" + ("" if have < wanted else ", reusing them"))
    if have < wanted:
        run("buffer.py", common + as_flags(settings) + ["--buffer_path", str(buffers), "--num_experts",
                                                          str(wanted - have)])
    return expert_folder(buffers)


def expert_folder(buffers: Path) -> Path:
    """The folder of the experts buffer.py wrote under `buffers` (a clear error if it wrote none there)."""
    found = next(buffers.glob("**/buffer_meta.json"), None)
    if found is None:
        raise UserError(f"buffer.py finished but no experts are under {buffers} (no buffer_meta.json)")
    return found.parent


def distill_stage(config: dict, out: Path, expert_dir: Path, seed: int | None = None,
                  name: str = "distill", retry_stopped: bool = True) -> tuple[Path, bool]:
    """The last distilled set of one distillation run, and whether it was (re)made in this invocation. A run that
    stopped with an error (e.g. diverged) leaves stopped.json in its folder; with `retry_stopped=False` an unchanged
    run that stopped before raises the same error again instead of resuming into it."""
    settings, _ = distill_settings(config)
    if seed is not None:
        settings["seed"] = seed
    flags = as_flags(config["common"]) + as_flags(settings)
    save_dir = out / name
    stage = Stage(out, name.replace("/", "_"), flags, [save_dir], tail=[str(len(expert_files(expert_dir)))])
    final = save_dir / "distilled_last.pt"
    iterations = int(settings.get("Iteration", 50000))
    if stage.unchanged() and final.is_file() and load_distilled_set(final)["iteration"] == iterations:
        banner(f"distillation: reusing {final}")
        return final, False
    stopped = save_dir / "stopped.json"
    if not retry_stopped and stage.unchanged() and stopped.is_file():
        raise UserError(f"{json.loads(stopped.read_text())['error']} (not run again: its settings are unchanged "
                        f"since it stopped; delete {stopped} to try again)")
    stage.begin()
    stopped.unlink(missing_ok=True)
    resume = ["--resume", str(final)] if final.is_file() else []
    size = settings.get("num_pairs")
    banner("distillation" + (f" of {size} pairs" if size is not None else "") + (f" (seed {seed})" if seed is not None else "")
           + (f": resuming {final}" if resume else ""))
    try:
        run("distill.py", flags + ["--buffer_path", str(expert_dir), "--save_dir", str(save_dir), *resume])
    except UserError as err:
        if save_dir.is_dir():
            atomic_write_json({"error": str(err)}, stopped)
        raise
    return final, True


def seconds_per_iteration(distilled: Path, missing: float = float("nan")) -> float:
    """Seconds per matching iteration of the distill.py run that wrote `distilled` (its timing.json, evaluations
    excluded); `missing` when it has none."""
    timing = read_json_if_present(Path(distilled).parent / "timing.json") or {}
    return timing["seconds"] / max(timing.get("iterations", 0), 1) if "seconds" in timing else missing


def epochs_for(config: dict, size: int | str) -> list[str]:
    epochs = {str(k): v for k, v in config["compare"].get("epochs_per_size", {}).items()}
    return ["--epoch_eval_train", str(epochs[str(size)])] if str(size) in epochs else []


def full_data_row(config: dict, out: Path, expert_dir: Path, evaluate_flags: list[str]) -> tuple[str, dict]:
    mode = config["compare"].get("full", "train")  # one of FULL_MODES (check_compare)
    if mode == "train":
        return "full data", run_configuration("full", ["--full", *epochs_for(config, FULL)], evaluate_flags,
                                              out / "results")
    found = read_expert_metrics(expert_dir)  # "experts": their last epoch, read off their metrics
    if len(found) < 2:
        raise UserError(f"the full-data row needs the metrics of at least 2 experts in {expert_dir}")
    finals = [{k: v for k, v in m["epochs"][-1].items() if k not in NOT_METRICS} for m in found.values()]
    epochs = found[min(found)]["epochs"][-1]["epoch"]
    return f"full data ({len(found)} experts, {epochs} ep)", {"metrics": summarize_runs(finals), "source": "experts"}


def coreset_row(config: dict, results: Path, evaluate_flags: list[str], method: str, count: int) -> tuple[str, dict]:
    label = f"{method}-{count}"
    flags = ["--coreset", method, "--coreset_size", str(count), "--coreset_file",
             str(results / "coresets" / f"{label}.pt"), *epochs_for(config, count)]
    return label, run_configuration(label, flags, evaluate_flags, results)


def pooled(reports: list[dict]) -> dict:
    """One summary over the evaluation models of several reports (e.g. distillation seeds)."""
    runs = [dict(zip(r["metrics"], values)) for r in reports
            for values in zip(*(m["runs"] for m in r["metrics"].values()))]
    return {"metrics": summarize_runs(runs), "split": reports[0].get("split"), "lr": [r.get("lr") for r in reports],
            "epochs": [r.get("epochs") for r in reports], "parts": len(reports),
            "at_edge": sorted({dim for r in reports for dim in r.get("at_edge") or []})}


def choice_text(report: dict, key: str, spec: str) -> str:
    """A report's chosen learning rate or epochs for the table: one value, or one per pooled part."""
    value = report.get(key)
    values = value if isinstance(value, list) else [value]
    return ", ".join(format(v, spec) for v in values if v is not None)


def main(argv=None) -> int:
    args = parse_args(argv)
    config = load_config(args.config, args.data)
    out = output_folder(args.out_dir, config, args.config)
    with holding(out, "--out_dir" if args.out_dir is not None else "out_dir"):
        return run_stages(args, config, out)


def run_stages(args, config: dict, out: Path) -> int:
    if args.fresh:
        empty_output_folder(out)
    started, times = time.time(), {}
    runs = distill_runs(config)
    sizes = set_sizes(config)
    compare = config["compare"]

    expert_dir = experts_stage(config, out)
    times["data + experts"] = time.time() - started

    # Real-data rows first: they depend only on the experts and the protocol, so a distillation that
    # fails or is retuned never costs them.
    results = out / "results"
    evaluate_flags = as_flags(config["common"]) + as_flags(config["evaluate"]) + ["--buffer_path", str(expert_dir)]
    rows_part = {key: value for key, value in compare.items() if key not in ("budgets", "methods")}
    Stage(out, "evaluate", evaluate_flags, [results], tail=[json.dumps(rows_part, sort_keys=True)]).begin()
    (results / "coresets").mkdir(parents=True, exist_ok=True)
    banner("evaluation: random ladder, coresets, full data")
    ladder, others = {}, {}
    for count in compare.get("ladder", [sizes[0], 10 * sizes[0]]):
        label, report = coreset_row(config, results, evaluate_flags, "random", int(count))
        ladder[label] = report
    for count in compare.get("coreset_sizes", sizes):
        for method in compare.get("coreset_methods", []):
            label, report = coreset_row(config, results, evaluate_flags, method, int(count))
            others[label] = report
        if compare.get("centroids", False):
            label, report = coreset_row(config, results, evaluate_flags, "centroids", int(count))
            others[label] = report
    full_label, full_report = full_data_row(config, out, expert_dir, evaluate_flags)
    times["ladder, coresets, full data"] = time.time() - started - sum(times.values())

    distilled, groups, run_seconds = {}, {}, {}
    for item in runs:
        began = time.time()
        distilled[item.label] = distilled_row(config, item, out, expert_dir, evaluate_flags, results)
        groups.setdefault((item.method, item.size), []).append(item.label)
        run_seconds[item.label] = round(time.time() - began, 1)
    times["distillation + its evaluation"] = time.time() - started - sum(times.values())
    first_set = out / "distill" / runs[0].folder / "distilled_best.pt"
    reports = {}
    for (method, size), labels in groups.items():
        if len(labels) > 1:
            reports[f"{row_name(method, size)} ({len(labels)} seeds)"] = pooled([distilled[label] for label in labels])
        reports.update({label: distilled[label] for label in labels})
    reports.update(others)
    reports.update(ladder)
    reports[full_label] = full_report
    write_outputs(out, first_set, reports, ladder, full_report, times, config, run_seconds)
    return 0


def distilled_row(config: dict, item: DistillRun, out: Path, expert_dir: Path, evaluate_flags: list[str],
                  results: Path) -> dict:
    """Distill one run (reused when done), then judge its best iteration (the one chosen on the selection split)
    with the protocol: a method with its own [common] settings uses its own experts for both."""
    if item.config["common"] != config["common"]:  # other trainable parts or encoder: other experts
        expert_dir = experts_stage(item.config, out / "methods" / item.method)
        evaluate_flags = as_flags(item.config["common"]) + as_flags(config["evaluate"]) + ["--buffer_path",
                                                                                          str(expert_dir)]
    final, remade = distill_stage(item.config, out, expert_dir, item.seed, f"distill/{item.folder}")
    if remade:
        (results / f"{item.label}.json").unlink(missing_ok=True)
    return run_configuration(item.label, ["--distilled", str(final.parent / "distilled_best.pt")], evaluate_flags,
                             results)


def ladder_points(ladder: dict[str, dict], full_report: dict) -> dict[int, dict]:
    """N -> r_mean summary of the random coresets, with full-data training as the last rung."""
    points = {r["config"]["set_size"]: r["metrics"]["r_mean"] for r in ladder.values()}
    if "config" in full_report:
        points[full_report["config"]["set_size"]] = full_report["metrics"]["r_mean"]
    return points


def worth_column(reports: dict[str, dict], ladder: dict[str, dict], full_report: dict) -> dict[str, dict | None]:
    points = ladder_points(ladder, full_report)
    if len(points) < 2:
        return {label: None for label in reports}
    return {label: None if label.startswith("random-") or label.startswith("full data") else
            worth_n(points, r["metrics"]["r_mean"]["mean"], r["metrics"]["r_mean"]["std"]).as_dict()
            for label, r in reports.items()}


def write_outputs(out: Path, distilled: Path, reports: dict[str, dict], ladder: dict[str, dict], full_report: dict,
                  times: dict[str, float], config: dict, run_seconds: dict[str, float] | None = None) -> None:
    summaries = {label: r["metrics"] for label, r in reports.items()}
    worth = worth_column(reports, ladder, full_report)
    header, cells = table_cells(summaries)
    rows = [row + ["" if worth[label] is None else worth[label]["text"], choice_text(r, "lr", ".3g"),
                   choice_text(r, "epochs", "d")]
            for row, (label, r) in zip(cells, reports.items())]
    split = next((r.get("split") for r in reports.values() if r.get("split")), "?")
    table = markdown_table(header + ["worth-N", "lr", "epochs"], rows)
    edges = {label: r["at_edge"] for label, r in reports.items() if r.get("at_edge")}
    edge_note = ("\n\nChoices still at an edge of the grid after widening: " +
                 "; ".join(f"{label} ({', '.join(dims)})" for label, dims in edges.items()) + ".") if edges else ""
    (out / "results.md").write_text(f"Reported on the {split} split; choices on "
                                    f"{config['common'].get('eval_split', 'val')}.\n\n{table}{edge_note}\n")
    points = ladder_points(ladder, full_report)
    (out / "results.json").write_text(json.dumps(
        {"split": split, "rows": summaries, "worth_n": worth, "ladder": {str(k): v for k, v in points.items()},
         "choices": {label: {key: r.get(key) for key in ("lr", "epochs", "tuning", "widened", "at_edge")}
                     for label, r in reports.items()},
         "stage_seconds": times, "distillation_seconds": run_seconds or {}}, indent=1))
    marked = {label: r["metrics"]["r_mean"] for label, r in reports.items() if worth.get(label) is not None
              and "(seed" not in label}
    plot = None
    if len(points) >= 2:
        plot = plot_worth(points, marked, out / "worth_n.png", title=f"r_mean on {split} against random real pairs",
                          full=full_report["metrics"]["r_mean"])
    if budgets_of(config) is not None:
        budgets_plot = write_budget_table(out, reports, worth, points, full_report["metrics"]["r_mean"], split, config)
        print(f"wrote {out / 'table.md'}, {budgets_plot}")
    if distilled.is_file():
        tag = f"{load_distilled_set(distilled)['iteration']:06d}"
        for name in (f"synthetic_images_plain_{tag}.png", f"synthetic_images_clipped_{tag}.png",
                     f"nearest_captions_{tag}.txt"):
            if (distilled.parent / name).is_file():
                shutil.copyfile(distilled.parent / name, out / name.replace(f"_{tag}", ""))
    banner(f"results on {split} (mean ± std over evaluation models; choices on "
           f"{config['common'].get('eval_split', 'val')})")
    print(format_table(summaries))
    print(verdict(reports, worth))
    print("\n" + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()) +
          f"; total {sum(times.values()) / 60:.1f} min")
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}" + (f", {plot}" if plot else ""))


def budget_labels(reports: dict[str, dict], config: dict) -> dict[str, dict[int, str]]:
    """The table's rows by set size, as report labels: each method's distilled sets (pooled over seeds when there
    are several), and the coresets of each size ("random" from the ladder)."""
    sizes, labels = set_sizes(config), {}
    compare = config["compare"]
    kinds = ["random", *compare.get("coreset_methods", []), *(["centroids"] if compare.get("centroids") else [])]
    names = [(method, row_name(method, size), size) for method in method_names(config) for size in sizes]
    names += [(kind, f"{kind}-{size}", size) for kind in kinds for size in sizes]
    for name, prefix, size in names:
        found = [label for label in reports if label == prefix or label.startswith(prefix + " (")]
        chosen = next((label for label in found if "seeds)" in label), found[0] if found else None)
        if chosen is not None:
            labels.setdefault("distilled" if name == BASE else name, {})[size] = chosen
    return labels


def write_budget_table(out: Path, reports: dict[str, dict], worth: dict[str, dict | None], points: dict[int, dict],
                       full: dict, split: str, config: dict) -> Path:
    """table.md (the papers' layout, then r_mean with worth-N per size) and budgets.png (r_mean against pairs)."""
    sizes, labels = set_sizes(config), budget_labels(reports, config)
    rows = {name: {size: reports[label]["metrics"] for size, label in by_size.items()} for name, by_size in labels.items()}
    worth_text = {name: {size: worth[label]["text"] for size, label in by_size.items() if worth.get(label)}
                  for name, by_size in labels.items()}
    text = (f"Reported on the {split} split (choices on {config['common'].get('eval_split', 'val')}); mean ± std over "
            f"the evaluation models (distilled rows: pooled over the seeds). Full data: {cell(full)}.\n\n"
            f"{paper_table(rows, sizes)}\n\nr_mean, and what each set is worth in random real pairs:\n\n"
            f"{r_mean_table(rows, sizes, worth_text)}\n\nWhat each set cost on this machine:\n\n"
            f"{cost_table(out, reports, config)}\n")
    (out / "table.md").write_text(text)
    return plot_budgets(rows, out / "budgets.png", points, full, title=f"r_mean on {split} against the set size")


def cost_table(out: Path, reports: dict[str, dict], config: dict) -> str:
    """Markdown: per distillation (method, size, seed) its matching seconds per iteration and minutes (timing.json,
    the evaluations during distillation excluded) and the minutes its row's evaluation took (the report's wall
    time), as measured when each ran (a run shared with other work on the machine is slower)."""
    lines = []
    for item in distill_runs(config):
        final = out / "distill" / item.folder / "distilled_last.pt"
        timing = read_json_if_present(final.parent / "timing.json") or {}
        judged = reports.get(item.label, {}).get("wall_seconds")
        lines.append([item.label, str(timing.get("iterations", "")),
                      f"{seconds_per_iteration(final):.2f}" if timing else "",
                      f"{timing['seconds'] / 60:.1f}" if timing else "", f"{judged / 60:.1f}" if judged else ""])
    return markdown_table(["distillation", "iterations", "s / iteration", "matching, min", "row's evaluation, min"],
                          lines)


def margin(ours: dict, other: dict) -> str:
    """How far one r_mean summary lies above another: in units of the larger std, or in r_mean points when
    neither has any spread (a single model, or identical runs), where a ratio would be meaningless."""
    difference, spread = ours["mean"] - other["mean"], max(ours["std"], other["std"])
    if spread > 0:
        return f"{difference / spread:+.1f} std"
    return f"{difference:+.2f} points (no spread: both std 0)"


def verdict(reports: dict[str, dict], worth: dict[str, dict | None]) -> str:
    """The distilled set against every other row, and what each set is worth in random real pairs."""
    distilled = next(((k, v["metrics"]["r_mean"]) for k, v in reports.items() if k.startswith("distilled-")), None)
    lines = []
    if distilled is not None:
        name, ours = distilled
        for label, report in reports.items():
            if label.startswith("distilled-"):
                continue
            other = report["metrics"]["r_mean"]
            lines.append(f"{name} r_mean {ours['mean']:.2f} vs {label} {other['mean']:.2f}: {margin(ours, other)}")
    for label, value in worth.items():
        if value is not None and "(seed" not in label:
            lines.append(f"{label} is worth {value['text']} random real pairs")
    return "\n".join(lines)

