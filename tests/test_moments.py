"""The memory-lean moment options of LoRAProAdamW: what they store, that they train, and bf16 rounding."""

from __future__ import annotations

import pytest
import torch

import lorapro
from lorapro.moments import stochastic_round_to_bf16_
from models import tiny_batch, tiny_peft, train_tiny
from test_training import _lora_linear, _regression_problem


def test_stochastic_rounding_is_unbiased_and_between_neighbours():
    torch.manual_seed(0)
    x = torch.full((200_000,), 1.0 + 3 * 2.0**-10, dtype=torch.float32)  # between two bf16 values
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    stochastic_round_to_bf16_(out, x)
    lo, hi = 1.0, 1.0 + 2.0**-7
    values = set(out.float().unique().tolist())
    assert values == {lo, hi}
    assert out.float().mean().item() == pytest.approx(x[0].item(), abs=2e-5)  # E[round(x)] = x
    # The optimizer's path: each step draws one buffer of random bits and takes windows at random offsets.
    small = torch.full((1024,), 1.0 + 3 * 2.0**-10, dtype=torch.float32)
    means = []
    for _ in range(200):
        buffer = torch.randint(0, 1 << 16, (4096,), dtype=torch.int32)
        offset = int(torch.randint(0, 4096 - 1024 + 1, ()))
        out = torch.empty(1024, dtype=torch.bfloat16)
        stochastic_round_to_bf16_(out, small, buffer[offset : offset + 1024])
        means.append(out.float().mean().item())
    assert sum(means) / len(means) == pytest.approx(small[0].item(), abs=1e-4)
    exact = torch.tensor([1.0, -2.5, 0.0], dtype=torch.float32)
    out = torch.empty(3, dtype=torch.bfloat16)
    stochastic_round_to_bf16_(out, exact)
    assert torch.equal(out.float(), exact)  # representable values are kept exactly


def _state_bytes(opt, pair):
    return sum(v.numel() * v.element_size() for t in (pair.A, pair.B) for v in opt.state[t].values()
               if torch.is_tensor(v) and v.dim() > 0)


def test_state_sizes_per_option():
    sizes = {}
    for moments in ("full", "bf16", "factored", "efficient"):
        model = tiny_peft()
        opt = lorapro.LoRAProAdamW(model, lr=1e-2, moments=moments)
        train_tiny(model, opt, tiny_batch(), 1)
        pair = [p for p in opt.pairs if p.name.endswith("fc2[default]")][0]  # 16 x 16, r = 4
        sizes[moments] = _state_bytes(opt, pair)
        if moments == "bf16":
            assert opt.state[pair.B]["exp_avg"].dtype == torch.bfloat16
    m = n = 16
    assert sizes["full"] == 2 * m * n * 4
    assert sizes["bf16"] == 2 * m * n * 2
    assert sizes["factored"] == m * n * 4 + (m + n) * 4
    assert sizes["efficient"] == 2 * 4 * (m + n) * 4  # Adam moments of A (4 x 16) and B (16 x 4)


@pytest.mark.parametrize("moments", ["bf16", "factored", "efficient"])
def test_each_option_reaches_a_low_rank_target(moments):
    W0, delta, X = _regression_problem()
    Y = X @ (W0 + delta).T
    model = _lora_linear(W0)
    opt = lorapro.LoRAProAdamW(model, lr=2e-2, moments=moments)
    first = None
    for _ in range(150):
        opt.zero_grad()
        loss = ((model(X) - Y) ** 2).mean()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert ((model(X) - Y) ** 2).mean().item() < 2e-2 * first


def test_bf16_moments_survive_a_state_dict_round_trip():
    model = tiny_peft()
    opt = lorapro.LoRAProAdamW(model, lr=1e-2, moments="bf16")
    train_tiny(model, opt, tiny_batch(), 2)
    opt2 = lorapro.LoRAProAdamW(model, lr=1e-2, moments="bf16")
    opt2.load_state_dict(opt.state_dict())
    for pair in opt.pairs:
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt2.state[pair.B][key].dtype == torch.bfloat16
            assert torch.equal(opt2.state[pair.B][key], opt.state[pair.B][key])


def test_unknown_option_is_refused():
    with pytest.raises(ValueError, match="Invalid moments: 'fp8'.*full, bf16, factored, efficient"):
        lorapro.LoRAProAdamW(tiny_peft(), moments="fp8")


