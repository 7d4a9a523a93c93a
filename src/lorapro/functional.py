r"""The mathematics of LoRA-Pro as pure tensor functions.

Nothing here keeps state or knows about distribution. Every function works on one layer or on a batch of
layers of the same shape: ``A`` is ``(..., r, n)``, ``B`` is ``(..., m, r)`` and ``scale`` is a float or a
tensor of the batch shape ``(...)``. One adapted weight is ``W = W0 + s * B @ A``; ``g = dL/dW`` is the full
fine-tuning gradient and backpropagation gives only

.. math::
    g_A = s B^\top g, \qquad g_B = s\, g A^\top .

Updating ``A -= lr * a``, ``B -= lr * b`` moves ``W`` (to first order) by ``-lr * G`` with the *equivalent
gradient* ``G = s B a + s b A``. LoRA-Pro chooses ``(a, b)`` so that ``G`` is the orthogonal projection of
``g`` onto the tangent space of rank-r matrices at ``B A`` (Theorem 2.1 of the paper):

.. math::
    a = \tfrac{1}{s^2} (B^\top B)^{-1} g_A + X A, \qquad
    b = \tfrac{1}{s^2} (I - P_B)\, g_B (A A^\top)^{-1} - B X,

and picks ``X`` (which does not change ``G``) to keep ``(a, b)`` closest to ``(g_A, g_B)``: the Sylvester
equation ``(B^T B) X + X (A A^T) = -(1/s^2) (B^T B)^{-1} g_A A^T``.

Inverse rule (the "damping" of docs/algorithm.md section 7). Both Gram matrices are symmetric positive semi-definite and
are inverted through one symmetric eigendecomposition each, as a *pseudo-inverse*: an eigenvalue
``lam <= max(rcond * lam_max, sqrt(tiny))`` counts as zero (``rcond = r * eps`` of the compute dtype). So

* for full-rank, reasonably conditioned factors the result is the paper's formula exactly;
* for ``B = 0`` (PEFT's default initialisation) it gives ``a = 0`` and ``b = (1/s^2) g_B (A A^T)^{-1}``, i.e.
  ``G = g P_A``, decided from the data and not from a step counter;
* for rank-deficient ``A`` or ``B`` it gives the least-squares answer: ``G`` is still the orthogonal projection
  of ``g`` onto ``{B a + b A}``, and nothing is divided by a (numerically) zero eigenvalue.

There is no Tikhonov term, deliberately: the paper's formula is reproduced exactly wherever it is defined.
Its price shows right after ``B = 0``: ``G`` contains ``P_B g``, which only ``s B a`` can supply, so
``||a||`` is about ``||g|| / (s ||B||)`` whatever ``X`` is, and with ``||B||`` of order ``lr`` the second step
changes ``A`` by an amount comparable to ``A`` itself, independently of ``lr``. The Sylvester ``X`` removes
the part of that change that lies along ``A``'s own rows (for a gradient direction that persists across
steps, as Adam's ``U`` does, that is most of it: the burden moves to ``B``); the rest is the exact method's
answer and training rebalances the factors within a few steps (see the tests and the demo).
All r x r algebra runs in float32 or wider: inputs of lower precision are promoted (:func:`compute_dtype`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, NamedTuple

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .moments import MomentStorage

XMode = Literal["sylvester", "zero"]
X_MODES: tuple[str, ...] = ("sylvester", "zero")

__all__ = [
    "X_MODES",
    "EigenFactor",
    "LoRAFactors",
    "adam_on_equivalent_gradient",
    "adjusted_lora_gradients",
    "adafactor_on_equivalent_gradient",
    "compute_dtype",
    "eigh_psd",
    "equivalent_gradient",
    "lora_factors",
    "lora_gradients",
    "separable_workspace_numel",
    "solve_sylvester_spd",
    "tangent_projection",
    "truncate_low_rank_product",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the r x r algebra runs in: ``dtype`` promoted to at least float32."""
    return torch.promote_types(dtype, torch.float32)


def _scale_tensor(scale: float | Tensor, like: Tensor) -> Tensor:
    """``scale`` as a tensor broadcastable against ``(..., rows, cols)`` matrices like ``like``."""
    s = torch.as_tensor(scale, dtype=like.dtype, device=like.device)
    return s.reshape(*s.shape, 1, 1)


