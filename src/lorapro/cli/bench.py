"""``lorapro bench``: the optimizer step of LoRA-Pro against its peers and its floor, in one run.

For a set of adapted layers (default: on CPU 8 of 2048 x 2048 in float32; on a GPU two Llama-2-7B decoder
layers in bfloat16; r = 16) with fixed random gradients, it times
``optimizer.step()`` (median of ``--repeats`` after ``--warmup`` steps) and measures the step's peak *extra*
memory (allocations live at once during the step, beyond what existed before it) for:

1. ``lorapro``: our :class:`lorapro.LoRAProAdamW`;
2. ``paper-literal``: a per-layer transcription of the paper's step as the original code does it
   (``lorapro/cli/paper_step.py``: complex eigendecomposition, pseudo-inverses, the m x m projector);
3. ``lora-pro-adamw``: the published peer (``pip install lora-pro-adamw==0.2.1``), ``lorapro_mode="full"``;
4. ``adamw-lora``: ``torch.optim.AdamW(foreach=True)`` on the LoRA factors only;
5. ``adamw-full``: ``torch.optim.AdamW(foreach=True)`` on the full weights (full fine-tuning's step);
6. the floor: ``floor-traffic`` (one read and write of both m x n moments) and ``floor-products`` (the
   rank-r products the step cannot avoid: ``G = [B, b] [a; A]``, ``B^T U`` and ``U A^T``, about 8 m n r flops);
   ``floor-separable``: the matrix products of the separable presets' step (``adafactor``), at their shapes and
   batched as that step batches them (about 36 (m + n) r^2 / 2 multiply-adds per layer), and nothing else:
   what that step would cost with its elementwise work, eigendecompositions and bookkeeping free.

Rows that cannot run here (the peer not installed) are reported as skipped. Ratios are printed against our step, so a noisy machine still gives a fair comparison.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from .._state import optimizer_scratch_bytes as _scratch_bytes
from .._state import optimizer_state_bytes as _state_bytes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_SHAPES = "2048x2048:8"  # a scaled-down Llama: bound by the rank-r products on a CPU
# Two Llama-2-7B decoder layers (out x in): q, k, v, o; gate and up; down. On a GPU the step is bound by the
# moment traffic, and these are the shapes that traffic has in the paper's setting.
GPU_SHAPES = "4096x4096:8,11008x4096:4,4096x11008:2"


def resolve_defaults(args: argparse.Namespace) -> torch.device:
    """The device, and the shapes and dtype left unset: :data:`CPU_SHAPES` in float32 on a CPU,
    :data:`GPU_SHAPES` in bfloat16 elsewhere."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cpu = device.type == "cpu"
    if args.shapes is None:
        args.shapes = CPU_SHAPES if on_cpu else GPU_SHAPES
    if args.dtype is None:
        args.dtype = "float32" if on_cpu else "bfloat16"
    return device


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"2048x2048:8,5504x2048:2"`` -> eight (2048, 2048) and two (5504, 2048) layers, as (m, n)."""
    shapes: list[tuple[int, int]] = []
    for part in text.split(","):
        dims, _, count = part.strip().partition(":")
        m, n = (int(x) for x in dims.lower().split("x"))
        shapes += [(m, n)] * int(count or 1)
    return shapes


class Layers:
    """LoRA factors with fixed gradients, and the full weights with theirs, for every shape."""

    def __init__(self, shapes, rank: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> None:
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.scale = 16.0 / rank  # alpha = 16

        def randn(*size: int, std: float) -> torch.Tensor:
            return (torch.randn(*size, generator=g) * std).to(device=device, dtype=dtype)

        self.A, self.B, self.W = [], [], []
        for m, n in shapes:
            A = randn(rank, n, std=n**-0.5).requires_grad_()
            B = randn(m, rank, std=1e-2).requires_grad_()
            A.grad, B.grad = randn(rank, n, std=1e-3), randn(m, rank, std=1e-3)
            self.A.append(A)
            self.B.append(B)
        self.shapes = list(shapes)
        self.dtype, self.device = dtype, device

    def full_weights(self) -> list[torch.Tensor]:
        if not self.W:
            for m, n in self.shapes:
                W = torch.zeros(m, n, dtype=self.dtype, device=self.device, requires_grad=True)
                W.grad = torch.full((m, n), 1e-3, dtype=self.dtype, device=self.device)
                self.W.append(W)
        return self.W

    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
        return [(A, B, self.scale) for A, B in zip(self.A, self.B)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_extra_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak of (allocated - allocated before) while ``fn`` runs."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # With profile_memory the CPU allocator reports every allocation (+bytes) and free (-bytes) as a
    # "[memory]" event, inside ops as well as between them; their running sum in time order is the memory the
    # step added, and its maximum is the peak. (Summing each op's net self memory at its end instead misses
    # what an op allocates and frees inside itself, and misplaces frees in time.)
    deltas = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    live = peak = 0
    for _, d in sorted(deltas):
        live += d
        peak = max(peak, live)
    return peak


def time_step(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _restore(layers: Layers, snapshot: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for t, s in zip([*layers.A, *layers.B], snapshot):
            t.copy_(s)


def candidates(
    layers: Layers, which: list[str], *, block_elements: int | None = None
) -> dict[str, Callable[[], Any] | str]:
    """name -> a zero-argument step function, or a string saying why the row is skipped.
    ``block_elements``: passed to the LoRA-Pro optimizers (their m x n pass's block size)."""
    import lorapro

    lr = 1e-4  # tiny steps: the factors stay well conditioned over many repeats
    out: dict[str, Callable[[], Any] | str] = {}

    def ours(**kw: Any) -> Callable[[], Any]:
        return lorapro.LoRAProAdamW(layers.pairs(), lr=lr, block_elements=block_elements, **kw).step

    if "lorapro" in which:
        out["lorapro"] = ours()
    lean = ("int8-factored", "int8", "bf16-factored", "adafactor", "lowrank-factored")
    for moments in ("bf16", "factored", "efficient", *lean):
        if f"lorapro-{moments}" in which:
            out[f"lorapro-{moments}"] = ours(moments=moments)
    if "lorapro-fused" in which:  # the first (warm-up) step compiles the fused pass
        out["lorapro-fused"] = ours(fused=True)
    if "paper-literal" in which:
        from .paper_step import PaperLoRAProAdamW

        out["paper-literal"] = PaperLoRAProAdamW(layers.pairs(), lr=lr).step
    if "lora-pro-adamw" in which:
        out["lora-pro-adamw"] = _peer(layers, lr)
    if "adamw-lora" in which:
        out["adamw-lora"] = torch.optim.AdamW([*layers.A, *layers.B], lr=lr, foreach=True).step
    if "adamw-full" in which:
        out["adamw-full"] = torch.optim.AdamW(layers.full_weights(), lr=lr, foreach=True).step
    if "floor-traffic" in which or "floor-products" in which:
        M = [torch.zeros(m, n, dtype=torch.float32, device=layers.device) for m, n in layers.shapes]
        V = [torch.zeros_like(x) for x in M]
        if "floor-traffic" in which:

            def traffic() -> None:
                torch._foreach_mul_(M, 0.9)
                torch._foreach_mul_(V, 0.999)

            out["floor-traffic"] = traffic
        if "floor-products" in which:
            r = layers.A[0].shape[0]
            left = [torch.randn(m, 2 * r, device=layers.device) for m, _ in layers.shapes]
            right = [torch.randn(2 * r, n, device=layers.device) for _, n in layers.shapes]
            gA = [torch.empty(r, n, device=layers.device) for _, n in layers.shapes]
            gB = [torch.empty(m, r, device=layers.device) for m, _ in layers.shapes]
            B32 = [b.detach().float() for b in layers.B]
            A32 = [a.detach().float() for a in layers.A]

            def products() -> None:
                for i in range(len(M)):
                    torch.mm(left[i], right[i], out=M[i])
                    torch.mm(B32[i].T, M[i], out=gA[i])
                    torch.mm(M[i], A32[i].T, out=gB[i])

            out["floor-products"] = products
    if "floor-separable" in which:
        out["floor-separable"] = _separable_products(layers)
    return out


def _separable_products(layers: Layers) -> Callable[[], Any]:
    """The batched matrix products of :func:`lorapro.functional.adafactor_on_equivalent_gradient` (no first
    moment, Sylvester X), in the buckets the optimizer makes, on random operands of their shapes, into
    preallocated outputs. ``tests/test_bench.py`` checks with torch's flop counter that they are exactly the
    step's products."""
    from .._buckets import bucket_pairs
    from .._params import resolve_params
    from ..moments import storage

    ops: list[Callable[[], Any]] = []
    _, pairs = resolve_params(layers.pairs())
    for bucket in bucket_pairs(pairs, storage("adafactor")):
        L, r, (m, n) = len(bucket), bucket[0].rank, bucket[0].shape
        dev = layers.device

        def t(*size: int) -> torch.Tensor:
            return torch.randn(L, *size, device=dev)

        B, A, lb, rb = t(m, r), t(r, n), t(m, 3 * r), t(3 * r, n)
        small = {(k, j): t(k, j) for k, j in ((r, r), (2 * r, r), (2 * r, 2 * r), (2 * r, 3 * r), (3 * r, r), (r, 3 * r))}
        out_m, out_n, out_m2 = t(m, r), t(r, n), t(m, 2 * r)
        # (the left operand, the right, the output) of each product, in the order the step makes them
        ops += [
            lambda B=B, o=small[r, r]: torch.bmm(B.mT, B, out=o),  # B^T B
            lambda A=A, o=small[r, r]: torch.bmm(A, A.mT, out=o),  # A A^T
            lambda x=small[r, r], A=A, o=out_n: torch.bmm(x, A, out=o),  # a = (B^T B)^+ gA / s^2
            lambda B=B, x=small[r, r], o=out_m: torch.bmm(B, x, out=o),  # gB (A A^T)^+
            lambda B=B, o=small[r, r]: torch.bmm(B.mT, B, out=o),  # B^T gB
            lambda B=B, x=small[r, r], o=out_m: torch.baddbmm(o, B, x, out=o),  # b
            lambda rb=rb, A=A, o=small[2 * r, r]: torch.bmm(rb[:, : 2 * r], A.mT, out=o),  # K a^T
            lambda lb=lb, B=B, o=small[2 * r, r]: torch.bmm(lb[..., : 2 * r].mT, B, out=o),  # P^T b
            lambda lb=lb, x=small[2 * r, 2 * r], o=out_m2: torch.bmm(lb[..., : 2 * r], x, out=o),  # P K K^T
            lambda x=small[2 * r, 2 * r], rb=rb, o=t(2 * r, n): torch.bmm(x, rb[:, : 2 * r], out=o),  # P^T P K
            lambda lb=lb, o=small[2 * r, 3 * r]: torch.bmm(lb[..., : 2 * r].mT, lb, out=o),  # [Ls^T Ls, Ls^T B]
            lambda rb=rb, o=small[2 * r, 3 * r]: torch.bmm(rb[:, : 2 * r], rb.mT, out=o),  # [Rs Rs^T, Rs A^T]
            lambda x=small[r, 3 * r], rb=rb, o=out_n: torch.bmm(x, rb, out=o),  # a' = [M, X] [Rs; A]
            lambda lb=lb, x=small[3 * r, r], o=out_m: torch.bmm(lb, x, out=o),  # b' = [Ls, B] [N; -(BN + X)]
        ]

    def products() -> None:
        for op in ops:
            op()

    return products


def _peer(layers: Layers, lr: float) -> Callable[[], Any] | str:
    try:
        from lora_pro import LoRAProAdamW as PeerLoRAProAdamW
    except ImportError:
        return "not installed (pip install lora-pro-adamw==0.2.1)"
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList()
    for A, B in zip(layers.A, layers.B):
        layer = torch.nn.Module()
        layer.lora_A, layer.lora_B = torch.nn.Parameter(A.detach()), torch.nn.Parameter(B.detach())
        layer.lora_A.grad, layer.lora_B.grad = A.grad.clone(), B.grad.clone()
        layer.r, layer.lora_alpha = A.shape[0], 16.0
        model.layers.append(layer)
    opt = PeerLoRAProAdamW(model, lr=lr, weight_decay=0.0, lorapro_mode="full")
    grads = [(layer.lora_A, layer.lora_A.grad.clone(), layer.lora_B, layer.lora_B.grad.clone()) for layer in model.layers]

    def step() -> None:
        for A, gA, B, gB in grads:  # the peer overwrites .grad in place: restore it every step
            A.grad.copy_(gA)
            B.grad.copy_(gB)
        opt.step()

    return step


ALL = ["lorapro", "paper-literal", "lora-pro-adamw", "adamw-lora", "adamw-full", "floor-traffic", "floor-products"]
SEPARABLE_FLOOR = ["floor-separable"]  # the adafactor preset's products alone
MEMORY_OPTIONS = [
    "lorapro-bf16", "lorapro-factored", "lorapro-efficient", "lorapro-int8-factored", "lorapro-int8",
    "lorapro-bf16-factored", "lorapro-adafactor",
]
FUSED = ["lorapro-fused"]  # LoRAProAdamW(fused=True): the torch.compile'd Adam pass


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Build every candidate, then time them round-robin (``--rounds`` x ``--repeats`` steps each), so slow
    phases of a shared machine hit all of them alike; report the median step and the peak extra memory."""
    device = resolve_defaults(args)
    dtype = DTYPES[args.dtype]
    shapes = parse_shapes(args.shapes)
    which = args.only or ALL
    elements = sum(m * n for m, n in shapes)
    steps: dict[str, Callable[[], Any]] = {}
    rows: dict[str, dict[str, Any]] = {}
    keep = []
    for name in which:
        layers = Layers(shapes, args.rank, dtype, device)
        fn = candidates(layers, [name])[name]
        if isinstance(fn, str):
            rows[name] = {"name": name, "skipped": fn}
            print(f"{name:16s} skipped: {fn}", flush=True)
            continue
        keep.append(layers)
        time_step(fn, device, args.warmup, 0)
        steps[name] = fn
        # the step's working memory: what it allocates while it runs, and the scratch it keeps between steps
        extra = peak_extra_bytes(fn, device) + _scratch_bytes(getattr(fn, "__self__", None))
        rows[name] = {"name": name, "peak_extra_mib": extra / 2**20, "times": [],
                      "state_bytes_per_element": _state_bytes(getattr(fn, "__self__", None)) / elements}
    for _ in range(args.rounds):
        for name, fn in steps.items():
            slow = name == "paper-literal"
            rows[name]["times"] += time_step(fn, device, 0, min(args.repeats, args.literal_repeats) if slow else args.repeats)
    for name in steps:
        times = rows[name].pop("times")
        rows[name].update(median_ms=1000 * statistics.median(times), min_ms=1000 * min(times), samples=len(times))
    return [rows[n] for n in which]


def _fmt(x: float) -> str:
    return "-" if x != x else f"{x:.3f}"  # NaN: no optimizer state to count


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    by = {r["name"]: r for r in rows if "median_ms" in r}
    ours = by.get("lorapro")
    shapes = parse_shapes(args.shapes)
    m_n = sum(m * n for m, n in shapes)
    lines = [
        f"shapes {args.shapes} (r = {args.rank}, {args.dtype}, {m_n / 1e6:.1f}M adapted weight elements), "
        f"{torch.get_num_threads()} threads, median of {args.rounds} round-robin rounds of {args.repeats} steps "
        f"after {args.warmup} warm-up steps",
        "",
        f"{'step':17s} {'median ms':>10s} {'x lorapro':>10s} {'peak extra MiB':>15s} {'extra / (m n fp32)':>19s}"
        f" {'state B/element':>16s}",
    ]
    biggest = max(m * n for m, n in shapes) * 4
    for r in rows:
        if "median_ms" not in r:
            lines.append(f"{r['name']:17s} skipped: {r['skipped']}")
            continue
        ratio = r["median_ms"] / ours["median_ms"] if ours else float("nan")
        lines.append(f"{r['name']:17s} {r['median_ms']:10.1f} {ratio:10.2f} {r['peak_extra_mib']:15.1f} "
                     f"{r['peak_extra_mib'] * 2**20 / biggest:19.2f} {_fmt(r['state_bytes_per_element']):>16s}")
    if ours and "floor-traffic" in by and "floor-products" in by:
        floor = by["floor-traffic"]["median_ms"] + by["floor-products"]["median_ms"]
        lines.append("")
        lines.append(f"lorapro / (traffic floor + products floor) = {ours['median_ms'] / floor:.2f}   (target <= 1.2)")
        if "lorapro-fused" in by:
            lines.append(f"lorapro-fused / (the same floor)           = {by['lorapro-fused']['median_ms'] / floor:.2f}")
    if ours and "adamw-full" in by:
        lines.append(f"lorapro / full fine-tuning AdamW step      = {ours['median_ms'] / by['adamw-full']['median_ms']:.2f}"
                     "   (target <= 0.5)")
    if "lorapro-adafactor" in by and "adamw-lora" in by:
        lean, lora = by["lorapro-adafactor"]["median_ms"], by["adamw-lora"]["median_ms"]
        lines.append(f"lorapro-adafactor / AdamW on the factors   = {lean / lora:.2f}   (target <= 3)")
        if "floor-separable" in by:
            floor = by["floor-separable"]["median_ms"]
            lines.append(f"floor-separable / AdamW on the factors     = {floor / lora:.2f}   (its products alone)")
            lines.append(f"lorapro-adafactor / floor-separable        = {lean / floor:.2f}")
    if ours and "lora-pro-adamw" in by:
        lines.append(f"lora-pro-adamw / lorapro                   = {by['lora-pro-adamw']['median_ms'] / ours['median_ms']:.1f}"
                     "   (target >= 8)")
    return "\n".join(lines)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="lorapro bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=None,
                   help=f"m x n : count, comma-separated (default {CPU_SHAPES} on CPU, {GPU_SHAPES} on GPU)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="parameter dtype (default float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--device", default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed steps per candidate per round")
    p.add_argument("--rounds", type=int, default=5, help="round-robin passes over the candidates")
    p.add_argument("--literal-repeats", type=int, default=1, help="repeats per round for the slow literal baseline")
    p.add_argument("--only", type=lambda s: [x.strip() for x in s.split(",")], default=None,
                   help=f"comma-separated, from {', '.join(ALL + MEMORY_OPTIONS + FUSED + SEPARABLE_FLOOR)} (default: the first seven)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    return p
