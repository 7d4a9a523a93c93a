"""LoRA-Pro under ``accelerate launch`` with 2 CPU processes (gloo): a plain Accelerate loop and the Trainer.

One launch of tests/scripts/accelerate_train.py runs both parts (a second launch would cost another ~15 s
of start-up on 2 cores); each rank writes what it saw, and the tests below assert on it.

How it is launched: ``accelerate launch --multi_gpu --num_processes 2`` with ``ACCELERATE_USE_CPU=true``.
Accelerate 1.15's ``--cpu --num_processes 2`` (and a config file with ``distributed_type: MULTI_CPU``) starts
ONE process unless an MPI hostfile is given; ``--multi_gpu`` goes through ``torch.distributed.run``, and the
environment variable makes each process a ``MULTI_CPU`` (gloo) rank. ``HF_HOME`` points to an empty folder so
no ``accelerate config`` file of the user is read.

Checkpoints: ``accelerator.save_state`` writes ``optimizer.bin`` from the main process only (``accelerate.
utils.save`` writes on the main process), and ``load_state`` loads that one file on every rank. With a sharded
LoRA-Pro optimizer every rank but 0 then gets rank 0's shard in place of its own, and the run goes on with
fresh moments for its layers. The recipe tested here: after ``save_state`` each rank also saves
``optimizer.state_dict()`` to ``optimizer.rank{R}-of-{W}.pt``, and after ``load_state`` loads its own file.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys

import pytest
import torch

# find_spec, not importorskip: this process never imports them (the launched ones do), which saves seconds.
_missing = [m for m in ("accelerate", "peft", "transformers") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(bool(_missing), reason=f"not installed: {', '.join(_missing)}")

WORLD = 2
SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "accelerate_train.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("accelerate")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "LOCAL_RANK", "WORLD_SIZE"))}
    env.update(HF_HOME=str(out / "hf_home"), ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(WORLD),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
        SCRIPT, str(out), "loop", "trainer",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    log = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, log
    return out, log


def _results(out, mode: str) -> list[dict]:
    return [torch.load(out / f"{mode}.rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_accelerate_loop_trains_with_sharded_state(launched):
    out, _ = launched
    results = _results(out, "loop")
    # The same model on every rank, bit for bit.
    for name, value in results[0]["params"].items():
        assert torch.equal(results[1]["params"][name], value), name
    # Each layer has one owner, and a rank keeps moments for its own layers only.
    owned = [set(r["owned"]) for r in results]
    assert all(owned) and not owned[0] & owned[1] and owned[0] | owned[1] == set(results[0]["all_pairs"])
    assert [set(r["moments"]) for r in results] == owned
    # 3 epochs of 4 micro-batches per rank with gradient accumulation 2: AcceleratedOptimizer.step went through
    # on every second micro-batch only.
    for r in results:
        assert set(r["steps"].values()) == {6.0}
        assert r["loss_before"] == results[0]["loss_before"] and r["loss_after"] == results[0]["loss_after"]
    assert results[0]["loss_after"] < results[0]["loss_before"] - 0.1, (results[0]["loss_before"], results[0]["loss_after"])


def test_accelerate_save_state_keeps_rank0_shard_only_and_per_rank_files_restore(launched):
    out, _ = launched
    r0, r1 = _results(out, "loop")
    assert "optimizer.bin" in r0["ckpt_files"]
    assert {f"optimizer.rank{r}-of-{WORLD}.pt" for r in range(WORLD)} <= set(r0["ckpt_files"])
    # Accelerate alone: optimizer.bin is rank 0's shard; load_state restores the model on both ranks, but rank 1
    # gets rank 0's moments instead of its own, and the resumed run departs from the uninterrupted one.
    assert r0["bin_is_own_state"] and not r1["bin_is_own_state"]
    assert r0["stock_params_restored"] and r1["stock_params_restored"]
    assert r0["stock_state_restored"] and not r1["stock_state_restored"]
    assert not r0["stock_resume_exact"] and not r1["stock_resume_exact"]
    # The recipe (each rank saves and loads its own optimizer file) restores every shard and resumes exactly.
    for r in (r0, r1):
        assert r["recipe_state_restored"] and r["recipe_resume_exact"]


def test_lorapro_trainer_under_accelerate_launch(launched):
    out, _ = launched
    results = _results(out, "trainer")
    for checkpoint in ("checkpoint-2", "checkpoint-4"):
        files = sorted(p.name for p in (out / "trainer" / checkpoint).glob("optimizer*"))
        assert files == [f"optimizer.rank{r}-of-{WORLD}.pt" for r in range(WORLD)], (checkpoint, files)
    owned = [set(r["owned"]) for r in results]
    assert all(owned) and not owned[0] & owned[1] and len(owned[0] | owned[1]) == 4  # query, value x 2 layers
    assert [set(r["moments"]) for r in results] == owned
    for r in results:
        assert r["global_step"] == 4 and r["changed"]
        assert torch.isfinite(torch.tensor(r["training_loss"]))
        for name, value in r["params"].items():
            assert torch.equal(value, results[0]["params"][name]), name
        # Its checkpoint file holds the moments of its own layers and of none of the other rank's.
        assert set(r["owned_B"]) <= set(r["saved_keys"]) and not set(r["other_B"]) & set(r["saved_keys"])
