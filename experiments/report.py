"""Aggregate experiments/results/ into the tables and plots of docs/RESULTS.md.

Generated text goes between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` markers in docs/RESULTS.md (the
text around them is written by hand); plots go to docs/results/.

    python experiments/report.py            # rewrite the generated parts of docs/RESULTS.md
    python experiments/report.py --print    # print them instead

Every function that reads results takes ``smoke``: the ``--smoke`` runs (phase directories ``<phase>-smoke``)
instead of the real ones.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import EXPERIMENTS, METHODS, OWN_LRS, RESULTS, SWEEP_METHODS, _metric, best_lr  # noqa: E402

from lorapro import _methods as registry  # noqa: E402
from lorapro._io import atomic_write_bytes  # noqa: E402

DOCS = HERE.parent / "docs"
PLOTS = DOCS / "results"  # where the plots go, unless --plots (or --smoke: a temporary directory) says otherwise


def _phase_dir(name: str, phase: str, smoke: bool) -> Path:
    return RESULTS / name / (phase + ("-smoke" if smoke else ""))


def load(name: str, phase: str, *, smoke: bool) -> list[dict]:
    runs = []
    for f in sorted(_phase_dir(name, phase, smoke).glob("*/metrics.json")):
        m = json.loads(f.read_text())
        m["_dir"] = f.parent
        runs.append(m)
    return runs


def _ms(xs: list[float]) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.3f} (1 seed)"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def _per_seed(fractions: list[float]) -> str:
    """``per seed a, b, c; mean m ± sd`` (no spread for one seed)."""
    spread = f" ± {statistics.stdev(fractions):.2f}" if len(fractions) > 1 else ""
    return f"per seed {', '.join(f'{f:.2f}' for f in fractions)}; mean {statistics.mean(fractions):.2f}{spread}"


def _by_method_seed(runs: list[dict], value=_metric) -> dict[tuple[str, int], float]:
    return {(r["method"], r["config"]["seed"]): value(r) for r in runs}


def _test_loss(run: dict) -> float:
    return run["eval_loss"]


def gap_closed(runs: list[dict], method: str = "lorapro", value=_metric) -> tuple[list[float], float | None]:
    """Per seed ``(method - lora) / (full - lora)`` (seeds where all three ran), and the same from the means;
    of the test metric, or of ``value(run)`` (the test loss: the same formula, the signs cancel)."""
    by = _by_method_seed(runs, value)
    seeds = sorted({s for (_, s) in by})
    fractions = []
    for s in seeds:
        if all((k, s) in by for k in ("full", "lora", method)):
            gap = by["full", s] - by["lora", s]
            if gap != 0:
                fractions.append((by[method, s] - by["lora", s]) / gap)
    means = {k: [v for (mm, _), v in by.items() if mm == k] for k in ("full", "lora", method)}
    of_means = None
    if all(means.values()):
        gap = statistics.mean(means["full"]) - statistics.mean(means["lora"])
        if gap != 0:
            of_means = (statistics.mean(means[method]) - statistics.mean(means["lora"])) / gap
    return fractions, of_means


def _paired(runs: list[dict], a: str, b: str) -> list[float]:
    by = _by_method_seed(runs)
    return [by[a, s] - by[b, s] for (m, s) in sorted(by) if m == a and (b, s) in by]


def sweep_table(name: str, *, smoke: bool) -> str:
    runs = load(name, "sweep", smoke=smoke)
    if not runs:
        return "_no sweep results yet_\n"
    lrs = sorted({r["config"]["lr"] for r in runs})
    methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
    labels = [registry.label(m) for m in methods]
    lines = [f"| lr | {' | '.join(labels)} | mean of {', '.join(map(registry.label, SWEEP_METHODS))} |",
             "|---" * (len(methods) + 2) + "|"]
    for lr in lrs:
        vals = {r["method"]: _metric(r) for r in runs if r["config"]["lr"] == lr}
        row = [f"{vals[m]:.3f}" if m in vals else "-" for m in methods]
        shared = [v for m, v in vals.items() if m in SWEEP_METHODS]  # what chooses the shared lr
        mean = f"{statistics.mean(shared):.3f}" if shared else "-"
        lines.append(f"| {lr:g} | " + " | ".join(row) + f" | {mean} |")
    best = []
    for m in methods:
        lr = best_lr(name, m, smoke)  # run.py's own choice, so the table shows what the runs used
        top = next(r for r in runs if r["method"] == m and r["config"]["lr"] == lr)
        best.append(f"{registry.label(m)} {top['config']['lr']:g} ({_metric(top):.3f})")
    lines += ["", "Best validation lr per method: " + "; ".join(best) + "."]
    return "\n".join(lines) + "\n"


def load_tuned(name: str, *, smoke: bool) -> list[dict]:
    """The ``tuned`` runs, and the ``final`` runs of the swept methods whose best validation lr is the shared one
    (run.py reuses those instead of repeating them)."""
    runs = load(name, "tuned", smoke=smoke)
    if not runs:
        return runs
    have = {r["method"] for r in runs}
    swept = {r["method"] for r in load(name, "sweep", smoke=smoke)} - set(OWN_LRS) - have
    best = {m: best_lr(name, m, smoke) for m in swept}  # each reads the sweep directory: once per method
    for r in load(name, "final", smoke=smoke):
        m = r["method"]
        if m in best and r["config"]["lr"] == best[m]:
            runs.append(r)
    return runs


def final_table(name: str, phase: str = "final", *, smoke: bool) -> str:
    runs = load_tuned(name, smoke=smoke) if phase == "tuned" else load(name, phase, smoke=smoke)
    if not runs:
        return f"_no {phase} results yet_\n"
    metric = "accuracy" if "eval_accuracy" in runs[0] else "exact match"
    if phase == "final":
        lr = next(r["config"]["lr"] for r in runs if r["method"] not in OWN_LRS)
        own = sorted({(r["method"], r["config"]["lr"]) for r in runs if r["method"] in OWN_LRS})
        how = ("the paper's rule, chosen on validation" if load(name, "sweep", smoke=smoke)
               else "no sweep on this task: given to run.py")
        head = f"lr {lr:g} for every method ({how})" + "".join(
            f", except {registry.label(m)} at {v:g} (SGD: its best validation lr on its own grid)" for m, v in own
        ) + "; "
    else:
        lrs = {r["method"]: r["config"]["lr"] for r in runs}
        head = ("Secondary view, not the paper's rule: each method at its own best validation lr ("
                + ", ".join(f"{registry.label(m)} {v:g}" for m, v in lrs.items()) + "); ")
    # Exact match on a few hundred problems is coarse: the generative tasks also show the held-out loss.
    lm = metric == "exact match" and all("eval_loss" in r for r in runs)
    lines = [
        head + f"test-set {metric}" + (" and loss (mean cross-entropy of the completion tokens)" if lm else "")
        + ", mean ± std over seeds; optimizer step and state from the same runs (2 CPU "
        "cores, shared machine: times are indicative).",
        "",
        f"| method | test {metric} |" + (" test loss |" if lm else "")
        + " seeds | opt. step ms | opt. state MiB | trainable params |",
        "|---|---|" + ("---|" if lm else "") + "---|---|---|---|",
    ]
    for method in METHODS:
        rs = [r for r in runs if r["method"] == method]
        if not rs:
            continue
        loss = f" {_ms([_test_loss(r) for r in rs])} |" if lm else ""
        lines.append(
            f"| {registry.label(method)} | {_ms([_metric(r) for r in rs])} |{loss} {len(rs)} | "
            f"{statistics.mean(r['mean_optimizer_step_ms'] for r in rs):.1f} | "
            f"{statistics.mean(r['optimizer_state_mib'] for r in rs):.1f} | {rs[0]['trainable_params']:,} |"
        )
    fractions, of_means = gap_closed(runs)
    lines.append("")
    means = {k: [_metric(r) for r in runs if r["method"] == k] for k in ("full", "lora", "lorapro")}
    if all(means.values()) and statistics.mean(means["full"]) <= statistics.mean(means["lora"]):
        diffs = _paired(runs, "lorapro", "lora")
        lines.append(
            f"**No gap to close at this lr**: full fine-tuning ({statistics.mean(means['full']):.3f}) does not beat "
            f"LoRA ({statistics.mean(means['lora']):.3f}). LoRA-Pro - LoRA per seed: "
            f"{', '.join(f'{d:+.3f}' for d in diffs)}."
        )
    elif fractions:
        lines.append(
            f"**Gap closed by LoRA-Pro** ((LoRA-Pro − LoRA) / (full − LoRA)): {_per_seed(fractions)}"
            + (f"; from the means {of_means:.2f}." if of_means is not None else ".")
        )
    if lm:
        fractions, _ = gap_closed(runs, value=_test_loss)
        if fractions:
            lines.append(f"\nGap closed on the test loss ((LoRA − LoRA-Pro) / (LoRA − full)): {_per_seed(fractions)}.")
    return "\n".join(lines) + "\n"


def rank_table(name: str, *, smoke: bool) -> str:
    runs = load(name, "rank", smoke=smoke)
    if not runs:
        return "_no rank ablation yet_\n"
    base = {r["method"] for r in runs}  # rank 8 is the `final` run itself (run.py reuses it)
    runs += [r for r in load(name, "final", smoke=smoke) if r["method"] in base and r["config"]["rank"] == 8]
    lines = ["| method | rank 8 | rank 32 |", "|---|---|---|"]
    for method in sorted({r["method"] for r in runs}, key=METHODS.index):
        cells = [_ms([_metric(r) for r in runs if r["method"] == method and r["config"]["rank"] == k]) for k in (8, 32)]
        lines.append(f"| {registry.label(method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _bar_color(name: str) -> str:
    method = registry.get(name)
    return "C2" if not method.lora else "C1" if method.lorapro is not None else "C0"


def plots(name: str, *, smoke: bool, plots_dir: Path) -> list[str]:
    """Bar chart of the final runs and the diagnostics figure of seed 0, into ``plots_dir``; returns markdown
    image lines."""
    runs = load(name, "final", smoke=smoke)
    out = []
    if not runs:
        return out
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir.mkdir(parents=True, exist_ok=True)
    methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
    means = [statistics.mean(_metric(r) for r in runs if r["method"] == m) for m in methods]
    stds = [
        statistics.stdev([_metric(r) for r in runs if r["method"] == m])
        if sum(r["method"] == m for r in runs) > 1 else 0.0 for m in methods
    ]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar(range(len(methods)), means, yerr=stds, capsize=3, color=[_bar_color(m) for m in methods])
    ax.set_xticks(range(len(methods)), [registry.label(m) for m in methods], rotation=40, ha="right")
    lo = min(m - s for m, s in zip(means, stds))
    ax.set_ylim(max(0.0, lo - 0.05), min(1.0, max(m + s for m, s in zip(means, stds)) + 0.03))
    ax.set_ylabel("test " + ("accuracy" if "eval_accuracy" in runs[0] else "exact match"))
    ax.set_title(f"{name}: mean ± std over seeds")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = plots_dir / f"{name}_methods.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    out.append(f"![{name} methods](results/{path.name})")
    diag = {}
    for method in ("lora", "lorapro"):
        for r in runs:
            f = r["_dir"] / "diagnostics.json"
            if r["method"] == method and r["config"]["seed"] == min(x["config"]["seed"] for x in runs) and f.exists():
                diag[method] = json.loads(f.read_text())["records"]
    if diag:
        from lorapro.diagnostics import plot_diagnostics

        path = plots_dir / f"{name}_diagnostics.png"
        plot_diagnostics(diag, str(path))
        out.append(f"![{name} diagnostics](results/{path.name})")
    return out


def diagnostics_summary(name: str, *, smoke: bool) -> str:
    from lorapro.diagnostics import summarize

    runs = load(name, "final", smoke=smoke)
    lines = []
    for method in ("lora", "lorapro"):
        rel = []
        for r in runs:
            f = r["_dir"] / "diagnostics.json"
            if r["method"] == method and f.exists():
                s = summarize(json.loads(f.read_text())["records"])
                key = "lorapro" if method == "lorapro" else "lora"
                rel.append((s[key][0], s[key][-1], s["rank_B"][-1], s["rank_A"][-1], s["steps"][-1]))
        if rel:
            lines.append(
                f"| {registry.label(method)} | {statistics.mean(x[0] for x in rel):.3f} | "
                f"{statistics.mean(x[1] for x in rel):.3f} | "
                f"{statistics.mean(x[3] for x in rel):.1f} / {statistics.mean(x[2] for x in rel):.1f} | {len(rel)} |"
            )
    if not lines:
        return ""
    head = [
        "Mean over layers of ||G − g||_F / ||g||_F with each run's own equivalent gradient, first and last measured "
        "step, and the mean numerical ranks of A / B at the last one:",
        "",
        "| run | rel. distance, first step | last step | rank A / B (last) | seeds |",
        "|---|---|---|---|---|",
    ]
    return "\n".join(head + lines) + "\n"


def base_line(name: str, *, smoke: bool) -> str | None:
    f = _phase_dir(name, "base", smoke) / "metrics.json"
    if not f.exists():
        return None
    m = json.loads(f.read_text())
    return f"The untrained model scores {_metric(m):.3f} on the test split (`run.py base {name}`).\n"


def generated(name: str, *, smoke: bool, plots_dir: Path) -> str:
    exp = EXPERIMENTS[name]
    parts = [
        f"Model `{exp['model']}`, data `{exp['train']}`; {exp['steps']} steps x batch {exp['batch']}, max length "
        f"{exp['max_length']}, rank {exp['rank']} (alpha {exp['alpha']}), cosine schedule, 3% warm-up.",
        "",
        base_line(name, smoke=smoke),
        "Learning-rate sweep (validation split carved from the training rows; seed 0):",
        "",
        sweep_table(name, smoke=smoke),
        final_table(name, smoke=smoke),
        final_table(name, "tuned", smoke=smoke) if load(name, "tuned", smoke=smoke) else None,
        diagnostics_summary(name, smoke=smoke),
        "Rank ablation (same lr, alpha scaled with r so that s = alpha / r stays fixed):",
        "",
        rank_table(name, smoke=smoke),
        *[line + "\n" for line in plots(name, smoke=smoke, plots_dir=plots_dir)],
    ]
    return "\n".join(p for p in parts if p is not None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--print", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="report the --smoke runs (implies --print)")
    ap.add_argument("--plots", help="directory for the plots (default docs/results; with --smoke a temporary one)")
    args = ap.parse_args()
    plots_dir = PLOTS
    if args.smoke:  # smoke plots never replace the committed ones
        args.print = True
        plots_dir = Path(tempfile.mkdtemp(prefix="lorapro-smoke-plots-"))
    if args.plots:
        plots_dir = Path(args.plots)
    names = [n for n in EXPERIMENTS if (RESULTS / n).exists()]
    if args.print:
        for n in names:
            print(f"## {n}\n\n{generated(n, smoke=args.smoke, plots_dir=plots_dir)}")
        return
    path = DOCS / "RESULTS.md"
    text = path.read_text(encoding="utf-8")
    for n in names:
        pattern = re.compile(rf"(<!-- BEGIN {n} -->\n).*?(<!-- END {n} -->)", re.S)
        if not pattern.search(text):
            print(f"docs/RESULTS.md has no <!-- BEGIN {n} --> marker; skipped", file=sys.stderr)
            continue
        section = generated(n, smoke=args.smoke, plots_dir=plots_dir)
        text = pattern.sub(lambda m: m.group(1) + section + m.group(2), text)
    atomic_write_bytes(path, lambda f: f.write(text.encode("utf-8")))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
