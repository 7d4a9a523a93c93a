"""LoRA-Pro trains: on a small regression task with a known full-rank answer, from PEFT's B = 0 start.

The task is chosen so that the optimizers' defining property shows: the target weight change is a random
rank-4 matrix that a rank-4 adapter can represent exactly, and LoRA-Pro must reach it.
"""

from __future__ import annotations

import pytest
import torch
from models import tiny_batch, tiny_peft, train_tiny
from torch import nn

import lorapro


def _regression_problem(seed=0, n=24, m=16, r=4):
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(m, n, generator=g) / n**0.5
    delta = (torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g)) / n**0.5
    X = torch.randn(256, n, generator=g)
    return W0, delta, X


def _lora_linear(W0, r=4, alpha=8, seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    lin = nn.Linear(W0.shape[1], W0.shape[0], bias=False)
    lin.weight.data.copy_(W0)
    return get_peft_model(nn.Sequential(lin), LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"]))


@pytest.mark.parametrize(
    "make_opt, steps",
    [
        (lambda m: lorapro.LoRAProAdamW(m, lr=2e-2), 150),
        (lambda m: lorapro.LoRAProAdamW(m, lr=2e-2, x_mode="zero"), 150),
        (lambda m: lorapro.LoRAProSGD(m, lr=0.5), 150),
    ],
    ids=["adamw-sylvester", "adamw-zero", "sgd"],
)
def test_reaches_a_low_rank_target(make_opt, steps):
    W0, delta, X = _regression_problem()
    Y = X @ (W0 + delta).T
    model = _lora_linear(W0)
    opt = make_opt(model)
    first = None
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(X) - Y) ** 2).mean()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    final = ((model(X) - Y) ** 2).mean().item()
    assert final < 1e-2 * first, (first, final)


def test_tiny_classifier_loss_goes_down_from_b_zero():
    model = tiny_peft()
    opt = lorapro.LoRAProAdamW(model, lr=1e-2)
    batch = tiny_batch(n=64)
    losses = train_tiny(model, opt, batch, 40)
    assert losses[-1] < 0.5 * losses[0]
