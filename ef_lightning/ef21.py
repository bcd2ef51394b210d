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
from ef_lightning.optim import LMO, _classify, momentum_direction_

__all__ = ["ROLES", "ESTIMATORS", "DEFAULT_UPLINK", "DEFAULT_DOWNLINK", "DEFAULT_TOPOLOGY", "EF21Engine", "Simulator",
           "LayerSpec", "resolve_compressors"]

#: layer roles a per-role compressor mapping may name (``default`` applies to roles not named)
ROLES = ("hidden", "embedding", "head", "vector", "conv", "default")
NONFINITE = ("skip", "raise")
#: Default compressors of the integrations (Lightning strategy, Accelerate plugin), from the measurements in
#: docs/benchmarks.md (byte-level Llama, 2 gloo workers, bytes to a target of the uncompressed loss + 1 %): uplink
#: ``top_k:0.1+natural`` on matrices reaches the target with 11.6x fewer uplink bytes than uncompressed (rank:4 11.0x,
#: top_k:0.05 9.4x, top_k:0.1 6.0x); a ``top_k:0.5`` downlink halves the server's traffic for ~13 % more steps (total
#: uplink + downlink 2.1x). Vectors (biases, norm gains) are tiny and stay dense. With ``allgather`` there is no downlink.
DEFAULT_UPLINK: Mapping[str, str] = {"hidden": "top_k:0.1+natural", "embedding": "top_k:0.1+natural",
                                     "head": "top_k:0.1+natural", "conv": "top_k:0.1+natural",
                                     "vector": "identity", "default": "identity"}
DEFAULT_DOWNLINK: Mapping[str, str] = {"hidden": "top_k:0.5", "embedding": "top_k:0.5", "head": "top_k:0.5",
                                       "conv": "top_k:0.5", "vector": "identity", "default": "identity"}
DEFAULT_TOPOLOGY = "sharded"

#: gradient estimators (ALGORITHM.md §2 and §4; arXiv 2604.10689)
ESTIMATORS = ("ef21", "marina", "ef21_page", "mvr")
_SERVER = 1 << 20  # "sender id" of the server side in seed derivation (workers are 0..n-1)
_COIN = _SERVER + 1  # stream of the shared Bernoulli(p) refresh coin
_SUBSET = _SERVER + 2  # stream of the partial-participation subsets
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


def _role_of(group: Mapping[str, Any], p: Tensor, classified: Mapping[int, str]) -> str:
    """The group's ``role`` (LMO param groups carry one), else the role read from the model's structure (so a
    per-role compressor mapping also works with AdamW & co.), else matrix -> hidden, vector -> vector."""
    role = group.get("role") or classified.get(id(p))
    if role is not None and role != "other":
        return role
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


def _decode(comp: _comp.Compressor, msg: Any, scale_unbiased: bool = True) -> Tensor:
    """Decompress to float32; an unbiased Q(omega) under EF21 is scaled by 1/(omega+1) (ALGORITHM.md §3).

    MARINA uses Q unscaled (its estimator needs E Q(x) = x), hence ``scale_unbiased=False`` there.
    """
    x = comp.decompress(msg).float()
    if scale_unbiased and comp.kind == "unbiased":
        x.mul_(1.0 / (1.0 + comp.constant(msg.shape)))
    return x


@dataclasses.dataclass
class WorkerState:
    """One worker's memory, keyed by layer index: momentum M_j (``ef21`` with mu > 0), the EF21 estimate G_j
    (not ``marina``), and the variance-reduced estimator V_j (``ef21_page``, ``mvr``)."""

    M: dict[int, Tensor] = dataclasses.field(default_factory=dict)
    G: dict[int, Tensor] = dataclasses.field(default_factory=dict)
    V: dict[int, Tensor] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ServerState:
    """Server memory for the layers this process serves: X (unless it *is* the parameter) and G."""

    X: dict[int, Tensor] = dataclasses.field(default_factory=dict)
    G: dict[int, Tensor] = dataclasses.field(default_factory=dict)


