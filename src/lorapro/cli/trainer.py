"""The training loop behind ``lorapro train``: one method, one model, one dataset, resumable exactly.

Everything that decides the result is a function of the config and the step number: the data order of
epoch ``e`` is a permutation seeded by ``(seed, e)``, the torch RNG (dropout) is saved in every checkpoint,
so ``--resume`` reproduces an uninterrupted run's parameters and metrics.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the same loop runs as plain DDP: ``batch_size`` stays the global batch,
split evenly over the ranks, the LoRA-Pro optimizer state is sharded over the launch's process group, each
rank checkpoints its own optimizer shard and RNG, and only rank 0 writes outputs (see
:class:`~lorapro.cli.ranks.Ranks` and :mod:`lorapro.cli.checkpoints`).

:func:`train` runs these steps: :func:`_prepare` (check ``--out``, read the checkpoint to resume, load the
data), :func:`_build` (model, optimizer, schedule), restore the checkpoint, :func:`_loop` (:func:`_step`,
evaluations, checkpoints) and :func:`_finish` (the trained weights and ``metrics.json``).
"""

from __future__ import annotations

import contextlib
import math
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .. import _methods as registry
from .._io import atomic_write_json
from .._state import optimizer_state_bytes
from . import data as data_mod
from . import models as models_mod
from . import peft_methods
from .batches import Batches
from .checkpoints import (
    RunState,
    prepare_out_dir,
    read_out_dir,
    restore_checkpoint,
    same_run,
    save_checkpoint,
)
from .config import TrainConfig
from .errors import UserError
from .evaluate import evaluate
from .ranks import Ranks


def lr_lambda(total_steps: int, warmup_ratio: float, schedule: str):
    """Linear warm-up over ``warmup_ratio`` of the steps, then cosine / linear decay to 0, or constant."""
    warmup = int(math.ceil(total_steps * warmup_ratio))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def make_optimizer(
    method: str, model: torch.nn.Module, cfg: TrainConfig, process_group: Any = None
) -> torch.optim.Optimizer:
    """The optimizer of ``method`` (its entry in :mod:`lorapro._methods`); every method gets the same lr and
    schedule (the paper's protocol).

    ``process_group``: the LoRA-Pro optimizers shard their per-layer state over it (the full / LoRA baselines
    use plain AdamW, and the PEFT baselines PEFT's optimizers, replicated on every rank).
    """
    spec = models_mod.method_spec(method)
    if spec.peft_optimizer is not None:
        return peft_methods.make_optimizer(spec.peft_optimizer, model, cfg, process_group=process_group)
    if spec.lorapro is not None:
        fused = {"fused": cfg.fused} if spec.fused else {}
        return registry.LORAPRO_OPTIMIZERS[spec.lorapro](
            model, lr=cfg.lr, weight_decay=cfg.weight_decay, process_group=process_group, **spec.lorapro_kwargs,
            **fused,
        )
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device: {name!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return device


def peak_memory_mib(device: torch.device) -> float:
    """Peak accelerator memory allocated by torch, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
    log=print,
) -> dict[str, Any] | None:
    """Train and evaluate one method; write ``metrics.json``, the trained weights and a checkpoint to ``cfg.out``.

    All input is validated before anything is written to ``cfg.out``. With ``stop_after``, training stops
    after that many steps in total, leaving a checkpoint for ``resume`` (and returns ``None``). A ``cfg.out``
    that holds an earlier run (any of :data:`~lorapro.cli.checkpoints.RUN_OUTPUTS`) is refused unless
    ``resume`` continues it or ``overwrite`` replaces it (those files are deleted once the input has been
    validated).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) this joins the launch (gloo on CPU, nccl on CUDA with
    ``cuda:LOCAL_RANK``), trains with DDP and a sharded LoRA-Pro optimizer, and destroys the process group it
    created when it returns or raises. Only rank 0 logs and writes outputs and returns the metrics; the other
    ranks return ``None``.
    """
    if resume and overwrite:
        raise UserError("give --resume (continue the run in --out) or --overwrite (replace it), not both")
    cfg.validate()
    device = resolve_device(cfg.device)
    ranks = Ranks.launch(cfg, device)
    try:
        return _train(cfg, ranks, resume=resume, overwrite=overwrite, stop_after=stop_after, progress=progress,
                      log=log)
    finally:
        ranks.close()


def _train(
    cfg: TrainConfig, ranks: Ranks, *, resume: bool, overwrite: bool, stop_after: int | None, progress: bool, log
) -> dict[str, Any] | None:
    """:func:`train`'s steps on this rank (only rank 0 shows progress and logs)."""
    if ranks.rank > 0:
        progress, log = False, (lambda *a, **k: None)
    out = Path(cfg.out)
    saved, rank_saved, data = _prepare(cfg, ranks, out, resume=resume, overwrite=overwrite)
    run = _build(cfg, data, ranks)
    state = RunState()
    if saved is not None:
        state = restore_checkpoint(saved, rank_saved, run.model, run.opt, run.sched, sharded=run.sharded,
                                   device=ranks.device)
        log(f"resuming {cfg.method} from step {state.step} of {run.total}")
    prepare_out_dir(out, ranks, overwrite=overwrite)  # before any rank writes its checkpoint file
    start = _loop(run, state, ranks, out, stop_after=stop_after, progress=progress)
    if state.step < run.total:
        log(f"stopped after step {state.step} of {run.total}; continue with --resume")
        return None
    return _finish(run, state, ranks, out, wall=time.perf_counter() - start, resumed=saved is not None)


