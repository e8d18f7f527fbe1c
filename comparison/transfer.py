"""Transfer rows: the main table's sets judged by other encoders than they were made with ([transfer.<name>]).

A `[transfer.<name>]` table of a pipeline config names one encoder that judges, with [common]-style keys
(`image_encoder` and how much of it trains: `image_pretrained`, `image_weights`, `image_norm`, `train_stages`,
`image_projection`, `lora_rank`, `feature_views`, and `image_size`, the size it judges at: the sets' pixels are
resized to it with evaluate.py --eval_image_size; or `text_encoder`), and may add `evaluate = {...}` (evaluate.py
protocol flags for that encoder only), `ladder = [...]` and `epochs_per_size = {...}` (default: [compare]'s), and
`full = "none"` (no full-data row, for an encoder too slow to train on every pair: worth-N is read on the ladder).
After the main table, each target gets under out_dir/transfer/<name>/results:

- its own random ladder and full-data row: real pairs judged by that encoder (evaluate.py --coreset random / --full
  with [common] changed by the table), so that worth-N is read on that encoder's curve;
- every distilled set (each seed's best iteration, pooled over the seeds like the main table) and every coreset of
  the main table at the distilled sizes, judged with --distilled FILE and --eval_image_encoder NAME (the set's pixels,
  renormalised for NAME, train it; the table's other image keys go along) or --eval_text_encoder NAME (a distilled
  set's texts go over as their nearest real captions, a coreset's as its own captions, re-encoded by NAME). Random
  coresets among coreset_methods are left to the target's own ladder; the feature-centroid set holds trunk outputs,
  which only its own trunk takes, so an image-side transfer leaves it out.

Each target is a stage of its own (stamps/transfer_<name>.json): a changed table redoes that target alone, and a
set row is redone when its set changed since it was judged (the content digests in results/sets.json: a file
written again with the same set keeps its digest). transfer.md and
results.json's "transfer" entry hold the matrix: the sets as rows, one column per encoder (the main table's, then
each target), cells r_mean ± std (worth-N on that encoder's ladder).
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

from comparison.config import DistillRun, check_compare, compare_setting, distill_runs, set_sizes
from comparison.programs import run_configuration
from comparison.report import worth_column
from comparison.rows import FULL_LABEL, Kind, Row
from comparison.stages import (Stage, as_flags, banner, coreset_row, epochs_for, forget_a_changed_set, full_data_row,
                               with_pooled)
from evaluation.budgets import MISSING, cell
from evaluation.metrics import markdown_table
from networks import check_image_size
from networks.image_encoders import PACKAGED_WEIGHTS
from settings.choices import RANDOM
from settings.data import DataSettings
from settings.model import ModelSettings
from settings.programs import check_section, check_together, group_classes, known_keys
from utils.cli import UserError, suggestion
from utils.errors import SettingError

FOLDER = "transfer"        # out_dir/transfer/<name>/
REPORT = "transfer.md"
IMAGE_KEYS = ("image_encoder", "image_pretrained", "image_weights", "image_norm", "train_stages", "image_projection",
              "lora_rank", "feature_views", "image_size")
TEXT_KEYS = ("text_encoder",)
ENCODER_KEYS = (*IMAGE_KEYS, *TEXT_KEYS)
OWN_KEYS = ("evaluate", "ladder", "epochs_per_size", "full")  # what a target table holds besides encoder keys
TARGET_FULL = ("train", "none")  # a target's full-data row: evaluate.py --full with its encoder, or none
# evaluate.py flags that the pipeline gives per row: a target's `evaluate` table leaves them alone.
PER_ROW = ("coreset_size", "eval_image_encoder", "eval_image_size", "eval_text_encoder", "out", "overwrite")
PROTOCOL_GROUPS = ("judging", "protocol", "runtime")  # the evaluate.py groups a target's `evaluate` may change
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a target's name becomes a folder and a stamp file


@dataclass(frozen=True)
class Target:
    """One encoder that judges every set: the [common] settings it changes, its own evaluate.py flags, and its
    ladder settings ([compare] keys)."""

    name: str
    changes: dict
    evaluate: dict
    compare: dict

    @property
    def image(self) -> bool:
        return any(key in IMAGE_KEYS for key in self.changes)

    @property
    def text(self) -> bool:
        return "text_encoder" in self.changes

    @property
    def sides(self) -> list[str]:
        """Which sides of the model the target changes: image, text or both."""
        return [side for side, changed in (("image", self.image), ("text", self.text)) if changed]

    @property
    def summary(self) -> str:
        return ", ".join(f"{key} = {value}" for key, value in self.changes.items())

    def eval_values(self) -> dict:
        """What turns a set's evaluate.py call into this encoder's (evaluate.py settings): the encoder that trains
        instead of the set's, the size it trains at, the text encoder."""
        keys = (("eval_image_encoder", "image_encoder"), ("eval_image_size", "image_size"),
                ("eval_text_encoder", "text_encoder"))
        return {flag: self.changes[key] for flag, key in keys if key in self.changes}

    def eval_flags(self) -> list[str]:
        """eval_values as evaluate.py flags."""
        return [item for flag, value in self.eval_values().items() for item in (f"--{flag}", str(value))]


