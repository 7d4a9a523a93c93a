"""``lorapro memory`` (lorapro.cli.memory): the planner's bytes are what the optimizer really allocates.

Every figure of the plan is checked against a model built for real on the CPU (the CLI's model builder, or
plain PEFT) and stepped once with :class:`lorapro.LoRAProAdamW`: the bytes of the tensors in ``opt.state`` (the
``step`` scalars aside) equal the plan's optimizer state, and the model's parameters its weights, factors and
gradients. Then the built-in configs, the Llama-2-7B figure of docs/sharding_figures.json, and the verdicts.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lorapro import LoRAProAdamW
from lorapro.cli import memory as MEM
from lorapro.cli.errors import UserError

GIB = 1 << 30
DOCS = Path(__file__).resolve().parents[2] / "docs"
# A small Llama with grouped KV heads (k/v narrower than q), written here: 2 layers, untied or tied.
TINY_LLAMA = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 160,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
    "tie_word_embeddings": False,
}


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items()
               if k != "step" and isinstance(t, torch.Tensor))


def _step_once(model: torch.nn.Module, preset: str | None, seed: int = 0, **kw) -> int:
    """Optimizer-state bytes after one step of LoRAProAdamW(model, moments=preset) on random gradients
    (``preset`` None: torch.optim.AdamW, the trainer's optimizer for LoRA and full fine-tuning)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype) if p.requires_grad else None
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]) if preset is None else \
        LoRAProAdamW(model, lr=1e-3, moments=preset, **kw)
    opt.step()
    nbytes = _state_bytes(opt)
    for p in model.parameters():
        p.grad = None
    return nbytes


