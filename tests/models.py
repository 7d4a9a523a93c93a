"""Tiny models built in code for the tests: every LoRA layer kind PEFT has, in milliseconds."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Tiny(nn.Module):
    """Embedding + Conv2d + two Linears + a head: each of PEFT's LoRA layer types on one small model."""

    def __init__(self, vocab: int = 30, dim: int = 12, hidden: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.conv = nn.Conv2d(3, dim, 3, padding=1)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, tokens: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.emb.weight.dtype)
        h = self.emb(tokens).mean(1) + self.conv(images).mean((2, 3))
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(h)))))


def tiny_batch(seed: int = 0, n: int = 32, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 30, (n, 5), generator=g)
    images = torch.randn(n, 3, 6, 6, generator=g).to(dtype)
    labels = torch.randint(0, 3, (n,), generator=g)
    return tokens, images, labels


def tiny_loss(model: nn.Module, batch) -> torch.Tensor:
    tokens, images, labels = batch
    return F.cross_entropy(model(tokens, images).float(), labels)


def train_tiny(model: nn.Module, opt, batch, steps: int) -> list[float]:
    """Train on one fixed batch; return the loss of every step."""
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = tiny_loss(model, batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def tiny_peft(
    *,
    seed: int = 0,
    init_lora_weights: bool = True,
    dtype: torch.dtype = torch.float32,
    r: int = 4,
    lora_alpha: int = 8,
    two_adapters: bool = False,
    target_modules: tuple[str, ...] = ("emb", "conv", "fc1", "fc2"),
    **config,
):
    """A PEFT LoRA model of :class:`Tiny` with the head in ``modules_to_save``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=list(target_modules),
        modules_to_save=["head"],
        init_lora_weights=init_lora_weights,
        **config,
    )
    model = get_peft_model(Tiny(), cfg)
    if two_adapters:
        model.add_adapter(
            "second",
            LoraConfig(r=2, lora_alpha=3, target_modules=["fc1", "conv"], init_lora_weights=init_lora_weights),
        )
        model.base_model.set_adapter(["default", "second"])
    return model.to(dtype)


def tiny_gpt2(*, seed: int = 0, dtype: torch.dtype = torch.float32, init_lora_weights: bool = True):
    """A 1-layer GPT-2 with LoRA on its ``Conv1D`` layers (``fan_in_fan_out=True``)."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    base = GPT2LMHeadModel(GPT2Config(
            vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0
        ))
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, init_lora_weights=init_lora_weights
    )
    return get_peft_model(base, cfg).to(dtype)


def gpt2_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 40, (4, 10), generator=g)


def gpt2_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss
