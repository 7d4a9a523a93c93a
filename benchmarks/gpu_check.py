"""One prepared check of lorapro on a real GPU: correctness on the device, syncs, bench, training step, memory.

Steps, in order, each run in its own child process with its own time budget (a failure or a timeout in one is
recorded, with its traceback / output tail, and the next one runs):

1. ``device_tests``: LoRAProAdamW (moments full, bf16, factored, int8-factored, adafactor, lowrank-factored,
   efficient, and ``fused=True`` for full) and LoRAProSGD on the device against the float64 reference
   ``tests/reference.py`` (run on the CPU: its factored state is CPU-only), in float64 and float32; the same
   optimizer on the device against the CPU; bf16 parameters stay finite and bf16; state_dict save/load resumes
   bit for bit on the device. (No test in tests/ is parametrized by device, so this subset is run here instead.)
2. ``syncs``: host-device synchronisations in one step per moment mode (``benchmarks/gpu_sync.count_syncs``);
   target: none but the documented non-finite check (one).
3. ``bench``: ``lorapro bench`` at Llama-2-7B layer shapes (``GPU_SHAPES``) in bf16, r = 8 and 16.
4. ``train_step``: a whole training step (forward, backward, clipping, optimizer) of LoRA and LoRA-Pro
   (every preset) on SmolLM2-135M's architecture (random weights built from its config: the model package and
   its GGUF converter are not on the GPU machine), batch 8 x 512 tokens, causal LM, bf16 base weights;
   ``benchmarks/train_step.py`` has a ``--device`` flag but needs the demo's data and MiniLM packages.
5. ``memory``: the peak and the persistent GPU memory of step 4 per method, next to
   ``lorapro.cli.memory.plan(...)``'s prediction.

Results: ``DIR/results.json`` (every step: status ``ok`` / ``failed`` / ``timeout`` / ``skipped: ...``,
seconds, data, traceback) and ``DIR/summary.txt``; the steps' own files ``DIR/step_*.json``.

On the GPU machine (its python3 already has torch 2.11 + CUDA 13, transformers, peft, pytest: no venv and
no ``make install`` needed, and there is no network there for ``make install``'s pins; the source tree
is used through PYTHONPATH)::

    PYTHONUNBUFFERED=1 PYTHONPATH=src python3 benchmarks/gpu_check.py --out $OUT/gpu --budget-s 420

(run it with the device tool's timeout_s=540). If a venv is wanted there, one command, offline::

    python3 -m venv --system-site-packages .venv && .venv/bin/python -m pip install --no-deps --no-build-isolation -e .

The smoke run (below), with and without ``--fused-on-cpu``, passes on a CPU under that machine's versions (torch
2.11.0, transformers 5.17.0) with peft 0.21.2, checked 2026-12-08 in a scratch venv (``pip install torch==2.11.0
transformers==5.17.0 peft==0.21.2 pytest hypothesis``; ``PYTHONPATH=src python benchmarks/gpu_check.py --smoke``).

On a CPU, in seconds, so that it cannot rot (tests/test_gpu_check.py)::

    .venv/bin/python benchmarks/gpu_check.py --smoke --out /tmp/gpu_check
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT / "src", ROOT / "tests", ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch

STEPS = ["device_tests", "syncs", "bench", "train_step", "memory"]
SHARE = {"device_tests": 0.2, "syncs": 0.12, "bench": 0.4, "train_step": 0.22, "memory": 0.06}  # of --budget-s

SMOLLM2_135M = dict(  # noqa: C408  config.json of the converted SmolLM2-135M-Instruct (lorapro.cli.models)
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=576, intermediate_size=1536,
    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
    max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu",
    bos_token_id=1, eos_token_id=2, pad_token_id=2, rope_parameters={"rope_theta": 100000.0, "rope_type": "default"},
)
TINY_LLAMA = dict(SMOLLM2_135M, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=64)
TRAIN_METHODS = ["lora", "lorapro", "lorapro-fused", "lorapro-bf16", "lorapro-factored", "lorapro-int8-factored",
                 "lorapro-bf16-factored", "lorapro-adafactor", "lorapro-lowrank-factored", "lorapro-efficient", "full"]


def _maxdiff(xs, ys) -> float:
    return max(((x.detach().double().cpu() - y.detach().double().cpu()).abs().max().item() for x, y in zip(xs, ys)),
               default=0.0)


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


# ------------------------------------------------------------------------------------ step 1: device tests


def step_device_tests(args, device: torch.device) -> dict:
    from models import tiny_batch, tiny_loss, tiny_peft
    from reference import ReferenceLoRAPro, peft_layers

    import lorapro

    checks: list[dict] = []
    n_steps = 3

    def to(batch, dtype):
        tokens, images, labels = batch
        return tokens.to(device), images.to(device=device, dtype=dtype), labels.to(device)

    def make_opt(algo, model, kw):
        if algo == "sgd":
            return lorapro.LoRAProSGD(model, lr=5e-2, **kw)
        return lorapro.LoRAProAdamW(model, lr=1e-2, **kw)

    def run(algo, kw, dtype, dev, seed_model):
        model = copy.deepcopy(seed_model).to(device=dev, dtype=dtype)
        opt = make_opt(algo, model, kw)
        for i in range(n_steps):
            model.zero_grad()
            tokens, images, labels = tiny_batch(seed=i, dtype=torch.float64)
            tiny_loss(model, (tokens.to(dev), images.to(device=dev, dtype=dtype), labels.to(dev))).backward()
            opt.step()
        return _trainable(model)

    base = tiny_peft(dtype=torch.float64, init_lora_weights=False)
    variants = [("adamw", "full", {}), ("adamw", "factored", {"moments": "factored"}),
                ("adamw", "efficient", {"moments": "efficient"}), ("adamw", "bf16", {"moments": "bf16"}),
                ("adamw", "int8-factored", {"moments": "int8-factored"}),
                ("adamw", "adafactor", {"moments": "adafactor"}),
                ("adamw", "lowrank-factored", {"moments": "lowrank-factored"}), ("sgd", "sgd", {})]
    if device.type == "cuda" or args.fused_on_cpu:
        variants.append(("adamw", "full, fused", {"fused": True}))
    refs: dict[tuple[str, str], list] = {}
    for algo, moments in [("adamw", "full"), ("adamw", "factored"), ("adamw", "efficient"), ("sgd", "full")]:
        model = copy.deepcopy(base)
        ref = ReferenceLoRAPro(model, peft_layers(model), algo=algo, lr=1e-2 if algo == "adamw" else 5e-2,
                               moments=moments)
        for i in range(n_steps):
            model.zero_grad()
            tiny_loss(model, tiny_batch(seed=i, dtype=torch.float64)).backward()
            ref.step()
        refs[(algo, moments)] = _trainable(model)
    for algo, name, kw in variants:
        ref_key = (algo, "full" if algo == "sgd" else kw.get("moments", "full"))
        for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
            row = {"check": "reference", "optimizer": f"LoRAPro{'SGD' if algo == 'sgd' else 'AdamW'}",
                   "variant": name, "dtype": str(dtype).replace("torch.", "")}
            try:
                on_dev = run(algo, kw, dtype, device, base)
                scale = max(p.abs().max().item() for p in refs.get(ref_key, refs[("adamw", "full")]))
                if ref_key in refs:
                    d = _maxdiff(on_dev, refs[ref_key])
                    row.update(max_abs_diff_vs_reference=d, tol=tol * max(1.0, scale), passed=d <= tol * max(1.0, scale))
                else:  # lossy storage: no literal reference; against the full-moment reference for information
                    row.update(max_abs_diff_vs_full_reference=_maxdiff(on_dev, refs[("adamw", "full")]),
                               informational=True)
                if device.type != "cpu":
                    on_cpu = run(algo, kw, dtype, torch.device("cpu"), base)
                    row["max_abs_diff_device_vs_cpu"] = _maxdiff(on_dev, on_cpu)
            except Exception:  # noqa: BLE001 (each check is guarded: record it and go on)
                row.update(passed=False, error=traceback.format_exc()[-3000:])
            checks.append(row)
    # bf16 parameters: finite and still bf16
    for algo, name, kw in variants:
        row = {"check": "bf16 params finite, dtype kept", "variant": name}
        try:
            params = run(algo, kw, torch.bfloat16, device, base)
            row["passed"] = all(p.dtype == torch.bfloat16 and bool(torch.isfinite(p).all()) for p in params)
        except Exception:  # noqa: BLE001 (each check is guarded: record it and go on)
            row.update(passed=False, error=traceback.format_exc()[-3000:])
        checks.append(row)
    # state_dict resume on the device: bit for bit
    for algo, name, kw in variants:
        row = {"check": "state_dict resume bit-exact", "variant": name}
        try:
            torch.manual_seed(0)
            m1 = copy.deepcopy(base).to(device=device, dtype=torch.float32)
            o1 = make_opt(algo, m1, kw)
            batches = [to(tiny_batch(seed=i), torch.float32) for i in range(4)]

            def go(model, opt, bs):
                for b in bs:
                    model.zero_grad()
                    tiny_loss(model, b).backward()
                    opt.step()

            go(m1, o1, batches[:2])
            buf = io.BytesIO()
            torch.save({"model": m1.state_dict(), "opt": o1.state_dict()}, buf)
            buf.seek(0)
            saved = torch.load(buf, map_location=device, weights_only=True)
            m2 = copy.deepcopy(base).to(device=device, dtype=torch.float32)
            m2.load_state_dict(saved["model"])
            o2 = make_opt(algo, m2, kw)
            o2.load_state_dict(saved["opt"])
            # the same RNG state for both continuations: bf16 moments round stochastically from the global RNG
            # (a real resume restores it with the checkpoint)
            cpu_rng = torch.get_rng_state()
            cuda_rng = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
            go(m1, o1, batches[2:])
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
            go(m2, o2, batches[2:])
            row["passed"] = all(torch.equal(p, q) for p, q in zip(_trainable(m1), _trainable(m2)))
            row["max_abs_diff"] = _maxdiff(_trainable(m1), _trainable(m2))
        except Exception:  # noqa: BLE001 (each check is guarded: record it and go on)
            row.update(passed=False, error=traceback.format_exc()[-3000:])
        checks.append(row)
    failed = [c for c in checks if c.get("passed") is False]
    return {"status": "ok" if not failed else "failed", "checks": checks, "n_failed": len(failed),
            "note": "no test in tests/ is parametrized by device; this focused subset runs instead"}


# --------------------------------------------------------------------------------------------- step 2: syncs


def step_syncs(args, device: torch.device) -> dict:
    if device.type != "cuda":
        return {"status": "skipped: no CUDA (sync debug mode counts CUDA synchronisations only)"}
    from gpu_sync import count_syncs

    import lorapro
    from lorapro.cli.bench import Layers, parse_shapes

    shapes = parse_shapes(args.sync_shapes)
    variants = {"full": {}, "full, fused": {"fused": True}, "bf16": {"moments": "bf16"},
                "factored": {"moments": "factored"}, "efficient": {"moments": "efficient"},
                "int8-factored": {"moments": "int8-factored"}, "bf16-factored": {"moments": "bf16-factored"},
                "adafactor": {"moments": "adafactor"}, "lowrank-factored": {"moments": "lowrank-factored"}}
    rows = []
    for name, kw in variants.items():
        row = {"variant": name}
        try:
            layers = Layers(shapes, 16, torch.bfloat16, device)
            opt = lorapro.LoRAProAdamW(layers.pairs(), lr=1e-4, **kw)
            opt.step()  # warm-up: state, compilation
            counts = count_syncs(opt.step, device)
            row.update(total=sum(counts.values()), messages=dict(counts), target_met=sum(counts.values()) <= 1)
            del opt, layers
            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 (each check is guarded: record it and go on)
            row.update(error=traceback.format_exc()[-3000:])
        rows.append(row)
    bad = [r for r in rows if "error" in r]
    return {"status": "ok" if not bad else "failed", "rows": rows,
            "target": "at most 1 per step (the documented non-finite check)"}


# --------------------------------------------------------------------------------------------- step 3: bench


def step_bench(args, device: torch.device) -> dict:
    from lorapro.cli import bench

    rows = ["lorapro", "lorapro-fused", "lorapro-int8-factored", "lorapro-bf16-factored", "lorapro-adafactor",
            "lorapro-lowrank-factored", "adamw-lora", "floor-separable", "adamw-full", "floor-traffic", "floor-products",
            "lora-pro-adamw"]
    if device.type != "cuda" and not args.fused_on_cpu:
        rows.remove("lorapro-fused")
    out: dict = {"status": "ok", "runs": []}
    for rank in args.bench_ranks:
        argv = ["--device", str(device), "--rank", str(rank), "--only", ",".join(rows)]
        if args.smoke:
            argv += ["--shapes", "64x48:2", "--dtype", "bfloat16", "--warmup", "1", "--repeats", "1", "--rounds", "2"]
        else:
            argv += ["--shapes", bench.GPU_SHAPES, "--dtype", "bfloat16", "--rounds", "3"]
        ns = bench.build_parser().parse_args(argv)
        result = bench.run(ns)
        out["runs"].append({"rank": rank, "argv": argv, "rows": result, "report": bench.report(result, ns)})
        _write(args.step_file, out)  # what is done survives a timeout in the next rank
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------- step 4: whole training step


def step_train(args, device: torch.device) -> dict:
    import gc

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorapro.cli.config import TrainConfig
    from lorapro.cli.models import _default_targets
    from lorapro.cli.trainer import make_optimizer

    cfg_dict = TINY_LLAMA if args.smoke else SMOLLM2_135M
    batch, length = (2, 16) if args.smoke else (args.batch_size, args.max_length)
    dtype = torch.bfloat16
    rows = []
    for method in args.train_methods:
        row: dict = {"method": method}
        try:
            name, fused = ("lorapro", True) if method == "lorapro-fused" else (method, False)
            if fused and device.type != "cuda" and not args.fused_on_cpu:
                row["skipped"] = "fused: CUDA only in this check"
                rows.append(row)
                continue
            torch.manual_seed(0)
            config = LlamaConfig(**{k: v for k, v in cfg_dict.items() if k not in ("architectures", "model_type")})
            model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
            if name != "full":
                targets, _ = _default_targets(model)
                model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                         target_modules=targets, task_type="CAUSAL_LM"))
            else:
                for p in model.parameters():
                    p.requires_grad_(True)
            model.train()
            cfg = TrainConfig(method=name, rank=8, alpha=16.0, lr=1e-4, fused=fused)
            opt = make_optimizer(name, model, cfg)
            params = _trainable(model)
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(0, config.vocab_size, (batch, length), generator=g).to(device)

            def step(keep_grads=False, model=model, opt=opt, params=params, ids=ids) -> None:
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                if not keep_grads:
                    opt.zero_grad(set_to_none=True)

            for _ in range(args.train_warmup):
                step()
            times = []
            for _ in range(args.train_repeats):
                _sync(device)
                t0 = time.perf_counter()
                step()
                _sync(device)
                times.append((time.perf_counter() - t0) * 1e3)
            row.update(step_ms=statistics.median(times), min_ms=min(times), samples=len(times),
                       factor_dtypes=sorted({str(p.dtype).replace("torch.", "") for p in params}))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                step(keep_grads=True)
                torch.cuda.synchronize(device)
                row.update(peak_allocated=torch.cuda.max_memory_allocated(device),
                           persistent_allocated=torch.cuda.memory_allocated(device))
            opt.zero_grad(set_to_none=True)
            del model, opt, params, step  # step holds them too
        except Exception:  # noqa: BLE001 (each check is guarded: record it and go on)
            row["error"] = traceback.format_exc()[-3000:]
        rows.append(row)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = next((r["step_ms"] for r in rows if r["method"] == "lora" and "step_ms" in r), None)
    for r in rows:
        if base and "step_ms" in r:
            r["x_lora"] = r["step_ms"] / base
    bad = [r for r in rows if "error" in r]
    return {"status": "ok" if not bad else "failed", "model": "smollm2-135m (random init)" if not args.smoke
            else "tiny llama", "batch": batch, "length": length, "dtype": "bfloat16", "rank": 8, "rows": rows}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -------------------------------------------------------------------------------------------- step 5: memory


def step_memory(args, device: torch.device) -> dict:
    from lorapro.cli.memory import plan

    cfg_dict = TINY_LLAMA if args.smoke else SMOLLM2_135M
    presets = ["full", "bf16", "factored", "int8-factored", "bf16-factored", "adafactor", "lowrank-factored",
               "efficient"]
    planned = plan(dict(cfg_dict), rank=8, dtype="bf16", task="causal-lm", presets=presets)
    by = {("lora" if r["method"] == "lora" else "full" if r["method"] == "full" else f"lorapro-{r['preset']}"): r
          for r in planned}
    by["lorapro"] = by.pop("lorapro-full")
    by["lorapro-fused"] = by["lorapro"]
    measured_file = Path(args.out) / "step_train_step.json"
    measured = json.loads(measured_file.read_text()).get("rows", []) if measured_file.is_file() else []
    rows = []
    for method in args.train_methods:
        p = by.get(method)
        m = next((r for r in measured if r["method"] == method), {})
        row = {"method": method}
        if p:
            row.update(plan_total=p["total"], plan_optimizer=p["optimizer"], plan_transient=p["transient"],
                       plan_lora_dtype=p["lora_dtype"])
        for k in ("peak_allocated", "persistent_allocated", "factor_dtypes"):
            if k in m:
                row[k] = m[k]
        if "persistent_allocated" in row and p:
            row["persistent_over_plan"] = row["persistent_allocated"] / p["total"]
        rows.append(row)
    status = "ok" if device.type == "cuda" else "ok (plan only: no CUDA peak statistics on the CPU)"
    if device.type == "cuda" and not measured:
        status = "failed"
    return {"status": status, "rows": rows,
            "note": "persistent_allocated: memory_allocated after opt.step with the gradients still held "
                    "(weights + factors + grads + optimizer state, as the plan's total); peak_allocated adds "
                    "activations and the step's transients"}


# ------------------------------------------------------------------------------------------------- driver


def _write(path, obj) -> None:
    if path:
        Path(path).write_text(json.dumps(obj, indent=1, default=str))


FUNCS = {"device_tests": step_device_tests, "syncs": step_syncs, "bench": step_bench, "train_step": step_train,
         "memory": step_memory}


def child(args) -> int:
    device = torch.device(args.device)
    if args.smoke:
        torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    try:
        result = FUNCS[args.step](args, device)
    except Exception:  # noqa: BLE001 (each check is guarded: record it and go on)
        result = {"status": "failed", "traceback": traceback.format_exc()[-6000:]}
    _write(args.step_file, result)
    return 0


def _summary(results: dict) -> str:
    head = (f"lorapro gpu_check: device {results['device']} ({results.get('device_name', '')}), torch "
            f"{results['torch']}, smoke={results['smoke']}, {results['wall_s']:.1f} s")
    lines = [head, ""]
    for name in STEPS:
        s = results["steps"].get(name, {})
        lines.append(f"[{name}] {s.get('status')}  ({s.get('seconds', 0):.1f} s)")
        if name == "device_tests" and "checks" in s:
            for c in s["checks"]:
                diffs = ", ".join(f"{k}={v:.2e}" for k, v in c.items() if "diff" in k and isinstance(v, float))
                lines.append(f"  {'FAIL' if c.get('passed') is False else 'ok  '} {c['check']}: {c.get('variant')}"
                             f" {c.get('dtype', '')} {diffs}")
        if name == "syncs" and "rows" in s:
            for r in s["rows"]:
                lines.append(f"  {r['variant']}: {r.get('total', 'error')} syncs {r.get('messages', '')}")
        if name == "bench" and "runs" in s:
            for run in s["runs"]:
                lines.append(f"  r = {run['rank']}")
                lines += ["    " + x for x in run["report"].splitlines()]
        if name in ("train_step", "memory") and "rows" in s:
            for r in s["rows"]:
                lines.append("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in r.items() if k != "error")
                             + (" ERROR" if "error" in r else ""))
        if "traceback" in s:
            lines.append("  " + s["traceback"].strip().splitlines()[-1])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (or --device), seconds")
    ap.add_argument("--device", default=None, help="default: cuda if available (cpu with --smoke)")
    ap.add_argument("--budget-s", type=float, default=None, help="total wall time (default 420; 150 with --smoke)")
    ap.add_argument("--steps", default=",".join(STEPS))
    ap.add_argument("--bench-ranks", default="8,16")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--train-methods", default=",".join(TRAIN_METHODS))
    ap.add_argument("--sync-shapes", default="4096x4096:2,11008x4096:1")
    ap.add_argument("--fused-on-cpu", action="store_true", help="also try fused=True on a CPU (torch.compile)")
    ap.add_argument("--step", default=None, help=argparse.SUPPRESS)  # internal: run one step in this process
    ap.add_argument("--step-file", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.bench_ranks = [int(x) for x in args.bench_ranks.split(",")]
    args.train_methods = [x.strip() for x in args.train_methods.split(",")]
    args.train_warmup, args.train_repeats = (1, 2) if args.smoke else (3, 10)
    if args.smoke:
        args.sync_shapes = "64x48:2"
        if args.bench_ranks == [8, 16]:
            args.bench_ranks = [4]
    if args.device is None:
        args.device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    out = Path(args.out)
    if args.step:
        return child(args)

    out.mkdir(parents=True, exist_ok=True)
    budget = args.budget_s or (150.0 if args.smoke else 420.0)
    t_start = time.perf_counter()
    device = torch.device(args.device)
    results: dict = {"device": str(device), "smoke": args.smoke, "torch": torch.__version__, "python": sys.version,
                     "machine": platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "budget_s": budget, "steps": {}}
    if device.type == "cuda":
        results["device_name"] = torch.cuda.get_device_name(device)
        results["cuda"] = torch.version.cuda
    wanted = [s.strip() for s in args.steps.split(",")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               PYTHONUNBUFFERED="1")
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    for i, name in enumerate(STEPS):
        if name not in wanted:
            results["steps"][name] = {"status": "skipped: not in --steps"}
            continue
        left = budget - (time.perf_counter() - t_start)
        later = sum(SHARE[s] for s in STEPS[i + 1:] if s in wanted)
        # a step may use its own share plus what earlier steps left, but leaves later steps their shares
        limit = max(5.0, left - later * budget)
        step_file = out / f"step_{name}.json"
        step_file.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), *passthrough, "--device", args.device,
               "--step", name, "--step-file", str(step_file)]
        t0 = time.perf_counter()
        print(f"[gpu_check] {name}: up to {limit:.0f} s ...", flush=True)
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=limit, check=False)
            tail, rc, timed_out = (proc.stdout + proc.stderr)[-4000:], proc.returncode, False
        except subprocess.TimeoutExpired as e:
            out_b = (e.stdout or b"") + (e.stderr or b"")
            tail = (out_b.decode(errors="replace") if isinstance(out_b, bytes) else out_b)[-4000:]
            rc, timed_out = None, True
        res = json.loads(step_file.read_text()) if step_file.is_file() else {}
        if timed_out:
            res = {**res, "status": f"timeout after {limit:.0f} s" + (" (partial results kept)" if res else "")}
        elif not res:
            res = {"status": "failed", "traceback": f"child exited with {rc} and wrote nothing"}
        res.update(seconds=time.perf_counter() - t0, returncode=rc, output_tail=tail)
        results["steps"][name] = res
        print(f"[gpu_check] {name}: {res['status']} ({res['seconds']:.1f} s)", flush=True)
        results["wall_s"] = time.perf_counter() - t_start
        _write(out / "results.json", results)
    results["wall_s"] = time.perf_counter() - t_start
    _write(out / "results.json", results)
    summary = _summary(results)
    (out / "summary.txt").write_text(summary)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
