"""The meta-gradient of one trajectory-matching iteration against an independent unrolled reference."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call

from matching.trajectory import FrozenPass, Segment, Students, draw_minibatches, unrolled_matching_loss
from networks import ImageTextModel
from networks.convnet import ConvNet
from reparam_module import ReparamModule, flatten

N, MINI, STEPS = 6, 4, 3


def _setup():
    torch.manual_seed(0)
    model = ImageTextModel(ConvNet(8, width=4), text_dim=5).double().train()  # dropout active
    image_syn = torch.randn(N, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    text_syn = torch.randn(N, 5, dtype=torch.float64, requires_grad=True)
    lr_img = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    lr_txt = torch.tensor(0.08, dtype=torch.float64, requires_grad=True)
    start = {part: [p.detach().clone() for p in getattr(model, part).parameters()]
             for part in ("image_encoder", "text_projection")}
    target = {part: [p + 0.1 * torch.randn_like(p) for p in ps] for part, ps in start.items()}
    batches = draw_minibatches(N, MINI, STEPS, torch.Generator().manual_seed(1))
    return model, image_syn, text_syn, lr_img, lr_txt, start, target, batches


def reference_matching_loss(model, image_syn, text_syn, lr_img, lr_txt, start, target, batches):
    """Straightforward unrolled loop over named parameter dicts with torch.func.functional_call."""
    names = {part: [n for n, _ in getattr(model, part).named_parameters()] for part in start}
    params = {part: dict(zip(names[part], [t.clone().requires_grad_(True) for t in start[part]])) for part in start}
    lrs = {"image_encoder": lr_img, "text_projection": lr_txt}
    for idx in batches:
        img = functional_call(model.image_encoder, params["image_encoder"], (image_syn[idx],))
        txt = functional_call(model.text_projection, params["text_projection"], (text_syn[idx],))
        img, txt = img / img.norm(dim=1, keepdim=True), txt / txt.norm(dim=1, keepdim=True)
        logits = img @ txt.t() / 0.07
        labels = torch.arange(len(idx))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        new = {}
        for part in params:
            grads = torch.autograd.grad(loss, list(params[part].values()), create_graph=True)
            new[part] = {n: p - lrs[part] * g for (n, p), g in zip(params[part].items(), grads)}
        params = new
    total = 0
    for part in params:
        moved = sum(((params[part][n] - t) ** 2).sum() for n, t in zip(names[part], target[part]))
        total = total + moved / sum(((s - t) ** 2).sum() for s, t in zip(start[part], target[part]))
    return total


def _project_loss(model, image_syn, text_syn, lr_img, lr_txt, start, target, batches):
    students = Students(ReparamModule(model.image_encoder), ReparamModule(model.text_projection))
    segment = Segment(flatten(start["image_encoder"]), flatten(start["text_projection"]),
                      flatten(target["image_encoder"]), flatten(target["text_projection"]), 0)
    return unrolled_matching_loss(students, image_syn, text_syn, lr_img, lr_txt, segment, batches).total


def _grads(loss_fn, setup, seed=123):
    model, image_syn, text_syn, lr_img, lr_txt, start, target, batches = setup
    torch.manual_seed(seed)  # same dropout masks for both implementations
    loss = loss_fn(model, image_syn, text_syn, lr_img, lr_txt, start, target, batches)
    return loss.detach(), torch.autograd.grad(loss, (image_syn, text_syn, lr_img, lr_txt))


def _assert_rel_close(a, b, tol):
    assert (a - b).norm() <= tol * b.norm(), f"relative error {((a - b).norm() / b.norm()).item():.3e}"


@pytest.mark.slow
def test_meta_gradient_equals_the_independent_unrolled_reference():
    setup = _setup()
    loss, grads = _grads(_project_loss, setup)
    ref_loss, ref_grads = _grads(reference_matching_loss, setup)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    for got, expected in zip(grads, ref_grads):
        assert expected.abs().sum() > 0
        _assert_rel_close(got, expected, 1e-8)


@pytest.mark.slow
def test_step_size_gradient_matches_a_finite_difference():
    setup = _setup()
    model, image_syn, text_syn, lr_img, lr_txt, start, target, batches = setup
    _, grads = _grads(_project_loss, setup)

    def loss_at(value):
        torch.manual_seed(123)
        lr = torch.tensor(value, dtype=torch.float64)
        return _project_loss(model, image_syn, text_syn, lr, lr_txt, start, target, batches).item()

    h = 1e-6
    finite = (loss_at(lr_img.item() + h) - loss_at(lr_img.item() - h)) / (2 * h)
    assert grads[2].item() == pytest.approx(finite, rel=1e-6)


def test_minibatches_are_distinct_indices_of_the_right_size():
    batches = draw_minibatches(10, 4, 5, torch.Generator().manual_seed(0))
    assert len(batches) == 5 and all(len(set(b.tolist())) == 4 and max(b) < 10 for b in batches)
    again = draw_minibatches(10, 4, 5, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))


@pytest.mark.slow
def test_real_and_clean_initialisation_share_the_pairs_and_differ_in_augmentation(tiny_shapes, cache_dir):
    from data.build import load_retrieval_data
    from data.datasets import load_rgb
    from data.transforms import test_transform
    from matching.synthetic import initial_synthetic_set, real_pairs

    from settings import DataSettings, ModelSettings

    data = load_retrieval_data(DataSettings(dataset="shapes", image_root=str(tiny_shapes), cache_dir=str(cache_dir)),
                               ModelSettings(text_encoder="minilm"), torch.device("cpu"), progress=False)
    sets = {init: initial_synthetic_set(data, 5, 16, init, "real", "minilm", torch.Generator().manual_seed(4))
            for init in ("real", "clean")}
    images, captions = real_pairs(data, 5, torch.Generator().manual_seed(4))
    expected = torch.stack([test_transform(16)(load_rgb(data.train.image_paths[i])) for i in images.tolist()])
    assert torch.equal(sets["clean"][0], expected)
    assert not torch.allclose(sets["real"][0], expected, atol=1e-3)  # cropped, flipped, RandAugment-ed
    assert torch.equal(sets["real"][1], sets["clean"][1]) and torch.equal(sets["clean"][1], data.train_text[captions])


def _mode_result(mode, setup, steps, augment=None):
    """`matching_gradients`' result on the test problem, and the next random number after it."""
    from matching.meta_gradient import matching_gradients
    from matching.trajectory import contrastive_step_loss

    model, image_syn, text_syn, lr_img, lr_txt, start, target, _ = setup
    batches = draw_minibatches(N, MINI, steps, torch.Generator().manual_seed(steps))
    students = Students(ReparamModule(model.image_encoder), ReparamModule(model.text_projection))
    segment = Segment(flatten(start["image_encoder"]), flatten(start["text_projection"]),
                      flatten(target["image_encoder"]), flatten(target["text_projection"]), 0)
    torch.manual_seed(123)  # the dropout masks of every step come from here
    result = matching_gradients(mode, students, contrastive_step_loss(students, batches, augment), steps,
                                (image_syn, text_syn), lr_img, lr_txt, segment)
    return result, torch.rand(1)