class EigenFactor(NamedTuple):
    """Symmetric eigendecomposition ``S = Q diag(eigvals) Q^T`` of a PSD matrix, with its pseudo-inverse.

    ``eigvals`` has the eigenvalues that count as zero set to exactly 0; ``inv_eigvals`` holds ``1/eigvals``
    where kept and 0 elsewhere, so ``Q diag(inv_eigvals) Q^T`` is the pseudo-inverse.
    """

    Q: Tensor
    eigvals: Tensor
    inv_eigvals: Tensor

    def pinv(self) -> Tensor:
        """The pseudo-inverse ``S^+`` as a matrix."""
        return (self.Q * self.inv_eigvals.unsqueeze(-2)) @ self.Q.mT

    def solve(self, Y: Tensor) -> Tensor:
        """``S^+ @ Y`` without forming ``S^+``."""
        return self.Q @ (self.inv_eigvals.unsqueeze(-1) * (self.Q.mT @ Y))


def eigh_psd(S: Tensor, rcond: float | None = None) -> EigenFactor:
    """Eigendecompose the symmetric PSD matrices ``S`` (``(..., r, r)``) and build their pseudo-inverse.

    Eigenvalues ``<= max(rcond * lam_max, sqrt(tiny))`` (and negative round-off) count as zero.
    ``rcond`` defaults to ``r * eps`` of ``S.dtype``.
    """
    r = S.shape[-1]
    finfo = torch.finfo(S.dtype)
    if rcond is None:
        rcond = r * finfo.eps
    eigvals, Q = torch.linalg.eigh(S)
    # eigh returns them ascending: the largest is the last. (Few ops: the separable step pays per op, not per
    # element, for these r-sized matrices.)
    threshold = (eigvals[..., -1:] * rcond).clamp_min_(finfo.tiny**0.5)
    keep = eigvals > threshold
    eigvals = torch.where(keep, eigvals, 0.0)
    inv_eigvals = torch.where(keep, eigvals.reciprocal(), 0.0)  # the inf of 1/0 is never selected
    return EigenFactor(Q, eigvals, inv_eigvals)


class LoRAFactors(NamedTuple):
    """The eigendecompositions of ``B^T B`` and ``A A^T`` that every formula of one step shares."""

    BtB: EigenFactor
    AAt: EigenFactor


def lora_factors(A: Tensor, B: Tensor, rcond: float | None = None) -> LoRAFactors:
    """Decompose the Gram matrices ``B^T B`` (``(..., r, r)``) and ``A A^T`` once per step."""
    ct = compute_dtype(A.dtype)
    A, B = A.to(ct), B.to(ct)
    return LoRAFactors(eigh_psd(B.mT @ B, rcond), eigh_psd(A @ A.mT, rcond))


def solve_sylvester_spd(
    P: Tensor | EigenFactor, Q: Tensor | EigenFactor, C: Tensor, rcond: float | None = None
) -> Tensor:
    r"""Solve ``P X + X Q = C`` for symmetric positive (semi-)definite ``P`` and ``Q`` (batched).

    With ``P = U_p diag(p) U_p^T`` and ``Q = U_q diag(q) U_q^T``,
    ``X = U_p [ (U_p^T C U_q)_{ij} / (p_i + q_j) ] U_q^T``: real arithmetic only, unique for SPD inputs.
    Where ``p_i + q_j`` is zero (both eigenvalues count as zero) the component is set to 0, which gives the
    minimum-norm least-squares solution. ``P`` and ``Q`` may be given already decomposed.
    """
    Pe = P if isinstance(P, EigenFactor) else eigh_psd(P, rcond)
    Qe = Q if isinstance(Q, EigenFactor) else eigh_psd(Q, rcond)
    denom = Pe.eigvals.unsqueeze(-1) + Qe.eigvals.unsqueeze(-2)
    Xt = torch.where(denom > 0, (Pe.Q.mT @ C @ Qe.Q) / denom, 0.0)  # 0/0 where denom is 0, never selected
    return Pe.Q @ Xt @ Qe.Q.mT


def lora_gradients(A: Tensor, B: Tensor, g: Tensor, scale: float | Tensor) -> tuple[Tensor, Tensor]:
    """The LoRA gradients backprop gives for a full gradient ``g`` (``(..., m, n)``): ``(s B^T g, s g A^T)``."""
    s = _scale_tensor(scale, g)
    return s * (B.mT @ g), s * (g @ A.mT)


