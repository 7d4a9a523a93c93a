"""What ``lorapro train`` and ``lorapro compare`` do with what is already at ``--out``.

An earlier run there (finished or stopped) is continued with ``--resume``, replaced with ``--overwrite``, and
otherwise refused with one line and exit code 2, as are an ``--out`` that is a file and a checkpoint that cannot
be read; a refusal leaves everything at ``--out`` as it was.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from lorapro.cli import compare as compare_mod
from lorapro.cli import main
from tiny_models import make_tiny_bert

SMALL = ["--max-train", "48", "--max-eval", "24", "--batch-size", "8", "--no-progress"]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def _tree(d: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every path under ``d`` (and ``d`` itself if it is a file) with its mtime and contents."""
    paths = [d] if d.is_file() else sorted(d.rglob("*"))
    return {str(p): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None) for p in paths}


def _refused(capsys, rc: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("lorapro: error:") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_help_says_what_counts_as_an_earlier_run(capsys):
    texts = {}
    for command in ("train", "compare"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        texts[command] = " ".join(capsys.readouterr().out.split())
        assert "--overwrite" in texts[command] and "earlier" in texts[command]
    assert all(name in texts["train"] for name in ("metrics.json", "checkpoint.pt", "checkpoint-ranks/", "adapter/"))
    assert "results.json" in texts["compare"] and "lorapro train --help" in texts["compare"]


def test_out_that_is_a_file_is_refused_before_anything(bert_dir, tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    before = _tree(f)
    train = ["train", "--model", str(bert_dir), "--max-steps", "1", *SMALL]
    _refused(capsys, main([*train, "--out", str(f)]), str(f), "not a directory")
    _refused(capsys, main([*train, "--out", str(f), "--overwrite"]), str(f), "not a directory")
    _refused(capsys, main([*train, "--out", str(f / "sub")]), str(f), "not a directory")
    _refused(capsys, main(["compare", "--model", str(bert_dir), "--methods", "lora", "--max-steps", "1", *SMALL,
                           "--out", str(f)]), str(f), "not a directory")
    assert _tree(f) == before


def test_out_holding_an_earlier_run_is_refused_unless_resume_or_overwrite(bert_dir, tmp_path, capsys):
    # A directory that holds other files but no run is fine, and so is an empty one.
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    base = ["train", "--model", str(bert_dir), "--max-steps", "1", *SMALL, "--out", str(out)]
    assert main([*base, "--method", "full"]) == 0
    (tmp_path / "empty").mkdir()
    assert main([*base[:-1], str(tmp_path / "empty"), "--method", "lora"]) == 0
    capsys.readouterr()

    before = _tree(out)
    assert {"metrics.json", "checkpoint.pt", "model"} <= {p.name for p in out.iterdir()}
    err = _refused(capsys, main([*base, "--method", "full"]), "earlier run", "--resume", "--overwrite")
    assert "metrics.json" in err and "model/" in err
    _refused(capsys, main([*base, "--method", "full", "--resume", "--overwrite"]), "not both")
    assert _tree(out) == before

    # --overwrite replaces the earlier run: nothing of the full fine-tuning run is left, other files stay.
    assert main([*base, "--method", "lora", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "checkpoint.pt", "metrics.json", "notes.txt"]
    assert json.loads((out / "metrics.json").read_text())["method"] == "lora"
    assert (out / "notes.txt").read_text() == "mine"

    # A run stopped with --stop-after, and a torchrun run interrupted before checkpoint.pt, count as well.
    stopped = tmp_path / "stopped"
    args = ["train", "--model", str(bert_dir), "--max-steps", "2", *SMALL, "--out", str(stopped)]
    assert main([*args, "--stop-after", "1"]) == 0
    capsys.readouterr()
    before = _tree(stopped)
    _refused(capsys, main(args), "earlier run", "checkpoint.pt")
    assert _tree(stopped) == before
    shards = tmp_path / "shards"
    (shards / "checkpoint-ranks").mkdir(parents=True)
    (shards / "checkpoint-ranks" / "step1.rank0-of-2.pt").write_bytes(b"x")
    before = _tree(shards)
    _refused(capsys, main([*args[:-1], str(shards)]), "earlier run", "checkpoint-ranks/")
    assert _tree(shards) == before


def _save_damaged(path: Path, kind: str, good: bytes) -> None:
    if kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"\x00\x01 not a checkpoint " * 8)
    elif kind == "foreign":  # loads, but was not written by lorapro train
        torch.save({"model_state": {"w": torch.zeros(2)}}, path)
    elif kind == "tensor":
        torch.save(torch.zeros(2), path)


@pytest.mark.parametrize("kind", ["truncated", "empty", "garbage", "foreign", "tensor"])
def test_resume_from_a_damaged_checkpoint_is_one_line(bert_dir, tmp_path, capsys, kind):
    out = tmp_path / "run"
    args = ["train", "--model", str(bert_dir), "--max-steps", "2", *SMALL, "--out", str(out)]
    assert main([*args, "--stop-after", "1"]) == 0
    ckpt = out / "checkpoint.pt"
    good = ckpt.read_bytes()
    _save_damaged(ckpt, kind, good)
    capsys.readouterr()
    before = _tree(out)
    what = "not a checkpoint" if kind in ("foreign", "tensor") else "truncated or corrupted"
    _refused(capsys, main([*args, "--resume"]), str(ckpt), what, "--overwrite")
    assert _tree(out) == before
    ckpt.write_bytes(good)  # once restored, the run continues
    assert main([*args, "--resume"]) == 0


def _rank_worker(rank: int, world: int, ports: tuple[int, int], base: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(ports[0]))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from lorapro.cli.errors import UserError
    from lorapro.cli.config import TrainConfig
    from lorapro.cli.trainer import train

    base_path = Path(base)
    # rank 1's part of the checkpoint is truncated, rank 0's is fine: both ranks stop with rank 1's error
    with pytest.raises(UserError, match=r"step1\.rank1-of-2\.pt, it is truncated or corrupted"):
        train(TrainConfig(model="unused", device="cpu", batch_size=2, out=str(base_path / "damaged")), resume=True,
              progress=False)
    assert not dist.is_initialized()
    os.environ["MASTER_PORT"] = str(ports[1])  # a fresh process group, on a port nobody has used yet
    with pytest.raises(UserError, match="holds an earlier run"):
        train(TrainConfig(model="unused", device="cpu", batch_size=2, out=str(base_path / "finished")),
              progress=False)


def test_every_rank_takes_the_same_decision(tmp_path):
    """Under torchrun every rank checks --out and reads its checkpoint files before any rank writes; a damaged
    file seen by one rank stops all of them with the same one-line error (not a traceback on one rank while
    the others go on to wait for it)."""
    from lorapro.cli.config import TrainConfig

    damaged = tmp_path / "damaged"
    (damaged / "checkpoint-ranks").mkdir(parents=True)
    cfg = TrainConfig(model="unused", device="cpu", batch_size=2, out=str(damaged))
    torch.save({"config": asdict(cfg), "trainable": {}, "scheduler": {}, "rng": torch.get_rng_state(),
                "run": {"step": 1}, "optimizer": None, "world_size": 2}, damaged / "checkpoint.pt")
    part = {"step": 1, "rank": 0, "world_size": 2, "rng": torch.get_rng_state(), "optimizer": None}
    torch.save(part, damaged / "checkpoint-ranks" / "step1.rank0-of-2.pt")
    torch.save({**part, "rank": 1}, damaged / "checkpoint-ranks" / "step1.rank1-of-2.pt")
    shard1 = damaged / "checkpoint-ranks" / "step1.rank1-of-2.pt"
    shard1.write_bytes(shard1.read_bytes()[:100])
    (tmp_path / "finished").mkdir()
    (tmp_path / "finished" / "metrics.json").write_text("{}")
    before = _tree(tmp_path)
    with socket.socket() as s1, socket.socket() as s2:
        s1.bind(("127.0.0.1", 0))
        s2.bind(("127.0.0.1", 0))
        ports = (s1.getsockname()[1], s2.getsockname()[1])
    mp.spawn(_rank_worker, args=(2, ports, str(tmp_path)), nprocs=2, join=True)
    assert _tree(tmp_path) == before


def test_compare_refuses_an_earlier_comparison_and_passes_overwrite_on(bert_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cmp"
    (out / "lora" / "adapter").mkdir(parents=True)
    (out / "results.json").write_text('{"old": true}')
    (out / "loss_curves.png").write_bytes(b"old")
    (out / "lora" / "metrics.json").write_text("{}")
    (out / "lora" / "adapter" / "lorapro.json").write_text("{}")  # as save_trained marks what it wrote
    (out / "lora" / "adapter" / "stale.bin").write_bytes(b"old")
    trains = []

    def run_in_process(argv, **kwargs):  # `python -m lorapro train ...` without starting a process
        trains.append(argv)
        return subprocess.CompletedProcess(argv, main(argv[3:]))

    monkeypatch.setattr(compare_mod.subprocess, "run", run_in_process)
    argv = ["compare", "--model", str(bert_dir), "--methods", "lora", "--max-steps", "1", *SMALL, "--out", str(out)]
    before = _tree(out)
    err = _refused(capsys, main(argv), "earlier comparison", "--overwrite")
    assert "results.json" in err and "lora/metrics.json" in err
    assert not trains and _tree(out) == before

    assert main([*argv, "--overwrite"]) == 0
    assert len(trains) == 1 and "--overwrite" in trains[0]
    assert [r["method"] for r in json.loads((out / "results.json").read_text())["runs"]] == ["lora"]
    assert (out / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "lora" / "metrics.json").read_text())["method"] == "lora"
    assert not (out / "lora" / "adapter" / "stale.bin").exists()


def _torchrun(args: list[str], log_dir: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--log-dir",
           str(log_dir), "--redirects", "3", "-m", "lorapro", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_torchrun_refuses_and_overwrites_an_earlier_run(bert_dir, tmp_path):
    """Both ranks refuse an earlier run with the same line; with --overwrite rank 0 deletes it (the stale rank
    files of another world size included) before any rank writes its part of the new checkpoint."""
    out = tmp_path / "out"
    (out / "checkpoint-ranks").mkdir(parents=True)
    (out / "checkpoint-ranks" / "step5.rank2-of-4.pt").write_bytes(b"stale")
    (out / "metrics.json").write_text("{}")
    before = _tree(out)
    args = ["--model", str(bert_dir), "--max-train", "32", "--max-eval", "16", "--batch-size", "8", "--max-steps",
            "2", "--no-progress", "--threads", "1", "--out", str(out)]
    proc = _torchrun(args, tmp_path / "logs1")
    assert proc.returncode != 0 and _tree(out) == before
    errors = {p.read_text().strip() for p in (tmp_path / "logs1").rglob("stderr.log")}
    assert len(errors) == 1 and next(iter(errors)).startswith("lorapro: error: --out"), errors
    assert "holds an earlier run" in next(iter(errors))

    proc = _torchrun([*args, "--overwrite"], tmp_path / "logs2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "checkpoint-ranks", "checkpoint.pt", "metrics.json"]
    assert sorted(p.name for p in (out / "checkpoint-ranks").iterdir()) == ["step2.rank0-of-2.pt", "step2.rank1-of-2.pt"]
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 2