def _mode_gradients(mode, setup, steps, augment=None):
    """Loss terms, the meta-gradient (images, texts, both step sizes) and the next random number after it."""
    result, after = _mode_result(mode, setup, steps, augment)
    grads = (*result.learned_grads, result.lr_img_grad, result.lr_txt_grad)
    return (result.image_term, result.text_term), grads, after


@pytest.mark.slow
@pytest.mark.parametrize("steps", [1, 3, 5, 7, 8, 10])
def test_exact_lowmem_gives_the_unrolled_meta_gradient(steps):
    """From 5 steps on the sweep runs over several blocks of ⌈√N⌉ steps, the last one short, and
    recomputes all but the last from their checkpoints."""
    setup = _setup()
    assert MINI < N and setup[0].text_projection.dropout.p > 0 and setup[0].training
    terms, grads, after = _mode_gradients("exact_lowmem", setup, steps)
    ref_terms, ref_grads, ref_after = _mode_gradients("unroll", setup, steps)
    for got, expected in zip(terms, ref_terms):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    for got, expected in zip(grads, ref_grads):
        assert expected.abs().sum() > 0
        _assert_rel_close(got, expected, 1e-11)  # the two orders of summation differ by ~1e-12 at 10 steps
    assert torch.equal(after, ref_after)  # the sweep leaves the global RNG where the forward pass left it


@pytest.mark.slow
def test_recomputing_a_block_gives_the_same_bits_as_storing_every_step(monkeypatch):
    import matching.meta_gradient

    setup = _setup()
    _, blocks, blocks_after = _mode_gradients("exact_lowmem", setup, 7)
    monkeypatch.setattr(matching.meta_gradient, "checkpoint_interval", lambda steps: 1)  # θ_k of every step kept
    _, stored, stored_after = _mode_gradients("exact_lowmem", setup, 7)
    assert all(torch.equal(a, b) for a, b in zip(blocks, stored)) and torch.equal(blocks_after, stored_after)


@pytest.mark.slow
@pytest.mark.parametrize("steps", [1, 4, 10, 16, 30])
def test_exact_lowmem_holds_about_two_square_roots_of_the_steps_in_parameter_vectors(steps):
    result, _ = _mode_result("exact_lowmem", _setup(), steps)
    assert 1 <= result.parameters_held <= 2 * math.ceil(math.sqrt(steps))
    if steps >= 10:
        assert result.parameters_held < steps  # one copy per step is no longer kept


