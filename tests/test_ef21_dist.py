"""EF21Engine over real gloo processes: every topology against the in-process Simulator (an independent code path
for the exchange), wire bytes against the bytes actually handed to the collectives, ownership of Newton-Schulz work,
resume, non-finite gradients, and configuration mismatches."""

from __future__ import annotations

import time

import pytest
import torch

import ef_lightning as efl
from dist_helpers import (check_ok, engine_mismatch, engine_nan, engine_overlap, engine_resume, engine_run, make_data, make_model,
                          make_optimizer, mse, run_distributed)

pytestmark = pytest.mark.slow  # multi-process: the bulk of the suite's time (deselect: -m 'not slow')

STEPS = 8
CONFIGS = [
    {"topology": t, "uplink": up, "downlink": "identity"}
    for t in ("allgather", "server", "sharded") for up in ("identity", "top_k:0.1")
] + [{"topology": t, "uplink": "top_k:0.1", "downlink": "top_k:0.25"} for t in ("server", "sharded")]
LONG = [{"topology": t, "uplink": "top_k:0.25", "downlink": "top_k:0.5", "_steps": 200} for t in ("server", "sharded")]


def _simulate(n: int, cfg: dict, steps: int):
    model = make_model(0)
    sim = efl.Simulator(model, make_optimizer(model), n_workers=n, uplink=cfg["uplink"], downlink=cfg["downlink"])
    data = make_data(n, steps)
    for s in range(steps):
        sim.step(mse, data[s])
    return sim, model


@pytest.fixture(scope="module", params=[2, 3], ids=["2proc", "3proc"])
def dist_results(request, tmp_path_factory):
    n = request.param
    return n, check_ok(run_distributed(engine_run, n, tmp_path_factory.mktemp("ef21"), configs=CONFIGS + LONG, steps=STEPS))


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c['topology']}-{c['uplink']}-{c['downlink']}")
def test_processes_match_simulator(dist_results, cfg):
    n, results = dist_results
    key = repr(sorted(cfg.items()))
    sim, model = _simulate(n, cfg, STEPS)
    X_ref = sim.server_model()
    W_ref = dict(model.named_parameters())
    served = set()
    for r, res in enumerate(results):
        got = res[key]
        for name, x in got["X"].items():  # every rank's served part of X
            torch.testing.assert_close(x, X_ref[name], atol=1e-6, rtol=0)
            served.add(name)
        for name, w in got["W"].items():  # every rank holds the whole W
            torch.testing.assert_close(w, W_ref[name].detach(), atol=1e-6, rtol=0)
    assert served == set(X_ref)  # the union of the owners' shards is the whole model
    if cfg["downlink"] != "identity":
        assert any(not torch.equal(X_ref[k], W_ref[k]) for k in X_ref)  # W != X with a compressed downlink
    if cfg["topology"] == "sharded":
        owned = [set(res[key]["served"]) for res in results]
        assert all(a.isdisjoint(b) for i, a in enumerate(owned) for b in owned[i + 1:])


@pytest.mark.parametrize("topology", ["allgather", "server", "sharded"])
def test_wire_bytes_equal_bytes_handed_to_collectives(dist_results, topology):
    n, results = dist_results
    cfg = {"topology": topology, "uplink": "top_k:0.1", "downlink": "identity" if topology == "allgather" else "top_k:0.25"}
    key = repr(sorted(cfg.items()))
    up_fn = {"allgather": "all_gather_into_tensor", "server": "gather", "sharded": "all_to_all_single"}[topology]
    total_down = 0
    for r, res in enumerate(results):
        got = res[key]
        calls = got["collectives"]
        up = sum(b for name, b in calls if name == up_fn)
        assert up == got["ledger"]["uplink_wire_bytes_per_worker"]
        # one uplink collective per step: this model fits one bucket (< 1 MiB) and one piece (< 64 KiB)
        assert sum(1 for name, _ in calls if name == up_fn) == STEPS
        if topology == "server" and r == 0:
            total_down = sum(b for name, b in calls if name == "broadcast")
        if topology == "sharded":
            total_down += sum(b for name, b in calls if name == "all_gather_into_tensor")
        # closed form: top_k bits summed over layers, every step
        bits = sum(_topk_bits(v.numel(), 0.1) for v in got["W"].values()) * STEPS
        assert got["ledger"]["uplink_bits_per_worker"] == bits
    if topology != "allgather":
        assert total_down == results[0][key]["ledger"]["downlink_wire_bytes"]


