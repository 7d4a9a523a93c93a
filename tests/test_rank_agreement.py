"""Ranks that disagree about their gradients: every rank stops with the same error, none diverges or hangs.

With a process group the optimizer state is sharded: each layer is stepped by its owner rank and one
all-reduce gives every rank the new factors. That needs every rank to step the same list of layers. Here two
gloo ranks hold two LoRA layers of 6 x 5 (r = 2) and rank k has gradients only for layer k (a custom loop
without gradient averaging, or a layer a rank did not use); a sparse gradient or a NaN on one rank only; and
the same under FSDP2's DTensor factors. DDP with ``find_unused_parameters=True`` averages a layer that only
one rank used onto every rank, and that run must train normally.
"""

from __future__ import annotations

import datetime
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lorapro

WORLD = 2


class TwoLayers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.A = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(2, 5, generator=g)) for _ in range(2)])
        self.B = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(6, 2, generator=g)) for _ in range(2)])

    def pairs(self):
        return [lorapro.LoRAPair(self.A[k], self.B[k], 1.5, name=f"layer{k}") for k in range(2)]

    def forward(self, x: torch.Tensor, layers=(0, 1)) -> torch.Tensor:
        return sum((x @ self.A[k].T @ self.B[k].T).square().mean() for k in layers)


def _init(rank: int, init_file: str) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    torch.set_num_threads(1)
    # A short timeout: a rank left waiting in a collective fails the test instead of hanging it.
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
    )


def _outcome(opt, model) -> dict:
    try:
        opt.step()
    except RuntimeError as e:
        return {"error": str(e)}
    return {"params": [p.detach().clone() for p in model.parameters()]}


def _worker(rank: int, init_file: str, out_dir: str, case: str) -> None:
    _init(rank, init_file)
    try:
        model = TwoLayers()
        x = torch.randn(4, 5, generator=torch.Generator().manual_seed(rank))
        if case == "ddp_unused":
            ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
            opt = lorapro.LoRAProAdamW(model.pairs(), lr=1e-2, process_group=dist.group.WORLD)
            ddp(x, layers=(rank,)).backward()
            result = _outcome(opt, model)
            # DDP's reducer released before the process group it holds: destroyed the other way round at exit,
            # a rank occasionally aborted ("terminate called without an active exception", seen once in CI)
            del ddp
            dist.barrier()
        else:
            opt = (
                lorapro.LoRAProSGD(model.pairs(), lr=1e-2, process_group=dist.group.WORLD)
                if case == "sgd_split"
                else lorapro.LoRAProAdamW(model.pairs(), lr=1e-2, process_group=dist.group.WORLD)
            )
            layers = (rank,) if case in ("split", "sgd_split") else (0, 1)
            model(x, layers=layers).backward()
            if case == "sparse" and rank == 1:
                model.A[0].grad = model.A[0].grad.to_sparse()
            if case == "nan" and rank == 1:
                model.B[1].grad[0, 0] = float("nan")
            result = _outcome(opt, model)
        torch.save(result, os.path.join(out_dir, f"{case}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run(tmp_path, case: str) -> list[dict]:
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), case), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"{case}-rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("case", ["split", "sgd_split"])
def test_ranks_with_different_layers_stop_with_one_error(tmp_path, case):
    results = _run(tmp_path, case)
    assert all("error" in r for r in results), "every rank must refuse, not step"
    assert results[0]["error"] == results[1]["error"]
    message = results[0]["error"]
    assert "disagree on which tensors have a gradient" in message
    assert "layer0's A on 1 of 2 ranks" in message and "layer1" in message


def test_sparse_gradient_on_one_rank_stops_every_rank(tmp_path):
    results = _run(tmp_path, "sparse")
    assert all("does not support sparse gradients" in r["error"] for r in results)
    assert "layer0's A" in results[1]["error"]  # the rank that has it names it


def test_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    results = _run(tmp_path, "nan")
    start = [p.detach() for p in TwoLayers().parameters()]
    for r in results:  # skipped everywhere: no rank waits in the factor all-reduce alone
        assert all(torch.equal(p, q) for p, q in zip(r["params"], start))


def test_ddp_with_unused_parameters_averages_onto_every_rank(tmp_path):
    results = _run(tmp_path, "ddp_unused")
    assert all("params" in r for r in results), [r.get("error") for r in results]
    start = list(TwoLayers().parameters())
    for p, q, s in zip(results[0]["params"], results[1]["params"], start):
        assert torch.equal(p, q)
        assert not torch.equal(p, s.detach())  # both layers moved


def _fsdp_worker(rank: int, init_file: str, out_dir: str) -> None:
    _init(rank, init_file)
    try:
        from models import tiny_loss, tiny_peft
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        model = tiny_peft(dtype=torch.float64, init_lora_weights=False, r=2)
        fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
        opt = lorapro.LoRAProAdamW(model, lr=1e-2)
        from test_distributed import _batch

        tiny_loss(model, _batch(rank, 0)).backward()
        if rank == 1:  # as if rank 1 had not used this layer
            next(p for n, p in model.named_parameters() if "lora_B" in n).grad = None
        torch.save(_outcome(opt, model), os.path.join(out_dir, f"fsdp-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_fsdp2_ranks_with_different_layers_stop_with_one_error(tmp_path):
    mp.spawn(_fsdp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"fsdp-rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert all("error" in r for r in results)
    assert results[0]["error"] == results[1]["error"]
    assert "'s B on 1 of 2 ranks" in results[0]["error"]
