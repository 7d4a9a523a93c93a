r"""LoRA-Pro optimizers: :class:`LoRAProSGD` (Algorithm 1) and :class:`LoRAProAdamW` (Algorithm 2).

Both are ordinary :class:`torch.optim.Optimizer` subclasses. Their ``param_groups`` hold every trainable
tensor (the LoRA factors and everything else), so LR schedulers, ``zero_grad``, gradient clipping and
``GradScaler`` work as with any optimizer. State is keyed by parameter tensors: a pair's full-size Adam
moments live in ``state[B]`` (``B`` is ``m x r`` and the moments are ``m x n``: the same rows). Tensors that
belong to no pair are trained with plain AdamW (or SGD) in the same step.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.optim.adam import adam as _functional_adam
from torch.optim.optimizer import Optimizer, _get_scalar_dtype

from ._dtensor import DTensorPairs, is_dtensor
from .functional import X_MODES, adjusted_lora_gradients, compute_dtype, lora_factors
from .pairs import LoRAPair, find_lora_pairs, split_trainable

__all__ = ["MOMENT_MODES", "LoRAProAdamW", "LoRAProSGD"]

MOMENT_MODES = ("full", "bf16", "factored", "efficient")
# The modes whose Adam pass ``fused=True`` compiles into one loop. Not bf16: inductor's CPU code moves the
# stochastic rounding's bit casts through memory element by element, and that compiled pass was slower than
# the unfused one in a one-block timing here.
FUSED_MOMENT_MODES = ("full",)

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


def _describe(t: Tensor, pairs: Sequence[LoRAPair]) -> str:
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
                f"{_describe(t, pairs)} is given twice (e.g. as a factor of a pair and again on its own); "
                "every tensor may appear once, or it would be stepped twice per step"
            )
        seen.add(id(t))


def _resolve_params(params: ParamsLike) -> tuple[list[dict[str, Any]], list[LoRAPair]]:
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


def _check_nonneg(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"Invalid {name}: {value!r} (expected a finite number >= 0)")


def _check_x_mode(x_mode: Any) -> None:
    if x_mode not in X_MODES:
        raise ValueError(f"Invalid x_mode: {x_mode!r} (expected one of {', '.join(X_MODES)})")


class _PairBatch(NamedTuple):
    """The matrix views of several pairs of one shape, stacked, in the compute dtype."""

    A: Tensor  # (L, r, n)
    B: Tensor  # (L, m, r)
    gA: Tensor
    gB: Tensor
    scale: Tensor  # (L,)


def _stack_pairs(pairs: Sequence[LoRAPair]) -> _PairBatch:
    ct = compute_dtype(pairs[0].A.dtype)

    def grad_or_zeros(t: Tensor) -> Tensor:
        return t.grad if t.grad is not None else torch.zeros_like(t)

    A = torch.stack([p.A_matrix() for p in pairs]).to(ct)
    B = torch.stack([p.B_matrix() for p in pairs]).to(ct)
    gA = torch.stack([p.A_matrix(grad_or_zeros(p.A)) for p in pairs]).to(ct)
    gB = torch.stack([p.B_matrix(grad_or_zeros(p.B)) for p in pairs]).to(ct)
    return _PairBatch(A, B, gA, gB, _scales(tuple(p.scale for p in pairs), ct, A.device))


@functools.lru_cache(maxsize=256)
def _scales(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """The scales as a tensor on ``device``, made once: a host-to-device copy every step would make the host
    wait for the device (never written to)."""
    return torch.tensor(values, dtype=dtype, device=device)


# Twice the rank-sized (L, r, m + n) stacks of a bucket a step keeps alive at once (8, measured with the
# allocator's events: the stacked factors and gradients, the adjusted gradients, the products' temporaries).
_LIVE_STACKS = 16
# Buckets of small layers may stack this much regardless of their m x n (their batching is what makes them fast).
_MIN_STACK_ELEMENTS = 1 << 21


def _bucket_pairs(pairs: Iterable[LoRAPair]) -> list[list[LoRAPair]]:
    """Group pairs whose matrix views share shape, dtype and device, so their r x r algebra is batched; split
    a group into chunks whose rank-sized stacks stay within half an m x n matrix (measured: the constant below
    is twice the stacks alive at the peak), so the step's transient memory does not grow with the number of
    layers."""
    buckets: dict[tuple[Any, ...], list[LoRAPair]] = {}
    for p in pairs:
        buckets.setdefault((p.rank, *p.shape, p.A.dtype, p.A.device), []).append(p)
    out = []
    for (r, m, n, *_), bucket in buckets.items():
        per_layer = _LIVE_STACKS * max(r, 1) * (m + n)
        size = max(1, max(m * n, _MIN_STACK_ELEMENTS) // per_layer)
        out += [bucket[i : i + size] for i in range(0, len(bucket), size)]
    return out


def _apply_update(pairs: Sequence[LoRAPair], batch: _PairBatch, a: Tensor, b: Tensor, lr: float, wd: float) -> None:
    """``A <- A (1 - lr wd) - lr a`` and likewise for ``B``, computed in the compute dtype, rounded once."""
    decay = 1.0 - lr * wd
    new_A = batch.A.mul(decay).sub_(a, alpha=lr)
    new_B = batch.B.mul(decay).sub_(b, alpha=lr)
    # (the sources reshaped, not the parameters: a non-contiguous parameter's reshape could be a copy)
    torch._foreach_copy_([p.A for p in pairs], [x.reshape(p.A.shape) for x, p in zip(new_A.unbind(0), pairs)])
    torch._foreach_copy_([p.B for p in pairs], [x.reshape(p.B.shape) for x, p in zip(new_B.unbind(0), pairs)])


# On CPU the m x n work of a layer runs over blocks of rows: on one thread blocks of this many elements, so each
# block's G and U stay in cache between the product that makes them and the products that consume them, and
# only M and V travel to and from memory (once each). With T threads every op of a block is split T ways, and
# per-op parallel overhead (the thin products B^T U and U A^T above all) outweighs the cache: blocks grow as
# T^2 (measured on a 2-core machine with benchmarks/block_size.py: at two threads blocks 4x larger made the
# step 8-22% faster, at one thread 13-20% slower). The workspace bound below caps them in any case.
_CPU_BLOCK_ELEMENTS = 1 << 19


def _cpu_block_elements() -> int:
    return _CPU_BLOCK_ELEMENTS * torch.get_num_threads() ** 2


# Block-sized buffers the Adam pass needs per moment mode, in units of one block of float32 (see _Workspace):
# the G/U buffer; bf16 adds float32 copies of M and V and two blocks of int32 random bits; factored adds V.
_WORKSPACE_BLOCKS = {"full": 1, "bf16": 5, "factored": 2}


def _block_rows(m: int, n: int, device: torch.device, moments: str) -> int:
    """Rows per block of the Adam pass: never more than keep the whole workspace within half an m x n
    float32 matrix per shape (the rank-sized stacks of :func:`_bucket_pairs` take at most the other half);
    on accelerators that many (two blocks for the default moments), on CPU at most
    :func:`_cpu_block_elements` per block."""
    within = max(1, m // (2 * _WORKSPACE_BLOCKS[moments]))
    if device.type == "cpu":
        return max(1, min(within, _cpu_block_elements() // n))
    return within


# On accelerators, the elements one chunk of small layers may hold, per buffer (see _layers_per_chunk).
_ACCEL_CHUNK_ELEMENTS = 1 << 21


def _layers_per_chunk(m: int, n: int, device: torch.device) -> int:
    """How many layers of one m x n shape the Adam pass of the default moments takes at once: as many as fit in
    one block (:func:`_cpu_block_elements` on CPU, :data:`_ACCEL_CHUNK_ELEMENTS` elsewhere). Small layers then
    cost one batched product and one foreach call per pass for the chunk instead of an op per layer (the host
    time per op, not the arithmetic, is what a step of many small layers spends). 1: one layer at a time."""
    budget = _cpu_block_elements() if device.type == "cpu" else _ACCEL_CHUNK_ELEMENTS
    return max(1, budget // max(1, m * n))


class _Workspace:
    """Block-sized buffers for the Adam pass, allocated once per shape and step (never per layer)."""

    def __init__(self, rows: int, n: int, dtype: torch.dtype, device: torch.device, moments: str) -> None:
        def buf() -> Tensor:
            return torch.empty(rows, n, dtype=dtype, device=device)

        self.rows = rows
        self.work = buf()
        self.M = buf() if moments == "bf16" else None  # float32 copies of bf16 moment blocks
        self.V = buf() if moments in ("bf16", "factored") else None
        self.col = torch.empty(n, dtype=dtype, device=device) if moments == "factored" else None
        # Random bits for stochastic rounding: drawing fresh bits for every m x n element costs more than the
        # whole step on a CPU, so each step draws one buffer of twice a block and every use takes a block-sized
        # window at a random offset (each element's bits stay uniform, so the rounding stays unbiased).
        self.noise = (
            torch.randint(0, 1 << 16, (2 * rows * n,), dtype=torch.int32, device=device) if moments == "bf16" else None
        )

    def noise_for(self, like: Tensor) -> Tensor:
        k = like.numel()
        offset = int(torch.randint(0, self.noise.numel() - k + 1, ()))
        return self.noise[offset : offset + k].view(like.shape)


def stochastic_round_to_bf16_(
    dst: Tensor, src: Tensor, noise: Tensor | None = None, scratch: Tensor | None = None
) -> None:
    """Round float32 ``src`` into bfloat16 ``dst`` stochastically: up with probability equal to the discarded
    fraction, so the stored value is unbiased (``E[dst] = src``) and small Adam updates are not lost.
    ``noise``: int32 values uniform in [0, 2^16) shaped like ``src`` (drawn here when not given);
    ``scratch``: a 4-byte buffer shaped like ``src`` to work in (allocated when not given)."""
    bits = (src if src.dtype == torch.float32 else src.float()).view(torch.int32)
    if noise is None:
        noise = torch.randint_like(bits, 0, 1 << 16)
    # (a float64 scratch holds twice the int32 elements needed: use its first half)
    out = None if scratch is None else scratch.view(torch.int32).view(-1)[: bits.numel()].view(bits.shape)
    dst.copy_(torch.add(bits, noise, out=out).bitwise_and_(-65536).view(torch.float32))


def _adam_block_(G: Tensor, M: Tensor, V: Tensor, beta1: float, beta2: float, eps: float) -> None:
    """One block of the Adam pass in place, the form :func:`torch.compile` fuses into one loop:
    ``M <- lerp(M, G, 1 - beta1)``, ``V <- beta2 V + (1 - beta2) G^2``, ``G <- M / (sqrt(V) + eps)``."""
    M.lerp_(G, 1.0 - beta1)
    V.mul_(beta2).addcmul_(G, G, value=1.0 - beta2)
    G.copy_(M / (V.sqrt() + eps))


@functools.cache
def _compiled(fn: Callable[..., None]) -> Callable[..., None]:
    """``fn`` compiled once per process (dynamic shapes: the last block of a layer and each layer shape reuse
    the same kernel; the per-step ``eps`` is an argument, not a constant)."""
    return torch.compile(fn, dynamic=True, fullgraph=True)


def _adam_on_equivalent_gradient(
    left: Tensor, right: Tensor, B: Tensor, A: Tensor, state: dict[str, Tensor], ws: _Workspace,
    gA_out: Tensor, gB_out: Tensor, *, beta1: float, beta2: float, eps: float, fused: bool = False,
) -> None:
    """Steps 2-3 of Algorithm 2 for one layer, up to a constant factor, block by block over rows.

    ``G = left @ right`` (the equivalent gradient), ``M <- lerp(M, G, 1 - beta1)``,
    ``V <- beta2 V + (1 - beta2) G^2``, ``U' = M / (sqrt(V) + eps)``; writes ``gA_out = B^T U'`` (it must be
    zero on entry: blocks accumulate into it) and ``gB_out = U' A^T``. The moments are ``state``'s, stored as
    the ``moments`` option of :class:`LoRAProAdamW` says.
    """
    M = state["exp_avg"]
    m = M.shape[0]
    if "exp_avg_sq_row" in state:
        _factored_pass(left, right, B, A, state, ws, gA_out, gB_out, beta1=beta1, beta2=beta2, eps=eps)
        return
    V = state["exp_avg_sq"]
    low = M.dtype == torch.bfloat16
    for r0 in range(0, m, ws.rows):
        r1 = min(m, r0 + ws.rows)
        w = ws.work[: r1 - r0]
        G = torch.mm(left[r0:r1], right, out=w)
        if fused:  # one pass over the block instead of six; U is written over G
            _compiled(_adam_block_)(G, M[r0:r1], V[r0:r1], beta1, beta2, eps)
            U = G
        else:
            Mb, Vb = (ws.M[: r1 - r0].copy_(M[r0:r1]), ws.V[: r1 - r0].copy_(V[r0:r1])) if low else (M[r0:r1], V[r0:r1])
            Mb.lerp_(G, 1.0 - beta1)
            Vb.mul_(beta2).addcmul_(G, G, value=1.0 - beta2)
            if low:  # G is spent: its block is the rounding's scratch
                stochastic_round_to_bf16_(M[r0:r1], Mb, ws.noise_for(Mb), scratch=w)
                stochastic_round_to_bf16_(V[r0:r1], Vb, ws.noise_for(Vb), scratch=w)
            U = torch.div(Mb, torch.sqrt(Vb, out=w).add_(eps), out=w)
        gA_out.addmm_(B[r0:r1].mT, U)
        torch.mm(U, A.mT, out=gB_out[r0:r1])


def _adam_on_equivalent_gradients_chunk(
    left: Tensor, right: Tensor, B: Tensor, A: Tensor, states: Sequence[dict[str, Tensor]], work: Tensor,
    gA_out: Tensor, gB_out: Tensor, *, beta1: float, beta2: float, eps: float,
) -> None:
    """:func:`_adam_on_equivalent_gradient` for k small layers of one shape at once, default (fp32) moments, the
    same ``eps`` (step count) for all: stacked ``left``, ``right``, ``B``, ``A`` (k, ...); ``work`` is (2, k, m, n);
    ``gA_out``, ``gB_out`` (k, ...) are overwritten. The same elementwise ops as the one-layer pass, one foreach
    call (or one op on the contiguous chunk) each."""
    G = torch.bmm(left, right, out=work[0])
    D = work[1]
    Gs, Ds = list(G.unbind(0)), list(D.unbind(0))
    Ms = [state["exp_avg"] for state in states]
    Vs = [state["exp_avg_sq"] for state in states]
    torch._foreach_lerp_(Ms, Gs, 1.0 - beta1)
    torch._foreach_mul_(Vs, beta2)
    torch._foreach_addcmul_(Vs, Gs, Gs, value=1.0 - beta2)
    torch._foreach_copy_(Ds, Vs)
    torch._foreach_copy_(Gs, Ms)  # G is spent: U = M / (sqrt(V) + eps) is built in its place
    G.div_(D.sqrt_().add_(eps))
    torch.bmm(B.mT, G, out=gA_out)
    torch.bmm(G, A.mT, out=gB_out)


def _factored_pass(
    left: Tensor, right: Tensor, B: Tensor, A: Tensor, state: dict[str, Tensor], ws: _Workspace,
    gA_out: Tensor, gB_out: Tensor, *, beta1: float, beta2: float, eps: float,
) -> None:
    """Adafactor's second moment: running means of ``G^2`` per row (``R``) and per column (``C``), and
    ``V_ij = R_i C_j / mean(R)``. The column means need every row, so ``M`` is visited twice."""
    M, R, C = state["exp_avg"], state["exp_avg_sq_row"], state["exp_avg_sq_col"]
    m, n = M.shape
    col = ws.col.zero_()
    for r0 in range(0, m, ws.rows):
        r1 = min(m, r0 + ws.rows)
        G = torch.mm(left[r0:r1], right, out=ws.work[: r1 - r0])
        M[r0:r1].lerp_(G, 1.0 - beta1)
        G2 = G.square_()
        R[r0:r1].mul_(beta2).add_(G2.mean(dim=1), alpha=1.0 - beta2)
        col.add_(G2.sum(dim=0))
    C.mul_(beta2).add_(col, alpha=(1.0 - beta2) / m)
    inv_mean_R = R.mean().clamp_min(torch.finfo(R.dtype).tiny).reciprocal()  # a tensor: the host need not wait
    for r0 in range(0, m, ws.rows):
        r1 = min(m, r0 + ws.rows)
        w = ws.work[: r1 - r0]
        V = torch.outer(R[r0:r1], C, out=ws.V[: r1 - r0])
        U = torch.div(M[r0:r1], V.mul_(inv_mean_R).sqrt_().add_(eps), out=w)
        gA_out.addmm_(B[r0:r1].mT, U)
        torch.mm(U, A.mT, out=gB_out[r0:r1])


def _normalize_process_group(process_group: Any) -> tuple[Any, int, int]:
    """``None`` | ``ProcessGroup`` | 1-D ``DeviceMesh`` -> (group, rank in it, its size)."""
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


def _assign_owners(pairs: Sequence[LoRAPair], world: int) -> dict[int, int]:
    """Largest layers first, each to the rank with the least m * n so far (lowest rank on ties): the same
    answer on every rank, and per-rank moment memory close to 1/world of the total."""
    load = [0] * world
    owner: dict[int, int] = {}
    for i in sorted(range(len(pairs)), key=lambda i: (-math.prod(pairs[i].shape), i)):
        rank = min(range(world), key=lambda k: (load[k], k))
        owner[id(pairs[i].B)] = rank
        load[rank] += math.prod(pairs[i].shape)
    return owner


class _LoRAProOptimizer(Optimizer):
    """Shared machinery: parameter resolution, pair bookkeeping, the non-finite guard and loading."""

    def __init__(self, params: ParamsLike, defaults: dict[str, Any], process_group: Any = None) -> None:
        groups, pairs = _resolve_params(params)
        self._pairs: list[LoRAPair] = pairs
        self._pair_by_B: dict[int, LoRAPair] = {id(p.B): p for p in pairs}
        self._pair_A_ids: set[int] = {id(p.A) for p in pairs}
        self._dt: DTensorPairs | None = None
        if any(is_dtensor(t) for p in pairs for t in (p.A, p.B)):
            self._dt = DTensorPairs(pairs)
            self._group, self._rank, self._world = self._dt.group, self._dt.rank, self._dt.world
            if process_group is not None and _normalize_process_group(process_group)[2] != self._world:
                raise ValueError(
                    "process_group: the LoRA factors are DTensors on a device mesh of "
                    f"{self._world} ranks, and the state is sharded over that mesh; got a process group of another size"
                )
        else:
            self._group, self._rank, self._world = _normalize_process_group(process_group)
        self._owner = _assign_owners(pairs, self._world)  # id(B) -> the rank that keeps the pair's state
        self._comm_device = pairs[0].A.device  # where the per-step agreement's integers travel (CUDA for NCCL)
        super().__init__(groups, defaults)
        for group in self.param_groups:
            self._validate_group(group)

    @property
    def shard(self) -> tuple[int, int]:
        """``(rank, world_size)`` of the process group the state is sharded over; ``(0, 1)`` without one."""
        return self._rank, self._world

    def owns(self, pair: LoRAPair) -> bool:
        """Whether this rank keeps ``pair``'s optimizer state and computes its update (always, without a group)."""
        return self._owner[id(self._state_key(pair.B))] == self._rank

    def _state_key(self, t: Tensor) -> Tensor:
        """The parameter whose ``self.state`` entry belongs to ``t`` (``t`` itself, or the DTensor a full-size
        shadow stands for)."""
        return self._dt.real_of.get(id(t), t) if self._dt is not None else t

    def _validate_group(self, group: dict[str, Any]) -> None:
        _check_nonneg("learning rate", group["lr"])
        _check_nonneg("weight_decay", group["weight_decay"])
        _check_x_mode(group["x_mode"])

    @property
    def pairs(self) -> list[LoRAPair]:
        """The LoRA pairs this optimizer treats with LoRA-Pro, in the order of its ``param_groups``."""
        return list(self._pairs)

    def _split_group(self, group: dict[str, Any]) -> tuple[list[LoRAPair], list[Tensor]]:
        pairs: list[LoRAPair] = []
        others: list[Tensor] = []
        for p in group["params"]:
            if id(p) in self._pair_A_ids:
                continue
            pair = self._pair_by_B.get(id(p))
            if pair is not None:
                if pair.A.grad is not None or pair.B.grad is not None:
                    pairs.append(pair)  # all of them: _sync_pairs needs the same list on every rank
            elif p.grad is not None:
                others.append(p)
        return pairs, others

    def _params_with_labels(self) -> list[tuple[Tensor, str]]:
        params = [p for group in self.param_groups for p in group["params"]]
        return [(p, _describe(p, self._pairs)) for p in params]

    def _check_grads(self) -> bool:
        """Whether every gradient is finite; raises on a sparse gradient or, across ranks, on ranks that
        disagree about which tensors have a gradient.

        With a process group each rank contributes (its own non-finite flag, its sparse flag, which tensors
        have a gradient) to one all-reduce of a few integers, so every rank reaches the same decision: skip
        the step, raise the same error, or step the same list of layers. A rank deciding alone could step
        layers the others do not (their new factors summed into another rank's) or wait in a collective the
        others never enter.
        """
        labelled = self._params_with_labels()
        sparse = [label for p, label in labelled if p.grad is not None and p.grad.is_sparse]
        grads = [
            p.grad.to_local() if is_dtensor(p.grad) else p.grad
            for p, _ in labelled
            if p.grad is not None and not p.grad.is_sparse
        ]
        by_device: dict[torch.device, list[Tensor]] = {}
        for g in grads:
            if g.numel():
                by_device.setdefault(g.device, []).append(g)
        # One max-|g| per tensor (NaN and Inf propagate), a foreach call per device instead of two ops per tensor.
        flags = [torch.stack(torch._foreach_norm(gs, math.inf)).isfinite().all() for gs in by_device.values()]
        ok = not flags or bool(torch.stack([f.to(flags[0].device) for f in flags]).all())
        if self._world == 1:
            if sparse:
                raise RuntimeError(self._sparse_message(sparse[0]))
            return ok
        import torch.distributed as dist

        votes = [int(not ok), int(bool(sparse))] + [int(p.grad is not None) for p, _ in labelled]
        counts = torch.tensor(votes, dtype=torch.int64, device=self._comm_device)
        dist.all_reduce(counts, group=self._group)
        not_finite, with_sparse, *have_grad = counts.tolist()
        if with_sparse:
            raise RuntimeError(self._sparse_message(sparse[0] if sparse else "a tensor on another rank"))
        split = [(label, k) for (_, label), k in zip(labelled, have_grad) if 0 < k < self._world]
        if split:
            shown = ", ".join(f"{label} on {k} of {self._world} ranks" for label, k in split[:3])
            more = f" and {len(split) - 3} more" if len(split) > 3 else ""
            raise RuntimeError(
                f"{type(self).__name__}: the ranks disagree on which tensors have a gradient ({shown}{more} have one); "
                "the optimizer state is sharded over the ranks, so every rank must hold the same (averaged) "
                "gradients, as DDP and FSDP give them. Nothing was stepped. A layer that some ranks do not use "
                "still needs a gradient on every rank (e.g. DDP(find_unused_parameters=True), or add 0 * its "
                "output to the loss)"
            )
        return not_finite == 0

    def _sparse_message(self, label: str) -> str:
        return f"{type(self).__name__} does not support sparse gradients (got one for {label})"

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one optimization step.

        A step in which any gradient is non-finite changes nothing (parameters and state) and warns; this
        is what fp16 loss scaling relies on.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._check_grads():
            warnings.warn(
                f"{type(self).__name__}: a gradient is NaN or Inf; the step was skipped (parameters and state unchanged)",
                RuntimeWarning,
                stacklevel=2,
            )
            return loss
        stepped: list[LoRAPair] = []
        for group in self.param_groups:
            pairs, others = self._split_group(group)
            if self._dt is not None:
                pairs = self._dt.gather(pairs)  # full-size shadows, in the same order on every rank
            stepped += pairs
            for bucket in _bucket_pairs(p for p in pairs if self.owns(p)):
                self._step_pairs(group, bucket)
            if others:
                self._step_others(group, others)
        if self._world > 1:
            self._sync_pairs(stepped)
        for pair in self._pairs:
            # An entry (empty where this rank keeps nothing) for every factor: a state dict then names every
            # trainable parameter, as torch.distributed.checkpoint's strict loading expects.
            self.state[pair.A], self.state[pair.B]  # noqa: B018 (creates the defaultdict entries)
        if self._dt is not None:
            self._dt.scatter_back([self._real_pair(s) for s in stepped])
        return loss

    def _real_pair(self, shadow: LoRAPair) -> LoRAPair:
        return self._pair_by_B[id(self._state_key(shadow.B))]

    def _sync_pairs(self, pairs: list[LoRAPair]) -> None:
        """Give every rank the new A and B of every pair: owners contribute their values, others zeros, and
        one all-reduce (sum) per dtype moves r (m + n) numbers per pair; x + 0 is exact, so all ranks end with
        bit-identical factors."""
        import torch.distributed as dist

        by_dtype: dict[torch.dtype, list[LoRAPair]] = {}
        for p in pairs:
            by_dtype.setdefault(p.A.dtype, []).append(p)
        for plist in by_dtype.values():
            tensors = [t for p in plist for t in (p.A, p.B)]
            flat = torch.cat([
                (t if self.owns(p) else torch.zeros_like(t)).reshape(-1) for p in plist for t in (p.A, p.B)
            ])
            dist.all_reduce(flat, group=self._group)
            offset = 0
            for t in tensors:
                n = t.numel()
                t.copy_(flat[offset : offset + n].view_as(t))
                offset += n

    def _step_pairs(self, group: dict[str, Any], pairs: list[LoRAPair]) -> None:
        raise NotImplementedError

    def _step_others(self, group: dict[str, Any], params: list[Tensor]) -> None:
        raise NotImplementedError

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict; every tensor keeps the dtype it was saved with.

        ``torch.optim.Optimizer`` casts floating state to the parameter's dtype, which would round fp32
        moments of bf16/fp16 parameters; here the saved dtype is restored from the saved value itself.

        Raises:
            ValueError: if the state dict was saved by another optimizer (``torch.optim.AdamW``,
                :class:`LoRAProSGD` into :class:`LoRAProAdamW`, ...) or for other layers: the message says what
                it holds, and nothing is loaded.
        """
        self._check_loadable(state_dict)
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, param in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if not saved:
                continue
            for key, value in saved.items():
                if isinstance(value, Tensor) and key != "step":
                    loaded = self.state[param][key]
                    if loaded.dtype != value.dtype:
                        self.state[param][key] = value.to(device=param.device, copy=True)

    # Hyperparameters every group of this optimizer's state dicts has, and ones that only another optimizer's have.
    _GROUP_KEYS: tuple[str, ...] = ("lr", "weight_decay", "x_mode")
    _FOREIGN_GROUP_KEYS: tuple[str, ...] = ()

    def _expected_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        """The state keys (other than ``step``) a saved entry of ``param`` may hold, with their shapes."""
        return {}

    def _check_loadable(self, state_dict: Any) -> None:
        name = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
            raise ValueError(f"{name}: not an optimizer state dict (it needs 'state' and 'param_groups')")
        groups = state_dict["param_groups"]
        for i, g in enumerate(groups):
            missing = [k for k in self._GROUP_KEYS if k not in g]
            foreign = [k for k in self._FOREIGN_GROUP_KEYS if k in g]
            if missing or foreign:
                maker = (
                    "torch.optim.Adam/AdamW" if "amsgrad" in g else "LoRAProAdamW" if "moments" in g
                    else "LoRAProSGD" if "x_mode" in g else "another optimizer"
                )
                problem = f"lacks {', '.join(missing)}" if missing else f"has {', '.join(foreign)}"
                raise ValueError(
                    f"{name}: parameter group {i} of this state dict {problem}: it was saved by {maker}, not "
                    f"{type(self).__name__}; nothing was loaded"
                )
        if len(groups) != len(self.param_groups) or any(
            len(g["params"]) != len(mine["params"]) for g, mine in zip(groups, self.param_groups)
        ):
            return  # torch's own check names this mismatch
        for g, mine in zip(groups, self.param_groups):
            for saved_id, param in zip(g["params"], mine["params"]):
                saved = state_dict["state"].get(saved_id)
                if not saved:
                    continue
                expected = self._expected_state(param, g)
                found = {k: tuple(v.shape) for k, v in saved.items() if k != "step" and isinstance(v, Tensor)}
                if found != expected:
                    def show(d: dict[str, tuple[int, ...]]) -> str:
                        return ", ".join(f"{k} {list(v)}" for k, v in sorted(d.items())) or "nothing"

                    raise ValueError(
                        f"{name}: the saved state of {_describe(param, self._pairs)} holds {show(found)}, where "
                        f"{type(self).__name__} with these settings keeps {show(expected)}: the state dict was "
                        "saved by another optimizer, with other moments, or for another model; nothing was loaded"
                    )


class LoRAProSGD(_LoRAProOptimizer):
    r"""LoRA-Pro with plain SGD (the paper's Algorithm 1).

    For every adapted layer, with LoRA gradients ``g_A``, ``g_B`` and scale ``s``:

    .. math::
        a = \tfrac{1}{s^2}(B^\top B)^{-1} g_A + X A,\quad
        b = \tfrac{1}{s^2}(I - P_B)\, g_B (A A^\top)^{-1} - B X,\quad
        A \leftarrow A - \eta a,\quad B \leftarrow B - \eta b,

    so that ``W`` moves by ``-eta G`` with ``G`` the best rank-r (tangent-space) approximation of the full
    gradient. ``X`` solves the Sylvester equation of :func:`lorapro.functional.adjusted_lora_gradients`
    (``x_mode="sylvester"``) or is 0 (``"zero"``). Tensors outside pairs get plain SGD. ``weight_decay``
    is decoupled: every tensor is multiplied by ``1 - lr * weight_decay`` before its update.

    Args:
        params: a model (its LoRA pairs are found with :func:`lorapro.find_lora_pairs` and every other
            trainable parameter joins), or an iterable of :class:`LoRAPair` / ``(A, B, scale)`` / tensors,
            or a list of dicts (parameter groups) whose ``"params"`` is any of these.
        lr: learning rate.
        x_mode: ``"sylvester"`` (default) or ``"zero"``.
        weight_decay: decoupled weight decay.
        process_group: shard the per-layer work across ranks, as for :class:`LoRAProAdamW`.
    """

    def __init__(
        self,
        params: ParamsLike,
        lr: float,
        *,
        x_mode: str = "sylvester",
        weight_decay: float = 0.0,
        process_group: Any = None,
    ) -> None:
        _check_nonneg("learning rate", lr)
        _check_nonneg("weight_decay", weight_decay)
        _check_x_mode(x_mode)
        super().__init__(params, {"lr": lr, "x_mode": x_mode, "weight_decay": weight_decay}, process_group)

    _FOREIGN_GROUP_KEYS = ("betas", "moments")

    def _step_pairs(self, group: dict[str, Any], pairs: list[LoRAPair]) -> None:
        batch = _stack_pairs(pairs)
        a, b = adjusted_lora_gradients(batch.A, batch.B, batch.gA, batch.gB, batch.scale, x_mode=group["x_mode"])
        _apply_update(pairs, batch, a, b, group["lr"], group["weight_decay"])

    def _step_others(self, group: dict[str, Any], params: list[Tensor]) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        grads = [p.grad for p in params]
        if wd:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        torch._foreach_add_(params, grads, alpha=-lr)


class LoRAProAdamW(_LoRAProOptimizer):
    r"""LoRA-Pro with AdamW and full-size moments (the paper's Algorithm 2, its main method).

    Per adapted layer and step ``t``:

    1. ``(a, b)`` = closed form with ``X = 0``; ``G = s B a + s b A`` (the ``m x n`` equivalent gradient);
    2. ``M = b1 M + (1-b1) G``, ``V = b2 V + (1-b2) G*G``,
       ``U = (M / (1-b1^t)) / (sqrt(V / (1-b2^t)) + eps)``;
    3. ``g_A' = s B^T U``, ``g_B' = s U A^T``;
    4. ``(a', b')`` = closed form of ``(g_A', g_B')`` with the Sylvester ``X`` (or ``X = 0``);
    5. ``A <- A (1 - lr wd) - lr a'``, ``B <- B (1 - lr wd) - lr b'``.

    ``M`` and ``V`` are ``m x n`` (float32, or float64 for float64 parameters) and are stored as
    ``state[B]["exp_avg"]`` / ``state[B]["exp_avg_sq"]`` with ``state[B]["step"]``. ``moments`` trades that
    memory (8 bytes per adapted weight element) for approximations; the default is the paper's algorithm:

    * ``"full"``: float32 ``M`` and ``V`` (8 bytes per element);
    * ``"bf16"``: both stored in bfloat16 with stochastic rounding, all arithmetic in float32 (4 bytes);
    * ``"factored"``: ``M`` in float32, ``V`` as Adafactor's row and column statistics
      ``V_ij ~ R_i C_j / mean(R)`` with ``R`` and ``C`` the running means of ``G^2`` over columns and rows
      (``state[B]["exp_avg_sq_row"]`` / ``["exp_avg_sq_col"]``; 4 bytes + O(m + n));
    * ``"efficient"``: not Algorithm 2 but the cheaper variant of SPEC section 6: the adjusted ``(a, b)`` of
      step 1 (with ``x_mode``'s ``X``) fed to an ordinary AdamW with r-sized moments on ``A`` and ``B``.

    Tensors outside pairs
    (heads, biases, ``modules_to_save``) are trained with exactly :class:`torch.optim.AdamW` in the same
    step and with the same hyperparameters.

    Args:
        params: as for :class:`LoRAProSGD`.
        lr, betas, eps, weight_decay: as for :class:`torch.optim.AdamW` (weight decay is decoupled).
        x_mode: ``"sylvester"`` (default) or ``"zero"`` for step 4.
        moments: ``"full"`` (default), ``"bf16"``, ``"factored"`` or ``"efficient"`` (above).
        fused: for ``"full"`` moments, run each block's elementwise Adam arithmetic as one loop compiled by
            :func:`torch.compile` (C++ on CPU, Triton on GPU) instead of six PyTorch passes; the same
            arithmetic, up to float rounding. The first step pays the compilation (seconds
            to a minute; cached on disk afterwards) and needs a C++ compiler on CPU. Default ``False``.
        process_group: a ``ProcessGroup`` or 1-D ``DeviceMesh`` whose ranks hold the same parameters and
            the same (already averaged, e.g. by DDP) gradients. Each adapted layer then has one owner rank
            (largest layers first, to the least loaded rank) that keeps its m x n moments and computes its
            update; one all-reduce of r (m + n) numbers per layer gives every rank the new factors. Per-rank
            moment memory is about 1/world of the total. ``None``: single process.
    """

    def __init__(
        self,
        params: ParamsLike,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        x_mode: str = "sylvester",
        moments: str = "full",
        fused: bool = False,
        process_group: Any = None,
    ) -> None:
        _check_nonneg("learning rate", lr)
        _check_nonneg("weight_decay", weight_decay)
        _check_nonneg("epsilon value", eps)
        self._check_betas(betas)
        _check_x_mode(x_mode)
        self._check_moments(moments, fused)
        defaults = {
            "lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "x_mode": x_mode,
            "moments": moments, "fused": fused,
        }
        super().__init__(params, defaults, process_group)

    @staticmethod
    def _check_betas(betas: Any) -> None:
        ok = isinstance(betas, (tuple, list)) and len(betas) == 2
        ok = ok and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in betas)
        if not ok:
            raise ValueError(f"Invalid betas: {betas!r} (expected two numbers in [0, 1))")

    @staticmethod
    def _check_moments(moments: Any, fused: Any = False) -> None:
        if moments not in MOMENT_MODES:
            raise ValueError(f"Invalid moments: {moments!r} (expected one of {', '.join(MOMENT_MODES)})")
        if not isinstance(fused, bool):
            raise ValueError(f"Invalid fused: {fused!r} (expected True or False)")
        if fused and moments not in FUSED_MOMENT_MODES:
            modes = " or ".join(map(repr, FUSED_MOMENT_MODES))
            raise ValueError(f"fused=True is for moments {modes}, not {moments!r}")

    _GROUP_KEYS = ("lr", "betas", "eps", "weight_decay", "x_mode", "moments")

    def _expected_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        moments = group["moments"]
        if moments != "efficient" and id(param) in self._pair_A_ids:
            return {}  # a pair's moments live with its B
        pair = self._pair_by_B.get(id(param))
        if moments == "efficient" or pair is None:
            shape = tuple(param.shape)
            return {"exp_avg": shape, "exp_avg_sq": shape}
        m, n = pair.shape
        if moments == "factored":
            return {"exp_avg": (m, n), "exp_avg_sq_row": (m,), "exp_avg_sq_col": (n,)}
        return {"exp_avg": (m, n), "exp_avg_sq": (m, n)}

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        _check_nonneg("epsilon value", group["eps"])
        self._check_betas(group["betas"])
        self._check_moments(group["moments"], group.get("fused", False))

    def _pair_state(self, pair: LoRAPair, dtype: torch.dtype, moments: str) -> dict[str, Any]:
        state = self.state[self._state_key(pair.B)]
        if not state:
            m, n = pair.shape
            device = pair.B.device
            state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
            store = torch.bfloat16 if moments == "bf16" else dtype
            state["exp_avg"] = torch.zeros(m, n, dtype=store, device=device)
            if moments == "factored":
                state["exp_avg_sq_row"] = torch.zeros(m, dtype=dtype, device=device)
                state["exp_avg_sq_col"] = torch.zeros(n, dtype=dtype, device=device)
            else:
                state["exp_avg_sq"] = torch.zeros(m, n, dtype=store, device=device)
        return state

    def _step_pairs(self, group: dict[str, Any], pairs: list[LoRAPair]) -> None:
        beta1, beta2 = group["betas"]
        moments = group["moments"]
        batch = _stack_pairs(pairs)
        factors = lora_factors(batch.A, batch.B)
        if moments == "efficient":
            a, b = adjusted_lora_gradients(
                batch.A, batch.B, batch.gA, batch.gB, batch.scale, x_mode=group["x_mode"], factors=factors
            )
            params = [t for p in pairs for t in (p.A, p.B)]
            grads = [g for i, p in enumerate(pairs) for g in (a[i].reshape(p.A.shape), b[i].reshape(p.B.shape))]
            self._adamw(group, params, grads)
            return
        a, b = adjusted_lora_gradients(batch.A, batch.B, batch.gA, batch.gB, batch.scale, x_mode="zero", factors=factors)
        # G = s [B, b] @ [a; A]: one product of inner size 2r per layer, with s folded into the small factor.
        left = torch.cat([batch.B, b], dim=-1).mul_(batch.scale[:, None, None])
        right = torch.cat([a, batch.A], dim=-2)
        gA_adam = torch.zeros_like(batch.A)
        gB_adam = torch.empty_like(batch.B)
        m, n = pairs[0].shape
        fused = group.get("fused", False)  # state dicts saved before the option existed lack it
        states = [self._pair_state(pair, batch.A.dtype, moments) for pair in pairs]
        torch._foreach_add_([state["step"] for state in states], 1.0)
        steps = [float(state["step"]) for state in states]  # CPU tensors: no device wait
        one_step = len(set(steps)) == 1  # the usual case: one eps and one bias correction for the bucket
        chunk = _layers_per_chunk(m, n, batch.A.device) if moments == "full" and not fused else 1
        if chunk > 1 and one_step:  # several small layers per pass
            eps = group["eps"] * math.sqrt(1.0 - beta2 ** steps[0])
            chunk_work = torch.empty(2, min(chunk, len(pairs)), m, n, dtype=batch.A.dtype, device=batch.A.device)
            for i in range(0, len(pairs), chunk):
                j = min(len(pairs), i + chunk)
                _adam_on_equivalent_gradients_chunk(
                    left[i:j], right[i:j], batch.B[i:j], batch.A[i:j], states[i:j], chunk_work[:, : j - i],
                    gA_adam[i:j], gB_adam[i:j], beta1=beta1, beta2=beta2, eps=eps,
                )
        else:
            work = _Workspace(_block_rows(m, n, batch.A.device, moments), n, batch.A.dtype, batch.A.device, moments)
            for i, state in enumerate(states):
                bc2 = 1.0 - beta2 ** steps[i]
                _adam_on_equivalent_gradient(
                    left[i], right[i], batch.B[i], batch.A[i], state, work,
                    gA_adam[i], gB_adam[i], beta1=beta1, beta2=beta2, eps=group["eps"] * math.sqrt(bc2), fused=fused,
                )
        # U = (M / bc1) / (sqrt(V / bc2) + eps) = (sqrt(bc2) / bc1) * M / (sqrt(V) + eps sqrt(bc2)):
        # the constant and s are applied to the r-sized results, not to an m x n matrix; one op per bucket when
        # its layers share their step count, else per layer.
        if one_step:
            t = steps[0]
            c = batch.scale.mul(math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t))[:, None, None]
            gA_adam.mul_(c)
            gB_adam.mul_(c)
        else:
            for i, (pair, t) in enumerate(zip(pairs, steps)):
                c = pair.scale * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)  # a Python float: no device wait
                gA_adam[i].mul_(c)
                gB_adam[i].mul_(c)
        a, b = adjusted_lora_gradients(
            batch.A, batch.B, gA_adam, gB_adam, batch.scale, x_mode=group["x_mode"], factors=factors
        )
        _apply_update(pairs, batch, a, b, group["lr"], group["weight_decay"])

    def _step_others(self, group: dict[str, Any], params: list[Tensor]) -> None:
        self._adamw(group, params, [p.grad for p in params])

    def _adamw(self, group: dict[str, Any], params: list[Tensor], gradients: list[Tensor]) -> None:
        """``torch.optim.AdamW`` exactly for float32/float64 tensors, with the given gradients.

        fp16/bf16 tensors get float32 moments and float32 arithmetic, rounded once into the parameter: in
        fp16, AdamW's own arithmetic underflows (``eps = 1e-8`` is 0) and produces NaN.
        """
        beta1, beta2 = group["betas"]
        exp_avgs, exp_avg_sqs, steps, work, grads = [], [], [], [], []
        for p, g in zip(params, gradients):
            state = self.state[self._state_key(p)]
            wide = compute_dtype(p.dtype)
            if not state:
                state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
                state["exp_avg"] = torch.zeros_like(p, dtype=wide, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=wide, memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
            work.append(p if wide == p.dtype else p.to(wide))
            grads.append(g.to(wide))
        _functional_adam(
            work,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            has_complex=any(torch.is_complex(p) for p in params),
            decoupled_weight_decay=True,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )
        for p, w in zip(params, work):
            if w is not p:
                p.copy_(w)

