"""FSDP2 (``fully_shard``): the LoRA factors are DTensors sharded on dim 0, with empty shards where r < world.

The optimizer gathers each layer's factors and gradients (LoRA-sized), the layer's owner rank steps it, and
every rank writes its own rows back. The reference is one unsharded optimizer in one process fed the gradients
FSDP averaged (gathered from the shards), as in test_distributed.py.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from test_distributed import STEPS, _batch, _make, _reference


CONFIGS = [("adamw", "full"), ("sgd", None), ("adamw", "efficient"), ("adamw", "lowrank-factored")]
WORLD = 3  # r = 2 < 3: the last rank holds empty shards of every A


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    from models import tiny_loss, tiny_peft
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        for kind, moments in CONFIGS:
            model = tiny_peft(dtype=torch.float64, init_lora_weights=False, r=2, lora_alpha=3)
            fully_shard(model, mesh=mesh)
            kw = {"moments": moments} if kind == "adamw" else {}
            opt = _make(kind, model, **kw)
            grads = []
            for step in range(STEPS):
                opt.zero_grad()
                tiny_loss(model, _batch(rank, step)).backward()
                grads.append({n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None})
                opt.step()
            shards = {n: p.to_local().detach().clone() for n, p in model.named_parameters()}
            full = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
            owned = [p.name for p in opt.pairs if opt.owns(p)]
            with_moments = [p.name for p in opt.pairs if "exp_avg" in opt.state[p.B]]
            torch.save(
                {"params": full, "shards": shards, "owned": owned, "moments": with_moments, "grads": grads,
                 "shard": opt.shard},
                os.path.join(out_dir, f"{kind}-{moments}-rank{rank}.pt"),
            )
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(WORLD, str(d / "init"), str(d)), nprocs=WORLD, join=True)
    return d


@pytest.mark.parametrize("kind, moments", CONFIGS)
def test_fsdp2_run_equals_single_process(fsdp_runs, kind, moments):
    world = WORLD
    results = [torch.load(fsdp_runs / f"{kind}-{moments}-rank{r}.pt", weights_only=True) for r in range(world)]
    assert [res["shard"] for res in results] == [(r, world) for r in range(world)]
    assert any(s.numel() == 0 for n, s in results[2]["shards"].items() if "lora_A" in n)  # empty shards
    kw = {"moments": moments} if kind == "adamw" else {}
    expected, ref_opt = _reference(results[0]["grads"], kind, r=2, lora_alpha=3, **kw)
    for name, value in expected.items():
        for r in range(world):
            torch.testing.assert_close(results[r]["params"][name], value, rtol=0, atol=1e-10, msg=name)
    owned = [set(res["owned"]) for res in results]
    assert set().union(*owned) == {p.name for p in ref_opt.pairs}
    assert sum(len(o) for o in owned) == len(ref_opt.pairs)
    if kind == "adamw" and moments == "full":
        for res in results:
            assert set(res["moments"]) == set(res["owned"])
