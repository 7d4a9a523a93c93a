"""The settings of one ``lorapro train`` run (the command's flags, one field each)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .. import _methods as registry
from .errors import UserError


@dataclass
class TrainConfig:
    model: str = "minilm"
    task: str | None = None
    train: str = "rotten-tomatoes"
    eval: str | None = None
    method: str = "lorapro"
    rank: int = 8
    alpha: float = 16.0
    rslora: bool = False
    target_modules: list[str] | None = None
    lr: float = 1e-4
    weight_decay: float = 0.0
    max_steps: int | None = None
    epochs: float | None = None
    batch_size: int = 32
    grad_accum: int = 1
    max_length: int = 64
    warmup_ratio: float = 0.03
    schedule: str = "cosine"
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_every: int | None = None
    save_every: int | None = None
    max_train: int | None = None
    max_eval: int | None = None
    eval_batch_size: int = 64
    max_new_tokens: int = 16
    device: str | None = None
    out: str = "runs/train"
    diagnostics: int | None = None  # record the paper's diagnostics every this many steps
    fused: bool = False  # LoRAProAdamW(fused=True), for the methods it applies to (see fused_methods)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def validate(self) -> None:
        def positive(name: str, value: Any, allow_none: bool = False) -> None:
            if value is None and allow_none:
                return
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise UserError(f"--{name.replace('_', '-')} must be a positive number, got {value!r}")

        positive("lr", self.lr)
        positive("rank", self.rank)
        positive("alpha", self.alpha)
        positive("batch_size", self.batch_size)
        positive("grad_accum", self.grad_accum)
        positive("max_length", self.max_length)
        positive("max_steps", self.max_steps, allow_none=True)
        positive("epochs", self.epochs, allow_none=True)
        positive("eval_every", self.eval_every, allow_none=True)
        positive("diagnostics", self.diagnostics, allow_none=True)
        positive("save_every", self.save_every, allow_none=True)
        if self.weight_decay < 0:
            raise UserError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_ratio < 1:
            raise UserError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise UserError(f"--schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.max_steps is not None and self.epochs is not None:
            raise UserError("give --max-steps or --epochs, not both")
        if self.fused and self.method not in fused_methods():
            raise UserError(
                f"--fused is for {' and '.join(fused_methods())} (LoRA-Pro AdamW with fp32 moments), not {self.method}"
            )


def fused_methods() -> tuple[str, ...]:
    """The methods ``--fused`` applies to."""
    return registry.names(lambda m: m.fused)