def current_value(config: dict, key: str):
    """What every program is given for the [common] key `key` (an encoder setting): [common]'s, else the default."""
    cls = next(cls for cls in (ModelSettings, DataSettings) if key in cls.names())
    return config["common"].get(key, getattr(cls(), key))


def transfer_targets(config: dict, where: str = "config") -> list[Target]:
    """The config's [transfer.<name>] tables, each checked before any work (see `check_target`)."""
    tables = config.get("transfer", {})
    return [check_target(config, name, table, f"{where} [transfer.{name}]") for name, table in tables.items()]


def check_target(config: dict, name: str, table, where: str) -> Target:
    """One target table: known keys of the right types (an unknown key named with the nearest valid one), a change
    of encoder that evaluate.py can make for a saved set, and protocol flags for the evaluation only."""
    if not isinstance(table, dict):
        raise UserError(f"{where} must be a table of encoder settings, got {table!r}; name each target: "
                        f"[transfer.<name>] image_encoder = \"...\"")
    if not NAME.fullmatch(name):
        raise UserError(f"{where}: the name {name!r} becomes a folder: use letters, digits, '_', '.' and '-'")
    for key in table:
        if key in OWN_KEYS or key in ENCODER_KEYS:
            continue
        if key == "text_model":
            raise UserError(f"{where}: text_model cannot be changed: evaluate.py --eval_text_encoder re-encodes with "
                            f"the text encoder's own model; name the encoder with text_encoder")
        if key in known_keys("evaluate"):
            hint = " (give it in evaluate = {...})" if key in protocol_keys() else ""
            raise UserError(f"{where}: {key} is not an encoder setting: a transfer changes only the encoder that "
                            f"judges, on the same data{hint}; its keys are {', '.join([*ENCODER_KEYS, *OWN_KEYS])}")
        raise UserError(f"{where}: unknown key {key!r}" + suggestion(key, [*ENCODER_KEYS, *OWN_KEYS],
                                                                     [*ENCODER_KEYS, *OWN_KEYS]))
    encoder = check_section("evaluate", {k: v for k, v in table.items() if k in ENCODER_KEYS}, where)
    evaluate = table.get("evaluate", {})
    if not isinstance(evaluate, dict):
        raise UserError(f"{where}: evaluate must be a table of evaluate.py flags, got {evaluate!r}")
    evaluate = check_section("evaluate", evaluate, f"{where} evaluate")
    misplaced = [key for key in evaluate if key not in protocol_keys()]
    if misplaced:
        raise UserError(f"{where} evaluate: {misplaced[0]} is not a protocol flag (the pipeline sets it per row, or "
                        f"it is an encoder or data setting: encoder settings go in the table itself)")
    compare = {key: table[key] for key in ("ladder", "epochs_per_size") if key in table}
    check_compare(compare, where)
    if "full" in table:
        if table["full"] not in TARGET_FULL:
            raise UserError(f"{where}: full must be \"train\" (full data judged with this encoder, the top of its "
                            f"ladder) or \"none\" (no full-data row: worth-N read on the ladder alone), got "
                            f"{table['full']!r}")
        compare["full"] = table["full"]
    if "ladder" in compare and (not compare["ladder"] or len(set(compare["ladder"])) != len(compare["ladder"])):
        raise UserError(f"{where}: ladder must list each set size once, got {compare['ladder']!r}")
    changes = {key: value for key, value in encoder.items() if value != current_value(config, key)}
    if not changes:
        raise UserError(f"{where} changes nothing: every setting it gives is already [common]'s; name another "
                        f"encoder (image_encoder or text_encoder) or another way to train it")
    target = Target(name, changes, evaluate, compare)
    check_calls(config, target, where)
    return target


