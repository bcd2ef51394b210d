"""The kernels of EF21-Muon: pure functions on tensors, one per step of docs/algorithm.md §2 and §4.

Each function does one step for one group of layers (:class:`~ef_lightning.state.Group`: same shape and compressors)
held as the rows of an (L, d) float32 tensor; one layer is L = 1. :class:`~ef_lightning.EF21Engine` and
:class:`~ef_lightning.Simulator` call them in the same order, so their arithmetic is identical operation for
operation. ``fused`` picks the compressors' vectorised row kernels (a number of tensor ops independent of L) or the
per-layer reference loop; both give the same bytes and floats (tests/test_fused.py, tests/test_ef21_dist.py).

Math names follow the paper (arXiv 2510.00643): ``g`` worker gradient, ``M`` worker momentum, ``D`` worker direction,
``G_j`` worker estimate, ``R`` uplink message, ``G`` server aggregate, ``X`` server model, ``W`` shadow model (the
parameters), ``S`` downlink message. Shapes are the parameter's; state is float32.

Randomness: every compressor call gets a seed from :func:`seed_for` (step, layer, sender), identical on every rank,
so a receiver rebuilds rand-k indices or stochastic rounding without the global RNG.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import cast

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from ef_lightning import compressors as _comp
from ef_lightning.optim import momentum_direction_
from ef_lightning.state import dtensor_like

__all__ = [
    "SERVER",
    "COIN",
    "SUBSET",
    "seed_for",
    "encode",
    "decode",
    "ef21_direction",
    "ef21_direction_out",
    "page_direction",
    "mvr_direction",
    "uplink_ef21",
    "uplink_marina",
    "aggregate_",
    "server_view",
    "downlink_message",
    "apply_downlink_",
]

SERVER = 1 << 20  #: "sender id" of the server side in seed derivation (workers are 0..n-1)
COIN = SERVER + 1  #: stream of the shared Bernoulli(p) refresh coin of marina / ef21_page
SUBSET = SERVER + 2  #: stream of the partial-participation subsets
_MASK64 = (1 << 64) - 1


def seed_for(*xs: int) -> int:
    """SplitMix64 over a tuple of ints (base seed, step, layer, sender): a 63-bit seed, identical on every rank."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (x & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 29
    return h & ((1 << 63) - 1)


def encode(comp: _comp.Compressor, x: Tensor, shape: torch.Size, seeds: Sequence[int], fused: bool) -> list[Tensor]:
    """Compress the rows of ``x`` (L, d): each part as (L, nbytes) uint8. ``fused``: the compressor's vectorised
    :meth:`~ef_lightning.compressors.Compressor.encode_rows`; else the per-layer reference loop (same bytes)."""
    if fused:
        return comp.encode_rows(x, shape, seeds)
    return _comp.Compressor.encode_rows(comp, x, shape, seeds)


def decode(
    comp: _comp.Compressor,
    parts: Sequence[Tensor],
    shape: torch.Size,
    seeds: Sequence[int],
    fused: bool,
    scale_unbiased: bool = True,
) -> Tensor:
    """Decompress rows to float32 (L, d). An unbiased Q(omega) under EF21 is scaled by 1/(omega + 1)
    (docs/algorithm.md §3); MARINA needs E Q(x) = x and passes ``scale_unbiased=False``."""
    if fused:
        x = comp.decode_rows(parts, shape, torch.float32, seeds)
    else:
        x = _comp.Compressor.decode_rows(comp, parts, shape, torch.float32, seeds)
    return _unbias_(comp, x, shape) if scale_unbiased else x


def _unbias_(comp: _comp.Compressor, x: Tensor, shape: torch.Size) -> Tensor:
    """EF21 uses an unbiased Q(omega) as the contractive Q/(omega + 1) (docs/algorithm.md §3): scale in place."""
    return x.mul_(1.0 / (1.0 + comp.constant(shape))) if comp.kind == "unbiased" else x


# ----------------------------------------------------------------------------------------- step 2: the direction D_j
def ef21_direction(M: Tensor | None, g: Tensor, mu: float, nesterov: bool) -> Tensor:
    """EF21-Muon step 2: M <- mu*M + (1-mu)*g; D = (1-mu)*g + mu*M with Nesterov, else M. No momentum: D = g."""
    return g if M is None else momentum_direction_(M, g, mu, nesterov)


def ef21_direction_out(M: Tensor | None, g: Tensor, mu: float, nesterov: bool) -> Tensor:
    """:func:`ef21_direction` without touching M (out of place, same arithmetic): the direction of a send made
    before the step is known good; the engine updates M at the step."""
    if M is None:
        return g
    M_next = M.lerp(g, 1 - mu)  # momentum_direction_'s M.lerp_(g, 1 - mu), out of place
    return g.lerp(M_next, mu) if nesterov else M_next


def page_direction(V: Tensor, g: Tensor, g_prev: Tensor | None, refresh: bool) -> Tensor:
    """``ef21_page`` (SARAH/PAGE): V = g on a refresh round, else V <- V + g - g_prev (same minibatch, previous W)."""
    if refresh:
        return V.copy_(g)
    assert g_prev is not None  # every round but a refresh one has the previous point's gradient
    return V.add_(g).sub_(g_prev)


def mvr_direction(V: Tensor, g: Tensor, g_prev: Tensor | None, mu: float) -> Tensor:
    """``mvr`` (STORM): V <- g + (1 - a)(V - g_prev) with a = 1 - mu; the first step V = g."""
    return V.copy_(g) if g_prev is None else V.sub_(g_prev).mul_(mu).add_(g)


