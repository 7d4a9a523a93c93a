"""Where each layer's optimizer state lives, and how the ranks agree: resolved once, used every step.

Three layouts, chosen from ``process_group`` and the factors themselves when the optimizer is built:

* replicated (no process group, world 1): this process keeps and steps every layer;
* owner-sharded (``process_group`` given; the ranks hold the same parameters and the same averaged gradients,
  as under DDP): each adapted layer has one owner rank (largest layers first, to the least loaded rank) that
  keeps its m x n moments and computes its update, and one all-reduce of r (m + n) numbers per layer gives
  every rank the new factors;
* DTensor-gathered (FSDP2's ``fully_shard``: the factors are DTensors): each step gathers the LoRA-sized
  factors and gradients into full-size shadows (:mod:`lorapro._dtensor`), the owners step them as above and
  every rank writes its own rows back.

The optimizer asks the :class:`Sharding` which layers it owns (:meth:`Sharding.owns`), to agree with the
other ranks (:meth:`Sharding.agree`), to gather (:meth:`Sharding.gather`) and to share the result
(:meth:`Sharding.finish`). Nothing else in the package talks to ``torch.distributed`` during a step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._dtensor import DTensorPairs, is_dtensor
from .pairs import LoRAPair

__all__ = ["Sharding", "assign_owners", "default_process_group", "resolve_process_group"]


def resolve_process_group(process_group: Any) -> tuple[Any, int, int]:
    """``None`` | ``ProcessGroup`` | 1-D ``DeviceMesh`` -> (group, this rank in it, its size)."""
    if process_group is None:
        return None, 0, 1
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group was given but torch.distributed is not initialized")
    if hasattr(process_group, "get_group"):  # a DeviceMesh
        if process_group.ndim != 1:
            raise ValueError(f"process_group: a DeviceMesh must be 1-D, got {process_group.ndim} dimensions")
        process_group = process_group.get_group()
    return process_group, dist.get_rank(process_group), dist.get_world_size(process_group)


def default_process_group() -> Any:
    """The default process group when torch.distributed runs with more than one rank, else ``None``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def assign_owners(pairs: Sequence[LoRAPair], world: int) -> dict[int, int]:
    """``id(B) -> rank``: largest layers first, each to the rank with the least m * n so far (lowest rank on
    ties): the same answer on every rank, and per-rank moment memory close to 1/world of the total."""
    load = [0] * world
    owner: dict[int, int] = {}
    for i in sorted(range(len(pairs)), key=lambda i: (-math.prod(pairs[i].shape), i)):
        rank = min(range(world), key=lambda k: (load[k], k))
        owner[id(pairs[i].B)] = rank
        load[rank] += math.prod(pairs[i].shape)
    return owner


class Sharding:
    """The layout of one optimizer's pairs over the ranks (see the module docstring).

    Args:
        pairs: every pair the optimizer steps (the parameters themselves, DTensors or not).
        process_group: ``None``, a ``ProcessGroup`` or a 1-D ``DeviceMesh``; with DTensor factors it must span
            their mesh (or be ``None``: the mesh's group is used).
    """

    def __init__(self, pairs: Sequence[LoRAPair], process_group: Any = None) -> None:
        self.dtensors: DTensorPairs | None = None
        if any(is_dtensor(t) for p in pairs for t in (p.A, p.B)):
            self.dtensors = DTensorPairs(pairs)
            self.group, self.rank, self.world = self.dtensors.group, self.dtensors.rank, self.dtensors.world
            if process_group is not None and resolve_process_group(process_group)[2] != self.world:
                raise ValueError(
                    "process_group: the LoRA factors are DTensors on a device mesh of "
                    f"{self.world} ranks, and the state is sharded over that mesh; got a process group of another size"
                )
        else:
            self.group, self.rank, self.world = resolve_process_group(process_group)
        self.kind = "dtensor" if self.dtensors is not None else "owner" if self.world > 1 else "replicated"
        self._owner = assign_owners(pairs, self.world)
        self._pair_by_B = {id(p.B): p for p in pairs}
        self._device = pairs[0].A.device  # where the agreement's integers travel (CUDA for NCCL)

    def state_key(self, t: Tensor) -> Tensor:
        """The parameter whose optimizer state belongs to ``t`` (``t`` itself, or the DTensor a full-size
        shadow stands for)."""
        return self.dtensors.real_of.get(id(t), t) if self.dtensors is not None else t

    def owns(self, pair: LoRAPair) -> bool:
        """Whether this rank keeps ``pair``'s state and computes its update (``pair`` may be a shadow)."""
        return self._owner[id(self.state_key(pair.B))] == self.rank

    def agree(self, votes: list[int]) -> list[int]:
        """Every rank's ``votes`` summed over the ranks (one all-reduce of a few integers; ``votes`` itself in a
        single process), so that all ranks take the same decision from the same numbers."""
        if self.world == 1:
            return votes
        import torch.distributed as dist

        counts = torch.tensor(votes, dtype=torch.int64, device=self._device)
        dist.all_reduce(counts, group=self.group)
        return counts.tolist()

    def gather(self, pairs: list[LoRAPair]) -> list[LoRAPair]:
        """The pairs to step, whole: DTensor factors gathered into full-size shadows (a collective, in the same
        order on every rank); the pairs themselves otherwise."""
        return self.dtensors.gather(pairs) if self.dtensors is not None else pairs

    def finish(self, stepped: list[LoRAPair]) -> None:
        """Give every rank the new factors of every stepped pair, then write DTensor shards back."""
        if self.world > 1:
            self._all_reduce_factors(stepped)
        if self.dtensors is not None:
            self.dtensors.scatter_back([self._pair_by_B[id(self.state_key(s.B))] for s in stepped])

    def _all_reduce_factors(self, pairs: list[LoRAPair]) -> None:
        """Owners contribute their new A and B, others zeros, and one all-reduce (sum) per dtype moves r (m + n)
        numbers per pair; x + 0 is exact, so all ranks end with bit-identical factors."""
        import torch.distributed as dist

        by_dtype: dict[torch.dtype, list[LoRAPair]] = {}
        for p in pairs:
            by_dtype.setdefault(p.A.dtype, []).append(p)
        for plist in by_dtype.values():
            tensors = [t for p in plist for t in (p.A, p.B)]
            flat = torch.cat([
                (t if self.owns(p) else torch.zeros_like(t)).reshape(-1) for p in plist for t in (p.A, p.B)
            ])
            dist.all_reduce(flat, group=self.group)
            offset = 0
            for t in tensors:
                n = t.numel()
                t.copy_(flat[offset : offset + n].view_as(t))
                offset += n
