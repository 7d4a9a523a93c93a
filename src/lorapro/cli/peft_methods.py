"""The peers as ``lorapro`` methods: PEFT's LoRA+, LoRA-FA, Riemannian-preconditioned LoRA, LoRA-GA, DoRA and
PiSSA, and pytorch-optimizer's LoRA-RITE.

Every one is a PEFT LoRA model built by :func:`lorapro.cli.models.build_model` (same rank, alpha, targets and
learning rate as every other method: the paper's protocol) and differs only in what is listed here (their
entries in :mod:`lorapro._methods` say which of these each one uses):

``loraplus``
    ``peft.optimizers.create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=16,
    loraplus_weight_decay=weight_decay)``. PEFT's grouping: every ``lora_B`` and every trainable 1-D parameter
    (biases, e.g. the classifier's) get ``16 * lr``; ``lora_A`` and other matrices (the classifier weight) get ``lr``.
    16 = 2**4 is the ratio the LoRA+ paper recommends and PEFT's docs use.
``lorafa``
    ``peft.optimizers.create_lorafa_optimizer(model, r=rank, lora_alpha=alpha, lr=lr, weight_decay=weight_decay)``:
    ``lora_A`` frozen at its random init, ``B``'s gradient projected to ``(1/s^2) g_B (A A^T)^-1`` (``s`` the LoRA
    scaling) before an AdamW step (betas 0.9/0.999, eps 1e-6). PEFT computes that projection under bf16 autocast
    whenever ``accelerate`` reports bf16 support (CPUs included).
``riemannian``
    ``peft.optimizers.create_riemannian_optimizer(model, torch.optim.AdamW, lr=lr, reg=1e-2,
    weight_decay=weight_decay)``: AdamW on the preconditioned gradients ``(B^T B + reg I)^-1 g_A`` and
    ``g_B (A A^T + reg I)^-1`` (Zhang & Pilanci, "Riemannian Preconditioned LoRA"); ``reg`` is PEFT's default.
``loraga``
    LoRA-GA initialisation (``init_lora_weights="lora_ga"``, ``LoraGAConfig(direction="ArB2r", scale="stable",
    stable_gamma=16)``, PEFT's defaults) from the mean gradient of the target weights over ``LORAGA_EXAMPLES``
    training examples (``peft.preprocess_loraga``), then plain AdamW. PEFT subtracts ``s * B0 @ A0`` from each
    base weight, so the model computes the base model's function at init; the saved adapter is converted to a
    standard rank-``2r`` LoRA adapter (``[B, -B0] @ [A; A0]``) that applies to the unmodified base model.
``pissa`` / ``lorapro-pissa``
    PiSSA initialisation (``init_lora_weights="pissa"``: ``B0 A0`` from the weight's top-r singular triplets,
    exact SVD), then AdamW or LoRA-Pro. PEFT subtracts ``s * B0 @ A0`` from the base weight, as for LoRA-GA, and
    the saved adapter is converted the same way.
``dora`` / ``lorapro-dora``
    DoRA (``use_dora=True``), then AdamW or LoRA-Pro (which steps the ``s B A`` direction and trains the
    magnitudes with AdamW, like every other parameter outside a pair).
``lora-rite``
    ``pytorch_optimizer.LoRARite`` (LoRA-RITE, Yen et al., ICLR 2025: a transformation-invariant r x r matrix
    preconditioner per factor) with the package's defaults (betas 0.9 / 0.999, eps 1e-6, unmagnified gradients
    clipped to global norm 1, an update whose unmagnified RMS exceeds 1 skipped) and ``lr`` / ``weight_decay``.
    It pairs its parameters by position, ``[left_1, right_1, left_2, ...]`` with the rank in dim 0 of the left
    factor and dim -1 of the right one, which is PEFT's ``(lora_A, lora_B)``; the pairs come from
    :func:`lorapro.find_lora_pairs`, so they are PEFT's layers. Parameters in no pair (the classification head)
    get AdamW in a second group of the same optimizer, as every other method trains them.

The PEFT ones and LoRA-RITE are replicated under ``torchrun`` (like the AdamW baselines): only the LoRA-Pro
optimizers shard state.
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import _methods as registry
from .batches import Batches

LORAPLUS_LR_RATIO = 16.0  # LoRA+ paper's recommendation (2**4); PEFT's docs use 16 too
RIEMANNIAN_REG = 1e-2  # PEFT's default damping of the r x r preconditioners
LORAGA_EXAMPLES = 128  # PEFT's LoRA-GA example estimates the gradient from 64 batches of 2
LORAGA_CONFIG = {"direction": "ArB2r", "scale": "stable", "stable_gamma": 16}  # PEFT's LoraGAConfig defaults

_INIT_ATTR = "_lorapro_mutated_init"  # the initial (A0, B0) of a LoRA-GA or PiSSA model, kept for saving

Batch = dict[str, torch.Tensor]


# ------------------------------------------------------------------------------------------------ optimizers


def _loraplus(model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(
        model, torch.optim.AdamW, lr=cfg.lr, loraplus_lr_ratio=LORAPLUS_LR_RATIO,
        loraplus_weight_decay=cfg.weight_decay,
    )


def _lorafa(model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
    from peft.optimizers import create_lorafa_optimizer

    return create_lorafa_optimizer(model, r=cfg.rank, lora_alpha=cfg.alpha, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _riemannian(model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
    from peft.optimizers import create_riemannian_optimizer

    return create_riemannian_optimizer(
        model, torch.optim.AdamW, lr=cfg.lr, reg=RIEMANNIAN_REG, weight_decay=cfg.weight_decay
    )


@functools.cache
def _lorarite_class() -> type:
    from pytorch_optimizer import LoRARite
    from torch.optim.adamw import adamw

    class LoRARiteWithAdamW(LoRARite):
        """LoRARite on the groups of LoRA pairs; AdamW (torch's functional step) on the groups marked ``adamw``."""

        def iter_lora_pairs(self, group: dict) -> list:
            return [] if group.get("adamw") else super().iter_lora_pairs(group)

        @torch.no_grad()
        def step(self, closure: Any = None) -> Any:
            loss = super().step(closure)
            for group in self.param_groups:
                if not group.get("adamw"):
                    continue
                params = [p for p in group["params"] if p.grad is not None]
                for p in params:
                    if "exp_avg" not in self.state[p]:
                        self.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p),
                                             exp_avg_sq=torch.zeros_like(p))
                states = [self.state[p] for p in params]
                beta1, beta2 = group["betas"]
                adamw(
                    params, [p.grad for p in params], [s["exp_avg"] for s in states],
                    [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states], foreach=False,
                    amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
                    eps=group["eps"], maximize=False,
                )
            return loss

    return LoRARiteWithAdamW