# ----------------------------------------------------------------------------------------- step 3: uplink messages
def uplink_ef21(
    comp: _comp.Compressor,
    D: Tensor,
    G_j: Tensor,
    shape: torch.Size,
    seeds: Sequence[int],
    exact_identity: bool,
    fused: bool,
) -> list[Tensor]:
    """EF21 step 3 on rows: R = C(D - G_j); G_j <- G_j + R; returns R's parts (uint8).

    With ``exact_identity`` (identity compressor, every worker reporting) D itself is sent and G_j = D: the same
    bits, and bit-exact data-parallel averaging instead of G + mean(D - G_j) rounding drift.
    """
    if exact_identity:
        G_j.copy_(D)
        return encode(comp, D, shape, seeds, fused)
    if fused:  # the vectorised compressors hand back what they packed, decoded, without unpacking it again
        parts, R = comp.roundtrip_rows(D - G_j, shape, seeds)
        _unbias_(comp, R, shape)
    else:
        parts = encode(comp, D - G_j, shape, seeds, fused)
        R = decode(comp, parts, shape, seeds, fused)
    G_j.add_(R)
    return parts


def uplink_marina(
    comp: _comp.Compressor,
    g: Tensor,
    g_prev: Tensor | None,
    refresh: bool,
    shape: torch.Size,
    seeds: Sequence[int],
    fused: bool,
) -> list[Tensor]:
    """MARINA: a refresh round sends g itself (``comp`` is identity then); otherwise Q(g - g_prev), unscaled."""
    if refresh:
        return encode(comp, g, shape, seeds, fused)
    assert g_prev is not None  # every round but a refresh one has the previous point's gradient
    return encode(comp, g - g_prev, shape, seeds, fused)


# ----------------------------------------------------------------------------------------- step 4: aggregate
def aggregate_(
    G: Tensor,
    comp: _comp.Compressor,
    messages: Sequence[Sequence[Tensor]],
    seeds: Sequence[Sequence[int]],
    shape: torch.Size,
    divisor: int,
    replace: bool,
    fused: bool,
    scale_unbiased: bool = True,
) -> None:
    """Step 4 on rows: G <- G + (1/divisor) * sum_j R_j (``replace``: G <- that mean), senders summed in order.

    ``messages[j]``: sender j's parts; ``seeds[j]``: its per-row seeds. ``divisor`` is n (every worker:
    non-participants contribute R_j = 0, which keeps G = mean_j G_j) or the number of senders (MARINA).
    ``replace`` holds when the messages are the D_j themselves (identity uplink) or MARINA's full gradients on a
    refresh round.
    """
    acc: Tensor | None = None
    for parts, s in zip(messages, seeds):
        R = decode(comp, parts, shape, s, fused, scale_unbiased=scale_unbiased)
        acc = R if acc is None else acc.add_(R)
    if acc is None:
        raise ValueError("aggregate_ needs at least one message")
    acc.div_(divisor)
    if replace:
        G.copy_(acc)
    else:
        G.add_(acc)


# ----------------------------------------------------------------------------------------- step 5: the server step
@contextlib.contextmanager
def server_view(
    params: Sequence[torch.nn.Parameter], X: Sequence[Tensor | None], G: Sequence[Tensor | None]
) -> Iterator[None]:
    """Step 5 runs the optimizer's own rule: inside the block each parameter's data is X (``None``: the parameter
    is X itself) and its grad is G (``None``: not served here, no grad, the optimizer skips it). Afterwards the
    parameters hold W again and have no grad."""
    saved = [(p, p.data) for p in params if not isinstance(p, DTensor)]
    copied = []  # a DTensor's data cannot be swapped (FSDP2 keeps its own view): X is copied in and back out
    for p, x, g in zip(params, X, G):
        if isinstance(p, DTensor):
            if x is not None:
                w = cast(DTensor, p.data).to_local()
                copied.append((w, w.clone(), x))
                w.copy_(x)
            p.grad = None if g is None else dtensor_like(p, g.to(p.dtype))
            continue
        if x is not None:
            p.data = x
        p.grad = None if g is None else (g if p.dtype == torch.float32 else g.to(p.dtype))
    try:
        yield
    finally:
        for w, w_saved, x in copied:
            x.copy_(w)
            w.copy_(w_saved)
        for p, data in saved:
            p.data = data
        for p in params:
            p.grad = None


# ----------------------------------------------------------------------------------------- steps 6-7: the downlink
def downlink_message(
    comp: _comp.Compressor, X: Tensor, W: Sequence[Tensor], shape: torch.Size, seeds: Sequence[int], fused: bool
) -> list[Tensor]:
    """EF21-P step 6 on rows: S = C_down(X - W), packed. Identity sends X itself (same bits, and W = X exactly)."""
    if comp.kind == "identity":
        return encode(comp, X, shape, seeds, fused)
    W_rows = torch.stack([w.detach().reshape(-1) for w in W]).float()
    return encode(comp, X - W_rows, shape, seeds, fused)


@torch.no_grad()
def apply_downlink_(
    W: Sequence[Tensor],
    comp: _comp.Compressor,
    parts: Sequence[Tensor],
    shape: torch.Size,
    seeds: Sequence[int],
    fused: bool,
) -> None:
    """Step 7: W <- W + S (identity: W <- X), in W's own dtype, every row at once."""
    rows = decode(comp, parts, shape, seeds, fused)
    if comp.kind != "identity":
        rows = rows.to(W[0].dtype)
    views = [r.view(shape) for r in rows]
    if comp.kind == "identity":
        torch._foreach_copy_(list(W), views)
    else:
        torch._foreach_add_(list(W), views)
