"""EF21-Muon state: the static layer table and the per-worker / per-server memory, and their state_dicts.

Per-rank semantics (docs/algorithm.md §2): M_j and G_j differ between workers by design, and in ``sharded`` /
``server`` topologies X and G live only on the layers' owner. A state_dict holds one process's own state, keyed by
parameter name; frameworks save one per rank. M_j, G_j, V_j, X and G are float32 whatever the training
dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from ef_lightning import compressors as _comp

__all__ = ["LayerSpec", "WorkerState", "ServerState", "local", "zeros32", "tensors_state", "load_tensors"]


@dataclasses.dataclass
class LayerSpec:
    """Static description of one parameter tensor (one EF21 "layer")."""

    index: int  # position among this process's layers (state rows, gradient lists)
    name: str  # name in ``model.named_parameters()`` (state_dicts use it)
    param: nn.Parameter  # holds W
    role: str  # hidden, conv, embedding, head or vector
    up: _comp.Compressor
    down: _comp.Compressor
    owner: int  # rank serving this layer; -1 = every rank (allgather)
    momentum: float  # worker momentum mu (0 = none)
    nesterov: bool
    uid: int  # position in the optimizer's parameter order, the same on every process (seeds use it)

    @property
    def shape(self) -> torch.Size:
        """Shape of this process's part of the parameter (an FSDP2 DTensor's local shard, else the whole)."""
        return self.w.shape

    @property
    def w(self) -> Tensor:
        """This process's part of W, sharing the parameter's storage, outside autograd (``param.data`` or the local
        shard of an FSDP2 DTensor parameter)."""
        return local(self.param.data)

    @property
    def grad(self) -> Tensor | None:
        """This process's part of the gradient (the local shard of a DTensor gradient), detached; None if absent."""
        g = self.param.grad
        return None if g is None else local(g.detach())


def local(t: Tensor) -> Tensor:
    """The process's own part of ``t``: the local shard of a DTensor (FSDP2's sharded parameters), else ``t``."""
    return t.to_local() if isinstance(t, DTensor) else t


def dtensor_like(p: DTensor, local_part: Tensor) -> DTensor:
    """``local_part`` (this process's shard) as a DTensor placed like the parameter ``p``."""
    return DTensor.from_local(
        local_part, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(), run_check=False
    )


def zeros32(p: Tensor) -> Tensor:
    """A float32 zero tensor shaped and placed like ``p``."""
    return torch.zeros(p.shape, dtype=torch.float32, device=p.device)


@dataclasses.dataclass
class WorkerState:
    """One worker's memory by layer index: momentum M_j (``ef21`` with mu > 0), the EF21 estimate G_j (not
    ``marina``), the variance-reduced estimator V_j (``ef21_page``, ``mvr``)."""

    M: dict[int, Tensor] = dataclasses.field(default_factory=dict)
    G: dict[int, Tensor] = dataclasses.field(default_factory=dict)
    V: dict[int, Tensor] = dataclasses.field(default_factory=dict)

    @classmethod
    def new(cls, layers: Sequence[LayerSpec], estimator: str) -> WorkerState:
        """Zero state for ``layers``, created up front so every rank's state_dict has the same keys."""
        ws = cls()
        for L in layers:
            if L.momentum > 0 and estimator == "ef21":
                ws.M[L.index] = zeros32(L.w)
            if estimator != "marina":
                ws.G[L.index] = zeros32(L.w)
            if estimator in ("ef21_page", "mvr"):  # the estimators that keep V_j
                ws.V[L.index] = zeros32(L.w)
        return ws

    def state_dict(self, layers: Sequence[LayerSpec]) -> dict[str, dict[str, Tensor]]:
        return {k: tensors_state(getattr(self, k), layers) for k in ("M", "G", "V")}

    def load_state_dict(self, state: Mapping[str, Mapping[str, Tensor]], layers: Sequence[LayerSpec]) -> None:
        for k in ("M", "G", "V"):
            load_tensors(getattr(self, k), state.get(k, {}), layers, f"worker.{k}")