_IDENTITY = _comp.build("identity")


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
        estimator: str = "ef21",
        p: float | None = None,
        participation: float | None = None,
    ) -> None:
        refresh_p = p  # (``p`` is reused for parameters below)
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
        classified = {id(q): role for _, q, role, *_ in _classify(model)} if isinstance(model, nn.Module) else {}
        self.layers: list[LayerSpec] = []
        for i, ((p, group), o) in enumerate(zip(params, own)):
            role = _role_of(group, p, classified)
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
        self.applied = 0  # applied (not skipped) steps: the first one of a VR estimator is a full refresh
        self.ledger = Ledger()
        self.dense_bytes = sum(L.param.numel() * L.param.element_size() for L in self.layers)
        self.estimator, self.p = self._check_estimator(estimator, refresh_p)
        if participation is not None and not (isinstance(participation, (int, float)) and 0 < participation <= 1):
            raise ValueError(f"participation={participation!r}; must be a fraction of workers in (0, 1] or None")
        self.participation = None if participation in (None, 1, 1.0) else float(participation)
        self._W_prev: dict[int, Tensor] = {}  # W where the last gradient was taken (VR estimators only)

    def _check_estimator(self, estimator: str, p: float | None) -> tuple[str, float | None]:
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator={estimator!r}; valid choices: {', '.join(ESTIMATORS)}")
        if estimator == "marina":
            bad = [(L.name, L.up.spec) for L in self.layers if L.up.kind == "contractive"]
            if bad:
                raise ValueError(f"estimator='marina' needs unbiased compressors (rand_k:<r>:unbiased, natural, "
                                 f"qsgd:<s>) or identity; uplink {bad[0][1]!r} for {bad[0][0]!r} is contractive — use "
                                 "estimator='ef21_page' or 'mvr' for contractive compressors")
        if estimator in ("marina", "ef21_page"):
            if p is None:  # MARINA's choice p = (bits of Q) / (bits of a dense message) (arXiv 2102.07845, Cor. 2.1)
                dense = sum(32 * L.param.numel() for L in self.layers)
                p = min(1.0, max(1e-6, self._bits(self.layers, "up") / dense))
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
                raise ValueError(f"p={p!r}: the refresh probability of estimator {estimator!r} must be in (0, 1]")
            return estimator, float(p)
        if p is not None:
            raise ValueError(f"p={p!r} only applies to estimator 'marina' or 'ef21_page', not {estimator!r}")
        return estimator, None

    @property
    def needs_previous_gradient(self) -> bool:
        """True when the next step needs a second gradient on the same minibatch at the previous point."""
        return self.estimator != "ef21" and self.applied > 0

    def _refresh(self) -> bool:
        """The shared Bernoulli(p) coin of ``marina``/``ef21_page`` (always heads on the first step)."""
        if self.estimator not in ("marina", "ef21_page"):
            return False
        if self.applied == 0:
            return True
        g = torch.Generator().manual_seed(_mix(self.seed, self.step_count, _COIN))
        return bool(torch.rand((), generator=g) < self.p)

    def _participants(self, n: int) -> list[int]:
        """This round's workers: all, or a seeded subset of round(participation * n) (at least one)."""
        if self.participation is None:
            return list(range(n))
        k = max(1, round(self.participation * n))
        g = torch.Generator().manual_seed(_mix(self.seed, self.step_count, _SUBSET))
        return sorted(torch.randperm(n, generator=g)[:k].tolist())

    def _up_comp(self, L: LayerSpec, refresh: bool) -> _comp.Compressor:
        """The uplink compressor this step: a MARINA refresh round sends full gradients."""
        return _IDENTITY if (refresh and self.estimator == "marina") else L.up

    def _exact_identity(self, comp: _comp.Compressor) -> bool:
        # identity sends the value itself (not a difference) only when every worker reports every step
        return comp.kind == "identity" and self.participation is None

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
            "estimator": (self.estimator, self.p, self.participation),
        }

    # ----------------------------------------------------------------- kernels (ALGORITHM.md §2)
    def _new_worker(self) -> WorkerState:
        ws = WorkerState()
        for L in self.layers:
            if L.momentum > 0 and self.estimator == "ef21":
                ws.M[L.index] = _zeros32(L.param)
            if self.estimator != "marina":
                ws.G[L.index] = _zeros32(L.param)
            if self.estimator in ("ef21_page", "mvr"):
                ws.V[L.index] = _zeros32(L.param)
        return ws

    def _uplink_messages(self, ws: WorkerState, grads: Sequence[Tensor], prev: Sequence[Tensor] | None,
                         worker: int, refresh: bool) -> list[Tensor]:
        """Steps 2-3 for one worker; return each layer's packed message (uint8).

        ``grads`` are g_j at the current W, ``prev`` the gradients on the same minibatch at the previous W (VR
        estimators after their first step). Estimators (ALGORITHM.md §4):

        * ``ef21``: D_j = momentum(g_j); R_j = C(D_j - G_j); G_j += R_j.
        * ``marina``: refresh round: send g_j (dense); otherwise send Q(g_j - g_j_prev), Q unbiased, unscaled.
        * ``ef21_page``: V_j = g_j on refresh, else V_j += g_j - g_j_prev; then EF21 on V_j.
        * ``mvr`` (STORM): V_j = g_j + (1 - a) (V_j - g_j_prev) with a = 1 - mu (first step V_j = g_j); then EF21.
        """
        out = []
        for L in self.layers:
            i = L.index
            g = grads[i].float()
            comp = self._up_comp(L, refresh)
            seed = _mix(self.seed, self.step_count, i, worker)
            if self.estimator == "marina":
                msg = comp.compress(g) if refresh else comp.compress(g - prev[i].float(), seed=seed)
                out.append(comp.pack(msg))
                continue
            if self.estimator == "ef21":
                D = momentum_direction_(ws.M[i], g, L.momentum, L.nesterov) if i in ws.M else g
            elif self.estimator == "ef21_page":
                D = ws.V[i].copy_(g) if refresh else ws.V[i].add_(g).sub_(prev[i].float())
            else:  # mvr
                D = ws.V[i].copy_(g) if prev is None else ws.V[i].sub_(prev[i].float()).mul_(L.momentum).add_(g)
            if self._exact_identity(comp):  # send D_j itself: same bits, and G_j = D_j exactly (no rounding drift)
                msg = comp.compress(D)
                ws.G[i].copy_(D)
            else:
                msg = comp.compress(D - ws.G[i], seed=seed)
                ws.G[i].add_(_decode(comp, msg))
            out.append(comp.pack(msg))
        return out

    def _aggregate(self, ss: ServerState, L: LayerSpec, packed: Sequence[Tensor], senders: Sequence[int],
                   n_workers: int, refresh: bool) -> None:
        """Step 4 for one served layer: G <- G + (1/n) * sum_j R_j, senders summed in rank order.

        With an identity uplink (everyone reporting) the messages are the D_j themselves and G = (1/n) sum_j D_j:
        the same value as G + (1/n) sum_j (D_j - G_j), but bit-exact data-parallel averaging. Non-participants of a
        partial-participation round contribute R_j = 0, which keeps G = mean_j G_j. ``marina``: G = mean of the
        participants' full gradients on a refresh round, else G += mean of their Q(gradient differences).
        """
        comp = self._up_comp(L, refresh)
        marina = self.estimator == "marina"
        acc = None
        for j, buf in zip(senders, packed):
            R = _decode(comp, comp.unpack(buf, L.shape, torch.float32, seed=_mix(self.seed, self.step_count, L.index, j)),
                        scale_unbiased=not marina)
            acc = R if acc is None else acc.add_(R)
        acc.div_(len(senders) if marina else n_workers)
        if (marina and refresh) or (not marina and self._exact_identity(comp)):
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
    def _comp(self, L: LayerSpec, which: str, refresh: bool) -> _comp.Compressor:
        return self._up_comp(L, refresh) if which == "up" else L.down

    def _bits(self, layers: Sequence[LayerSpec], which: str, refresh: bool = False) -> int:
        return sum(self._comp(L, which, refresh).bits(L.shape, torch.float32) for L in layers)

    def _lengths(self, layers: Sequence[LayerSpec], which: str, n_owners: int, refresh: bool = False) -> list[int]:
        lengths = [0] * n_owners
        for L in layers:
            lengths[max(L.owner, 0)] += self._comp(L, which, refresh).wire_nbytes(L.shape, torch.float32)
        return lengths

    def _snapshot_w(self) -> None:
        """Remember W (where this step's gradients were taken) for the next step's second gradient."""
        if self.estimator != "ef21":
            for L in self.layers:
                self._W_prev[L.index] = L.param.detach().clone()

    def load_parameters(self, values: Mapping[str, Tensor]) -> None:
        """Copy tensors keyed by parameter name into the parameters (cast to their dtype); names not given keep
        their values."""
        with torch.no_grad():
            for L in self.layers:
                if L.name in values:
                    L.param.copy_(values[L.name])

    @contextlib.contextmanager
    def _params_loaded(self, values: Mapping[str, Tensor]) -> Iterator[None]:
        """Inside the block the parameters hold ``values`` (by name); afterwards their current values again."""
        current = {L.name: L.param.detach().clone() for L in self.layers if L.name in values}
        self.load_parameters(values)
        try:
            yield
        finally:
            self.load_parameters(current)

    def at_previous_point(self) -> contextlib.AbstractContextManager[None]:
        """Temporarily load the previous step's W into the parameters (for the VR estimators' second gradient)."""
        return self._params_loaded({L.name: self._W_prev[L.index] for L in self.layers})

    def whole_server_model(self) -> dict[str, Tensor]:
        """X for every layer on this process (the engine gathers it: a collective), keyed by parameter name."""
        return self.server_parameters()

    def _w_is_x(self) -> bool:
        return all(L.down.kind == "identity" for L in self.layers)  # an identity downlink sets W = X every step

    @contextlib.contextmanager
    def at_server_model(self) -> Iterator[None]:
        """Evaluate at the server model X (ALGORITHM.md §2: validation loss is reported at X): inside the block the
        parameters hold X, afterwards W again. With an identity downlink W == X and nothing is gathered; otherwise
        the engine gathers X from its owners, a collective every rank must enter."""
        if self._w_is_x():
            yield
            return
        with self._params_loaded(self.whole_server_model()):
            yield

    def load_server_model(self) -> None:
        """Leave X in the parameters for good (e.g. when training ends: X is the model training produced)."""
        if not self._w_is_x():
            self.load_parameters(self.whole_server_model())

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

    def _worker_state(self, ws: WorkerState) -> dict[str, dict[str, Tensor]]:
        return {k: self._tensors_state(getattr(ws, k), self.layers) for k in ("M", "G", "V")}

    def _load_worker(self, ws: WorkerState, state: Mapping[str, Mapping[str, Tensor]]) -> None:
        for k in ("M", "G", "V"):
            self._load_tensors(getattr(ws, k), state.get(k, {}), self.layers, f"worker.{k}")

    def _load_w_prev(self, state: Mapping[str, Any]) -> None:
        self.applied = int(state.get("applied", state["step"]))
        self._W_prev = {L.index: state["W_prev"][L.name].clone() for L in self.layers if L.name in state.get("W_prev", {})}

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
        estimator: ``"ef21"`` (default) or a variance-reduced estimator (``"marina"``, ``"ef21_page"``, ``"mvr"``;
            ALGORITHM.md §4, arXiv 2604.10689); the VR ones need ``step(closure)``.
        p: refresh probability of ``marina``/``ef21_page`` in (0, 1]; default bits(compressed) / bits(dense)
            (MARINA's choice, arXiv 2102.07845).
        participation: fraction of workers that send each round (``topology="server"`` only): a subset seeded
            per step, identical on every rank; the others send nothing and keep their state.
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
        estimator: str = "ef21",
        p: float | None = None,
        participation: float | None = None,
    ) -> None:
        kwargs = {"server_rank": server_rank} if topology == "server" else {}
        self.transport: Transport = build_transport(topology, group, **kwargs)
        t = self.transport
        if participation not in (None, 1, 1.0) and topology != "server":
            raise ValueError(f"participation={participation!r} needs topology 'server' (partial participation is the "
                             f"federated setting: a server and a subset of clients per round), got {topology!r}")
        super().__init__(model, optimizer, uplink=uplink, downlink=downlink, owners=t.owners, seed=seed,
                         on_nonfinite=on_nonfinite, estimator=estimator, p=p, participation=participation)
        if t.replicated:
            bad = sorted({L.down.spec for L in self.layers if L.down.kind != "identity"})
            if bad:
                raise ValueError(f"downlink={bad[0]!r} needs topology 'server' or 'sharded': with 'allgather' every "
                                 "rank already holds X, so there is no downlink; use downlink='identity'")
        self._check_config()
        self.served = [L for L in self.layers if L.owner in (-1, t.rank)]
        n_owners = 1 if t.replicated else t.world_size
        self.up_lengths = {r: self._lengths(self.layers, "up", n_owners, r) for r in (False, True)}  # by refresh
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

    def step(self, closure: Callable[[], Any] | None = None) -> bool:
        """Run EF21-Muon steps 2-7 on the gradients in ``param.grad``.

        Args:
            closure: needed by the variance-reduced estimators (``marina``, ``ef21_page``, ``mvr``) from their second
                step on: it must zero the gradients, recompute the loss on the SAME minibatch and call
                ``backward()`` (torch's ``optimizer.step(closure)`` convention). The engine calls it once with the
                previous step's W loaded into the parameters: one extra forward/backward per step, counted in the
                ledger (``gradient_evaluations_per_worker``).

        Returns:
            True if the step was applied; False if it was skipped because some worker's gradient was non-finite
            (then no state changed anywhere).
        """
        # a worker outside this round's participants sends nothing: no second gradient either
        vr = self.needs_previous_gradient and self.transport.rank in self._participants(self.transport.world_size)
        # the closure below overwrites .grad, so only then are the current gradients copied
        grads = [(L.param.grad.detach().clone() if vr else L.param.grad.detach()) if L.param.grad is not None
                 else torch.zeros_like(L.param) for L in self.layers]
        prev = None
        if vr:
            if closure is None:
                raise ValueError(f"estimator {self.estimator!r} needs a second gradient on the same minibatch at the "
                                 "previous point: call engine.step(closure) with a closure that zeroes the gradients, "
                                 "recomputes the loss on the same batch and calls backward()")
            prev = self._previous_gradients(closure)
        with torch.no_grad():
            return self._step(grads, prev)

    def _previous_gradients(self, closure: Callable[[], Any]) -> list[Tensor]:
        with self.at_previous_point(), torch.enable_grad():
            closure()
        return [L.param.grad.detach().clone() if L.param.grad is not None else torch.zeros_like(L.param)
                for L in self.layers]

    def _step(self, grads: list[Tensor], prev: list[Tensor] | None) -> bool:
        t = self.transport
        refresh = self._refresh()
        participants = self._participants(t.world_size)
        me = t.rank in participants
        bad = me and (self._nonfinite(grads) or (prev is not None and self._nonfinite(prev)))
        if t.any(bad):
            self._skip(f"rank {t.rank}" if bad else "another rank")
            return False
        self._snapshot_w()
        up_lengths = self.up_lengths[refresh]
        # 2-3: worker messages, grouped by owner in layer order
        empty = torch.empty(0, dtype=torch.uint8, device=grads[0].device if grads else "cpu")
        if me:
            packed = self._uplink_messages(self.worker, grads, prev, t.rank, refresh)
            parts = [[] for _ in range(len(up_lengths))]
            for L, buf in zip(self.layers, packed):
                parts[max(L.owner, 0)].append(buf)
            parts = [torch.cat(p) if p else empty for p in parts]
        if self.participation is None:
            received = t.uplink(parts, up_lengths)
        else:  # server topology: only this round's participants send (point to point)
            received = t.uplink_from(parts[t.server_rank] if me else None, participants, up_lengths)
        # 4-5: aggregate and step the layers this rank serves
        if self.served:
            offset = 0
            for L in self.served:
                n = self._up_comp(L, refresh).wire_nbytes(L.shape, torch.float32)
                self._aggregate(self.server, L, [b[offset:offset + n] for b in received], participants,
                                t.world_size, refresh)
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
            uplink_bits=self._bits(self.layers, "up", refresh) if me else 0,
            uplink_wire_bytes=t.uplink_wire_bytes(up_lengths) if me else 0,
            downlink_bits=0 if t.replicated else self._bits(self.layers, "down"),
            downlink_wire_bytes=t.downlink_wire_bytes(self.down_lengths),
            dense_bytes=self.dense_bytes,
            gradient_evals=(1 + (prev is not None)) if me else 0,
        ))
        self.step_count += 1
        self.applied += 1
        return True

    def server_parameters(self) -> dict[str, Tensor]:
        """X for the layers this rank serves (``allgather``: all layers), keyed by parameter name."""
        return {L.name: (self.server.X[L.index] if L.index in self.server.X else L.param.detach()).clone()
                for L in self.served}

    def whole_server_model(self) -> dict[str, Tensor]:
        return self.gather_server_model()

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
            "applied": self.applied,
            "worker": self._worker_state(self.worker),
            "W_prev": self._tensors_state(self._W_prev, self.layers),
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
        self._load_worker(self.worker, state["worker"])
        self._load_w_prev(state)
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
        estimator, p: as for :class:`EF21Engine`; :meth:`step` takes the second gradient itself.
        participation: fraction of workers per round (partial participation, the federated setting).

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
        estimator: str = "ef21",
        p: float | None = None,
        participation: float | None = None,
    ) -> None:
        if not isinstance(n_workers, int) or isinstance(n_workers, bool) or n_workers < 1:
            raise ValueError(f"n_workers={n_workers!r}; must be an integer >= 1")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        super().__init__(model, optimizer, uplink=uplink, downlink=downlink,
                         owners=lambda sizes: [0] * len(sizes), seed=seed, on_nonfinite=on_nonfinite,
                         estimator=estimator, p=p, participation=participation)
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
        participants = set(self._participants(self.n_workers))
        losses: list[float] = []
        grads: list[list[Tensor] | None] = []
        prev: list[list[Tensor] | None] | None = [] if self.needs_previous_gradient else None
        for j, batch in enumerate(batches):
            if j not in participants:
                losses.append(float("nan"))
                grads.append(None)
                if prev is not None:
                    prev.append(None)
                continue
            loss, g = self._gradient(loss_fn, batch)
            losses.append(loss)
            grads.append(g)
            if prev is not None:
                with self.at_previous_point():
                    prev.append(self._gradient(loss_fn, batch)[1])
        self.optimizer.zero_grad(set_to_none=True)
        self.apply(grads, prev)
        return losses

    def _gradient(self, loss_fn: Callable[[nn.Module, Any], Tensor], batch: Any) -> tuple[float, list[Tensor]]:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = loss_fn(self.model, batch)
            loss.backward()
        return float(loss.detach()), [L.param.grad.detach().clone() if L.param.grad is not None
                                      else torch.zeros_like(L.param) for L in self.layers]

    @torch.no_grad()
    def apply(self, grads: Sequence[Sequence[Tensor] | None],
              prev: Sequence[Sequence[Tensor] | None] | None = None) -> bool:
        """Steps 2-7 given each worker's gradients (``grads[j][i]`` = worker j, layer i in optimizer order).

        ``prev[j]``: worker j's gradients on the same batch at the previous W (VR estimators after their first step).
        Workers not participating this round may pass ``None``.
        """
        if self.needs_previous_gradient and prev is None:
            raise ValueError(f"estimator {self.estimator!r} needs the previous point's gradients (prev=...)")
        participants = self._participants(self.n_workers)
        refresh = self._refresh()
        bad = [j for j in participants if self._nonfinite(grads[j]) or (prev is not None and self._nonfinite(prev[j]))]
        if bad:
            self._skip(f"worker(s) {bad}")
            return False
        self._snapshot_w()
        packed = {j: self._uplink_messages(self.workers[j], grads[j], prev[j] if prev is not None else None, j, refresh)
                  for j in participants}
        for L in self.layers:
            self._aggregate(self.server, L, [packed[j][L.index] for j in participants], participants,
                            self.n_workers, refresh)
        with self._server_view(self.server, self.layers):
            self._optimizer_step()
        for L in self.layers:
            self._apply_downlink(L, self._downlink_message(self.server, L))
        share = len(participants) / self.n_workers  # per-worker counts are averages over all n workers
        self.ledger.record(StepRecord(
            step=self.step_count,
            uplink_bits=round(self._bits(self.layers, "up", refresh) * share),
            uplink_wire_bytes=round(sum(self._lengths(self.layers, "up", 1, refresh)) * share),
            downlink_bits=self._bits(self.layers, "down"),
            downlink_wire_bytes=sum(self._lengths(self.layers, "down", 1)),
            dense_bytes=self.dense_bytes,
            gradient_evals=1 + (prev is not None),
        ))
        self.step_count += 1
        self.applied += 1
        return True

    def server_parameters(self) -> dict[str, Tensor]:
        """X, the server's exact model, keyed like ``model.named_parameters()``."""
        return {L.name: self.server.X[L.index].clone() for L in self.layers}

    def state_dict(self) -> dict[str, Any]:
        """Every simulated worker's state, the server state, the optimizer state and the ledger."""
        return {
            "n_workers": self.n_workers,
            "step": self.step_count,
            "applied": self.applied,
            "workers": [self._worker_state(w) for w in self.workers],
            "W_prev": self._tensors_state(self._W_prev, self.layers),
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
            self._load_worker(w, s)
        self._load_w_prev(state)
        self._load_tensors(self.server.X, state["server"]["X"], self.layers, "server.X")
        self._load_tensors(self.server.G, state["server"]["G"], self.layers, "server.G")
        self._load_optimizer_state(state["optimizer"], self.layers)
        self.ledger.load_state_dict(state["ledger"])
