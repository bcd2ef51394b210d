"""Federated benchmark of the compressed-Gluon paper's claim at small scale (docs/algorithm.md §4, arXiv 2604.10689).

Claim under test: compressed Gluon with SARAH/PAGE/MVR variance reduction reaches a target loss with fewer uplink
bits than the compressed baselines without it. Data: scikit-learn's ``load_digits`` (1797 8×8 images, 10 classes,
shipped inside the package, no download). Three models (the paper uses logistic regression and a CIFAR-10 CNN):

* ``logreg``: multinomial logistic regression, ``nn.Linear(64, 10)`` (head: sign norm);
* ``mlp``: ``64 → 64 → 10`` ReLU MLP (hidden spectral, head sign, biases bias_rms: preset ``gluon``);
* ``cnn``: conv 1→8 (3×3) → ReLU → maxpool 2 → conv 8→16 (3×3) → ReLU → maxpool 2 → linear 64→10 on the 8×8
  images (kernels spectral_conv, head sign, biases bias_rms).

Everything runs through :class:`ef_lightning.Simulator` (the algorithms are never re-implemented here); uplink
bits and gradient evaluations are the ledger's (docs/algorithm.md §3), per worker.

Heterogeneity dial (label skew h) and participation: n = 10 workers (one per digit). Each training sample goes to
the worker numbered by its label with probability h, else to a uniformly random worker: h = 0 is IID, h = 1 is one
class per worker. Participation q: each round a seeded subset of round(q·n) workers computes and sends (the
Simulator's ``participation``). Settings (h, q) of the full run: (0, 1), (0.5, 1), (1, 1), (0.5, 0.5).

Methods (uplink ratio r = 0.1; contractive/unbiased pairs send the same number K = ⌈r·d⌉ of values):

=================  ==========  =======================  ==========  ========================================
name               estimator   uplink                   momentum μ  role
=================  ==========  =======================  ==========  ========================================
gluon              ef21        identity                 0.9         uncompressed reference (defines target)
ef21_muon          ef21        top_k:r                  0.9         EF21-Muon baseline (arXiv 2510.00643)
ef21_randk         ef21        rand_k:r:unbiased        0.9         EF21-Muon with MARINA's compressor
marina             marina      rand_k:r:unbiased        (unused)    MARINA-Gluon (unbiased Q, shared coin p)
ef21_page          ef21_page   top_k:r                  (unused)    EF21 on a PAGE/SARAH estimator
mvr                mvr         top_k:r                  0.9         MVR/STORM-Gluon, a = 1 − μ = 0.1
=================  ==========  =======================  ==========  ========================================

p of marina/ef21_page is the engine's default bits(Q)/bits(dense) (MARINA, arXiv 2102.07845 Cor. 2.1).

Two arms per method:

* ``tuned``: the LMO ``lr`` (radius = lr × the preset's per-role scale: hidden/conv/bias 50, head 3000) picked per
  (model, setting, method) from ``radius_grid`` (5 log-spaced values, factor 2) on a separate TUNING seed (its own
  data split, shards, minibatches, initialisation and compressor seeds): the lr with the smallest held-out loss
  averaged over the run's evaluations (area under the held-out loss curve). The reported seeds are never used to
  choose. A choice at the edge of the grid is flagged (``radius_at_grid_edge``).
* ``adaptive`` (gluon and each estimator: gluon, ef21_muon, marina, ef21_page, mvr): Gluon's radius
  t_i = ‖G_i‖_* / (L0_i + L1_i·‖G_i‖_*) per layer, (L0, L1) from :func:`ef_lightning.smoothness.estimate_smoothness`
  (once per model, on the tuning seed: a short uncompressed trajectory on pooled minibatches) passed through
  :func:`ef_lightning.smoothness.smoothness_overrides` to ``build_lmo_optimizer(overrides=...)``; no tuning.

Target: per (model, setting, seed), the training loss (at the server model X, over the whole training set) that
the tuned uncompressed ``gluon`` reaches after ``target_frac`` of its budget (every method has the same step
budget, i.e. 1/target_frac = 4× gluon's steps-to-target). Bits-to-target / grad-evals-to-target: the ledger's
cumulative uplink bits / gradient evaluations per worker at the first evaluation at or below the target (null if
never within the budget). Medians over seeds count a missed seed as +inf (null when half or more missed).

Time on a link: one time unit = one gradient evaluation of one worker (minibatch ``batch``); the link carries a
dense fp32 gradient (32·d bits) in ``link_ratio`` units (default 1: communication of a dense step costs as much as
one gradient evaluation). time-to-target = grad_evals_to_target + bits_to_target · link_ratio / (32·d). The
measured gradient-evaluation time on the machine that ran it converts this to a bit rate (meta).

Before any run, every (estimator, compressor) of the table and the adaptive radius are checked against the
line-by-line reference :func:`ef_lightning.reference.reference_run` on each model (a broken estimator stops the run).

Run::

    python benchmarks/federated.py                 # full: < 30 min on 2 CPU cores, writes results + docs section
    python benchmarks/federated.py --smoke         # < 1 min; writes federated_smoke*.{json,png}, no docs
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import multiprocessing as mp
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, environment, write_json

from ef_lightning import Simulator, build_lmo_optimizer
from ef_lightning.reference import reference_run
from ef_lightning.smoothness import estimate_smoothness, smoothness_overrides

MODELS = ("logreg", "mlp", "cnn")
DOC_BEGIN, DOC_END = "<!-- federated:begin (generated by benchmarks/federated.py) -->", "<!-- federated:end -->"
VR = ("marina", "ef21_page", "mvr")
BASELINES = ("ef21_muon", "ef21_randk")
ADAPTIVE = ("gluon", "ef21_muon", "marina", "ef21_page", "mvr")  # gluon and one arm per estimator


@dataclasses.dataclass
class Config:
    """Budgets, grids and seeds of one benchmark run (stored in the meta JSON)."""

    n_workers: int = 10
    batch: int = 16  # samples per worker per step
    steps: int = 120  # optimizer steps per run (same for every method)
    eval_every: int = 10
    ratio: float = 0.1  # uplink K = ceil(ratio * d) values per tensor
    momentum: float = 0.9  # μ of gluon / ef21_muon / ef21_randk / mvr (mvr: a = 1 - μ)
    target_frac: float = 0.25
    test_frac: float = 0.2
    radius_grid: tuple[float, ...] = (2.0**-12, 2.0**-11, 2.0**-10, 2.0**-9, 2.0**-8)
    seeds: tuple[int, ...] = (0, 1, 2)
    tuning_seed: int = 100
    settings: tuple[tuple[float, float], ...] = ((0.0, 1.0), (0.5, 1.0), (1.0, 1.0), (0.5, 0.5))
    models: tuple[str, ...] = MODELS
    smooth_steps: int = 40  # trajectory length of estimate_smoothness
    smooth_lr: float = 2.0**-10
    link_ratio: float = 1.0  # dense fp32 gradient transfer time / one gradient evaluation
    processes: int = 2


SMOKE = Config(
    steps=8,
    eval_every=4,
    radius_grid=(2.0**-11, 2.0**-9),
    seeds=(3,),
    settings=((0.0, 1.0), (1.0, 0.5)),
    smooth_steps=4,
)


def methods(cfg: Config) -> dict[str, dict[str, Any]]:
    """The compared methods (module docstring table)."""
    topk, randk = f"top_k:{cfg.ratio:g}", f"rand_k:{cfg.ratio:g}:unbiased"
    return {
        "gluon": {"estimator": "ef21", "uplink": "identity", "momentum": cfg.momentum},
        "ef21_muon": {"estimator": "ef21", "uplink": topk, "momentum": cfg.momentum},
        "ef21_randk": {"estimator": "ef21", "uplink": randk, "momentum": cfg.momentum},
        "marina": {"estimator": "marina", "uplink": randk, "momentum": 0.0},
        "ef21_page": {"estimator": "ef21_page", "uplink": topk, "momentum": 0.0},
        "mvr": {"estimator": "mvr", "uplink": topk, "momentum": cfg.momentum},
    }


# ------------------------------------------------------------------------------------------------------ data
@dataclasses.dataclass
class Data:
    """Digits, features in [0, 1]; ``shards[j]`` = worker j's indices into the training set."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    shards: list[torch.Tensor]


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target, dtype=torch.long)


