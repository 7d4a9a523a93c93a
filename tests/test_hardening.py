"""Inputs that once gave a silently wrong answer now give a clear error or the right answer.

- PEFT tuners whose update is not ``s B A`` (AdaLoRA's ``B (E * A) s / ranknum`` above all, which has
  ``lora_A``/``lora_B`` and looked like LoRA) and LoRA variants that change how A and B combine: refused,
  naming the layer and the reason; DoRA and ``trainable_token_indices`` still train.
- A tensor listed twice: refused (it would be stepped twice per step).
- Another optimizer's state dict: refused at load time, saying what it holds, with nothing loaded.
- A sparse gradient on a LoRA factor: the same message as on any other tensor.
(Ranks that disagree about their gradients: test_rank_agreement.py.)
"""

from __future__ import annotations

import warnings

import pytest
import torch
from models import Tiny, tiny_batch, tiny_loss, tiny_peft, train_tiny

import lorapro

TARGETS = ["fc1", "fc2"]


def _tuner(kind: str):
    import peft

    configs = {
        "adalora": lambda: peft.AdaLoraConfig(target_modules=TARGETS, total_step=10, init_r=4),
        "loha": lambda: peft.LoHaConfig(target_modules=TARGETS, r=2),
        "lokr": lambda: peft.LoKrConfig(target_modules=TARGETS, r=2),
        "vera": lambda: peft.VeraConfig(target_modules=["fc2"], r=2),
        "oft": lambda: peft.OFTConfig(target_modules=TARGETS, r=0, oft_block_size=4),
        "boft": lambda: peft.BOFTConfig(target_modules=TARGETS, boft_block_size=4),
        "ia3": lambda: peft.IA3Config(target_modules=TARGETS, feedforward_modules=["fc2"]),
        "fourierft": lambda: peft.FourierFTConfig(target_modules=TARGETS, n_frequency=20),
        "kasa": lambda: peft.LoraConfig(target_modules=TARGETS, r=2, kasa_config=peft.KasaConfig()),
        "bdlora": lambda: peft.LoraConfig(
            target_modules=TARGETS, r=2,
            use_bdlora=peft.BdLoraConfig(target_modules_bd_a=["fc1"], target_modules_bd_b=["fc2"], nblocks=2),
        ),
    }
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(Tiny(), configs[kind]())


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("adalora", r"AdaLoRA: Delta W = B \(E \* A\) s / ranknum"),
        ("loha", "LoHa: Delta W is a Hadamard product"),
        ("lokr", "LoKr: Delta W is a Kronecker product"),
        ("vera", "VeRA: "),
        ("oft", "OFT: the weight is rotated"),
        ("boft", "BOFT: "),
        ("ia3", "IA3: a trainable vector rescales"),
        ("fourierft", "FourierFT: "),
        ("kasa", r"trainable adapter weights \(lora_diag\) do not form"),
        ("bdlora", "LoRA variant BdLoraLinearVariant"),
    ],
)
def test_tuners_that_are_not_sBA_are_refused_by_name(kind, reason):
    model = _tuner(kind)
    layer = "base_model.model.fc2" if kind == "vera" else "base_model.model.fc1"
    for make in (lorapro.find_lora_pairs, lambda m: lorapro.LoRAProAdamW(m), lambda m: lorapro.LoRAProSGD(m, lr=0.1)):
        with pytest.raises(ValueError, match=reason) as info:
            make(model)
        assert str(info.value).startswith(layer)


def test_a_frozen_tuner_layer_is_not_in_the_way():
    model = _tuner("adalora")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable LoRA pair found"):
        lorapro.find_lora_pairs(model)


@pytest.mark.parametrize("config", [dict(use_dora=True), dict(trainable_token_indices={"emb": [1, 2]})])
def test_dora_and_trainable_tokens_still_train(config):
    model = tiny_peft(target_modules=("fc1", "fc2"), **config)
    opt = lorapro.LoRAProAdamW(model, lr=1e-2)
    assert [p.name for p in opt.pairs] == ["base_model.model.fc1[default]", "base_model.model.fc2[default]"]
    losses = train_tiny(model, opt, tiny_batch(), 5)
    assert losses[-1] < losses[0]