def protocol_keys() -> set[str]:
    """The evaluate.py flags a target's `evaluate` table may give: the protocol and the choices, not the row."""
    groups = group_classes("evaluate")
    return {key for name in PROTOCOL_GROUPS for key in (*groups[name].names(), *groups[name].aliases())} - set(PER_ROW)


def check_calls(config: dict, target: Target, where: str) -> None:
    """The rules between flags on what evaluate.py will be given: the ladder's calls (the target's settings) and the
    sets' calls (each set's own encoder settings, the target's other image keys, the eval_* flag)."""
    judged = target_config(config, target)
    check_together("evaluate", {**judged["common"], **judged["evaluate"]}, f"{where} (its ladder and full data)")
    chosen, flags = target.eval_flags(), target.eval_values()
    for source in sources(config):
        check_together("evaluate", {**set_common(source, target), **judged["evaluate"], **flags},
                       f"{where} (evaluate.py --distilled with {' '.join(chosen) or 'its settings'})")
    encoder = target.changes.get("image_encoder")
    if encoder:
        try:
            check_image_size(encoder, int(current_value(judged, "image_size")), "image_encoder")
        except SettingError as err:
            raise UserError(f"{where}: image_encoder: {err}") from None
        if current_value(judged, "image_pretrained") and not judged["common"].get("image_weights") \
                and encoder not in PACKAGED_WEIGHTS:
            raise UserError(f"{where}: {encoder} has no pretrained weights offline ([common] image_pretrained is "
                            f"true): give it image_weights = PATH, or image_pretrained = false to train it from "
                            f"scratch")


def sources(config: dict) -> list[dict]:
    """The distinct [common] tables the main table's sets were made with (a method may change [common])."""
    found = [config["common"]]
    for item in distill_runs(config):
        if item.config["common"] not in found:
            found.append(item.config["common"])
    return found


def target_config(config: dict, target: Target) -> dict:
    """The config as the target's ladder and full-data rows see it: [common] with its changes (a text model of the
    old text encoder dropped), [evaluate] with its flags, [compare] with its ladder settings."""
    judged = copy.deepcopy(config)
    judged["common"] = {**{k: v for k, v in config["common"].items() if k not in replaced(target)}, **target.changes}
    judged["evaluate"].update(target.evaluate)
    judged["compare"].update(target.compare)
    return judged


def replaced(target: Target) -> set[str]:
    """The [common] keys that belong to an encoder the target replaces: its image weights, its text model."""
    keys = {"text_model"} if target.text else set()
    if "image_encoder" in target.changes and "image_weights" not in target.changes:
        keys.add("image_weights")
    return keys


def set_common(source: dict, target: Target) -> dict:
    """[common] of a set's evaluate.py call: the set's own encoders (evaluate.py refuses another text encoder than the
    set's), with the target's other image keys; the eval_* flags name the encoder that judges. image_norm is always
    given: a set file holds the normalisation its encoder resolved `auto` to, the new encoder resolves its own."""
    kept = {key: value for key, value in source.items() if key not in replaced(target) - {"text_model"}}
    kept.setdefault("image_norm", ModelSettings().image_norm)
    return {**kept, **{key: value for key, value in target.changes.items() if key not in ("image_encoder",
                                                                                          "image_size",
                                                                                          "text_encoder")}}


