"""Scoring: :func:`evaluate` (the held-out metrics of a model in memory, used by ``lorapro train``) and
:func:`run_eval` (``lorapro eval``: a model, or a base model plus a trained adapter, on held-out data)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from . import data as data_mod
from . import models as models_mod
from .batches import Batches
from .config import TrainConfig
from .errors import UserError
from .ranks import Ranks


@torch.no_grad()
def evaluate(
    model, tokenizer, data, cfg: TrainConfig, progress: bool = False, ranks: Ranks | None = None
) -> dict[str, float]:
    """``eval_accuracy`` (classification) or ``eval_exact_match`` (causal LM), and ``eval_loss``.

    With ``ranks`` (``world`` > 1) the eval batches are dealt round-robin over the ranks; each batch is the
    same as in one process, and the per-batch results are summed in batch order, so every rank gets exactly
    the single-process numbers.
    """
    was_training = model.training
    model.eval()
    batches = Batches(data, tokenizer, cfg, next(model.parameters()).device)
    rows = data.eval
    rank, world = (ranks.rank, ranks.world) if ranks is not None else (0, 1)
    bs = cfg.eval_batch_size
    starts = range(0, len(rows), bs)
    iterator = starts[rank::world]
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="eval", leave=False, file=sys.stderr, unit="batch")
    per_batch = torch.zeros(len(starts), 3, dtype=torch.float64)  # loss, examples, correct
    for i in iterator:
        chunk = rows[i : i + bs]
        inputs = batches(chunk)
        out = model(**inputs)
        if data.task == "classification":
            right = (out.logits.argmax(-1) == inputs["labels"]).sum().item()
        else:
            right = sum(data.scorer(text, r) for text, r in zip(generate(model, tokenizer, batches, chunk, cfg), chunk))
        per_batch[i // bs] = torch.tensor([out.loss.item(), len(chunk), right], dtype=torch.float64)
    if world > 1:
        per_batch = ranks.sum(per_batch)  # each row is non-zero on one rank only: x + 0 is exact
    total_loss, total_n, correct = 0.0, 0, 0.0
    for loss, n, right in per_batch.tolist():
        total_loss += loss * int(n)
        total_n += int(n)
        correct += right
    model.train(was_training)
    key = "eval_accuracy" if data.task == "classification" else "eval_exact_match"
    return {key: correct / max(1, total_n), "eval_loss": total_loss / max(1, total_n)}


def generate(model, tokenizer, batches: Batches, rows: list[dict], cfg: TrainConfig) -> list[str]:
    """Greedy completions of the prompts (left padding)."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer([batches.prompt_text(r["prompt"]) for r in rows], return_tensors="pt", padding=True,
                        add_special_tokens=False)
        enc = {k: v.to(batches.device) for k, v in enc.items()}
        out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                             max_new_tokens=cfg.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    finally:
        tokenizer.padding_side = side
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def _saved_labels(*dirs: str | Path | None) -> list[str] | None:
    """The label order a classifier was trained with, from the marker ``lorapro train`` writes with it."""
    for d in dirs:
        marker = Path(d) / models_mod._MARKER if d else None
        if marker is not None and marker.is_file():
            id2label = json.loads(marker.read_text()).get("id2label") or {}
            if id2label:
                return [id2label[str(i)] for i in range(len(id2label))]
    return None


def recorded_base_model(adapter: str | Path) -> str:
    """The base model a PEFT adapter directory records (``base_model_name_or_path``): a builtin's Hugging Face
    id for the built-in models (which :func:`resolve_model <lorapro.cli.models.resolve_model>` maps to the local
    copy), else the name or path the training was given."""
    config_file = Path(adapter) / "adapter_config.json"
    try:
        name = json.loads(config_file.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as e:
        raise UserError(f"--adapter {adapter}: cannot read its adapter_config.json ({e.__class__.__name__}); "
                        "pass --model") from None
    if not name:
        raise UserError(f"--adapter {adapter}: adapter_config.json records no base model; pass --model")
    return str(name)


def run_eval(
    model: str,
    eval: str,
    *,
    adapter: str | None = None,
    task: str | None = None,
    train: str | None = None,
    max_eval: int | None = None,
    max_length: int | None = None,
    eval_batch_size: int | None = None,
    max_new_tokens: int | None = None,
) -> dict[str, float]:
    """The metrics of :func:`evaluate` for ``model`` (a builtin name or a model directory), with the PEFT adapter
    in ``adapter`` if given, on the rows of ``eval`` (a file or a builtin dataset's held-out split).

    ``task`` is needed with a data file; ``train`` (the training data) gives the label set when ``eval`` is a
    file and the adapter does not record it. ``max_length``, ``eval_batch_size`` and ``max_new_tokens``
    default to :class:`TrainConfig`'s. Problems with the input raise :class:`UserError`.
    """
    data = data_mod.load_task_data(task, train, eval, max_eval=max_eval)
    if not data.eval:
        raise UserError(f"no evaluation rows in {eval}")
    model_path = models_mod.resolve_model(model)
    if data.task == "classification":
        labels = _saved_labels(adapter, model_path) or data.labels
        unseen = sorted({r["label"] for r in data.eval} - set(labels))
        if unseen:
            raise UserError(f"{eval}: label(s) {', '.join(map(repr, unseen))} were never seen in training")
        data.labels = labels
    net, tokenizer = models_mod.load_for_eval(
        model_path,
        adapter,
        task=data.task,
        num_labels=len(data.labels) if data.labels else None,
        id2label=dict(enumerate(data.labels)) if data.labels else None,
    )
    settings = {"max_length": max_length, "eval_batch_size": eval_batch_size, "max_new_tokens": max_new_tokens}
    cfg = TrainConfig(**{k: v for k, v in settings.items() if v is not None})
    return evaluate(net, tokenizer, data, cfg)
