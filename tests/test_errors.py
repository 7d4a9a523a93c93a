"""Bad input gets a clear error naming the problem."""

from __future__ import annotations

import pytest
import torch
from models import tiny_peft

import lorapro


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=-1.0), "Invalid learning rate"),
        (dict(lr=float("nan")), "Invalid learning rate"),
        (dict(lr="fast"), "Invalid learning rate"),
        (dict(betas=(0.9, 1.0)), "Invalid betas"),
        (dict(betas=(-0.1, 0.9)), "Invalid betas"),
        (dict(betas=(0.9,)), "Invalid betas"),
        (dict(eps=-1e-8), "Invalid epsilon"),
        (dict(weight_decay=-0.1), "Invalid weight_decay"),
        (dict(x_mode="pinv"), "Invalid x_mode.*sylvester, zero"),
    ],
)
def test_adamw_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lorapro.LoRAProAdamW(tiny_peft(), **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=-1.0), "Invalid learning rate"),
        (dict(lr=0.1, weight_decay=float("inf")), "Invalid weight_decay"),
        (dict(lr=0.1, x_mode=None), "Invalid x_mode"),
    ],
)
def test_sgd_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lorapro.LoRAProSGD(tiny_peft(), **kwargs)


def test_bad_group_hyperparameter_is_caught_too():
    model = tiny_peft()
    with pytest.raises(ValueError, match="Invalid learning rate"):
        lorapro.LoRAProAdamW([{"params": model, "lr": -3.0}])


def test_params_of_the_wrong_kind():
    with pytest.raises(TypeError, match="iterable of LoRAPair objects"):
        lorapro.LoRAProAdamW(["not a tensor"])
    with pytest.raises(ValueError, match="empty parameter list"):
        lorapro.LoRAProAdamW([])
    with pytest.raises(ValueError, match="no LoRA pair was given"):
        lorapro.LoRAProAdamW([torch.nn.Parameter(torch.zeros(3))])


def test_a_parameter_in_two_places_is_refused():
    A, B = torch.nn.Parameter(torch.randn(2, 4)), torch.nn.Parameter(torch.randn(3, 2))
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        lorapro.LoRAProAdamW([{"params": [(A, B, 1.0)]}, {"params": [A]}])