@pytest.mark.parametrize("threads", [1, 2])
def test_workspace_is_at_most_one_weight_matrix_per_shape(threads):
    """Transient memory of the Adam pass: at most half an m x n float32 matrix per distinct shape, on any device
    (sized on the meta device: the accelerator rule, without an accelerator)."""
    from lorapro.moments import CPU_BLOCK_ELEMENTS, STORAGES, block_rows

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for m, n in [(4096, 4096), (11008, 4096), (4096, 11008), (7, 3), (1, 5)]:
            for moments in ("full", "bf16", "factored"):
                for device in (torch.device("meta"), torch.device("cpu")):
                    rows = block_rows(m, n, device, STORAGES[moments].workspace_blocks)
                    assert 1 <= rows <= m
                    ws = STORAGES[moments].workspace(rows, n, torch.float32, torch.device("meta"))
                    parts = [ws.work, ws.M, ws.V, ws.col, ws.noise]
                    total = sum(t.numel() * t.element_size() for t in parts if t is not None)
                    # half an m x n float32 matrix (plus a row per buffer when m is tiny), never per layer
                    assert total <= 4 * (m * n // 2 + 6 * n), (m, n, moments, total)
                    if device.type == "cpu":  # and blocks of the CPU size: cache-sized on one thread, T^2 that on T
                        block = CPU_BLOCK_ELEMENTS * threads**2
                        assert total <= 4 * (5 * block + 6 * n), (m, n, moments, total)
                        if threads == 1 and m * n >= 4 * block:
                            assert total <= 4 * 5 * block  # really cache-sized, not the half-matrix bound
    finally:
        torch.set_num_threads(before)


def _random_pairs(layers: int, m: int, n: int, r: int) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """``layers`` LoRA pairs of one shape with random factors and gradients (seed 0)."""
    torch.manual_seed(0)
    pairs = []
    for _ in range(layers):
        A = torch.nn.Parameter(torch.randn(r, n) / n**0.5)
        B = torch.nn.Parameter(torch.randn(m, r) / m**0.5)
        A.grad, B.grad = torch.randn(r, n), torch.randn(m, r)
        pairs.append((A, B, 2.0))
    return pairs


@pytest.mark.parametrize("moments", ["full", "bf16", "factored"])
def test_measured_step_memory_is_at_most_one_weight_matrix(moments):
    """The bound measured: the allocator's peak during a CPU step (after the first, which creates the
    moments), for three layers of one shape, workspace and rank-sized stacks together, stays within one m x n
    float32 matrix."""
    from lorapro.cli.bench import peak_extra_bytes

    m, n, r, layers = 1024, 768, 4, 3
    opt = lorapro.LoRAProAdamW(_random_pairs(layers, m, n, r), lr=1e-4, moments=moments)
    opt.step()
    peak = peak_extra_bytes(opt.step, torch.device("cpu"))
    assert peak <= 4 * m * n, (moments, peak / 2**20)


def test_step_memory_does_not_grow_with_the_number_of_layers():
    """Layers of one shape are stepped in chunks: the rank-sized stacks of 48 layers cost what 16 cost."""
    from lorapro.cli.bench import peak_extra_bytes

    def peak(layers: int) -> int:
        opt = lorapro.LoRAProAdamW(_random_pairs(layers, 512, 512, 8), lr=1e-4)
        opt.step()
        return peak_extra_bytes(opt.step, torch.device("cpu"))

    few, many = peak(16), peak(48)
    assert many <= 1.25 * few, (few / 2**20, many / 2**20)


def test_layers_at_different_step_counts_each_get_their_own_bias_correction():
    """Small layers of one shape are stepped together only when they share a step count (one eps and one bias
    correction for the chunk); otherwise each layer must step exactly as it would alone."""
    import copy

    pairs = _random_pairs(4, 32, 24, 4)
    opt = lorapro.LoRAProAdamW(pairs, lr=1e-2)
    opt.step()
    opt.state[pairs[0][1]]["step"].fill_(5.0)  # as if the first layer had trained longer (a merged checkpoint)
    alone = []
    for A, B, s in pairs:
        A2, B2 = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
        A2.grad, B2.grad = A.grad.clone(), B.grad.clone()
        single = lorapro.LoRAProAdamW([(A2, B2, s)], lr=1e-2)
        single.state[B2] = copy.deepcopy(opt.state[B])
        alone.append((single, A2, B2))
    opt.step()
    for (A, B, _), (single, A2, B2) in zip(pairs, alone):
        single.step()
        torch.testing.assert_close(A, A2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(B, B2, rtol=1e-5, atol=1e-6)
