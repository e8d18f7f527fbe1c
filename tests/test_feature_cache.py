"""The trunk-output cache: hits, misses, invalidation, interrupted writes, views, and batches over cached tensors."""
from __future__ import annotations

import os

import pytest
import torch

from data import feature_cache
from data.annotations import read_split
from data.datasets import load_rgb
from data.feature_cache import FeatureBatches, SeededView, cached_trunk_outputs, trunk_key
from data.transforms import test_transform as plain_transform
from networks.convnet import ConvNet
from networks.split import split_encoder


def trunk(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return split_encoder(ConvNet(16, width=4), 2)[0].eval()  # the first conv block: [4, 8, 8] per image


def outputs(root, cache, module, *, size=16, norm="clip", views=(0,)):
    split = read_split("shapes", "val", root / "annotations", root)
    key = trunk_key("convnet", module, 2, size, norm)
    return cached_trunk_outputs(module, key, split, "shapes", "val", list(views), cache, torch.device("cpu"),
                                batch_size=4, progress=False)


@pytest.fixture()
def counted(monkeypatch):
    """How many times the trunk actually ran over a split (cache misses)."""
    calls = []
    real = feature_cache.compute_trunk_outputs

    def counting(*args, **kwargs):
        calls.append(args[1].view)
        return real(*args, **kwargs)

    monkeypatch.setattr(feature_cache, "compute_trunk_outputs", counting)
    return calls


def test_a_miss_computes_the_trunk_on_the_test_transform_and_a_hit_reads_it_back(dataset_copy, tmp_path, counted):
    module = trunk()
    first = outputs(dataset_copy, tmp_path, module)
    assert counted == [0] and first.shape == (1, 10, 4, 8, 8)
    split = read_split("shapes", "val", dataset_copy / "annotations", dataset_copy)
    direct = module(torch.stack([plain_transform(16)(load_rgb(p)) for p in split.image_paths]))
    torch.testing.assert_close(first[0], direct)  # an independent computation of the same outputs
    again = outputs(dataset_copy, tmp_path, module)
    assert counted == [0] and torch.equal(again, first)  # no second run of the trunk
    assert len(list((tmp_path / "trunk_features").glob("*.pt"))) == 1


@pytest.mark.parametrize("change", ["weights", "image_size", "norm", "image file", "view"])
def test_anything_that_changes_the_outputs_makes_a_new_file(change, dataset_copy, tmp_path, counted):
    module = trunk()
    base = outputs(dataset_copy, tmp_path, module)
    kwargs = {}
    if change == "weights":
        with torch.no_grad():
            next(module.parameters()).add_(0.01)
    elif change == "image_size":
        kwargs["size"] = 24
    elif change == "norm":
        kwargs["norm"] = "inception"
    elif change == "image file":
        first = sorted((dataset_copy / "images" / "val").iterdir())[0]
        other = sorted((dataset_copy / "images" / "val").iterdir())[1]
        first.write_bytes(other.read_bytes())
        os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))
    else:
        kwargs["views"] = (0, 1)
    changed = outputs(dataset_copy, tmp_path, module, **kwargs)
    assert counted == [0, 1] if change == "view" else counted == [0, 0]
    assert len(list((tmp_path / "trunk_features").glob("*.pt"))) == 2
    if change == "view":
        assert torch.equal(changed[0], base[0])  # the plain view came from the cache
    elif change == "image file":
        assert torch.equal(changed[0, 0], changed[0, 1]) and not torch.equal(changed[0, 0], base[0, 0])
    else:
        assert not torch.equal(changed, base) if changed.shape == base.shape else True


def test_an_interrupted_write_leaves_no_file_and_the_next_run_completes(dataset_copy, tmp_path, monkeypatch, counted):
    real_save = torch.save

    def interrupted(obj, target, *args, **kwargs):  # target: a path or an open file, as torch.save takes
        if hasattr(target, "write"):
            target.write(b"half a file")
        else:
            with open(target, "wb") as handle:
                handle.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        outputs(dataset_copy, tmp_path, trunk())
    assert list((tmp_path / "trunk_features").iterdir()) == []  # neither the file nor its temporary
    monkeypatch.setattr(torch, "save", real_save)
    assert outputs(dataset_copy, tmp_path, trunk()).shape == (1, 10, 4, 8, 8)
    assert counted == [0, 0]


