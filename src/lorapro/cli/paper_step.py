"""A literal per-layer transcription of the paper's AdamW step, done the way the original code does it.

Written from docs/algorithm.md (sections 3-6) for the benchmark only: pseudo-inverses of the Gram matrices with a tiny
jitter, the explicit m x m projector ``I - P_B``, the Sylvester equation through a *general complex*
eigendecomposition and a linear solve, fresh m x n temporaries for every elementwise expression. It is the
baseline that ``lorapro bench`` measures our optimizer against; it is not used by the library.
"""

from __future__ import annotations

import torch


def _solve_sylvester_complex(P: torch.Tensor, Q: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """``P X + X Q = C`` via ``eig`` of ``P`` and ``-Q`` (general, complex), as the original code does."""
    R, U = torch.linalg.eig(P)
    S, V = torch.linalg.eig(-Q)
    F = torch.linalg.solve(U, C.to(U.dtype) @ V)
    Y = F / (R[:, None] - S[None, :])
    return (U @ Y @ torch.linalg.inv(V)).real.to(C.dtype)


class PaperLoRAProAdamW:
    """Algorithm 2 per layer: ``pairs`` is a list of ``(A, B, scale)`` with ``A`` (r x n), ``B`` (m x r)."""

    def __init__(self, pairs, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, jitter=1e-8):
        self.pairs = list(pairs)
        self.lr, self.betas, self.eps, self.jitter = lr, betas, eps, jitter
        self.state: dict[int, dict[str, torch.Tensor]] = {}
        self.t = 0

    def _adjust(self, A, B, gA, gB, s, sylvester):
        r, m = A.shape[0], B.shape[0]
        eye_r = torch.eye(r, dtype=A.dtype, device=A.device)
        AAt_inv = torch.linalg.pinv(A @ A.T + self.jitter * eye_r)
        BtB = B.T @ B
        BtB_inv = torch.linalg.pinv(BtB + self.jitter * eye_r)
        projector = torch.eye(m, dtype=A.dtype, device=A.device) - B @ BtB_inv @ B.T
        a = BtB_inv @ gA / s**2
        b = projector @ gB @ AAt_inv / s**2
        if sylvester:
            X = _solve_sylvester_complex(BtB, A @ A.T, -(BtB_inv @ gA) @ A.T / s**2)
            a = a + X @ A
            b = b - B @ X
        return a, b

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        for i, (A, B, s) in enumerate(self.pairs):
            a, b = self._adjust(A, B, A.grad, B.grad, s, sylvester=False)
            G = s * B @ a + s * b @ A
            st = self.state.setdefault(i, {"M": torch.zeros_like(G), "V": torch.zeros_like(G)})
            st["M"] = b1 * st["M"] + (1 - b1) * G
            st["V"] = b2 * st["V"] + (1 - b2) * G * G
            U = (st["M"] / (1 - b1**self.t)) / (torch.sqrt(st["V"] / (1 - b2**self.t)) + self.eps)
            a, b = self._adjust(A, B, s * B.T @ U, s * U @ A.T, s, sylvester=True)
            A.sub_(self.lr * a)
            B.sub_(self.lr * b)


__all__ = ["PaperLoRAProAdamW"]
