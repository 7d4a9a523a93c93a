"""Where the separable step's time goes beyond its matrix products, and what bucket size does to it.

Two measurements, round-robin in one process so the machine's drift between rounds cancels (medians over rounds):

* ``function``: ``functional.adafactor_on_equivalent_gradient`` (``moments="adafactor"``'s whole direction) on one
  bucket of ``--layers`` layers at m = n = ``--small`` (the products are nothing: what remains is the per-op cost)
  and at m = n = ``--large``, next to ``lorapro bench``'s ``floor-separable`` (the step's products alone), the
  whole optimizer step and AdamW on the factors at ``--large``;
* ``buckets``: the whole ``adafactor`` step at ``--large`` with its layers bucketed ``--layers``, half, ... 1 at a
  time (by setting the bucket rule's scratch cap, ``lorapro._buckets._SEPARABLE_SCRATCH_ELEMENTS``).

    .venv/bin/python benchmarks/separable_overhead.py --threads 2 --rounds 150
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import lorapro
import lorapro._buckets as buckets
from lorapro.cli.bench import Layers, candidates
from lorapro.functional import adafactor_on_equivalent_gradient, separable_workspace_numel


def _function(layers: int, m: int, r: int) -> Callable[[], Any]:
    g = torch.Generator().manual_seed(0)
    A = torch.randn(layers, r, m, generator=g) / m**0.5
    B = torch.randn(layers, m, r, generator=g) * 1e-2
    gA, gB = torch.randn(layers, r, m, generator=g) * 1e-3, torch.randn(layers, m, r, generator=g) * 1e-3
    scale, row, col = torch.ones(layers), torch.ones(layers, m), torch.ones(layers, m)
    ws = torch.empty(separable_workspace_numel(layers, m, m, r))

    def call() -> None:
        with torch.no_grad():
            adafactor_on_equivalent_gradient(A, B, gA, gB, scale, row, col, 0.5, beta2=0.999, workspace=ws)

    return call


def _rounds(fns: dict[str, Callable[[], Any]], rounds: int, before: Callable[[str], None] | None = None) -> dict:
    for name, fn in fns.items():  # warm-up: state, scratch
        if before:
            before(name)
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if before:
                before(name)
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--small", type=int, default=64)
    parser.add_argument("--large", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    big = Layers([(args.large, args.large)] * args.layers, args.rank, torch.float32, torch.device("cpu"))
    rows = candidates(big, ["lorapro-adafactor", "adamw-lora", "floor-separable"])
    function = _rounds(
        {
            f"function {args.small}": _function(args.layers, args.small, args.rank),
            f"function {args.large}": _function(args.layers, args.large, args.rank),
            f"step {args.large}": rows["lorapro-adafactor"],
            "floor-separable": rows["floor-separable"],
            "adamw-lora": rows["adamw-lora"],
        },
        args.rounds,
    )
    print(f"{args.layers} layers, r {args.rank}, {args.threads} thread(s), median ms of {args.rounds} rounds")
    for name, ms in function.items():
        print(f"  {name:20s} {ms:7.2f}")

    # bucket sizes: the scratch cap that makes buckets of `size` layers
    opt = lorapro.LoRAProAdamW(big.pairs(), lr=1e-4, moments="adafactor")
    per_layer = buckets.separable_scratch_numel(opt.pairs[:1], lorapro.moments.storage("adafactor"))
    sizes = [s for s in (args.layers, args.layers // 2, args.layers // 4, 1) if s >= 1]
    sizes = list(dict.fromkeys(sizes))
    caps = {f"{s} per bucket": s * per_layer for s in sizes}
    original = buckets._SEPARABLE_SCRATCH_ELEMENTS
    try:
        by_size = _rounds(
            {name: opt.step for name in caps},
            args.rounds,
            before=lambda name: setattr(buckets, "_SEPARABLE_SCRATCH_ELEMENTS", caps[name]),
        )
    finally:
        buckets._SEPARABLE_SCRATCH_ELEMENTS = original
    print("the adafactor step by bucket size, median ms:")
    for name, ms in by_size.items():
        print(f"  {name:20s} {ms:7.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "function": function, "buckets": by_size}, f, indent=1)


if __name__ == "__main__":
    main()