@dataclasses.dataclass
class ServerState:
    """Server memory for the layers this process serves: X (absent when the parameter itself is X: replicated
    float32) and the aggregate G."""

    X: dict[int, Tensor] = dataclasses.field(default_factory=dict)
    G: dict[int, Tensor] = dataclasses.field(default_factory=dict)

    @classmethod
    def new(cls, served: Sequence[LayerSpec], x_is_param: bool) -> ServerState:
        ss = cls()
        for L in served:
            ss.G[L.index] = zeros32(L.w)
            if not (x_is_param and L.param.dtype == torch.float32):
                ss.X[L.index] = L.w.float().clone()
        return ss

    def state_dict(self, served: Sequence[LayerSpec]) -> dict[str, dict[str, Tensor]]:
        return {"X": tensors_state(self.X, served), "G": tensors_state(self.G, served)}

    def load_state_dict(self, state: Mapping[str, Mapping[str, Tensor]], served: Sequence[LayerSpec]) -> None:
        load_tensors(self.X, state["X"], served, "server.X")
        load_tensors(self.G, state["G"], served, "server.G")


def tensors_state(d: Mapping[int, Tensor], layers: Sequence[LayerSpec]) -> dict[str, Tensor]:
    """Clones of ``d``'s tensors keyed by layer name."""
    return {L.name: d[L.index].clone() for L in layers if L.index in d}


def load_tensors(dst: dict[int, Tensor], src: Mapping[str, Tensor], layers: Sequence[LayerSpec], what: str) -> None:
    """Copy ``src`` (by name) into the existing tensors of ``dst`` (by index); a missing entry is a ValueError."""
    for L in layers:
        if L.index in dst:
            if L.name not in src:
                raise ValueError(f"EF21 state is missing {what}[{L.name!r}]")
            dst[L.index].copy_(src[L.name])


def optimizer_state(optimizer: torch.optim.Optimizer, layers: Sequence[LayerSpec]) -> dict[str, Any]:
    """The optimizer's per-parameter state of ``layers`` (the served ones), keyed by name."""
    st = optimizer.state
    return {
        L.name: {k: (local(v).clone() if isinstance(v, Tensor) else v) for k, v in st[L.param].items()}
        for L in layers
        if L.param in st
    }


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, state: Mapping[str, Any], layers: Sequence[LayerSpec]
) -> None:
    """Restore what :func:`optimizer_state` saved (a DTensor parameter's state tensors are saved as this process's
    local shards and placed like the parameter again)."""
    for L in layers:
        if L.name in state:
            optimizer.state[L.param] = {k: _like_param(L, v) for k, v in state[L.name].items()}


def _like_param(L: LayerSpec, v: Any) -> Any:
    if not isinstance(v, Tensor):
        return v
    p = L.param
    if isinstance(p, DTensor) and not isinstance(v, DTensor) and v.shape == L.shape and v.ndim:
        return dtensor_like(p, v.clone())
    return v.clone()


# ------------------------------------------------------------------------------------------------ groups and buckets
@dataclasses.dataclass
class Group:
    """Layers that one tensor op serves at once: same bucket, owner, compressors, shape, dtype, device, momentum.

    The fused path stores a group's per-layer state as the rows of one (L, d) float32 tensor (the per-layer tensors
    in :class:`WorkerState` / :class:`ServerState` are views of those rows) and compresses, decodes and updates all L
    layers with one call each, so the number of tensor ops per step depends on the number of groups, not layers.
    In a transformer the groups are the distinct weight shapes of a bucket: their count does not grow with depth.
    """

    index: int
    bucket: int  # uplink bucket (one collective each when overlapping with backward)
    owner: int  # as LayerSpec.owner
    layers: list[LayerSpec]
    up: _comp.Compressor
    down: _comp.Compressor
    shape: torch.Size
    momentum: float
    nesterov: bool

    @property
    def indices(self) -> list[int]:
        return [L.index for L in self.layers]


