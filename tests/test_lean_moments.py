"""The lean moment storages: first and second moment chosen independently, 8-bit codes, the separable Adafactor.

- With float32/float64 storage every combination of first moment (kept or none) and second moment (full or
  factored) follows a dense float64 transcription written here (form ``G``, update the moments, divide, project
  back), and ``"adafactor"`` (no first moment, factored second, epsilon inside the square, RMS clipping) does
  too, to 1e-10, although it never forms ``G``.
- The 8-bit code is bitsandbytes' dynamic map, value for value; a block of rows quantizes on its own and
  decodes within half a code step of the truth.
- Each preset resumes exactly from its state dict, and its state has the size it claims.
- ``"adafactor"``'s step allocates nothing of size m x n.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from reference import ref_adjust

import lorapro
from lorapro.moments import QUANT_BLOCK, STORAGES, dynamic_map, storage

STEPS = 5
SHAPES = [(7, 5), (12, 9), (12, 9), (30, 17)]  # two layers of one shape: a bucket of two
R = 3


def _pairs(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (m, n) in enumerate(SHAPES):
        A = torch.nn.Parameter(torch.randn(R, n, generator=g, dtype=dtype) / n**0.5)
        B = torch.nn.Parameter(torch.randn(m, R, generator=g, dtype=dtype) / m**0.5)
        out.append(lorapro.LoRAPair(A, B, 0.5 + i, name=f"layer{i}"))
    return out


def _grads(pairs, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in pairs:
        p.A.grad = torch.randn(p.A.shape, generator=g, dtype=p.A.dtype)
        p.B.grad = torch.randn(p.B.shape, generator=g, dtype=p.B.dtype)


class DenseReference:
    """Algorithm 2 with the given first / second moment, per layer, in float64, with every m x n tensor formed."""

    def __init__(self, first: bool, second: str, *, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, wd=0.01, x_mode="sylvester",
                 momentum_rank: int | None = None):
        self.first, self.second, self.momentum_rank = first, second, momentum_rank
        self.lr, self.betas, self.eps, self.wd, self.x_mode = lr, betas, eps, wd, x_mode
        self.state: dict[int, dict[str, torch.Tensor]] = {}
        self.t = 0

    @torch.no_grad()
    def step(self, pairs) -> None:
        self.t += 1
        t, (b1, b2) = self.t, self.betas
        for i, p in enumerate(pairs):
            A, B, s = p.A.detach().clone(), p.B.detach().clone(), p.scale
            a0, b0 = ref_adjust(A, B, p.A.grad, p.B.grad, s, "zero")
            G = s * B @ a0 + s * b0 @ A
            m, n = G.shape
            st = self.state.setdefault(i, {"M": torch.zeros_like(G), "V": torch.zeros_like(G),
                                           "R": torch.zeros(m, dtype=G.dtype), "C": torch.zeros(n, dtype=G.dtype)})
            num = G
            if self.first:
                st["M"] = b1 * st["M"] + (1 - b1) * G
                if self.momentum_rank is not None:  # its best rank-k approximation
                    u, sv, vh = torch.linalg.svd(st["M"], full_matrices=False)
                    k = self.momentum_rank
                    st["M"] = (u[:, :k] * sv[:k]) @ vh[:k]
                num = st["M"] / (1 - b1**t)
            if self.second == "full":
                st["V"] = b2 * st["V"] + (1 - b2) * G * G
                V = st["V"]
            else:
                eps1 = 1e-30 if self.second == "adafactor" else 0.0
                st["R"] = b2 * st["R"] + (1 - b2) * (G * G + eps1).mean(dim=1)
                st["C"] = b2 * st["C"] + (1 - b2) * (G * G + eps1).mean(dim=0)
                V = torch.outer(st["R"], st["C"]) / st["R"].mean()
            if self.second == "adafactor":  # epsilon inside, update clipped to RMS 1
                U = num / torch.sqrt(V / (1 - b2**t))
                U = U / max(1.0, float(U.square().mean().sqrt()))
            else:
                U = num / (torch.sqrt(V / (1 - b2**t)) + self.eps)
            a, b = ref_adjust(A, B, s * B.T @ U, s * U @ A.T, s, self.x_mode)
            p.A.copy_(A * (1 - self.lr * self.wd) - self.lr * a)
            p.B.copy_(B * (1 - self.lr * self.wd) - self.lr * b)


@pytest.mark.parametrize(
    "moments, first, second",
    [("fp32-fp32", True, "full"), ("none-fp32", False, "full"), ("fp32-factored", True, "factored"),
     ("none-fp32", False, "full"), ("adafactor", False, "adafactor"), ("lowrank-factored", True, "adafactor")],
)
@pytest.mark.parametrize("x_mode", ["sylvester", "zero"])
def test_float64_storage_follows_the_dense_transcription(moments, first, second, x_mode):
    """Every storage against :class:`DenseReference`; ``lowrank-factored`` keeps the first moment at rank 2r
    (truncated by an SVD of the dense m x n moment there), which layers of min(m, n) > 2r actually truncate."""
    ours, theirs = _pairs(), _pairs()
    opt = lorapro.LoRAProAdamW(ours, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01, moments=moments, x_mode=x_mode)
    ref = DenseReference(first, second, x_mode=x_mode, momentum_rank=2 * R if moments == "lowrank-factored" else None)
    for step in range(STEPS):
        _grads(ours, step)
        _grads(theirs, step)
        opt.step()
        ref.step(theirs)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.A, q.A, rtol=0, atol=1e-10)
        torch.testing.assert_close(p.B, q.B, rtol=0, atol=1e-10)


def test_adafactor_clipping_is_what_keeps_a_spike_bounded():
    """One gradient 1e6 times the others right after the statistics have settled: the clipped update's RMS is at
    most 1, so the factors move by at most about lr per step (the dense transcription agrees, above)."""
    pairs = _pairs()
    opt = lorapro.LoRAProAdamW(pairs, lr=1e-3, moments="adafactor", x_mode="zero")
    for step in range(3):
        _grads(pairs, step)
        opt.step()
    before = [p.delta_weight() for p in pairs]
    _grads(pairs, 3)
    pairs[0].B.grad.mul_(1e6)
    opt.step()
    after = [p.delta_weight() for p in pairs]
    for (m, n), x, y in zip(SHAPES, before, after):
        assert (y - x).square().mean().sqrt() < 0.1, "a clipped step moves W by O(lr)"


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_is_bitsandbytes(signed):
    F = pytest.importorskip("bitsandbytes.functional")
    ours = dynamic_map(signed)
    assert ours.shape == (256,) and torch.all(ours[1:] >= ours[:-1])
    assert torch.equal(ours, F.create_dynamic_map(signed=signed))


@pytest.mark.parametrize("n", [QUANT_BLOCK * 2, 300, 7])
@pytest.mark.parametrize("signed", [True, False])
def test_int8_blocks_decode_within_half_a_code_step(n, signed):
    codec = storage("int8-int8").first if signed else storage("int8-int8").second
    m = 5
    x = torch.randn(m, n, dtype=torch.float32) * torch.logspace(-6, 0, n)  # magnitudes over six decades
    x = x if signed else x.abs()
    state = codec.init("v", m, n, torch.float32, x.device)
    ws = STORAGES["int8"].workspace(m, n, torch.float32, x.device)
    codec.store(state, "v", 0, m, x.clone(), ws)
    y = codec.load(state, "v", 0, m, torch.empty(m, n))
    values = dynamic_map(signed)
    # the coarsest rounding of the code, relative to a block's absmax: half its widest gap, or (signed) the
    # distance from -1 to its lowest value (the code has 1.0 but not -1.0, as bitsandbytes')
    worst = max(0.5 * float(torch.diff(values).max()), 1.0 + float(values[0]))
    for r0 in range(m):
        for c0 in range(0, n, QUANT_BLOCK):
            blk = slice(c0, min(n, c0 + QUANT_BLOCK))
            absmax = x[r0, blk].abs().max()
            assert (y[r0, blk] - x[r0, blk]).abs().max() <= worst * absmax * (1 + 1e-5)
            small = x[r0, blk].abs() < 1e-3 * absmax  # and small entries keep their relative precision
            assert ((y[r0, blk] - x[r0, blk]).abs()[small] <= 0.1 * absmax * 1e-3).all()
    # a block of rows quantizes on its own: storing rows 2..4 leaves rows 0..1 as they were
    again = codec.load(state, "v", 0, 2, torch.empty(2, n)).clone()
    codec.store(state, "v", 2, 5, (x[2:5] * 3).clone(), ws)
    assert torch.equal(codec.load(state, "v", 0, 2, torch.empty(2, n)), again)


@pytest.mark.parametrize("signed", [True, False])
def test_int8_lookup_encoder_is_the_nearest_code(signed):
    """The float32 encoder (a lookup on the float's top bits and one compare) returns what a binary search over
    the rounding boundaries returns, float64's path: on every boundary, the floats either side of it, and
    random magnitudes over all decades, of both signs."""
    codec = storage("int8-int8").first if signed else storage("int8-int8").second
    values = dynamic_map(signed)
    mids = (values[:-1] + values[1:]) / 2
    probes = torch.cat([
        mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0)), values,
        torch.rand(20_000) * torch.logspace(-12, 0, 20_000), torch.tensor([0.0, -0.0, 1e-38, 1e-45]),
    ])
    probes = (probes if not signed else torch.cat([probes, -probes])).clamp(-1.0, 1.0)
    if not signed:
        probes = probes.abs()
    n = QUANT_BLOCK
    rows = -(-probes.numel() // (n - 1))
    x = torch.zeros(rows * (n - 1))
    x[: probes.numel()] = probes
    x = torch.cat([x.view(rows, n - 1), torch.ones(rows, 1)], dim=1)  # absmax 1: the codec sees x itself
    state = codec.init("v", rows, n, torch.float32, x.device)
    codec.store(state, "v", 0, rows, x.clone(), STORAGES["int8"].workspace(rows, n, torch.float32, x.device))
    expected = torch.bucketize(x, mids)
    assert torch.equal(state["v"].long(), expected)


def test_int8_codes_are_bitsandbytes_blockwise_codes():
    """Where the layouts agree (rows a multiple of the block), the codes and absmax are bitsandbytes' own."""
    F = pytest.importorskip("bitsandbytes.functional")
    x = torch.randn(4, 2 * QUANT_BLOCK)
    codec = storage("int8-int8").first
    state = codec.init("m", 4, x.shape[1], torch.float32, x.device)
    codec.store(state, "m", 0, 4, x.clone(), STORAGES["int8"].workspace(4, x.shape[1], torch.float32, x.device))
    codes, qs = F.quantize_blockwise(x, blocksize=QUANT_BLOCK)
    assert torch.equal(state["m_absmax"].reshape(-1), qs.absmax)
    agree = (state["m"] == codes).float().mean()
    assert agree > 0.999, agree  # (ties at a midpoint may round either way)


@pytest.mark.parametrize(
    "moments", ["int8-factored", "int8", "bf16-factored", "adafactor", "lowrank-factored", "none-int8", "int8-bf16"]
)
def test_presets_resume_exactly_and_have_the_size_they_claim(moments):
    torch.manual_seed(0)
    pairs = _pairs(torch.float32)
    opt = lorapro.LoRAProAdamW(pairs, lr=1e-2, moments=moments)
    for step in range(3):
        _grads(pairs, step)
        opt.step()
    saved = {"opt": copy.deepcopy(opt.state_dict()), "params": [t.detach().clone() for p in pairs for t in (p.A, p.B)]}
    rng = torch.get_rng_state()
    for step in range(3, 5):
        _grads(pairs, step)
        opt.step()
    straight = [t.detach().clone() for p in pairs for t in (p.A, p.B)]

    resumed = _pairs(torch.float32)
    with torch.no_grad():
        for t, v in zip([t for p in resumed for t in (p.A, p.B)], saved["params"]):
            t.copy_(v)
    opt2 = lorapro.LoRAProAdamW(resumed, lr=1e-2, moments=moments)
    opt2.load_state_dict(saved["opt"])
    torch.set_rng_state(rng)
    for step in range(3, 5):
        _grads(resumed, step)
        opt2.step()
    assert all(torch.equal(a, b) for a, b in zip(straight, [t for p in resumed for t in (p.A, p.B)]))

    store = storage(moments)
    for p in pairs:
        m, n = p.shape
        held = {k: v for k, v in opt.state[p.B].items() if k != "step"}
        assert {k: tuple(v.shape) for k, v in held.items()} == store.state_shapes(m, n, rank=R)
        nbytes = sum(v.numel() * v.element_size() for v in held.values())
        low_rank = 4 * 2 * R * (m + n) if moments == "lowrank-factored" else 0  # the rank-2r first moment
        assert nbytes <= store.bytes_per_element() * m * n + 4 * (m + n) + 4 * m * math.ceil(n / QUANT_BLOCK) + low_rank


def test_int8_factored_tracks_the_full_moments():
    """About 1 byte per element instead of 8, and the same training: over 20 steps of the same gradients the
    factors stay within a few percent of the full moments' (the 8-bit code's error is relative, ~1%)."""
    runs = {}
    for moments in ("full", "int8-factored", "fp32-factored"):
        pairs = _pairs(torch.float32)
        opt = lorapro.LoRAProAdamW(pairs, lr=1e-3, moments=moments)
        for step in range(20):
            _grads(pairs, step)
            opt.step()
        runs[moments] = torch.cat([p.delta_weight().reshape(-1) for p in pairs])
    start = torch.cat([p.delta_weight().reshape(-1) for p in _pairs(torch.float32)])
    moved = (runs["fp32-factored"] - start).norm()
    assert (runs["int8-factored"] - runs["fp32-factored"]).norm() < 0.05 * moved
    assert (runs["fp32-factored"] - runs["full"]).norm() < 0.5 * moved  # (factoring V is the larger change)


@pytest.mark.parametrize("moments, bound", [("adafactor", 12), ("lowrank-factored", 24)])
def test_separable_presets_allocate_nothing_m_by_n(moments, bound):
    """The step's working memory (the allocator's peak while it runs, beyond what existed before, and the scratch
    it keeps between steps) is a small multiple of the r-sized stacks, r (m + n) per layer (measured about 9.5x
    for ``adafactor``, 8 of them the kept scratch: the stacked factors and gradients and the products'
    temporaries; about 15.5x for ``lowrank-factored``, 12 kept, which adds the rank-4r candidate it truncates),
    at every size: nothing grows with m x n."""
    from lorapro._state import optimizer_scratch_bytes
    from lorapro.cli.bench import peak_extra_bytes

    r, layers = 8, 2
    for m in (512, 4096):
        g = torch.Generator().manual_seed(0)
        pairs = []
        for _ in range(layers):
            A = torch.nn.Parameter(torch.randn(r, m, generator=g) / m**0.5)
            B = torch.nn.Parameter(torch.randn(m, r, generator=g) / m**0.5)
            A.grad, B.grad = torch.randn(A.shape, generator=g), torch.randn(B.shape, generator=g)
            pairs.append((A, B, 2.0))
        opt = lorapro.LoRAProAdamW(pairs, lr=1e-4, moments=moments)
        opt.step()  # state made
        peak = peak_extra_bytes(opt.step, torch.device("cpu")) + optimizer_scratch_bytes(opt)
        stacks = 4 * r * (m + m) * layers
        assert peak <= bound * stacks, (m, peak, stacks)
    assert peak < 4 * m * m / 8  # at m = 4096: under an eighth of one m x n float32 matrix


@pytest.mark.parametrize("moments", ["adafactor", "lowrank-factored"])
def test_separable_buckets_are_sized_by_their_scratch(moments):
    """A separable preset's buckets hold as many layers as fit 2^24 numbers of scratch (its step has a fixed cost
    per bucket and no m x n tensor to bound it), not the m x n presets' half matrix of stacks."""
    from lorapro._buckets import _SEPARABLE_SCRATCH_ELEMENTS, bucket_pairs, separable_scratch_numel
    from lorapro._params import resolve_params

    r, m = 16, 2048
    layers = [(torch.empty(r, m, device="meta"), torch.empty(m, r, device="meta"), 1.0) for _ in range(40)]
    _, pairs = resolve_params(layers)
    plain = bucket_pairs(pairs)
    lean = bucket_pairs(pairs, storage(moments))
    per_layer = separable_scratch_numel(pairs[:1], storage(moments))
    assert [len(b) for b in plain] == [4] * 10  # the m x n rule: stacks within half an m x n matrix
    size = _SEPARABLE_SCRATCH_ELEMENTS // per_layer
    assert size > 4 and [len(b) for b in lean] == [size] * (40 // size) + ([40 % size] if 40 % size else [])
    assert max(separable_scratch_numel(b, storage(moments)) for b in lean) <= _SEPARABLE_SCRATCH_ELEMENTS
    assert [p for b in lean for p in b] == pairs
