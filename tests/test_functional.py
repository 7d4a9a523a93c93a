"""Property tests of ``lorapro.functional`` (docs/algorithm.md sections 3 and 4), in float64 unless stated.

Every reference value is computed here independently, from explicit matrices (explicit projectors
``P_B = B (B^T B)^-1 B^T``, ``P_A = A^T (A A^T)^-1 A``, Kronecker-product linear maps, ``torch.linalg.lstsq``),
never by calling back into the functions under test. Random problems are built from a hypothesis-drawn integer
seed through ``torch.Generator`` so that every failing example is reproducible from its printed seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lorapro.functional import (
    EigenFactor,
    adafactor_on_equivalent_gradient,
    adjusted_lora_gradients,
    eigh_psd,
    equivalent_gradient,
    lora_factors,
    lora_gradients,
    solve_sylvester_spd,
    tangent_projection,
    truncate_low_rank_product,
)

F64 = torch.float64
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
REL = 1e-9  # relative tolerance of the closed-form identities


# ----------------------------------------------------------------------------------------------------------------
# helpers


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = REL, ref: float | None = None):
    """``|actual - expected| <= rel * (|expected| + ref)`` elementwise, ``ref`` defaulting to ``max|expected|``.

    The absolute part keeps entries that happen to be near zero from failing on round-off alone.
    """
    if ref is None:
        ref = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * ref + 1e-300)


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=F64).to(dtype)


def orthonormal_columns(gen: torch.Generator, rows: int, cols: int) -> torch.Tensor:
    """A ``rows x cols`` matrix with orthonormal columns (``rows >= cols``)."""
    q, _ = torch.linalg.qr(randn(gen, rows, cols))
    return q


def well_conditioned(gen: torch.Generator, rows: int, cols: int, kind: str, mag: float) -> torch.Tensor:
    """A random full-rank ``rows x cols`` matrix with condition number below ~300, of overall size ``mag``."""
    k = min(rows, cols)
    if kind == "svd":
        sv = 0.3 + 1.7 * torch.rand(k, generator=gen, dtype=F64)
        U = orthonormal_columns(gen, rows, k)
        V = orthonormal_columns(gen, cols, k)
        M = (U * sv) @ V.mT
    else:  # Gaussian plus a random orthonormal basis, rejected if badly conditioned
        U = orthonormal_columns(gen, rows, k)
        V = orthonormal_columns(gen, cols, k)
        M = randn(gen, rows, cols) / math.sqrt(k) + 0.5 * U @ V.mT
        assume(float(torch.linalg.cond(M)) < 300.0)
    return mag * M


def kron(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """``torch.kron`` on freshly laid-out copies: torch 2.13 ``kron`` raises on a transposed ``(k, 1)`` view
    (strides ``(1, k)``), which ``.contiguous()`` keeps as it is."""
    return torch.kron(X.clone(memory_format=torch.contiguous_format), Y.clone(memory_format=torch.contiguous_format))


def proj_B(B: torch.Tensor) -> torch.Tensor:
    """Explicit m x m projector ``B (B^T B)^-1 B^T``."""
    return B @ torch.linalg.inv(B.mT @ B) @ B.mT


def proj_A(A: torch.Tensor) -> torch.Tensor:
    """Explicit n x n projector ``A^T (A A^T)^-1 A``."""
    return A.mT @ torch.linalg.inv(A @ A.mT) @ A


def reference_G(A: torch.Tensor, B: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    PB, PA = proj_B(B), proj_A(A)
    return PB @ g + g @ PA - PB @ g @ PA


def linear_map(A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """The (m*n) x (r*n + m*r) matrix of ``(a, b) -> s B a + s b A`` on row-major vectorisations."""
    m, r = B.shape
    n = A.shape[1]
    In = torch.eye(n, dtype=A.dtype)
    Im = torch.eye(m, dtype=A.dtype)
    # vec(B a) = (B kron I_n) vec(a);  vec(b A) = (I_m kron A^T) vec(b)
    return s * torch.cat([kron(B, In), kron(Im, A.mT)], dim=1)


def lstsq_projection(A: torch.Tensor, B: torch.Tensor, g: torch.Tensor, s: float = 1.0) -> torch.Tensor:
    """Orthogonal projection of ``g`` onto ``{s B a + s b A}``, as the fitted value of a least-squares solve."""
    M = linear_map(A, B, s)
    sol = torch.linalg.lstsq(M, g.reshape(-1, 1), rcond=1e-10, driver="gelsd").solution
    return (M @ sol).reshape(g.shape)


def ab_scale(A, B, gA, gB, s: float) -> float:
    """Size of the uncancelled terms that make up ``(a, b)``: round-off in ``a`` and ``b`` is relative to this.

    (``b`` itself is pure round-off when ``m == r``, since then ``I - P_B = 0``.)
    """
    nrm = lambda M: float(torch.linalg.matrix_norm(M, ord=2))
    lam_B = float(torch.linalg.eigvalsh(B.mT @ B)[0])
    lam_A = float(torch.linalg.eigvalsh(A @ A.mT)[0])
    ua = nrm(gA) / (s**2 * lam_B)
    ub = nrm(gB) / (s**2 * lam_A)
    x = ua * nrm(A) / (lam_A + lam_B)  # bound on the Sylvester X
    return ua + ub + x * (nrm(A) + nrm(B))


def objective(a, b, gA, gB) -> torch.Tensor:
    return (a - gA).square().sum() + (b - gB).square().sum()


# ----------------------------------------------------------------------------------------------------------------
# strategies


@dataclass
class Problem:
    A: torch.Tensor  # (r, n) or (L, r, n)
    B: torch.Tensor  # (m, r) or (L, m, r)
    g: torch.Tensor  # (m, n) or (L, m, n)
    s: float | torch.Tensor
    seed: int

    @property
    def r(self) -> int:
        return self.A.shape[-2]


@st.composite
def shapes(draw):
    r = draw(st.integers(1, 4))
    m = draw(st.one_of(st.just(r), st.integers(r, 9)))
    n = draw(st.one_of(st.just(r), st.integers(r, 9)))
    return r, m, n


@st.composite
def scales(draw, r: int):
    kind = draw(st.sampled_from(["uniform", "rslora", "alpha_over_r"]))
    if kind == "uniform":
        return draw(st.floats(0.1, 8.0, allow_nan=False, allow_infinity=False))
    alpha = draw(st.sampled_from([1.0, 2.0, 4.0, 8.0, 16.0]))
    return alpha / math.sqrt(r) if kind == "rslora" else alpha / r


@st.composite
def problems(draw, batch: int | None = None):
    r, m, n = draw(shapes())
    seed = draw(st.integers(0, 2**31 - 1))
    kind_A = draw(st.sampled_from(["svd", "gauss"]))
    kind_B = draw(st.sampled_from(["svd", "gauss"]))
    mag_A = draw(st.sampled_from([0.1, 1.0, 10.0]))
    mag_B = draw(st.sampled_from([1e-3, 0.1, 1.0, 10.0]))
    gen = torch.Generator().manual_seed(seed)
    L = 1 if batch is None else batch
    As = [well_conditioned(gen, r, n, kind_A, mag_A) for _ in range(L)]
    Bs = [well_conditioned(gen, m, r, kind_B, mag_B) for _ in range(L)]
    gs = [randn(gen, m, n) for _ in range(L)]
    if batch is None:
        return Problem(As[0], Bs[0], gs[0], draw(scales(r)), seed)
    s = torch.tensor([draw(scales(r)) for _ in range(L)], dtype=F64)
    return Problem(torch.stack(As), torch.stack(Bs), torch.stack(gs), s, seed)


x_modes = st.sampled_from(["sylvester", "zero"])


# ----------------------------------------------------------------------------------------------------------------
# 1-3: the equivalent gradient is the tangent-space projection, the least-squares fit, and independent of X


@SETTINGS
@given(p=problems(), x_mode=x_modes)
def test_equivalent_gradient_is_tangent_projection(p: Problem, x_mode: str):
    gA, gB = lora_gradients(p.A, p.B, p.g, p.s)
    assert_rel_close(gA, p.s * p.B.mT @ p.g, rel=1e-12)
    assert_rel_close(gB, p.s * p.g @ p.A.mT, rel=1e-12)

    a, b = adjusted_lora_gradients(p.A, p.B, gA, gB, p.s, x_mode=x_mode)
    assert a.shape == p.A.shape and b.shape == p.B.shape
    assert a.dtype == F64 and b.dtype == F64
    G = equivalent_gradient(p.A, p.B, a, b, p.s)
    expected = reference_G(p.A, p.B, p.g)
    assert_rel_close(G, expected)
    assert_rel_close(tangent_projection(p.A, p.B, p.g), expected)
    # G is a projection: projecting it again changes nothing, and the residual is orthogonal to it
    assert_rel_close(tangent_projection(p.A, p.B, G), G)
    assert abs(float(((p.g - G) * G).sum())) <= REL * float(p.g.square().sum())


@SETTINGS
@given(p=problems(), x_mode=x_modes)
def test_equivalent_gradient_is_least_squares_fit(p: Problem, x_mode: str):
    gA, gB = lora_gradients(p.A, p.B, p.g, p.s)
    a, b = adjusted_lora_gradients(p.A, p.B, gA, gB, p.s, x_mode=x_mode)
    G = equivalent_gradient(p.A, p.B, a, b, p.s)

    M = linear_map(p.A, p.B, p.s)
    # equivalent_gradient is the linear map itself
    ab = torch.cat([a.reshape(-1), b.reshape(-1)])
    assert_rel_close(G, (M @ ab).reshape(G.shape), ref=float(M.abs().max() * ab.abs().max()))
    # and its value is the least-squares fit of g
    sol = torch.linalg.lstsq(M, p.g.reshape(-1, 1), rcond=1e-10, driver="gelsd").solution
    fitted = (M @ sol).reshape(p.g.shape)
    assert_rel_close(G, fitted, ref=float(p.g.abs().max()))
    res_G = torch.linalg.norm(G - p.g)
    res_ls = torch.linalg.norm(fitted - p.g)
    torch.testing.assert_close(res_G, res_ls, rtol=1e-8, atol=REL * float(torch.linalg.norm(p.g)))


@SETTINGS
@given(p=problems(), x_scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_equivalent_gradient_does_not_depend_on_X(p: Problem, x_scale: float):
    gA, gB = lora_gradients(p.A, p.B, p.g, p.s)
    a_syl, b_syl = adjusted_lora_gradients(p.A, p.B, gA, gB, p.s, x_mode="sylvester")
    a_zero, b_zero = adjusted_lora_gradients(p.A, p.B, gA, gB, p.s)  # default is sylvester
    assert torch.equal(a_syl, a_zero) and torch.equal(b_syl, b_zero)
    a_zero, b_zero = adjusted_lora_gradients(p.A, p.B, gA, gB, p.s, x_mode="zero")
    G_syl = equivalent_gradient(p.A, p.B, a_syl, b_syl, p.s)
    G_zero = equivalent_gradient(p.A, p.B, a_zero, b_zero, p.s)
    # the Sylvester and the zero X differ by an exact gauge move: a_syl - a_zero = X A, b_syl - b_zero = -B X
    X = torch.linalg.lstsq(p.A.mT, (a_syl - a_zero).mT).solution.mT
    ref_ab = float(a_syl.abs().max() + a_zero.abs().max() + b_syl.abs().max() + b_zero.abs().max())
    assert_rel_close(a_syl - a_zero, X @ p.A, ref=ref_ab)
    assert_rel_close(b_syl - b_zero, -p.B @ X, ref=ref_ab)

    ref = float(p.g.abs().max()) + p.s * float(p.B.abs().max() * a_syl.abs().max() * p.r)
    assert_rel_close(G_syl, G_zero, ref=ref)

    gen = torch.Generator().manual_seed(p.seed + 1)
    Xr = x_scale * randn(gen, p.r, p.r)
    G_x = equivalent_gradient(p.A, p.B, a_zero + Xr @ p.A, b_zero - p.B @ Xr, p.s)
    ref_x = ref + p.s * float(p.B.abs().max() * Xr.abs().max() * p.A.abs().max()) * p.r**2
    assert_rel_close(G_x, G_zero, ref=ref_x)


# ----------------------------------------------------------------------------------------------------------------
# 4-5: the Sylvester solver, and the X it picks


@st.composite
def spd_pair(draw, semidefinite_P: bool = False, r: int | None = None):
    if r is None:
        r = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)

    def spd(lo: float, hi: float, rank: int | None = None) -> torch.Tensor:
        Q = orthonormal_columns(gen, r, r)
        ev = lo + (hi - lo) * torch.rand(r, generator=gen, dtype=F64)
        if rank is not None:
            ev[rank:] = 0.0
        S = (Q * ev) @ Q.mT
        return 0.5 * (S + S.mT)

    mag_P = draw(st.sampled_from([1e-2, 1.0, 1e2]))
    mag_Q = draw(st.sampled_from([1e-2, 1.0, 1e2]))
    rank = draw(st.integers(0, r - 1)) if semidefinite_P else None
    P = mag_P * spd(0.1, 10.0, rank)
    Q = mag_Q * spd(0.1, 10.0)
    C = randn(gen, r, r)
    return P, Q, C


def kron_sylvester(P: torch.Tensor, Q: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Solve ``P X + X Q = C`` through the r^2 x r^2 Kronecker system (row-major vec)."""
    r = P.shape[-1]
    I = torch.eye(r, dtype=P.dtype)
    K = kron(P, I) + kron(I, Q.mT)
    return torch.linalg.solve(K, C.reshape(-1)).reshape(r, r)


