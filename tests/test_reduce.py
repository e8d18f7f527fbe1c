"""reduce.py end to end on the tiny data set (a frozen ConvNet trunk and its experts): the kept pairs in the input's
own layout, their report, evaluate.py --subset training on them, the same program over webdataset shards, and bad
input refused in one line before any work."""
from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings as hsettings, strategies as st
from torch.nn import functional as F

import evaluate
import reduce
from conftest import run_program, trunk_flags
from data.annotations import read_split
from data.feature_cache import cached_trunk_outputs, trunk_key
from experts.files import load_expert_weights, locate_buffer, read_metadata
from networks import build_model, image_norm
from reduction.pairs import annotated_features
from reduction.shards import read_kept_keys
from settings import programs


def train_entries(root: Path) -> list:
    return json.loads((root / "annotations" / "shapes_train.json").read_text())


def flags(tiny_shapes, cache_dir, convnet_weights, *extra) -> list[str]:
    return trunk_flags(tiny_shapes, cache_dir, convnet_weights, "--progress", "False", *extra)


@pytest.fixture(scope="module")
def reduced(tiny_shapes, cache_dir, convnet_weights, trunk_experts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reduced") / "shapes_train_half.json"
    reduce.main(flags(tiny_shapes, cache_dir, convnet_weights, "--buffer_path", str(trunk_experts), "--method",
                      "semdedup+balanced", "--keep", "0.5", "--clusters", "4", "--out", str(out)))
    return out


def test_the_kept_pairs_are_entries_of_the_input_in_its_own_layout(reduced, tiny_shapes):
    entries, source = json.loads(reduced.read_text()), train_entries(tiny_shapes)
    assert len(entries) == round(0.5 * len(source))  # the training file holds one caption per entry
    assert all(entry in source for entry in entries)
    positions = [source.index(entry) for entry in entries]
    assert positions == sorted(positions)  # in the file's own order
    report = json.loads(reduced.with_name(reduced.name + ".report.json").read_text())
    assert report["kept"] == len(entries) and report["pairs"] == len(source)
    assert [stage["method"] for stage in report["stages"]] == ["semdedup", "balanced"]
    assert sum(report["clusters"]["kept"]) == len(entries)
    assert reduced.with_name(reduced.name + ".report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_trains_on_exactly_the_kept_pairs(reduced, tiny_shapes, cache_dir, convnet_weights, tmp_path):
    out = tmp_path / "subset.json"
    evaluate.main(flags(tiny_shapes, cache_dir, convnet_weights, "--subset", str(reduced), "--num_eval", "1",
                        "--epoch_eval_train", "1", "--out", str(out)))
    report = json.loads(out.read_text())
    assert report["label"] == f"subset-{len(json.loads(reduced.read_text()))}"
    assert report["config"]["set_size"] == len(json.loads(reduced.read_text()))


def test_the_alignment_is_the_cosine_of_the_experts_heads(tiny_shapes, cache_dir, convnet_weights, trunk_experts):
    """Independently: the expert's snapshot in a fresh model, the trunk outputs of the shared cache, its forward
    pass; the features' alignment must be the cosine of its two outputs per pair."""
    settings = programs.parse("reduce", "", flags(tiny_shapes, cache_dir, convnet_weights, "--keep", "0.5", "--out", "x"))
    features, data, info = annotated_features(settings.data, settings.model, str(trunk_experts), None,
                                              torch.device("cpu"), progress=False)
    model = build_model(settings.model, data.text_dim).eval()
    directory = locate_buffer(trunk_experts, "shapes", "convnet", "minilm")
    load_expert_weights(model, directory, read_metadata(directory))
    key = trunk_key("convnet", model.trunk, model.train_stages, 16, image_norm(settings.model))
    outputs = cached_trunk_outputs(model.trunk, key, data.train, "shapes", "train", [0], cache_dir,
                                   torch.device("cpu"), progress=False)[0]
    with torch.no_grad():
        images, texts = model(outputs[torch.tensor(data.train.txt2img)], data.train_text, from_trunk=True)
    expected = F.cosine_similarity(images, texts).numpy()
    np.testing.assert_allclose(features.alignment, expected, rtol=0, atol=1e-5)
    assert info["expert"]["epoch"] == 3 and len(features.embedding) == len(data.train.captions)
    np.testing.assert_allclose(np.linalg.norm(features.embedding, axis=1), 1.0, atol=1e-5)


def test_alignment_keeps_the_best_aligned_pairs(tiny_shapes, cache_dir, convnet_weights, trunk_experts, tmp_path):
    out = tmp_path / "aligned.json"
    reduce.main(flags(tiny_shapes, cache_dir, convnet_weights, "--buffer_path", str(trunk_experts), "--method",
                      "alignment", "--keep", "0.25", "--out", str(out)))
    settings = programs.parse("reduce", "", flags(tiny_shapes, cache_dir, convnet_weights, "--keep", "0.5", "--out", "x"))
    features, data, _ = annotated_features(settings.data, settings.model, str(trunk_experts), None,
                                           torch.device("cpu"), progress=False)
    best = np.argsort(-features.alignment, kind="stable")[:round(0.25 * len(features.alignment))]
    source = train_entries(tiny_shapes)
    assert json.loads(out.read_text()) == [source[data.train.origins[i][0]] for i in sorted(best)]


def test_a_second_run_replaces_its_own_output_with_the_same_pairs(reduced, tiny_shapes, cache_dir, convnet_weights,
                                                                  trunk_experts):
    first = reduced.read_bytes()
    reduce.main(flags(tiny_shapes, cache_dir, convnet_weights, "--buffer_path", str(trunk_experts), "--method",
                      "semdedup+balanced", "--keep", "0.5", "--clusters", "4", "--out", str(reduced)))
    assert reduced.read_bytes() == first


def test_bad_input_is_one_line_before_any_work(tiny_shapes, cache_dir, convnet_weights, trunk_experts, tmp_path):
    base = flags(tiny_shapes, cache_dir, convnet_weights, "--method", "random")
    other = tmp_path / "notes.json"
    other.write_text("[]")
    train_file = tiny_shapes / "annotations" / "shapes_train.json"
    cases = {
        ("--keep", "0.5"): "--out FILE is needed",
        ("--out", str(tmp_path / "a.json")): "--keep FRACTION is needed",
        ("--keep", "0.5", "--out", str(train_file)): "the training annotation file",
        ("--keep", "0.5", "--out", str(other)): f"--out {other} exists and was not written by reduce.py",
        ("--keep", "0.5", "--out", str(tmp_path / "b.json"), "--method", "balanced"): "needs an aligned space",
        ("--keep", "0.5", "--out", str(tmp_path / "b.json"), "--method", "dedup"): "'dedup' is not a method",
        ("--keep", "0.5", "--out", str(tmp_path / "b.json"), "--method", "random+alignment"): "random can only be",
        ("--keep", "0.5", "--out", str(tmp_path / "b.json"), "--write_shards", str(tmp_path)): "needs --shards",
        ("--keep", "0.5", "--out", str(tmp_path / "b.json"), "--method", "prototype_easy", "--clusters", "500"):
            "clusters (500) is more than the 200 pairs",
    }
    for extra, message in cases.items():
        line = run_program(reduce.main, [*base, *extra])
        assert line is not None and message in line, (extra, line)
    assert other.read_text() == "[]"


@hsettings(max_examples=25, deadline=None)
@given(st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0, exclude_min=True), st.just(math.nan)))
@pytest.mark.props
def test_any_fraction_outside_0_1_is_refused_naming_keep(tiny_shapes, cache_dir, convnet_weights, tmp_path_factory,
                                                         fraction):
    out = tmp_path_factory.getbasetemp() / "never.json"
    line = run_program(reduce.main, [*flags(tiny_shapes, cache_dir, convnet_weights), f"--keep={fraction!r}",
                                     "--out", str(out)])
    assert line is not None and line.startswith("error: --keep") and not out.exists()


