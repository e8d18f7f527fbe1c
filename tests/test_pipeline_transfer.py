"""Transfer rows ([transfer.<name>] tables of a pipeline config): every set of the toy table judged by other image
encoders, each with its own ladder and worth-N; reuse; and one clear error per bad table."""
from __future__ import annotations

import json
import string

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import evaluate
from comparison import pipeline, programs
from comparison.config import load_config
from comparison.transfer import ENCODER_KEYS, OWN_KEYS, set_common, target_config, transfer_targets
from data.distilled_set import content_digest
from evaluation.worth import worth_n
from settings.programs import known_keys
from tests.test_pipeline import TOY, launch_in_process
from utils.cli import UserError

TARGETS = """
[transfer.w32]
image_encoder = "convnet_w32"
image_norm = "imagenet"
evaluate = {num_eval = 1}
[transfer.w64]
image_encoder = "convnet_w64"
image_size = 8
ladder = [6, 24]
full = "none"
"""
SETS = ["distilled-6 (seed 0)", "distilled-6 (seed 1)", "kmeans-6"]  # what each target judges with --distilled


def toy_text(tiny_shapes, cache_dir, out) -> str:
    """The toy table, smaller (two rungs, no grid), with two image-encoder targets."""
    text = TOY.format(out=out, root=tiny_shapes, cache=cache_dir)
    for old, new in (("ladder = [6, 12, 24]", "ladder = [6, 12]"), ("lr_grid = [0.03, 0.1]\n", ""),
                     ("epoch_scales = [1, 2]\nwiden_grid = 1\n", "")):
        assert old in text
        text = text.replace(old, new)
    return text + TARGETS


def counting_launcher(launched: list):
    def launch(program, flags, log=None):
        launched.append((program, flags))
        return launch_in_process(program, flags, log)
    return launch