@SETTINGS
@given(PQC=spd_pair(), pre_decomposed=st.booleans())
def test_sylvester_solves_equation(PQC, pre_decomposed: bool):
    P, Q, C = PQC
    args = (eigh_psd(P), eigh_psd(Q)) if pre_decomposed else (P, Q)
    X = solve_sylvester_spd(*args, C)
    ref = float((P.abs().max() + Q.abs().max()) * X.abs().max() + C.abs().max())
    assert_rel_close(P @ X + X @ Q, C, rel=1e-10, ref=ref)
    assert_rel_close(X, kron_sylvester(P, Q, C), rel=1e-10)


@SETTINGS
@given(PQC=spd_pair(semidefinite_P=True))
def test_sylvester_with_semidefinite_P(PQC):
    # P singular PSD, Q SPD: every p_i + q_j > 0, so the solution is still unique and exact
    P, Q, C = PQC
    X = solve_sylvester_spd(P, Q, C)
    assert torch.isfinite(X).all()
    ref = float((P.abs().max() + Q.abs().max()) * X.abs().max() + C.abs().max())
    assert_rel_close(P @ X + X @ Q, C, rel=1e-10, ref=ref)
    assert_rel_close(X, kron_sylvester(P, Q, C), rel=1e-9)


def test_sylvester_both_singular_gives_min_norm_least_squares():
    gen = torch.Generator().manual_seed(7)
    r = 3
    U = orthonormal_columns(gen, r, r)
    P = (U * torch.tensor([2.0, 1.0, 0.0], dtype=F64)) @ U.mT
    V = orthonormal_columns(gen, r, r)
    Q = (V * torch.tensor([3.0, 0.0, 0.0], dtype=F64)) @ V.mT
    C = randn(gen, r, r)
    X = solve_sylvester_spd(P, Q, C)
    I = torch.eye(r, dtype=F64)
    K = kron(P, I) + kron(I, Q.mT)
    expected = (torch.linalg.pinv(K, rtol=1e-10) @ C.reshape(-1)).reshape(r, r)
    assert_rel_close(X, expected, rel=1e-10)


