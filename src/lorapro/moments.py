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
import math
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
        self.scratch: Tensor | None = None  # a float32 block to round or quantize in (SplitMoments)
        # 8-bit encoding (SplitMoments): int32 table cells, the float32 boundaries looked up, the bool comparison
        self.codes: Tensor | None = None
        self.bounds: Tensor | None = None
        self.mask: Tensor | None = None

    def buffers(self) -> list[Tensor]:
        extra = (self.scratch, self.codes, self.bounds, self.mask)
        return [t for t in (self.work, self.M, self.V, self.col, self.noise, *extra) if t is not None]

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
    # Whether the whole update is made from r-sized products (step_separable) instead of blocks of G.
    separable: bool = False
    # Whether it keeps a first moment (without one, U = G / (sqrt(V) + eps) and beta1 is not used).
    first_moment: bool = True

    def state_shapes(self, m: int, n: int, *, rank: int = 0) -> dict[str, tuple[int, ...]]:
        """The state entries of one ``m x n`` layer of LoRA rank ``rank`` (besides ``step``), with their shapes
        (``rank`` matters only to storages whose state is r-sized)."""
        return {"exp_avg": (m, n), "exp_avg_sq": (m, n)}

    def init_state(
        self, m: int, n: int, dtype: torch.dtype, device: torch.device, *, rank: int = 0
    ) -> dict[str, Tensor]:
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

    def step_separable(
        self, A: Tensor, B: Tensor, gA: Tensor, gB: Tensor, scale: Tensor, states: Sequence[dict[str, Tensor]],
        bias_correction2: float | Tensor, *, beta2: float, x_mode: str, beta1: float = 0.0,
        bias_correction1: float | Tensor = 1.0, workspace: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The whole direction of a bucket from r-sized products (storages with ``separable``), its m- and
        n-sized temporaries carved from ``workspace`` when given."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FP32Moments(MomentStorage):
    """``M`` and ``V`` in the compute dtype (float32, or float64 for float64 factors)."""

    name = "full"
    workspace_blocks = 1
    fusable = True
    chunkable = True

    def init_state(
        self, m: int, n: int, dtype: torch.dtype, device: torch.device, *, rank: int = 0
    ) -> dict[str, Tensor]:
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

    def init_state(
        self, m: int, n: int, dtype: torch.dtype, device: torch.device, *, rank: int = 0
    ) -> dict[str, Tensor]:
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

    def state_shapes(self, m: int, n: int, *, rank: int = 0) -> dict[str, tuple[int, ...]]:
        return {"exp_avg": (m, n), "exp_avg_sq_row": (m,), "exp_avg_sq_col": (n,)}

    def init_state(
        self, m: int, n: int, dtype: torch.dtype, device: torch.device, *, rank: int = 0
    ) -> dict[str, Tensor]:
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
        m = M.shape[0]
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


def dynamic_map(signed: bool) -> Tensor:
    """The 256 values of 8-bit dynamic quantization (Dettmers, "8-Bit Approximations for Parallelism in Deep
    Learning", 2016), the code bitsandbytes' and torchao's 8-bit optimizers store their moments in: after the
    sign (when ``signed``), a run of zero bits sets a power of ten from 1e-6 to 1 and the remaining bits a linear
    fraction in [0.1, 1]; plus 0 and 1. Small magnitudes keep relative precision, which a linear int8 code
    (absmax / 127) loses. Sorted ascending, float32; equal to ``bitsandbytes.functional.create_dynamic_map``
    (tests/test_lean_moments.py)."""
    values = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2 ** (e + (0 if signed else 1)) + 1, dtype=torch.float32)
        mids = (10 ** (e - 6)) * ((edges[:-1] + edges[1:]) / 2.0)
        values += mids.tolist() + ((-mids).tolist() if signed else [])
    return torch.tensor(sorted(values), dtype=torch.float32)


