"""``lorapro compare``: the same budget, seed and data order for several methods, side by side.

Each method trains in its own process (``lorapro train``), so its wall time and peak memory are its own.
"""

from __future__ import annotations

import json
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

DEFAULT_METHODS = ("full", "lora", "lorapro")  # what `lorapro compare` (and `make demo`) trains without --methods
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


def metric_key(run: dict[str, Any]) -> str:
    return "eval_accuracy" if "eval_accuracy" in run else "eval_exact_match"


def format_table(runs: list[dict[str, Any]]) -> str:
    key = metric_key(runs[0])
    mem = "peak GPU MiB" if runs[0].get("device", "cpu").startswith("cuda") else "peak RSS MiB"
    header = [key, "final train loss", "wall s", "opt step ms", mem, "opt state MiB", "trainable"]
    rows = [
        [
            registry.label(r["method"]),
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
        ax.plot(steps, smooth, label=f"{registry.label(r['method'])} ({metric_key(r)} {r[metric_key(r)]:.3f})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"train loss (moving average of {k})")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def check_compare_out(out: Path, methods: list[str], *, overwrite: bool = False) -> None:
    """Raise :class:`UserError` unless ``out`` can take a comparison of ``methods``: no earlier comparison there
    (:data:`COMPARE_OUTPUTS`, or an earlier run in a method's directory) unless ``overwrite``. Reads only."""
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

    ``out`` must not hold an earlier comparison unless ``overwrite`` (see :func:`check_compare_out`), which is
    passed on to each method's ``lorapro train``.
    """
    if not methods:
        raise UserError("--methods is empty")
    check_compare_out(out, methods, overwrite=overwrite)
    runs = []
    for i, method in enumerate(methods):
        run_cfg = TrainConfig.from_dict({**asdict(cfg), "method": method, "out": str(out / method)})
        argv = _train_argv(run_cfg, progress, overwrite=overwrite)
        log(f"== {method}: lorapro {' '.join(argv[3:])}", flush=True)
        proc = subprocess.run(argv)
        if proc.returncode != 0:
            raise UserError(f"training {method} failed with exit code {proc.returncode} (see its output above)")
        if i == 0 and overwrite:  # the input was good: the earlier comparison's summary no longer describes --out
            for name in COMPARE_OUTPUTS:
                (out / name).unlink(missing_ok=True)
        runs.append(json.loads((out / method / "metrics.json").read_text()))
    results = {
        "lr_rule": f"one learning rate for every method ({cfg.lr:g}), as in the paper; nothing tuned on the eval split",
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("method", "out")},
        "runs": [{k: v for k, v in r.items() if k != "config"} for r in runs],
    }
    atomic_write_json(out / "results.json", results)
    plot_losses(runs, out / "loss_curves.png", f"{cfg.model} on {runs[0]['data'].split(':')[0]}")
    return results
