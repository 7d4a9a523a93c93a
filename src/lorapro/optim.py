r"""LoRA-Pro optimizers: :class:`LoRAProSGD` (Algorithm 1) and :class:`LoRAProAdamW` (Algorithm 2).

Both are ordinary :class:`torch.optim.Optimizer` subclasses. Their ``param_groups`` hold every trainable
tensor (the LoRA factors and everything else), so LR schedulers, ``zero_grad``, gradient clipping and
``GradScaler`` work as with any optimizer. State is keyed by parameter tensors: a pair's full-size Adam
moments live in ``state[B]`` (``B`` is ``m x r`` and the moments are ``m x n``: the same rows). Tensors that
belong to no pair are trained with plain AdamW (or SGD) in the same step.

The classes only wire the parts together: the math is :mod:`lorapro.functional`, the moments' storage
:mod:`lorapro.moments`, the distribution :mod:`lorapro.sharding`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.adam import adam as _functional_adam
from torch.optim.optimizer import Optimizer, _get_scalar_dtype

from ._buckets import apply_update, bucket_pairs, separable_scratch_numel, stack_pairs, stacked_numel
from ._dtensor import is_dtensor
from ._params import ParamsLike, describe, resolve_params
from .functional import X_MODES, adam_on_equivalent_gradient, adjusted_lora_gradients, compute_dtype
from .moments import storage as moment_storage
from .pairs import LoRAPair
from .sharding import Sharding

__all__ = ["MOMENT_MODES", "LoRAProAdamW", "LoRAProSGD"]

# The moment storages of Algorithm 2 by preset name (any "<first>-<second>" of lorapro.moments.storage is
# accepted too), and "efficient": the r-sized variant that is not Algorithm 2.
MOMENT_MODES = (
    "full", "bf16", "factored", "efficient", "int8-factored", "int8", "bf16-factored", "adafactor", "lowrank-factored",
)


def _check_nonneg(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"Invalid {name}: {value!r} (expected a finite number >= 0)")


def _all_finite(by_device: dict[torch.device, list[Tensor]], *, exact: bool) -> bool:
    """Whether every element of the tensors is finite: foreach calls per device and dtype, one host wait.

    ``exact=False`` reads float32/float64 tensors once for their 2-norms (NaN and Inf propagate; on a CPU 2.5x
    faster than the max of |g|, which copies every tensor), so it can also say False for finite values whose
    norm overflows (|g| near 1e19 in float32); the caller then asks ``exact=True``: the max of |g| of every
    tensor, which is what half-precision tensors always get (their norms overflow at 65504 in fp16). Not the
    inf-norm: ``_foreach_norm(inf)`` takes 9x as long as the max of |g| on a CPU.
    """
    wide_dtypes = () if exact else (torch.float32, torch.float64)
    flags = []
    for gs in by_device.values():
        wide = [g for g in gs if g.dtype in wide_dtypes]
        narrow = [g for g in gs if g.dtype not in wide_dtypes]
        if wide:
            flags.append(torch.stack(torch._foreach_norm(wide)).isfinite().all())
        if narrow:
            flags.append(torch.stack(torch._foreach_max(torch._foreach_abs(narrow))).isfinite().all())
    return not flags or bool(torch.stack([f.to(flags[0].device) for f in flags]).all())


class _LoRAProOptimizer(Optimizer):
    """Shared machinery: parameter resolution, the sharding, the gradient checks, the step and loading."""

    # Hyperparameters every group of this optimizer's state dicts has, and ones only another optimizer's have.
    _GROUP_KEYS: tuple[str, ...] = ("lr", "weight_decay", "x_mode")
    _FOREIGN_GROUP_KEYS: tuple[str, ...] = ()

    def __init__(self, params: ParamsLike, defaults: dict[str, Any], process_group: Any = None) -> None:
        groups, pairs = resolve_params(params)
        self._pairs: list[LoRAPair] = pairs
        self._pair_by_B: dict[int, LoRAPair] = {id(p.B): p for p in pairs}
        self._pair_A_ids: set[int] = {id(p.A) for p in pairs}
        self._sharding = Sharding(pairs, process_group)
        super().__init__(groups, defaults)
        for group in self.param_groups:
            self._validate_group(group)

    @property
    def shard(self) -> tuple[int, int]:
        """``(rank, world_size)`` of the process group the state is sharded over; ``(0, 1)`` without one."""
        return self._sharding.rank, self._sharding.world

    def owns(self, pair: LoRAPair) -> bool:
        """Whether this rank keeps ``pair``'s optimizer state and computes its update (always, without a group)."""
        return self._sharding.owns(pair)

    @property
    def pairs(self) -> list[LoRAPair]:
        """The LoRA pairs this optimizer treats with LoRA-Pro, in the order of its ``param_groups``."""
        return list(self._pairs)

    def _validate_group(self, group: dict[str, Any]) -> None:
        _check_nonneg("learning rate", group["lr"])
        _check_nonneg("weight_decay", group["weight_decay"])
        if group["x_mode"] not in X_MODES:
            raise ValueError(f"Invalid x_mode: {group['x_mode']!r} (expected one of {', '.join(X_MODES)})")

    def _split_group(self, group: dict[str, Any]) -> tuple[list[LoRAPair], list[Tensor]]:
        pairs: list[LoRAPair] = []
        others: list[Tensor] = []
        for p in group["params"]:
            if id(p) in self._pair_A_ids:
                continue
            pair = self._pair_by_B.get(id(p))
            if pair is not None:
                if pair.A.grad is not None or pair.B.grad is not None:
                    pairs.append(pair)  # all of them, owned or not: every rank gathers and syncs the same list
            elif p.grad is not None:
                others.append(p)
        return pairs, others

    def _check_grads(self) -> bool:
        """Whether every gradient is finite; raises on a sparse gradient or on ranks that disagree about which
        tensors have a gradient.

        Each rank contributes (its non-finite flag, its sparse flag, which tensors have a gradient) to one
        agreement (:meth:`Sharding.agree`), so every rank reaches the same decision: skip the step, raise the
        same error, or step the same list of layers. A rank deciding alone could step layers the others do
        not (their new factors summed into another rank's) or wait in a collective the others never enter.
        """
        params = [p for group in self.param_groups for p in group["params"]]
        sparse = [p for p in params if p.grad is not None and p.grad.is_sparse]
        by_device: dict[torch.device, list[Tensor]] = {}
        for p in params:
            g = p.grad.to_local() if is_dtensor(p.grad) else p.grad
            if g is not None and not g.is_sparse and g.numel():
                by_device.setdefault(g.device, []).append(g)
        ok = _all_finite(by_device, exact=False) or _all_finite(by_device, exact=True)
        world = self._sharding.world
        votes = [int(not ok), int(bool(sparse))] + ([int(p.grad is not None) for p in params] if world > 1 else [])
        not_finite, with_sparse, *have_grad = self._sharding.agree(votes)
        if with_sparse:
            label = describe(sparse[0], self._pairs) if sparse else "a tensor on another rank"
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients (got one for {label})")
        split = [(describe(p, self._pairs), k) for p, k in zip(params, have_grad) if 0 < k < world]
        if split:
            shown = ", ".join(f"{label} on {k} of {world} ranks" for label, k in split[:3])
            more = f" and {len(split) - 3} more" if len(split) > 3 else ""
            raise RuntimeError(
                f"{type(self).__name__}: the ranks disagree on which tensors have a gradient ({shown}{more} have one); "
                "the optimizer state is sharded over the ranks, so every rank must hold the same (averaged) "
                "gradients, as DDP and FSDP give them. Nothing was stepped. A layer that some ranks do not use "
                "still needs a gradient on every rank (e.g. DDP(find_unused_parameters=True), or add 0 * its "
                "output to the loss)"
            )
        return not_finite == 0

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
        for pair in self._pairs:  # a PEFT layer's scale may have changed: refuse a bad one before anything moves
            _ = pair.scale
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
            pairs = self._sharding.gather(pairs)
            stepped += pairs
            for bucket in bucket_pairs((p for p in pairs if self._sharding.owns(p)), self._moment_storage(group)):
                self._step_pairs(group, bucket)
            if others:
                self._step_others(group, others)
        self._sharding.finish(stepped)
        # An entry (empty where this rank keeps nothing) for every factor once a step has run: a state dict then
        # names every trainable parameter on every rank, as torch.distributed.checkpoint's strict loading expects.
        # (Not at construction: torch.distributed.checkpoint initialises an optimizer whose state is empty by
        # stepping it with zero gradients, and an entry would stop that.)
        for pair in self._pairs:
            self.state.setdefault(pair.A, {})
            self.state.setdefault(pair.B, {})
        return loss

    def _step_pairs(self, group: dict[str, Any], pairs: list[LoRAPair]) -> None:
        raise NotImplementedError

    def _moment_storage(self, group: dict[str, Any]) -> Any:
        """How ``group`` keeps its pairs' moments (its buckets are sized for it: :func:`bucket_pairs`); None when
        it keeps no m x n moments (SGD; AdamW's ``moments="efficient"``), and buckets follow the m x n rule."""
        return None

    def _step_others(self, group: dict[str, Any], params: list[Tensor]) -> None:
        raise NotImplementedError

    def _expected_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        """The state keys (other than ``step``) a saved entry of ``param`` may hold, with their shapes."""
        return {}

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
            for key, value in (state_dict["state"].get(saved_id) or {}).items():
                if isinstance(value, Tensor) and key != "step" and self.state[param][key].dtype != value.dtype:
                    self.state[param][key] = value.to(device=param.device, copy=True)

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

        def show(d: dict[str, tuple[int, ...]]) -> str:
            return ", ".join(f"{k} {list(v)}" for k, v in sorted(d.items())) or "nothing"

        for g, mine in zip(groups, self.param_groups):
            for saved_id, param in zip(g["params"], mine["params"]):
                saved = state_dict["state"].get(saved_id)
                if not saved:
                    continue
                expected = self._expected_state(param, g)
                found = {k: tuple(v.shape) for k, v in saved.items() if k != "step" and isinstance(v, Tensor)}
                if found != expected:
                    raise ValueError(
                        f"{name}: the saved state of {describe(param, self._pairs)} holds {show(found)}, where "
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

    _FOREIGN_GROUP_KEYS = ("betas", "moments")

    def __init__(
        self, params: ParamsLike, lr: float, *, x_mode: str = "sylvester", weight_decay: float = 0.0,
        process_group: Any = None,
    ) -> None:
        super().__init__(params, {"lr": lr, "x_mode": x_mode, "weight_decay": weight_decay}, process_group)

    def _step_pairs(self, group: dict[str, Any], pairs: list[LoRAPair]) -> None:
        batch = stack_pairs(pairs)
        a, b = adjusted_lora_gradients(batch.A, batch.B, batch.gA, batch.gB, batch.scale, x_mode=group["x_mode"])
        apply_update(pairs, batch, a, b, group["lr"], group["weight_decay"])

    def _step_others(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """``p <- p (1 - lr wd) - lr g``: as torch's foreach ops for float32/float64 tensors; fp16/bf16 ones are
        computed in float32 and rounded once (a foreach multiply by a Python scalar would round the decay
        factor itself to the tensor's dtype: 0.95 becomes 0.9492 in bf16)."""
        lr, wd = group["lr"], group["weight_decay"]
        wide = [p for p in params if compute_dtype(p.dtype) == p.dtype]
        if wd and wide:
            torch._foreach_mul_(wide, 1.0 - lr * wd)
        if wide:
            torch._foreach_add_(wide, [p.grad for p in wide], alpha=-lr)
        for p in params:
            if compute_dtype(p.dtype) != p.dtype:
                p.copy_(p.float().mul_(1.0 - lr * wd).add_(p.grad.float(), alpha=-lr))


class LoRAProAdamW(_LoRAProOptimizer):
    r"""LoRA-Pro with AdamW and full-size moments (the paper's Algorithm 2, its main method).

    Per adapted layer and step ``t`` (:func:`lorapro.functional.adam_on_equivalent_gradient`):

    1. ``(a, b)`` = closed form with ``X = 0``; ``G = s B a + s b A`` (the ``m x n`` equivalent gradient);
    2. ``M = b1 M + (1-b1) G``, ``V = b2 V + (1-b2) G*G``,
       ``U = (M / (1-b1^t)) / (sqrt(V / (1-b2^t)) + eps)``;
    3. ``g_A' = s B^T U``, ``g_B' = s U A^T``;
    4. ``(a', b')`` = closed form of ``(g_A', g_B')`` with the Sylvester ``X`` (or ``X = 0``);
    5. ``A <- A (1 - lr wd) - lr a'``, ``B <- B (1 - lr wd) - lr b'``.

    ``M`` and ``V`` are ``m x n`` and live in ``state[B]`` with ``state[B]["step"]``, stored as ``moments``
    says (:mod:`lorapro.moments`):

    * ``"full"`` (default, the paper's algorithm): float32 ``M`` and ``V`` (float64 for float64 parameters),
      ``state[B]["exp_avg"]`` / ``["exp_avg_sq"]``: 8 bytes per adapted weight element;
    * ``"bf16"``: both stored in bfloat16 with stochastic rounding, all arithmetic in float32 (4 bytes);
    * ``"factored"``: ``M`` in float32, ``V`` as Adafactor's row and column statistics
      ``V_ij ~ R_i C_j / mean(R)`` (``state[B]["exp_avg_sq_row"]`` / ``["exp_avg_sq_col"]``; 4 bytes + O(m + n)).

    ``moments="efficient"`` is **not Algorithm 2**: the adjusted ``(a, b)`` of step 1 (with ``x_mode``'s ``X``)
    are fed to an ordinary AdamW with r-sized moments on ``A`` and ``B`` (``docs/algorithm.md``). It costs what
    LoRA costs and ends below plain LoRA in every measurement of docs/RESULTS.md.

    Tensors outside pairs (heads, biases, ``modules_to_save``) are trained with exactly
    :class:`torch.optim.AdamW` in the same step and with the same hyperparameters.

    Args:
        params: as for :class:`LoRAProSGD`.
        lr, betas, eps, weight_decay: as for :class:`torch.optim.AdamW` (weight decay is decoupled).
        x_mode: ``"sylvester"`` (default) or ``"zero"`` for step 4.
        moments: ``"full"`` (default), ``"bf16"``, ``"factored"`` or ``"efficient"`` (above), or a lean preset of
            :data:`lorapro.moments.STORAGES`: ``"int8-factored"``, ``"int8"``, ``"bf16-factored"``, ``"adafactor"``
            (no first moment) and ``"lowrank-factored"`` (first moment at rank 2r; both step without any m x n
            tensor), or ``"<first>-<second>"`` (:func:`lorapro.moments.storage`).
        fused: for ``"full"`` moments, run each block's elementwise Adam arithmetic as one loop compiled by
            :func:`torch.compile` (C++ on CPU, Triton on GPU) instead of six PyTorch passes; the same
            arithmetic, up to float rounding. The first step pays the compilation (seconds
            to a minute; cached on disk afterwards) and needs a C++ compiler on CPU. Default ``False``.
        process_group: a ``ProcessGroup`` or 1-D ``DeviceMesh`` whose ranks hold the same parameters and
            the same (already averaged, e.g. by DDP) gradients. Each adapted layer then has one owner rank
            (largest layers first, to the least loaded rank) that keeps its m x n moments and computes its
            update; one all-reduce of r (m + n) numbers per layer gives every rank the new factors. Per-rank
            moment memory is about 1/world of the total. ``None``: single process. See :mod:`lorapro.sharding`.
        block_elements: elements per block of the m x n pass (default: cache-sized on CPU, see
            :mod:`lorapro.moments`); a tuning knob, not a hyperparameter: it changes speed, not the result
            beyond float rounding.
    """

    _GROUP_KEYS = ("lr", "betas", "eps", "weight_decay", "x_mode", "moments")

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
        block_elements: int | None = None,
    ) -> None:
        if block_elements is not None and (not isinstance(block_elements, int) or block_elements < 1):
            raise ValueError(f"Invalid block_elements: {block_elements!r} (expected a positive int or None)")
        self._block_elements = block_elements
        # The separable presets' scratch, kept between steps (one per dtype and device, grown to the largest
        # bucket): allocated afresh each step, its pages fault in again every time on a CPU.
        self._scratch: dict[tuple[torch.dtype, torch.device], Tensor] = {}
        defaults = {
            "lr": lr, "betas": tuple(betas) if isinstance(betas, (tuple, list)) else betas, "eps": eps,
            "weight_decay": weight_decay, "x_mode": x_mode, "moments": moments, "fused": fused,
        }
        super().__init__(params, defaults, process_group)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        _check_nonneg("epsilon value", group["eps"])
        betas = group["betas"]
        ok = isinstance(betas, (tuple, list)) and len(betas) == 2
        ok = ok and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in betas)
        if not ok:
            raise ValueError(f"Invalid betas: {betas!r} (expected two numbers in [0, 1))")
        moments, fused = group["moments"], group.get("fused", False)
        try:
            store = self._moment_storage(group)
        except (ValueError, TypeError, AttributeError):
            raise ValueError(
                f"Invalid moments: {moments!r} (expected one of {', '.join(MOMENT_MODES)}, or '<first>-<second>' with "
                "first in fp32, bf16, int8, none and second in fp32, bf16, int8, factored)"
            ) from None
        if not isinstance(fused, bool):
            raise ValueError(f"Invalid fused: {fused!r} (expected True or False)")
        if fused and not (store is not None and store.fusable):
            raise ValueError(f"fused=True is for moments 'full', not {moments!r}")

    def _expected_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        storage = self._moment_storage(group)
        if storage is not None and id(param) in self._pair_A_ids:
            return {}  # a pair's moments live with its B
        pair = self._pair_by_B.get(id(param))
        if storage is None or pair is None:
            return {"exp_avg": tuple(param.shape), "exp_avg_sq": tuple(param.shape)}
        return storage.state_shapes(*pair.shape, rank=pair.rank)

    def _step_pairs(self, group: dict[str, Any], pairs: list[LoRAPair]) -> None:
        storage = self._moment_storage(group)
        if storage is None:
            self._step_projected_adamw(group, pairs, stack_pairs(pairs))
            return
        workspace = stacks = None
        if storage.separable:  # the stacks and the step's temporaries in the kept scratch
            stacked, numel = stacked_numel(pairs), separable_scratch_numel(pairs, storage)
            scratch = self._scratch_buffer(numel, compute_dtype(pairs[0].A.dtype), pairs[0].A.device)
            stacks, workspace = scratch[:stacked], scratch[stacked:numel]
        batch = stack_pairs(pairs, out=stacks)
        states = []
        for pair in pairs:
            state = self.state[self._sharding.state_key(pair.B)]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
                state.update(storage.init_state(*pair.shape, batch.A.dtype, pair.B.device, rank=pair.rank))
            states.append(state)
        torch._foreach_add_([state["step"] for state in states], 1.0)
        a, b = adam_on_equivalent_gradient(
            batch.A, batch.B, batch.gA, batch.gB, [p.scale for p in pairs], states,
            [float(state["step"]) for state in states],  # CPU tensors: no device wait
            storage=storage, betas=group["betas"], eps=group["eps"], x_mode=group["x_mode"],
            fused=group.get("fused", False),  # absent from state dicts saved without it
            block_elements=self._block_elements, workspace=workspace,
        )
        apply_update(pairs, batch, a, b, group["lr"], group["weight_decay"])

    def _moment_storage(self, group: dict[str, Any]) -> Any:
        # "efficient" keeps an ordinary AdamW's moments on the factors: no storage of m x n moments.
        return None if group["moments"] == "efficient" else moment_storage(group["moments"])

    def _scratch_buffer(self, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        buffer = self._scratch.get((dtype, device))
        if buffer is None or buffer.numel() < numel:
            self._scratch[dtype, device] = buffer = torch.empty(numel, dtype=dtype, device=device)
        return buffer

    def _step_projected_adamw(self, group: dict[str, Any], pairs: list[LoRAPair], batch: Any) -> None:
        """``moments="efficient"``: the closed form's ``(a, b)`` as the gradients of an ordinary AdamW."""
        a, b = adjusted_lora_gradients(batch.A, batch.B, batch.gA, batch.gB, batch.scale, x_mode=group["x_mode"])
        params = [t for p in pairs for t in (p.A, p.B)]
        grads = [g for i, p in enumerate(pairs) for g in (a[i].reshape(p.A.shape), b[i].reshape(p.B.shape))]
        self._adamw(group, params, grads)

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
            state = self.state[self._sharding.state_key(p)]
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
            work, grads, exp_avgs, exp_avg_sqs, [], steps,
            has_complex=any(torch.is_complex(p) for p in params), decoupled_weight_decay=True, amsgrad=False,
            beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
            maximize=False,
        )
        for p, w in zip(params, work):
            if w is not p:
                p.copy_(w)
