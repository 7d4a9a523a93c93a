"""Rows to model inputs: tokenised, padded to the longest row of the batch, on the run's device."""

from __future__ import annotations

import torch

from .config import TrainConfig


class Batches:
    """Turns rows into model inputs with dynamic padding."""

    def __init__(self, data, tokenizer, cfg: TrainConfig, device: torch.device | str = "cpu") -> None:
        self.data, self.tok, self.cfg, self.device = data, tokenizer, cfg, torch.device(device)

    def prompt_text(self, prompt: str) -> str:
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        return prompt + "\n"

    def classification(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        texts = [r["text"] for r in rows]
        pairs = [r.get("text_pair") for r in rows]
        enc = self.tok(
            texts,
            pairs if any(p is not None for p in pairs) else None,
            truncation=True,
            max_length=self.cfg.max_length,
            padding=True,
            return_tensors="pt",
        )
        enc["labels"] = torch.tensor([self.data.label_index(r["label"]) for r in rows])
        return dict(enc)

    def causal(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Prompt + completion + EOS, loss on the completion only, right padding."""
        eos = self.tok.eos_token or ""
        seqs, labels = [], []
        for r in rows:
            p = self.tok(self.prompt_text(r["prompt"]), add_special_tokens=False)["input_ids"]
            c = self.tok(r["completion"] + eos, add_special_tokens=False)["input_ids"]
            ids = (p + c)[-self.cfg.max_length :]
            lab = ([-100] * len(p) + c)[-self.cfg.max_length :]
            seqs.append(ids)
            labels.append(lab)
        width = max(len(s) for s in seqs)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        lab_t = torch.full((len(seqs), width), -100, dtype=torch.long)
        for i, (s, lab) in enumerate(zip(seqs, labels)):
            input_ids[i, : len(s)] = torch.tensor(s)
            attn[i, : len(s)] = 1
            lab_t[i, : len(lab)] = torch.tensor(lab)
        return {"input_ids": input_ids, "attention_mask": attn, "labels": lab_t}

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.classification(rows) if self.data.task == "classification" else self.causal(rows)
        return {k: v.to(self.device) for k, v in batch.items()}
