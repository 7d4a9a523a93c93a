"""Communication and moment memory of sharded LoRA-Pro state (``LoRAProAdamW(..., process_group=...)``).

Two tables:

1. **Measured** (small scale, CPU, gloo): for each world size W, W processes train the same small model of
   LoRA-adapted linear layers shaped like Llama's q, k, v, o (d x d), gate, up (f x d) and down (d x f),
   under DDP, with ``LoRAProAdamW(model, process_group=dist.group.WORLD)``. Per step it records the bytes
   handed to ``torch.distributed`` collectives inside ``opt.step()`` (the collectives are wrapped only for
   the duration of the step), the bytes of the gradient buckets DDP all-reduces (a DDP communication hook
   wrapping the default all-reduce hook), and at the end the optimizer-state bytes on every rank (the m x n
   moments of the pairs it owns, and the rest). It checks that every rank ends with bit-identical
   parameters and that the measured numbers equal the formulas used for table 2.
2. **Computed** for Llama-2-7B (32 layers, d = 4096, f = 11008, all 7 linear modules, r = 8, bf16
   parameters and gradients, float32 moments): per-rank moment memory from the optimizer's own ownership
   rule (``lorapro.sharding.assign_owners``), the optimizer's all-reduce per step (``Sharding.finish`` sends A and
   B of every pair in their dtype: r (m + n) numbers per layer), DDP's LoRA-gradient all-reduce, and, for
   context, unsharded moments and the gradient all-reduce of full fine-tuning under DDP.

Bytes are *logical buffer sizes*: what a collective call is given. A ring all-reduce of a buffer of N bytes
sends (and receives) about 2 (W - 1) / W * N bytes per rank; that estimate is the "ring" column.

    .venv/bin/python benchmarks/sharding_figures.py [--worlds 1,2,4,8] [--json docs/sharding_figures.json]
    .venv/bin/python benchmarks/sharding_figures.py --quick        # W = 1, 2 and tiny layers: a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

MODULES = ("q", "k", "v", "o", "gate", "up", "down")
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Collectives wrapped while ``opt.step()`` runs: everything that moves tensors, so that a collective the
# optimizer might use besides all_reduce would be counted (and show up under its own name).
_COLLECTIVES = (
    "all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
    "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter", "send", "recv", "isend",
    "irecv", "all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list", "barrier",
)


def module_shapes(hidden: int, intermediate: int) -> list[tuple[str, int, int]]:
    """``(name, m, n)`` of one layer's 7 adapted linear modules (``W`` is ``m x n``: out x in)."""
    return [
        ("q", hidden, hidden), ("k", hidden, hidden), ("v", hidden, hidden), ("o", hidden, hidden),
        ("gate", intermediate, hidden), ("up", intermediate, hidden), ("down", hidden, intermediate),
    ]


def ring_bytes(buffer_bytes: int, world: int) -> float:
    """Bytes one rank sends in a ring all-reduce of ``buffer_bytes`` over ``world`` ranks (as many received)."""
    return 2.0 * (world - 1) / world * buffer_bytes if world > 1 else 0.0


def owner_loads(shapes: list[tuple[int, int]], world: int) -> list[int]:
    """Adapted elements (sum of m * n) each rank owns, by the optimizer's own rule ``lorapro.sharding.assign_owners``."""
    from lorapro.sharding import assign_owners as _assign_owners

    fakes = [SimpleNamespace(shape=(m, n), B=object()) for m, n in shapes]
    owner = _assign_owners(fakes, world)
    load = [0] * world
    for p in fakes:
        load[owner[id(p.B)]] += p.shape[0] * p.shape[1]
    return load


# ----------------------------------------------------------------------------------------------------------
# 1. Measured at small scale
# ----------------------------------------------------------------------------------------------------------


