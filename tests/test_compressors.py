"""Tests for ef_lightning.compressors against independent references: docs/algorithm.md §3 closed forms written out
here, float64 SVD / sorting references, and the contraction / unbiasedness definitions."""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ef_lightning.compressors import Message, Sign, build, pack_bits, unpack_bits

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
F = {torch.float32: 32, torch.bfloat16: 16, torch.float16: 16}
# relative slack on ‖x‖² for the rounding of the decompressed output (and of the sign scale / SVD factors)
TOL = {torch.float32: 1e-5, torch.bfloat16: 8 * 2.0**-8, torch.float16: 8 * 2.0**-11}
HYP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ALL_SPECS = ["identity", "top_k:0.1", "top_k:0.5", "top_k:3", "rand_k:0.2", "rand_k:0.2:unbiased", "natural", "sign",
             "rank:2", "qsgd:4", "qsgd:1", "bf16", "fp16", "top_k:0.05+natural", "top_k:0.3+bf16", "rank:2+natural",
             "rank:1+fp16", "rand_k:0.3:unbiased+natural", "top_k:0.5+qsgd:2", "top_k:0.5+rand_k:0.5+natural",
             "top_k:0.2+sign", "rand_k:0.5+fp16"]


def sq(t):
    return float(t.double().square().sum())


def ceil_log2(d):
    return 0 if d == 1 else math.ceil(math.log2(d))


@st.composite
def tensors(draw, min_ndim=0, max_ndim=4, dtypes=DTYPES):
    ndim = draw(st.integers(min_ndim, max_ndim))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    dtype = draw(st.sampled_from(dtypes))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    content = draw(st.sampled_from(["randn", "zeros", "sparse", "ties", "wide"]))
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if content == "zeros":
        x = torch.zeros(shape, dtype=torch.float64)
    elif content == "sparse":
        x = x * (torch.rand(shape, generator=g, dtype=torch.float64) < 0.2)
    elif content == "ties":
        x = torch.randint(-2, 3, shape, generator=g).double()
    elif content == "wide":  # magnitudes 1e-3 .. 1e3, inside fp16's normal range
        x = x.sign() * 10 ** (6 * torch.rand(shape, generator=g, dtype=torch.float64) - 3)
    x = x.to(dtype)
    if ndim and draw(st.booleans()):  # non-contiguous view with the same values
        x = torch.stack([x, torch.ones_like(x)], dim=-1)[..., 0]
    return x


# ---------------------------------------------------------------------------------------------------------------
# bit packing


@given(st.integers(0, 40), st.lists(st.integers(0, 2**40 - 1), max_size=50))
@settings(max_examples=50, deadline=None)
def test_pack_bits_matches_bitstring_reference(width, values):
    vals = [v % (1 << width) if width else 0 for v in values]
    stream = "".join(format(v, f"0{width}b")[::-1] if width else "" for v in vals)  # LSB first, value after value
    stream += "0" * (-len(stream) % 8)
    ref = [int(stream[i : i + 8][::-1], 2) for i in range(0, len(stream), 8)]
    packed = pack_bits(torch.tensor(vals, dtype=torch.int64), width)
    assert packed.dtype == torch.uint8 and packed.tolist() == ref
    assert unpack_bits(packed, width, len(vals)).tolist() == vals


def test_pack_bits_is_vectorised():
    import time

    v = torch.randint(0, 2**20, (1_000_000,))
    t = time.perf_counter()
    out = unpack_bits(pack_bits(v, 20), 20, v.numel())
    assert time.perf_counter() - t < 5.0
    assert torch.equal(out, v)


# ---------------------------------------------------------------------------------------------------------------
# contraction and unbiasedness


@pytest.mark.parametrize("spec", ["top_k:0.3", "top_k:2", "top_k:1", "sign", "bf16", "fp16", "top_k:0.5+bf16",
                                  "top_k:0.5+top_k:0.5", "top_k:0.5+sign"])
@HYP
@given(x=tensors())
def test_deterministic_contractive_bound(spec, x):
    c = build(spec)
    assert c.kind == "contractive"
    y = c.decompress(c.compress(x))
    assert y.shape == x.shape and y.dtype == x.dtype
    alpha = c.constant(x.shape)
    assert 0 < alpha <= 1
    assert sq(y - x) <= (1 - alpha) * sq(x) + TOL[x.dtype] * sq(x) + 1e-30


