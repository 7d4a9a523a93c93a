"""LoRA-Pro under ``accelerate launch`` (2 CPU processes, gloo); run by tests/test_accelerate.py.

Usage: ``accelerate launch --multi_gpu --num_processes 2 ... accelerate_train.py OUT_DIR MODE...`` with
``ACCELERATE_USE_CPU=true`` in the environment (on CPU, ``accelerate launch --cpu --num_processes 2`` starts
one process only: without an MPI hostfile it uses its single-process launcher).

MODE ``loop``: a plain Accelerate training loop (``accelerator.prepare(model, optimizer, dataloader)``,
``accelerator.accumulate``, ``accelerator.backward``) with ``LoRAProAdamW(..., process_group=WORLD)`` built on
the unwrapped model before ``prepare``; then checkpoints: ``accelerator.save_state`` / ``load_state`` alone,
and with each rank's own optimizer file added. MODE ``trainer``: :class:`LoRAProTrainer` a few steps.
Each rank writes ``{OUT_DIR}/{MODE}.rank{R}.pt`` with what the test asserts; MODEs run in the order given.
"""

from __future__ import annotations

import copy
import os
import sys

import torch

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, TESTS)

GRAD_ACCUM = 2
BATCH = 8
N_EXAMPLES = 64  # 8 batches of 8, 4 per rank per epoch: 2 optimizer steps per epoch with GRAD_ACCUM = 2
EPOCHS = 3


def _check_launch(accelerator) -> tuple[int, int]:
    from accelerate.utils import DistributedType

    assert accelerator.distributed_type == DistributedType.MULTI_CPU, accelerator.distributed_type
    assert accelerator.num_processes == 2, accelerator.num_processes
    return accelerator.process_index, accelerator.num_processes


def _same_state(a: dict, b: dict) -> bool:
    """Two optimizer state_dicts hold the same param groups and bit-identical state."""
    if a["param_groups"] != b["param_groups"] or a["state"].keys() != b["state"].keys():
        return False
    for k, sa in a["state"].items():
        sb = b["state"][k]
        if sa.keys() != sb.keys():
            return False
        if not all(torch.equal(v, sb[key]) if isinstance(v, torch.Tensor) else v == sb[key] for key, v in sa.items()):
            return False
    return True


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _same_params(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def run_loop(out: str) -> None:
    import torch.distributed as dist
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    import lorapro
    from lorapro.integrations.transformers import optimizer_shard_name
    from models import tiny_batch, tiny_loss, tiny_peft

    accelerator = Accelerator(gradient_accumulation_steps=GRAD_ACCUM)
    rank, world = _check_launch(accelerator)

    model = tiny_peft()  # the same seed on every rank: the same start
    raw = lorapro.LoRAProAdamW(model, lr=2e-2, weight_decay=0.01, process_group=dist.group.WORLD)
    assert raw.shard == (rank, world)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*tiny_batch(seed=0, n=N_EXAMPLES)),
                                         batch_size=BATCH)
    eval_batch = tiny_batch(seed=0, n=N_EXAMPLES)
    with torch.no_grad():
        loss_before = tiny_loss(model, eval_batch).item()

    ddp, opt, loader = accelerator.prepare(model, raw, loader)
    assert isinstance(opt, AcceleratedOptimizer) and opt.optimizer is raw
    assert accelerator.unwrap_model(ddp) is model
    assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
    # prepare kept the parameter objects the optimizer found its LoRA pairs by
    pair_ids = {id(t) for p in raw.pairs for t in (p.A, p.B)}
    assert pair_ids <= {id(p) for g in raw.param_groups for p in g["params"]}
    assert pair_ids <= {id(p) for p in model.parameters()}

    losses: list[float] = []

    def epoch() -> None:
        for batch in loader:
            with accelerator.accumulate(ddp):
                loss = tiny_loss(ddp, batch)
                accelerator.backward(loss)
                opt.step()  # a no-op on micro-batches that do not sync (AcceleratedOptimizer)
                opt.zero_grad()
            losses.append(accelerator.reduce(loss.detach(), "mean").item())

    for _ in range(EPOCHS):
        epoch()
    with torch.no_grad():
        loss_after = tiny_loss(model, eval_batch).item()
    owned = [p.name for p in raw.pairs if raw.owns(p)]
    with_moments = [p.name for p in raw.pairs if "exp_avg" in raw.state[p.B]]
    steps = {p.name: float(raw.state[p.B]["step"]) for p in raw.pairs if raw.owns(p)}
    trained = _params(model)
    state_at_save = copy.deepcopy(opt.state_dict())  # through the wrapper

    # ---- checkpoints ------------------------------------------------------------------------------------
    ckpt = os.path.join(out, "ckpt")
    accelerator.save_state(ckpt)
    # The recipe: every rank also saves its own shard (save_state writes optimizer.bin from rank 0 only).
    torch.save(opt.state_dict(), os.path.join(ckpt, optimizer_shard_name(rank, world)))
    accelerator.wait_for_everyone()
    bin_state = torch.load(os.path.join(ckpt, "optimizer.bin"), weights_only=True)
    bin_is_own_state = _same_state(bin_state, state_at_save)

    epoch()  # the uninterrupted run goes on one more epoch
    uninterrupted = _params(model)

    # Accelerate alone: every rank loads rank 0's optimizer.bin.
    accelerator.load_state(ckpt)
    stock_params_restored = _same_params(_params(model), trained)
    stock_state_restored = _same_state(opt.state_dict(), state_at_save)
    epoch()
    stock_resume_exact = _same_params(_params(model), uninterrupted)

    # The recipe: load_state, then each rank loads its own optimizer file.
    accelerator.load_state(ckpt)
    opt.load_state_dict(torch.load(os.path.join(ckpt, optimizer_shard_name(rank, world)), weights_only=True))
    recipe_state_restored = _same_state(opt.state_dict(), state_at_save)
    epoch()
    recipe_resume_exact = _same_params(_params(model), uninterrupted)

    torch.save(
        {
            "loss_before": loss_before, "loss_after": loss_after, "losses": losses, "owned": owned,
            "moments": with_moments, "steps": steps, "params": trained, "all_pairs": [p.name for p in raw.pairs],
            "bin_is_own_state": bin_is_own_state, "stock_params_restored": stock_params_restored,
            "stock_state_restored": stock_state_restored, "stock_resume_exact": stock_resume_exact,
            "recipe_state_restored": recipe_state_restored, "recipe_resume_exact": recipe_resume_exact,
            "ckpt_files": sorted(os.listdir(ckpt)),
        },
        os.path.join(out, f"loop.rank{rank}.pt"),
    )
    accelerator.wait_for_everyone()


