"""Transports and the ledger of communicated bits.

A transport moves the EF21-Muon messages between processes with torch.distributed collectives. Every layer's
message travels in one flat ``uint8`` buffer per uplink bucket and one for the downlink, per step (on gloo one large
collective is far cheaper than one per parameter); on gloo a buffer above :data:`PIECE_BYTES` is sent as up to
:data:`MAX_PIECES` concurrent pieces of the same collective. With ``overlap`` the uplink buckets start from the
backward pass. The three real topologies (collectives per bucket / per step):

========== ========================================= ================================= ==========================
topology   uplink (workers -> server)                 downlink (server -> workers)       server state (X, G) lives
========== ========================================= ================================= ==========================
allgather  ``all_gather_into_tensor``                 none: every rank computes X        on every rank (replicated)
server     ``gather`` to ``server_rank``              ``broadcast`` of S                 on ``server_rank`` only
sharded    ``all_to_all_single`` (per-owner parts)    ``all_gather_into_tensor``         each layer on its owner
========== ========================================= ================================= ==========================

``sharded`` mirrors ring all-reduce (reduce-scatter + all-gather) with both halves compressed: a rank's traffic and
its Newton–Schulz work do not grow with the number of workers. Layers are whole (never split), balanced by size.

``hierarchical`` (:class:`HierarchicalTransport`) is for several processes per node: only the slow link between
nodes is compressed. The layers are split into ``local_world_size`` shares (balanced by size); inside a node each
share's gradients are averaged densely onto the rank of that local index (``reduce``), the ranks with the same local
index on every node run ``sharded`` on their share (one EF21 worker per node), and each rank then broadcasts its
share's new parameters inside the node. With one process per node it is ``sharded``; with one node, plain data
parallel (nothing is compressed).

The in-process simulation of n workers lives in :class:`ef_lightning.ef21.Simulator`; it uses the same ledger.
"""

from __future__ import annotations

import abc
import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

TOPOLOGIES = ("sharded", "allgather", "server", "hierarchical")
#: owner of a layer that another process of the node handles (``hierarchical``): not this process's layer
OTHER_SHARE = -2

__all__ = [
    "TOPOLOGIES",
    "Ledger",
    "StepRecord",
    "Transport",
    "Pending",
    "LocalTransport",
    "HierarchicalTransport",
    "build_transport",
    "assign_owners",
    "broadcast_module_",
    "broadcast_tensors_",
]


@dataclasses.dataclass
class StepRecord:
    """What one optimizer step communicated. Bits are theoretical (docs/algorithm.md §3), bytes are wire bytes.

    Attributes:
        step: engine step index (0-based, counts skipped steps too).
        uplink_bits: bits one worker sends to the server(s) this step (an overlapped send that was dropped and
            resent at the step counts twice: both went over the wire).
        uplink_wire_bytes: bytes of the tensors one worker hands to the uplink collective.
        downlink_bits: bits the server side sends this step (sum over owners in ``sharded``; 0 in ``allgather``).
        downlink_wire_bytes: bytes of the tensors the server side hands to the downlink collective.
        dense_bytes: bytes one worker would send uncompressed, in the training dtype.
        skipped: the step was skipped (non-finite gradient somewhere): no state changed; with ``overlap`` the
            uplink already sent is counted in the uplink fields.
        gradient_evals: forward/backward passes this worker spent on the step (2 for the variance-reduced
            estimators, which also need the gradient at the previous point; 0 when not participating).
        uplink_seconds: wall time from the first uplink collective's start to the last one's completion.
        uplink_overlap_seconds: the part of it before ``optimizer.step()`` began, i.e. hidden behind the backward
            pass (only with ``overlap``; wall-clock, so not part of :meth:`Ledger.summary`).
        synced: the step synchronised (always, except the inner steps of local training, ``sync_every > 1``, which
            communicate nothing across workers: their bits and wire bytes are 0, ``dense_bytes`` is still what
            data-parallel training would have sent that step).
        intra_node_bytes: bytes this process sent to processes of its own node (``hierarchical``: the dense
            gradient reduce and the parameter broadcast; 0 for the flat topologies and under FSDP2, whose own
            reduce-scatter and all-gather do that work). The uplink and downlink fields then count what is handed to
            the cross-node collectives (as for ``sharded``: the part a rank addresses to itself and the all-gather
            padding included; 0 with one node).
    """

    step: int
    uplink_bits: int = 0
    uplink_wire_bytes: int = 0
    downlink_bits: int = 0
    downlink_wire_bytes: int = 0
    dense_bytes: int = 0
    skipped: bool = False
    gradient_evals: int = 1
    uplink_seconds: float = 0.0
    uplink_overlap_seconds: float = 0.0
    intra_node_bytes: int = 0
    synced: bool = True