def test_a_factor_listed_twice_is_refused():
    A = torch.nn.Parameter(torch.randn(2, 5))
    B = torch.nn.Parameter(torch.randn(6, 2))
    for params in ([(A, B, 1.0), A, B], [(A, B, 1.0), B], [lorapro.LoRAPair(A, B, 1.0, name="fc"), (A, B, 1.0)]):
        with pytest.raises(ValueError, match="is given twice"):
            lorapro.LoRAProAdamW(params)
    with pytest.raises(ValueError, match="fc's A is given twice"):
        lorapro.LoRAProSGD([lorapro.LoRAPair(A, B, 1.0, name="fc"), A], lr=0.1)
    W = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match=r"a tensor of shape \(3,\) is given twice"):
        lorapro.LoRAProAdamW([(A, B, 1.0), W, W])


def _trained(make, steps: int = 2):
    model = tiny_peft(init_lora_weights=False)
    opt = make(model)
    train_tiny(model, opt, tiny_batch(), steps)
    return model, opt


@pytest.mark.parametrize(
    "source, target, message",
    [
        (lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3), lambda m: lorapro.LoRAProAdamW(m),
         "lacks x_mode, moments: it was saved by torch.optim.Adam/AdamW, not LoRAProAdamW"),
        (lambda m: lorapro.LoRAProSGD(m, lr=0.1), lambda m: lorapro.LoRAProAdamW(m),
         "lacks betas, eps, moments: it was saved by LoRAProSGD, not LoRAProAdamW"),
        (lambda m: lorapro.LoRAProAdamW(m), lambda m: lorapro.LoRAProSGD(m, lr=0.1),
         "has betas, moments: it was saved by LoRAProAdamW, not LoRAProSGD"),
        (lambda m: torch.optim.SGD(m.parameters(), lr=0.1), lambda m: lorapro.LoRAProSGD(m, lr=0.1),
         "lacks x_mode: it was saved by another optimizer"),
    ],
)
def test_another_optimizers_state_is_refused_at_load_time(source, target, message):
    _, opt = _trained(source)
    saved = opt.state_dict()
    model, mine = _trained(target)
    before = {k: {n: v.clone() for n, v in s.items()} for k, s in mine.state_dict()["state"].items()}
    with pytest.raises(ValueError, match=message):
        mine.load_state_dict(saved)
    after = mine.state_dict()["state"]
    assert before.keys() == after.keys()  # nothing was loaded
    assert all(torch.equal(before[k][n], after[k][n]) for k in before for n in before[k])
    train_tiny(model, mine, tiny_batch(), 1)  # and it still steps


def test_state_of_other_moments_or_layers_is_refused_by_layer():
    _, full = _trained(lambda m: lorapro.LoRAProAdamW(m))
    _, factored = _trained(lambda m: lorapro.LoRAProAdamW(m, moments="factored"))
    saved = full.state_dict()
    saved["param_groups"][0]["moments"] = "factored"  # full moments presented as factored ones
    with pytest.raises(ValueError, match=r"emb\[default\]'s B holds exp_avg \[12, 30\], exp_avg_sq \[12, 30\]"):
        factored.load_state_dict(saved)
    _, efficient = _trained(lambda m: lorapro.LoRAProAdamW(m, moments="efficient"))
    saved = efficient.state_dict()
    saved["param_groups"][0]["moments"] = "full"  # r-sized AdamW moments presented as full ones
    with pytest.raises(ValueError, match=r"emb\[default\]'s A holds exp_avg \[4, 30\], exp_avg_sq \[4, 30\], where "
                       r"LoRAProAdamW with these settings keeps nothing"):
        full.load_state_dict(saved)


def test_own_state_still_loads_and_resumes_exactly():
    for moments in ("full", "bf16", "factored", "efficient"):
        model, opt = _trained(lambda m: lorapro.LoRAProAdamW(m, moments=moments))
        saved = opt.state_dict()
        fresh = lorapro.LoRAProAdamW(model, moments=moments)
        fresh.load_state_dict(saved)
        assert fresh.state_dict()["state"].keys() == saved["state"].keys()
    model, opt = _trained(lambda m: lorapro.LoRAProSGD(m, lr=0.1))
    lorapro.LoRAProSGD(model, lr=0.1).load_state_dict(opt.state_dict())


@pytest.mark.parametrize("which", ["lora_A", "head"])
def test_a_sparse_gradient_gets_the_same_message_everywhere(which):
    model = tiny_peft()
    opt = lorapro.LoRAProAdamW(model)
    tiny_loss(model, tiny_batch()).backward()
    name, p = next((n, p) for n, p in model.named_parameters() if which in n and p.requires_grad)
    p.grad = p.grad.to_sparse()
    with pytest.raises(RuntimeError, match=r"LoRAProAdamW does not support sparse gradients \(got one for "):
        opt.step()