@SETTINGS
@given(p=problems(), t=st.sampled_from([1e-3, 1e-1, 1.0]))
def test_sylvester_X_minimises_distance_to_lora_gradients(p: Problem, t: float):
    gA, gB = lora_gradients(p.A, p.B, p.g, p.s)
    a, b = adjusted_lora_gradients(p.A, p.B, gA, gB, p.s, x_mode="sylvester")
    a0, b0 = adjusted_lora_gradients(p.A, p.B, gA, gB, p.s, x_mode="zero")
    f = objective(a, b, gA, gB)
    f0 = objective(a0, b0, gA, gB)
    assert float(f) <= float(f0) * (1 + 1e-12) + 1e-300

    # stationarity: d/dX ||a + X A - gA||^2 + ||b - B X - gB||^2 at X = 0 is 2 [(a - gA) A^T - B^T (b - gB)]
    grad = (a - gA) @ p.A.mT - p.B.mT @ (b - gB)
    # round-off scale: a = a0 + X A and b = b0 - B X cancel, so measure against the uncancelled terms
    nrm = torch.linalg.norm
    grad_ref = float(
        (nrm(a) + nrm(a0) + nrm(gA)) * nrm(p.A) + nrm(p.B) * (nrm(b) + nrm(b0) + nrm(gB))
    )
    assert float(torch.linalg.norm(grad)) <= REL * grad_ref + 1e-300

    # perturbations never decrease the objective; the quadratic has no linear term at the minimiser
    gen = torch.Generator().manual_seed(p.seed + 2)
    Xp = randn(gen, p.r, p.r)
    Xp = Xp * (t * math.sqrt(float(f) + 1.0) / float(torch.linalg.norm(p.A) + torch.linalg.norm(p.B)))
    fp = objective(a + Xp @ p.A, b - p.B @ Xp, gA, gB)
    quad = (Xp @ p.A).square().sum() + (p.B @ Xp).square().sum()
    assert float(fp) >= float(f) * (1 - 1e-12)
    torch.testing.assert_close(fp - f, quad, rtol=1e-6, atol=REL * float(f + quad))


