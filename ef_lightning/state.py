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

from ef_lightning import compressors as _comp

__all__ = ["LayerSpec", "WorkerState", "ServerState", "zeros32", "tensors_state", "load_tensors"]


@dataclasses.dataclass
class LayerSpec:
    """Static description of one parameter tensor (one EF21 "layer")."""

    index: int  # position in the optimizer's parameter order (seeds use it)
    name: str  # name in ``model.named_parameters()`` (state_dicts use it)
    param: nn.Parameter  # holds W
    role: str  # hidden, conv, embedding, head or vector
    up: _comp.Compressor
    down: _comp.Compressor
    owner: int  # rank serving this layer; -1 = every rank (allgather)
    momentum: float  # worker momentum mu (0 = none)
    nesterov: bool

    @property
    def shape(self) -> torch.Size:
        return self.param.shape


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
                ws.M[L.index] = zeros32(L.param)
            if estimator != "marina":
                ws.G[L.index] = zeros32(L.param)
            if estimator in ("ef21_page", "mvr"):  # the estimators that keep V_j
                ws.V[L.index] = zeros32(L.param)
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
            ss.G[L.index] = zeros32(L.param)
            if not (x_is_param and L.param.dtype == torch.float32):
                ss.X[L.index] = L.param.detach().float().clone()
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
        L.name: {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in st[L.param].items()}
        for L in layers
        if L.param in st
    }


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, state: Mapping[str, Any], layers: Sequence[LayerSpec]
) -> None:
    for L in layers:
        if L.name in state:
            optimizer.state[L.param] = {
                k: (v.clone() if isinstance(v, Tensor) else v) for k, v in state[L.name].items()
            }
