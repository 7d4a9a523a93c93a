"""The training loop behind ``lorapro train``: one method, one model, one dataset, resumable exactly.

Everything that decides the result is a function of the config and the step number: the data order of
epoch ``e`` is a permutation seeded by ``(seed, e)``, the torch RNG (dropout) is saved in every checkpoint,
so ``--resume`` reproduces an uninterrupted run's parameters and metrics.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the same loop runs as plain DDP: ``batch_size`` stays the global batch,
split evenly over the ranks, the LoRA-Pro optimizer state is sharded over ``torch.distributed.group.WORLD``, each
rank checkpoints its own optimizer shard and RNG, and only rank 0 writes outputs (see :class:`Ranks`).
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import torch

from .errors import UserError
from .io import atomic_torch_save, atomic_write_json


FUSED_METHODS = ("lorapro", "lorapro-zero")  # the methods --fused applies to

# What a run writes into --out. Any of them there means --out holds an earlier run (finished, stopped with
# --stop-after, or interrupted after its first checkpoint): a new run continues it with --resume or replaces
# it with --overwrite, which deletes these (and nothing else) once the input has been validated.
RUN_OUTPUTS = ("metrics.json", "checkpoint.pt", "checkpoint-ranks", "adapter", "model", "diagnostics.json",
               "diagnostics.png")
_START_AGAIN = ("start the run again: the same command without --resume, with --overwrite (which deletes the "
                "earlier run in {out})")

T = TypeVar("T")


@dataclass
class TrainConfig:
    model: str = "minilm"
    task: str | None = None
    train: str = "rotten-tomatoes"
    eval: str | None = None
    method: str = "lorapro"
    rank: int = 8
    alpha: float = 16.0
    rslora: bool = False
    target_modules: list[str] | None = None
    lr: float = 1e-4
    weight_decay: float = 0.0
    max_steps: int | None = None
    epochs: float | None = None
    batch_size: int = 32
    grad_accum: int = 1
    max_length: int = 64
    warmup_ratio: float = 0.03
    schedule: str = "cosine"
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_every: int | None = None
    save_every: int | None = None
    max_train: int | None = None
    max_eval: int | None = None
    eval_batch_size: int = 64
    max_new_tokens: int = 16
    device: str | None = None
    out: str = "runs/train"
    diagnostics: int | None = None  # record the paper's diagnostics every this many steps
    fused: bool = False  # LoRAProAdamW(fused=True) for lorapro / lorapro-zero

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def validate(self) -> None:
        def positive(name: str, value: Any, allow_none: bool = False) -> None:
            if value is None and allow_none:
                return
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise UserError(f"--{name.replace('_', '-')} must be a positive number, got {value!r}")

        positive("lr", self.lr)
        positive("rank", self.rank)
        positive("alpha", self.alpha)
        positive("batch_size", self.batch_size)
        positive("grad_accum", self.grad_accum)
        positive("max_length", self.max_length)
        positive("max_steps", self.max_steps, allow_none=True)
        positive("epochs", self.epochs, allow_none=True)
        positive("eval_every", self.eval_every, allow_none=True)
        positive("diagnostics", self.diagnostics, allow_none=True)
        positive("save_every", self.save_every, allow_none=True)
        if self.weight_decay < 0:
            raise UserError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_ratio < 1:
            raise UserError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise UserError(f"--schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.max_steps is not None and self.epochs is not None:
            raise UserError("give --max-steps or --epochs, not both")
        if self.fused and self.method not in FUSED_METHODS:
            raise UserError(
                f"--fused is for {' and '.join(FUSED_METHODS)} (LoRA-Pro AdamW with fp32 moments), not {self.method}"
            )


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
    """The optimizer each method uses; every method gets the same lr and schedule (the paper's protocol).

    ``process_group``: the LoRA-Pro optimizers shard their per-layer state over it (the full / LoRA baselines
    use plain AdamW, replicated on every rank).
    """
    import lorapro

    from . import peft_methods

    if method in peft_methods.PEFT_OPTIMIZER_METHODS:  # LoRA+, LoRA-FA, Riemannian: PEFT's optimizers
        return peft_methods.make_optimizer(method, model, cfg, process_group=process_group)
    pg = {"process_group": process_group}
    if method == "lorapro":
        return lorapro.LoRAProAdamW(model, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=cfg.fused, **pg)
    if method == "lorapro-zero":
        return lorapro.LoRAProAdamW(
            model, lr=cfg.lr, weight_decay=cfg.weight_decay, x_mode="zero", fused=cfg.fused, **pg
        )
    if method in ("lorapro-bf16", "lorapro-factored", "lorapro-efficient"):
        moments = method.split("-", 1)[1]
        return lorapro.LoRAProAdamW(model, lr=cfg.lr, weight_decay=cfg.weight_decay, moments=moments, **pg)
    if method == "lorapro-sgd":
        return lorapro.LoRAProSGD(model, lr=cfg.lr, weight_decay=cfg.weight_decay, **pg)
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))


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


@dataclass
class Ranks:
    """This process's place in a ``torchrun`` launch (``world == 1``: a single process, no process group).

    Batch semantics: ``batch_size`` is the global micro-batch; rank ``r`` of ``W`` trains on the ``r``-th of
    ``W`` contiguous equal slices of it, and DDP averages the gradients, so a step sees the same examples and
    (up to float rounding) the same gradient as a single process with the same ``batch_size``.
    """

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # we initialised the default process group, so we destroy it

    @classmethod
    def launch(cls, cfg: TrainConfig, device: torch.device) -> Ranks:
        """Join the ``torchrun`` launch described by the environment (or an already initialised default group)."""
        import torch.distributed as dist

        initialised = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size() if initialised else int(os.environ.get("WORLD_SIZE") or 1)
        if world <= 1:
            return cls(device=device)
        if not dist.is_available():
            raise UserError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        if cfg.batch_size % world:
            raise UserError(
                f"--batch-size {cfg.batch_size} is the global batch, split over {world} processes: "
                f"it must be divisible by {world}"
            )
        if device.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK") or 0)
            if local >= torch.cuda.device_count():
                raise UserError(f"LOCAL_RANK {local}: this machine has only {torch.cuda.device_count()} CUDA devices")
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        if not initialised:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(rank=dist.get_rank(), world=dist.get_world_size(), device=device, owns_group=not initialised)

    @property
    def group(self) -> Any:
        import torch.distributed as dist

        return dist.group.WORLD if self.world > 1 else None

    def close(self) -> None:
        import torch.distributed as dist

        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False

    def agree(self, check: Callable[[], T]) -> T:
        """``check()`` on every rank, one decision for all: if it raises a :class:`UserError` on any rank, every
        rank raises the lowest such rank's error; otherwise each returns its own result.

        A collective: no rank returns before every rank has finished its ``check``.
        """
        problem = None
        try:
            result = check()
        except UserError as e:
            problem, result = str(e), None
        if self.world > 1:
            import torch.distributed as dist

            problems: list[str | None] = [None] * self.world
            dist.all_gather_object(problems, problem)
            problem = next((p for p in problems if p is not None), None)
        if problem is not None:
            raise UserError(problem)
        return result

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of ``values`` (float64 or int64, any device), as a new tensor on the CPU."""
        t = values.to(self.device, copy=True)
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t.cpu()

    def gather(self, values: list[float]) -> list[list[float]]:
        """Every rank's ``values`` (same length on each rank), indexed by rank; exact (x + 0 sums)."""
        t = torch.zeros(self.world, len(values), dtype=torch.float64)
        t[self.rank] = torch.tensor(values, dtype=torch.float64)
        return self.sum(t).tolist()

    def share(self, rows: list) -> list:
        """This rank's contiguous slice of a global micro-batch (its length is divisible by ``world``)."""
        k = len(rows) // self.world
        return rows[self.rank * k : (self.rank + 1) * k]

    def accumulating(self, net: torch.nn.Module, last: bool):
        """DDP's ``no_sync`` for every micro-batch but the last of a step (one gradient all-reduce per step)."""
        return net.no_sync() if self.world > 1 and not last else contextlib.nullcontext()

    def loss(self, net: torch.nn.Module, inputs: dict[str, torch.Tensor], task: str) -> torch.Tensor:
        """The micro-batch loss of this rank, weighted so that DDP's average over ranks is the global batch's loss.

        Classification: each rank has the same number of examples, so the mean of the per-rank means is the
        global mean. Causal LM: the model's loss is a mean over this rank's completion tokens; scaled by
        ``world * n_rank / n_global`` the DDP average is the mean over all the batch's completion tokens, as in
        a single process.
        """
        out = net(**inputs)
        if self.world == 1 or task == "classification":
            return out.loss
        n = int((inputs["labels"][:, 1:] != -100).sum())  # the tokens the shifted causal LM loss counts
        total = int(self.sum(torch.tensor([n], dtype=torch.int64)).item())
        if n == 0:  # no loss tokens here (mean of nothing is NaN); a zero that still reaches every parameter
            return out.logits.sum() * 0.0
        return out.loss * (self.world * n / total)


def _shard_file(out: Path, step: int, rank: int, world: int) -> Path:
    """One rank's part of the checkpoint of step ``step``: its optimizer shard and RNG."""
    return out / "checkpoint-ranks" / f"step{step}.rank{rank}-of-{world}.pt"


class Batches:
    """Turns rows into model inputs with dynamic padding."""

    def __init__(self, data, tokenizer, cfg: TrainConfig, device: torch.device | str = "cpu") -> None:
        self.data, self.tok, self.cfg, self.device = data, tokenizer, cfg, torch.device(device)

    def prompt_text(self, prompt: str) -> str:
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        return prompt + "\n"

    def classification(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        texts = [r["text"] for r in rows]
        pairs = [r.get("text_pair") for r in rows]
        enc = self.tok(
            texts,
            pairs if any(p is not None for p in pairs) else None,
            truncation=True,
            max_length=self.cfg.max_length,
            padding=True,
            return_tensors="pt",
        )
        enc["labels"] = torch.tensor([self.data.label_index(r["label"]) for r in rows])
        return dict(enc)

    def causal(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Prompt + completion + EOS, loss on the completion only, right padding."""
        eos = self.tok.eos_token or ""
        seqs, labels = [], []
        for r in rows:
            p = self.tok(self.prompt_text(r["prompt"]), add_special_tokens=False)["input_ids"]
            c = self.tok(r["completion"] + eos, add_special_tokens=False)["input_ids"]
            ids = (p + c)[-self.cfg.max_length :]
            lab = ([-100] * len(p) + c)[-self.cfg.max_length :]
            seqs.append(ids)
            labels.append(lab)
        width = max(len(s) for s in seqs)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        lab_t = torch.full((len(seqs), width), -100, dtype=torch.long)
        for i, (s, lab) in enumerate(zip(seqs, labels)):
            input_ids[i, : len(s)] = torch.tensor(s)
            attn[i, : len(s)] = 1
            lab_t[i, : len(lab)] = torch.tensor(lab)
        return {"input_ids": input_ids, "attention_mask": attn, "labels": lab_t}

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.classification(rows) if self.data.task == "classification" else self.causal(rows)
        return {k: v.to(self.device) for k, v in batch.items()}


@torch.no_grad()
def evaluate(
    model, tokenizer, data, cfg: TrainConfig, progress: bool = False, ranks: Ranks | None = None
) -> dict[str, float]:
    """``eval_accuracy`` (classification) or ``eval_exact_match`` (causal LM), and ``eval_loss``.

    With ``ranks`` (``world`` > 1) the eval batches are dealt round-robin over the ranks; each batch is the
    same as in one process, and the per-batch results are summed in batch order, so every rank gets exactly
    the single-process numbers.
    """
    was_training = model.training
    model.eval()
    batches = Batches(data, tokenizer, cfg, next(model.parameters()).device)
    rows = data.eval
    rank, world = (ranks.rank, ranks.world) if ranks is not None else (0, 1)
    bs = cfg.eval_batch_size
    starts = range(0, len(rows), bs)
    iterator = starts[rank::world]
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="eval", leave=False, file=sys.stderr, unit="batch")
    per_batch = torch.zeros(len(starts), 3, dtype=torch.float64)  # loss, examples, correct
    for i in iterator:
        chunk = rows[i : i + bs]
        inputs = batches(chunk)
        out = model(**inputs)
        if data.task == "classification":
            right = (out.logits.argmax(-1) == inputs["labels"]).sum().item()
        else:
            right = sum(data.scorer(text, r) for text, r in zip(generate(model, tokenizer, batches, chunk, cfg), chunk))
        per_batch[i // bs] = torch.tensor([out.loss.item(), len(chunk), right], dtype=torch.float64)
    if world > 1:
        per_batch = ranks.sum(per_batch)  # each row is non-zero on one rank only: x + 0 is exact
    total_loss, total_n, correct = 0.0, 0, 0.0
    for loss, n, right in per_batch.tolist():
        total_loss += loss * int(n)
        total_n += int(n)
        correct += right
    model.train(was_training)
    key = "eval_accuracy" if data.task == "classification" else "eval_exact_match"
    return {key: correct / max(1, total_n), "eval_loss": total_loss / max(1, total_n)}


def generate(model, tokenizer, batches: Batches, rows: list[dict], cfg: TrainConfig) -> list[str]:
    """Greedy completions of the prompts (left padding)."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer([batches.prompt_text(r["prompt"]) for r in rows], return_tensors="pt", padding=True,
                        add_special_tokens=False)
        enc = {k: v.to(batches.device) for k, v in enc.items()}
        out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                             max_new_tokens=cfg.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    finally:
        tokenizer.padding_side = side
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


@dataclass
class RunState:
    """What a checkpoint needs besides model and optimizer tensors."""

    step: int = 0
    train_loss: list[list[float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    elapsed: float = 0.0
    opt_step_seconds: float = 0.0
    diagnostics: list[dict[str, Any]] = field(default_factory=list)  # lorapro.diagnostics records


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _same_run(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    mine = asdict(cfg)
    ignore = {"out", "eval_every", "save_every", "diagnostics", "fused"}  # none of these changes the run's maths
    return sorted(k for k in mine if k not in ignore and saved.get(k) != mine[k])


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
    that holds an earlier run (any of :data:`RUN_OUTPUTS`) is refused unless ``resume`` continues it or
    ``overwrite`` replaces it (its :data:`RUN_OUTPUTS` are deleted once the input has been validated).

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


def check_out_dir(out: Path, *, resume: bool = False, overwrite: bool = False) -> None:
    """Raise :class:`UserError` unless ``out`` can take a run: it is (or can be created as) a directory, and
    holds no earlier run unless ``resume`` or ``overwrite``; with ``resume`` it holds a checkpoint. Reads only."""
    from .models import _MARKER

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


_CHECKPOINT_KEYS = ("config", "trainable", "scheduler", "rng", "run", "optimizer")  # what _save_checkpoint writes
_RANK_FILE_KEYS = ("step", "rng", "optimizer")


def _read_out_dir(out: Path, ranks: Ranks, *, resume: bool, overwrite: bool) -> tuple[dict | None, dict | None]:
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
        raise UserError(f"--resume: {path} is not a checkpoint of `lorapro train` (missing or invalid: {', '.join(missing)}); "
                        "point --out at the run to continue, or " + _START_AGAIN.format(out=out))
    return saved, _load_rank_file(out, saved, ranks)


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
    missing = [f.name for r in range(ranks.world) if not (f := _shard_file(out, step, r, ranks.world)).is_file()]
    if missing:
        raise UserError(f"--resume: the checkpoint in {out} is incomplete: {', '.join(missing)} missing")
    path = _shard_file(out, step, ranks.rank, ranks.world)
    mine = _load_file(path, out)
    if not isinstance(mine, dict) or any(k not in mine for k in _RANK_FILE_KEYS):
        raise UserError(f"--resume: {path} is not a rank's part of a `lorapro train` checkpoint; restore it, "
                        "or " + _START_AGAIN.format(out=out))
    if mine["step"] != step:
        raise UserError(f"--resume: {path} is not from step {step}")
    return mine


def _save_checkpoint(out: Path, ranks: Ranks, sharded: bool, common: dict[str, Any], opt, step: int) -> None:
    """Write the checkpoint of ``step``: ``checkpoint.pt`` (rank 0) and, with several ranks, one file per rank.

    With several ranks, every rank first writes its own file (its optimizer shard if the optimizer is sharded,
    and its RNG state) under a step-numbered name; ``checkpoint.pt``, which names the step, is replaced only
    after all of them exist, and older rank files are deleted only after that. An interruption at any point
    leaves a ``checkpoint.pt`` whose rank files are complete.
    """
    if ranks.world > 1:
        part: dict[str, Any] = {"step": step, "rank": ranks.rank, "world_size": ranks.world,
                                "rng": torch.get_rng_state(), "optimizer": opt.state_dict() if sharded else None}
        if ranks.device.type == "cuda":
            part["cuda_rng"] = torch.cuda.get_rng_state(ranks.device)
        atomic_torch_save(_shard_file(out, step, ranks.rank, ranks.world), part)
        ranks.barrier()
    if ranks.rank == 0:
        atomic_torch_save(
            out / "checkpoint.pt",
            {**common, "optimizer": None if sharded else opt.state_dict(), "world_size": ranks.world},
        )
    ranks.barrier()
    shard_dir = out / "checkpoint-ranks"
    if ranks.rank == 0 and shard_dir.is_dir():  # rank files of earlier steps (or of runs with another world size)
        keep = {_shard_file(out, step, r, ranks.world).name for r in range(ranks.world)} if ranks.world > 1 else set()
        for f in shard_dir.iterdir():
            if f.name not in keep:
                f.unlink(missing_ok=True)
        if not keep:
            shard_dir.rmdir()


def _train(
    cfg: TrainConfig, ranks: Ranks, *, resume: bool, overwrite: bool, stop_after: int | None, progress: bool, log
) -> dict[str, Any] | None:
    from . import data as data_mod
    from . import models as models_mod
    from . import peft_methods

    device = ranks.device
    main_rank = ranks.rank == 0
    if not main_rank:
        progress, log = False, (lambda *a, **k: None)
    out = Path(cfg.out)
    # Every rank checks --out and reads its checkpoint files, and all take the same decision, before any rank
    # writes: rank 0 creates --out only after the model is built, the other ranks write only their checkpoint
    # files, after the barrier below.
    saved, rank_saved = ranks.agree(lambda: _read_out_dir(out, ranks, resume=resume, overwrite=overwrite))
    data = data_mod.load_task_data(cfg.task, cfg.train, cfg.eval, max_train=cfg.max_train, max_eval=cfg.max_eval)
    cfg.task = data.task
    if not data.eval:
        raise UserError(f"no evaluation data for {cfg.train}: pass --eval FILE")
    if saved is not None:
        diff = _same_run(saved["config"], cfg)
        if diff:
            raise UserError(f"--resume: the checkpoint in {out} was made with a different config ({', '.join(diff)})")
    torch.manual_seed(cfg.seed)
    id2label = dict(enumerate(data.labels)) if data.labels else None
    model_path = models_mod.resolve_model(cfg.model)
    model, tokenizer, info = models_mod.build_model(
        model_path,
        task=data.task,
        num_labels=len(data.labels) if data.labels else None,
        method=cfg.method,
        rank=cfg.rank,
        alpha=cfg.alpha,
        rslora=cfg.rslora,
        target_modules=cfg.target_modules,
        seed=cfg.seed,
        id2label=id2label,
        init_batches=peft_methods.init_batches(cfg, data, device),  # LoRA-GA's gradient estimate (else None)
    )
    model.to(device)
    opt = make_optimizer(cfg.method, model, cfg, process_group=ranks.group)
    sharded = getattr(opt, "shard", (0, 1))[1] > 1  # LoRA-Pro state split over the ranks (AdamW is replicated)
    diag = _diagnostics(cfg, model, ranks.world)
    if ranks.rank > 0:  # its own dropout stream; rank 0 keeps the single-process one
        torch.manual_seed(cfg.seed + 1_000_003 * ranks.rank)

    examples_per_step = cfg.batch_size * cfg.grad_accum
    steps_per_epoch = max(1, len(data.train) // examples_per_step)
    total = cfg.max_steps or int(math.ceil((cfg.epochs or 1.0) * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, cfg.warmup_ratio, cfg.schedule))
    eval_every = cfg.eval_every or total
    save_every = cfg.save_every or eval_every

    state = RunState()
    if saved is not None:
        current = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in saved["trainable"].items():
                current[name].copy_(value)
        opt.load_state_dict(rank_saved["optimizer"] if sharded else saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        torch.set_rng_state(rank_saved["rng"] if rank_saved is not None else saved["rng"])
        if rank_saved is not None and "cuda_rng" in rank_saved and device.type == "cuda":
            torch.cuda.set_rng_state(rank_saved["cuda_rng"], device)
        state = RunState(**saved["run"])
        log(f"resuming {cfg.method} from step {state.step} of {total}")
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
        if overwrite:
            _remove_earlier_run(out)
    ranks.barrier()  # --out exists, without the earlier run, before any rank writes its checkpoint file

    net: torch.nn.Module = model
    if ranks.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    batches = Batches(data, tokenizer, cfg, device)
    net.train()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=state.step, desc=cfg.method, file=sys.stderr, unit="step", dynamic_ncols=True)
    start = time.perf_counter() - state.elapsed
    n = len(data.train)
    order: torch.Tensor | None = None
    order_epoch = -1
    while state.step < total:
        if stop_after is not None and state.step >= stop_after:
            break
        first = state.step * examples_per_step
        epoch = first // n
        if epoch != order_epoch:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
            order_epoch = epoch
        idx = [(first + k) % n for k in range(examples_per_step)]
        rows = [data.train[int(order[i])] for i in idx]
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        measuring = diag.watch(state.step, cfg.grad_accum) if diag is not None else contextlib.nullcontext()
        with measuring:
            for micro in range(cfg.grad_accum):
                part = rows[micro * cfg.batch_size : (micro + 1) * cfg.batch_size]
                with ranks.accumulating(net, last=micro == cfg.grad_accum - 1):
                    loss = ranks.loss(net, batches(ranks.share(part)), data.task) / cfg.grad_accum
                    loss.backward()
                loss_sum += loss.item()
        if diag is not None:
            state.diagnostics += diag.records
            diag.records.clear()
        if ranks.world > 1:  # the global batch's loss: the mean of the (weighted) per-rank losses
            loss_sum = ranks.sum(torch.tensor([loss_sum], dtype=torch.float64)).item() / ranks.world
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm)
        t0 = time.perf_counter()
        opt.step()
        state.opt_step_seconds += time.perf_counter() - t0
        sched.step()
        state.step += 1
        state.train_loss.append([state.step, loss_sum])
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4f}")
        if state.step % eval_every == 0 or state.step == total:
            metrics = evaluate(model, tokenizer, data, cfg, progress=progress, ranks=ranks)
            state.evals.append({"step": state.step, **metrics})
            if bar is not None:
                bar.write(f"[{cfg.method}] step {state.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if state.step % save_every == 0 or state.step in (total, stop_after):
            state.elapsed = time.perf_counter() - start
            common = {  # what checkpoint.pt holds besides the optimizer; only rank 0 writes it
                "config": asdict(cfg),
                "trainable": _trainable_state(model),
                "scheduler": sched.state_dict(),
                "rng": torch.get_rng_state(),
                "run": asdict(state),
            } if main_rank else {}
            _save_checkpoint(out, ranks, sharded, common, opt, state.step)
    if bar is not None:
        bar.close()
    if state.step < total:
        log(f"stopped after step {state.step} of {total}; continue with --resume")
        return None
    wall = time.perf_counter() - start
    per_rank = ranks.gather([optimizer_state_bytes(opt) / 2**20, peak_memory_mib(device)])
    if not main_rank:
        return None
    models_mod.save_trained(model, tokenizer, out / ("model" if cfg.method == "full" else "adapter"), cfg.method)
    final = state.evals[-1]
    metric_key = "eval_accuracy" if data.task == "classification" else "eval_exact_match"
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
        "optimizer_state_mib": optimizer_state_bytes(opt) / 2**20,
        "trainable_params": info["trainable_params"],
        "total_params": info["total_params"],
        "data": data.source,
        "evals": state.evals,
        "train_loss": state.train_loss,
        "config": asdict(cfg),
        "model_info": {k: v for k, v in info.items() if k != "target_modules"},
        "target_modules": info.get("target_modules"),
        "torch_threads": torch.get_num_threads(),
        "resumed": saved is not None,
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


def _tail_mean(curve: list[list[float]], k: int = 20) -> float:
    """Mean training loss of the last ``k`` steps (a single step's loss is too noisy to compare)."""
    tail = [v for _, v in curve[-k:]]
    return sum(tail) / max(1, len(tail))

