"""PEFT's baselines as ``lorapro`` methods (lorapro.cli.peft_methods): LoRA+, LoRA-FA, Riemannian, LoRA-GA."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_bert, make_tiny_llama

from lorapro import _methods as registry
from lorapro.cli import main
from lorapro.cli import models as M
from lorapro.cli import peft_methods as PM
from lorapro.cli.config import TrainConfig
from lorapro.cli.trainer import make_optimizer

NEW = ("loraplus", "lorafa", "riemannian", "loraga")
SMALL = ["--max-train", "48", "--max-eval", "24", "--batch-size", "8", "--no-progress"]
TEXTS = ["a fine film with a great cast", "dull and far too long for what it is", "the best thing this year, truly",
         "not good at all", "an utterly charming and clever story", "boring", "i laughed and cried",
         "a mess from start to finish"]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    """The tiny BERT without dropout, so that gradients are a deterministic function of the batches."""
    d = make_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert")
    config = json.loads((d / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (d / "config.json").write_text(json.dumps(config))
    return d


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batches(tokenizer) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in (0, 4):
        b = dict(tokenizer(TEXTS[i : i + 4], padding=True, return_tensors="pt"))
        b["labels"] = torch.tensor([1, 0, 1, 0])
        out.append(b)
    return out


def build(bert_dir, method, rank=4):
    return M.build_model(bert_dir, task="classification", num_labels=2, method=method, rank=rank,
                         init_batches=batches if method == "loraga" else None)


def lora_layers(model):
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]


def step(model, opt, tokenizer) -> float:
    opt.zero_grad(set_to_none=True)
    loss = sum(model(**b).loss for b in batches(tokenizer)) / 2
    loss.backward()
    opt.step()
    return loss.item()


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------------------- registration, CLI


def test_methods_are_registered_validated_and_in_help(capsys):
    assert set(NEW) <= set(registry.NAMES) and set(NEW) <= set(registry.names(lambda m: m.lora))
    assert set(NEW) <= set(registry.names(lambda m: m.peft))
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    compare_help = " ".join(capsys.readouterr().out.split())
    for m in NEW:
        assert m in help_text and m in compare_help
    # compare validates every name before training anything
    assert main(["compare", "--methods", "lora,loraga,no-such", "--out", "/nonexistent/x"]) == 2
    assert "no-such" in capsys.readouterr().err


@pytest.mark.parametrize("method", NEW)
def test_train_three_steps_and_reload(bert_dir, tmp_path, method):
    out = tmp_path / "run"
    rc = main(["train", "--model", str(bert_dir), "--train", "rotten-tomatoes", "--method", method,
               "--max-steps", "3", *SMALL, "--out", str(out)])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == method and m["steps"] == 3 and 0.0 <= m["eval_accuracy"] <= 1.0
    assert all(math.isfinite(v) for _, v in m["train_loss"]) and math.isfinite(m["eval_loss"])
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == (16 if method == "loraga" else 8)  # LoRA-GA is saved as a rank-2r standard LoRA
    assert saved["init_lora_weights"] is True
    model, _ = M.load_for_eval(bert_dir, out / "adapter", task="classification")
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_loraga_causal_lm(tmp_path):
    llama = make_tiny_llama(tmp_path / "llama")
    rows = [{"prompt": f"What is {i} plus {i}?", "completion": str(2 * i)} for i in range(20)]
    for name, part in (("train", rows[:16]), ("eval", rows[16:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    out = tmp_path / "run"
    rc = main(["train", "--model", str(llama), "--task", "causal-lm", "--train", str(tmp_path / "train.jsonl"),
               "--eval", str(tmp_path / "eval.jsonl"), "--method", "loraga", "--max-steps", "2", "--batch-size", "4",
               "--max-new-tokens", "3", "--no-progress", "--out", str(out)])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert all(math.isfinite(v) for _, v in m["train_loss"])


def test_loraga_resume_rebuilds_the_same_init(bert_dir, tmp_path):
    args = ["train", "--model", str(bert_dir), "--method", "loraga", "--max-steps", "4", *SMALL]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--stop-after", "2"]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--resume"]) == 0
    a, b = (json.loads((tmp_path / x / "metrics.json").read_text()) for x in "ab")
    assert a["train_loss"] == b["train_loss"] and a["evals"] == b["evals"] and b["resumed"]


# ----------------------------------------------------------------------------------- what each method trains


def test_loraplus_gives_b_ratio_times_the_lr_of_a(bert_dir):
    model, tok, _ = build(bert_dir, "loraplus")
    cfg = TrainConfig(method="loraplus", lr=1e-3)
    opt = make_optimizer("loraplus", model, cfg)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(lr_of) == {id(p) for p in trainable.values()}  # every trainable parameter exactly once
    assert sum(len(g["params"]) for g in opt.param_groups) == len(trainable)
    for n, p in trainable.items():
        if "lora_B" in n or p.ndim == 1:  # PEFT's rule: B and every vector (the head's bias) get the ratio
            assert lr_of[id(p)] == pytest.approx(PM.LORAPLUS_LR_RATIO * cfg.lr), n
        else:
            assert lr_of[id(p)] == pytest.approx(cfg.lr), n
    assert PM.LORAPLUS_LR_RATIO == 16
    before = snapshot(model)
    losses = [step(model, opt, tok) for _ in range(3)]
    assert all(math.isfinite(v) for v in losses)
    for n, p in trainable.items():
        assert not torch.equal(p, before[n]), f"{n} did not move"


def test_lorafa_freezes_a_and_trains_b(bert_dir):
    model, tok, info = build(bert_dir, "lorafa")
    lora, _, lora_info = build(bert_dir, "lora")
    n_a = sum(p.numel() for n, p in model.named_parameters() if "lora_A" in n)
    assert info["trainable_params"] == lora_info["trainable_params"] - n_a
    opt = make_optimizer("lorafa", model, TrainConfig(method="lorafa", lr=1e-3, rank=4))
    before = snapshot(model)
    losses = [step(model, opt, tok) for _ in range(3)]
    assert all(math.isfinite(v) for v in losses)
    for n, p in model.named_parameters():
        if "lora_A" in n:
            assert not p.requires_grad and torch.equal(p, before[n]), n
        elif "lora_B" in n or "modules_to_save" in n:
            assert not torch.equal(p, before[n]), f"{n} did not move"


def test_lorafa_step_follows_the_projected_gradient(bert_dir):
    """Adam's first step is -lr * sign(g) where |g| >> eps: LoRA-FA's g is (1/s^2) g_B (A A^T)^-1, not g_B."""
    model, tok, _ = build(bert_dir, "lorafa")
    lr = 1e-3
    opt = make_optimizer("lorafa", model, TrainConfig(method="lorafa", lr=lr, rank=4))
    for b in batches(tok):
        model(**b).loss.backward()
    agree = differ = 0
    layers = lora_layers(model)
    expected = {}
    for _, mod in layers:
        A, B = mod.lora_A["default"].weight, mod.lora_B["default"].weight
        s = mod.scaling["default"]
        expected[mod] = (B.detach().clone(), (B.grad @ torch.linalg.inv(A @ A.T)) / s**2, B.grad.clone())
    opt.step()
    for mod, (b0, g_fa, g_raw) in expected.items():
        delta = mod.lora_B["default"].weight.detach() - b0
        big = g_fa.abs() > 1e-3 * g_fa.abs().max()
        agree += (torch.sign(delta[big]) == -torch.sign(g_fa[big])).sum().item()
        differ += (torch.sign(g_fa[big]) != torch.sign(g_raw[big])).sum().item()
        assert delta[big].abs().max() <= lr * 1.01
    total = sum((g.abs() > 1e-3 * g.abs().max()).sum().item() for _, g, _ in expected.values())
    assert agree / total > 0.99
    assert differ > 0.05 * total  # the projection matters: plain Adam on g_B would move many entries the other way


def test_riemannian_preconditions_the_lora_gradients(bert_dir):
    model, tok, _ = build(bert_dir, "riemannian")
    opt = make_optimizer("riemannian", model, TrainConfig(method="riemannian", lr=1e-3))
    assert isinstance(opt, torch.optim.AdamW)
    step(model, opt, tok)  # B = 0 at init; after one step both factors are non-zero
    opt.zero_grad(set_to_none=True)
    for b in batches(tok):
        model(**b).loss.backward()
    saved = {}
    for _, mod in lora_layers(model):
        A, B = mod.lora_A["default"].weight, mod.lora_B["default"].weight
        saved[mod] = (A.detach().clone(), B.detach().clone(), A.grad.clone(), B.grad.clone())
    opt.step()  # preconditions .grad in place, then AdamW
    eye = torch.eye(4)
    for mod, (A, B, ga, gb) in saved.items():
        want_a = torch.linalg.pinv(B.T @ B + PM.RIEMANNIAN_REG * eye) @ ga
        want_b = gb @ torch.linalg.pinv(A @ A.T + PM.RIEMANNIAN_REG * eye)
        torch.testing.assert_close(mod.lora_A["default"].weight.grad, want_a, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(mod.lora_B["default"].weight.grad, want_b, rtol=1e-4, atol=1e-7)
        assert not torch.allclose(want_a, ga, rtol=1e-2)
    assert all(math.isfinite(step(model, opt, tok)) for _ in range(2))


def test_loraga_init_follows_pefts_rule_and_keeps_the_function(bert_dir, tmp_path):
    """PEFT 0.21.2's LoRA-GA ("ArB2r", "stable", gamma 16), from the mean gradient G = U S V^T of the batches:
    A0 = V[:, :r]^T (orthonormal rows, unscaled), B0 = U[:, r:2r] diag(S[r:2r]) m^(1/4) / sqrt(16) (m = out
    features), and W <- W - s B0 A0, so the model's output at init is the base model's."""
    r = 4
    ga, tok, _ = build(bert_dir, "loraga", rank=r)
    lora, _, _ = build(bert_dir, "lora", rank=r)  # B = 0: the base model's function, same (seeded) head
    full, _, _ = build(bert_dir, "full")
    full.train()
    for b in batches(tok):
        full(**b).loss.backward()
    grads = {n[: -len(".weight")]: p.grad / 2 for n, p in full.named_parameters() if p.grad is not None}
    base_w = {n: m.base_layer.weight.detach() for n, m in lora_layers(lora)}
    layers = lora_layers(ga)
    assert len(layers) == len(base_w) > 0
    for name, mod in layers:
        A, B = mod.lora_A["default"].weight.detach(), mod.lora_B["default"].weight.detach()
        s = mod.scaling["default"]
        assert (B @ A).abs().max() > 0, name
        torch.testing.assert_close(mod.base_layer.weight.detach(), base_w[name] - s * B @ A, rtol=0, atol=1e-6)
        U, S, Vh = torch.linalg.svd(grads[name.removeprefix("base_model.model.")])
        c = U.shape[0] ** 0.25 / 4
        torch.testing.assert_close(A @ A.T, torch.eye(r), rtol=0, atol=1e-5)
        torch.testing.assert_close(A.T @ A, Vh[:r].T @ Vh[:r], rtol=0, atol=1e-3)  # span of the top r
        want_bbt = c**2 * U[:, r : 2 * r] @ torch.diag(S[r : 2 * r] ** 2) @ U[:, r : 2 * r].T
        assert (B @ B.T - want_bbt).abs().max() <= 1e-2 * (c * S[r]) ** 2, name
    ga.eval()
    lora.eval()
    x = batches(tok)[0]
    with torch.no_grad():
        torch.testing.assert_close(ga(**x).logits, lora(**x).logits, rtol=0, atol=1e-6)

    # after training, the saved (converted, rank 2r) adapter on the unmodified base model gives the same outputs
    opt = make_optimizer("loraga", ga, TrainConfig(method="loraga", lr=1e-2))
    ga.train()
    for _ in range(3):
        assert math.isfinite(step(ga, opt, tok))
    ga.eval()
    with torch.no_grad():
        trained = ga(**x).logits
    M.save_trained(ga, tok, tmp_path / "adapter", "loraga")
    reloaded, _ = M.load_for_eval(bert_dir, tmp_path / "adapter", task="classification")
    with torch.no_grad():
        again = reloaded(**x).logits
        assert (trained - lora(**x).logits).abs().max() > 1e-4  # training changed the function
    torch.testing.assert_close(again, trained, rtol=0, atol=1e-5)


def test_loraga_without_batches_is_a_user_error(bert_dir):
    from lorapro.cli.errors import UserError

    with pytest.raises(UserError, match="loraga"):
        M.build_model(bert_dir, task="classification", num_labels=2, method="loraga")

