"""LoRA-Pro for the Hugging Face :class:`transformers.Trainer`, with one change to a training script.

Either subclass::

    from lorapro.integrations.transformers import LoRAProTrainer

    trainer = LoRAProTrainer(model=peft_model, args=training_args, train_dataset=ds)  # was: Trainer(...)

or keep the stock ``Trainer`` and hand it the optimizer::

    from lorapro.integrations.transformers import make_lorapro_optimizer

    trainer = Trainer(model=peft_model, args=training_args, train_dataset=ds,
                      optimizers=(make_lorapro_optimizer(peft_model, training_args), None))

In both cases the ``TrainingArguments`` supply the hyperparameters (``learning_rate``, ``adam_beta1``,
``adam_beta2``, ``adam_epsilon``, ``weight_decay``; ``optim`` is ignored) and the Trainer's learning-rate
scheduler (``lr_scheduler_type``, ``warmup_steps``, ...) drives the LoRA-Pro optimizer like any other.

Weight decay follows the stock Trainer: two parameter groups, ``[LoRA pairs + other decayed parameters]`` with
``args.weight_decay`` and ``[biases and normalization parameters]`` with 0 (the names come from
``Trainer.get_decay_parameter_names``). LoRA factors are ``.weight`` tensors, so every pair is decayed.

Multi-process training (DDP, launched with ``torchrun``/``accelerate launch``): with
``shard_optimizer_state=None`` (the default) the optimizer shards its m x n moments over the ranks of
``torch.distributed.group.WORLD`` whenever a process group with more than one rank exists, so each rank keeps
only its own layers' state. :class:`LoRAProTrainer` then saves one ``optimizer.rank{R}-of-{W}.pt`` per rank in
every checkpoint (written atomically) and each rank loads its own file on resume; resuming with a different
number of processes raises a ``ValueError`` naming both sizes. Single-process checkpoints keep the stock
``optimizer.pt``. (The stock ``Trainer`` with ``make_lorapro_optimizer`` saves ``optimizer.pt`` from rank 0
only, so with a sharded optimizer use :class:`LoRAProTrainer` or ``shard_optimizer_state=False``.)

The Trainer's FSDP and DeepSpeed modes are refused (not tested with this Trainer). The optimizer itself supports
FSDP2's ``fully_shard`` in a plain training loop, and DeepSpeed ZeRO stage 0 through
:mod:`lorapro.integrations.deepspeed`.

This module imports ``transformers``; ``import lorapro`` does not.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import transformers
from torch import nn

from .._io import atomic_torch_save, atomic_write_bytes, rank_file_name, rank_file_pattern
from .._methods import LORAPRO_OPTIMIZERS
from ..optim import LoRAProAdamW, LoRAProSGD
from ..pairs import find_lora_pairs
from ..sharding import default_process_group

__all__ = [
    "LORAPRO_METHODS",
    "LoRAProDiagnosticsCallback",
    "LoRAProTrainer",
    "lorapro_param_groups",
    "make_lorapro_optimizer",
    "optimizer_shard_name",
]

LORAPRO_METHODS = tuple(LORAPRO_OPTIMIZERS)  # "adamw": LoRAProAdamW, "sgd": LoRAProSGD

OPTIMIZER_NAME = "optimizer.pt"  # the stock Trainer's file (single process)
SCHEDULER_NAME = "scheduler.pt"
_SHARD_RE = rank_file_pattern("optimizer")

# The stock Trainer's rule for which parameters get weight decay (transformers 5.x).
_NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def optimizer_shard_name(rank: int, world: int) -> str:
    """The file one rank's optimizer state is saved to in a checkpoint: ``optimizer.rank{R}-of-{W}.pt``."""
    return rank_file_name("optimizer", rank, world)


