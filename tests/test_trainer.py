"""LoRA-Pro in the Hugging Face Trainer: the optimizer it builds, the scheduler, checkpoints and exact resume,
gradient accumulation, bf16 and a 2-process (gloo) run with sharded optimizer state.

Everything runs on CPU with a 2-layer BERT (hidden 32) built from a config, PEFT LoRA on it and a tiny
in-memory dataset; no network.
"""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lorapro import LoRAProAdamW, LoRAProSGD, find_lora_pairs
from lorapro.integrations.transformers import (
    LoRAProTrainer,
    make_lorapro_optimizer,
    optimizer_shard_name,
)

SEED = 0
N_EXAMPLES = 24
SEQ_LEN = 8


class RandomTokens(torch.utils.data.Dataset):
    """Random token ids from the lower half of the vocabulary (label 0) or the upper half (label 1)."""

    def __init__(self, n: int = N_EXAMPLES, seed: int = 1) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 2, (n,), generator=g)
        self.ids = torch.randint(1, 50, (n, SEQ_LEN), generator=g) + 49 * self.labels[:, None]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ_LEN, dtype=torch.long), "labels": self.labels[i]}


def tiny_bert_lora(seed: int = SEED):
    """BertForSequenceClassification (2 layers, hidden 32) with PEFT LoRA on query/value, head trainable."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=2,
    )
    base = BertForSequenceClassification(config)
    lora = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["query", "value"])
    return get_peft_model(base, lora)


def training_args(output_dir, **overrides):
    kw = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 4,
        "learning_rate": 5e-3,
        "weight_decay": 0.01,
        "max_steps": 6,
        "save_strategy": "steps",
        "save_steps": 3,
        "logging_steps": 1,
        "lr_scheduler_type": "linear",
        "report_to": [],
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "seed": SEED,
        "disable_tqdm": True,
    }
    kw.update(overrides)
    return transformers.TrainingArguments(**kw)


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def inner(optimizer):
    """The optimizer inside Accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def assert_state_equal(a: dict, b: dict) -> None:
    """Two optimizer state_dicts are equal: same param groups and bit-identical state tensors."""
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert a["state"][k].keys() == b["state"][k].keys()
        for key, value in a["state"][k].items():
            assert torch.equal(value, b["state"][k][key]), (k, key)