@HYP
@given(x=tensors())
def test_sign_error_equals_data_dependent_formula(x):
    c = build("sign")
    y = c.decompress(c.compress(x))
    d = x.numel()
    xd = x.double()
    assert math.isclose(Sign.alpha_for(x), float(xd.abs().sum()) ** 2 / (d * sq(x)) if sq(x) else 1.0)
    # ‖C(x) − x‖² = ‖x‖² − ‖x‖₁²/d with scale ‖x‖₁/d and sign(0) = +1
    assert math.isclose(sq(y - x), sq(x) - float(xd.abs().sum()) ** 2 / d, rel_tol=0, abs_tol=TOL[x.dtype] * sq(x))
    assert c.constant(x.shape) == 1 / d


@HYP
@given(x=tensors(min_ndim=2))
def test_rank_is_the_best_rank_r_approximation(x):
    for r in (1, 2):
        c = build(f"rank:{r}")
        y = c.decompress(c.compress(x))
        M = x.double().reshape(x.shape[0], -1).numpy()
        s = np.linalg.svd(M, compute_uv=False)
        tail = float((s[r:] ** 2).sum())  # Eckart–Young
        assert math.isclose(sq(y - x), tail, abs_tol=2 * TOL[x.dtype] * sq(x) + 1e-12)
        assert c.constant(x.shape) == min(r, *M.shape) / min(M.shape)
        assert tail <= (1 - c.constant(x.shape)) * sq(x) + 1e-9 * sq(x)


@HYP
@given(x=tensors(max_ndim=3), k=st.integers(1, 8))
def test_top_k_picks_the_k_largest(x, k):
    v = torch.randperm(x.numel(), generator=torch.Generator().manual_seed(k)).double() + 1  # distinct magnitudes
    x = (v * torch.where(torch.arange(x.numel()) % 2 == 0, 1.0, -1.0)).reshape(x.shape).to(torch.float32)
    c = build(f"top_k:{k}")  # k = 1 is the ratio 1 (K = d); k > 1 a count
    y = c.decompress(c.compress(x))
    K = min(k, x.numel()) if k > 1 else x.numel()
    flat = x.reshape(-1).tolist()
    ref = sorted(sorted(range(len(flat)), key=lambda i: -abs(flat[i]))[:K])
    assert y.reshape(-1).nonzero().squeeze(1).tolist() == ref
    assert torch.equal(y.reshape(-1)[ref], x.reshape(-1)[ref])
    assert ref == sorted(torch.topk(x.reshape(-1).abs(), K).indices.tolist())


@HYP
@given(x=tensors())
def test_sparsifiers_keep_exact_values(x):
    for spec in ("top_k:0.4", "rand_k:0.4"):
        c = build(spec)
        y = c.decompress(c.compress(x, seed=5))
        kept = y != 0
        assert torch.equal(y[kept], x[kept])
        # disjoint support: ‖C(x) − x‖² = ‖x‖² − ‖C(x)‖² exactly
        assert math.isclose(sq(y - x), sq(x) - sq(y), abs_tol=1e-9 * sq(x) + 1e-30)
        assert int(kept.sum()) <= c.layout(x.shape, x.dtype)[-1][0]


def _moments(spec, x, n_seeds):
    c = build(spec)
    ys = torch.stack([c.decompress(c.compress(x, seed=s)).double() for s in range(n_seeds)])
    return c, ys.mean(0), float((ys - x.double()).square().flatten(1).sum(1).mean())


