"""Estimate layer-wise (L0, L1)-smoothness constants for Gluon's adaptive radius (docs/algorithm.md §1.3).

Gluon (Riabinin, Shulgin, Gruntkowska, Richtárik, arXiv 2505.13416) assumes layer-wise (L0, L1)-smoothness: for
every layer i and points X, Y,

    ‖∇_i f(X) − ∇_i f(Y)‖_(i)*  ≤  (L0_i + L1_i·‖∇_i f(X)‖_(i)*) · ‖X_i − Y_i‖_(i),

and with these constants its step radius is t_i = ‖D_i‖_* / (L0_i + L1_i·‖D_i‖_*) (``l0``/``l1`` group keys of
:class:`~ef_lightning.LMO`). The paper estimates the constants along a training trajectory: at each step k it
records, per layer, the ratio r_k = ‖∇_i f(X⁺) − ∇_i f(X)‖_* / ‖X⁺_i − X_i‖ and c_k = ‖∇_i f(X)‖_*, and fits the
hinge-penalised envelope

    min_{L0, L1 ≥ 0}  (1/K)·Σ_k (L0 + L1·c_k)  +  λ·Σ_k max(0, r_k − L0 − L1·c_k).

This module does the same (:func:`estimate_smoothness` = :func:`collect_samples` + :func:`fit_l0_l1`), with the
gradient pair of each step taken on the SAME minibatch, so r_k measures curvature, not minibatch noise.

Norms. ‖·‖_* is :func:`ef_lightning.lmo.dual_norm` (exact; ⟨G, d(G)⟩ for the optimizer's directions, as lmo.py's
docstring and docs/algorithm.md §1.1 list them). The primal norm ‖·‖ is the norm whose unit ball the direction d(G)
spans, i.e. the dual of that dual, so that ‖d(G)‖ = 1 and ⟨G, Z⟩ ≤ ‖G‖_*·‖Z‖ (:func:`primal_norm`; M = the (d_out, d_in)
matrix view of :func:`ef_lightning.lmo.as_matrix`, with ``transpose`` as in the optimizer's group):

    name           primal ‖X‖                                    dual ‖G‖_* (lmo.dual_norm)
    spectral       sqrt(d_in/d_out)·σ_max(M)   (RMS→RMS)          sqrt(d_out/d_in)·‖M‖_nuclear
    spectral_muon  σ_max(M)/sqrt(max(1, d_out/d_in))              sqrt(max(1, d_out/d_in))·‖M‖_nuclear
    spectral_conv  K·sqrt(C_in/C_out)·σ_max(X.reshape(C_out, -1)) sqrt(C_out/C_in)/K·‖·‖_nuclear
    sign           d_in·max|M|                 (ℓ1→ℓ∞ scaled)     Σ|M|/d_in
    col_norm       max_j ‖M[:,j]‖/sqrt(d_out)  (max column RMS)   sqrt(d_out)·Σ_j ‖M[:,j]‖
    row_norm       sqrt(d_in)·max_i ‖M[i,:]‖                      Σ_i ‖M[i,:]‖/sqrt(d_in)
    bias_rms       ‖x‖₂/sqrt(n) = RMS(x)                          sqrt(n)·‖x‖₂

For example ``sign``: direction sign(G)/d_in, dual Σ|G|/d_in, so primal d_in·max|x| (docs/algorithm.md §1.1).
Units: L0 has the units of (dual norm of a gradient) / (primal norm of a step); L1 is dimensionless·1/(primal
norm of a step). They are exactly what ``param_groups(..., overrides=smoothness_overrides(est))`` expects.

Example::

    opt = build_lmo_optimizer(model, "gluon", lr=0.01, momentum=0.0, verbose=False)
    est = estimate_smoothness(model, opt, loss_fn, batches, steps=20)     # {name: (L0, L1)}
    opt = build_lmo_optimizer(model, "gluon", overrides=smoothness_overrides(est), verbose=False)

Samples are lower bounds of the true sup in the assumption (only the visited pairs are seen), so the constants
are optimistic where the trajectory did not explore; a larger λ covers every sample (see :func:`fit_l0_l1`).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ef_lightning.lmo import NORMS, as_matrix, dual_norm
from ef_lightning.optim import ADAMW, LMO

__all__ = ["primal_norm", "collect_samples", "fit_l0_l1", "estimate_smoothness", "smoothness_overrides"]

#: default hinge penalty λ: any λ > 1 already makes the fit a hard envelope (see fit_l0_l1); 1e3 as in "large"
DEFAULT_PENALTY = 1e3


def primal_norm(name: str, X: Tensor, *, transpose: bool = False) -> Tensor:
    """The layer norm ‖X‖_(i) whose dual is :func:`ef_lightning.lmo.dual_norm` (table in the module docstring).

    Args:
        name: one of :data:`ef_lightning.lmo.NORMS`.
        X: the tensor (a step X⁺ − X, usually), any shape the optimizer accepts for that norm.
        transpose: as the optimizer group's ``transpose`` (``nn.Embedding``, GPT-2 ``Conv1D``).

    Returns:
        a 0-d tensor in X's dtype.
    """
    if name not in NORMS:
        raise ValueError(f"unknown norm {name!r}; valid norms: {', '.join(NORMS)}")
    if name == "bias_rms":
        return torch.linalg.vector_norm(X) / math.sqrt(X.numel())
    if name == "spectral_conv":
        if X.ndim < 2:
            raise ValueError(f"spectral_conv needs a kernel (C_out, C_in, *k), got shape {tuple(X.shape)}")
        c_out, c_in, k = X.shape[0], X.shape[1], math.prod(X.shape[2:])
        return k * math.sqrt(c_in / c_out) * torch.linalg.matrix_norm(X.reshape(c_out, -1), ord=2)
    M = as_matrix(X, transpose)
    d_out, d_in = M.shape
    if name == "spectral":
        return math.sqrt(d_in / d_out) * torch.linalg.matrix_norm(M, ord=2)
    if name == "spectral_muon":
        return torch.linalg.matrix_norm(M, ord=2) / math.sqrt(max(1.0, d_out / d_in))
    if name == "sign":
        return d_in * M.abs().max()
    if name == "col_norm":
        return torch.linalg.vector_norm(M, dim=0).max() / math.sqrt(d_out)
    return math.sqrt(d_in) * torch.linalg.vector_norm(M, dim=1).max()  # row_norm


# ------------------------------------------------------------------------------------------------------------ fit
def _objective(L0: np.ndarray, L1: np.ndarray, r: np.ndarray, c: np.ndarray, penalty: float) -> np.ndarray:
    pred = L0[:, None] + L1[:, None] * c[None, :]
    return pred.mean(axis=1) + penalty * np.maximum(0.0, r[None, :] - pred).sum(axis=1)


def fit_l0_l1(
    r: Sequence[float] | np.ndarray, c: Sequence[float] | np.ndarray, penalty: float = DEFAULT_PENALTY
) -> tuple[float, float]:
    """The hinge-penalised (L0, L1) envelope of Gluon (arXiv 2505.13416) for samples (r_k, c_k).

    Solves exactly  min_{L0, L1 ≥ 0} (1/K)·Σ_k (L0 + L1·c_k) + λ·Σ_k max(0, r_k − L0 − L1·c_k).
    The objective is convex and piecewise linear in (L0, L1), so a minimiser lies on a vertex of the arrangement of
    the lines L0 + L1·c_k = r_k and the axes L0 = 0, L1 = 0: all O(K²) vertices are evaluated (K ≤ a few hundred).

    Role of λ: raising L0 by δ costs δ and removes λ·δ per sample above the envelope, so with λ > 1 no sample is left
    above it (a hard, minimum-average upper envelope); λ < 1 lets about 1/λ samples lie above (robust to outliers).

    Args:
        r: ratios ‖Δ∇‖_*/‖ΔX‖ (≥ 0).
        c: gradient dual norms ‖∇f(X)‖_* at the anchor points (≥ 0), same length.
        penalty: λ > 0.

    Returns:
        (L0, L1) as floats, both ≥ 0. Ties prefer smaller L1 (the plain L-smooth model).
    """
    r, c = np.asarray(r, dtype=np.float64).ravel(), np.asarray(c, dtype=np.float64).ravel()
    if r.shape != c.shape or r.size == 0:
        raise ValueError(f"need equally many r and c samples (at least one), got {r.size} and {c.size}")
    if not (np.isfinite(r).all() and np.isfinite(c).all()) or (r < 0).any() or (c < 0).any():
        raise ValueError("samples r and c must be finite and >= 0")
    if not penalty > 0:
        raise ValueError(f"penalty={penalty!r}; must be > 0")
    cand0 = [np.zeros(1), r, np.zeros_like(r)]  # origin; (r_k, 0) on the L1 = 0 axis; (0, r_k/c_k) on L0 = 0
    cand1 = [np.zeros(1), np.zeros_like(r), np.divide(r, c, out=np.zeros_like(r), where=c > 0)]
    i, j = np.triu_indices(r.size, k=1)  # pairwise intersections of the lines L0 + L1 c_k = r_k
    dc = c[i] - c[j]
    ok = np.abs(dc) > 1e-12 * np.maximum(1.0, np.abs(c[i]))
    L1 = (r[i][ok] - r[j][ok]) / dc[ok]
    L0 = r[i][ok] - L1 * c[i][ok]
    keep = (L1 >= 0) & (L0 >= 0)
    cand0.append(L0[keep])
    cand1.append(L1[keep])
    L0s, L1s = np.concatenate(cand0), np.concatenate(cand1)
    obj = np.concatenate(
        [_objective(L0s[s : s + 2048], L1s[s : s + 2048], r, c, penalty) for s in range(0, L0s.size, 2048)]
    )
    best = obj.min()
    tie = np.flatnonzero(obj <= best + 1e-12 * max(1.0, abs(best)))
    k = tie[np.argmin(L1s[tie])]
    return float(L0s[k]), float(L1s[k])


# ------------------------------------------------------------------------------------------------------- sampling
def _lmo_layers(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[str, nn.Parameter, str, bool]]:
    names: dict[int, str] = {}
    for n, p in model.named_parameters():
        names.setdefault(id(p), n)  # a tied parameter is keyed by its first name
    out = []
    for group in optimizer.param_groups:
        norm = group.get("norm")
        if norm is None or norm == ADAMW:
            continue  # AdamW groups have no LMO norm: (L0, L1) means nothing for them
        for p in group["params"]:
            if p.requires_grad:
                if id(p) not in names:
                    raise ValueError(f"optimizer holds a parameter of shape {tuple(p.shape)} that is not in the model")
                out.append((names[id(p)], p, norm, bool(group.get("transpose", False))))
    return out


def _gradients(
    model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor], batch: Any, params: Sequence[nn.Parameter]
) -> tuple[float, list[Tensor]]:
    for p in model.parameters():
        p.grad = None
    with torch.enable_grad():
        loss = loss_fn(model, batch)
        loss.backward()
    return float(loss.detach()), [
        p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params
    ]


def collect_samples(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | Iterable[dict[str, Any]],
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batches: Sequence[Any],
    *,
    steps: int = 20,
    restore: bool = True,
) -> dict[str, dict[str, list[float]]]:
    """Run ``steps`` optimizer steps and record (r_k, c_k) per LMO layer (module docstring).

    Step k uses ``batches[k % len(batches)]``: gradient at X, ``optimizer.step()`` (the optimizer's own LMO update,
    momentum and radius included), gradient at X⁺ on the same batch — two forward/backward passes per step.

    Args:
        model: the module; ``loss_fn(model, batch)`` returns the scalar loss.
        optimizer: an :class:`~ef_lightning.LMO` (or any optimizer whose groups carry ``norm``), or param groups
            (e.g. from :func:`~ef_lightning.param_groups`) to build a fresh ``LMO`` from. It must not be driven by
            an EF21 engine (the engine guards ``optimizer.step``).
        batches: a sequence of batches (cycled).
        steps: number of steps K (>= 1).
        restore: put the model's parameters/buffers and the optimizer's state back afterwards (default), so the
            estimate does not advance the run.

    Returns:
        ``{param_name: {"r": [...], "c": [...], "loss": [...]}}`` for every LMO parameter; steps that did not move
        a layer (‖ΔX‖ = 0) contribute no sample for it.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps={steps!r}; must be an integer >= 1")
    if len(batches) == 0:
        raise ValueError("batches is empty; pass at least one batch")
    if not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = LMO(list(optimizer), lr=1.0)  # groups from param_groups carry their own lr
    layers = _lmo_layers(model, optimizer)
    if not layers:
        raise ValueError("the optimizer has no LMO parameter group (every group is AdamW or has no 'norm')")
    saved_model = copy.deepcopy(model.state_dict()) if restore else None
    saved_opt = copy.deepcopy(optimizer.state_dict()) if restore else None
    params = [p for _, p, _, _ in layers]
    out: dict[str, dict[str, list[float]]] = {name: {"r": [], "c": [], "loss": []} for name, *_ in layers}
    try:
        for k in range(steps):
            batch = batches[k % len(batches)]
            loss, g0 = _gradients(model, loss_fn, batch, params)
            X0 = [p.detach().clone() for p in params]
            optimizer.step()  # its own update (the grads of every parameter, AdamW ones too, are still set)
            _, g1 = _gradients(model, loss_fn, batch, params)
            with torch.no_grad():
                for (name, p, norm, tr), x0, a, b in zip(layers, X0, g0, g1):
                    step_norm = float(primal_norm(norm, (p.detach() - x0).double(), transpose=tr))
                    if step_norm <= 0.0 or not math.isfinite(step_norm):
                        continue
                    # float64 for the norms: r_k divides two small numbers
                    out[name]["r"].append(float(dual_norm(norm, (b - a).double(), transpose=tr)) / step_norm)
                    out[name]["c"].append(float(dual_norm(norm, a.double(), transpose=tr)))
                    out[name]["loss"].append(loss)
    finally:
        for p in model.parameters():
            p.grad = None
        if saved_model is not None:  # restore
            model.load_state_dict(saved_model)
        if saved_opt is not None:
            optimizer.load_state_dict(saved_opt)
    return out


