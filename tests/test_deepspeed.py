"""LoRA-Pro with DeepSpeed: the config check (no DeepSpeed needed) and a ZeRO stage 0 run (2 CPU processes, gloo;
skipped when DeepSpeed is not installed: ``pip install -r requirements-dist.txt``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest
import torch

import lorapro
from lorapro.integrations.deepspeed import (
    _check_engine,
    check_deepspeed_config,
    lorapro_deepspeed_initialize,
    zero_stage,
)

STEPS = 4
MICRO_BATCH = 16


# ---- the config check: pure Python, runs without DeepSpeed ---------------------------------------------------

@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_1_and_above_are_refused_with_the_reason(stage):
    config = {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": stage}}
    with pytest.raises(ValueError, match=f"ZeRO stage {stage} cannot run LoRA-Pro") as info:
        check_deepspeed_config(config)
    message = str(info.value)
    assert "flatten the parameters into 1-D buffers" in message
    assert "no rank sees a layer's whole A (r x n) and B (m x r)" in message
    assert "process_group=torch.distributed.group.WORLD" in message


def test_stage_2_refused_by_initialize_before_deepspeed_is_imported():
    code = (
        "import sys, torch, lorapro\n"
        "from lorapro.integrations.deepspeed import lorapro_deepspeed_initialize\n"
        "A, B = torch.nn.Parameter(torch.randn(2, 3)), torch.nn.Parameter(torch.randn(4, 2))\n"
        "opt = lorapro.LoRAProAdamW([(A, B, 1.0)])\n"
        "try:\n"
        "    lorapro_deepspeed_initialize(torch.nn.Linear(3, 4), opt, {'zero_optimization': {'stage': 2}})\n"
        "except ValueError as e:\n"
        "    print('refused:', 'ZeRO stage 2 cannot run LoRA-Pro' in str(e))\n"
        "print('deepspeed imported:', 'deepspeed' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["refused: True", "deepspeed imported: False"]


def test_stage_0_and_its_spellings(tmp_path):
    assert zero_stage({}) == 0
    assert zero_stage({"zero_optimization": {}}) == 0
    assert zero_stage({"zero_optimization": {"stage": "0"}}) == 0
    assert zero_stage({"zero_optimization": True}) == 1  # DeepSpeed's deprecated boolean form is stage 1
    assert zero_stage({"zero_optimization": False}) == 0
    config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 0}, "bf16": {"enabled": False}}
    assert check_deepspeed_config(config) == config
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    assert check_deepspeed_config(path) == config and check_deepspeed_config(str(path)) == config
    with pytest.raises(ValueError, match="ZeRO stage 1"):
        check_deepspeed_config({"zero_optimization": True})
    with pytest.raises(ValueError, match="stage must be 0, 1, 2 or 3"):
        check_deepspeed_config({"zero_optimization": {"stage": "auto"}})
    with pytest.raises(TypeError, match="dict or the path"):
        check_deepspeed_config(["zero_optimization"])


@pytest.mark.parametrize("section", ["fp16", "bf16", "bfloat16", "amp"])
@pytest.mark.parametrize("enabled", [True, "auto"])
def test_deepspeed_mixed_precision_is_refused(section, enabled):
    with pytest.raises(ValueError, match=f"DeepSpeed {section} mixed precision cannot run LoRA-Pro"):
        check_deepspeed_config({"zero_optimization": {"stage": 0}, section: {"enabled": enabled}})


def test_engine_check_catches_a_wrapped_or_rebuilt_optimizer():
    from models import tiny_peft

    opt = lorapro.LoRAProAdamW(tiny_peft(), lr=1e-2)
    _check_engine(types.SimpleNamespace(optimizer=opt), opt)  # what stage 0 in float32 gives
    wrapper = type("FP16_UnfusedOptimizer", (), {})()
    with pytest.raises(RuntimeError, match="wrapped the LoRA-Pro optimizer in FP16_UnfusedOptimizer"):
        _check_engine(types.SimpleNamespace(optimizer=wrapper), opt)
    # fp32 master copies in place of the model's tensors (what DeepSpeed's bf16 mode does to the param groups)
    for group in opt.param_groups:
        group["params"] = [p.detach().clone().requires_grad_() for p in group["params"]]
    with pytest.raises(RuntimeError, match="LoRA factors of .* are no longer among them"):
        _check_engine(types.SimpleNamespace(optimizer=opt), opt)
    with pytest.raises(TypeError, match="LoRAProAdamW or LoRAProSGD"):
        lorapro_deepspeed_initialize(object(), torch.optim.AdamW(tiny_peft().parameters()), {})


# ---- ZeRO stage 0 with DeepSpeed: 2 processes, sharded LoRA-Pro state -----------------------------------------

def _batch():
    from models import tiny_batch

    return tiny_batch(seed=3, n=MICRO_BATCH)


def _ds_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # torchrun / accelerate launch set these; DeepSpeed asserts LOCAL_RANK is set even on an existing group.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        import deepspeed.ops

        # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce kernel (C++) on first use (minutes
        # on 2 cores); it only speeds up communication, so the test tells DeepSpeed it is unavailable.
        deepspeed.ops.__dict__.setdefault("__compatible_ops__", {})["deepspeed_shm_comm"] = False
        from models import tiny_loss, tiny_peft

        model = tiny_peft()
        opt = lorapro.LoRAProAdamW(model, lr=2e-2, weight_decay=0.01, process_group=dist.group.WORLD)
        config = {"train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": 0}}
        engine, engine_opt, _, _ = lorapro_deepspeed_initialize(model, opt, config)
        assert engine_opt is opt and engine.optimizer is opt
        losses = []
        batch = _batch()  # the same batch on both ranks: the averaged gradient is each rank's own, exactly
        for _ in range(STEPS):
            loss = tiny_loss(engine, batch)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        torch.save(
            {"losses": losses, "params": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
             "owned": [p.name for p in opt.pairs if opt.owns(p)],
             "moments": [p.name for p in opt.pairs if "exp_avg" in opt.state[p.B]],
             "steps": sorted({float(opt.state[p.B]["step"]) for p in opt.pairs if opt.owns(p)})},
            os.path.join(out_dir, f"ds{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_deepspeed_zero_stage_0_equals_plain_optimizer(tmp_path):
    pytest.importorskip("deepspeed")
    import torch.multiprocessing as mp

    from models import tiny_loss, tiny_peft, train_tiny

    world = 2
    mp.spawn(_ds_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"ds{r}.pt", weights_only=True) for r in range(world)]

    # The reference: one process, no DeepSpeed, no sharding, on the same thread count as the workers (the
    # reductions inside matrix products then happen in the same order, so the results are bit-identical).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = tiny_peft()
        opt = lorapro.LoRAProAdamW(model, lr=2e-2, weight_decay=0.01)
        expected_losses = train_tiny(model, opt, _batch(), STEPS)
        with torch.no_grad():
            final_loss = tiny_loss(model, _batch()).item()
    finally:
        torch.set_num_threads(threads)

    owned = [set(r["owned"]) for r in results]
    assert all(owned) and not owned[0] & owned[1] and len(owned[0] | owned[1]) == len(opt.pairs)
    assert [set(r["moments"]) for r in results] == owned
    for r in results:
        assert r["steps"] == [float(STEPS)]
        assert all(torch.isfinite(torch.tensor(r["losses"])))
        assert r["losses"][-1] < r["losses"][0] and final_loss < expected_losses[0]
        assert r["losses"] == expected_losses
        for name, p in model.named_parameters():
            if p.requires_grad:  # DeepSpeed's gradient averaging of equal gradients is exact, and so is the sharding
                assert torch.equal(r["params"][name], p.detach()), name