def _model_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of every parameter, bytes of the trainable ones)."""
    ps = list(model.parameters())
    return (sum(p.numel() * p.element_size() for p in ps),
            sum(p.numel() * p.element_size() for p in ps if p.requires_grad))


def _by_preset(rows):
    return {(r["method"], r["preset"]): r for r in rows}


# ------------------------------------------------------------------------------- the plan equals the real thing


@pytest.fixture(scope="module")
def minilm():
    from lorapro.cli.models import resolve_model

    return resolve_model("minilm")


def test_minilm_classification_matches_the_cli_model(minilm):
    """MiniLM as ``lorapro train`` builds it (classification: LoRA on every Linear but the head, the head trained
    fully), fp32: every column of the plan, for every preset, equals the real model and optimizer."""
    from lorapro.cli.models import build_model

    rows = MEM.plan(minilm, rank=8, dtype="fp32", presets=MEM.PRESETS)
    by = _by_preset(rows)
    assert rows[0]["task"] == "classification" and rows[0]["other_trainable_params"] == 384 * 2 + 2
    model, _, info = build_model(minilm, task="classification", num_labels=2, method="lorapro", rank=8)
    assert rows[0]["adapted_layers"] == info["adapted_layers"] == 37  # 6 x 6 + the pooler
    total, trainable = _model_bytes(model)
    for r in rows[1:]:
        assert r["weights"] + r["lora_factors"] == total and r["grads"] == trainable
    assert _step_once(model, None) == by["lora", "adamw"]["optimizer"]
    for preset in MEM.PRESETS:
        assert _step_once(model, preset) == by["lorapro", preset]["optimizer"], preset

    full, _, _ = build_model(minilm, task="classification", num_labels=2, method="full")
    total, trainable = _model_bytes(full)
    assert by["full", "adamw"]["weights"] == total == trainable == by["full", "adamw"]["grads"]
    assert _step_once(full, None) == by["full", "adamw"]["optimizer"]  # fp32: torch's AdamW, fp32 moments


def test_minilm_separable_scratch_matches_the_optimizer(minilm):
    """The plan's ``transient`` for the separable presets is the scratch LoRAProAdamW keeps after a step."""
    from lorapro._state import optimizer_scratch_bytes
    from lorapro.cli.models import build_model

    by = _by_preset(MEM.plan(minilm, rank=8, dtype="fp32", presets=("adafactor", "lowrank-factored")))
    model, _, _ = build_model(minilm, task="classification", num_labels=2, method="lorapro", rank=8)
    for preset in ("adafactor", "lowrank-factored"):
        for p in model.parameters():
            p.grad = torch.randn_like(p) if p.requires_grad else None
        opt = LoRAProAdamW(model, lr=1e-3, moments=preset)
        opt.step()
        assert optimizer_scratch_bytes(opt) == by["lorapro", preset]["transient"] > 0, preset


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_llama_bf16_matches_plain_peft(tied):
    """A Llama config written here, bf16 weights, PEFT's own ``all-linear``: PEFT keeps the factors in float32,
    LoRAProAdamW float32 moments; the plan's default targets are PEFT's all-linear (lm_head excluded)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(TINY_LLAMA, tie_word_embeddings=tied)
    rows = MEM.plan(cfg, rank=4, dtype="bf16")
    by = _by_preset(rows)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.bfloat16)
    total, _ = _model_bytes(model)
    assert by["full", "adamw"]["weights"] == by["full", "adamw"]["grads"] == total
    assert by["full", "adamw"]["optimizer"] == 2 * 4 * sum(p.numel() for p in model.parameters())
    # planned with fp32 moments (LoRAProAdamW's AdamW for bf16 tensors); torch.optim.AdamW keeps bf16 ones
    assert 2 * _step_once(model, None) == by["full", "adamw"]["optimizer"]
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert rows[0]["adapted_layers"] == 7 * 2 and rows[0]["lora_dtype"] == "float32"
    total, trainable = _model_bytes(model)
    for r in rows[1:]:
        assert r["weights"] + r["lora_factors"] == total and r["grads"] == trainable == r["lora_factors"]
    assert _step_once(model, None) == by["lora", "adamw"]["optimizer"]
    for preset in MEM.PRESETS:
        assert _step_once(model, preset) == by["lorapro", preset]["optimizer"], preset


def _sharded_worker(rank: int, world: int, init_file: str, model, preset: str, out) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out.put((rank, _step_once(model, preset, process_group=dist.group.WORLD)))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks the test process")
def test_per_rank_state_matches_a_real_sharded_step():
    """World 2 (gloo, forked processes): each rank's state after a real step is the plan's per-rank figure."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_LLAMA), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    ctx = multiprocessing.get_context("fork")
    presets = ("full", "int8-factored", "efficient", "adafactor", "lowrank-factored")
    rows = _by_preset(MEM.plan(TINY_LLAMA, rank=4, world=2, dtype="fp32", presets=presets))
    for preset in presets:
        planned = rows["lorapro", preset]
        with tempfile.TemporaryDirectory() as tmp:
            out = ctx.Queue()
            procs = [ctx.Process(target=_sharded_worker, args=(r, 2, os.path.join(tmp, "init"), model, preset, out))
                     for r in range(2)]
            for p in procs:
                p.start()
            got = dict(out.get(timeout=120) for _ in procs)
            for p in procs:
                p.join(timeout=60)
                assert p.exitcode == 0
        assert [got[0], got[1]] == planned["optimizer_per_rank"]
        assert planned["optimizer"] == max(got.values()) < planned["optimizer_one_process"] == sum(got.values())


@pytest.mark.slow
def test_smollm2_matches_the_cli_model():
    """SmolLM2-135M as ``lorapro train`` builds it for causal-lm (converted from GGUF on first use, ~30 s)."""
    from lorapro.cli.models import build_model, resolve_model

    path = resolve_model("smollm2-135m")
    presets = ("full", "factored", "int8-factored", "adafactor", "lowrank-factored", "efficient")
    rows = MEM.plan("smollm2-135m", rank=8, dtype="fp32", presets=presets)
    by = _by_preset(rows)
    assert rows[0]["task"] == "causal-lm" and rows[0]["adapted_layers"] == 30 * 7
    model, _, info = build_model(path, task="causal-lm", num_labels=None, method="lorapro", rank=8)
    total, trainable = _model_bytes(model)
    assert rows[0]["params"] == info["total_params"] - info["trainable_params"]
    for r in rows[1:]:
        assert r["weights"] + r["lora_factors"] == total and r["grads"] == trainable
    for preset in presets:
        assert _step_once(model, preset) == by["lorapro", preset]["optimizer"], preset


