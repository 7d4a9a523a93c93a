"""The ``lorapro`` command line: ``train``, ``compare``, ``eval``, ``bench`` and ``memory``.

User errors (a missing file, an unknown model, a bad flag value) print one line and exit with code 2;
nothing is written to ``--out`` before the input has been validated.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict
from pathlib import Path

from .. import __version__
from .. import _methods as registry
from .config import TrainConfig, fused_methods
from .data import TASKS
from .errors import UserError
from .models import method_spec

# What every command runs with unless the environment says otherwise: no Hugging Face Hub access, and only
# transformers' errors (the command prints its own progress and messages).
ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


def set_environment() -> None:
    """:data:`ENVIRONMENT`'s defaults, for ``lorapro`` run in-process (as :func:`main` does)."""
    for key, value in ENVIRONMENT.items():
        os.environ.setdefault(key, value)


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


_PEFT_HELP = (f"{', '.join(registry.names(lambda m: m.peft))}: the peers, "
              + ", ".join(m.peft for m in registry.METHODS if m.peft))


def _add_train_args(p: argparse.ArgumentParser, *, compare: bool) -> None:
    from .compare import DEFAULT_METHODS

    d = TrainConfig()
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=d.model, help="local Hugging Face model directory, or minilm / smollm2-135m")
    g.add_argument("--task", choices=TASKS, default=None,
                   help="needed with --train FILE; implied by a built-in dataset")
    g.add_argument("--train", default=d.train, help="JSONL/CSV/JSON file, or a builtin: rotten-tomatoes / trec / gsm-symbolic / basic-arithmetic / easy-arithmetic")
    g.add_argument("--eval", default=None, help="held-out file (default: the built-in dataset's held-out split)")
    g.add_argument("--max-train", type=int, default=None, help="use at most this many training rows")
    g.add_argument("--max-eval", type=int, default=None, help="use at most this many eval rows")
    g.add_argument("--max-length", type=int, default=d.max_length, help="tokens per example (truncation)")
    g = p.add_argument_group("method")
    if compare:
        g.add_argument("--methods", type=_csv_list, default=list(DEFAULT_METHODS),
                       help=f"comma-separated, from {', '.join(registry.NAMES)}; 'method@lr' trains that method at "
                            f"its own lr (default {','.join(DEFAULT_METHODS)}: lora@1e-3 is LoRA at the lr the "
                            f"reproduction's validation sweep chose for it on the demo's task); {_PEFT_HELP}")
    else:
        g.add_argument("--method", default=d.method,
                       help=f"one of {', '.join(registry.NAMES)} (default {d.method}); {_PEFT_HELP}")
    g.add_argument("--rank", type=int, default=d.rank)
    g.add_argument("--alpha", type=float, default=d.alpha)
    g.add_argument("--rslora", action="store_true", help="scale alpha/sqrt(r) instead of alpha/r")
    g.add_argument("--target-modules", type=_csv_list, default=None,
                   help="comma-separated module names (default: every linear layer except the output head)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=d.lr, help="learning rate, the same for every method")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: --epochs 1)")
    g.add_argument("--epochs", type=float, default=None)
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="examples per micro-batch (default %(default)s); under torchrun the global batch, split "
                        "evenly over the processes (must be divisible by their number)")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum)
    g.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio)
    g.add_argument("--schedule", default=d.schedule, help="cosine (default), linear or constant")
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="0 disables clipping")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default: at the end)")
    g.add_argument(
        "--diagnostics", type=int, default=None, metavar="N",
        help="every N steps record ||G - g|| of LoRA's and LoRA-Pro's equivalent gradients per layer and the ranks "
        "of A and B (the paper's Figures 4 and 2): diagnostics.json and diagnostics.png in --out",
    )
    g.add_argument("--save-every", type=int, default=None, help="steps between checkpoints (default: each eval)")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    g.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="generation length for causal-lm eval")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorapro", description="Fine-tune with LoRA-Pro, LoRA or full fine-tuning.")
    parser.add_argument("--version", action="version", version=f"lorapro {__version__}")
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("train", help="fine-tune one model with one method")
    _add_train_args(p, compare=False)
    p.add_argument("--out", default="runs/train",
                   help="output directory (metrics.json, adapter/ or model/, checkpoint.pt); one that holds an "
                        "earlier run (any of metrics.json, checkpoint.pt, checkpoint-ranks/, adapter/, model/, "
                        "diagnostics.json, diagnostics.png) is refused without --resume or --overwrite; an empty "
                        "or new one is fine")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the earlier run in --out: once the input is validated, delete those of its "
                        "files listed under --out (other files stay)")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many steps, leaving a checkpoint for --resume (time-boxed jobs)")
    p.add_argument("--fused", action="store_true",
                   help=f"{' / '.join(fused_methods())}: run the Adam pass as one torch.compile'd loop per block "
                        "(LoRAProAdamW(fused=True); the first step compiles it; needs a C++ compiler on CPU)")

    p = sub.add_parser("compare", help="full fine-tuning vs LoRA vs LoRA-Pro on the same budget (default: the demo)")
    _add_train_args(p, compare=True)
    p.add_argument("--out", default="runs/compare",
                   help="output directory (results.json, loss_curves.png, one dir per method); one that holds an "
                        "earlier comparison (results.json, loss_curves.png, or an earlier run in the directory of "
                        "a method to train, see `lorapro train --help`) is refused without --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the earlier comparison in --out (passed on to each method's `lorapro train`)")
    p.set_defaults(max_steps=None)

    p = sub.add_parser("eval", help="score a model (optionally with a trained adapter) on a dataset")
    p.add_argument("--model", default=None,
                   help="a builtin name or model directory (default with --adapter: the base model it records)")
    p.add_argument("--adapter", default=None, help="PEFT adapter directory written by lorapro train")
    p.add_argument("--task", choices=TASKS, default=None)
    p.add_argument("--train", default=None, help="the training data (to recover the label set), if --eval is a file")
    p.add_argument("--eval", required=True)
    p.add_argument("--max-eval", type=int, default=None)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)

    from . import bench

    p = sub.add_parser("bench", help="time the optimizer step against its peers and its floor",
                       description=bench.__doc__.split("\n\n")[0])
    bench.build_parser(p)
    p.add_argument("--threads", type=int, default=None)
    from . import memory

    p = sub.add_parser("memory", help="per-rank memory of full FT, LoRA and LoRA-Pro's presets: what fits a GPU",
                       description=memory.__doc__.split("\n\n")[0])
    memory.add_arguments(p)
    return parser


