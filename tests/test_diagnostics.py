"""The paper's diagnostics: ||G - g||_F for LoRA's and LoRA-Pro's equivalent gradients, and ranks of A, B."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorapro
from lorapro.diagnostics import GradientDiagnostics, layer_depth, layer_type, plot_diagnostics, summarize
from reference import ref_adjust


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(6, 10)
        self.down = nn.Linear(10, 6)

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        for b in self.layers:
            x = b(x)
        return self.head(x)


def _model(init_lora_weights=False):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["up", "down"], init_lora_weights=init_lora_weights)
    return get_peft_model(Net(), cfg).double()


def _data(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)


def _loss(model, seed):
    x, y = _data(seed)
    return nn.functional.cross_entropy(model(x), y)


def _full_grads(model, seeds):
    """The base weights' gradients, from a separate backward with them made trainable (the reference)."""
    pairs = lorapro.find_lora_pairs(model)
    for p in pairs:
        p.base_weight.requires_grad_(True)
    model.zero_grad()
    for s in seeds:
        _loss(model, s).backward()
    grads = {p.name: p.base_weight.grad.clone() for p in pairs}
    for p in pairs:
        p.base_weight.requires_grad_(False)
        p.base_weight.grad = None
    model.zero_grad()
    return grads


@pytest.mark.parametrize("micro_batches, passes", [(1, 1), (2, 2), (3, 2)])  # (3, 2): measured at disarm
def test_distances_match_a_float64_reference(micro_batches, passes):
    model = _model()
    seeds = list(range(passes))
    full = _full_grads(model, seeds)
    lora_only = {}
    diag = GradientDiagnostics(model, every=1)
    with diag.watch(0, micro_batches=micro_batches) as measured:
        assert measured
        for s in seeds:
            _loss(model, s).backward()
    for p in lorapro.find_lora_pairs(model):
        lora_only[p.name] = (p.A.grad.clone(), p.B.grad.clone())
        assert p.base_weight.grad is None and not p.base_weight.requires_grad  # dropped and frozen again
    assert len(diag.records) == 4
    for rec in diag.records:
        pair = next(p for p in lorapro.find_lora_pairs(model) if p.name == rec["layer"])
        A, B, s, g = pair.A.detach(), pair.B.detach(), pair.scale, full[rec["layer"]]
        gA, gB = lora_only[rec["layer"]]
        # the identities g_A = s B^T g and g_B = s g A^T hold (no dropout), so G is what the optimizers make
        torch.testing.assert_close(gA, s * B.T @ g, rtol=1e-10, atol=1e-12)
        G_lora = s * (B @ gA + gB @ A)
        a, b = ref_adjust(A, B, gA, gB, s, "sylvester")
        G_pro = s * (B @ a + b @ A)
        assert rec["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-10)
        assert rec["lora_distance"] == pytest.approx(float((G_lora - g).norm()), rel=1e-9)
        assert rec["lorapro_distance"] == pytest.approx(float((G_pro - g).norm()), rel=1e-9)
        # LoRA-Pro's G is the closest point of the tangent space, and LoRA's G lies in it
        assert rec["lorapro_distance"] <= rec["lora_distance"] + 1e-12
        assert (rec["rank_A"], rec["rank_B"], rec["r"]) == (2, 2, 2)


def test_watch_changes_nothing_on_the_training_step():
    model, twin = _model(), _model()
    diag = GradientDiagnostics(model, every=3)
    for step in range(4):
        with diag.watch(step):
            _loss(model, step).backward()
        _loss(twin, step).backward()
        for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
            assert (p.grad is None) == (q.grad is None), n
            if p.grad is not None:
                assert torch.equal(p.grad, q.grad), n
        model.zero_grad()
        twin.zero_grad()
    assert sorted({r["step"] for r in diag.records}) == [0, 3]


def test_ranks_from_peft_init_and_layer_names(tmp_path):
    model = _model(init_lora_weights=True)  # PEFT: A random, B = 0
    diag = GradientDiagnostics(model, every=1)
    opt = lorapro.LoRAProAdamW(model, lr=1e-2)
    runs = {}
    for step in range(3):
        with diag.watch(step):
            _loss(model, step).backward()
        opt.step()
        opt.zero_grad()
    first = [r for r in diag.records if r["step"] == 0]
    assert all(r["rank_A"] == 2 and r["rank_B"] == 0 for r in first)
    assert all(r["rank_B"] == 2 for r in diag.records if r["step"] == 2)  # B has left zero at full rank
    assert {r["type"] for r in diag.records} == {"up", "down"}
    assert {r["depth"] for r in diag.records} == {0, 1}
    summary = summarize(diag.records)
    assert summary["steps"] == [0, 1, 2] and all(x <= y + 1e-12 for x, y in zip(summary["lorapro"], summary["lora"]))
    runs["lorapro"] = diag.records
    runs["lora"] = diag.records
    out = tmp_path / "diag.png"
    plot_diagnostics(runs, str(out))
    assert out.stat().st_size > 10_000


def test_names():
    assert layer_depth("base_model.model.bert.encoder.layer.11.attention.self.query[default]") == 11
    assert layer_type("base_model.model.bert.encoder.layer.11.attention.self.query[default]") == "attention.self.query"
    assert layer_type("model.layers.3.mlp.down_proj") == "mlp.down_proj"
    assert layer_depth("head") is None and layer_type("head") == "head"
    with pytest.raises(ValueError, match="every"):
        GradientDiagnostics(_model(), every=0)