def estimate_smoothness(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | Iterable[dict[str, Any]],
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batches: Sequence[Any],
    *,
    steps: int = 20,
    penalty: float = DEFAULT_PENALTY,
    restore: bool = True,
) -> dict[str, tuple[float, float]]:
    """Per-layer (L0, L1) of layer-wise (L0, L1)-smoothness along a short trajectory (arXiv 2505.13416).

    :func:`collect_samples` then :func:`fit_l0_l1` per parameter. Arguments as there.

    Returns:
        ``{param_name: (L0, L1)}`` for every LMO parameter that moved; feed it to :func:`smoothness_overrides`.
    """
    samples = collect_samples(model, optimizer, loss_fn, batches, steps=steps, restore=restore)
    est = {}
    for name, s in samples.items():
        if not s["r"]:
            warnings.warn(f"{name}: no step moved this parameter; no (L0, L1) estimate", RuntimeWarning, stacklevel=2)
            continue
        est[name] = fit_l0_l1(s["r"], s["c"], penalty)
    return est


def smoothness_overrides(estimate: Mapping[str, tuple[float, float]]) -> dict[str, dict[str, float]]:
    """``{name: {"l0": L0, "l1": L1}}`` for ``param_groups``/``build_lmo_optimizer(overrides=...)``.

    Layers whose fit is (0, 0) (a flat layer: no gradient change seen) are left out with a warning, since the Gluon
    radius ‖D‖_*/(L0 + L1‖D‖_*) is undefined there; they keep their constant radius. Parameter names are used as
    patterns verbatim (PyTorch names never contain the glob characters ``*?[``).
    """
    out = {}
    for name, (l0, l1) in estimate.items():
        if l0 + l1 > 0:
            out[name] = {"l0": float(l0), "l1": float(l1)}
        else:
            warnings.warn(
                f"{name}: fitted (L0, L1) = (0, 0); keeping its constant radius", RuntimeWarning, stacklevel=2
            )
    return out
