"""``lorapro eval``: score a model, or a base model plus a trained adapter, on held-out data."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .errors import UserError



def _saved_labels(*dirs: str | Path | None) -> list[str] | None:
    """The label order a classifier was trained with, from the marker ``lorapro train`` writes with it."""
    from .models import _MARKER

    for d in dirs:
        marker = Path(d) / _MARKER if d else None
        if marker is not None and marker.is_file():
            id2label = json.loads(marker.read_text()).get("id2label") or {}
            if id2label:
                return [id2label[str(i)] for i in range(len(id2label))]
    return None


def run_eval(args: argparse.Namespace) -> dict[str, float]:
    from . import data as data_mod
    from . import models as models_mod
    from .trainer import TrainConfig, evaluate

    data = data_mod.load_task_data(args.task, args.train, args.eval, max_eval=args.max_eval)
    if not data.eval:
        raise UserError(f"no evaluation rows in {args.eval}")
    model_path = models_mod.resolve_model(args.model)
    if data.task == "classification":
        labels = _saved_labels(args.adapter, model_path) or data.labels
        unseen = sorted({r["label"] for r in data.eval} - set(labels))
        if unseen:
            raise UserError(f"{args.eval}: label(s) {', '.join(map(repr, unseen))} were never seen in training")
        data.labels = labels
    model, tokenizer = models_mod.load_for_eval(
        model_path,
        args.adapter,
        task=data.task,
        num_labels=len(data.labels) if data.labels else None,
        id2label=dict(enumerate(data.labels)) if data.labels else None,
    )
    cfg = TrainConfig(
        max_length=args.max_length, eval_batch_size=args.eval_batch_size, max_new_tokens=args.max_new_tokens
    )
    return evaluate(model, tokenizer, data, cfg)