def equivalent_gradient(A: Tensor, B: Tensor, a: Tensor, b: Tensor, scale: float | Tensor) -> Tensor:
    """``G = s B a + s b A``: the full-weight step that updating ``A`` by ``a`` and ``B`` by ``b`` makes."""
    s = _scale_tensor(scale, a)
    return s * (B @ a + b @ A)


def tangent_projection(A: Tensor, B: Tensor, g: Tensor, rcond: float | None = None) -> Tensor:
    """``P_B g + g P_A - P_B g P_A``: the projection of ``g`` onto the tangent space at ``B A``.

    ``P_B = B (B^T B)^+ B^T`` and ``P_A = A^T (A A^T)^+ A``; no m x m or n x n matrix is formed.
    """
    f = lora_factors(A, B, rcond)
    PBg = B @ f.BtB.solve(B.mT @ g)
    return PBg + (g - PBg) @ A.mT @ f.AAt.solve(A)


def adjusted_lora_gradients(
    A: Tensor,
    B: Tensor,
    gA: Tensor,
    gB: Tensor,
    scale: float | Tensor,
    *,
    x_mode: XMode = "sylvester",
    factors: LoRAFactors | None = None,
    rcond: float | None = None,
) -> tuple[Tensor, Tensor]:
    r"""LoRA-Pro's adjusted gradients ``(a, b)`` for LoRA gradients ``(gA, gB)`` (docs/algorithm.md sections 3 and 4).

    .. math::
        a = \tfrac{1}{s^2} (B^\top B)^{+} g_A + X A, \qquad
        b = \tfrac{1}{s^2} \big(g_B - B (B^\top B)^{+} B^\top g_B\big) (A A^\top)^{+} - B X

    with ``X`` from :func:`solve_sylvester_spd` for ``x_mode="sylvester"`` and ``X = 0`` for ``"zero"``.
    The results are in :func:`compute_dtype` of ``A.dtype`` (inputs of lower precision are promoted); pass
    ``factors`` from :func:`lora_factors` to reuse the decompositions of ``A`` and ``B`` within a step.
    """
    if x_mode not in X_MODES:
        raise ValueError(f"x_mode must be one of {X_MODES}, got {x_mode!r}")
    ct = compute_dtype(A.dtype)
    A, B, gA, gB = A.to(ct), B.to(ct), gA.to(ct), gB.to(ct)
    f = lora_factors(A, B, rcond) if factors is None else factors
    inv_s2 = _scale_tensor(scale, gA).reciprocal().square()
    a = inv_s2 * f.BtB.solve(gA)
    # (I - P_B) gB (A A^T)^+, written so that no m x m matrix exists; (A A^T)^+ is symmetric.
    b = inv_s2 * (f.AAt.solve((gB - B @ f.BtB.solve(B.mT @ gB)).mT)).mT
    if x_mode == "sylvester":
        X = solve_sylvester_spd(f.BtB, f.AAt, -(a @ A.mT))
        a = a + X @ A
        b = b - B @ X
    return a, b


