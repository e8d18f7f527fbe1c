"""A frozen trunk and a trainable top (--train_stages): the split, the model, and the meta-gradient through it."""
from __future__ import annotations


import pytest
import timm
import torch
import torch.nn.functional as F
from torch.func import functional_call

from data.transforms import NORMALIZATIONS, renormalize
from matching.meta_gradient import matching_gradients
from matching.trajectory import Segment, Students, contrastive_step_loss, draw_minibatches
from networks import ImageTextModel, trainable_parameters, trainable_parts
from settings import ModelSettings
from networks.convnet import ConvNet
from networks.image_encoders import resolve_image_norm
from networks.split import num_stages, split_encoder
from reparam_module import ReparamModule, flatten
from utils.cli import UserError


@pytest.mark.slow
@pytest.mark.parametrize("name, stages", [("tf_efficientnet_lite0", 7), ("resnet18", 4), ("nf_resnet50", 4)])
def test_every_split_of_a_timm_encoder_composes_to_the_encoder(name, stages):
    torch.manual_seed(0)
    encoder = timm.create_model(name, pretrained=False, num_classes=0, global_pool="avg").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        whole = encoder(x)
        assert num_stages(encoder) == stages
        for k in [None, 0, *range(1, stages + 1)]:
            trunk, top = split_encoder(encoder, k)
            torch.testing.assert_close(top(trunk(x)), whole, rtol=0, atol=1e-5)


def test_the_split_keeps_the_encoders_feature_dropout_in_the_top():
    torch.manual_seed(0)
    encoder = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0, drop_rate=0.3).train()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(5)
    whole = encoder(x)
    trunk, top = split_encoder(encoder, 2)
    torch.manual_seed(5)
    torch.testing.assert_close(top(trunk(x)), whole)
    top.eval()
    assert not torch.equal(top(trunk(x)), whole)  # the dropout follows the top's own mode


def test_convnet_splits_by_conv_block_and_other_encoders_are_refused():
    encoder = ConvNet(16, width=4)
    x = torch.randn(3, 3, 16, 16)
    for k in (1, 2, 3):
        trunk, top = split_encoder(encoder, k)
        torch.testing.assert_close(top(trunk(x)), encoder(x))
    assert split_encoder(encoder, 1)[0](x).shape == (3, 4, 4, 4)  # two blocks of 2x2 pooling
    with pytest.raises(UserError, match="has 3 stages") as caught:
        split_encoder(encoder, 4)
    assert (caught.value.field, caught.value.value) == ("train_stages", 4)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32)
    with pytest.raises(UserError, match="cannot be split into stages") as caught:
        split_encoder(vit, 1)
    assert (caught.value.field, caught.value.value) == ("train_stages", 1)
    trunk, top = split_encoder(vit, 0)  # frozen whole: allowed for any encoder
    assert trunk is vit and isinstance(top, torch.nn.Identity)


def test_model_freezes_the_trunk_keeps_it_in_eval_mode_and_trains_the_rest():
    model = ImageTextModel(ConvNet(16, width=4), text_dim=5, train_stages=1).train()
    stage3 = model.image_encoder.features[8:]
    assert model.has_trunk and all(not p.requires_grad for p in model.trunk.parameters())
    assert [p.shape for p in trainable_parameters(model.image_part)] == [p.shape for p in stage3.parameters()]
    assert not model.trunk.training and model.image_tower.training
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model.encode_trunk_output(model.trunk(x)), model.encode_image(x))
    projected = ImageTextModel(ConvNet(16, width=4), text_dim=5, image_projection=True)
    assert projected.train_stages == 0 and projected.trunk is projected.image_encoder
    assert list(trainable_parameters(projected.image_part)) == list(projected.image_projection.parameters())
    paper = ImageTextModel(ConvNet(16, width=4), text_dim=5)
    assert not paper.has_trunk and paper.image_part is paper.image_encoder
    with pytest.raises(ValueError, match="needs an image projection head"):
        ImageTextModel(ConvNet(16, width=4), text_dim=5, train_stages=0)


def test_train_stages_flag_and_what_buffers_record():
    def args(**kw):
        return ModelSettings(**kw)  # (no pretrained-weights check: only the recorded parts are asked for)
    assert args().trainable_stages is None and trainable_parts(args()) == ["image_encoder", "text_projection"]
    assert args(image_projection=True).trainable_stages == 0
    assert trainable_parts(args(image_projection=True)) == ["image_projection", "text_projection"]
    assert trainable_parts(args(train_stages=2)) == ["image_encoder.last2_stages", "text_projection"]
    assert trainable_parts(args(train_stages=1, image_projection=True)) == [
        "image_encoder.last1_stages", "image_projection", "text_projection"]
    assert args(train_stages="all", image_projection=True).trainable_stages is None


