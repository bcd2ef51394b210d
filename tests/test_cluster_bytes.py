"""benchmarks/cluster_bytes.py: the analytical per-rank intra-/inter-node byte model, against independent references.

References: numbers worked out by hand for a 2-layer toy model (N = 2 nodes x G = 2 GPUs, identity compressors,
and top_k:0.5 with its closed form bits = f·K + min(K·⌈log2 d⌉, d)); a step-by-step simulation of G rotated
ring all-reduces (for DDP/PowerSGD); PowerSGD's r·(m + rest) fp32 payload; the mean-rank closed forms
(n-G)/n·Σ(up + down) for flat ``sharded`` and (N-1)/(N·G)·Σ(up + down) for ``hierarchical``; ``hierarchical``
with G = 1 is ``sharded`` over the N nodes. Nothing is compared with numbers captured from the script's output.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import cluster_bytes as CB  # noqa: E402

FIELDS = ("uplink_inter_bytes", "uplink_intra_bytes", "downlink_inter_bytes", "downlink_intra_bytes")


def toy() -> nn.Module:
    """Two weight matrices, numel 100 (layer A) and 60 (layer B), no biases."""
    return nn.Sequential(nn.Linear(10, 10, bias=False), nn.Linear(10, 6, bias=False))


def mixed() -> nn.Module:
    """A few matrices and vectors of different sizes (some equal), for the closed-form relations."""
    return nn.Sequential(
        nn.Linear(48, 96),
        nn.LayerNorm(96),
        nn.Linear(96, 96),
        nn.Linear(96, 32),
        nn.LayerNorm(32),
        nn.Linear(32, 200, bias=False),
    )


def per_rank(t: CB.Traffic, which: dict[str, list[float]]) -> list[float]:
    return [which["uplink"][r] + which["downlink"][r] for r in range(t.N * t.G)]


# ------------------------------------------------------------------------------------------------- hand-computed
def test_toy_identity_hierarchical_by_hand() -> None:
    # shares over G=2: A (100) -> local rank 0, B (60) -> local rank 1; each share's single layer -> node 0.
    # fp32 and identity: A = 400 B, B = 240 B for gradient, parameter and both messages.
    # rank (node, local): 0=(0,0) 1=(0,1) 2=(1,0) 3=(1,1)
    #  inter: rank 0 sends S_A to rank 2 (400); rank 1 sends S_B to rank 3 (240);
    #         rank 2 sends its A message to rank 0 (400); rank 3 its B message to rank 1 (240)
    #  intra: reduce (the gradient of the other share to its owner) + broadcast (G-1 = 1 copy of the own share):
    #         rank 0: 240 + 400, rank 1: 400 + 240, same on node 1
    layers = CB.model_layers(toy(), "identity", "identity")
    assert [(L.numel, L.grad, L.param, L.up, L.down) for L in layers] == [
        (100, 400, 400, 400, 400),
        (60, 240, 240, 240, 240),
    ]
    t, _ = CB.hierarchical(layers, N=2, G=2)
    assert per_rank(t, t.sent_inter) == [400, 240, 400, 240]
    assert t.sent_inter["uplink"] == [0, 0, 400, 240]
    assert t.sent_inter["downlink"] == [400, 240, 0, 0]
    assert per_rank(t, t.sent_intra) == [640, 640, 640, 640]
    assert t.sent_intra["uplink"] == [240, 400, 240, 400]
    assert per_rank(t, t.recv_inter) == [400, 240, 400, 240]
    s = CB.summarize(t)
    assert s["inter_bytes"] == 320 and s["intra_bytes"] == 640 and s["max_inter_bytes"] == 400
    assert s["node_egress_bytes"] == 640 and s["max_node_egress_bytes"] == 640


def test_toy_identity_sharded_by_hand() -> None:
    # owners over n=4 ranks: A -> rank 0, B -> rank 1 (both on node 0)
    #  rank 0: uplink B to rank 1 (240 intra); downlink S_A to 1 (400 intra), to 2 and 3 (800 inter)
    #  rank 1: uplink A to rank 0 (400 intra); downlink S_B to 0 (240 intra), to 2 and 3 (480 inter)
    #  ranks 2, 3: uplink A and B to node 0 (640 inter each)
    t, _ = CB.sharded(CB.model_layers(toy(), "identity", "identity"), N=2, G=2)
    assert per_rank(t, t.sent_inter) == [800, 480, 640, 640]
    assert per_rank(t, t.sent_intra) == [640, 640, 0, 0]
    assert per_rank(t, t.recv_inter) == [800, 480, 640, 640]  # owners receive the messages of ranks 2, 3
    s = CB.summarize(t)
    assert (s["inter_bytes"], s["intra_bytes"], s["max_inter_bytes"]) == (640, 320, 800)
    assert (s["uplink_inter_bytes"], s["downlink_inter_bytes"]) == (320, 320)
    assert s["max_node_egress_bytes"] == 1280 and s["node_egress_bytes"] == 1280  # node 0: 1280, node 1: 1280


def test_toy_topk_wire_bytes_by_hand() -> None:
    # top_k:0.5 on fp32: A (d=100): K=50, bitmap (100 < 50·7) 13 B + 200 B values = 213 B, bits 100 + 1600;
    # B (d=60): K=30, bitmap (60 < 30·6) 8 B + 120 B = 128 B, bits 60 + 960
    layers = CB.model_layers(toy(), "top_k:0.5", "identity")
    assert [(L.up, L.up_bits) for L in layers] == [(213, 1700), (128, 1020)]
    for L in layers:
        K = math.ceil(0.5 * L.numel)
        assert L.up_bits == min(K * (32 + math.ceil(math.log2(L.numel))), 32 * K + L.numel)
    # N=2, G=1: A -> rank 0, B -> rank 1. Rank 0 sends B's message (128) and S_A (400); rank 1 A's (213) and S_B (240)
    for fn in (CB.sharded, CB.hierarchical):
        t, _ = fn(layers, N=2, G=1)
        assert per_rank(t, t.sent_inter) == [528, 453]
        assert CB.summarize(t)["inter_bytes"] == 490.5
    th = CB.theory_layers(layers)
    assert [(L.up, L.down) for L in th] == [(1700 / 8, 400), (1020 / 8, 240)]


# ------------------------------------------------------------------------------------------------- DDP / PowerSGD
def simulate_rotated_rings(B: float, N: int, G: int) -> tuple[list[float], list[float]]:
    """G ring all-reduces of B/G bytes each; ring c visits node j's ranks in local order c, c+1, ... (mod G), so a
    different local rank crosses to the next node in each ring. Each of the 2(n-1) steps every rank sends one
    chunk of B/G/n to its successor. Returns per-rank (inter, intra) sent bytes."""
    n = N * G
    inter, intra = [0.0] * n, [0.0] * n
    for c in range(G):
        order = [j * G + (c + k) % G for j in range(N) for k in range(G)]
        chunk = B / G / n
        for _ in range(2 * (n - 1)):
            for pos, r in enumerate(order):
                succ = order[(pos + 1) % n]
                if succ == r:
                    continue
                (inter if succ // G != r // G else intra)[r] += chunk
    return inter, intra


@pytest.mark.parametrize(("N", "G"), [(2, 1), (2, 2), (3, 4), (4, 8), (1, 4)])
def test_ddp_ring_against_simulation(N: int, G: int) -> None:
    B = 4 * 1000
    inter, intra = simulate_rotated_rings(B, N, G)
    s = CB.summarize(CB.ring_allreduce(B, N, G))
    n = N * G
    assert s["inter_bytes"] == pytest.approx(sum(inter) / n)
    assert max(inter) == pytest.approx(min(inter))  # every local rank crosses in one of the G rings
    assert s["max_inter_bytes"] == pytest.approx(max(inter))
    assert s["intra_bytes"] == pytest.approx(sum(intra) / n)
    assert s["inter_bytes"] + s["intra_bytes"] == pytest.approx(2 * (n - 1) / n * B)
    egress = 2 * (n - 1) / n * B if N > 1 else 0.0  # the ring crosses each node boundary once per direction
    assert s["node_egress_bytes"] == pytest.approx(egress)
    assert s["inter_bytes"] == pytest.approx(egress / G)


def test_powersgd_payload_and_ddp_dense() -> None:
    model = nn.Sequential(nn.Linear(64, 128, bias=False), nn.LayerNorm(128))  # weight (128, 64), gain/bias 128
    r = 4
    payload = 4 * r * (128 + 64) + 4 * 2 * 128  # P and Q fp32 (128·64 > 2·4·192), vectors dense
    assert CB.powersgd_payload(model, r) == payload
    layers = CB.model_layers(model)
    N, G = 4, 2
    n = N * G
    res = CB.grid_point(layers, payload, N, G)
    assert res["powersgd"]["inter_bytes"] == pytest.approx(2 * (n - 1) / n * payload / G)
    dense = 4 * (128 * 64 + 2 * 128)
    assert res["ddp"]["inter_bytes"] == pytest.approx(2 * (n - 1) / n * dense / G)
    assert res["ddp"]["intra_bytes"] == pytest.approx(2 * (n - 1) / n * dense * (G - 1) / G)


# ------------------------------------------------------------------------------------------------- relations
@pytest.mark.parametrize(("N", "G"), [(2, 2), (3, 4), (5, 8), (4, 3)])
def test_mean_rank_closed_forms(N: int, G: int) -> None:
    layers = CB.model_layers(mixed(), "top_k:0.1", "top_k:0.2")  # real (not identity) message sizes
    n = N * G
    up, down = sum(L.up for L in layers), sum(L.down for L in layers)
    dense, param = sum(4 * L.numel for L in layers), sum(4 * L.numel for L in layers)
    sh = CB.summarize(CB.sharded(layers, N, G)[0])
    assert sh["uplink_inter_bytes"] == pytest.approx((n - G) / n * up)
    assert sh["downlink_inter_bytes"] == pytest.approx((n - G) / n * down)
    assert sh["uplink_intra_bytes"] == pytest.approx((G - 1) / n * up)
    assert sh["downlink_intra_bytes"] == pytest.approx((G - 1) / n * down)
    hi = CB.summarize(CB.hierarchical(layers, N, G)[0])
    assert hi["uplink_inter_bytes"] == pytest.approx((N - 1) / (N * G) * up)
    assert hi["downlink_inter_bytes"] == pytest.approx((N - 1) / (N * G) * down)
    assert hi["uplink_intra_bytes"] == pytest.approx((G - 1) / G * dense)  # each rank: the other shares' gradients
    assert hi["downlink_intra_bytes"] == pytest.approx((G - 1) / G * param)  # each share to G-1 others, G shares
    for s in (sh, hi):
        assert s["node_egress_bytes"] == pytest.approx(G * s["inter_bytes"])
        assert s["max_inter_bytes"] >= s["inter_bytes"]


@pytest.mark.parametrize("N", [2, 3, 5, 16])
def test_hierarchical_with_one_gpu_is_sharded(N: int) -> None:
    layers = CB.model_layers(mixed())  # package defaults
    a, b = CB.sharded(layers, N, 1)[0], CB.hierarchical(layers, N, 1)[0]
    assert a.sent_inter == b.sent_inter and a.recv_inter == b.recv_inter
    assert a.sent_intra == b.sent_intra == {ph: [0.0] * N for ph in CB.PHASES}


def test_sharded_downlink_variants_by_hand() -> None:
    # identity toy, N=2, G=2: owners A -> 0, B -> 1; S buffers per owner [400, 240, 0, 0]
    _, info = CB.sharded(CB.model_layers(toy(), "identity", "identity"), N=2, G=2)
    v = CB.sharded_downlink_variants(info, N=2, G=2)
    # ring 0->1->2->3->0, each edge carries every buffer but the receiver's: 0->1: 400, 1->2 (inter): 640,
    # 2->3: 640, 3->0 (inter): 240
    assert v["ring_allgatherv"] == {"downlink_inter_bytes": (640 + 240) / 4, "downlink_intra_bytes": (400 + 640) / 4}
    # padded to 400 each, every rank relays 3 buffers: 1200; 2 of the 4 edges cross nodes
    assert v["padded_allgather"] == {"downlink_inter_bytes": 2 * 1200 / 4, "downlink_intra_bytes": 2 * 1200 / 4}
    _, hinfo = CB.hierarchical(CB.model_layers(toy(), "identity", "identity"), N=2, G=2)
    # share 0: widest node buffer 400, share 1: 240; each rank sends (N-1) x its share's widest
    assert CB.hierarchical_downlink_variants(hinfo, N=2, G=2) == {"padded_allgather": {"downlink_inter_bytes": 320}}


# ------------------------------------------------------------------------------------------------- the script
def test_defaults_are_the_package_defaults() -> None:
    from ef_lightning.config import EF21Config

    cfg = EF21Config()
    for L in CB.model_layers(mixed()):
        shape = torch.Size(L.shape)
        assert L.up_spec == cfg.compressor("uplink", L.role, shape).spec
        assert L.down_spec == cfg.compressor("downlink", L.role, shape).spec


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        CB.main(["--help"])
    assert e.value.code == 0
    assert "--powersgd-rank" in capsys.readouterr().out
    CB.main(["--models", "benchmark", "--nodes", "2,4", "--gpus", "1,8", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "inter-node MB per rank per step" in out
    res = json.loads((tmp_path / "cluster_bytes.json").read_text())
    runs = res["runs"]
    assert len(runs) == 2 * 2 * len(CB.METHODS)
    assert {(r["nodes"], r["gpus"]) for r in runs} == {(2, 1), (2, 8), (4, 1), (4, 8)}
    assert res["meta"]["is_package_default"] is True
    params = res["meta"]["models"]["benchmark"]["params"]
    ddp = next(r for r in runs if r["method"] == "ddp" and r["nodes"] == 4 and r["gpus"] == 8)
    assert ddp["inter_bytes"] == pytest.approx(2 * 31 / 32 * 4 * params / 8)
    assert (tmp_path / "cluster_bytes.png").stat().st_size > 0
