"""LoRA-Pro in TRL's ``SFTTrainer``, both ways the README gives: the stock ``SFTTrainer`` with
``optimizers=(make_lorapro_optimizer(model, args), None)``, and ``LoRAProSFTTrainer(LoRAProTrainer, SFTTrainer)``
with ``SFTTrainer``'s own ``peft_config``. For each: it trains every LoRA layer with LoRA-Pro, resuming from a
checkpoint reproduces the uninterrupted run bit for bit, and under 2 processes (gloo) the checkpoint and resume
hold (sharded optimizer state for the subclass, replicated state for the stock trainer).

Everything runs on CPU with a 2-layer Llama (hidden 32) and a word-level tokenizer built in code, SFT on
prompt/completion rows held in memory; no network. Skipped where trl (requirements-trl.txt) is not installed.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from test_trainer import Recorder, assert_state_equal, inner, trainable

from lorapro import LoRAProAdamW
from lorapro.integrations.transformers import (
    LoRAProTrainer,
    make_lorapro_optimizer,
    optimizer_shard_name,
)

SEED = 0
WAYS = ("optimizers", "subclass")  # the stock SFTTrainer with make_lorapro_optimizer; LoRAProSFTTrainer
N_LAYERS = 2
ADAPTED = 7 * N_LAYERS  # "all-linear": q, k, v, o, gate, up and down projections of every layer (not lm_head)


class LoRAProSFTTrainer(LoRAProTrainer, trl.SFTTrainer):
    """The README's recipe: TRL's data handling and loss, LoRA-Pro's optimizer and (sharded) checkpoints."""


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch):
    """TRL pings the Hub when a trainer is built; these machines have no network (the spawned ranks read the
    environment variable when they import huggingface_hub)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)


def tiny_tokenizer():
    """A word-level tokenizer for the rows below: no special tokens around a text, so the tokens of a prompt are a
    prefix of those of prompt + completion (what TRL's completion-only loss expects)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>", "what", "is", "plus", "?", *map(str, range(10))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def sft_rows():
    """16 prompt/completion rows: sums of two digits."""
    pairs = [(a, b) for a in range(4) for b in range(4)]
    return datasets.Dataset.from_dict(
        {"prompt": [f"what is {a} plus {b} ?" for a, b in pairs], "completion": [f" {a + b}" for a, b in pairs]}
    )


def tiny_llama():
    """LlamaForCausalLM with 2 layers, hidden 32, random weights (the same for a given seed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=N_LAYERS, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=64, max_position_embeddings=32,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    torch.manual_seed(SEED)
    return LlamaForCausalLM(config)


def lora_config():
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear")


def sft_config(output_dir, **overrides):
    kw = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "weight_decay": 0.01,
        "max_steps": 6,
        "save_strategy": "steps",
        "save_steps": 3,
        "logging_steps": 1,
        "lr_scheduler_type": "linear",
        "report_to": [],
        "use_cpu": True,
        "bf16": False,  # SFTConfig's default is bf16 autocast
        "activation_checkpointing": False,  # SFTConfig's default (gradient_checkpointing) is on; needless here
        "dataloader_num_workers": 0,
        "seed": SEED,
        "disable_tqdm": True,
    }
    kw.update(overrides)
    return trl.SFTConfig(**kw)


def sft_trainer(way: str, args, callbacks=(), **optimizer_kwargs):
    """A trainer for ``way`` on a fresh model: ``"optimizers"`` wraps the model with PEFT itself and hands the
    stock SFTTrainer a LoRA-Pro optimizer, ``"subclass"`` gives LoRAProSFTTrainer the base model and the
    ``peft_config``."""
    common = {
        "args": args, "train_dataset": sft_rows(), "processing_class": tiny_tokenizer(), "callbacks": list(callbacks),
    }
    if way == "optimizers":
        from peft import get_peft_model

        model = tiny_llama()
        torch.manual_seed(SEED)  # PEFT's random init of lora_A
        model = get_peft_model(model, lora_config())
        optimizer = make_lorapro_optimizer(model, args, **optimizer_kwargs)
        return trl.SFTTrainer(model=model, optimizers=(optimizer, None), **common)
    return LoRAProSFTTrainer(model=tiny_llama(), peft_config=lora_config(), lorapro_kwargs=optimizer_kwargs, **common)


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in trainable(model).items() if ".lora_A." in n or ".lora_B." in n}


@pytest.fixture(scope="module", params=WAYS)
def uninterrupted(request, tmp_path_factory):
    """6 steps in one go, with checkpoints at steps 3 and 6."""
    way = request.param
    out = tmp_path_factory.mktemp(f"uninterrupted-{way}")
    trainer = sft_trainer(way, sft_config(out))
    initial = trainable(trainer.model)
    trainer.train()
    return way, out, trainer, initial


def test_trains_every_lora_layer_with_lorapro(uninterrupted):
    _, _, trainer, initial = uninterrupted
    model = trainer.model
    opt = inner(trainer.optimizer)
    assert isinstance(opt, LoRAProAdamW)
    lora_layers = [m for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert len(lora_layers) == ADAPTED
    assert {id(p.A) for p in opt.pairs} == {id(m.lora_A["default"].weight) for m in lora_layers}
    assert {id(p.B) for p in opt.pairs} == {id(m.lora_B["default"].weight) for m in lora_layers}
    # Every trainable parameter (only LoRA factors here) is in the optimizer, and nothing else.
    grouped = sorted(id(p) for g in opt.param_groups for p in g["params"])
    assert grouped == sorted(id(p) for p in model.parameters() if p.requires_grad)
    assert trainable(model).keys() == lora_weights(model).keys()
    assert all(g["lr"] == pytest.approx(0.0) for g in opt.param_groups)  # the SFTTrainer's scheduler drove it

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.05, losses
    final = trainable(model)
    changed = [n for n in initial if not torch.equal(final[n], initial[n])]
    assert sorted(changed) == sorted(initial), "every LoRA factor moved"
    assert {float(opt.state[p.B]["step"]) for p in opt.pairs} == {6.0}


def test_resume_reproduces_uninterrupted_run(uninterrupted, tmp_path):
    way, out, straight, _ = uninterrupted
    checkpoint = out / "checkpoint-3"
    assert (checkpoint / "optimizer.pt").is_file() and (checkpoint / "adapter_model.safetensors").is_file()

    rec = Recorder()
    trainer = sft_trainer(way, sft_config(tmp_path), callbacks=[rec])
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 6

    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert saved["state"], "the checkpoint holds moments"
    assert_state_equal(rec.state_at_begin, saved)
    resumed, final = trainable(trainer.model), trainable(straight.model)
    assert resumed.keys() == final.keys() and len(lora_weights(trainer.model)) == 2 * ADAPTED
    for name in final:
        assert torch.equal(resumed[name], final[name]), name
    assert_state_equal(inner(trainer.optimizer).state_dict(), inner(straight.optimizer).state_dict())


# ---- two processes (gloo) ------------------------------------------------------------------------------------

WORLD = 2


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    # Accelerate (behind SFTConfig) reads these for a multi-CPU run; the process group already exists.
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT="29598", OMP_NUM_THREADS="1",
    )
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        # The subclass shards the optimizer state over the ranks and saves one file per rank; the stock
        # SFTTrainer saves optimizer.pt from rank 0 only, so it gets replicated state.
        for way, kwargs in (("subclass", {}), ("optimizers", {"shard_optimizer_state": False})):
            out = os.path.join(out_dir, way)
            args = [
                sft_config(os.path.join(out, sub), max_steps=4, save_steps=2, per_device_train_batch_size=2)
                for sub in ("straight", "resumed")
            ]
            assert args[0].world_size == world and args[0].process_index == rank
            straight = sft_trainer(way, args[0], **kwargs)
            straight.train()
            opt = inner(straight.optimizer)
            rec = Recorder()
            resumed = sft_trainer(way, args[1], callbacks=[rec], **kwargs)
            resumed.train(resume_from_checkpoint=os.path.join(out, "straight", "checkpoint-2"))
            name = optimizer_shard_name(rank, world) if way == "subclass" else "optimizer.pt"
            saved = torch.load(os.path.join(out, "straight", "checkpoint-2", name), weights_only=True)
            assert_state_equal(rec.state_at_begin, saved)
            results[way] = {
                "shard": opt.shard, "pairs": len(opt.pairs), "owned": [p.name for p in opt.pairs if opt.owns(p)],
                "moments": [p.name for p in opt.pairs if "exp_avg" in opt.state[p.B]],
                "full": trainable(straight.model), "resumed": trainable(resumed.model),
                "step": resumed.state.global_step,
            }
        torch.save(results, os.path.join(out_dir, f"result{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_checkpoint_and_resume(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(WORLD, str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"result{r}.pt", weights_only=True) for r in range(WORLD)]

    checkpoint = tmp_path / "subclass" / "straight" / "checkpoint-2"
    shard_files = [optimizer_shard_name(r, WORLD) for r in range(WORLD)]
    assert sorted(p.name for p in checkpoint.glob("optimizer*")) == shard_files
    sharded = [r["subclass"] for r in results]
    assert [s["shard"] for s in sharded] == [(r, WORLD) for r in range(WORLD)]
    # Each rank keeps the moments of its own layers only; together they cover every layer once.
    owned = [set(s["owned"]) for s in sharded]
    assert all(owned) and not owned[0] & owned[1] and len(owned[0] | owned[1]) == ADAPTED
    assert [set(s["moments"]) for s in sharded] == owned

    replicated_checkpoint = tmp_path / "optimizers" / "straight" / "checkpoint-2"
    assert [p.name for p in replicated_checkpoint.glob("optimizer*")] == ["optimizer.pt"]
    for r in results:
        replicated = r["optimizers"]
        assert replicated["shard"] == (0, 1) and len(replicated["moments"]) == replicated["pairs"] == ADAPTED
        for way in WAYS:
            assert r[way]["step"] == 4
            for name, value in r[way]["full"].items():
                assert torch.equal(value, results[0][way]["full"][name]), (way, name)  # all ranks hold the same model
                assert torch.equal(r[way]["resumed"][name], value), (way, name)  # resume reproduces the straight run