class Recorder(transformers.TrainerCallback):
    """Records the optimizer's learning rate after every step and its state when training begins."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.state_at_begin = None

    def on_train_begin(self, args, state, control, optimizer=None, **kw):
        import copy

        self.state_at_begin = copy.deepcopy(optimizer.state_dict())

    def on_step_end(self, args, state, control, optimizer=None, **kw):
        self.lrs.append(optimizer.param_groups[0]["lr"])


def test_optimizer_covers_model_and_training_lowers_loss(tmp_path):
    model = tiny_bert_lora()
    data = RandomTokens()
    args = training_args(tmp_path, max_steps=40, save_strategy="no", learning_rate=5e-2, warmup_steps=2, logging_steps=10)
    rec = Recorder()
    trainer = LoRAProTrainer(model=model, args=args, train_dataset=data, eval_dataset=data, callbacks=[rec])

    opt = trainer.create_optimizer()
    assert isinstance(opt, LoRAProAdamW)
    lora_layers = [m for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert len(lora_layers) == 4  # query and value of 2 layers
    assert {id(p.B) for p in opt.pairs} == {id(m.lora_B["default"].weight) for m in lora_layers}
    assert {id(p.A) for p in opt.pairs} == {id(m.lora_A["default"].weight) for m in lora_layers}
    # Every trainable parameter is in exactly one group; the classifier head is among them.
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    head = {n: p for n, p in model.named_parameters() if "classifier" in n and p.requires_grad}
    assert {"weight", "bias"} == {n.rsplit(".", 1)[1] for n in head}
    assert all(id(p) in set(grouped) for p in head.values())
    # The stock Trainer's decay split: LoRA factors and the head weight decay, the head bias does not.
    decay_group, plain_group = opt.param_groups
    assert decay_group["weight_decay"] == args.weight_decay and plain_group["weight_decay"] == 0.0
    bias = next(p for n, p in head.items() if n.endswith("bias"))
    assert [id(p) for p in plain_group["params"]] == [id(bias)]
    assert (decay_group["lr"], decay_group["betas"], decay_group["eps"]) == (
        args.learning_rate, (args.adam_beta1, args.adam_beta2), args.adam_epsilon
    )

    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before - 0.1, (before, after)
    assert inner(trainer.optimizer) is opt
    # The Trainer's scheduler drives the LoRA-Pro optimizer: warmup then linear decay to 0.
    assert rec.lrs[0] == pytest.approx(0.5 * args.learning_rate)
    assert rec.lrs[1] == pytest.approx(args.learning_rate)
    assert all(a > b for a, b in zip(rec.lrs[1:], rec.lrs[2:]))
    assert rec.lrs[-1] == pytest.approx(0.0)
    assert all(g["lr"] == rec.lrs[-1] for g in opt.param_groups)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """6 steps in one go, with checkpoints at steps 3 and 6."""
    out = tmp_path_factory.mktemp("uninterrupted")
    model = tiny_bert_lora()
    trainer = LoRAProTrainer(model=model, args=training_args(out), train_dataset=RandomTokens())
    trainer.train()
    return out, trainable(model), inner(trainer.optimizer).state_dict()


def test_resume_reproduces_uninterrupted_run(uninterrupted, tmp_path):
    out, final_params, final_state = uninterrupted
    checkpoint = out / "checkpoint-3"
    assert (checkpoint / "optimizer.pt").is_file()  # single process: the stock file name
    assert not list(checkpoint.glob("optimizer.rank*"))

    model = tiny_bert_lora()
    rec = Recorder()
    trainer = LoRAProTrainer(model=model, args=training_args(tmp_path), train_dataset=RandomTokens(), callbacks=[rec])
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 6

    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert saved["state"], "the checkpoint holds moments"
    assert_state_equal(rec.state_at_begin, saved)
    resumed = trainable(model)
    assert resumed.keys() == final_params.keys()
    for name in final_params:
        assert torch.equal(resumed[name], final_params[name]), name
    assert_state_equal(inner(trainer.optimizer).state_dict(), final_state)


def test_sharded_checkpoint_with_other_world_size_is_refused(uninterrupted, tmp_path):
    import shutil

    checkpoint = tmp_path / "checkpoint-3"
    shutil.copytree(uninterrupted[0] / "checkpoint-3", checkpoint)
    state = checkpoint / "optimizer.pt"
    for rank in range(2):
        shutil.copy(state, checkpoint / optimizer_shard_name(rank, 2))
    state.unlink()
    trainer = LoRAProTrainer(model=tiny_bert_lora(), args=training_args(tmp_path / "out"), train_dataset=RandomTokens())
    with pytest.raises(ValueError, match=r"world size 2.*world size 1"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


def test_sgd_method(tmp_path):
    model = tiny_bert_lora()
    trainer = LoRAProTrainer(
        model=model, args=training_args(tmp_path, max_steps=2, save_strategy="no"), train_dataset=RandomTokens(),
        lorapro_method="sgd", x_mode="zero",
    )
    before = trainable(model)
    trainer.train()
    opt = inner(trainer.optimizer)
    assert isinstance(opt, LoRAProSGD)
    assert all(g["x_mode"] == "zero" for g in opt.param_groups)
    assert any(not torch.equal(p, before[n]) for n, p in trainable(model).items())
    with pytest.raises(ValueError, match="lorapro_method"):
        LoRAProTrainer(model=model, args=training_args(tmp_path), lorapro_method="adam")


@pytest.mark.parametrize("moments", ["int8-factored", "adafactor", "lowrank-factored"])
def test_lean_presets_train_through_the_trainer(tmp_path, moments):
    """The memory presets reach the Trainer through ``lorapro_kwargs``: the state is the preset's, the factors move."""
    from lorapro.moments import storage

    model = tiny_bert_lora()
    trainer = LoRAProTrainer(
        model=model, args=training_args(tmp_path, max_steps=2, save_strategy="no"), train_dataset=RandomTokens(),
        lorapro_kwargs={"moments": moments},
    )
    before = trainable(model)
    trainer.train()
    opt = inner(trainer.optimizer)
    assert all(g["moments"] == moments for g in opt.param_groups)
    for pair in opt.pairs:
        expected = storage(moments).state_shapes(*pair.shape, rank=pair.rank)
        assert set(opt.state[pair.B]) == {"step", *expected}
        assert not torch.equal(pair.A, before[next(n for n, p in model.named_parameters() if p is pair.A)])