def _prepare(
    cfg: TrainConfig, ranks: Ranks, out: Path, *, resume: bool, overwrite: bool
) -> tuple[dict | None, dict | None, data_mod.TaskData]:
    """Check ``--out``, read the checkpoint to resume (if any) and load the data; write nothing.

    Every rank checks ``--out`` and reads its checkpoint files, and all take the same decision, before any rank
    writes: rank 0 creates ``--out`` only after the model is built, the other ranks write only their checkpoint
    files, after :func:`~lorapro.cli.checkpoints.prepare_out_dir`.
    """
    saved, rank_saved = ranks.agree(lambda: read_out_dir(out, ranks, resume=resume, overwrite=overwrite))
    data = data_mod.load_task_data(cfg.task, cfg.train, cfg.eval, max_train=cfg.max_train, max_eval=cfg.max_eval)
    cfg.task = data.task
    if not data.eval:
        raise UserError(f"no evaluation data for {cfg.train}: pass --eval FILE")
    if saved is not None:
        diff = same_run(saved["config"], cfg)
        if diff:
            raise UserError(f"--resume: the checkpoint in {out} was made with a different config ({', '.join(diff)})")
    return saved, rank_saved, data


@dataclass
class _Run:
    """What :func:`_build` makes for a run: the model and its optimizer, schedule and step counts."""

    cfg: TrainConfig
    data: data_mod.TaskData
    model: torch.nn.Module
    tokenizer: Any
    info: dict[str, Any]
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    sharded: bool  # the LoRA-Pro state is split over the ranks (AdamW is replicated)
    diag: Any  # a lorapro.diagnostics.GradientDiagnostics, or None
    total: int  # optimizer steps
    eval_every: int
    save_every: int


