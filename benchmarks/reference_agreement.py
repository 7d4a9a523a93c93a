"""Measure how closely LoRAProAdamW / LoRAProSGD follow the literal float64 transcription of docs/algorithm.md.

    .venv/bin/python benchmarks/reference_agreement.py

Prints the largest absolute parameter difference over 4 steps for every configuration the test suite checks
(tests/test_optim_reference.py asserts <= 1e-10; this prints the measured values).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import test_optim_reference as T  # noqa: E402
from models import gpt2_batch, gpt2_loss, tiny_batch, tiny_gpt2, tiny_loss, tiny_peft  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    worst = {}
    for case, kw in T.TINY_CASES.items():
        for algo in ("adamw", "sgd"):
            for x_mode in ("sylvester", "zero"):
                model = tiny_peft(dtype=torch.float64, **kw)
                lr = 1e-2 if algo == "adamw" else 5e-2
                batches = [tiny_batch(seed=i, dtype=torch.float64) for i in range(T.STEPS)]
                worst[f"{case} {algo} {x_mode}"] = T._run_both(model, tiny_loss, batches, algo, x_mode, lr)
    for algo in ("adamw", "sgd"):
        for init in (True, False):
            model = tiny_gpt2(dtype=torch.float64, init_lora_weights=init)
            batches = [gpt2_batch(seed=i) for i in range(T.STEPS)]
            worst[f"gpt2-conv1d-{'b0' if init else 'generic'} {algo} sylvester"] = T._run_both(
                model, gpt2_loss, batches, algo, "sylvester", 1e-2
            )
    for name, value in worst.items():
        print(f"{name:42s} {value:.2e}")
    print(f"{'largest':42s} {max(worst.values()):.2e}")


if __name__ == "__main__":
    main()
