"""Both optimizers agree with the literal float64 transcription of docs/algorithm.md (tests/reference.py) to 1e-10.

Covered: Linear, Conv2d, Embedding (Tiny) and GPT-2 Conv1D layers; rsLoRA, rank_pattern and alpha_pattern;
two trainable adapters; modules_to_save; from PEFT's B = 0 start and from a generic point; both choices of X;
custom (non-PEFT) pairs; weight decay.
"""

from __future__ import annotations

import copy

import pytest
import torch
from models import gpt2_batch, gpt2_loss, tiny_batch, tiny_gpt2, tiny_loss, tiny_peft
from reference import ReferenceLoRAPro, peft_layers
from torch import nn

import lorapro

TOL = 1e-10
STEPS = 4

TINY_CASES = {
    "b0": dict(init_lora_weights=True),
    "generic": dict(init_lora_weights=False),
    "rslora-patterns": dict(
        init_lora_weights=False, use_rslora=True, rank_pattern={"fc1": 2}, alpha_pattern={"fc2": 3}
    ),
    "two-adapters-b0": dict(init_lora_weights=True, two_adapters=True),
    "two-adapters-generic": dict(init_lora_weights=False, two_adapters=True),
}


def _run_both(model, loss_fn, batches, algo, x_mode, lr, weight_decay=0.0, moments="full"):
    ref_model = copy.deepcopy(model)
    if algo == "adamw":
        opt = lorapro.LoRAProAdamW(model, lr=lr, weight_decay=weight_decay, x_mode=x_mode, moments=moments)
    else:
        opt = lorapro.LoRAProSGD(model, lr=lr, weight_decay=weight_decay, x_mode=x_mode)
    ref = ReferenceLoRAPro(
        ref_model, peft_layers(ref_model), algo=algo, lr=lr, weight_decay=weight_decay, x_mode=x_mode, moments=moments
    )
    worst = 0.0
    for batch in batches:
        for m in (model, ref_model):
            m.zero_grad()
            loss_fn(m, batch).backward()
        opt.step()
        ref.step()
        for (name, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
            if p.requires_grad:
                diff = (p - q).abs().max().item()
                worst = max(worst, diff)
                assert diff <= TOL * max(1.0, q.abs().max().item()), f"{name}: differs by {diff:.3e}"
    return worst


@pytest.mark.parametrize("algo", ["adamw", "sgd"])
@pytest.mark.parametrize("x_mode", ["sylvester", "zero"])
@pytest.mark.parametrize("case", list(TINY_CASES))
def test_tiny_model_matches_reference(case, x_mode, algo):
    model = tiny_peft(dtype=torch.float64, **TINY_CASES[case])
    assert any("modules_to_save" in n for n, p in model.named_parameters() if p.requires_grad)
    lr = 1e-2 if algo == "adamw" else 5e-2
    batches = [tiny_batch(seed=i, dtype=torch.float64) for i in range(STEPS)]
    _run_both(model, tiny_loss, batches, algo, x_mode, lr)


@pytest.mark.parametrize("algo", ["adamw", "sgd"])
@pytest.mark.parametrize("init", [True, False])
def test_gpt2_conv1d_matches_reference(init, algo):
    model = tiny_gpt2(dtype=torch.float64, init_lora_weights=init)
    batches = [gpt2_batch(seed=i) for i in range(STEPS)]
    _run_both(model, gpt2_loss, batches, algo, "sylvester", 1e-2)


def test_weight_decay_matches_reference():
    model = tiny_peft(dtype=torch.float64, init_lora_weights=False)
    batches = [tiny_batch(seed=i, dtype=torch.float64) for i in range(STEPS)]
    _run_both(model, tiny_loss, batches, "adamw", "sylvester", 1e-2, weight_decay=0.1)


class CustomLoRA(nn.Module):
    """A hand-written LoRA layer (not PEFT): y = x W0^T + s x A^T B^T + bias."""

    def __init__(self, n: int, m: int, r: int, s: float) -> None:
        super().__init__()
        self.W0 = nn.Parameter(torch.randn(m, n), requires_grad=False)
        self.A = nn.Parameter(torch.randn(r, n) / n**0.5)
        self.B = nn.Parameter(torch.randn(m, r) / r)
        self.bias = nn.Parameter(torch.zeros(m))
        self.s = s

    def forward(self, x):
        return x @ (self.W0 + self.s * self.B @ self.A).T + self.bias


@pytest.mark.parametrize("algo", ["adamw", "sgd"])
def test_custom_pairs_match_reference(algo):
    torch.manual_seed(0)
    layer = CustomLoRA(7, 5, 3, s=0.7).double()
    ref_layer = copy.deepcopy(layer)
    params = [(layer.A, layer.B, layer.s), layer.bias]
    opt = lorapro.LoRAProAdamW(params, lr=1e-2) if algo == "adamw" else lorapro.LoRAProSGD(params, lr=1e-2)
    ref = ReferenceLoRAPro(ref_layer, [("c", ref_layer.A, ref_layer.B, ref_layer.s)], algo=algo, lr=1e-2)
    x, y = torch.randn(16, 7, dtype=torch.float64), torch.randn(16, 5, dtype=torch.float64)
    for _ in range(STEPS):
        for m in (layer, ref_layer):
            m.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
        opt.step()
        ref.step()
    for p, q in zip(layer.parameters(), ref_layer.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=TOL)


def test_other_params_train_exactly_like_torch_adamw():
    """The head (modules_to_save) and any other tensor follow torch.optim.AdamW bit for bit."""
    model = tiny_peft(init_lora_weights=False)
    head = [p for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n]
    twin = [p.detach().clone().requires_grad_() for p in head]
    opt = lorapro.LoRAProAdamW(model, lr=3e-3, weight_decay=0.05)
    torch_opt = torch.optim.AdamW(twin, lr=3e-3, weight_decay=0.05)
    for i in range(5):
        model.zero_grad()
        tiny_loss(model, tiny_batch(seed=i)).backward()
        for p, q in zip(head, twin):
            q.grad = p.grad.clone()
        opt.step()
        torch_opt.step()
        for p, q in zip(head, twin):
            assert torch.equal(p, q)


@pytest.mark.parametrize("block_elements", [1, 40])
def test_row_blocked_moment_update_matches_reference(monkeypatch, block_elements):
    """The CPU path walks each layer's m x n work in row blocks; tiny blocks must not change the result."""
    import lorapro.moments

    monkeypatch.setattr(lorapro.moments, "CPU_BLOCK_ELEMENTS", block_elements)
    model = tiny_peft(dtype=torch.float64, init_lora_weights=False)
    batches = [tiny_batch(seed=i, dtype=torch.float64) for i in range(STEPS)]
    _run_both(model, tiny_loss, batches, "adamw", "sylvester", 1e-2)


@pytest.mark.parametrize(
    "moments, init", [("factored", True), ("factored", False), ("efficient", False)]
)
@pytest.mark.parametrize("block_elements", [40, 1 << 19])
def test_memory_lean_moments_match_reference(monkeypatch, moments, init, block_elements):
    """The factored second moment and the r-sized "efficient" mode follow their literal float64 transcriptions.

    Not "efficient" from B = 0: its first Adam step turns B into a near sign matrix (lr * sign(b)) whose
    columns can be almost collinear (cond(B^T B) ~ 3e11 seen on the conv layer), so any two correct
    implementations then agree only to ~1e-7.
    """
    import lorapro.moments

    monkeypatch.setattr(lorapro.moments, "CPU_BLOCK_ELEMENTS", block_elements)
    model = tiny_peft(dtype=torch.float64, init_lora_weights=init)
    batches = [tiny_batch(seed=i, dtype=torch.float64) for i in range(STEPS)]
    _run_both(model, tiny_loss, batches, "adamw", "sylvester", 1e-2, weight_decay=0.01, moments=moments)


@pytest.mark.parametrize("per_chunk", [1, 2, 3])
def test_small_layers_in_chunks_match_reference(monkeypatch, per_chunk):
    """Layers smaller than a block go through the Adam pass several at a time (one batched product and one
    foreach call per elementwise pass); one at a time or in chunks (5 layers: a short last chunk), the steps
    are the reference's."""
    import lorapro.moments

    chunks = []
    real = lorapro.moments.FP32Moments.update_chunk

    def spy(self, left, *args, **kwargs):
        chunks.append(left.shape[0])
        return real(self, left, *args, **kwargs)

    monkeypatch.setattr(lorapro.moments, "layers_per_chunk", lambda m, n, device, block_elements=None: per_chunk)
    monkeypatch.setattr(lorapro.moments.FP32Moments, "update_chunk", spy)
    torch.manual_seed(0)
    layers = nn.ModuleList(CustomLoRA(7, 5, 3, s=0.7) for _ in range(5)).double()
    ref_layers = copy.deepcopy(layers)
    params = [(c.A, c.B, c.s) for c in layers] + [c.bias for c in layers]
    opt = lorapro.LoRAProAdamW(params, lr=1e-2, weight_decay=0.01)
    ref = ReferenceLoRAPro(
        ref_layers, [(f"c{i}", c.A, c.B, c.s) for i, c in enumerate(ref_layers)], lr=1e-2, weight_decay=0.01,
        algo="adamw",
    )
    x, y = torch.randn(16, 7, dtype=torch.float64), torch.randn(16, 5, dtype=torch.float64)
    for _ in range(STEPS):
        for ls in (layers, ref_layers):
            ls.zero_grad()
            sum(((c(x) - y) ** 2).mean() * (i + 1) for i, c in enumerate(ls)).backward()
        opt.step()
        ref.step()
    for p, q in zip(layers.parameters(), ref_layers.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p, q, rtol=0, atol=TOL)
    assert sorted(set(chunks)) == ({1: [], 2: [1, 2], 3: [2, 3]}[per_chunk])


def test_non_contiguous_factors_are_updated_in_place():
    """Custom pairs may hold factors as non-contiguous parameters (a transposed storage): the step must write
    into them, not into a reshaped copy."""
    torch.manual_seed(0)
    A = nn.Parameter(torch.randn(6, 3, 2, dtype=torch.float64).permute(1, 0, 2))  # (r, 6, 2), non-contiguous
    B = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    assert not A.is_contiguous()
    A.grad, B.grad = torch.randn_like(A), torch.randn_like(B)
    before = A.detach().clone()
    lorapro.LoRAProAdamW([(A, B, 1.0)], lr=1e-2).step()
    assert not torch.equal(A, before)
