"""A pipeline config (pipeline.py, bench/bench_methods.py, bench/bench_regimes.py): reading it, checking every
setting before any work, and the distillation runs it asks for.

Besides the programs' sections ([common], [buffer], [distill], [evaluate]) and [compare] (comparison/pipeline.py
says what each builds), a config may distill several set sizes and methods:

- `[compare] budgets = [100, 200, 500, 1000]`: one distillation per size (its `--num_pairs`) and seed; the coresets
  default to the same sizes. `[budgets.<N>] distill = {...}` changes distill.py flags at size N only (e.g. a larger
  `mini_batch_size`).
- `[compare] methods = ["base", "lors", "repblend"]`: `base` is [distill] itself; every other method adds its
  `[methods.<name>]` table on top (`common = {...}`, `distill = {...}`; DEFAULT_METHODS when the config has none),
  at the sizes in its `budgets` (default: every size). A method whose [common] differs trains its own experts.
"""
from __future__ import annotations

import copy
import tomllib
from dataclasses import dataclass
from pathlib import Path

from matching.encoders import check_extra_encoders
from settings.base import Settings, coerce, path_problem, value_problem
from settings.data import DataSettings
from settings.distillation import DistillSettings
from settings.experts import ExpertSettings
from settings.judging import JudgingSettings, TargetSettings
from settings.model import ModelSettings
from settings.programs import check_section, check_together
from settings.protocol import ProtocolSettings
from settings.runtime import RuntimeSettings, check_seed
from utils.cli import UserError, os_error_reason, suggestion

SECTIONS = ("common", "buffer", "distill", "evaluate", "compare", "methods", "budgets", "regimes",  # [regimes]: comparison/regimes.py
            "transfer",  # [transfer.<name>]: comparison/transfer.py (checked by the pipeline, which runs them)
            "reduce")  # [reduce]: comparison/reduced.py (checked by the pipeline, which runs it)
FULL = "all"  # the key of the full-data row in `epochs_per_size`
# The sections whose keys are flags of a program, and the keys the pipeline itself reads there.
PROGRAM_SECTIONS = {"buffer": ("buffer", ()), "distill": ("distill", ("seeds",)), "evaluate": ("evaluate", ())}
# The [compare] keys that are lists of values of an evaluate.py flag, and that flag's settings field.
COMPARE_LISTS = {"ladder": (JudgingSettings, "coreset_size"), "coreset_sizes": (JudgingSettings, "coreset_size"),
                 "coreset_methods": (TargetSettings, "coreset"), "budgets": (DistillSettings, "num_pairs")}
COMPARE_KEYS = (*COMPARE_LISTS, "centroids", "full", "epochs_per_size", "methods", "default_experts", "export")
FULL_MODES = ("train", "experts")
BASE = "base"  # the paper's method: [distill] as it is
BASE_ROWS = "distilled"  # what the base method's rows are called: distilled-<size>; another method's: <method>-<size>
# What [compare] means by a key it leaves out (`compare_setting`); `ladder` (the first set size and ten times it)
# and `coreset_sizes` (the set sizes) follow from the config. `default_experts` is how many experts the pipeline
# trains when [buffer] leaves num_experts out: a default of the pipeline's own, on purpose not buffer.py's (100, the
# papers' count, days of training on a CPU), and a [compare] key a config may set like any other.
COMPARE_DEFAULTS = {"coreset_methods": [], "centroids": False, "full": "train", "epochs_per_size": {},
                    "methods": [BASE], "default_experts": 3, "export": True}
# The [compare] keys that change what the distillations or experts are, not which real-data rows are built: the
# evaluation stage's stamp leaves them out.
NOT_ROWS = ("budgets", "methods", "default_experts", "export")
DEFAULT_OUT_DIR = "outputs/pipeline"  # where a config without out_dir writes (when no --out_dir is given)


def setting_value(config: dict, section: str, cls: type[Settings], key: str):
    """What the program run from `section` is given for `key`: the section's value, else [common]'s, else the
    default of the settings field `cls.key` (settings/ holds every program default; comparison/ restates none)."""
    return {**config["common"], **config[section]}.get(key, getattr(cls(), key))


def selection_split(config: dict) -> str:
    """The split the choices are made on: [common] eval_split, or the programs' default."""
    return setting_value(config, "common", DataSettings, "eval_split")


