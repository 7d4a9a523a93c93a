"""Smoke test of benchmarks/sharding_figures.py: the figures it reports are what the sharded optimizer does.

Runs the measured part at W = 1 and 2 on tiny layers (CPU, gloo, DDP) and checks the computed Llama part
against formulas written out here and against the optimizer's ownership rule on real ``LoRAPair`` objects.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import sharding_figures as sf  # noqa: E402

# Tiny, with two kinds of layer shape (q/k/v/o and gate/up/down), a rank that divides nothing in particular
# and a trainable non-LoRA vector (replicated, not sharded, not sent by the optimizer).
CFG = sf.SmallConfig(layers=1, hidden=24, intermediate=40, rank=3, steps=2, train_norm=True)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("sharding"))
    return {w: sf.measure(w, CFG, workdir=workdir) for w in (1, 2)}


def _pairs(res):
    return [(r, m, n) for _, r, m, n, _ in res["ranks"][0]["pairs"]]


@pytest.mark.parametrize("world", [1, 2])
def test_measured_figures(measured, world):
    res = measured[world]
    elem = torch.float32.itemsize
    pairs = _pairs(res)
    assert len(pairs) == 7 * CFG.layers and all(r == CFG.rank for r, _, _ in pairs)
    lora_bytes = sum(r * (m + n) for r, m, n in pairs) * elem  # what Sharding.finish sends: A and B of every pair
    dense_bytes = sum(m * n for _, m, n in pairs) * elem

    assert res["identical"] and res["changed"]
    assert len(res["ranks"]) == world and all(len(r["steps"]) == CFG.steps for r in res["ranks"])
    for rank in res["ranks"]:
        for step in rank["steps"]:
            if world == 1:  # nothing to share: no collective at all in the step
                assert step["opt_calls"] == 0 and step["opt_bytes"] == 0
            else:  # the agreement (int64 flags: non-finite, sparse, one has-gradient per tensor) and one
                # all-reduce (one dtype) of exactly r (m + n) numbers per layer, every step
                agreement = 8 * (2 + 2 * len(pairs) + 1)  # the pairs' factors and the trainable norm
                assert step["opt_by_op"] == {"all_reduce": {"calls": 2, "bytes": lora_bytes + agreement}}
                assert step["opt_bytes"] < dense_bytes / 4  # nowhere near m x n
            # DDP all-reduces the LoRA gradients and the trainable norm, nothing frozen
            assert step["ddp_bytes"] == lora_bytes + CFG.hidden * elem and step["ddp_calls"] >= 1

    moments = res["moment_bytes_per_rank"]
    total = 8 * sum(m * n for _, m, n in pairs)  # float32 exp_avg + exp_avg_sq, m x n per layer
    assert res["unsharded_moment_bytes"] == total
    assert sum(moments) == total
    assert max(moments) <= total / world + 8 * max(m * n for _, m, n in pairs)
    if world == 2:
        assert max(moments) < total and min(moments) > 0
        owned = [{name for name, _, _ in r["owned"]} for r in res["ranks"]]
        assert not owned[0] & owned[1] and len(owned[0] | owned[1]) == len(pairs)
    # the norm's AdamW state (2 x hidden floats + step) is on every rank, sharded or not
    assert all(rest >= 2 * CFG.hidden * elem for rest in res["rest_bytes_per_rank"])
    sf.check_measured(res)  # the script's own checks (measured == the formulas of the computed table)


def test_tables_render(measured):
    text = sf.measured_table([measured[1], measured[2]], CFG)
    assert text.count("\n| 1 |") == 1 and text.count("\n| 2 |") == 1 and "| yes |" in text


def test_owner_loads_match_the_optimizer_on_real_pairs():
    """``owner_loads`` feeds the real rule stand-ins with ``.shape`` and ``.B``; real pairs give the same split."""
    from lorapro.sharding import assign_owners as _assign_owners
    from lorapro.pairs import LoRAPair

    shapes = [(m, n) for _ in range(3) for _, m, n in sf.module_shapes(16, 40)]
    pairs = [LoRAPair(torch.zeros(2, n), torch.zeros(m, 2), 1.0, name=f"p{i}") for i, (m, n) in enumerate(shapes)]
    for world in (1, 2, 3, 4, 8):
        owner = _assign_owners(pairs, world)
        real = [sum(m * n for (m, n), p in zip(shapes, pairs) if owner[id(p.B)] == k) for k in range(world)]
        assert sf.owner_loads(shapes, world) == real


def test_computed_llama():
    out = sf.computed_llama([1, 2, 4, 8])
    d, f, L, r = 4096, 11008, 32, 8
    lora = L * (4 * r * (d + d) + 3 * r * (f + d))
    adapted = L * (4 * d * d + 3 * f * d)
    assert out["pairs"] == 7 * L and out["lora_elements"] == lora == 19_988_480
    assert out["adapted_elements"] == adapted
    assert out["whole_model_elements"] == 6_738_415_616  # Llama-2-7B's parameter count
    for row in out["rows"]:
        w = row["world"]
        assert row["moment_bytes_unsharded"] == 8 * adapted
        # these shapes split evenly over 1, 2, 4, 8 ranks (96 large, 128 small layers)
        assert row["moment_bytes_max_rank"] == row["moment_bytes_min_rank"] == 8 * adapted // w
        assert row["opt_allreduce_bytes"] == (2 * lora if w > 1 else 0)
        assert row["ddp_lora_grad_bytes"] == 2 * lora
        assert row["ddp_full_ft_adapted_bytes"] == 2 * adapted
        assert math.isclose(row["opt_ring_bytes_per_rank"], 2 * (w - 1) / w * row["opt_allreduce_bytes"])
    assert "| 8 | 6.03 GiB | 48.25 GiB |" in sf.computed_table(out)