# ----------------------------------------------------------------------------------------------------------------
# 6: Theorem 2.3, the first-order loss change of the SGD form


@SETTINGS
@given(p=problems(), x_mode=x_modes)
def test_first_order_loss_change(p: Problem, x_mode: str):
    gA, gB = lora_gradients(p.A, p.B, p.g, p.s)
    a, b = adjusted_lora_gradients(p.A, p.B, gA, gB, p.s, x_mode=x_mode)
    G = equivalent_gradient(p.A, p.B, a, b, p.s)
    change = -(p.g * G).sum()
    g2 = float(p.g.square().sum())
    assert float(change) <= 1e-12 * g2

    m = p.B.shape[0]
    BtB_inv = torch.linalg.inv(p.B.mT @ p.B)
    AAt_inv = torch.linalg.inv(p.A @ p.A.mT)
    I_minus_PB = torch.eye(m, dtype=F64) - proj_B(p.B)
    theorem = -(1.0 / p.s**2) * ((gA * (BtB_inv @ gA)).sum() + (gB * (I_minus_PB @ gB @ AAt_inv)).sum())
    torch.testing.assert_close(change, theorem, rtol=REL, atol=REL * g2)


# ----------------------------------------------------------------------------------------------------------------
# batched inputs agree with per-layer calls


