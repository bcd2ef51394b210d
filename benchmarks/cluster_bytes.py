"""Cluster scale, analytically: per-rank bytes per optimizer step, split into intra-node and inter-node traffic, for
N nodes x G GPUs per node (n = N·G ranks; nodes are contiguous blocks of G ranks: rank r = node r // G, local
rank r % G), for DDP, DDP + PowerSGD, EF21-Muon ``sharded`` and EF21-Muon ``hierarchical``. No process group, no
training: every number is a closed form of the layer shapes, the package's compressors (``Compressor.wire_nbytes``
and ``Compressor.bits``), ``EF21Config().compressor(direction, role, shape)`` and the package's owner assignment
(``ef_lightning.comm.assign_owners``: whole layers, largest first to the least-loaded rank, by numel). Runs in
seconds; the models are built on the meta device (no memory, nothing downloaded).

Models (``--models``): ``gpt2_124m`` (``GPT2LMHeadModel(GPT2Config())``: 124.4 M parameters, tied head, 148
tensors) and ``benchmark`` (the byte-level Llama of ``common.py``, 0.34 M parameters).

What a rank sends per step ("bytes" = bytes handed to the wire; the gradient is fp32, as in the package):

- ``ddp``: dense fp32 all-reduce of the gradient (B = 4·numel bytes) over all n ranks, modelled as a ring
  (reduce-scatter then all-gather, each rank sends (n-1)/n·B per half, 2(n-1)/n·B in all). With nodes as contiguous
  blocks the ring crosses each node boundary once per direction, so a node's egress is 2(n-1)/n·B per step. NCCL runs
  several rings (channels) whose node-crossing rank differs; we assume the crossings are spread evenly over the G
  local ranks (rail-aligned NICs), so every rank sends 2(n-1)/n·B/G inter-node and the rest intra-node
  (max rank = mean). A double binary tree has about the same node egress (~2B); hierarchical all-reduce
  (reduce-scatter in the node, all-reduce of 1/G across nodes, all-gather in the node) 2(N-1)/N·B.
- ``powersgd``: the same all-reduce model on PowerSGD's payload (torch's hook, ``common.powersgd_bytes_per_step``):
  per matrix viewed as m x rest, P (m x r) and Q (rest x r) fp32 when m·rest > 2·r·(m + rest), dense otherwise;
  vectors dense.
- ``ef21_sharded`` (flat, the package's ``sharded`` topology over all n ranks): each layer has one owner among the n
  ranks. Uplink ``all_to_all``: a rank sends its compressed message of each layer to that layer's owner (nothing
  for its own layers). Downlink ``all_gather``: each owner sends its compressed S of its layers to the n-1 others
  (direct sends: (n-G)/n of them cross a node boundary).
- ``ef21_hierarchical``: the layers are split into G shares (``assign_owners(numel, G)``; share i = the layers of
  local rank i). In each node the gradients are reduced densely to the share owner (a rank sends the fp32 bytes of
  the layers not in its share, intra-node); then EF21 ``sharded`` runs across the N nodes among the ranks with the
  same local rank i, on share i only (each share-i layer has an owner node, ``assign_owners`` over N; uplink
  ``all_to_all`` and downlink ``all_gather`` among N, all inter-node); then every rank broadcasts its share's updated
  parameters (dense, ``--param-dtype``) to the G-1 other ranks of its node (intra-node).

Reported per (model, N, G, method), in bytes per step: ``inter_bytes`` / ``intra_bytes`` = the mean over the n
ranks of the bytes a rank sends to ranks on other nodes / on its own node (so ``inter_bytes`` = total node egress
per step / N / G), split into ``uplink_*`` (DDP: reduce-scatter half; hierarchical: intra-node reduce + cross-node
all_to_all) and ``downlink_*`` (DDP: all-gather half; hierarchical: cross-node all_gather + intra-node broadcast);
``max_inter_bytes`` = the largest inter-node send of one rank (EF21: the owner of the largest layers; it sets the
step time on a link-bound cluster), ``max_recv_inter_bytes`` the largest inter-node receive, ``node_egress_bytes``
(mean and max over nodes). EF21 records also carry ``theory`` (the same means from the closed-form ``bits``/8
instead of wire bytes) and ``downlink_variants`` (what other all_gather implementations send: ``padded_allgather``
= the package's ``all_gather_into_tensor``, every owner's buffer padded to the widest one and relayed by a ring,
so each rank sends (ranks-1) x the widest buffer; ``sharded`` also ``ring_allgatherv``, an unpadded ring in rank
order, where a buffer crosses each node boundary once instead of once per remote rank).

    python benchmarks/cluster_bytes.py                       # seconds: JSON, table, PNG in benchmarks/results/
    python benchmarks/cluster_bytes.py --models gpt2_124m --nodes 2,64 --gpus 8 --uplink top_k:0.02+natural
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C
import torch
from torch import nn

from ef_lightning.comm import assign_owners
from ef_lightning.config import EF21Config
from ef_lightning.optim import _classify

METHODS = ("ddp", "powersgd", "ef21_sharded", "ef21_hierarchical")
MODELS = ("gpt2_124m", "benchmark")
NODES = (2, 4, 8, 16, 32, 64)
GPUS = (1, 2, 4, 8)
MB = 1e6  # the tables' MB: 10^6 bytes
GRAD_DTYPE = torch.float32  # what the package compresses and sends (EF21Engine._lengths, DDP's buckets)
PHASES = ("uplink", "downlink")


# ------------------------------------------------------------------------------------------------------ the layers
@dataclasses.dataclass(frozen=True)
class Layer:
    """One trainable tensor: its size and the bytes of each kind of message about it."""

    name: str
    shape: tuple[int, ...]
    role: str
    numel: int
    grad: int  # dense fp32 gradient bytes
    param: int  # dense parameter bytes (the hierarchical broadcast)
    up: float  # uplink message bytes (wire bytes, or bits/8 for the theory variant)
    down: float  # downlink message bytes
    up_bits: int
    down_bits: int
    up_spec: str
    down_spec: str


def model_layers(
    model: nn.Module,
    uplink: Any = None,
    downlink: Any = None,
    param_dtype: torch.dtype = torch.float32,
) -> list[Layer]:
    """The trainable tensors of ``model`` (``_classify`` order and roles, shared tensors once) with the compressors
    ``EF21Config(uplink=uplink, downlink=downlink).compressor(...)`` gives them (``None``: the package defaults)."""
    cfg = EF21Config(uplink=uplink, downlink=downlink, topology="sharded")
    out = []
    for name, p, role, _, _ in _classify(model):
        shape = torch.Size(p.shape)
        up, down = cfg.compressor("uplink", role, shape), cfg.compressor("downlink", role, shape)
        out.append(
            Layer(
                name=name,
                shape=tuple(shape),
                role=role,
                numel=p.numel(),
                grad=GRAD_DTYPE.itemsize * p.numel(),
                param=param_dtype.itemsize * p.numel(),
                up=up.wire_nbytes(shape, GRAD_DTYPE),
                down=down.wire_nbytes(shape, GRAD_DTYPE),
                up_bits=up.bits(shape, GRAD_DTYPE),
                down_bits=down.bits(shape, GRAD_DTYPE),
                up_spec=up.spec,
                down_spec=down.spec,
            )
        )
    return out


def theory_layers(layers: Sequence[Layer]) -> list[Layer]:
    """The same layers with the messages' closed-form bits/8 in place of their wire bytes."""
    return [dataclasses.replace(L, up=L.up_bits / 8, down=L.down_bits / 8) for L in layers]