@pytest.mark.parametrize("spec", ["natural", "qsgd:2", "qsgd:8", "rand_k:0.25:unbiased", "rand_k:0.5:unbiased+natural",
                                  "rand_k:0.5:unbiased+qsgd:4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unbiased_mean_and_variance(spec, dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 8, generator=g) * torch.rand(8, 8, generator=g) * 3).to(dtype)
    n = 600
    c, mean, mse = _moments(spec, x, n)
    assert c.kind == "unbiased"
    omega = c.constant(x.shape)
    # E‖mean − x‖² = E‖Q − x‖²/n ≤ ω‖x‖²/n; 6× slack (the seeds are fixed, so this is deterministic)
    rounding = TOL[dtype] * sq(x) if dtype != torch.float32 else 0.0  # bf16 output rounding of d/K scaling, levels
    assert sq(mean - x.double()) <= 6 * omega * sq(x) / n + rounding
    assert mse <= 1.25 * omega * sq(x) + rounding


@pytest.mark.parametrize("spec, alpha", [
    ("rand_k:0.25", 0.25),
    ("top_k:0.25+natural", 0.25 * 7 / 8),
    ("rank:2+natural", 2 / 6 * (1 - ((9 / 8) ** 2 - 1))),
    ("top_k:0.5+qsgd:2", None),
    ("rand_k:0.5+natural", 0.5 * 7 / 8),
])
def test_contractive_in_expectation(spec, alpha):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 10, generator=g)
    c, _, mse = _moments(spec, x, 400)
    assert c.kind == "contractive"
    if alpha is not None:
        assert math.isclose(c.constant(x.shape), alpha, rel_tol=1e-12)
    assert mse <= (1 - c.constant(x.shape)) * sq(x) * 1.02


def test_rand_k_expected_kept_fraction():
    x = torch.randn(200)
    c = build("rand_k:0.1")
    kept = [sq(c.decompress(c.compress(x, seed=s))) for s in range(300)]
    assert abs(np.mean(kept) / sq(x) - 0.1) < 0.02  # E‖C(x)‖² = (K/d)‖x‖²


def test_natural_rounds_to_neighbouring_powers_of_two():
    x = torch.tensor([0.0, 1.0, -1.0, 3.0, -0.3, 1e-3, 6e4, 1e-40, 2.0**127 * 1.5])
    for dtype in DTYPES:
        xd = x.to(dtype)
        y = build("natural").decompress(build("natural").compress(xd, seed=7)).float()
        assert y.dtype == torch.float32 and torch.isfinite(y).all()
        for a, b in zip(xd.float().tolist(), y.tolist()):
            if a == 0 or not math.isfinite(a):
                assert b == 0 or not math.isfinite(a)
                continue
            assert b == 0 or (math.copysign(1, a) == math.copysign(1, b) and math.log2(abs(b)).is_integer())
            e = math.floor(math.log2(abs(a)))
            tiny = {torch.float16: 2.0**-24}.get(dtype, 2.0**-126)
            top = {torch.float16: 2.0**15}.get(dtype, 2.0**127)
            assert abs(b) in {2.0**e, min(2.0 ** (e + 1), top)} or (abs(a) < tiny and abs(b) in {0.0, tiny})
    # powers of two are exact
    p = torch.tensor([0.25, -8.0, 1024.0])
    assert torch.equal(build("natural").decompress(build("natural").compress(p, seed=3)), p)


def test_qsgd_levels():
    x = torch.tensor([3.0, -4.0, 0.0])  # ‖x‖ = 5
    y = build("qsgd:5").decompress(build("qsgd:5").compress(x, seed=0))
    assert torch.allclose(y, x)  # |x_i|·s/‖x‖ is an integer: no randomness
    z = build("qsgd:1").decompress(build("qsgd:1").compress(torch.randn(100), seed=1))
    assert set(z.abs().unique().tolist()) <= {0.0, float(z.abs().max())}


# ---------------------------------------------------------------------------------------------------------------
# bits, bytes, layout


def _bits_ref(spec, shape, dtype):
    """docs/algorithm.md §3 closed forms, written out independently of the implementation."""
    d, f = math.prod(shape), F[dtype]
    L = ceil_log2(d)
    table = {
        "identity": f * d,
        "top_k:0.1": min(math.ceil(0.1 * d) * (f + L), f * math.ceil(0.1 * d) + d),
        "top_k:0.5": min(math.ceil(0.5 * d) * (f + L), f * math.ceil(0.5 * d) + d),
        "top_k:3": min(min(3, d) * (f + L), f * min(3, d) + d),
        "rand_k:0.2": f * math.ceil(0.2 * d),
        "rand_k:0.2:unbiased": f * math.ceil(0.2 * d),
        "natural": 9 * d,
        "sign": d + f,
        "qsgd:4": f + d * (1 + 3),
        "qsgd:1": f + d * (1 + 1),
        "bf16": 16 * d,
        "fp16": 16 * d,
    }
    K05, K3, K5 = math.ceil(0.05 * d), math.ceil(0.3 * d), math.ceil(0.5 * d)
    table["top_k:0.05+natural"] = min(K05 * L, d) + 9 * K05
    table["top_k:0.3+bf16"] = min(K3 * L, d) + 16 * K3
    table["top_k:0.5+qsgd:2"] = min(K5 * L, d) + f + K5 * (1 + 2)
    table["top_k:0.5+rand_k:0.5+natural"] = min(K5 * L, d) + 9 * math.ceil(0.5 * K5)
    table["top_k:0.2+sign"] = min(math.ceil(0.2 * d) * L, d) + math.ceil(0.2 * d) + f
    table["rand_k:0.3:unbiased+natural"] = 9 * K3
    table["rand_k:0.5+fp16"] = 16 * K5
    if len(shape) >= 2:
        m, n = shape[0], d // shape[0]
        table["rank:2"] = f * min(2, m, n) * (m + n)
        table["rank:2+natural"] = 9 * min(2, m, n) * (m + n)
        table["rank:1+fp16"] = 16 * (m + n)
    return table[spec]


SHAPES = [(1,), (7,), (64,), (1000,), (33, 17), (4, 3, 5), (2, 3, 4, 5), (300, 300)]


@pytest.mark.parametrize("spec", ALL_SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bits_match_closed_forms(spec, dtype):
    c = build(spec)
    for shape in SHAPES:
        if not c.supports(shape):
            assert spec.startswith("rank") and len(shape) < 2
            continue
        x = torch.randn(shape).to(dtype)
        msg = c.compress(x, seed=1)
        assert isinstance(msg, Message) and isinstance(msg.bits, int)
        assert msg.bits == c.bits(shape, dtype) == _bits_ref(spec, shape, dtype), (spec, shape)
        assert msg.nbytes == c.wire_nbytes(shape, dtype) == sum(t.numel() * t.element_size() for t in msg.payload)


def test_bits_worked_example():
    # top_k:0.05+natural on a 1024×768 fp32 matrix: K = 39322, ⌈log2 d⌉ = 20 → K·20 < d? no: bitmap (d bits)
    d = 1024 * 768
    K = math.ceil(0.05 * d)
    assert K == 39322 and K * 20 > d
    assert build("top_k:0.05+natural").bits((1024, 768), torch.float32) == d + 9 * K
    assert build("top_k:0.01").bits((1024, 768), torch.float32) == 7865 * (32 + 20)


@pytest.mark.parametrize("spec", ["top_k:0.01", "top_k:0.05", "top_k:0.1", "top_k:0.2", "natural", "sign", "rank:4",
                                  "rank:16", "rand_k:0.1", "rand_k:0.05:unbiased", "qsgd:4", "top_k:0.05+natural",
                                  "rank:4+natural", "top_k:0.1+bf16"])
@pytest.mark.parametrize("shape", [(256, 256), (65536,), (300, 331)])
def test_wire_bytes_close_to_theoretical(spec, shape):
    c = build(spec)
    if not c.supports(shape):
        return
    x = torch.randn(shape)
    msg = c.compress(x, seed=2)
    assert msg.nbytes <= 1.25 * msg.bits / 8
    assert msg.nbytes >= msg.bits / 8  # never below the closed form: the packing is real


def test_top_k_index_encoding_choice():
    c = build("top_k:0.5")  # d = 1000, K = 500, ⌈log2 d⌉ = 10: 5000 index bits > 1000-bit bitmap
    assert c.layout((1000,), torch.float32) == [(125, torch.uint8), (500, torch.float32)]
    c = build("top_k:0.01")  # K = 10: 100 index bits < 1000-bit bitmap
    assert c.layout((1000,), torch.float32) == [(13, torch.uint8), (10, torch.float32)]
    c = build("top_k:0.5")  # d = 1: zero-bit indices
    assert c.layout((1,), torch.float32) == [(0, torch.uint8), (1, torch.float32)]
    x = torch.tensor([2.5])
    assert torch.equal(c.decompress(c.compress(x)), x)


def test_ratio_is_exact_decimal():
    assert build("top_k:0.07").layout((100,), torch.float32)[-1][0] == 7  # float 0.07·100 would ceil to 8
    assert build("top_k:0.001").layout((1000,), torch.float32)[-1][0] == 1
    assert build("top_k:100").layout((10,), torch.float32)[-1][0] == 10


@pytest.mark.parametrize("spec", ALL_SPECS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_unpack_round_trip(spec, dtype):
    c = build(spec)
    shape = (12, 5) if spec.startswith("rank") else (60,)
    x = torch.randn(shape).to(dtype)
    msg = c.compress(x, seed=11)
    buf = c.pack(msg)
    assert buf.dtype == torch.uint8 and buf.dim() == 1
    assert buf.numel() == c.wire_nbytes(shape, dtype) == msg.nbytes
    ref = c.decompress(msg)
    assert ref.shape == x.shape and ref.dtype == x.dtype and ref.device == x.device
    assert torch.equal(c.decompress(c.unpack(buf, shape, dtype, seed=11)), ref)
    big = torch.cat([torch.zeros(3, dtype=torch.uint8), buf, torch.zeros(5, dtype=torch.uint8)])
    m2 = c.unpack(big[3 : 3 + buf.numel()], shape, dtype, seed=11)  # unaligned slice of a gathered buffer
    assert torch.equal(c.decompress(m2), ref) and m2.bits == msg.bits
    # layout is a function of shape and dtype only
    other = c.compress(torch.zeros(shape, dtype=dtype), seed=3)
    assert [(t.numel(), t.dtype) for t in other.payload] == c.layout(shape, dtype)
    assert [(t.numel(), t.dtype) for t in msg.payload] == c.layout(shape, dtype)
    assert all(t.is_contiguous() for t in msg.payload)


@pytest.mark.parametrize("spec", ["identity", "top_k:0.5", "rand_k:0.5", "natural", "sign", "qsgd:2", "bf16"])
def test_zero_dim_and_single_element(spec):
    c = build(spec)
    for x in (torch.tensor(-1.5), torch.tensor([0.75]), torch.tensor(0.0)):
        y = c.decompress(c.compress(x, seed=4))
        assert y.shape == x.shape and y.dtype == x.dtype
        assert c.bits(x.shape, x.dtype) == c.compress(x).bits
    assert not build("rank:1").supports(torch.Size([]))


# ---------------------------------------------------------------------------------------------------------------
# determinism, randomness, constants


@pytest.mark.parametrize("spec", ["rand_k:0.3", "natural", "qsgd:3", "top_k:0.2+natural", "rand_k:0.5:unbiased+natural"])
def test_seeded_and_global_rng_untouched(spec):
    c = build(spec)
    x = torch.randn(40, 9)
    state = torch.get_rng_state()
    a = c.decompress(c.compress(x, seed=123))
    b = c.decompress(c.compress(x, seed=123))
    other = c.decompress(c.compress(x, seed=124))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
    assert not torch.equal(a, other)


def test_inner_seed_differs_from_outer_seed():
    # top_k:1 keeps every entry, so with a shared seed top_k:1+natural would equal natural draw for draw
    x = torch.randn(500) * 3
    a, b = build("top_k:1+natural"), build("natural")
    assert not torch.equal(a.decompress(a.compress(x, seed=9)), b.decompress(b.compress(x, seed=9)))
    r = build("rank:1+natural")  # P and Q get different seeds too: for u u^T with ‖u‖ = 1, P = ±Q = ±u
    u = torch.randn(50, dtype=torch.float64)
    u = (u / u.norm()).float()
    msg = r.compress(torch.outer(u, u), seed=9)
    P, Q = (unpack_bits(t, 9, 50) for t in msg.payload)
    assert not torch.equal(P & 255, Q & 255)  # exponents: identical draws would round both the same way


def test_constants():
    d = 1000
    assert build("identity").kind == "identity" and build("identity").constant((d,)) == 1.0
    assert build("top_k:0.05+natural").constant((d,)) == pytest.approx(7 * 50 / (8 * d))  # docs/algorithm.md §3
    assert build("top_k:0.05").constant((d,)) == 50 / d
    assert build("rand_k:0.1:unbiased").constant((d,)) == pytest.approx(d / 100 - 1)
    assert build("rand_k:0.1").constant((d,)) == 100 / d
    assert build("natural").constant((d,)) == 1 / 8
    assert build("qsgd:4").constant((d,)) == pytest.approx(min(d / 16, math.sqrt(d) / 4))
    assert build("qsgd:64").constant((d,)) == pytest.approx(d / 64**2)
    assert build("bf16").constant((d,)) == 1 - 2.0**-16
    assert build("fp16").constant((d,)) == 1 - 2.0**-22
    assert build("top_k:0.1+bf16").constant((d,)) == pytest.approx(0.1 * (1 - 2.0**-16))
    assert build("rank:4").constant((20, 3, 5)) == 4 / 15
    assert build("rank:40").constant((20, 30)) == 1.0
    # unbiased + unbiased: ω = (ω_a + 1)(ω_b + 1) − 1
    assert build("rand_k:0.1:unbiased+natural").constant((d,)) == pytest.approx(10 * 9 / 8 - 1)
    # contractive + unbiased with ω ≥ 1: inner scaled by 1/(ω+1), α = α_a/(ω+1)
    w = min(500 / 4, math.sqrt(500) / 2)
    assert build("top_k:0.5+qsgd:2").constant((d,)) == pytest.approx(0.5 / (1 + w))
    assert build("top_k:0.5+qsgd:2").kind == "contractive"
    assert build("rand_k:0.1:unbiased+natural").kind == "unbiased"


def test_canonical_spec():
    assert build("top_k:0.050").spec == "top_k:0.05"
    assert build(" top_k:1.0 ").spec == "top_k:1"
    assert build("top_k:100.0+natural").spec == "top_k:100+natural"
    assert build("rand_k:0.1:unbiased").spec == "rand_k:0.1:unbiased"
    assert build("top_k:0.1+identity").spec == "top_k:0.1"
    assert build("identity+identity").spec == "identity"
    for spec in ALL_SPECS:
        assert build(build(spec).spec).spec == build(spec).spec
    c = build("sign")
    assert build(c) is c


# ---------------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("spec, needles", [
    ("topk:0.1", ["'topk'", "top_k"]),
    ("top_k:0", ["'0'", "top_k:0.05"]),
    ("top_k:-0.5", ["'-0.5'", "top_k:0.05"]),
    ("top_k:", ["'top_k:'", "top_k:0.05"]),
    ("top_k", ["'top_k'", "top_k:0.05"]),
    ("top_k:abc", ["'abc'", "top_k:0.05"]),
    ("top_k:nan", ["'nan'", "top_k:0.05"]),
    ("+natural", ["'+natural'", "top_k:0.05+natural"]),
    ("top_k:0.1+", ["'top_k:0.1+'", "top_k:0.05+natural"]),
    ("top_k:0.1:foo", ["'foo'", "none"]),
    ("rand_k:0.1:foo", ["'foo'", "unbiased"]),
    ("top_k:2.5", ["'2.5'", "top_k:2"]),
    ("rand_k:1.5", ["'1.5'", "rand_k:1"]),
    ("rank:0.5", ["'0.5'", "rank:4"]),
    ("qsgd:0", ["'0'", "qsgd:4"]),
    ("natural:3", ["'natural:3'", "'natural'"]),
    ("natural+top_k:0.1", ["'natural'", "top_k:0.05+natural"]),
    ("sign+natural", ["'sign'", "top_k"]),
    ("top_k:0.1+rank:2", ["'rank:2'", "rank:4+bf16"]),
    ("rank:2+top_k:0.1", ["'top_k:0.1'", "natural"]),
    ("rand_k:0.1:unbiased+top_k:0.5", ["'top_k:0.5'", "natural"]),
])
def test_bad_specs(spec, needles):
    with pytest.raises(ValueError) as e:
        build(spec)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_bad_inputs():
    with pytest.raises(TypeError):
        build(0.1)
    with pytest.raises(TypeError):
        build(None)
    c = build("top_k:0.1")
    with pytest.raises(TypeError):
        c.compress(np.zeros(4, dtype=np.float32))
    with pytest.raises(TypeError):
        c.compress(torch.arange(10))
    with pytest.raises(ValueError) as e:
        build("rank:4").compress(torch.randn(10))
    assert "rank:4" in str(e.value) and "(10,)" in str(e.value) and "'identity'" in str(e.value)
    assert not build("rank:4").supports((10,)) and build("rank:4").supports((10, 2))
    with pytest.raises(ValueError):
        build("rank:4+bf16").layout((10,), torch.float32)
    with pytest.raises(ValueError):
        c.unpack(torch.zeros(3, dtype=torch.uint8), (100,), torch.float32)
    with pytest.raises(ValueError):
        c.compress(torch.zeros(0, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("spec", ALL_SPECS)
def test_cuda_round_trip(spec):
    c = build(spec)
    x = torch.randn(64, 48, device="cuda", dtype=torch.bfloat16)
    msg = c.compress(x, seed=3)
    assert all(t.device == x.device for t in msg.payload)
    y = c.decompress(msg)
    assert y.device == x.device and y.dtype == x.dtype and y.shape == x.shape
    buf = c.pack(msg)
    assert buf.numel() == c.wire_nbytes(x.shape, x.dtype)
    assert torch.equal(c.decompress(c.unpack(buf, x.shape, x.dtype, seed=3)), y)
    if c.kind != "unbiased" and not spec.startswith("rand"):  # deterministic: same as on the CPU
        torch.testing.assert_close(y.cpu().float(), c.decompress(c.compress(x.cpu(), seed=3)).float(),
                                   atol=0.05, rtol=0.02)
