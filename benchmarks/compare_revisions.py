"""The optimizer step of this tree against another git revision's, in one process, round-robin.

A refactor must not slow the step down. Timing two checkouts in two runs compares two states of a shared,
noisy machine; here both packages are loaded into one process (the other revision's ``src/lorapro`` exported
with ``git archive`` and imported under another name; every import inside the package is relative) and every
round times each mode with both, so drift cancels in the per-round ratio.

    .venv/bin/python benchmarks/compare_revisions.py --base 2844e38 --threads 2 --rounds 7

Prints, per mode, the median step time of each and the median over rounds of new / base; with ``--adamw``,
``torch.optim.AdamW`` on the same factors is timed in every round too, and each step's median ratio to it.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODES = ["full", "bf16", "factored", "efficient", "full-fused"]


def load_revision(rev: str, where: Path):
    """Import ``src/lorapro`` of git revision ``rev`` as the package ``lorapro_base``."""
    blob = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src/lorapro"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(where, filter="data")
    (where / "src" / "lorapro").rename(where / "lorapro_base")
    sys.path.insert(0, str(where))
    return importlib.import_module("lorapro_base")


def pairs(shapes: list[tuple[int, int]], rank: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for m, n in shapes:
        A = torch.nn.Parameter(torch.randn(rank, n, generator=g) / n**0.5)
        B = torch.nn.Parameter(torch.randn(m, rank, generator=g) / m**0.5)
        A.grad, B.grad = torch.randn(A.shape, generator=g), torch.randn(B.shape, generator=g)
        out.append((A, B, 2.0))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the git revision to compare against")
    parser.add_argument("--shapes", default="2048x2048:8")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--adamw", action="store_true", help="time torch's AdamW on the factors in every round too")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import lorapro

    shapes = [tuple(map(int, s.split(":")[0].split("x"))) for s in args.shapes.split(",")
              for _ in range(int(s.split(":")[1]) if ":" in s else 1)]
    with tempfile.TemporaryDirectory() as tmp:
        base = load_revision(args.base, Path(tmp))
        steps = {}
        for mode in args.modes.split(","):
            kw = {"moments": "full", "fused": True} if mode == "full-fused" else {"moments": mode}
            for label, pkg in (("new", lorapro), ("base", base)):
                steps[(mode, label)] = pkg.LoRAProAdamW(pairs(shapes, args.rank), lr=1e-4, **kw).step
        if args.adamw:
            steps[("adamw", "")] = torch.optim.AdamW(
                [t for A, B, _ in pairs(shapes, args.rank) for t in (A, B)], lr=1e-4, foreach=True
            ).step
        for step in steps.values():  # warm-up (the fused pass compiles here)
            step()
            step()
        times: dict[tuple[str, str], list[float]] = {k: [] for k in steps}
        for _ in range(args.rounds):
            for key, step in steps.items():
                t0 = time.perf_counter()
                step()
                times[key].append(time.perf_counter() - t0)
    rows = []
    print(f"{args.shapes}, r {args.rank}, {args.threads} thread(s), {args.rounds} rounds; base {args.base}")
    print("mode | new ms | base ms | new / base (median of rounds) | quartiles")
    for mode in args.modes.split(","):
        new, old = times[(mode, "new")], times[(mode, "base")]
        ratios = [a / b for a, b in zip(new, old)]
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        row = {"mode": mode, "new_ms": statistics.median(new) * 1e3, "base_ms": statistics.median(old) * 1e3,
               "ratio_median": statistics.median(ratios), "ratio_quartiles": [q[0], q[2]]}
        rows.append(row)
        print(f"{mode} | {row['new_ms']:.1f} | {row['base_ms']:.1f} | {row['ratio_median']:.3f} | {q[0]:.3f} .. {q[2]:.3f}")
    if args.adamw:
        adamw = times[("adamw", "")]
        print(f"torch AdamW on the factors: {statistics.median(adamw) * 1e3:.2f} ms")
        print("mode | new / AdamW | base / AdamW (medians of rounds)")
        for row in rows:
            for label in ("new", "base"):
                row[f"{label}_over_adamw"] = statistics.median(
                    a / b for a, b in zip(times[(row["mode"], label)], adamw)
                )
            print(f"{row['mode']} | {row['new_over_adamw']:.2f} | {row['base_over_adamw']:.2f}")
        rows.append({"mode": "adamw", "ms": statistics.median(adamw) * 1e3})
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
