"""`lorapro bench` on tiny shapes: every candidate runs, and what it reports is what the optimizers hold."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorapro.cli import bench
from lorapro.cli import main

TINY = ["--shapes", "96x64:2,40x72:1", "--rank", "4", "--warmup", "1", "--repeats", "1", "--rounds", "2"]


def test_defaults_follow_the_device():
    args = bench.build_parser().parse_args([])
    cpu = argparse.Namespace(**{**vars(args), "device": "cpu"})
    assert bench.resolve_defaults(cpu).type == "cpu"
    assert (cpu.shapes, cpu.dtype) == (bench.CPU_SHAPES, "float32")
    gpu = argparse.Namespace(**{**vars(args), "device": "cuda"})  # resolves without a GPU: nothing is allocated
    bench.resolve_defaults(gpu)
    assert (gpu.shapes, gpu.dtype) == (bench.GPU_SHAPES, "bfloat16")
    assert bench.parse_shapes(bench.GPU_SHAPES) == [(4096, 4096)] * 8 + [(11008, 4096)] * 4 + [(4096, 11008)] * 2
    explicit = argparse.Namespace(**{**vars(args), "device": "cuda", "shapes": "8x8:1", "dtype": "float32"})
    bench.resolve_defaults(explicit)
    assert (explicit.shapes, explicit.dtype) == ("8x8:1", "float32")


def test_bench_runs_every_candidate_and_reports_ratios(tmp_path, capsys):
    only = [
        "lorapro", "lorapro-bf16", "lorapro-factored", "lorapro-efficient", "paper-literal", "adamw-lora",
        "adamw-full", "floor-traffic", "floor-products",
    ]
    out = tmp_path / "bench.json"
    assert main(["bench", *TINY, "--device", "cpu", "--only", ",".join(only), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == only
    for name, row in rows.items():
        assert row["median_ms"] > 0 and row["samples"] >= 2, name
        assert row["peak_extra_mib"] >= 0, name
    # state bytes per adapted weight element: the moments as documented
    per_element = {name: rows[name]["state_bytes_per_element"] for name in only[:4] + ["adamw-full"]}
    assert per_element["lorapro"] == pytest.approx(8.0, rel=1e-3)
    assert per_element["lorapro-bf16"] == pytest.approx(4.0, rel=1e-3)
    assert 4.0 < per_element["lorapro-factored"] < 4.2  # + row and column statistics
    assert per_element["lorapro-efficient"] < 1.0  # r-sized moments only
    assert per_element["adamw-full"] == pytest.approx(8.0, rel=1e-3)
    assert "lorapro / (traffic floor + products floor) =" in text
    assert "lorapro / full fine-tuning AdamW step" in text


def test_bench_fused_row():
    args = bench.build_parser().parse_args([*TINY, "--device", "cpu", "--only", "lorapro,lorapro-fused"])
    rows = {r["name"]: r for r in bench.run(args)}
    assert rows["lorapro-fused"]["median_ms"] > 0
    assert rows["lorapro-fused"]["state_bytes_per_element"] == rows["lorapro"]["state_bytes_per_element"]


def test_separable_floor_is_exactly_the_adafactor_steps_products():
    """``floor-separable`` times the adafactor step's matrix products and nothing else: torch's flop counter
    finds the same multiply-adds in both, up to the r-sized algebra, whose count does not grow with m and n."""
    from torch.utils.flop_counter import FlopCounterMode

    rest = set()
    for m, n in ((96, 64), (192, 160)):
        layers = bench.Layers([(m, n)] * 3, 4, torch.float32, torch.device("cpu"))
        steps = bench.candidates(layers, ["lorapro-adafactor", "floor-separable"])
        flops = {}
        for name, step in steps.items():
            step()  # the first step makes the optimizer state
            with FlopCounterMode(display=False) as counter:
                step()
            flops[name] = counter.get_total_flops()
        assert flops["floor-separable"] == 2 * 3 * 4**2 * (19 * m + 17 * n)  # 36 (m + n) r^2 / 2 per layer
        rest.add(flops["lorapro-adafactor"] - flops["floor-separable"])
    assert len(rest) == 1 and 0 < rest.pop() < 2 * 3 * 32 * 4**3  # the r-sized products only (17 r^3 per layer)


def test_bench_reports_the_separable_ratios(capsys):
    only = "lorapro-adafactor,adamw-lora,floor-separable"
    assert main(["bench", *TINY, "--device", "cpu", "--only", only]) == 0
    text = capsys.readouterr().out
    assert "lorapro-adafactor / AdamW on the factors" in text
    assert "lorapro-adafactor / floor-separable" in text


def test_separable_overhead_script_times_every_row(tmp_path):
    """benchmarks/separable_overhead.py runs at toy sizes and times every row it names (one per bucket size)."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "overhead.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root / "src"))
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "separable_overhead.py"), "--layers", "4", "--small", "16",
         "--large", "64", "--rank", "4", "--threads", "1", "--rounds", "2", "--json", str(out)],
        cwd=root, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert set(figures["function"]) == {"function 16", "function 64", "step 64", "floor-separable", "adamw-lora"}
    assert set(figures["buckets"]) == {"4 per bucket", "2 per bucket", "1 per bucket"}
    assert all(ms > 0 for part in ("function", "buckets") for ms in figures[part].values())
