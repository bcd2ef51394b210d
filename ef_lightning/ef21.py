"""EF21-Muon: compressed data-parallel LMO training with error feedback in both directions.

The algorithm of Gruntkowska, Gaponov, Tovmasyan and Richtárik, *EF21-Muon* (arXiv 2510.00643), as fixed in
ALGORITHM.md §2. Server state: exact model X, aggregate G; worker j: momentum M_j, EF21 estimate G_j; every rank
holds the shadow model W in the module's parameters. One step::

    1. g_j = grad f_j(W)                                      (the framework's backward)
    2. M_j <- mu*M_j + (1-mu)*g_j ; D_j = nesterov ? (1-mu)*g_j + mu*M_j : M_j
    3. R_j = C_up(D_j - G_j) ; G_j <- G_j + R_j ; send R_j    (EF21, arXiv 2106.05203; identity sends D_j)
    4. server: G <- G + (1/n) sum_j R_j                        (so G = mean_j G_j)
    5. server: X <- X*(1 - lr*wd) - t*d(G)                     (the optimizer's own rule, momentum off)
    6. server: S = C_down(X - W) ; W <- W + S ; send S          (EF21-P, arXiv 2209.15218)
    7. workers: W <- W + S

With identity compressors this is data-parallel Muon/Scion/Gluon with momentum (step 2 is linear). The momentum
and Nesterov flag come from the optimizer's groups; the optimizer's own momentum is switched off
(``LMO.external_momentum``) so the hyperparameters mean the same with and without compression. Any other torch
optimizer works too: then there is no worker momentum and it receives G as its gradient.

Everything here is plain PyTorch (no Lightning, no Accelerate). :class:`EF21Engine` runs one worker of a real
process group through a :class:`~ef_lightning.comm.Transport`; :class:`Simulator` runs n workers in one process.
Both share the per-layer kernels below, so their arithmetic is identical operation for operation.

Per-rank state: M_j and G_j differ between workers by design, and in ``sharded``/``server`` topologies X and G live
only on their owner. ``state_dict()`` therefore returns this rank's own state; frameworks must save one per rank.
All EF21 state (M_j, G_j, G, X) is float32 whatever the training dtype.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ef_lightning import compressors as _comp
from ef_lightning.comm import Ledger, StepRecord, Transport, build_transport
from ef_lightning.optim import LMO, momentum_direction_

__all__ = ["ROLES", "EF21Engine", "Simulator", "LayerSpec", "resolve_compressors"]

#: layer roles a per-role compressor mapping may name (``default`` applies to roles not named)
ROLES = ("hidden", "embedding", "head", "vector", "conv", "default")
NONFINITE = ("skip", "raise")
_SERVER = 1 << 20  # "sender id" of the server side in seed derivation (workers are 0..n-1)
_MASK64 = (1 << 64) - 1


def _mix(*xs: int) -> int:
    """SplitMix64 over a tuple of ints: per-(step, layer, sender) seeds, identical on every rank."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (x & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 29
    return h & ((1 << 63) - 1)


@dataclasses.dataclass
class LayerSpec:
    """Static description of one parameter tensor (one EF21 "layer")."""

    index: int
    name: str
    param: nn.Parameter
    role: str
    up: _comp.Compressor
    down: _comp.Compressor
    owner: int  # rank serving this layer; -1 = every rank (allgather)
    momentum: float  # worker momentum mu (0 = none)
    nesterov: bool

    @property
    def shape(self) -> torch.Size:
        return self.param.shape


def _role_of(group: Mapping[str, Any], p: Tensor) -> str:
    role = group.get("role")
    if role is not None:
        return "conv" if role == "conv" else role
    return "hidden" if p.ndim >= 2 else "vector"


