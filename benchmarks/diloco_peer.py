"""DiLoCo (Distributed Low-Communication training; Douillard et al., arXiv 2311.08105) as a benchmark peer.

Implemented from the paper's Algorithm 1; not the authors' code. Every worker j of n holds its own copy θ_j of the
model and its own inner optimizer (AdamW, its state kept across rounds and never communicated). One outer round:

    θ_j <- θ                                          (every worker starts the round from the shared model)
    H inner steps on worker j's own data:  θ_j <- AdamW(θ_j, ∇f(x; θ_j))
    δ_j = θ - θ_j                                     (the outer pseudo-gradient)
    Δ = (1/n)·Σ_j δ_j                                 (one dense fp32 all_reduce over the real process group)
    θ <- OuterOpt(θ, Δ)                               (Nesterov SGD: b <- μ·b + Δ; θ <- θ - η·(Δ + μ·b);
                                                       torch.optim.SGD(momentum=μ, nesterov=True) semantics)

with the paper's outer learning rate η = 0.7 and momentum μ = 0.9 (its §3; both are arguments here). Every worker
keeps θ and the outer momentum b itself (they are identical on every rank: the same Δ and the same arithmetic), so
nothing but Δ crosses the network. The inner learning-rate schedule is the caller's (the benchmarks use the same
warm-up-then-constant schedule as every other method; the paper uses cosine decay over its much longer runs).

Wire format and byte rule (what :meth:`DiLoCo.step` really hands to torch.distributed): one ``all_reduce`` per round
of a single flat fp32 buffer holding δ_j of every parameter, i.e. ``4·numel`` bytes per worker per round
(:func:`round_bytes`; ``DiLoCo.bytes_per_round``; 0 on the H − 1 inner steps between rounds). This is the rule the
benchmarks apply to their DDP peers (an all-reduce counted as one dense fp32 send per worker, downlink 0): a ring
all-reduce at n = 2 sends exactly ``4·numel`` bytes per worker and receives as many. Counted as upload + download
(the averaged Δ coming back, as a parameter server would send it), a round is ``2·4·numel`` bytes per worker;
:func:`round_bytes` gives both (``download=True``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["OUTER_LR", "OUTER_MOMENTUM", "PAPER", "DiLoCo", "round_bytes"]

PAPER = (
    "Douillard et al., DiLoCo: Distributed Low-Communication Training of Language Models, arXiv 2311.08105 "
    "(Algorithm 1)"
)
OUTER_LR = 0.7  # the paper's outer Nesterov learning rate
OUTER_MOMENTUM = 0.9  # the paper's outer Nesterov momentum
VALUE_BYTES = 4  # fp32


def round_bytes(numel: int, download: bool = False) -> int:
    """Bytes per worker per outer round: the dense fp32 pseudo-gradient (``4·numel``); with ``download`` also the
    averaged one received back (``2·4·numel``)."""
    return VALUE_BYTES * numel * (2 if download else 1)


class DiLoCo:
    """DiLoCo's outer loop around an inner optimizer (implemented from the paper's Algorithm 1; not the authors'
    code; see the module docstring).

    Args:
        named_params: the model's ``named_parameters()`` (θ_j lives in them; names key :meth:`global_params`).
        inner: the inner optimizer over those parameters (the paper: AdamW); its state stays on this worker.
        sync_every: H, inner steps per outer round (>= 1).
        outer_lr: η of the outer Nesterov SGD (dimensionless; the paper: 0.7).
        outer_momentum: μ of the outer Nesterov SGD (the paper: 0.9).
        process_group: where the pseudo-gradient is averaged (default WORLD; alone, n = 1 and nothing is sent).
        sync_initial: broadcast rank 0's parameters at construction so every worker starts from the same θ.

    Call :meth:`step` where ``optimizer.step()`` would be called. After each call ``last_bytes`` is the number of
    bytes this worker handed to the all-reduce in it (``bytes_per_round`` on the H-th step, else 0; alone: the
    buffer it would hand over) and
    ``last_synced`` says whether an outer round ended there.
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, nn.Parameter]],
        inner: torch.optim.Optimizer,
        sync_every: int,
        outer_lr: float = OUTER_LR,
        outer_momentum: float = OUTER_MOMENTUM,
        process_group: dist.ProcessGroup | None = None,
        sync_initial: bool = True,
    ) -> None:
        if sync_every < 1:
            raise ValueError(f"sync_every={sync_every!r}; valid values: integers >= 1")
        self.named = [(n, p) for n, p in named_params if p.requires_grad]
        self.inner, self.sync_every, self.process_group = inner, int(sync_every), process_group
        self.distributed = dist.is_available() and dist.is_initialized()
        with torch.no_grad():
            if self.distributed and sync_initial:
                for _, p in self.named:
                    dist.broadcast(p.data, src=0, group=process_group)
            #: θ, the shared model (flat fp32), and the outer SGD over it; θ_j starts every round from it
            self.theta = self._flat()
        self.theta.grad = torch.zeros_like(self.theta)
        self.outer = torch.optim.SGD(
            [self.theta], lr=outer_lr, momentum=outer_momentum, nesterov=outer_momentum > 0
        )  # μ = 0: plain SGD (torch refuses nesterov without momentum; the update is the same)
        self.numel = self.theta.numel()
        self.bytes_per_round = round_bytes(self.numel)
        self.inner_steps = 0
        self.rounds = 0
        self.last_bytes = 0
        self.last_synced = False

    def _flat(self) -> torch.Tensor:
        return torch.cat([p.detach().float().reshape(-1) for _, p in self.named])

    def _unflat(self, flat: torch.Tensor) -> Iterator[tuple[str, nn.Parameter, torch.Tensor]]:
        """(name, parameter, its slice of ``flat`` shaped like it) for every parameter, in order."""
        for (n, p), v in zip(self.named, flat.split([p.numel() for _, p in self.named])):
            yield n, p, v.view_as(p)

    @torch.no_grad()
    def _load(self, flat: torch.Tensor) -> None:
        for _, p, v in self._unflat(flat):
            p.copy_(v.to(p.dtype))

    @torch.no_grad()
    def sync(self) -> None:
        """End an outer round: average δ_j = θ − θ_j over the workers, take the outer step on θ, reset θ_j to θ."""
        delta = self.theta - self._flat()
        if self.distributed:
            dist.all_reduce(delta, group=self.process_group)  # 4·numel bytes handed over by this worker
            delta /= dist.get_world_size(self.process_group)
        self.theta.grad.copy_(delta)
        self.outer.step()
        self._load(self.theta)
        self.rounds += 1

    def step(self) -> None:
        """One inner step of the inner optimizer; every ``sync_every``-th also ends the outer round."""
        self.inner.step()
        self.inner_steps += 1
        self.last_synced = self.inner_steps % self.sync_every == 0
        if self.last_synced:
            self.sync()
        self.last_bytes = self.bytes_per_round if self.last_synced else 0

    def global_params(self) -> dict[str, torch.Tensor]:
        """θ (the shared model of the last round) by parameter name: the model to evaluate."""
        return {n: v.detach().clone() for n, _, v in self._unflat(self.theta)}

    def state_tensors(self) -> list[torch.Tensor]:
        """Per-worker state beyond the model and the inner optimizer: θ and the outer momentum buffer."""
        buf = self.outer.state.get(self.theta, {}).get("momentum_buffer")
        return [self.theta] + ([buf] if buf is not None else [])
