"""LoRA-Pro with DeepSpeed: ZeRO stage 0 only, with the LoRA-Pro optimizer as DeepSpeed's client optimizer.

::

    from lorapro import LoRAProAdamW
    from lorapro.integrations.deepspeed import lorapro_deepspeed_initialize

    optimizer = LoRAProAdamW(model, lr=1e-4, process_group=torch.distributed.group.WORLD)  # sharded moments
    engine, optimizer, _, _ = lorapro_deepspeed_initialize(
        model, optimizer, config={"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 0}}
    )

With stage 0 DeepSpeed is data parallelism: it averages the gradients over the ranks and calls the client
optimizer's ``step`` on the model's own parameters, which is all LoRA-Pro needs. The optimizer state can still
be split over the ranks with LoRA-Pro's own sharding (``process_group=``): each layer's m x n moments live on
one rank.

Refused (``ValueError``, before DeepSpeed is imported), because DeepSpeed would hand the optimizer other
tensors than the model's ``A`` and ``B`` and LoRA-Pro would silently run as plain AdamW on them:

* ZeRO stage 1, 2 and 3 (and the legacy ``"zero_optimization": true``, which is stage 1): they flatten the
  parameters into 1-D buffers and partition those and the optimizer state over the ranks;
* DeepSpeed's ``fp16`` / ``bf16`` modes: they give the optimizer fp32 master copies (``bf16`` with stage 0
  wraps it in ``FP16_UnfusedOptimizer``). Train in float32. (``amp``, NVIDIA apex, is refused too: it also
  wraps the optimizer; not tried here.)

After ``deepspeed.initialize`` the engine is checked: its optimizer must be the one passed in, still holding
the model's LoRA factors; otherwise a ``RuntimeError`` says what DeepSpeed did.

DeepSpeed wants ``LOCAL_RANK`` (and ``RANK``, ``WORLD_SIZE``) in the environment, as ``torchrun`` and the
``deepspeed`` launcher set them, even when ``torch.distributed`` is already initialized. On CPU its first
``init_distributed`` JIT-compiles a shared-memory all-reduce kernel (about 4.5 minutes on 2 cores, then cached
under ``~/.cache/torch_extensions``).

This module imports ``deepspeed`` only inside :func:`lorapro_deepspeed_initialize`; ``import lorapro`` never
does, and :func:`check_deepspeed_config` works without DeepSpeed installed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from ..optim import LoRAProAdamW, LoRAProSGD

__all__ = ["check_deepspeed_config", "lorapro_deepspeed_initialize", "zero_stage"]

_PRECISION_SECTIONS = ("fp16", "bf16", "bfloat16", "amp")  # "bfloat16" is DeepSpeed's older name for "bf16"

_SHARDING_HINT = (
    "use ZeRO stage 0 (DeepSpeed data parallelism) or plain DDP, and shard the optimizer state with LoRA-Pro's "
    "own sharding: LoRAProAdamW(model, ..., process_group=torch.distributed.group.WORLD) keeps each layer's "
    "m x n moments on one owner rank (about 1/world of them per rank); to shard the parameters too, use FSDP2 "
    "(torch.distributed.fsdp.fully_shard), whose DTensor factors LoRA-Pro gathers layer by layer"
)


def _as_dict(config: Mapping[str, Any] | str | os.PathLike[str]) -> dict[str, Any]:
    if isinstance(config, (str, os.PathLike)):
        with open(config, encoding="utf-8") as f:
            config = json.load(f)
    if not isinstance(config, Mapping):
        raise TypeError(f"a DeepSpeed config must be a dict or the path of a JSON file, got {type(config).__name__}")
    return dict(config)


def zero_stage(config: Mapping[str, Any] | str | os.PathLike[str]) -> int:
    """The ZeRO stage a DeepSpeed config asks for (0 when it has no ``zero_optimization``)."""
    zero = _as_dict(config).get("zero_optimization", {})
    if isinstance(zero, bool):  # DeepSpeed's deprecated form: true means stage 1
        return int(zero)
    if zero is None:
        return 0
    if not isinstance(zero, Mapping):
        raise ValueError(f"DeepSpeed config: zero_optimization must be a dict, got {zero!r}")
    stage = zero.get("stage", 0)
    try:
        return int(stage)
    except (TypeError, ValueError):
        raise ValueError(f"DeepSpeed config: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}") from None


def _enabled(section: Any) -> bool:
    if not isinstance(section, Mapping):
        return bool(section)
    value = section.get("enabled", False)
    if isinstance(value, str):
        return value.strip().lower() not in ("false", "0", "")  # "auto" counts: it may turn on
    return bool(value)


def check_deepspeed_config(config: Mapping[str, Any] | str | os.PathLike[str]) -> dict[str, Any]:
    """Check that a DeepSpeed config (a dict or a JSON file) can run a LoRA-Pro optimizer; return it as a dict.

    Raises:
        ValueError: ZeRO stage 1 or above, or DeepSpeed fp16/bf16/amp enabled (the module docstring says why).
    """
    cfg = _as_dict(config)
    stage = zero_stage(cfg)
    if stage >= 1:
        raise ValueError(
            f"DeepSpeed ZeRO stage {stage} cannot run LoRA-Pro: ZeRO-1/2/3 flatten the parameters into 1-D buffers "
            "and partition them and the optimizer state over the ranks, so the optimizer is handed flat slices "
            "instead of the LoRA factors and no rank sees a layer's whole A (r x n) and B (m x r), which LoRA-Pro "
            "needs to form the layer's m x n equivalent gradient (with 'zero_allow_untested_optimizer' DeepSpeed "
            f"would silently run it as plain AdamW on the flat buffer). Instead, {_SHARDING_HINT}."
        )
    on = [name for name in _PRECISION_SECTIONS if name in cfg and _enabled(cfg[name])]
    if on:
        raise ValueError(
            f"DeepSpeed {'/'.join(on)} mixed precision cannot run LoRA-Pro: DeepSpeed then hands the optimizer fp32 "
            "master copies in place of the model's LoRA factors (bf16 with ZeRO stage 0 wraps it in "
            "FP16_UnfusedOptimizer), and LoRA-Pro would silently run as plain AdamW on them. Disable it and train "
            "in float32."
        )
    return cfg


def _check_engine(engine: Any, optimizer: LoRAProAdamW | LoRAProSGD) -> None:
    """The engine steps ``optimizer`` itself, and its param groups still hold every LoRA factor."""
    used = getattr(engine, "optimizer", None)
    if used is not optimizer:
        raise RuntimeError(
            f"DeepSpeed wrapped the LoRA-Pro optimizer in {type(used).__name__}, which steps other tensors than the "
            "model's LoRA factors (LoRA-Pro would silently run as plain AdamW); use ZeRO stage 0 without "
            f"fp16/bf16. To save memory, {_SHARDING_HINT}."
        )
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    lost = [pair.name for pair in optimizer.pairs if id(pair.A) not in held or id(pair.B) not in held]
    if lost:
        raise RuntimeError(
            f"DeepSpeed replaced the parameters of the LoRA-Pro optimizer; the LoRA factors of {', '.join(lost)} "
            "are no longer among them, so LoRA-Pro would not treat those layers"
        )


def lorapro_deepspeed_initialize(
    model: Any,
    optimizer: LoRAProAdamW | LoRAProSGD,
    config: Mapping[str, Any] | str | os.PathLike[str],
    **kwargs: Any,
) -> tuple[Any, Any, Any, Any]:
    """``deepspeed.initialize(model=model, optimizer=optimizer, config=config, **kwargs)`` for a LoRA-Pro optimizer.

    The config is checked first with :func:`check_deepspeed_config` (ZeRO stage 0 and no DeepSpeed fp16/bf16),
    and the engine afterwards (it must step ``optimizer`` itself, on the model's LoRA factors). Build the
    optimizer from the model before this call; pass ``process_group=`` to it to shard its state.

    Returns DeepSpeed's ``(engine, optimizer, training_dataloader, lr_scheduler)``.
    """
    if not isinstance(optimizer, (LoRAProAdamW, LoRAProSGD)):
        raise TypeError(f"optimizer must be a LoRAProAdamW or LoRAProSGD, got {type(optimizer).__name__}")
    for name in ("optimizer", "config_params"):
        if name in kwargs:
            raise TypeError(f"lorapro_deepspeed_initialize: pass the {name.split('_')[0]} as its own argument")
    cfg = check_deepspeed_config(config)
    import deepspeed

    result = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg, **kwargs)
    _check_engine(result[0], optimizer)
    return result
