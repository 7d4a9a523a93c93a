"""The LoRA-Pro paper's diagnostics, measured on a real training run.

* Figure 4: ``||G - g||_F``, the distance between an equivalent gradient ``G`` and the full gradient ``g`` of
  each adapted weight. For the current factors ``A``, ``B`` and scale ``s``:

  - LoRA's step moves ``W`` by ``-lr G_lora`` with ``G_lora = s^2 (B B^T g + g A^T A)``;
  - LoRA-Pro's adjusted step moves it by ``-lr G_pro`` with ``G_pro = P_B g + g P_A - P_B g P_A``, the
    projection of ``g`` onto the tangent space at ``B A`` (the best approximation a rank-r step can make).

  Both are recorded at every measured step, whichever optimizer is training, together with ``||g||_F``.
* Figure 2: the numerical ranks of ``A`` and ``B`` (``torch.linalg.matrix_rank``'s default tolerance).

The frozen base weights have no gradient in a LoRA run. On a measured step :meth:`GradientDiagnostics.watch`
makes them require grad for that one forward/backward, and a post-accumulate-grad hook on each base weight
turns its gradient into the three norms and drops it at once: one layer's ``m x n`` gradient exists at a time,
never the whole model's. ``g`` is taken as the LoRA branch sees it, so ``G`` is computed from ``g`` by the
identities ``g_A = s B^T g``, ``g_B = s g A^T`` (exact without LoRA dropout; with dropout the LoRA branch sees
other inputs and the real step differs from these ``G`` by that noise).

Only ``torch`` is imported here; :func:`plot_diagnostics` imports matplotlib when called.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .functional import compute_dtype, tangent_projection
from .pairs import LoRAPair, find_lora_pairs

__all__ = ["GradientDiagnostics", "layer_depth", "layer_type", "plot_diagnostics"]

_INDEX = re.compile(r"\.(\d+)\.")


def _module_name(pair: LoRAPair) -> str:
    return pair.name.split("[", 1)[0]


def layer_depth(name: str) -> int | None:
    """The block index of a layer (the last ``.<int>.`` component of its name), or ``None``."""
    found = _INDEX.findall(name)
    return int(found[-1]) if found else None


def layer_type(name: str) -> str:
    """What kind of weight a layer is: its name after the last block index (``attention.self.query``,
    ``mlp.down_proj``), or its last component when the name has no block index."""
    name = name.split("[", 1)[0]
    parts = _INDEX.split(name)
    if len(parts) > 1:
        return parts[-1]
    return name.rsplit(".", 1)[-1]


class GradientDiagnostics:
    """Records the paper's diagnostics for the LoRA pairs of ``model``.

    Usage, in any training loop::

        diag = GradientDiagnostics(model, every=10)
        for step, batch in enumerate(loader):
            with diag.watch(step):          # does nothing on steps that are not measured
                loss = model(**batch).loss
                loss.backward()
            opt.step(); opt.zero_grad()
        diag.records                         # list of dicts, one per layer and measured step
        plot_diagnostics(diag.records, "diagnostics.png")

    ``watch`` must wrap the forward pass too: whether a weight's gradient is computed is decided when the
    graph is built. With gradient accumulation pass ``micro_batches=k`` to :meth:`arm` / :meth:`watch` and
    run all ``k`` forward/backward passes inside: the norms are taken from the accumulated gradient.

    Args:
        model: the model (its pairs are found with :func:`lorapro.find_lora_pairs`), or pass ``pairs``.
        every: measure on steps ``0, every, 2 * every, ...``.
        pairs: the pairs to measure instead of all of the model's; pairs without a known base weight are
            skipped.
    """

    def __init__(self, model: nn.Module | None = None, *, every: int = 10, pairs: Sequence[LoRAPair] | None = None):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if pairs is None:
            if model is None:
                raise ValueError("give a model or pairs")
            pairs = find_lora_pairs(model)
        self.pairs = [p for p in pairs if p.base_weight is not None]
        if not self.pairs:
            raise ValueError(
                "none of the LoRA pairs has a known float base weight (quantized base layers have none); the full "
                "gradient cannot be measured"
            )
        self.every = every
        self.records: list[dict[str, Any]] = []
        self._handles: list[Any] = []
        self._pending: list[tuple[Tensor, dict[str, Any]]] = []
        self._step: int | None = None

    def due(self, step: int) -> bool:
        return step % self.every == 0

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def arm(self, step: int, micro_batches: int = 1) -> None:
        """Start measuring ``step``: base weights require grad until :meth:`disarm`. A layer is measured when
        its gradient has accumulated ``micro_batches`` times (or at :meth:`disarm`, if fewer came)."""
        if self._handles:
            raise RuntimeError("diagnostics are already armed; call disarm() first")
        self._step = step
        by_weight: dict[int, list[LoRAPair]] = {}
        for p in self.pairs:
            by_weight.setdefault(id(p.base_weight), []).append(p)
        for pairs in by_weight.values():
            w = pairs[0].base_weight
            frozen = not w.requires_grad
            w.requires_grad_(True)
            entry = {"pairs": pairs, "count": 0, "done": False, "frozen": frozen}
            self._pending.append((w, entry))

            def hook(param: Tensor, entry: dict[str, Any] = entry) -> None:
                entry["count"] += 1
                if entry["count"] >= micro_batches:
                    self._finish(param, entry)

            self._handles.append(w.register_post_accumulate_grad_hook(hook))

    def _finish(self, param: Tensor, entry: dict[str, Any]) -> None:
        if entry["done"]:
            return
        entry["done"] = True
        self._measure(entry["pairs"], param.grad)
        if entry["frozen"]:
            param.grad = None  # not needed any longer: one layer's m x n gradient at a time

    def disarm(self) -> None:
        """Stop measuring: layers with a partly accumulated gradient are measured now; hooks removed, base
        weights frozen again (and their gradients dropped)."""
        for w, entry in self._pending:
            if entry["count"] and not entry["done"]:
                self._finish(w, entry)
        for h in self._handles:
            h.remove()
        for w, entry in self._pending:
            if entry["frozen"]:
                w.requires_grad_(False)
                w.grad = None
        self._handles, self._pending, self._step = [], [], None

    @contextlib.contextmanager
    def watch(self, step: int, micro_batches: int = 1) -> Iterator[bool]:
        """Measure ``step`` if it is due (see :meth:`due`); yields whether it is measured."""
        if not self.due(step):
            yield False
            return
        self.arm(step, micro_batches)
        try:
            yield True
        finally:
            self.disarm()

    @torch.no_grad()
    def _measure(self, pairs: list[LoRAPair], grad: Tensor | None) -> None:
        if grad is None:
            return
        for p in pairs:
            ct = compute_dtype(p.A.dtype)
            g = p.weight_matrix(grad).to(ct)
            A, B, s = p.A_matrix().to(ct), p.B_matrix().to(ct), p.scale
            g_lora = (s * s) * (B @ (B.mT @ g) + (g @ A.mT) @ A)
            g_pro = tangent_projection(A, B, g)
            name = _module_name(p)
            self.records.append({
                "step": self._step,
                "layer": p.name,
                "type": layer_type(name),
                "depth": layer_depth(name),
                "grad_norm": float(torch.linalg.matrix_norm(g)),
                "lora_distance": float(torch.linalg.matrix_norm(g_lora - g)),
                "lorapro_distance": float(torch.linalg.matrix_norm(g_pro - g)),
                "rank_A": int(torch.linalg.matrix_rank(A)),
                "rank_B": int(torch.linalg.matrix_rank(B)),
                "r": p.rank,
            })


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per measured step: the mean over layers of the relative distances ``||G - g|| / ||g||`` and of the
    ranks; per layer type, the same at the last measured step."""
    steps = sorted({r["step"] for r in records})

    def rel(r: dict[str, Any], key: str) -> float:
        return r[key] / r["grad_norm"] if r["grad_norm"] > 0 else math.nan

    def mean(xs: list[float]) -> float:
        xs = [x for x in xs if not math.isnan(x)]
        return sum(xs) / len(xs) if xs else math.nan

    out: dict[str, Any] = {"steps": steps, "lora": [], "lorapro": [], "rank_A": [], "rank_B": []}
    for s in steps:
        rs = [r for r in records if r["step"] == s]
        out["lora"].append(mean([rel(r, "lora_distance") for r in rs]))
        out["lorapro"].append(mean([rel(r, "lorapro_distance") for r in rs]))
        out["rank_A"].append(mean([r["rank_A"] for r in rs]))
        out["rank_B"].append(mean([r["rank_B"] for r in rs]))
    return out


