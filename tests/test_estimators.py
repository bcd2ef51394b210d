"""Variance-reduced estimators (docs/algorithm.md §4) against a line-by-line reference, MARINA's p = 1 limit and its
expected bits, partial participation, resume, and bad combinations."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import ef_lightning as efl
from dist_helpers import make_data, make_model, mse
from ef_lightning import compressors as C

N, STEPS, SEED = 3, 10, 4


def _topk_bits(d: int, ratio: float, f: int = 32) -> int:
    K = math.ceil(ratio * d)
    return min(K * (f + math.ceil(math.log2(d))), f * K + d)


def _opt(model, momentum=0.9):
    return efl.build_lmo_optimizer(model, preset="gluon", momentum=momentum, verbose=False)


def _grads(model, batch, order=None):
    model.zero_grad(set_to_none=True)
    mse(model, batch).backward()
    named = dict(model.named_parameters())
    return [named[n].grad.detach().clone() for n in (order or named)]


def _reference(estimator: str, up: str, p: float, data, mu: float = 0.9):
    """ef_lightning.reference (docs/algorithm.md §4 written out) with an identity downlink."""
    from ef_lightning.reference import reference_run

    def grad_fn(model, k, j):
        model.zero_grad(set_to_none=True)
        mse(model, data[k][j]).backward()
        return {name: q.grad.detach().clone() for name, q in model.named_parameters()}

    X, _ = reference_run(lambda: make_model(0), lambda m: _opt(m, momentum=0.0), grad_fn, steps=STEPS, n_workers=N,
                         uplink=up, downlink="identity", momentum=mu, estimator=estimator, p=p, seed=SEED)
    return X


@pytest.mark.parametrize("estimator,up,p", [("marina", "rand_k:0.3:unbiased", 0.3), ("marina", "natural", 0.5),
                                            ("ef21_page", "top_k:0.2", 0.3), ("mvr", "top_k:0.2", None),
                                            ("mvr", "rand_k:0.5:unbiased", None)])
def test_estimators_match_line_by_line_reference(estimator, up, p):
    data = make_data(N, STEPS)
    ref = _reference(estimator, up, p if p is not None else 1.0, data)
    model = make_model(0)
    sim = efl.Simulator(model, _opt(model), n_workers=N, uplink=up, downlink="identity", seed=SEED,
                        estimator=estimator, p=p)
    for k in range(STEPS):
        sim.step(mse, data[k])
    X = sim.server_model()
    for name, q in ref.items():
        torch.testing.assert_close(X[name], q, atol=1e-6, rtol=0)
    assert sim.ledger.summary()["gradient_evaluations_per_worker"] == 2 * STEPS - 1  # the first step needs one


def test_marina_with_p_one_is_uncompressed_data_parallel_gluon():
    data = make_data(N, STEPS)
    ref = make_model(0)
    ref_opt = _opt(ref, momentum=0.0)
    for k in range(STEPS):
        gs = [_grads(ref, b) for b in data[k]]
        for i, q in enumerate(ref.parameters()):
            q.grad = sum(g[i] for g in gs) / N
        ref_opt.step()
    model = make_model(0)
    sim = efl.Simulator(model, _opt(model), n_workers=N, uplink="natural", downlink="identity", estimator="marina",
                        p=1.0)
    for k in range(STEPS):
        sim.step(mse, data[k])
    X = sim.server_model()
    for name, q in ref.named_parameters():
        torch.testing.assert_close(X[name], q.detach(), atol=1e-6, rtol=0)


def test_marina_expected_bits_per_round():
    """E[bits] = p * dense + (1 - p) * compressed, within 4 standard errors of the Bernoulli mean."""
    p, rounds = 0.3, 400
    model = make_model(0)
    sim = efl.Simulator(model, _opt(model), n_workers=2, uplink="rand_k:0.1:unbiased", downlink="identity",
                        estimator="marina", p=p)
    shapes = [q.shape for q in model.parameters()]
    dense = sum(32 * math.prod(s) for s in shapes)
    compressed = sum(32 * math.ceil(0.1 * math.prod(s)) for s in shapes)  # rand_k: f * K (seed shared)
    grads = [[torch.randn(L.shape) for L in sim.layers] for _ in range(2)]  # engine layer order
    for _ in range(rounds):
        sim.apply(grads, grads if sim.needs_previous_gradient else None)
    bits = [r.uplink_bits for r in sim.ledger.records][1:]  # the first round is a forced refresh
    mean = sum(bits) / len(bits)
    expected = p * dense + (1 - p) * compressed
    se = (dense - compressed) * math.sqrt(p * (1 - p) / len(bits))
    assert abs(mean - expected) < 4 * se
    assert set(bits) == {dense, compressed}


def test_partial_participation_keeps_G_the_mean_of_worker_estimates():
    n = 4
    data = make_data(n, 6)
    model = make_model(0)
    sim = efl.Simulator(model, _opt(model), n_workers=n, uplink="top_k:0.3", downlink="identity", participation=0.5)
    for k in range(6):
        before = [copy.deepcopy(w.G) for w in sim.workers]
        losses = sim.step(mse, data[k])
        changed = [j for j in range(n) if any(not torch.equal(before[j][i], sim.workers[j].G[i]) for i in before[j])]
        assert len(changed) == 2 and sum(math.isnan(x) for x in losses) == 2
        assert sorted(changed) == [j for j in range(n) if not math.isnan(losses[j])]
        for i, G in sim.server.G.items():
            torch.testing.assert_close(G, sum(w.G[i] for w in sim.workers) / n, atol=1e-6, rtol=0)
    # closed form: 2 of 4 workers send top_k:0.3 every round, so per worker on average half a message per round
    per_message = sum(_topk_bits(q.numel(), 0.3) for q in model.parameters())
    assert sim.ledger.summary()["uplink_bits_per_worker"] == 6 * round(0.5 * per_message)


@pytest.mark.parametrize("estimator,up", [("mvr", "top_k:0.2"), ("ef21_page", "top_k:0.2"), ("marina", "natural")])
def test_resume_is_bit_identical_with_estimators(estimator, up):
    data = make_data(N, 8)
    model = make_model(0)
    sim = efl.Simulator(model, _opt(model), n_workers=N, uplink=up, downlink="top_k:0.5", estimator=estimator)
    for k in range(8):
        sim.step(mse, data[k])
    m2 = make_model(0)
    s2 = efl.Simulator(m2, _opt(m2), n_workers=N, uplink=up, downlink="top_k:0.5", estimator=estimator)
    for k in range(3):
        s2.step(mse, data[k])
    saved = copy.deepcopy({"m": m2.state_dict(), "s": s2.state_dict()})
    m3 = make_model(5)
    s3 = efl.Simulator(m3, _opt(m3), n_workers=N, uplink=up, downlink="top_k:0.5", estimator=estimator)
    m3.load_state_dict(saved["m"])
    s3.load_state_dict(saved["s"])
    for k in range(3, 8):
        s3.step(mse, data[k])
    for (name, a), b in zip(sim.server_model().items(), s3.server_model().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("kwargs,match", [
    ({"estimator": "marina", "uplink": "top_k:0.1"}, "unbiased"),
    ({"estimator": "marina", "uplink": "natural", "p": 0.0}, "p=0.0"),
    ({"estimator": "ef21_page", "uplink": "top_k:0.1", "p": 1.5}, "p=1.5"),
    ({"estimator": "ef21", "p": 0.5}, "p=0.5"),
    ({"estimator": "storm"}, "storm"),
    ({"participation": 0.0}, "participation"),
])
def test_bad_combinations(kwargs, match):
    model = make_model(0)
    with pytest.raises(ValueError, match=match):
        efl.Simulator(model, _opt(model), n_workers=2, **kwargs)


def test_engine_requires_closure_for_vr_estimators():
    model = make_model(0)
    sim = efl.Simulator(model, _opt(model), n_workers=2, uplink="top_k:0.2", downlink="identity", estimator="mvr")
    grads = [[torch.randn(L.shape) for L in sim.layers] for _ in range(2)]
    sim.apply(grads)
    with pytest.raises(ValueError, match="previous point"):
        sim.apply(grads)


VR_CONFIGS = [
    {"topology": "server", "uplink": "natural", "downlink": "top_k:0.5", "estimator": "marina", "p": 0.4},
    {"topology": "sharded", "uplink": "top_k:0.2", "downlink": "top_k:0.5", "estimator": "ef21_page", "p": 0.3},
    {"topology": "allgather", "uplink": "top_k:0.2", "downlink": "identity", "estimator": "mvr"},
    {"topology": "server", "uplink": "top_k:0.2", "downlink": "identity", "participation": 0.5},
    {"topology": "server", "uplink": "top_k:0.2", "downlink": "top_k:0.5", "estimator": "mvr", "participation": 0.34},
]


def test_estimators_in_processes_match_simulator(tmp_path):
    from dist_helpers import check_ok, engine_vr_run, make_optimizer, run_distributed

    world, steps = 3, 6
    results = check_ok(run_distributed(engine_vr_run, world, tmp_path, configs=VR_CONFIGS, steps=steps))
    for cfg in VR_CONFIGS:
        key = repr(sorted(cfg.items()))
        kw = {k: v for k, v in cfg.items() if k != "topology"}
        model = make_model(0)
        sim = efl.Simulator(model, make_optimizer(model), n_workers=world, **kw)
        data = make_data(world, steps)
        for k in range(steps):
            sim.step(mse, data[k])
        X = sim.server_model()
        for res in results:
            for name, x in res[key]["X"].items():
                torch.testing.assert_close(x, X[name], atol=1e-6, rtol=0, msg=lambda m: f"{cfg}: {m}")
            for name, w in res[key]["W"].items():
                torch.testing.assert_close(w, dict(model.named_parameters())[name].detach(), atol=1e-6, rtol=0)
        if cfg.get("participation"):  # each rank's own ledger: it sent only in the rounds it took part in
            sent = [sum(1 for r in res[key]["records"] if r["uplink_bits"] > 0) for res in results]
            assert sum(sent) == steps * max(1, round(cfg["participation"] * world))