class Ledger:
    """Per-step and cumulative communication counts of one process.

    Uplink counts are *per worker* (what this worker sent); downlink counts are what the server side sent
    in total for the step. ``dense_bytes_per_worker`` is the uncompressed baseline (each parameter's numel times
    its training dtype's size), so ``compression_ratio = dense / uplink wire``.
    """

    def __init__(self) -> None:
        self.records: list[StepRecord] = []

    def record(self, rec: StepRecord) -> None:
        """Append one step's record."""
        self.records.append(rec)

    @property
    def last(self) -> StepRecord | None:
        """The most recent step's record, or None before the first step."""
        return self.records[-1] if self.records else None

    def summary(self) -> dict[str, float]:
        """Cumulative totals over all recorded steps.

        Returns:
            dict with ``steps``, ``skipped_steps``, ``uplink_bits_per_worker``, ``uplink_wire_bytes_per_worker``,
            ``downlink_bits``, ``downlink_wire_bytes``, ``dense_bytes_per_worker``, ``intra_node_bytes`` (all
            cumulative; bits or bytes as named), with local steps (``sync_every > 1``) ``outer_rounds`` (the
            synchronisations applied), and ``compression_ratio`` (dense bytes / uplink wire bytes; ``inf`` when
            nothing was sent: with local steps the dense baseline counts every step, so the ratio includes the
            factor the inner steps save).
        """
        r = self.records
        up_wire = sum(x.uplink_wire_bytes for x in r)
        dense = sum(x.dense_bytes for x in r if not x.skipped)
        return {
            "steps": len(r),
            "skipped_steps": sum(x.skipped for x in r),
            "uplink_bits_per_worker": sum(x.uplink_bits for x in r),
            "uplink_wire_bytes_per_worker": up_wire,
            "downlink_bits": sum(x.downlink_bits for x in r),
            "downlink_wire_bytes": sum(x.downlink_wire_bytes for x in r),
            "dense_bytes_per_worker": dense,
            "compression_ratio": (dense / up_wire) if up_wire else float("inf"),
            "gradient_evaluations_per_worker": sum(x.gradient_evals for x in r if not x.skipped),
            "intra_node_bytes": sum(x.intra_node_bytes for x in r),
        } | (  # local steps: the synchronisations applied
            {"outer_rounds": sum(x.synced and not x.skipped for x in r)} if any(not x.synced for x in r) else {}
        )

    def overlap(self) -> dict[str, float]:
        """Uplink wall time and how much of it overlapped with the backward pass, over all applied steps.

        Returns:
            ``uplink_seconds`` and ``uplink_overlap_seconds`` (sums, seconds) and ``uplink_overlap_fraction``
            (their ratio; 0 when nothing was timed).
        """
        up = sum(x.uplink_seconds for x in self.records)
        ov = sum(x.uplink_overlap_seconds for x in self.records)
        return {"uplink_seconds": up, "uplink_overlap_seconds": ov, "uplink_overlap_fraction": ov / up if up else 0.0}

    def metrics(self, prefix: str = "comm/") -> dict[str, float]:
        """Per-step and cumulative communication numbers of a ledger, flat and ready for a logger.

        Names match the Lightning ``CommunicationMonitor`` so dashboards read the same under every integration.

        Args:
            prefix: prepended to every key. An empty ledger gives ``{}``.

        Returns:
            ``{prefix}uplink_bits`` / ``uplink_bytes`` / ``downlink_bits`` / ``downlink_bytes``: the last optimizer
            step (uplink per worker, downlink for the whole server side); the same four with ``_total``, and
            ``dense_bytes_total`` (the uncompressed baseline per worker), cumulative; ``compression_ratio``: cumulative
            dense bytes / uplink wire bytes (left out while nothing was sent); ``steps`` and ``skipped_steps``;
            with ``topology="hierarchical"`` also ``intra_node_bytes`` and ``intra_node_bytes_total`` (then the
            uplink/downlink numbers are inter-node). With local steps (``sync_every > 1``) the per-step numbers are
            the last synchronisation's and ``outer_rounds`` counts the synchronisations. Bits are theoretical
            (docs/algorithm.md §3); bytes are the wire bytes handed to the collectives.
        """
        if self.last is None:
            return {}
        # the last synchronisation (with local steps the inner steps in between send nothing)
        last, total = next((r for r in reversed(self.records) if r.synced), self.last), self.summary()
        out = {
            "uplink_bits": last.uplink_bits,
            "uplink_bytes": last.uplink_wire_bytes,
            "downlink_bits": last.downlink_bits,
            "downlink_bytes": last.downlink_wire_bytes,
            "uplink_bits_total": total["uplink_bits_per_worker"],
            "uplink_bytes_total": total["uplink_wire_bytes_per_worker"],
            "downlink_bits_total": total["downlink_bits"],
            "downlink_bytes_total": total["downlink_wire_bytes"],
            "dense_bytes_total": total["dense_bytes_per_worker"],
            "steps": total["steps"],
            "skipped_steps": total["skipped_steps"],
        }
        if total["uplink_wire_bytes_per_worker"]:  # inf (nothing sent yet) is not JSON; leave the ratio out instead
            out["compression_ratio"] = total["compression_ratio"]
        if "outer_rounds" in total:  # local steps
            out["outer_rounds"] = total["outer_rounds"]
        if total["intra_node_bytes"]:
            out["intra_node_bytes"] = last.intra_node_bytes
            out["intra_node_bytes_total"] = total["intra_node_bytes"]
        return {prefix + k: v for k, v in out.items()}

    def state_dict(self) -> dict[str, Any]:
        """Records as plain dicts (checkpointable)."""
        return {"records": [dataclasses.asdict(x) for x in self.records]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore records saved by :meth:`state_dict`."""
        self.records = [StepRecord(**x) for x in state["records"]]


def assign_owners(sizes: Sequence[int], world_size: int) -> list[int]:
    """Balance whole layers over ranks, largest first to the least-loaded rank (LPT). Deterministic.

    Args:
        sizes: cost of each layer (numel).
        world_size: number of ranks.

    Returns:
        the owner rank of each layer.
    """
    load = [0] * world_size
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        o = min(range(world_size), key=lambda r: (load[r], r))
        owners[i] = o
        load[o] += sizes[i]
    return owners


#: large buffers travel as several collectives in flight at once, pieces of at least this many bytes ...
PIECE_BYTES = 64 << 10
#: ... and at most this many pieces. One large gloo collective over a shaped 33 Mbit/s link ran at ~60 % of line
#: rate; 4-16 concurrent pieces kept it full, like DDP's pipelined ring all-reduce (benchmarks/collectives.py).
MAX_PIECES = 16


def _split(n: int, k: int) -> list[int]:
    """``n`` bytes as ``k`` near-equal piece lengths (larger ones first)."""
    q, r = divmod(n, k)
    return [q + (i < r) for i in range(k)]


def _n_pieces(n: int, group: Any = None) -> int:
    """Pieces for an n-byte buffer: several only on gloo (NCCL runs a group's collectives one after another on
    one stream, so pieces would only add launches and copies)."""
    if dist.is_initialized() and dist.get_backend(group) != "gloo":
        return 1
    return max(1, min(MAX_PIECES, n // PIECE_BYTES))


class Pending:
    """Collectives in flight: :meth:`wait` waits for all and returns the received buffers. ``started`` and
    ``done_at`` (``time.perf_counter()`` seconds) time them; ``done_at`` is set by the last collective's future when
    it completes (or at the latest by :meth:`wait`). On gloo that is when the bytes have arrived; NCCL marks its
    futures complete when the work is queued on the stream, so there the timing says little."""

    def __init__(self, works: Sequence[Any], result: Callable[[], list[torch.Tensor]]) -> None:
        self.started = time.perf_counter()
        self.done_at: float | None = None
        self._works, self._result = list(works), result
        self._left = len(self._works)
        self._lock = threading.Lock()  # gloo completes works on its own threads
        for w in self._works:
            w.get_future().add_done_callback(self._done)

    def _done(self, _: Any) -> None:
        with self._lock:
            self._left -= 1
            if self._left <= 0:
                self.done_at = time.perf_counter()

    def wait(self) -> list[torch.Tensor]:
        for w in self._works:
            w.wait()
        if self.done_at is None:
            self.done_at = time.perf_counter()
        return self._result()


def _all_gather_pieces(
    buf: torch.Tensor, world_size: int, group: Any
) -> tuple[list[Any], Callable[[], list[torch.Tensor]]]:
    """Start an all-gather of equal-length ``buf`` from every rank, in pieces; the callable returns every rank's
    buffer (rank order) once the works are done."""
    lens = _split(buf.numel(), _n_pieces(buf.numel(), group))
    outs, works, o = [], [], 0
    for n in lens:
        out = torch.empty(n * world_size, dtype=buf.dtype, device=buf.device)
        works.append(dist.all_gather_into_tensor(out, buf[o : o + n], group=group, async_op=True))
        outs.append(out)
        o += n
    if len(outs) == 1:
        return works, lambda: list(outs[0].chunk(world_size))
    return works, lambda: [
        torch.cat([out.view(world_size, n)[r] for out, n in zip(outs, lens)]) for r in range(world_size)
    ]


class Transport(abc.ABC):
    """Moves packed EF21 buffers between the ranks of a process group.

    Subclasses fix who owns (serves) each layer and which collectives carry the two directions. Every method is a
    collective: all ranks call it in the same order. Buffer lengths are known to every rank in advance (compressor
    layouts depend only on shapes), so receivers allocate exactly.
    """

    topology: str = ""
    #: every rank runs the server step for every layer (no downlink)
    replicated: bool = False

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                f"topology {self.topology!r} needs an initialised torch.distributed process group; "
                "call torch.distributed.init_process_group first (one process needs no group: build_transport gives a "
                "LocalTransport)"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        #: the group every process of the run is in (the same as ``group`` except in ``hierarchical``): start-up
        #: checks and the skip decision span it; ``global_rank`` / ``global_size`` are this process's place in it
        self.world_group = group
        self.global_rank, self.global_size = self.rank, self.world_size

    @abc.abstractmethod
    def owners(self, sizes: Sequence[int]) -> list[int]:
        """Owner rank of each layer (``-1`` = every rank)."""
        ...

    def uplink(self, parts: list[torch.Tensor], lengths: Sequence[int]) -> list[torch.Tensor]:
        """Send this worker's per-owner buffers; return the buffers addressed to this rank, one per worker
        (:meth:`uplink_start` and wait)."""
        return self.uplink_start(parts, lengths).wait()

    @abc.abstractmethod
    def uplink_start(self, parts: list[torch.Tensor], lengths: Sequence[int]) -> Pending:
        """Start sending this worker's per-owner buffers (asynchronous collectives, in pieces on gloo); the returned
        :class:`Pending`'s ``wait()`` returns the buffers addressed to this rank, one per worker.

        Args:
            parts: for each owner rank ``o``, this worker's packed messages for ``o``'s layers (uint8, 1-D,
                ``lengths[o]`` bytes). ``allgather`` and ``server`` use ``parts[0]`` only (one owner group).
            lengths: the byte length of each part, identical on every rank.

        Returns:
            for each worker ``j`` in rank order, the buffer it sent to this rank (empty list when this rank owns
            no layer). ``wire`` bytes handed to the collective are returned by :meth:`uplink_wire_bytes`.
        """
        ...

    @abc.abstractmethod
    def downlink(self, mine: torch.Tensor | None, lengths: Sequence[int]) -> list[torch.Tensor]:
        """Send this rank's packed S (if it serves layers); return every owner's S buffer, in owner order."""
        ...

    def uplink_wire_bytes(self, lengths: Sequence[int]) -> int:
        """Bytes one worker hands to the uplink collective."""
        return sum(lengths)

    def downlink_wire_bytes(self, lengths: Sequence[int]) -> int:
        """Bytes the server side hands to the downlink collective per step."""
        return sum(lengths)

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any rank (one 4-byte all-reduce, not in the ledger)."""
        return self.any_of([flag])[0]

    def any_of(self, flags: Sequence[bool]) -> list[bool]:
        """For each flag, True on every rank when it is True on any rank: one small all-reduce for all of them."""
        t = torch.tensor([1.0 if f else 0.0 for f in flags], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.world_group)
        return [bool(x > 0) for x in t.tolist()]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every process's ``obj`` (used once at start-up for the configuration check)."""
        out: list[Any] = [None] * self.global_size
        dist.all_gather_object(out, obj, group=self.world_group)
        return out

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> None:
        """Broadcast ``tensor`` in place from ``src`` (gathering X from its owners for evaluation)."""
        dist.broadcast(tensor, src=dist.get_global_rank(self.group, src) if self.group else src, group=self.group)

    @property
    def device(self) -> torch.device:
        """Device that collectives of this backend take (CUDA for NCCL, else CPU)."""
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


class AllGatherTransport(Transport):
    """Replicated server: every rank gathers every worker's message and runs the same server step."""

    topology = "allgather"
    replicated = True

    def owners(self, sizes: Sequence[int]) -> list[int]:
        return [-1] * len(sizes)

    def uplink_start(self, parts: list[torch.Tensor], lengths: Sequence[int]) -> Pending:
        (buf,) = parts
        return Pending(*_all_gather_pieces(buf, self.world_size, self.group))

    def downlink(self, mine: torch.Tensor | None, lengths: Sequence[int]) -> list[torch.Tensor]:
        return []

    def downlink_wire_bytes(self, lengths: Sequence[int]) -> int:
        return 0


class ServerTransport(Transport):
    """Parameter server: ``server_rank`` is a worker and the server; workers never hold X or G."""

    topology = "server"

    def __init__(self, group: dist.ProcessGroup | None = None, server_rank: int = 0) -> None:
        super().__init__(group)
        if not 0 <= server_rank < self.world_size:
            raise ValueError(f"server_rank={server_rank} is not a rank of this group (0..{self.world_size - 1})")
        self.server_rank = server_rank

    def _global(self, r: int) -> int:
        return dist.get_global_rank(self.group, r) if self.group is not None else r

    def owners(self, sizes: Sequence[int]) -> list[int]:
        return [self.server_rank] * len(sizes)

    def uplink_start(self, parts: list[torch.Tensor], lengths: Sequence[int]) -> Pending:
        buf = parts[self.server_rank]
        is_server = self.rank == self.server_rank
        works, recvs, o = [], [], 0
        for n in _split(buf.numel(), _n_pieces(buf.numel(), self.group)):
            got = [torch.empty(n, dtype=buf.dtype, device=buf.device) for _ in range(self.world_size)]
            dst = self._global(self.server_rank)
            works.append(
                dist.gather(buf[o : o + n], got if is_server else None, dst=dst, group=self.group, async_op=True)
            )
            recvs.append(got)
            o += n
        if not is_server:
            return Pending(works, list)
        return Pending(works, lambda: [torch.cat([got[j] for got in recvs]) for j in range(self.world_size)])

    def uplink_wire_bytes(self, lengths: Sequence[int]) -> int:
        return lengths[self.server_rank]

    def uplink_from(
        self, buf: torch.Tensor | None, participants: Sequence[int], lengths: Sequence[int]
    ) -> list[torch.Tensor]:
        """Partial participation: only ``participants`` send (point-to-point to the server, in rank order).

        Returns, on the server, the participants' buffers in rank order; elsewhere an empty list.
        """
        n = lengths[self.server_rank]
        if self.rank != self.server_rank:
            if buf is not None:
                dist.send(buf, dst=self._global(self.server_rank), group=self.group)
            return []
        out: list[torch.Tensor] = []
        for j in participants:
            if j == self.rank:
                assert buf is not None  # the server takes part this round, so it has a message
                out.append(buf)
            else:
                recv = torch.empty(n, dtype=torch.uint8, device=self.device)
                dist.recv(recv, src=self._global(j), group=self.group)
                out.append(recv)
        return out

    def downlink(self, mine: torch.Tensor | None, lengths: Sequence[int]) -> list[torch.Tensor]:
        n = lengths[self.server_rank]
        if self.rank == self.server_rank:
            assert mine is not None  # the server serves every layer
            buf = mine
        else:
            buf = torch.empty(n, dtype=torch.uint8, device=self.device)
        works, o = [], 0
        for k in _split(n, _n_pieces(n, self.group)):  # pieces in flight at once, broadcast in place
            works.append(
                dist.broadcast(buf[o : o + k], src=self._global(self.server_rank), group=self.group, async_op=True)
            )
            o += k
        for w in works:
            w.wait()
        return [buf if o == self.server_rank else buf[:0] for o in range(self.world_size)]


class ShardedTransport(Transport):
    """Each rank serves a disjoint, size-balanced set of whole layers (reduce-scatter / all-gather shape)."""

    topology = "sharded"

    def owners(self, sizes: Sequence[int]) -> list[int]:
        return assign_owners(sizes, self.world_size)

    def uplink_start(self, parts: list[torch.Tensor], lengths: Sequence[int]) -> Pending:
        k = _n_pieces(max(lengths), self.group)
        sizes = [_split(n, k) for n in lengths]  # piece c of owner o's part: sizes[o][c] bytes
        offsets = [[sum(sz[:c]) for c in range(k)] for sz in sizes]
        mine = sizes[self.rank]
        works, recvs = [], []
        for c in range(k):
            send = torch.cat([parts[o][offsets[o][c] : offsets[o][c] + sizes[o][c]] for o in range(len(parts))])
            recv = torch.empty(mine[c] * self.world_size, dtype=torch.uint8, device=send.device)
            works.append(
                dist.all_to_all_single(
                    recv,
                    send,
                    output_split_sizes=[mine[c]] * self.world_size,
                    input_split_sizes=[sz[c] for sz in sizes],
                    group=self.group,
                    async_op=True,
                )
            )
            recvs.append(recv)
        if not lengths[self.rank]:
            return Pending(works, list)
        if k == 1:
            return Pending(works, lambda: list(recvs[0].split(mine[0])))
        return Pending(
            works,
            lambda: [
                torch.cat([r.view(self.world_size, mine[c])[j] for c, r in enumerate(recvs)])
                for j in range(self.world_size)
            ],
        )

    def downlink(self, mine: torch.Tensor | None, lengths: Sequence[int]) -> list[torch.Tensor]:
        # all_gather needs equal sizes: pad every owner's buffer to the longest (balanced owners keep this small)
        width = max(lengths)
        buf = torch.zeros(width, dtype=torch.uint8, device=self.device)
        if mine is not None and mine.numel():
            buf[: mine.numel()] = mine
        works, result = _all_gather_pieces(buf, self.world_size, self.group)
        for w in works:
            w.wait()
        return [chunk[: lengths[o]] for o, chunk in enumerate(result())]

    def downlink_wire_bytes(self, lengths: Sequence[int]) -> int:
        return max(lengths) * self.world_size


def _group_timeout(group: dist.ProcessGroup | None) -> Any:
    """The collective timeout ``group`` (default WORLD) was created with, or None (torch's default) when the
    backend does not say. Reads the backend's options (torch 2.13; pinned by tests/test_compat.py)."""
    pg = group if group is not None else dist.group.WORLD
    if pg is None:
        return None
    try:
        device = torch.device("cuda") if dist.get_backend(pg) == "nccl" else torch.device("cpu")
        return pg._get_backend(device).options._timeout
    except (AttributeError, RuntimeError):
        return None


class HierarchicalTransport(ShardedTransport):
    """``sharded`` across nodes, dense inside a node (see the module docstring).

    ``group`` (default WORLD) is split into nodes of ``local_world_size`` consecutive ranks. As a
    :class:`ShardedTransport` this transport works on the cross-node group of this process's local index: ``rank``
    is the node index and ``world_size`` the number of nodes (one EF21 worker per node). ``any_of`` and
    ``all_gather_object`` span the whole group (a skipped step is skipped everywhere); the node-level collectives
    are :meth:`reduce_to_shares` and :meth:`share_in_node`. Building it creates the node and cross-node process
    groups: a collective every rank of WORLD must enter, in the same order.

    Attributes:
        global_rank, global_size: this process's rank in ``group`` and the group's size.
        local_rank, local_world_size: index inside the node and processes per node.
        node, n_nodes: this process's node and the number of nodes.
    """

    topology = "hierarchical"

    def __init__(
        self, group: dist.ProcessGroup | None = None, local_world_size: int = 1, sharded_params: bool = False
    ) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            super().__init__(group)  # raises the "needs an initialised process group" error
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
        n, lws = len(ranks), local_world_size
        if isinstance(lws, bool) or not isinstance(lws, int) or lws < 1 or n % lws:
            raise ValueError(
                f"topology 'hierarchical': {n} processes cannot form nodes of local_world_size={lws!r} processes; "
                f"valid values divide {n}: {', '.join(str(d) for d in range(1, n + 1) if n % d == 0)}"
            )
        me = ranks.index(dist.get_rank())
        layouts: list[Any] = [None] * n  # every process must split the same way, or new_group would hang
        dist.all_gather_object(layouts, lws, group=group)
        if len(set(layouts)) > 1:
            raise ValueError(
                f"topology 'hierarchical': processes disagree on local_world_size (by rank: {layouts}); set the "
                "same local_world_size (or LOCAL_WORLD_SIZE) on every node"
            )
        self.local_rank, self.local_world_size = me % lws, lws
        self.node, self.n_nodes = me // lws, n // lws
        #: FSDP2: the node's processes already hold shards of every layer (reduce-scattered gradients), so there are
        #: no shares: each process runs EF21 across nodes on its shard of every layer, a layer's owner node the same
        #: for all shards (its LMO then runs on the node's DTensor shards together)
        self.sharded_params = sharded_params
        nodes = [ranks[j * lws : (j + 1) * lws] for j in range(self.n_nodes)]
        # new_group is collective over WORLD: every rank creates every group, in the same order, with the parent
        # group's timeout (a dead or stalled peer must fail them as fast as the rest; new_group's default is 30 min)
        timeout = _group_timeout(group)
        intra = [dist.new_group(r, timeout=timeout) for r in nodes]
        cross = [dist.new_group(ranks[i::lws], timeout=timeout) for i in range(lws)]
        self.node_ranks = nodes[self.node]  # global ranks of this node, by local index
        self.intra = intra[self.node]
        super().__init__(cross[self.local_rank])
        self.world_group, self.global_rank, self.global_size = group, me, n

    def shares(self, sizes: Sequence[int]) -> list[int]:
        """The local index handling each layer (its share), balanced by size; the same on every process."""
        return assign_owners(sizes, self.local_world_size)

    def owners(self, sizes: Sequence[int]) -> list[int]:
        """Owner node of each layer of this process's share; :data:`OTHER_SHARE` for the other shares' layers."""
        if self.sharded_params:
            return assign_owners(sizes, self.n_nodes)
        share = self.shares(sizes)
        mine = [i for i, s in enumerate(share) if s == self.local_rank]
        out = [OTHER_SHARE] * len(sizes)
        for i, o in zip(mine, assign_owners([sizes[i] for i in mine], self.n_nodes)):
            out[i] = o
        return out

    def node_any(self, flag: bool) -> bool:
        """True on every process of the node when ``flag`` is True on any of them (one 4-byte all-reduce inside the
        node, not in the ledger)."""
        if self.local_world_size == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.intra)
        return bool(t.item() > 0)

    def reduce_to_shares(self, flats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Average share ``i``'s flat buffer over the node onto local rank ``i`` (one ``reduce`` per share);
        returns this process's share averaged over its node. ``flats[i]`` may be modified."""
        if self.local_world_size == 1:
            return flats[0]
        works = [
            dist.reduce(f, dst=self.node_ranks[i], op=dist.ReduceOp.SUM, group=self.intra, async_op=True)
            for i, f in enumerate(flats)
        ]
        for w in works:
            w.wait()
        return flats[self.local_rank].div_(self.local_world_size)

    def share_in_node(self, flats: Sequence[torch.Tensor]) -> None:
        """Broadcast share ``i``'s flat buffer from local rank ``i`` to the node, in place (one per share)."""
        if self.local_world_size == 1:
            return
        works = [
            dist.broadcast(f, src=self.node_ranks[i], group=self.intra, async_op=True) for i, f in enumerate(flats)
        ]
        for w in works:
            w.wait()


class LocalTransport(Transport):
    """One process and no process group: the only worker of ``topology``, with nothing to send.

    The ownership rules are the topology's (``allgather``: X is the parameters; otherwise this process serves every
    layer and applies its own downlink), so a one-process run keeps the same state, arithmetic and ledger as one
    rank of a group (a debug run under ``accelerate launch`` with one process, a notebook).
    """

    def __init__(self, topology: str, server_rank: int = 0) -> None:
        if server_rank != 0:
            raise ValueError(f"server_rank={server_rank} is not a rank of a one-process run (valid: 0)")
        self.topology = topology
        self.replicated = topology == "allgather"
        self.group = self.world_group = None
        self.rank, self.world_size, self.server_rank = 0, 1, 0
        self.global_rank, self.global_size = 0, 1

    def owners(self, sizes: Sequence[int]) -> list[int]:
        return [-1 if self.replicated else 0] * len(sizes)

    def uplink_start(self, parts: list[torch.Tensor], lengths: Sequence[int]) -> Pending:
        return Pending([], lambda: [parts[0]])

    def uplink_from(
        self, buf: torch.Tensor | None, participants: Sequence[int], lengths: Sequence[int]
    ) -> list[torch.Tensor]:
        return [buf] if buf is not None else []

    def downlink(self, mine: torch.Tensor | None, lengths: Sequence[int]) -> list[torch.Tensor]:
        if self.replicated:
            return []
        return [mine if mine is not None else torch.empty(0, dtype=torch.uint8)]

    def downlink_wire_bytes(self, lengths: Sequence[int]) -> int:
        return 0 if self.replicated else sum(lengths)

    def any_of(self, flags: Sequence[bool]) -> list[bool]:
        return list(flags)

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> None:
        return None

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")


_TRANSPORTS = {"allgather": AllGatherTransport, "server": ServerTransport, "sharded": ShardedTransport}


def build_transport(
    topology: str,
    group: dist.ProcessGroup | None = None,
    server_rank: int = 0,
    local_world_size: int = 1,
    sharded_params: bool = False,
) -> Transport:
    """The transport for ``topology`` (one of :data:`TOPOLOGIES`) on ``group`` (default: WORLD); without an
    initialised process group, a :class:`LocalTransport` (one process, the only worker). ``local_world_size``:
    processes per node, ``sharded_params``: FSDP2 shards inside the node (``hierarchical`` only)."""
    if topology not in TOPOLOGIES:
        raise ValueError(f"unknown topology {topology!r}; valid choices: {', '.join(TOPOLOGIES)}")
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return LocalTransport(topology, server_rank)
    if topology == "server":
        return ServerTransport(group, server_rank=server_rank)
    if topology == "hierarchical":
        return HierarchicalTransport(group, local_world_size, sharded_params)
    return _TRANSPORTS[topology](group)


@torch.no_grad()
@torch.no_grad()
def broadcast_tensors_(tensors: Sequence[torch.Tensor], src: int = 0, group: dist.ProcessGroup | None = None) -> None:
    """Copy rank ``src``'s ``tensors`` into every rank's, in place: one broadcast per (dtype, device), not one per
    tensor (on gloo one large collective is far cheaper than many). A collective; nothing to do without a group."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    root = dist.get_global_rank(group, src) if group is not None else src
    buckets: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.dtype, t.device), []).append(t)
    for same in buckets.values():
        flat = torch.cat([t.reshape(-1) for t in same])
        dist.broadcast(flat, src=root, group=group)
        for t, chunk in zip(same, flat.split([t.numel() for t in same])):
            t.copy_(chunk.view_as(t))


def broadcast_module_(module: torch.nn.Module, src: int = 0, group: dist.ProcessGroup | None = None) -> None:
    """Copy rank ``src``'s parameters and buffers into every rank's ``module`` (in place; a collective), what DDP
    does at construction, with public torch.distributed calls only."""
    broadcast_tensors_([t.data for t in [*module.parameters(), *module.buffers()]], src, group)
