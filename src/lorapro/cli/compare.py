"""``lorapro compare``: the same budget, seed and data order for several methods, side by side.

Each method trains in its own process (``lorapro train``), so its wall time and peak memory are its own.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .. import _methods as registry
from .._io import atomic_write_bytes, atomic_write_json
from .checkpoints import check_is_dir, check_out_dir, earlier_run
from .config import TrainConfig
from .errors import UserError

# What `lorapro compare` (and `make demo`) trains without --methods: the paper's comparison at one lr, and LoRA at
# the lr the reproduction's validation sweep chose for it on the demo's task (1e-3 on Rotten Tomatoes, docs/RESULTS.md):
# at the shared lr LoRA barely leaves the majority class, at its own it comes level.
DEFAULT_METHODS = ("full", "lora", "lorapro", "lora@1e-3")
COMPARE_OUTPUTS = ("results.json", "loss_curves.png")  # besides one `lorapro train` directory per method


def _train_argv(cfg: TrainConfig, progress: bool = True, overwrite: bool = False) -> list[str]:
    argv = [sys.executable, "-m", "lorapro", "train"] + ([] if progress else ["--no-progress"])
    argv += ["--overwrite"] if overwrite else []
    for key, value in asdict(cfg).items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, list):
            argv += [flag, ",".join(value)]
        else:
            argv += [flag, str(value)]
    return argv


def parse_run(entry: str) -> tuple[str, float | None]:
    """``"method"`` or ``"method@lr"`` (that method at its own learning rate) -> ``(method, lr or None)``."""
    method, sep, lr_text = entry.partition("@")
    if not sep:
        return method, None
    try:
        lr = float(lr_text)
    except ValueError:
        lr = math.nan
    if not (math.isfinite(lr) and lr > 0):
        raise UserError(f"--methods {entry}: after '@' comes the method's own learning rate, a positive number")
    return method, lr


def run_name(method: str, lr: float | None) -> str:
    """The run's directory under --out, and its key in results.json."""
    return method if lr is None else f"{method}-lr{lr:g}"


def run_label(run: dict[str, Any]) -> str:
    """What the table and the plot call a run: the method's label, and its own lr when it has one."""
    own = run.get("own_lr")
    return registry.label(run["method"]) + ("" if own is None else f" (own lr {own:g})")


def metric_key(run: dict[str, Any]) -> str:
    return "eval_accuracy" if "eval_accuracy" in run else "eval_exact_match"


def format_table(runs: list[dict[str, Any]]) -> str:
    key = metric_key(runs[0])
    mem = "peak GPU MiB" if runs[0].get("device", "cpu").startswith("cuda") else "peak RSS MiB"
    header = [key, "final train loss", "wall s", "opt step ms", mem, "opt state MiB", "trainable"]
    rows = [
        [
            run_label(r),
            f"{r[key]:.4f}",
            f"{r['final_train_loss']:.4f}",
            f"{r['wall_seconds']:.0f}",
            f"{r['mean_optimizer_step_ms']:.1f}",
            f"{r['peak_memory_mib']:.0f}",
            f"{r['optimizer_state_mib']:.1f}",
            f"{r['trainable_params']:,}",
        ]
        for r in runs
    ]
    table = [["method", *header], *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_losses(runs: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in runs:
        steps = [s for s, _ in r["train_loss"]]
        losses = [v for _, v in r["train_loss"]]
        k = max(1, len(losses) // 30)  # moving average over ~1/30 of the run, for readability
        smooth = [sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1]) for i in range(len(losses))]
        ax.plot(steps, smooth, label=f"{run_label(r)} ({metric_key(r)} {r[metric_key(r)]:.3f})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"train loss (moving average of {k})")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def check_compare_out(out: Path, methods: list[str], *, overwrite: bool = False) -> None:
    """Raise :class:`UserError` unless ``out`` can take a comparison of ``methods`` (run directory names):
    no earlier comparison there (:data:`COMPARE_OUTPUTS`, or an earlier run in a run's directory) unless
    ``overwrite``. Reads only."""
    for d in (out, *(out / m for m in methods)):
        check_is_dir(d)
    found = [n for n in COMPARE_OUTPUTS if (out / n).exists()]
    found += [f"{m}/{name}" for m in methods for name in earlier_run(out / m)]
    if found and not overwrite:
        raise UserError(f"--out {out} holds an earlier comparison ({', '.join(found)}): pass --overwrite to "
                        "replace it, or choose another --out")
    for method in methods:  # what each method's `lorapro train --overwrite` will check, before the first trains
        check_out_dir(out / method, overwrite=overwrite)


def compare(
    cfg: TrainConfig, methods: list[str], out: Path, *, overwrite: bool = False, progress: bool = True, log=print
) -> dict[str, Any]:
    """Train ``methods`` one after the other with ``cfg`` and write ``results.json`` and ``loss_curves.png``.

    Each entry is a method, trained at ``cfg.lr``, or ``"method@lr"``: that method at its own lr (its run is
    ``<method>-lr<lr>``). ``out`` must not hold an earlier comparison unless ``overwrite`` (see
    :func:`check_compare_out`), which is passed on to each method's ``lorapro train``.
    """
    if not methods:
        raise UserError("--methods is empty")
    entries = [parse_run(m) for m in methods]
    names = [run_name(m, lr) for m, lr in entries]
    if len(set(names)) < len(names):
        raise UserError(f"--methods {','.join(methods)}: a run is listed twice")
    check_compare_out(out, names, overwrite=overwrite)
    runs = []
    for i, ((method, own_lr), name) in enumerate(zip(entries, names)):
        lr = cfg.lr if own_lr is None else own_lr
        run_cfg = TrainConfig.from_dict({**asdict(cfg), "method": method, "lr": lr, "out": str(out / name)})
        argv = _train_argv(run_cfg, progress, overwrite=overwrite)
        log(f"== {name}: lorapro {' '.join(argv[3:])}", flush=True)
        proc = subprocess.run(argv)
        if proc.returncode != 0:
            raise UserError(f"training {name} failed with exit code {proc.returncode} (see its output above)")
        if i == 0 and overwrite:  # the input was good: the earlier comparison's summary no longer describes --out
            for file in COMPARE_OUTPUTS:
                (out / file).unlink(missing_ok=True)
        run = json.loads((out / name / "metrics.json").read_text())
        runs.append({**run, "run": name, "own_lr": own_lr})
    own = [run_label(r) for r in runs if r["own_lr"] is not None]
    results = {
        "lr_rule": f"one learning rate for every method ({cfg.lr:g}), as in the paper; nothing tuned on the eval split"
        + (f"; besides, at their own lr: {', '.join(own)}" if own else ""),
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("method", "out")},
        "runs": [{k: v for k, v in r.items() if k != "config"} for r in runs],
    }
    atomic_write_json(out / "results.json", results)
    plot_losses(runs, out / "loss_curves.png", f"{cfg.model} on {runs[0]['data'].split(':')[0]}")
    return results
