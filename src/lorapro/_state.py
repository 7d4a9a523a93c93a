"""How much memory an optimizer's state takes."""

from __future__ import annotations

from typing import Any

import torch


def optimizer_state_bytes(optimizer: Any) -> float:
    """Bytes of every tensor in ``optimizer.state``; NaN for an object without a ``state`` dict (no optimizer)."""
    state = getattr(optimizer, "state", None)
    if not isinstance(state, dict):
        return float("nan")
    return float(sum(v.numel() * v.element_size() for st in state.values() for v in st.values() if torch.is_tensor(v)))


def optimizer_scratch_bytes(optimizer: Any) -> int:
    """Bytes of the scratch an optimizer keeps between steps for the step's own temporaries (the separable
    presets' workspace, :class:`lorapro.LoRAProAdamW`); 0 for one that keeps none."""
    scratch = getattr(optimizer, "_scratch", None)
    return sum(t.numel() * t.element_size() for t in scratch.values()) if isinstance(scratch, dict) else 0