# Columns per quantization block of an 8-bit moment: each row is cut into chunks of this many (the last one
# shorter), one float32 absmax each (1/64 byte per element), so a block of rows quantizes on its own.
QUANT_BLOCK = 256
# The float32 bits that index the 8-bit encoder's lookup table (_Int8._table): sign, exponent, 7 mantissa bits.
_CELL_SHIFT = 15
_CELL_BITS = 32 - _CELL_SHIFT


class _Codec:
    """How one m x n moment is stored: its state entries, a block of rows loaded as float32 and stored back."""

    name = ""
    bytes_per_element = 4.0
    copies = True  # loading copies into a workspace buffer (False: the state itself is the float32 block)

    def init(self, key: str, m: int, n: int, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
        raise NotImplementedError

    def shapes(self, key: str, m: int, n: int) -> dict[str, tuple[int, ...]]:
        return {key: (m, n)}

    def load(self, state: dict[str, Tensor], key: str, r0: int, r1: int, buf: Tensor) -> Tensor:
        raise NotImplementedError

    def store(self, state: dict[str, Tensor], key: str, r0: int, r1: int, block: Tensor, ws: Workspace) -> None:
        pass


class _FP32(_Codec):
    name = "fp32"
    copies = False

    def init(self, key: str, m: int, n: int, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
        return {key: torch.zeros(m, n, dtype=dtype, device=device)}

    def load(self, state: dict[str, Tensor], key: str, r0: int, r1: int, buf: Tensor) -> Tensor:
        return state[key][r0:r1]


class _BF16(_Codec):
    name = "bf16"
    bytes_per_element = 2.0

    def init(self, key: str, m: int, n: int, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
        return {key: torch.zeros(m, n, dtype=torch.bfloat16, device=device)}

    def load(self, state: dict[str, Tensor], key: str, r0: int, r1: int, buf: Tensor) -> Tensor:
        return buf.copy_(state[key][r0:r1])

    def store(self, state: dict[str, Tensor], key: str, r0: int, r1: int, block: Tensor, ws: Workspace) -> None:
        stochastic_round_to_bf16_(state[key][r0:r1], block, ws.noise_for(block), scratch=ws.scratch[: r1 - r0])


class _Int8(_Codec):
    """Blockwise 8-bit dynamic quantization: ``key`` holds uint8 codes into :func:`dynamic_map`, ``key +
    "_absmax"`` the float32 absmax of every :data:`QUANT_BLOCK` columns of a row; rounding to the nearest code."""

    bytes_per_element = 1.0 + 4.0 / QUANT_BLOCK

    def __init__(self, signed: bool) -> None:
        self.signed = signed
        self.name = "int8"
        self._maps: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}
        self._tables: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def _map(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """The code's values and the midpoints between neighbours (the rounding boundaries), on ``device``."""
        key = (dtype, device)
        if key not in self._maps:
            values = dynamic_map(self.signed).to(device=device, dtype=dtype)
            self._maps[key] = (values, (values[:-1] + values[1:]) / 2)
        return self._maps[key]

    def _table(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Nearest-code lookup for float32 input: bits 15..31 of a float32 (sign, exponent, top 7 mantissa bits)
        name a cell of relative width at most 2^-8, narrower than the gap between two neighbouring codes, so
        at most one rounding boundary lies in a cell. ``code[cell]`` is the code of the cell's smallest value,
        ``boundary[cell]`` that boundary (+inf when none), and ``code + (x > boundary)`` is what a binary
        search over the boundaries returns (ties to the lower code), in two gathers instead of eight
        data-dependent compares per element."""
        if device not in self._tables:
            _, mids = self._map(torch.float32, torch.device("cpu"))
            cell = torch.arange(1 << _CELL_BITS, dtype=torch.int64) << _CELL_SHIFT
            ends = torch.stack([cell, cell + (1 << _CELL_SHIFT) - 1]).to(torch.int32).view(torch.float32)
            lo, hi = torch.minimum(*ends), torch.maximum(*ends)  # NaN where a cell holds NaNs: code 0 for them
            lo, hi = (torch.nan_to_num(t, nan=0.0, posinf=1.0, neginf=-1.0).clamp(-1.0, 1.0) for t in (lo, hi))
            code_lo, code_hi = torch.bucketize(lo, mids), torch.bucketize(hi, mids)
            assert int((code_hi - code_lo).max()) <= 1  # the table's premise
            boundary = torch.where(code_hi > code_lo, mids[code_lo.clamp_max(mids.numel() - 1)], math.inf)
            self._tables[device] = (code_lo.to(torch.uint8).to(device), boundary.to(device))
        return self._tables[device]

    def shapes(self, key: str, m: int, n: int) -> dict[str, tuple[int, ...]]:
        return {key: (m, n), f"{key}_absmax": (m, -(-n // QUANT_BLOCK))}

    def init(self, key: str, m: int, n: int, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
        # absmax 0 makes every code decode to 0, whatever the codes are
        return {
            key: torch.zeros(m, n, dtype=torch.uint8, device=device),
            f"{key}_absmax": torch.zeros(m, -(-n // QUANT_BLOCK), dtype=dtype, device=device),
        }

    @staticmethod
    def _chunks(t: Tensor) -> list[Tensor]:
        """``t`` (rows, n) as (rows, k, QUANT_BLOCK) and, when n is not a multiple, the (rows, 1, rest) tail."""
        n = t.shape[1]
        full = n - n % QUANT_BLOCK
        parts = [t[:, :full].unflatten(1, (full // QUANT_BLOCK, QUANT_BLOCK))] if full else []
        return parts + ([t[:, full:].unsqueeze(1)] if full < n else [])

    def load(self, state: dict[str, Tensor], key: str, r0: int, r1: int, buf: Tensor) -> Tensor:
        values, _ = self._map(buf.dtype, buf.device)
        codes = state[key][r0:r1]
        torch.index_select(values, 0, codes.reshape(-1).to(torch.int32), out=buf.view(-1))
        absmax = state[f"{key}_absmax"][r0:r1]
        k = 0
        for part in self._chunks(buf):
            part.mul_(absmax[:, k : k + part.shape[1], None])
            k += part.shape[1]
        return buf

    def store(self, state: dict[str, Tensor], key: str, r0: int, r1: int, block: Tensor, ws: Workspace) -> None:
        absmax = state[f"{key}_absmax"][r0:r1]
        scaled = ws.scratch[: r1 - r0]
        k = 0
        for part, out in zip(self._chunks(block), self._chunks(scaled)):
            # amax and amin: two vectorised passes, no |x| temporary (torch.aminmax is 15x slower on this CPU)
            a = torch.maximum(part.amax(dim=2), part.amin(dim=2).neg_()).clamp_min_(torch.finfo(block.dtype).tiny)
            absmax[:, k : k + part.shape[1]] = a
            torch.div(part, a[..., None], out=out)
            k += part.shape[1]
        codes = state[key][r0:r1]
        if scaled.dtype != torch.float32:
            _, mids = self._map(block.dtype, block.device)
            codes.copy_(torch.bucketize(scaled, mids, out_int32=True, out=ws.codes[: r1 - r0]))
            return
        code, boundary = self._table(block.device)
        cell = torch.bitwise_right_shift(scaled.view(torch.int32), _CELL_SHIFT, out=ws.codes[: r1 - r0])
        cell = cell.bitwise_and_((1 << _CELL_BITS) - 1).view(-1)
        torch.index_select(code, 0, cell, out=codes.view(-1))
        above = torch.index_select(boundary, 0, cell, out=ws.bounds[: r1 - r0].view(-1)).view_as(scaled)
        codes.add_(torch.gt(scaled, above, out=ws.mask[: r1 - r0]))


CODECS: dict[str, Callable[[bool], _Codec]] = {
    "fp32": lambda signed: _FP32(),
    "bf16": lambda signed: _BF16(),
    "int8": lambda signed: _Int8(signed),
}


class SplitMoments(MomentStorage):
    """First and second moment stored independently: ``first`` in fp32 / bf16 / int8 or ``None`` (beta1 = 0,
    ``U = G / (sqrt(V) + eps)``), ``second`` in fp32 / bf16 / int8 or ``"factored"`` (Adafactor's row and
    column statistics, as :class:`FactoredMoments`). Low-precision moments are loaded a block of rows at a time
    into float32, updated there and stored back (bf16 with stochastic rounding, int8 blockwise)."""

    def __init__(self, first: str | None, second: str) -> None:
        self.first = CODECS[first](True) if first is not None else None
        self.factored = second == "factored"
        self.second = None if self.factored else CODECS[second](False)
        self.first_moment = self.first is not None
        self.name = f"{first or 'none'}-{second}"
        # G/U, float32 copies of M and V, a float32 scratch; int8 adds int32 cells, float32 boundaries and a
        # bool mask (2.25 blocks), bf16 two blocks of random bits
        codecs = (self.first, self.second)
        int8, bf16 = (any(isinstance(c, kind) for c in codecs) for kind in (_Int8, _BF16))
        self.workspace_blocks = 4 + 3 * int8 + 2 * bf16

    def state_shapes(self, m: int, n: int, *, rank: int = 0) -> dict[str, tuple[int, ...]]:
        out = self.first.shapes("exp_avg", m, n) if self.first is not None else {}
        if self.factored:
            return {**out, "exp_avg_sq_row": (m,), "exp_avg_sq_col": (n,)}
        return {**out, **self.second.shapes("exp_avg_sq", m, n)}

    def bytes_per_element(self) -> float:
        """State bytes per adapted weight element, without the O(m + n) factored statistics."""
        return sum(c.bytes_per_element for c in (self.first, self.second) if c is not None)

    def init_state(
        self, m: int, n: int, dtype: torch.dtype, device: torch.device, *, rank: int = 0
    ) -> dict[str, Tensor]:
        out = self.first.init("exp_avg", m, n, dtype, device) if self.first is not None else {}
        if self.factored:
            out["exp_avg_sq_row"] = torch.zeros(m, dtype=dtype, device=device)
            out["exp_avg_sq_col"] = torch.zeros(n, dtype=dtype, device=device)
        else:
            out.update(self.second.init("exp_avg_sq", m, n, dtype, device))
        return out

    def workspace(self, rows: int, n: int, dtype: torch.dtype, device: torch.device) -> Workspace:
        ws = Workspace(
            rows, n, dtype, device, moments_copies=True, column=self.factored,
            noise=any(isinstance(c, _BF16) for c in (self.first, self.second)),
        )
        ws.scratch = torch.empty(rows, n, dtype=dtype, device=device)
        if any(isinstance(c, _Int8) for c in (self.first, self.second)):
            ws.codes = torch.empty(rows, n, dtype=torch.int32, device=device)
            ws.bounds = torch.empty(rows, n, dtype=dtype, device=device)
            ws.mask = torch.empty(rows, n, dtype=torch.bool, device=device)
        return ws

    def update_layer(
        self, left: Tensor, right: Tensor, B: Tensor, A: Tensor, state: dict[str, Tensor], ws: Workspace,
        gA_out: Tensor, gB_out: Tensor, *, beta1: float, beta2: float, eps: float, fused: bool = False,
    ) -> None:
        first, second = self.first, self.second
        m = left.shape[0]
        if self.factored:
            R, C = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            col = ws.col.zero_()
        for r0 in range(0, m, ws.rows):
            r1 = min(m, r0 + ws.rows)
            w = ws.work[: r1 - r0]
            G = torch.mm(left[r0:r1], right, out=w)
            if first is not None:
                Mb = first.load(state, "exp_avg", r0, r1, ws.M[: r1 - r0]).lerp_(G, 1.0 - beta1)
                first.store(state, "exp_avg", r0, r1, Mb, ws)
            if self.factored:
                G2 = torch.square(G, out=ws.scratch[: r1 - r0])
                R[r0:r1].mul_(beta2).add_(G2.mean(dim=1), alpha=1.0 - beta2)
                col.add_(G2.sum(dim=0))
                continue
            Vb = second.load(state, "exp_avg_sq", r0, r1, ws.V[: r1 - r0])
            Vb.mul_(beta2).addcmul_(G, G, value=1.0 - beta2)
            second.store(state, "exp_avg_sq", r0, r1, Vb, ws)
            denom = torch.sqrt(Vb, out=ws.scratch[: r1 - r0]).add_(eps)
            U = torch.div(Mb if first is not None else G, denom, out=w)
            gA_out.addmm_(B[r0:r1].mT, U)
            torch.mm(U, A.mT, out=gB_out[r0:r1])
        if not self.factored:
            return
        C.mul_(beta2).add_(col, alpha=(1.0 - beta2) / m)
        inv_mean_R = R.mean().clamp_min(torch.finfo(R.dtype).tiny).reciprocal()
        for r0 in range(0, m, ws.rows):
            r1 = min(m, r0 + ws.rows)
            w = ws.work[: r1 - r0]
            if first is not None:
                num = first.load(state, "exp_avg", r0, r1, ws.M[: r1 - r0])
            else:  # no first moment: U is G itself, made again
                num = torch.mm(left[r0:r1], right, out=w)
            V = torch.outer(R[r0:r1], C, out=ws.V[: r1 - r0])
            U = torch.div(num, V.mul_(inv_mean_R).sqrt_().add_(eps), out=w)
            gA_out.addmm_(B[r0:r1].mT, U)
            torch.mm(U, A.mT, out=gB_out[r0:r1])


class Adafactor(MomentStorage):
    r"""Adafactor's factored second moment, with no first moment or a low-rank one, stepped without any
    ``m x n`` tensor (:func:`lorapro.functional.adafactor_on_equivalent_gradient`).

    With the epsilon inside the square (``eps1`` added to ``G^2``, as Adafactor does) the preconditioned update
    is separable, ``U = c diag(R)^{-1/2} M diag(C)^{-1/2}``, and ``G = P K`` has rank 2r (``P = s [B, b]``,
    ``K = [a; A]``): the row and column sums of ``G^2``, the RMS of ``U`` and ``B^T U``, ``U A^T`` are products
    of r-sized factors. ``R`` and ``C`` are the running means of ``G^2 + eps1`` over columns and rows
    (``V_ij = R_i C_j / mean(R)``, bias-corrected by ``1 - beta2^t``); the update is clipped to an RMS of at
    most ``clip`` (Adafactor's ``d``).

    * ``momentum_rank = 0`` (``"adafactor"``): ``M = G``, no first moment; state ``m + n`` numbers per layer.
    * ``momentum_rank = k`` (``"lowrank-factored"``, k = 2r): Adam's first moment ``M = beta1 M + (1 - beta1) G``
      kept as its best rank-k approximation, ``M ~ L R`` (``exp_avg_left`` m x k, ``exp_avg_right`` k x n), and
      bias-corrected by ``1 - beta1^t``; state ``(2r + 1)(m + n)`` numbers per layer, as much as AdamW's two
      moments on the LoRA factors. One step's ``G`` has rank 2r, so the truncation drops only what older steps
      contributed outside the top 2r directions.
    """

    separable = True
    eps1 = 1e-30
    clip = 1.0

    def __init__(self, name: str = "adafactor", momentum_rank: int = 0) -> None:
        self.name = name
        self.momentum_rank = momentum_rank  # in units of r
        self.first_moment = momentum_rank > 0

    def state_shapes(self, m: int, n: int, *, rank: int = 0) -> dict[str, tuple[int, ...]]:
        out: dict[str, tuple[int, ...]] = {"exp_avg_sq_row": (m,), "exp_avg_sq_col": (n,)}
        if self.momentum_rank:
            k = self.momentum_rank * rank
            out.update(exp_avg_left=(m, k), exp_avg_right=(k, n))
        return out

    def bytes_per_element(self) -> float:
        return 0.0

    def init_state(
        self, m: int, n: int, dtype: torch.dtype, device: torch.device, *, rank: int = 0
    ) -> dict[str, Tensor]:
        shapes = self.state_shapes(m, n, rank=rank)
        return {key: torch.zeros(shape, dtype=dtype, device=device) for key, shape in shapes.items()}

    def step_separable(
        self, A: Tensor, B: Tensor, gA: Tensor, gB: Tensor, scale: Tensor, states: Sequence[dict[str, Tensor]],
        bias_correction2: float | Tensor, *, beta2: float, x_mode: str, beta1: float = 0.0,
        bias_correction1: float | Tensor = 1.0, workspace: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """:func:`lorapro.functional.adafactor_on_equivalent_gradient` for a bucket, its statistics (and
        low-rank first moment) read from and written back to ``states``; ``workspace`` its scratch."""
        from .functional import adafactor_on_equivalent_gradient

        keys = list(self.state_shapes(1, 1, rank=1))
        stacked = {key: torch.stack([s[key] for s in states]) for key in keys}
        momentum = (stacked["exp_avg_left"], stacked["exp_avg_right"]) if self.momentum_rank else None
        out = adafactor_on_equivalent_gradient(
            A, B, gA, gB, scale, stacked["exp_avg_sq_row"], stacked["exp_avg_sq_col"], bias_correction2,
            beta2=beta2, eps1=self.eps1, clip=self.clip, x_mode=x_mode,  # type: ignore[arg-type]
            momentum=momentum, beta1=beta1, bias_correction1=bias_correction1, workspace=workspace,
        )
        for key in keys:
            torch._foreach_copy_([s[key] for s in states], list(stacked[key].unbind(0)))
        return out


STORAGES: dict[str, MomentStorage] = {s.name: s for s in (FP32Moments(), BF16Moments(), FactoredMoments())}
# The lean presets: about 1 byte per adapted element (int8 first moment, factored second), 2 bytes (both int8),
# bf16 first moment with a factored second, O(m + n) per layer (adafactor), and (2r + 1)(m + n) per layer, what
# AdamW keeps for the LoRA factors (lowrank-factored: the first moment at rank 2r).
STORAGES["int8-factored"] = SplitMoments("int8", "factored")
STORAGES["int8"] = SplitMoments("int8", "int8")
STORAGES["bf16-factored"] = SplitMoments("bf16", "factored")
STORAGES["adafactor"] = Adafactor()
STORAGES["lowrank-factored"] = Adafactor("lowrank-factored", momentum_rank=2)


@functools.cache
def storage(name: str) -> MomentStorage:
    """A preset of :data:`STORAGES`, or ``"<first>-<second>"`` with first in fp32 / bf16 / int8 / none and second
    in fp32 / bf16 / int8 / factored (``"none-factored"`` is the separable :class:`Adafactor`). One object per
    name (its quantization maps are cached on it)."""
    if name in STORAGES:
        return STORAGES[name]
    first, _, second = name.partition("-")
    if first not in (*CODECS, "none") or second not in (*CODECS, "factored"):
        raise ValueError(f"unknown moment storage {name!r}")
    if first == "none" and second == "factored":
        return STORAGES["adafactor"]
    return SplitMoments(None if first == "none" else first, second)
