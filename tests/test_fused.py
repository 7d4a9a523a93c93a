"""LoRAProAdamW(fused=True): the torch.compile'd Adam pass gives the unfused optimizer's steps (and the bf16
moments' rounding on float64 parameters)."""

from __future__ import annotations

import copy
import shutil
import warnings

import pytest
import torch

import lorapro
from lorapro.pairs import LoRAPair

pytestmark = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler"
)

# Several layers of two shapes. The CPU blocks are m // 2 rows here (the half-m x n workspace bound is below
# the cache bound), so 1101 rows make blocks of 550, 550 and 1: the compiled kernel sees a short last block.
SHAPES = [(300, 70, 4), (300, 70, 4), (1101, 520, 8)]


def _factors(dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(r, n, generator=g, dtype=dtype).requires_grad_(),
         torch.randn(m, r, generator=g, dtype=dtype).requires_grad_())
        for m, n, r in SHAPES
    ]


def _pairs(factors) -> list[LoRAPair]:
    return [LoRAPair(A=A, B=B, scale=2.0, name=f"layer{i}") for i, (A, B) in enumerate(factors)]


def _run(dtype: torch.dtype, moments: str, fused: bool, steps: int = 4):
    factors = _factors(dtype)
    opt = lorapro.LoRAProAdamW(_pairs(factors), lr=1e-2, weight_decay=0.01, moments=moments, fused=fused)
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        for A, B in factors:
            A.grad = torch.randn(A.shape, generator=g, dtype=dtype)
            B.grad = torch.randn(B.shape, generator=g, dtype=dtype)
        torch.manual_seed(100 + step)  # the same stochastic-rounding bits for both
        opt.step()
    return factors, opt


def _max_rel_diff(x, y) -> float:
    return max((a - b).abs().max().item() / a.abs().max().item() for p, q in zip(x, y) for a, b in zip(p, q))


def test_fused_steps_match_the_unfused_ones():
    plain, plain_opt = _run(torch.float32, "full", fused=False)
    fused, fused_opt = _run(torch.float32, "full", fused=True)
    assert _max_rel_diff(plain, fused) < 1e-5
    for (_, B0), (_, B1) in zip(plain, fused):
        for key in ("exp_avg", "exp_avg_sq"):
            a, b = plain_opt.state[B0][key].float(), fused_opt.state[B1][key].float()
            assert a.dtype == b.dtype and a.shape == b.shape
            assert (a - b).abs().max().item() <= 1e-5 * a.abs().max().item()


@pytest.mark.slow
def test_fused_float64_matches_to_float64_rounding():
    plain, _ = _run(torch.float64, "full", fused=False)
    fused, _ = _run(torch.float64, "full", fused=True)
    assert _max_rel_diff(plain, fused) < 1e-12


def test_fused_state_is_the_unfused_state():
    """A checkpoint of either kind resumes in the other (and one saved before ``fused`` existed loads)."""
    plain, plain_opt = _run(torch.float32, "full", fused=False, steps=2)
    saved = copy.deepcopy(plain_opt.state_dict())  # as through torch.save / torch.load: no shared tensors
    for group in saved["param_groups"]:
        del group["fused"]  # as saved by an earlier version
    factors = [(A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()) for A, B in plain]
    resumed = lorapro.LoRAProAdamW(_pairs(factors), lr=1e-2, weight_decay=0.01, fused=True)
    resumed.load_state_dict(saved)
    for opt, fs in ((plain_opt, plain), (resumed, factors)):
        g = torch.Generator().manual_seed(7)
        for A, B in fs:
            A.grad = torch.randn(A.shape, generator=g)
            B.grad = torch.randn(B.shape, generator=g)
        opt.step()
    assert _max_rel_diff(plain, factors) < 1e-5


def test_bf16_moments_with_float64_parameters_round_without_resizing():
    """The bf16 rounding's scratch is the float64 G block: it used to be resized (a deprecation warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        factors, opt = _run(torch.float64, "bf16", fused=False, steps=2)
    assert all(torch.isfinite(t).all() for pair in factors for t in pair)
    assert opt.state[factors[0][1]]["exp_avg"].dtype == torch.bfloat16


@pytest.mark.parametrize("moments", ["bf16", "factored", "efficient"])
def test_fused_rejects_the_modes_it_does_not_cover(moments):
    A, B = torch.zeros(2, 3, requires_grad=True), torch.zeros(4, 2, requires_grad=True)
    with pytest.raises(ValueError, match="fused=True is for moments 'full', not"):
        lorapro.LoRAProAdamW([LoRAPair(A=A, B=B, scale=1.0)], moments=moments, fused=True)
    with pytest.raises(ValueError, match="Invalid fused"):
        lorapro.LoRAProAdamW([LoRAPair(A=A, B=B, scale=1.0)], fused="yes")
