r"""How Algorithm 2's ``m x n`` Adam moments are stored, and the pass that updates them.

One storage object per choice, made once when the optimizer is built (:data:`STORAGES`):

* :class:`FP32Moments` (``"full"``): ``M`` and ``V`` in float32 (float64 for float64 factors), 8 bytes per
  adapted weight element: the paper's algorithm;
* :class:`BF16Moments` (``"bf16"``): both in bfloat16 with stochastic rounding, the arithmetic in float32
  (4 bytes);
* :class:`FactoredMoments` (``"factored"``): ``M`` in float32 and ``V`` as Adafactor's row and column
  statistics, ``V_ij ~ R_i C_j / mean(R)`` (4 bytes + O(m + n)).

Each creates all of its state when a layer is first stepped (:meth:`MomentStorage.init_state`) and walks the
layer's ``m x n`` work in blocks of rows (:meth:`MomentStorage.update_layer`): per block
``G = left @ right`` (the equivalent gradient), the moments' update, ``U = M / (sqrt(V) + eps)``, and the
products ``B^T U`` and ``U A^T`` accumulated into r-sized outputs, so no whole ``m x n`` temporary exists.

Block sizes (:func:`block_rows`, :func:`layers_per_chunk`): on CPU a block holds ``block_elements``
elements (default :func:`default_cpu_block_elements`), so its ``G`` and ``U`` stay in cache between the
product that makes them and the products that consume them and only ``M`` and ``V`` travel to memory; with
T threads every op of a block is split T ways and per-op overhead (the thin products above all) outweighs the
cache, so the default grows as T^2 (``benchmarks/block_size.py`` measures it). On any device the workspace
stays within half an ``m x n`` float32 matrix per shape.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "STORAGES",
    "BF16Moments",
    "FP32Moments",
    "FactoredMoments",
    "MomentStorage",
    "Workspace",
    "block_rows",
    "default_cpu_block_elements",
    "layers_per_chunk",
    "stochastic_round_to_bf16_",
]

# Elements per block on one CPU thread (see the module docstring).
CPU_BLOCK_ELEMENTS = 1 << 19
# On accelerators, the elements one chunk of small layers may hold, per buffer (see layers_per_chunk).
ACCEL_CHUNK_ELEMENTS = 1 << 21


def default_cpu_block_elements() -> int:
    """Elements per block of the Adam pass on CPU: cache-sized on one thread, T^2 that on T threads."""
    return CPU_BLOCK_ELEMENTS * torch.get_num_threads() ** 2


def block_rows(m: int, n: int, device: torch.device, workspace_blocks: int, block_elements: int | None = None) -> int:
    """Rows per block of the Adam pass: never more than keep the whole workspace (``workspace_blocks``
    float32 blocks) within half an m x n matrix per shape (the rank-sized stacks of a bucket take at most the
    other half); on CPU at most ``block_elements`` per block (default :func:`default_cpu_block_elements`), on
    accelerators that bound only unless ``block_elements`` is given."""
    within = max(1, m // (2 * workspace_blocks))
    if block_elements is None and device.type == "cpu":
        block_elements = default_cpu_block_elements()
    if block_elements is None:
        return within
    return max(1, min(within, block_elements // n))


def layers_per_chunk(m: int, n: int, device: torch.device, block_elements: int | None = None) -> int:
    """How many layers of one m x n shape the float32 Adam pass takes at once: as many as fit in one block
    (``block_elements``; default :func:`default_cpu_block_elements` on CPU, :data:`ACCEL_CHUNK_ELEMENTS`
    elsewhere). Small layers then cost one batched product and one foreach call per pass for the chunk instead
    of an op per layer (the host time per op, not the arithmetic, is what a step of many small layers spends)."""
    if block_elements is None:
        block_elements = default_cpu_block_elements() if device.type == "cpu" else ACCEL_CHUNK_ELEMENTS
    return max(1, block_elements // max(1, m * n))


class Workspace:
    """Block-sized buffers for one shape's Adam pass, allocated once per shape and step (never per layer).

    ``work`` holds each block's ``G`` and then its ``U``; the other buffers are those a storage asks for.
    """

    def __init__(
        self, rows: int, n: int, dtype: torch.dtype, device: torch.device, *, moments_copies: bool = False,
        second_moment: bool = False, column: bool = False, noise: bool = False,
    ) -> None:
        def buf() -> Tensor:
            return torch.empty(rows, n, dtype=dtype, device=device)

        self.rows = rows
        self.work = buf()
        self.M = buf() if moments_copies else None  # float32 copies of low-precision moment blocks
        self.V = buf() if moments_copies or second_moment else None
        self.col = torch.empty(n, dtype=dtype, device=device) if column else None
        # Random bits for stochastic rounding: drawing fresh bits for every m x n element costs more than the
        # whole step on a CPU, so each step draws one buffer of twice a block and every use takes a block-sized
        # window at a random offset (each element's bits stay uniform, so the rounding stays unbiased).
        self.noise = torch.randint(0, 1 << 16, (2 * rows * n,), dtype=torch.int32, device=device) if noise else None

    def buffers(self) -> list[Tensor]:
        return [t for t in (self.work, self.M, self.V, self.col, self.noise) if t is not None]

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


class MomentStorage:
    """How one layer's ``m x n`` moments are kept and updated. Subclasses set the class attributes and
    implement :meth:`init_state`, :meth:`workspace` and :meth:`update_layer`."""

    name: str = ""
    # Block-sized float buffers the pass needs (bounds the block rows, see block_rows).
    workspace_blocks: int = 1
    # Whether fused=True (the torch.compile'd block) applies.
    fusable: bool = False
    # Whether several small layers can go through one pass together (update_chunk).
    chunkable: bool = False

    def state_shapes(self, m: int, n: int) -> dict[str, tuple[int, ...]]:
        """The state entries of one ``m x n`` layer (besides ``step``), with their shapes."""
        return {"exp_avg": (m, n), "exp_avg_sq": (m, n)}

    def init_state(self, m: int, n: int, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
        raise NotImplementedError

    def workspace(self, rows: int, n: int, dtype: torch.dtype, device: torch.device) -> Workspace:
        raise NotImplementedError

    def update_layer(
        self, left: Tensor, right: Tensor, B: Tensor, A: Tensor, state: dict[str, Tensor], ws: Workspace,
        gA_out: Tensor, gB_out: Tensor, *, beta1: float, beta2: float, eps: float, fused: bool = False,
    ) -> None:
        """Steps 2-3 of Algorithm 2 for one layer, up to a constant factor, block by block over rows.

        ``G = left @ right`` (the equivalent gradient), ``M <- lerp(M, G, 1 - beta1)``,
        ``V <- beta2 V + (1 - beta2) G^2``, ``U' = M / (sqrt(V) + eps)``; writes ``gA_out = B^T U'`` (it must
        be zero on entry: blocks accumulate into it) and ``gB_out = U' A^T``.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FP32Moments(MomentStorage):
    """``M`` and ``V`` in the compute dtype (float32, or float64 for float64 factors)."""

    name = "full"
    workspace_blocks = 1
    fusable = True
    chunkable = True

    def init_state(self, m: int, n: int, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
        return {
            "exp_avg": torch.zeros(m, n, dtype=dtype, device=device),
            "exp_avg_sq": torch.zeros(m, n, dtype=dtype, device=device),
        }

    def workspace(self, rows: int, n: int, dtype: torch.dtype, device: torch.device) -> Workspace:
        return Workspace(rows, n, dtype, device)

    def update_layer(
        self, left: Tensor, right: Tensor, B: Tensor, A: Tensor, state: dict[str, Tensor], ws: Workspace,
        gA_out: Tensor, gB_out: Tensor, *, beta1: float, beta2: float, eps: float, fused: bool = False,
    ) -> None:
        M, V = state["exp_avg"], state["exp_avg_sq"]
        m = M.shape[0]
        for r0 in range(0, m, ws.rows):
            r1 = min(m, r0 + ws.rows)
            w = ws.work[: r1 - r0]
            G = torch.mm(left[r0:r1], right, out=w)
            if fused:  # one pass over the block instead of six; U is written over G
                _compiled(_adam_block_)(G, M[r0:r1], V[r0:r1], beta1, beta2, eps)
                U = G
            else:
                Mb, Vb = M[r0:r1], V[r0:r1]
                Mb.lerp_(G, 1.0 - beta1)
                Vb.mul_(beta2).addcmul_(G, G, value=1.0 - beta2)
                U = torch.div(Mb, torch.sqrt(Vb, out=w).add_(eps), out=w)
            gA_out.addmm_(B[r0:r1].mT, U)
            torch.mm(U, A.mT, out=gB_out[r0:r1])

    def update_chunk(
        self, left: Tensor, right: Tensor, B: Tensor, A: Tensor, states: Sequence[dict[str, Tensor]], work: Tensor,
        gA_out: Tensor, gB_out: Tensor, *, beta1: float, beta2: float, eps: float,
    ) -> None:
        """:meth:`update_layer` for k small layers of one shape at once, with the same ``eps`` (step count):
        stacked ``left``, ``right``, ``B``, ``A`` (k, ...); ``work`` is (2, k, m, n); ``gA_out``, ``gB_out``
        (k, ...) are overwritten. The same elementwise ops, one foreach call (or one op on the chunk) each."""
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


class BF16Moments(MomentStorage):
    """``M`` and ``V`` stored in bfloat16, each block copied to float32 for the arithmetic and rounded back
    stochastically (:func:`stochastic_round_to_bf16_`). Not fusable: inductor's CPU code moves the rounding's
    bit casts through memory element by element, slower than the unfused pass."""

    name = "bf16"
    workspace_blocks = 5  # G/U, float32 copies of M and V, two blocks of int32 random bits

    def init_state(self, m: int, n: int, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
        return {
            "exp_avg": torch.zeros(m, n, dtype=torch.bfloat16, device=device),
            "exp_avg_sq": torch.zeros(m, n, dtype=torch.bfloat16, device=device),
        }

    def workspace(self, rows: int, n: int, dtype: torch.dtype, device: torch.device) -> Workspace:
        return Workspace(rows, n, dtype, device, moments_copies=True, noise=True)

    def update_layer(
        self, left: Tensor, right: Tensor, B: Tensor, A: Tensor, state: dict[str, Tensor], ws: Workspace,
        gA_out: Tensor, gB_out: Tensor, *, beta1: float, beta2: float, eps: float, fused: bool = False,
    ) -> None:
        M, V = state["exp_avg"], state["exp_avg_sq"]
        m = M.shape[0]
        for r0 in range(0, m, ws.rows):
            r1 = min(m, r0 + ws.rows)
            w = ws.work[: r1 - r0]
            G = torch.mm(left[r0:r1], right, out=w)
            Mb, Vb = ws.M[: r1 - r0].copy_(M[r0:r1]), ws.V[: r1 - r0].copy_(V[r0:r1])
            Mb.lerp_(G, 1.0 - beta1)
            Vb.mul_(beta2).addcmul_(G, G, value=1.0 - beta2)
            # G is spent: its block is the rounding's scratch
            stochastic_round_to_bf16_(M[r0:r1], Mb, ws.noise_for(Mb), scratch=w)
            stochastic_round_to_bf16_(V[r0:r1], Vb, ws.noise_for(Vb), scratch=w)
            U = torch.div(Mb, torch.sqrt(Vb, out=w).add_(eps), out=w)
            gA_out.addmm_(B[r0:r1].mT, U)
            torch.mm(U, A.mT, out=gB_out[r0:r1])


class FactoredMoments(MomentStorage):
    """``M`` in the compute dtype; ``V`` as Adafactor's running means of ``G^2`` per row (``R``) and per
    column (``C``), ``V_ij = R_i C_j / mean(R)``. The column means need every row, so ``M`` is visited twice."""

    name = "factored"
    workspace_blocks = 2  # G/U and the block of V

    def state_shapes(self, m: int, n: int) -> dict[str, tuple[int, ...]]:
        return {"exp_avg": (m, n), "exp_avg_sq_row": (m,), "exp_avg_sq_col": (n,)}

    def init_state(self, m: int, n: int, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
        return {
            "exp_avg": torch.zeros(m, n, dtype=dtype, device=device),
            "exp_avg_sq_row": torch.zeros(m, dtype=dtype, device=device),
            "exp_avg_sq_col": torch.zeros(n, dtype=dtype, device=device),
        }

    def workspace(self, rows: int, n: int, dtype: torch.dtype, device: torch.device) -> Workspace:
        return Workspace(rows, n, dtype, device, second_moment=True, column=True)

    def update_layer(
        self, left: Tensor, right: Tensor, B: Tensor, A: Tensor, state: dict[str, Tensor], ws: Workspace,
        gA_out: Tensor, gB_out: Tensor, *, beta1: float, beta2: float, eps: float, fused: bool = False,
    ) -> None:
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


STORAGES: dict[str, MomentStorage] = {s.name: s for s in (FP32Moments(), BF16Moments(), FactoredMoments())}
