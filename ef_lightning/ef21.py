"""EF21-Muon: compressed data-parallel LMO training with error feedback in both directions.

The algorithm of Gruntkowska, Gaponov, Tovmasyan and Richtárik, *EF21-Muon* (arXiv 2510.00643); docs/algorithm.md
§2 writes it out. Server state: exact model X, aggregate G; worker j: momentum M_j, EF21 estimate G_j; every rank
holds the shadow model W in the module's parameters. One step::

    1. g_j = grad f_j(W)                                      (the framework's backward)
    2. M_j <- mu*M_j + (1-mu)*g_j ; D_j = nesterov ? (1-mu)*g_j + mu*M_j : M_j
    3. R_j = C_up(D_j - G_j) ; G_j <- G_j + R_j ; send R_j    (EF21, arXiv 2106.05203; identity sends D_j)
    4. server: G <- G + (1/n) sum_j R_j                        (so G = mean_j G_j)
    5. server: X <- X*(1 - lr*wd) - t*d(G)                     (the optimizer's own rule, momentum off)
    6. server: S = C_down(X - W) ; W <- W + S ; send S          (EF21-P, arXiv 2209.15218)
    7. workers: W <- W + S

Where things live: the per-layer kernels of each step are free functions in :mod:`ef_lightning.kernels`; the
state and its state_dicts in :mod:`ef_lightning.state`; a line-by-line pure-PyTorch version of the whole step, the
reference the tests hold this against, in :mod:`ef_lightning.reference`; the options in
:class:`~ef_lightning.config.EF21Config`. This module orchestrates one step (:meth:`_EF21Base._sync`, shared by
both classes) and drives the optimizer:

* :class:`EF21Engine` runs one worker (and its share of the server) of a torch.distributed process group through a
  :class:`~ef_lightning.comm.Transport`; without a process group it runs as the only worker. Once built, the
  optimizer's ``step()`` *is* the EF21 step (below).
* :class:`Simulator` runs n workers and the server in one process (research, tests), same kernels and ledger.

Driving the optimizer (one mechanism for every integration): the engine takes the optimizer over. Its ``step``
becomes :meth:`EF21Engine.optimizer_step` (a bound method, so torch's LR schedulers keep wrapping it), the engine's
own server update (step 5) calls the optimizer's original ``step``, and a step pre-hook makes any other route to
the original update (``type(opt).step(opt)``, a stale bound method) an error instead of a silent un-synced step.
A second engine on the same optimizer takes it over from the first; :meth:`detach` hands it back.

The momentum and Nesterov flag come from an :class:`~ef_lightning.LMO`'s groups; the optimizer's own momentum is
switched off (``LMO.external_momentum``) so the hyperparameters mean the same with and without compression. Any
other torch optimizer works too: then there is no worker momentum and it receives G as its gradient.
"""

from __future__ import annotations

import abc
import collections
import contextlib
import dataclasses
import functools
import hashlib
import os
import time
import types
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FullyShardedDataParallel as _FSDP1
from torch.distributed.tensor import DTensor
from torch.utils.hooks import RemovableHandle

from ef_lightning import compressors as _comp
from ef_lightning import kernels as K
from ef_lightning.comm import (
    OTHER_SHARE,
    HierarchicalTransport,
    Ledger,
    LocalTransport,
    Pending,
    ServerTransport,
    StepRecord,
    Transport,
    broadcast_tensors_,
    build_transport,
)
from ef_lightning.config import REFRESH_ESTIMATORS, EF21Config
from ef_lightning.optim import LMO, _classify
from ef_lightning.state import (
    Group,
    LayerSpec,
    ServerState,
    WireLayout,
    WorkerState,
    assign_buckets,
    build_groups,
    fragment_of,
    group_rows_,
    load_optimizer_state,
    load_tensors,
    optimizer_state,
    tensors_state,
    zeros32,
)

__all__ = ["EF21Engine", "Simulator", "LayerSpec"]

_IDENTITY = _comp.build("identity")
Closure = Callable[[], Any]
# optimizer -> the engine driving it (weakly: a dropped engine stops guarding)
_DRIVERS: weakref.WeakKeyDictionary[torch.optim.Optimizer, weakref.ref[_EF21Base]] = weakref.WeakKeyDictionary()


def _role_of(group: Mapping[str, Any], p: Tensor, classified: Mapping[int, str]) -> str:
    """The group's ``role`` (LMO param groups carry one), else the role read from the model's structure (so a
    per-role compressor mapping also works with AdamW & co.), else matrix -> hidden, vector -> vector."""
    role = group.get("role") or classified.get(id(p))
    if role is not None and role != "other":
        return role
    return "hidden" if p.ndim >= 2 else "vector"


def _grads_of(layers: Sequence[LayerSpec], clone: bool) -> list[Tensor]:
    out = []
    for L in layers:
        g = L.grad
        out.append(torch.zeros_like(L.w) if g is None else g.clone() if clone else g)
    return out


class _GradView(Sequence[Tensor]):
    """``grads[i]``: layer i's current gradient (zeros when it has none), read when asked (a bucket at a time)."""

    def __init__(self, layers: Sequence[LayerSpec]) -> None:
        self.layers = layers

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> Tensor:  # type: ignore[override]
        L = self.layers[i]
        g = L.grad
        return g if g is not None else torch.zeros_like(L.w)


def _grad_version(p: Tensor) -> tuple[Tensor | None, int]:
    """``p.grad`` and its in-place version: compared with ``is`` and ``==``, they change when anything replaces or
    modifies the gradient in place (except through ``.data``, which autograd does not version)."""
    return (p.grad, -1 if p.grad is None else p.grad._version)


def _same_grad(p: Tensor, seen: tuple[Tensor | None, int]) -> bool:
    now = _grad_version(p)
    return now[0] is seen[0] and now[1] == seen[1]


def _local_world_size(config: EF21Config) -> int:
    """Processes per node for ``hierarchical``: the config's, else the launcher's ``LOCAL_WORLD_SIZE``."""
    if config.topology != "hierarchical" or config.local_world_size is not None:
        return config.local_world_size or 1
    env = os.environ.get("LOCAL_WORLD_SIZE")
    if env is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            raise ValueError(
                "topology='hierarchical' needs the node layout: pass local_world_size=<processes per node> or launch "
                "with torchrun / accelerate launch (they set LOCAL_WORLD_SIZE); Lightning's strategy passes devices"
            )
        return 1
    if not env.isdigit() or int(env) < 1:
        raise ValueError(f"LOCAL_WORLD_SIZE={env!r} in the environment; valid values: integers >= 1")
    return int(env)


def _check_sharded(optimizer: torch.optim.Optimizer, config: EF21Config) -> bool:
    """Whether the optimizer's parameters are FSDP2 DTensors (then the options they need are checked)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    sharded = [isinstance(p, DTensor) for p in params]
    if not any(sharded):
        return False
    if not all(sharded):
        raise ValueError(
            f"{sum(sharded)} of {len(params)} parameters are DTensors: shard the whole model with fully_shard (every "
            "parameter a DTensor on the node's mesh) or none of it"
        )
    if config.topology != "hierarchical":
        raise ValueError(
            f"FSDP2-sharded parameters need topology='hierarchical' (got {config.topology!r}): the parameters are "
            "sharded over the processes of a node and EF21 runs across nodes on the local shards; valid choice: "
            "topology='hierarchical'"
        )
    low = sorted({str(p.dtype) for p in params if p.dtype != torch.float32})
    if low:
        raise ValueError(
            f"FSDP2-sharded parameters in {', '.join(low)}: keep the sharded parameters float32 (X is updated in "
            "them) and train in low precision with fully_shard(..., mp_policy=MixedPrecisionPolicy(param_dtype=...))"
        )
    return True


def _check_mesh(optimizer: torch.optim.Optimizer, t: HierarchicalTransport) -> None:
    """Every DTensor parameter is sharded over exactly this process's node (a 1-D mesh: FSDP2, not HSDP)."""
    for g in optimizer.param_groups:
        for p in g["params"]:
            ranks = p.device_mesh.mesh.flatten().tolist()
            if p.device_mesh.ndim != 1 or ranks != t.node_ranks:
                raise ValueError(
                    f"a parameter is sharded over ranks {ranks} (mesh of {p.device_mesh.ndim} dimension(s)); "
                    f"topology='hierarchical' with FSDP2 needs each node's parameters sharded over that node's ranks "
                    f"{t.node_ranks} only: fully_shard(module, mesh=init_device_mesh(device, (nodes, "
                    f"{t.local_world_size}), mesh_dim_names=('replicate', 'shard'))['shard']) (not HSDP's 2-D mesh: "
                    "EF21 replaces its replicate all-reduce)"
                )


def _common_dtype(params: Sequence[Tensor]) -> torch.dtype:
    """The one dtype of ``params``, else float32 (dense node traffic travels in the training dtype, like DDP's)."""
    dtypes = {p.dtype for p in params}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _empty(dtype: torch.dtype, engine: EF21Engine) -> Tensor:
    return torch.empty(0, dtype=dtype, device=engine.transport.device)  # (an empty share has no parameter device)


def _nonfinite(grads: Sequence[Tensor]) -> bool:
    """Whether any gradient has a NaN or inf: one host sync for all of them (not one per tensor)."""
    return bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


