"""Run the small-scale reproduction of the LoRA-Pro paper's claims (results go to docs/RESULTS.md).

Every run is one ``lorapro train`` process. Its ``metrics.json`` (and ``diagnostics.json`` when asked) is kept
under ``experiments/results/<experiment>/<phase>/<run>/``; the weights go to a scratch directory and are
deleted. A run whose result exists is skipped, so an interrupted campaign continues where it stopped.

Protocol (the paper's: one learning rate for all methods):
  * The builtin training rows are split once, with a fixed seed, into train and validation (``val`` rows); the
    builtin held-out split is the test set. ``sweep`` trains the sweep methods at each learning rate on train
    and scores them on validation; the lr with the best mean validation score over those methods is the one
    every method uses in ``final`` and the ablations, which score on the test set. The test set plays no part
    in choosing anything.
  * One exception: ``lorapro-sgd`` is plain gradient descent, whose useful learning rates are orders of magnitude
    above Adam's (at the shared Adam lr it does not move); it gets its own sweep (``OWN_LRS``, same data and
    budget, validation only; a decade is added past an edge of the grid that is strictly its best), run by
    ``final`` when missing, and its best validation lr.
  * ``final``: every method, several seeds. ``rank``: LoRA and LoRA-Pro at ranks 8 and 32. X's ablation is
    ``lorapro`` (Sylvester X) against ``lorapro-zero`` (X = 0) in ``final``.
  * ``tuned`` (secondary, not the paper's rule): full, LoRA and LoRA-Pro each at its own best validation lr.
  * ``base``: the untrained model on the test split (``lorapro eval``'s scoring), what the runs start from.

    python experiments/run.py sweep rt                 # lr sweep on validation
    python experiments/run.py final rt                 # all methods x 3 seeds at the chosen lr, on test
    python experiments/run.py rank rt                  # rank 8 / 32 ablation
    python experiments/run.py all rt                   # the three in order
    python experiments/run.py final rt --smoke         # a few steps on a few rows (what CI runs)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lorapro import _methods as registry
from lorapro._io import atomic_write_bytes, replace_dir
from lorapro.cli.compare import metric_key

HERE = Path(__file__).resolve().parent
RESULTS = Path(os.environ.get("LORAPRO_RESULTS", HERE / "results"))  # tests point this elsewhere


def _table_order(method: registry.Method) -> int:
    """Full fine-tuning, the LoRA baselines, then LoRA-Pro: AdamW with fp32 moments, SGD, the memory options."""
    if not method.lora:
        return 0
    if method.lorapro is None:
        return 1
    if method.lorapro == "sgd":
        return 3
    return 2 if method.lorapro_kwargs["moments"] == "full" else 4


# Every method of the registry, in the order of the report's tables and plots (within a group, the registry's).
METHODS = [m.name for m in sorted(registry.METHODS, key=_table_order)]
SWEEP_METHODS = ["full", "lora", "lorapro"]
# Methods swept on their own grid instead of using the shared lr (SGD's scale is not Adam's).
OWN_LRS = {"lorapro-sgd": [1e-2, 1e-1, 1.0, 10.0]}
OWN_LR_EXTEND = 2  # decades an own grid may grow past an edge that is strictly its best (see own_lr)
DIAGNOSE = {"lora", "lorapro"}  # runs that record the paper's diagnostics in `final`
for _name in (*SWEEP_METHODS, *OWN_LRS, *DIAGNOSE):
    registry.get(_name)  # every method an experiment picks is one of the registry's

EXPERIMENTS = {
    # MiniLM (22.7M) sentiment: the demo's setting.
    "rt": dict(model="minilm", train="rotten-tomatoes", steps=100, batch=32, max_length=64, rank=8, alpha=16,
               val=1000, max_eval=None, lrs=[1e-4, 2e-4, 5e-4, 1e-3], seeds=[0, 1, 2], diagnostics_every=10),
    # MiniLM question classification (6 classes).
    "trec": dict(model="minilm", train="trec", steps=100, batch=32, max_length=32, rank=8, alpha=16,
                 val=500, max_eval=None, lrs=[1e-4, 2e-4, 5e-4, 1e-3], seeds=[0, 1, 2], diagnostics_every=10),
    # SmolLM2-135M on GSM-style word problems (exact match of the final number).
    "gsm": dict(model="smollm2-135m", train="gsm-symbolic", steps=100, batch=8, max_length=256, rank=8, alpha=16,
                val=100, max_eval=200, lrs=[1e-4, 5e-4], seeds=[0, 1, 2], diagnostics_every=20),
    # SmolLM2-135M on reasoning-gym's basic arithmetic (up to 6 terms of up to 4 digits).
    "arith": dict(model="smollm2-135m", train="basic-arithmetic", steps=100, batch=16, max_length=64, rank=8,
                  alpha=16, val=100, max_eval=200, lrs=[1e-4, 5e-4], seeds=[0, 1, 2], diagnostics_every=20),
    # SmolLM2-135M on two-term sums and differences up to 100: full fine-tuning reached 4% on `arith` in 100
    # steps (40 minutes a run here), so an easier task where the methods can separate, at half the batch.
    "easy": dict(model="smollm2-135m", train="easy-arithmetic", steps=100, batch=8, max_length=64, rank=8,
                 alpha=16, val=100, max_eval=200, lrs=[1e-4, 5e-4], seeds=[0, 1, 2], diagnostics_every=20),
}

SMOKE = dict(steps=3, batch=4, val=8, max_train=32, max_eval=8, lrs=[1e-3], seeds=[0], diagnostics_every=1)


def _metric(m: dict) -> float:
    return m[metric_key(m)]


def write_splits(name: str, exp: dict, smoke: bool) -> dict[str, Path]:
    """train / val / test JSONL files for ``name`` (written once; the split never depends on a run's seed)."""
    from lorapro.cli.data import load_task_data

    d = RESULTS / name / ("data-smoke" if smoke else "data")
    paths = {k: d / f"{k}.jsonl" for k in ("train", "val", "test")}
    if all(p.exists() for p in paths.values()):
        return paths
    data = load_task_data(None, exp["train"], None, max_eval=exp.get("max_eval"))
    rows = list(data.train)
    random.Random(12345).shuffle(rows)
    val, train = rows[: exp["val"]], rows[exp["val"] :]
    test = list(data.eval)
    if smoke:
        train, test = train[: SMOKE["max_train"]], test[: SMOKE["max_eval"]]
    keep = ("text", "label") if data.task == "classification" else ("prompt", "completion")
    for key, part in (("train", train), ("val", val), ("test", test)):
        text = "".join(json.dumps({k: row[k] for k in keep}) + "\n" for row in part)
        atomic_write_bytes(paths[key], lambda f: f.write(text.encode()))
    (d / "task").write_text(data.task)
    return paths


def run_one(name: str, exp: dict, phase: str, method: str, *, lr: float, seed: int, rank: int, split: str,
            smoke: bool, diagnostics: int | None, threads: int | None) -> dict:
    tag = f"{method}-lr{lr:g}-r{rank}-s{seed}"
    dest = RESULTS / name / (phase + ("-smoke" if smoke else "")) / tag
    if (dest / "metrics.json").exists():
        return json.loads((dest / "metrics.json").read_text())
    paths = write_splits(name, exp, smoke)
    task = (paths["train"].parent / "task").read_text()
    scratch = Path(tempfile.mkdtemp(prefix=f"lorapro-{name}-{tag}-"))
    cmd = [
        sys.executable, "-m", "lorapro", "train", "--model", exp["model"], "--task", task,
        "--train", str(paths["train"]), "--eval", str(paths[split]), "--method", method,
        "--rank", str(rank), "--alpha", str(exp["alpha"] * rank / exp["rank"]), "--lr", str(lr),
        "--max-steps", str(SMOKE["steps"] if smoke else exp["steps"]),
        "--batch-size", str(SMOKE["batch"] if smoke else exp["batch"]),
        "--max-length", str(exp["max_length"]), "--seed", str(seed), "--out", str(scratch / "out"), "--no-progress",
    ]
    if threads:
        cmd += ["--threads", str(threads)]
    if diagnostics:
        cmd += ["--diagnostics", str(diagnostics)]
    start = time.time()
    print(f"[{name}/{phase}] {tag} ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(scratch, ignore_errors=True)
        raise SystemExit(f"run {name}/{phase}/{tag} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in ("metrics.json", "diagnostics.json", "diagnostics.png"):
        if (scratch / "out" / f).exists():
            shutil.copy(scratch / "out" / f, tmp / f)
    shutil.rmtree(scratch, ignore_errors=True)
    replace_dir(tmp, dest)
    m = json.loads((dest / "metrics.json").read_text())
    print(f"[{name}/{phase}] {tag}: {_metric(m):.4f} in {time.time() - start:.0f} s", flush=True)
    return m


def run_final(name: str, exp: dict, method: str, *, lr: float, seed: int, rank: int, smoke: bool,
              threads: int | None) -> dict:
    """The ``final`` run of one configuration (on test; diagnostics for the methods in DIAGNOSE). The ``tuned``
    and ``rank`` phases call it for their configurations that are a final run, so none is run twice."""
    diagnostics = exp["diagnostics_every"] if method in DIAGNOSE else None
    return run_one(name, exp, "final", method, lr=lr, seed=seed, rank=rank, split="test", diagnostics=diagnostics,
                   smoke=smoke, threads=threads)


def run_base(name: str, exp: dict, *, smoke: bool, threads: int | None) -> dict:
    """The untrained model scored on the test split (``lorapro eval``'s :func:`~lorapro.cli.evaluate.run_eval`,
    in this process): what training starts from."""
    import torch

    from lorapro.cli import set_environment
    from lorapro.cli.errors import UserError
    from lorapro.cli.evaluate import run_eval

    dest = RESULTS / name / ("base" + ("-smoke" if smoke else "")) / "metrics.json"
    if dest.exists():
        return json.loads(dest.read_text())
    paths = write_splits(name, exp, smoke)
    task = (paths["train"].parent / "task").read_text()
    set_environment()
    if threads:
        torch.set_num_threads(threads)
    try:
        metrics = run_eval(exp["model"], str(paths["test"]), task=task, train=str(paths["train"]),
                           max_length=exp["max_length"])
    except UserError as e:
        raise SystemExit(f"base eval of {name} failed: {e}") from None
    m = {k: float(f"{v:.4f}") for k, v in metrics.items()}  # the four decimals `lorapro eval` prints
    m["method"] = "base"
    atomic_write_bytes(dest, lambda f: f.write(json.dumps(m, indent=1).encode()))
    print(f"[{name}/base] {_metric(m):.4f}", flush=True)
    return m


def own_lr(name: str, exp: dict, method: str, *, smoke: bool, threads: int | None) -> float:
    """The best validation lr of ``method`` on its own grid (``OWN_LRS``), sweeping what is missing.

    When the grid's lowest or highest lr is strictly better than every other, the optimum may lie outside it:
    the grid is extended by a decade on that side, up to ``OWN_LR_EXTEND`` times."""
    def sweep(lr: float) -> None:
        run_one(name, exp, "sweep", method, lr=lr, seed=0, rank=exp["rank"], split="val", diagnostics=None,
                smoke=smoke, threads=threads)

    for lr in OWN_LRS[method][1:2] if smoke else OWN_LRS[method]:
        sweep(lr)
    for _ in range(0 if smoke else OWN_LR_EXTEND):
        lr = _beyond_edge(sweep_scores(name, method, smoke))
        if lr is None:
            break
        sweep(lr)
    return best_lr(name, method, smoke)


def _beyond_edge(scores: dict[float, tuple[float, float]]) -> float | None:
    """The lr a decade past the swept range when its edge is strictly the best, else None."""
    lrs = sorted(scores)
    if len(lrs) < 2:
        return None
    for edge, beyond in ((lrs[0], lrs[0] / 10), (lrs[-1], lrs[-1] * 10)):
        if all(scores[edge] > v for lr, v in scores.items() if lr != edge):
            return float(f"{beyond:.3g}")
    return None


def sweep_key(m: dict) -> tuple[float, float]:
    """How sweep runs of one method are ordered: the validation score, then (on a tie, as when every lr leaves
    a classifier on the majority class or a generator at the same few exact answers) the lower loss."""
    return (_metric(m), -m["eval_loss"])


def sweep_scores(name: str, method: str, smoke: bool) -> dict[float, tuple[float, float]]:
    """``sweep_key`` per swept lr of ``method``."""
    d = RESULTS / name / ("sweep" + ("-smoke" if smoke else ""))
    scores = {}
    for f in sorted(d.glob(f"{method}-lr*/metrics.json")):
        m = json.loads(f.read_text())
        if m["method"] == method:
            scores[m["config"]["lr"]] = sweep_key(m)
    return scores


def best_lr(name: str, method: str, smoke: bool) -> float:
    """The sweep's learning rate with the best ``sweep_key`` for ``method`` alone."""
    scores = sweep_scores(name, method, smoke)
    if not scores:
        raise SystemExit(f"no sweep result for {method} on {name}")
    return max(scores, key=lambda lr: (scores[lr], -lr))


def chosen_lr(name: str, smoke: bool) -> float:
    """The sweep's learning rate with the best mean validation score over the sweep methods."""
    d = RESULTS / name / ("sweep" + ("-smoke" if smoke else ""))
    scores: dict[float, list[float]] = {}
    for f in sorted(d.glob("*/metrics.json")):
        m = json.loads(f.read_text())
        if m["method"] in SWEEP_METHODS:  # not the own-grid sweeps of OWN_LRS
            scores.setdefault(m["config"]["lr"], []).append(_metric(m))
    if not scores:
        raise SystemExit(f"no sweep results for {name}: run `python experiments/run.py sweep {name}` first")
    return max(scores, key=lambda lr: (statistics.mean(scores[lr]), -lr))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["sweep", "final", "tuned", "rank", "base", "all"])
    ap.add_argument("experiment", choices=sorted(EXPERIMENTS))
    ap.add_argument("--methods", help="comma-separated subset (default: the phase's)")
    ap.add_argument("--seeds", help="comma-separated seeds (default: the experiment's)")
    ap.add_argument("--lr", type=float, help="override the swept learning rate")
    ap.add_argument("--smoke", action="store_true", help="a few steps on a few rows, to check the pipeline")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    exp = dict(EXPERIMENTS[args.experiment])
    if args.smoke:
        exp.update({k: v for k, v in SMOKE.items() if k in exp})
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else exp["seeds"]
    phases = ["sweep", "final", "tuned", "rank"] if args.phase == "all" else [args.phase]
    common = dict(smoke=args.smoke, threads=args.threads)
    for phase in phases:
        if phase == "base":
            run_base(args.experiment, exp, **common)
            continue
        if phase == "sweep":
            methods = args.methods.split(",") if args.methods else SWEEP_METHODS
            for lr in exp["lrs"]:
                for method in methods:
                    if method in OWN_LRS:
                        continue
                    run_one(args.experiment, exp, "sweep", method, lr=lr, seed=0, rank=exp["rank"], split="val",
                            diagnostics=None, **common)
            for method in methods:
                if method in OWN_LRS:
                    own_lr(args.experiment, exp, method, **common)
            print(f"chosen lr: {chosen_lr(args.experiment, args.smoke):g}")
            continue
        if phase == "tuned":  # a secondary view: each sweep method at its own best validation lr
            methods = args.methods.split(",") if args.methods else SWEEP_METHODS
            shared = chosen_lr(args.experiment, args.smoke)
            best = {method: best_lr(args.experiment, method, args.smoke) for method in methods}
            for seed in seeds:
                for method in methods:
                    if best[method] == shared:  # the `final` run itself
                        run_final(args.experiment, exp, method, lr=shared, seed=seed, rank=exp["rank"], **common)
                    else:
                        run_one(args.experiment, exp, "tuned", method, lr=best[method], seed=seed, rank=exp["rank"],
                                split="test", diagnostics=None, **common)
            continue
        lr = args.lr if args.lr is not None else chosen_lr(args.experiment, args.smoke)
        if phase == "final":
            methods = args.methods.split(",") if args.methods else METHODS
            lrs = {m: own_lr(args.experiment, exp, m, **common) if m in OWN_LRS else lr for m in methods}
            for seed in seeds:
                for method in methods:
                    run_final(args.experiment, exp, method, lr=lrs[method], seed=seed, rank=exp["rank"], **common)
        else:
            methods = args.methods.split(",") if args.methods else ["lora", "lorapro"]
            for rank in (8, 32):
                for seed in seeds:
                    for method in methods:
                        if rank == exp["rank"]:  # the `final` run itself
                            run_final(args.experiment, exp, method, lr=lr, seed=seed, rank=rank, **common)
                        else:
                            run_one(args.experiment, exp, "rank", method, lr=lr, seed=seed, rank=rank, split="test",
                                    diagnostics=None, **common)


if __name__ == "__main__":
    main()