@pytest.fixture(scope="module")
def transfer_run(tiny_shapes, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("transfer")
    config = out / "toy.toml"
    config.write_text(toy_text(tiny_shapes, cache_dir, out / "run"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(programs, "launch", launch_in_process)
        assert pipeline.main([str(config)]) == 0
    return config, out / "run"


def report(out, target: str, label: str) -> dict:
    return json.loads((out / "transfer" / target / "results" / f"{label}.json").read_text())


def value_after(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_each_target_judges_every_set_and_its_own_ladder_with_its_flags(transfer_run):
    _, out = transfer_run
    for target, encoder, rungs, size in (("w32", "convnet_w32", [6, 12], 16), ("w64", "convnet_w64", [6, 24], 8)):
        for label in SETS:
            judged = report(out, target, label)
            command = judged["config"]["command"]
            assert value_after(command, "--eval_image_encoder") == encoder and judged["image_encoder"] == encoder
            assert value_after(command, "--image_encoder") == "convnet"  # the set's own, as evaluate.py wants it
            assert value_after(command, "--image_size") == "16"  # the set's own size ...
            assert judged["config"]["image_size"] == size  # ... resized by --eval_image_size where the target says
            assert ("--eval_image_size" in command) == (size != 16)
            source = value_after(command, "--distilled")
            assert source.endswith(f"distill/seed{label[-2]}/distilled_best.pt" if "seed" in label else
                                   "results/coresets/kmeans-6.pt")
        for rung in rungs:
            judged = report(out, target, f"random-{rung}")
            command = judged["config"]["command"]
            assert value_after(command, "--image_encoder") == encoder and value_after(command, "--coreset") == "random"
            assert "--eval_image_encoder" not in command and judged["config"]["image_size"] == size
    assert value_after(report(out, "w32", "full")["config"]["command"], "--image_encoder") == "convnet_w32"
    assert not (out / "transfer" / "w64" / "results" / "full.json").exists()  # full = "none"
    # the table's other image keys and its own protocol flags reach the set's call too
    for label in ("distilled-6 (seed 0)", "random-6", "full"):
        judged = report(out, "w32", label)
        assert judged["config"]["image_norm_used"] == "imagenet" and len(judged["metrics"]["r_mean"]["runs"]) == 1
    assert len(report(out, "w64", "kmeans-6")["metrics"]["r_mean"]["runs"]) == 2
    assert {p.name for p in (out / "transfer" / "w64" / "results" / "coresets").iterdir()} == {"random-6.pt",
                                                                                               "random-24.pt"}


def test_worth_n_is_read_on_each_encoders_own_ladder(transfer_run):
    _, out = transfer_run
    entry = json.loads((out / "results.json").read_text())["transfer"]
    assert entry["columns"] == ["main", "w32", "w64"] and entry["targets"]["w64"]["ladder"] == [6, 24]
    assert entry["targets"]["w32"]["changes"] == {"image_encoder": "convnet_w32", "image_norm": "imagenet"}
    rows = entry["rows"]
    for target, rungs in (("w32", ("random-6", "random-12")), ("w64", ("random-6", "random-24"))):
        ladder = {report(out, target, label)["config"]["set_size"]: report(out, target, label)["metrics"]["r_mean"]
                  for label in (*rungs, "full") if target == "w32" or label != "full"}  # w64: no full data
        seeds = [report(out, target, f"distilled-6 (seed {s})")["metrics"]["r_mean"]["runs"] for s in (0, 1)]
        pooled = rows["distilled-6 (2 seeds)"][target]
        assert pooled["metrics"]["r_mean"]["runs"] == seeds[0] + seeds[1]
        for label in ("distilled-6 (2 seeds)", "kmeans-6"):
            summary = rows[label][target]["metrics"]["r_mean"]
            assert rows[label][target]["worth_n"] == worth_n(ladder, summary["mean"], summary["std"]).as_dict()
        assert rows[rungs[0]][target]["worth_n"] is None
    assert rows["full data"]["w32"]["worth_n"] is None and rows["full data"]["w64"] is None
    main = json.loads((out / "results.json").read_text())
    assert rows["kmeans-6"]["main"] == {"metrics": main["rows"]["kmeans-6"], "worth_n": main["worth_n"]["kmeans-6"]}
    assert rows["random-12"]["w64"] is None and rows["random-24"]["main"] is None  # a rung of one ladder only


def test_transfer_md_holds_the_matrix(transfer_run):
    _, out = transfer_run
    text = (out / "transfer.md").read_text()
    assert "- w32: the image side changed (image_encoder = convnet_w32, image_norm = imagenet)" in text
    assert "own random ladder (6, 24 pairs)" in text
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert lines[0] == "| set | main | w32 | w64 |"
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["distilled-6 (2 seeds)", "kmeans-6", "random-6",
                                                                   "random-12", "random-24", "full data"]
    rows = json.loads((out / "results.json").read_text())["transfer"]["rows"]
    cells = lines[2].split("|")[2:5]
    for cell, column in zip(cells, ("main", "w32", "w64")):
        found = rows["distilled-6 (2 seeds)"][column]
        r_mean = found["metrics"]["r_mean"]
        assert cell.strip() == f"{r_mean['mean']:.2f} ± {r_mean['std']:.2f} ({found['worth_n']['text']})"


def test_a_rerun_reuses_every_row_and_a_changed_table_redoes_only_its_target(transfer_run, monkeypatch, capsys):
    config, out = transfer_run
    launched = []
    monkeypatch.setattr(programs, "launch", counting_launcher(launched))
    assert pipeline.main([str(config)]) == 0
    assert [program for program, _ in launched if program != "export.py"] == []  # export.py: rewritten every run
    assert "[distilled-6 (seed 0)] done before" in capsys.readouterr().out
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "transfer" / "w32" / "results").glob("*.json")}
    config.write_text(config.read_text().replace("ladder = [6, 24]", "ladder = [6, 24]\nevaluate = {num_eval = 1}"))
    launched.clear()
    assert pipeline.main([str(config)]) == 0
    judged = [flags[flags.index("--out") + 1] for program, flags in launched if program == "evaluate"]
    assert len(judged) == 5 and all("/transfer/w64/results/" in path for path in judged)  # 3 sets, 2 rungs
    assert {p.name: p.stat().st_mtime_ns for p in (out / "transfer" / "w32" / "results").glob("*.json")} == kept
    assert len(report(out, "w64", "kmeans-6")["metrics"]["r_mean"]["runs"]) == 1
    # a set whose file is not the one its row judged (e.g. distilled again) is judged again, alone
    record = out / "transfer" / "w32" / "results" / "sets.json"
    digests = json.loads(record.read_text())
    record.write_text(json.dumps({**digests, "kmeans-6": "0" * 64}))
    launched.clear()
    assert pipeline.main([str(config)]) == 0
    judged = [flags[flags.index("--out") + 1] for program, flags in launched if program == "evaluate"]
    assert judged == [str(out / "transfer" / "w32" / "results" / "kmeans-6.json")]
    assert json.loads(record.read_text()) == digests


def test_a_coreset_file_gone_is_selected_again_and_the_same_set_keeps_the_targets_rows(transfer_run, monkeypatch):
    """A folder kept without its coresets' pixel files (bench/results keeps only the reports): the coreset the targets
    read is selected and judged again in the main table, to the same set (the file differs in its run's name and
    timing only), so no target judges it again."""
    config, out = transfer_run
    coreset = out / "results" / "coresets" / "kmeans-6.pt"
    before = torch.load(coreset, weights_only=False)
    digest = content_digest(coreset)
    coreset.unlink()
    launched = []
    monkeypatch.setattr(programs, "launch", counting_launcher(launched))
    assert pipeline.main([str(config)]) == 0
    judged = [flags[flags.index("--out") + 1] for program, flags in launched if program == "evaluate"]
    assert judged == [str(out / "results" / "kmeans-6.json")]
    after = torch.load(coreset, weights_only=False)
    for key in ("image_syn", "text_syn", "caption_indices"):
        assert torch.equal(after[key], before[key])
    assert content_digest(coreset) == digest


def test_the_content_digest_follows_the_set_not_the_run(transfer_run, tmp_path):
    _, out = transfer_run
    payload = torch.load(out / "results" / "coresets" / "kmeans-6.pt", weights_only=False)
    paths = {}
    for name, change in (("same", {}), ("renamed", {"name": "another run", "selection_seconds": 99.0}),
                         ("pixel", {"image_syn": payload["image_syn"].clone().index_put_(
                             (torch.tensor([0]),), torch.zeros(1, *payload["image_syn"].shape[1:]))}),
                         ("encoder", {"image_norm": "imagenet"})):
        changed = {**payload, **{k: v for k, v in change.items() if k == "image_syn"},
                   "config": {**payload["config"], **{k: v for k, v in change.items() if k != "image_syn"}}}
        paths[name] = tmp_path / f"{name}.pt"
        torch.save(changed, paths[name])
    digests = {name: content_digest(path) for name, path in paths.items()}
    assert digests["same"] == digests["renamed"]
    assert len({digests["same"], digests["pixel"], digests["encoder"]}) == 3


# ---- bad tables: one clear error each, before any work ------------------------------------------------------------

def checked(tiny_shapes, cache_dir, tmp_path, targets: str):
    path = tmp_path / "toy.toml"
    path.write_text(TOY.format(out=tmp_path / "run", root=tiny_shapes, cache=cache_dir) + targets)
    return transfer_targets(load_config(str(path), None), "config")


@pytest.mark.parametrize("table, message", [
    ('[transfer.same]\nimage_encoder = "convnet"\n', r"\[transfer.same\] changes nothing"),
    ('[transfer]\nimage_encoder = "convnet_w32"\n', r"\[transfer.image_encoder\] must be a table"),
    ('[transfer.x]\nimage_encodr = "convnet_w32"\n', r"unknown key 'image_encodr'; did you mean 'image_encoder'\?"),
    ('[transfer.x]\nimage_encoder = "resnet99"\n', r"\[transfer.x\]: image_encoder 'resnet99' is not one of"),
    ('[transfer.x]\nnum_eval = 1\ntext_encoder = "mpnet"\n', r"num_eval is not an encoder setting.*evaluate = "),
    ('[transfer.x]\ntext_encoder = "mpnet"\ntext_model = "m"\n', r"text_model cannot be changed"),
    ('[transfer.x]\nimage_encoder = "convnet_w32"\nevaluate = {image_size = 32}\n', r"evaluate: image_size is not a "
                                                                                    r"protocol flag"),
    ('[transfer.x]\nimage_encoder = "convnet_w32"\nevaluate = {num_evl = 1}\n', r"did you mean 'num_eval'"),
    ('[transfer.x]\nimage_encoder = "convnet_w32"\nladder = [6, 6]\n', r"ladder must list each set size once"),
    ('[transfer.x]\nimage_encoder = "convnet_w32"\nladder = 6\n', r"ladder must be a list"),
    ('[transfer.x]\nimage_encoder = "convnet_w32"\nepochs_per_size = {big = 2}\n', r"epochs_per_size keys are"),
    ('[transfer.x]\nimage_projection = true\n', r"\(its ladder and full data\): --image_projection freezes"),
    ('[transfer.x]\nimage_encoder = "vit"\nimage_size = 24\n', r"\[transfer.x\]: image_encoder: image encoder vit "
                                                                 r"needs an image size divisible by 16, got 24"),
    ('[transfer.x]\nimage_encoder = "convnet_w32"\nfull = "experts"\n', r"full must be \"train\" .* or \"none\""),
    ('[transfer.x]\nimage_encoder = "convnet_w32"\nfull = false\n', r"full must be \"train\".*got False"),
    ('[transfer."a b"]\nimage_encoder = "convnet_w32"\n', r"the name 'a b' becomes a folder"),
    ('[transfer.x]\nimage_encoder = "convnet_w32"\nimage_pretrained = true\n', r"convnet_w32 has no pretrained "
                                                                               r"weights offline"),
])
def test_a_bad_transfer_table_is_one_clear_error(table, message, tiny_shapes, cache_dir, tmp_path):
    with pytest.raises(UserError, match=message) as caught:
        checked(tiny_shapes, cache_dir, tmp_path, table)
    assert "\n" not in str(caught.value)


def test_an_image_and_a_text_change_together_are_one_target(tiny_shapes, cache_dir, tmp_path):
    # evaluate.py takes --eval_image_encoder and --eval_text_encoder in one call (the texts go over first)
    (target,) = checked(tiny_shapes, cache_dir, tmp_path, '[transfer.both]\nimage_encoder = "convnet_w32"\n'
                                                          'text_encoder = "mpnet"\n')
    assert target.eval_flags() == ["--eval_image_encoder", "convnet_w32", "--eval_text_encoder", "mpnet"]
    assert (target.image, target.text) == (True, True)


def test_a_set_call_that_evaluate_py_would_refuse_is_refused_before_any_work(tiny_shapes, cache_dir, tmp_path):
    # adapters on vit: the set's own encoder (convnet) would be given --lora_rank, which evaluate.py refuses
    with pytest.raises(UserError, match=r"evaluate.py --distilled with --eval_image_encoder vit.*--lora_rank is for"):
        checked(tiny_shapes, cache_dir, tmp_path, '[transfer.x]\nimage_encoder = "vit"\nlora_rank = 2\n')


def test_an_encoder_that_cannot_take_the_sets_size_is_refused(tiny_shapes, cache_dir, tmp_path):
    path = tmp_path / "toy.toml"
    text = TOY.format(out=tmp_path / "run", root=tiny_shapes, cache=cache_dir).replace("image_size = 16", "image_size = 24")
    path.write_text(text + '[transfer.x]\nimage_encoder = "vit"\n')
    with pytest.raises(UserError, match=r"\[transfer.x\]: image_encoder: image encoder vit needs an image size "
                                        r"divisible by 16, got 24"):
        transfer_targets(load_config(str(path), None), "config")


def test_the_weights_and_norm_of_the_old_encoder_do_not_reach_the_new_one(tiny_shapes, cache_dir, convnet_weights,
                                                                         tmp_path):
    path = tmp_path / "frozen.toml"
    text = TOY.format(out=tmp_path / "run", root=tiny_shapes, cache=cache_dir)
    path.write_text(text.replace("image_pretrained = false\n", f'image_weights = "{convnet_weights}"\n'
                                                               f'image_projection = true\n')
                    + '[transfer.lite0]\nimage_encoder = "efficientnet_lite0"\nimage_pretrained = true\n')
    config = load_config(str(path), None)
    (target,) = transfer_targets(config, "config")
    judged = target_config(config, target)["common"]
    assert "image_weights" not in judged and judged["image_encoder"] == "efficientnet_lite0"
    call = set_common(config["common"], target)  # the set's own encoder; the new one's normalisation resolved anew
    assert "image_weights" not in call and call["image_norm"] == "auto" and call["image_encoder"] == "convnet"
    # evaluate.py leaves a set file's weights out too when another encoder trains (they fit the set's encoder only)
    file = {"image_encoder": "convnet", "image_weights": str(convnet_weights), "image_norm": "clip"}
    assert "image_weights" not in evaluate.with_file_settings({"eval_image_encoder": "convnet_w32"}, file, frozenset())
    assert evaluate.with_file_settings({"eval_image_encoder": None}, file, frozenset())["image_weights"] == file[
        "image_weights"]
    assert "image_weights" not in evaluate.with_file_settings({"image_encoder": "convnet_w64", "eval_image_encoder": None},
                                                               file, frozenset({"image_encoder"}))


VALID = set(ENCODER_KEYS) | set(OWN_KEYS)


@pytest.mark.props
@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=20).filter(
    lambda key: key not in VALID and key not in known_keys("evaluate") and key != "text_model"))
