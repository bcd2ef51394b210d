"""EF21-Muon engine: the Simulator against independent references (plain LMO / torch.optim.Muon on averaged
gradients), resume, non-finite handling and the ledger's closed forms."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import ef_lightning as efl
from dist_helpers import grad_fn, make_data, make_model, make_optimizer, mse


def _avg_grad_reference(model: nn.Module, opt: torch.optim.Optimizer, data, steps: int) -> None:
    """Plain data-parallel training: every worker's gradient at the same point, averaged, one optimizer step."""
    params = [p for g in opt.param_groups for p in g["params"]]
    for s in range(steps):
        grads = []
        for batch in data[s]:
            opt.zero_grad(set_to_none=True)
            mse(model, batch).backward()
            grads.append([p.grad.clone() for p in params])
        for i, p in enumerate(params):
            p.grad = sum(g[i] for g in grads) / len(grads)
        opt.step()


def _run_sim(sim: efl.Simulator, data, lo: int, hi: int) -> None:
    for s in range(lo, hi):
        sim.step(mse, data[s])


def test_identity_simulator_equals_data_parallel_lmo():
    steps, n = 20, 2
    data = make_data(n, steps)
    ref = make_model(0)
    _avg_grad_reference(ref, make_optimizer(ref), data, steps)
    model = make_model(0)
    sim = efl.Simulator(model, make_optimizer(model), n_workers=n, uplink="identity", downlink="identity")
    _run_sim(sim, data, 0, steps)
    X = sim.server_model()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(X[name], p.detach(), atol=1e-6, rtol=0)
        torch.testing.assert_close(dict(model.named_parameters())[name].detach(), p.detach(), atol=1e-6, rtol=0)


