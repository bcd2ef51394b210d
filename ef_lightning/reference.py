"""EF21-Muon written out line by line: the reference the fast engine is tested against.

One function, :func:`reference_run`, runs n workers and a server on plain Python lists of tensors, exactly as
docs/algorithm.md §2 (and §4 for the variance-reduced estimators) states the steps: no layer table, no packing,
no transports, no in-place tricks, no identity shortcuts. It shares with the engine only what is part of the
protocol itself: the compressors (:mod:`ef_lightning.compressors`), the seed derivation
(:func:`ef_lightning.kernels.seed_for`) and the optimizer's LMO step for step 5. The tests hold
:class:`~ef_lightning.Simulator` and :class:`~ef_lightning.EF21Engine` to it (≤ 1e-6); read it to see what they do.

Example::

    X, W = reference_run(make_model, lambda m: build_lmo_optimizer(m, "gluon", momentum=0.0), grad_fn,
                         steps=8, n_workers=3, uplink="top_k:0.2", downlink="top_k:0.3", momentum=0.9)
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from ef_lightning import compressors as C
from ef_lightning.kernels import COIN, SERVER, seed_for

__all__ = ["reference_run"]

#: grad_fn(model, step, worker) -> that worker's gradient of its minibatch at the model's parameters, by name
GradFn = Callable[[nn.Module, int, int], Mapping[str, Tensor]]


def reference_run(
    make_model: Callable[[], nn.Module],
    make_server_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    grad_fn: GradFn,
    *,
    steps: int,
    n_workers: int,
    uplink: str = "identity",
    downlink: str = "identity",
    momentum: float = 0.0,
    nesterov: bool = False,
    estimator: str = "ef21",
    p: float = 1.0,
    seed: int = 0,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Run EF21-Muon (or a variance-reduced variant) for ``steps`` steps; return (X, W) by parameter name.

    Args:
        make_model: builds the model; called twice (the server's X and the workers' shared W start equal).
        make_server_optimizer: the optimizer of step 5 over the server model, with its own momentum off (momentum
            lives on the workers, step 2). Its parameter order is the layer order (seeds use it).
        grad_fn: ``grad_fn(model, k, j)`` returns worker j's gradient at step k keyed by parameter name, taken at
            ``model``'s current parameters (the reference passes W, or the previous W).
        steps, n_workers: how long, how many workers.
        uplink, downlink: one compressor spec for every layer (docs/algorithm.md §3).
        momentum, nesterov: worker momentum mu (torch's EMA convention) and Nesterov, for ``estimator="ef21"``;
            ``mvr`` uses ``momentum`` as 1 - a.
        estimator: ``ef21``, ``marina``, ``ef21_page`` or ``mvr`` (docs/algorithm.md §4).
        p: refresh probability of ``marina`` / ``ef21_page``.
        seed: base seed of the compressors' shared generators.
    """
    server = make_model()  # holds X
    workers = make_model()  # holds W (all workers hold the same W)
    opt = make_server_optimizer(server)
    X = [q for g in opt.param_groups for q in g["params"]]
    names = {id(q): name for name, q in server.named_parameters()}
    layer_names = [names[id(q)] for q in X]
    W = [dict(workers.named_parameters())[name] for name in layer_names]
    L = len(X)
    # one spec for every layer; a compressor that cannot take a shape (rank on a vector) sends it dense (§3)
    up, down, dense = C.build(uplink), C.build(downlink), C.build("identity")
    ups = [up if up.supports(x.shape) else dense for x in X]
    downs = [down if down.supports(x.shape) else dense for x in X]
    zeros = lambda: [torch.zeros_like(x, dtype=torch.float32) for x in X]  # noqa: E731
    M = [zeros() for _ in range(n_workers)]  # worker momentum
    G_j = [zeros() for _ in range(n_workers)]  # worker EF21 estimates
    V = [zeros() for _ in range(n_workers)]  # worker VR estimators
    G = zeros()  # server aggregate
    W_prev = None  # the previous step's W (VR estimators)

    def Q(comp: C.Compressor, x: Tensor, s: int, unbiased_scale: bool = True) -> Tensor:
        """C(x) as the receiver decodes it; an unbiased Q(omega) under EF21 is scaled by 1/(omega + 1)."""
        out = comp.decompress(comp.compress(x, seed=s)).float()
        if unbiased_scale and comp.kind == "unbiased":
            out = out / (1 + comp.constant(x.shape))
        return out

    for k in range(steps):
        # 1. every worker's gradient at W (and, for VR estimators after the first step, at the previous W)
        def grads(model: nn.Module, j: int, k: int = k) -> list[Tensor]:
            by_name = grad_fn(model, k, j)
            return [by_name[name].float() for name in layer_names]

        g = [grads(workers, j) for j in range(n_workers)]
        g_prev: list[list[Tensor]] = [grads(W_prev, j) for j in range(n_workers)] if W_prev is not None else []
        coin = k == 0 or bool(torch.rand((), generator=torch.Generator().manual_seed(seed_for(seed, k, COIN))) < p)
        for i in range(L):
            if estimator == "marina":  # 2-4. G = mean of full gradients on a coin round, else G += mean Q(g - g-)
                if coin:
                    G[i] = torch.stack([g[j][i] for j in range(n_workers)]).sum(0) / n_workers
                else:
                    Qs = [
                        Q(ups[i], g[j][i] - g_prev[j][i], seed_for(seed, k, i, j), unbiased_scale=False)
                        for j in range(n_workers)
                    ]
                    G[i] = G[i] + torch.stack(Qs).sum(0) / n_workers
                continue
            R_sum = torch.zeros_like(G[i])
            for j in range(n_workers):
                # 2. the direction D_j
                if estimator == "ef21":
                    # M = mu*M + (1-mu)*g, D = (1-mu)*g + mu*M, written as torch.optim.Muon writes them (lerp), so
                    # the rounding matches and stochastic rounding downstream (natural) sees the same inputs
                    M[j][i] = M[j][i].lerp(g[j][i], 1 - momentum)
                    D = g[j][i].lerp(M[j][i], momentum) if nesterov else M[j][i]
                    if momentum == 0:
                        D = g[j][i]
                elif estimator == "ef21_page":
                    V[j][i] = g[j][i] if coin else V[j][i] + g[j][i] - g_prev[j][i]
                    D = V[j][i]
                else:  # mvr: V = g + (1 - a)(V - g-), a = 1 - momentum; the first step V = g
                    V[j][i] = g[j][i] if not g_prev else g[j][i] + momentum * (V[j][i] - g_prev[j][i])
                    D = V[j][i]
                # 3. R_j = C_up(D_j - G_j); G_j <- G_j + R_j
                R = Q(ups[i], D - G_j[j][i], seed_for(seed, k, i, j))
                G_j[j][i] = G_j[j][i] + R
                R_sum = R_sum + R
            # 4. G <- G + (1/n) sum_j R_j
            G[i] = G[i] + R_sum / n_workers
        W_prev = copy.deepcopy(workers) if estimator != "ef21" else None
        # 5. X <- the optimizer's LMO step on G
        for x, Gi in zip(X, G):
            x.grad = Gi.clone().to(x.dtype)
        opt.step()
        opt.zero_grad(set_to_none=True)
        # 6-7. S = C_down(X - W); W <- W + S
        with torch.no_grad():
            for i in range(L):
                S = Q(downs[i], X[i].detach().float() - W[i].detach().float(), seed_for(seed, k, i, SERVER))
                W[i].add_(S.to(W[i].dtype))
    return (
        {name: x.detach().float().clone() for name, x in zip(layer_names, X)},
        {name: w.detach().clone() for name, w in zip(layer_names, W)},
    )