@dataclass
class SmallConfig:
    layers: int = 4
    hidden: int = 256
    intermediate: int = 688
    rank: int = 8
    alpha: float = 16.0
    dtype: str = "float32"
    batch: int = 8
    steps: int = 3
    train_norm: bool = False  # a trainable non-LoRA vector: AdamW on every rank, not sharded, not synced
    seed: int = 0

    def shapes(self) -> list[tuple[int, int]]:
        return [(m, n) for _ in range(self.layers) for _, m, n in module_shapes(self.hidden, self.intermediate)]


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus ``scaling * lora_B(lora_A(x))``; found by ``lorapro.find_lora_pairs``."""

    def __init__(self, n: int, m: int, r: int, alpha: float) -> None:
        super().__init__()
        self.base = nn.Linear(n, m, bias=False)
        self.base.weight.requires_grad_(False)
        self.lora_A = nn.Linear(n, r, bias=False)
        self.lora_B = nn.Linear(r, m, bias=False)
        nn.init.zeros_(self.lora_B.weight)  # PEFT's default start
        self.scaling = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * self.lora_B(self.lora_A(x))


class Block(nn.Module):
    def __init__(self, d: int, f: int, r: int, alpha: float) -> None:
        super().__init__()
        for name, m, n in module_shapes(d, f):
            setattr(self, name, LoRALinear(n, m, r, alpha))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = torch.tanh(self.q(x)) * torch.tanh(self.k(x)) + self.v(x)  # not attention, only its shapes
        x = x + self.o(attn)
        return x + self.down(F.silu(self.gate(x)) * self.up(x))


class SmallModel(nn.Module):
    def __init__(self, cfg: SmallConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(cfg.hidden, cfg.intermediate, cfg.rank, cfg.alpha) for _ in range(cfg.layers)
        )
        self.norm = nn.Parameter(torch.ones(cfg.hidden), requires_grad=cfg.train_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6) * self.norm


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(o) for o in obj)
    return 0


@contextlib.contextmanager
def count_collectives(log: list[tuple[str, int]]):
    """Wrap ``torch.distributed``'s collectives; each call appends ``(name, bytes of its tensor arguments)``.

    For all_reduce / broadcast / reduce that is the buffer given to the call; for gather-type calls it would
    include the output list too (none is expected from the optimizer, so none is split further).
    """
    from torch.distributed import distributed_c10d

    saved = []
    for name in _COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None:
            continue

        def wrapper(*args, __name=name, __orig=original, **kwargs):
            log.append((__name, _tensor_bytes(list(args) + list(kwargs.values()))))
            return __orig(*args, **kwargs)

        for module in (dist, distributed_c10d):
            if getattr(module, name, None) is original:
                saved.append((module, name, original))
                setattr(module, name, wrapper)
    try:
        yield log
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


def _counting_allreduce_hook(state: SimpleNamespace, bucket):  # no annotations: DDP checks them (as objects)
    """DDP's default all-reduce hook, counting the bytes of every bucket it is given."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    buf = bucket.buffer()
    state.calls += 1
    state.bytes += buf.numel() * buf.element_size()
    return allreduce_hook(state.group, bucket)