def test_a_damaged_cache_file_is_computed_again(dataset_copy, tmp_path, counted, capsys):
    module = trunk()
    base = outputs(dataset_copy, tmp_path, module)
    (path,) = (tmp_path / "trunk_features").glob("*.pt")
    path.write_bytes(b"junk")
    assert torch.equal(outputs(dataset_copy, tmp_path, module), base)
    assert counted == [0, 0] and "computing it again" in capsys.readouterr().out


def test_augmented_views_are_fixed_per_view_and_image(tiny_shapes):
    split = read_split("shapes", "train", tiny_shapes / "annotations", tiny_shapes)
    one, again, two = SeededView(split, 1, 16, "clip"), SeededView(split, 1, 16, "clip"), SeededView(split, 2, 16, "clip")
    torch.manual_seed(123)
    a = one[3][0]
    torch.manual_seed(999)  # the global stream does not matter, and is left as it was
    state = torch.get_rng_state()
    assert torch.equal(again[3][0], a) and torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(two[3][0], a) and not torch.equal(one[4][0], a)


def test_feature_batches_cover_every_pair_once_per_epoch_with_one_view_each():
    features = torch.arange(3 * 4, dtype=torch.float32).view(3, 4, 1)  # value = view * 4 + image
    txt2img = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    texts = torch.arange(7, dtype=torch.float32).view(7, 1)
    batches = FeatureBatches(features, txt2img, texts, batch_size=3, seed=0)
    assert len(batches) == 2  # 3 + 3, the last single pair has no negatives and is dropped
    seen_views = set()
    for _ in range(2):
        pairs = []
        for images, text, index in batches:
            assert torch.equal(text[:, 0], index.float())
            assert torch.equal(images[:, 0] % 4, txt2img[index].float())  # each pair with its own image
            seen_views |= set((images[:, 0] // 4).long().tolist())
            pairs += index.tolist()
        assert len(pairs) == 6 and len(set(pairs)) == 6
    assert seen_views == {0, 1, 2}
    again = FeatureBatches(features, txt2img, texts, batch_size=3, seed=0)
    assert [b[2].tolist() for b in again] == [b[2].tolist() for b in FeatureBatches(features, txt2img, texts, 3, 0)]


def test_buffer_experts_over_cached_outputs_record_only_the_trained_top(tiny_shapes, cache_dir, tmp_path, monkeypatch):
    """buffer.py with --train_stages 1: trunk outputs cached once, experts train the last stage and the heads."""
    import buffer
    from conftest import tiny_flags
    from experts.files import read_metadata

    torch.manual_seed(0)
    weights = tmp_path / "convnet.pt"
    torch.save(ConvNet(16).state_dict(), weights)
    flags = tiny_flags(tiny_shapes, tmp_path / "cache", "--image_weights", str(weights), "--train_stages", "1",
                       "--feature_views", "2", "--batch_train", "50", "--num_experts", "1", "--train_epochs", "2",
                       "--buffer_path", str(tmp_path / "buffers"))
    assert buffer.main(flags) == 0
    directory = next((tmp_path / "buffers").glob("**/buffer_meta.json")).parent
    meta = read_metadata(directory)
    assert meta["trainable_parts"] == ["image_encoder.last1_stages", "text_projection"] and meta["feature_views"] == 2
    assert meta["image_param_shapes"] == [[128, 128, 3, 3], [128], [128], [128]]  # the last conv block only
    cached = sorted(p.name for p in (tmp_path / "cache" / "trunk_features").glob("*.pt"))
    assert len(cached) == 4 and sum("_train_" in n for n in cached) == 3  # train views 0, 1, 2 and val
    monkeypatch.setattr(feature_cache, "compute_trunk_outputs", lambda *a, **k: pytest.fail("recomputed"))
    assert buffer.main(flags) == 0  # a second expert: every trunk output from the cache
    image_traj = torch.load(directory / "img_replay_buffer_1.pt", weights_only=True)[0]
    assert len(image_traj) == 3 and not torch.equal(image_traj[0][0], image_traj[2][0])
    assert torch.equal(image_traj[0][0], torch.load(weights, weights_only=True)["features.8.weight"])  # pretrained start