def adafactor_on_equivalent_gradient(
    A: Tensor,
    B: Tensor,
    gA: Tensor,
    gB: Tensor,
    scale: Tensor,
    row: Tensor,
    col: Tensor,
    bias_correction2: float | Tensor,
    *,
    beta2: float,
    eps1: float = 1e-30,
    clip: float = 1.0,
    x_mode: XMode = "sylvester",
    momentum: tuple[Tensor, Tensor] | None = None,
    beta1: float = 0.9,
    bias_correction1: float | Tensor = 1.0,
    rcond: float | None = None,
    workspace: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Algorithm 2's direction with Adafactor's factored second moment and no first moment or a low-rank one, for
    ``L`` layers of one shape, without any ``m x n`` tensor: O((m + n) r^2) work, O((m + n) r) memory per layer.

    ``A`` (L, r, n), ``B`` (L, m, r), their gradients and ``scale`` (L,) in :func:`compute_dtype`; ``row`` (L, m)
    and ``col`` (L, n) the running means of ``G^2 + eps1`` over columns and over rows, updated in place;
    ``bias_correction2`` is ``1 - beta2^t``, a float or (L,). Per layer:

    1. ``(a, b)`` = :func:`adjusted_lora_gradients` with ``X = 0``; ``G = P K`` with ``P = s [B, b]`` (m x 2r)
       and ``K = [a; A]`` (2r x n);
    2. ``sum_j G_ij^2 = p_i^T (K K^T) p_i`` and ``sum_i G_ij^2 = k_j^T (P^T P) k_j`` update ``row`` and ``col``;
    3. the first moment: ``M = G`` when ``momentum`` is None; else ``momentum = (L_M, R_M)`` ((L, m, k) and
       (L, k, n), updated in place) holds ``M ~ L_M R_M`` and becomes the best rank-k approximation of
       ``beta1 L_M R_M + (1 - beta1) P K`` (:func:`truncate_low_rank_product`), corrected by
       ``bias_correction1`` (``1 - beta1^t``);
    4. with ``V_ij = row_i col_j / mean(row)`` (Adafactor's epsilon inside the square, which keeps this
       exact) ``U = M / sqrt(V / bc2) = c Ls Rs``, ``Ls = diag(row)^{-1/2} L_M``, ``Rs = R_M diag(col)^{-1/2}``,
       ``c = sqrt(bc2 mean(row)) / bc1``, and ``c`` shrinks so that ``RMS(U) <= clip`` (``||U||_F^2 =
       c^2 trace((Ls^T Ls)(Rs Rs^T))``);
    5. returns :func:`adjusted_lora_gradients` of ``(s B^T U, s U A^T)`` with ``x_mode``'s ``X``, from r-sized
       products: with ``Y = B^T Ls``, ``Z = Rs A^T``, ``M' = (c/s) (B^T B)^+ Y``, ``N = (c/s) Z (A A^T)^+``,
       ``a' = M' Rs + X A`` and ``b' = Ls N - B ((B^T B)^+ Y N + X)`` (the Sylvester right-hand side is
       ``-M' Z``).

    ``[Ls, B]`` and ``[Rs; A]`` are built once and scaled in place, so each of the products of step 5 is one
    batched matrix product over the bucket. The m- and n-sized temporaries are carved from ``workspace`` (a flat
    tensor of at least :func:`separable_workspace_numel` elements in the compute dtype) when one is given: an
    optimizer that keeps it between steps saves the page faults that fresh allocations of this size cost on a
    CPU (glibc maps them anew and returns them when freed; docs/performance.md measures the step with and without).
    """
    if x_mode not in X_MODES:
        raise ValueError(f"x_mode must be one of {X_MODES}, got {x_mode!r}")
    L, r, m, n = A.shape[0], A.shape[-2], B.shape[-2], A.shape[-1]
    s = scale.reshape(-1, 1, 1)
    k_m = 0 if momentum is None else momentum[0].shape[-1]
    ws = _Carver(workspace if workspace is not None else A.new_empty(separable_workspace_numel(L, m, n, r, k_m)))
    # The r x r algebra costs per op, not per element, at these sizes: B^T B and A A^T are decomposed and
    # pseudo-inverted as one batch of 2L, and each block matrix below is assembled in as few ops as it takes.
    gram = torch.cat([B.mT @ B, A @ A.mT])
    e = eigh_psd(gram, rcond)
    pinv = e.pinv()
    BtB, AAt, Bp, Ap = gram[:L], gram[L:], pinv[:L], pinv[L:]
    f = LoRAFactors(EigenFactor(e.Q[:L], e.eigvals[:L], e.inv_eigvals[:L]),
                    EigenFactor(e.Q[L:], e.eigvals[L:], e.inv_eigvals[L:]))
    # step 1 with X = 0: adjusted_lora_gradients(x_mode="zero") through the pseudo-inverses that step 5 needs too
    # (one product with gA instead of solve's two): a = (B^T B)^+ gA / s^2,
    # b = (gB - B (B^T B)^+ B^T gB) (A A^T)^+ / s^2
    inv_s2 = (s * s).reciprocal()
    Ap_s2 = Ap * inv_s2
    a = torch.bmm(Bp * inv_s2, gA, out=ws.take(L, r, n))
    b = torch.bmm(gB, Ap_s2, out=ws.take(L, m, r))
    torch.baddbmm(b, B, Bp @ (B.mT @ gB) @ Ap_s2, alpha=-1.0, out=b)
    lb = torch.cat([B, b, B], dim=-1, out=ws.take(L, m, 3 * r))  # [P / s, B]
    rb = torch.cat([a, A, A], dim=-2, out=ws.take(L, 3 * r, n))  # [K; A]
    Pu, K = lb[..., : 2 * r], rb[..., : 2 * r, :]  # Pu = P / s: s goes on r-sized matrices, not on an m-sized pass
    s2 = s * s
    # K K^T = [[a a^T, a A^T], [A a^T, A A^T]], its first r columns K a^T; P^T P = s^2 [[B^T B, B^T b],
    # [b^T B, b^T b]], its last r columns s^2 Pu^T b; the row sums of G^2 are those of (Pu s^2 K K^T) * Pu
    Ka = K @ a.mT
    KKt = torch.cat([Ka, torch.cat([Ka[..., r:, :].mT, AAt], -2)], -1).mul_(s2)
    Pb = Pu.mT @ lb[..., r : 2 * r]
    PtP = torch.cat([torch.cat([BtB, Pb[..., :r, :].mT], -2), Pb], -1).mul_(s2)
    row_sq = torch.bmm(Pu, KKt, out=ws.take(L, m, 2 * r)).mul_(Pu).sum(-1)
    col_sq = torch.bmm(PtP, K, out=ws.take(L, 2 * r, n)).mul_(K).sum(-2)
    row.mul_(beta2).add_(row_sq.div_(n).add_(eps1), alpha=1.0 - beta2)
    col.mul_(beta2).add_(col_sq.div_(m).add_(eps1), alpha=1.0 - beta2)
    c = (bias_correction2 * row.mean(-1)).sqrt()
    left_scale = row.rsqrt()[..., None]
    if momentum is None:  # Ls = diag(row)^{-1/2} P = diag(row)^{-1/2} s Pu
        left_scale = left_scale * s
    else:  # [Ls, B] and [Rs; A] from the new first moment instead of G's factors
        left, right = momentum
        k = left.shape[-1]
        Pu.mul_(s)  # the truncation needs P itself
        truncate_low_rank_product(
            left, right, Pu, K, beta1, rcond, workspace=(ws.take(L, m, k + 2 * r), ws.take(L, k + 2 * r, n))
        )
        if k == 2 * r:  # in place of P and K, which are not needed any more
            lb[..., :k].copy_(left)
            rb[:, :k].copy_(right)
        else:
            lb = torch.cat([left, B], dim=-1)
            rb = torch.cat([right, A], dim=-2)
        c = c / bias_correction1
    k = lb.shape[-1] - r
    Ls, Rs = lb[..., :k], rb[..., :k, :]
    Ls.mul_(left_scale)
    Rs.mul_(col.rsqrt()[..., None, :])
    LtL_LtB = Ls.mT @ lb  # [Ls^T Ls, Ls^T B]
    RRt_RAt = Rs @ rb.mT  # [Rs Rs^T, Rs A^T]
    sq = torch.linalg.vecdot(LtL_LtB[..., :k], RRt_RAt[..., :k]).sum(-1).clamp_min(0)
    rms = c * sq.sqrt() / math.sqrt(m * n)
    w = (c / (rms / clip).clamp_min(1.0) / scale).reshape(-1, 1, 1)
    Y, Z = LtL_LtB[..., k:].mT, RRt_RAt[..., k:]
    M = (w * Bp) @ Y
    N = Z @ (w * Ap)
    BN = Bp @ (Y @ N)
    if x_mode == "sylvester":
        X = solve_sylvester_spd(f.BtB, f.AAt, -(M @ Z))
        return torch.cat([M, X], -1) @ rb, lb @ torch.cat([N, -(BN + X)], -2)
    return M @ Rs, torch.baddbmm(Ls @ N, B, BN, alpha=-1.0)


def separable_workspace_numel(layers: int, m: int, n: int, r: int, momentum_rank: int = 0) -> int:
    """Elements of the scratch buffer :func:`adafactor_on_equivalent_gradient` carves its m- and n-sized
    temporaries from: ``6 r (m + n)`` per layer, and ``(k + 2r)(m + n)`` more with a rank-k first moment."""
    extra = momentum_rank + 2 * r if momentum_rank else 0
    return layers * (6 * r + extra) * (m + n)


class _Carver:
    """Consecutive contiguous views of a flat buffer."""

    def __init__(self, buffer: Tensor) -> None:
        self.buffer, self.used = buffer, 0

    def take(self, *shape: int) -> Tensor:
        size = math.prod(shape)
        view = self.buffer[self.used : self.used + size].view(shape)
        self.used += size
        return view


def truncate_low_rank_product(
    left: Tensor, right: Tensor, P: Tensor, K: Tensor, beta: float, rcond: float | None = None,
    workspace: tuple[Tensor, Tensor] | None = None,
) -> None:
    r"""``left @ right <- `` the best rank-k approximation of ``beta left @ right + (1 - beta) P @ K``, in place
    (``left`` (..., m, k), ``right`` (..., k, n), ``P`` (..., m, j), ``K`` (..., j, n)), from (k + j)-sized
    products only.

    With ``Lc = [beta left, (1 - beta) P]`` and ``Rc = [right; K]``: ``Rc Rc^T = Q Λ Q^T`` gives ``Rc = Q Λ^{1/2}
    W^T`` with orthonormal rows ``W^T = Λ^{-1/2} Q^T Rc``, so ``Lc Rc = C W^T`` with ``C = Lc Q Λ^{1/2}`` and its
    best rank-k approximation is ``(C V_k)(V_k^T W^T)``, ``V_k`` the top k eigenvectors of ``C^T C = Λ^{1/2} Q^T
    (Lc^T Lc) Q Λ^{1/2}``. Two (k + j)-sized eigendecompositions; eigenvalues of either that count as zero
    (:func:`eigh_psd`) are dropped, so a zero ``right`` (the first step) is exact and a product of rank below k
    keeps zero columns rather than round-off. ``workspace``: contiguous tensors of the shapes of ``Lc`` and
    ``Rc`` to build them in.
    """
    k = left.shape[-1]
    Lc = torch.cat([left, P], dim=-1, out=None if workspace is None else workspace[0])
    Lc[..., :k].mul_(beta)
    Lc[..., k:].mul_(1.0 - beta)
    Rc = torch.cat([right, K], dim=-2, out=None if workspace is None else workspace[1])
    eR = eigh_psd(Rc @ Rc.mT, rcond)
    QS = eR.Q * eR.eigvals.sqrt()[..., None, :]  # Q Λ^{1/2}
    core = eigh_psd(QS.mT @ (Lc.mT @ Lc) @ QS, rcond)  # ascending: the top k are the last k
    # directions whose singular value counts as zero are dropped from both factors, so round-off never becomes a
    # unit-norm row of ``right``
    Vk = (core.Q * (core.eigvals > 0)[..., None, :])[..., -k:]
    # written straight into the factors: Lc and Rc hold what the products need of them
    torch.matmul(Lc, QS @ Vk, out=left)
    torch.matmul((Vk.mT * eR.inv_eigvals.sqrt()[..., None, :]) @ eR.Q.mT, Rc, out=right)


@functools.lru_cache(maxsize=256)
def scale_vector(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """The per-layer scales as a tensor on ``device``, made once per distinct value: a host-to-device copy every
    step would make the host wait for the device (never written to)."""
    return torch.tensor(values, dtype=dtype, device=device)


def adam_on_equivalent_gradient(
    A: Tensor,
    B: Tensor,
    gA: Tensor,
    gB: Tensor,
    scales: Sequence[float],
    states: Sequence[dict[str, Tensor]],
    steps: Sequence[float],
    *,
    storage: MomentStorage,
    betas: tuple[float, float],
    eps: float,
    x_mode: XMode = "sylvester",
    fused: bool = False,
    block_elements: int | None = None,
    factors: LoRAFactors | None = None,
    workspace: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Algorithm 2's direction for ``L`` layers of one shape: Adam on the equivalent gradient, projected back.

    ``A`` (L, r, n), ``B`` (L, m, r) and their gradients in :func:`compute_dtype`; ``scales`` and ``steps``
    (the step count *after* this step, 1 on the first) one per layer; ``states`` one dict of moments per layer,
    made by ``storage.init_state`` and updated in place. Per layer:

    1. ``(a, b)`` = :func:`adjusted_lora_gradients` with ``X = 0``; ``G = s B a + s b A`` (``m x n``);
    2. ``M = b1 M + (1-b1) G``, ``V = b2 V + (1-b2) G*G``,
       ``U = (M / (1-b1^t)) / (sqrt(V / (1-b2^t)) + eps)``, with ``M`` and ``V`` kept by ``storage``;
    3. ``g_A' = s B^T U``, ``g_B' = s U A^T``;
    4. returns ``(a', b')`` = :func:`adjusted_lora_gradients` of ``(g_A', g_B')`` with ``x_mode``'s ``X``.

    The update is then ``A <- A (1 - lr wd) - lr a'`` and likewise for ``B``. No ``m x n`` matrix is formed
    whole: ``G`` and ``U`` exist a block of rows at a time (``block_elements`` elements; default
    :func:`lorapro.moments.default_cpu_block_elements` on CPU, half an ``m x n`` matrix elsewhere), and
    ``fused=True`` runs each block's elementwise arithmetic as one compiled loop (storages with ``fusable``).
    Separable storages (no m x n tensor) take their scratch from ``workspace`` when given
    (:func:`adafactor_on_equivalent_gradient`).
    """
    from .moments import block_rows, layers_per_chunk

    beta1, beta2 = betas
    scale = scale_vector(tuple(scales), A.dtype, A.device)
    one_step = len(set(steps)) == 1  # the usual case: one eps and one bias correction for the bucket
    if storage.separable:  # no m x n tensor at all (the adafactor preset)
        bc2 = 1.0 - beta2 ** steps[0] if one_step else A.new_tensor([1.0 - beta2**t for t in steps])
        bc1 = 1.0 - beta1 ** steps[0] if one_step else A.new_tensor([1.0 - beta1**t for t in steps])
        return storage.step_separable(
            A, B, gA, gB, scale, states, bc2, beta2=beta2, x_mode=x_mode, beta1=beta1, bias_correction1=bc1,
            workspace=workspace,
        )
    factors = lora_factors(A, B) if factors is None else factors
    a, b = adjusted_lora_gradients(A, B, gA, gB, scale, x_mode="zero", factors=factors)
    # G = s [B, b] @ [a; A]: one product of inner size 2r per layer, with s folded into the small factor.
    left = torch.cat([B, b], dim=-1).mul_(scale[:, None, None])
    right = torch.cat([a, A], dim=-2)
    m, n = B.shape[-2], A.shape[-1]
    gA_adam = torch.zeros_like(A)
    gB_adam = torch.empty_like(B)
    chunk = layers_per_chunk(m, n, A.device, block_elements) if storage.chunkable and not fused else 1
    if chunk > 1 and one_step:  # several small layers per pass
        eps_t = eps * math.sqrt(1.0 - beta2 ** steps[0])
        work = torch.empty(2, min(chunk, len(states)), m, n, dtype=A.dtype, device=A.device)
        for i in range(0, len(states), chunk):
            j = min(len(states), i + chunk)
            storage.update_chunk(
                left[i:j], right[i:j], B[i:j], A[i:j], states[i:j], work[:, : j - i],
                gA_adam[i:j], gB_adam[i:j], beta1=beta1, beta2=beta2, eps=eps_t,
            )
    else:
        rows = block_rows(m, n, A.device, storage.workspace_blocks, block_elements)
        ws = storage.workspace(rows, n, A.dtype, A.device)
        for i, state in enumerate(states):
            storage.update_layer(
                left[i], right[i], B[i], A[i], state, ws, gA_adam[i], gB_adam[i],
                beta1=beta1, beta2=beta2, eps=eps * math.sqrt(1.0 - beta2 ** steps[i]), fused=fused,
            )
    # U = (M / bc1) / (sqrt(V / bc2) + eps) = (sqrt(bc2) / bc1) * M / (sqrt(V) + eps sqrt(bc2)):
    # the constant and s are applied to the r-sized results, not to an m x n matrix; one op per bucket when
    # its layers share their step count, else per layer.
    b1 = beta1 if storage.first_moment else 0.0  # no first moment: nothing to correct
    if one_step:
        t = steps[0]
        c = scale.mul(math.sqrt(1.0 - beta2**t) / (1.0 - b1**t))[:, None, None]
        gA_adam.mul_(c)
        gB_adam.mul_(c)
    else:
        for i, (s, t) in enumerate(zip(scales, steps)):
            c = s * math.sqrt(1.0 - beta2**t) / (1.0 - b1**t)  # a Python float: no device wait
            gA_adam[i].mul_(c)
            gB_adam[i].mul_(c)
    return adjusted_lora_gradients(A, B, gA_adam, gB_adam, scale, x_mode=x_mode, factors=factors)
