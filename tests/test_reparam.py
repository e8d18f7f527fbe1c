"""ReparamModule: same outputs and gradients as the plain module, second-order gradients, buffers untouched."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from networks import ImageTextModel, create_image_encoder
from reparam_module import ReparamModule, flatten


@pytest.mark.slow
@pytest.mark.parametrize("name", ["convnet", "resnet18"])
def test_output_and_gradient_equal_the_plain_module(name):
    torch.manual_seed(0)
    module = create_image_encoder(name, 16).double().train()
    wrapped = ReparamModule(module)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    theta = wrapped.flat_param().requires_grad_(True)
    out = wrapped(x, flat_param=theta)
    expected = module(x)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    (out ** 2).sum().backward()
    module.zero_grad()
    (module(x) ** 2).sum().backward()
    torch.testing.assert_close(theta.grad, flatten([p.grad for p in module.parameters()]), rtol=1e-10, atol=1e-12)


def test_snapshot_layout_is_the_flat_layout():
    head = ImageTextModel(create_image_encoder("convnet", 16), 8).text_projection
    wrapped = ReparamModule(head)
    snapshot = [p.detach().clone() for p in head.parameters()]
    assert torch.equal(flatten(snapshot), wrapped.flat_param())
    assert wrapped.num_params == sum(p.numel() for p in head.parameters())
    with pytest.raises(ValueError, match="flat_param must be a vector"):
        wrapped(torch.randn(2, 8), flat_param=torch.zeros(3))


def test_second_order_gradients_flow_through_an_unrolled_step():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    wrapped = ReparamModule(net)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    lr = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    theta0 = wrapped.flat_param().requires_grad_(True)

    def loss_after_one_step(x, lr):
        grad = torch.autograd.grad(wrapped(x, flat_param=theta0).pow(2).sum(), theta0, create_graph=True)[0]
        return (theta0 - lr * grad).pow(2).sum()

    loss_after_one_step(x, lr).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and lr.grad is not None
    assert torch.autograd.gradcheck(loss_after_one_step, (x.detach().requires_grad_(), lr.detach().requires_grad_()))


@pytest.mark.slow
def test_running_statistics_are_never_changed_by_student_calls():
    torch.manual_seed(0)
    module = create_image_encoder("resnet18", 16).train()
    before = {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "num_batches" in k}
    wrapped = ReparamModule(module)
    wrapped(torch.randn(4, 3, 16, 16), flat_param=wrapped.flat_param())
    after = module.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    module(torch.randn(4, 3, 16, 16))  # a plain training call does update them
    assert not torch.equal(before["bn1.running_mean"], module.state_dict()["bn1.running_mean"])
