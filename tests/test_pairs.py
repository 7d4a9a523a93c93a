"""Pair discovery: by structure, with the right scale and the right matrix view for every layer type."""

from __future__ import annotations

import math

import pytest
import torch
from models import Tiny, gpt2_batch, gpt2_loss, tiny_batch, tiny_gpt2, tiny_loss, tiny_peft
from torch import nn

import lorapro
from lorapro.pairs import LoRAPair, split_trainable


def _names(pairs):
    return [p.name for p in pairs]


def test_finds_every_layer_type_with_its_shape():
    pairs = lorapro.find_lora_pairs(tiny_peft())
    by_name = {p.name.split(".")[-1]: p for p in pairs}
    assert set(by_name) == {"emb[default]", "conv[default]", "fc1[default]", "fc2[default]"}
    assert by_name["emb[default]"].shape == (12, 30)  # Embedding: (dim, num_embeddings)
    assert by_name["conv[default]"].shape == (12, 3 * 3 * 3)  # Conv2d: (out, in * kh * kw)
    assert by_name["fc1[default]"].shape == (16, 12)
    assert all(p.rank == 4 and p.scale == 2.0 for p in pairs)


def test_scale_follows_rslora_and_patterns():
    model = tiny_peft(use_rslora=True, rank_pattern={"fc1": 2}, alpha_pattern={"fc2": 3})
    by_name = {p.name.split(".")[-1]: p for p in lorapro.find_lora_pairs(model)}
    assert by_name["fc1[default]"].rank == 2
    assert by_name["fc1[default]"].scale == pytest.approx(8 / math.sqrt(2))
    assert by_name["fc2[default]"].scale == pytest.approx(3 / math.sqrt(4))
    assert by_name["emb[default]"].scale == pytest.approx(8 / math.sqrt(4))


def test_scale_is_reread_from_the_layer():
    model = tiny_peft()
    pair = lorapro.find_lora_pairs(model)[0]
    pair.module.scaling["default"] = 0.25
    assert pair.scale == 0.25


def test_two_adapters_are_separate_pair_sets_and_frozen_adapters_are_skipped():
    model = tiny_peft(two_adapters=True)
    names = _names(lorapro.find_lora_pairs(model))
    assert sum(n.endswith("[second]") for n in names) == 2 and sum(n.endswith("[default]") for n in names) == 4
    model.base_model.set_adapter("default")  # "second" becomes inactive and frozen
    names = _names(lorapro.find_lora_pairs(model))
    assert not any(n.endswith("[second]") for n in names)


