"""A literal float64 transcription of docs/algorithm.md, per layer, deliberately slow and independent of lorapro.

It reads PEFT layers itself (scale = lora_alpha / r, or / sqrt(r) with rsLoRA), builds the m x m projector,
inverts with ``torch.linalg.inv`` and solves the Sylvester equation through its Kronecker form, so that it
shares no code path with the library it checks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def ref_adjust(A: Tensor, B: Tensor, gA: Tensor, gB: Tensor, s: float, x_mode: str) -> tuple[Tensor, Tensor]:
    """docs/algorithm.md sections 3, 4 and 7: the adjusted gradients (a, b)."""
    r, m = A.shape[0], B.shape[0]
    AAt = A @ A.T
    if not A.any():  # the mirror case (PEFT zero-initialises an Embedding's A): a = (1/s^2)(B^T B)^-1 gA, b = 0.
        return torch.linalg.inv(B.T @ B) @ gA / s**2, torch.zeros_like(B)
    AAt_inv = torch.linalg.inv(AAt)
    # docs/algorithm.md section 7: B = 0 gives a = 0, b = (1/s^2) gB (A A^T)^-1 (and X = 0 minimises ||a - gA||).
    if not B.any():
        return torch.zeros_like(A), gB @ AAt_inv / s**2
    BtB = B.T @ B
    BtB_inv = torch.linalg.inv(BtB)
    P_B = B @ BtB_inv @ B.T
    a = BtB_inv @ gA / s**2
    b = (torch.eye(m, dtype=B.dtype) - P_B) @ gB @ AAt_inv / s**2
    if x_mode == "sylvester":
        C = -BtB_inv @ gA @ A.T / s**2
        # vec(P X + X Q) = (I kron P + Q^T kron I) vec(X), column-major vec.
        K = torch.kron(torch.eye(r, dtype=A.dtype), BtB) + torch.kron(AAt.T.contiguous(), torch.eye(r, dtype=A.dtype))
        X = torch.linalg.solve(K, C.T.reshape(-1)).reshape(r, r).T
        a = a + X @ A
        b = b - B @ X
    return a, b


def peft_layers(model: nn.Module):
    """Yield (name, A_param, B_param, scale) for every trainable PEFT LoRA adapter, read literally."""
    for name, module in model.named_modules():
        for a_attr, b_attr in (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B")):
            As = getattr(module, a_attr, None)
            if not isinstance(As, (nn.ModuleDict, nn.ParameterDict)):
                continue
            Bs = getattr(module, b_attr)
            for adapter in As.keys():
                A = As[adapter] if isinstance(As[adapter], Tensor) else As[adapter].weight
                B = Bs[adapter] if isinstance(Bs[adapter], Tensor) else Bs[adapter].weight
                if not (A.requires_grad and B.requires_grad):
                    continue
                r, alpha = module.r[adapter], module.lora_alpha[adapter]
                s = alpha / math.sqrt(r) if module.use_rslora[adapter] else alpha / r
                yield f"{name}[{adapter}]", A, B, s


class ReferenceLoRAPro:
    """Algorithm 1 (``algo="sgd"``) or Algorithm 2 (``algo="adamw"``) of docs/algorithm.md, plus AdamW/SGD for the rest.

    ``layers`` is a list of (name, A, B, scale) with A, B parameters of any layout; every other trainable
    parameter of ``model`` is updated with a literal AdamW (or SGD) transcription.
    """

    def __init__(
        self, model, layers, *, algo, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, x_mode="sylvester",
        moments="full",
    ):
        self.moments = moments
        self.layers = list(layers)
        ids = {id(t) for _, A, B, _ in self.layers for t in (A, B)}
        self.others = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        self.algo, self.lr, self.betas, self.eps, self.wd, self.x_mode = algo, lr, betas, eps, weight_decay, x_mode
        self.state: dict[str, dict] = {}
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        t, lr, wd = self.t, self.lr, self.wd
        b1, b2 = self.betas
        for name, Ap, Bp, s in self.layers:
            r, m = Ap.shape[0], Bp.shape[0]
            A, B = Ap.reshape(r, -1).clone(), Bp.reshape(m, r).clone()
            gA, gB = Ap.grad.reshape(r, -1), Bp.grad.reshape(m, r)
            if self.algo == "sgd":
                a, b = ref_adjust(A, B, gA, gB, s, self.x_mode)
            elif self.moments == "efficient":  # adjusted gradients, then AdamW with r-sized moments
                a, b = ref_adjust(A, B, gA, gB, s, self.x_mode)
                a, b = self._adam(name + ".A", a, t), self._adam(name + ".B", b, t)
            elif self.moments == "factored":  # Adafactor's second moment: V_ij = R_i C_j / mean(R)
                a0, b0 = ref_adjust(A, B, gA, gB, s, "zero")
                G = s * B @ a0 + s * b0 @ A
                st = self.state.setdefault(
                    name, {"M": torch.zeros_like(G), "R": torch.zeros(G.shape[0], dtype=G.dtype),
                           "C": torch.zeros(G.shape[1], dtype=G.dtype)}
                )
                st["M"] = b1 * st["M"] + (1 - b1) * G
                st["R"] = b2 * st["R"] + (1 - b2) * (G * G).mean(dim=1)
                st["C"] = b2 * st["C"] + (1 - b2) * (G * G).mean(dim=0)
                V = torch.outer(st["R"], st["C"]) / st["R"].mean()
                U = (st["M"] / (1 - b1**t)) / (torch.sqrt(V / (1 - b2**t)) + self.eps)
                a, b = ref_adjust(A, B, s * B.T @ U, s * U @ A.T, s, self.x_mode)
            else:
                a0, b0 = ref_adjust(A, B, gA, gB, s, "zero")
                G = s * B @ a0 + s * b0 @ A
                st = self.state.setdefault(name, {"M": torch.zeros_like(G), "V": torch.zeros_like(G)})
                st["M"] = b1 * st["M"] + (1 - b1) * G
                st["V"] = b2 * st["V"] + (1 - b2) * G * G
                U = (st["M"] / (1 - b1**t)) / (torch.sqrt(st["V"] / (1 - b2**t)) + self.eps)
                a, b = ref_adjust(A, B, s * B.T @ U, s * U @ A.T, s, self.x_mode)
            Ap.copy_((A * (1 - lr * wd) - lr * a).reshape(Ap.shape))
            Bp.copy_((B * (1 - lr * wd) - lr * b).reshape(Bp.shape))
        for i, p in enumerate(self.others):
            if p.grad is None:
                continue
            if self.algo == "sgd":
                p.copy_(p * (1 - lr * wd) - lr * p.grad)
                continue
            p.copy_(p * (1 - lr * wd) - lr * self._adam(f"other{i}", p.grad, t))

    def _adam(self, key: str, g: Tensor, t: int) -> Tensor:
        """Adam's bias-corrected direction for gradient ``g`` (AdamW's update without lr and decay)."""
        b1, b2 = self.betas
        st = self.state.setdefault(key, {"M": torch.zeros_like(g), "V": torch.zeros_like(g)})
        st["M"] = b1 * st["M"] + (1 - b1) * g
        st["V"] = b2 * st["V"] + (1 - b2) * g * g
        return (st["M"] / (1 - b1**t)) / (torch.sqrt(st["V"] / (1 - b2**t)) + self.eps)
