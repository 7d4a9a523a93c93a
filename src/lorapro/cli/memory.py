"""``lorapro memory``: will LoRA, LoRA-Pro (per moment preset) or full fine-tuning fit on a GPU?

Answered before any GPU is rented, from the model's configuration alone: the model is built on PyTorch's meta
device (``AutoModelFor*.from_config`` under ``torch.device("meta")``: nothing downloaded, nothing allocated) and
wrapped with PEFT's ``get_peft_model`` the way ``lorapro train`` wraps it, so every shape and dtype is the real
one (PEFT keeps the LoRA factors of a bf16/fp16 model in float32). The optimizer state of each LoRA-Pro preset
is what :mod:`lorapro.moments` creates for each layer (its ``init_state`` on the meta device), split over the
ranks with the optimizer's own owner rule (:func:`lorapro.sharding.assign_owners`).

Counted per rank: the weights, the LoRA factors, the gradients of the trained tensors and the optimizer state.
**Not** counted: activations (they depend on batch size, sequence length and checkpointing), the CUDA context,
allocator fragmentation and framework buffers; ``--reserve-gib`` is set aside for all of those.

Run it as ``lorapro memory --model llama-2-7b --rank 8 --gpu-gib 24`` (or ``python -m lorapro.cli.memory``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import textwrap
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..optim import MOMENT_MODES
from .data import TASKS as DATA_TASKS
from .errors import UserError

__all__ = [
    "BUILTIN_CONFIGS",
    "DTYPES",
    "GIB",
    "PRESETS",
    "add_arguments",
    "fits",
    "format_table",
    "load_config",
    "main",
    "plan",
    "run",
]

GIB = 1 << 30
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# Built-in configurations (configs/<name>.json, the models' public config.json): name -> what the table calls it.
BUILTIN_CONFIGS: dict[str, str] = {
    "llama-2-7b": "Llama-2-7B",
    "llama-3-8b": "Llama-3-8B",
    "mistral-7b": "Mistral-7B-v0.1",
}
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# LoRAProAdamW's moment presets, in its order: full, bf16, factored, efficient, int8-factored, int8, bf16-factored,
# adafactor.
PRESETS: tuple[str, ...] = tuple(MOMENT_MODES)
TASKS = ("auto", *DATA_TASKS)  # auto: causal-lm for a model with an LM head, else classification


# ------------------------------------------------------------------------------------------------ the model


def _environment() -> None:
    """Nothing from the Hub, and only transformers' errors (set before transformers is imported)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def load_config(config_or_path: Any) -> tuple[Any, str]:
    """``(transformers config, name to display)`` for a built-in name (:data:`BUILTIN_CONFIGS`), a
    ``config.json`` file, a model directory or a builtin model of ``lorapro train`` (``minilm``,
    ``smollm2-135m``), a dict of config.json's contents, or a transformers config itself."""
    _environment()
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config_or_path, PretrainedConfig):  # a copy: the plan sets num_labels on it
        return copy.deepcopy(config_or_path), getattr(config_or_path, "name_or_path", "") or config_or_path.model_type
    if isinstance(config_or_path, dict):
        return _config_from_dict(dict(config_or_path), "a config dict"), str(config_or_path.get("model_type", "?"))
    name = str(config_or_path)
    key = name.lower()
    if key in BUILTIN_CONFIGS:
        path = CONFIG_DIR / f"{key}.json"
        config = _config_from_dict(json.loads(path.read_text()), str(path))
        return config, f"{BUILTIN_CONFIGS[key]} (built-in config {key})"
    path = Path(name).expanduser()
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {path} as a config.json: {e}") from None
        if not isinstance(data, dict):
            raise UserError(f"{path} is not a config.json (not a JSON object)")
        return _config_from_dict(data, str(path)), str(path)
    from .models import resolve_model

    try:
        directory = resolve_model(name)
    except UserError as e:
        raise UserError(f"{e}; or a built-in config: {', '.join(BUILTIN_CONFIGS)}, or a config.json file") from None
    try:
        config = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot read the config in {directory}: {' '.join(str(e).split())[:300]}") from None
    return config, name if key in ("minilm", "smollm2-135m") else str(directory)


