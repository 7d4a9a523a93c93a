"""Count the host-device synchronisations of one LoRAProAdamW step on a GPU.

PyTorch's sync debug mode warns at every operation that makes the host wait for the device; this script
steps the optimizer (after a warm-up step) on Llama-2-7B-shaped layers and prints each distinct warning with
its count, for the default moments, the other moment modes and ``fused=True``.

    .venv/bin/python benchmarks/gpu_sync.py [--shapes 4096x4096:2,11008x4096:1] [--rank 16]

Needs CUDA; on a machine without it, it says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import collections
import sys
import warnings

import torch

import lorapro
from lorapro.cli.bench import Layers, parse_shapes


def count_syncs(step, device: torch.device) -> collections.Counter:
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(device)
    return collections.Counter(str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="4096x4096:2,11008x4096:1")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_sync.py: no CUDA device here; nothing to count", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    variants = {
        "full": {}, "bf16": {"moments": "bf16"}, "factored": {"moments": "factored"},
        "efficient": {"moments": "efficient"}, "full, fused": {"fused": True},
    }
    for name, kwargs in variants.items():
        layers = Layers(parse_shapes(args.shapes), args.rank, dtype, device)
        opt = lorapro.LoRAProAdamW(layers.pairs(), lr=1e-4, **kwargs)
        opt.step()  # warm-up: state allocation, compilation
        counts = count_syncs(opt.step, device)
        print(f"{name}: {sum(counts.values())} synchronisations in one step")
        for message, n in counts.most_common():
            print(f"  {n} x {message}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