def test_evaluate_refuses_a_subset_with_a_pair_outside_the_training_split(tiny_shapes, cache_dir, convnet_weights,
                                                                          tmp_path):
    entries = train_entries(tiny_shapes)[:4] + [{"image": train_entries(tiny_shapes)[0]["image"],
                                                 "caption": "a caption nobody wrote", "image_id": "x"}]
    path = tmp_path / "subset.json"
    path.write_text(json.dumps(entries))
    line = run_program(evaluate.main, [*flags(tiny_shapes, cache_dir, convnet_weights), "--subset", str(path)])
    assert line is not None and "entry 4" in line and "is not a pair of the training split" in line


# ---- webdataset shards -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shards(tiny_shapes, tmp_path_factory) -> Path:
    """The tiny training split as 3 shards in img2dataset's layout: {key}.png + {key}.txt (the first caption)."""
    folder = tmp_path_factory.mktemp("shards")
    split = read_split("shapes", "train", tiny_shapes / "annotations", tiny_shapes)
    firsts = [texts[0] for texts in split.img2txt]
    for shard in range(3):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for i in range(shard, len(split.image_paths), 3):
                for name, data in ((f"{i:06d}.png", split.image_paths[i].read_bytes()),
                                   (f"{i:06d}.txt", split.captions[firsts[i]].encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder


def test_shards_are_reduced_to_kept_keys_and_new_shards(shards, tiny_shapes, cache_dir, convnet_weights,
                                                       trunk_experts, tmp_path):
    out, new = tmp_path / "kept.json", tmp_path / "new_shards"
    reduce.main(flags(tiny_shapes, cache_dir, convnet_weights, "--shards", str(shards / "{00000..00002}.tar"),
                      "--buffer_path", str(trunk_experts), "--method", "balanced", "--keep", "0.25", "--clusters", "3",
                      "--out", str(out), "--write_shards", str(new), "--features_dir", str(tmp_path / "features")))
    kept = read_kept_keys(out)
    keys = [key for listed in kept.values() for key in listed]
    assert len(keys) == len(set(keys)) == round(0.25 * 40) == json.loads(out.read_text())["total"]
    for shard, listed in kept.items():
        with tarfile.open(new / Path(shard).name) as tar:
            assert sorted({name.split(".")[0] for name in tar.getnames()}) == sorted(listed)
    # a second run reuses the features (no new part) and keeps the same pairs
    again = tmp_path / "again.json"
    reduce.main(flags(tiny_shapes, cache_dir, convnet_weights, "--shards", str(shards / "{00000..00002}.tar"),
                      "--buffer_path", str(trunk_experts), "--method", "balanced", "--keep", "0.25", "--clusters", "3",
                      "--out", str(again), "--features_dir", str(tmp_path / "features")))
    assert read_kept_keys(again) == kept
    assert json.loads(again.with_name(again.name + ".report.json").read_text())["features"]["written_parts"] == 0


def test_a_missing_shard_is_one_line(tiny_shapes, cache_dir, convnet_weights, shards, tmp_path):
    line = run_program(reduce.main, [*flags(tiny_shapes, cache_dir, convnet_weights), "--shards",
                                     str(shards / "{00000..00004}.tar"), "--keep", "0.5", "--method", "random", "--out",
                                     str(tmp_path / "k.json")])
    assert line is not None and line.startswith("error: --shards") and "00003.tar" in line and "missing" in line
    for extra, message in ((["--out", str(shards / "00001.tar")], "--out"),
                           (["--out", str(tmp_path / "k.json"), "--write_shards", str(shards)], "holds input shards")):
        line = run_program(reduce.main, [*flags(tiny_shapes, cache_dir, convnet_weights), "--shards",
                                         str(shards / "{00000..00002}.tar"), "--keep", "0.5", "--method", "random",
                                         *extra])
        assert line is not None and message in line, line
    assert sorted(p.name for p in shards.iterdir()) == ["00000.tar", "00001.tar", "00002.tar"]


@pytest.mark.distributed
def test_reduce_under_torchrun_keeps_what_one_process_keeps(shards, tiny_shapes, cache_dir, convnet_weights,
                                                             trunk_experts, tmp_path):
    """Two torchrun processes split the shards' extraction, rank 0 chooses: the same features (every file byte for
    byte) and the same kept keys as one process."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    common = flags(tiny_shapes, cache_dir, convnet_weights, "--shards", str(shards / "{00000..00002}.tar"),
                   "--buffer_path", str(trunk_experts), "--method", "semdedup+balanced", "--keep", "0.5",
                   "--clusters", "3")
    reduce.main([*common, "--out", str(tmp_path / "one.json"), "--features_dir", str(tmp_path / "one")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    for variable in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(variable, None)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(repo / "reduce.py"), *common, "--out", str(tmp_path / "two.json"), "--features_dir",
                           str(tmp_path / "two")], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert read_kept_keys(tmp_path / "two.json") == read_kept_keys(tmp_path / "one.json")
    stored = {name: {p.relative_to(tmp_path / name): p.read_bytes() for p in (tmp_path / name).rglob("*.npy")
                     if "pairs-" not in str(p)} for name in ("one", "two")}
    assert len(stored["one"]) == 2 * 3 and stored["one"] == stored["two"]


def test_unpacked_shards_are_a_data_set_every_program_reads(shards, tiny_shapes, cache_dir, convnet_weights,
                                                             trunk_experts, tmp_path):
    """export.py shards: the kept samples of a reduce.py --shards run (and a val split) unpacked as --dataset webdata,
    whose training split holds exactly the kept pairs, byte for byte, and which reduce.py and evaluate.py read."""
    import export

    kept_file = tmp_path / "kept.json"
    reduce.main(flags(tiny_shapes, cache_dir, convnet_weights, "--shards", str(shards / "{00000..00002}.tar"),
                      "--method", "random", "--keep", "0.5", "--out", str(kept_file),
                      "--features_dir", str(tmp_path / "features")))
    folder = tmp_path / "webdata"
    export.main(["shards", str(shards / "{00000..00002}.tar"), "--out", str(folder), "--keys", str(kept_file),
                 "--progress", "False"])
    export.main(["shards", str(shards / "00000.tar"), "--out", str(folder), "--split", "val", "--progress", "False"])
    kept = read_kept_keys(kept_file)
    train = json.loads((folder / "annotations" / "webdata_train.json").read_text())
    assert sorted(entry["image_id"] for entry in train) == sorted(f"{Path(shard).name.removesuffix('.tar')}/{key}"
                                                                  for shard, keys in kept.items() for key in keys)
    with tarfile.open(shards / "00000.tar") as tar:
        first = next(e for e in train if e["image_id"].startswith("00000/"))
        member = tar.extractfile(first["image_id"].split("/")[1] + ".png").read()
    assert (folder / first["image"]).read_bytes() == member
    split = read_split("webdata", "train", folder / "annotations", folder)
    assert len(split.captions) == 20
    webdata = ["--dataset", "webdata", "--image_root", str(folder)]
    line = run_program(export.main, ["shards", str(shards / "00000.tar"), "--out", str(folder), "--split", "val"])
    assert line is not None and "exists; give --overwrite True" in line
    out = tmp_path / "subset.json"
    reduce.main([*flags(tiny_shapes, cache_dir, convnet_weights, "--method", "random", "--keep", "0.5", "--out",
                        str(out)), *webdata])
    report = tmp_path / "eval.json"
    evaluate.main([*flags(tiny_shapes, cache_dir, convnet_weights, "--subset", str(out), "--num_eval", "1",
                          "--epoch_eval_train", "1", "--out", str(report)), *webdata])
    assert json.loads(report.read_text())["config"]["set_size"] == 10