def _topk_bits(d: int, ratio: float, f: int = 32) -> int:
    import math

    K = math.ceil(ratio * d)
    return min(K * (f + math.ceil(math.log2(d))), f * K + d)


def test_sharded_runs_newton_schulz_only_for_owned_layers(dist_results):
    n, results = dist_results
    key = repr(sorted({"topology": "sharded", "uplink": "identity", "downlink": "identity"}.items()))
    hidden = {name for name, w in results[0][key]["W"].items() if w.ndim == 2}  # gluon: every matrix is spectral
    counts = []
    for res in results:
        owned_matrices = [nm for nm in res[key]["served"] if nm in hidden and "4." not in nm]
        counts.append(res[key]["ns_calls"])
        # the last Linear is the head (sign norm, no NS); other matrices are spectral: one NS call per step each
        assert res[key]["ns_calls"] == STEPS * len(owned_matrices)
    assert sum(counts) == STEPS * len([h for h in hidden if "4." not in h])


def test_compressed_downlink_converges_in_processes(dist_results):
    """server and sharded with compressed uplink AND downlink (W != X) still fit the regression problem."""
    n, results = dist_results
    for cfg in LONG:
        for res in results:
            losses = res[repr(sorted(cfg.items()))]["losses"]
            assert sum(losses[-10:]) / 10 < 0.2 * losses[0], (cfg["topology"], losses[0], losses[-10:])


@pytest.mark.parametrize("topology", ["allgather", "sharded", "server"])
def test_resume_is_bit_identical_in_processes(tmp_path, topology):
    down = "identity" if topology == "allgather" else "top_k:0.3"
    res = check_ok(run_distributed(engine_resume, 2, tmp_path, steps=8, split=3,
                                   cfg={"topology": topology, "uplink": "top_k:0.1", "downlink": down,
                                        "bucket_cap_mb": 1e-4}))  # many overlapped buckets
    for r in res:
        for part in ("X", "W"):
            for k, v in r["full"][part].items():
                assert torch.equal(v, r["resumed"][part][k]), (part, k)
        assert r["full"]["ledger"] == r["resumed"]["ledger"]


@pytest.mark.parametrize("in_backward", [False, True], ids=["after-backward", "in-backward"])
def test_nan_on_one_rank_skips_everywhere(tmp_path, in_backward):
    """Injected after backward (the overlapped send is stale and resynced) or produced by backward itself (the
    overlapped buckets are already sent when the check runs): no state changes anywhere."""
    res = check_ok(run_distributed(engine_nan, 2, tmp_path, cfg={"topology": "sharded", "uplink": "top_k:0.2",
                                                                 "downlink": "top_k:0.5", "bucket_cap_mb": 1e-4},
                                   steps=6, bad_step=2, bad_rank=1, in_backward=in_backward))
    for r, out in enumerate(res):
        assert out["applied"] is False
        assert out["ledger"]["skipped_steps"] == 1 and out["ledger"]["steps"] == 6
        (m0, e0), (m1, e1) = out["before"], out["after"]
        for k in m0:
            assert torch.equal(m0[k], m1[k])
        for part in ("worker", "server", "optimizer"):
            assert repr(e0[part]) == repr(e1[part]), part
        assert any("non-finite" in w for w in out["warned"])
        assert torch.isfinite(torch.tensor(out["loss"]))


def test_mismatched_uplink_raises_on_every_rank(tmp_path):
    t0 = time.monotonic()
    res = run_distributed(engine_mismatch, 2, tmp_path)
    for out in res:
        assert out["error"] is not None and "uplink" in out["error"], out
        assert "top_k:0.1" in out["error"] and "top_k:0.2" in out["error"]
        assert out["seconds"] < 10
    assert time.monotonic() - t0 < 60


