"""benchmarks/federated.py --smoke: runs in seconds, writes JSON + PNG (+ a docs section when asked).

References: the ledger's bits against the closed forms of docs/algorithm.md §3 (identity 32·d, top_k, rand_k f·K),
the gradient-evaluation count of the VR estimators (1 on the first step, 2 after), the shard construction (sorted
by label), and the target/bits-to-target definitions recomputed from the stored curves.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import federated  # noqa: E402


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
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "federated.py"), "--smoke", "--seed", "3",
                           "--out", str(out), "--doc", str(doc), "--no-progress"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "federated_smoke.json").read_text()), doc.read_text(), proc.stdout


def test_outputs_and_config(smoke):
    out, res, doc, stdout = smoke
    assert (out / "federated_smoke.png").stat().st_size > 1000
    assert res["seeds"] == [3] and res["config"]["steps"] == federated.SMOKE.steps
    assert set(res["tasks"]) == {"logreg", "mlp"}
    for t in res["tasks"].values():
        assert set(t["methods"]) == set(federated.methods(federated.SMOKE))
        assert "claim_holds" in t["verdict"]
    assert "claim" in stdout


def test_bits_match_closed_forms(smoke):
    _, res, _, _ = smoke
    cfg = res["config"]
    shapes = {"logreg": [(10, 64), (10,)], "mlp": [(64, 64), (64,), (10, 64), (10,)]}
    for task, t in res["tasks"].items():
        ds = [math.prod(s) for s in shapes[task]]
        steps = cfg["steps"]
        m = t["methods"]
        assert m["gluon"]["runs"][0]["ledger"]["uplink_bits_per_worker"] == steps * sum(32 * d for d in ds)
        top = sum(topk_bits(d, cfg["ratio"]) for d in ds)
        for name in ("ef21_muon", "ef21_nomom", "ef21_page", "mvr"):
            assert m[name]["runs"][0]["ledger"]["uplink_bits_per_worker"] == steps * top, (task, name)
        assert m["ef21_randk"]["runs"][0]["ledger"]["uplink_bits_per_worker"] == \
            steps * sum(randk_bits(d, cfg["ratio"]) for d in ds)
        # MARINA: dense rounds (the first one always) cost 32·d, the others rand_k's values
        bits = m["marina"]["runs"][0]["ledger"]["uplink_bits_per_worker"]
        dense, rk = sum(32 * d for d in ds), sum(randk_bits(d, cfg["ratio"]) for d in ds)
        n_dense = (bits - steps * rk) / (dense - rk)
        assert n_dense == int(n_dense) and 1 <= n_dense <= steps
        # p = bits(Q)/bits(dense) (engine default)
        assert m["marina"]["p"] == pytest.approx(rk / dense)
        for name in federated.VR:  # two gradients per step after the first
            assert m[name]["runs"][0]["ledger"]["gradient_evaluations_per_worker"] == 2 * steps - 1
        assert m["ef21_muon"]["runs"][0]["ledger"]["gradient_evaluations_per_worker"] == steps


def test_target_and_bits_to_target_recomputed(smoke):
    _, res, _, _ = smoke
    cfg = res["config"]
    for t in res["tasks"].values():
        ref = t["methods"]["gluon"]["runs"][0]["curve"]
        target = next(c["train_loss"] for c in ref if c["step"] >= cfg["target_frac"] * cfg["steps"])
        assert t["target_median"] == target
        for r in t["methods"].values():
            run = r["runs"][0]
            hit = [c["uplink_bits_per_worker"] for c in run["curve"] if c["train_loss"] <= target]
            assert run["bits_to_target"] == (hit[0] if hit else None)
            assert [c["step"] for c in run["curve"]] == [0, 4, 8, 12]


def test_doc_section_is_inserted_and_replaced(smoke, tmp_path):
    _, res, doc, _ = smoke
    assert doc.startswith("# Federated\n\nHand-written intro kept.")
    assert doc.count(federated.DOC_BEGIN) == 1 and "bits to target" in doc
    # a second write replaces the section instead of appending another
    path = tmp_path / "f.md"
    path.write_text(doc)
    federated.write_doc(path, federated.markdown(res, "cmd"))
    assert path.read_text().count(federated.DOC_BEGIN) == 1 and "`cmd`" in path.read_text()


def test_shards_are_label_sorted_and_cover_the_training_set():
    data = federated.load_data(federated.SMOKE, seed=0)
    assert sum(len(s) for s in data.shards) == len(data.y_train) == 1797 - round(0.2 * 1797)
    labels = [data.y_train[s] for s in data.shards]
    assert all(bool((a.max() <= b.min())) for a, b in zip(labels, labels[1:]))  # heterogeneous: bands of digits
    assert max(len(set(lab.tolist())) for lab in labels) <= 3