def compare_setting(config: dict, key: str):
    """[compare] `key`, or what it means when the config leaves it out (COMPARE_DEFAULTS)."""
    compare = config["compare"]
    if key in compare:
        return compare[key]
    if key == "ladder":
        first = set_sizes(config)[0]
        return [first, 10 * first]
    if key == "coreset_sizes":
        return set_sizes(config)
    return copy.deepcopy(COMPARE_DEFAULTS[key])


def load_config(path: str, data: str | None) -> dict:
    try:
        with open(path, "rb") as handle:
            config = tomllib.load(handle)
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except OSError as err:  # a folder, no permission, a name too long, ...
        raise UserError(f"config file {path} cannot be read: {os_error_reason(err)}; give the path of a TOML "
                        f"file") from None
    except UnicodeDecodeError as err:
        raise UserError(f"config file {path} is not UTF-8 text (byte {err.object[err.start:err.start + 1]!r} at "
                        f"position {err.start}), as TOML must be; save it as UTF-8") from None
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"config file {path} is not valid TOML ({err})") from None
    except RecursionError:
        raise UserError(f"config file {path} is nested too deeply to read: it is damaged or not a config file") from None
    unknown = set(config) - set(SECTIONS) - {"out_dir"}
    if unknown:
        raise UserError(f"config file {path} has unknown sections {sorted(unknown)}; expected {', '.join(SECTIONS)}")
    out_dir = config.get("out_dir")
    problem = path_problem(out_dir) if isinstance(out_dir, str) or out_dir is None else "must be a string"
    if problem:
        raise UserError(f"config file {path}: out_dir {problem}, got {config['out_dir']!r}")
    for section in SECTIONS:
        config.setdefault(section, {})
        if not isinstance(config[section], dict):
            raise UserError(f"config file {path}: [{section}] must be a table, got {config[section]!r}")
    check_sections(config, f"config file {path}")
    check_budgets(config, f"config file {path}")
    if data is not None:
        if not Path(data).is_dir():
            raise UserError(f"--data {data} is not a folder")
        config["common"]["image_root"] = str(Path(data).resolve())
    return config


def check_sections(config: dict, where: str) -> dict:
    """Check the program sections of a config in place, before any work: each section against the program's typed
    settings (settings/programs.py: an unknown key is an error naming the nearest valid one, a value of the
    wrong type or out of range an error naming the key), then the rules between flags on what each program
    will be given ([common] with its section), and the distillation seeds."""
    for program in PROGRAM_SECTIONS:
        config["common"] = check_section(program, config["common"], f"{where} [common]")
    for section, (program, extra) in PROGRAM_SECTIONS.items():
        config[section] = check_section(program, config[section], f"{where} [{section}]", extra)
        flags = {key: value for key, value in config[section].items() if key not in extra}
        check_together(program, {**config["common"], **flags}, f"{where} [common] with [{section}]")
    given = {**config["common"], **config["distill"]}
    try:  # the rules between distill.py's groups that its sections alone do not show
        check_extra_encoders(*(cls(**{k: v for k, v in given.items() if k in cls.names()})
                               for cls in (ModelSettings, DistillSettings)))
    except UserError as err:
        raise UserError(f"{where} [common] with [distill]: {err}") from None
    distill_settings(config, where)
    check_expert_length(config, where)
    check_compare(config["compare"], f"{where} [compare]")
    return config


def check_expert_length(config: dict, where: str) -> None:
    """The experts the pipeline trains are long enough for its distillation (distill.py would say so only after
    they trained): train_epochs + 1 snapshots >= max_start_epoch + expert_epochs."""
    epochs = int(setting_value(config, "buffer", ExpertSettings, "train_epochs"))
    start, span = (int(setting_value(config, "distill", DistillSettings, key))
                   for key in ("max_start_epoch", "expert_epochs"))
    if epochs + 1 < start + span:
        raise UserError(f"{where}: [buffer] train_epochs {epochs} gives {epochs + 1} snapshots per expert, but "
                        f"[distill] max_start_epoch {start} and expert_epochs {span} need {start + span}; train "
                        f"longer experts or lower those")


def compare_value(cls, name: str, value, where: str, key: str):
    """A [compare] value that becomes evaluate.py's `--name`: the same type and range as the flag."""
    field = next(f for f in cls.specs() if f.name == name)
    value = coerce(field, value, where, key)
    problem = value_problem(field, value)
    if problem:
        raise UserError(f"{where}: {key} {problem}")
    return value