def powersgd_payload(model: nn.Module, rank: int) -> int:
    """Bytes PowerSGD all-reduces per step (torch's hook, after its dense warm-up): ``common``'s rule."""
    return C.powersgd_bytes_per_step(model, rank)


# ------------------------------------------------------------------------------------------------------ traffic
@dataclasses.dataclass
class Traffic:
    """Per-rank bytes of one step: for each phase (uplink, downlink), what each rank sends intra-node and
    inter-node and receives inter-node. Rank r is on node r // G."""

    N: int
    G: int
    sent_intra: dict[str, list[float]]
    sent_inter: dict[str, list[float]]
    recv_inter: dict[str, list[float]]

    @classmethod
    def empty(cls, N: int, G: int) -> Traffic:
        z = lambda: {ph: [0.0] * (N * G) for ph in PHASES}  # noqa: E731
        return cls(N, G, z(), z(), z())

    def send(self, phase: str, src: int, dst: int, nbytes: float) -> None:
        """``src`` sends ``nbytes`` to ``dst`` (a point-to-point message)."""
        if src == dst or not nbytes:
            return
        if src // self.G == dst // self.G:
            self.sent_intra[phase][src] += nbytes
        else:
            self.sent_inter[phase][src] += nbytes
            self.recv_inter[phase][dst] += nbytes

    def per_rank(self, which: dict[str, list[float]]) -> list[float]:
        return [sum(which[ph][r] for ph in PHASES) for r in range(self.N * self.G)]


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def ring_allreduce(B: float, N: int, G: int) -> Traffic:
    """Ring all-reduce of B bytes over n = N·G ranks: each half (reduce-scatter = uplink, all-gather = downlink)
    sends (n-1)/n·B per rank; node egress (n-1)/n·B per half; crossings spread over the G local ranks."""
    n = N * G
    t = Traffic.empty(N, G)
    half = (n - 1) / n * B
    inter = half / G if N > 1 else 0.0
    for ph in PHASES:
        for r in range(n):
            t.sent_intra[ph][r] = half - inter
            t.sent_inter[ph][r] = t.recv_inter[ph][r] = inter
    return t


