"""benchmarks/federated.py --smoke: runs in well under a minute, writes records + meta JSON, PNG (+ docs when asked).

Expectations are independent of the script's output: the ledger's bits against the closed forms of
docs/algorithm.md §3 (identity 32·d, top_k, rand_k f·K) for shapes written out here, gradient evaluations (1 per
step for EF21, 2 per step after the first for the VR estimators), the chosen radius as the argmin of the stored
held-out tuning scores, the target / to-target fields / time on the link recomputed from the stored curves, the
adaptive arm's overrides recomputed with the package's ``smoothness_overrides``, and the label-skew shards.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import federated  # noqa: E402

SHAPES = {
    "logreg": [(10, 64), (10,)],
    "mlp": [(64, 64), (64,), (10, 64), (10,)],
    "cnn": [(8, 1, 3, 3), (8,), (16, 8, 3, 3), (16,), (10, 64), (10,)],
}
FIELDS = {
    "model",
    "heterogeneity",
    "participation",
    "method",
    "estimator",
    "radius_grid",
    "radius",
    "seeds",
    "bits_to_target",
    "grad_evals_to_target",
    "reached",
    "time_on_link_to_target",
    "arm",
}


def topk_bits(d: int, ratio: float, f: int = 32) -> int:
    K = math.ceil(ratio * d)
    return min(K * (f + math.ceil(math.log2(d))), f * K + d)


def randk_bits(d: int, ratio: float, f: int = 32) -> int:
    return f * math.ceil(ratio * d)  # values only: indices come from the shared seed


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("fed")
    doc = out / "federated.md"
    doc.write_text("# Federated\n\nHand-written intro kept.\n")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "federated.py"),
            "--smoke",
            "--seed",
            "3",
            "--out",
            str(out),
            "--doc",
            str(doc),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads((out / "federated_smoke.json").read_text())
    meta = json.loads((out / "federated_smoke_meta.json").read_text())
    return out, records, meta, doc.read_text(), proc.stdout


def _by(records, **kw):
    return [r for r in records if all(r[k] == v for k, v in kw.items())]


def test_record_format_and_coverage(smoke):
    out, records, meta, _, stdout = smoke
    assert (out / "federated_smoke.png").stat().st_size > 1000
    assert isinstance(records, list) and "claim" in stdout
    cfg = meta["config"]
    assert cfg["seeds"] == [3] and cfg["steps"] == federated.SMOKE.steps and cfg["tuning_seed"] not in cfg["seeds"]
    settings = [tuple(s) for s in cfg["settings"]]
    assert {h for h, _ in settings} >= {0.0, 1.0} and {q for _, q in settings} >= {1.0, 0.5}
    expected = {
        (m, h, q, name, "tuned")
        for m in ("logreg", "mlp", "cnn")
        for h, q in settings
        for name in federated.methods(federated.SMOKE)
    }
    expected |= {
        (m, h, q, name, "adaptive")
        for m in ("logreg", "mlp", "cnn")
        for h, q in settings
        for name in ("gluon", "ef21_muon", "marina", "ef21_page", "mvr")
    }
    got = [(r["model"], r["heterogeneity"], r["participation"], r["method"], r["arm"]) for r in records]
    assert sorted(got) == sorted(expected)  # one record per (model, heterogeneity, participation, method, arm)
    for r in records:
        assert set(r) >= FIELDS
        assert r["radius_grid"] == cfg["radius_grid"] and r["seeds"] == [3]
        assert r["radius"] == "adaptive" if r["arm"] == "adaptive" else r["radius"] in r["radius_grid"]
        assert 0 <= r["reached"] <= len(r["seeds"])
    for m in ("logreg", "mlp", "cnn"):  # the start-of-run check against ef_lightning.reference ran for each
        keys = [k for k in meta["reference_check"] if k.startswith(m + "/")]
        assert len(keys) == len(federated.methods(federated.SMOKE)) + 2
        assert max(meta["reference_check"][k] for k in keys) <= 1e-4


def test_bits_and_grad_evals_match_closed_forms(smoke):
    _, records, meta, _, _ = smoke
    ratio = meta["config"]["ratio"]
    for r in _by(records, participation=1.0):
        ds = [math.prod(s) for s in SHAPES[r["model"]]]
        assert meta["n_params"][r["model"]] == sum(ds)
        dense, top = sum(32 * d for d in ds), sum(topk_bits(d, ratio) for d in ds)
        rk = sum(randk_bits(d, ratio) for d in ds)
        vr = r["estimator"] != "ef21"
        for curve in r["curves"]:
            if curve[-1][0] < meta["config"]["steps"]:
                continue  # diverged and stopped early
            for step, bits, gev, *_ in curve:
                assert gev == (2 * step - 1 if vr and step else step), (r["method"], step)
                if r["uplink"] == "identity":
                    assert bits == step * dense
                elif r["method"] == "marina":  # dense rounds (the first always) cost 32·d, the others rand_k's values
                    n_dense = (bits - step * rk) / (dense - rk)
                    assert step == 0 or (n_dense == int(n_dense) and 1 <= n_dense <= step)
                elif r["uplink"].startswith("rand_k"):
                    assert bits == step * rk
                else:
                    assert bits == step * top, (r["method"], step)
        if r["method"] in ("marina", "ef21_page"):  # p = bits(Q)/bits(dense) (engine default)
            assert r["p"] == pytest.approx((rk if r["method"] == "marina" else top) / dense)
    for r in _by(records, participation=0.5):  # half the workers: bits averaged over n halve, evals per participant
        full = _by(records, model=r["model"], participation=1.0, method=r["method"], arm=r["arm"])[0]
        if min(r["curves"][0][-1][0], full["curves"][0][-1][0]) < meta["config"]["steps"]:
            continue  # diverged and stopped early
        steps = meta["config"]["steps"]  # the ledger rounds each step's average up to a whole bit
        assert abs(2 * r["curves"][0][-1][1] - full["curves"][0][-1][1]) <= steps
        assert r["curves"][0][-1][2] == full["curves"][0][-1][2]


def test_tuning_target_and_to_target_fields_recomputed(smoke):
    _, records, meta, _, _ = smoke
    cfg = meta["config"]
    for r in _by(records, arm="tuned"):  # the chosen radius is the argmin of the held-out tuning scores
        # keys are the lr printed with %g (6 significant digits): map them back onto the grid
        scores = {
            min(cfg["radius_grid"], key=lambda g, k=k: abs(g - float(k))): (math.inf if v is None else v)
            for k, v in r["tuning_scores"].items()
        }
        assert sorted(scores) == pytest.approx(sorted(float(k) for k in r["tuning_scores"]), rel=1e-5)
        assert sorted(scores) == sorted(cfg["radius_grid"])
        assert r["radius"] == min(sorted(scores), key=lambda lr: (scores[lr], lr))
    for r in records:
        gluon = _by(
            records,
            model=r["model"],
            heterogeneity=r["heterogeneity"],
            participation=r["participation"],
            method="gluon",
            arm="tuned",
        )[0]
        d = sum(math.prod(s) for s in SHAPES[r["model"]])
        bits, gev, tol = [], [], []
        for curve, gcurve, target in zip(r["curves"], gluon["curves"], r["targets"]):
            assert target == next(c[3] for c in gcurve if c[0] >= cfg["target_frac"] * cfg["steps"])
            hit = next((c for c in curve if c[3] <= target), None)
            bits.append(None if hit is None else hit[1])
            gev.append(None if hit is None else hit[2])
            tol.append(None if hit is None else hit[2] + hit[1] / r["participation"] * cfg["link_ratio"] / (32 * d))
        assert r["bits_to_target_per_seed"] == bits and r["grad_evals_to_target_per_seed"] == gev
        assert r["time_on_link_to_target_per_seed"] == pytest.approx(tol)
        assert r["reached"] == sum(b is not None for b in bits)
        med = float(np.median([math.inf if b is None else b for b in bits]))
        assert r["bits_to_target"] == (None if math.isinf(med) else med)


def test_adaptive_arm_uses_package_overrides(smoke):
    from ef_lightning.smoothness import smoothness_overrides

    _, _, meta, _, _ = smoke
    for m, s in meta["smoothness"].items():
        est = {k: tuple(v) for k, v in s["estimate"].items()}
        assert s["overrides"] == json.loads(json.dumps(smoothness_overrides(est)))
        assert set(est) == {
            f"{i}.{kind}" for i in {"logreg": [0], "mlp": [0, 2], "cnn": [1, 4, 8]}[m] for kind in ("weight", "bias")
        }


def test_doc_section_is_inserted_and_replaced(smoke, tmp_path):
    _, records, meta, doc, _ = smoke
    assert doc.startswith("# Federated\n\nHand-written intro kept.")
    assert doc.count(federated.DOC_BEGIN) == 1 and "bits to target" in doc and "time on link" in doc
    path = tmp_path / "f.md"
    path.write_text(doc)
    federated.write_doc(path, federated.markdown(records, dict(meta, command="cmd")))
    assert path.read_text().count(federated.DOC_BEGIN) == 1 and "`cmd`" in path.read_text()


@pytest.mark.parametrize("skew", [0.0, 0.5, 1.0])
def test_label_skew_shards(skew):
    data = federated.load_data(10, 0.2, 0, skew)
    idx = np.sort(np.concatenate([s.numpy() for s in data.shards]))
    assert (idx == np.arange(len(data.y_train))).all() and len(idx) == 1797 - round(0.2 * 1797)  # a partition
    own = np.mean([(data.y_train[s] == j).float().mean().item() for j, s in enumerate(data.shards)])
    if skew == 1.0:  # one class per worker
        assert all(set(data.y_train[s].tolist()) == {j} for j, s in enumerate(data.shards))
    elif skew == 0.0:  # IID: every worker sees (nearly) every digit, its own at about 1/10
        assert all(len(set(data.y_train[s].tolist())) == 10 for s in data.shards) and own < 0.2
    else:  # P(own label) = h + (1 - h)/10 in expectation
        assert abs(own - (0.5 + 0.05)) < 0.08
