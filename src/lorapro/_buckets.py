"""Pairs grouped by shape into buckets whose r x r algebra is batched, stacked into matrices, and updated."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .functional import compute_dtype, scale_vector, separable_workspace_numel
from .pairs import LoRAPair

# Twice the rank-sized (L, r, m + n) stacks of a bucket a step keeps alive at once (8, measured with the
# allocator's events: the stacked factors and gradients, the adjusted gradients, the products' temporaries).
_LIVE_STACKS = 16
# Buckets of small layers may stack this much regardless of their m x n (their batching is what makes them fast).
_MIN_STACK_ELEMENTS = 1 << 21
# A separable preset's bucket: its scratch (stacks and temporaries, kept between steps) up to this many elements
# (64 MiB in float32). Its step has no m x n tensor to bound the bucket by, and a fixed cost per bucket that larger
# buckets share: about 140 ops and one batched eigendecomposition, 0.5-1 ms on a 2-core CPU
# (benchmarks/separable_overhead.py).
_SEPARABLE_SCRATCH_ELEMENTS = 1 << 24


class PairBatch(NamedTuple):
    """The matrix views of several pairs of one shape, stacked, in the compute dtype."""

    A: Tensor  # (L, r, n)
    B: Tensor  # (L, m, r)
    gA: Tensor
    gB: Tensor
    scale: Tensor  # (L,)


def stacked_numel(pairs: Sequence[LoRAPair]) -> int:
    """Elements of the four stacks :func:`stack_pairs` makes of ``pairs`` (one shape)."""
    (m, n), r = pairs[0].shape, pairs[0].rank
    return 2 * len(pairs) * r * (m + n)


def separable_scratch_numel(pairs: Sequence[LoRAPair], storage: Any) -> int:
    """Elements of the scratch a separable ``storage`` (:class:`lorapro.moments.Adafactor`) steps ``pairs`` (one
    bucket) in: the four stacks and the step's m- and n-sized temporaries."""
    (m, n), r = pairs[0].shape, pairs[0].rank
    return stacked_numel(pairs) + separable_workspace_numel(len(pairs), m, n, r, storage.momentum_rank * r)


def stack_pairs(pairs: Sequence[LoRAPair], out: Tensor | None = None) -> PairBatch:
    """The factors and gradients of ``pairs`` (one shape) as stacked matrices (copies, which the step may
    overwrite); a missing gradient is zero. ``out``: a flat buffer of :func:`stacked_numel` elements in the
    compute dtype to stack into (fp16/bf16 tensors are widened as they are copied in)."""
    ct = compute_dtype(pairs[0].A.dtype)
    (m, n), r, L = pairs[0].shape, pairs[0].rank, len(pairs)
    sizes, shapes = [L * r * n, L * m * r] * 2, [(L, r, n), (L, m, r)] * 2
    outs = list(out.split(sizes)) if out is not None else [None] * 4

    def grad_or_zeros(t: Tensor) -> Tensor:
        return t.grad if t.grad is not None else torch.zeros_like(t)

    def stack(tensors: list[Tensor], i: int) -> Tensor:
        if outs[i] is None:
            return torch.stack(tensors).to(ct)
        view = outs[i].view(shapes[i])
        if tensors[0].dtype == ct:
            return torch.stack(tensors, out=view)
        torch._foreach_copy_(list(view.unbind(0)), tensors)
        return view

    A = stack([p.A_matrix() for p in pairs], 0)
    B = stack([p.B_matrix() for p in pairs], 1)
    gA = stack([p.A_matrix(grad_or_zeros(p.A)) for p in pairs], 2)
    gB = stack([p.B_matrix(grad_or_zeros(p.B)) for p in pairs], 3)
    return PairBatch(A, B, gA, gB, scale_vector(tuple(p.scale for p in pairs), ct, A.device))


def bucket_pairs(pairs: Iterable[LoRAPair], storage: Any = None) -> list[list[LoRAPair]]:
    """Group pairs whose matrix views share shape, dtype and device, so their r x r algebra is batched; split
    a group into chunks whose rank-sized stacks stay within half an m x n matrix (measured: the constant above
    is twice the stacks alive at the peak), so the step's transient memory does not grow with the number of
    layers. For a separable ``storage`` (:class:`lorapro.moments.Adafactor`) the chunks' scratch
    (:func:`separable_scratch_numel`) stays within ``_SEPARABLE_SCRATCH_ELEMENTS`` instead."""
    buckets: dict[tuple[Any, ...], list[LoRAPair]] = {}
    for p in pairs:
        buckets.setdefault((p.rank, *p.shape, p.A.dtype, p.A.device), []).append(p)
    separable = getattr(storage, "separable", False)
    out = []
    for (r, m, n, *_), bucket in buckets.items():
        if separable:
            size = max(1, _SEPARABLE_SCRATCH_ELEMENTS // separable_scratch_numel(bucket[:1], storage))
        else:
            size = max(1, max(m * n, _MIN_STACK_ELEMENTS) // (_LIVE_STACKS * max(r, 1) * (m + n)))
        out += [bucket[i : i + size] for i in range(0, len(bucket), size)]
    return out


def apply_update(pairs: Sequence[LoRAPair], batch: PairBatch, a: Tensor, b: Tensor, lr: float, wd: float) -> None:
    """``A <- A (1 - lr wd) - lr a`` and likewise for ``B``, computed in the compute dtype, rounded once."""
    decay = 1.0 - lr * wd
    new_A, new_B = batch.A, batch.B  # updated in place: the stacks are the step's own copies
    if decay != 1.0:  # (a multiply by 1 is exact: skipping it changes no bit)
        new_A.mul_(decay)
        new_B.mul_(decay)
    new_A.sub_(a, alpha=lr)
    new_B.sub_(b, alpha=lr)
    # (the sources reshaped, not the parameters: a non-contiguous parameter's reshape could be a copy)
    torch._foreach_copy_([p.A for p in pairs], [x.reshape(p.A.shape) for x, p in zip(new_A.unbind(0), pairs)])
    torch._foreach_copy_([p.B for p in pairs], [x.reshape(p.B.shape) for x, p in zip(new_B.unbind(0), pairs)])
