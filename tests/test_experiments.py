"""Smoke runs of the reproduction scripts (experiments/run.py and report.py): a few steps on a few rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args, results):
    env = {**os.environ, "LORAPRO_RESULTS": str(results)}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_run_and_report_smoke(tmp_path):
    results = tmp_path / "results"
    out = _run(["experiments/run.py", "sweep", "rt", "--smoke", "--methods", "lora", "--threads", "1"], results)
    assert "chosen lr: 0.001" in out
    _run(["experiments/run.py", "final", "rt", "--smoke", "--methods", "full,lora,lorapro,lorapro-sgd", "--threads", "1"],
         results)
    final = sorted(p.name for p in (results / "rt" / "final-smoke").iterdir())
    # SGD at its own lr, from its own sweep (run by `final`), which does not move the shared lr
    assert final == ["full-lr0.001-r8-s0", "lora-lr0.001-r8-s0", "lorapro-lr0.001-r8-s0", "lorapro-sgd-lr0.1-r8-s0"]
    assert (results / "rt" / "sweep-smoke" / "lorapro-sgd-lr0.1-r8-s0" / "metrics.json").is_file()
    assert (results / "rt" / "final-smoke" / "lorapro-lr0.001-r8-s0" / "diagnostics.json").is_file()
    assert not (results / "rt" / "final-smoke" / "full-lr0.001-r8-s0" / "diagnostics.json").exists()
    # the smoke sweep has one lr, so LoRA's best lr is the shared one: `tuned` reuses the final run
    tuned = _run(["experiments/run.py", "tuned", "rt", "--smoke", "--methods", "lora", "--threads", "1"], results)
    assert "..." not in tuned and not (results / "rt" / "tuned-smoke").exists()
    _run(["experiments/run.py", "base", "rt", "--smoke", "--threads", "1"], results)
    base = json.loads((results / "rt" / "base-smoke" / "metrics.json").read_text())
    assert base["method"] == "base" and 0.0 <= base["eval_accuracy"] <= 1.0
    # cached: a second call runs nothing
    again = _run(["experiments/run.py", "final", "rt", "--smoke", "--methods", "lora", "--threads", "1"], results)
    assert "..." not in again
    report = _run(["experiments/report.py", "--smoke", "--plots", str(tmp_path / "plots")], results)
    assert "| lorapro |" in report and "Gap closed by LoRA-Pro" in report
    assert "lr 0.001 for every method (the paper's rule, chosen on validation), except lorapro-sgd at 0.1" in report
    assert "The untrained model scores" in report
    assert (tmp_path / "plots" / "rt_methods.png").is_file() and (tmp_path / "plots" / "rt_diagnostics.png").is_file()


def test_own_grid_grows_past_a_strictly_best_edge():
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        from run import _beyond_edge
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    assert _beyond_edge({1e-2: 0.06, 1e-1: 0.0, 1.0: 0.01, 10.0: 0.0}) == 1e-3
    assert _beyond_edge({1e-2: 0.2, 1e-1: 0.25, 1.0: 0.3, 10.0: 0.4}) == 100.0
    assert _beyond_edge({1e-2: 0.2, 1e-1: 0.3, 1.0: 0.3, 10.0: 0.2}) is None  # the best is inside
    assert _beyond_edge({1e-2: 0.544, 1e-1: 0.544, 1.0: 0.544, 10.0: 0.54}) is None  # a tie at the edge
    assert _beyond_edge({1e-2: 0.5}) is None
    # (score, -loss) as run.py's sweep_key gives them: a tied score is ordered by the loss
    assert _beyond_edge({1e-3: (0.06, -4.1), 1e-2: (0.06, -2.7), 1e-1: (0.0, -8.1), 1.0: (0.01, -6.0)}) is None
    assert _beyond_edge({1e-3: (0.06, -2.6), 1e-2: (0.06, -2.7), 1e-1: (0.0, -8.1)}) == 1e-4