def resolve_compressors(spec: str | Mapping[str, str], role: str, shape: torch.Size, *, what: str) -> _comp.Compressor:
    """The compressor for one tensor from a spec string or a role -> spec mapping.

    Args:
        spec: a compressor spec applied to every tensor, or a mapping from roles (:data:`ROLES`) to specs.
        role: the tensor's role (``hidden``, ``embedding``, ``head``, ``vector``, ``conv``).
        shape: the tensor's shape; a compressor that cannot handle it (``rank`` on a vector) falls back to
            ``identity`` (ALGORITHM.md §3).
        what: ``"uplink"`` or ``"downlink"``, for error messages.
    """
    if isinstance(spec, Mapping):
        bad = [k for k in spec if k not in ROLES]
        if bad:
            raise ValueError(f"{what} mapping has unknown role(s) {bad}; valid roles: {', '.join(ROLES)}")
        spec = spec.get(role, spec.get("default", "identity"))
    if not isinstance(spec, str):
        raise TypeError(f"{what} must be a compressor spec string or a mapping role -> spec, got {type(spec).__name__}")
    comp = _comp.build(spec)
    if not comp.supports(shape):
        comp = _comp.build("identity")
    return comp


def _decode(comp: _comp.Compressor, msg: Any) -> Tensor:
    """Decompress to float32; an unbiased Q(omega) under EF21 is scaled by 1/(omega+1) (ALGORITHM.md §3)."""
    x = comp.decompress(msg).float()
    if comp.kind == "unbiased":
        x.mul_(1.0 / (1.0 + comp.constant(msg.shape)))
    return x


@dataclasses.dataclass
class WorkerState:
    """One worker's EF21 memory, keyed by layer index: momentum M_j (only for layers with mu > 0) and G_j."""

    M: dict[int, Tensor] = dataclasses.field(default_factory=dict)
    G: dict[int, Tensor] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ServerState:
    """Server memory for the layers this process serves: X (unless it *is* the parameter) and G."""

    X: dict[int, Tensor] = dataclasses.field(default_factory=dict)
    G: dict[int, Tensor] = dataclasses.field(default_factory=dict)


def _zeros32(p: Tensor) -> Tensor:
    return torch.zeros(p.shape, dtype=torch.float32, device=p.device)


