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
        # `default` is EF21Config()'s uplink, downlink and topology, read when the benchmark ran
        from ef_lightning.config import EF21Config

        assert r["default"] == (
            r["method"].startswith("ef21_muon_")
            and r["topology"] == EF21Config().topology
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
        "ef21_muon_sim",
    } <= methods
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
        if r["n_workers"] == 2:
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
    assert (tmp_path / "comm_vs_loss_smoke.png").stat().st_size > 0
    assert "seed 0" in out


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
    if os.geteuid() == 0 and "veth" not in meta["link"]:
        pytest.fail(f"running as root but the shaped link was not used: {meta['link']}")
    if "veth" in meta["link"]:
        assert any(r["link_mbit"] for r in rows)
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert "eflb" not in out, f"namespaces left behind: {out}"


# ------------------------------------------------------------------------------------------------ DeMo peer (unit)
def _demo_module():
    spec = importlib.util.spec_from_file_location("bench_demo_peer", BENCH / "demo_peer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SHAPES = [(256, 96), (96, 384), (96, 96), (96,), (7,), (1,), (130, 3), (3, 5, 8)]


@pytest.mark.parametrize("n", [1, 3, 48, 64])
def test_demo_dct_is_orthonormal(n: int) -> None:
    D = _demo_module().dct_matrix(n, torch.float64)
    assert torch.allclose(D @ D.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    x = torch.randn(n, dtype=torch.float64)  # DCT-II, orthonormal: D[k, i] = c_k sqrt(2/n) cos(pi (2i+1) k / 2n)
    k = 1 if n > 1 else 0
    want = math.sqrt(2 / n) * sum(float(x[i]) * math.cos(math.pi * (2 * i + 1) * k / (2 * n)) for i in range(n))
    assert float(D[k] @ x) == pytest.approx(want if k else float(x.sum()) / math.sqrt(n))


@pytest.mark.parametrize("shape", SHAPES)
def test_demo_idct_of_dct_is_identity(shape: tuple[int, ...]) -> None:
    L = _demo_module().Layout(shape)
    x = torch.randn(shape)
    assert torch.allclose(L.decode(L.encode(x)), x, atol=1e-5)
    assert L.encode(x).shape == (L.n_chunks, L.h * L.w)
    assert torch.allclose(L.encode(x).norm(), x.norm(), rtol=1e-5)  # Parseval: each chunk's transform is orthonormal


def test_demo_transmitted_plus_residual_is_the_momentum() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialised in this process (DeMo would all_gather on it)")
    dm = _demo_module()
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
    dm = _demo_module()

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