def _config_from_dict(data: dict[str, Any], where: str) -> Any:
    from transformers import AutoConfig

    model_type = data.pop("model_type", None)
    if not model_type:
        raise UserError(f"{where}: the config has no model_type")
    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{where}: {' '.join(str(e).split())[:300]}") from None


def _task(config: Any, task: str) -> str:
    """``auto``: causal-lm for a config whose architectures name a causal LM (or none at all), classification for
    an encoder (MiniLM's ``BertModel``), as ``lorapro train`` trains them."""
    if task != "auto":
        return task
    archs = getattr(config, "architectures", None) or []
    if not archs or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal-lm"
    return "classification"


def _build_meta(config: Any, task: str, dtype: torch.dtype, num_labels: int) -> nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if task == "classification":
        config.num_labels = num_labels
    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return auto.from_config(config, dtype=dtype)
    except (ValueError, KeyError) as e:
        raise UserError(f"cannot build a {task} model from this config: {' '.join(str(e).split())[:300]}") from None


def _head_names(model: nn.Module) -> list[str]:
    """The task head's top-level children and the output embedding: what ``lorapro train`` never adapts by
    default (the rule of :mod:`lorapro.cli.models`, imported: it does not import transformers or peft)."""
    from .models import _head_names as head_names

    return head_names(model)


def _in(name: str, heads: Sequence[str]) -> bool:
    return any(name == h or name.startswith(h + ".") for h in heads)


def _targets(model: nn.Module, target_modules: Sequence[str] | None, task: str) -> tuple[list[str], list[str]]:
    """(full module names to adapt, names to display). Default (``None`` or ``all-linear``): every Linear (and
    transformers ``Conv1D``) outside the head; otherwise PEFT's rule (the full name, or a suffix after a dot),
    the head excluded for classification (it is trained fully there)."""
    linear: tuple[type, ...] = (nn.Linear,)
    try:
        from transformers.pytorch_utils import Conv1D

        linear += (Conv1D,)
    except ImportError:  # pragma: no cover
        pass
    heads = _head_names(model)
    modules = [(name, mod) for name, mod in model.named_modules() if name]
    targets = [t.strip() for t in (target_modules or []) if t.strip()]
    if not targets or targets == ["all-linear"]:
        paths = [name for name, mod in modules if isinstance(mod, linear) and not _in(name, heads)]
        if not paths:
            raise UserError(f"{type(model).__name__} has no Linear layers outside its head to adapt with LoRA")
        return paths, list(dict.fromkeys(p.rsplit(".", 1)[-1] for p in paths))
    exclude = heads if task == "classification" else []

    def match(name: str, t: str) -> bool:
        return name == t or name.endswith("." + t)

    missing = [t for t in targets if not any(match(n, t) and not _in(n, exclude) for n, _ in modules)]
    if missing:
        leaves = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n, m in modules if isinstance(m, linear)))
        raise UserError(
            f"--target-modules {', '.join(missing)}: no such module in {type(model).__name__}"
            + (" outside its classification head" if exclude else "")
            + f"; its Linear layers are named {', '.join(leaves[:12])}{', ...' if len(leaves) > 12 else ''}"
        )
    paths = [n for n, _ in modules if not _in(n, exclude) and any(match(n, t) for t in targets)]
    return paths, targets


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ------------------------------------------------------------------------------------------------- the plan


def _state_bytes(preset: str, m: int, n: int, r: int, dtype: torch.dtype) -> int:
    """Bytes of one adapted layer's LoRAProAdamW state for ``preset`` (``dtype``: the compute dtype of its
    factors), without the ``step`` scalar (a CPU tensor): ``storage(preset).init_state`` on the meta device, or
    for ``efficient`` AdamW's two moments of A (r x n) and B (m x r)."""
    if preset == "efficient":
        return 2 * r * (m + n) * dtype.itemsize
    from ..moments import storage

    state = storage(preset).init_state(m, n, dtype, torch.device("meta"), rank=r)
    return sum(_nbytes(t) for t in state.values())