def _worker(rank: int, world: int, init_file: str, out_path: str, cfg_dict: dict[str, Any]) -> None:
    import lorapro

    torch.set_num_threads(1)
    cfg = SmallConfig(**cfg_dict)
    dtype = _DTYPES[cfg.dtype]
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(cfg.seed)  # the same model on every rank (DDP would broadcast rank 0's anyway)
        model = SmallModel(cfg).to(dtype)
        ddp = nn.parallel.DistributedDataParallel(model)
        hook_state = SimpleNamespace(group=dist.group.WORLD, calls=0, bytes=0)
        ddp.register_comm_hook(hook_state, _counting_allreduce_hook)
        opt = lorapro.LoRAProAdamW(model, lr=1e-2, weight_decay=0.01, process_group=dist.group.WORLD)
        start = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
        per_step = []
        for step in range(cfg.steps):
            g = torch.Generator().manual_seed(1000 * step + rank)  # each rank its own batch
            x = torch.randn(cfg.batch, cfg.hidden, generator=g).to(dtype)
            y = torch.randn(cfg.batch, cfg.hidden, generator=g).to(dtype)
            opt.zero_grad()
            hook_state.calls = hook_state.bytes = 0
            F.mse_loss(ddp(x).float(), y.float()).backward()
            log: list[tuple[str, int]] = []
            with count_collectives(log):
                opt.step()
            by_op: dict[str, dict[str, int]] = {}
            for name, nbytes in log:
                entry = by_op.setdefault(name, {"calls": 0, "bytes": 0})
                entry["calls"] += 1
                entry["bytes"] += nbytes
            per_step.append({
                "ddp_calls": hook_state.calls, "ddp_bytes": hook_state.bytes,
                "opt_calls": len(log), "opt_bytes": sum(b for _, b in log), "opt_by_op": by_op,
            })
        # Optimizer state on this rank: a pair's m x n moments live in state[B]; everything else is "rest".
        pair_B = {id(p.B) for p in opt.pairs}
        moment_bytes = rest_bytes = 0
        for param, state in opt.state.items():
            for key, value in state.items():
                if not isinstance(value, torch.Tensor):
                    continue
                nbytes = value.numel() * value.element_size()
                if id(param) in pair_B and key in ("exp_avg", "exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col"):
                    moment_bytes += nbytes
                else:
                    rest_bytes += nbytes
        owned = [(p.name, *p.shape) for p in opt.pairs if opt.owns(p)]
        # Every rank's final parameters (frozen ones too), compared bit for bit.
        final = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        gathered = [torch.empty_like(final) for _ in range(world)]
        dist.all_gather(gathered, final)
        identical = all(torch.equal(t, gathered[0]) for t in gathered)
        mine = {
            "rank": rank, "steps": per_step, "moment_bytes": moment_bytes, "rest_bytes": rest_bytes,
            "owned": owned, "identical": identical, "changed": not torch.equal(final, start),
            "pairs": [(p.name, p.rank, *p.shape, str(p.A.dtype)) for p in opt.pairs],
            "param_elem": model.blocks[0].q.lora_A.weight.element_size(),
            "optimizer_tensors": sum(len(g["params"]) for g in opt.param_groups),
            "other_trainable_bytes": sum(
                p.numel() * p.element_size() for p in model.parameters()
                if p.requires_grad and id(p) not in {id(t) for q in opt.pairs for t in (q.A, q.B)}
            ),
        }
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, mine)
        if rank == 0:
            with open(out_path, "w") as fh:
                json.dump(everyone, fh)
    finally:
        dist.destroy_process_group()