# ------------------------------------------------------------------------------------ the built-in configs


@pytest.mark.parametrize("name, published", [("llama-2-7b", 6.74e9), ("llama-3-8b", 8.03e9), ("mistral-7b", 7.24e9)])
def test_builtin_configs_give_the_published_parameter_counts(name, published):
    rows = MEM.plan(name, rank=8, presets=())
    assert [r["method"] for r in rows] == ["full", "lora"]
    assert abs(rows[0]["params"] - published) <= 0.01 * published
    assert rows[0]["adapted_layers"] == 32 * 7 and rows[0]["task"] == "causal-lm"
    assert rows[0]["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert rows[0]["weights"] == 2 * rows[0]["params"]  # bf16


def test_llama2_7b_matches_docs_sharding_figures():
    """docs/sharding_figures.json ("computed": Llama-2-7B, r = 8, all 7 linear modules, fp32 moments):
    48.25 GiB of LoRA-Pro state in one process, and the most loaded of 8 ranks holds about 1/8 of it."""
    doc = json.loads((DOCS / "sharding_figures.json").read_text())["computed"]
    assert doc["model"] == "Llama-2-7B" and doc["rank"] == 8 and doc["moment_bytes_per_element"] == 8
    by_world = {row["world"]: row for row in doc["rows"]}
    for world in (1, 8):
        rows = MEM.plan("llama-2-7b", rank=8, world=world, presets=("full",))
        pro = _by_preset(rows)["lorapro", "full"]
        assert rows[0]["params"] == doc["whole_model_elements"]
        assert rows[0]["adapted_elements"] == doc["adapted_elements"] and rows[0]["lora_params"] == doc["lora_elements"]
        assert pro["optimizer_one_process"] == by_world[world]["moment_bytes_unsharded"]
        assert pro["optimizer"] == by_world[world]["moment_bytes_max_rank"]
        assert round(pro["optimizer_one_process"] / GIB, 2) == 48.25
        assert pro["sharded"] == (world > 1) and len(pro["optimizer_per_rank"]) == world
        share = pro["optimizer"] / pro["optimizer_one_process"]
        assert abs(share - 1 / world) < 0.01 / world
        # full FT and LoRA are DDP replicas: the same per rank whatever the world
        full = _by_preset(rows)["full", "adamw"]
        assert full["optimizer"] == 8 * rows[0]["params"] and not full["sharded"]


# ----------------------------------------------------------------------------------------------- verdicts


def test_verdicts_flip_at_the_threshold():
    rows = MEM.plan("llama-2-7b", rank=8, presets=("full", "int8-factored"))
    for r in rows:
        edge = r["total"] / GIB + 2.0
        assert MEM.fits(r, edge, 2.0) and not MEM.fits(r, edge - 1e-6, 2.0)
        assert MEM.fits(r, edge + 3.0, 5.0) and not MEM.fits(r, edge + 3.0, 5.1)

    def verdicts(gpu: float, reserve: float = 2.0) -> dict[str, str]:
        text = MEM.format_table(rows, gpu, reserve)
        out = {}
        for line in text.splitlines():
            for key in ("full FT", "LoRA  ", "LoRA-Pro  full", "LoRA-Pro  int8-factored"):
                if line.startswith(key):
                    out[key.strip()] = "yes" if " yes (" in line else "no" if " no (" in line else "?"
        return out

    # bf16 Llama-2-7B: LoRA ~12.9 GiB, int8-factored ~18.8, LoRA-Pro full ~61.0, full FT ~75.3
    assert verdicts(24) == {"full FT": "no", "LoRA": "yes", "LoRA-Pro  full": "no", "LoRA-Pro  int8-factored": "yes"}
    assert verdicts(16) == {"full FT": "no", "LoRA": "yes", "LoRA-Pro  full": "no", "LoRA-Pro  int8-factored": "no"}
    assert verdicts(80) == {"full FT": "yes", "LoRA": "yes", "LoRA-Pro  full": "yes", "LoRA-Pro  int8-factored": "yes"}
    assert verdicts(80, reserve=6) == {"full FT": "no", "LoRA": "yes", "LoRA-Pro  full": "yes",
                                       "LoRA-Pro  int8-factored": "yes"}
    assert "fits" not in MEM.format_table(rows).split("\n\n")[1].splitlines()[0]  # no --gpu-gib: no verdict


def test_command_line(tmp_path, capsys):
    out = tmp_path / "plan.json"
    argv = ["--model", "llama-2-7b", "--rank", "8", "--world", "8", "--gpu-gib", "24", "--json", str(out)]
    assert MEM.main(argv) == 0
    text = capsys.readouterr().out
    assert "Activations are NOT modelled" in text and "owner-sharded" in text and "DDP" in text
    assert "world size 8" in text and "fits 24 GiB?" in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["preset"] for r in rows] == ["adamw", "adamw", *MEM.PRESETS]
    # LoRA-Pro full at world 8: 48.25 / 8 GiB of state beside 12.7 GiB of weights, factors and grads: fits
    line = next(ln for ln in text.splitlines() if ln.startswith("LoRA-Pro  full "))
    assert "6.03" in line and " yes (" in line

    cfg = tmp_path / "llama.json"
    cfg.write_text(json.dumps(TINY_LLAMA))
    assert MEM.main(["--model", str(cfg), "--rank", "2", "--presets", "full,adafactor", "--dtype", "fp32"]) == 0
    assert "14 layers" in capsys.readouterr().out

    assert MEM.main(["--model", "no-such-model", "--rank", "8"]) == 2
    assert "no-such-model" in capsys.readouterr().err
    assert MEM.main(["--model", str(cfg), "--presets", "nope"]) == 2
    assert MEM.main(["--model", str(cfg), "--target-modules", "nope"]) == 2
    assert "q_proj" in capsys.readouterr().err
    assert MEM.main(["--model", str(cfg), "--gpu-gib", "0"]) == 2