def run_trainer(out: str) -> None:
    from lorapro.integrations.transformers import LoRAProTrainer, optimizer_shard_name
    from test_trainer import RandomTokens, inner, tiny_bert_lora, training_args

    args = training_args(os.path.join(out, "trainer"), max_steps=4, save_steps=2, per_device_train_batch_size=2)
    assert args.world_size == 2, args.world_size
    model = tiny_bert_lora()
    trainer = LoRAProTrainer(model=model, args=args, train_dataset=RandomTokens())
    rank, world = _check_launch(trainer.accelerator)
    before = _params(model)
    result = trainer.train()
    opt = inner(trainer.optimizer)
    assert opt.shard == (rank, world), opt.shard
    # The indices a state_dict uses for the B factors: their positions in the param groups.
    index = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    own_file = os.path.join(out, "trainer", "checkpoint-4", optimizer_shard_name(rank, world))
    saved = torch.load(own_file, weights_only=True)
    torch.save(
        {
            "training_loss": result.training_loss, "global_step": trainer.state.global_step,
            "owned": [p.name for p in opt.pairs if opt.owns(p)],
            "moments": [p.name for p in opt.pairs if "exp_avg" in opt.state[p.B]],
            "owned_B": sorted(index[id(p.B)] for p in opt.pairs if opt.owns(p)),
            "other_B": sorted(index[id(p.B)] for p in opt.pairs if not opt.owns(p)),
            "saved_keys": sorted(k for k, v in saved["state"].items() if v),  # indices with state
            "changed": not _same_params(_params(model), before), "params": _params(model),
        },
        os.path.join(out, f"trainer.rank{rank}.pt"),
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    out_dir, modes = sys.argv[1], sys.argv[2:]
    for mode in modes:  # one launch can run both (it saves the start-up of a second launch)
        {"loop": run_loop, "trainer": run_trainer}[mode](out_dir)