def _start_method() -> str:
    """``forkserver`` where there is one: the server imports torch, DDP's torch._dynamo and lorapro once (about
    10 s on a loaded 2-core machine) and every worker of every world size forks from it; else ``spawn``."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"
    multiprocessing.set_forkserver_preload(
        ["torch", "torch.distributed", "torch.nn.parallel", "torch._dynamo", "lorapro", __name__]
    )  # no effect once the server runs
    return "forkserver"


def measure(world: int, cfg: SmallConfig, workdir: str | None = None, start_method: str | None = None) -> dict[str, Any]:
    """Run ``world`` processes; return per-rank results and the figures derived from them (one step's worth)."""
    method = start_method or _start_method()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        out = os.path.join(tmp, "result.json")
        t0 = time.perf_counter()
        mp.start_processes(
            _worker, args=(world, os.path.join(tmp, "init"), out, asdict(cfg)), nprocs=world, join=True,
            start_method=method,
        )
        seconds = time.perf_counter() - t0
        with open(out) as fh:
            ranks = json.load(fh)
    r0 = ranks[0]
    pairs = r0["pairs"]
    elem = r0["param_elem"]
    moment_elem = 8 if cfg.dtype != "float64" else 16  # exp_avg + exp_avg_sq in the compute dtype
    loads = owner_loads([(m, n) for _, _, m, n, _ in pairs], world)
    steps = [s for r in ranks for s in r["steps"]]
    opt_bytes = {s["opt_bytes"] for s in steps}
    ddp_bytes = {s["ddp_bytes"] for s in steps}
    return {
        "world": world,
        "seconds": seconds,  # wall time of the whole run (process start included), not a step time
        "start_method": method,
        "ranks": ranks,
        "identical": all(r["identical"] for r in ranks),
        "changed": all(r["changed"] for r in ranks),
        "opt_bytes_per_step": max(opt_bytes),
        "opt_bytes_constant": len(opt_bytes) == 1,
        "opt_calls_per_step": max(s["opt_calls"] for s in steps),
        "opt_ops": sorted({op for s in steps for op in s["opt_by_op"]}),
        "ddp_bytes_per_step": max(ddp_bytes),
        "ddp_bytes_constant": len(ddp_bytes) == 1,
        "ddp_calls_per_step": max(s["ddp_calls"] for s in steps),
        "moment_bytes_per_rank": [r["moment_bytes"] for r in ranks],
        "rest_bytes_per_rank": [r["rest_bytes"] for r in ranks],
        # the formulas of table 2, for this model
        # the new factors, plus the step's agreement (Sharding.agree: int64 non-finite and sparse flags and one
        # has-gradient flag per tensor the optimizer holds)
        "predicted_opt_bytes": (
            sum(r * (m + n) for _, r, m, n, _ in pairs) * elem + 8 * (2 + r0["optimizer_tensors"]) if world > 1 else 0
        ),
        "predicted_ddp_bytes": sum(r * (m + n) for _, r, m, n, _ in pairs) * elem + r0["other_trainable_bytes"],
        "predicted_moment_bytes_per_rank": [moment_elem * x for x in loads],
        "unsharded_moment_bytes": moment_elem * sum(m * n for _, _, m, n, _ in pairs),
        "largest_layer_moment_bytes": moment_elem * max(m * n for _, _, m, n, _ in pairs),
        "full_ft_ddp_bytes": sum(m * n for _, _, m, n, _ in pairs) * elem,
    }


def check_measured(res: dict[str, Any]) -> None:
    """The properties the figures rely on; raises AssertionError with what failed."""
    w = res["world"]
    assert res["identical"], f"W={w}: ranks ended with different parameters"
    assert res["changed"], f"W={w}: the steps did not change the parameters"
    assert res["opt_bytes_constant"] and res["ddp_bytes_constant"], f"W={w}: bytes differ between steps or ranks"
    assert res["opt_bytes_per_step"] == res["predicted_opt_bytes"], (w, res["opt_bytes_per_step"], res["predicted_opt_bytes"])
    assert res["ddp_bytes_per_step"] == res["predicted_ddp_bytes"], (w, res["ddp_bytes_per_step"], res["predicted_ddp_bytes"])
    assert res["moment_bytes_per_rank"] == res["predicted_moment_bytes_per_rank"], (
        w, res["moment_bytes_per_rank"], res["predicted_moment_bytes_per_rank"])
    assert sum(res["moment_bytes_per_rank"]) == res["unsharded_moment_bytes"]
    assert max(res["moment_bytes_per_rank"]) <= res["unsharded_moment_bytes"] / w + res["largest_layer_moment_bytes"]


# ----------------------------------------------------------------------------------------------------------
# 2. Computed for Llama-2-7B
# ----------------------------------------------------------------------------------------------------------

LLAMA2_7B = {"layers": 32, "hidden": 4096, "intermediate": 11008, "vocab": 32000}


def computed_llama(
    worlds: list[int], r: int = 8, param_bytes: int = 2, grad_bytes: int = 2, moment_bytes: int = 8,
    spec: dict[str, int] = LLAMA2_7B,
) -> dict[str, Any]:
    """Per-step communication and per-rank moment memory for LoRA-Pro on all 7 linear modules of every layer."""
    shapes = [(m, n) for _ in range(spec["layers"]) for _, m, n in module_shapes(spec["hidden"], spec["intermediate"])]
    adapted = sum(m * n for m, n in shapes)
    lora = sum(r * (m + n) for m, n in shapes)
    d = spec["hidden"]
    whole_model = adapted + 2 * spec["vocab"] * d + (2 * spec["layers"] + 1) * d  # + embed, lm_head, norms
    rows = []
    for w in worlds:
        loads = owner_loads(shapes, w)
        opt = lora * param_bytes if w > 1 else 0  # Sharding.finish: A and B of every pair, in their dtype
        ddp = lora * grad_bytes  # DDP all-reduces the trainable (LoRA) gradients only
        rows.append({
            "world": w,
            "moment_bytes_max_rank": moment_bytes * max(loads),
            "moment_bytes_min_rank": moment_bytes * min(loads),
            "moment_bytes_unsharded": moment_bytes * adapted,
            "opt_allreduce_bytes": opt,
            "opt_allreduce_calls": 1 if w > 1 else 0,  # one per dtype; all pairs share one dtype here
            "opt_ring_bytes_per_rank": ring_bytes(opt, w),
            "ddp_lora_grad_bytes": ddp,
            "ddp_lora_ring_bytes_per_rank": ring_bytes(ddp, w),
            "ddp_full_ft_adapted_bytes": adapted * grad_bytes,
            "ddp_full_ft_whole_model_bytes": whole_model * grad_bytes,
            "ddp_full_ft_ring_bytes_per_rank": ring_bytes(whole_model * grad_bytes, w),
        })
    return {
        "model": "Llama-2-7B", **spec, "rank": r, "pairs": len(shapes), "adapted_elements": adapted,
        "lora_elements": lora, "whole_model_elements": whole_model, "param_bytes": param_bytes,
        "grad_bytes": grad_bytes, "moment_bytes_per_element": moment_bytes, "rows": rows,
    }


# ----------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------


def _fmt(nbytes: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes:.0f} B"


def measured_table(results: list[dict[str, Any]], cfg: SmallConfig) -> str:
    shapes = ", ".join(f"{name} {m}x{n}" for name, m, n in module_shapes(cfg.hidden, cfg.intermediate))
    lines = [
        f"Measured (CPU, gloo, DDP): {cfg.layers} layers x 7 LoRA linears ({shapes}), r = {cfg.rank}, "
        f"{cfg.dtype} parameters, {cfg.steps} steps, per step. Bytes are the logical buffers given to the "
        "collective calls; 'ring' = 2(W-1)/W x buffer, what each rank sends in a ring all-reduce. "
        "Moments: the m x n exp_avg + exp_avg_sq of the pairs a rank owns; rest: all other optimizer state. "
        "Run wall s: the whole W-process run, process start included (the first run also starts the fork "
        "server that imports torch); not a step time.",
        "",
        "| W | opt. all-reduce / step (calls) | opt. ring / rank | DDP grad all-reduce / step (buckets) "
        "| DDP ring / rank | moments / rank: max (min) | unsharded moments / rank | rest / rank (max) "
        "| ranks bit-identical | run wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        w = res["world"]
        mom = res["moment_bytes_per_rank"]
        lines.append(
            f"| {w} | {_fmt(res['opt_bytes_per_step'])} ({res['opt_calls_per_step']}) "
            f"| {_fmt(ring_bytes(res['opt_bytes_per_step'], w))} "
            f"| {_fmt(res['ddp_bytes_per_step'])} ({res['ddp_calls_per_step']}) "
            f"| {_fmt(ring_bytes(res['ddp_bytes_per_step'], w))} "
            f"| {_fmt(max(mom))} ({_fmt(min(mom))}) | {_fmt(res['unsharded_moment_bytes'])} "
            f"| {_fmt(max(res['rest_bytes_per_rank']))} | {'yes' if res['identical'] else 'NO'} "
            f"| {res['seconds']:.1f} |"
        )
    return "\n".join(lines)


def computed_table(llama: dict[str, Any]) -> str:
    lines = [
        f"Computed for {llama['model']} ({llama['layers']} layers, d = {llama['hidden']}, f = {llama['intermediate']}, "
        f"all 7 linear modules, r = {llama['rank']}: {llama['pairs']} pairs, {llama['lora_elements']:,} LoRA "
        f"parameters, {llama['adapted_elements']:,} adapted weight elements), {llama['param_bytes']}-byte parameters "
        f"and gradients, {llama['moment_bytes_per_element']} bytes of moments per adapted element. Per step; "
        "bytes are logical all-reduce buffers, 'ring' = 2(W-1)/W x buffer sent per rank. Moment placement by "
        "lorapro.sharding.assign_owners. Full fine-tuning: DDP's gradient all-reduce of the 7 modules' weights "
        f"(whole model incl. embeddings/lm_head/norms: {llama['whole_model_elements']:,} elements).",
        "",
        "| W | moments / rank, sharded (max) | moments / rank, unsharded | opt. all-reduce / step | opt. ring / rank "
        "| DDP LoRA-grad all-reduce / step | DDP ring / rank | full-FT DDP all-reduce: 7 modules (whole model) "
        "| full-FT ring / rank (whole model) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in llama["rows"]:
        lines.append(
            f"| {row['world']} | {_fmt(row['moment_bytes_max_rank'])} | {_fmt(row['moment_bytes_unsharded'])} "
            f"| {_fmt(row['opt_allreduce_bytes'])} | {_fmt(row['opt_ring_bytes_per_rank'])} "
            f"| {_fmt(row['ddp_lora_grad_bytes'])} | {_fmt(row['ddp_lora_ring_bytes_per_rank'])} "
            f"| {_fmt(row['ddp_full_ft_adapted_bytes'])} ({_fmt(row['ddp_full_ft_whole_model_bytes'])}) "
            f"| {_fmt(row['ddp_full_ft_ring_bytes_per_rank'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", default="1,2,4,8", help="comma-separated world sizes (default 1,2,4,8)")
    ap.add_argument("--layers", type=int, default=SmallConfig.layers)
    ap.add_argument("--hidden", type=int, default=SmallConfig.hidden)
    ap.add_argument("--intermediate", type=int, default=SmallConfig.intermediate)
    ap.add_argument("--rank", type=int, default=SmallConfig.rank)
    ap.add_argument("--dtype", default=SmallConfig.dtype, choices=sorted(_DTYPES))
    ap.add_argument("--steps", type=int, default=SmallConfig.steps)
    ap.add_argument("--train-norm", action="store_true", help="also train a non-LoRA vector (AdamW, replicated)")
    ap.add_argument("--llama-rank", type=int, default=8)
    ap.add_argument("--llama-param-bytes", type=int, default=2, help="bytes per parameter/gradient (2: bf16)")
    ap.add_argument("--quick", action="store_true", help="W = 1, 2 and tiny layers (a smoke run)")
    ap.add_argument("--json", help="write every number to this file")
    args = ap.parse_args(argv)
    worlds = [int(w) for w in args.worlds.split(",")]
    cfg = SmallConfig(layers=args.layers, hidden=args.hidden, intermediate=args.intermediate, rank=args.rank,
                      dtype=args.dtype, steps=args.steps, train_norm=args.train_norm)
    if args.quick:
        worlds = [1, 2]
        cfg = SmallConfig(layers=1, hidden=32, intermediate=48, rank=4, dtype=args.dtype, steps=2,
                          train_norm=args.train_norm)
    t0 = time.perf_counter()
    results = []
    for w in worlds:
        res = measure(w, cfg)
        check_measured(res)
        results.append(res)
    llama = computed_llama(worlds if not args.quick else [1, 2, 4, 8], r=args.llama_rank,
                           param_bytes=args.llama_param_bytes, grad_bytes=args.llama_param_bytes)
    print(measured_table(results, cfg))
    print()
    print(computed_table(llama))
    total = time.perf_counter() - t0
    print(f"\ntotal wall time {total:.1f} s (torch {torch.__version__}, {os.cpu_count()} CPUs)")
    if args.json:
        payload = {
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]) if argv is None else None,
            "torch": torch.__version__, "cpus": os.cpu_count(), "wall_seconds": total,
            "measured": {"config": asdict(cfg), "results": results}, "computed": llama,
        }
        with open(args.json, "w") as fh:
            json.dump(payload, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
