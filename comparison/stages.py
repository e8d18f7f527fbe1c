"""The pipeline's stages (pipeline.py; comparison/pipeline.py says what each builds): the output folder it claims
and holds, the stage stamps that decide what is reused, the experts and distillation stages, and the runners of the
table's rows (random and other coresets, full data, each distilled set, and the pooling over seeds).

A stage records the flags it ran with in out_dir/stamps/<stage>.json before any work; a re-run reuses its outputs
while those flags are unchanged (in any order) and deletes them otherwise.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
from pathlib import Path

from comparison.config import (BASE, DEFAULT_OUT_DIR, FULL, NOT_ROWS, PROGRAM_SECTIONS, DistillRun, compare_setting,
                               distill_settings, row_name, set_sizes, setting_value)
from comparison.programs import run, run_configuration
from comparison.rows import FULL_LABEL, FULL_REPORT, Kind, Row
from data.distilled_set import content_digest, load_distilled_set
from evaluation.metrics import summarize_runs
from experts.files import META_NAME, buffer_dir, expert_files, read_expert_metrics
from matching.timing import RunTiming
from settings.base import RENAMED
from settings.choices import CENTROIDS, RANDOM
from settings.data import DataSettings
from settings.distillation import DistillSettings
from settings.model import ModelSettings
from utils.cli import UserError
from utils.io import atomic_write_json
from utils.paths import ensure_output_dir, refuse_outputs_over_inputs

NOT_METRICS = ("epoch", "train_loss", "train_acc", "steps", "gradient_steps")  # buffer.py's epoch keys besides metrics
# The file that marks a folder as the pipeline's own: only such a folder is emptied (--fresh) or has stage outputs
# deleted. A folder from before the marker existed is recognised by its stage stamps.
MARKER = ".vl-distill-pipeline"
# What the pipeline writes in its folder: a folder from before the marker holds nothing else.
EXPORT = "export"  # the shareable copy of the best distilled set (export.py set)
PIPELINE_WRITES = {"buffers", "distill", "results", "stamps", "methods", "sweep", "transfer", EXPORT, "results.md",
                   "results.json", "worth_n.png", "transfer.md",
                   "table.md", "budgets.png", "nearest_captions.txt", "synthetic_images_plain.png", "synthetic_images_clipped.png"}
# The keys of any section that name something the programs read.
INPUT_KEYS = ("image_root", "ann_root", "image_weights", "text_model")
# results/sets.json: the content digest of the set each row judged from a file (data.distilled_set.content_digest)
SETS_RECORD = "sets.json"


def output_folder(flag: str | None, config: dict, config_file: str | None = None) -> Path:
    """The output folder (--out_dir, else the config's out_dir), made absolute once from the current directory:
    every stage and every program it runs then names the same folder, whatever directory they run in. Before any
    work starts it is checked writable, refused when it holds the config file or anything the programs read (its
    contents may be deleted), and claimed as the pipeline's own (`claim_output_folder`)."""
    given, name = (flag, "--out_dir") if flag is not None else (config.get("out_dir", DEFAULT_OUT_DIR), "out_dir")
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
    the order in which a config lists its keys does not change what a stage runs; flags are named as they are now
    (settings.base.RENAMED)."""
    values, current = {}, None
    for token in flags:
        if token.startswith("--"):  # a stamp written before a setting was renamed names it as it was then
            current = "--" + RENAMED.get(token[2:], token[2:])
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


def experts_stage(config: dict, out: Path, encoder: str | None = None) -> Path:
    """The folder of the config's experts under out/buffers, trained up to their count (reused when there): of
    [common]'s image encoder, or with `encoder` of that one (the extra encoders a distillation matches; a stage of
    its own, experts_<encoder>, whose outputs are that encoder's folder only)."""
    common, settings = as_flags(config["common"]), dict(config["buffer"])
    wanted = int(settings.pop("num_experts", compare_setting(config, "default_experts")))
    buffers = out / "buffers"
    folder = encoder_folder(config, buffers, encoder)
    if encoder is None:
        Stage(out, "experts", common + as_flags(settings), [buffers]).begin()
    else:  # the last --image_encoder given is the one buffer.py takes
        common += ["--image_encoder", encoder]
        Stage(out, f"experts_{encoder}", common + as_flags(settings), [folder]).begin()
    have = len(expert_files(folder)) if folder.is_dir() else 0
    banner(f"experts{'' if encoder is None else ' of ' + encoder}: {have} of {wanted} trained"
           + ("" if have < wanted else ", reusing them"))
    if have < wanted:
        run("buffer.py", common + as_flags(settings) + ["--buffer_path", str(buffers), "--num_experts",
                                                          str(wanted - have)])
    return expert_folder(buffers, folder)


def encoder_folder(config: dict, buffers: Path, encoder: str | None = None) -> Path:
    """Where buffer.py writes the experts of `encoder` (default: [common]'s) under `buffers`."""
    return buffer_dir(buffers, setting_value(config, "common", DataSettings, "dataset"),
                      encoder or setting_value(config, "common", ModelSettings, "image_encoder"),
                      setting_value(config, "common", ModelSettings, "text_encoder"))


def expert_folder(buffers: Path, folder: Path | None = None) -> Path:
    """The folder of the experts buffer.py wrote under `buffers`: `folder` when given (a clear error if it holds
    none), else the first found."""
    found = (folder / META_NAME if (folder / META_NAME).is_file() else None) if folder is not None else \
        next(buffers.glob("**/buffer_meta.json"), None)
    if found is None:
        raise UserError(f"buffer.py finished but no experts are in {folder or buffers} (no {META_NAME})")
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
    iterations = int(setting_value(config, "distill", DistillSettings, "iterations"))
    if stage.unchanged() and final.is_file():
        reached = load_distilled_set(final)["iteration"]
        # finished: it reached its iterations, or stopped because its --time_budget was spent (timing.json says
        # so); a run interrupted in the middle of its budget carries on
        if reached == iterations or RunTiming.budget_stop(save_dir) == reached:
            banner(f"distillation: reusing {final}" + ("" if reached == iterations else
                                                        f" (its time budget ended it at iteration {reached})"))
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


def distill_timing(distilled: Path) -> dict:
    """The timing.json that the distill.py run which wrote `distilled` keeps beside its sets ({"seconds",
    "iterations", "sync_seconds"}: matching only, evaluations excluded); {} when it has none."""
    return RunTiming.read(Path(distilled).parent)


def seconds_per_iteration(distilled: Path, missing: float = float("nan")) -> float:
    """Seconds per matching iteration of the distill.py run that wrote `distilled` (`distill_timing`); `missing`
    when it has no timing."""
    timing = distill_timing(distilled)
    return timing["seconds"] / max(timing.get("iterations", 0), 1) if "seconds" in timing else missing


def epochs_for(config: dict, size: int | str) -> list[str]:
    epochs = {str(k): v for k, v in compare_setting(config, "epochs_per_size").items()}
    return ["--epoch_eval_train", str(epochs[str(size)])] if str(size) in epochs else []


def full_data_row(config: dict, out: Path, expert_dir: Path, evaluate_flags: list[str]) -> Row:
    if compare_setting(config, "full") == "train":  # else "experts" (FULL_MODES)
        report = run_configuration(FULL_REPORT, ["--full", *epochs_for(config, FULL)], evaluate_flags, out / "results")
        return Row(FULL_LABEL, Kind.FULL, report, file=FULL_REPORT)
    found = read_expert_metrics(expert_dir)  # "experts": their last epoch, read off their metrics
    if len(found) < 2:
        raise UserError(f"the full-data row needs the metrics of at least 2 experts in {expert_dir}")
    finals = [{k: v for k, v in m["epochs"][-1].items() if k not in NOT_METRICS} for m in found.values()]
    epochs = found[min(found)]["epochs"][-1]["epoch"]
    return Row(f"{FULL_LABEL} ({len(found)} experts, {epochs} ep)", Kind.FULL,
               {"metrics": summarize_runs(finals), "source": "experts"})


def coreset_row(config: dict, results: Path, evaluate_flags: list[str], method: str, count: int, kind: Kind,
                need_file: bool = False) -> Row:
    """One coreset's row; with `need_file` (a later stage reads its pixels) a judged row whose coreset file is gone
    (e.g. a folder kept without its pixel files) is selected and judged again."""
    label = f"{method}-{count}"
    coreset_file = results / "coresets" / f"{label}.pt"
    if need_file and not coreset_file.is_file() and (results / f"{label}.json").is_file():
        print(f"[{label}] its coreset file {coreset_file} is gone and a transfer target reads it: selecting it again",
              flush=True)
        (results / f"{label}.json").unlink()
    flags = ["--coreset", method, "--coreset_size", str(count), "--coreset_file", str(coreset_file),
             *epochs_for(config, count)]
    return Row(label, kind, run_configuration(label, flags, evaluate_flags, results), method, count, file=label)


def forget_a_changed_set(results: Path, label: str, path: Path) -> None:
    """Deletes row `label`'s report when the set at `path` is not the one it judged: results/sets.json keeps the
    content digest of each judged set, so a file written again with the same set (a distillation redone to the same
    bits on a new checkout, a coreset selected again) keeps its row, and another set under the same name is judged
    again. A row judged before the record existed is judged again once."""
    record = results / SETS_RECORD
    digests = json.loads(record.read_text()) if record.is_file() else {}
    digest = content_digest(path)
    if digests.get(label) != digest:
        (results / f"{label}.json").unlink(missing_ok=True)
        digests[label] = digest
        atomic_write_json(digests, record)


def real_data_rows(config: dict, out: Path, expert_dir: Path, evaluate_flags: list[str]) -> list[Row]:
    """The rows of real pairs, in the table's order: the coresets of `coreset_methods` and the centroids at each of
    `coreset_sizes`, the random ladder, full data. They depend only on the experts and the protocol (one stage)."""
    results = out / "results"
    rows_part = {key: value for key, value in config["compare"].items() if key not in NOT_ROWS}
    Stage(out, "evaluate", evaluate_flags, [results], tail=[json.dumps(rows_part, sort_keys=True)]).begin()
    (results / "coresets").mkdir(parents=True, exist_ok=True)
    banner("evaluation: random ladder, coresets, full data")
    ladder = [coreset_row(config, results, evaluate_flags, RANDOM, int(count), Kind.LADDER)
              for count in compare_setting(config, "ladder")]
    others = []
    for count in compare_setting(config, "coreset_sizes"):
        # transfer targets judge the coresets of the distilled sizes from their files (comparison/transfer.py)
        need = bool(config.get("transfer")) and int(count) in set_sizes(config)
        others += [coreset_row(config, results, evaluate_flags, method, int(count), Kind.CORESET, need)
                   for method in compare_setting(config, "coreset_methods")]
        if compare_setting(config, "centroids"):
            others.append(coreset_row(config, results, evaluate_flags, CENTROIDS, int(count), Kind.CENTROIDS, need))
    return [*others, *ladder, full_data_row(config, out, expert_dir, evaluate_flags)]


def with_pooled(rows: list[Row]) -> list[Row]:
    """The distilled `rows` (one per seed) grouped by method and size, each group led by a row pooled over its seeds
    when it has several."""
    groups = {}
    for row in rows:
        groups.setdefault((row.method, row.size), []).append(row)
    out = []
    for (method, size), group in groups.items():
        if len(group) > 1:
            out.append(Row(f"{row_name(method, size)} ({len(group)} seeds)", Kind.DISTILLED,
                           pooled([row.report for row in group]), method, size, seeds=len(group)))
        out += group
    return out


def pooled(reports: list[dict]) -> dict:
    """One summary over the evaluation models of several reports (e.g. distillation seeds)."""
    runs = [dict(zip(r["metrics"], values)) for r in reports
            for values in zip(*(m["runs"] for m in r["metrics"].values()))]
    return {"metrics": summarize_runs(runs), "split": reports[0].get("split"), "lr": [r.get("lr") for r in reports],
            "epochs": [r.get("epochs") for r in reports], "parts": len(reports),
            "at_edge": sorted({dim for r in reports for dim in r.get("at_edge") or []})}


def distilled_row(config: dict, item: DistillRun, out: Path, expert_dir: Path, evaluate_flags: list[str],
                  results: Path) -> Row:
    """Distill one run (reused when done), then judge its best iteration (the one chosen on the selection split)
    with the protocol: a method with its own [common] settings uses its own experts for both."""
    owner = out  # the folder whose buffers/ holds the run's experts
    if item.config["common"] != config["common"]:  # other trainable parts or encoder: other experts
        encoder = other_encoder_only(config["common"], item.config["common"])
        if encoder:  # the experts of that encoder beside the main ones (shared with the methods matching it too)
            expert_dir = experts_stage(config, out, encoder)
        else:
            owner = out / "methods" / item.method
            expert_dir = experts_stage(item.config, owner)
        evaluate_flags = as_flags(item.config["common"]) + as_flags(config["evaluate"]) + ["--buffer_path",
                                                                                          str(expert_dir)]
    for encoder in item.config["distill"].get("extra_image_encoders") or []:  # beside the main encoder's
        experts_stage(item.config, owner, encoder)
    final, _ = distill_stage(item.config, out, expert_dir, item.seed, f"distill/{item.folder}")
    best = final.parent / "distilled_best.pt"
    forget_a_changed_set(results, item.label, best)
    report = run_configuration(item.label, ["--distilled", str(best)], evaluate_flags, results)
    return Row(item.label, Kind.DISTILLED, report, item.method, item.size, item.seed, file=item.label)


def other_encoder_only(common: dict, method_common: dict) -> str | None:
    """The image encoder a method's [common] names when that is all it changes (its experts are then
    experts_stage(config, out, encoder): the same folder and stage as an extra encoder's); else None. Not with
    image_weights in [common]: those are the main encoder's file."""
    rest = {key: value for key, value in method_common.items() if key != "image_encoder"}
    same_rest = rest == {key: value for key, value in common.items() if key != "image_encoder"}
    encoder = method_common.get("image_encoder")
    return encoder if same_rest and encoder and encoder != common.get("image_encoder") \
        and "image_weights" not in common else None


def shared_set(out: Path, runs: list[DistillRun]) -> Path:
    """The distilled set the pipeline shares: of the base method's runs at its smallest size (else the first
    method's), the seed whose best iteration scored highest on the selection split (ties: the first seed)."""
    first = [item for item in runs if item.method == runs[0].method and item.size == runs[0].size]
    base = [item for item in runs if item.method == BASE]
    group = [item for item in base if item.size == base[0].size] if base else first
    paths = [out / "distill" / item.folder / "distilled_best.pt" for item in group]
    scores = [load_distilled_set(path)["metrics"].get("r_mean", {}).get("mean", float("-inf")) for path in paths]
    return paths[scores.index(max(scores))]


def export_stage(config: dict, out: Path, runs: list[DistillRun]) -> Path | None:
    """export.py's folder of the shared set (`shared_set`) with the table on its card, rewritten on every run
    (it takes seconds); none with [compare] export = false."""
    if not compare_setting(config, "export") or not runs:  # (a config that only reduces has no set to share)
        return None
    chosen = shared_set(out, runs)
    banner(f"export: {chosen} -> {out / EXPORT}")
    run("export.py", ["set", str(chosen), "--out", str(out / EXPORT), "--results", str(out / "results.md"),
                      "--overwrite", "True"])
    return out / EXPORT
