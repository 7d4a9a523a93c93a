"""Golden trajectories: a refactor of the optimizers must not change one bit of what they compute.

``tests/golden/trajectories.pt`` holds, for every moment mode, X = 0, SGD and a float32 run, the trainable
tensors after 20 steps on the tiny PEFT model (embedding, conv, two linears, a head in ``modules_to_save``),
recorded by ``python tests/test_golden.py --record`` from the code as it was when the file was written. The
test replays the runs and asserts the results are bit-identical.

Bits depend on the machine's vector instructions (the matrix products round differently with AVX2 and
AVX-512), so bit-identity is asserted where the CPU capability and the torch version match the recording;
elsewhere the test asserts agreement to 1e-12 (float64) / 1e-5 (float32) and says why it is not exact.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from models import tiny_batch, tiny_loss, tiny_peft

import lorapro

GOLDEN = Path(__file__).parent / "golden" / "trajectories.pt"
STEPS = 20

RUNS = {
    "adamw-full": (torch.float64, lambda m: lorapro.LoRAProAdamW(m, lr=1e-2, weight_decay=0.01)),
    "adamw-bf16": (torch.float64, lambda m: lorapro.LoRAProAdamW(m, lr=1e-2, moments="bf16")),
    "adamw-factored": (torch.float64, lambda m: lorapro.LoRAProAdamW(m, lr=1e-2, moments="factored")),
    "adamw-efficient": (torch.float64, lambda m: lorapro.LoRAProAdamW(m, lr=1e-2, moments="efficient")),
    "adamw-zero": (torch.float64, lambda m: lorapro.LoRAProAdamW(m, lr=1e-2, x_mode="zero")),
    "sgd": (torch.float64, lambda m: lorapro.LoRAProSGD(m, lr=0.5, weight_decay=0.01)),
    "sgd-zero": (torch.float64, lambda m: lorapro.LoRAProSGD(m, lr=0.5, x_mode="zero")),
    "adamw-full-f32": (torch.float32, lambda m: lorapro.LoRAProAdamW(m, lr=1e-2)),
    "adamw-factored-f32": (torch.float32, lambda m: lorapro.LoRAProAdamW(m, lr=1e-2, moments="factored")),
    "sgd-f32": (torch.float32, lambda m: lorapro.LoRAProSGD(m, lr=0.5)),
}


def _machine() -> dict[str, str]:
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": str(torch.__version__)}


def _trajectory(name: str) -> dict[str, torch.Tensor]:
    dtype, make = RUNS[name]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the row blocks (and so the summation order) depend on the thread count
    try:
        torch.manual_seed(0)  # bf16's stochastic rounding draws from the global generator
        model = tiny_peft(dtype=dtype, init_lora_weights=False, two_adapters=True)
        opt = make(model)
        losses = []
        for step in range(STEPS):
            opt.zero_grad()
            loss = tiny_loss(model, tiny_batch(seed=step, dtype=dtype))
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        out = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        out["losses"] = torch.stack(losses)
        return out
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN, weights_only=True)


@pytest.mark.parametrize("name", list(RUNS))
def test_trajectory_is_bit_identical_to_the_recording(golden, name):
    expected = golden["runs"][name]
    got = _trajectory(name)
    assert got.keys() == expected.keys()
    exact = golden["machine"] == _machine()
    for key, value in expected.items():
        if exact:
            assert torch.equal(got[key], value), f"{name}: {key} differs from the recording"
        else:
            tol = 1e-12 if value.dtype == torch.float64 else 1e-5
            torch.testing.assert_close(got[key], value, rtol=tol, atol=tol, msg=f"{name}: {key}")


def _record() -> None:
    GOLDEN.parent.mkdir(exist_ok=True)
    torch.save({"machine": _machine(), "runs": {name: _trajectory(name) for name in RUNS}}, GOLDEN)
    print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size} bytes) on {_machine()}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/test_golden.py --record")
    sys.path.insert(0, str(Path(__file__).parent))
    _record()