def transfer_stage(config: dict, out: Path, target: Target, main_rows: list[Row], runs: list[DistillRun]) -> list[Row]:
    """Every row of one target (reused while its settings and the set files are unchanged): the pooled distilled
    rows with their seeds, the coresets, the target's ladder and full data."""
    folder = out / FOLDER / target.name
    results = folder / "results"
    judged = target_config(config, target)
    shared = as_flags(judged["common"]) + as_flags(judged["evaluate"])
    ladder_part = {key: compare_setting(judged, key) for key in ("ladder", "epochs_per_size", "full")}
    Stage(out, f"transfer_{target.name}", shared, [folder], tail=[json.dumps(ladder_part, sort_keys=True)]).begin()
    (results / "coresets").mkdir(parents=True, exist_ok=True)
    banner(f"transfer to {target.name} ({target.summary}): every set, the random ladder, full data")
    sets = set_rows(config, out, target, judged, main_rows, runs, results)
    ladder = [coreset_row(judged, results, shared, RANDOM, int(count), Kind.LADDER)
              for count in compare_setting(judged, "ladder")]
    full = [full_data_row(judged, folder, None, shared)] if compare_setting(judged, "full") == "train" else []
    distilled = [row for row in sets if row.kind is Kind.DISTILLED]
    return [*with_pooled(distilled), *[row for row in sets if row.kind is not Kind.DISTILLED], *ladder, *full]


def judged_sets(config: dict, out: Path, target: Target, main_rows: list[Row], runs: list[DistillRun]):
    """(main row, set file, [common] it was made with) of every set the target judges (the module's docstring)."""
    made = {item.label: item for item in runs}
    sizes = set_sizes(config)
    for row in main_rows:
        if row.kind is Kind.DISTILLED and row.single_seed:
            item = made[row.label]
            yield row, out / "distill" / item.folder / "distilled_best.pt", item.config["common"]
        elif row.kind in (Kind.CORESET, Kind.CENTROIDS) and not row.random_coreset and row.size in sizes \
                and not (row.kind is Kind.CENTROIDS and target.image):
            yield row, out / "results" / "coresets" / f"{row.label}.pt", config["common"]


def set_rows(config: dict, out: Path, target: Target, judged: dict, main_rows: list[Row], runs: list[DistillRun],
             results: Path) -> list[Row]:
    """The target's rows of the main table's sets, each redone when its file changed since it was judged."""
    rows = []
    for row, path, source in judged_sets(config, out, target, main_rows, runs):
        forget_a_changed_set(results, row.label, path)
        epochs = [] if row.kind is Kind.DISTILLED else epochs_for(judged, row.size)
        flags = ["--distilled", str(path), *target.eval_flags(), *epochs]
        shared = as_flags(set_common(source, target)) + as_flags(judged["evaluate"])
        rows.append(replace(row, report=run_configuration(row.label, flags, shared, results)))
    return rows


# ---- the matrix -------------------------------------------------------------------------------------------------

def matrix_labels(main_rows: list[Row], columns: dict[str, list[Row]]) -> list[str]:
    """The matrix's rows: each distilled set pooled over its seeds (a single seed's row where there is one seed), the
    coresets every target judged, the rungs of any ladder by size, full data."""
    judged = {row.label for rows in columns.values() for row in rows}
    groups = {}  # (method, size) -> its first row: pooled over the seeds where there are several
    for row in main_rows:
        if row.kind is Kind.DISTILLED:
            groups.setdefault((row.method, row.size), row.label)
    coresets = [row.label for row in main_rows if row.kind in (Kind.CORESET, Kind.CENTROIDS) and row.label in judged]
    rungs = {row.size: row.label for rows in [main_rows, *columns.values()] for row in rows if row.kind is Kind.LADDER}
    full = [FULL_LABEL] if any(row.kind is Kind.FULL for rows in [main_rows, *columns.values()] for row in rows) else []
    return [*groups.values(), *coresets, *(rungs[size] for size in sorted(rungs)), *full]


