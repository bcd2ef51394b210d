"""``topology="hierarchical"`` over 4 real gloo processes arranged as 2 nodes x 2: identity compressors equal plain
DDP with the same optimizer; compressed, it equals the in-process Simulator with one worker per node whose gradient
is the node's average; inter-node bytes equal the compressors' closed forms; resume is bit-identical."""

from __future__ import annotations

import math

import pytest
import torch

import ef_lightning as efl
from dist_helpers import (check_ok, engine_hierarchical, run_distributed, run_many, run_nodes, simulate_nodes,
                          untimed)

pytestmark = pytest.mark.slow  # multi-process

STEPS = 20
NODES, PER_NODE = 2, 2
COMPRESSED = {"uplink": "top_k:0.25", "downlink": "top_k:0.5"}


def _topk_bits(d: int, ratio: float, f: int = 32) -> int:
    K = math.ceil(ratio * d)
    return min(K * (f + math.ceil(math.log2(d))), f * K + d)


def _simulate_nodes(cfg: dict, steps: int) -> tuple[dict, dict]:
    sim, model = simulate_nodes(cfg, steps, NODES, PER_NODE)
    return sim.server_model(), dict(model.named_parameters())


@pytest.fixture(scope="module")
def identity_run(tmp_path_factory):
    return check_ok(run_distributed(engine_hierarchical, NODES * PER_NODE, tmp_path_factory.mktemp("hier_id"),
                                    cfg={"uplink": "identity", "downlink": "identity"}, steps=STEPS,
                                    local_world_size=PER_NODE))


@pytest.fixture(scope="module")
def compressed_run(tmp_path_factory):
    return check_ok(run_distributed(engine_hierarchical, NODES * PER_NODE, tmp_path_factory.mktemp("hier_c"),
                                    cfg=COMPRESSED, steps=STEPS, local_world_size=PER_NODE, split=7))


def test_identity_equals_ddp(identity_run):
    for r, res in enumerate(identity_run):
        for name, w in res["W"].items():
            torch.testing.assert_close(w, res["ddp"][name], atol=1e-6, rtol=0, msg=f"rank {r} {name}")


def test_shares_split_the_model_inside_each_node(identity_run):
    names = list(identity_run[0]["W"])
    for node in range(NODES):
        shares = [set(identity_run[node * PER_NODE + i]["share"]) for i in range(PER_NODE)]
        assert set().union(*shares) == set(names) and sum(map(len, shares)) == len(names)
    for i in range(PER_NODE):  # the same local index handles the same share on every node
        assert identity_run[i]["share"] == identity_run[PER_NODE + i]["share"]


def test_compressed_equals_simulator_of_node_averages(compressed_run):
    """One Simulator worker per node, fed the node's two batches at once (MSE over the concatenation = the mean of
    the two processes' gradients): the node average the hierarchical topology compresses."""
    X_ref, W_ref = _simulate_nodes(COMPRESSED, STEPS)
    assert any(not torch.equal(X_ref[k], W_ref[k]) for k in X_ref)  # W != X: the downlink is compressed
    for r, res in enumerate(compressed_run):
        for name in X_ref:
            torch.testing.assert_close(res["X"][name], X_ref[name], atol=1e-6, rtol=0, msg=f"rank {r} X {name}")
            torch.testing.assert_close(res["W"][name], W_ref[name].detach(), atol=1e-6, rtol=0,
                                       msg=f"rank {r} W {name}")


def test_inter_node_bytes_equal_closed_form(compressed_run):
    for r, res in enumerate(compressed_run):
        shapes = {k: v.shape for k, v in res["W"].items()}
        share = res["share"]
        # uplink: the share's layers, top_k bits (32-bit values + ceil(log2 d)-bit indices, or a bitmap)
        bits = sum(_topk_bits(math.prod(shapes[k]), 0.25) for k in share)
        assert all(rec["uplink_bits"] == bits for rec in res["records"])
        # what the process handed to the cross-node collectives equals the ledger's inter-node bytes
        calls = res["collectives"]
        up = sum(b for name, b in calls if name == "all_to_all_single")
        down = sum(b for name, b in calls if name == "all_gather_into_tensor")
        assert up == res["ledger"]["uplink_wire_bytes_per_worker"]
        assert down * NODES == res["ledger"]["downlink_wire_bytes"]
        # intra-node: the other share's gradients (fp32) to its owner, this share's W (fp32) to the other process
        mine = sum(math.prod(shapes[k]) for k in share)
        total = sum(math.prod(s) for s in shapes.values())
        assert all(rec["intra_node_bytes"] == 4 * (total - mine) + 4 * mine * (PER_NODE - 1)
                   for rec in res["records"])


