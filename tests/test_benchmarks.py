"""Smoke runs of the benchmark scripts (``--smoke``: tiny model, a handful of steps) and the fields of their JSON.

Each script runs in a subprocess exactly as a user would run it, writing into a temporary folder. shaped_link's
smoke uses a shaped veth pair between two network namespaces when it can (root, iproute2), else loopback; it
reports which in its metadata.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def run_script(name: str, tmp_path: Path, *extra: str, timeout: int = 180) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(BENCH / name), "--smoke", "--out", str(tmp_path), *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def _package_default(spec: str, which: str) -> bool:
    """Whether a benchmark compressor spec (one spec on every matrix role, vectors dense) is EF21Config()'s."""
    from ef_lightning.config import EF21Config

    d = getattr(EF21Config(), which)
    d = dict.fromkeys(("hidden", "embedding", "head", "conv", "vector", "default"), d) if isinstance(d, str) else d
    ours = {k: ("identity" if k in ("vector", "default") else spec) for k in d}
    return ours == dict(d)


def test_comm_vs_loss_smoke(tmp_path: Path) -> None:
    out = run_script("comm_vs_loss.py", tmp_path, "--seed", "0", timeout=480)
    runs = json.loads((tmp_path / "comm_vs_loss_smoke.json").read_text())
    meta = json.loads((tmp_path / "comm_vs_loss_smoke_meta.json").read_text())
    assert isinstance(runs, list) and runs
    need = {
        "method",
        "uplink",
        "downlink",
        "n_workers",
        "final_val_loss",
        "bytes_to_target_per_worker",
        "saving_vs_uncompressed",
        "downlink_bytes_total",
        "seed",
        "steps",
        "budget_steps",
        "val_curve",
        "default",
        "total_saving_vs_uncompressed",
        "target_val_loss",
        "target_adamw_val_loss",
        "lr_mult",
        "sync_every",
        "total_ratio_vs_dp_gluon",
    }
    need |= {
        f"{k}{sfx}"
        for sfx in ("", "_adamw")
        for k in ("steps_to_target", "seconds_to_target", "reached_target", "total_saving_vs_uncompressed")
    }
    need |= {
        "bytes_to_target_per_worker",
        "bytes_to_target_adamw_per_worker",
        "total_bytes_to_target_per_worker",
        "total_bytes_to_target_adamw_per_worker",
    }
    for r in runs:
        assert need <= r.keys(), need - r.keys()
        assert r["seed"] == 0
        # `default` is EF21Config()'s uplink, downlink, topology and sync_every, read when the benchmark ran
        from ef_lightning.config import EF21Config

        assert r["default"] == (
            r["method"].startswith("ef21_muon_")
            and r["topology"] == EF21Config().topology
            and r["sync_every"] == EF21Config().sync_every
            and _package_default(r["uplink"], "uplink")
            and _package_default(r["downlink"], "downlink")
        ), r["label"]
    methods = {r["method"] for r in runs}
    assert {
        "ef21_muon_sharded",
        "ef21_muon_allgather",
        "ef21_muon_server",
        "ddp_lmo",
        "ddp_adamw",
        "ddp_muon",
        "ddp_powersgd_r4_lmo",
        "demo",
        "diloco_h4",
        "ef21_muon_sim",
    } <= methods
    assert len({(r["label"], r["n_workers"]) for r in runs}) == len(runs)  # parts share no record twice
    assert sum(r["default"] for r in runs) == 1
    ref = next(r for r in runs if r["method"] == "ef21_muon_sharded" and r["uplink"] == "identity")
    assert ref["saving_vs_uncompressed"] == pytest.approx(1.0)
    assert ref["total_saving_vs_uncompressed"] == pytest.approx(1.0)
    ddp_lmo = next(r for r in runs if r["method"] == "ddp_lmo")
    assert ddp_lmo["total_saving_vs_uncompressed"] == pytest.approx(1.0)
    adamw = next(r for r in runs if r["method"] == "ddp_adamw")
    assert ref["target_adamw_val_loss"] == pytest.approx(adamw["val_loss_at_reference_steps"] * 1.01)
    assert ref["target_val_loss"] == pytest.approx(ref["final_val_loss"] * 1.01)
    comp = next(r for r in runs if r["default"])
    per_step = lambda r: r["uplink_bytes_total_per_worker"] / r["steps"]  # noqa: E731
    assert per_step(comp) < per_step(ref) / 3
    if comp["reached_target"]:  # the closed form of the total saving: same-topology uncompressed bytes / this run's
        base = ref["total_bytes_to_target_per_worker"]
        assert comp["total_saving_vs_uncompressed"] == pytest.approx(base / comp["total_bytes_to_target_per_worker"])
    # the best downlink candidate also ran in the server topology
    server = [r for r in runs if r["method"] == "ef21_muon_server" and r["uplink"] != "identity"]
    assert len(server) == 1 and "downlink_choice" in server[0]
    # DeMo: the bytes it handed to all_gather are the documented closed form, every step
    demo = next(r for r in runs if r["method"] == "demo")
    assert demo["uplink_bytes_total_per_worker"] == demo["steps"] * demo["demo_bytes_per_step"]
    assert demo["demo_bytes_per_step"] == meta["demo"]["bytes_per_step"] > 0
    assert demo["downlink_bytes_total"] == 0
    if demo["reached_target"]:
        assert demo["bytes_to_target_per_worker"] == demo["steps_to_target"] * demo["demo_bytes_per_step"]
    assert "not the authors' code" in meta["demo"]["source"]
    # the LR grid: every peer at every multiplier, the choice used in the real runs
    tune = meta["tune"]
    assert tune["grid"] == [1.0, 3.0]
    peers = {"ddp_adamw", "ddp_muon", "ddp_powersgd_r4_lmo", "demo", "ddp_lmo"}
    assert {(row["method"], row["lr_mult"]) for row in tune["rows"]} == {(m, g) for m in peers for g in tune["grid"]}
    assert set(tune["chosen"]) == peers
    for r in runs:
        if r["n_workers"] == 2 and r["method"].startswith("diloco_"):  # DiLoCo's inner LR: the local part's grid
            assert r["lr_mult"] == meta["local_tune"]["chosen"][r["method"]]["lr_mult"], r["label"]
        elif r["n_workers"] == 2:
            key = "ddp_lmo" if r["method"].startswith("ef21_muon_") else r["method"]
            assert r["lr_mult"] == tune["chosen"][key]["lr_mult"], r["label"]
    for k in ("total_saving_rule", "target_adamw_rule", "default_rule", "dropped_methods"):
        assert meta[k]
    # uncompressed EF21-Muon is data-parallel Gluon: it agrees with DDP + the same optimizer
    agree = meta["agreement_ef21_identity_vs_ddp_lmo"]
    assert len(agree) == 3 and all(v["max_abs_weight_diff"] < 1e-4 for v in agree.values())
    # the PowerSGD hook really ran under raw DDP + gloo on CPU: its all-reduced bytes match the r(m+n) rule
    psgd = next(r for r in runs if r["method"] == "ddp_powersgd_r4_lmo")
    assert psgd["powersgd_measured_hook_bytes"] == psgd["powersgd_analytic_bytes"] > 0
    assert {row["n_workers"] for row in meta["bytes_vs_n"]} == {2, 4, 8}
    _check_local_records(runs, meta)
    assert (tmp_path / "comm_vs_loss_smoke.png").stat().st_size > 0
    assert "seed 0" in out


