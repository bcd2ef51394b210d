"""(L0, L1) estimation (ef_lightning/smoothness.py).

References are closed forms: the LMO directions of docs/algorithm.md §1 / lmo.py written out here (unit primal norm,
⟨G, d(G)⟩ = ‖G‖_*), per-layer quadratics ½·a·‖X − B‖² whose ratio ‖Δ∇‖_*/‖ΔX‖ along an LMO step is a known
constant, f(x) = exp(⟨u, x⟩) whose samples are exactly proportional to ‖∇f‖_* (pure L1), and scipy's LP solver for
the hinge fit.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from dist_helpers import make_data, make_model, mse
from ef_lightning import LMO, Simulator, build_lmo_optimizer
from ef_lightning.lmo import dual_norm
from ef_lightning.smoothness import (collect_samples, estimate_smoothness, fit_l0_l1, primal_norm,
                                     smoothness_overrides)


# ------------------------------------------------------------------------------------------------ norms
def _polar(M: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(M, full_matrices=False)
    return U @ Vh


def exact_direction(name: str, G: torch.Tensor) -> torch.Tensor:
    """d(G) of the lmo.py table with the exact polar factor (no Newton–Schulz)."""
    if name == "bias_rms":
        return math.sqrt(G.numel()) * G / G.norm()
    if name == "spectral_conv":
        c_out, c_in, k = G.shape[0], G.shape[1], math.prod(G.shape[2:])
        return (math.sqrt(c_out / c_in) / k * _polar(G.reshape(c_out, -1))).reshape(G.shape)
    d_out, d_in = G.shape
    if name == "spectral":
        return math.sqrt(d_out / d_in) * _polar(G)
    if name == "spectral_muon":
        return math.sqrt(max(1.0, d_out / d_in)) * _polar(G)
    if name == "sign":
        return torch.sign(G) / d_in
    if name == "col_norm":
        return math.sqrt(d_out) * G / G.norm(dim=0, keepdim=True)
    return G / (math.sqrt(d_in) * G.norm(dim=1, keepdim=True))  # row_norm


SHAPES = {"spectral": (6, 4), "spectral_muon": (3, 5), "spectral_conv": (4, 2, 3, 3), "sign": (5, 7),
          "col_norm": (6, 3), "row_norm": (3, 6), "bias_rms": (9,)}


@pytest.mark.parametrize("name", list(SHAPES))
def test_primal_norm_is_the_dual_of_dual_norm(name):
    """‖d(G)‖ = 1, ⟨G, d(G)⟩ = ‖G‖_*, and Hölder ⟨G, Z⟩ ≤ ‖G‖_*·‖Z‖ for random Z."""
    g = torch.Generator().manual_seed(0)
    G = torch.randn(SHAPES[name], generator=g, dtype=torch.float64)
    d = exact_direction(name, G)
    assert float(primal_norm(name, d)) == pytest.approx(1.0, rel=1e-10)
    assert float((G * d).sum()) == pytest.approx(float(dual_norm(name, G)), rel=1e-10)
    for _ in range(20):
        Z = torch.randn(SHAPES[name], generator=g, dtype=torch.float64)
        assert float((G * Z).sum()) <= float(dual_norm(name, G) * primal_norm(name, Z)) * (1 + 1e-12)


def test_primal_norm_transpose_and_closed_forms():
    X = torch.tensor([[3.0, -4.0, 0.0], [1.0, 2.0, 2.0]])  # (d_out, d_in) = (2, 3)
    assert float(primal_norm("sign", X)) == 3 * 4.0
    assert float(primal_norm("col_norm", X)) == pytest.approx(math.sqrt(16 + 4) / math.sqrt(2))  # column [-4, 2]
    assert float(primal_norm("row_norm", X)) == pytest.approx(math.sqrt(3) * 5.0)
    # transpose=True reads the stored (vocab, dim) tensor as its (dim, vocab) matrix
    assert float(primal_norm("col_norm", X.T, transpose=True)) == float(primal_norm("col_norm", X))
    with pytest.raises(ValueError, match="unknown norm 'frobenius'; valid norms: spectral"):
        primal_norm("frobenius", X)


# ------------------------------------------------------------------------------------------------ the fit
def _lp_reference(r: np.ndarray, c: np.ndarray, penalty: float) -> float:
    """Optimal value of the hinge fit as a linear program with slacks s_k ≥ r_k − L0 − L1 c_k (scipy HiGHS)."""
    from scipy.optimize import linprog

    K = r.size
    cost = np.concatenate([[1.0, c.mean()], np.full(K, penalty)])
    A = np.hstack([-np.ones((K, 1)), -c[:, None], -np.eye(K)])
    res = linprog(cost, A_ub=A, b_ub=-r, bounds=[(0, None)] * (K + 2), method="highs")
    assert res.status == 0
    return float(res.fun)


def _objective(L0, L1, r, c, penalty):
    return np.mean(L0 + L1 * c) + penalty * np.maximum(0, r - L0 - L1 * c).sum()


def test_fit_recovers_exact_lines():
    c = np.array([0.5, 1.0, 2.0, 4.0, 8.0])
    assert fit_l0_l1(2 + 3 * c, c) == pytest.approx((2.0, 3.0))
    assert fit_l0_l1(np.full(5, 5.0), c) == pytest.approx((5.0, 0.0))
    assert fit_l0_l1(0.7 * c, c) == pytest.approx((0.0, 0.7))


@pytest.mark.parametrize("penalty", [1e3, 2.0, 0.3])
def test_fit_is_the_lp_optimum(penalty):
    rng = np.random.default_rng(0)
    for _ in range(5):
        c = rng.uniform(0, 5, 40)
        r = 1 + 0.5 * c + rng.exponential(0.5, 40)
        L0, L1 = fit_l0_l1(r, c, penalty)
        assert L0 >= 0 and L1 >= 0
        assert _objective(L0, L1, r, c, penalty) == pytest.approx(_lp_reference(r, c, penalty), rel=1e-9, abs=1e-12)
        if penalty > 1:  # hard envelope: no sample above it
            assert (r <= L0 + L1 * c + 1e-9).all()


def test_fit_rejects_bad_samples():
    with pytest.raises(ValueError, match="equally many"):
        fit_l0_l1([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match=">= 0"):
        fit_l0_l1([-1.0], [1.0])
    with pytest.raises(ValueError, match="penalty=0"):
        fit_l0_l1([1.0], [1.0], penalty=0)


# ------------------------------------------------------------------------------------------------ trajectories
class Quadratics(nn.Module):
    """Independent per-layer quadratics f(X) = Σ_i ½·a_i·‖X_i − B_i‖² (float64): ∇_i f(X⁺) − ∇_i f(X) = a_i·ΔX_i."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], curv: dict[str, float]) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.ParameterDict({k: nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64))
                                   for k, s in shapes.items()})
        self.B = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
        self.a = curv

    def loss(self, _batch=None) -> torch.Tensor:
        return sum(0.5 * self.a[k] * (p - self.B[k]).pow(2).sum() for k, p in self.w.items())


