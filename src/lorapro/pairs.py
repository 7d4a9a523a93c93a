"""Finding the (A, B, scale) pairs of a model, by structure and never by position.

A pair stands for one adapted weight ``W = W0 + s * B @ A``. Its factors may be stored with extra trailing
dimensions (a convolution's ``A`` is ``(r, in, *kernel)`` and its ``B`` is ``(out, r, 1, ...)``); the
optimizers only ever see the matrix views ``A.reshape(r, -1)`` (``r x n``) and ``B.reshape(m, r)``.

PEFT layers are recognised without importing PEFT: any module with ``lora_A``/``lora_B`` (``ModuleDict`` of
layers with a ``weight``) or ``lora_embedding_A``/``lora_embedding_B`` (``ParameterDict``) keyed by adapter
name, and a ``scaling`` dict. A module whose ``lora_A``/``lora_B`` are plain modules or parameters and whose
``scaling`` is a number is taken as a custom single-adapter LoRA layer.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

from torch import Tensor, nn

__all__ = ["LoRAPair", "find_lora_pairs", "split_trainable"]


class LoRAPair:
    """One adapted weight: its LoRA factors ``A`` (``r x n`` as a matrix) and ``B`` (``m x r``) and its scale.

    Args:
        A, B: the trainable factor tensors (parameters), ``Delta W = scale * B @ A`` in matrix form.
        scale: ``s`` (``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA).
        name: a label for messages and inspection.
        module, adapter: for PEFT layers, where the scale lives; it is re-read from
            ``module.scaling[adapter]`` every time :attr:`scale` is used.
        base_weight: the frozen ``W0`` this pair adapts, if known (used by diagnostics and tests).
        base_transposed: ``True`` when ``W0`` is stored as the transpose of the ``m x n`` matrix view
            (``nn.Embedding``, GPT-2's ``Conv1D`` with ``fan_in_fan_out``).
    """

    __slots__ = ("A", "B", "_scale", "adapter", "base_transposed", "base_weight", "module", "name")

    def __init__(
        self,
        A: Tensor,
        B: Tensor,
        scale: float,
        *,
        name: str = "",
        module: nn.Module | None = None,
        adapter: str | None = None,
        base_weight: Tensor | None = None,
        base_transposed: bool = False,
    ) -> None:
        label = name or "a LoRA pair"
        if not isinstance(A, Tensor) or not isinstance(B, Tensor):
            raise TypeError(f"{label}: A and B must be tensors, got {type(A).__name__} and {type(B).__name__}")
        if A is B:
            raise ValueError(f"{label}: A and B are the same tensor")
        if A.dim() < 2 or B.dim() < 2:
            raise ValueError(f"{label}: A and B need at least 2 dimensions, got shapes {tuple(A.shape)} and {tuple(B.shape)}")
        r = A.shape[0]
        if B.shape[1] != r or math.prod(B.shape[2:]) != 1:
            raise ValueError(
                f"{label}: B {tuple(B.shape)} does not multiply A {tuple(A.shape)} as a rank-{r} product B @ A "
                "(LoRA-Pro needs Delta W = s * B @ A; grouped convolutions and per-expert adapters are not such a product)"
            )
        if A.dtype != B.dtype or A.device != B.device:
            raise ValueError(f"{label}: A and B differ in dtype or device ({A.dtype}/{A.device} vs {B.dtype}/{B.device})")
        if not A.is_floating_point():
            raise ValueError(f"{label}: A and B must be floating point, got {A.dtype}")
        self.A = A
        self.B = B
        self._scale = float(scale)
        self.name = name
        self.module = module
        self.adapter = adapter
        self.base_weight = base_weight
        self.base_transposed = base_transposed
        self._check_scale(self._scale)

    def _check_scale(self, s: float) -> None:
        if not math.isfinite(s) or s == 0.0:
            raise ValueError(f"{self.name or 'a LoRA pair'}: the scale must be finite and non-zero, got {s}")

    @property
    def scale(self) -> float:
        """``s`` of ``W = W0 + s B A``, read from the PEFT layer when there is one."""
        if self.module is not None and isinstance(getattr(self.module, "scaling", None), dict):
            s = float(self.module.scaling[self.adapter])
            self._check_scale(s)
            return s
        return self._scale

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n)`` of the adapted weight's matrix view."""
        return self.B.shape[0], math.prod(self.A.shape[1:])

    def A_matrix(self, t: Tensor | None = None) -> Tensor:
        """``A`` (or a tensor shaped like it, e.g. its gradient) as an ``r x n`` matrix view."""
        t = self.A if t is None else t
        return t.reshape(self.A.shape[0], -1)

    def B_matrix(self, t: Tensor | None = None) -> Tensor:
        """``B`` (or a tensor shaped like it) as an ``m x r`` matrix view."""
        t = self.B if t is None else t
        return t.reshape(self.B.shape[0], self.B.shape[1])

    def weight_matrix(self, w: Tensor) -> Tensor:
        """A tensor shaped like the base weight (``W0`` or its gradient) as the ``m x n`` matrix view."""
        return w.mT.reshape(self.shape) if self.base_transposed else w.reshape(self.shape)

    def delta_weight(self) -> Tensor:
        """``s * B @ A`` as an ``m x n`` matrix."""
        return self.scale * (self.B_matrix() @ self.A_matrix())

    def __repr__(self) -> str:
        m, n = self.shape
        return f"LoRAPair(name={self.name!r}, m={m}, n={n}, r={self.rank}, scale={self.scale:g}, dtype={self.A.dtype})"


def _factor_weight(x: Any) -> Tensor | None:
    if isinstance(x, Tensor):
        return x
    w = getattr(x, "weight", None)
    return w if isinstance(w, Tensor) else None


def _base_weight(module: nn.Module) -> Tensor | None:
    get_base = getattr(module, "get_base_layer", None)
    base = get_base() if callable(get_base) else getattr(module, "base_layer", None)
    w = getattr(base, "weight", None)
    # A quantized base layer (bitsandbytes' 4-bit packed uint8, 8-bit int8 codes with separate row scales) holds
    # no float m x n matrix: its W0 is unknown to anything that reads it (the diagnostics skip such pairs).
    return w if isinstance(w, Tensor) and w.is_floating_point() else None


def _iter_module_pairs(name: str, module: nn.Module) -> Iterator[tuple[str | None, Tensor, Tensor, float, bool]]:
    """Yield ``(adapter, A, B, scale, base_transposed)`` for every adapter stored on ``module``."""
    scaling = getattr(module, "scaling", None)
    for a_attr, b_attr, transposed in (
        ("lora_A", "lora_B", bool(getattr(module, "fan_in_fan_out", False))),
        ("lora_embedding_A", "lora_embedding_B", True),
    ):
        As, Bs = getattr(module, a_attr, None), getattr(module, b_attr, None)
        if As is None or Bs is None:
            continue
        if isinstance(As, (nn.ModuleDict, nn.ParameterDict)) and isinstance(scaling, dict):
            for adapter in As.keys():
                if adapter not in Bs or adapter not in scaling:
                    continue
                A, B = _factor_weight(As[adapter]), _factor_weight(Bs[adapter])
                if A is None or B is None:
                    continue
                r = getattr(module, "r", {}).get(adapter) if isinstance(getattr(module, "r", None), dict) else None
                if r is not None and A.shape[0] != r:
                    raise ValueError(
                        f"{name} (adapter {adapter!r}): lora_A has {A.shape[0]} rows but r={r}; this layer type "
                        f"({type(module).__name__}) stores several adapters in one factor and is not supported"
                    )
                yield adapter, A, B, scaling[adapter], transposed
        elif isinstance(scaling, (int, float)) and not isinstance(scaling, bool):
            A, B = _factor_weight(As), _factor_weight(Bs)
            if A is not None and B is not None:
                yield None, A, B, float(scaling), transposed


# The PEFT tuner layers (``BaseTunerLayer.adapter_layer_names``) whose trainable weights are LoRA's: a layer
# holding any other trainable adapter weights does not compute Delta W = s B A.
_LORA_WEIGHT_NAMES = frozenset(
    {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"}
)
# Why a known tuner's update is not s B A, for the error message (keyed by a weight name only that tuner has).
_NOT_SBA = {
    "lora_E": "AdaLoRA: Delta W = B (E * A) s / ranknum, with a trainable singular-value vector E",
    "hada_w1_a": "LoHa: Delta W is a Hadamard product of two low-rank products",
    "lokr_w1": "LoKr: Delta W is a Kronecker product",
    "lokr_w1_a": "LoKr: Delta W is a Kronecker product",
    "vera_lambda_b": "VeRA: Delta W = diag(b) B diag(d) A with frozen shared random B and A",
    "oft_R": "OFT: the weight is rotated by a trainable orthogonal matrix",
    "boft_R": "BOFT: the weight is rotated by butterfly-factored orthogonal matrices",
    "ia3_l": "IA3: a trainable vector rescales the activations",
    "fourierft_spectrum": "FourierFT: Delta W is the inverse Fourier transform of sparse spectral coefficients",
}
# PEFT LoRA variants (``module.lora_variant[adapter]``) whose forward is still W0 x + s B A x, possibly with a
# magnitude trained outside the pair (DoRA) or applied to some tokens only (aLoRA): LoRA-Pro's projection is
# exact for them. Any other variant changes how A and B make the update and is refused.
_SBA_VARIANTS = ("Dora", "ALora", "MiCA", "Velora")
_ONLY_SBA = "LoRA-Pro's projection is exact only for Delta W = s * B @ A (PEFT LoRA, rsLoRA, DoRA, aLoRA)"
# Trainable PEFT wrappers that train alongside LoRA as ordinary tensors (LoraConfig's modules_to_save and
# trainable_token_indices).
_ORDINARY_TUNER_LAYERS = frozenset({"modules_to_save", "trainable_tokens_delta", "token_adapter.trainable_tokens_delta"})


def _trainable(holder: Any) -> bool:
    if isinstance(holder, Tensor):
        return holder.requires_grad
    if isinstance(holder, nn.Module):
        return any(p.requires_grad for p in holder.parameters())
    return False


def _refuse_foreign_tuner(name: str, module: nn.Module) -> None:
    """Raise if ``module`` is a trainable PEFT tuner layer whose update is not ``s B A``."""
    names = getattr(module, "adapter_layer_names", None)
    if not isinstance(names, tuple) or not all(isinstance(n, str) for n in names):
        return
    if not any(_trainable(getattr(module, n, None)) for n in names):
        return
    foreign = [n for n in names if n not in _LORA_WEIGHT_NAMES and n not in _ORDINARY_TUNER_LAYERS]
    if foreign:
        reason = next((_NOT_SBA[n] for n in foreign if n in _NOT_SBA), None)
        reason = reason or f"its trainable adapter weights ({', '.join(foreign)}) do not form Delta W = s B A"
        raise ValueError(
            f"{name} ({type(module).__name__}) is a PEFT tuner layer LoRA-Pro cannot train: {reason}. {_ONLY_SBA}; "
            "train this model with an ordinary optimizer, or pass LoRAPair objects and tensors for the layers you mean"
        )
    variants = getattr(module, "lora_variant", None)
    if isinstance(variants, dict):
        for adapter, variant in variants.items():
            kind = type(variant).__name__
            if not kind.startswith(_SBA_VARIANTS):
                raise ValueError(
                    f"{name} (adapter {adapter!r}) uses the PEFT LoRA variant {kind}, which changes how A and B "
                    f"make the weight update. {_ONLY_SBA}"
                )


def find_lora_pairs(model: nn.Module) -> list[LoRAPair]:
    """Every trainable LoRA pair of ``model``, in module order: one entry per adapted layer and adapter.

    Only adapters whose ``A`` and ``B`` both require gradients take part. The scale is read per layer
    (``module.scaling[adapter]``), so ``use_rslora``, ``rank_pattern`` and ``alpha_pattern`` are respected.

    Raises:
        ValueError: if no trainable pair is found (the message says what was searched for), or if a trainable
            PEFT layer's update is not ``s B A`` (AdaLoRA, LoHa, LoKr, VeRA, OFT, BOFT, IA3, FourierFT and other
            tuners, and LoRA variants other than DoRA / aLoRA): the message names the layer and the reason.
    """
    pairs: list[LoRAPair] = []
    half_trainable: list[str] = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        _refuse_foreign_tuner(name, module)
        for adapter, A, B, scale, transposed in _iter_module_pairs(name, module):
            label = f"{name}[{adapter}]" if adapter is not None else name
            if not (A.requires_grad and B.requires_grad):
                if A.requires_grad or B.requires_grad:
                    half_trainable.append(label)
                continue
            if id(A) in seen or id(B) in seen:
                raise ValueError(f"{label}: a LoRA factor is shared with another layer; pairs must be distinct")
            seen.update((id(A), id(B)))
            pairs.append(
                LoRAPair(
                    A,
                    B,
                    scale,
                    name=label,
                    module=module if adapter is not None else None,
                    adapter=adapter,
                    base_weight=_base_weight(module),
                    base_transposed=transposed,
                )
            )
    if half_trainable:
        warnings.warn(
            f"{len(half_trainable)} LoRA layer(s) have only one trainable factor (e.g. {half_trainable[0]}); "
            "they are not LoRA-Pro pairs and their trainable factor is trained as an ordinary parameter",
            UserWarning,
            stacklevel=2,
        )
    if not pairs:
        raise ValueError(
            f"no trainable LoRA pair found in {type(model).__name__}: searched for modules with "
            "lora_A/lora_B or lora_embedding_A/lora_embedding_B (PEFT LoRA layers, keyed by adapter name, with a "
            "`scaling` dict) or a custom layer with lora_A/lora_B and a numeric `scaling`, whose A and B both "
            "require grad. Pass LoRAPair(A, B, scale) objects for other layouts."
        )
    return pairs


def split_trainable(model: nn.Module, pairs: Iterable[LoRAPair]) -> list[Tensor]:
    """The trainable parameters of ``model`` that belong to no pair (heads, biases, DoRA magnitudes, ...)."""
    in_pairs = {id(t) for p in pairs for t in (p.A, p.B)}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in in_pairs]