def _build(cfg: TrainConfig, data: data_mod.TaskData, ranks: Ranks) -> _Run:
    """The model (seeded by ``cfg.seed``, the same on every rank) on this rank's device, its optimizer and
    learning-rate schedule; afterwards each rank > 0 draws dropout from its own seed."""
    device = ranks.device
    torch.manual_seed(cfg.seed)
    model, tokenizer, info = models_mod.build_model(
        models_mod.resolve_model(cfg.model),
        task=data.task,
        num_labels=len(data.labels) if data.labels else None,
        method=cfg.method,
        rank=cfg.rank,
        alpha=cfg.alpha,
        rslora=cfg.rslora,
        target_modules=cfg.target_modules,
        seed=cfg.seed,
        id2label=dict(enumerate(data.labels)) if data.labels else None,
        init_batches=peft_methods.init_batches(cfg, data, device),  # LoRA-GA's gradient estimate (else None)
    )
    model.to(device)
    opt = make_optimizer(cfg.method, model, cfg, process_group=ranks.group)
    sharded = getattr(opt, "shard", (0, 1))[1] > 1
    diag = _diagnostics(cfg, model, ranks.world)
    if ranks.rank > 0:  # its own dropout stream; rank 0 keeps the single-process one
        torch.manual_seed(cfg.seed + 1_000_003 * ranks.rank)
    steps_per_epoch = max(1, len(data.train) // (cfg.batch_size * cfg.grad_accum))
    total = cfg.max_steps or int(math.ceil((cfg.epochs or 1.0) * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, cfg.warmup_ratio, cfg.schedule))
    eval_every = cfg.eval_every or total
    return _Run(cfg=cfg, data=data, model=model, tokenizer=tokenizer, info=info, opt=opt, sched=sched, sharded=sharded,
                diag=diag, total=total, eval_every=eval_every, save_every=cfg.save_every or eval_every)


def _diagnostics(cfg: TrainConfig, model: torch.nn.Module, world: int):
    """``--diagnostics N``: a :class:`lorapro.diagnostics.GradientDiagnostics` measuring every N steps."""
    if cfg.diagnostics is None:
        return None
    if world > 1:
        raise UserError("--diagnostics runs in a single process (not under torchrun)")
    from ..diagnostics import GradientDiagnostics

    try:
        return GradientDiagnostics(model, every=cfg.diagnostics)
    except ValueError as e:
        raise UserError(
            f"--diagnostics needs LoRA layers whose A and B both train; method {cfg.method!r} has none ({e})"
        ) from None


class _DataOrder:
    """The training rows of each step: epoch ``e``'s order is a permutation seeded by ``(seed, e)``; a step
    takes the next ``batch_size * grad_accum`` rows after the previous step's, wrapping around at the end, in
    the order of the epoch its first row belongs to."""

    def __init__(self, rows: list[dict], cfg: TrainConfig) -> None:
        self.rows, self.seed, self.per_step = rows, cfg.seed, cfg.batch_size * cfg.grad_accum
        self.order: torch.Tensor | None = None
        self.epoch = -1

    def __call__(self, step: int) -> list[dict]:
        n = len(self.rows)
        first = step * self.per_step
        epoch = first // n
        if epoch != self.epoch:
            self.order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            self.epoch = epoch
        return [self.rows[int(self.order[(first + k) % n])] for k in range(self.per_step)]


def _loop(run: _Run, state: RunState, ranks: Ranks, out: Path, *, stop_after: int | None, progress: bool) -> float:
    """Train from ``state.step`` to ``run.total`` (or to ``stop_after``), evaluating and checkpointing on the way;
    return the ``time.perf_counter()`` the run started at (earlier by the time spent before a resume)."""
    cfg = run.cfg
    net = ranks.wrap(run.model)
    batches = Batches(run.data, run.tokenizer, cfg, ranks.device)
    net.train()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=run.total, initial=state.step, desc=cfg.method, file=sys.stderr, unit="step",
                   dynamic_ncols=True)
    start = time.perf_counter() - state.elapsed
    rows_of = _DataOrder(run.data.train, cfg)
    while state.step < run.total and (stop_after is None or state.step < stop_after):
        loss = _step(run, net, batches, rows_of(state.step), ranks, state)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
        if state.step % run.eval_every == 0 or state.step == run.total:
            metrics = evaluate(run.model, run.tokenizer, run.data, cfg, progress=progress, ranks=ranks)
            state.evals.append({"step": state.step, **metrics})
            if bar is not None:
                bar.write(f"[{cfg.method}] step {state.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if state.step % run.save_every == 0 or state.step in (run.total, stop_after):
            state.elapsed = time.perf_counter() - start
            save_checkpoint(out, ranks, cfg, run.model, run.opt, run.sched, sharded=run.sharded, state=state)
    if bar is not None:
        bar.close()
    return start


def _step(run: _Run, net: torch.nn.Module, batches: Batches, rows: list[dict], ranks: Ranks, state: RunState) -> float:
    """One optimizer step on ``rows`` (``grad_accum`` micro-batches, each split over the ranks); record it in
    ``state`` and return the global batch's loss."""
    cfg = run.cfg
    run.opt.zero_grad(set_to_none=True)
    loss_sum = 0.0
    measuring = run.diag.watch(state.step, cfg.grad_accum) if run.diag is not None else contextlib.nullcontext()
    with measuring:
        for micro in range(cfg.grad_accum):
            part = rows[micro * cfg.batch_size : (micro + 1) * cfg.batch_size]
            with ranks.accumulating(net, last=micro == cfg.grad_accum - 1):
                loss = ranks.loss(net, batches(ranks.share(part)), run.data.task) / cfg.grad_accum
                loss.backward()
            loss_sum += loss.item()
    if run.diag is not None:
        state.diagnostics += run.diag.records
        run.diag.records.clear()
    if ranks.world > 1:  # the global batch's loss: the mean of the (weighted) per-rank losses
        loss_sum = ranks.sum(torch.tensor([loss_sum], dtype=torch.float64)).item() / ranks.world
    if cfg.max_grad_norm:
        torch.nn.utils.clip_grad_norm_([p for p in run.model.parameters() if p.requires_grad], cfg.max_grad_norm)
    t0 = time.perf_counter()
    run.opt.step()
    state.opt_step_seconds += time.perf_counter() - t0
    run.sched.step()
    state.step += 1
    state.train_loss.append([state.step, loss_sum])
    return loss_sum


def _finish(
    run: _Run, state: RunState, ranks: Ranks, out: Path, *, wall: float, resumed: bool
) -> dict[str, Any] | None:
    """Rank 0 saves the trained weights, the diagnostics if recorded, and ``metrics.json``; returns the metrics
    (``None`` on the other ranks)."""
    cfg, device = run.cfg, ranks.device
    per_rank = ranks.gather([optimizer_state_bytes(run.opt) / 2**20, peak_memory_mib(device)])
    if ranks.rank > 0:
        return None
    spec = models_mod.method_spec(cfg.method)
    models_mod.save_trained(run.model, run.tokenizer, out / ("adapter" if spec.lora else "model"), cfg.method,
                            base_model=cfg.model)
    final = state.evals[-1]
    metric_key = "eval_accuracy" if run.data.task == "classification" else "eval_exact_match"
    result = {
        metric_key: final[metric_key],
        "eval_loss": final["eval_loss"],
        "method": cfg.method,
        "final_train_loss": _tail_mean(state.train_loss),
        "steps": state.step,
        "wall_seconds": wall,
        "mean_optimizer_step_ms": 1000.0 * state.opt_step_seconds / max(1, state.step),
        "peak_memory_mib": peak_memory_mib(device),
        "device": str(device),
        "optimizer_state_mib": optimizer_state_bytes(run.opt) / 2**20,
        "trainable_params": run.info["trainable_params"],
        "total_params": run.info["total_params"],
        "data": run.data.source,
        "evals": state.evals,
        "train_loss": state.train_loss,
        "config": asdict(cfg),
        "model_info": {k: v for k, v in run.info.items() if k != "target_modules"},
        "target_modules": run.info.get("target_modules"),
        "torch_threads": torch.get_num_threads(),
        "resumed": resumed,
        "world_size": ranks.world,
    }
    if ranks.world > 1:  # rank 0's numbers above; every rank's here (the optimizer state is sharded)
        result["optimizer_state_mib_per_rank"] = [r[0] for r in per_rank]
        result["peak_memory_mib_per_rank"] = [r[1] for r in per_rank]
    if state.diagnostics:
        from ..diagnostics import plot_diagnostics

        atomic_write_json(out / "diagnostics.json", {"method": cfg.method, "every": cfg.diagnostics,
                                                      "records": state.diagnostics})
        plot_diagnostics({cfg.method: state.diagnostics}, str(out / "diagnostics.png"))
    atomic_write_json(out / "metrics.json", result)
    return result


def _tail_mean(curve: list[list[float]], k: int = 20) -> float:
    """Mean training loss of the last ``k`` steps (a single step's loss is too noisy to compare)."""
    tail = [v for _, v in curve[-k:]]
    return sum(tail) / max(1, len(tail))