def test_any_unknown_key_is_named(key, tiny_shapes, cache_dir, tmp_path):
    with pytest.raises(UserError, match=rf"\[transfer.x\]: unknown key {key!r}") as caught:
        checked(tiny_shapes, cache_dir, tmp_path, f'[transfer.x]\nimage_encoder = "convnet_w32"\n"{key}" = 1\n')
    assert "\n" not in str(caught.value)


WRONG = st.one_of(st.dictionaries(st.just("a"), st.integers(), min_size=1, max_size=1),
                  st.lists(st.integers(), min_size=2, max_size=2), st.floats(allow_nan=True))


def toml_value(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {v}" for k, v in value.items()) + "}"
    if isinstance(value, float):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(str(value), repr(value))
    return json.dumps(value)


@pytest.mark.props
@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from([*ENCODER_KEYS, "ladder", "evaluate", "epochs_per_size", "full"]), value=WRONG)
def test_a_value_of_the_wrong_type_names_its_key(key, value, tiny_shapes, cache_dir, tmp_path):
    if (key, type(value)) in (("ladder", list), ("evaluate", dict), ("epochs_per_size", dict)):
        value = 1.5  # their own type: take a wrong one
    with pytest.raises(UserError) as caught:
        checked(tiny_shapes, cache_dir, tmp_path, f'[transfer.x]\n{key} = {toml_value(value)}\n')
    text = str(caught.value)
    assert "\n" not in text and f"[transfer.x]" in text and key in text, text


