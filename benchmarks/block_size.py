"""How the CPU row-block size of the Adam pass changes the LoRA-Pro step, against the step's floor.

The optimizer walks each layer's m x n work in blocks of rows (``lorapro.moments.block_rows``); on a CPU a
block holds ``CPU_BLOCK_ELEMENTS * threads^2`` elements at most by default. This script builds one optimizer
per per-thread base size given (``LoRAProAdamW(block_elements=base * threads^2)``) and times its step (default
and ``fused=True``) on ``lorapro bench``'s layers, round-robin: every round times the floor (moment traffic + rank-r products, as ``lorapro bench``) and then
every block size, and the reported figure is the median over rounds of step / floor of that round, so the
machine's drift between rounds cancels.

    .venv/bin/python benchmarks/block_size.py --threads 2 --base 128,512,2048 --rounds 20

``--base`` values are in Ki elements per block at one thread (the library's default is 512); the block used
is that times threads^2, capped at half an m x n matrix (the workspace bound).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lorapro.moments import STORAGES, block_rows
from lorapro.cli.bench import Layers, candidates, parse_shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--base", default="128,512,2048", help="Ki elements per block at one thread")
    parser.add_argument("--shapes", default="2048x2048:8")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bases = [int(x) << 10 for x in args.base.split(",")]
    layers = Layers(parse_shapes(args.shapes), args.rank, torch.float32, torch.device("cpu"))
    steps = candidates(layers, ["floor-traffic", "floor-products"])
    for base in bases:
        ours = candidates(layers, ["lorapro", "lorapro-fused"], block_elements=base * args.threads**2)
        steps.update({(name, base): step for name, step in ours.items()})

    def timed(key) -> float:
        start = time.perf_counter()
        steps[key]()
        return time.perf_counter() - start

    for name in ("lorapro", "lorapro-fused"):  # warm-up (and the fused pass's compilation)
        for base in bases:
            timed((name, base))
            timed((name, base))
    floors: list[float] = []
    ratios: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        floor = timed("floor-traffic") + timed("floor-products")
        floors.append(floor)
        for name in ("lorapro", "lorapro-fused"):
            for base in bases:
                ratios.setdefault((name, base), []).append(timed((name, base)) / floor)
    m, n = layers.shapes[0]
    print(f"{args.shapes}, r {args.rank}, {args.threads} thread(s), {args.rounds} rounds; "
          f"floor median {statistics.median(floors) * 1e3:.1f} ms")
    print("step | base Ki | block rows (first shape) | x floor, median of rounds | quartiles")
    rows = []
    for (name, base), values in ratios.items():
        rows_used = block_rows(m, n, torch.device("cpu"), STORAGES["full"].workspace_blocks, base * args.threads**2)
        q = statistics.quantiles(values, n=4)
        print(f"{name} | {base >> 10} | {rows_used} | {statistics.median(values):.3f} | {q[0]:.2f} .. {q[2]:.2f}")
        rows.append({"step": name, "base_ki": base >> 10, "block_rows": rows_used,
                     "x_floor_median": statistics.median(values), "x_floor_quartiles": [q[0], q[2]]})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "floor_ms_median": statistics.median(floors) * 1e3, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