def fragment_of(sizes: Sequence[int], fragments: int) -> list[int]:
    """Each tensor's fragment for streaming synchronisation: ``fragments`` contiguous runs of the tensors in order,
    balanced by size (``sizes``: numel), each at least one tensor (needs ``len(sizes) >= fragments``)."""
    total, f, acc = sum(sizes), 0, 0
    out: list[int] = []
    for i, n in enumerate(sizes):
        left = len(sizes) - i  # tensors not yet placed, this one included
        full = acc >= total * (f + 1) / fragments  # this fragment has its share of the size
        if out and out[-1] == f and f < fragments - 1 and (full or left <= fragments - 1 - f):
            f += 1
        out.append(f)
        acc += n
    return out


def assign_buckets(nbytes: Sequence[int], cap: int, first_cap: int) -> list[int]:
    """Bucket index of each layer: layers in reverse order (gradients arrive roughly last layer first), filled up to
    ``first_cap`` bytes for bucket 0 and ``cap`` for the others, as DDP does (a small first bucket starts sending
    early). A layer larger than the cap gets a bucket of its own."""
    out = [0] * len(nbytes)
    b, filled, limit = 0, 0, first_cap
    for i in reversed(range(len(nbytes))):
        if filled and filled + nbytes[i] > limit:
            b, filled, limit = b + 1, 0, cap
        out[i] = b
        filled += nbytes[i]
    return out


def build_groups(layers: Sequence[LayerSpec], buckets: Sequence[int]) -> list[Group]:
    """Group ``layers`` (in order) by (bucket, owner, compressors, shape, dtype, device, momentum); groups ordered
    by bucket, then by their first layer."""
    by_key: dict[tuple[Any, ...], Group] = {}
    for L, b in sorted(zip(layers, buckets), key=lambda t: (t[1], t[0].index)):
        p = L.w
        key = (b, L.owner, L.up.spec, L.down.spec, tuple(L.shape), p.dtype, p.device, L.momentum, L.nesterov)
        g = by_key.get(key)
        if g is None:
            g = by_key[key] = Group(len(by_key), b, L.owner, [], L.up, L.down, L.shape, L.momentum, L.nesterov)
        g.layers.append(L)
    return list(by_key.values())


def group_rows_(store: dict[int, Tensor], g: Group) -> Tensor | None:
    """Move the per-layer tensors of ``g``'s layers in ``store`` into the rows of one (L, d) tensor, leaving views
    in ``store``; returns the rows (None when ``store`` holds none of them)."""
    if not all(L.index in store for L in g.layers):
        return None
    rows = torch.stack([store[L.index].reshape(-1) for L in g.layers])
    for r, L in enumerate(g.layers):
        store[L.index] = rows[r].view(L.shape)
    return rows


class WireLayout:
    """Where each group's message parts sit in the flat uint8 buffers of one direction.

    One buffer per (bucket, owner); inside it the groups follow each other, and each group's parts are stored part
    after part, each an (L, nbytes) block (row r = layer r's part). Every rank derives the same layout from the
    shapes, so buffers of fixed length travel without headers. Sizes: ``lengths[bucket][owner]`` bytes.
    """

    def __init__(self, groups: Sequence[Group], comp: Any, n_owners: int, by_bucket: bool) -> None:
        n_buckets = 1 + max((g.bucket for g in groups), default=0) if by_bucket else 1
        self.lengths = [[0] * n_owners for _ in range(n_buckets)]
        self.slots: dict[int, tuple[int, int, list[tuple[int, int]]]] = {}
        for g in groups:
            b, o = (g.bucket if by_bucket else 0), max(g.owner, 0)
            parts = []
            for nb in comp(g).part_nbytes(g.shape, torch.float32):
                parts.append((self.lengths[b][o], nb))
                self.lengths[b][o] += nb * len(g.layers)
            self.slots[g.index] = (b, o, parts)

    def views(self, buf: Tensor, g: Group) -> list[Tensor]:
        """The (L, nbytes) blocks of ``g``'s parts in ``buf`` (this group's bucket and owner buffer)."""
        n = len(g.layers)
        return [buf[off : off + nb * n].view(n, nb) for off, nb in self.slots[g.index][2]]

    def where(self, g: Group) -> tuple[int, int]:
        """(bucket, owner slot) of ``g``'s buffer."""
        b, o, _ = self.slots[g.index]
        return b, o
