"""This process's place in a ``torchrun`` launch, and the few collectives the training loop needs."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from ..sharding import default_process_group, resolve_process_group
from .config import TrainConfig
from .errors import UserError

T = TypeVar("T")


@dataclass
class Ranks:
    """This process's place in a ``torchrun`` launch (``world == 1``: a single process, no process group).

    Batch semantics: ``batch_size`` is the global micro-batch; rank ``r`` of ``W`` trains on the ``r``-th of
    ``W`` contiguous equal slices of it, and DDP averages the gradients, so a step sees the same examples and
    (up to float rounding) the same gradient as a single process with the same ``batch_size``.
    """

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # we initialised the default process group, so we destroy it
    group: Any = None  # the launch's process group (the default one); None in a single process

    @classmethod
    def launch(cls, cfg: TrainConfig, device: torch.device) -> Ranks:
        """Join the ``torchrun`` launch described by the environment (or an already initialised default group)."""
        import torch.distributed as dist

        initialised = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size() if initialised else int(os.environ.get("WORLD_SIZE") or 1)
        if world <= 1:
            return cls(device=device)
        if not dist.is_available():
            raise UserError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        if cfg.batch_size % world:
            raise UserError(
                f"--batch-size {cfg.batch_size} is the global batch, split over {world} processes: "
                f"it must be divisible by {world}"
            )
        if device.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK") or 0)
            if local >= torch.cuda.device_count():
                raise UserError(f"LOCAL_RANK {local}: this machine has only {torch.cuda.device_count()} CUDA devices")
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        if not initialised:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        group, rank, world = resolve_process_group(default_process_group())
        return cls(rank=rank, world=world, device=device, owns_group=not initialised, group=group)

    def close(self) -> None:
        import torch.distributed as dist

        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False

    def agree(self, check: Callable[[], T]) -> T:
        """``check()`` on every rank, one decision for all: if it raises a :class:`UserError` on any rank, every
        rank raises the lowest such rank's error; otherwise each returns its own result.

        A collective: no rank returns before every rank has finished its ``check``.
        """
        problem = None
        try:
            result = check()
        except UserError as e:
            problem, result = str(e), None
        if self.world > 1:
            import torch.distributed as dist

            problems: list[str | None] = [None] * self.world
            dist.all_gather_object(problems, problem)
            problem = next((p for p in problems if p is not None), None)
        if problem is not None:
            raise UserError(problem)
        return result

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of ``values`` (float64 or int64, any device), as a new tensor on the CPU."""
        t = values.to(self.device, copy=True)
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t.cpu()

    def gather(self, values: list[float]) -> list[list[float]]:
        """Every rank's ``values`` (same length on each rank), indexed by rank; exact (x + 0 sums)."""
        t = torch.zeros(self.world, len(values), dtype=torch.float64)
        t[self.rank] = torch.tensor(values, dtype=torch.float64)
        return self.sum(t).tolist()

    def share(self, rows: list) -> list:
        """This rank's contiguous slice of a global micro-batch (its length is divisible by ``world``)."""
        k = len(rows) // self.world
        return rows[self.rank * k : (self.rank + 1) * k]

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` in DDP with several ranks (which starts every rank from rank 0's parameters); else as is."""
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def accumulating(self, net: torch.nn.Module, last: bool):
        """DDP's ``no_sync`` for every micro-batch but the last of a step (one gradient all-reduce per step)."""
        return net.no_sync() if self.world > 1 and not last else contextlib.nullcontext()

    def loss(self, net: torch.nn.Module, inputs: dict[str, torch.Tensor], task: str) -> torch.Tensor:
        """The micro-batch loss of this rank, weighted so that DDP's average over ranks is the global batch's loss.

        Classification: each rank has the same number of examples, so the mean of the per-rank means is the
        global mean. Causal LM: the model's loss is a mean over this rank's completion tokens; scaled by
        ``world * n_rank / n_global`` the DDP average is the mean over all the batch's completion tokens, as in
        a single process.
        """
        out = net(**inputs)
        if self.world == 1 or task == "classification":
            return out.loss
        n = int((inputs["labels"][:, 1:] != -100).sum())  # the tokens the shifted causal LM loss counts
        total = int(self.sum(torch.tensor([n], dtype=torch.int64)).item())
        if n == 0:  # no loss tokens here (mean of nothing is NaN); a zero that still reaches every parameter
            return out.logits.sum() * 0.0
        return out.loss * (self.world * n / total)