def sharded(layers: Sequence[Layer], N: int, G: int) -> tuple[Traffic, dict[str, Any]]:
    """Flat EF21 ``sharded`` over n = N·G ranks (owners: ``assign_owners``), direct sends."""
    n = N * G
    owners = assign_owners([L.numel for L in layers], n)
    t = Traffic.empty(N, G)
    for L, o in zip(layers, owners):
        for r in range(n):
            t.send("uplink", r, o, L.up)  # every worker's message of L to its owner
            t.send("downlink", o, r, L.down)  # the owner's S of L to every other rank
    down_by_owner = [0.0] * n
    for L, o in zip(layers, owners):
        down_by_owner[o] += L.down
    return t, {"owners": owners, "down_by_owner": down_by_owner}


def hierarchical(layers: Sequence[Layer], N: int, G: int) -> tuple[Traffic, dict[str, Any]]:
    """EF21 ``hierarchical``: dense intra-node reduce to the share owner, EF21 ``sharded`` across the N nodes on each
    share, intra-node broadcast of each share's updated parameters."""
    share = assign_owners([L.numel for L in layers], G)  # local rank owning each layer
    node_owner = [0] * len(layers)
    for i in range(G):
        idx = [k for k in range(len(layers)) if share[k] == i]
        for k, o in zip(idx, assign_owners([layers[k].numel for k in idx], N)):
            node_owner[k] = o
    t = Traffic.empty(N, G)
    down_by_owner = [[0.0] * N for _ in range(G)]  # [local rank][node]
    for k, L in enumerate(layers):
        i, jo = share[k], node_owner[k]
        down_by_owner[i][jo] += L.down
        for j in range(N):
            owner = j * G + i  # the share owner on node j
            for loc in range(G):
                t.send("uplink", j * G + loc, owner, L.grad)  # intra-node dense reduce of L to its share owner
                t.send("downlink", owner, j * G + loc, L.param)  # intra-node broadcast of L's new parameters
            t.send("uplink", owner, jo * G + i, L.up)  # cross-node: compressed message to the owner node's rank i
            t.send("downlink", jo * G + i, owner, L.down)  # cross-node: the owner node's rank i sends S of L
    return t, {"share": share, "node_owner": node_owner, "down_by_owner": down_by_owner}