@SETTINGS
@given(p=problems(batch=3), x_mode=x_modes, reuse_factors=st.booleans())
def test_batched_matches_per_layer(p: Problem, x_mode: str, reuse_factors: bool):
    L = p.A.shape[0]
    assert isinstance(p.s, torch.Tensor) and p.s.shape == (L,)
    gA, gB = lora_gradients(p.A, p.B, p.g, p.s)
    factors = lora_factors(p.A, p.B) if reuse_factors else None
    a, b = adjusted_lora_gradients(p.A, p.B, gA, gB, p.s, x_mode=x_mode, factors=factors)
    G = equivalent_gradient(p.A, p.B, a, b, p.s)
    T = tangent_projection(p.A, p.B, p.g)
    for i in range(L):
        s_i = float(p.s[i])
        gA_i, gB_i = lora_gradients(p.A[i], p.B[i], p.g[i], s_i)
        assert_rel_close(gA[i], gA_i, rel=1e-12)
        assert_rel_close(gB[i], gB_i, rel=1e-12)
        a_i, b_i = adjusted_lora_gradients(p.A[i], p.B[i], gA_i, gB_i, s_i, x_mode=x_mode)
        ref = ab_scale(p.A[i], p.B[i], gA_i, gB_i, s_i)
        assert_rel_close(a[i], a_i, rel=1e-10, ref=ref)
        assert_rel_close(b[i], b_i, rel=1e-10, ref=ref)
        G_i = equivalent_gradient(p.A[i], p.B[i], a_i, b_i, s_i)
        assert_rel_close(G[i], G_i, rel=1e-10, ref=float(p.g[i].abs().max()))
        expected = reference_G(p.A[i], p.B[i], p.g[i])
        assert_rel_close(G[i], expected)
        assert_rel_close(T[i], expected)
        # a 0-dim tensor scale behaves like the float
        a_t, b_t = adjusted_lora_gradients(p.A[i], p.B[i], gA_i, gB_i, p.s[i], x_mode=x_mode)
        assert_rel_close(a_t, a_i, rel=1e-12, ref=ref)
        assert_rel_close(b_t, b_i, rel=1e-12, ref=ref)


@SETTINGS
@given(p=problems(batch=3), x_mode=x_modes, zero_B=st.booleans(), clip=st.sampled_from([1e-3, 1.0, math.inf]),
       young=st.booleans())