# The embedded default of `lorapro compare` (and `make demo`): MiniLM on Rotten Tomatoes.
DEMO_DEFAULTS = {"max_steps": 100}


def _config_from_args(args: argparse.Namespace, method: str) -> TrainConfig:
    names = set(asdict(TrainConfig()).keys())
    values = {k: v for k, v in vars(args).items() if k in names}
    values["method"] = method
    return TrainConfig.from_dict(values)


def _run(args: argparse.Namespace) -> int:
    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if args.command == "train":
        from .trainer import train

        method_spec(args.method)
        cfg = _config_from_args(args, args.method)
        result = train(cfg, resume=args.resume, overwrite=args.overwrite, stop_after=args.stop_after,
                       progress=not args.no_progress)
        if result is None:
            return 0
        key = "eval_accuracy" if "eval_accuracy" in result else "eval_exact_match"
        print(f"{args.method}: {key} {result[key]:.4f}, final train loss {result['final_train_loss']:.4f}, "
              f"{result['wall_seconds']:.0f} s -> {Path(args.out) / 'metrics.json'}")
        return 0
    if args.command == "compare":
        from .compare import compare, format_table, parse_run

        if int(os.environ.get("WORLD_SIZE") or 1) > 1:
            raise UserError("compare runs each method in its own process; under torchrun use `lorapro train` per method")
        entries = [parse_run(m) for m in args.methods]
        for method, _ in entries:
            method_spec(method)
        for key, value in DEMO_DEFAULTS.items():
            if getattr(args, key) is None and args.epochs is None:
                setattr(args, key, value)
        cfg = _config_from_args(args, entries[0][0])
        cfg.validate()
        own = [m for m, (_, lr) in zip(args.methods, entries) if lr is not None]
        print(f"Learning rate: {cfg.lr:g} for every method (the paper's protocol: one lr for all; no tuning, "
              "so the held-out split is never used to choose anything)"
              + (f"; besides, at their own lr: {', '.join(own)}." if own else "."))
        results = compare(cfg, args.methods, Path(args.out), overwrite=args.overwrite, progress=not args.no_progress)
        print()
        print(format_table(results["runs"]))
        print(f"\nwrote {Path(args.out) / 'results.json'} and {Path(args.out) / 'loss_curves.png'}")
        return 0
    if args.command == "eval":
        from .evaluate import recorded_base_model, run_eval

        model = args.model
        if model is None:
            if args.adapter is None:
                raise UserError("lorapro eval needs --model, or --adapter (whose recorded base model is used)")
            model = recorded_base_model(args.adapter)
        metrics = run_eval(model, args.eval, adapter=args.adapter, task=args.task, train=args.train,
                           max_eval=args.max_eval, max_length=args.max_length, eval_batch_size=args.eval_batch_size,
                           max_new_tokens=args.max_new_tokens)
        print(" ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return 0
    if args.command == "bench":
        from . import bench

        rows = bench.run(args)
        print()
        print(bench.report(rows, args))
        if args.json:
            from .._io import atomic_write_json

            atomic_write_json(args.json, {"args": vars(args), "rows": rows})
        return 0
    if args.command == "memory":
        from . import memory

        return memory.run(args)
    build_parser().print_help()
    return 0


def main(argv: list[str] | None = None) -> int:
    set_environment()
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except UserError as e:
        print(f"lorapro: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorapro: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