def summarize(t: Traffic) -> dict[str, float]:
    """Means over ranks (per phase and total), the largest rank, node egress."""
    N, G = t.N, t.G
    inter, intra, recv = t.per_rank(t.sent_inter), t.per_rank(t.sent_intra), t.per_rank(t.recv_inter)
    egress = [sum(inter[j * G : (j + 1) * G]) for j in range(N)]
    out = {"inter_bytes": _mean(inter), "intra_bytes": _mean(intra)}
    out["total_bytes"] = out["inter_bytes"] + out["intra_bytes"]
    for ph in PHASES:
        out[f"{ph}_inter_bytes"] = _mean(t.sent_inter[ph])
        out[f"{ph}_intra_bytes"] = _mean(t.sent_intra[ph])
    out.update(
        {
            "max_inter_bytes": max(inter),
            "max_intra_bytes": max(intra),
            "max_recv_inter_bytes": max(recv),
            "node_egress_bytes": _mean(egress),
            "max_node_egress_bytes": max(egress),
        }
    )
    return out


def sharded_downlink_variants(info: dict[str, Any], N: int, G: int) -> dict[str, dict[str, float]]:
    """Mean per-rank downlink bytes of flat ``sharded`` under two other all_gather implementations (one ring in rank
    order; a buffer crosses a link once per hop)."""
    n = N * G
    D = info["down_by_owner"]
    total, W = sum(D), max(D)
    ring = {"inter": 0.0, "intra": 0.0}
    padded = {"inter": 0.0, "intra": 0.0}
    for r in range(n):  # edge r -> r+1 carries every buffer but the receiver's own
        kind = "intra" if r // G == ((r + 1) % n) // G else "inter"
        ring[kind] += total - D[(r + 1) % n]
        padded[kind] += (n - 1) * W
    return {
        "ring_allgatherv": {f"downlink_{k}_bytes": v / n for k, v in ring.items()},
        "padded_allgather": {f"downlink_{k}_bytes": v / n for k, v in padded.items()},
    }


def hierarchical_downlink_variants(info: dict[str, Any], N: int, G: int) -> dict[str, dict[str, float]]:
    """Mean per-rank cross-node downlink bytes of ``hierarchical`` with the package's padded all_gather among N (each
    rank sends (N-1) x the widest share-i buffer)."""
    widest = [max(row) for row in info["down_by_owner"]]
    return {"padded_allgather": {"downlink_inter_bytes": sum((N - 1) * w for w in widest) / G}}


def grid_point(
    layers: Sequence[Layer], psgd_bytes: int, N: int, G: int, theory: Sequence[Layer] | None = None
) -> dict[str, dict[str, Any]]:
    """Every method's summary at one (N, G)."""
    dense = sum(L.grad for L in layers)
    res: dict[str, dict[str, Any]] = {
        "ddp": summarize(ring_allreduce(dense, N, G)),
        "powersgd": summarize(ring_allreduce(psgd_bytes, N, G)),
    }
    t, info = sharded(layers, N, G)
    res["ef21_sharded"] = {**summarize(t), "downlink_variants": sharded_downlink_variants(info, N, G)}
    t, info = hierarchical(layers, N, G)
    res["ef21_hierarchical"] = {**summarize(t), "downlink_variants": hierarchical_downlink_variants(info, N, G)}
    for m, fn in (("ef21_sharded", sharded), ("ef21_hierarchical", hierarchical)):
        if theory is not None:
            s = summarize(fn(theory, N, G)[0])
            res[m]["theory"] = {k: s[k] for k in ("inter_bytes", "intra_bytes", "total_bytes")}
    return res