@pytest.mark.slow  # all-mpnet-base-v2 (~420 MB) assembled once per session
def test_a_text_target_judges_sets_through_real_captions_and_may_change_the_image_too(tiny_shapes, mpnet_cache,
                                                                                      tmp_path, monkeypatch):
    text = toy_text(tiny_shapes, mpnet_cache, tmp_path / "run").replace(TARGETS, "")
    text = text.replace("seeds = [0, 1]", "seeds = [0]")
    config = tmp_path / "text.toml"
    config.write_text(text + '[transfer.mpnet]\ntext_encoder = "mpnet"\n'
                             '[transfer.both]\ntext_encoder = "mpnet"\nimage_encoder = "convnet_w32"\n')
    monkeypatch.setattr(programs, "launch", launch_in_process)
    assert pipeline.main([str(config)]) == 0
    out = tmp_path / "run"
    for target in ("mpnet", "both"):
        distilled, coreset = report(out, target, "distilled-6 (seed 0)"), report(out, target, "kmeans-6")
        assert distilled["text_transfer"]["how"] == "nearest" and coreset["text_transfer"]["how"] == "own"
        command = distilled["config"]["command"]
        assert value_after(command, "--eval_text_encoder") == "mpnet" and value_after(command, "--text_encoder") == "minilm"
        ladder = report(out, target, "random-6")
        assert value_after(ladder["config"]["command"], "--text_encoder") == "mpnet" and ladder["text_transfer"] is None
    assert report(out, "both", "distilled-6 (seed 0)")["image_encoder"] == "convnet_w32"
    assert report(out, "mpnet", "distilled-6 (seed 0)")["image_encoder"] == "convnet"
    header = (out / "transfer.md").read_text()
    assert "- mpnet: the text side changed (text_encoder = mpnet): a distilled set's texts went over as their nearest " \
           "real captions, a coreset's as its own captions, re-encoded by mpnet" in header
    assert "- both: the image side changed (image_encoder = convnet_w32): " in header
    assert json.loads((out / "results.json").read_text())["transfer"]["targets"]["both"]["sides"] == ["image", "text"]
