"""LMO directions, dual norms and Newton–Schulz against independent references (SVD, direct formulas, torch.optim.Muon)."""

import math

import pytest
import torch
from torch.optim._muon import _zeropower_via_newtonschulz as torch_ns

from ef_lightning import lmo

A, B, C = 3.4445, -4.7750, 2.0315
SHAPES = [(24, 16), (16, 24), (20, 20), (48, 7)]
EXACT = ["sign", "col_norm", "row_norm", "bias_rms"]




def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def svd_polar(G):
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return U @ Vh


def well_conditioned(m, n, seed=0):
    """U diag(s) Vᵀ with s in [0.5, 1]: every σ ≥ 0.5/‖G‖_F·… well above NS's ~0.003·‖G‖_F threshold."""
    k = min(m, n)
    U, _ = torch.linalg.qr(randn(m, k, seed=seed))
    V, _ = torch.linalg.qr(randn(n, k, seed=seed + 1))
    s = torch.linspace(0.5, 1.0, k, dtype=torch.float64)
    return U @ torch.diag(s) @ V.T


# ---------------------------------------------------------------- Newton–Schulz


@pytest.mark.parametrize("shape", SHAPES)
def test_newton_schulz_is_the_quintic_applied_to_singular_values(shape):
    # Independent reference: NS acts on singular values only, σ ↦ p⁵(σ/‖G‖_F) with p(x) = a x + b x³ + c x⁵.
    G = randn(*shape)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    s = S / torch.linalg.norm(G)
    for _ in range(5):
        s = A * s + B * s**3 + C * s**5
    ref = U @ torch.diag(s) @ Vh
    out = lmo.newton_schulz(G, 5, torch.float64)
    assert out.dtype == torch.float64 and out.shape == G.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
def test_newton_schulz_bf16_is_bitwise_torch_muon(shape):
    G = randn(*shape, dtype=torch.float32)
    assert torch.equal(lmo.newton_schulz(G, 5, torch.bfloat16), torch_ns(G, (A, B, C), 5, 1e-7))


def test_newton_schulz_does_not_modify_a_bf16_input():
    G = randn(16, 8, dtype=torch.bfloat16)
    before = G.clone()
    lmo.newton_schulz(G, 5, torch.bfloat16)
    assert torch.equal(G, before)


@pytest.mark.parametrize("shape", SHAPES)
def test_newton_schulz_singular_values_in_band(shape):
    # After 5 quintic steps σ' ∈ [0.68, 1.14] for σ ≳ 0.003‖G‖_F (scalar map's range; Keller Jordan 2024).
    S = torch.linalg.svdvals(lmo.newton_schulz(well_conditioned(*shape), 5, torch.float64))
    assert S.min() > 0.68 and S.max() < 1.14
    # ... and it approximates the polar factor UVᵀ to within that band.
    assert torch.linalg.matrix_norm(lmo.newton_schulz(well_conditioned(*shape), 5, torch.float64)
                                    - svd_polar(well_conditioned(*shape)), ord=2) < 0.33


def test_newton_schulz_zero_matrix_is_finite():
    assert torch.equal(lmo.newton_schulz(torch.zeros(4, 3), 5, torch.float32), torch.zeros(4, 3))


def test_newton_schulz_rejects_non_matrix():
    with pytest.raises(ValueError, match="2-D"):
        lmo.newton_schulz(torch.zeros(2, 3, 4), 5)


def test_default_ns_dtype_is_float32_on_cpu():
    G = randn(12, 8, dtype=torch.float32)
    assert torch.equal(lmo.direction("spectral", G), math.sqrt(12 / 8) * lmo.newton_schulz(G, 5, torch.float32))
    assert lmo.default_ns_dtype(torch.device("cpu")) == torch.float32
    assert lmo.default_ns_dtype(torch.device("cuda")) == torch.bfloat16


# ---------------------------------------------------------------- directions


