"""DeMo (Decoupled Momentum Optimization; Peng, Quesnelle, Kingma, arXiv 2411.19870) as a benchmark peer.

Implemented from the paper's Algorithm 1; not the authors' code. Per parameter, every step:

    m <- beta·m + g                                   (beta = 0.999 in the paper; a parameter here)
    C  = DCT-II(m) on chunks of h×w (64×64)           (orthonormal; per chunk, as matmuls with a fixed DCT matrix)
    q  = the top-k (k = 32) entries of each chunk of C by magnitude: the "fast components"
    m <- m - IDCT(q)                                  (the slow components stay in the momentum)
    all-gather q (values + indices) from every worker; Q = (1/n)·Σ_j IDCT(q_j)
    theta <- theta·(1 - lr·wd) - lr·sign(Q)           (sign step as in the paper and its reference code; wd = 0
                                                       by default, decoupled like AdamW)

Chunking (as the reference does): a tensor is viewed as a matrix (shape[0], numel/shape[0]); a 1-D tensor of n
entries as (1, n). Each dimension d is cut into pieces of the largest divisor of d that is <= 64 (so d = 96 gives
48, d = 256 gives 64, a length-1 row dimension gives 1); the 2-D DCT of a chunk is D_h·X·D_wᵀ, which for h = 1 is
the 1-D DCT of the row. DeMo is applied to **every** parameter (as the paper does): embeddings, output head,
attention/MLP matrices and the 1-D RMSNorm gains (chunks of 1×48 for d = 96, where k = min(32, 48) = 32 of the 48
coefficients are sent). k = min(topk, h·w) per chunk.

Wire format and byte rule (what :meth:`DeMo.step` really sends): one ``torch.distributed.all_gather`` per step of a
single uint8 buffer holding, for every chunk of every parameter, k fp32 values and k int16 indices (gloo has no
int16 collective, so the int16 indices travel as bytes; 4096 < 2^15 so they fit). Bytes per worker per step:

    sum over parameters p of  n_chunks(p) · k(p) · (4 + 2)

(:func:`payload_bytes`; ``DeMo.bytes_per_step``; equal to the buffer's size, which the unit test checks). Packing the
indices at ceil(log2(h·w)) bits (12 for 64×64) would give ``n_chunks·k·(32 + 12)/8`` (:func:`packed_bits_bytes`,
reported beside it, not used: it is not what crosses the wire here). Nothing is sent "downlink": every worker decodes
the gathered q's itself (the same rule as the DDP peers' bytes, which count one dense send per worker per step).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist

__all__ = ["DeMo", "Layout", "dct_matrix", "extract_fast_components", "packed_bits_bytes", "payload_bytes"]

PAPER = "Peng, Quesnelle, Kingma, DeMo: Decoupled Momentum Optimization, arXiv 2411.19870 (Algorithm 1)"
VALUE_BYTES, INDEX_BYTES = 4, 2


def dct_matrix(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The orthonormal DCT-II matrix D (n×n): DCT(x) = D·x, IDCT(c) = Dᵀ·c (D·Dᵀ = I)."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    D = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    D[0] /= math.sqrt(2.0)
    return D.to(dtype)


def _largest_divisor(d: int, cap: int) -> int:
    return max(x for x in range(1, min(d, cap) + 1) if d % x == 0)


class Layout:
    """How one tensor is cut into h×w chunks (see the module docstring) and its DCT matrices."""

    def __init__(self, shape: torch.Size | tuple[int, ...], chunk: int = 64, topk: int = 32) -> None:
        numel = math.prod(shape)
        self.shape = tuple(shape)
        self.rows = 1 if len(shape) <= 1 else int(shape[0])
        self.cols = numel // self.rows
        self.h, self.w = _largest_divisor(self.rows, chunk), _largest_divisor(self.cols, chunk)
        self.n_chunks = (self.rows // self.h) * (self.cols // self.w)
        self.k = min(topk, self.h * self.w)
        self.Dh, self.Dw = dct_matrix(self.h), dct_matrix(self.w)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """DCT-II of every chunk: (n_chunks, h·w) coefficients."""
        X = x.reshape(self.rows // self.h, self.h, self.cols // self.w, self.w).permute(0, 2, 1, 3)
        C = self.Dh @ X.reshape(self.n_chunks, self.h, self.w) @ self.Dw.T
        return C.reshape(self.n_chunks, self.h * self.w)

    def decode(self, c: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`encode` (IDCT of every chunk, chunks put back): a tensor of ``shape``."""
        X = self.Dh.T @ c.reshape(self.n_chunks, self.h, self.w) @ self.Dw
        X = X.reshape(self.rows // self.h, self.cols // self.w, self.h, self.w).permute(0, 2, 1, 3)
        return X.reshape(self.shape)

    def bytes(self) -> int:
        return self.n_chunks * self.k * (VALUE_BYTES + INDEX_BYTES)

    def packed_bits_bytes(self) -> float:
        return (
            self.n_chunks * self.k * (8 * VALUE_BYTES + math.ceil(math.log2(self.h * self.w))) / 8
            if self.h * self.w > 1
            else self.n_chunks * self.k * VALUE_BYTES
        )


def payload_bytes(shapes: Iterable[torch.Size | tuple[int, ...]], topk: int = 32, chunk: int = 64) -> int:
    """Closed form of DeMo's bytes per worker per step: Σ n_chunks·k·(4 fp32 value + 2 int16 index)."""
    return sum(Layout(s, chunk, topk).bytes() for s in shapes)


def packed_bits_bytes(shapes: Iterable[torch.Size | tuple[int, ...]], topk: int = 32, chunk: int = 64) -> float:
    """The same payload with indices packed at ceil(log2(h·w)) bits (reported, not what is sent)."""
    return sum(Layout(s, chunk, topk).packed_bits_bytes() for s in shapes)


def extract_fast_components(m: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, indices, q): the top-k DCT coefficients of each chunk of ``m`` by magnitude (values (n_chunks, k)
    fp32, indices (n_chunks, k) int64) and q = IDCT of them as a dense tensor of m's shape (what leaves m)."""
    C = layout.encode(m)
    idx = C.abs().topk(layout.k, dim=-1).indices
    vals = C.gather(-1, idx)
    q = layout.decode(torch.zeros_like(C).scatter_(-1, idx, vals))
    return vals, idx, q


class DeMo(torch.optim.Optimizer):
    """DeMo over ``params`` (implemented from the paper's Algorithm 1; not the authors' code; see the module
    docstring). Communicates in :meth:`step` when torch.distributed is initialised (one all_gather per step on
    ``process_group``); alone, it is the n = 1 case. ``last_bytes``: bytes this worker handed to the all-gather in the
    last step (= ``bytes_per_step``)."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float = 3e-3,
        beta: float = 0.999,
        topk: int = 32,
        chunk: int = 64,
        weight_decay: float = 0.0,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__(params, {"lr": lr, "beta": beta, "weight_decay": weight_decay})
        self.topk, self.chunk, self.process_group = topk, chunk, process_group
        self.layouts: dict[torch.Tensor, Layout] = {}
        for g in self.param_groups:
            for p in g["params"]:
                self.layouts[p] = Layout(p.shape, chunk, topk)
                self.state[p]["momentum"] = torch.zeros_like(p, dtype=torch.float32)
        self.bytes_per_step = sum(L.bytes() for L in self.layouts.values())
        self.packed_bits_bytes_per_step = sum(L.packed_bits_bytes() for L in self.layouts.values())
        self.last_bytes = 0
        self.last_buffer: torch.Tensor | None = None

    def _params(self) -> list[tuple[torch.Tensor, dict]]:
        return [(p, g) for g in self.param_groups for p in g["params"]]

    def unpack(self, buf: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One worker's buffer as (values (n_chunks, k) fp32, indices (n_chunks, k) int64) per parameter."""
        Ls = [self.layouts[p] for p, _ in self._params()]
        nv = sum(L.n_chunks * L.k for L in Ls)
        vals, idx = buf[: 4 * nv].view(torch.float32), buf[4 * nv :].view(torch.int16).long()
        out, off = [], 0
        for L in Ls:
            n = L.n_chunks * L.k
            out.append((vals[off : off + n].view(L.n_chunks, L.k), idx[off : off + n].view(L.n_chunks, L.k)))
            off += n
        return out

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        vals, idxs = [], []
        params = self._params()
        for p, g in params:
            if p.grad is None:  # every worker has every gradient here (the buffer's layout must agree)
                raise RuntimeError("DeMo: a parameter has no gradient")
            m = self.state[p]["momentum"]
            m.mul_(g["beta"]).add_(p.grad.float())
            v, i, q = extract_fast_components(m, self.layouts[p])
            m.sub_(q)
            vals.append(v.reshape(-1))
            idxs.append(i.reshape(-1))
        buf = torch.cat([torch.cat(vals).view(torch.uint8), torch.cat(idxs).to(torch.int16).view(torch.uint8)])
        self.last_bytes, self.last_buffer = buf.numel(), buf
        if dist.is_available() and dist.is_initialized():
            world = dist.get_world_size(self.process_group)
            bufs = [torch.empty_like(buf) for _ in range(world)]
            dist.all_gather(bufs, buf, group=self.process_group)
        else:
            world, bufs = 1, [buf]
        got = [self.unpack(b) for b in bufs]
        for j, (p, g) in enumerate(params):
            L = self.layouts[p]
            C = torch.zeros(L.n_chunks, L.h * L.w)
            for w in got:  # Q = (1/n)·Σ_j IDCT(q_j) = IDCT((1/n)·Σ_j q_j): one decode
                C.scatter_add_(-1, w[j][1], w[j][0])
            Q = L.decode(C / world)
            if g["weight_decay"]:
                p.mul_(1 - g["lr"] * g["weight_decay"])
            p.add_(Q.sign().to(p.dtype), alpha=-g["lr"])
