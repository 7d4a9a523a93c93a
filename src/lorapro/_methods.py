"""The training methods, in one table: what each one's model, initialisation and optimizer are.

Read by the ``lorapro`` command (``--method`` / ``--methods``, their help and checks, :func:`build_model
<lorapro.cli.models.build_model>`, the optimizer factory, the output directory), the Transformers integration
(:data:`LORAPRO_OPTIMIZERS`, its ``lorapro_method``) and ``experiments/`` (the names, their table order and
labels). This module imports neither the command line nor PEFT nor transformers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .optim import LoRAProAdamW, LoRAProSGD

__all__ = ["LORAPRO_OPTIMIZERS", "METHODS", "NAMES", "Method", "get", "label", "names"]

# The LoRA-Pro optimizers by short name (also the Trainer integration's ``lorapro_method``).
LORAPRO_OPTIMIZERS: Mapping[str, type] = MappingProxyType({"adamw": LoRAProAdamW, "sgd": LoRAProSGD})


def _kwargs(**kwargs: str) -> Mapping[str, str]:
    return MappingProxyType(kwargs)


@dataclass(frozen=True)
class Method:
    """One method: how its model is made trainable and which optimizer trains it.

    The optimizer is ``LORAPRO_OPTIMIZERS[lorapro](..., **lorapro_kwargs)`` when ``lorapro`` is set, PEFT's
    ``peft_optimizer`` (built by :mod:`lorapro.cli.peft_methods`) when that is set, else ``torch.optim.AdamW``
    over the trainable parameters. Every method gets the same learning rate and schedule.
    """

    name: str
    lora: bool = True  # a PEFT LoRA model (with a trained classification head); False: full fine-tuning
    rslora: bool = False  # rsLoRA scaling alpha / sqrt(r), whatever --rslora says
    init: str | None = None  # "loraga": LoRA-GA from the gradient of a few batches; "pissa": the weight's top SVD
    dora: bool = False  # DoRA (PEFT use_dora): a trained magnitude per output, the direction adapted by s B A
    freeze_lora_a: bool = False  # LoRA-FA: A stays at its random initialisation
    lorapro: str | None = None  # a LORAPRO_OPTIMIZERS name
    lorapro_kwargs: Mapping[str, str] = field(default_factory=_kwargs)  # x_mode, and moments for AdamW
    fused: bool = False  # --fused applies: LoRAProAdamW(fused=...)
    peft_optimizer: str | None = None  # "loraplus", "lorafa", "riemannian" (PEFT's) or "lorarite" (pytorch-optimizer)
    peft: str | None = None  # a peer method (PEFT's or another package's): what --help calls it
    label: str = ""  # what tables and plots call the method (default: its name)

    def __post_init__(self) -> None:
        if not self.label:
            object.__setattr__(self, "label", self.name)

    @property
    def init_changes_base(self) -> bool:
        """PEFT subtracts the initial ``s B0 A0`` from the base weights (LoRA-GA, PiSSA): the saved adapter must be
        converted to apply to the unchanged base model."""
        return self.init in ("loraga", "pissa")


METHODS: tuple[Method, ...] = (
    Method("full", lora=False),
    Method("lora"),
    Method("rslora", rslora=True),
    Method("lorapro", lorapro="adamw", lorapro_kwargs=_kwargs(x_mode="sylvester", moments="full"), fused=True),
    Method("lorapro-sgd", lorapro="sgd", lorapro_kwargs=_kwargs(x_mode="sylvester")),
    Method("lorapro-zero", lorapro="adamw", lorapro_kwargs=_kwargs(x_mode="zero", moments="full"), fused=True),
    Method("lorapro-bf16", lorapro="adamw", lorapro_kwargs=_kwargs(x_mode="sylvester", moments="bf16")),
    Method("lorapro-factored", lorapro="adamw", lorapro_kwargs=_kwargs(x_mode="sylvester", moments="factored")),
    Method("lorapro-efficient", lorapro="adamw", lorapro_kwargs=_kwargs(x_mode="sylvester", moments="efficient")),
    # the lean moment presets (lorapro.moments): ~1 byte, 2 bytes, ~2 bytes per element, O(m + n) per layer
    *(
        Method(f"lorapro-{preset}", lorapro="adamw", lorapro_kwargs=_kwargs(x_mode="sylvester", moments=preset))
        for preset in ("int8-factored", "int8", "bf16-factored", "adafactor", "lowrank-factored")
    ),
    Method("loraplus", peft_optimizer="loraplus", peft="LoRA+ (lr of B x16)"),
    Method("lorafa", peft_optimizer="lorafa", freeze_lora_a=True, peft="LoRA-FA (A frozen)"),
    Method("riemannian", peft_optimizer="riemannian", peft="Riemannian-preconditioned AdamW"),
    Method("loraga", init="loraga", peft="LoRA-GA initialisation"),
    # the peers that claim LoRA-Pro's job or build on LoRA differently, each with AdamW and (where it is an
    # s B A adapter) with LoRA-Pro
    Method("lora-rite", peft_optimizer="lorarite", peft="LoRA-RITE (pytorch-optimizer's LoRARite)"),
    Method("dora", dora=True, peft="DoRA (PEFT use_dora) with AdamW"),
    Method("lorapro-dora", dora=True, lorapro="adamw", lorapro_kwargs=_kwargs(x_mode="sylvester", moments="full"),
           fused=True, peft="DoRA trained with LoRA-Pro (magnitudes with AdamW)"),
    Method("pissa", init="pissa", peft="PiSSA initialisation with AdamW"),
    Method("lorapro-pissa", init="pissa", lorapro="adamw",
           lorapro_kwargs=_kwargs(x_mode="sylvester", moments="full"), fused=True,
           peft="PiSSA initialisation trained with LoRA-Pro"),
)
NAMES: tuple[str, ...] = tuple(m.name for m in METHODS)
_BY_NAME = {m.name: m for m in METHODS}


def get(name: str) -> Method:
    """The method called ``name``; ``ValueError`` listing the methods if there is none."""
    method = _BY_NAME.get(name) if isinstance(name, str) else None
    if method is None:
        raise ValueError(f"unknown method {name!r}: choose from {', '.join(NAMES)}")
    return method


def names(where: Callable[[Method], object]) -> tuple[str, ...]:
    """The names of the methods for which ``where(method)`` is true, in the order of :data:`METHODS`."""
    return tuple(m.name for m in METHODS if where(m))


def label(name: str) -> str:
    """What tables and plots call the method ``name`` (``name`` itself for a run that is no method, e.g. "base")."""
    method = _BY_NAME.get(name)
    return method.label if method is not None else name