def test_make_lorapro_optimizer_with_stock_trainer(tmp_path):
    model = tiny_bert_lora()
    args = training_args(tmp_path, max_steps=3, save_steps=3)
    opt = make_lorapro_optimizer(model, args)
    assert isinstance(opt, LoRAProAdamW)
    assert len(opt.pairs) == len(find_lora_pairs(model)) == 4
    rec = Recorder()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=RandomTokens(), optimizers=(opt, None),
                                   callbacks=[rec])
    trainer.train()
    assert inner(trainer.optimizer) is opt
    assert rec.lrs == pytest.approx([args.learning_rate * (1 - k / 3) for k in range(1, 4)])
    assert (tmp_path / "checkpoint-3" / "optimizer.pt").is_file()
    assert isinstance(make_lorapro_optimizer(model, args, method="sgd"), LoRAProSGD)


def test_import_lorapro_does_not_import_transformers():
    import subprocess

    code = "import sys, lorapro, lorapro.integrations; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def _step_counts(opt) -> set[float]:
    return {float(opt.state[p.B]["step"]) for p in opt.pairs}


def test_gradient_accumulation(tmp_path):
    model = tiny_bert_lora()
    args = training_args(tmp_path, max_steps=2, gradient_accumulation_steps=2, save_strategy="no")
    trainer = LoRAProTrainer(model=model, args=args, train_dataset=RandomTokens())
    before = trainable(model)
    trainer.train()
    assert trainer.state.global_step == 2
    assert _step_counts(inner(trainer.optimizer)) == {2.0}  # one optimizer step per 2 micro-batches
    assert any(not torch.equal(p, before[n]) for n, p in trainable(model).items())


def test_bf16(tmp_path):
    try:
        args = training_args(tmp_path, max_steps=2, bf16=True, save_strategy="no")
        trainer = LoRAProTrainer(model=tiny_bert_lora(), args=args, train_dataset=RandomTokens())
    except (ValueError, RuntimeError, ImportError) as e:
        pytest.skip(f"bf16 is not supported on this CPU: {e}")
    assert trainer.accelerator.mixed_precision == "bf16"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a skipped (non-finite) step would warn
        result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    opt = inner(trainer.optimizer)
    assert _step_counts(opt) == {2.0}
    assert all(p.dtype == torch.float32 for p in trainable(trainer.model).values())  # autocast, fp32 master weights


# ---- two processes (gloo) ------------------------------------------------------------------------------------