def test_adafactor_step_matches_the_dense_transcription(p: Problem, x_mode: str, zero_B: bool, clip: float, young):
    """``adafactor_on_equivalent_gradient`` (nothing m x n formed) against the dense float64 transcription: form
    ``G`` from the closed form, its factored second moment with epsilon inside the square, divide, clip the RMS,
    project back. Batched, per-layer bias corrections, B = 0 (PEFT's initialisation), clipping on and off."""
    gen = torch.Generator().manual_seed(p.seed)
    L, m, n = p.A.shape[0], p.B.shape[-2], p.A.shape[-1]
    B = torch.zeros_like(p.B) if zero_B else p.B
    gA, gB = lora_gradients(p.A, B, p.g, p.s)
    R0 = torch.zeros(L, m, dtype=F64) if young else torch.rand(L, m, generator=gen, dtype=F64)
    C0 = torch.zeros(L, n, dtype=F64) if young else torch.rand(L, n, generator=gen, dtype=F64)
    beta2, eps1 = 0.9, 1e-30
    bc2 = torch.tensor([1.0 - beta2 ** (i + 1) for i in range(L)], dtype=F64)
    R, C = R0.clone(), C0.clone()
    a, b = adafactor_on_equivalent_gradient(p.A, B, gA, gB, p.s, R, C, bc2, beta2=beta2, eps1=eps1, clip=clip,
                                            x_mode=x_mode)
    a0, b0 = adjusted_lora_gradients(p.A, B, gA, gB, p.s, x_mode="zero")
    G = equivalent_gradient(p.A, B, a0, b0, p.s)
    R_ref = beta2 * R0 + (1 - beta2) * (G * G + eps1).mean(-1)
    C_ref = beta2 * C0 + (1 - beta2) * (G * G + eps1).mean(-2)
    V = R_ref[:, :, None] * C_ref[:, None, :] / R_ref.mean(-1)[:, None, None]
    U = G / (V / bc2[:, None, None]).sqrt()
    U = U / (U.square().mean((-2, -1)).sqrt() / clip).clamp_min(1.0)[:, None, None]
    a_ref, b_ref = adjusted_lora_gradients(p.A, B, *lora_gradients(p.A, B, U, p.s), p.s, x_mode=x_mode)
    assert_rel_close(R, R_ref, rel=1e-10)
    assert_rel_close(C, C_ref, rel=1e-10)
    ref = float(max(a_ref.abs().max(), b_ref.abs().max()))
    assert_rel_close(a, a_ref, rel=1e-10, ref=ref)
    assert_rel_close(b, b_ref, rel=1e-10, ref=ref)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(1, 12), n=st.integers(1, 12), k=st.integers(1, 5),
       j=st.integers(1, 4), beta=st.sampled_from([0.0, 0.5, 0.9, 0.99]), zero=st.booleans())
def test_truncate_low_rank_product_is_the_best_rank_k_approximation(seed, m, n, k, j, beta, zero):
    """``left @ right`` becomes the SVD truncation to rank k of ``beta left @ right + (1 - beta) P @ K`` (batched;
    a zero ``left``, the first step, included), wherever the k-th singular value is separated from the next."""
    gen = torch.Generator().manual_seed(seed)
    left = torch.zeros(2, m, k, dtype=F64) if zero else randn(gen, 2, m, k)
    right, P, K = randn(gen, 2, k, n), randn(gen, 2, m, j), randn(gen, 2, j, n)
    target = beta * left @ right + (1 - beta) * P @ K
    u, sv, vh = torch.linalg.svd(target, full_matrices=False)
    if k < sv.shape[-1]:
        assume(bool(((sv[..., k - 1] - sv[..., k]) > 1e-3 * sv[..., 0]).all()))
    best = (u[..., :k] * sv[..., None, :k]) @ vh[..., :k, :]
    truncate_low_rank_product(left, right, P, K, beta)
    assert left.shape == (2, m, k) and right.shape == (2, k, n)
    assert_rel_close(left @ right, best, rel=1e-9, ref=float(sv[..., 0].max()))


@SETTINGS
@given(PQC=st.integers(1, 4).flatmap(lambda r: st.lists(spd_pair(r=r), min_size=3, max_size=3)))
def test_batched_sylvester_matches_per_matrix(PQC):
    P = torch.stack([x[0] for x in PQC])
    Q = torch.stack([x[1] for x in PQC])
    C = torch.stack([x[2] for x in PQC])
    X = solve_sylvester_spd(P, Q, C)
    for i in range(3):
        assert_rel_close(X[i], kron_sylvester(P[i], Q[i], C[i]), rel=1e-10)


# ----------------------------------------------------------------------------------------------------------------
# 7: degenerate cases


