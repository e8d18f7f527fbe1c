"""evaluate.py --eval_text_encoder: a set judged with another text encoder than it was made with."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_flags

import evaluate
from data.build import load_retrieval_data
from data.distilled_set import load_distilled_set, save_distilled_set
from networks.text_encoders import FrozenTextEncoder
from settings.data import DataSettings
from settings.model import ModelSettings
from utils.cli import UserError

QUICK = ("--num_eval", "1", "--epoch_eval_train", "2", "--batch_train", "4", "--progress", "False",
         "--wandb_mode", "disabled", "--num_workers", "0")


def train_captions(tiny_shapes, cache_dir, text_encoder):
    """The training captions and their cached embeddings by `text_encoder` (what the run reads)."""
    data = DataSettings(dataset="shapes", image_root=str(tiny_shapes), cache_dir=str(cache_dir))
    model = ModelSettings(image_encoder="convnet", image_size=16, text_encoder=text_encoder)
    loaded = load_retrieval_data(data, model, torch.device("cpu"), progress=False)
    return loaded.train.captions, loaded.train_text


def judged(path, cache_dir, out, *extra):
    assert evaluate.main(["--distilled", str(path), "--cache_dir", str(cache_dir), *QUICK, "--out", str(out),
                          *extra]) == 0
    return json.loads(out.read_text())


def test_the_same_encoder_gives_the_nearest_captions_own_embeddings(run4, tiny_shapes, cache_dir, tmp_path):
    path = run4 / "distilled_last.pt"
    report = judged(path, cache_dir, tmp_path / "same.json", "--eval_text_encoder", "minilm")
    captions, text = train_captions(tiny_shapes, cache_dir, "minilm")
    syn = load_distilled_set(path)["text_syn"]
    nearest = (F.normalize(syn, dim=1) @ F.normalize(text, dim=1).t()).argmax(dim=1)
    transfer = report["text_transfer"]
    assert transfer["how"] == "nearest" and transfer["caption_indices"] == nearest.tolist()
    assert transfer["from"] == transfer["to"] == report["config"]["text_identity"]
    assert "texts as their nearest real captions re-encoded with minilm" in report["label"]
    assert all(math.isfinite(v["mean"]) for v in report["metrics"].values())


def test_a_distilled_set_goes_over_to_mpnet_as_its_nearest_captions(run4, tiny_shapes, mpnet_cache, tmp_path,
                                                                    monkeypatch, capsys):
    path = run4 / "distilled_last.pt"
    seen = {}
    original = evaluate.training_pairs

    def spy(settings, payload, *args):  # the texts the evaluation models train on
        seen["text_syn"], seen["text_dim"] = payload["text_syn"].clone(), args[2].data.text_dim
        return original(settings, payload, *args)

    monkeypatch.setattr(evaluate, "training_pairs", spy)
    report = judged(path, mpnet_cache, tmp_path / "mpnet.json", "--eval_text_encoder", "mpnet")
    # Independently: the nearest caption by cosine over MiniLM's cached embeddings, then encoded by MPNet.
    captions, minilm = train_captions(tiny_shapes, mpnet_cache, "minilm")
    syn = load_distilled_set(path)["text_syn"]
    nearest = (F.normalize(syn, dim=1) @ F.normalize(minilm, dim=1).t()).argmax(dim=1).tolist()
    encoded = FrozenTextEncoder("mpnet", None, torch.device("cpu"), mpnet_cache).encode(
        [captions[i] for i in nearest], progress=False)
    assert seen["text_syn"].shape == (len(syn), 768) and seen["text_dim"] == 768
    assert torch.allclose(seen["text_syn"], encoded, atol=1e-4)
    transfer = report["text_transfer"]
    assert transfer["caption_indices"] == nearest and transfer["encoder"] == "mpnet"
    assert transfer["from"].startswith("minilm") and transfer["to"].startswith("mpnet")
    assert report["config"]["text_encoder"] == "mpnet" and report["config"]["text_identity"] == transfer["to"]
    assert report["label"].endswith("(texts as their nearest real captions re-encoded with mpnet)")
    assert all(math.isfinite(v["mean"]) for v in report["metrics"].values())
    assert "re-encoded with mpnet" in capsys.readouterr().out


def test_a_coreset_goes_over_to_mpnet_as_its_own_captions(tiny_shapes, mpnet_cache, tmp_path):
    out = tmp_path / "random.json"
    assert evaluate.main(tiny_flags(tiny_shapes, mpnet_cache, *QUICK, "--coreset", "random", "--num_queries", "6",
                                    "--coreset_file", str(tmp_path / "random.pt"), "--out", str(out),
                                    "--eval_text_encoder", "mpnet")) == 0
    report = json.loads(out.read_text())
    chosen = load_distilled_set(tmp_path / "random.pt")["caption_indices"].tolist()
    assert report["text_transfer"]["how"] == "own" and report["text_transfer"]["caption_indices"] == chosen
    assert "texts as their own captions re-encoded with mpnet" in report["label"]
    _, mpnet = train_captions(tiny_shapes, mpnet_cache, "mpnet")
    # The saved set keeps its MiniLM texts; the transfer is the evaluation's alone.
    assert load_distilled_set(tmp_path / "random.pt")["text_syn"].shape[1] == 384
    assert mpnet.shape[1] == 768 and all(math.isfinite(v["mean"]) for v in report["metrics"].values())


def test_bad_text_transfers_get_one_line(run4, tiny_shapes, cache_dir, tmp_path):
    path = run4 / "distilled_last.pt"
    with pytest.raises(UserError, match="invalid choice: 'gpt9'") as caught:
        evaluate.main(["--distilled", str(path), "--eval_text_encoder", "gpt9"])
    assert "\n" not in str(caught.value)
    with pytest.raises(UserError, match="--full and --subset train on real captions"):
        evaluate.main(tiny_flags(tiny_shapes, cache_dir, *QUICK, "--full", "--eval_text_encoder", "minilm"))
    payload = load_distilled_set(path)
    config = {**payload["config"], "source": "coreset:random"}
    save_distilled_set(tmp_path / "bare.pt", payload["image_syn"], payload["text_syn"], 0.1, 0.1, 0, config)
    with pytest.raises(UserError, match="without caption_indices") as caught:
        evaluate.main(["--distilled", str(tmp_path / "bare.pt"), *QUICK, "--eval_text_encoder", "minilm"])
    assert "\n" not in str(caught.value)
    save_distilled_set(tmp_path / "far.pt", payload["image_syn"], payload["text_syn"], 0.1, 0.1, 0, config,
                       caption_indices=torch.full((len(payload["text_syn"]),), 10_000))
    with pytest.raises(UserError, match="outside the 200 training captions"):
        evaluate.main(["--distilled", str(tmp_path / "far.pt"), *QUICK, "--eval_text_encoder", "minilm"])


def test_a_coreset_with_its_own_encoder_keeps_its_texts(tiny_shapes, cache_dir, tmp_path, monkeypatch):
    seen = {}
    original = evaluate.training_pairs

    def spy(settings, payload, *args):
        seen["text_syn"] = payload["text_syn"].clone()
        return original(settings, payload, *args)

    monkeypatch.setattr(evaluate, "training_pairs", spy)
    assert evaluate.main(tiny_flags(tiny_shapes, cache_dir, *QUICK, "--coreset", "random", "--num_queries", "6",
                                    "--coreset_file", str(tmp_path / "random.pt"), "--eval_text_encoder",
                                    "minilm")) == 0
    assert torch.equal(seen["text_syn"], load_distilled_set(tmp_path / "random.pt")["text_syn"])


def test_the_nearest_caption_search_is_the_one_of_the_saved_files():
    from utils.visualize import nearest_caption_indices, nearest_captions

    syn, real = torch.randn(5, 8), torch.randn(30, 8)
    index, best = nearest_caption_indices(syn, real)
    captions = [f"caption {i}" for i in range(30)]
    assert nearest_captions(syn, real, captions) == [(captions[i], float(s)) for i, s in zip(index.tolist(), best.tolist())]
    assert index.tolist() == (F.normalize(syn, dim=1) @ F.normalize(real, dim=1).t()).argmax(dim=1).tolist()
