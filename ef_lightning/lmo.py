"""Per-layer norms, their LMO directions and dual norms, and Newton–Schulz (docs/algorithm.md §1).

Convention: every function here returns the *positive* direction d(G) = −lmo(G), so an LMO step with radius t is
``X ← X − t·d(G)``, and ⟨G, d(G)⟩ = ‖G‖_* (the dual norm). Shapes follow ``nn.Linear.weight``: a matrix is
(d_out, d_in). Tensors stored the other way round — ``nn.Embedding.weight`` (vocab, dim) seen as a map from one-hot
vocab to dim, and transformers' GPT-2 ``Conv1D.weight`` (in, out) — pass ``transpose=True``: the direction is computed
on ``G.T`` (the (d_out, d_in) orientation) and transposed back. Other shapes are read as matrices by
:func:`as_matrix`: a 0-d/1-d tensor (bias, norm gain) is a (n, 1) column, i.e. a map from a constant 1-dim input, and a
tensor with more than two dims is ``reshape(shape[0], -1)``.

Norm names (d = the direction, NS = :func:`newton_schulz`, ‖G‖_* = ⟨G, d(G)⟩ with the exact polar factor):

    name           d(G)                                          dual norm ‖G‖_*
    spectral       sqrt(d_out/d_in)·NS(G)                        sqrt(d_out/d_in)·‖G‖_nuclear
    spectral_muon  sqrt(max(1, d_out/d_in))·NS(G)                sqrt(max(1, d_out/d_in))·‖G‖_nuclear
    spectral_conv  sqrt(C_out/C_in)/K·NS(G.reshape(C_out, -1))   sqrt(C_out/C_in)/K·‖G.reshape(C_out, -1)‖_nuclear
    sign           sign(G)/d_in                                  Σ|G|/d_in
    col_norm       sqrt(d_out)·G[:,j]/‖G[:,j]‖ per column        sqrt(d_out)·Σ_j ‖G[:,j]‖
    row_norm       G[i,:]/(sqrt(d_in)·‖G[i,:]‖) per row          Σ_i ‖G[i,:]‖/sqrt(d_in)
    bias_rms       g/RMS(g) = sqrt(n)·g/‖g‖ (all entries)        sqrt(n)·‖g‖

K = prod(kernel size) (k² for a k×k Conv2d, k for Conv1d: Scion's ``SpectralConv``). Sources: LIONS-EPFL/scion
``scion.py`` (norm classes; Pethick et al., arXiv 2502.07529), Gluon (Riabinin et al., arXiv 2505.13416), Muon
(Keller Jordan 2024, https://kellerjordan.github.io/posts/muon/), ``torch/optim/_muon.py``.

The directions are Scion's; each dual norm is ⟨G, d(G)⟩ for its direction, which :func:`dual_norm` returns. The
same table, with the primal norms, is docs/algorithm.md §1.1.

With NS in place of the exact polar factor, spectral directions are only approximate: after 5 quintic steps every
singular value of G of at least ~0.006·‖G‖_F maps into [0.68, 1.14], and down to ~0.002·‖G‖_F into [0.68, 1.21]
(not to 1; Keller Jordan 2024; docs/algorithm.md §1.2), so ⟨G, d(G)⟩ approximates the dual norm within that band.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, distribute_tensor

__all__ = [
    "NORMS",
    "NS_COEFFICIENTS",
    "as_matrix",
    "default_ns_dtype",
    "direction",
    "direction_parts",
    "dual_norm",
    "newton_schulz",
    "resolve_ns_dtype",
]

NORMS: tuple[str, ...] = ("spectral", "spectral_muon", "spectral_conv", "sign", "col_norm", "row_norm", "bias_rms")
_SPECTRAL = ("spectral", "spectral_muon", "spectral_conv")

# Keller Jordan's quintic coefficients, as in torch.optim.Muon (DEFAULT_A, DEFAULT_B, DEFAULT_C) and scion.py.
NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7  # torch.optim.Muon's eps: X / ‖X‖_F.clamp(min=1e-7)
EPS = 1e-8  # Scion's eps for the column / row / RMS normalisations: G / (norm + 1e-8)


def default_ns_dtype(device: torch.device) -> torch.dtype:
    """Newton–Schulz dtype used when ``ns_dtype=None``: bfloat16 on CUDA (Muon's choice), float32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def resolve_ns_dtype(ns_dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """``ns_dtype`` as a torch.dtype: None → :func:`default_ns_dtype`; a name such as ``"bfloat16"`` is looked up."""
    if ns_dtype is None:
        return default_ns_dtype(device)
    if isinstance(ns_dtype, str):
        resolved = getattr(torch, ns_dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
            raise ValueError(f"ns_dtype {ns_dtype!r} is not a torch floating dtype (e.g. 'bfloat16', 'float32')")
        return resolved
    if not isinstance(ns_dtype, torch.dtype):
        raise TypeError(f"ns_dtype must be a torch.dtype, a dtype name or None, got {type(ns_dtype).__name__}")
    return ns_dtype


@torch.no_grad()
def newton_schulz(G: Tensor, steps: int = 5, dtype: torch.dtype | str | None = None) -> Tensor:
    """Approximate the polar factor UVᵀ of a matrix with Keller Jordan's quintic Newton–Schulz iteration.

    Same operations, in the same order, as ``torch.optim._muon._zeropower_via_newtonschulz`` (PyTorch ≥ 2.9): cast,
    transpose if rows > cols, divide by ‖X‖_F.clamp(min=1e-7), then ``steps`` times
    A = X Xᵀ; B = b·A + c·A²; X = a·X + B X with ``torch.addmm``. In bfloat16 it is bit-for-bit torch's.
    The input is never modified (torch's version divides in place, which writes into a bf16 gradient).

    Args:
        G: a 2-D tensor (d_out, d_in).
        steps: number of quintic iterations (5 in Muon / Scion).
        dtype: dtype of the iteration; ``None`` → bfloat16 on CUDA, float32 elsewhere.

    Returns:
        US'Vᵀ in ``dtype`` with the shape of G, where the singular values S' of the result lie in about
        [0.68, 1.14] for every singular value of G above ~0.006·‖G‖_F, [0.68, 1.21] above ~0.002·‖G‖_F (after 5
        steps; docs/algorithm.md §1.2).
    """
    if G.ndim != 2:
        raise ValueError(f"newton_schulz needs a 2-D matrix, got shape {tuple(G.shape)}")
    if not 0 <= steps < 100:
        raise ValueError(f"steps must be in [0, 100), got {steps}")
    a, b, c = NS_COEFFICIENTS
    X = G.to(resolve_ns_dtype(dtype, G.device))
    tall = G.size(0) > G.size(1)
    if tall:  # iterate on the short side: X Xᵀ is min(d_out, d_in)²
        X = X.T
    X = X / X.norm().clamp(min=NS_EPS)  # ‖X‖_2 ≤ ‖X‖_F ≤ 1
    for _ in range(steps):
        A = X @ X.T
        B = torch.addmm(A, A, A, beta=b, alpha=c)
        X = torch.addmm(X, B, X, beta=a)
    return X.T if tall else X


def as_matrix(G: Tensor, transpose: bool = False) -> Tensor:
    """View G as a (d_out, d_in) matrix: 0-d/1-d → (n, 1); >2-d → (shape[0], -1); ``transpose`` swaps a 2-D tensor."""
    if G.ndim <= 1:
        M = G.reshape(-1, 1)
    elif G.ndim == 2:
        M = G
    else:
        M = G.reshape(G.shape[0], -1)
    if transpose:
        if G.ndim != 2:
            raise ValueError(f"transpose=True needs a 2-D tensor, got shape {tuple(G.shape)}")
        M = M.T
    return M


def _check_name(name: str) -> None:
    if name not in NORMS:
        raise ValueError(f"unknown norm {name!r}; valid norms: {', '.join(NORMS)}")


def _conv_dims(G: Tensor) -> tuple[int, int, int]:
    """(C_out, C_in, K) of a conv kernel (C_out, C_in, *kernel); K = prod(kernel) (1 for a matrix)."""
    if G.ndim < 2:
        raise ValueError(f"spectral_conv needs a kernel (C_out, C_in, *k), got shape {tuple(G.shape)}")
    return G.shape[0], G.shape[1], math.prod(G.shape[2:])


def direction_parts(
    name: str,
    G: Tensor,
    *,
    ns_steps: int = 5,
    ns_dtype: torch.dtype | str | None = None,
    transpose: bool = False,
) -> tuple[Tensor, float]:
    """The direction split as d(G) = c·T, with T of G's shape, for exact-arithmetic callers.

    For the spectral norms T is the raw Newton–Schulz output (in ``ns_dtype``) and c the shape factor, so that
    ``X.add_(T, alpha=-lr*c)`` performs exactly torch.optim.Muon's ``param.add_(update, alpha=-adjusted_lr)``;
    multiplying T by c first would round once more. For the other norms c = 1 and T is in G's dtype.
    """
    _check_name(name)
    if name in _SPECTRAL and isinstance(G, DTensor):
        # a sharded matrix (FSDP2): gather it once, run Newton-Schulz on the whole matrix, keep this process's shard
        # (no communication: every process of the mesh computed the same T), as distributed Muon implementations do
        T, factor = direction_parts(name, G.full_tensor(), ns_steps=ns_steps, ns_dtype=ns_dtype, transpose=transpose)
        return distribute_tensor(T, G.device_mesh, G.placements, src_data_rank=None), factor
    if name == "bias_rms":  # over all entries; Scion's BiasRMS (mean over dim 0) for the 1-D tensors it serves
        return G / (G.square().mean().sqrt() + EPS), 1.0
    if name == "spectral_conv":
        c_out, c_in, k = _conv_dims(G)
        M, factor = G.reshape(c_out, -1), math.sqrt(c_out / c_in) / k
    else:
        M = as_matrix(G, transpose)
        d_out, d_in = M.shape
        factor = {"spectral": math.sqrt(d_out / d_in), "spectral_muon": math.sqrt(max(1.0, d_out / d_in))}.get(
            name, 1.0
        )
    if name in _SPECTRAL:
        T = newton_schulz(M, ns_steps, ns_dtype)
    elif name == "sign":
        T = torch.sign(M) / M.shape[1]
    elif name == "col_norm":  # each column to RMS 1 (Scion ColNorm, normalized=False)
        T = M / (torch.linalg.vector_norm(M, dim=0, keepdim=True) / math.sqrt(M.shape[0]) + EPS)
    else:  # row_norm: each row to norm 1/sqrt(d_in) (Scion RowNorm, normalized=True)
        T = M / (math.sqrt(M.shape[1]) * torch.linalg.vector_norm(M, dim=1, keepdim=True) + EPS)
    if transpose:
        T = T.T
    return T.reshape(G.shape), factor


def direction(
    name: str,
    G: Tensor,
    *,
    ns_steps: int = 5,
    ns_dtype: torch.dtype | str | None = None,
    transpose: bool = False,
) -> Tensor:
    """The positive LMO direction d(G) = −lmo(G) of the unit ball of norm ``name`` (table in the module docstring).

    A step ``X − t·d(G)`` moves X by exactly t in that norm: t is "in units of the layer's norm per update" (for
    ``spectral``, the RMS→RMS operator norm; Scion arXiv 2502.07529 Table 2).

    Args:
        name: one of :data:`NORMS`.
        G: gradient-like tensor (d_out, d_in) (or see :func:`as_matrix` for other shapes).
        ns_steps: Newton–Schulz iterations for the spectral norms.
        ns_dtype: Newton–Schulz dtype; ``None`` → bfloat16 on CUDA, float32 on CPU.
        transpose: G is stored (d_in, d_out) (``nn.Embedding``, GPT-2 ``Conv1D``); ignored by ``bias_rms`` and
            ``spectral_conv``, whose layouts are fixed.

    Returns:
        d(G) with G's shape and dtype.
    """
    T, c = direction_parts(name, G, ns_steps=ns_steps, ns_dtype=ns_dtype, transpose=transpose)
    T = T.to(G.dtype)
    return T.mul_(c) if c != 1.0 else T


@torch.no_grad()
def dual_norm(name: str, G: Tensor, *, transpose: bool = False) -> Tensor:
    """Exact dual norm ‖G‖_* = max over the unit ball of ⟨G, Z⟩ = ⟨G, d_exact(G)⟩ (0-d tensor, G's dtype).

    For the spectral norms this uses the nuclear norm (an SVD: O(d³), meant for tests and diagnostics); the optimizer's
    Gluon radius uses the cheap ⟨G, d(G)⟩ with the Newton–Schulz direction instead.
    """
    _check_name(name)
    if name == "bias_rms":
        return math.sqrt(G.numel()) * torch.linalg.vector_norm(G)
    if name == "spectral_conv":
        c_out, c_in, k = _conv_dims(G)
        return math.sqrt(c_out / c_in) / k * torch.linalg.matrix_norm(G.reshape(c_out, -1), ord="nuc")
    M = as_matrix(G, transpose)
    d_out, d_in = M.shape
    if name == "spectral":
        return math.sqrt(d_out / d_in) * torch.linalg.matrix_norm(M, ord="nuc")
    if name == "spectral_muon":
        return math.sqrt(max(1.0, d_out / d_in)) * torch.linalg.matrix_norm(M, ord="nuc")
    if name == "sign":
        return M.abs().sum() / d_in
    if name == "col_norm":
        return math.sqrt(d_out) * torch.linalg.vector_norm(M, dim=0).sum()
    return torch.linalg.vector_norm(M, dim=1).sum() / math.sqrt(d_in)  # row_norm