def _random_problem(seed: int, r: int, m: int, n: int, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    return randn(gen, r, n, dtype=dtype), randn(gen, m, r, dtype=dtype), randn(gen, m, n, dtype=dtype)


@pytest.mark.parametrize("x_mode", ["sylvester", "zero"])
@pytest.mark.parametrize("r,m,n", [(1, 1, 1), (2, 5, 3), (4, 9, 6), (4, 4, 4)])
@pytest.mark.parametrize("s", [0.5, 2.0, 16 / math.sqrt(8)])
def test_B_zero(x_mode, r, m, n, s):
    A, _, g = _random_problem(11 * r + m + n, r, m, n)
    B = torch.zeros(m, r, dtype=F64)
    gA, gB = lora_gradients(A, B, g, s)
    assert torch.equal(gA, torch.zeros_like(gA))
    a, b = adjusted_lora_gradients(A, B, gA, gB, s, x_mode=x_mode)
    assert torch.equal(a, torch.zeros_like(a))
    assert_rel_close(b, (1 / s**2) * gB @ torch.linalg.inv(A @ A.mT))
    G = equivalent_gradient(A, B, a, b, s)
    assert_rel_close(G, g @ proj_A(A))
    assert_rel_close(tangent_projection(A, B, g), g @ proj_A(A))


def _rank_deficient_cases():
    cases = []
    for seed, (r, m, n) in enumerate([(2, 5, 4), (3, 3, 7), (4, 9, 9), (4, 6, 5), (2, 2, 2)]):
        A, B, g = _random_problem(100 + seed, r, m, n)
        B_dup = B.clone()
        B_dup[:, 1] = B_dup[:, 0]
        A_zero = A.clone()
        A_zero[-1] = 0.0
        cases.append(pytest.param(A, B_dup, g, id=f"B-dup-col-{r}x{m}x{n}"))
        cases.append(pytest.param(A_zero, B, g, id=f"A-zero-row-{r}x{m}x{n}"))
        cases.append(pytest.param(A_zero, B_dup, g, id=f"both-{r}x{m}x{n}"))
        # a generic (not exactly structured) rank-1 B
        B_rank1 = B[:, :1] @ A[:1, :r]
        cases.append(pytest.param(A, B_rank1, g, id=f"B-rank1-{r}x{m}x{n}"))
    return cases


@pytest.mark.parametrize("x_mode", ["sylvester", "zero"])
@pytest.mark.parametrize("A,B,g", _rank_deficient_cases())
def test_rank_deficient_gives_projection(A, B, g, x_mode):
    s = 1.7
    gA, gB = lora_gradients(A, B, g, s)
    a, b = adjusted_lora_gradients(A, B, gA, gB, s, x_mode=x_mode)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    # no division by a round-off eigenvalue: the adjusted gradients stay of the size of the problem
    assert float(a.abs().max() + b.abs().max()) < 1e6
    G = equivalent_gradient(A, B, a, b, s)
    expected = lstsq_projection(A, B, g)
    assert_rel_close(G, expected, rel=1e-8, ref=float(g.abs().max()))
    assert_rel_close(tangent_projection(A, B, g), expected, rel=1e-8, ref=float(g.abs().max()))


@pytest.mark.parametrize("x_mode", ["sylvester", "zero"])
@pytest.mark.parametrize("mag", [1e-30, 1e-20, 1e-12, 1e-9, 1e-6])
@pytest.mark.parametrize("which", ["B", "A", "both"])
def test_float32_tiny_factors_are_finite(mag, which, x_mode):
    A, B, g = _random_problem(5, 4, 8, 6, dtype=torch.float32)
    if which in ("B", "both"):
        B = B * mag
    if which in ("A", "both"):
        A = A * mag
    s = 2.0
    gA, gB = lora_gradients(A, B, g, s)
    a, b = adjusted_lora_gradients(A, B, gA, gB, s, x_mode=x_mode)
    assert a.dtype == torch.float32 and b.dtype == torch.float32
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    G = equivalent_gradient(A, B, a, b, s)
    T = tangent_projection(A, B, g)
    assert torch.isfinite(G).all() and torch.isfinite(T).all()
    # G is still (close to) a projection of g: it never exceeds g in norm
    assert float(torch.linalg.norm(G)) <= 1.001 * float(torch.linalg.norm(g))


@pytest.mark.parametrize("x_mode", ["sylvester", "zero"])
def test_float32_B_1e30_behaves_like_B_zero(x_mode):
    A, B, g = _random_problem(6, 3, 7, 5, dtype=torch.float32)
    B = B * 1e-30
    s = 2.0
    gA, gB = lora_gradients(A, B, g, s)
    a, b = adjusted_lora_gradients(A, B, gA, gB, s, x_mode=x_mode)
    G = equivalent_gradient(A, B, a, b, s)
    A64, g64 = A.double(), g.double()
    expected = (g64 @ proj_A(A64)).float()
    torch.testing.assert_close(G, expected, rtol=1e-4, atol=1e-4 * float(g.abs().max()))


# ----------------------------------------------------------------------------------------------------------------
# 8: the pseudo-inverse


@SETTINGS
@given(r=st.integers(1, 4), seed=st.integers(0, 2**31 - 1), mag=st.sampled_from([1e-6, 1.0, 1e6]))
def test_eigh_psd_pinv_full_rank(r: int, seed: int, mag: float):
    gen = torch.Generator().manual_seed(seed)
    R = well_conditioned(gen, r, r + 2, "svd", 1.0)
    S = mag * (R @ R.mT)
    f = eigh_psd(S)
    assert isinstance(f, EigenFactor)
    assert bool((f.eigvals > 0).all())
    P = f.pinv()
    assert_rel_close(P, torch.linalg.pinv(S, hermitian=True), rel=1e-10)
    assert_rel_close(P, torch.linalg.inv(S), rel=1e-10)
    Y = randn(gen, r, 3)
    assert_rel_close(f.solve(Y), torch.linalg.solve(S, Y), rel=1e-10)


@SETTINGS
@given(r=st.integers(2, 4), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_eigh_psd_pinv_rank_deficient(r: int, seed: int, data):
    k = data.draw(st.integers(0, r - 1), label="rank")
    gen = torch.Generator().manual_seed(seed)
    R = randn(gen, r, k) if k > 0 else torch.zeros(r, 1, dtype=F64)
    S = R @ R.mT
    f = eigh_psd(S)
    P = f.pinv()
    assert torch.isfinite(P).all() and torch.isfinite(f.eigvals).all() and torch.isfinite(f.inv_eigvals).all()
    dropped = f.eigvals == 0
    assert int(dropped.sum()) == r - k
    assert bool((f.inv_eigvals[dropped] == 0).all())
    expected = torch.linalg.pinv(S, hermitian=True, rtol=1e-10)
    assert_rel_close(P, expected, rel=1e-8, ref=float(expected.abs().max()) + 1.0)
    # Moore-Penrose conditions
    assert_rel_close(S @ P @ S, S, rel=1e-9, ref=float(S.abs().max()) + 1e-30)
    assert_rel_close(P @ S @ P, P, rel=1e-9, ref=float(P.abs().max()) + 1e-30)


def test_eigh_psd_batched_and_zero():
    gen = torch.Generator().manual_seed(3)
    R = randn(gen, 3, 4, 4)
    S = R @ R.mT
    S[1] = 0.0
    f = eigh_psd(S)
    P = f.pinv()
    assert torch.equal(P[1], torch.zeros(4, 4, dtype=F64))
    for i in (0, 2):
        assert_rel_close(P[i], torch.linalg.pinv(S[i], hermitian=True), rel=1e-8)


# ----------------------------------------------------------------------------------------------------------------
# 9: argument validation


def test_x_mode_validation():
    A, B, g = _random_problem(0, 2, 4, 3)
    gA, gB = lora_gradients(A, B, g, 1.0)
    with pytest.raises(ValueError, match="x_mode"):
        adjusted_lora_gradients(A, B, gA, gB, 1.0, x_mode="bogus")  # type: ignore[arg-type]


def test_low_precision_inputs_are_promoted_to_float32():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 7, generator=g)
    B = torch.randn(5, 3, generator=g)
    gA, gB = torch.randn(3, 7, generator=g), torch.randn(5, 3, generator=g)
    a32, b32 = adjusted_lora_gradients(A, B, gA, gB, 2.0)
    a16, b16 = adjusted_lora_gradients(*(t.bfloat16() for t in (A, B, gA, gB)), 2.0)
    assert a16.dtype == b16.dtype == torch.float32
    torch.testing.assert_close(a16, a32, rtol=0.1, atol=0.1)
    torch.testing.assert_close(b16, b32, rtol=0.1, atol=0.1)
