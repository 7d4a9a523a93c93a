"""Sharded optimizer state across ranks (CPU, gloo): the sharded run equals the single-process run.

Each rank trains the same tiny PEFT model under DDP on its own batches. The reference is one unsharded
optimizer in one process fed the same averaged gradients (DDP's averaging divides by the world size, which
rounds differently from any other order of averaging; replaying its result isolates the optimizer).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lorapro

STEPS = 3


def _batch(rank: int, step: int):
    from models import tiny_batch

    return tiny_batch(seed=1000 * step + rank, n=16, dtype=torch.float64)


def _make(kind, model, **kw):
    if kind == "adamw":
        return lorapro.LoRAProAdamW(model, lr=1e-2, weight_decay=0.01, **kw)
    return lorapro.LoRAProSGD(model, lr=5e-2, **kw)


def _worker(rank: int, world: int, init_file: str, out_dir: str, kind: str) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    from models import tiny_loss, tiny_peft

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = tiny_peft(dtype=torch.float64, init_lora_weights=False)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = _make(kind, model, process_group=dist.group.WORLD)
        grads = []
        for step in range(STEPS):
            opt.zero_grad()
            tiny_loss(ddp, _batch(rank, step)).backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
            opt.step()
        owned = [p.name for p in opt.pairs if opt.owns(p)]
        with_moments = [p.name for p in opt.pairs if "exp_avg" in opt.state[p.B]]
        torch.save(
            {"params": {n: p.detach() for n, p in model.named_parameters()}, "owned": owned, "moments": with_moments,
             "grads": grads},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
        del ddp  # DDP's reducer released before the process group it holds (tests/test_rank_agreement.py)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _reference(grads: list[dict[str, torch.Tensor]], kind: str, **kw):
    """One process, no sharding: the same start, stepped with the gradients the ranks averaged.
    ``kw``: ``r``/``lora_alpha`` for the model, anything else for the optimizer."""
    from models import tiny_loss, tiny_peft

    model_kw = {k: kw.pop(k) for k in ("r", "lora_alpha") if k in kw}
    model = tiny_peft(dtype=torch.float64, init_lora_weights=False, **model_kw)
    opt = _make(kind, model, **kw)
    for step, step_grads in enumerate(grads):
        opt.zero_grad()
        tiny_loss(model, _batch(0, step)).backward()  # the sizes and presence of every gradient ...
        for name, p in model.named_parameters():
            if p.grad is not None:
                p.grad.copy_(step_grads[name])  # ... and the values the ranks used
        opt.step()
    return {n: p.detach() for n, p in model.named_parameters()}, opt


@pytest.mark.parametrize("world, kind", [(2, "adamw"), (3, "adamw"), (2, "sgd")])
def test_sharded_run_equals_single_process(tmp_path, world, kind):
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path), kind), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    for r in range(1, world):  # DDP gave every rank the same averaged gradients
        assert all(torch.equal(results[r]["grads"][s][n], g) for s in range(STEPS) for n, g in results[0]["grads"][s].items())
    expected, ref_opt = _reference(results[0]["grads"], kind)
    for name, value in expected.items():
        for r in range(world):
            torch.testing.assert_close(results[r]["params"][name], value, rtol=0, atol=1e-10, msg=name)
        for r in range(1, world):  # bit-identical across ranks
            assert torch.equal(results[r]["params"][name], results[0]["params"][name]), name
    all_pairs = {p.name for p in ref_opt.pairs}
    owned = [set(res["owned"]) for res in results]
    assert set().union(*owned) == all_pairs and sum(len(o) for o in owned) == len(all_pairs)
    assert all(o for o in owned), "every rank should own some layer"
    if kind == "adamw":
        for res in results:  # each rank keeps only its own layers' moments
            assert set(res["moments"]) == set(res["owned"])


def test_owner_assignment_balances_moment_memory():
    from lorapro.sharding import assign_owners as _assign_owners
    from lorapro.pairs import LoRAPair

    shapes = [(64, 64)] * 6 + [(256, 64)] * 2 + [(32, 32)] * 5
    pairs = [LoRAPair(torch.zeros(4, n), torch.zeros(m, 4), 1.0) for m, n in shapes]
    total = sum(m * n for m, n in shapes)
    for world in (1, 2, 4):
        owner = _assign_owners(pairs, world)
        load = [sum(m * n for (m, n), p in zip(shapes, pairs) if owner[id(p.B)] == k) for k in range(world)]
        assert sum(load) == total and max(load) <= total / world + 256 * 64
        assert owner == _assign_owners(pairs, world)  # deterministic


def test_process_group_without_init_is_a_clear_error():
    from models import tiny_peft

    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    with pytest.raises(ValueError, match="torch.distributed is not initialized"):
        lorapro.LoRAProAdamW(tiny_peft(), process_group=object())