def test_identity_simulator_equals_torch_muon():
    """spectral_muon + Nesterov + weight decay under EF21 with identity compressors == torch.optim.Muon on the
    averaged gradients (both run Newton-Schulz in bf16, as torch does)."""
    torch.manual_seed(0)
    steps, n = 10, 2
    mk = lambda: nn.Sequential(nn.Linear(16, 32, bias=False), nn.Tanh(), nn.Linear(32, 8, bias=False))
    ref = mk()
    model = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(3)
    data = [[(torch.randn(8, 16, generator=g), torch.randn(8, 8, generator=g)) for _ in range(n)] for _ in range(steps)]
    hp = dict(lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.1)
    muon = torch.optim.Muon(ref.parameters(), **hp)
    _avg_grad_reference(ref, muon, data, steps)
    lmo = efl.LMO([{"params": list(model.parameters()), "norm": "spectral_muon", "ns_dtype": torch.bfloat16}], **hp)
    sim = efl.Simulator(model, lmo, n_workers=n, uplink="identity", downlink="identity")
    _run_sim(sim, data, 0, steps)
    X = sim.server_model()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(X[name], p.detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("uplink,downlink", [("top_k:0.1", "identity"), ("top_k:0.2", "top_k:0.3"),
                                             ("rank:2", "natural"), ("rand_k:0.3:unbiased", "identity")])
def test_resume_is_bit_identical(uplink, downlink):
    steps, split, n = 12, 5, 3
    data = make_data(n, steps)
    model = make_model(0)
    sim = efl.Simulator(model, make_optimizer(model), n_workers=n, uplink=uplink, downlink=downlink, seed=5)
    _run_sim(sim, data, 0, steps)

    model2 = make_model(0)
    sim2 = efl.Simulator(model2, make_optimizer(model2), n_workers=n, uplink=uplink, downlink=downlink, seed=5)
    _run_sim(sim2, data, 0, split)
    saved = copy.deepcopy({"model": model2.state_dict(), "sim": sim2.state_dict()})
    model3 = make_model(9)
    opt3 = make_optimizer(model3)
    sim3 = efl.Simulator(model3, opt3, n_workers=n, uplink=uplink, downlink=downlink, seed=5)
    model3.load_state_dict(saved["model"])
    sim3.load_state_dict(saved["sim"])
    _run_sim(sim3, data, split, steps)
    for (name, a), b in zip(sim.server_model().items(), sim3.server_model().values()):
        assert torch.equal(a, b), name
    for a, b in zip(model.parameters(), model3.parameters()):
        assert torch.equal(a, b)
    assert sim.ledger.summary() == sim3.ledger.summary()


def test_nonfinite_gradient_skips_without_touching_state():
    n, steps = 2, 6
    data = make_data(n, steps)
    model = make_model(0)
    sim = efl.Simulator(model, make_optimizer(model), n_workers=n, uplink="top_k:0.2", downlink="top_k:0.5")
    _run_sim(sim, data, 0, 3)
    before = copy.deepcopy((sim.state_dict(), model.state_dict()))
    bad = copy.deepcopy(data[3])
    bad[1] = (bad[1][0].clone(), bad[1][1].clone())
    bad[1][0][0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        sim.step(mse, bad)
    after = sim.state_dict(), model.state_dict()
    for part in ("workers", "server", "optimizer"):
        assert repr(before[0][part]) == repr(after[0][part])
    for k in before[1]:
        assert torch.equal(before[1][k], after[1][k])
    assert sim.ledger.summary()["skipped_steps"] == 1
    losses = [sim.step(mse, data[s]) for s in range(3, steps)]  # training continues
    assert all(math.isfinite(x) for row in losses for x in row)
    with pytest.raises(FloatingPointError):
        efl.Simulator(model, make_optimizer(model), n_workers=n, uplink="top_k:0.2", downlink="top_k:0.5", on_nonfinite="raise").step(mse, bad)


def _topk_bits(d: int, ratio: float, f: int = 32) -> int:
    K = math.ceil(ratio * d)
    return min(K * (f + math.ceil(math.log2(d))), f * K + d)


def test_ledger_bits_match_closed_forms():
    model = make_model(0)  # Linear(8,32), Linear(32,32), Linear(32,4) + biases
    shapes = [tuple(p.shape) for p in model.parameters()]
    sim = efl.Simulator(model, make_optimizer(model), n_workers=2,
                        uplink={"hidden": "rank:2", "head": "top_k:0.1", "default": "top_k:0.1"},
                        downlink="top_k:0.25")
    data = make_data(2, 2)
    _run_sim(sim, data, 0, 2)
    roles = {L.name: L.role for L in sim.layers}
    expected_up = 0
    for (name, p), shape in zip(model.named_parameters(), shapes):
        d = p.numel()
        if roles[name] == "hidden":
            expected_up += 32 * 2 * (shape[0] + shape[1])  # rank r: f * r * (m + n)
        else:
            expected_up += _topk_bits(d, 0.1)
    expected_down = sum(_topk_bits(p.numel(), 0.25) for p in model.parameters())
    s = sim.ledger.summary()
    assert s["steps"] == 2
    assert s["uplink_bits_per_worker"] == 2 * expected_up
    assert s["downlink_bits"] == 2 * expected_down
    assert s["dense_bytes_per_worker"] == 2 * 4 * sum(p.numel() for p in model.parameters())
    assert s["uplink_wire_bytes_per_worker"] <= 1.25 * s["uplink_bits_per_worker"] / 8 + 64 * len(shapes) * 2


def test_compressed_simulator_converges_with_w_not_x():
    n, steps = 4, 200
    data = make_data(n, steps)
    model = make_model(0)
    sim = efl.Simulator(model, make_optimizer(model), n_workers=n, uplink="top_k:0.25", downlink="top_k:0.5")
    losses = [sum(sim.step(mse, data[s])) / n for s in range(steps)]
    assert sum(losses[-10:]) / 10 < 0.2 * losses[0]
    X = sim.server_model()
    assert any(not torch.equal(X[k], p) for k, p in model.named_parameters())


def test_any_torch_optimizer_gets_G_as_gradient():
    """With AdamW (no worker momentum), identity compression is data-parallel AdamW."""
    n, steps = 2, 8
    data = make_data(n, steps)
    ref = make_model(0)
    _avg_grad_reference(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2), data, steps)
    model = make_model(0)
    sim = efl.Simulator(model, torch.optim.AdamW(model.parameters(), lr=1e-2), n_workers=n, uplink="identity", downlink="identity")
    _run_sim(sim, data, 0, steps)
    for (name, x), p in zip(sim.server_model().items(), ref.parameters()):
        torch.testing.assert_close(x, p.detach(), atol=1e-6, rtol=0)


def test_lr_scheduler_works_unchanged():
    model = make_model(0)
    opt = make_optimizer(model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.0)
    sim = efl.Simulator(model, opt, n_workers=2, uplink="identity", downlink="identity")
    data = make_data(2, 3)
    sim.step(mse, data[0])
    sched.step()  # lr -> 0: X stops moving (weight decay is 0 in this optimizer)
    x1 = sim.server_model()
    sim.step(mse, data[1])
    for k, v in sim.server_model().items():
        assert torch.equal(v, x1[k])


def test_bad_arguments():
    model = make_model(0)
    with pytest.raises(ValueError, match="n_workers"):
        efl.Simulator(model, make_optimizer(model), n_workers=0)
    with pytest.raises(ValueError, match="unknown role"):
        efl.Simulator(model, make_optimizer(model), n_workers=2, uplink={"hiden": "top_k:0.1"})
    with pytest.raises(ValueError, match="on_nonfinite"):
        efl.Simulator(model, make_optimizer(model), n_workers=2, on_nonfinite="ignore")
    with pytest.raises(ValueError, match="batches"):
        efl.Simulator(model, make_optimizer(model), n_workers=2).step(mse, make_data(3, 1)[0])
    with pytest.raises(ValueError, match="topology"):
        efl.EF21Engine(model, make_optimizer(model), topology="ring")


def test_state_is_float32_for_bf16_models():
    model = make_model(0).to(torch.bfloat16)
    sim = efl.Simulator(model, make_optimizer(model), n_workers=2, uplink="top_k:0.3")
    data = [[(x.bfloat16(), y.bfloat16()) for x, y in row] for row in make_data(2, 2)]
    _run_sim(sim, data, 0, 2)
    st = sim.state_dict()
    tensors = [*st["server"]["X"].values(), *st["server"]["G"].values(),
               *(t for w in st["workers"] for part in ("M", "G") for t in w[part].values())]
    assert tensors and all(t.dtype == torch.float32 for t in tensors)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_direct_optimizer_step_is_an_error_while_engine_drives_it():
    """A silent fallback to the plain optimizer (no compressed sync) must be loud (DeepSpeed's Muon once trained
    plain SGD silently)."""
    model = make_model(0)
    opt = make_optimizer(model)
    sim = efl.Simulator(model, opt, n_workers=2)
    mse(model, make_data(1, 1)[0][0]).backward()
    with pytest.raises(RuntimeError, match="drives it.*simulator.step"):
        opt.step()
    sim.detach()
    opt.step()  # handed back: works again, with the optimizer's own momentum
    assert opt.external_momentum is False


def test_engine_makes_optimizer_step_the_ef21_step_and_guards_the_original():
    """One process without a process group: ``optimizer.step()`` is the EF21 step (the 1-worker Simulator's
    trajectory), and the optimizer's original update cannot run behind the engine's back."""
    data = make_data(1, 6)
    ref_model = make_model(0)
    sim = efl.Simulator(ref_model, make_optimizer(ref_model), n_workers=1, uplink="top_k:0.2", downlink="top_k:0.5")
    model = make_model(0)
    opt = make_optimizer(model)
    engine = efl.EF21Engine(model, opt, uplink="top_k:0.2", downlink="top_k:0.5", topology="sharded")
    for batch in data:
        sim.step(mse, batch)
        opt.zero_grad(set_to_none=True)
        mse(model, batch[0]).backward()
        opt.step()
    for name, x in sim.server_model().items():
        assert torch.equal(engine.server_model()[name], x), name
    assert engine.ledger.summary() == sim.ledger.summary()
    mse(model, data[0][0]).backward()
    with pytest.raises(RuntimeError, match="drives it"):
        type(opt).step(opt)  # the class's update, bypassing the instance's routed step
    engine.detach()
    assert "step" not in opt.__dict__
    opt.step()


def test_a_new_engine_takes_the_optimizer_over():
    """Re-running a notebook cell: a second Simulator/engine on the same optimizer replaces the first one's hold
    (the first one's guard used to make every later step an error)."""
    model = make_model(0)
    opt = make_optimizer(model)
    first = efl.Simulator(model, opt, n_workers=2, uplink="identity", downlink="identity")
    second = efl.Simulator(model, opt, n_workers=2, uplink="identity", downlink="identity")
    second.step(mse, make_data(2, 1)[0])  # the first one's guard is gone
    first.detach()  # idempotent for a replaced engine: the second keeps its hold
    mse(model, make_data(1, 1)[0][0]).backward()
    with pytest.raises(RuntimeError, match="drives it"):
        opt.step()
    second.detach()
    del first, second
    opt.step()


@pytest.mark.parametrize("uplink,downlink,nesterov", [("top_k:0.2", "top_k:0.3", True), ("rank:2", "natural", False),
                                                      ("rand_k:0.3:unbiased", "top_k:0.5", True)])
def test_compressed_ef21_matches_line_by_line_reference(uplink, downlink, nesterov):
    """ef_lightning.reference (docs/algorithm.md §2 steps 1-7 written out: worker momentum, compressed uplink and
    downlink, separate X and W) against the Simulator: the independent reference for the compressed path."""
    from ef_lightning.reference import reference_run

    n, steps, mu, seed = 3, 8, 0.9, 11
    data = make_data(n, steps)
    X_ref, W_ref = reference_run(lambda: make_model(0),
                                 lambda m: efl.build_lmo_optimizer(m, preset="gluon", momentum=0.0, verbose=False),
                                 grad_fn(data), steps=steps, n_workers=n, uplink=uplink, downlink=downlink,
                                 momentum=mu, nesterov=nesterov, seed=seed)
    model = make_model(0)
    sim = efl.Simulator(model, efl.build_lmo_optimizer(model, preset="gluon", momentum=mu, nesterov=nesterov,
                                                         verbose=False),
                        n_workers=n, uplink=uplink, downlink=downlink, seed=seed)
    for k in range(steps):
        sim.step(mse, data[k])
    X = sim.server_model()
    for nm, x in X_ref.items():
        torch.testing.assert_close(X[nm], x, atol=1e-6, rtol=0)
    for nm, q in model.named_parameters():
        torch.testing.assert_close(q.detach(), W_ref[nm], atol=1e-6, rtol=0)
    assert any(not torch.equal(X[nm], W_ref[nm]) for nm in X)  # W != X: the downlink really compressed


def test_per_role_compressors_work_with_any_optimizer():
    """Roles come from the model's structure when the optimizer's groups carry none (AdamW)."""
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 16), nn.Linear(16, 50))
    sim = efl.Simulator(model, torch.optim.AdamW(model.parameters()), n_workers=2,
                        uplink={"embedding": "top_k:0.5", "hidden": "rank:2", "head": "top_k:0.1",
                                "default": "identity"})
    roles = {L.name: (L.role, L.up.spec) for L in sim.layers}
    assert roles["0.weight"] == ("embedding", "top_k:0.5")
    assert roles["1.weight"] == ("hidden", "rank:2")
    assert roles["2.weight"] == ("head", "top_k:0.1")
    assert roles["1.bias"] == ("vector", "identity")