PARITY = [  # tiny buckets: several overlapped uplink buckets in every topology
    {"topology": t, "uplink": up, "downlink": down, "fused": fused, "bucket_cap_mb": 1e-4}
    for t, up, down in (("allgather", "top_k:0.1+natural", "identity"), ("server", "top_k:0.1", "top_k:0.25+natural"),
                        ("sharded", "top_k:0.05+natural", "natural"))
    for fused in (True, False)
]
PIECES = [dict(c, _piece_bytes=16) for c in PARITY if c["fused"]]  # every buffer sent in several pieces at once


@pytest.mark.parametrize("topology", ["allgather", "server", "sharded"])
def test_fused_and_per_layer_paths_are_bit_identical(tmp_path, topology):
    """The vectorised path and the per-layer reference send the same bytes in every collective (uplink and
    downlink) and reach the same X and W, bit for bit, in 2 processes; so do buffers sent in many pieces."""
    cfgs = [c for c in PARITY + PIECES if c["topology"] == topology]
    res = check_ok(run_distributed(engine_run, 2, tmp_path, configs=cfgs, steps=5))
    fused, ref, pieces = (repr(sorted(c.items())) for c in cfgs)
    for r in res:
        assert len(r[pieces]["digests"]) > len(r[ref]["digests"])  # the same traffic in more, smaller collectives
        assert r[pieces]["ledger"] == r[ref]["ledger"]
        for part in ("X", "W"):
            for k, v in r[pieces][part].items():
                assert torch.equal(v, r[ref][part][k]), (part, k)
        assert r[fused]["digests"] == r[ref]["digests"] and len(r[fused]["digests"]) >= 5
        assert r[fused]["ledger"] == r[ref]["ledger"]
        for part in ("X", "W"):
            assert r[fused][part].keys() == r[ref][part].keys()
            for k, v in r[fused][part].items():
                assert torch.equal(v, r[ref][part][k]), (part, k)


def test_overlap_sends_during_backward_and_changes_nothing(tmp_path):
    """With overlap the first bucket's uplink collective is issued before backward finishes (before the first
    layer's gradient exists), and training is bit-identical to the step-time sync; gradients clipped after
    backward are caught (the step resyncs with the clipped gradients, with a warning)."""
    steps = 4
    res = check_ok(run_distributed(engine_overlap, 2, tmp_path, steps=steps))
    for r in res:
        on, off = r[repr((True, False))], r[repr((False, False))]
        assert on["overlapping"] and on["n_buckets"] > 1 and not off["overlapping"]
        events = on["events"]
        for start in [i for i, e in enumerate(events) if e == "step"]:  # each step: uplink before the first layer's grad
            step_events = events[start:]
            assert step_events.index("uplink") < step_events.index("first-layer-grad") < step_events.index(
                "backward-done")
        off_events = off["events"]  # without overlap nothing is sent during backward
        assert off_events.index("uplink") > off_events.index("backward-done")
        assert on["timing"]["uplink_seconds"] > 0 and 0 <= on["timing"]["uplink_overlap_fraction"] <= 1
        assert off["timing"]["uplink_overlap_seconds"] == 0
        clipped, clipped_off = r[repr((True, True))], r[repr((False, True))]
        for a, b in ((on, off), (clipped, clipped_off)):
            for part in ("X", "W"):
                for k, v in a[part].items():
                    assert torch.equal(v, b[part][k]), (part, k)
        assert on["ledger"] == off["ledger"]
        assert on["mid_equal"] is True  # a state_dict taken while buckets are in flight holds the committed state
        # clipping after backward: the first step's early send is dropped (and counted), the step resyncs with the
        # clipped gradients, and overlap turns itself off for the rest of the run
        assert any("gradients changed after their bucket was sent" in w for w in clipped["warned"])
        assert clipped["resynced"] == 1 and not clipped["overlapping"]
        extra = clipped["ledger"]["uplink_wire_bytes_per_worker"] - clipped_off["ledger"]["uplink_wire_bytes_per_worker"]
        assert extra == clipped_off["first_uplink_bytes"]  # exactly one step's uplink went out twice
        assert not any("overlap" in w for w in on["warned"])
        assert any(not torch.equal(clipped["W"][k], on["W"][k]) for k in on["W"])  # clipping took effect