def test_quadratic_layers_give_known_l0_and_no_l1():
    """Along LMO steps the ratio a·‖ΔX‖_*/‖ΔX‖ is the sup over all ΔX of the same structure:
    sign a·d_out/d_in, col_norm a·d_out·d_in, row_norm a·d_out/d_in, bias_rms a·n; spectral ≤ a·(d_out/d_in)·rank."""
    shapes = {"s": (5, 7), "c": (6, 3), "r": (3, 6), "b": (9,), "h": (6, 4)}
    norms = {"s": "sign", "c": "col_norm", "r": "row_norm", "b": "bias_rms", "h": "spectral"}
    curv = {"s": 2.0, "c": 0.5, "r": 3.0, "b": 1.5, "h": 0.7}
    model = Quadratics(shapes, curv)
    opt = LMO([{"params": [model.w[k]], "norm": norms[k]} for k in shapes], lr=1e-3, momentum=0.5,
              ns_dtype=torch.float64)
    before = {k: p.detach().clone() for k, p in model.w.items()}
    est = estimate_smoothness(model, opt, lambda m, b: m.loss(b), [None], steps=8)
    expected = {"s": 2.0 * 5 / 7, "c": 0.5 * 6 * 3, "r": 3.0 * 3 / 6, "b": 1.5 * 9}
    for k, L0 in expected.items():  # rel 1e-6: the directions normalise with +1e-8 (lmo.EPS), not exactly
        assert est[f"w.{k}"] == pytest.approx((L0, 0.0), rel=1e-6, abs=1e-9), k
    L0_h, _ = est["w.h"]
    bound = 0.7 * (6 / 4) * 4  # a · (d_out/d_in) · min(d_out, d_in): nuclear/σ_max ≤ rank
    assert 0.5 * bound <= L0_h <= bound * (1 + 1e-9)
    # restore=True: the estimate does not advance the run
    assert all(torch.equal(before[k], model.w[k].detach()) for k in shapes)
    assert all(torch.equal(s["momentum_buffer"], torch.zeros_like(s["momentum_buffer"])) for s in opt.state.values())


