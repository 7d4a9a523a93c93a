"""benchmarks/gpu_check.py (the prepared GPU check) runs end to end on the CPU with --smoke, so it cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["device_tests", "syncs", "bench", "train_step", "memory"]


def test_gpu_check_smoke(tmp_path):
    out = tmp_path / "gpu"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--device", "cpu", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert (out / "summary.txt").is_file() and "[bench]" in (out / "summary.txt").read_text()
    assert results["smoke"] and results["device"] == "cpu"
    for name in STEPS:
        step = results["steps"][name]
        status = step["status"]
        if name == "syncs":  # CUDA's sync debug mode: nothing to count on a CPU, and it says so
            assert status.startswith("skipped: no CUDA"), step
        else:
            assert status.startswith("ok"), f"{name}: {status}\n{step.get('traceback', '')}{step.get('output_tail', '')}"
    checks = results["steps"]["device_tests"]["checks"]
    assert checks and not [c for c in checks if c.get("passed") is False]
    assert {c["check"] for c in checks} == {"reference", "bf16 params finite, dtype kept", "state_dict resume bit-exact"}
    bench_rows = {r["name"]: r for run in results["steps"]["bench"]["runs"] for r in run["rows"]}
    for name in ("lorapro", "lorapro-int8-factored", "lorapro-bf16-factored", "lorapro-adafactor", "adamw-lora",
                 "floor-separable", "adamw-full", "floor-traffic", "floor-products"):
        assert bench_rows[name]["median_ms"] > 0
    train = {r["method"]: r for r in results["steps"]["train_step"]["rows"]}
    assert train["lora"]["step_ms"] > 0 and train["lorapro"]["step_ms"] > 0
    memory = {r["method"]: r for r in results["steps"]["memory"]["rows"]}
    assert memory["lorapro"]["plan_total"] > memory["lorapro-adafactor"]["plan_total"] > 0