def _check_presets(presets: Sequence[str]) -> list[str]:
    from ..moments import storage

    out = []
    for p in presets:
        if p != "efficient":
            try:
                storage(p)
            except ValueError:
                raise UserError(
                    f"unknown moment preset {p!r}: choose from {', '.join(PRESETS)} (or '<first>-<second>', first in "
                    "fp32, bf16, int8, none and second in fp32, bf16, int8, factored)"
                ) from None
        out.append(p)
    return out


def plan(
    config_or_path: Any,
    *,
    rank: int = 8,
    target_modules: Sequence[str] | None = None,
    world: int = 1,
    dtype: str | torch.dtype = "bf16",
    presets: Sequence[str] = PRESETS,
    task: str = "auto",
    num_labels: int = 2,
) -> list[dict[str, Any]]:
    """Per-rank memory of full fine-tuning, LoRA and LoRA-Pro (one row per moment preset), in bytes.

    Args:
        config_or_path: see :func:`load_config`.
        rank: the LoRA rank r.
        target_modules: module names (PEFT's rule); ``None`` or ``["all-linear"]``: every Linear but the head.
        world: data-parallel ranks. LoRA-Pro's state (every preset) is owner-sharded with the optimizer's rule;
            full fine-tuning and LoRA are taken as DDP replicas (nothing sharded).
        dtype: the model's parameter dtype, ``bf16`` / ``fp16`` / ``fp32`` (or a ``torch.dtype``).
        presets: LoRAProAdamW ``moments`` presets.
        task: ``causal-lm``, ``classification`` (head of ``num_labels`` trained fully) or ``auto`` (from the
            config's architectures).

    Every row holds ``method`` (``full`` / ``lora`` / ``lorapro``), ``preset``, ``label``, the per-rank bytes
    ``weights`` (every parameter but the LoRA factors, trained ones included), ``lora_factors``, ``grads`` (of
    the trained tensors), ``optimizer`` (without the ``step`` scalars, which live on the CPU) and ``total``;
    ``optimizer_one_process`` (the state unsharded), ``optimizer_per_rank``, ``sharded``, ``transient`` (the
    largest buffer LoRA-Pro's step allocates for a while, or the scratch the separable presets keep between
    steps; not in ``total``), and the plan's common fields
    (``model``, ``task``, ``rank``, ``world``, ``dtype``, ``params``, ``adapted_layers``, ...).
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise UserError(f"--rank must be a positive integer, got {rank!r}")
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise UserError(f"--world must be a positive integer, got {world!r}")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UserError(f"--dtype {dtype!r}: choose from {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if task not in TASKS:
        raise UserError(f"--task {task!r}: choose from {', '.join(TASKS)}")
    if num_labels < 1:
        raise UserError(f"--num-labels must be at least 1, got {num_labels}")
    presets = _check_presets(presets)

    config, name = load_config(config_or_path)
    task = _task(config, task)
    from peft import LoraConfig, get_peft_model

    from .._buckets import bucket_pairs, separable_scratch_numel
    from ..functional import compute_dtype
    from ..moments import storage
    from ..pairs import find_lora_pairs
    from ..sharding import assign_owners

    model = _build_meta(config, task, dtype, num_labels)
    base = list(model.parameters())  # tied tensors once
    params = sum(p.numel() for p in base)
    base_bytes = sum(_nbytes(p) for p in base)
    full_state = sum(2 * p.numel() * compute_dtype(p.dtype).itemsize for p in base)

    paths, shown = _targets(model, target_modules, task)
    # as lorapro train: for classification the head is trained fully (PEFT adds classifier / score itself)
    save = [h for h in _head_names(model) if h not in ("classifier", "score")] if task == "classification" else []
    lora = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=paths,
        task_type="SEQ_CLS" if task == "classification" else "CAUSAL_LM",
        modules_to_save=save or None,
    )
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = get_peft_model(model, lora)
    except ValueError as e:
        raise UserError(f"--target-modules {', '.join(shown)}: {' '.join(str(e).split())[:300]}") from None
    try:
        pairs = find_lora_pairs(peft_model)
    except ValueError as e:
        raise UserError(f"--target-modules {', '.join(shown)}: {' '.join(str(e).split())[:300]}") from None
    factor_ids = {id(t) for p in pairs for t in (p.A, p.B)}
    weights = factors = grads = others_state = other_params = factor_params = 0
    for p in peft_model.parameters():
        if id(p) in factor_ids:
            factors += _nbytes(p)
            factor_params += p.numel()
        else:
            weights += _nbytes(p)
        if p.requires_grad:
            grads += _nbytes(p)
            if id(p) not in factor_ids:
                other_params += p.numel()
                others_state += 2 * p.numel() * compute_dtype(p.dtype).itemsize
    owner = assign_owners(pairs, world)
    adapted = sum(math.prod(p.shape) for p in pairs)
    factor_dtypes = sorted({str(p.A.dtype).replace("torch.", "") for p in pairs})

    lora_state = others_state + sum(2 * t.numel() * compute_dtype(t.dtype).itemsize for p in pairs for t in (p.A, p.B))
    common = {
        "model": name, "task": task, "rank": rank, "world": world, "dtype": str(dtype).replace("torch.", ""),
        "params": params, "target_modules": shown, "adapted_layers": len(pairs), "adapted_elements": adapted,
        "lora_params": factor_params, "lora_dtype": ", ".join(factor_dtypes), "other_trainable_params": other_params,
    }

    def row(method: str, preset: str, label: str, w: int, f: int, g: int, per_rank: list[int], one: int,
            sharded: bool, transient: int = 0) -> dict[str, Any]:
        opt = max(per_rank)
        return {**common, "method": method, "preset": preset, "label": label, "weights": w, "lora_factors": f,
                "grads": g, "optimizer": opt, "total": w + f + g + opt, "optimizer_one_process": one,
                "optimizer_per_rank": per_rank, "sharded": sharded, "transient": transient}

    rows = [
        row("full", "adamw", "full FT", base_bytes, 0, base_bytes, [full_state] * world, full_state, False),
        row("lora", "adamw", "LoRA", weights, factors, grads, [lora_state] * world, lora_state, False),
    ]
    cache: dict[tuple[str, int, int, int, torch.dtype], int] = {}
    for preset in presets:
        per_rank = [others_state] * world
        one = others_state
        for p in pairs:
            key = (preset, *p.shape, p.rank, compute_dtype(p.A.dtype))
            if key not in cache:
                cache[key] = _state_bytes(preset, *key[1:])
            per_rank[owner[id(p.B)]] += cache[key]
            one += cache[key]
        # the step's largest transient: block workspace plus rank-sized stacks, within one m x n matrix in the
        # compute dtype for the m x n presets (lorapro.moments, lorapro._buckets); for the separable ones the
        # scratch LoRAProAdamW keeps between steps, sized by its largest bucket; efficient: r-sized
        if preset == "efficient" or not pairs:
            transient = 0
        elif storage(preset).separable:
            transient = max(
                separable_scratch_numel(b, storage(preset)) * compute_dtype(b[0].A.dtype).itemsize
                for b in bucket_pairs(pairs, storage(preset))
            )
        else:
            transient = max(math.prod(p.shape) * compute_dtype(p.A.dtype).itemsize for p in pairs)
        rows.append(row("lorapro", preset, "LoRA-Pro", weights, factors, grads, per_rank, one, world > 1, transient))
    return rows


# ------------------------------------------------------------------------------------------------ the table


def fits(row: dict[str, Any], gpu_gib: float, reserve_gib: float = 2.0) -> bool:
    """Whether ``row``'s per-rank total plus ``reserve_gib`` fits in ``gpu_gib`` (GiB = 2^30 bytes)."""
    return row["total"] + reserve_gib * GIB <= gpu_gib * GIB