class Exponential(nn.Module):
    """f(x) = exp(⟨u, x⟩): ∇f = e^s·u grows with f, so no global L0 fits; (L0, L1)-smooth with L0 = 0."""

    def __init__(self, n: int = 8) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.x = nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64))
        self.u = torch.randn(n, generator=g, dtype=torch.float64) * 0.3

    def loss(self) -> torch.Tensor:
        return torch.exp(self.u @ self.x)


def test_exponential_needs_l1_closed_form():
    """bias_rms step Δ = −t·√n·u/‖u‖ ⇒ r_k = c_k·(1 − exp(−t·√n·‖u‖))/t exactly: (L0, L1) = (0, that factor)."""
    model = Exponential()
    t = 0.05
    opt = LMO([{"params": [model.x], "norm": "bias_rms"}], lr=t, momentum=0.0)
    samples = collect_samples(model, opt, lambda m, b: m.loss(), [None], steps=12)["x"]
    n, u = model.x.numel(), model.u.norm().item()
    L1 = (1 - math.exp(-t * math.sqrt(n) * u)) / t
    assert max(samples["c"]) > 1.5 * min(samples["c"])  # the trajectory spans a range of gradient norms
    # rel 1e-6: the bias_rms direction divides by RMS + 1e-8 (lmo.EPS), so t is not exactly lr
    np.testing.assert_allclose(samples["r"], np.array(samples["c"]) * L1, rtol=1e-6)
    L0_fit, L1_fit = estimate_smoothness(model, opt, lambda m, b: m.loss(), [None], steps=12)["x"]
    assert L0_fit == pytest.approx(0.0, abs=1e-6) and L1_fit == pytest.approx(L1, rel=1e-6)
    assert L1_fit * min(samples["c"]) > 1e3 * L0_fit  # the weight is on L1


def test_collect_samples_validates_arguments():
    model = Exponential()
    opt = LMO([{"params": [model.x], "norm": "bias_rms"}], lr=0.1, momentum=0.0)
    with pytest.raises(ValueError, match="steps=0"):
        collect_samples(model, opt, lambda m, b: m.loss(), [None], steps=0)
    with pytest.raises(ValueError, match="batches is empty"):
        collect_samples(model, opt, lambda m, b: m.loss(), [], steps=1)


# ------------------------------------------------------------------------------------------------ end to end
ESTIMATOR_UPLINKS = {"ef21": "top_k:0.3", "marina": "rand_k:0.5:unbiased", "ef21_page": "top_k:0.3",
                     "mvr": "top_k:0.3"}


@pytest.mark.parametrize("estimator", list(ESTIMATOR_UPLINKS))
def test_overrides_plug_into_optimizer_and_train_every_estimator(estimator):
    """The MLP of the distributed tests: estimate on a gluon trajectory, then Gluon's adaptive radius in the
    Simulator (4 workers) with each estimator lowers the loss at X."""
    data = make_data(4, 12)
    model = make_model(0)
    opt = build_lmo_optimizer(model, "gluon", lr=2**-10, momentum=0.9, verbose=False)
    batches = [row[0] for row in data]
    est = estimate_smoothness(model, opt, mse, batches, steps=10)
    assert set(est) == {n for n, _ in model.named_parameters()}
    overrides = smoothness_overrides(est)
    opt2 = build_lmo_optimizer(model, "gluon", momentum=0.9, overrides=overrides, verbose=False)
    names = {n for g in opt2.param_groups for n in g["param_names"] if g["l0"] is not None}
    assert names == set(overrides)
    sim = Simulator(model, opt2, n_workers=4, uplink=ESTIMATOR_UPLINKS[estimator], downlink="identity",
                    estimator=estimator)
    x_all = torch.cat([x for row in data for x, _ in row])
    y_all = torch.cat([y for row in data for _, y in row])

    def loss_at_x() -> float:
        with torch.no_grad():
            return float(mse(_with(model, sim.server_model()), (x_all, y_all)))

    start = loss_at_x()
    for s in range(12):
        sim.step(mse, data[s])
    end = loss_at_x()
    assert math.isfinite(end) and end < start, (estimator, start, end)


def _with(model: nn.Module, params: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` holding ``params`` (evaluation at the server's X)."""
    import copy

    m = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(params[n])
    return m