def _inner_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / ``torch.compile`` wrappers (Accelerate's prepared model)."""
    try:
        from accelerate.utils import extract_model_from_parallel

        model = extract_model_from_parallel(model, keep_fp32_wrapper=True, keep_torch_compile=False)
    except ImportError:  # pragma: no cover - the Trainer needs accelerate anyway
        pass
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _inner_optimizer(optimizer: Any) -> Any:
    """The LoRA-Pro optimizer inside Accelerate's ``AcceleratedOptimizer`` (or similar wrappers)."""
    seen = 0
    while not isinstance(optimizer, (LoRAProAdamW, LoRAProSGD)) and seen < 8:
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer, seen = inner, seen + 1
    return optimizer


def _shard_layout(optimizer: Any) -> tuple[int, int]:
    """``(rank, world)`` over which ``optimizer``'s LoRA-Pro state is sharded; ``(0, 1)`` if it is not."""
    opt = _inner_optimizer(optimizer)
    return opt.shard if isinstance(opt, (LoRAProAdamW, LoRAProSGD)) else (0, 1)


def _default_decay_parameter_names(model: nn.Module) -> list[str]:
    from transformers.trainer_pt_utils import get_parameter_names

    return get_parameter_names(model, [nn.LayerNorm], _NO_DECAY_PATTERNS)


def lorapro_param_groups(
    model: nn.Module, weight_decay: float, decay_parameter_names: Iterable[str] | None = None
) -> list[dict[str, Any]]:
    """Parameter groups for a LoRA-Pro optimizer that mirror the stock Trainer's weight-decay split.

    Group 0: every LoRA pair of ``model`` (as :class:`lorapro.LoRAPair` objects) and the other trainable
    parameters named in ``decay_parameter_names``, with ``weight_decay``. Group 1 (omitted when empty): the
    remaining trainable parameters (biases, LayerNorm weights), with weight decay 0. A pair whose ``B`` is not a
    decay parameter (never the case for PEFT layers) goes to group 1 whole: a pair is never split.
    """
    model = _inner_model(model)
    decay = set(_default_decay_parameter_names(model) if decay_parameter_names is None else decay_parameter_names)
    pairs = find_lora_pairs(model)
    names = {id(p): n for n, p in model.named_parameters()}
    in_pairs = {id(t) for p in pairs for t in (p.A, p.B)}
    decayed: list[Any] = []
    plain: list[Any] = []
    for pair in pairs:
        (decayed if names.get(id(pair.B)) in decay else plain).append(pair)
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in in_pairs:
            (decayed if name in decay else plain).append(p)
    groups = [{"params": decayed, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _process_group(shard_optimizer_state: bool | None) -> Any:
    """The group to shard over: the default one if ``shard_optimizer_state`` (``None``: if it has more than one
    rank), else ``None``."""
    group = default_process_group()
    if shard_optimizer_state is None:
        return group
    if shard_optimizer_state and group is None:
        raise ValueError(
            "shard_optimizer_state=True needs an initialized torch.distributed process group with more than one "
            "rank (launch with torchrun or accelerate launch)"
        )
    return group if shard_optimizer_state else None


def make_lorapro_optimizer(
    model: nn.Module,
    args: transformers.TrainingArguments,
    *,
    method: str = "adamw",
    x_mode: str = "sylvester",
    shard_optimizer_state: bool | None = None,
    process_group: Any = None,
    decay_parameter_names: Iterable[str] | None = None,
    **optimizer_kwargs: Any,
) -> LoRAProAdamW | LoRAProSGD:
    """A LoRA-Pro optimizer for ``model`` configured from ``args``, for ``Trainer(optimizers=(opt, None))``.

    Args:
        model: the PEFT (or custom LoRA) model; DDP / Accelerate wrappers are looked through.
        args: ``learning_rate``, ``weight_decay`` and, for ``"adamw"``, ``adam_beta1``, ``adam_beta2`` and
            ``adam_epsilon`` are used.
        method: ``"adamw"`` (:class:`lorapro.LoRAProAdamW`) or ``"sgd"`` (:class:`lorapro.LoRAProSGD`).
        x_mode: ``"sylvester"`` or ``"zero"``.
        shard_optimizer_state: shard the per-layer state over ``torch.distributed.group.WORLD``; ``None``
            (default): when a process group with more than one rank is initialized.
        process_group: shard over this group instead (overrides ``shard_optimizer_state``).
        decay_parameter_names: the parameter names that get weight decay (default: the stock Trainer's
            rule, everything but biases and normalization weights); see :func:`lorapro_param_groups`.
        **optimizer_kwargs: passed on to the optimizer (e.g. ``moments="bf16"`` for ``"adamw"``).
    """
    optimizer = _build_optimizer(
        model, args, method=method, x_mode=x_mode, shard_optimizer_state=shard_optimizer_state,
        process_group=process_group, decay_parameter_names=decay_parameter_names, **optimizer_kwargs,
    )
    if _shard_layout(optimizer)[1] > 1:
        warnings.warn(
            "make_lorapro_optimizer: the optimizer state is sharded over the ranks, and the stock Trainer saves "
            "optimizer.pt from rank 0 only, so its checkpoints would lose the other ranks' moments; use "
            "LoRAProTrainer (one optimizer file per rank) or shard_optimizer_state=False",
            UserWarning,
            stacklevel=2,
        )
    return optimizer


def _build_optimizer(
    model: nn.Module,
    args: transformers.TrainingArguments,
    *,
    method: str,
    x_mode: str,
    shard_optimizer_state: bool | None,
    process_group: Any,
    decay_parameter_names: Iterable[str] | None,
    **optimizer_kwargs: Any,
) -> LoRAProAdamW | LoRAProSGD:
    if method not in LORAPRO_METHODS:
        raise ValueError(f"Invalid lorapro method: {method!r} (expected one of {', '.join(LORAPRO_METHODS)})")
    group = process_group if process_group is not None else _process_group(shard_optimizer_state)
    params = lorapro_param_groups(model, args.weight_decay, decay_parameter_names)
    optimizer_cls = LORAPRO_OPTIMIZERS[method]
    adam = (
        {"betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon} if optimizer_cls is LoRAProAdamW else {}
    )
    return optimizer_cls(
        params, lr=args.learning_rate, weight_decay=args.weight_decay, x_mode=x_mode, process_group=group, **adam,
        **optimizer_kwargs,
    )


def _saved_shard_worlds(checkpoint: str) -> set[int]:
    """The world sizes of the sharded optimizer files in ``checkpoint``."""
    try:
        names = os.listdir(checkpoint)
    except (FileNotFoundError, NotADirectoryError):
        return set()
    return {int(m.group(2)) for m in map(_SHARD_RE.match, names) if m}


class LoRAProTrainer(transformers.Trainer):
    """:class:`transformers.Trainer` that trains with LoRA-Pro and saves / resumes its (sharded) state.

    Takes every ``Trainer`` argument, plus:

    Args:
        lorapro_method: ``"adamw"`` (default, :class:`lorapro.LoRAProAdamW`) or ``"sgd"``
            (:class:`lorapro.LoRAProSGD`).
        x_mode: ``"sylvester"`` (default) or ``"zero"``.
        shard_optimizer_state: shard the optimizer state over the ranks; ``None`` (default): when
            ``torch.distributed`` is initialized with more than one rank.
        lorapro_kwargs: extra keyword arguments for the optimizer (e.g. ``{"moments": "bf16"}``).

    The optimizer is built in :meth:`create_optimizer` by :func:`make_lorapro_optimizer` (``args.optim`` is
    ignored); an optimizer passed with ``optimizers=(opt, scheduler)`` is used as given.
    """

    def __init__(
        self,
        *args: Any,
        lorapro_method: str = "adamw",
        x_mode: str = "sylvester",
        shard_optimizer_state: bool | None = None,
        lorapro_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if lorapro_method not in LORAPRO_METHODS:
            raise ValueError(
                f"Invalid lorapro_method: {lorapro_method!r} (expected one of {', '.join(LORAPRO_METHODS)})"
            )
        if kwargs.get("optimizer_cls_and_kwargs") is not None:
            raise ValueError("LoRAProTrainer builds its own optimizer; do not pass optimizer_cls_and_kwargs")
        self.lorapro_method = lorapro_method
        self.x_mode = x_mode
        self.shard_optimizer_state = shard_optimizer_state
        self.lorapro_kwargs = dict(lorapro_kwargs or {})
        super().__init__(*args, **kwargs)
        if getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False):
            raise ValueError(
                "LoRAProTrainer does not support the Trainer's FSDP or DeepSpeed modes (untested here; DeepSpeed "
                "ZeRO >= 1 flattens A and B into 1-D partitions): use DDP, whose optimizer state LoRA-Pro shards "
                "over the ranks by itself, or FSDP2's fully_shard in a plain loop, or lorapro.integrations.deepspeed"
            )

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Build the LoRA-Pro optimizer (once) from ``self.args``."""
        if self.optimizer is None:
            opt_model = _inner_model(self.model if model is None else model)
            self.optimizer = _build_optimizer(
                opt_model,
                self.args,
                method=self.lorapro_method,
                x_mode=self.x_mode,
                shard_optimizer_state=self.shard_optimizer_state,
                process_group=None,
                decay_parameter_names=self.get_decay_parameter_names(opt_model),
                **self.lorapro_kwargs,
            )
        return self.optimizer

    # ---- checkpoints -------------------------------------------------------------------------------------

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        rank, world = _shard_layout(self.optimizer)
        if world <= 1:
            super()._save_optimizer_and_scheduler(output_dir)
            return
        os.makedirs(output_dir, exist_ok=True)
        atomic_torch_save(os.path.join(output_dir, optimizer_shard_name(rank, world)), self.optimizer.state_dict())
        if self.args.should_save and self.lr_scheduler is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # the scheduler's "please save the optimizer" note
                atomic_torch_save(os.path.join(output_dir, SCHEDULER_NAME), self.lr_scheduler.state_dict())
        import torch.distributed as dist

        dist.barrier()  # the checkpoint is complete (every rank's file) before any rank goes on

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        rank, world = _shard_layout(self.optimizer)
        saved = _saved_shard_worlds(checkpoint)
        has_single = os.path.isfile(os.path.join(checkpoint, OPTIMIZER_NAME))
        if world <= 1:
            if saved and not has_single:
                raise ValueError(self._mismatch(checkpoint, saved, world))
            super()._load_optimizer_and_scheduler(checkpoint)
            return
        own = os.path.join(checkpoint, optimizer_shard_name(rank, world))
        if not os.path.isfile(own):
            if world in saved:
                raise FileNotFoundError(
                    f"{checkpoint}: the LoRA-Pro optimizer state of rank {rank} ({optimizer_shard_name(rank, world)}) "
                    f"is missing; the checkpoint has files for a {world}-process run"
                )
            if saved or has_single:
                raise ValueError(self._mismatch(checkpoint, saved or {1}, world))
            return  # no optimizer state saved (save_only_model): start fresh, like the stock Trainer
        device = self.args.device
        map_location = device if device.type != "cpu" else "cpu"
        self.optimizer.load_state_dict(torch.load(own, map_location=map_location, weights_only=True))
        scheduler_file = os.path.join(checkpoint, SCHEDULER_NAME)
        if self.lr_scheduler is not None and os.path.isfile(scheduler_file):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                self.lr_scheduler.load_state_dict(torch.load(scheduler_file, weights_only=True))

    @staticmethod
    def _mismatch(checkpoint: str, saved: set[int], world: int) -> str:
        sizes = " and ".join(str(w) for w in sorted(saved))
        return (
            f"cannot resume from {checkpoint}: its LoRA-Pro optimizer state was saved by a run with world size "
            f"{sizes}, but this run has world size {world}. With more than one process each rank keeps only its "
            "own layers' moments, so resume with the same number of processes"
        )


class LoRAProDiagnosticsCallback(transformers.TrainerCallback):
    """The paper's diagnostics (:mod:`lorapro.diagnostics`) for a ``Trainer`` run, with any optimizer.

    Every ``every`` optimizer steps (from step 0) it records, per LoRA layer, ``||G - g||_F`` for LoRA's and
    LoRA-Pro's equivalent gradients, ``||g||_F`` and the numerical ranks of ``A`` and ``B``; the layers' full
    gradients exist one at a time during the measured step's backward passes (all its gradient-accumulation
    micro-batches). At the end of training the world-process-zero writes ``diagnostics.json`` and
    ``diagnostics.png`` to ``output_dir`` (default: ``args.output_dir``). Under DDP each rank measures the
    gradient of its own micro-batches (before averaging); rank 0's are written. ``self.diagnostics.records``
    holds the records.

        trainer = Trainer(..., callbacks=[LoRAProDiagnosticsCallback(every=10)])
    """

    def __init__(self, every: int = 10, output_dir: str | None = None, label: str = "run") -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every, self.output_dir, self.label = every, output_dir, label
        self.diagnostics: Any = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from ..diagnostics import GradientDiagnostics

        self.diagnostics = GradientDiagnostics(_inner_model(model), every=self.every)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.diagnostics is not None and self.diagnostics.due(state.global_step):
            self.diagnostics.arm(state.global_step, micro_batches=args.gradient_accumulation_steps)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.diagnostics is not None and self.diagnostics.armed:
            self.diagnostics.disarm()

    def on_train_end(self, args, state, control, **kwargs):
        if self.diagnostics is None or not state.is_world_process_zero or not self.diagnostics.records:
            return
        from ..diagnostics import plot_diagnostics

        out = self.output_dir or args.output_dir
        os.makedirs(out, exist_ok=True)
        saved = json.dumps({"label": self.label, "every": self.every, "records": self.diagnostics.records}).encode()
        atomic_write_bytes(os.path.join(out, "diagnostics.json"), lambda f: f.write(saved))
        plot_diagnostics({self.label: self.diagnostics.records}, os.path.join(out, "diagnostics.png"))