def _size(n: float, unit: int) -> str:
    return f"{n / unit:.2f}"


def _short(n: int) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{suffix}"
    return str(n)


def format_table(rows: list[dict[str, Any]], gpu_gib: float | None = None, reserve_gib: float = 2.0) -> str:
    """The plan as text: a header, one line per method / preset (per-rank GiB), and what is not modelled."""
    if not rows:
        return "(nothing planned)"
    c = rows[0]
    world = c["world"]
    # GiB, or MiB for a model whose every total is under 1 GiB (the verdict stays in GiB)
    big = max(r["total"] for r in rows) >= GIB
    unit, unit_name = (GIB, "GiB (2^30 bytes)") if big else (1 << 20, "MiB (2^20 bytes)")
    short = unit_name.split()[0]

    def _gib(n: float) -> str:
        return _size(n, unit)

    lines = [
        f"{c['model']}: {c['task']}, {_short(c['params'])} parameters in {c['dtype']}",
        f"LoRA r={c['rank']} on {', '.join(c['target_modules'])}: {c['adapted_layers']} layers, "
        f"{_short(c['lora_params'])} factor parameters ({c['lora_dtype']})"
        + (f"; {_short(c['other_trainable_params'])} other trained parameters (the head)"
           if c["other_trainable_params"] else ""),
        f"per rank, {unit_name}; world size {world}"
        + (f"; fits = total + {reserve_gib:g} GiB reserve <= {gpu_gib:g} GiB" if gpu_gib is not None else ""),
        "",
    ]
    head = ["method", "moments", "weights", "LoRA factors", "grads", "optimizer state", "total/rank"]
    if gpu_gib is not None:
        head.append(f"fits {gpu_gib:g} GiB?")
    table = [head]
    for r in rows:
        moments = {"full": "AdamW fp32", "lora": "AdamW fp32"}.get(r["method"], r["preset"])
        if r["method"] == "lorapro" and r["preset"] == "efficient":
            moments = "efficient*"
        cells = [r["label"], moments, _gib(r["weights"]), _gib(r["lora_factors"]) if r["lora_factors"] else "-",
                 _gib(r["grads"]), _gib(r["optimizer"]), _gib(r["total"])]
        if gpu_gib is not None:
            left = gpu_gib - reserve_gib - r["total"] / GIB
            ok = fits(r, gpu_gib, reserve_gib)
            cells.append(f"yes ({left:.1f} GiB spare)" if ok else f"no ({-left:.1f} GiB short)")
        table.append(cells)
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for k, cells in enumerate(table):
        left = (0, 1, 7)  # method, moments and the verdict; the numbers right-aligned
        text = "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        lines.append(text.rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))

    from ..moments import storage

    pro = [r for r in rows if r["method"] == "lorapro"]
    notes = [
        (f"Activations are NOT modelled (they grow with batch size and sequence length, and shrink with gradient "
         f"checkpointing): --reserve-gib ({reserve_gib:g} GiB) is all that is set aside for them, the CUDA context, "
         "allocator fragmentation and framework buffers."),
        ("Weights are in the parameter dtype (the LoRA methods: frozen; full FT: all trained); gradients only for "
         "the trained tensors, in their dtype; no float32 master copy of the weights."),
        ("full FT and LoRA: AdamW with float32 moments, as LoRAProAdamW keeps them for bf16/fp16 tensors "
         "(torch.optim.AdamW keeps them in the parameter's dtype); PEFT keeps LoRA factors of a bf16/fp16 model in "
         "float32."),
    ]
    def kept_between_steps(preset: str) -> bool:  # the separable presets' transient is the scratch they keep
        return preset != "efficient" and storage(preset).separable

    dense = [r["transient"] for r in pro if not kept_between_steps(r["preset"])]
    if any(dense):
        notes.append(f"LoRA-Pro's step also allocates, for a moment, up to {_gib(max(dense))} {short} (one m x n matrix "
                     "of the largest layer in float32: block workspace and rank-sized stacks); not in the totals "
                     "(efficient: r-sized, negligible).")
    kept = {r["preset"]: r["transient"] for r in pro if kept_between_steps(r["preset"])}
    if kept:
        shown = ", ".join(f"{p} {_gib(b)}" for p, b in kept.items())
        notes.append(f"adafactor and lowrank-factored keep a scratch between steps ({shown} {short}: stacks and "
                     "temporaries of the largest bucket of layers, r-sized); not in the totals.")
    if any(r["preset"] == "efficient" for r in pro):
        notes.append("* efficient is not LoRA-Pro's Algorithm 2: r-sized AdamW moments on the adjusted gradients "
                     "of A and B (what LoRA costs).")
    if world > 1:
        ref = next((r for r in pro if r["preset"] == "full"), pro[0] if pro else None)
        share = (f" (moments full: {_gib(ref['optimizer'])} of {_gib(ref['optimizer_one_process'])} {short}, "
                 f"{ref['optimizer'] / max(ref['optimizer_one_process'], 1):.3f} of one process's)" if ref else "")
        notes.append(
            f"world {world}: LoRA-Pro's optimizer state is owner-sharded over the ranks (each layer's state on one "
            f"rank, lorapro.sharding.assign_owners), the most loaded rank shown{share}; weights, factors and "
            "gradients are replicated. Full FT and LoRA are taken as DDP replicas: nothing sharded (ZeRO / FSDP "
            "would shard them; not modelled). DDP's gradient buckets can add one more copy of the gradients "
            "unless gradient_as_bucket_view=True."
        )
    lines.append("")
    lines += [textwrap.fill(n, 116, initial_indent="- ", subsequent_indent="  ") for n in notes]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- command line


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``lorapro memory``."""
    parser.add_argument("--model", required=True,
                        help=f"a built-in config ({', '.join(BUILTIN_CONFIGS)}), a config.json file, a local Hugging "
                             "Face model directory, or minilm / smollm2-135m")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r (default %(default)s)")
    parser.add_argument("--target-modules", type=_csv, default=None,
                        help="comma-separated module names (default: every linear layer except the output head, "
                             "e.g. q,k,v,o,gate,up,down projections of a Llama)")
    parser.add_argument("--world", type=int, default=1,
                        help="data-parallel ranks (default %(default)s); LoRA-Pro's state is sharded over them, "
                             "full FT and LoRA are DDP replicas")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="parameter dtype (default %(default)s)")
    parser.add_argument("--presets", type=_csv, default=list(PRESETS),
                        help=f"LoRA-Pro moment presets, comma-separated (default: {','.join(PRESETS)})")
    parser.add_argument("--task", choices=TASKS, default="auto",
                        help="causal-lm, or classification (a head of --num-labels trained fully); auto (default): "
                             "from the config's architectures")
    parser.add_argument("--num-labels", type=int, default=2, help="classification classes (default %(default)s)")
    parser.add_argument("--gpu-gib", type=float, default=None, help="GPU memory per rank in GiB: say what fits")
    parser.add_argument("--reserve-gib", type=float, default=2.0,
                        help="GiB per rank kept for activations, CUDA context and framework overhead, which are "
                             "not modelled (default %(default)s)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the rows (bytes) as JSON")


def run(args: argparse.Namespace) -> int:
    """``lorapro memory``: print the table (and write ``--json``). Raises :class:`UserError` on bad input."""
    if args.gpu_gib is not None and not (math.isfinite(args.gpu_gib) and args.gpu_gib > 0):
        raise UserError(f"--gpu-gib must be a positive number, got {args.gpu_gib}")
    if not (math.isfinite(args.reserve_gib) and args.reserve_gib >= 0):
        raise UserError(f"--reserve-gib must be a number >= 0, got {args.reserve_gib}")
    rows = plan(args.model, rank=args.rank, target_modules=args.target_modules, world=args.world, dtype=args.dtype,
                presets=args.presets, task=args.task, num_labels=args.num_labels)
    print(format_table(rows, args.gpu_gib, args.reserve_gib))
    if args.json:
        from .._io import atomic_write_json

        atomic_write_json(args.json, {"args": vars(args), "rows": rows})
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m lorapro.cli.memory``, until ``lorapro memory`` is registered."""
    _environment()
    parser = argparse.ArgumentParser(prog="lorapro memory", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UserError as e:
        print(f"lorapro: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
