"""The peers as ``lorapro`` methods (lorapro.cli.peft_methods): LoRA-RITE (pytorch-optimizer), DoRA and PiSSA,
each with AdamW and (DoRA, PiSSA) with LoRA-Pro."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_methods import SMALL, batches, bert_dir, lora_layers, one_thread, snapshot, step  # noqa: F401

from lorapro import LoRAProAdamW, find_lora_pairs
from lorapro import _methods as registry
from lorapro.cli import main
from lorapro.cli import models as M
from lorapro.cli.config import TrainConfig
from lorapro.cli.trainer import make_optimizer

PEERS = ("lora-rite", "dora", "lorapro-dora", "pissa", "lorapro-pissa")


def build(bert_dir, method, rank=4):  # noqa: F811
    return M.build_model(bert_dir, task="classification", num_labels=2, method=method, rank=rank)


def test_peers_are_registered_and_in_help(capsys):
    assert set(PEERS) <= set(registry.names(lambda m: m.lora and m.peft))
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for m in PEERS:
        assert m in help_text


@pytest.mark.parametrize("method", PEERS)
def test_peer_trains_saves_and_reloads_to_the_same_function(bert_dir, tmp_path, capsys, method):  # noqa: F811
    out = tmp_path / "run"
    rc = main(["train", "--model", str(bert_dir), "--train", "rotten-tomatoes", "--method", method,
               "--max-steps", "3", *SMALL, "--out", str(out)])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == method and m["steps"] == 3
    assert all(math.isfinite(v) for _, v in m["train_loss"]) and math.isfinite(m["eval_loss"])
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["use_dora"] is ("dora" in method)
    # PiSSA changed the base weights at init: the adapter is saved as a rank-2r standard LoRA for the original
    assert saved["r"] == (16 if "pissa" in method else 8) and saved["init_lora_weights"] is True
    capsys.readouterr()
    assert main(["eval", "--model", str(bert_dir), "--adapter", str(out / "adapter"), "--eval", "rotten-tomatoes",
                 "--max-eval", "24"]) == 0
    printed = capsys.readouterr().out.split()  # "... eval_loss 0.6931": the saved adapter on the original base
    assert float(printed[printed.index("eval_loss") + 1]) == pytest.approx(m["eval_loss"], abs=1e-4)


def test_pissa_init_is_the_top_singular_triplets_and_keeps_the_function(bert_dir):  # noqa: F811
    r = 4
    pissa, tok, _ = build(bert_dir, "pissa", rank=r)
    lora, _, _ = build(bert_dir, "lora", rank=r)
    base_w = {n: m.base_layer.weight.detach() for n, m in lora_layers(lora)}
    for name, mod in lora_layers(pissa):
        A, B = mod.lora_A["default"].weight.detach(), mod.lora_B["default"].weight.detach()
        s = mod.scaling["default"]
        W = base_w[name]
        torch.testing.assert_close(mod.base_layer.weight.detach() + s * B @ A, W, rtol=0, atol=1e-5)
        U, S, Vh = torch.linalg.svd(W)
        torch.testing.assert_close(s * B @ A, U[:, :r] @ torch.diag(S[:r]) @ Vh[:r], rtol=0, atol=1e-4)
    pissa.eval()
    lora.eval()
    x = batches(tok)[0]
    with torch.no_grad():
        torch.testing.assert_close(pissa(**x).logits, lora(**x).logits, rtol=0, atol=1e-5)


def test_lorapro_on_pissa_and_dora_steps_every_pair(bert_dir):  # noqa: F811
    for method in ("lorapro-pissa", "lorapro-dora"):
        model, tok, _ = build(bert_dir, method)
        opt = make_optimizer(method, model, TrainConfig(method=method, lr=1e-3))
        assert isinstance(opt, LoRAProAdamW)
        pairs = find_lora_pairs(model)
        assert len(pairs) == len(lora_layers(model)) > 0
        before = snapshot(model)
        assert all(math.isfinite(step(model, opt, tok)) for _ in range(2))
        after = snapshot(model)
        for p in pairs:  # PiSSA's B is non-zero at init, so both factors move from the first step
            for t in (p.A, p.B):
                name = next(n for n, q in model.named_parameters() if q is t)
                assert not torch.equal(before[name], after[name]), name
        if method == "lorapro-dora":  # DoRA's magnitudes are trained (by the optimizer's AdamW part)
            mags = [n for n in after if "lora_magnitude_vector" in n]
            assert mags and any(not torch.equal(before[n], after[n]) for n in mags)


def test_lora_rite_pairs_pefts_factors_and_trains_the_head_with_adamw(bert_dir):  # noqa: F811
    model, tok, _ = build(bert_dir, "lora-rite")
    opt = make_optimizer("lora-rite", model, TrainConfig(method="lora-rite", lr=1e-3, weight_decay=0.01))
    pairs_group, rest_group = opt.param_groups
    # LoRARite pairs [left_1, right_1, ...] by position, rank in dim 0 of left, dim -1 of right: PEFT's A, B
    layers = lora_layers(model)
    assert len(pairs_group["params"]) == 2 * len(layers)
    for (_, mod), (A, B) in zip(layers, zip(pairs_group["params"][::2], pairs_group["params"][1::2])):
        assert A is mod.lora_A["default"].weight and B is mod.lora_B["default"].weight
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == trainable
    assert rest_group.get("adamw") and rest_group["params"]

    # the head's first step is torch.optim.AdamW's (eps 1e-8) from the same gradients
    opt.zero_grad(set_to_none=True)
    (sum(model(**b).loss for b in batches(tok)) / 2).backward()
    ref = [p.detach().clone().requires_grad_(True) for p in rest_group["params"]]
    for r, p in zip(ref, rest_group["params"]):
        r.grad = p.grad.clone()
    torch.optim.AdamW(ref, lr=1e-3, weight_decay=0.01, eps=1e-8).step()
    opt.step()
    for r, p in zip(ref, rest_group["params"]):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=0, atol=0)

    before = snapshot(model)
    losses = [step(model, opt, tok) for _ in range(4)]
    assert all(math.isfinite(v) for v in losses)
    after = snapshot(model)
    moved = [n for n in after if not torch.equal(before[n], after[n])]
    assert any("lora_A" in n for n in moved) and any("lora_B" in n for n in moved)
    assert any("classifier" in n for n in moved)