def column_cells(rows: list[Row]) -> dict[str, dict]:
    """Label -> {"metrics", "worth_n"} of one encoder's rows (full data under FULL_LABEL)."""
    worth = worth_column(rows)
    return {FULL_LABEL if row.kind is Kind.FULL else row.label: {"metrics": row.report["metrics"],
                                                                "worth_n": worth[row.label]} for row in rows}


def side_note(target: Target, config: dict) -> str:
    """What changed for a target, in words, for the report's header."""
    notes = []
    if target.image:
        changed = ", ".join(f"{key} = {value}" for key, value in target.changes.items() if key in IMAGE_KEYS)
        notes.append(f"the image side changed ({changed}): the sets' pixels, renormalised for it, train it" +
                     ("; the feature-centroid set is left out (trunk outputs: only its own trunk takes them)"
                      if compare_setting(config, "centroids") else ""))
    if target.text:
        notes.append(f"the text side changed (text_encoder = {target.changes['text_encoder']}): a distilled set's "
                     f"texts went over as their nearest real captions, a coreset's as its own captions, re-encoded "
                     f"by {target.changes['text_encoder']}")
    judged = target_config(config, target)
    ladder = ", ".join(str(size) for size in compare_setting(judged, "ladder"))
    return f"- {target.name}: " + "; ".join(notes) + f"; its own random ladder ({ladder} pairs)" + \
        (" and full data." if compare_setting(judged, "full") == "train" else ".")


def write_transfer(out: Path, config: dict, targets: list[Target], main_rows: list[Row],
                   columns: dict[str, list[Row]]) -> None:
    """transfer.md and results.json's "transfer" entry (the matrix, each target's changes and ladder); printed too."""
    cells = {"main": column_cells(main_rows), **{name: column_cells(rows) for name, rows in columns.items()}}
    labels = matrix_labels(main_rows, columns)
    lines = [[label] + [text_cell(cells[column].get(label)) for column in cells] for label in labels]
    split = next((row.report.get("split") for row in main_rows if row.report.get("split")), "?")
    own = f"{current_value(config, 'image_encoder')} / {current_value(config, 'text_encoder')}"
    header = (f"r_mean on the {split} split on each encoder (mean ± std over the evaluation models; distilled rows "
              f"pooled over the seeds), and in brackets worth-N: the random real pairs that reach the same r_mean on "
              f"that encoder's own ladder. {MISSING}: not judged.\n\n- main: the encoders the sets were made with "
              f"({own}), the main table.\n" + "\n".join(side_note(target, config) for target in targets))
    table = markdown_table(["set", *cells], lines)
    (out / REPORT).write_text(f"{header}\n\n{table}\n")
    results = out / "results.json"
    summary = json.loads(results.read_text())
    summary["transfer"] = {
        "split": split, "columns": list(cells),
        "targets": {target.name: {"changes": target.changes, "sides": target.sides, "evaluate": target.evaluate,
                                  "ladder": compare_setting(target_config(config, target), "ladder")}
                    for target in targets},
        "rows": {label: {column: cells[column].get(label) for column in cells} for label in labels}}
    results.write_text(json.dumps(summary, indent=1))
    banner(f"transfer: r_mean on {split} (worth-N) on each encoder")
    print(table)
    print(f"wrote {out / REPORT}, the \"transfer\" entry of {results}")


def text_cell(found: dict | None) -> str:
    if found is None:
        return MISSING
    worth = found["worth_n"]
    return cell(found["metrics"]["r_mean"]) + (f" ({worth['text']})" if worth else "")


def transfer_rows(config: dict, out: Path, targets: list[Target], main_rows: list[Row], runs: list[DistillRun]) -> None:
    """Every target's rows, then the matrix; without targets, a transfer.md of an earlier run is removed."""
    if not targets:
        (out / REPORT).unlink(missing_ok=True)
        return
    columns = {target.name: transfer_stage(config, out, target, main_rows, runs) for target in targets}
    write_transfer(out, config, targets, main_rows, columns)
