"""Annotation loading, datasets and text-embedding caches on a tiny generated fixture."""
from __future__ import annotations

import json
import shutil
from settings import DataSettings, ModelSettings

import pytest
import torch

from data.annotations import ANNOTATION_PREFIX, read_split
from data.build import load_retrieval_data, train_loader, eval_image_loader
from data.captions import clean_caption
from data.datasets import ImageDataset, PairDataset
from data.text_cache import cached_text_embeddings
from data.transforms import test_transform as eval_transform, train_transform
from utils.cli import UserError


def _as_dataset(root, dataset):
    """Rename the shapes annotation files to `dataset`'s file names."""
    ann = root / "annotations"
    for split in ("train", "val", "test"):
        if dataset != "shapes":
            shutil.copy(ann / f"shapes_{split}.json", ann / f"{ANNOTATION_PREFIX[dataset]}_{split}.json")
            (ann / f"shapes_{split}.json").unlink()
    return ann


@pytest.mark.parametrize("dataset", ["flickr", "coco", "flickr8k", "shapes"])
def test_each_loader_reads_the_karpathy_layout(dataset_copy, dataset):
    ann = _as_dataset(dataset_copy, dataset)
    raw_train = json.loads((ann / f"{ANNOTATION_PREFIX[dataset]}_train.json").read_text())
    train = read_split(dataset, "train", ann, dataset_copy)
    assert len(train.image_paths) == 40 and len(train.captions) == 200
    for t, entry in enumerate(raw_train):  # order kept, captions cleaned, image mapping right
        assert train.captions[t] == clean_caption(entry["caption"])
        assert train.image_paths[train.txt2img[t]] == dataset_copy / entry["image"]
    raw_test = json.loads((ann / f"{ANNOTATION_PREFIX[dataset]}_test.json").read_text())
    test = read_split(dataset, "test", ann, dataset_copy)
    assert len(test.image_paths) == 10 and len(test.captions) == 50
    assert test.img2txt[3] == [15, 16, 17, 18, 19]
    assert test.captions[17] == clean_caption(raw_test[3]["caption"][2])


def test_missing_annotation_file_names_the_file_and_the_layout(tmp_path):
    with pytest.raises(UserError, match=r"flickr30k_train\.json.*--ann_root"):
        read_split("flickr", "train", tmp_path, tmp_path)


def test_malformed_json_is_a_clear_error(tmp_path):
    (tmp_path / "coco_karpathy_test.json").write_text("[{\"image\": ")
    with pytest.raises(UserError, match=r"coco_karpathy_test\.json is not valid JSON"):
        read_split("coco", "test", tmp_path, tmp_path)
    (tmp_path / "coco_karpathy_val.json").write_text(json.dumps([{"image": "a.jpg", "caption": 3}]))
    with pytest.raises(UserError, match=r"entry 0: 'caption' must be"):
        read_split("coco", "val", tmp_path, tmp_path)


def test_missing_image_is_named_and_can_be_skipped(dataset_copy, capsys):
    (dataset_copy / "images" / "train" / "00003.png").unlink()
    (dataset_copy / "images" / "test" / "00001.png").unlink()
    with pytest.raises(UserError, match=r"image not found: .*00003\.png .*--skip_bad_images"):
        read_split("shapes", "train", dataset_copy / "annotations", dataset_copy)
    train = read_split("shapes", "train", dataset_copy / "annotations", dataset_copy, skip_bad_images=True)
    assert train.skipped_images == 1 and len(train.image_paths) == 39 and len(train.captions) == 195
    assert all(p.name != "00003.png" for p in train.image_paths)
    test = read_split("shapes", "test", dataset_copy / "annotations", dataset_copy, skip_bad_images=True)
    assert test.img2txt[1] == [5, 6, 7, 8, 9]  # the image after the skipped one owns the next captions