def test_resume_is_bit_identical(compressed_run):
    for r, res in enumerate(compressed_run):
        for part in ("X", "W"):
            for k, v in res[part].items():
                assert torch.equal(v, res["resumed"][part][k]), (r, part, k)
        assert res["ledger"] == res["resumed"]["ledger"]


# ----------------------------------------------------------------------------------------- under Lightning
@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory):
    from pathlib import Path

    out = tmp_path_factory.mktemp("hier_lightning")
    here = Path(__file__).parent
    run_nodes([str(here / "lightning_scenarios.py"), str(out), str(PER_NODE), "hierarchical"], out, NODES,
               {"EF21_TEST_NUM_NODES": str(NODES)})
    res = [torch.load(out / f"hierarchical_rank{r}.pt", weights_only=False) for r in range(NODES * PER_NODE)]
    res[0]["csv"] = (out / "hier_csv" / "version_0" / "metrics.csv").read_text().splitlines()
    return res


def test_lightning_identity_equals_ddp(lightning_run):
    for r, res in enumerate(lightning_run):
        for k, w in res["identity"]["weights"].items():
            torch.testing.assert_close(w, res["ddp"]["weights"][k], atol=1e-6, rtol=0, msg=f"rank {r} {k}")
        assert all(rec["intra_node_bytes"] > 0 for rec in res["identity"]["records"])


def test_lightning_monitor_logs_a_nodes_inter_node_traffic(lightning_run):
    """A worker is a node: CommunicationMonitor logs the sum of its processes' uplink (each sends its share)."""
    import csv

    logged = lightning_run[0]["csv"]
    per_rank = [[rec["uplink_bits"] for rec in res["compressed"]["records"]] for res in lightning_run]
    node = [sum(bits) for bits in zip(*per_rank[:PER_NODE])]
    assert node == [sum(bits) for bits in zip(*per_rank[PER_NODE:])]  # every node sends the same
    assert [float(row["comm/uplink_bits"]) for row in csv.DictReader(logged) if row.get("comm/uplink_bits")] == node


def test_lightning_compressed_equals_simulator_and_resumes(lightning_run):
    from lightning_scenarios import Regressor, step_batch

    torch.manual_seed(0)
    module = Regressor()
    opt = efl.build_lmo_optimizer(module, preset="gluon", verbose=False)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)  # as Regressor.configure_optimizers
    sim = efl.Simulator(module, opt, n_workers=NODES, uplink="top_k:0.25", downlink="top_k:0.5")
    for s in range(10):
        batches = []
        for j in range(NODES):
            xs, ys = zip(*(step_batch(s, j * PER_NODE + i) for i in range(PER_NODE)))
            batches.append((torch.cat(xs), torch.cat(ys)))
        sim.step(lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]), batches)
        sched.step()
    X_ref = sim.server_model()  # the strategy leaves X in the module when training ends
    assert any(not torch.equal(X_ref[k], v) for k, v in module.state_dict().items())  # W != X
    for r, res in enumerate(lightning_run):
        for k, w in res["compressed"]["weights"].items():
            torch.testing.assert_close(w, X_ref[k], atol=1e-6, rtol=0, msg=f"rank {r} {k}")
            assert torch.equal(w, res["resumed"]["weights"][k]), (r, k)
        assert untimed(res["compressed"]["records"]) == untimed(res["resumed"]["records"])


# ----------------------------------------------------------------------------------------- under Accelerate
@pytest.fixture(scope="module")
def accelerate_run(tmp_path_factory):
    import sys
    from pathlib import Path

    from dist_helpers import free_port

    out = tmp_path_factory.mktemp("hier_accelerate")
    port = str(free_port())
    script = [str(Path(__file__).parent / "accelerate_nodes.py"), str(out)]
    per_node = []
    for n in range(NODES):  # one `accelerate launch` per node, as on a cluster
        per_node.append(["-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu", "--num_machines",
                         str(NODES), "--machine_rank", str(n), "--num_processes", str(NODES * PER_NODE),
                         "--main_process_ip", "127.0.0.1", "--main_process_port", port, "--monitor_interval", "1",
                         *script])
    run_many([[sys.executable, *a] for a in per_node], {"ACCELERATE_USE_CPU": "1"})
    return [torch.load(out / f"accelerate_rank{r}.pt", weights_only=False) for r in range(NODES * PER_NODE)]


