"""Optimizer state and the training-loop machinery: state_dict, resume, schedulers, scaler, clipping."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from models import tiny_batch, tiny_loss, tiny_peft

import lorapro


def _make(kind, model, **kw):
    return lorapro.LoRAProAdamW(model, lr=1e-2, **kw) if kind == "adamw" else lorapro.LoRAProSGD(model, lr=5e-2, **kw)


def _train(model, opt, steps, start=0, sched=None):
    for i in range(start, start + steps):
        opt.zero_grad()
        tiny_loss(model, tiny_batch(seed=i)).backward()
        opt.step()
        if sched is not None:
            sched.step()


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_state_is_keyed_by_parameter_tensors_with_full_size_moments():
    model = tiny_peft()
    opt = lorapro.LoRAProAdamW(model, lr=1e-2)
    _train(model, opt, 2)
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(isinstance(k, torch.Tensor) and id(k) in params for k in opt.state)
    for pair in opt.pairs:
        st = opt.state[pair.B]
        assert st["exp_avg"].shape == pair.shape and st["exp_avg_sq"].shape == pair.shape
        assert float(st["step"]) == 2
        assert pair.A not in opt.state or not opt.state[pair.A]
    assert "x_mode" in opt.state_dict()["param_groups"][0]


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_save_load_continue_is_bit_identical(kind):
    torch.manual_seed(0)
    model = tiny_peft()
    twin = copy.deepcopy(model)
    opt = _make(kind, model)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8)
    _train(model, opt, 8, sched=sched)

    opt2 = _make(kind, twin)
    sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=8)
    _train(twin, opt2, 4, sched=sched2)
    saved = _roundtrip({"model": twin.state_dict(), "opt": opt2.state_dict(), "sched": sched2.state_dict()})

    resumed = tiny_peft(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    opt3 = _make(kind, resumed)
    sched3 = torch.optim.lr_scheduler.CosineAnnealingLR(opt3, T_max=8)
    sched3.load_state_dict(saved["sched"])
    opt3.load_state_dict(saved["opt"])
    _train(resumed, opt3, 4, start=4, sched=sched3)
    for (n, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n


def test_load_keeps_moment_dtype_and_device_for_low_precision_params():
    model = tiny_peft(dtype=torch.bfloat16)
    opt = lorapro.LoRAProAdamW(model, lr=1e-2)
    _train(model, opt, 2)
    sd = _roundtrip(opt.state_dict())
    opt2 = lorapro.LoRAProAdamW(model, lr=1e-2)
    opt2.load_state_dict(sd)
    for pair in opt2.pairs:
        st, orig = opt2.state[pair.B], opt.state[pair.B]
        assert st["exp_avg"].dtype == torch.float32 and st["exp_avg_sq"].dtype == torch.float32
        assert torch.equal(st["exp_avg"], orig["exp_avg"]) and torch.equal(st["exp_avg_sq"], orig["exp_avg_sq"])
        assert st["exp_avg"].device == pair.B.device


def test_lr_scheduler_drives_every_parameter():
    model = tiny_peft(init_lora_weights=False)
    opt = lorapro.LoRAProAdamW(model, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0)  # lr 0 from the start
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, 2, sched=sched)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_param_groups_can_set_their_own_lr():
    model = tiny_peft()
    head = [p for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n]
    pairs = lorapro.find_lora_pairs(model)
    opt = lorapro.LoRAProAdamW([{"params": pairs}, {"params": head, "lr": 0.0}], lr=1e-2)
    before = [p.detach().clone() for p in head]
    _train(model, opt, 2)
    assert all(torch.equal(a, b) for a, b in zip(before, head))
    assert not torch.equal(pairs[0].B, torch.zeros_like(pairs[0].B))


def test_gradient_accumulation_equals_one_big_batch():
    model = tiny_peft(init_lora_weights=False, dtype=torch.float64)
    twin = copy.deepcopy(model)
    opt, opt2 = lorapro.LoRAProAdamW(model, lr=1e-2), lorapro.LoRAProAdamW(twin, lr=1e-2)
    tokens, images, labels = tiny_batch(n=32, dtype=torch.float64)
    for _ in range(3):
        opt.zero_grad()
        tiny_loss(model, (tokens, images, labels)).backward()
        opt.step()
        opt2.zero_grad()
        for half in (slice(0, 16), slice(16, 32)):
            (tiny_loss(twin, (tokens[half], images[half], labels[half])) / 2).backward()
        opt2.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_clip_grad_norm_before_step():
    model = tiny_peft(init_lora_weights=False)
    opt = lorapro.LoRAProAdamW(model, lr=1e-2)
    for i in range(3):
        opt.zero_grad()
        tiny_loss(model, tiny_batch(seed=i)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_grad_scaler_step_and_skip():
    model = tiny_peft(init_lora_weights=False)
    opt = lorapro.LoRAProAdamW(model, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    scaler.scale(tiny_loss(model, tiny_batch())).backward()
    scaler.step(opt)
    scaler.update()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # An overflowing step is skipped by the scaler, and the scale shrinks.
    snapshot = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    scaler.scale(tiny_loss(model, tiny_batch()) * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0**10
    assert all(torch.equal(a, b) for a, b in zip(snapshot, model.parameters()))


def test_closure_is_evaluated_and_its_loss_returned():
    model = tiny_peft()
    opt = lorapro.LoRAProSGD(model, lr=0.1)

    def closure():
        opt.zero_grad()
        loss = tiny_loss(model, tiny_batch())
        loss.backward()
        return loss

    first = opt.step(closure)
    second = opt.step(closure)
    assert isinstance(first, torch.Tensor) and second < first


def test_pairs_without_gradients_are_left_alone():
    model = tiny_peft(init_lora_weights=False)
    opt = lorapro.LoRAProAdamW(model, lr=1e-2)
    fc2 = model.base_model.model.fc2
    before = fc2.lora_A["default"].weight.detach().clone()
    opt.zero_grad(set_to_none=True)
    out = tiny_loss(model, tiny_batch())
    out.backward()
    fc2.lora_A["default"].weight.grad = None
    fc2.lora_B["default"].weight.grad = None
    opt.step()
    assert torch.equal(before, fc2.lora_A["default"].weight)
    assert not opt.state[fc2.lora_B["default"].weight]