@pytest.mark.slow
def test_exact_lowmem_replays_the_augmentation_of_every_step():
    from utils.dsa import dsa_augment

    def augment(images, step):
        return dsa_augment(images, "color_crop_flip_scale", 1000 + step)

    setup = _setup()
    _, grads, _ = _mode_gradients("exact_lowmem", setup, 3, augment)
    _, ref_grads, _ = _mode_gradients("unroll", setup, 3, augment)
    _, plain_grads, _ = _mode_gradients("unroll", setup, 3)
    assert (ref_grads[0] - plain_grads[0]).norm() > 1e-3 * plain_grads[0].norm()  # augmentation mattered
    for got, expected in zip(grads, ref_grads):
        _assert_rel_close(got, expected, 1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("steps", [1, 3, 8])
def test_tesla_is_exact_for_one_step_and_drops_the_hessian_terms_after(steps):
    setup = _setup()
    _, grads, _ = _mode_gradients("tesla", setup, steps)
    _, ref_grads, _ = _mode_gradients("unroll", setup, steps)
    errors = [((got - expected).norm() / expected.norm()).item() for got, expected in zip(grads, ref_grads)]
    if steps == 1:
        assert max(errors) < 1e-10
    else:
        assert min(errors) > 1e-3, errors  # every gradient differs: the approximation is really in use


def test_unknown_matching_mode_is_refused():
    from matching.meta_gradient import matching_gradients

    with pytest.raises(ValueError, match="unknown matching mode 'fast'"):
        matching_gradients("fast", None, None, 1, (), None, None, None)


@pytest.mark.slow
def test_exact_lowmem_matches_unroll_with_a_learned_similarity_and_blending():
    from matching.meta_gradient import matching_gradients
    from matching.trajectory import contrastive_step_loss, draw_blends
    from networks.similarity import TargetSimilarity

    model, image_syn, text_syn, lr_img, lr_txt, start, target, _ = _setup()
    similarity = TargetSimilarity("lowrank", N, rank=2)
    generator = torch.Generator().manual_seed(7)
    sim_params = [t.double() for t in similarity.initial_params(generator, torch.device("cpu"))]
    sim_params[2] = torch.randn(N, 2, dtype=torch.float64, generator=generator)  # S away from the identity
    sim_params = [t.requires_grad_(True) for t in sim_params]
    batches = draw_minibatches(N, MINI, 3, generator)
    blends = draw_blends(3, MINI, 0.5, generator)
    students = Students(ReparamModule(model.image_encoder), ReparamModule(model.text_projection))
    segment = Segment(flatten(start["image_encoder"]), flatten(start["text_projection"]),
                      flatten(target["image_encoder"]), flatten(target["text_projection"]), 0)
    results = {}
    for mode in ("unroll", "exact_lowmem"):
        torch.manual_seed(123)
        step_loss = contrastive_step_loss(students, batches, similarity=similarity, loss_type="wbce", blends=blends)
        result = matching_gradients(mode, students, step_loss, 3, (image_syn, text_syn, *sim_params), lr_img,
                                    lr_txt, segment)
        results[mode] = [*result.learned_grads, result.lr_img_grad, result.lr_txt_grad]
    assert len(results["unroll"]) == 7  # images, texts, a, L, R, both step sizes
    for got, expected in zip(results["exact_lowmem"], results["unroll"]):
        assert expected.abs().sum() > 0
        _assert_rel_close(got, expected, 1e-6)


@pytest.mark.slow
@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(size=st.integers(2, 12), steps=st.integers(1, 4), batch=st.integers(1, 12), chunk=st.integers(1, 13),
       augmented=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_the_frozen_encoder_runs_on_the_images_the_minibatches_use_with_the_same_outputs_and_gradients(
        size, steps, batch, chunk, augmented, seed):
    """FrozenPass equals the encoder over every image at the rows the steps read, zero elsewhere, and the gradient
    it sends to the learned pixels is the whole encoder's gradient restricted to those rows (eval-mode BatchNorm:
    each image's output is its own), whether the used images go through in one pass or `chunk` at a time, and
    whether the pixels are the learned tensor itself or a function of it (an augmentation)."""
    generator = torch.Generator().manual_seed(seed)
    encoder = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                  torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).double()
    with torch.no_grad():
        encoder[1].running_mean.uniform_(-1, 1, generator=generator)
        encoder[1].running_var.uniform_(0.5, 2, generator=generator)
    encoder.eval()
    batches = [torch.randperm(size, generator=generator)[:min(batch, size)] for _ in range(steps)]
    used = torch.zeros(size, dtype=torch.bool)
    used[torch.cat(batches)] = True
    leaf = torch.randn(size, 3, 6, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    pixels = (leaf * 1.5 + 0.25).flip(-1) if augmented else leaf
    upstream = torch.randn(size, 4, generator=generator, dtype=torch.float64) * used[:, None]  # only read rows
    whole = encoder(pixels)
    (whole_grad,) = torch.autograd.grad(whole, leaf, upstream, retain_graph=True)
    trunk = FrozenPass(encoder, pixels, batches, chunk)
    grad = trunk.pixel_gradient(leaf, upstream)
    assert not trunk.features.requires_grad
    torch.testing.assert_close(trunk.features[used], whole[used].detach(), rtol=1e-12, atol=1e-12)
    assert torch.equal(trunk.features[~used], torch.zeros_like(trunk.features[~used]))
    torch.testing.assert_close(grad, whole_grad, rtol=1e-12, atol=1e-12)
    assert torch.equal(grad[~used], torch.zeros_like(grad[~used]))