def _lorarite(model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
    from lorapro.pairs import find_lora_pairs, split_trainable

    pairs = find_lora_pairs(model)
    groups = [{"params": [t for p in pairs for t in (p.A, p.B)]}]
    rest = split_trainable(model, pairs)
    if rest:
        groups.append({"params": rest, "adamw": True, "eps": 1e-8})
    return _lorarite_class()(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


_OPTIMIZERS: dict[str, Callable[[nn.Module, Any], torch.optim.Optimizer]] = {
    "loraplus": _loraplus, "lorafa": _lorafa, "riemannian": _riemannian, "lorarite": _lorarite,
}


def make_optimizer(name: str, model: nn.Module, cfg: Any, process_group: Any = None) -> torch.optim.Optimizer:
    """The peer optimizer ``name`` (a method's ``peft_optimizer``: ``loraplus``, ``lorafa``, ``riemannian`` or
    ``lorarite``) for the PEFT model ``model``, with ``cfg``'s lr, weight decay (and, for LoRA-FA, rank and alpha).

    ``process_group`` is ignored: these optimizers keep replicated state, like plain AdamW under DDP.
    """
    if name not in _OPTIMIZERS:
        raise ValueError(f"{name!r} is not one of {', '.join(_OPTIMIZERS)}")
    return _OPTIMIZERS[name](model, cfg)


def freeze_lora_a(model: nn.Module) -> None:
    """LoRA-FA trains ``B`` only (``create_lorafa_optimizer`` freezes ``A`` too; doing it at build time makes the
    trainable-parameter count and the checkpoints right)."""
    for name, param in model.named_parameters():
        if "lora_A" in name:
            param.requires_grad_(False)


# ----------------------------------------------------------------------------------------------------- LoRA-GA


def loraga_config_kwargs() -> dict[str, Any]:
    """The ``LoraConfig`` arguments that select LoRA-GA initialisation."""
    from peft import LoraGAConfig

    return {"init_lora_weights": "lora_ga", "lora_ga_config": LoraGAConfig(**LORAGA_CONFIG)}


def init_batches(cfg: Any, data: Any, device: torch.device | str = "cpu") -> Callable[[Any], list[Batch]] | None:
    """For ``loraga``: a function ``tokenizer -> batches`` giving the examples whose gradient initialises the adapters.

    ``LORAGA_EXAMPLES`` training rows (fewer if the set is smaller), drawn by a permutation seeded by ``cfg.seed``
    (independent of the training order), in micro-batches of ``cfg.batch_size``, on ``device``. ``None`` for the
    other methods. Every process of a ``torchrun`` launch gets the same batches, hence the same initialisation.
    """
    if cfg.method not in registry.names(lambda m: m.init == "loraga"):
        return None

    def make(tokenizer: Any) -> list[Batch]:
        n = min(LORAGA_EXAMPLES, len(data.train))
        order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(cfg.seed))[:n].tolist()
        rows = [data.train[i] for i in order]
        collate = Batches(data, tokenizer, cfg, device)
        return [collate(rows[i : i + cfg.batch_size]) for i in range(0, n, cfg.batch_size)]

    return make


def loraga_preprocess(model: nn.Module, lora_config: Any, batches: list[Batch]) -> None:
    """``peft.preprocess_loraga`` with a ``train_step`` that runs forward + backward on every batch (the gradients
    add up; PEFT divides by the number of backward passes: the mean gradient of the batches' mean losses).

    The model is moved to the batches' device first. Call this on the base model, before ``get_peft_model``.
    """
    from peft import preprocess_loraga

    if not batches:
        raise ValueError("LoRA-GA needs at least one batch to estimate the gradient")
    model.to(batches[0]["input_ids"].device)

    def train_step() -> None:
        for batch in batches:
            model(**batch).loss.backward()

    with warnings.catch_warnings():  # PEFT's counting hooks fire on outputs only (inputs need no gradient): fine
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        preprocess_loraga(model, lora_config, train_step)


def remember_init(model: nn.Module) -> None:
    """Keep a CPU copy of the initial factors of a LoRA-GA or PiSSA model (by adapter state-dict key), for
    :func:`save_as_lora`."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    setattr(model, _INIT_ATTR, {k: v.detach().to("cpu", copy=True) for k, v in state.items() if _is_factor(k)})


def _is_factor(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def save_as_lora(model: nn.Module, directory: str | Path) -> None:
    """Save a trained LoRA-GA or PiSSA model (whose base weights PEFT changed at init) as a standard LoRA
    adapter for the *original* base model.

    The trained model computes ``W - s B0 A0 + s B A`` = ``W + s [B, -B0] [A; A0]``: a rank-``2r`` adapter with
    ``init_lora_weights=True`` and ``lora_alpha`` doubled (``* sqrt 2`` with rsLoRA), so the scaling ``s`` is
    unchanged. This is PEFT's ``subtract_mutated_init`` rule; it is done here because PEFT's
    ``save_pretrained(path_initial_model_for_weight_conversion=...)`` needs the initial adapter on disk and keeps
    only the LoRA factors, dropping the trained classification head (``modules_to_save``).
    """
    from safetensors.torch import load_file, save_file

    init = getattr(model, _INIT_ATTR, None)
    if init is None:
        raise ValueError("this model has no recorded initial adapter (was it built with LoRA-GA or PiSSA init?)")
    directory = Path(directory)
    model.save_pretrained(directory)
    weights = directory / "adapter_model.safetensors"
    state = load_file(weights)
    if set(k for k in state if _is_factor(k)) != set(init):
        raise ValueError("the saved adapter's LoRA factors do not match the recorded initial adapter")
    for key, value in list(state.items()):
        if ".lora_A." in key:
            state[key] = torch.cat([value, init[key].to(value.dtype)], dim=0).contiguous()
        elif ".lora_B." in key:
            state[key] = torch.cat([value, -init[key].to(value.dtype)], dim=1).contiguous()
    save_file(state, weights, metadata={"format": "pt"})
    config_file = directory / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["r"] = 2 * int(config["r"])
    config["lora_alpha"] = config["lora_alpha"] * (math.sqrt(2) if config.get("use_rslora") else 2)
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise ValueError(f"the conversion to a standard LoRA adapter does not handle {key}")
    config["init_lora_weights"] = True
    config["lora_ga_config"] = None
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