def test_user_target_modules():
    rows = MEM.plan(TINY_LLAMA, rank=4, target_modules=["q_proj", "v_proj"], presets=("full",))
    assert rows[0]["adapted_layers"] == 4 and rows[0]["target_modules"] == ["q_proj", "v_proj"]
    # q: 64 x 64, v: 32 x 64 (2 KV heads of 16), fp32 M and V
    assert rows[-1]["optimizer_one_process"] == 2 * 8 * (64 * 64 + 32 * 64)
    with pytest.raises(UserError, match="rank"):
        MEM.plan(TINY_LLAMA, rank=0)
    with pytest.raises(UserError, match="world"):
        MEM.plan(TINY_LLAMA, world=0)


def test_importing_the_module_does_not_import_transformers_or_peft():
    code = "import sys, lorapro.cli.memory; print(sorted({'transformers', 'peft'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_config_objects_are_not_changed():
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(**{k: v for k, v in TINY_LLAMA.items() if k != "model_type"}, model_type="llama")
    before = cfg.to_dict()
    rows = MEM.plan(cfg, rank=2, task="classification", num_labels=5, presets=("factored",))
    assert cfg.to_dict() == before
    assert rows[0]["task"] == "classification" and rows[0]["other_trainable_params"] == 64 * 5  # score: no bias


@pytest.mark.parametrize("preset", [p for p in MEM.PRESETS if p != "efficient"])
def test_state_shapes_agree_with_init_state(preset):
    """The plan counts ``init_state`` on the meta device; its entries are those ``state_shapes`` declares."""
    from lorapro.moments import storage

    for m, n in ((64, 32), (11008, 4096), (300, 257)):
        state = storage(preset).init_state(m, n, torch.float32, torch.device("meta"), rank=8)
        assert {k: tuple(t.shape) for k, t in state.items()} == storage(preset).state_shapes(m, n, rank=8)
        assert all(t.device.type == "meta" for t in state.values())