def test_accelerate_layout_from_environment(accelerate_run):
    assert all(res["identity"]["local_world_size"] == PER_NODE for res in accelerate_run)


def test_accelerate_identity_equals_ddp(accelerate_run):
    for r, res in enumerate(accelerate_run):
        for k, w in res["identity"]["W"].items():
            torch.testing.assert_close(w, res["ddp"]["W"][k], atol=1e-6, rtol=0, msg=f"rank {r} {k}")


def test_accelerate_compressed_equals_simulator_and_resumes(accelerate_run):
    from accelerate_nodes import COMPRESSED as ACC, STEPS as ACC_STEPS

    X_ref, W_ref = _simulate_nodes(ACC, ACC_STEPS)
    for r, res in enumerate(accelerate_run):
        for k in X_ref:
            torch.testing.assert_close(res["compressed"]["X"][k], X_ref[k], atol=1e-6, rtol=0, msg=f"rank {r} {k}")
            torch.testing.assert_close(res["compressed"]["W"][k], W_ref[k].detach(), atol=1e-6, rtol=0)
            assert torch.equal(res["compressed"]["W"][k], res["resumed"]["W"][k]), (r, k)
            assert torch.equal(res["compressed"]["X"][k], res["resumed"]["X"][k]), (r, k)
        assert untimed(res["compressed"]["records"]) == untimed(res["resumed"]["records"])


# ----------------------------------------------------------------------------------------- the two limits
def test_one_process_per_node_is_sharded_and_one_node_is_ddp(tmp_path):
    from dist_helpers import engine_run

    flat = {"topology": "sharded", **COMPRESSED}
    per_node_1 = {"topology": "hierarchical", "local_world_size": 1, **COMPRESSED}
    res = check_ok(run_distributed(engine_run, 2, tmp_path / "g1", configs=[flat, per_node_1], steps=6))
    for r in res:
        a, b = r[repr(sorted(flat.items()))], r[repr(sorted(per_node_1.items()))]
        for part in ("X", "W"):
            for k, v in a[part].items():
                assert torch.equal(v, b[part][k]), (part, k)  # bit-identical: same messages, same owners
        assert a["ledger"] == b["ledger"]
    one_node = check_ok(run_distributed(engine_hierarchical, 2, tmp_path / "n1", cfg=COMPRESSED, steps=6,
                                        local_world_size=2))
    for r in one_node:  # no link between nodes: nothing is compressed, plain data parallel
        for k, w in r["W"].items():
            torch.testing.assert_close(w, r["ddp"][k], atol=1e-6, rtol=0)
        assert r["ledger"]["uplink_wire_bytes_per_worker"] == r["ledger"]["downlink_wire_bytes"] == 0  # nothing leaves
        assert r["ledger"]["intra_node_bytes"] > 0


def test_bad_node_layout_is_a_clear_error(tmp_path):
    from dist_helpers import engine_run

    cfg = {"topology": "hierarchical", "local_world_size": 2}
    res = run_distributed(engine_run, 3, tmp_path, configs=[cfg], steps=1)
    for r in res:
        assert "__error__" in r and "local_world_size=2" in r["__error__"] and "valid values divide 3" in r["__error__"]


def test_disagreeing_node_layouts_fail_on_every_rank(tmp_path):
    from dist_helpers import engine_layout_mismatch

    for r in run_distributed(engine_layout_mismatch, 2, tmp_path):
        assert "__error__" in r and "disagree on local_world_size" in r["__error__"] and "[1, 2]" in r["__error__"]


@pytest.mark.parametrize("kwargs,match", [({"estimator": "mvr"}, "estimator='ef21'"),
                                          ({"local_world_size": 0}, "local_world_size=0")])
def test_bad_hierarchical_options_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        efl.EF21Config(topology="hierarchical", **kwargs)