# ------------------------------------------------------------------------------------------------------ models
def build(name: str) -> nn.Module:
    """A model on the meta device (shapes only)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    with torch.device("meta"):
        if name == "gpt2_124m":
            from transformers import GPT2Config, GPT2LMHeadModel

            return GPT2LMHeadModel(GPT2Config())
        if name == "benchmark":
            return C.build_model(C.Task())
    raise ValueError(f"model {name!r}; valid: {', '.join(MODELS)}")


def parse_spec(text: str | None) -> Any:
    """``None`` (package default), a JSON mapping role -> spec, or one spec on every matrix role (vectors dense, as
    ``common.role_spec``)."""
    if text is None:
        return None
    if text.lstrip().startswith("{"):
        return json.loads(text)
    return C.role_spec(text)


def int_list(text: str) -> list[int]:
    try:
        xs = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None
    if not xs or min(xs) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers >= 1")
    return xs


# ------------------------------------------------------------------------------------------------------ output
DEFINITIONS = {
    "bytes": "bytes a rank hands to the wire per optimizer step (sent, not received), fp32 gradients; MB = 1e6 B",
    "inter_bytes": "mean over the n = N·G ranks of the bytes a rank sends to ranks on other nodes (= node egress / G)",
    "intra_bytes": "mean over ranks of the bytes a rank sends to ranks on its own node",
    "nodes": "contiguous blocks of G ranks (rank r on node r // G)",
    "ddp": "dense fp32 ring all-reduce over n ranks, 2(n-1)/n·B per rank; the ring crosses each node boundary once "
    "per direction (node egress 2(n-1)/n·B), crossings spread evenly over the G local ranks (several rotated rings)",
    "powersgd": "the DDP model on PowerSGD's payload: P (m x r) + Q (rest x r) fp32 per compressed matrix (torch "
    "hook rule, m·rest > 2r(m+rest)), other tensors dense",
    "ef21_sharded": "owners among n ranks (assign_owners, by numel); uplink all_to_all of compressed messages to each "
    "layer's owner; downlink: each owner sends its compressed S to the n-1 others (direct sends)",
    "ef21_hierarchical": "G shares (assign_owners over G); intra-node dense fp32 reduce to the share owner; EF21 "
    "sharded across the N nodes among equal local ranks on each share (all inter-node); intra-node broadcast of "
    "the share's parameters (param dtype) to the G-1 others",
    "max_inter_bytes": "the largest inter-node send of one rank (ddp/powersgd: = mean by the spread-crossings rule)",
    "theory": "EF21 means with the compressors' closed-form bits/8 instead of wire bytes",
    "downlink_variants": "EF21 downlink under other all_gather implementations: padded_allgather = the package's "
    "all_gather_into_tensor (buffers padded to the widest owner's, ring: (ranks-1) x widest per rank); "
    "ring_allgatherv (sharded) = unpadded ring in rank order",
}


def table(records: list[dict[str, Any]], model: str) -> str:
    rows = [r for r in records if r["model"] == model]
    points = sorted({(r["nodes"], r["gpus"]) for r in rows})
    by = {(r["nodes"], r["gpus"], r["method"]): r for r in rows}
    short = {"ddp": "ddp", "powersgd": "psgd", "ef21_sharded": "shard", "ef21_hierarchical": "hier"}
    head = (
        f"{'N':>3} {'G':>2} {'n':>4} | "
        + " ".join(f"{short[m]:>8}" for m in METHODS)
        + " | "
        + " ".join(f"{short[m]:>8}" for m in METHODS)
        + " | "
        + " ".join(f"{short[m]:>8}" for m in METHODS[2:])
    )
    top = (
        f"{'':>12} | {'inter-node MB per rank per step':^35} | {'intra-node MB per rank per step':^35} | "
        f"{'max-rank inter MB':^17}"
    )
    lines = [top, head, "-" * len(head)]
    for N, G in points:
        row = {m: {k: v / MB for k, v in by[(N, G, m)].items() if k.endswith("_bytes")} for m in METHODS}
        lines.append(
            f"{N:>3} {G:>2} {N * G:>4} | "
            + " ".join(f"{row[m]['inter_bytes']:>8.2f}" for m in METHODS)
            + " | "
            + " ".join(f"{row[m]['intra_bytes']:>8.2f}" for m in METHODS)
            + " | "
            + " ".join(f"{row[m]['max_inter_bytes']:>8.2f}" for m in METHODS[2:])
        )
    return "\n".join(lines)


def detail(records: list[dict[str, Any]], model: str, N: int, G: int) -> str:
    rows = [r for r in records if r["model"] == model and r["nodes"] == N and r["gpus"] == G]
    cols = [
        ("inter_bytes", "inter MB/rank/step"),
        ("intra_bytes", "intra MB/rank/step"),
        ("uplink_inter_bytes", "up inter MB"),
        ("downlink_inter_bytes", "down inter MB"),
        ("uplink_intra_bytes", "up intra MB"),
        ("downlink_intra_bytes", "down intra MB"),
        ("max_inter_bytes", "max-rank inter MB"),
        ("max_recv_inter_bytes", "max-rank recv inter MB"),
        ("node_egress_bytes", "node egress MB"),
    ]
    lines = [f"{model}, N={N} x G={G}:", f"{'method':<18} " + " ".join(f"{c:>{max(11, len(c))}}" for _, c in cols)]
    lines += [f"{r['method']:<18} " + " ".join(f"{r[k] / MB:>{max(11, len(c))}.2f}" for k, c in cols) for r in rows]
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], models: Sequence[str], G: int, path: Path) -> bool:
    """Inter-node MB per rank per step vs n = N·G at fixed G, one panel per model; dashed: EF21's largest rank."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(6.2 * len(models), 4.6), squeeze=False)
    colors = {"ddp": "C0", "powersgd": "C1", "ef21_sharded": "C2", "ef21_hierarchical": "C3"}
    for ax, model in zip(axes[0], models):
        rows = sorted((r for r in records if r["model"] == model and r["gpus"] == G), key=lambda r: r["nodes"])
        for m in METHODS:
            rs = [r for r in rows if r["method"] == m]
            x = [r["ranks"] for r in rs]
            ax.plot(x, [r["inter_bytes"] / MB for r in rs], "o-", color=colors[m], label=f"{m} (mean rank)")
            if m.startswith("ef21"):
                ax.plot(x, [r["max_inter_bytes"] / MB for r in rs], "x--", color=colors[m], label=f"{m} (max rank)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(f"ranks n = N x G (G = {G} GPUs per node)")
        ax.set_ylabel("inter-node MB per rank per step (sent)")
        ax.set_title(model)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------------------ main
def run(
    models: Sequence[str],
    nodes: Sequence[int],
    gpus: Sequence[int],
    psgd_rank: int,
    uplink: Any,
    downlink: Any,
    param_dtype: torch.dtype,
    log: Callable[[str], None] = print,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    records: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    for name in models:
        model = build(name)
        layers = model_layers(model, uplink, downlink, param_dtype)
        theory = theory_layers(layers)
        psgd = powersgd_payload(model, psgd_rank)
        info[name] = {
            "params": sum(L.numel for L in layers),
            "tensors": len(layers),
            "dense_fp32_bytes": sum(L.grad for L in layers),
            "param_bytes": sum(L.param for L in layers),
            "powersgd_payload_bytes": psgd,
            "uplink_message_bytes": sum(L.up for L in layers),
            "downlink_message_bytes": sum(L.down for L in layers),
            "uplink_bits": sum(L.up_bits for L in layers),
            "downlink_bits": sum(L.down_bits for L in layers),
            "largest_tensor": max(layers, key=lambda L: L.numel).name,
            "largest_tensor_numel": max(L.numel for L in layers),
            "compressors": sorted({(L.role, L.up_spec, L.down_spec) for L in layers}),
        }
        for N in nodes:
            for G in gpus:
                for m, s in grid_point(layers, psgd, N, G, theory).items():
                    records.append({"model": name, "nodes": N, "gpus": G, "ranks": N * G, "method": m, **s})
        log(f"{name}: {info[name]['params'] / 1e6:.2f} M parameters, {len(layers)} tensors")
    return records, info


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    p.add_argument("--nodes", type=int_list, default=list(NODES), help="node counts N (default 2,4,8,16,32,64)")
    p.add_argument("--gpus", type=int_list, default=list(GPUS), help="GPUs per node G (default 1,2,4,8)")
    p.add_argument("--powersgd-rank", type=int, default=4, help="PowerSGD rank r (default 4)")
    p.add_argument(
        "--uplink",
        default=None,
        help="EF21 uplink: one spec on every matrix role (vectors dense) or a JSON mapping role -> spec "
        "(default: EF21Config()'s, top_k:0.05+natural on matrices)",
    )
    p.add_argument(
        "--downlink", default=None, help="EF21 downlink, same forms (default: EF21Config()'s, top_k:0.1+natural)"
    )
    p.add_argument(
        "--param-dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="parameter dtype of the hierarchical intra-node broadcast (default float32)",
    )
    p.add_argument("--plot-gpus", type=int, default=8, help="G of the plot (default 8; no plot if not in --gpus)")
    p.add_argument("--out", default=str(C.RESULTS), help="output folder (cluster_bytes.json, cluster_bytes.png)")
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad or not models:
        p.error(f"--models {args.models!r}: valid models are {', '.join(MODELS)}")
    if args.powersgd_rank < 1:
        p.error("--powersgd-rank must be >= 1")
    try:
        uplink, downlink = parse_spec(args.uplink), parse_spec(args.downlink)
        cfg = EF21Config(uplink=uplink, downlink=downlink)
    except (ValueError, TypeError) as e:
        p.error(str(e))
    t0 = time.perf_counter()
    records, info = run(
        models, args.nodes, args.gpus, args.powersgd_rank, uplink, downlink, getattr(torch, args.param_dtype)
    )
    out = Path(args.out)
    meta = {
        "environment": C.environment(),
        "args": vars(args),
        "uplink": dict(cfg.uplink) if isinstance(cfg.uplink, Mapping) else cfg.uplink,
        "downlink": dict(cfg.downlink) if isinstance(cfg.downlink, Mapping) else cfg.downlink,
        "package_defaults": C.package_defaults(),
        "is_package_default": args.uplink is None and args.downlink is None,
        "models": info,
        "definitions": DEFINITIONS,
        "command": ("python benchmarks/cluster_bytes.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip(),
        "seconds": time.perf_counter() - t0,
    }
    C.write_json(out / "cluster_bytes.json", {"runs": records, "meta": meta})
    for name in models:
        m = info[name]
        print(f"\n{name}: {m['params'] / 1e6:.2f} M parameters (dense fp32 {m['dense_fp32_bytes'] / MB:.1f} MB)")
        print(table(records, name))
        N, G = max(args.nodes), max(args.gpus)
        print()
        print(detail(records, name, N, G))
    png = out / "cluster_bytes.png"
    drew = args.plot_gpus in args.gpus and plot(records, models, args.plot_gpus, png)
    print(
        f"\n{len(records)} records in {meta['seconds']:.1f} s -> {out / 'cluster_bytes.json'}"
        + (f", {png}" if drew else "")
    )


if __name__ == "__main__":
    main()
