"""The whole comparison in one command: experts -> coresets and full data -> a distilled set -> one table.

    python bench/pipeline.py configs/demo.toml            # what `make demo` runs
    python bench/pipeline.py configs/flickr8k.toml --data ../shared/data/flickr8k

The TOML file holds every setting: `[common]` flags go to every program (data set, encoders, image
size, ...), `[buffer]` to buffer.py, `[distill]` to distill.py, `[evaluate]` to every evaluate.py call
(the protocol: models, epochs, batch), and `[compare]` says which coresets to evaluate and how to get
the full-data row (`full = "experts"`: the final retrieval of the experts, which are full-data
training runs; or `full = "train"`: evaluate.py --full); `epochs_per_size = {1000 = 10}` gives
coresets of that size their own --epoch_eval_train (CPU budgets). Each stage records the flags it ran with;
re-running reuses every stage whose flags are unchanged (data caches, experts, the distilled set,
evaluations) and redoes a changed stage and everything after it. --fresh starts over.

Writes to `out_dir`: results.md (the table), results.json (every metric with its runs), the final
synthetic image grid and nearest captions, and buffers/, distill/, results/ with everything behind them.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_coresets import run_configuration  # noqa: E402
from data.distilled_set import load_distilled_set  # noqa: E402
from utils.buffers import expert_files, read_expert_metrics  # noqa: E402
from utils.cli import UserError, run_cli  # noqa: E402
from utils.metrics import format_table, markdown_table, summarize_runs, table_cells  # noqa: E402

SECTIONS = ("common", "buffer", "distill", "evaluate", "compare", "methods")  # methods: bench_methods.py
NOT_METRICS = ("epoch", "train_loss", "train_acc")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="TOML file with [common], [buffer], [distill], [evaluate], [compare]")
    parser.add_argument("--out_dir", default=None, help="output folder (default: out_dir in the config)")
    parser.add_argument("--data", default=None, help="image root of the data set (sets common.image_root)")
    parser.add_argument("--fresh", action="store_true", help="delete the output folder first")
    return parser.parse_args(argv)


def load_config(path: str, data: str | None) -> dict:
    try:
        with open(path, "rb") as handle:
            config = tomllib.load(handle)
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"config file {path} is not valid TOML ({err})") from None
    unknown = set(config) - set(SECTIONS) - {"out_dir"}
    if unknown:
        raise UserError(f"config file {path} has unknown sections {sorted(unknown)}; expected {', '.join(SECTIONS)}")
    for section in SECTIONS:
        config.setdefault(section, {})
    if data is not None:
        if not Path(data).is_dir():
            raise UserError(f"--data {data} is not a folder")
        config["common"]["image_root"] = str(Path(data).resolve())
    return config


def as_flags(section: dict) -> list[str]:
    flags = []
    for key, value in section.items():
        flags += [f"--{key}", str(value)]  # TOML booleans print as True/False, as the programs expect
    return flags


class Stage:
    """One step whose outputs are reused while the flags it ran with are unchanged."""

    def __init__(self, out: Path, name: str, flags: list[str], outputs: list[Path]):
        self.stamp = out / "stamps" / f"{name}.json"
        self.name, self.flags, self.outputs = name, flags, outputs

    def unchanged(self) -> bool:
        return self.stamp.is_file() and json.loads(self.stamp.read_text()) == self.flags

    def invalidate(self) -> None:
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


def run(program: str, flags: list[str]) -> None:
    command = [sys.executable, str(ROOT / program), *flags]
    print("$ " + " ".join(command), flush=True)
    code = subprocess.call(command, cwd=ROOT)
    if code != 0:
        raise UserError(f"{program} failed (exit {code}); the output above says why")


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
    return next(p.parent for p in buffers.glob("**/buffer_meta.json"))


def distill_stage(config: dict, out: Path, expert_dir: Path) -> tuple[Path, bool]:
    """The final distilled set, and whether it was (re)made in this invocation."""
    flags = as_flags(config["common"]) + as_flags(config["distill"])
    save_dir = out / "distill"
    stage = Stage(out, "distill", flags + [str(len(expert_files(expert_dir)))], [save_dir])
    final = save_dir / "distilled_last.pt"
    iterations = int(config["distill"].get("Iteration", 50000))
    if stage.unchanged() and final.is_file() and load_distilled_set(final)["iteration"] == iterations:
        banner(f"distillation: reusing {final}")
        return final, False
    stage.begin()
    resume = ["--resume", str(final)] if final.is_file() else []
    banner("distillation" + (f": resuming {final}" if resume else ""))
    run("distill.py", flags + ["--buffer_path", str(expert_dir), "--save_dir", str(save_dir), *resume])
    return final, True


def full_data_row(config: dict, out: Path, expert_dir: Path, evaluate_flags: list[str]) -> tuple[str, dict]:
    mode = config["compare"].get("full", "experts")
    if mode == "experts":
        found = read_expert_metrics(expert_dir)
        if len(found) < 2:
            raise UserError(f"the full-data row needs the metrics of at least 2 experts in {expert_dir}")
        finals = [{k: v for k, v in m["epochs"][-1].items() if k not in NOT_METRICS} for m in found.values()]
        epochs = found[min(found)]["epochs"][-1]["epoch"]
        return f"full data ({len(found)} experts, {epochs} ep)", {"metrics": summarize_runs(finals), "source": "experts"}
    if mode == "train":
        report = run_configuration("full", ["--full"], evaluate_flags, out / "results")
        return "full data", report
    raise UserError(f"[compare] full must be 'experts' or 'train', got {mode!r}")


def main(argv=None) -> int:
    args = parse_args(argv)
    config = load_config(args.config, args.data)
    out = Path(args.out_dir or config.get("out_dir", "outputs/pipeline"))
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    started, times = time.time(), {}

    expert_dir = experts_stage(config, out)
    times["data + experts"] = time.time() - started

    # Real-data rows first: they depend only on the experts and the protocol, so a distillation that
    # fails or is retuned never costs them.
    results = out / "results"
    evaluate_flags = as_flags(config["common"]) + as_flags(config["evaluate"]) + ["--buffer_path", str(expert_dir)]
    Stage(out, "evaluate", evaluate_flags + [str(config["compare"])], [results]).begin()
    (results / "coresets").mkdir(parents=True, exist_ok=True)
    banner("evaluation: coresets and full data")
    size = int(config["distill"].get("num_queries", 100))
    reports = {}
    epochs = {int(k): v for k, v in config["compare"].get("epochs_per_size", {}).items()}
    for count in config["compare"].get("coreset_sizes", [size, 10 * size]):
        for method in config["compare"].get("coreset_methods", ["random"]):
            label = f"{method}-{count}"
            flags = ["--coreset", method, "--num_queries", str(count),
                     "--coreset_file", str(results / "coresets" / f"{label}.pt")]
            flags += ["--epoch_eval_train", str(epochs[count])] if count in epochs else []
            reports[label] = run_configuration(label, flags, evaluate_flags, results)
    label, reports_full = full_data_row(config, out, expert_dir, evaluate_flags)
    reports[label] = reports_full
    times["coresets + full data"] = time.time() - started - sum(times.values())

    distilled, remade = distill_stage(config, out, expert_dir)
    times["distillation"] = time.time() - started - sum(times.values())
    banner("evaluation: distilled set")
    label = f"distilled-{len(load_distilled_set(distilled)['image_syn'])}"
    if remade:
        (results / f"{label}.json").unlink(missing_ok=True)
    reports = {label: run_configuration(label, ["--distilled", str(distilled)], evaluate_flags, results), **reports}
    times["distilled evaluation"] = time.time() - started - sum(times.values())

    write_outputs(out, distilled, reports, times)
    return 0


def write_outputs(out: Path, distilled: Path, reports: dict[str, dict], times: dict[str, float]) -> None:
    summaries = {label: r["metrics"] for label, r in reports.items()}
    (out / "results.md").write_text(markdown_table(*table_cells(summaries)) + "\n")
    (out / "results.json").write_text(json.dumps({"rows": summaries, "stage_seconds": times}, indent=1))
    tag = f"{load_distilled_set(distilled)['iteration']:06d}"
    for name in (f"synthetic_images_plain_{tag}.png", f"synthetic_images_clipped_{tag}.png",
                 f"nearest_captions_{tag}.txt"):
        if (distilled.parent / name).is_file():
            shutil.copyfile(distilled.parent / name, out / name.replace(f"_{tag}", ""))
    banner("results (mean ± std over evaluation models; full data: over experts)")
    print(format_table(summaries))
    print(verdict(summaries))
    print("\n" + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()) +
          f"; total {sum(times.values()) / 60:.1f} min")
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'synthetic_images_plain.png'}, "
          f"{out / 'nearest_captions.txt'}")


def verdict(summaries: dict[str, dict]) -> str:
    """The two claims of the paper's table, checked on these numbers."""
    distilled = next((v["r_mean"] for k, v in summaries.items() if k.startswith("distilled-")), None)
    lines = []
    for label, summary in summaries.items():
        if label.startswith("random-") and distilled is not None:
            other = summary["r_mean"]
            margin = (distilled["mean"] - other["mean"]) / max(distilled["std"], other["std"], 1e-12)
            lines.append(f"distilled r_mean {distilled['mean']:.2f} vs {label} {other['mean']:.2f}: "
                         f"{'+' if margin >= 0 else ''}{margin:.1f} std")
    return "\n".join(lines)


if __name__ == "__main__":
    run_cli(main)