def check_compare(compare: dict, where: str) -> None:
    """The [compare] table: known keys, and values that the evaluate.py calls they become accept."""
    for key, value in compare.items():
        if key not in COMPARE_KEYS:
            raise UserError(f"{where}: unknown key {key!r}" + suggestion(key, COMPARE_KEYS, COMPARE_KEYS))
        if key in COMPARE_LISTS:
            if not isinstance(value, list):
                raise UserError(f"{where}: {key} must be a list, got {value!r}")
            for item in value:
                compare_value(*COMPARE_LISTS[key], item, where, key)
    if "default_experts" in compare:
        compare_value(ExpertSettings, "num_experts", compare["default_experts"], where, "default_experts")
    for key in ("centroids", "export"):
        if not isinstance(compare.get(key, COMPARE_DEFAULTS[key]), bool):
            raise UserError(f"{where}: {key} must be true or false, got {compare[key]!r}")
    if compare.get("full", COMPARE_DEFAULTS["full"]) not in FULL_MODES:
        raise UserError(f"{where}: full must be 'train' (the evaluation protocol on all pairs) or 'experts', "
                        f"got {compare['full']!r}")
    epochs = compare.get("epochs_per_size", COMPARE_DEFAULTS["epochs_per_size"])
    if not isinstance(epochs, dict):
        raise UserError(f"{where}: epochs_per_size must be a table such as {{1000 = 10, {FULL} = 4}}, got {epochs!r}")
    for size, count in epochs.items():
        if size != FULL and not (size.isdigit() and int(size) > 0):
            raise UserError(f"{where}: epochs_per_size keys are set sizes or {FULL!r}, got {size!r}")
        compare_value(ProtocolSettings, "epoch_eval_train", count, where, f"epochs_per_size.{size}")


def distill_settings(config: dict, where: str = "config") -> tuple[dict, list[int]]:
    """The distill.py flags without `seeds`, and the distillation seeds (default: the one `seed`)."""
    settings = dict(config["distill"])
    seeds = settings.pop("seeds", None)
    if seeds is None:
        seeds = [int(setting_value(config, "distill", RuntimeSettings, "seed"))]
    whole = [isinstance(s, int) and not isinstance(s, bool) for s in seeds] if isinstance(seeds, list) else [False]
    if not seeds or not all(whole):
        raise UserError(f"{where} [distill]: seeds must be a non-empty list of whole numbers, got {seeds!r}")
    problem = next((check_seed(s) for s in seeds if check_seed(s)), None)
    if problem:
        raise UserError(f"{where} [distill]: seeds: each {problem}, got {seeds!r}")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:  # one run per seed: a repeated seed would be one run counted as several
        raise UserError(f"{where} [distill]: seeds lists {', '.join(map(str, repeated))} more than once, got {seeds!r}; "
                        f"give each seed once")
    return settings, seeds


# The extensions' settings when a config has no [methods.<name>] table (LoRS, Xu et al. 2024; RepBlend, which builds
# on LoRS and adds an image head over a frozen encoder and representation blending). docs/method.md compares them
# with the authors' code.
LORS = {"sim_type": "lowrank", "sim_rank": 10, "sim_alpha": 1.0, "lr_sim": 1.0, "loss_type": "infonce"}  # 10 diverged on shapes
DEFAULT_METHODS = {
    "base": {},
    "lors": {"distill": dict(LORS)},
    "repblend": {"common": {"image_projection": True}, "distill": {**LORS, "blend_alpha": 1.0}},
}
METHOD_KEYS = ("common", "distill", "budgets")  # what a [methods.<name>] table may hold


def method_table(config: dict, name: str, where: str = "config") -> dict:
    """The [methods.<name>] table (DEFAULT_METHODS when the config has none), its keys checked; `where` names the
    config in messages."""
    if name == BASE:
        return {}
    extra = config.get("methods", {}).get(name, DEFAULT_METHODS.get(name))
    if extra is None:
        raise UserError(f"{where}: unknown method {name!r} in [compare] methods: give it a [methods.{name}] table "
                        f"(known: {', '.join(DEFAULT_METHODS)})")
    where = f"{where} [methods.{name}]"
    if not isinstance(extra, dict):
        raise UserError(f"{where} must be a table, got {extra!r}")
    for key, value in extra.items():
        if key not in METHOD_KEYS:
            raise UserError(f"{where}: unknown key {key!r} (valid keys: {', '.join(METHOD_KEYS)})")
        if key != "budgets" and not isinstance(value, dict):
            raise UserError(f"{where}: {key} must be a table of {key} flags, got {value!r}")
    return extra


