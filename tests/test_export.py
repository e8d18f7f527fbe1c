"""export.py set: a distilled set or coreset as a folder that loads without this project, and back."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image
from safetensors.torch import load_file, save_file

import distill
import evaluate
import export
from conftest import distill_flags, run_program, tiny_flags
from data.distilled_set import load_distilled_set, save_distilled_set
from data.exported_set import INDEX, LEARNED, PIXELS, TEXTS, load_exported_set, write_set_tensors
from sharing import set_folder
from sharing.set_folder import to_8bit
from utils.cli import UserError

QUICK = ("--num_eval", "1", "--epoch_eval_train", "2", "--batch_train", "4", "--progress", "False",
         "--wandb_mode", "disabled", "--num_workers", "0")


@pytest.fixture(scope="module")
def exported(run4, cache_dir, tmp_path_factory):
    """The best set of the 4-iteration run, exported."""
    out = tmp_path_factory.mktemp("export") / "set"
    assert export.main(["set", str(run4 / "distilled_best.pt"), "--out", str(out), "--cache_dir", str(cache_dir),
                        "--progress", "False"]) == 0
    return out


def copy_of(folder, tmp_path):
    import shutil

    return shutil.copytree(folder, tmp_path / "copy")


def test_the_folder_loads_as_a_hugging_face_image_folder(exported, run4):
    import datasets

    payload = load_distilled_set(run4 / "distilled_best.pt")
    loaded = datasets.load_dataset("imagefolder", data_dir=str(exported), cache_dir=str(exported.parent / "hf"))
    rows = loaded["train"]
    assert len(rows) == len(payload["text_syn"]) == 8
    assert set(rows.column_names) >= {"image", "index", "caption", "nearest_captions", "similarity"}
    expected = to_8bit(payload["image_syn"], payload["config"]["image_norm"])
    for row in rows:  # the PNGs hold the de-normalised pixels exactly (8 bits), in index order
        pixels = torch.from_numpy(np.array(row["image"].convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(pixels, expected[row["index"]])
    assert (exported / "grid.png").is_file() and Image.open(exported / "grid.png").size[0] > 16


def test_the_safetensors_hold_the_sets_tensors_bit_for_bit(exported, run4):
    payload = load_distilled_set(run4 / "distilled_best.pt")
    assert torch.equal(load_file(exported / PIXELS)["pixels"], payload["image_syn"])
    assert torch.equal(load_file(exported / TEXTS)["text_embeddings"], payload["text_syn"])
    learned = load_file(exported / LEARNED)
    assert learned["syn_lr_img"].dtype == torch.float64 and float(learned["syn_lr_img"]) == payload["syn_lr_img"]
    assert float(learned["syn_lr_txt"]) == payload["syn_lr_txt"]
    back = load_exported_set(exported)
    assert back["iteration"] == payload["iteration"] and back["metrics"] == payload["metrics"]
    assert back["config"] == payload["config"]


def test_the_card_has_hub_front_matter_the_scores_and_the_grid(exported):
    import yaml

    card = (exported / "README.md").read_text()
    matter = yaml.safe_load(card.split("---\n")[1])
    assert matter["license"] == "other" and matter["size_categories"] == ["n<1K"]
    assert matter["vl_distill"]["image_encoder"] == "convnet" and matter["vl_distill"]["num_pairs"] == 8
    assert "![the first 8 images](grid.png)" in card and "| r_mean |" in card.replace("r_mean |", "r_mean |")
    assert "load_dataset(\"imagefolder\"" in card


def test_evaluating_the_folder_gives_the_numbers_of_the_pt_file(exported, run4, cache_dir, tmp_path):
    reports = []
    for source in (run4 / "distilled_best.pt", exported):
        out = tmp_path / f"{len(reports)}.json"
        assert evaluate.main(["--distilled", str(source), "--cache_dir", str(cache_dir), *QUICK, "--out",
                              str(out)]) == 0
        reports.append(json.loads(out.read_text()))
    assert reports[0]["metrics"] == reports[1]["metrics"]  # every run's numbers, to the last digit
    assert reports[0]["lr"] == reports[1]["lr"]


def test_distill_cannot_resume_from_an_exported_folder(exported, tiny_shapes, cache_dir, experts, tmp_path):
    error = run_program(distill.main, distill_flags(tiny_shapes, cache_dir, experts, tmp_path / "run",
                                                    "--resume", str(exported)))
    assert error is not None and "exported" in error and "resume" in error


@pytest.mark.parametrize("damage, named", [
    ("missing", PIXELS), ("shape", PIXELS), ("integers", TEXTS), ("changed", TEXTS), ("index", INDEX),
    ("card", "README.md"), ("learned", LEARNED)])
def test_a_damaged_folder_is_refused_naming_the_file(exported, tmp_path, damage, named):
    folder = copy_of(exported, tmp_path)
    if damage == "missing":
        os.remove(folder / PIXELS)
    elif damage == "shape":
        save_file({"pixels": torch.zeros(8, 3, 8, 8)}, str(folder / PIXELS))
    elif damage == "integers":
        save_file({"text_embeddings": torch.zeros(8, 384, dtype=torch.int64)}, str(folder / TEXTS))
    elif damage == "changed":  # same names, shapes and dtype, other numbers
        save_file({"text_embeddings": torch.ones(8, 384)}, str(folder / TEXTS))
    elif damage == "index":
        (folder / INDEX).write_text("{not json")
    elif damage == "card":  # a card copied from an export of another encoder
        card = (folder / "README.md").read_text()
        (folder / "README.md").write_text(card.replace("image_encoder: convnet", "image_encoder: efficientnet_lite0"))
    else:
        save_file({"syn_lr_img": torch.tensor(0.1, dtype=torch.float64)}, str(folder / LEARNED))
    with pytest.raises(UserError) as err:
        load_exported_set(folder)
    assert str(folder / named) in str(err.value) or (named == INDEX and str(folder / INDEX) in str(err.value))


def test_evaluate_refuses_a_damaged_folder_in_one_line(exported, cache_dir, tmp_path):
    folder = copy_of(exported, tmp_path)
    os.remove(folder / TEXTS)
    error = run_program(evaluate.main, ["--distilled", str(folder), "--cache_dir", str(cache_dir), *QUICK])
    assert error is not None and str(folder / TEXTS) in error and "missing" in error


def test_the_out_folder_is_claimed_before_any_work(exported, run4, cache_dir, tmp_path):
    best = str(run4 / "distilled_best.pt")
    base = ["--cache_dir", str(cache_dir), "--progress", "False"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert "did not write" in run_program(export.main, ["set", best, "--out", str(foreign), *base])
    assert (foreign / "notes.txt").read_text() == "mine"
    assert "--overwrite True" in run_program(export.main, ["set", best, "--out", str(exported), *base])
    assert "reads" in run_program(export.main, ["set", str(exported), "--out", str(exported), *base,
                                                "--overwrite", "True"])
    assert "reads" in run_program(export.main, ["set", best, "--out", str(run4), *base])


def test_an_interrupted_export_leaves_the_earlier_one_whole(exported, run4, cache_dir, tmp_path, monkeypatch):
    folder = copy_of(exported, tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}

    def broken(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(set_folder, "dataset_card", broken)
    with pytest.raises(KeyboardInterrupt):
        export.main(["set", str(run4 / "distilled_best.pt"), "--out", str(folder), "--cache_dir", str(cache_dir),
                     "--progress", "False", "--overwrite", "True"])
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # no half-written folder left beside it


def test_an_export_of_an_export_is_the_same_set(exported, cache_dir, tmp_path):
    again = tmp_path / "again"
    assert export.main(["set", str(exported), "--out", str(again), "--cache_dir", str(cache_dir),
                        "--progress", "False"]) == 0
    for name in (PIXELS, TEXTS, LEARNED, "metadata.jsonl"):
        assert (again / name).read_bytes() == (exported / name).read_bytes()


def test_a_coreset_exports_its_real_images_and_own_captions(tiny_shapes, cache_dir, tmp_path):
    coreset = tmp_path / "random-6.pt"
    assert evaluate.main(tiny_flags(tiny_shapes, cache_dir, "--coreset", "random", "--coreset_size", "6",
                                    "--coreset_file", str(coreset), "--num_eval", "1", "--epoch_eval_train", "1",
                                    "--batch_train", "4")) == 0
    out = tmp_path / "export"
    assert export.main(["set", str(coreset), "--out", str(out), "--cache_dir", str(cache_dir),
                        "--progress", "False"]) == 0
    payload = load_distilled_set(coreset)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    from data.build import load_retrieval_data
    from settings.data import DataSettings
    from settings.model import ModelSettings

    data = load_retrieval_data(DataSettings(dataset="shapes", image_root=str(tiny_shapes), cache_dir=str(cache_dir)),
                               ModelSettings(image_encoder="convnet", image_size=16, text_encoder="minilm"),
                               torch.device("cpu"),
                               progress=False)
    assert [row["caption"] for row in rows] == [data.train.captions[i] for i in payload["caption_indices"].tolist()]
    assert torch.equal(load_exported_set(out)["caption_indices"], payload["caption_indices"])
    assert "coreset (random)" in (out / "README.md").read_text()


def test_a_feature_centroid_set_is_refused_clearly(tmp_path):
    path = tmp_path / "centroids.pt"
    save_distilled_set(path, None, torch.randn(4, 8), 0.1, 0.1, 0, {"source": "coreset:centroids"},
                       image_features=torch.randn(4, 16))
    with pytest.raises(UserError, match="trunk outputs"):
        write_set_tensors(load_distilled_set(path), tmp_path)


finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(count=st.integers(2, 6), width=st.integers(1, 5), side=st.integers(1, 4), extras=st.sets(
    st.sampled_from(["similarity", "sim_params", "caption_indices"])), data=st.data(),
    lrs=st.tuples(st.floats(1e-8, 100), st.floats(1e-8, 100)))
def test_any_set_round_trips_through_the_tensor_files_exactly(tmp_path_factory, count, width, side, extras, data, lrs):
    """The class of sets: any size, width, image side, learned step sizes (float64) and optional tensors."""
    def tensor(*shape):
        return torch.tensor(data.draw(st.lists(finite, min_size=int(np.prod(shape)), max_size=int(np.prod(shape)))),
                            dtype=torch.float32).view(*shape)

    payload = {"format": "vl-distill/distilled-set", "version": 1, "image_syn": tensor(count, 3, side, side),
               "text_syn": tensor(count, width), "syn_lr_img": lrs[0], "syn_lr_txt": lrs[1], "iteration": 3,
               "config": {"dataset": "shapes"}, "metrics": {}, "state": {}}
    if "similarity" in extras:
        payload["similarity"] = tensor(count, count)
    if "sim_params" in extras:
        payload["sim_params"] = [tensor(count, 2) for _ in range(12)]  # 12: "10" must not sort before "2"
    if "caption_indices" in extras:
        payload["caption_indices"] = torch.arange(count)
    folder = tmp_path_factory.mktemp("roundtrip")
    write_set_tensors(payload, folder)
    back = load_exported_set(folder)
    assert set(back) == set(payload)
    for key, value in payload.items():
        if isinstance(value, torch.Tensor):
            assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
        elif isinstance(value, list):
            assert len(back[key]) == len(value) and all(torch.equal(a, b) for a, b in zip(back[key], value))
        else:
            assert back[key] == value, key


FLICKR8K = Path(os.environ.get("VL_DISTILL_FLICKR8K", Path(__file__).resolve().parents[2] / "shared/data/flickr8k"))


@pytest.mark.skipif(not (FLICKR8K / "annotations" / "flickr8k_train.json").is_file(),
                    reason="Flickr8k is not beside the repository (../shared/data/flickr8k or $VL_DISTILL_FLICKR8K)")
def test_a_flickr8k_coreset_of_real_photos_exports_and_loads_as_an_image_folder(cache_dir, tmp_path):
    """Real photos: the first 8 training images at 128 px with their first captions, as a coreset of the
    frozen-Lite0 regime; the exported PNGs are the photos' own pixels and the captions their own."""
    import datasets

    from data.build import load_retrieval_data
    from data.transforms import test_transform
    from networks.text_encoders import FrozenTextEncoder
    from settings.data import DataSettings
    from settings.model import ModelSettings

    data_settings = DataSettings(dataset="flickr8k", image_root=str(FLICKR8K), cache_dir=str(cache_dir),
                                 max_train_images=8)
    model = ModelSettings(image_encoder="efficientnet_lite0", image_size=128, text_encoder="minilm")
    data = load_retrieval_data(data_settings, model, torch.device("cpu"), progress=False, train_only=True)
    first = [data.train.img2txt[i][0] for i in range(8)]  # each image's first caption
    transform = test_transform(128, "inception")
    images = torch.stack([transform(Image.open(data.train.image_paths[i]).convert("RGB")) for i in range(8)])
    texts = FrozenTextEncoder("minilm", None, torch.device("cpu"), str(cache_dir)).encode(
        [data.train.captions[j] for j in first], progress=False)
    config = {"dataset": "flickr8k", "image_root": str(FLICKR8K), "cache_dir": str(cache_dir), "max_train_images": 8,
              "image_encoder": "efficientnet_lite0", "image_size": 128, "image_norm": "inception",
              "text_encoder": "minilm", "text_identity": data.text_identity, "source": "coreset:random"}
    path = tmp_path / "flickr8k-8.pt"
    save_distilled_set(path, images, texts, 0.1, 0.1, 0, config, caption_indices=torch.tensor(first))
    out = tmp_path / "export"
    assert export.main(["set", str(path), "--out", str(out), "--progress", "False"]) == 0
    rows = datasets.load_dataset("imagefolder", data_dir=str(out), cache_dir=str(tmp_path / "hf"))["train"]
    assert [row["caption"] for row in rows] == [data.train.captions[j] for j in first]
    for row, image_path in zip(rows, data.train.image_paths):
        with Image.open(image_path) as photo:  # 128 px JPEGs: the normalisation undone gives them back
            original = torch.from_numpy(np.array(photo.convert("RGB"))).int()
        assert (torch.from_numpy(np.array(row["image"].convert("RGB"))).int() - original).abs().max() <= 1
    assert torch.equal(load_exported_set(out)["image_syn"], load_distilled_set(path)["image_syn"])
    assert "research use only" in (out / "README.md").read_text()


def test_export_buffer_converts_a_buffer_both_ways_and_refuses_a_foreign_target(experts, tmp_path):
    from experts.files import expert_files

    source = next(experts.glob("**/buffer_meta.json")).parent
    converted, back = tmp_path / "st", tmp_path / "pt"
    assert export.main(["buffer", str(source), str(converted), "--to", "safetensors"]) == 0
    assert export.main(["buffer", str(converted), str(back), "--to", "pt"]) == 0
    for (_, image, text), (_, image_back, text_back) in zip(expert_files(source), expert_files(back)):
        assert image.read_bytes() == image_back.read_bytes() and text.read_bytes() == text_back.read_bytes()
    assert len(expert_files(converted)) == len(expert_files(source)) == 2
    error = run_program(export.main, ["buffer", str(source), str(back), "--to", "safetensors"])
    assert error is not None and str(back) in error


def test_a_folder_that_is_no_export_is_named_as_such(cache_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("not a set")
    error = run_program(evaluate.main, ["--distilled", str(tmp_path), "--cache_dir", str(cache_dir), *QUICK])
    assert error is not None and f"{tmp_path} is a folder, neither a set file nor an exported set folder" in error
