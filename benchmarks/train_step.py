"""Whole training step (forward, backward, clipping, optimizer step) of each method on the demo model and data,
timed round-robin in one process, as ratios against LoRA's step.

The demo's setting: MiniLM on Rotten Tomatoes, batches of 32 at max length 64, rank 8 (alpha 16) on every
Linear but the head, the head trained, gradient clipping at 1.0, lr 1e-4. Every method trains its own copy of
the model from the same start on the same fixed batches; each round runs ``--steps`` timed steps of every
method in turn, and the median per method is reported. Also the optimizer step alone (median), the optimizer
state, and the peak memory one step allocates beyond what existed before it (allocator events, CPU profiler;
CUDA peak statistics on a GPU).

    .venv/bin/python benchmarks/train_step.py [--methods lora,lorapro,...] [--rounds 5] [--steps 3]
        [--threads N] [--device cuda] [--json docs/train_step.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from lorapro.cli.bench import _sync, peak_extra_bytes
from lorapro.cli import models as models_mod
from lorapro.cli.data import load_task_data
from lorapro._state import optimizer_state_bytes
from lorapro.cli.batches import Batches
from lorapro.cli.config import TrainConfig
from lorapro.cli.trainer import make_optimizer


def build(method: str, cfg: TrainConfig, data, device: torch.device):
    torch.manual_seed(cfg.seed)
    model, tokenizer, _ = models_mod.build_model(
        models_mod.resolve_model(cfg.model), task=data.task, num_labels=len(data.labels), method=method,
        rank=cfg.rank, alpha=cfg.alpha, rslora=method == "rslora", seed=cfg.seed,
        id2label=dict(enumerate(data.labels)),
    )
    model.to(device).train()
    opt = make_optimizer(method, model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, tokenizer, opt, params


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="lora,lorapro,lorapro-zero,lorapro-bf16,lorapro-factored,lorapro-efficient,full")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per method per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    methods = [m.strip() for m in args.methods.split(",")]
    if "lora" not in methods:
        ap.error("--methods must include lora (the baseline of the ratios)")
    cfg = TrainConfig(model=args.model, rank=args.rank, alpha=2.0 * args.rank, lr=1e-4,
                      batch_size=args.batch_size, max_length=args.max_length)
    data = load_task_data(None, "rotten-tomatoes", None)
    rows = list(data.train)[: args.batch_size * 8]

    runs = {}
    for method in methods:
        model, tokenizer, opt, params = build(method, cfg, data, device)
        batches = Batches(data, tokenizer, cfg, device)
        inputs = [batches(rows[(i % 8) * args.batch_size : (i % 8 + 1) * args.batch_size]) for i in range(8)]
        runs[method] = dict(model=model, opt=opt, params=params, inputs=inputs, total=[], opt_ms=[], i=0)

    def step(r: dict) -> float:
        """One training step; returns the optimizer step's seconds."""
        batch = r["inputs"][r["i"] % len(r["inputs"])]
        r["i"] += 1
        r["model"](**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(r["params"], cfg.max_grad_norm)
        _sync(device)
        t0 = time.perf_counter()
        r["opt"].step()
        _sync(device)
        t = time.perf_counter() - t0
        r["opt"].zero_grad(set_to_none=True)
        return t

    for r in runs.values():
        for _ in range(args.warmup):
            step(r)
    for _ in range(args.rounds):
        for r in runs.values():
            for _ in range(args.steps):
                _sync(device)
                t0 = time.perf_counter()
                r["opt_ms"].append(step(r) * 1e3)
                _sync(device)
                r["total"].append((time.perf_counter() - t0) * 1e3)
    for r in runs.values():
        r["peak"] = peak_extra_bytes(lambda r=r: step(r), device) / 2**20

    base = statistics.median(runs["lora"]["total"])
    rows_out = []
    for method, r in runs.items():
        total = statistics.median(r["total"])
        rows_out.append(dict(
            method=method, step_ms=total, x_lora=total / base, optimizer_ms=statistics.median(r["opt_ms"]),
            state_mib=optimizer_state_bytes(r["opt"]) / 2**20, peak_extra_mib=r["peak"],
        ))
    threads = torch.get_num_threads()
    print(f"\n{args.model}, rotten-tomatoes, batch {args.batch_size} x {args.max_length} tokens, r = {args.rank}, "
          f"{device}, {threads} threads; median of {args.rounds} rounds x {args.steps} steps after {args.warmup} "
          f"warm-up steps\n")
    print(f"{'method':<20}{'step ms':>10}{'x lora':>9}{'opt step ms':>13}{'opt state MiB':>15}{'peak extra MiB':>16}")
    for row in rows_out:
        print(f"{row['method']:<20}{row['step_ms']:>10.1f}{row['x_lora']:>9.3f}{row['optimizer_ms']:>13.1f}"
              f"{row['state_mib']:>15.2f}{row['peak_extra_mib']:>16.1f}")
    if args.json:
        meta = dict(device=str(device), threads=threads, torch=torch.__version__, machine=platform.machine(),
                    batch_size=args.batch_size, max_length=args.max_length, rank=args.rank, rounds=args.rounds,
                    steps=args.steps, date=time.strftime("%Y-%m-%d"))
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows_out), f, indent=1)
    return rows_out


if __name__ == "__main__":
    main()