def method_config(config: dict, name: str, budget: int | None = None, where: str = "config") -> dict:
    """The pipeline config with the method's `common` and `distill` settings on top, and at size `budget` that
    size's `[budgets.<N>] distill` flags and `num_pairs = budget`; checked as a whole."""
    extra = method_table(config, name, where)
    merged = copy.deepcopy(config)
    for section in ("common", "distill"):
        merged[section].update(extra.get(section, {}))
    if name != BASE:
        where += f", method {name} ([methods.{name}] on top)"
    if budget is not None:
        merged["distill"].update(config.get("budgets", {}).get(str(budget), {}).get("distill", {}))
        merged["distill"]["num_pairs"] = budget
        where += f" at {budget} pairs"
    return check_sections(merged, where)


@dataclass
class DistillRun:
    """One distillation the config asks for: a method at a set size with one seed."""

    method: str
    size: int
    seed: int
    config: dict    # the whole config as this run sees it (method_config)
    folder: str     # under out_dir/distill
    label: str      # its row: distilled-N (seed s) for the base method, <method>-N (seed s) for the others


def budgets_of(config: dict) -> list[int] | None:
    """[compare] budgets, or None for a config that distills one size ([distill] num_pairs)."""
    budgets = config["compare"].get("budgets")
    return None if budgets is None else [int(b) for b in budgets]


def set_sizes(config: dict) -> list[int]:
    """The distilled set sizes: [compare] budgets, else [distill] num_pairs."""
    return budgets_of(config) or [int(setting_value(config, "distill", DistillSettings, "num_pairs"))]


def method_names(config: dict) -> list[str]:
    return list(compare_setting(config, "methods"))


def row_name(method: str, size: int) -> str:
    return f"{BASE_ROWS if method == BASE else method}-{size}"


def distill_runs(config: dict, where: str = "config") -> list[DistillRun]:
    """Every distillation of the config, smallest size first, then by method and seed; each run's settings are
    checked here, before any work. A config with neither budgets nor methods keeps its folders distill/seed<s>."""
    _, seeds = distill_settings(config, where)
    sizes, names = set_sizes(config), method_names(config)
    legacy = budgets_of(config) is None and names == [BASE]
    runs = []
    for size in sizes:
        for name in names:
            allowed = method_table(config, name, where).get("budgets")
            if allowed is not None and size not in allowed:
                continue
            merged = method_config(config, name, size if not legacy else None, where)
            for seed in seeds:
                folder = f"seed{seed}" if legacy else f"{name}-{size}/seed{seed}"
                runs.append(DistillRun(name, size, seed, merged, folder, f"{row_name(name, size)} (seed {seed})"))
    return runs


def check_budgets(config: dict, where: str) -> None:
    """[compare] budgets and methods, [budgets.<N>] and each method's budgets: known sizes and names, and every
    distillation's settings valid (distill_runs)."""
    compare, budgets = config["compare"], budgets_of(config)
    if budgets is not None:
        if "num_pairs" in config["distill"] or "num_queries" in config["distill"]:
            raise UserError(f"{where}: give the set sizes in [compare] budgets or in [distill] num_pairs, not both")
        if not budgets or len(set(budgets)) != len(budgets):
            raise UserError(f"{where} [compare]: budgets must list each set size once, got {compare['budgets']!r}")
    sizes = set_sizes(config)
    for key, table in config.get("budgets", {}).items():
        if not (isinstance(key, str) and key.isdigit() and int(key) in sizes):
            raise UserError(f"{where} [budgets]: {key!r} is not one of the set sizes {sizes} ([compare] budgets)")
        if not isinstance(table, dict) or set(table) - {"distill"} or not isinstance(table.get("distill", {}), dict):
            raise UserError(f"{where} [budgets.{key}]: only a distill = {{...}} table of distill.py flags is "
                            f"allowed, got {table!r}")
    names = compare_setting(config, "methods")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names) \
            or not (names or config.get("reduce")):
        raise UserError(f"{where} [compare]: methods must be a non-empty list of method names, each once (empty only "
                        f"in a config that reduces: [reduce]), got {names!r}")
    for name in names:
        allowed = method_table(config, name, where).get("budgets")
        if allowed is not None and not (isinstance(allowed, list) and allowed and set(allowed) <= set(sizes)):
            raise UserError(f"{where} [methods.{name}]: budgets must be a non-empty list of the set sizes {sizes}, "
                            f"got {allowed!r}")
    distill_runs(config, where)