@functools.lru_cache(maxsize=16)
def load_data(n_workers: int, test_frac: float, seed: int, skew: float) -> Data:
    """Seeded train/test split; sample i goes to worker ``y_i % n`` with probability ``skew``, else a random one."""
    x, y = _digits()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = round(test_frac * len(y))
    test, train = perm[:n_test], perm[n_test:]
    g = torch.Generator().manual_seed(seed * 7919 + 17)
    own = torch.rand(len(train), generator=g) < skew
    rnd = torch.randint(n_workers, (len(train),), generator=g)
    owner = torch.where(own, y[train] % n_workers, rnd)
    shards = [torch.nonzero(owner == j).flatten() for j in range(n_workers)]
    return Data(x[train], y[train], x[test], y[test], shards)


def batches_for(data: Data, batch: int, seed: int, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Worker j's minibatch at ``step``: ``batch`` indices drawn with replacement from its shard."""
    out = []
    for j, shard in enumerate(data.shards):
        g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + j)  # one stream per (seed, step, j)
        idx = shard[torch.randint(len(shard), (batch,), generator=g)]
        out.append((data.x_train[idx], data.y_train[idx]))
    return out


def build_model(model: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if model == "logreg":
        return nn.Sequential(nn.Linear(64, 10))
    if model == "mlp":
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    if model == "cnn":
        return nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64, 10),
        )
    raise ValueError(f"model={model!r}; valid choices: {', '.join(MODELS)}")


def n_params(model: str) -> int:
    return sum(p.numel() for p in build_model(model, 0).parameters())


def ce_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


