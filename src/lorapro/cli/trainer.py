"""The training loop behind ``lorapro train``: one method, one model, one dataset, resumable exactly.

Everything that decides the result is a function of the config and the step number: the data order of
epoch ``e`` is a permutation seeded by ``(seed, e)``, the torch RNG (dropout) is saved in every checkpoint,
so ``--resume`` reproduces an uninterrupted run's parameters and metrics.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .io import atomic_torch_save, atomic_write_json



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
        positive("save_every", self.save_every, allow_none=True)
        if self.weight_decay < 0:
            raise UserError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_ratio < 1:
            raise UserError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise UserError(f"--schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.max_steps is not None and self.epochs is not None:
            raise UserError("give --max-steps or --epochs, not both")


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


def make_optimizer(method: str, model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer each method uses; every method gets the same lr and schedule (the paper's protocol)."""
    import lorapro

    if method == "lorapro":
        return lorapro.LoRAProAdamW(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if method == "lorapro-zero":
        return lorapro.LoRAProAdamW(model, lr=cfg.lr, weight_decay=cfg.weight_decay, x_mode="zero")
    if method in ("lorapro-bf16", "lorapro-factored", "lorapro-efficient"):
        moments = method.split("-", 1)[1]
        return lorapro.LoRAProAdamW(model, lr=cfg.lr, weight_decay=cfg.weight_decay, moments=moments)
    if method == "lorapro-sgd":
        return lorapro.LoRAProSGD(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
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
def evaluate(model, tokenizer, data, cfg: TrainConfig, progress: bool = False) -> dict[str, float]:
    """``eval_accuracy`` (classification) or ``eval_exact_match`` (causal LM), and ``eval_loss``."""
    was_training = model.training
    model.eval()
    batches = Batches(data, tokenizer, cfg, next(model.parameters()).device)
    rows = data.eval
    total_loss, total_n, correct = 0.0, 0, 0.0
    bs = cfg.eval_batch_size
    iterator = range(0, len(rows), bs)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="eval", leave=False, file=sys.stderr, unit="batch")
    for i in iterator:
        chunk = rows[i : i + bs]
        inputs = batches(chunk)
        out = model(**inputs)
        total_loss += out.loss.item() * len(chunk)
        total_n += len(chunk)
        if data.task == "classification":
            correct += (out.logits.argmax(-1) == inputs["labels"]).sum().item()
        else:
            correct += sum(data.scorer(text, r) for text, r in zip(generate(model, tokenizer, batches, chunk, cfg), chunk))
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


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _same_run(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    mine = asdict(cfg)
    ignore = {"out", "eval_every", "save_every"}
    return sorted(k for k in mine if k not in ignore and saved.get(k) != mine[k])


def train(
    cfg: TrainConfig, *, resume: bool = False, stop_after: int | None = None, progress: bool = True, log=print
) -> dict[str, Any] | None:
    """Train and evaluate one method; write ``metrics.json``, the trained weights and a checkpoint to ``cfg.out``.

    All input is validated before anything is written to ``cfg.out``. With ``stop_after``, training stops
    after that many steps in total, leaving a checkpoint for ``resume`` (and returns ``None``).
    """
    from . import data as data_mod
    from . import models as models_mod

    cfg.validate()
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    if resume and not ckpt_path.is_file():
        raise UserError(f"--resume: no checkpoint at {ckpt_path}")
    data = data_mod.load_task_data(cfg.task, cfg.train, cfg.eval, max_train=cfg.max_train, max_eval=cfg.max_eval)
    cfg.task = data.task
    if not data.eval:
        raise UserError(f"no evaluation data for {cfg.train}: pass --eval FILE")
    saved = None
    if resume:
        saved = torch.load(ckpt_path, weights_only=True)
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
    )
    model.to(device)
    opt = make_optimizer(cfg.method, model, cfg)

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
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        state = RunState(**saved["run"])
        log(f"resuming {cfg.method} from step {state.step} of {total}")
    out.mkdir(parents=True, exist_ok=True)

    batches = Batches(data, tokenizer, cfg, device)
    model.train()
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
        for micro in range(cfg.grad_accum):
            part = rows[micro * cfg.batch_size : (micro + 1) * cfg.batch_size]
            loss = model(**batches(part)).loss / cfg.grad_accum
            loss.backward()
            loss_sum += loss.item()
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
            metrics = evaluate(model, tokenizer, data, cfg, progress=progress)
            state.evals.append({"step": state.step, **metrics})
            if bar is not None:
                bar.write(f"[{cfg.method}] step {state.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if state.step % save_every == 0 or state.step in (total, stop_after):
            state.elapsed = time.perf_counter() - start
            atomic_torch_save(
                ckpt_path,
                {
                    "config": asdict(cfg),
                    "trainable": _trainable_state(model),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "rng": torch.get_rng_state(),
                    "run": asdict(state),
                },
            )
    if bar is not None:
        bar.close()
    if state.step < total:
        log(f"stopped after step {state.step} of {total}; continue with --resume")
        return None
    wall = time.perf_counter() - start
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
    }
    atomic_write_json(out / "metrics.json", result)
    return result


def _tail_mean(curve: list[list[float]], k: int = 20) -> float:
    """Mean training loss of the last ``k`` steps (a single step's loss is too noisy to compare)."""
    tail = [v for _, v in curve[-k:]]
    return sum(tail) / max(1, len(tail))

