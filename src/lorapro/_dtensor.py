"""LoRA factors that arrive as DTensors (FSDP2's ``fully_shard``), sharded on dim 0 of a 1-D device mesh.

LoRA-Pro needs a layer's whole ``A``, ``B`` and their gradients. They are LoRA-sized, so each step gathers
them into plain full-size "shadow" tensors (one all-gather per dtype, of every rank's local shards), the
optimizer works on the shadows exactly as in the replicated (DDP) case, and every rank copies its own rows of
the new factors back into its local shard. The m x n moments are never sharded by FSDP: they belong to the
owner rank of their layer, as with ``process_group=``.

FSDP2 shards dim 0 with ``torch.chunk``'s rule: ``ceil(rows / world)`` rows per rank, so ranks past the end
hold empty shards (always when ``r < world`` for ``A``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .pairs import LoRAPair


def is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def chunk_rows(rows: int, world: int, rank: int) -> tuple[int, int]:
    """``[start, stop)`` of the rows ``rank`` holds when ``rows`` are split by ``torch.chunk`` over ``world``."""
    size = -(-rows // world)
    start = min(rows, size * rank)
    return start, min(rows, start + size)


class DTensorPairs:
    """Gathers DTensor LoRA factors into full shadows and writes updated shadows back into the local shards."""

    def __init__(self, pairs: Sequence[LoRAPair]) -> None:
        from torch.distributed.tensor import Replicate, Shard

        mesh = pairs[0].A.device_mesh
        for p in pairs:
            for label, t in (("A", p.A), ("B", p.B)):
                if not is_dtensor(t):
                    raise ValueError(
                        f"{p.name or 'a LoRA pair'}: {label} is a plain tensor while other LoRA factors are DTensors; "
                        "shard all adapted layers with FSDP or none"
                    )
                if t.device_mesh != mesh:
                    raise ValueError(f"{p.name or 'a LoRA pair'}: {label} lives on another device mesh than the other factors")
                if t.device_mesh.ndim != 1:
                    raise ValueError(
                        f"{p.name or 'a LoRA pair'}: {label} is sharded over a {t.device_mesh.ndim}-D device mesh; "
                        "LoRA-Pro supports 1-D meshes (FSDP2 fully_shard over one dimension)"
                    )
                (pl,) = t.placements
                if not (isinstance(pl, Replicate) or (isinstance(pl, Shard) and pl.dim == 0)):
                    raise ValueError(
                        f"{p.name or 'a LoRA pair'}: {label} has placement {pl}; LoRA-Pro supports Shard(0) "
                        "(FSDP2's default) and Replicate"
                    )
        self.mesh = mesh
        self.group = mesh.get_group()
        self.rank = mesh.get_local_rank()
        self.world = mesh.size()
        self._shadows: dict[int, LoRAPair] = {}
        self.real_of: dict[int, Tensor] = {}  # id(shadow tensor) -> the parameter it stands for

    def _sharded(self, t: Tensor) -> bool:
        from torch.distributed.tensor import Shard

        return isinstance(t.placements[0], Shard)

    def _shard_numel(self, full: Tensor, rank: int) -> int:
        """How many elements of ``full`` (sharded on dim 0) ``rank`` holds."""
        start, stop = chunk_rows(full.shape[0], self.world, rank)
        return (stop - start) * math.prod(full.shape[1:])

    def shadow(self, pair: LoRAPair) -> LoRAPair:
        s = self._shadows.get(id(pair.B))
        if s is None:
            local = pair.A.to_local()

            def full(t: Tensor) -> Tensor:
                return torch.empty(t.shape, dtype=t.dtype, device=local.device)

            s = LoRAPair(
                full(pair.A), full(pair.B), pair.scale, name=pair.name, module=pair.module, adapter=pair.adapter,
                base_transposed=pair.base_transposed,
            )
            s.A.grad = torch.empty_like(s.A)
            s.B.grad = torch.empty_like(s.B)
            self._shadows[id(pair.B)] = s
            self.real_of[id(s.A)] = pair.A
            self.real_of[id(s.B)] = pair.B
        return s

    def gather(self, pairs: Sequence[LoRAPair]) -> list[LoRAPair]:
        """Full values and gradients of ``pairs``' factors in their shadows (every rank calls this alike)."""
        import torch.distributed as dist

        shadows = [self.shadow(p) for p in pairs]
        items: list[tuple[Tensor, Tensor]] = []  # (source DTensor or its grad, full destination)
        for p, s in zip(pairs, shadows):
            for src, dst in ((p.A, s.A), (p.B, s.B)):
                items.append((src, dst))
                if src.grad is None:
                    dst.grad.zero_()
                else:
                    items.append((src.grad, dst.grad))
        by_dtype: dict[torch.dtype, list[tuple[Tensor, Tensor]]] = {}
        for src, dst in items:
            if self._sharded(src):
                by_dtype.setdefault(src.dtype, []).append((src, dst))
            else:
                dst.copy_(src.to_local())
        for dtype, group_items in by_dtype.items():
            sizes = [sum(self._shard_numel(dst, k) for _, dst in group_items) for k in range(self.world)]
            device = group_items[0][1].device
            flat = torch.zeros(max(sizes), dtype=dtype, device=device)
            offset = 0
            for src, dst in group_items:
                local = src.to_local()
                start, stop = chunk_rows(dst.shape[0], self.world, self.rank)
                if tuple(local.shape) != (stop - start, *dst.shape[1:]):
                    raise RuntimeError(
                        f"a DTensor shard of shape {tuple(local.shape)} on rank {self.rank} is not torch.chunk's "
                        f"rows {start}:{stop} of {tuple(dst.shape)}"
                    )
                flat[offset : offset + local.numel()].copy_(local.reshape(-1))
                offset += local.numel()
            pieces = [torch.empty_like(flat) for _ in range(self.world)]
            dist.all_gather(pieces, flat, group=self.group)
            offsets = [0] * self.world
            for _, dst in group_items:
                for k in range(self.world):
                    start, stop = chunk_rows(dst.shape[0], self.world, k)
                    n = self._shard_numel(dst, k)
                    dst[start:stop].copy_(pieces[k][offsets[k] : offsets[k] + n].view_as(dst[start:stop]))
                    offsets[k] += n
        return shadows

    def scatter_back(self, pairs: Sequence[LoRAPair]) -> None:
        """Copy this rank's rows of every updated shadow into the pair's local shards (no communication)."""
        for p in pairs:
            s = self._shadows[id(p.B)]
            for real, full in ((p.A, s.A), (p.B, s.B)):
                local = real.to_local()
                if self._sharded(real):
                    start, stop = chunk_rows(full.shape[0], self.world, self.rank)
                    local.copy_(full[start:stop])
                else:
                    local.copy_(full)