@pytest.mark.parametrize("shape", SHAPES)
def test_spectral_directions_are_scaled_newton_schulz(shape):
    G = randn(*shape)
    d_out, d_in = shape
    NS = lmo.newton_schulz(G, 5, torch.float64)
    kw = dict(ns_dtype=torch.float64)
    torch.testing.assert_close(lmo.direction("spectral", G, **kw), math.sqrt(d_out / d_in) * NS, rtol=0, atol=1e-12)
    torch.testing.assert_close(lmo.direction("spectral_muon", G, **kw), math.sqrt(max(1, d_out / d_in)) * NS,
                               rtol=0, atol=1e-12)


def test_spectral_conv_direction():
    G = randn(6, 4, 3, 3)
    ref = lmo.newton_schulz(G.reshape(6, 36), 5, torch.float64).reshape(G.shape) * math.sqrt(6 / 4) / 9
    torch.testing.assert_close(lmo.direction("spectral_conv", G, ns_dtype=torch.float64), ref, rtol=0, atol=1e-12)
    G1 = randn(6, 4, 5)  # Conv1d: / k (Scion SpectralConv)
    ref1 = lmo.newton_schulz(G1.reshape(6, 20), 5, torch.float64).reshape(G1.shape) * math.sqrt(6 / 4) / 5
    torch.testing.assert_close(lmo.direction("spectral_conv", G1, ns_dtype=torch.float64), ref1, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_exact_directions_match_direct_formulas(shape):
    G = randn(*shape)
    d_out, d_in = shape
    torch.testing.assert_close(lmo.direction("sign", G), torch.sign(G) / d_in)
    col = torch.stack([math.sqrt(d_out) * G[:, j] / G[:, j].norm() for j in range(d_in)], dim=1)
    torch.testing.assert_close(lmo.direction("col_norm", G), col)
    row = torch.stack([G[i] / (math.sqrt(d_in) * G[i].norm()) for i in range(d_out)])
    torch.testing.assert_close(lmo.direction("row_norm", G), row)
    g = G.flatten()
    torch.testing.assert_close(lmo.direction("bias_rms", g), g / g.pow(2).mean().sqrt())


@pytest.mark.parametrize("name", EXACT)
@pytest.mark.parametrize("shape", SHAPES)
def test_exact_directions_attain_the_dual_norm(name, shape):
    G = randn(*shape, seed=3)
    if name == "bias_rms":
        G = G.flatten()
    # rtol 1e-7: the directions divide by (norm + 1e-8), Scion's eps guard.
    assert torch.isclose(torch.sum(G * lmo.direction(name, G)), lmo.dual_norm(name, G), rtol=1e-7)


# Primal norms (independent of lmo.py) whose unit-ball LMO the directions are; d(G) must lie on their unit sphere and
# ⟨G, Z⟩ ≤ ‖G‖_* for every Z in the ball (Hölder), so dual_norm is the max.
PRIMAL = {
    "sign": lambda Z: Z.shape[1] * Z.abs().max(),
    "col_norm": lambda Z: (Z.norm(dim=0) / math.sqrt(Z.shape[0])).max(),
    "row_norm": lambda Z: (math.sqrt(Z.shape[1]) * Z.norm(dim=1)).max(),
    "spectral": lambda Z: math.sqrt(Z.shape[1] / Z.shape[0]) * torch.linalg.matrix_norm(Z, ord=2),
}


@pytest.mark.parametrize("name", list(PRIMAL))
def test_dual_norm_is_the_max_over_the_unit_ball(name):
    G = randn(12, 7, seed=5)
    norm = PRIMAL[name]
    best = svd_polar(G) * math.sqrt(12 / 7) if name == "spectral" else lmo.direction(name, G)
    assert torch.isclose(norm(best), torch.tensor(1.0, dtype=torch.float64))
    dual = lmo.dual_norm(name, G)
    assert torch.isclose(torch.sum(G * best), dual, rtol=1e-7)  # eps guard, as above
    for seed in range(20):
        Z = randn(12, 7, seed=100 + seed)
        assert torch.sum(G * Z / norm(Z)) <= dual * (1 + 1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_spectral_dual_norm_with_exact_polar_factor(shape):
    # ⟨G, sqrt(d_out/d_in)·UVᵀ⟩ = sqrt(d_out/d_in)·‖G‖_nuclear (not sqrt(d_in/d_out): see lmo's module docstring).
    G = randn(*shape)
    d_out, d_in = shape
    inner = torch.sum(G * math.sqrt(d_out / d_in) * svd_polar(G))
    assert torch.isclose(inner, lmo.dual_norm("spectral", G), rtol=1e-12)
    assert torch.isclose(inner, math.sqrt(d_out / d_in) * torch.linalg.svdvals(G).sum(), rtol=1e-12)
    # With Newton–Schulz, ⟨G, d(G)⟩ is within the singular-value band of the exact dual norm.
    W = well_conditioned(*shape)
    ratio = torch.sum(W * lmo.direction("spectral", W, ns_dtype=torch.float64)) / lmo.dual_norm("spectral", W)
    assert 0.68 < ratio < 1.14


def test_transpose_computes_on_the_transposed_orientation():
    G = randn(10, 6)  # stored (d_in, d_out)
    for name in ["spectral", "spectral_muon", "sign", "col_norm", "row_norm"]:
        torch.testing.assert_close(lmo.direction(name, G, transpose=True, ns_dtype=torch.float64),
                                   lmo.direction(name, G.T, ns_dtype=torch.float64).T)
        torch.testing.assert_close(lmo.dual_norm(name, G, transpose=True), lmo.dual_norm(name, G.T))


def test_embedding_col_norm_normalises_each_embedding_vector():
    E = randn(50, 8)  # nn.Embedding.weight: (vocab, dim), one embedding vector per row
    d = lmo.direction("col_norm", E, transpose=True)
    torch.testing.assert_close(d.pow(2).mean(dim=1), torch.ones(50, dtype=torch.float64))
    torch.testing.assert_close(d, E / E.pow(2).mean(dim=1, keepdim=True).sqrt())


def test_vectors_are_columns():
    g = randn(9)
    torch.testing.assert_close(lmo.direction("col_norm", g), lmo.direction("bias_rms", g))
    s = 1.0  # a (9, 1) column has one singular value, σ/‖g‖_F = 1, which NS maps to p⁵(1), not exactly 1
    for _ in range(5):
        s = A * s + B * s**3 + C * s**5
    torch.testing.assert_close(lmo.direction("spectral", g, ns_dtype=torch.float64), s * lmo.direction("bias_rms", g))
    torch.testing.assert_close(lmo.direction("sign", g), torch.sign(g))


@pytest.mark.parametrize("name", lmo.NORMS)
def test_zero_gradient_gives_finite_direction(name):
    G = torch.zeros(4, 3, 3, 3) if name == "spectral_conv" else torch.zeros(5, 3)
    d = lmo.direction(name, G)
    assert torch.isfinite(d).all() and d.shape == G.shape and d.dtype == G.dtype


def test_direction_keeps_dtype_with_bf16_newton_schulz():
    G = randn(8, 4, dtype=torch.float32)
    d = lmo.direction("spectral_muon", G, ns_dtype="bfloat16")
    assert d.dtype == torch.float32
    assert torch.equal(d, torch_ns(G, (A, B, C), 5, 1e-7).float() * math.sqrt(2))


def test_unknown_norm_and_dtype_raise():
    with pytest.raises(ValueError, match=r"'spectrall'.*spectral_muon"):
        lmo.direction("spectrall", torch.zeros(2, 2))
    with pytest.raises(ValueError, match="nuclear"):
        lmo.dual_norm("nuclear", torch.zeros(2, 2))
    with pytest.raises(ValueError, match="ns_dtype"):
        lmo.direction("spectral", torch.zeros(2, 2), ns_dtype="int8")
    with pytest.raises(ValueError, match="2-D"):
        lmo.direction("sign", torch.zeros(2, 2, 2), transpose=True)
