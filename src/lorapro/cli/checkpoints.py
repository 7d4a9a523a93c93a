"""What ``lorapro train`` keeps in ``--out`` between steps and between runs: checks, checkpoints, resume.

``checkpoint.pt`` (written by rank 0) holds the config, the trainable parameters, the scheduler, the RNG and
the :class:`RunState`, and the optimizer state unless it is sharded over the ranks. Under ``torchrun`` every
rank also writes its own file in ``checkpoint-ranks/`` (its RNG, and its optimizer shard if the state is
sharded), named after the step, so that ``checkpoint.pt`` always names a complete set.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_torch_save, rank_file_name
from .config import TrainConfig
from .errors import UserError
from .models import _MARKER
from .ranks import Ranks

# What a run writes into --out. Any of them there means --out holds an earlier run (finished, stopped with
# --stop-after, or interrupted after its first checkpoint): a new run continues it with --resume or replaces
# it with --overwrite, which deletes these (and nothing else) once the input has been validated.
RUN_OUTPUTS = ("metrics.json", "checkpoint.pt", "checkpoint-ranks", "adapter", "model", "diagnostics.json",
               "diagnostics.png")
_START_AGAIN = ("start the run again: the same command without --resume, with --overwrite (which deletes the "
                "earlier run in {out})")
_CHECKPOINT_KEYS = ("config", "trainable", "scheduler", "rng", "run", "optimizer")  # what save_checkpoint writes
_RANK_FILE_KEYS = ("step", "rng", "optimizer")
_RANK_DIR = "checkpoint-ranks"


@dataclass
class RunState:
    """What a checkpoint needs besides model and optimizer tensors."""

    step: int = 0
    train_loss: list[list[float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    elapsed: float = 0.0
    opt_step_seconds: float = 0.0
    diagnostics: list[dict[str, Any]] = field(default_factory=list)  # lorapro.diagnostics records


# ----------------------------------------------------------------------------------------------- --out checks


def check_out_dir(out: Path, *, resume: bool = False, overwrite: bool = False) -> None:
    """Raise :class:`UserError` unless ``out`` can take a run: it is (or can be created as) a directory, and
    holds no earlier run unless ``resume`` or ``overwrite``; with ``resume`` it holds a checkpoint. Reads only."""
    check_is_dir(out)
    if resume:
        if not (out / "checkpoint.pt").is_file():
            raise UserError(f"--resume: no checkpoint at {out / 'checkpoint.pt'}")
        return
    found = earlier_run(out)
    if found and not overwrite:
        raise UserError(
            f"--out {out} holds an earlier run ({', '.join(found)}): pass --resume to continue it, --overwrite "
            "to replace it, or choose another --out"
        )
    for name in ("adapter", "model"):  # save_trained replaces only what it wrote; say so before training
        d = out / name
        if d.is_dir() and any(d.iterdir()) and not (d / _MARKER).is_file():
            raise UserError(f"--overwrite: {d} was not written by lorapro (no {_MARKER}); move it away or "
                            "choose another --out")


def check_is_dir(out: Path) -> None:
    """Raise :class:`UserError` unless ``out`` is a directory or can be created as one (``mkdir -p``)."""
    here = next((p for p in (out, *out.parents) if p.exists() or p.is_symlink()), None)
    if here is not None and not here.is_dir():
        what = f"--out {out}" if here == out else f"--out {out}: {here}"
        raise UserError(f"{what} exists and is not a directory: choose another --out")


def earlier_run(out: Path) -> list[str]:
    """The :data:`RUN_OUTPUTS` in ``out`` (directories with a trailing slash)."""
    found = [out / n for n in RUN_OUTPUTS if (out / n).exists() or (out / n).is_symlink()]
    return [p.name + ("/" if p.is_dir() else "") for p in found]


def _remove_earlier_run(out: Path) -> None:
    for name in RUN_OUTPUTS:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def prepare_out_dir(out: Path, ranks: Ranks, *, overwrite: bool) -> None:
    """Rank 0 creates ``out`` and, with ``overwrite``, deletes the earlier run in it; every rank returns only
    once that is done, so no rank writes its checkpoint file into the earlier run."""
    if ranks.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if overwrite:
            _remove_earlier_run(out)
    ranks.barrier()


# --------------------------------------------------------------------------------------------------- reading


def _load_file(path: Path, out: Path) -> Any:
    """``torch.load(path)``, or a :class:`UserError` naming it if it cannot be read."""
    try:
        return torch.load(path, weights_only=True)
    except torch.OutOfMemoryError:
        raise
    except OSError as e:  # there, but not readable (permissions, I/O error): the file may well be fine
        raise UserError(f"--resume: cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # truncated or corrupted: zip, pickle and torch's own readers raise all kinds
        first = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:120]
        reason = f"{type(e).__name__}: {first}" if first else type(e).__name__
        raise UserError(f"--resume: cannot read {path}, it is truncated or corrupted ({reason}); restore it, "
                        "or " + _START_AGAIN.format(out=out)) from None


def read_out_dir(out: Path, ranks: Ranks, *, resume: bool, overwrite: bool) -> tuple[dict | None, dict | None]:
    """Check ``out`` and, with ``resume``, read its checkpoint: ``(checkpoint.pt, this rank's file or None)``."""
    check_out_dir(out, resume=resume, overwrite=overwrite)
    if not resume:
        return None, None
    path = out / "checkpoint.pt"
    saved = _load_file(path, out)
    run_fields = {f.name for f in fields(RunState)}
    missing = [k for k in _CHECKPOINT_KEYS if k not in saved] if isinstance(saved, dict) else list(_CHECKPOINT_KEYS)
    if not missing and not (isinstance(saved["config"], dict) and isinstance(saved["run"], dict)
                            and "step" in saved["run"] and set(saved["run"]) <= run_fields):
        missing = ["config", "run"]
    if missing:
        raise UserError(f"--resume: {path} is not a checkpoint of `lorapro train` (missing or invalid: "
                        f"{', '.join(missing)}); point --out at the run to continue, or " + _START_AGAIN.format(out=out))
    return saved, _load_rank_file(out, saved, ranks)


def _rank_file(out: Path, step: int, rank: int, world: int) -> Path:
    """One rank's part of the checkpoint of step ``step``: its optimizer shard and RNG."""
    return out / _RANK_DIR / rank_file_name(f"step{step}", rank, world)


def _load_rank_file(out: Path, saved: dict[str, Any], ranks: Ranks) -> dict[str, Any] | None:
    """Check that the checkpoint was written by as many processes as this run has; load this rank's part."""
    saved_world = int(saved.get("world_size", 1))
    if saved_world != ranks.world:
        how = "without torchrun" if saved_world == 1 else f"under torchrun with {saved_world} processes"
        raise UserError(
            f"--resume: the checkpoint in {out} was written by {saved_world} process(es) and this run has "
            f"{ranks.world}; each process keeps only its own share of the optimizer state, so resume {how}"
        )
    if ranks.world == 1:
        return None
    step = saved["run"]["step"]
    missing = [f.name for r in range(ranks.world) if not (f := _rank_file(out, step, r, ranks.world)).is_file()]
    if missing:
        raise UserError(f"--resume: the checkpoint in {out} is incomplete: {', '.join(missing)} missing")
    path = _rank_file(out, step, ranks.rank, ranks.world)
    mine = _load_file(path, out)
    if not isinstance(mine, dict) or any(k not in mine for k in _RANK_FILE_KEYS):
        raise UserError(f"--resume: {path} is not a rank's part of a `lorapro train` checkpoint; restore it, "
                        "or " + _START_AGAIN.format(out=out))
    if mine["step"] != step:
        raise UserError(f"--resume: {path} is not from step {step}")
    return mine


def same_run(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """The settings in which ``cfg`` differs from the config ``saved`` in a checkpoint, among those that
    change the run's maths."""
    mine = asdict(cfg)
    ignore = {"out", "eval_every", "save_every", "diagnostics", "fused"}  # none of these changes the run's maths
    return sorted(k for k in mine if k not in ignore and saved.get(k) != mine[k])


def restore_checkpoint(
    saved: dict[str, Any], rank_saved: dict[str, Any] | None, model: torch.nn.Module, opt, sched, *, sharded: bool,
    device: torch.device,
) -> RunState:
    """Put the trainable parameters, the optimizer, the scheduler and this rank's RNG back as they were at the
    checkpoint that :func:`read_out_dir` read; return the run's state there."""
    current = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in saved["trainable"].items():
            current[name].copy_(value)
    opt.load_state_dict(rank_saved["optimizer"] if sharded else saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    torch.set_rng_state(rank_saved["rng"] if rank_saved is not None else saved["rng"])
    if rank_saved is not None and "cuda_rng" in rank_saved and device.type == "cuda":
        torch.cuda.set_rng_state(rank_saved["cuda_rng"], device)
    return RunState(**saved["run"])


# --------------------------------------------------------------------------------------------------- writing


def save_checkpoint(
    out: Path, ranks: Ranks, cfg: TrainConfig, model: torch.nn.Module, opt, sched, *, sharded: bool, state: RunState
) -> None:
    """Write the checkpoint of step ``state.step``: ``checkpoint.pt`` (rank 0) and, with several ranks, one file
    per rank.

    With several ranks, every rank first writes its own file (its optimizer shard if the optimizer is sharded,
    and its RNG state) under a step-numbered name; ``checkpoint.pt``, which names the step, is replaced only
    after all of them exist, and older rank files are deleted only after that. An interruption at any point
    leaves a ``checkpoint.pt`` whose rank files are complete.
    """
    step = state.step
    common = {  # what checkpoint.pt holds besides the optimizer; only rank 0 writes it
        "config": asdict(cfg),
        "trainable": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
        "scheduler": sched.state_dict(),
        "rng": torch.get_rng_state(),
        "run": asdict(state),
    } if ranks.rank == 0 else {}
    if ranks.world > 1:
        part: dict[str, Any] = {"step": step, "rank": ranks.rank, "world_size": ranks.world,
                                "rng": torch.get_rng_state(), "optimizer": opt.state_dict() if sharded else None}
        if ranks.device.type == "cuda":
            part["cuda_rng"] = torch.cuda.get_rng_state(ranks.device)
        atomic_torch_save(_rank_file(out, step, ranks.rank, ranks.world), part)
        ranks.barrier()
    if ranks.rank == 0:
        atomic_torch_save(
            out / "checkpoint.pt",
            {**common, "optimizer": None if sharded else opt.state_dict(), "world_size": ranks.world},
        )
    ranks.barrier()
    shard_dir = out / _RANK_DIR
    if ranks.rank == 0 and shard_dir.is_dir():  # rank files of earlier steps (or of runs with another world size)
        keep = {_rank_file(out, step, r, ranks.world).name for r in range(ranks.world)} if ranks.world > 1 else set()
        for f in shard_dir.iterdir():
            if f.name not in keep:
                f.unlink(missing_ok=True)
        if not keep:
            shard_dir.rmdir()