WORLD = 2


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    import torch.distributed as dist

    torch.set_num_threads(1)
    # Accelerate (behind TrainingArguments) reads these for a multi-CPU run; the process group already exists,
    # so it does not create another one.
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT="29599", OMP_NUM_THREADS="1",
    )
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        args = training_args(out_dir, max_steps=4, save_steps=2, per_device_train_batch_size=2)
        assert args.world_size == world and args.process_index == rank
        model = tiny_bert_lora()
        trainer = LoRAProTrainer(model=model, args=args, train_dataset=RandomTokens())
        trainer.train()
        opt = inner(trainer.optimizer)
        owned = [p.name for p in opt.pairs if opt.owns(p)]
        with_moments = [p.name for p in opt.pairs if "exp_avg" in opt.state[p.B]]
        full = trainable(model)

        resumed_model = tiny_bert_lora()
        rec = Recorder()
        resumed = LoRAProTrainer(
            model=resumed_model, args=training_args(os.path.join(out_dir, "resumed"), max_steps=4, save_steps=2,
                                                    per_device_train_batch_size=2),
            train_dataset=RandomTokens(), callbacks=[rec],
        )
        resumed.train(resume_from_checkpoint=os.path.join(out_dir, "checkpoint-2"))
        saved = torch.load(os.path.join(out_dir, "checkpoint-2", optimizer_shard_name(rank, world)), weights_only=True)
        assert_state_equal(rec.state_at_begin, saved)

        # A single-process checkpoint (optimizer.pt) cannot be resumed by 2 processes: both ranks refuse it.
        single = os.path.join(out_dir, "single-checkpoint")
        if rank == 0:
            import shutil

            shutil.copytree(os.path.join(out_dir, "checkpoint-2"), single)
            for r in range(world):
                os.remove(os.path.join(single, optimizer_shard_name(r, world)))
            torch.save(saved, os.path.join(single, "optimizer.pt"))
        dist.barrier()
        refused = LoRAProTrainer(
            model=tiny_bert_lora(), args=training_args(os.path.join(out_dir, "refused"), max_steps=4),
            train_dataset=RandomTokens(),
        )
        try:
            refused.train(resume_from_checkpoint=single)
            refusal = ""
        except ValueError as e:
            refusal = str(e)
        torch.save(
            {"refusal": refusal, "owned": owned, "moments": with_moments, "full": full, "resumed": trainable(resumed_model),
             "step": resumed.state.global_step, "saved_state_keys": sorted(k for k, v in saved["state"].items() if v)},
            os.path.join(out_dir, f"result{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_two_processes_sharded_state_checkpoint_and_resume(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(WORLD, str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"result{r}.pt", weights_only=True) for r in range(WORLD)]
    checkpoint = tmp_path / "checkpoint-2"
    assert sorted(p.name for p in checkpoint.glob("optimizer*")) == [optimizer_shard_name(r, WORLD) for r in range(WORLD)]
    # Each rank keeps the moments of its own layers only; together they cover every layer once.
    owned = [set(r["owned"]) for r in results]
    assert all(owned) and not owned[0] & owned[1] and len(owned[0] | owned[1]) == 4
    assert [set(r["moments"]) for r in results] == owned
    assert results[0]["saved_state_keys"] != results[1]["saved_state_keys"]
    for r in results:
        assert "world size 1, but this run has world size 2" in r["refusal"]
        assert r["step"] == 4
        for name, value in r["full"].items():
            assert torch.equal(value, results[0]["full"][name]), name  # all ranks hold the same model
            assert torch.equal(r["resumed"][name], value), name  # resume reproduces the uninterrupted run

    # A single process cannot resume the 2-process checkpoint: the error names both sizes.
    trainer = LoRAProTrainer(model=tiny_bert_lora(), args=training_args(tmp_path / "single"), train_dataset=RandomTokens())
    with pytest.raises(ValueError, match=r"world size 2.*world size 1"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


def test_diagnostics_callback(tmp_path):
    import json

    from lorapro.integrations.transformers import LoRAProDiagnosticsCallback

    def run(out, callbacks):
        model = tiny_bert_lora()
        args = training_args(out, max_steps=4, gradient_accumulation_steps=2, save_strategy="no")
        LoRAProTrainer(model=model, args=args, train_dataset=RandomTokens(), callbacks=callbacks).train()
        return model

    cb = LoRAProDiagnosticsCallback(every=2, label="lorapro")
    model = run(tmp_path / "diag", [cb])
    plain = run(tmp_path / "plain", [])
    for (n, p), (_, q) in zip(model.named_parameters(), plain.named_parameters()):
        assert torch.equal(p, q), n  # measuring changes nothing in the run
        assert p.requires_grad == q.requires_grad and p.grad is None, n
    saved = json.loads((tmp_path / "diag" / "diagnostics.json").read_text())
    records = saved["records"]
    assert sorted({r["step"] for r in records}) == [0, 2]
    assert len(records) == 2 * 4  # 2 measured steps x (2 layers x query, value)
    assert {r["type"] for r in records} == {"attention.self.query", "attention.self.value"}
    assert all(r["lorapro_distance"] <= r["lora_distance"] * (1 + 1e-6) for r in records)
    assert all(r["grad_norm"] > 0 for r in records)
    assert (tmp_path / "diag" / "diagnostics.png").stat().st_size > 10_000