class _EF21Base(abc.ABC):
    """What the engine and the Simulator share: the layer table, state layout, one step's orchestration, the
    ledger, evaluation at X, checkpoint helpers, and the hold on the optimizer."""

    replicated = False  # every process computes X for every layer (allgather): no downlink
    _bucketed = False  # several uplink buckets (overlap with backward), else one
    _uplink_timing = (0.0, 0.0)  # this step's uplink seconds and the part of them hidden behind backward
    _extra_sent = (0, 0)  # uplink bits and wire bytes of early sends this step dropped (resync or skip)
    _intra_sent = 0  # hierarchical: bytes this step already sent inside the node (counted when it is skipped)
    _sent_grads: dict[int, Tensor]  # group -> the stacked gradients its early send encoded (overlap)
    _step_hint = ""  # how to step instead, for the guard's error
    # set by the subclass's __init__ (after this class's): the layers this process serves, the server state (X, G)
    # of those layers, and the state of each worker this process runs, by worker index
    served: list[LayerSpec]
    server: ServerState
    _workers: dict[int, WorkerState]

    def __init__(
        self,
        model: nn.Module | Sequence[tuple[str, nn.Parameter]],
        optimizer: torch.optim.Optimizer,
        config: EF21Config,
        owners: Callable[[list[int]], list[int]],
        route_step: Callable[[Closure | None], Any] | None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.config = config
        self.optimizer = optimizer
        named = list(model.named_parameters()) if isinstance(model, nn.Module) else list(model)
        names = {id(p): n for n, p in named}
        params = [(p, g) for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        unknown = [tuple(p.shape) for p, _ in params if id(p) not in names]
        if unknown:
            raise ValueError(f"optimizer holds {len(unknown)} parameter(s) not in the model (shapes {unknown[:3]})")
        classified = {id(q): role for _, q, role, *_ in _classify(model)} if isinstance(model, nn.Module) else {}
        is_lmo = isinstance(optimizer, LMO)
        #: local training (``sync_every > 1``): inner steps with the optimizer's own rule, an outer sync every H
        self.local_steps = config.local_steps
        self.sync_every = config.sync_every
        if self.local_steps and config.outer == "lmo" and not is_lmo:
            raise ValueError(
                f"outer='lmo' takes the LMO step of the optimizer's norms; {type(optimizer).__name__} has none: use "
                "an ef_lightning.LMO (build_lmo_optimizer) or outer='nesterov' (valid choices: nesterov, lmo)"
            )
        self._lmo_outer: set[int] = set()  # uids of the layers whose outer step is the LMO step (outer='lmo')
        #: every parameter the optimizer trains, in its order; ``layers``: those this process runs EF21 on (all,
        #: except in ``hierarchical``, where the other processes of the node handle the other shares)
        self.all_layers: list[LayerSpec] = []
        for i, ((p, group), owner) in enumerate(zip(params, owners([p.numel() for p, _ in params]))):
            role = _role_of(group, p, classified)
            # with local steps the momentum is the optimizer's own (inner); the outer delta is sent as it is
            worker_momentum = is_lmo and group.get("norm") != "adamw" and not self.local_steps
            if self.local_steps and config.outer == "lmo" and group.get("norm") != "adamw":
                self._lmo_outer.add(i)
            self.all_layers.append(
                LayerSpec(
                    index=i,
                    name=names[id(p)],
                    param=p,
                    role=role,
                    owner=owner,
                    up=config.compressor("uplink", role, p.shape),
                    down=config.compressor("downlink", role, p.shape),
                    momentum=float(group.get("momentum", 0.0)) if worker_momentum else 0.0,
                    nesterov=bool(group.get("nesterov", False)) if worker_momentum else False,
                    uid=i,
                )
            )
        mine = [L for L in self.all_layers if L.owner != OTHER_SHARE]
        self.layers: list[LayerSpec] = [dataclasses.replace(L, index=k) for k, L in enumerate(mine)]
        self.fused = config.fused
        buckets = [0] * len(self.layers)
        #: streaming (``fragments=F > 1``): each layer's fragment, synchronised at its own staggered steps; the
        #: fragments are the uplink buckets (one wire buffer each), so a fragment's sync moves only its layers
        self.fragments = config.fragments
        self._frag: int | None = None  # the fragment being synchronised (None: every layer)
        if self.fragments > 1:
            if len(self.all_layers) < self.fragments:
                raise ValueError(
                    f"fragments={self.fragments} but the optimizer trains {len(self.all_layers)} tensor(s): each "
                    f"fragment needs at least one; valid values: 1 .. {len(self.all_layers)}"
                )
            of = fragment_of([L.param.numel() for L in self.all_layers], self.fragments)
            buckets = [of[L.uid] for L in self.layers]
            # every layer's fragment, whatever its share (the same table on every process)
            self.layer_buckets = {L.uid: of[L.uid] for L in self.all_layers}
        else:
            if self._bucketed:
                mib = 1 << 20
                sizes = [4 * L.param.numel() for L in self.layers]
                cap = int(config.bucket_cap_mb * mib)
                buckets = assign_buckets(sizes, cap, min(mib, cap))
            self.layer_buckets = {L.uid: b for L, b in zip(self.layers, buckets)}  # by uid
        self.groups: list[Group] = build_groups(self.layers, buckets)
        self.n_buckets = 1 + max((g.bucket for g in self.groups), default=0)
        # bits one worker sends (by MARINA refresh round) and the server side sends per step: fixed by the shapes
        self._up_bits = {r: self._bits(self.layers, "up", r) for r in (False, True)}
        self._down_bits = self._bits(self.layers, "down")
        self.p = config.p
        if self.p is None and config.estimator in REFRESH_ESTIMATORS:
            # MARINA's choice p = (bits of Q) / (bits of a dense message) (arXiv 2102.07845, Cor. 2.1)
            dense = sum(32 * L.param.numel() for L in self.layers)
            self.p = min(1.0, max(1e-6, self._up_bits[False] / dense))
        self.step_count = 0  # steps taken, skipped ones included (seeds use it)
        self.applied = 0  # applied steps: the first one of a VR estimator is a full refresh
        self.ledger = Ledger()
        self.dense_bytes = sum(L.w.numel() * L.w.element_size() for L in self.layers)
        self._W_prev: dict[int, Tensor] = {}  # W where the last gradient was taken (VR estimators only)
        self._frag_counts: dict[int, tuple[int, int, list[int], list[int]]] = {}
        self._set_aside: dict[str, Tensor] = {}  # the parameters' values while X is loaded for evaluation
        self._sent_grads = {}
        self._take_over(optimizer, route_step)

    # --------------------------------------------------------------------------------------------- options
    @property
    def estimator(self) -> str:
        return self.config.estimator

    @property
    def participation(self) -> float | None:
        return self.config.participation

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def needs_previous_gradient(self) -> bool:
        """True when the next step needs a second gradient on the same minibatch at the previous point."""
        return self.config.variance_reduced and self.applied > 0

    # --------------------------------------------------------------------------------------------- the optimizer
    def _take_over(self, optimizer: torch.optim.Optimizer, route_step: Callable[[Closure | None], Any] | None) -> None:
        """Hold ``optimizer``: guard its own update, and with ``route_step`` make ``optimizer.step`` call it."""
        ref = _DRIVERS.get(optimizer)
        previous = ref() if ref is not None else None
        if previous is not None:
            previous.detach()  # a notebook re-running a cell: the new engine takes over
        if isinstance(optimizer, LMO) and not self.local_steps:  # momentum lives on the workers (step 2)
            optimizer.external_momentum = True
            for L in self.all_layers:
                optimizer.state.get(L.param, {}).pop("momentum_buffer", None)
        self._own_step = optimizer.__dict__.get("step")  # an instance-level step (an LR scheduler's wrapper) or None
        self._update = optimizer.step  # step 5 runs this: the optimizer's own update
        self._in_update = False
        me = weakref.ref(self)

        def guard(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            engine = me()
            if engine is not None and not engine._in_update:
                raise RuntimeError(
                    f"the optimizer's own step() ran while an EF21 {type(engine).__name__} drives "
                    f"it: that step would skip the compressed sync. {engine._step_hint} or call "
                    "detach() to hand the optimizer back"
                )

        self._hook: RemovableHandle | None = optimizer.register_step_pre_hook(guard)
        self._routed = route_step is not None
        if route_step is not None:

            def step(opt: torch.optim.Optimizer, closure: Closure | None = None, **kwargs: Any) -> Any:
                return route_step(closure)  # (extra keyword arguments of a framework's call: unused)

            # says what it wraps: an LR scheduler's "step() is patched" mark carries over, and torch's scheduler
            # wrapper (which calls ``step.__func__``) needs a bound method
            functools.update_wrapper(step, self._update)
            optimizer.step = types.MethodType(step, optimizer)  # type: ignore[method-assign]
        _DRIVERS[optimizer] = me

    def detach(self) -> None:
        """Hand the optimizer back: its own ``step()`` works again, with its own momentum. Idempotent."""
        if self._hook is None:
            return
        self._hook.remove()
        self._hook = None
        if self._routed:
            if self._own_step is None:
                self.optimizer.__dict__.pop("step", None)
            else:
                self.optimizer.step = self._own_step  # type: ignore[method-assign]
        if isinstance(self.optimizer, LMO):
            self.optimizer.external_momentum = False
        if _DRIVERS.get(self.optimizer) is not None and _DRIVERS[self.optimizer]() is self:
            del _DRIVERS[self.optimizer]

    def _server_update(self) -> None:
        """Step 5: the optimizer's own rule on the served parameters (pointed at X, with grad G); with local steps
        the outer step instead (:meth:`_outer_update`)."""
        if self.local_steps:
            self._outer_update()
            return
        params = [L.param for L in self.layers]
        served = {L.index for L in self.served}
        X = [self.server.X.get(L.index) if L.index in served else None for L in self.layers]
        G = [self.server.G[L.index] if L.index in served else None for L in self.layers]
        others = [L.param for L in self.all_layers if L.owner == OTHER_SHARE]  # another process's share: no grad
        params, X, G = params + others, X + [None] * len(others), G + [None] * len(others)
        with K.server_view(params, X, G):
            self._in_update = True
            try:
                self._update()
            finally:
                self._in_update = False

    # --------------------------------------------------------------------------------------------- local steps
    def _init_local(self) -> None:
        """Local-step state, once ``served`` exists: W at the start of the round (the shared W of EF21-P, float32,
        for the layers this process syncs) and the Nesterov outer momentum of the served layers."""
        self._start: dict[int, Tensor] = {}
        self._outer_buf: dict[int, Tensor] = {}
        if not self.local_steps:
            return
        self._begin_round()
        self._outer_buf = {L.index: zeros32(L.w) for L in self.served if L.uid not in self._lmo_outer}

    def _begin_round(self) -> None:
        """W_start := W for the layers just synchronised (every layer at the start)."""
        for L in self._synced(self.layers):
            self._start[L.index] = L.w.float().clone()

    @contextlib.contextmanager
    def _fragment(self, f: int | None) -> Iterator[None]:
        """Inside the block the sync, the outer step, the books and W_start act on fragment ``f``'s layers (None:
        every layer)."""
        before, self._frag = self._frag, f
        try:
            yield
        finally:
            self._frag = before

    def _synced(self, layers: Sequence[LayerSpec]) -> list[LayerSpec]:
        """``layers`` of the fragment being synchronised (all of them outside a streaming sync)."""
        f = self._frag
        return list(layers) if f is None else [L for L in layers if self.layer_buckets[L.uid] == f]

    def due(self, step: int | None = None) -> int | None:
        """With local steps: the fragment whose synchronisation follows optimizer step ``step`` (default: the next
        one, :attr:`step_count`), else None (an inner step only). Fragment f syncs after steps s with
        (s + 1 + f*H//F) % H == 0 (Streaming DiLoCo's staggered schedule); one fragment (F = 1): every H-th step.
        Without local steps every step synchronises (fragment 0)."""
        s = self.step_count if step is None else step
        for f in range(self.fragments):
            if (s + 1 + f * self.sync_every // self.fragments) % self.sync_every == 0:
                return f
        return None

    def _inner_update(self, grads: Sequence[Tensor]) -> None:
        """One inner step: the optimizer's own rule (its own momentum / moments) on this process's layers with
        gradients ``grads`` (in :attr:`layers` order); another process's share (``hierarchical``) is left alone."""
        others = [L.param for L in self.all_layers if L.owner == OTHER_SHARE]
        params = [L.param for L in self.layers] + others
        G: list[Tensor | None] = [*grads, *([None] * len(others))]
        with K.server_view(params, [None] * len(params), G):
            self._in_update = True
            try:
                self._update()
            finally:
                self._in_update = False

    def _outer_delta(self, grads: Sequence[Tensor] | None) -> list[Tensor]:
        """The round's last inner step (``grads``; ``None``: skipped), then the outer delta W_start - W_j of the
        layers being synchronised, which go back to W_start (where the downlink's EF21-P update applies); the other
        fragments' entries are empty (not read) and their layers keep W_j."""
        if grads is not None:
            self._inner_update(grads)
        synced = {L.index for L in self._synced(self.layers)}
        delta = []
        for L in self.layers:
            if L.index not in synced:  # (empty, on the layer's device: never read, finite)
                delta.append(L.w.new_zeros(0, dtype=torch.float32))
                continue
            start = self._start[L.index]
            delta.append(start - L.w.float())
            L.w.copy_(start)
        return delta

    def _inner_record(self, skipped: bool, evals: int = 1, intra: int = 0) -> None:
        """The ledger record of an inner step that does not synchronise: no bits, the dense baseline of the step."""
        self.ledger.record(
            StepRecord(
                step=self.step_count,
                skipped=skipped,
                dense_bytes=0 if skipped else self.dense_bytes,
                gradient_evals=evals,
                intra_node_bytes=intra,
                synced=False,
            )
        )
        self.step_count += 1

    def _inner_nonfinite(self, where: str) -> None:
        msg = f"EF21 inner step {self.step_count}: non-finite gradient on {where}; this local step skipped"
        if self.config.on_nonfinite == "raise":
            raise FloatingPointError(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=5)

    @torch.no_grad()
    def _outer_update(self) -> None:
        """The outer step on the served layers' X with the aggregated outer delta G: DiLoCo's Nesterov SGD
        (B <- m*B + G; X <- X - outer_lr*(G + m*B), torch.optim.SGD(nesterov=True)'s arithmetic), or for the
        ``outer='lmo'`` layers the optimizer's own LMO rule at radius outer_lr*lr*scale (lr: the group's current,
        scheduled value; momentum, weight decay, Scion's constrained shrink and Gluon's adaptive radius off: the
        inner steps apply those)."""
        lr, m = self.config.outer_step_size, self.config.outer_momentum
        lmo = []
        for L in self._synced(self.served):
            if L.uid in self._lmo_outer:
                lmo.append(L)
                continue
            x, agg, buf = self.server.X[L.index], self.server.G[L.index], self._outer_buf[L.index]
            buf.mul_(m).add_(agg)
            x.add_(agg.add(buf, alpha=m), alpha=-lr)
        if not lmo:
            return
        assert isinstance(self.optimizer, LMO)  # __init__ allows outer='lmo' with an LMO only
        # the pure LMO step at radius outer_lr*lr*scale: no weight decay, no Frank-Wolfe shrink (constrained), no
        # adaptive radius (l0/l1), momentum off; the group settings are put back afterwards
        opt, pure = self.optimizer, {"weight_decay": 0.0, "constrained": False, "l0": None, "l1": None}
        saved = [{k: g.get(k) for k in ("lr", *pure)} for g in opt.param_groups]
        external = opt.external_momentum
        X_of = {L.uid: self.server.X[L.index] for L in lmo}  # (server state is keyed by this process's index)
        G_of = {L.uid: self.server.G[L.index] for L in lmo}
        params = [L.param for L in self.all_layers]
        X = [X_of.get(L.uid) for L in self.all_layers]
        G = [G_of.get(L.uid) for L in self.all_layers]
        try:
            opt.external_momentum = True
            for g in opt.param_groups:
                g.update(pure, lr=g["lr"] * lr)
            with K.server_view(params, X, G):
                self._in_update = True
                LMO.step(opt)  # the class's rule, not a (scheduler-wrapped) bound step: inner steps count those
        finally:
            self._in_update = False
            opt.external_momentum = external
            for g, before in zip(opt.param_groups, saved):
                g.update(before)

    def _local_state(self) -> dict[str, Any]:
        """Local-step state of this process: the round's start, this worker's parameters (they differ between
        workers mid-round), the outer momentum."""
        if not self.local_steps:
            return {}
        return {
            "start": tensors_state(self._start, self.layers),
            "params": {L.name: self._set_aside.get(L.name, L.w).clone() for L in self.all_layers},
            "outer_buf": tensors_state(self._outer_buf, self.served),
        }

    def _load_local(self, state: Mapping[str, Any]) -> None:
        if not self.local_steps:
            return
        saved = state["local"]  # (present: _load_common checked the local-step options first)
        load_tensors(self._start, saved["start"], self.layers, "local.start")
        load_tensors(self._outer_buf, saved["outer_buf"], self.served, "local.outer_buf")
        with torch.no_grad():
            for L in self.all_layers:
                if L.name not in saved["params"]:
                    raise ValueError(f"EF21 state is missing local.params[{L.name!r}]")
                L.w.copy_(saved["params"][L.name])

    # --------------------------------------------------------------------------------------------- one step
    def _refresh(self) -> bool:
        """The shared Bernoulli(p) coin of ``marina`` / ``ef21_page`` (always heads on the first applied step)."""
        if self.estimator not in REFRESH_ESTIMATORS:
            return False
        if self.applied == 0:
            return True
        assert self.p is not None  # __init__ sets p for the estimators with a refresh coin
        g = torch.Generator().manual_seed(K.seed_for(self.seed, self.step_count, K.COIN))
        return bool(torch.rand((), generator=g) < self.p)

    def _participants(self, n: int) -> list[int]:
        """This round's workers: all, or a seeded subset of round(participation * n) (at least one)."""
        if self.participation is None:
            return list(range(n))
        k = max(1, round(self.participation * n))
        g = torch.Generator().manual_seed(K.seed_for(self.seed, self.step_count, K.SUBSET))
        return sorted(torch.randperm(n, generator=g)[:k].tolist())

    def _up_comp(self, L: LayerSpec | Group, refresh: bool) -> _comp.Compressor:
        """The uplink compressor this step: a MARINA refresh round sends full gradients."""
        return _IDENTITY if (refresh and self.estimator == "marina") else L.up

    def _exact_identity(self, comp: _comp.Compressor) -> bool:
        # identity sends the value itself (not a difference) only when every worker reports every step
        return comp.kind == "identity" and self.participation is None

    def _init_rows(self) -> None:
        """Put each group's state in the rows of one (L, d) tensor (the per-layer dicts keep views); build the wire
        layouts. Called by the subclasses once ``served``, ``_workers`` and ``server`` exist."""
        n_owners = len(self._owner_slots())
        self.up_layout = {
            r: WireLayout(self.groups, lambda g, r=r: self._up_comp(g, r), n_owners, by_bucket=True)
            for r in (False, True)
        }
        self.down_layout = WireLayout(self.groups, lambda g: g.down, n_owners, by_bucket=self.fragments > 1)
        served = {L.index for L in self.served}
        self.served_groups = [g for g in self.groups if g.layers[0].index in served]
        self._rows: dict[tuple[Any, ...], Tensor | None] = {}
        for g in self.groups:
            for j, ws in self._workers.items():
                for k in ("M", "G", "V"):
                    self._rows[j, k, g.index] = group_rows_(getattr(ws, k), g)
        for g in self.served_groups:
            for k in ("X", "G"):
                self._rows["server", k, g.index] = group_rows_(getattr(self.server, k), g)

    def _owner_slots(self) -> list[int]:
        return [0]

    def _seeds(self, g: Group, sender: int) -> list[int]:
        return [K.seed_for(self.seed, self.step_count, L.uid, sender) for L in g.layers]

    @staticmethod
    def _stack(tensors: Sequence[Tensor], g: Group) -> Tensor:
        return torch.stack([tensors[i].reshape(-1) for i in g.indices]).float()

    def _encode_bucket(
        self,
        bucket: int,
        worker: int,
        grads: Sequence[Tensor],
        prev: Sequence[Tensor] | None,
        refresh: bool,
        finite: list[Tensor] | None = None,
        tentative: bool = False,
    ) -> list[Tensor]:
        """Steps 2-3 for one worker and one bucket: its packed messages, one uint8 buffer per owner slot.
        ``prev``: the gradients on the same minibatch at the previous W (VR estimators after their first step;
        docs/algorithm.md §4). ``finite`` collects a flag per group. ``tentative`` (``ef21`` only): the worker state
        is left as it is (:meth:`EF21Engine._commit` updates it once the step is known good from the stacked
        gradients kept here)."""
        layout = self.up_layout[refresh]
        bufs = [torch.empty(n, dtype=torch.uint8, device=self._device) for n in layout.lengths[bucket]]
        for g in self.groups:
            if g.bucket != bucket:
                continue
            gr = self._stack(grads, g)
            if finite is not None:  # sent before the check: a non-finite gradient must still encode (then dropped)
                finite.append(torch.isfinite(gr).all())
                gr.nan_to_num_(0.0, 0.0, 0.0)
            gp = self._stack(prev, g) if prev is not None else None
            comp = self._up_comp(g, refresh)
            seeds = self._seeds(g, worker)
            M, G_j, V = (self._rows[worker, k, g.index] for k in ("M", "G", "V"))
            if self.estimator == "marina":
                parts = K.uplink_marina(comp, gr, gp, refresh, g.shape, seeds, self.fused)
            elif tentative:  # D from an out-of-place momentum update; M and G_j stay untouched until the commit
                assert G_j is not None
                self._sent_grads[g.index] = gr  # kept until the step (as DDP keeps its buckets)
                D = K.ef21_direction_out(M, gr, g.momentum, g.nesterov)
                exact = self._exact_identity(comp)
                parts = K.encode(comp, D if exact else D - G_j, g.shape, seeds, self.fused)
            else:
                if self.estimator == "ef21":
                    D = K.ef21_direction(M, gr, g.momentum, g.nesterov)
                else:
                    assert V is not None  # ef21_page and mvr keep V_j
                    D = (
                        K.page_direction(V, gr, gp, refresh)
                        if self.estimator == "ef21_page"
                        else K.mvr_direction(V, gr, gp, g.momentum)
                    )
                assert G_j is not None  # every estimator but marina keeps G_j
                parts = K.uplink_ef21(comp, D, G_j, g.shape, seeds, self._exact_identity(comp), self.fused)
            _, slot = layout.where(g)
            for dst, part in zip(layout.views(bufs[slot], g), parts):
                dst.copy_(part)
        return bufs

    def _aggregate(
        self, g: Group, bufs: Sequence[Tensor], senders: Sequence[int], n_workers: int, refresh: bool
    ) -> None:
        """Step 4 for one served group; MARINA: the mean of the senders' full gradients on a refresh round, else
        G += the mean of their Q(gradient differences)."""
        comp = self._up_comp(g, refresh)
        marina = self.estimator == "marina"
        G = self._rows["server", "G", g.index]
        assert G is not None  # every served group has server rows
        layout = self.up_layout[refresh]
        K.aggregate_(
            G,
            comp,
            [layout.views(buf, g) for buf in bufs],
            [self._seeds(g, j) for j in senders],
            g.shape,
            divisor=len(senders) if marina else n_workers,
            replace=(marina and refresh) or (not marina and self._exact_identity(comp)),
            fused=self.fused,
            scale_unbiased=not marina,
        )

    def _downlink(self) -> None:
        """Steps 6-7: the served groups' S = C(X - W) into this rank's downlink buffer, exchanged, applied to W
        (streaming: the fragment being synchronised only)."""
        layout, f = self.down_layout, self._frag
        if f is not None and not self._has_fragment(f):
            return  # (hierarchical: this share has no layer in the fragment; neither has the rest of its group)
        b = f or 0
        mine = torch.empty(layout.lengths[b][self._my_slot()], dtype=torch.uint8, device=self._device)
        for g in self.served_groups:
            if f is not None and g.bucket != f:
                continue
            X = self._rows["server", "X", g.index]
            assert X is not None  # not replicated: the server keeps X apart from the parameters
            parts = K.downlink_message(
                g.down, X, [L.w for L in g.layers], g.shape, self._seeds(g, K.SERVER), self.fused
            )
            for dst, part in zip(layout.views(mine, g), parts):
                dst.copy_(part)
        bufs = self._exchange_downlink(mine, layout.lengths[b])
        for g in self.groups:
            if f is not None and g.bucket != f:
                continue
            parts = layout.views(bufs[max(g.owner, 0)], g)
            K.apply_downlink_([L.w for L in g.layers], g.down, parts, g.shape, self._seeds(g, K.SERVER), self.fused)

    def _my_slot(self) -> int:
        return 0

    @property
    def _device(self) -> torch.device:
        return self.layers[0].w.device if self.layers else torch.device("cpu")

    def _has_fragment(self, f: int) -> bool:
        return any(g.bucket == f for g in self.groups)

    @torch.no_grad()
    def _sync(
        self,
        grads: Mapping[int, Sequence[Tensor]],
        prev: Mapping[int, Sequence[Tensor]] | None,
        n_workers: int,
        fragment: int | None = None,
    ) -> bool:
        """Steps 2-7 for the workers this process runs (``grads[j][i]``: worker j, layer i) and the layers it
        serves; ``fragment``: only that fragment's layers (streaming; the other entries of ``grads`` are not read).
        Returns False when the step was skipped for a non-finite gradient (then no state changed)."""
        with self._fragment(fragment):
            return self._sync_layers(grads, prev, n_workers)

    def _sync_layers(
        self, grads: Mapping[int, Sequence[Tensor]], prev: Mapping[int, Sequence[Tensor]] | None, n_workers: int
    ) -> bool:
        participants = self._participants(n_workers)
        refresh = self._refresh()
        local = [j for j in participants if j in grads]
        bad = [j for j in local if _nonfinite(grads[j]) or (prev is not None and _nonfinite(prev[j]))]
        if self._anywhere(bool(bad)):
            self._skip(bad)
            return False
        if self.config.variance_reduced:  # remember W, where these gradients were taken
            self._W_prev = {L.index: L.w.clone() for L in self.layers}
        # 2-3: each local worker's messages, bucket by bucket, and 4: aggregate the served groups
        received: dict[int, list[Tensor]] = {}
        seconds = 0.0
        f = self._frag
        for b in range(self.n_buckets) if f is None else ([f] if self._has_fragment(f) else []):
            messages = {
                j: self._encode_bucket(b, j, grads[j], prev[j] if prev is not None else None, refresh) for j in local
            }
            t0 = time.perf_counter()
            received[b] = self._exchange_uplink(b, messages, participants, refresh)
            seconds += time.perf_counter() - t0
        self._uplink_timing = (seconds, 0.0)
        for g in self.served_groups:
            if g.bucket in received:
                self._aggregate(g, received[g.bucket], participants, n_workers, refresh)
        self._finish(refresh, participants, local, prev is not None)
        return True

    def _finish(self, refresh: bool, participants: Sequence[int], local: Sequence[int], vr: bool) -> None:
        """Steps 5-7 and the books, once G holds this step's aggregate."""
        # every rank runs the optimizer's update, serving layers or not (then it has no grads and moves nothing):
        # an LR scheduler counts optimizer steps through it
        self._server_update()
        if not self.replicated:
            self._downlink()
        elif self.local_steps or any(L.param.dtype != torch.float32 for L in self.layers):
            # replicated: W is X (cast to the training dtype; float32 parameters are X themselves, except with local
            # steps, where they hold W_j: then the layers just synchronised get X)
            for L in self._synced(self.layers):
                if L.index in self.server.X:
                    L.w.copy_(self.server.X[L.index])
        rec = self._record(refresh, participants, local, vr)
        rec.uplink_seconds, rec.uplink_overlap_seconds = self._uplink_timing
        rec.uplink_bits += self._extra_sent[0]
        rec.uplink_wire_bytes += self._extra_sent[1]
        self._extra_sent = (0, 0)
        self.ledger.record(rec)
        self.step_count += 1
        self.applied += 1

    def _skip(self, bad: Sequence[int]) -> None:
        msg = f"EF21 step {self.step_count}: non-finite gradient on {self._where(bad)}; step skipped on every worker"
        if self.config.on_nonfinite == "raise":
            raise FloatingPointError(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)
        bits, wire = self._extra_sent  # an overlapped step's uplink went out before the check
        self._extra_sent = (0, 0)
        self.ledger.record(
            StepRecord(
                step=self.step_count,
                skipped=True,
                uplink_bits=bits,
                uplink_wire_bytes=wire,
                intra_node_bytes=self._intra_sent,
            )
        )
        self.step_count += 1

    # what differs between one process of a group and n simulated workers
    @abc.abstractmethod
    def _anywhere(self, flag: bool) -> bool:
        """True everywhere when ``flag`` is True on any process."""

    @abc.abstractmethod
    def _where(self, bad: Sequence[int]) -> str:
        """Where a non-finite gradient was, for the warning."""

    @abc.abstractmethod
    def _exchange_uplink(
        self, bucket: int, messages: Mapping[int, list[Tensor]], participants: Sequence[int], refresh: bool
    ) -> list[Tensor]:
        """Move one bucket's messages (``messages[j]``: worker j's buffer per owner slot); return the buffers
        addressed to this process (its owner slot), one per sender in participant order."""

    @abc.abstractmethod
    def _exchange_downlink(self, mine: Tensor, lengths: Sequence[int]) -> list[Tensor]:
        """Move this process's S buffer (``lengths``: every owner slot's buffer size, bytes); return every owner
        slot's S buffer."""

    @abc.abstractmethod
    def _record(self, refresh: bool, participants: Sequence[int], local: Sequence[int], vr: bool) -> StepRecord:
        """This step's ledger record."""

    # --------------------------------------------------------------------------------------------- bits
    def _comp(self, L: LayerSpec, which: str, refresh: bool) -> _comp.Compressor:
        return self._up_comp(L, refresh) if which == "up" else L.down

    def _bits(self, layers: Sequence[LayerSpec], which: str, refresh: bool = False) -> int:
        return sum(self._comp(L, which, refresh).bits(L.shape, torch.float32) for L in layers)

    def _lengths(self, layers: Sequence[LayerSpec], which: str, n_owners: int, refresh: bool = False) -> list[int]:
        lengths = [0] * n_owners
        for L in layers:
            lengths[max(L.owner, 0)] += self._comp(L, which, refresh).wire_nbytes(L.shape, torch.float32)
        return lengths

    def _fragment_counts(self, f: int) -> tuple[int, int, list[int], list[int]]:
        """Uplink and downlink bits and per-owner wire lengths (bytes) of fragment ``f``'s layers (streaming)."""
        if f not in self._frag_counts:
            layers = [L for L in self.layers if self.layer_buckets[L.uid] == f]
            n = len(self._owner_slots())
            self._frag_counts[f] = (
                self._bits(layers, "up"),
                self._bits(layers, "down"),
                self._lengths(layers, "up", n),
                self._lengths(layers, "down", n),
            )
        return self._frag_counts[f]

    # --------------------------------------------------------------------------------------------- the server model X
    @abc.abstractmethod
    def server_model(self) -> dict[str, Tensor]:
        """The server model X, every layer, keyed like ``model.named_parameters()`` (float32 copies).

        :class:`EF21Engine` with ``sharded``/``server``: X lives on the layers' owners and is gathered to every rank
        (one broadcast per owner): a collective every rank must call.
        """

    def load_parameters(self, values: Mapping[str, Tensor]) -> None:
        """Copy tensors keyed by parameter name into the parameters (cast to their dtype); names not given keep
        their values."""
        with torch.no_grad():
            for L in self.all_layers:
                if L.name in values:
                    L.w.copy_(values[L.name])

    @contextlib.contextmanager
    def _params_loaded(self, values: Mapping[str, Tensor]) -> Iterator[None]:
        current = {L.name: L.w.clone() for L in self.all_layers if L.name in values}
        self.load_parameters(values)
        self._set_aside = current
        try:
            yield
        finally:
            self._set_aside = {}
            self.load_parameters(current)

    def held_parameters(self) -> dict[str, Tensor]:
        """While other values are loaded for evaluation (:meth:`at_server_model`, :meth:`at_previous_point`): the
        parameters' own values (W, or this worker's W_j) they replaced, by name (this process's part, as ``L.w``);
        else empty. A checkpoint written during validation saves these, not X."""
        return dict(self._set_aside)

    def at_previous_point(self) -> contextlib.AbstractContextManager[None]:
        """Inside the block the parameters hold the previous step's W (the VR estimators' second gradient)."""
        return self._params_loaded({L.name: self._W_prev[L.index] for L in self.layers})

    def _w_is_x(self) -> bool:
        # an identity downlink sets W = X every step (all layers: every process must agree, whatever its share);
        # with local steps the parameters hold this worker's W_j
        return not self.local_steps and all(L.down.kind == "identity" for L in self.all_layers)

    @contextlib.contextmanager
    def at_server_model(self) -> Iterator[None]:
        """Evaluate at X (validation loss is reported at X, docs/algorithm.md §2): inside the block the parameters
        hold X, afterwards W again. With an identity downlink W == X and nothing moves; otherwise the engine
        gathers X, a collective every rank must enter."""
        if self._w_is_x():
            yield
            return
        with self._params_loaded(self.server_model()):
            yield

    def load_server_model(self) -> None:
        """Leave X in the parameters for good (when training ends: X is the model training produced)."""
        if not self._w_is_x():
            self.load_parameters(self.server_model())

    # --------------------------------------------------------------------------------------------- checkpoints
    def _common_state(self) -> dict[str, Any]:
        return {
            "step": self.step_count,
            "applied": self.applied,
            "W_prev": tensors_state(self._W_prev, self.layers),
            "server": self.server.state_dict(self.served),
            "optimizer": optimizer_state(self.optimizer, self._optimizer_layers),
            "ledger": self.ledger.state_dict(),
            "local_options": self._local_options(),
            "local": self._local_state(),
        }

    @property
    def _optimizer_layers(self) -> list[LayerSpec]:
        """The layers whose optimizer state this process owns: those it serves (the server's update), or with local
        steps all it trains (each worker's inner optimizer state is its own)."""
        return self.layers if self.local_steps else self.served

    def _local_options(self) -> dict[str, Any]:
        """The local-step options a checkpoint must be resumed with (empty without local steps)."""
        if not self.local_steps:
            return {}
        c = self.config
        return {
            "sync_every": self.sync_every,
            "fragments": self.fragments,
            "outer": c.outer,
            "outer_lr": c.outer_step_size,
            "outer_momentum": c.outer_momentum,
        }

    def _load_common(self, state: Mapping[str, Any]) -> None:
        saved, mine = state.get("local_options", {}), self._local_options()
        if saved != mine:
            raise ValueError(
                f"EF21 state was saved with local-step options {saved or {'sync_every': 1}}, this run has "
                f"{mine or {'sync_every': 1}}; resume with the options the checkpoint was written with"
            )
        self.step_count = int(state["step"])
        self.applied = int(state.get("applied", state["step"]))
        saved_prev = state.get("W_prev", {})
        self._W_prev = {L.index: saved_prev[L.name].clone() for L in self.layers if L.name in saved_prev}
        self.server.load_state_dict(state["server"], self.served)
        load_optimizer_state(self.optimizer, state["optimizer"], self._optimizer_layers)
        self._load_local(state)
        self.ledger.load_state_dict(state["ledger"])


class EF21Engine(_EF21Base):
    """One worker (and its share of the server) of EF21-Muon in a torch.distributed process group.

    Building the engine takes the optimizer over: from then on ``optimizer.step()`` runs EF21-Muon steps 2-7 on the
    gradients in ``param.grad`` and leaves the updated W in the parameters (see :meth:`optimizer_step`); the
    framework's forward, backward and ``zero_grad`` stay as they are. Without an initialised process group the
    engine is the only worker (one process: same compressors, state and ledger, no collectives).

    Args:
        model: the module (or its ``named_parameters()``) whose parameters hold W; names key the state dict.
        optimizer: an :class:`~ef_lightning.LMO` (worker momentum from its groups) or any torch optimizer.
        config: an :class:`~ef_lightning.config.EF21Config`; ``None``: one built from ``options``.
        group: process group (default WORLD).
        sync_initial: broadcast rank 0's parameters first so every rank starts from the same W = X.
        backward_done: how :meth:`optimizer_step` reads a closure: False (torch's convention, Lightning) — the
            closure computes the gradient at the current point; True (an Accelerate loop) — the loop already ran
            backward, and with a variance-reduced estimator the closure only re-evaluates the previous point.
        quiet: wraps the closure for its run at the previous point (e.g. to keep it from logging); ``None``: as is.
        on_step: called with True/False (applied/skipped) after every EF21 step that :meth:`optimizer_step` ran.
        should_sync: with ``overlap``, asked when a bucket's gradients are ready: False means this backward is not
            the last one before the step (gradient accumulation; e.g. ``lambda: accelerator.sync_gradients``), so
            nothing is sent yet. ``None``: every backward may be the last; :meth:`no_sync` blocks one explicitly.
        **options: :class:`~ef_lightning.config.EF21Config` fields (``uplink``, ``downlink``, ``topology``, ...),
            applied over ``config``.

    Example::

        engine = EF21Engine(model, build_lmo_optimizer(model, "gluon"), uplink="top_k:0.05", topology="sharded")
        for batch in loader:
            loss_fn(model, batch).backward()
            optimizer.step()          # the EF21 step
            optimizer.zero_grad()
    """

    _step_hint = "Call optimizer.step() itself (it is the EF21 step)"

    def __init__(
        self,
        model: nn.Module | Sequence[tuple[str, nn.Parameter]],
        optimizer: torch.optim.Optimizer,
        config: EF21Config | None = None,
        *,
        group: Any = None,
        sync_initial: bool = True,
        backward_done: bool = False,
        quiet: Callable[[Closure], Closure] | None = None,
        on_step: Callable[[bool], None] | None = None,
        should_sync: Callable[[], bool] | None = None,
        **options: Any,
    ) -> None:
        config = EF21Config.build(config, **options)
        #: FSDP2: the parameters are DTensors sharded inside each node; EF21 runs across nodes on the local shards
        self.fsdp = _check_sharded(optimizer, config)
        self.transport: Transport = build_transport(
            config.topology,
            group,
            server_rank=config.server_rank,
            local_world_size=_local_world_size(config),
            sharded_params=self.fsdp,
        )
        t = self.transport
        self.hierarchical = isinstance(t, HierarchicalTransport)
        if self.fsdp:
            assert isinstance(t, HierarchicalTransport)  # _check_sharded demands the topology
            _check_mesh(optimizer, t)
        self._intra_bytes = 0  # this step's bytes sent inside the node (hierarchical)
        self._intra_sent = 0  # ... of them, those sent before the step could be skipped
        if isinstance(model, nn.Module) and any(isinstance(m, _FSDP1) for m in model.modules()):
            raise ValueError(
                "the model is wrapped in FullyShardedDataParallel (FSDP1, flat parameters): EF21 cannot see its "
                "layers; shard with FSDP2's fully_shard over each node's processes and use topology='hierarchical' "
                "(README, 'Multi-node clusters'), or train without FSDP"
            )
        if isinstance(t, HierarchicalTransport) and t.n_nodes == 1:  # no link between nodes: plain data parallel
            config = config.replace(uplink="identity", downlink="identity")
        self.replicated = t.replicated
        # overlap: EF21 with every worker each round, in a real group (VR estimators need their closure first);
        # hierarchical: the dense reduce inside the node runs at the step (not overlapped yet)
        self.overlapping = (
            config.overlap
            and config.estimator == "ef21"
            and config.participation is None
            and t.world_size > 1
            and not self.hierarchical
            and not config.local_steps
        )
        self._bucketed = self.overlapping
        super().__init__(model, optimizer, config, owners=t.owners, route_step=self.optimizer_step)
        self.backward_done, self.quiet, self.on_step = backward_done, quiet, on_step
        self._check_agreement()
        self.served = [L for L in self.layers if L.owner in (-1, t.rank)]
        n_owners = 1 if t.replicated else t.world_size
        self.up_lengths = {r: self._lengths(self.layers, "up", n_owners, r) for r in (False, True)}  # by refresh
        self.down_lengths = self._lengths(self.layers, "down", n_owners)
        if sync_initial:  # FSDP2: each shard from its copy on node 0 (the same local index: t.group)
            broadcast_tensors_([L.w for L in self.all_layers], 0, t.group if self.fsdp else t.world_group)
        self._workers = {t.rank: WorkerState.new(self.layers, self.estimator)}
        # (local steps: the parameters hold W_j mid-round, so even a replicated X is kept apart)
        self.server = ServerState.new(self.served, x_is_param=t.replicated and not self.local_steps)
        self._init_rows()
        self._init_local()
        self._should_sync = should_sync
        self._blocked = 0  # depth of no_sync() blocks
        self.resynced = 0  # overlapped steps synced again at the step (gradients changed after their bucket was sent)
        self._grad_hooks: list[RemovableHandle] = []
        if self.overlapping:
            self._bucket_of = {i: g.bucket for g in self.groups for i in g.indices}
            self._bucket_size = [
                sum(len(g.layers) for g in self.groups if g.bucket == b) for b in range(self.n_buckets)
            ]
            self._bucket_bits = [
                sum(self._bits(g.layers, "up") for g in self.groups if g.bucket == b) for b in range(self.n_buckets)
            ]
            self._reset_inflight()
            for L in self.layers:
                self._grad_hooks.append(L.param.register_post_accumulate_grad_hook(self._grad_ready(L.index)))

    @property
    def topology(self) -> str:
        """The transport's topology name."""
        return self.transport.topology

    @property
    def worker(self) -> WorkerState:
        """This rank's worker state (M_j, G_j, V_j)."""
        return self._workers[self.transport.rank]

    def agreement(self) -> dict[str, Any]:
        """The fields every rank must agree on (checked at start-up)."""
        layers = self.all_layers
        return {
            "layers": [(L.name, tuple(L.param.shape)) for L in layers],
            "uplink": [L.up.spec for L in layers],
            "downlink": [L.down.spec for L in layers],
            "norms": [str(g.get("norm", type(self.optimizer).__name__)) for g in self.optimizer.param_groups],
            "momentum": [(L.momentum, L.nesterov) for L in layers],
            "seed": self.seed,
            "estimator": (self.estimator, self.p, self.participation),
            "topology": self.transport.topology,
            "world_size": (self.transport.global_size, getattr(self.transport, "local_world_size", 1)),
            "server_rank": getattr(self.transport, "server_rank", None),
            "overlap": (self.overlapping, [self.layer_buckets.get(L.uid, 0) for L in layers]),
            "local": self._local_options(),
        }

    def _check_agreement(self) -> None:
        mine = self.agreement()
        digest = {k: hashlib.sha256(repr(v).encode()).hexdigest()[:16] for k, v in mine.items()}
        everyone = self.transport.all_gather_object((digest, {k: repr(v)[:200] for k, v in mine.items()}))
        for r, (d, shown) in enumerate(everyone):
            diff = [k for k in digest if d.get(k) != digest[k]]
            if diff:
                k = diff[0]
                raise ValueError(
                    f"EF21 configuration differs between ranks in field {k!r}: rank {self.transport.global_rank} "
                    f"has {repr(mine[k])[:200]}, rank {r} has {shown[k]} (fields differing: {diff})"
                )

    # --------------------------------------------------------------------------------------------- overlap
    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside the block only accumulate gradients (like ``DistributedDataParallel.no_sync``):
        no bucket is sent before the step. Needed for overlap under gradient accumulation; without it a second
        backward before ``optimizer.step()`` makes the engine discard the early sends and sync again at the step
        (correct, but the early traffic is wasted)."""
        self._blocked += 1
        try:
            yield
        finally:
            self._blocked -= 1

    def _reset_inflight(self) -> None:
        self._ready: list[set[int]] = [set() for _ in range(self.n_buckets)]
        self._next_bucket = 0  # buckets start in order, like DDP's, so every rank issues the same collectives
        self._inflight: dict[int, Pending] = {}
        self._sent: dict[int, list[Tensor]] = {}  # bucket -> this rank's send buffers (its own messages)
        self._sent_grads = {}
        self._versions: list[tuple[Group, Tensor, tuple[Tensor | None, int]]] = []  # gradients the sends read
        self._finite: list[Tensor] = []
        self._stale = False
        self._callback_queued = False

    def _grad_ready(self, index: int) -> Callable[[Tensor], None]:
        def hook(param: Tensor) -> None:
            if self._blocked or (self._should_sync is not None and not self._should_sync()):
                return
            if not self._callback_queued:  # at the end of this backward, send what is left (as DDP does)
                self._callback_queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            b = self._bucket_of[index]
            if b < self._next_bucket:  # a second backward after this bucket was sent: resync at the step
                self._stale = True
                return
            self._ready[b].add(index)
            while (
                self._next_bucket < self.n_buckets
                and len(self._ready[self._next_bucket]) == self._bucket_size[self._next_bucket]
            ):
                self._launch(self._next_bucket)

        return hook

    def _end_of_backward(self) -> None:
        """Every bucket is sent by the end of a backward pass, including those held back by parameters that got
        no gradient (they count as zeros, as at the step): every rank has issued the same collectives before
        anything else (a logging all-reduce, a gather) can run between backward and step."""
        self._callback_queued = False
        while self._next_bucket < self.n_buckets:
            self._launch(self._next_bucket)

    @torch.no_grad()
    def _launch(self, b: int) -> None:
        """Steps 2-3 for bucket ``b`` now and start its uplink collective (asynchronous). The worker state is not
        touched (:meth:`_commit` updates it at the step, once no rank had a non-finite gradient); the gradients'
        versions are noted, so a change before the step (clipping, a hand edit) is caught and the step resyncs."""
        rank = self.transport.rank
        for g in self.groups:
            if g.bucket == b:
                self._versions.extend((g, L.param, _grad_version(L.param)) for L in g.layers)
        bufs = self._encode_bucket(b, rank, _GradView(self.layers), None, False, finite=self._finite, tentative=True)
        self._sent[b] = bufs
        self._inflight[b] = self.transport.uplink_start(bufs, self.up_layout[False].lengths[b])
        self._next_bucket = b + 1

    @torch.no_grad()
    def _commit(self) -> None:
        """The worker's EF21 update for the buckets sent early: M_j from the (unchanged) gradient, then
        G_j <- G_j + R_j decoded from this rank's own send buffer: the step-time path's arithmetic."""
        rank, layout = self.transport.rank, self.up_layout[False]
        for g in self.groups:
            M, G_j = self._rows[rank, "M", g.index], self._rows[rank, "G", g.index]
            assert G_j is not None  # overlap runs estimator 'ef21', which keeps G_j
            D = K.ef21_direction(M, self._sent_grads[g.index], g.momentum, g.nesterov)
            if self._exact_identity(g.up):
                G_j.copy_(D)
                continue
            _, slot = layout.where(g)
            parts = layout.views(self._sent[g.bucket][slot], g)
            G_j.add_(K.decode(g.up, parts, g.shape, self._seeds(g, rank), self.fused))

    def _changed_since_sent(self) -> bool:
        """Whether a gradient differs from what its bucket's early send encoded. A gradient touched in place or
        replaced since (e.g. DDP copying its buckets back, clipping by a factor of exactly 1) is compared by value
        with the kept stack, so only a real change (clipping, a second backward) counts."""
        touched = {id(g): g for g, p, seen in self._versions if not _same_grad(p, seen)}
        grads = _GradView(self.layers)
        return any(not torch.equal(self._stack(grads, g), self._sent_grads[g.index]) for g in touched.values())

    def _sent_so_far(self) -> tuple[int, int]:
        """Bits and wire bytes of the buckets already sent this step (counted even when the step is dropped)."""
        t = self.transport
        bits = sum(self._bucket_bits[b] for b in self._inflight)
        wire = sum(t.uplink_wire_bytes(self.up_layout[False].lengths[b]) for b in self._inflight)
        return bits, wire

    def _stop_overlap(self) -> None:
        for h in self._grad_hooks:
            h.remove()
        self._grad_hooks = []
        self.overlapping = False

    @torch.no_grad()
    def _overlapped_step(self) -> bool:
        """The step when buckets may already be in flight: start the rest, wait, check, commit, aggregate, 5-7."""
        began = time.perf_counter()
        if not self._stale:
            self._stale = self._changed_since_sent()
        while self._next_bucket < self.n_buckets:  # every rank issues every bucket's collective, stale or not
            self._launch(self._next_bucket)
        received = {b: p.wait() for b, p in self._inflight.items()}
        bad = not bool(torch.stack(self._finite).all()) if self._finite else False
        stale, bad_anywhere = self.transport.any_of([self._stale, bad])  # one small all-reduce for both
        self._extra_sent = self._sent_so_far()  # on a resync or a skip these bytes went out for nothing: counted
        if stale:  # every rank resyncs together, from the gradients as they are now, and stops overlapping
            warnings.warn(
                "EF21 overlap: gradients changed after their bucket was sent (gradient clipping, a second backward "
                "outside no_sync(), an edit between backward and step); this step was synced again at "
                "optimizer.step() and overlap is now off for this engine (EF21Config(overlap=False) avoids the "
                "wasted send)",
                RuntimeWarning,
                stacklevel=4,
            )
            self._reset_inflight()
            self.resynced += 1
            self._stop_overlap()
            return self._sync_mine(_grads_of(self.layers, clone=False), None)
        if bad_anywhere:
            self._reset_inflight()
            self._skip([self.transport.rank] if bad else [])
            return False
        self._extra_sent = (0, 0)
        self._commit()
        first = min(p.started for p in self._inflight.values())
        last = max(p.done_at or began for p in self._inflight.values())
        self._uplink_timing = (last - first, max(0.0, min(last, began) - first))
        self._reset_inflight()
        everyone = list(range(self.transport.world_size))
        for g in self.served_groups:
            self._aggregate(g, received[g.bucket], everyone, self.transport.world_size, False)
        self._finish(False, everyone, [self.transport.rank], False)
        return True

    def detach(self) -> None:
        """Hand the optimizer back (see :meth:`_EF21Base.detach`) and remove the gradient hooks of ``overlap``."""
        self._stop_overlap()
        super().detach()

    # --------------------------------------------------------------------------------------------- stepping
    def optimizer_step(self, closure: Closure | None = None) -> Any:
        """What ``optimizer.step(closure)`` runs while the engine drives the optimizer. Returns the closure's loss.

        With ``backward_done=False`` (torch's convention) a closure zeroes the gradients, computes the loss at the
        current point, calls ``backward()`` and returns the loss; a variance-reduced estimator runs it once more,
        first, at the previous point (wrapped by ``quiet``), so the current point's run is the last one. Without a
        closure the gradients must already be in ``param.grad``. With ``backward_done=True`` see :meth:`step`.
        """
        me = self.transport.rank in self._participants(self.transport.world_size)
        if self.config.variance_reduced and closure is None:  # fail on the first step already
            raise self._closure_missing()
        loss = None
        if self.backward_done and self.config.variance_reduced:
            applied = self.step(closure)
        else:
            prev = None
            if self.needs_previous_gradient and me:
                assert closure is not None  # checked above for every variance-reduced estimator
                prev = self._previous_gradients(self.quiet(closure) if self.quiet else closure)
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            if self.local_steps:
                applied = self._local_step()
            elif self.overlapping:
                applied = self._overlapped_step()
            else:
                applied = self._sync_mine(_grads_of(self.layers, clone=False), prev)
        if self.on_step is not None:
            self.on_step(applied)
        return loss

    def step(self, closure: Closure | None = None) -> bool:
        """EF21-Muon steps 2-7 on the gradients already in ``param.grad``.

        Args:
            closure: needed by the variance-reduced estimators (``marina``, ``ef21_page``, ``mvr``) from their second
                step on: it zeroes the gradients, recomputes the loss on the SAME minibatch and calls ``backward()``.
                The engine calls it once with the previous step's W loaded: one extra forward/backward per step,
                counted in the ledger (``gradient_evaluations_per_worker``).

        Returns:
            True if the step was applied; False if it was skipped because some worker's gradient was non-finite
            (then no state changed anywhere).
        """
        if self.local_steps:
            return self._local_step()
        if self.overlapping:
            return self._overlapped_step()
        vr = self.needs_previous_gradient and self.transport.rank in self._participants(self.transport.world_size)
        grads = _grads_of(self.layers, clone=vr)  # the closure below overwrites .grad
        prev = None
        if vr:
            if closure is None:
                raise self._closure_missing()
            prev = self._previous_gradients(closure)
        return self._sync_mine(grads, prev)

    def _closure_missing(self) -> ValueError:
        return ValueError(
            f"estimator={self.estimator!r} needs optimizer.step(closure): a closure that zeroes the gradients, "
            "recomputes the loss on the SAME batch and calls backward(); it is also evaluated at the previous "
            "point, a second gradient on the same minibatch (valid estimator without a closure: 'ef21')"
        )

    def _sync_mine(self, grads: list[Tensor], prev: list[Tensor] | None) -> bool:
        r = self.transport.rank
        if not self.hierarchical or self.fsdp:  # (FSDP2 averaged the node's gradients onto the shards already)
            return self._sync({r: grads}, {r: prev} if prev is not None else None, self.transport.world_size)
        # hierarchical (estimator ef21, no prev): this share's gradients averaged over the node, EF21 across nodes,
        # then every process of the node gets every share's new W
        applied = self._sync({r: self._node_average()}, None, self.transport.world_size)
        if applied:
            self._share_in_node()
        return applied

    @torch.no_grad()
    def _local_step(self) -> bool:
        """``sync_every > 1``: an inner step on the gradients in ``param.grad`` (``hierarchical``: averaged over the
        node first, as DDP would inside a node), and on every H-th step the outer sync. A non-finite gradient skips
        this worker's inner step only (its node's, ``hierarchical``/FSDP2), with a warning; with
        ``on_nonfinite="raise"`` every rank raises (one 4-byte all-reduce per inner step in that mode). The sync runs
        on every worker either way. Returns False only when the step was skipped on every worker (a sync skipped for
        a non-finite outer delta): a worker's own skipped inner step leaves the LR schedules of all ranks aligned."""
        t = self.transport
        node = self.hierarchical and not self.fsdp
        grads = self._node_average() if node else _grads_of(self.layers, clone=False)
        bad = _nonfinite(grads)
        if self.hierarchical:  # the node's processes hold one model: they skip together
            assert isinstance(t, HierarchicalTransport)
            bad = t.node_any(bad)
        if self.config.on_nonfinite == "raise":  # every rank raises together, as at a sync (no rank left waiting)
            bad = t.any(bad)
        if bad:
            self._inner_nonfinite(f"rank {t.global_rank}'s node" if self.hierarchical else f"rank {t.rank}")
        f = self.due()
        if f is None:
            if not bad:
                self._inner_update(grads)
                if node:
                    self._share_in_node()
            self._inner_record(bad, intra=self._intra_bytes if node else 0)
            return True  # (a worker's own skipped inner step is not a skipped step: schedules stay aligned)
        frag = f if self.fragments > 1 else None
        with self._fragment(frag):
            delta = self._outer_delta(None if bad else grads)
            applied = self._sync({t.rank: delta}, None, t.world_size, fragment=frag)
            if node:  # every share's new W (or, after a skipped sync, its W_start) to the whole node
                self._share_in_node()
            self._begin_round()
        return applied

    def _shares(self) -> list[list[LayerSpec]]:
        """``hierarchical``: the layers of each local index (share), in parameter order."""
        assert isinstance(self.transport, HierarchicalTransport)
        share = self.transport.shares([L.param.numel() for L in self.all_layers])
        return [[L for L, s in zip(self.all_layers, share) if s == i] for i in range(self.transport.local_world_size)]

    def _node_average(self) -> list[Tensor]:
        """The gradients of this process's share, averaged over its node (one dense ``reduce`` per share)."""
        t = self.transport
        assert isinstance(t, HierarchicalTransport)
        shares = self._shares()
        dtype = _common_dtype([L.param for L in self.all_layers])
        flats = []
        for layers in shares:
            grads = [L.param.grad if L.param.grad is not None else torch.zeros_like(L.param) for L in layers]
            flats.append(torch.cat([g.reshape(-1).to(dtype) for g in grads]) if grads else _empty(dtype, self))
        mine = t.reduce_to_shares(flats)
        # intra-node bytes this process sends: the other shares' gradients, then its share's W to the G-1 others
        # (both in the dtype they travel in); a skipped step sent the first part only
        others = sum(f.numel() for i, f in enumerate(flats) if i != t.local_rank) * dtype.itemsize
        mine_w = sum(L.w.numel() for L in self.layers) * dtype.itemsize * (t.local_world_size - 1)
        self._intra_sent = others if t.local_world_size > 1 else 0
        self._intra_bytes = others + mine_w if t.local_world_size > 1 else 0
        return [
            chunk.view(L.shape) for L, chunk in zip(self.layers, mine.split([L.param.numel() for L in self.layers]))
        ]

    @torch.no_grad()
    def _share_in_node(self) -> None:
        """Every share's W from the process that stepped it to the rest of the node (one broadcast per share)."""
        self._broadcast_shares({L.name: L.param.detach() for L in self.layers}, into_params=True)

    def _broadcast_shares(self, mine: Mapping[str, Tensor], into_params: bool) -> dict[str, Tensor]:
        """Share ``i``'s tensors (``mine`` on local rank ``i``, keyed by name) to every process of the node; into the
        parameters, or returned (float32) for every layer."""
        t = self.transport
        assert isinstance(t, HierarchicalTransport)
        shares = self._shares()
        dtype = _common_dtype([L.param for L in self.all_layers]) if into_params else torch.float32
        flats = []
        for i, layers in enumerate(shares):
            if i == t.local_rank:
                flats.append(
                    torch.cat([mine[L.name].reshape(-1).to(dtype) for L in layers]) if layers else _empty(dtype, self)
                )
            else:
                flats.append(torch.empty(sum(L.param.numel() for L in layers), dtype=dtype, device=t.device))
        t.share_in_node(flats)
        out: dict[str, Tensor] = {}
        for layers, flat in zip(shares, flats):
            for L, chunk in zip(layers, flat.split([L.param.numel() for L in layers])):
                if into_params:
                    L.param.data.copy_(chunk.view(L.shape))
                else:
                    out[L.name] = chunk.view(L.shape).clone()
        return out

    def _previous_gradients(self, closure: Closure) -> list[Tensor]:
        with self.at_previous_point(), torch.enable_grad():
            closure()
        return _grads_of(self.layers, clone=True)

    def _anywhere(self, flag: bool) -> bool:
        return self.transport.any(flag)

    def _where(self, bad: Sequence[int]) -> str:
        if self.hierarchical:
            return f"node {self.transport.rank} (rank {self.transport.global_rank}'s share)" if bad else "another node"
        return f"rank {self.transport.rank}" if bad else "another rank"

    def _owner_slots(self) -> list[int]:
        t = self.transport
        return [0] if t.replicated else list(range(t.world_size))

    def _my_slot(self) -> int:
        return 0 if self.transport.replicated else self.transport.rank

    def _exchange_uplink(
        self, bucket: int, messages: Mapping[int, list[Tensor]], participants: Sequence[int], refresh: bool
    ) -> list[Tensor]:
        t = self.transport
        lengths = self.up_layout[refresh].lengths[bucket]
        parts = messages.get(t.rank)
        if self.participation is None:
            assert parts is not None  # every rank takes part in every round
            return t.uplink(parts, lengths)
        # server topology: only this round's participants send (point to point)
        assert isinstance(t, (ServerTransport, LocalTransport))  # the config allows participation with it only
        return t.uplink_from(parts[t.server_rank] if parts is not None else None, participants, lengths)

    def _exchange_downlink(self, mine: Tensor, lengths: Sequence[int]) -> list[Tensor]:
        return self.transport.downlink(mine, lengths)

    def _record(self, refresh: bool, participants: Sequence[int], local: Sequence[int], vr: bool) -> StepRecord:
        t, me = self.transport, bool(local)
        crosses = not (self.hierarchical and t.world_size == 1)  # one node: nothing crosses a node boundary
        down = crosses and not t.replicated
        up_bits, down_bits, up_lengths, down_lengths = (
            (self._up_bits[refresh], self._down_bits, self.up_lengths[refresh], self.down_lengths)
            if self._frag is None
            else self._fragment_counts(self._frag)
        )
        return StepRecord(
            step=self.step_count,
            uplink_bits=up_bits if me and crosses else 0,
            uplink_wire_bytes=t.uplink_wire_bytes(up_lengths) if me and crosses else 0,
            downlink_bits=down_bits if down else 0,
            downlink_wire_bytes=t.downlink_wire_bytes(down_lengths) if down else 0,
            dense_bytes=self.dense_bytes,
            gradient_evals=(1 + vr) if me else 0,
            intra_node_bytes=self._intra_bytes if self.hierarchical else 0,
        )

    # --------------------------------------------------------------------------------------------- X and state
    @torch.no_grad()
    def server_model(self) -> dict[str, Tensor]:
        t = self.transport
        if t.replicated:
            return {L.name: self.server.X.get(L.index, L.w).float().clone() for L in self.layers}
        out: dict[str, Tensor] = {}
        for o in range(t.world_size):  # hierarchical: the owner nodes of this share, then the node's shares
            layers = [L for L in self.layers if L.owner == o]
            if not layers:
                continue
            if t.rank == o:
                buf = torch.cat([self.server.X[L.index].flatten() for L in layers])
            else:
                buf = torch.empty(sum(L.w.numel() for L in layers), dtype=torch.float32, device=t.device)
            t.broadcast_(buf, o)
            for L, chunk in zip(layers, buf.split([L.w.numel() for L in layers])):
                out[L.name] = chunk.view(L.shape).clone()
        return self._broadcast_shares(out, into_params=False) if self.hierarchical and not self.fsdp else out

    def state_dict(self) -> dict[str, Any]:
        """This process's own EF21 state: M_j, G_j (V_j), served X and G, the optimizer state of served layers,
        ledger. ``rank`` / ``world_size`` are the process's place in the whole run (``hierarchical``: its node's
        worker state for its share of the layers, with ``local_world_size``)."""
        t = self.transport
        return {
            "rank": t.global_rank,
            "world_size": t.global_size,
            "topology": t.topology,
            "local_world_size": getattr(t, "local_world_size", 1),
            "worker": self.worker.state_dict(self.layers),
            **self._common_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict` on the same rank of the same topology and world size."""
        t = self.transport
        lws = getattr(t, "local_world_size", 1)
        checks = (
            ("world_size", t.global_size),
            ("topology", t.topology),
            ("rank", t.global_rank),
            ("local_world_size", lws),
        )
        for key, mine in checks:
            if state.get(key, 1 if key == "local_world_size" else None) != mine:
                raise ValueError(
                    f"EF21 state was saved with {key}={state.get(key)!r}, this process has {key}={mine!r}; "
                    "each rank must load its own state from a run with the same world size and topology"
                )
        self.worker.load_state_dict(state["worker"], self.layers)
        self._load_common(state)
        own = {id(L.param) for L in self._optimizer_layers}
        for L in self.all_layers:  # a framework may have loaded rank 0's optimizer state everywhere: keep only ours
            if id(L.param) not in own:
                self.optimizer.state.pop(L.param, None)


class Simulator(_EF21Base):
    """n EF21-Muon workers and the server in one process: same kernels, math and ledger as :class:`EF21Engine`.

    The model's parameters hold W (where gradients are evaluated); X is kept separately (:meth:`server_model`).
    Randomness and summation order match the engine, so a Simulator and n real processes fed the same shards
    produce the same X and W. The optimizer is held like the engine holds it, but its ``step()`` is not routed
    (there is no single worker's gradient): call :meth:`step` or :meth:`apply`.

    Args:
        model: the module whose parameters hold W.
        optimizer: an :class:`~ef_lightning.LMO` or any torch optimizer over ``model``'s parameters.
        n_workers: number of simulated workers (>= 1).
        config: an :class:`~ef_lightning.config.EF21Config`; ``None``: one built from ``options`` with
            ``topology="server"`` (the topology only decides which options are allowed: one process serves all).
        **options: :class:`~ef_lightning.config.EF21Config` fields, applied over ``config``.

    Example::

        sim = Simulator(model, build_lmo_optimizer(model, "gluon", lr=0.02), n_workers=4, uplink="top_k:0.05")
        losses = sim.step(lambda m, b: F.cross_entropy(m(b[0]), b[1]), [batch0, batch1, batch2, batch3])
        print(sim.ledger.summary())
    """

    _step_hint = "Call simulator.step(loss_fn, batches) or simulator.apply(grads)"

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        n_workers: int,
        config: EF21Config | None = None,
        **options: Any,
    ) -> None:
        if not isinstance(n_workers, int) or isinstance(n_workers, bool) or n_workers < 1:
            raise ValueError(f"n_workers={n_workers!r}; must be an integer >= 1")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if config is None:
            options.setdefault("topology", "server")
        config = EF21Config.build(config, **options)
        super().__init__(model, optimizer, config, owners=lambda sizes: [0] * len(sizes), route_step=None)
        self.model = model
        self.n_workers = n_workers
        self.served = self.layers
        self._up_wire = {r: self._lengths(self.layers, "up", 1, r)[0] for r in (False, True)}  # bytes, by refresh
        self._down_wire = self._lengths(self.layers, "down", 1)[0]
        self._workers = {j: WorkerState.new(self.layers, self.estimator) for j in range(n_workers)}
        self.server = ServerState.new(self.layers, x_is_param=False)
        self._init_rows()
        self._init_local()
        if self.local_steps:  # each worker's own parameters W_j and inner optimizer state (a copy of the initial)
            self._local_W = {j: [L.w.clone() for L in self.layers] for j in range(n_workers)}
            initial = optimizer_state(self.optimizer, self.layers)
            self._inner_states: dict[int, collections.defaultdict[Any, Any]] = {}
            for j in range(n_workers):
                self._inner_states[j] = collections.defaultdict(dict)
                with self._inner_optimizer(j):
                    load_optimizer_state(self.optimizer, initial, self.layers)

    @property
    def workers(self) -> list[WorkerState]:
        """Every simulated worker's state, in worker order."""
        return [self._workers[j] for j in range(self.n_workers)]

    def step(self, loss_fn: Callable[[nn.Module, Any], Tensor], batches: Sequence[Any]) -> list[float]:
        """One EF21-Muon step: each participating worker's gradient at W on its batch, then steps 2-7.

        The variance-reduced estimators also take each participant's gradient on the same batch at the previous W.

        Args:
            loss_fn: ``loss_fn(model, batch) -> scalar loss`` (the mean over the batch).
            batches: one batch per worker (``len(batches) == n_workers``); non-participants' batches are unused.

        Returns:
            the per-worker losses (floats) at W before the step; ``nan`` for workers not in this round.
        """
        if len(batches) != self.n_workers:
            raise ValueError(f"got {len(batches)} batches for n_workers={self.n_workers}; pass one batch per worker")
        if self.local_steps:
            return self._local_step(loss_fn, batches)
        participants = set(self._participants(self.n_workers))
        losses = [float("nan")] * self.n_workers
        grads: list[list[Tensor] | None] = [None] * self.n_workers
        prev: list[list[Tensor] | None] | None = [None] * self.n_workers if self.needs_previous_gradient else None
        for j in sorted(participants):
            losses[j], grads[j] = self._gradient(loss_fn, batches[j])
            if prev is not None:
                with self.at_previous_point():
                    prev[j] = self._gradient(loss_fn, batches[j])[1]
        self.optimizer.zero_grad(set_to_none=True)
        self.apply(grads, prev)
        return losses

    def worker_parameters(self, j: int) -> dict[str, Tensor]:
        """Worker ``j``'s own parameters W_j by name (clones): with ``sync_every > 1`` where its next inner step starts
        (they differ between workers mid-round); otherwise the shared W every worker holds."""
        if not 0 <= j < self.n_workers:
            raise ValueError(f"worker {j!r} does not exist; valid: 0 .. {self.n_workers - 1}")
        ws = self._local_W[j] if self.local_steps else [L.w for L in self.layers]
        return {L.name: w.clone() for L, w in zip(self.layers, ws)}

    @contextlib.contextmanager
    def _inner_optimizer(self, j: int) -> Iterator[None]:
        """Inside the block the optimizer's state is worker ``j``'s inner state (local steps)."""
        own, self.optimizer.state = self.optimizer.state, self._inner_states[j]
        try:
            yield
        finally:
            self.optimizer.state = own

    def _local_step(self, loss_fn: Callable[[nn.Module, Any], Tensor], batches: Sequence[Any]) -> list[float]:
        """``sync_every > 1``: every worker's inner step from its own W_j with its own optimizer state; on every
        H-th step the outer sync. Between steps the parameters hold the round's shared W_start."""
        f = self.due()
        losses, deltas, grads = [], {}, []

        def load(j: int) -> None:
            with torch.no_grad():
                for L, w in zip(self.layers, self._local_W[j]):
                    L.w.copy_(w)

        try:
            for j in range(self.n_workers):  # every gradient first: with on_nonfinite='raise' nothing has moved
                load(j)
                loss, g = self._gradient(loss_fn, batches[j])
                losses.append(loss)
                grads.append(g)
            bad = [j for j in range(self.n_workers) if _nonfinite(grads[j])]
            for j in bad:
                self._inner_nonfinite(f"worker {j}")
            for j in range(self.n_workers):
                if j not in bad:
                    load(j)
                    with self._inner_optimizer(j):
                        self._inner_update(grads[j])
                    with torch.no_grad():
                        self._local_W[j] = [L.w.clone() for L in self.layers]
                if f is not None:  # (a streaming sync reads its fragment's entries only)
                    deltas[j] = [self._start[L.index] - w.float() for L, w in zip(self.layers, self._local_W[j])]
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for L in self.layers:
                    L.w.copy_(self._start[L.index])
        if f is None:
            self._inner_record(len(bad) == self.n_workers)
            return losses
        frag = f if self.fragments > 1 else None
        with self._fragment(frag):
            self._sync(deltas, None, self.n_workers, fragment=frag)
            self._begin_round()
            synced = [L.index for L in self._synced(self.layers)]
        for j in range(self.n_workers):  # the synchronised layers start again from the new shared W
            for i in synced:
                self._local_W[j][i] = self.layers[i].w.clone()
        return losses

    def _gradient(self, loss_fn: Callable[[nn.Module, Any], Tensor], batch: Any) -> tuple[float, list[Tensor]]:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = loss_fn(self.model, batch)
            loss.backward()
        return float(loss.detach()), _grads_of(self.layers, clone=True)

    def apply(
        self, grads: Sequence[Sequence[Tensor] | None], prev: Sequence[Sequence[Tensor] | None] | None = None
    ) -> bool:
        """Steps 2-7 given each worker's gradients (``grads[j][i]`` = worker j, layer i in optimizer order).

        ``prev[j]``: worker j's gradients on the same batch at the previous W (VR estimators after their first step).
        Workers not participating this round may pass ``None``. Returns False if the step was skipped.
        """
        if self.needs_previous_gradient and prev is None:
            raise ValueError(f"estimator {self.estimator!r} needs the previous point's gradients (prev=...)")
        if self.local_steps:
            raise ValueError(
                f"sync_every={self.sync_every}: each worker steps from its own parameters, so a round needs its loss "
                "on every inner step: call step(loss_fn, batches) (apply() takes gradients at one shared point)"
            )
        local = {j: g for j, g in enumerate(grads) if g is not None}
        before = {j: p for j, p in enumerate(prev) if p is not None} if prev is not None else None
        return self._sync(local, before, self.n_workers)

    def _anywhere(self, flag: bool) -> bool:
        return flag

    def _where(self, bad: Sequence[int]) -> str:
        return f"worker(s) {list(bad)}"

    def _exchange_uplink(
        self, bucket: int, messages: Mapping[int, list[Tensor]], participants: Sequence[int], refresh: bool
    ) -> list[Tensor]:
        return [messages[j][0] for j in participants]

    def _exchange_downlink(self, mine: Tensor, lengths: Sequence[int]) -> list[Tensor]:
        return [mine]

    def _record(self, refresh: bool, participants: Sequence[int], local: Sequence[int], vr: bool) -> StepRecord:
        share = len(participants) / self.n_workers  # per-worker counts are averages over all n workers
        up_bits, down_bits, up_wire, down_wire = (
            self._up_bits[refresh],
            self._down_bits,
            self._up_wire[refresh],
            self._down_wire,
        )
        if self._frag is not None:  # a streaming sync: its fragment's layers (one owner slot)
            up_bits, down_bits, (up_wire,), (down_wire,) = self._fragment_counts(self._frag)
        return StepRecord(
            step=self.step_count,
            uplink_bits=round(up_bits * share),
            uplink_wire_bytes=round(up_wire * share),
            downlink_bits=down_bits,
            downlink_wire_bytes=down_wire,
            dense_bytes=self.dense_bytes,
            gradient_evals=1 + vr,
        )

    def server_model(self) -> dict[str, Tensor]:
        return {L.name: self.server.X[L.index].clone() for L in self.layers}

    def state_dict(self) -> dict[str, Any]:
        """Every simulated worker's state, the server state, the optimizer state and the ledger."""
        state = {
            "n_workers": self.n_workers,
            "workers": [w.state_dict(self.layers) for w in self.workers],
            **self._common_state(),
        }
        if self.local_steps:  # every worker's W_j and inner optimizer state, by parameter name
            state["inner"] = []
            for j in range(self.n_workers):
                with self._inner_optimizer(j):
                    inner = optimizer_state(self.optimizer, self.layers)
                state["inner"].append({"W": self.worker_parameters(j), "optimizer": inner})
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict` (same model and n_workers). W is the model's own state."""
        if state.get("n_workers") != self.n_workers:
            raise ValueError(f"state has n_workers={state.get('n_workers')!r}, this Simulator has {self.n_workers}")
        for w, s in zip(self.workers, state["workers"]):
            w.load_state_dict(s, self.layers)
        self._load_common(state)
        if self.local_steps:
            for j, saved in enumerate(state["inner"]):
                self._local_W[j] = [saved["W"][L.name].clone() for L in self.layers]
                self._inner_states[j].clear()
                with self._inner_optimizer(j):
                    load_optimizer_state(self.optimizer, saved["optimizer"], self.layers)
