"""Local steps (``sync_every=H``): H inner steps with the optimizer's own rule, then the compressed, error-corrected
outer sync. References are independent of the engine: DiLoCo written line by line with torch.optim (n model copies,
each with its own inner optimizer; the outer pseudo-gradient averaged by hand; torch.optim.SGD(nesterov=True) as the
outer optimizer), the compressors' closed-form bit counts, and the uninterrupted run for resume."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import ef_lightning as efl
from dist_helpers import (check_ok, engine_hierarchical, engine_nan, engine_resume, engine_run, grad_fn, make_data,
                          make_model, make_optimizer, mse, run_distributed, simulate_nodes, untimed)
from ef_lightning.reference import reference_run
from ef_lightning.config import EF21Config, EF21ConfigError

H = 4
STEPS = 14  # three rounds and half of a fourth: the end is mid-round


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)


INNER = {"adamw": adamw, "gluon": make_optimizer}


def diloco(n: int, steps: int, H: int, inner=make_optimizer, outer_lr: float = 0.7, m: float = 0.9, outer=None,
           fragment: dict[str, int] | None = None):
    """DiLoCo (arXiv 2311.08105, Algorithm 1), line by line: every worker its own copy and inner optimizer; every H
    steps the mean of theta_start - theta_j is the outer gradient; ``outer`` (default Nesterov SGD) steps the global
    model, which every worker copies. ``fragment`` (name -> index): Streaming DiLoCo (arXiv 2501.18512) without
    overlap: fragment f is synchronised after the steps s with (s + 1 + f*H//F) % H == 0, with its own outer
    optimizer, while the others keep training locally. Returns the global model's parameters and each worker's."""
    glob = make_model(0)
    named = dict(glob.named_parameters())
    fragment = fragment or dict.fromkeys(named, 0)
    F = 1 + max(fragment.values())
    outers = [outer(glob)] if outer is not None else [
        torch.optim.SGD([p for k, p in named.items() if fragment[k] == f], lr=outer_lr, momentum=m, nesterov=True)
        for f in range(F)]
    workers = [copy.deepcopy(glob) for _ in range(n)]
    opts = [inner(w) for w in workers]
    data = make_data(n, steps)
    for s in range(steps):
        for j in range(n):
            opts[j].zero_grad()
            mse(workers[j], data[s][j]).backward()
            opts[j].step()
        for f in range(F):
            if (s + 1 + f * H // F) % H:
                continue
            names = [k for k in named if fragment[k] == f]
            ws = [dict(w.named_parameters()) for w in workers]
            for k in names:
                named[k].grad = torch.stack([named[k].detach() - w[k].detach() for w in ws]).mean(0)
            outers[f].step()
            with torch.no_grad():
                for w in ws:
                    for k in names:
                        w[k].copy_(named[k])
    return ({k: v.detach().clone() for k, v in named.items()},
            [{k: v.detach().clone() for k, v in w.named_parameters()} for w in workers])


def simulate(n: int, steps: int, inner=make_optimizer, **cfg):
    model = make_model(0)
    sim = efl.Simulator(model, inner(model), n_workers=n, **cfg)
    data = make_data(n, steps)
    for s in range(steps):
        sim.step(mse, data[s])
    return sim, model


def close(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), atol=atol, rtol=0, msg=k)


def todays_step(n: int, steps: int, uplink: str, downlink: str) -> tuple[dict, dict]:
    """The every-step EF21-Muon step written out line by line (ef_lightning.reference): X and W after ``steps``."""
    return reference_run(lambda: make_model(0),
                         lambda m: efl.build_lmo_optimizer(m, preset="gluon", momentum=0.0, verbose=False),
                         grad_fn(make_data(n, steps)), steps=steps, n_workers=n, uplink=uplink, downlink=downlink,
                         momentum=0.9)


def _topk_bits(d: int, ratio: float, f: int = 32) -> int:
    K = math.ceil(ratio * d)
    return min(K * (f + math.ceil(math.log2(d))), f * K + d)


# ----------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("opts, field", [
    ({"sync_every": 0}, "sync_every"), ({"sync_every": 2.0}, "sync_every"), ({"sync_every": True}, "sync_every"),
    ({"outer": "adam"}, "outer"), ({"outer_lr": 0.0}, "outer_lr"), ({"outer_momentum": 1.0}, "outer_momentum"),
    ({"sync_every": 4, "estimator": "mvr"}, "sync_every"),
    ({"sync_every": 4, "topology": "server", "participation": 0.5}, "sync_every"),
    ({"sync_every": 4, "fragments": 0}, "fragments"), ({"sync_every": 4, "fragments": 5}, "fragments"),
    ({"fragments": 2}, "fragments"), ({"outer": "lmo"}, "outer"), ({"outer_lr": 0.5}, "outer_lr"),
    ({"outer_momentum": 0.5}, "outer_momentum"),
])
def test_bad_local_options_name_the_value_and_the_choices(opts, field):
    with pytest.raises(EF21ConfigError, match="valid") as e:
        EF21Config(**opts)
    assert field in str(e.value)


def test_outer_step_size_defaults():
    assert EF21Config(sync_every=8).outer_step_size == 0.7  # DiLoCo
    assert EF21Config(sync_every=8, outer="lmo").outer_step_size == 8.0  # H inner radii
    assert EF21Config(sync_every=8, outer_lr=0.3).outer_step_size == 0.3


def test_lmo_outer_needs_an_lmo_optimizer():
    model = make_model(0)
    with pytest.raises(ValueError, match="outer='nesterov'"):
        efl.Simulator(model, adamw(model), n_workers=2, sync_every=2, outer="lmo")


def test_more_fragments_than_tensors_is_an_error():
    model = make_model(0)  # 6 tensors
    with pytest.raises(ValueError, match="fragments=8 but the optimizer trains 6"):
        efl.Simulator(model, make_optimizer(model), n_workers=2, sync_every=8, fragments=8)


def test_streaming_fragments_equal_line_by_line_streaming_diloco():
    n, F = 3, 2
    sim, _ = simulate(n, STEPS, uplink="identity", downlink="identity", sync_every=H, fragments=F)
    fragment = {L.name: sim.layer_buckets[L.uid] for L in sim.layers}
    assert sorted(set(fragment.values())) == list(range(F))  # every fragment has a layer, contiguous in order
    assert list(fragment.values()) == sorted(fragment.values())
    X_ref, W_ref = diloco(n, STEPS, H, fragment=fragment)
    close(sim.server_model(), X_ref)
    for j in range(n):
        close(sim.worker_parameters(j), W_ref[j])


def test_streaming_ledger_sends_one_fragment_per_sync():
    n, F, steps = 2, 2, 8
    sim, model = simulate(n, steps, uplink="top_k:0.1", downlink="top_k:0.25", sync_every=H, fragments=F)
    dims = {n_: p.numel() for n_, p in model.named_parameters()}
    frag = {L.name: sim.layer_buckets[L.uid] for L in sim.layers}
    for rec in sim.ledger.records:
        due = [f for f in range(F) if (rec.step + 1 + f * H // F) % H == 0]
        assert rec.synced == bool(due)
        want = sum(_topk_bits(d, 0.1) for k, d in dims.items() if due and frag[k] == due[0])
        assert rec.uplink_bits == want
    assert sim.ledger.summary()["outer_rounds"] == 4  # steps 1, 3, 5, 7: the fragments take turns


# ----------------------------------------------------------------------------------------------- Simulator
@pytest.mark.parametrize("inner", ["adamw", "gluon"])
def test_identity_simulator_equals_line_by_line_diloco(inner):
    n = 3
    X_ref, W_ref = diloco(n, STEPS, H, INNER[inner])
    sim, model = simulate(n, STEPS, INNER[inner], uplink="identity", downlink="identity", sync_every=H)
    close(sim.server_model(), X_ref)
    for j in range(n):  # mid-round: every worker's own parameters
        close(sim.worker_parameters(j), W_ref[j])
    close({k: v.detach() for k, v in model.named_parameters()}, X_ref)  # between steps: the shared W = X here
    s = sim.ledger.summary()
    assert s["steps"] == STEPS and s["outer_rounds"] == STEPS // H


def test_identity_lmo_outer_equals_reference():
    """outer='lmo': X <- X - outer_lr*lr*scale*d(mean delta), here written as a momentum-free LMO optimizer over the
    global model at lr*outer_lr with no weight decay."""
    n, outer_lr = 2, 2.0
    lr = make_optimizer(make_model(0)).param_groups[0]["lr"]
    ref = lambda m: efl.build_lmo_optimizer(m, preset="gluon", lr=lr * outer_lr, momentum=0.0,  # noqa: E731
                                            weight_decay=0.0, verbose=False)
    X_ref, _ = diloco(n, 8, H, make_optimizer, outer=ref)
    sim, _ = simulate(n, 8, uplink="identity", downlink="identity", sync_every=H, outer="lmo", outer_lr=outer_lr)
    close(sim.server_model(), X_ref)


def test_sync_every_one_is_todays_step_bit_for_bit():
    """sync_every=1 is the every-step path (bit for bit with the default), and that path is the line-by-line step."""
    a, ma = simulate(3, 6, uplink="top_k:0.2", downlink="top_k:0.3")
    b, mb = simulate(3, 6, uplink="top_k:0.2", downlink="top_k:0.3", sync_every=1)
    for k, v in a.server_model().items():
        assert torch.equal(v, b.server_model()[k])
    for (k, v), (_, w) in zip(ma.named_parameters(), mb.named_parameters()):
        assert torch.equal(v, w), k
    X_ref, W_ref = todays_step(3, 6, "top_k:0.2", "top_k:0.3")
    close(b.server_model(), X_ref)
    close({k: v.detach() for k, v in mb.named_parameters()}, W_ref)


def test_ledger_counts_bits_per_outer_round_only():
    n, steps = 2, 8
    sim, model = simulate(n, steps, uplink="top_k:0.1", downlink="top_k:0.25", sync_every=H)
    dims = [p.numel() for p in model.parameters()]
    up = sum(_topk_bits(d, 0.1) for d in dims)
    down = sum(_topk_bits(d, 0.25) for d in dims)
    for rec in sim.ledger.records:
        synced = (rec.step + 1) % H == 0
        assert rec.synced == synced
        assert rec.uplink_bits == (up if synced else 0) and rec.downlink_bits == (down if synced else 0)
        assert rec.dense_bytes == 4 * sum(dims)  # what data-parallel training sends every step
    s = sim.ledger.summary()
    assert s["outer_rounds"] == 2 and s["uplink_bits_per_worker"] == 2 * up
    assert s["compression_ratio"] == pytest.approx(steps * 4 * sum(dims) / s["uplink_wire_bytes_per_worker"])
    m = sim.ledger.metrics()
    assert m["comm/uplink_bits"] == up and m["comm/outer_rounds"] == 2


def test_simulator_resume_mid_round_is_bit_identical():
    n, split = 2, 6  # 6 % 4: two inner steps into the second round
    cfg = dict(uplink="top_k:0.2", downlink="top_k:0.3", sync_every=H)
    full, mf = simulate(n, STEPS, **cfg)
    data = make_data(n, STEPS)
    part, mp = simulate(n, split, **cfg)
    state, weights = part.state_dict(), copy.deepcopy(mp.state_dict())
    model = make_model(3)
    model.load_state_dict(weights)
    sim = efl.Simulator(model, make_optimizer(model), n_workers=n, **cfg)
    sim.load_state_dict(state)
    for s in range(split, STEPS):
        sim.step(mse, data[s])
    for k, v in full.server_model().items():
        assert torch.equal(v, sim.server_model()[k]), k
    for j in range(n):
        for k, v in full.worker_parameters(j).items():
            assert torch.equal(v, sim.worker_parameters(j)[k]), k


def test_nonfinite_inner_gradient_skips_that_workers_step_only():
    n = 2
    model = make_model(0)
    sim = efl.Simulator(model, make_optimizer(model), n_workers=n, uplink="top_k:0.2", sync_every=H)
    data = make_data(n, H)
    sim.step(mse, data[0])
    before = [sim.worker_parameters(j) for j in range(n)]
    G_before = [g.clone() for g in sim.workers[0].G.values()]
    bad = [data[1][0], (data[1][1][0] * float("nan"), data[1][1][1])]
    with pytest.warns(RuntimeWarning, match="worker 1"):
        sim.step(mse, bad)
    after = [sim.worker_parameters(j) for j in range(n)]
    assert all(torch.equal(v, after[1][k]) for k, v in before[1].items())  # worker 1 did not move
    assert any(not torch.equal(v, after[0][k]) for k, v in before[0].items())  # worker 0 did
    assert all(torch.equal(a, b) for a, b in zip(G_before, sim.workers[0].G.values()))  # no EF21 state touched
    for s in (2, 3):
        sim.step(mse, data[s])
    assert all(torch.isfinite(x).all() for x in sim.server_model().values())


# ----------------------------------------------------------------------------------------------- processes
TOPOLOGIES = ("sharded", "allgather", "server")
IDENTITY = [{"topology": t, "uplink": "identity", "downlink": "identity", "sync_every": H} for t in TOPOLOGIES]
COMPRESSED = [{"topology": t, "uplink": "top_k:0.2", "downlink": "identity" if t == "allgather" else "top_k:0.3",
               "sync_every": H} for t in TOPOLOGIES]
STREAM = [{"topology": t, "uplink": up, "downlink": "identity" if t == "allgather" else down, "sync_every": H,
           "fragments": 2} for t, up, down in (("sharded", "top_k:0.2", "top_k:0.3"), ("allgather", "identity", ""),
                                               ("server", "top_k:0.2", "identity"))]
ONE = [{"topology": t, "uplink": "top_k:0.2", "downlink": "identity" if t == "allgather" else "top_k:0.3", **extra}
       for t in TOPOLOGIES for extra in ({}, {"sync_every": 1})]


@pytest.fixture(scope="module")
def two_proc(tmp_path_factory):
    return check_ok(run_distributed(engine_run, 2, tmp_path_factory.mktemp("local"),
                                    configs=IDENTITY + COMPRESSED + STREAM + ONE, steps=STEPS))


def _key(cfg: dict) -> str:
    return repr(sorted(cfg.items()))


@pytest.mark.slow
@pytest.mark.parametrize("cfg", IDENTITY, ids=lambda c: c["topology"])
def test_identity_processes_equal_line_by_line_diloco(two_proc, cfg):
    X_ref, W_ref = diloco(2, STEPS, H, make_optimizer)
    for r, res in enumerate(two_proc):
        got = res[_key(cfg)]
        close(got["X"], X_ref)
        close(got["W"], W_ref[r])  # mid-round: each rank's own W_j
        assert got["ledger"]["outer_rounds"] == STEPS // H


@pytest.mark.slow
@pytest.mark.parametrize("cfg", COMPRESSED + STREAM, ids=lambda c: f"{c['topology']}-F{c.get('fragments', 1)}")
def test_compressed_processes_equal_simulator(two_proc, cfg):
    sim, _ = simulate(2, STEPS, **{k: v for k, v in cfg.items() if k != "topology"})
    for r, res in enumerate(two_proc):
        got = res[_key(cfg)]
        close(got["X"], sim.server_model())
        close(got["W"], sim.worker_parameters(r))
        ups = [rec["uplink_bits"] for rec in got["records"]]
        assert ups == [rec.uplink_bits for rec in sim.ledger.records]  # bits only on outer rounds


@pytest.mark.slow
@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_sync_every_one_equals_current_step_in_processes(two_proc, topology):
    a, b = (c for c in ONE if c["topology"] == topology)
    X_ref, W_ref = todays_step(2, STEPS, b["uplink"], b["downlink"])
    for res in two_proc:
        x, y = res[_key(a)], res[_key(b)]
        for part in ("X", "W"):
            for k, v in x[part].items():
                assert torch.equal(v, y[part][k]), (part, k)
        assert untimed(x["records"]) == untimed(y["records"])
        close(y["W"], W_ref)  # ... and the every-step path is the line-by-line step
        for k, v in y["X"].items():  # (each rank's served part of X)
            torch.testing.assert_close(v, X_ref[k], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_nonfinite_inner_gradient_in_processes(tmp_path):
    """A NaN gradient on rank 1 at an inner step: only rank 1's inner step is skipped (rank 0 steps, no error-feedback
    state changes anywhere) and the next sync runs; with on_nonfinite='raise' every rank raises at that step."""
    cfg = {"topology": "sharded", "uplink": "top_k:0.2", "downlink": "top_k:0.3", "sync_every": H}
    res = check_ok(run_distributed(engine_nan, 2, tmp_path / "skip", cfg=cfg, steps=8, bad_step=1, bad_rank=1))
    for r, got in enumerate(res):
        (w0, s0), (w1, s1) = got["before"], got["after"]
        assert got["applied"] is True  # one rank's skipped inner step is not a skipped step (schedules stay aligned)
        assert all(torch.equal(w0[k], w1[k]) for k in w0) is (r == 1)  # rank 1 did not move, rank 0 did
        for k in ("G", "M"):
            assert all(torch.equal(v, s1["worker"][k][n]) for n, v in s0["worker"][k].items())
        assert bool(got["warned"]) is (r == 1)
        assert got["ledger"]["outer_rounds"] == 2 and math.isfinite(got["loss"])
    raised = run_distributed(engine_nan, 2, tmp_path / "raise", cfg={**cfg, "on_nonfinite": "raise"}, steps=8,
                             bad_step=1, bad_rank=1)
    assert all("FloatingPointError" in r["__error__"] for r in raised)  # both ranks, none left waiting


@pytest.mark.slow
def test_engine_resume_mid_round_is_bit_identical(tmp_path):
    cfg = {"topology": "sharded", "uplink": "top_k:0.2", "downlink": "top_k:0.3", "sync_every": H}
    for res in check_ok(run_distributed(engine_resume, 2, tmp_path, cfg=cfg, steps=STEPS, split=6)):
        for part in ("X", "W"):
            for k, v in res["full"][part].items():
                assert torch.equal(v, res["resumed"][part][k]), (part, k)


@pytest.mark.slow
@pytest.mark.parametrize("fragments", [1, 2])
def test_hierarchical_local_steps_equal_simulator_of_nodes(tmp_path, fragments):
    """2 nodes x 2 processes: each node's inner step on its average gradient (dense inside the node), the outer
    sync across nodes (streaming: fragments whose layers are spread over the shares); equals a Simulator with one
    worker per node fed the node's batches; resume mid-round is bit-identical; sync_every=1 is today's hierarchical
    step bit for bit."""
    cfg = {"uplink": "top_k:0.2", "downlink": "top_k:0.3", "sync_every": H, "fragments": fragments}
    steps = 10
    res = check_ok(run_distributed(engine_hierarchical, 4, tmp_path / "h", cfg=cfg, steps=steps,
                                   local_world_size=2, split=6))
    sim, _ = simulate_nodes(cfg, steps)
    for r, got in enumerate(res):
        close(got["X"], sim.server_model())
        close(got["W"], sim.worker_parameters(r // 2))
        for part in ("X", "W"):
            for k, v in got[part].items():
                assert torch.equal(v, got["resumed"][part][k]), (part, k)
    if fragments > 1:
        return
    one = {"uplink": "top_k:0.2", "downlink": "top_k:0.3"}
    a = check_ok(run_distributed(engine_hierarchical, 4, tmp_path / "a", cfg=one, steps=4, local_world_size=2))
    b = check_ok(run_distributed(engine_hierarchical, 4, tmp_path / "b", cfg={**one, "sync_every": 1}, steps=4,
                                 local_world_size=2))
    ref, ref_model = simulate_nodes(one, 4)  # the every-step hierarchical step's reference
    for x, y in zip(a, b):
        for part in ("X", "W"):
            for k, v in x[part].items():
                assert torch.equal(v, y[part][k]), (part, k)
        close(y["X"], ref.server_model())
        close(y["W"], {k: v.detach() for k, v in ref_model.named_parameters()})
