"""What an optimizer's ``params`` argument may be, resolved into parameter groups and LoRA pairs."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor, nn

from .pairs import LoRAPair, find_lora_pairs, split_trainable

ParamsLike = nn.Module | Iterable[Any]


def _as_pair(item: Any, index: int) -> LoRAPair | None:
    if isinstance(item, LoRAPair):
        return item
    if isinstance(item, (tuple, list)) and len(item) == 3 and all(isinstance(t, Tensor) for t in item[:2]):
        return LoRAPair(item[0], item[1], item[2], name=f"pair{index}")
    return None


def _resolve_group(params: Any) -> tuple[list[LoRAPair], list[Tensor]]:
    """Split one group's ``params`` into LoRA pairs and other tensors."""
    if isinstance(params, nn.Module):
        pairs = find_lora_pairs(params)
        return pairs, split_trainable(params, pairs)
    if isinstance(params, (Tensor, LoRAPair)):
        params = [params]
    pairs: list[LoRAPair] = []
    others: list[Tensor] = []
    for i, item in enumerate(params):
        pair = _as_pair(item, i)
        if pair is not None:
            pairs.append(pair)
        elif isinstance(item, Tensor):
            others.append(item)
        else:
            raise TypeError(
                "params must be a model, or an iterable of LoRAPair objects, (A, B, scale) tuples and tensors, "
                f"or of dicts with such 'params'; got an item of type {type(item).__name__}"
            )
    return pairs, others


def describe(t: Tensor, pairs: Sequence[LoRAPair]) -> str:
    for i, p in enumerate(pairs):
        for label, f in (("A", p.A), ("B", p.B)):
            if f is t:
                return f"{p.name or f'pair{i}'}'s {label}"
    return f"a tensor of shape {tuple(t.shape)}"


def _refuse_duplicates(group: dict[str, Any], pairs: Sequence[LoRAPair]) -> None:
    """A tensor listed twice in one group would be stepped twice per step (torch only warns): refuse it."""
    seen: set[int] = set()
    for t in group["params"]:
        if id(t) in seen:
            raise ValueError(
                f"{describe(t, pairs)} is given twice (e.g. as a factor of a pair and again on its own); "
                "every tensor may appear once, or it would be stepped twice per step"
            )
        seen.add(id(t))


def resolve_params(params: ParamsLike) -> tuple[list[dict[str, Any]], list[LoRAPair]]:
    if isinstance(params, nn.Module):
        items: list[Any] = [{"params": params}]
    else:
        items = list(params) if not isinstance(params, (Tensor, LoRAPair)) else [params]
        if not items:
            raise ValueError("the optimizer got an empty parameter list")
        if not isinstance(items[0], dict):
            items = [{"params": items}]
    groups: list[dict[str, Any]] = []
    all_pairs: list[LoRAPair] = []
    for spec in items:
        if not isinstance(spec, dict) or "params" not in spec:
            raise TypeError("parameter groups must all be dicts with a 'params' entry")
        pairs, others = _resolve_group(spec["params"])
        group = {k: v for k, v in spec.items() if k != "params"}
        group["params"] = [t for p in pairs for t in (p.A, p.B)] + others
        _refuse_duplicates(group, pairs)
        groups.append(group)
        all_pairs.extend(pairs)
    if not all_pairs:
        raise ValueError(
            "no LoRA pair was given: pass a model with LoRA layers, LoRAPair objects or (A, B, scale) tuples"
        )
    return groups, all_pairs