@torch.no_grad()
def evaluate(
    model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` with ``params`` (the server's X) on (x, y)."""
    logits = torch.func.functional_call(model, params, (x,))
    return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def make_optimizer(
    model: nn.Module, lr: float | str, momentum: float, overrides: dict | None, extra: dict | None = None
) -> torch.optim.Optimizer:
    """The server's LMO: preset gluon at ``lr``, or the adaptive radius from the package's smoothness overrides."""
    if lr == "adaptive":
        return build_lmo_optimizer(
            model, "gluon", momentum=momentum, overrides={**overrides, **(extra or {})}, verbose=False
        )
    return build_lmo_optimizer(model, "gluon", lr=float(lr), momentum=momentum, overrides=extra, verbose=False)


# ------------------------------------------------------------------------------------------------------ checks
def check_estimators(cfg: Config, overrides: dict[str, dict], steps: int = 4, n: int = 3) -> dict[str, float]:
    """Simulator vs :func:`ef_lightning.reference.reference_run` for every method and the adaptive radius.

    Each model, each method of the table (its estimator, compressor, momentum and the engine's p), and mvr/marina
    with the adaptive radius: ``steps`` steps on ``n`` workers with digits minibatches; raises if X differs by more
    than 1e-5 (cnn: 1e-4). Returns the largest deviation per check.

    The cnn is checked with its head on the spectral norm instead of sign: its head sees features that are dead
    (exactly 0) for a whole minibatch, so the true aggregate is 0 there and the two implementations hold different
    rounding residues (summation order); the sign LMO maps ±1e-10 to a full ±t step, so X could differ by 2t in
    a correct run. The estimators are layer-agnostic; logreg and mlp check them with the sign head."""
    data = load_data(n, cfg.test_frac, 0, 1.0)
    batches = [batches_for(data, 8, 0, k) for k in range(steps)]

    def grad_fn(m: nn.Module, k: int, j: int) -> dict[str, torch.Tensor]:
        m.zero_grad(set_to_none=True)
        ce_loss(m, batches[k][j]).backward()
        return {nm: q.grad.detach().clone() for nm, q in m.named_parameters()}

    ms = methods(cfg)
    cases = [(m, s, cfg.radius_grid[len(cfg.radius_grid) // 2]) for m, s in ms.items()]
    cases += [(m, ms[m], "adaptive") for m in ("marina", "mvr")]
    devs = {}
    for model_name in cfg.models:
        ov = overrides[model_name]
        ex = {"8.weight": {"norm": "spectral"}} if model_name == "cnn" else None
        tol = 1e-4 if model_name == "cnn" else 1e-5  # Newton–Schulz on the kernels amplifies rounding residues
        for name, spec, lr in cases:
            model = build_model(model_name, 0)
            sim = Simulator(
                model,
                make_optimizer(model, lr, spec["momentum"], ov, ex),
                n_workers=n,
                uplink=spec["uplink"],
                downlink="identity",
                estimator=spec["estimator"],
                seed=5,
            )
            for b in batches:
                sim.step(ce_loss, b)
            X, _ = reference_run(
                lambda mn=model_name: build_model(mn, 0),
                lambda m, lr=lr, ov=ov, ex=ex: make_optimizer(m, lr, 0.0, ov, ex),
                grad_fn,
                steps=steps,
                n_workers=n,
                uplink=spec["uplink"],
                downlink="identity",
                momentum=spec["momentum"],
                estimator=spec["estimator"],
                p=sim.p if sim.p is not None else 1.0,
                seed=5,
            )
            got = sim.server_model()
            dev = max(float((got[k] - v).abs().max()) for k, v in X.items())
            key = f"{model_name}/{name}/{'adaptive' if lr == 'adaptive' else 'lr'}"
            devs[key] = dev
            if not dev <= tol:
                raise RuntimeError(f"{key}: Simulator deviates from ef_lightning.reference by {dev:.3g} (> {tol})")
    return devs


def smoothness(cfg: Config, model_name: str) -> dict[str, Any]:
    """(L0, L1) per layer from the package's estimate_smoothness (tuning seed, pooled IID minibatches)."""
    data = load_data(cfg.n_workers, cfg.test_frac, cfg.tuning_seed, 0.0)
    g = torch.Generator().manual_seed(cfg.tuning_seed)
    bs = cfg.batch * cfg.n_workers
    batches = [
        (data.x_train[i], data.y_train[i])
        for i in (torch.randint(len(data.y_train), (bs,), generator=g) for _ in range(cfg.smooth_steps))
    ]
    model = build_model(model_name, cfg.tuning_seed)
    opt = build_lmo_optimizer(model, "gluon", lr=cfg.smooth_lr, momentum=0.0, verbose=False)
    est = estimate_smoothness(model, opt, ce_loss, batches, steps=cfg.smooth_steps)
    return {"estimate": {k: list(v) for k, v in est.items()}, "overrides": smoothness_overrides(est)}


def grad_eval_ms(model_name: str, batch: int, reps: int = 30) -> float:
    """Median wall time (ms) of one forward+backward on ``batch`` samples (converts link_ratio to a bit rate)."""
    model = build_model(model_name, 0)
    x, y = _digits()
    b = (x[:batch], y[:batch])
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        model.zero_grad()
        ce_loss(model, b).backward()
        ts.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(ts))


# ------------------------------------------------------------------------------------------------------ one run
def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One (model, setting, method, lr or 'adaptive', seed) run; curve of [step, bits, grad evals, train, held-out]."""
    cfg: Config = job["cfg"]
    spec = methods(cfg)[job["method"]]
    data = load_data(cfg.n_workers, cfg.test_frac, job["seed"], job["skew"])
    model = build_model(job["model"], job["seed"])
    opt = make_optimizer(model, job["lr"], spec["momentum"], job["overrides"])
    part = None if job["participation"] >= 1 else job["participation"]
    sim = Simulator(
        model,
        opt,
        n_workers=cfg.n_workers,
        uplink=spec["uplink"],
        downlink="identity",
        estimator=spec["estimator"],
        participation=part,
        seed=job["seed"],
    )
    curve: list[list[float]] = []

    def record(step: int) -> bool:
        X = sim.server_model()
        train, _ = evaluate(model, X, data.x_train, data.y_train)
        held, _ = evaluate(model, X, data.x_test, data.y_test)
        s = sim.ledger.summary() if sim.ledger.records else {}
        curve.append(
            [
                step,
                int(s.get("uplink_bits_per_worker", 0)),
                int(s.get("gradient_evaluations_per_worker", 0)),
                train,
                held,
            ]
        )
        return math.isfinite(train) and train < 1e3

    t0 = time.perf_counter()
    ok = record(0)
    for step in range(1, cfg.steps + 1):
        if not ok:
            break  # diverged: the rest of the budget cannot reach a target
        sim.step(ce_loss, batches_for(data, cfg.batch, job["seed"], step))
        if step % cfg.eval_every == 0 or step == cfg.steps:
            ok = record(step)
    X = sim.server_model()
    _, acc = evaluate(model, X, data.x_test, data.y_test)
    return {
        **{k: v for k, v in job.items() if k not in ("cfg", "overrides")},
        "p": sim.p,
        "curve": curve,
        "diverged": not ok,
        "test_accuracy": acc,
        "seconds": time.perf_counter() - t0,
    }


def tuning_score(curve: Sequence[Sequence[float]], steps: int) -> float:
    """Mean held-out loss over the evaluations (area under the curve); +inf when the run diverged."""
    if curve[-1][0] < steps:
        return math.inf
    vals = [c[4] for c in curve]
    return float(np.mean(vals)) if all(math.isfinite(v) for v in vals) else math.inf


def first_hit(curve: Sequence[Sequence[float]], target: float) -> Sequence[float] | None:
    """The first evaluation at or below ``target`` (None: never)."""
    return next((c for c in curve if c[3] <= target), None)


def target_loss(curve: Sequence[Sequence[float]], steps: int, frac: float) -> float:
    """The reference run's train loss at the first evaluation at or after ``frac * steps``."""
    return next(c[3] for c in curve if c[0] >= frac * steps)


def time_on_link(grad_evals: float, bits: float, d: int, link_ratio: float, participation: float) -> float:
    """Time units (one gradient evaluation = 1) to compute ``grad_evals`` and send ``bits`` on the stated link.

    The ledger counts gradient evaluations per participating worker and round, and uplink bits averaged over all
    n workers; a round's participant sends bits/participation, so the link time is that over the link rate."""
    return grad_evals + bits / participation * link_ratio / (32 * d)


def derive(rec: dict[str, Any], d: int, link_ratio: float) -> dict[str, Any]:
    """Fill the to-target fields of a record from its per-seed curves and targets (medians over seeds)."""
    hits = [first_hit(c, t) for c, t in zip(rec["curves"], rec["targets"])]
    bits = [None if c is None else c[1] for c in hits]
    gev = [None if c is None else c[2] for c in hits]
    tol = [None if c is None else time_on_link(c[2], c[1], d, link_ratio, rec["participation"]) for c in hits]
    rec.update(
        {
            "bits_to_target": _median(bits),
            "grad_evals_to_target": _median(gev),
            "time_on_link_to_target": _median(tol),
            "reached": sum(b is not None for b in bits),
            "bits_to_target_per_seed": bits,
            "grad_evals_to_target_per_seed": gev,
            "time_on_link_to_target_per_seed": tol,
        }
    )
    return rec


def _median(xs: Sequence[float | None]) -> float | None:
    med = float(np.median([math.inf if x is None else x for x in xs]))
    return None if math.isinf(med) else med


# ------------------------------------------------------------------------------------------------------ driver
def _cost(job: dict[str, Any]) -> float:
    base = {"logreg": 1.0, "mlp": 2.0, "cnn": 4.5}[job["model"]]
    return base * (1.7 if methods(job["cfg"])[job["method"]]["estimator"] != "ef21" else 1.0) * job["participation"]


def _pool_map(jobs: list[dict[str, Any]], processes: int, desc: str, progress: bool) -> list[dict[str, Any]]:
    from tqdm import tqdm

    jobs = sorted(jobs, key=_cost, reverse=True)  # longest first: balances the pool
    if processes > 1:
        pool = mp.get_context("fork").Pool(processes, initializer=torch.set_num_threads, initargs=(1,))
        it = pool.imap_unordered(run_one, jobs)
    else:
        pool, it = None, map(run_one, jobs)
    out = list(tqdm(it, total=len(jobs), desc=desc, file=sys.stderr, disable=not progress))
    if pool is not None:
        pool.close()
        pool.join()
    return out


def run(cfg: Config, progress: bool = True) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Reference check, smoothness estimates, tuning + adaptive runs, then the tuned runs on the reported seeds."""
    t0 = time.perf_counter()
    smooth = {m: smoothness(cfg, m) for m in cfg.models}
    checks = check_estimators(cfg, {m: s["overrides"] for m, s in smooth.items()})
    ms = methods(cfg)
    common = [
        {"cfg": cfg, "model": m, "skew": h, "participation": q, "overrides": smooth[m]["overrides"]}
        for m in cfg.models
        for h, q in cfg.settings
    ]
    jobs = [
        dict(c, method=name, lr=lr, seed=cfg.tuning_seed, kind="tune")
        for c in common
        for name in ms
        for lr in cfg.radius_grid
    ]
    jobs += [
        dict(c, method=name, lr="adaptive", seed=s, kind="adaptive")
        for c in common
        for name in ADAPTIVE
        for s in cfg.seeds
    ]
    phase1 = _pool_map(jobs, cfg.processes, "tuning + adaptive", progress)
    key = lambda r: (r["model"], r["skew"], r["participation"], r["method"])  # noqa: E731
    scores: dict[tuple, dict[float, float]] = {}
    for r in phase1:
        if r["kind"] == "tune":
            scores.setdefault(key(r), {})[r["lr"]] = tuning_score(r["curve"], cfg.steps)
    chosen = {k: min(sorted(v), key=lambda lr: (v[lr], lr)) for k, v in scores.items()}
    jobs = [
        dict(c, method=name, lr=chosen[(c["model"], c["skew"], c["participation"], name)], seed=s, kind="tuned")
        for c in common
        for name in ms
        for s in cfg.seeds
    ]
    phase2 = _pool_map(jobs, cfg.processes, "tuned runs", progress)
    runs = [r for r in phase1 + phase2 if r["kind"] != "tune"]
    records = make_records(cfg, runs, scores, chosen)
    meta = {
        "config": dataclasses.asdict(cfg),
        "methods": ms,
        "smoothness": smooth,
        "reference_check": checks,
        "grad_eval_ms": {m: grad_eval_ms(m, cfg.batch) for m in cfg.models},
        "n_params": {m: n_params(m) for m in cfg.models},
        "definitions": {
            "radius": "LMO lr; per-layer radius = lr x preset gluon scale (hidden/conv/bias 50, head 3000)",
            "tuning": f"per (model, setting, method): lr in radius_grid minimising the mean held-out loss over "
            f"the evaluations of one run on tuning seed {cfg.tuning_seed}",
            "target": f"tuned uncompressed gluon's train loss at step >= {cfg.target_frac} x steps, per seed",
            "time_on_link": "grad_evals + bits / participation * link_ratio / (32 d), unit = one gradient "
            "evaluation (ledger: grad evals per participant, bits averaged over n)",
            "median": "over seeds, a missed seed counting as +inf (null when half or more missed)",
        },
        "seconds": time.perf_counter() - t0,
    }
    meta["link_bits_per_second"] = {  # the stated link as a bit rate on this machine
        m: 32 * meta["n_params"][m] / cfg.link_ratio / (meta["grad_eval_ms"][m] / 1e3) for m in cfg.models
    }
    return records, meta


def make_records(cfg: Config, runs: list[dict[str, Any]], scores: dict, chosen: dict) -> list[dict[str, Any]]:
    """One record per (model, heterogeneity, participation, method, arm) with per-seed and median results."""
    ms = methods(cfg)
    by: dict[tuple, dict[int, dict[str, Any]]] = {}
    for r in runs:
        by.setdefault((r["model"], r["skew"], r["participation"], r["method"], r["kind"]), {})[r["seed"]] = r
    records = []
    for m in cfg.models:
        d = n_params(m)
        for h, q in cfg.settings:
            targets = {
                s: target_loss(by[(m, h, q, "gluon", "tuned")][s]["curve"], cfg.steps, cfg.target_frac)
                for s in cfg.seeds
            }
            for name, spec in ms.items():
                for arm in ("tuned", "adaptive"):
                    rs = by.get((m, h, q, name, arm))
                    if rs is None:
                        continue
                    rec = {
                        "model": m,
                        "heterogeneity": h,
                        "participation": q,
                        "method": name,
                        "estimator": spec["estimator"],
                        "uplink": spec["uplink"],
                        "momentum": spec["momentum"],
                        "arm": arm,
                        "radius_grid": list(cfg.radius_grid),
                        "radius": chosen[(m, h, q, name)] if arm == "tuned" else "adaptive",
                        "seeds": list(cfg.seeds),
                        "p": rs[cfg.seeds[0]]["p"],
                        "targets": [targets[s] for s in cfg.seeds],
                        "final_train_loss": float(np.median([rs[s]["curve"][-1][3] for s in cfg.seeds])),
                        "test_accuracy": float(np.median([rs[s]["test_accuracy"] for s in cfg.seeds])),
                        "diverged": sum(rs[s]["diverged"] for s in cfg.seeds),
                        "curves": [rs[s]["curve"] for s in cfg.seeds],
                        "curve_fields": [
                            "step",
                            "uplink_bits_per_worker",
                            "gradient_evaluations_per_worker",
                            "train_loss",
                            "heldout_loss",
                        ],
                    }
                    derive(rec, d, cfg.link_ratio)
                    if arm == "tuned":
                        sc = scores[(m, h, q, name)]
                        rec["tuning_seed"] = cfg.tuning_seed
                        rec["tuning_scores"] = {f"{lr:g}": (None if math.isinf(v) else v) for lr, v in sc.items()}
                        rec["radius_at_grid_edge"] = rec["radius"] in (min(cfg.radius_grid), max(cfg.radius_grid))
                    records.append(rec)
    return records


# ------------------------------------------------------------------------------------------------------ verdicts
def verdicts(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, setting): best VR vs best compressed baseline (tuned arm) on bits and on time; adaptive arm too."""
    out = []
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(_key(r), []).append(r)
    for (m, h, q), rs in groups.items():
        v = {"model": m, "heterogeneity": h, "participation": q}
        for arm in ("tuned", "adaptive"):
            for metric in ("bits_to_target", "time_on_link_to_target"):

                def best(names: Sequence[str], arm: str = arm, metric: str = metric, rs: list = rs) -> tuple:
                    c = [
                        (r[metric], r["method"])
                        for r in rs
                        if r["arm"] == arm and r["method"] in names and r[metric] is not None
                    ]
                    return (min(c)[1], min(c)[0]) if c else (None, math.inf)

                vn, vb = best(VR)
                bn, bb = best(BASELINES)
                comp = [
                    (r[metric], r["method"], r["arm"]) for r in rs if r["method"] != "gluon" and r[metric] is not None
                ]
                win = min(comp) if comp else None
                v[f"{arm}/{metric}"] = {
                    "best_vr": vn,
                    "best_vr_value": None if math.isinf(vb) else vb,
                    "best_baseline": bn,
                    "best_baseline_value": None if math.isinf(bb) else bb,
                    "claim_holds": bool(vb < bb),
                    "ratio": (bb / vb) if math.isfinite(bb) and 0 < vb < math.inf else None,
                }
                if arm == "tuned":
                    v[f"winner/{metric}"] = None if win is None else {"method": win[1], "arm": win[2], "value": win[0]}
        out.append(v)
    return out


def _kb(b: float | None) -> str:
    return "—" if b is None else f"{b / 8e3:,.1f} kB"


def _t(x: float | None) -> str:
    return "—" if x is None else f"{x:,.0f}"


def _setting(h: float, q: float) -> str:
    return f"h={h:g}, q={q:g}"


def _key(r: dict[str, Any]) -> tuple[str, float, float]:
    """(model, heterogeneity, participation) of a record or verdict."""
    return r["model"], r["heterogeneity"], r["participation"]


def _tuned(records: list[dict[str, Any]], key: tuple[str, float, float], method: str) -> dict[str, Any]:
    """The tuned-arm record of ``method`` in the setting ``key``."""
    return next(r for r in records if _key(r) == key and r["method"] == method and r["arm"] == "tuned")


def markdown(records: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The docs/benchmarks.md section: setup, headline table, per-setting tables, recommendation."""
    cfg = meta["config"]
    vs = verdicts(records)
    grid = ", ".join(f"2^{round(math.log2(x))}" for x in cfg["radius_grid"])
    lines = [
        DOC_BEGIN,
        "",
        "## Federated benchmark: compressed Gluon with variance reduction (arXiv 2604.10689)",
        "",
        f"Command: `{meta['command']}` ({meta['wall']}, {meta['environment']['date']}, "
        f"{meta['environment']['cpu']}, {cfg['processes']} processes). "
        f"Data: scikit-learn `load_digits` (offline), {cfg['n_workers']} workers, minibatch {cfg['batch']} per "
        f"worker, {cfg['steps']} steps per run, uplink ratio r = {cfg['ratio']}. Models: `logreg` (64→10), "
        "`mlp` (64→64→10), `cnn` (two 3×3 conv layers 8 and 16 channels with 2×2 max-pooling, linear head). "
        "Heterogeneity h: each training sample goes to the worker of its label with probability h, else to a "
        "random worker (h = 0 IID, h = 1 one class per worker); participation q: round(q·n) seeded workers per "
        "round. Settings (h, q): " + ", ".join(f"({h:g}, {q:g})" for h, q in cfg["settings"]) + ".",
        "",
        f"**Tuning.** Per (model, setting, method) the LMO lr (radius = lr × preset scale: 50 hidden/conv/bias, "
        f"3000 head) is chosen from {{{grid}}} on a separate tuning seed ({cfg['tuning_seed']}: own split, "
        "shards, minibatches, init and compressor seeds) by the smallest mean held-out loss over the run. "
        f"Reported seeds: {cfg['seeds']}; the tuning seed is never reported. **Adaptive arm**: Gluon's "
        "t = ‖G‖_*/(L0 + L1‖G‖_*) per layer with (L0, L1) from `estimate_smoothness` "
        f"({cfg['smooth_steps']} uncompressed steps on pooled minibatches, tuning seed) via "
        "`smoothness_overrides`; no tuning. Every estimator and the adaptive radius were checked against "
        "`ef_lightning.reference.reference_run` on each model before the runs (largest deviation "
        f"{max(meta['reference_check'].values()):.1e}).",
        "",
        f"**Target**: the tuned uncompressed `gluon`'s training loss after {cfg['target_frac']:.0%} of its steps "
        "(per seed), so every method has 4× gluon's steps-to-target. Bits and gradient evaluations are the "
        "ledger's, per worker, at the first evaluation at or below the target; medians over seeds (a miss "
        "counts as +∞; — when half or more missed). **Time on a link**: unit = one gradient evaluation; the link "
        f"sends a dense fp32 gradient in {cfg['link_ratio']:g} unit(s): time = grad evals + (bits/q)·"
        f"{cfg['link_ratio']:g}/(32·d) (the ledger counts gradient evaluations per participant and round, "
        "bits averaged over all n workers; a participant sends bits/q). On the machine that ran it a gradient "
        "evaluation took "
        + ", ".join(f"{m} {meta['grad_eval_ms'][m]:.2f} ms" for m in cfg["models"])
        + ", i.e. a link of "
        + ", ".join(f"{m} {meta['link_bits_per_second'][m] / 1e6:.1f} Mbit/s" for m in cfg["models"])
        + ".",
        "",
        "### Headline: does the best VR method beat the best compressed baseline? (tuned radii)",
        "",
        "Best VR = best of marina / ef21_page / mvr; best baseline = best of ef21_muon / ef21_randk; winner = "
        "best compressed method over both arms. Ratio = baseline / VR (> 1: VR needs less).",
        "",
        "| model | setting | winner on bits | best VR vs best baseline, bits | claim (bits) | "
        "winner on time | best VR vs best baseline, time | claim (time) | adaptive arm: claim (bits) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(x: dict, fmt) -> str:
        r = "" if x["ratio"] is None else f" ({x['ratio']:.2f}×)"
        return (
            f"{x['best_vr'] or 'none'} {fmt(x['best_vr_value'])} vs {x['best_baseline'] or 'none'} "
            f"{fmt(x['best_baseline_value'])}{r}"
        )

    def win(w: dict | None, fmt) -> str:
        return "none reached" if w is None else f"{w['method']} ({w['arm']}) {fmt(w['value'])}"

    for v in vs:
        b, t, a = v["tuned/bits_to_target"], v["tuned/time_on_link_to_target"], v["adaptive/bits_to_target"]
        lines.append(
            f"| {v['model']} | {_setting(v['heterogeneity'], v['participation'])} | "
            f"{win(v['winner/bits_to_target'], _kb)} | {cell(b, _kb)} | "
            f"{'holds' if b['claim_holds'] else 'no'} | "
            f"{win(v['winner/time_on_link_to_target'], _t)} | {cell(t, _t)} | "
            f"{'holds' if t['claim_holds'] else 'no'} | {'holds' if a['claim_holds'] else 'no'} "
            f"({a['best_vr'] or 'none'} {_kb(a['best_vr_value'])} vs {a['best_baseline'] or 'none'} "
            f"{_kb(a['best_baseline_value'])}) |"
        )
    nb = sum(v["tuned/bits_to_target"]["claim_holds"] for v in vs)
    nt = sum(v["tuned/time_on_link_to_target"]["claim_holds"] for v in vs)
    na = sum(v["adaptive/bits_to_target"]["claim_holds"] for v in vs)
    lines += [
        "",
        f"**Verdict.** With tuned radii the claim holds on bits-to-target in {nb} of {len(vs)} settings "
        f"and on time on the stated link in {nt} of {len(vs)}; with the adaptive radius (VR estimators vs "
        f"ef21_muon, all untuned) on bits in {na} of {len(vs)}.",
        "",
    ]
    lines += recommendation(records, vs)
    lines += [
        "",
        "### Per setting",
        "",
        "radius: chosen lr (⚠: at the edge of the grid) or `adaptive`; reached: seeds that reached the target.",
        "",
    ]
    for v in vs:
        m, h, q = _key(v)
        rs = [r for r in records if _key(r) == (m, h, q)]
        lines += [
            f"#### {m}, {_setting(h, q)} (target train loss, median over seeds: "
            f"{float(np.median(rs[0]['targets'])):.4f})",
            "",
            "| method | arm | radius | bits to target | grad evals to target | time on link | reached | "
            "final train loss | test acc |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rs:
            rad = (
                "adaptive"
                if r["radius"] == "adaptive"
                else f"2^{round(math.log2(r['radius']))}" + (" ⚠" if r.get("radius_at_grid_edge") else "")
            )
            ge = "—" if r["grad_evals_to_target"] is None else f"{r['grad_evals_to_target']:.0f}"
            lines.append(
                f"| {r['method']} | {r['arm']} | {rad} | {_kb(r['bits_to_target'])} | {ge} | "
                f"{_t(r['time_on_link_to_target'])} | {r['reached']}/{len(r['seeds'])} | "
                f"{r['final_train_loss']:.4f} | {r['test_accuracy']:.3f} |"
            )
        lines.append("")
    lines += [
        f"Plot: `{meta['png']}` (train loss vs cumulative uplink bits per worker, first reported seed, tuned "
        "arm solid, adaptive dotted). Caveats: small models on a small dataset, a short budget; one tuning seed; "
        "the grid has factor-2 spacing; bits/evals-to-target are read every "
        f"{cfg['eval_every']} steps, so ties and one-evaluation differences are within that resolution; "
        "`p` of marina/ef21_page is the engine default bits(Q)/bits(dense), "
        "not tuned; ef21_nomom (EF21 without momentum) is not in this run (ef21_muon is the stronger "
        "baseline).",
        "",
        DOC_END,
    ]
    return "\n".join(lines)


def recommendation(records: list[dict[str, Any]], vs: list[dict[str, Any]]) -> list[str]:
    """Where each VR estimator beats every compressed baseline (tuned arm), on bits and on time: from the numbers."""
    out = [
        "**When each estimator pays** (tuned arm, median bits-to-target / time on link below the best compressed "
        "baseline's):",
        "",
    ]
    for name in VR:
        for metric, label in (("bits_to_target", "bits"), ("time_on_link_to_target", "time on link")):
            wins = []
            for v in vs:
                r = _tuned(records, _key(v), name)
                base = v[f"tuned/{metric}"]["best_baseline_value"]
                if r[metric] is not None and (base is None or r[metric] < base):
                    wins.append(
                        f"{v['model']} {_setting(v['heterogeneity'], v['participation'])}"
                        + ("" if base is None or not r[metric] else f" ({base / r[metric]:.2f}×)")
                    )
            out.append(
                f"- `{name}` beats the best baseline on {label} in {len(wins)}/{len(vs)} settings"
                + (": " + "; ".join(wins) if wins else "")
                + "."
            )
    out += [
        "",
        "**Break-even link** (tuned arm, from the medians): where the best VR method needs fewer bits but more "
        "gradient evaluations than the best baseline, it is faster on the link once sending a dense fp32 gradient "
        "takes longer than ρ* gradient evaluations, ρ* = Δ(grad evals)·32·d·q / Δ(bits):",
        "",
    ]
    for v in vs:
        b = v["tuned/bits_to_target"]
        if not b["claim_holds"] or b["best_baseline"] is None:
            continue
        vr, base = _tuned(records, _key(v), b["best_vr"]), _tuned(records, _key(v), b["best_baseline"])
        d = n_params(v["model"])
        dg = vr["grad_evals_to_target"] - base["grad_evals_to_target"]
        db = base["bits_to_target"] - vr["bits_to_target"]
        rho = (
            "any link (no more gradient evaluations)"
            if dg <= 0
            else f"ρ* = {dg * 32 * d * v['participation'] / db:.2f}"
        )
        out.append(
            f"- {v['model']} {_setting(v['heterogeneity'], v['participation'])}: `{b['best_vr']}` vs "
            f"`{b['best_baseline']}`: {rho}"
        )
    return out


def write_doc(path: Path, section: str) -> None:
    """Insert or replace the generated section in ``path`` (other content of the file is kept)."""
    text = path.read_text() if path.exists() else "# Federated learning with compressed Gluon\n\n"
    pattern = re.compile(re.escape(DOC_BEGIN) + ".*?" + re.escape(DOC_END), re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def plot(records: list[dict[str, Any]], cfg: Config, path: Path) -> None:
    """Train loss vs cumulative uplink bits per worker, one panel per (model, setting), first reported seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(cfg.models), len(cfg.settings)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    colors = dict(zip(methods(cfg), plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for i, m in enumerate(cfg.models):
        for j, (h, q) in enumerate(cfg.settings):
            ax = axes[i][j]
            for r in records:
                if _key(r) != (m, h, q):
                    continue
                c = r["curves"][0]
                ax.plot(
                    [max(p[1], 1) for p in c],
                    [p[3] for p in c],
                    color=colors[r["method"]],
                    ls="-" if r["arm"] == "tuned" else ":",
                    lw=1.2,
                    label=r["method"] + ("" if r["arm"] == "tuned" else " (adaptive)"),
                )
                if r["method"] == "gluon" and r["arm"] == "tuned":
                    ax.axhline(r["targets"][0], color="grey", lw=0.8, ls="-.")
            ax.set(
                xscale="log",
                yscale="log",
                title=f"{m}, {_setting(h, q)}",
                xlabel="uplink bits per worker",
                ylabel="train loss at X",
            )
            ax.set_ylim(top=3)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny budgets and grids (< 1 min); writes federated_smoke*")
    ap.add_argument("--seed", type=int, default=None, help="one reported seed; --seeds for several")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="reported seeds (default 0 1 2)")
    ap.add_argument("--models", nargs="+", default=None, choices=MODELS)
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run")
    ap.add_argument("--processes", type=int, default=None, help="worker processes (default 2)")
    ap.add_argument("--link-ratio", type=float, default=None, help="dense-gradient transfer time / gradient time")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder (JSON + PNG)")
    ap.add_argument(
        "--doc",
        type=Path,
        default=None,
        help="markdown file to write the section into (default docs/benchmarks.md; smoke: none)",
    )
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="recompute the derived fields, verdicts, plot and docs from the stored JSON (no training)",
    )
    args = ap.parse_args(argv)
    if args.report_only:
        return report_only(args)
    cfg = dataclasses.replace(SMOKE if args.smoke else Config())
    if args.seeds is not None or args.seed is not None:
        cfg.seeds = tuple(args.seeds if args.seeds is not None else [args.seed])
    if args.models is not None:
        cfg.models = tuple(args.models)
    for attr in ("steps", "processes", "link_ratio"):
        if getattr(args, attr) is not None:
            setattr(cfg, attr, getattr(args, attr))
    if cfg.tuning_seed in cfg.seeds:
        raise ValueError(f"the tuning seed {cfg.tuning_seed} must not be a reported seed")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    stem = "federated_smoke" if args.smoke else "federated"
    records, meta = run(cfg, progress=not args.no_progress)
    wall = time.perf_counter() - t0
    meta["wall"] = f"{int(wall // 60)} min {int(wall % 60)} s"
    meta["environment"] = environment()
    meta["command"] = " ".join(["python benchmarks/federated.py", *(argv if argv is not None else sys.argv[1:])])
    png = args.out / f"{stem}.png"
    try:
        meta["png"] = str(png.resolve().relative_to(ROOT))
    except ValueError:
        meta["png"] = str(png)
    write_outputs(args, stem, cfg, records, meta)
    for v in meta["verdicts"]:
        b, t = v["tuned/bits_to_target"], v["tuned/time_on_link_to_target"]
        print(
            f"{v['model']} {_setting(v['heterogeneity'], v['participation'])}: bits best VR {b['best_vr']} "
            f"{_kb(b['best_vr_value'])} vs {b['best_baseline']} {_kb(b['best_baseline_value'])} -> claim "
            f"{'holds' if b['claim_holds'] else 'does not hold'}; time -> "
            f"{'holds' if t['claim_holds'] else 'does not hold'}"
        )
    print(f"wall {meta['wall']}")
    return records, meta


def report_only(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Re-derive the to-target fields from the stored curves and rewrite verdicts, plot and docs section."""
    import json

    stem = "federated_smoke" if args.smoke else "federated"
    records = json.loads((args.out / f"{stem}.json").read_text())
    meta = json.loads((args.out / f"{stem}_meta.json").read_text())
    c = meta["config"]
    cfg = Config(
        **{
            k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
            for k, v in c.items()
        }
    )
    for r in records:
        derive(r, meta["n_params"][r["model"]], cfg.link_ratio)
    write_outputs(args, stem, cfg, records, meta)
    return records, meta


def write_outputs(
    args: argparse.Namespace, stem: str, cfg: Config, records: list[dict[str, Any]], meta: dict[str, Any]
) -> None:
    """Verdicts into ``meta``, the plot, records + meta JSON, and the docs section (``--doc``; default
    docs/benchmarks.md, none for the smoke run)."""
    meta["verdicts"] = verdicts(records)
    plot(records, cfg, args.out / f"{stem}.png")
    write_json(args.out / f"{stem}.json", records)
    write_json(args.out / f"{stem}_meta.json", meta)
    doc = args.doc if args.doc is not None else (None if args.smoke else ROOT / "docs" / "benchmarks.md")
    if doc is not None:
        write_doc(doc, markdown(records, meta))


if __name__ == "__main__":
    main()