class _Core:
    """What the real engine and the Simulator share: layers, state layout, the per-layer kernels, the ledger."""

    def __init__(
        self,
        model: nn.Module | Sequence[tuple[str, nn.Parameter]],
        optimizer: torch.optim.Optimizer,
        *,
        uplink: str | Mapping[str, str],
        downlink: str | Mapping[str, str],
        owners: Callable[[list[int]], list[int]],
        seed: int,
        on_nonfinite: str,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if on_nonfinite not in NONFINITE:
            raise ValueError(f"on_nonfinite={on_nonfinite!r}; valid choices: {', '.join(NONFINITE)}")
        named = list(model.named_parameters()) if isinstance(model, nn.Module) else list(model)
        names = {id(p): n for n, p in named}
        self.optimizer = optimizer
        self.seed = int(seed)
        self.on_nonfinite = on_nonfinite
        self.uplink_spec, self.downlink_spec = uplink, downlink
        is_lmo = isinstance(optimizer, LMO)
        params: list[tuple[nn.Parameter, dict[str, Any]]] = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    params.append((p, group))
        unknown = [tuple(p.shape) for p, _ in params if id(p) not in names]
        if unknown:
            raise ValueError(f"optimizer holds {len(unknown)} parameter(s) not in the model (shapes {unknown[:3]})")
        own = owners([p.numel() for p, _ in params])
        self.layers: list[LayerSpec] = []
        for i, ((p, group), o) in enumerate(zip(params, own)):
            role = _role_of(group, p)
            worker_mom = is_lmo and group.get("norm") != "adamw"
            self.layers.append(LayerSpec(
                index=i, name=names[id(p)], param=p, role=role,
                up=resolve_compressors(uplink, role, p.shape, what="uplink"),
                down=resolve_compressors(downlink, role, p.shape, what="downlink"),
                owner=o,
                momentum=float(group.get("momentum", 0.0)) if worker_mom else 0.0,
                nesterov=bool(group.get("nesterov", False)) if worker_mom else False,
            ))
        if is_lmo:  # momentum lives on the workers (step 2): switch the optimizer's off and free its buffers
            optimizer.external_momentum = True
            for p, _ in params:
                optimizer.state.get(p, {}).pop("momentum_buffer", None)
        # A step of the raw optimizer outside the engine would train without the EF21 sync (PEERS.md: DeepSpeed Muon
        # once trained plain SGD silently). The hook makes that an error instead of a silent fallback.
        self._in_step = False
        self._hook = optimizer.register_step_pre_hook(self._guard)
        self.step_count = 0
        self.ledger = Ledger()
        self.dense_bytes = sum(L.param.numel() * L.param.element_size() for L in self.layers)

    def _guard(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self._in_step:
            raise RuntimeError("optimizer.step() was called directly on an optimizer driven by EF21: that step would "
                               "skip the compressed sync. Call engine.step() (Lightning/Accelerate do this for you), "
                               "or engine.detach() to hand the optimizer back")

    def detach(self) -> None:
        """Stop guarding the optimizer (its own ``step()`` works again) and restore its own momentum."""
        self._hook.remove()
        if isinstance(self.optimizer, LMO):
            self.optimizer.external_momentum = False

    # ----------------------------------------------------------------- configuration
    def config(self) -> dict[str, Any]:
        """The fields every rank must agree on (checked at start-up)."""
        return {
            "layers": [(L.name, tuple(L.shape)) for L in self.layers],
            "uplink": [L.up.spec for L in self.layers],
            "downlink": [L.down.spec for L in self.layers],
            "norms": [str(g.get("norm", type(self.optimizer).__name__)) for g in self.optimizer.param_groups],
            "momentum": [(L.momentum, L.nesterov) for L in self.layers],
            "seed": self.seed,
        }

    # ----------------------------------------------------------------- kernels (ALGORITHM.md §2)
    def _new_worker(self) -> WorkerState:
        ws = WorkerState()
        for L in self.layers:
            if L.momentum > 0:
                ws.M[L.index] = _zeros32(L.param)
            ws.G[L.index] = _zeros32(L.param)
        return ws

    def _uplink_messages(self, ws: WorkerState, grads: Sequence[Tensor], worker: int) -> list[Tensor]:
        """Steps 2-3 for one worker: update M_j, G_j; return each layer's packed message R_j (uint8)."""
        out = []
        for L in self.layers:
            g = grads[L.index].float()
            D = momentum_direction_(ws.M[L.index], g, L.momentum, L.nesterov) if L.momentum > 0 else g
            if L.up.kind == "identity":  # send D_j itself: same bits, and G_j = D_j exactly (no rounding drift)
                msg = L.up.compress(D)
                ws.G[L.index].copy_(D)
            else:
                msg = L.up.compress(D - ws.G[L.index], seed=_mix(self.seed, self.step_count, L.index, worker))
                ws.G[L.index].add_(_decode(L.up, msg))
            out.append(L.up.pack(msg))
        return out

    def _aggregate(self, ss: ServerState, L: LayerSpec, packed: Sequence[Tensor]) -> None:
        """Step 4 for one served layer: G <- G + (1/n) * sum_j R_j, workers summed in rank order.

        With an identity uplink the messages are the D_j themselves and G = (1/n) sum_j D_j, which is the same
        value as G + (1/n) sum_j (D_j - G_j) but bit-exact data-parallel averaging.
        """
        acc = None
        for j, buf in enumerate(packed):
            R = _decode(L.up, L.up.unpack(buf, L.shape, torch.float32,
                                          seed=_mix(self.seed, self.step_count, L.index, j)))
            acc = R if acc is None else acc.add_(R)
        acc.div_(len(packed))
        if L.up.kind == "identity":
            ss.G[L.index].copy_(acc)
        else:
            ss.G[L.index].add_(acc)

    @contextlib.contextmanager
    def _server_view(self, ss: ServerState, served: Sequence[LayerSpec]) -> Iterator[None]:
        """Point served parameters at X with grad G (others: no grad) so ``optimizer.step()`` is step 5."""
        saved = []
        served_ids = {L.index for L in served}
        for L in self.layers:
            p = L.param
            saved.append((p, p.data, p.grad))
            if L.index in served_ids:
                if L.index in ss.X:
                    p.data = ss.X[L.index]
                p.grad = ss.G[L.index] if p.dtype == torch.float32 else ss.G[L.index].to(p.dtype)
            else:
                p.grad = None
        try:
            yield
        finally:
            for p, data, grad in saved:
                p.data = data
                p.grad = None

    def _downlink_message(self, ss: ServerState, L: LayerSpec) -> Tensor:
        """Step 6 for one served layer: S = C_down(X - W), packed. Identity sends X itself (same bits, W = X exactly)."""
        X = ss.X[L.index]
        if L.down.kind == "identity":
            return L.down.pack(L.down.compress(X))
        seed = _mix(self.seed, self.step_count, L.index, _SERVER)
        return L.down.pack(L.down.compress(X - L.param.detach().float(), seed=seed))

    def _apply_downlink(self, L: LayerSpec, buf: Tensor) -> None:
        """Step 7 for one layer: W <- W + S (or W <- X for identity)."""
        with torch.no_grad():
            if L.down.kind == "identity":
                L.param.copy_(L.down.decompress(L.down.unpack(buf, L.shape, torch.float32)))
            else:
                seed = _mix(self.seed, self.step_count, L.index, _SERVER)
                S = _decode(L.down, L.down.unpack(buf, L.shape, torch.float32, seed=seed))
                L.param.add_(S.to(L.param.dtype))

    def _optimizer_step(self) -> None:
        """Step 5: the optimizer's own rule on the served parameters (pointed at X, grad G)."""
        self._in_step = True
        try:
            self.optimizer.step()
        finally:
            self._in_step = False

    # ----------------------------------------------------------------- helpers
    def _bits(self, layers: Sequence[LayerSpec], which: str) -> int:
        return sum(getattr(L, which).bits(L.shape, torch.float32) for L in layers)

    def _lengths(self, layers: Sequence[LayerSpec], which: str, n_owners: int) -> list[int]:
        lengths = [0] * n_owners
        for L in layers:
            lengths[max(L.owner, 0)] += getattr(L, which).wire_nbytes(L.shape, torch.float32)
        return lengths

    @staticmethod
    def _nonfinite(grads: Sequence[Tensor]) -> bool:
        return not all(bool(torch.isfinite(g).all()) for g in grads)

    def _skip(self, where: str) -> None:
        msg = f"EF21 step {self.step_count}: non-finite gradient on {where}; step skipped on every worker"
        if self.on_nonfinite == "raise":
            raise FloatingPointError(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        self.ledger.record(StepRecord(step=self.step_count, skipped=True))
        self.step_count += 1

    @staticmethod
    def _tensors_state(d: Mapping[int, Tensor], layers: Sequence[LayerSpec]) -> dict[str, Tensor]:
        return {L.name: d[L.index].clone() for L in layers if L.index in d}

    @staticmethod
    def _load_tensors(dst: dict[int, Tensor], src: Mapping[str, Tensor], layers: Sequence[LayerSpec], what: str) -> None:
        for L in layers:
            if L.index in dst:
                if L.name not in src:
                    raise ValueError(f"EF21 state is missing {what}[{L.name!r}]")
                dst[L.index].copy_(src[L.name])

    def _optimizer_state(self, served: Sequence[LayerSpec]) -> dict[str, Any]:
        st = self.optimizer.state
        return {L.name: {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in st[L.param].items()}
                for L in served if L.param in st}

    def _load_optimizer_state(self, state: Mapping[str, Any], served: Sequence[LayerSpec]) -> None:
        for L in served:
            if L.name in state:
                self.optimizer.state[L.param] = {k: (v.clone() if isinstance(v, Tensor) else v)
                                                 for k, v in state[L.name].items()}


class EF21Engine(_Core):
    """One worker (and its share of the server) of EF21-Muon in a torch.distributed process group.

    The framework runs forward/backward as usual so that each parameter's ``.grad`` holds this worker's
    gradient g_j at W; then :meth:`step` runs steps 2-7 and leaves the updated W in the parameters. Call it
    instead of ``optimizer.step()``; ``optimizer.zero_grad()`` is still the caller's.

    Args:
        model: the module (or its ``named_parameters()``) whose parameters hold W; names key the state dict.
        optimizer: an :class:`~ef_lightning.LMO` (worker momentum from its groups) or any torch optimizer.
        uplink: compressor spec for worker -> server messages, or a mapping role -> spec (roles: :data:`ROLES`).
        downlink: compressor spec for server -> worker messages (must be identity with ``allgather``).
        topology: ``"sharded"`` (default), ``"allgather"`` or ``"server"`` (see :mod:`ef_lightning.comm`).
        group: process group (default WORLD).
        server_rank: the server's rank for ``topology="server"``.
        seed: base seed of the compressors' shared generators (same on every rank).
        on_nonfinite: ``"skip"`` (warn, count, leave all state untouched) or ``"raise"``.
        sync_initial: broadcast rank 0's parameters first so every rank starts from the same W = X.
    """

    def __init__(
        self,
        model: nn.Module | Sequence[tuple[str, nn.Parameter]],
        optimizer: torch.optim.Optimizer,
        *,
        uplink: str | Mapping[str, str] = "identity",
        downlink: str | Mapping[str, str] = "identity",
        topology: str = "sharded",
        group: Any = None,
        server_rank: int = 0,
        seed: int = 0,
        on_nonfinite: str = "skip",
        sync_initial: bool = True,
    ) -> None:
        kwargs = {"server_rank": server_rank} if topology == "server" else {}
        self.transport: Transport = build_transport(topology, group, **kwargs)
        t = self.transport
        super().__init__(model, optimizer, uplink=uplink, downlink=downlink, owners=t.owners, seed=seed,
                         on_nonfinite=on_nonfinite)
        if t.replicated:
            bad = sorted({L.down.spec for L in self.layers if L.down.kind != "identity"})
            if bad:
                raise ValueError(f"downlink={bad[0]!r} needs topology 'server' or 'sharded': with 'allgather' every "
                                 "rank already holds X, so there is no downlink; use downlink='identity'")
        self._check_config()
        self.served = [L for L in self.layers if L.owner in (-1, t.rank)]
        n_owners = 1 if t.replicated else t.world_size
        self.up_lengths = self._lengths(self.layers, "up", n_owners)
        self.down_lengths = self._lengths(self.layers, "down", n_owners)
        if sync_initial:
            with torch.no_grad():
                for L in self.layers:
                    t.broadcast_(L.param.data, 0)
        self.worker = self._new_worker()
        self.server = ServerState()
        for L in self.served:
            self.server.G[L.index] = _zeros32(L.param)
            if not (t.replicated and L.param.dtype == torch.float32):
                self.server.X[L.index] = L.param.detach().float().clone()

    @property
    def topology(self) -> str:
        """The transport's topology name."""
        return self.transport.topology

    def config(self) -> dict[str, Any]:
        c = super().config()
        c.update(topology=self.transport.topology, world_size=self.transport.world_size,
                 server_rank=getattr(self.transport, "server_rank", None))
        return c

    def _check_config(self) -> None:
        mine = self.config()
        digest = {k: hashlib.sha256(repr(v).encode()).hexdigest()[:16] for k, v in mine.items()}
        everyone = self.transport.all_gather_object((digest, {k: repr(v)[:200] for k, v in mine.items()}))
        for r, (d, shown) in enumerate(everyone):
            diff = [k for k in digest if d.get(k) != digest[k]]
            if diff:
                k = diff[0]
                raise ValueError(f"EF21 configuration differs between ranks in field {k!r}: rank {self.transport.rank} "
                                 f"has {repr(mine[k])[:200]}, rank {r} has {shown[k]} (fields differing: {diff})")

    @torch.no_grad()
    def step(self) -> bool:
        """Run EF21-Muon steps 2-7 on the gradients in ``param.grad``.

        Returns:
            True if the step was applied; False if it was skipped because some worker's gradient was non-finite
            (then no state changed anywhere).
        """
        t = self.transport
        grads = [L.param.grad if L.param.grad is not None else torch.zeros_like(L.param) for L in self.layers]
        if t.any(self._nonfinite(grads)):
            self._skip(f"rank {t.rank}" if self._nonfinite(grads) else "another rank")
            return False
        # 2-3: worker messages, grouped by owner in layer order
        packed = self._uplink_messages(self.worker, grads, t.rank)
        n_owners = len(self.up_lengths)
        parts = [[] for _ in range(n_owners)]
        for L, buf in zip(self.layers, packed):
            parts[max(L.owner, 0)].append(buf)
        empty = torch.empty(0, dtype=torch.uint8, device=grads[0].device if grads else "cpu")
        received = t.uplink([torch.cat(p) if p else empty for p in parts], self.up_lengths)
        # 4-5: aggregate and step the layers this rank serves
        if self.served:
            offset = 0
            for L in self.served:
                n = L.up.wire_nbytes(L.shape, torch.float32)
                self._aggregate(self.server, L, [b[offset:offset + n] for b in received])
                offset += n
            with self._server_view(self.server, self.served):
                self._optimizer_step()
        # 6-7: downlink
        if not t.replicated:
            mine = [self._downlink_message(self.server, L) for L in self.served]
            bufs = t.downlink(torch.cat(mine) if mine else None, self.down_lengths)
            offsets = [0] * len(bufs)
            for L in self.layers:
                o, n = L.owner, L.down.wire_nbytes(L.shape, torch.float32)
                self._apply_downlink(L, bufs[o][offsets[o]:offsets[o] + n])
                offsets[o] += n
        elif any(L.param.dtype != torch.float32 for L in self.layers):
            for L in self.layers:  # replicated: W is X in the training dtype
                if L.index in self.server.X:
                    L.param.data.copy_(self.server.X[L.index])
        self.ledger.record(StepRecord(
            step=self.step_count,
            uplink_bits=self._bits(self.layers, "up"),
            uplink_wire_bytes=t.uplink_wire_bytes(self.up_lengths),
            downlink_bits=0 if t.replicated else self._bits(self.layers, "down"),
            downlink_wire_bytes=t.downlink_wire_bytes(self.down_lengths),
            dense_bytes=self.dense_bytes,
        ))
        self.step_count += 1
        return True

    def server_parameters(self) -> dict[str, Tensor]:
        """X for the layers this rank serves (``allgather``: all layers), keyed by parameter name."""
        return {L.name: (self.server.X[L.index] if L.index in self.server.X else L.param.detach()).clone()
                for L in self.served}

    @torch.no_grad()
    def gather_server_model(self) -> dict[str, Tensor]:
        """The whole X on every rank, keyed by parameter name (a collective: every rank must call it).

        One broadcast per owner of its layers packed in one float32 buffer; used to evaluate at X when the downlink
        is compressed (W != X). ``allgather``: X is already everywhere, nothing is sent.
        """
        t = self.transport
        if t.replicated:
            return self.server_parameters()
        out: dict[str, Tensor] = {}
        for o in range(t.world_size):
            layers = [L for L in self.layers if L.owner == o]
            if not layers:
                continue
            if t.rank == o:
                buf = torch.cat([self.server.X[L.index].flatten() for L in layers])
            else:
                buf = torch.empty(sum(L.param.numel() for L in layers), dtype=torch.float32, device=t.device)
            t.broadcast_(buf, o)
            for L, chunk in zip(layers, buf.split([L.param.numel() for L in layers])):
                out[L.name] = chunk.view(L.shape).clone()
        return out

    def state_dict(self) -> dict[str, Any]:
        """This rank's own EF21 state: M_j, G_j, served X and G, the optimizer state of served layers, ledger."""
        return {
            "rank": self.transport.rank,
            "world_size": self.transport.world_size,
            "topology": self.transport.topology,
            "step": self.step_count,
            "worker": {"M": self._tensors_state(self.worker.M, self.layers),
                       "G": self._tensors_state(self.worker.G, self.layers)},
            "server": {"X": self._tensors_state(self.server.X, self.served),
                       "G": self._tensors_state(self.server.G, self.served)},
            "optimizer": self._optimizer_state(self.served),
            "ledger": self.ledger.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict` on the same rank of the same topology and world size."""
        t = self.transport
        for key, mine in (("world_size", t.world_size), ("topology", t.topology), ("rank", t.rank)):
            if state.get(key) != mine:
                raise ValueError(f"EF21 state was saved with {key}={state.get(key)!r}, this process has {key}={mine!r}; "
                                 "each rank must load its own state from a run with the same world size and topology")
        self.step_count = int(state["step"])
        self._load_tensors(self.worker.M, state["worker"]["M"], self.layers, "worker.M")
        self._load_tensors(self.worker.G, state["worker"]["G"], self.layers, "worker.G")
        self._load_tensors(self.server.X, state["server"]["X"], self.served, "server.X")
        self._load_tensors(self.server.G, state["server"]["G"], self.served, "server.G")
        self._load_optimizer_state(state["optimizer"], self.served)
        served = {id(L.param) for L in self.served}
        for L in self.layers:  # a framework may have loaded rank 0's optimizer state everywhere: keep only ours
            if id(L.param) not in served:
                self.optimizer.state.pop(L.param, None)
        self.ledger.load_state_dict(state["ledger"])


class Simulator(_Core):
    """n EF21-Muon workers and the server in one process: same math and ledger as the real transports.

    The model's parameters hold W (the point where gradients are evaluated); X is kept separately and returned by
    :meth:`server_parameters`. Randomness and summation order match :class:`EF21Engine`, so a Simulator and n real
    processes fed the same shards produce the same X and W.

    Args:
        model: the module whose parameters hold W.
        optimizer: an :class:`~ef_lightning.LMO` or any torch optimizer over ``model``'s parameters.
        n_workers: number of simulated workers (>= 1).
        uplink, downlink: compressor specs or role -> spec mappings (see :class:`EF21Engine`).
        seed: base seed of the compressors' shared generators.
        on_nonfinite: ``"skip"`` or ``"raise"``.

    Example::

        sim = Simulator(model, build_lmo_optimizer(model, "gluon", lr=0.02), n_workers=4, uplink="top_k:0.05")
        losses = sim.step(lambda m, b: F.cross_entropy(m(b[0]), b[1]), [batch0, batch1, batch2, batch3])
        print(sim.ledger.summary())
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        n_workers: int,
        uplink: str | Mapping[str, str] = "identity",
        downlink: str | Mapping[str, str] = "identity",
        seed: int = 0,
        on_nonfinite: str = "skip",
    ) -> None:
        if not isinstance(n_workers, int) or isinstance(n_workers, bool) or n_workers < 1:
            raise ValueError(f"n_workers={n_workers!r}; must be an integer >= 1")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        super().__init__(model, optimizer, uplink=uplink, downlink=downlink,
                         owners=lambda sizes: [0] * len(sizes), seed=seed, on_nonfinite=on_nonfinite)
        self.model = model
        self.n_workers = n_workers
        self.workers = [self._new_worker() for _ in range(n_workers)]
        self.server = ServerState()
        for L in self.layers:
            self.server.G[L.index] = _zeros32(L.param)
            self.server.X[L.index] = L.param.detach().float().clone()

    def config(self) -> dict[str, Any]:
        c = super().config()
        c.update(topology="simulated", world_size=self.n_workers)
        return c

    def step(self, loss_fn: Callable[[nn.Module, Any], Tensor], batches: Sequence[Any]) -> list[float]:
        """One EF21-Muon step: each worker's gradient at W on its batch, then steps 2-7.

        Args:
            loss_fn: ``loss_fn(model, batch) -> scalar loss`` (the mean over the batch).
            batches: one batch per worker (``len(batches) == n_workers``).

        Returns:
            the per-worker losses (floats) at W before the step.
        """
        if len(batches) != self.n_workers:
            raise ValueError(f"got {len(batches)} batches for n_workers={self.n_workers}; pass one batch per worker")
        losses, grads = [], []
        for batch in batches:
            self.optimizer.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = loss_fn(self.model, batch)
                loss.backward()
            losses.append(float(loss.detach()))
            grads.append([L.param.grad.detach().clone() if L.param.grad is not None else torch.zeros_like(L.param)
                          for L in self.layers])
        self.optimizer.zero_grad(set_to_none=True)
        self.apply(grads)
        return losses

    @torch.no_grad()
    def apply(self, grads: Sequence[Sequence[Tensor]]) -> bool:
        """Steps 2-7 given each worker's gradients (``grads[j][i]`` = worker j, layer i in optimizer order)."""
        bad = [j for j, g in enumerate(grads) if self._nonfinite(g)]
        if bad:
            self._skip(f"worker(s) {bad}")
            return False
        packed = [self._uplink_messages(ws, g, j) for j, (ws, g) in enumerate(zip(self.workers, grads))]
        for L in self.layers:
            self._aggregate(self.server, L, [packed[j][L.index] for j in range(self.n_workers)])
        with self._server_view(self.server, self.layers):
            self._optimizer_step()
        for L in self.layers:
            self._apply_downlink(L, self._downlink_message(self.server, L))
        self.ledger.record(StepRecord(
            step=self.step_count,
            uplink_bits=self._bits(self.layers, "up"),
            uplink_wire_bytes=sum(self._lengths(self.layers, "up", 1)),
            downlink_bits=self._bits(self.layers, "down"),
            downlink_wire_bytes=sum(self._lengths(self.layers, "down", 1)),
            dense_bytes=self.dense_bytes,
        ))
        self.step_count += 1
        return True

    def server_parameters(self) -> dict[str, Tensor]:
        """X, the server's exact model, keyed like ``model.named_parameters()``."""
        return {L.name: self.server.X[L.index].clone() for L in self.layers}

    def state_dict(self) -> dict[str, Any]:
        """Every simulated worker's state, the server state, the optimizer state and the ledger."""
        return {
            "n_workers": self.n_workers,
            "step": self.step_count,
            "workers": [{"M": self._tensors_state(w.M, self.layers), "G": self._tensors_state(w.G, self.layers)}
                        for w in self.workers],
            "server": {"X": self._tensors_state(self.server.X, self.layers),
                       "G": self._tensors_state(self.server.G, self.layers)},
            "optimizer": self._optimizer_state(self.layers),
            "ledger": self.ledger.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict` (same model and n_workers). W is the model's own state."""
        if state.get("n_workers") != self.n_workers:
            raise ValueError(f"state has n_workers={state.get('n_workers')!r}, this Simulator has {self.n_workers}")
        self.step_count = int(state["step"])
        for w, s in zip(self.workers, state["workers"]):
            self._load_tensors(w.M, s["M"], self.layers, "worker.M")
            self._load_tensors(w.G, s["G"], self.layers, "worker.G")
        self._load_tensors(self.server.X, state["server"]["X"], self.layers, "server.X")
        self._load_tensors(self.server.G, state["server"]["G"], self.layers, "server.G")
        self._load_optimizer_state(state["optimizer"], self.layers)
        self.ledger.load_state_dict(state["ledger"])