def test_unreadable_image_is_named(dataset_copy):
    split = read_split("shapes", "test", dataset_copy / "annotations", dataset_copy)
    (dataset_copy / "images" / "test" / "00002.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"cannot read image .*00002\.png: not an image .*--skip_bad_images"):
        read_split("shapes", "test", dataset_copy / "annotations", dataset_copy)
    dataset = ImageDataset(split, eval_transform(16))  # read before the file was damaged
    with pytest.raises(UserError, match=r"cannot read image .*00002\.png: not an image; .*--skip_bad_images"):
        dataset[2]


def test_transforms_give_normalised_tensors_of_the_asked_size(tiny_shapes):
    split = read_split("shapes", "train", tiny_shapes / "annotations", tiny_shapes)
    pairs = PairDataset(split, torch.arange(200.).unsqueeze(1), train_transform(24))
    image, text, index = pairs[7]
    assert image.shape == (3, 24, 24) and text.item() == 7.0 and index == 7
    assert image.min() < 0 < image.max()  # CLIP normalisation centres the pixels
    test_image, _ = ImageDataset(split, eval_transform(16))[0]
    assert test_image.shape == (3, 16, 16)


class CountingEncoder:
    def __init__(self):
        self.calls = []

    def encode(self, captions, progress=True):
        self.calls.append(list(captions))
        return torch.tensor([[float(len(c)), float(c.count("a"))] for c in captions])


def test_text_cache_encodes_distinct_captions_once_and_reloads(tmp_path):
    captions = ["a red circle", "a blue square", "a red circle", "grey"]
    encoder = CountingEncoder()
    first = cached_text_embeddings(captions, tmp_path / "c.pt", lambda: encoder, progress=False)
    assert len(encoder.calls) == 1 and sorted(encoder.calls[0]) == sorted(set(captions))
    assert torch.equal(first, torch.tensor([[12., 1.], [13., 2.], [12., 1.], [4., 0.]]))
    again = cached_text_embeddings(captions, tmp_path / "c.pt", lambda: pytest.fail("cache missed"), progress=False)
    assert torch.equal(again, first)


@pytest.mark.slow
def test_load_retrieval_data_embeds_with_minilm_and_reuses_the_cache(tiny_shapes, cache_dir, monkeypatch):
    settings = DataSettings(dataset="shapes", image_root=str(tiny_shapes), cache_dir=str(cache_dir))
    minilm = ModelSettings(text_encoder="minilm")
    data = load_retrieval_data(settings, minilm, torch.device("cpu"), progress=False)
    assert data.train_text.shape == (200, 384) and data.eval_text.shape == (50, 384)
    assert data.text_identity.startswith("minilm-")
    from networks.text_encoders import FrozenTextEncoder
    direct = FrozenTextEncoder("minilm", None, torch.device("cpu")).encode(data.eval.captions[:3], progress=False)
    torch.testing.assert_close(data.eval_text[:3], direct, atol=1e-5, rtol=1e-4)
    monkeypatch.setattr("data.build.FrozenTextEncoder", lambda *a: pytest.fail("the cache was not reused"))
    again = load_retrieval_data(settings, minilm, torch.device("cpu"), progress=False)
    assert torch.equal(again.train_text, data.train_text)
    batch = next(iter(train_loader(again, 16, 8, 0, seed=1)))
    assert batch[0].shape == (8, 3, 16, 16) and torch.equal(batch[1], again.train_text[batch[2]])
    images, index = next(iter(eval_image_loader(again, 16, 4, 0)))
    assert images.shape == (4, 3, 16, 16) and index.tolist() == [0, 1, 2, 3]


@pytest.mark.slow
def test_text_encoder_mpnet_embeds_the_captions_in_a_cache_of_its_own(tiny_shapes, mpnet_cache, monkeypatch):
    from conftest import tiny_flags

    from networks.text_encoders import FrozenTextEncoder
    from settings import programs

    flags = tiny_flags(tiny_shapes, mpnet_cache, "--text_encoder", "mpnet")  # the last --text_encoder counts
    parsed = programs.parse("buffer", "", flags)
    assert parsed.model.text_encoder == "mpnet"
    data = load_retrieval_data(parsed.data, parsed.model, torch.device("cpu"), progress=False)
    assert data.train_text.shape == (200, 768) and data.eval_text.shape == (50, 768)
    assert data.text_identity == "mpnet-all-mpnet-base-v2-0.0.1"
    cached = sorted(p.name for p in (mpnet_cache / "text_embeddings").iterdir())
    assert len(cached) == 2 and all("_mpnet-all-mpnet-base-v2-0.0.1_" in name for name in cached)
    direct = FrozenTextEncoder("mpnet", None, torch.device("cpu"), mpnet_cache).encode(data.eval.captions[:3],
                                                                                       progress=False)
    torch.testing.assert_close(data.eval_text[:3], direct, atol=1e-5, rtol=1e-4)
    monkeypatch.setattr("data.build.FrozenTextEncoder", lambda *a: pytest.fail("the cache was not reused"))
    again = load_retrieval_data(parsed.data, parsed.model, torch.device("cpu"), progress=False)
    assert torch.equal(again.train_text, data.train_text)


@pytest.mark.slow
def test_max_train_images_keeps_the_first_images_with_all_their_captions(tiny_shapes, cache_dir):
    base = dict(dataset="shapes", image_root=str(tiny_shapes), cache_dir=str(cache_dir))
    minilm = ModelSettings(text_encoder="minilm")
    full = load_retrieval_data(DataSettings(**base), minilm, torch.device("cpu"), progress=False)
    part = load_retrieval_data(DataSettings(**base, max_train_images=7), minilm, torch.device("cpu"), progress=False)
    assert part.train.image_paths == full.train.image_paths[:7]
    kept = [c for c, i in enumerate(full.train.txt2img) if i < 7]
    assert part.train.captions == [full.train.captions[c] for c in kept] and len(kept) == 35
    torch.testing.assert_close(part.train_text, full.train_text[kept], atol=1e-5, rtol=1e-4)  # other padding
    assert part.eval.captions == full.eval.captions  # the evaluation split is untouched
    with pytest.raises(UserError, match="--max_train_images must be at least 1"):
        DataSettings(**base, max_train_images=0).validate()