def test_other_trainable_parameters_are_everything_else():
    model = tiny_peft(lora_bias=True, target_modules=("conv", "fc1", "fc2"))
    pairs = lorapro.find_lora_pairs(model)
    others = split_trainable(model, pairs)
    in_pairs = {id(t) for p in pairs for t in (p.A, p.B)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(others) + len(in_pairs) == len(trainable)
    names = {id(p): n for n, p in model.named_parameters()}
    assert any("lora_B" in names[id(p)] and names[id(p)].endswith("bias") for p in others)
    assert any("modules_to_save" in names[id(p)] for p in others)


def test_dora_magnitude_is_trained_as_another_parameter():
    from peft import LoraConfig, get_peft_model

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    model = get_peft_model(Two(), LoraConfig(r=2, target_modules=["fc1", "fc2"], use_dora=True))
    opt = lorapro.LoRAProAdamW(model, lr=1e-2)
    names = {id(p): n for n, p in model.named_parameters()}
    others = [names[id(p)] for g in opt.param_groups for p in g["params"] if id(p) not in {id(t) for q in opt.pairs for t in (q.A, q.B)}]
    assert others and all("lora_magnitude_vector" in n for n in others)
    x = torch.randn(16, 6)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    model(x).pow(2).mean().backward()
    opt.step()
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    assert all(torch.isfinite(a).all() for a in after)
    assert sum(not torch.equal(a, b) for a, b in zip(after, before)) == len(before) - 2  # lora_B (=0 init) of both


def _true_gradient_identity(model, loss_fn, batch):
    """Make base weights trainable so autograd gives the full gradient g; check gA = s B^T g, gB = s g A^T."""
    pairs = lorapro.find_lora_pairs(model)
    for p in pairs:
        p.base_weight.requires_grad_(True)
    loss_fn(model, batch).backward()
    for p in pairs:
        g = p.weight_matrix(p.base_weight.grad)
        s = p.scale
        torch.testing.assert_close(p.A_matrix(p.A.grad), s * p.B_matrix().T @ g, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(p.B_matrix(p.B.grad), s * g @ p.A_matrix().T, rtol=1e-10, atol=1e-12)
        delta = p.module.get_delta_weight(p.adapter)
        torch.testing.assert_close(p.delta_weight(), p.weight_matrix(delta), rtol=1e-12, atol=1e-12)
    return pairs


def test_matrix_views_match_the_true_gradient_for_linear_conv_embedding():
    pairs = _true_gradient_identity(tiny_peft(init_lora_weights=False, dtype=torch.float64), tiny_loss,
                                    tiny_batch(dtype=torch.float64))
    assert len(pairs) == 4


def test_matrix_views_match_the_true_gradient_for_gpt2_conv1d():
    pairs = _true_gradient_identity(tiny_gpt2(init_lora_weights=False, dtype=torch.float64), gpt2_loss, gpt2_batch())
    assert all(p.base_transposed for p in pairs)


def test_no_pair_error_says_what_was_searched():
    with pytest.raises(ValueError, match="no trainable LoRA pair found in Tiny.*lora_A/lora_B.*lora_embedding_A"):
        lorapro.find_lora_pairs(Tiny())
    with pytest.raises(ValueError, match="no trainable LoRA pair"):
        lorapro.LoRAProAdamW(Tiny())


def test_half_trainable_adapter_warns_and_joins_the_other_parameters():
    model = tiny_peft()
    frozen = model.base_model.model.fc1.lora_A["default"].weight
    frozen.requires_grad_(False)
    with pytest.warns(UserWarning, match="only one trainable factor"):
        pairs = lorapro.find_lora_pairs(model)
    assert len(pairs) == 3
    assert any(p is model.base_model.model.fc1.lora_B["default"].weight for p in split_trainable(model, pairs))


def test_grouped_conv_is_refused_with_a_clear_message():
    from peft import LoraConfig, get_peft_model

    class G(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, groups=2)

    with pytest.warns(UserWarning):
        model = get_peft_model(G(), LoraConfig(r=2, target_modules=["conv"]))
    with pytest.raises(ValueError, match="rank-2 product B @ A"):
        lorapro.find_lora_pairs(model)


def test_custom_layer_with_plain_attributes_is_found():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lora_A = nn.Parameter(torch.randn(2, 5))
            self.lora_B = nn.Parameter(torch.zeros(3, 2))
            self.scaling = 0.5

    pairs = lorapro.find_lora_pairs(nn.Sequential(Custom()))
    assert len(pairs) == 1 and pairs[0].shape == (3, 5) and pairs[0].scale == 0.5


@pytest.mark.parametrize(
    "A, B, scale, message",
    [
        (torch.zeros(2, 5), torch.zeros(3, 3), 1.0, "rank-2 product"),
        (torch.zeros(5), torch.zeros(3, 2), 1.0, "at least 2 dimensions"),
        (torch.zeros(2, 5), torch.zeros(3, 2, dtype=torch.float64), 1.0, "differ in dtype"),
        (torch.zeros(2, 5), torch.zeros(3, 2), 0.0, "scale must be finite and non-zero"),
        (torch.zeros(2, 5), torch.zeros(3, 2), float("nan"), "scale must be finite"),
        (torch.zeros(2, 5, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long), 1.0, "floating point"),
    ],
)
def test_bad_custom_pairs_are_refused(A, B, scale, message):
    with pytest.raises(ValueError, match=message):
        LoRAPair(A, B, scale, name="mine")


def test_optimizer_trains_a_model_found_pairs_in_param_group_order():
    model = tiny_peft()
    opt = lorapro.LoRAProSGD(model, lr=0.1)
    params = opt.param_groups[0]["params"]
    for i, pair in enumerate(opt.pairs):
        assert params[2 * i] is pair.A and params[2 * i + 1] is pair.B
    model.zero_grad()
    tiny_loss(model, tiny_batch()).backward()
    opt.step()
