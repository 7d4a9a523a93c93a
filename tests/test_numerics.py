"""Low precision, degenerate factors and non-finite gradients never produce NaN/Inf parameters."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from models import tiny_batch, tiny_loss, tiny_peft, train_tiny

import lorapro


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_low_precision_params_train_and_keep_dtype(dtype, kind):
    model = tiny_peft(dtype=dtype)
    opt = lorapro.LoRAProAdamW(model, lr=1e-2) if kind == "adamw" else lorapro.LoRAProSGD(model, lr=1.0)
    batch = tiny_batch(dtype=dtype)
    losses = train_tiny(model, opt, batch, 25)
    for p in model.parameters():
        assert p.dtype == dtype and torch.isfinite(p).all()
    assert losses[-1] < 0.8 * losses[0]
    if kind == "adamw":
        assert all(opt.state[p.B]["exp_avg"].dtype == torch.float32 for p in opt.pairs)


def _one_layer(A, B, s=2.0):
    """Custom pair with a fixed full gradient, so degenerate factors can be set exactly."""
    A = torch.nn.Parameter(A)
    B = torch.nn.Parameter(B)
    return A, B, s


@pytest.mark.parametrize(
    "make",
    [
        lambda: (torch.randn(3, 7), torch.zeros(5, 3)),  # B = 0 (PEFT default)
        lambda: (torch.zeros(3, 7), torch.randn(5, 3)),  # A = 0 (PEFT's Embedding default)
        lambda: (torch.zeros(3, 7), torch.zeros(5, 3)),  # both zero
        lambda: (torch.randn(3, 7), torch.randn(5, 1).repeat(1, 3)),  # rank-1 B
        lambda: (torch.cat([torch.randn(2, 7), torch.zeros(1, 7)]), torch.randn(5, 3)),  # zero row in A
        lambda: (torch.randn(3, 7), torch.randn(5, 3) * 1e-30),  # B far below float32 resolution
        lambda: (torch.randn(3, 7) * 1e15, torch.randn(5, 3) * 1e-15),  # extreme imbalance
    ],
    ids=["B0", "A0", "both0", "rank1B", "zero-row-A", "tinyB", "imbalanced"],
)
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
@pytest.mark.parametrize("x_mode", ["sylvester", "zero"])
def test_degenerate_factors_stay_finite(make, kind, x_mode):
    torch.manual_seed(0)
    A, B, s = _one_layer(*make())
    target = torch.randn(5, 7)
    cls = lorapro.LoRAProAdamW if kind == "adamw" else lorapro.LoRAProSGD
    opt = cls([(A, B, s)], lr=1e-3, x_mode=x_mode)
    for _ in range(5):
        opt.zero_grad()
        ((s * B @ A - target) ** 2).sum().backward()
        opt.step()
        assert torch.isfinite(A).all() and torch.isfinite(B).all()


def test_b_zero_start_moves_only_b_first():
    """docs/algorithm.md section 7: with B = 0, gA = 0 exactly and the answer is a = 0, b = (1/s^2) gB (A A^T)^-1."""
    torch.manual_seed(0)
    A, B, s = _one_layer(torch.randn(3, 7, dtype=torch.float64), torch.zeros(5, 3, dtype=torch.float64))
    A0 = A.detach().clone()
    opt = lorapro.LoRAProSGD([(A, B, s)], lr=0.1)
    g = torch.randn(5, 7, dtype=torch.float64)
    (s * B @ A * g).sum().backward()  # dL/dW = g
    gB = B.grad.clone()
    opt.step()
    assert torch.equal(A, A0)
    torch.testing.assert_close(B, -0.1 * gB @ torch.linalg.inv(A0 @ A0.T) / s**2, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["pair", "other"])
def test_non_finite_gradient_skips_the_whole_step(bad, where):
    model = tiny_peft(init_lora_weights=False)
    opt = lorapro.LoRAProAdamW(model, lr=1e-2)
    opt.zero_grad()
    tiny_loss(model, tiny_batch()).backward()
    opt.step()
    params = copy.deepcopy([p.detach() for p in model.parameters()])
    state = copy.deepcopy(opt.state_dict()["state"])
    opt.zero_grad()
    tiny_loss(model, tiny_batch(seed=1)).backward()
    target = opt.pairs[1].B if where == "pair" else opt.param_groups[0]["params"][-1]
    target.grad.view(-1)[0] = bad
    with pytest.warns(RuntimeWarning, match="step was skipped"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    new_state = opt.state_dict()["state"]
    assert state.keys() == new_state.keys()
    for k in state:
        for key, value in state[k].items():
            assert torch.equal(value, new_state[k][key])


@pytest.mark.parametrize("where", ["pair", "other"])
def test_finite_gradient_whose_norm_overflows_is_stepped(where):
    """The finiteness check reads 2-norms first; 1e30 in every element overflows a float32 norm but is finite,
    so the step must be taken (no warning, the step counts advance), not skipped as if it were Inf."""
    model = tiny_peft(dtype=torch.float32, init_lora_weights=False)
    opt = lorapro.LoRAProAdamW(model, lr=1e-2)
    opt.zero_grad()
    tiny_loss(model, tiny_batch(dtype=torch.float32)).backward()
    target = opt.pairs[1].B if where == "pair" else opt.param_groups[0]["params"][-1]
    target.grad.fill_(1e30)
    assert not torch.isfinite(torch.linalg.vector_norm(target.grad))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*step was skipped")
        opt.step()
    assert float(opt.state[target]["step"]) == 1.0