def test_normalisation_follows_the_pretrained_weights():
    assert resolve_image_norm("auto", "efficientnet_lite0", pretrained=True) == "inception"  # timm: mean = std = 0.5
    assert resolve_image_norm("auto", "nfnet", pretrained=True) == "imagenet"
    assert resolve_image_norm("auto", "efficientnet_lite0", pretrained=False) == "clip"  # from scratch: the reference
    assert resolve_image_norm("clip", "efficientnet_lite0", pretrained=True) == "clip"
    pixels = torch.rand(2, 3, 4, 4)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATIONS["clip"])
    clip = (pixels - mean) / std
    torch.testing.assert_close(renormalize(clip, "clip", "inception"), (pixels - 0.5) / 0.5)
    torch.testing.assert_close(renormalize(renormalize(clip, "clip", "imagenet"), "imagenet", "clip"), clip)


# --- the meta-gradient through a frozen trunk equals the full unroll's ---------------------------------------------

N, MINI, STEPS = 6, 4, 3


def _setup(train_stages: int = 2):
    torch.manual_seed(0)
    model = ImageTextModel(ConvNet(8, width=4), text_dim=5, train_stages=train_stages).double().train()
    image_syn = torch.randn(N, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    text_syn = torch.randn(N, 5, dtype=torch.float64, requires_grad=True)
    lrs = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (0.05, 0.08)]
    start = {"image": [p.detach().clone() for p in trainable_parameters(model.image_part)],
             "text": [p.detach().clone() for p in model.text_projection.parameters()]}
    target = {part: [p + 0.1 * torch.randn_like(p) for p in ps] for part, ps in start.items()}
    batches = draw_minibatches(N, MINI, STEPS, torch.Generator().manual_seed(1))
    return model, image_syn, text_syn, lrs, start, target, batches


def full_unroll_reference(model, image_syn, text_syn, lrs, start, target, batches):
    """Every student step runs the whole encoder on the pixels, the trunk's weights held fixed: a plain loop
    over named parameters with torch.func.functional_call, independent of the project's matching code."""
    image_names = [n for n, p in model.image_encoder.named_parameters() if p.requires_grad]
    text_names = [n for n, _ in model.text_projection.named_parameters()]
    params = {"image": dict(zip(image_names, [t.clone().requires_grad_(True) for t in start["image"]])),
              "text": dict(zip(text_names, [t.clone().requires_grad_(True) for t in start["text"]]))}
    for idx in batches:
        img = functional_call(model.image_encoder, params["image"], (image_syn[idx],), strict=False)
        txt = functional_call(model.text_projection, params["text"], (text_syn[idx],))
        img, txt = F.normalize(img, dim=1), F.normalize(txt, dim=1)
        logits = img @ txt.t() / 0.07
        labels = torch.arange(len(idx))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        new = {}
        for (part, named), lr in zip(params.items(), lrs):
            grads = torch.autograd.grad(loss, list(named.values()), create_graph=True)
            new[part] = {n: p - lr * g for (n, p), g in zip(named.items(), grads)}
        params = new
    total = 0
    for part, names in (("image", image_names), ("text", text_names)):
        moved = sum(((params[part][n] - t) ** 2).sum() for n, t in zip(names, target[part]))
        total = total + moved / sum(((s - t) ** 2).sum() for s, t in zip(start[part], target[part]))
    return total


def through_the_trunk_once(mode, model, image_syn, text_syn, lrs, start, target, batches):
    """What distill.py does: the trunk once on the pixels, the student steps on its (detached) outputs, and
    the gradient w.r.t. the outputs taken back through the trunk to the pixels."""
    students = Students(ReparamModule(model.image_part), ReparamModule(model.text_projection), model.trunk)
    segment = Segment(flatten(start["image"]), flatten(start["text"]), flatten(target["image"]),
                      flatten(target["text"]), 0)
    features = model.trunk(image_syn)
    leaf = features.detach().requires_grad_(True)
    step_loss = contrastive_step_loss(students, batches, features_given=True)
    result = matching_gradients(mode, students, step_loss, len(batches), (leaf, text_syn), *lrs, segment)
    (image_grad,) = torch.autograd.grad(features, image_syn, result.learned_grads[0])
    return result.image_term + result.text_term, [image_grad, result.learned_grads[1], result.lr_img_grad,
                                                  result.lr_txt_grad]


@pytest.mark.parametrize("mode", ["unroll", "exact_lowmem"])
@pytest.mark.parametrize("train_stages", [1, 2])
def test_meta_gradient_through_a_frozen_trunk_equals_the_full_unroll(mode, train_stages):
    model, image_syn, text_syn, lrs, start, target, batches = _setup(train_stages)
    torch.manual_seed(7)  # the text head's dropout draws the same masks in both
    reference = full_unroll_reference(model, image_syn, text_syn, lrs, start, target, batches)
    expected = torch.autograd.grad(reference, (image_syn, text_syn, *lrs))
    torch.manual_seed(7)
    loss, got = through_the_trunk_once(mode, model, image_syn, text_syn, lrs, start, target, batches)
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-12, atol=0)
    for g, e in zip(got, expected):
        assert e.abs().sum() > 0
        assert (g - e).norm() <= 1e-9 * e.norm(), f"relative error {((g - e).norm() / e.norm()).item():.2e}"