def plot_diagnostics(runs: dict[str, Sequence[dict[str, Any]]], path: str) -> None:
    """One PNG: ``||G - g||_F`` over training per layer type (top), per depth at the last measured step
    (middle), and the mean numerical ranks of ``A`` and ``B`` (bottom), for each run in ``runs``
    (``{label: records}``, e.g. ``{"lora": ..., "lorapro": ...}``). Each run is plotted with its own
    optimizer's equivalent gradient: runs whose label starts with ``lorapro`` use ``G_pro``, others ``G_lora``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(8, 11))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (label, records) in enumerate(runs.items()):
        key = "lorapro_distance" if label.startswith("lorapro") else "lora_distance"
        color = colors[k % len(colors)]
        types = sorted({r["type"] for r in records})
        for j, t in enumerate(types):
            steps = sorted({r["step"] for r in records if r["type"] == t})
            ys = [sum(r[key] for r in records if r["type"] == t and r["step"] == s) for s in steps]
            axes[0].plot(steps, ys, color=color, linestyle=["-", "--", ":", "-."][j % 4], label=f"{label}: {t}")
        last = max(r["step"] for r in records)
        depths = sorted({r["depth"] for r in records if r["depth"] is not None})
        if depths:
            ys = [sum(r[key] for r in records if r["step"] == last and r["depth"] == d) for d in depths]
            axes[1].plot(depths, ys, marker="o", color=color, label=f"{label} (step {last})")
        summary = summarize(records)
        axes[2].plot(summary["steps"], summary["rank_A"], color=color, label=f"{label}: rank A")
        axes[2].plot(summary["steps"], summary["rank_B"], color=color, linestyle="--", label=f"{label}: rank B")
    axes[0].set(xlabel="step", ylabel="||G - g||_F (sum over layers of the type)", yscale="log",
                title="equivalent gradient vs full gradient, per layer type")
    axes[1].set(xlabel="block (depth)", ylabel="||G - g||_F (sum over the block)", yscale="log",
                title="per depth, last measured step")
    axes[2].set(xlabel="step", ylabel="mean numerical rank", title="ranks of A and B")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