def _check_local_records(runs: list[dict], meta: dict) -> None:
    """The local part of comm_vs_loss's smoke (sync_every 1 and 4, DiLoCo at H = 4) against closed forms."""
    numel = meta["params"]
    local = [r for r in runs if r["n_workers"] == 2 and r["sync_every"] > 1]
    ef = [r for r in local if r["method"] == "ef21_muon_sharded"]
    assert {(r["uplink"], r["downlink"]) for r in ef} == {
        ("identity", "identity"),
        ("top_k:0.05+natural", "top_k:0.1+natural"),
    }
    assert not any(r["default"] for r in local)  # EF21Config() syncs every step
    for r in local:
        H, loc = r["sync_every"], r["local"]
        assert H == loc["sync_every"] == 4
        # a sync on every H-th step and nowhere else; inner steps send nothing (0 bytes up and down)
        assert loc["round_steps"] == list(range(H, r["steps"] + 1, H))
        assert loc["inner_steps"] == r["steps"] - len(loc["round_steps"])
        assert loc["inner_step_bytes_max"] == 0
        assert r["uplink_bytes_total_per_worker"] == sum(loc["round_uplink_bytes"])
        assert r["downlink_bytes_total"] == sum(loc["round_downlink_bytes"])
        if r["reached_target"]:
            assert r["outer_rounds_to_target"] == r["steps_to_target"] // H
    ref = next(r for r in runs if r["label"] == "ef21_muon_sharded up=identity down=identity" and r["n_workers"] == 2)
    ident = next(r for r in ef if r["uplink"] == "identity")
    # uncompressed outer delta: each round moves what one uncompressed step does (dense fp32 each way, sharded)
    assert set(ident["local"]["round_uplink_bytes"]) == {ref["uplink_bytes_total_per_worker"] // ref["steps"]}
    assert set(ident["local"]["round_uplink_bytes"]) == {4 * numel}
    assert set(ident["local"]["round_downlink_bytes"]) == {ref["downlink_bytes_total"] // ref["steps"]}
    assert ident["ledger"]["outer_rounds"] == len(ident["local"]["round_steps"])
    assert ident["ledger"]["steps"] == ident["steps"]
    default_step = 0.7 if ident["outer"] == "nesterov" else 4  # EF21Config's outer_lr None
    assert ident["local"]["outer_step_size"] == (ident["outer_lr"] or default_step)
    # DiLoCo: one dense fp32 all-reduce of 4·numel bytes per round (the DDP rule), no downlink
    dil = next(r for r in local if r["method"] == "diloco_h4")
    assert dil["diloco_bytes_per_round"] == meta["diloco"]["bytes_per_round"] == 4 * numel
    assert meta["diloco"]["upload_download_bytes_per_round"] == 8 * numel
    assert set(dil["local"]["round_uplink_bytes"]) == {4 * numel} and dil["downlink_bytes_total"] == 0
    assert dil["uplink_bytes_total_per_worker"] == 4 * numel * (dil["steps"] // 4)
    assert "not the authors' code" in meta["diloco"]["source"]
    # the outer-step grid: every (family, H, outer step) row ran; the choice is the lowest loss and is used
    lt = meta["local_tune"]
    for fam in ("ef21", "diloco"):
        rows = [x for x in lt["rows"] if x["method"].startswith(fam)]
        assert len(rows) == 2 and lt["chosen"][f"{fam}_h4"]["val_loss"] == min(x["val_loss"] for x in rows)
    assert {x["lr_mult"] for x in lt["rows"] if x["method"] == "diloco_h4"} == set(lt["diloco_lr_grid"])
    o = lt["chosen"]["ef21_h4"]
    ks = ("outer", "outer_lr", "outer_momentum")
    assert all([r[k] for k in ks] == [o[k] for k in ks] for r in ef)
    # the goal block: bytes ratios are closed forms of the records' totals
    for sfx in ("", "_adamw"):
        g = meta["goal_issue14"]["target" + sfx]
        key = f"total_bytes_to_target{sfx}_per_worker"
        assert g["reference_bytes"] == ref[key]
        ours = [r for r in runs if r["n_workers"] == 2 and r["method"].startswith("ef21_muon_") and r[key]]
        assert g["best_bytes"] == min(r[key] for r in ours)
        assert g["ratio_vs_dp_gluon"] == pytest.approx(ref[key] / g["best_bytes"])
        assert g["met_100x"] == (g["ratio_vs_dp_gluon"] >= 100)
        if dil[key]:
            assert g["diloco_best_bytes"] == dil[key]
            assert g["ratio_vs_diloco"] == pytest.approx(dil[key] / g["best_bytes"])
            assert g["beats_diloco"] == (g["best_bytes"] < dil[key])
    for r in runs:
        if r["n_workers"] == 2 and r["total_bytes_to_target_per_worker"]:
            assert r["total_ratio_vs_dp_gluon"] == pytest.approx(
                ref["total_bytes_to_target_per_worker"] / r["total_bytes_to_target_per_worker"]
            )


def test_overhead_smoke(tmp_path: Path) -> None:
    sys.path.insert(0, str(BENCH))
    import common as C

    from ef_lightning.config import COMPRESSOR_ROLES, EF21Config

    roles = [r for r in COMPRESSOR_ROLES if r != "default"]

    def per_role(spec: str | dict[str, str]) -> dict[str, str]:  # how EF21Config.compressor resolves a spec
        return (
            dict.fromkeys(roles, spec)
            if isinstance(spec, str)
            else {r: spec.get(r, spec.get("default", "identity")) for r in roles}
        )

    run_script("overhead.py", tmp_path)
    res = json.loads((tmp_path / "overhead_smoke.json").read_text())
    runs = res["runs"]
    assert {r["model"] for r in runs} == {"benchmark", "gpt2_smoke"}  # the smoke size is never labelled gpt2_124m
    need = {"method", "model", "default", "overhead_vs_uncompressed", "peak_rss_mb_per_rank", "state_vs_ddp_lmo"}
    cfg = EF21Config()
    for model in ("benchmark", "gpt2_smoke"):
        rows = [r for r in runs if r["model"] == model]
        assert rows[0]["label"] == "ef21_muon_sharded up=identity down=identity"
        assert rows[0]["overhead_vs_uncompressed"] == 0
        assert "ddp_lmo" in [r["label"] for r in rows]
        for r in rows:
            assert need | {"seed", "median_step_seconds", "fwd_bwd_seconds"} <= r.keys(), need - r.keys()
            assert r["median_step_seconds"] > 0 and r["state_bytes_total"] > 0 and r["fwd_bwd_seconds"] > 0
            assert isinstance(r["default"], bool) and r["overhead_vs_uncompressed"] > -1
        # exactly one record is the package's default setting, read from EF21Config() (not hard-coded)
        (d,) = [r for r in rows if r["default"]]
        assert d["method"] == f"ef21_muon_{cfg.topology}"
        for k in ("uplink", "downlink"):  # as the runner applies it (common.role_spec keeps vectors dense)
            assert per_role(C.role_spec(d[k]) if isinstance(d[k], str) else d[k]) == per_role(getattr(cfg, k))
    assert res["meta"]["default_config"]["topology"] == cfg.topology
    assert res["meta"]["models"]["gpt2_smoke"]["smoke_size"] is True
    assert res["meta"]["floor_peak_rss_mb_rank0"] > 0


def test_shaped_link_smoke(tmp_path: Path) -> None:
    run_script("shaped_link.py", tmp_path, timeout=480)
    rows = json.loads((tmp_path / "shaped_link_smoke.json").read_text())
    meta = json.loads((tmp_path / "shaped_link_smoke_meta.json").read_text())
    need = {
        "method",
        "link_mbit",
        "comm_to_compute",
        "seconds_to_target",
        "compute_bound_seconds",
        "speedup_vs_ddp_muon",
        "seed",
        "default",
        "steps_to_target_adamw",
        "seconds_to_target_adamw",
        "speedup_vs_ddp_muon_adamw",
    }
    assert rows and all(need <= r.keys() for r in rows)
    assert {r["method"] for r in rows} >= {"ef21_muon_sharded", "ddp_muon", "ddp_lmo", "demo"}
    assert any(r["default"] for r in rows) and not any(r["default"] for r in rows if r["method"] == "demo")
    demo = next(r for r in rows if r["method"] == "demo")
    assert demo["uplink_bytes_per_step"] > 0 and demo["downlink_bytes_per_step"] == 0
    assert any(r["link_mbit"] is None for r in rows)  # the unlimited reference
    # local steps (H = 2 in the smoke): timed over whole rounds; DiLoCo's mean bytes per step = 4·numel / H
    for r in rows:
        H, times = r["sync_every"], r["all_step_seconds"]  # rank 0's timed steps; the slower rank decides
        assert r["seconds_per_step_rule"].startswith("median" if H == 1 else "mean over whole")
        if H == 1:
            assert len(times) == r["timed_steps"]
            assert r["seconds_per_step"] >= statistics.median(times)
        else:  # one round of warm-up, then whole rounds (at least two, and at least timed_steps)
            assert len(times) % H == 0 and len(times) >= max(2 * H, r["timed_steps"])
            assert r["seconds_per_step"] >= sum(times) / len(times)
    dil = [r for r in rows if r["method"] == "diloco_h2"]
    assert dil and all(r["uplink_bytes_per_step"] * 2 == 4 * meta["params"] for r in dil)
    assert all(r["downlink_bytes_per_step"] == 0 for r in dil)
    assert any(r["method"] == "ef21_muon_sharded" and r["sync_every"] == 2 for r in rows)
    if os.geteuid() == 0 and "veth" not in meta["link"]:
        pytest.fail(f"running as root but the shaped link was not used: {meta['link']}")
    if "veth" in meta["link"]:
        assert any(r["link_mbit"] for r in rows)
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert "eflb" not in out, f"namespaces left behind: {out}"


# ------------------------------------------------------------------------------------------------ DeMo peer (unit)
def _peer_module(name: str):
    """benchmarks/<name>.py loaded as its own module (``bench_<name>``), without benchmarks/ on sys.path."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SHAPES = [(256, 96), (96, 384), (96, 96), (96,), (7,), (1,), (130, 3), (3, 5, 8)]


@pytest.mark.parametrize("n", [1, 3, 48, 64])
def test_demo_dct_is_orthonormal(n: int) -> None:
    D = _peer_module("demo_peer").dct_matrix(n, torch.float64)
    assert torch.allclose(D @ D.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    x = torch.randn(n, dtype=torch.float64)  # DCT-II, orthonormal: D[k, i] = c_k sqrt(2/n) cos(pi (2i+1) k / 2n)
    k = 1 if n > 1 else 0
    want = math.sqrt(2 / n) * sum(float(x[i]) * math.cos(math.pi * (2 * i + 1) * k / (2 * n)) for i in range(n))
    assert float(D[k] @ x) == pytest.approx(want if k else float(x.sum()) / math.sqrt(n))


@pytest.mark.parametrize("shape", SHAPES)
def test_demo_idct_of_dct_is_identity(shape: tuple[int, ...]) -> None:
    L = _peer_module("demo_peer").Layout(shape)
    x = torch.randn(shape)
    assert torch.allclose(L.decode(L.encode(x)), x, atol=1e-5)
    assert L.encode(x).shape == (L.n_chunks, L.h * L.w)
    assert torch.allclose(L.encode(x).norm(), x.norm(), rtol=1e-5)  # Parseval: each chunk's transform is orthonormal


def test_demo_transmitted_plus_residual_is_the_momentum() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialised in this process (DeMo would all_gather on it)")
    dm = _peer_module("demo_peer")
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    opt = dm.DeMo(params, lr=0.01, beta=0.9)
    for _ in range(3):
        before = [p.detach().clone() for p in params]
        full = []
        for p in params:
            p.grad = torch.randn(p.shape)
            full.append(0.9 * opt.state[p]["momentum"] + p.grad)  # m <- beta m + g, before extraction
        opt.step()
        sent = opt.unpack(opt.last_buffer)
        for p, m, b, (vals, idx) in zip(params, full, before, sent):
            L = opt.layouts[p]
            q = L.decode(torch.zeros(L.n_chunks, L.h * L.w).scatter_(-1, idx, vals))  # IDCT of what was sent
            assert torch.allclose(q + opt.state[p]["momentum"], m, atol=1e-5)  # transmitted + residual = momentum
            # the sent coefficients are each chunk's top-k by magnitude; the residual has none left at them
            C = L.encode(m)
            assert torch.allclose(vals.abs(), C.abs().topk(L.k, dim=-1).values, atol=1e-5)
            assert L.encode(opt.state[p]["momentum"]).gather(-1, idx).abs().max() < 1e-4
            assert torch.equal(p.detach(), b - 0.01 * q.sign())  # n = 1: Q = q, theta <- theta - lr sign(Q)


def test_demo_bytes_closed_form() -> None:
    dm = _peer_module("demo_peer")

    def largest_divisor(d: int) -> int:
        return max(x for x in range(1, min(d, 64) + 1) if d % x == 0)

    def closed_form(shape: tuple[int, ...]) -> int:  # the docstring's rule: n_chunks * k * (4 B value + 2 B index)
        rows = 1 if len(shape) == 1 else shape[0]
        cols = math.prod(shape) // rows
        h, w = largest_divisor(rows), largest_divisor(cols)
        return (rows // h) * (cols // w) * min(32, h * w) * 6

    assert closed_form((256, 96)) == 8 * 32 * 6 and closed_form((96,)) == 2 * 32 * 6 and closed_form((7,)) == 7 * 6
    assert dm.payload_bytes(SHAPES) == sum(closed_form(s) for s in SHAPES)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    opt = dm.DeMo(params)
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    assert opt.last_bytes == opt.last_buffer.numel() == opt.bytes_per_step == dm.payload_bytes(SHAPES)
    # packed-index alternative (reported, not sent): 12-bit indices for 64x48 chunks
    assert dm.packed_bits_bytes([(256, 96)]) == 8 * 32 * (32 + 12) / 8


# ------------------------------------------------------------------------------------------------ DiLoCo peer (unit)
def _no_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialised in this process (DiLoCo would all_reduce on it)")


@pytest.mark.parametrize(("H", "lr", "mu"), [(3, 0.7, 0.9), (1, 0.7, 0.9), (4, 1.0, 0.0)])
def test_diloco_matches_algorithm_1(H: int, lr: float, mu: float) -> None:
    """n = 1: θ_j takes H AdamW steps from θ; δ = θ − θ_j; b <- μ·b + δ; θ <- θ − lr·(δ + μ·b); θ_j <- θ —
    written out line by line against DiLoCo over 4 rounds (inner state kept across rounds)."""
    _no_process_group()
    dm = _peer_module("diloco_peer")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    ref = [p.detach().clone().requires_grad_(True) for p in net.parameters()]
    xs = [torch.randn(8, 5) for _ in range(4 * H)]
    loss = lambda ps, x: (torch.tanh(x @ ps[0].T + ps[1]) @ ps[2].T + ps[3]).pow(2).mean()  # noqa: E731
    opt = torch.optim.AdamW(net.parameters(), lr=0.05)
    d = dm.DiLoCo(net.named_parameters(), opt, sync_every=H, outer_lr=lr, outer_momentum=mu)
    ref_opt = torch.optim.AdamW(ref, lr=0.05)
    theta = [p.detach().clone() for p in ref]
    buf = [torch.zeros_like(p) for p in ref]
    sent = []
    for s, x in enumerate(xs):
        opt.zero_grad()
        net_loss = (net(x) ** 2).mean()
        net_loss.backward()
        d.step()
        sent.append(d.last_bytes)
        ref_opt.zero_grad()
        loss(ref, x).backward()
        ref_opt.step()
        if (s + 1) % H == 0:
            with torch.no_grad():
                for p, t, b in zip(ref, theta, buf):
                    delta = t - p
                    b.mul_(mu).add_(delta)
                    t.sub_(lr * (delta + mu * b))
                    p.copy_(t)
        for p, q in zip(net.parameters(), ref):
            assert torch.allclose(p, q, atol=1e-6), s
    for got, want in zip(d.global_params().values(), theta):
        assert torch.allclose(got, want, atol=1e-6)
    numel = sum(p.numel() for p in ref)
    assert sent == [4 * numel if (s + 1) % H == 0 else 0 for s in range(len(xs))]  # inner steps send nothing
    assert d.rounds == len(xs) // H and d.bytes_per_round == dm.round_bytes(numel) == 4 * numel
    assert dm.round_bytes(numel, download=True) == 8 * numel


def test_diloco_averaging_outer_step_is_the_local_model() -> None:
    """Outer lr 1, momentum 0, one worker: the outer step lands exactly on the worker's model (θ <- θ − δ = θ_j)."""
    _no_process_group()
    dm = _peer_module("diloco_peer")
    torch.manual_seed(1)
    net = torch.nn.Linear(3, 3)
    d = dm.DiLoCo(net.named_parameters(), torch.optim.SGD(net.parameters(), lr=0.1), 2, outer_lr=1.0, outer_momentum=0)
    for _ in range(2):
        net.zero_grad()
        net(torch.randn(4, 3)).sum().backward()
        before = {k: v.detach().clone() for k, v in net.named_parameters()}
        d.step()
    assert d.last_synced
    for k, v in d.global_params().items():
        assert torch.allclose(v, before[k] - 0.1 * dict(net.named_parameters())[k].grad, atol=1e-7)
        assert torch.equal(v, dict(net.named_parameters())[k].detach())
