"""FSDP2 inside a node, EF21-Muon across nodes on the local shards (``topology="hierarchical"`` with DTensor
parameters): 4 gloo processes as 2 nodes x 2, a 2-layer Llama sharded with ``fully_shard``. Identity compressors equal
HSDP (the same shards, FSDP2's own dense all-reduce across nodes) with the same optimizer; compressed, it trains."""

from __future__ import annotations

import pytest
import torch

from dist_helpers import check_ok, engine_fsdp, run_distributed, untimed

pytestmark = pytest.mark.slow  # multi-process

STEPS = 16
IDENTITY = {"uplink": "identity", "downlink": "identity"}
COMPRESSED = {"uplink": "top_k:0.1+natural", "downlink": "top_k:0.2+natural"}
LOCAL = {"uplink": "identity", "downlink": "identity", "sync_every": 4}


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    return check_ok(run_distributed(engine_fsdp, 4, tmp_path_factory.mktemp("fsdp"), local_world_size=2, steps=STEPS,
                                    configs=[IDENTITY, COMPRESSED, LOCAL]))


def test_identity_equals_hsdp_with_the_same_optimizer(fsdp_run):
    key = repr(sorted(IDENTITY.items()))
    for r, res in enumerate(fsdp_run):
        for name, w in res[key]["W"].items():
            torch.testing.assert_close(w, res["hsdp"]["W"][name], atol=1e-5, rtol=0, msg=f"rank {r} {name}")
        assert res[key]["losses"] == pytest.approx(res["hsdp"]["losses"], abs=1e-5)


def test_local_steps_equal_a_simulator_of_nodes(fsdp_run):
    """sync_every=4 under FSDP2: each node's inner steps on its shards (FSDP2's reduce-scatter averages the node's
    gradients), the outer delta of the local shards across nodes. Equals an unsharded Simulator with one worker per
    node fed that node's batches (DiLoCo over nodes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import ef_lightning as efl
    from dist_helpers import counting_batch

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2))
    opt = efl.build_lmo_optimizer(model, preset="muon", lr=0.02, momentum=0.9, verbose=False)
    sim = efl.Simulator(model, opt, n_workers=2, **LOCAL)
    loss = lambda m, ids: m(input_ids=ids, labels=ids).loss  # noqa: E731
    for s in range(STEPS):
        sim.step(loss, [torch.cat([counting_batch(s, 2 * j), counting_batch(s, 2 * j + 1)]) for j in (0, 1)])
    X = sim.server_model()
    key = repr(sorted(LOCAL.items()))
    for r, res in enumerate(fsdp_run):
        assert res[key]["ledger"]["outer_rounds"] == STEPS // 4
        for name, w in res[key]["W"].items():  # after the last sync: W = X (identity downlink)
            torch.testing.assert_close(w, X[name], atol=1e-5, rtol=0, msg=f"rank {r} {name}")


def test_ef21_state_is_the_local_shard(fsdp_run):
    key = repr(sorted(IDENTITY.items()))
    for node in (0, 1):  # the node's two processes hold dim-0 shards that make up each whole parameter
        a, b = (fsdp_run[2 * node + i][key]["shard_shapes"] for i in (0, 1))
        for name, full in fsdp_run[2 * node][key]["W"].items():
            assert a[name][0] + b[name][0] == full.shape[0], name
            assert tuple(a[name][1:]) == tuple(b[name][1:]) == tuple(full.shape[1:]), name
    # the same layer has the same owner node on both processes of a node (its LMO runs on their shards together)
    for node in (0, 1):
        assert fsdp_run[2 * node][key]["served"] == fsdp_run[2 * node + 1][key]["served"]


def test_newton_schulz_runs_on_whole_matrices_on_the_owner_node(fsdp_run):
    """Each served hidden matrix is gathered once per step and orthogonalised whole (not as DTensor shards)."""
    key = repr(sorted(IDENTITY.items()))
    for res in fsdp_run:
        run = res[key]
        full = {name: tuple(w.shape) for name, w in run["W"].items()}
        # muon preset: the 2-D weights of the decoder layers are hidden (Newton-Schulz); embedding and head are AdamW
        hidden = [n for n in run["served"] if "layers." in n and len(full[n]) == 2]
        assert sorted(run["ns_shapes"]) == sorted(full[n] for n in hidden for _ in range(STEPS))


def test_compressed_trains(fsdp_run):
    """Loss falls by at least half as much as uncompressed HSDP's over the same steps, on ~7x fewer uplink bytes."""
    key = repr(sorted(COMPRESSED.items()))
    for res in fsdp_run:
        losses, dense = res[key]["losses"], res["hsdp"]["losses"]
        end = lambda xs: sum(xs[-3:]) / 3  # noqa: E731
        assert losses[0] - end(losses) > 0.5 * (dense[0] - end(dense)) > 0, (losses, dense)
        assert res[key]["ledger"]["compression_ratio"] > 3


# ----------------------------------------------------------------------------------------- under Lightning
@pytest.fixture(scope="module")
def lightning_fsdp(tmp_path_factory):
    from pathlib import Path

    from dist_helpers import run_nodes

    out = tmp_path_factory.mktemp("fsdp_lightning")
    run_nodes([str(Path(__file__).parent / "lightning_scenarios.py"), str(out), "2", "fsdp", "fsdp_local"], out, 2,
              {"EF21_TEST_NUM_NODES": "2"})
    return {name: [torch.load(out / f"{name}_rank{r}.pt", weights_only=False) for r in range(4)]
            for name in ("fsdp", "fsdp_local")}


def test_lightning_fsdp_trains_validates_at_x_and_resumes(lightning_fsdp):
    from lightning_scenarios import Regressor, step_batch

    held_out = [step_batch(100 + s, r) for s in range(8) for r in range(4)]  # the training task, unseen batches
    x, y = torch.cat([b[0] for b in held_out]), torch.cat([b[1] for b in held_out])
    model = Regressor()  # the scenario's initial model (seed 0)
    before = torch.nn.functional.mse_loss(model(x), y).item()
    for r, res in enumerate(lightning_fsdp["fsdp"]):
        model.load_state_dict(res["full"])
        after = torch.nn.functional.mse_loss(model(x), y).item()
        assert after < 0.7 * before, (before, after)  # 8 compressed steps learn the task
        for k, w in res["full"].items():
            assert torch.equal(w, res["resumed"][k]), (r, k)  # 4 steps + distributed checkpoint + 4 more
            assert torch.equal(w, res["at_validation"][k]), (r, k)  # validation at the end ran at X
        assert untimed(res["records"]) == untimed(res["resumed_records"])
        assert all(rec["uplink_bits"] < 8 * rec["dense_bytes"] for rec in res["records"])  # compressed
        for name, shape in res["shard"].items():  # EF21 state is the local shard: half the rows on 2 processes
            assert shape[0] * 2 == res["full"][name].shape[0]


def test_lightning_fsdp_local_steps_resume_mid_round(lightning_fsdp):
    """EF21FSDPStrategy(sync_every=3): 8 steps vs a distributed checkpoint at step 4 (one inner step into the second
    round) + resume: X and the ledger continue bit for bit (each process's shards of W_j come from its own file)."""
    for r, res in enumerate(lightning_fsdp["fsdp_local"]):
        for k, w in res["full"].items():
            assert torch.equal(w, res["resumed"][k]), (r, k)
        assert untimed(res["records"]) == untimed(res["resumed_records"])
        assert [rec["synced"] for rec in res["records"]] == [False, False, True] * 2 + [False, False]


def test_ef21_fsdp_strategy_refuses_other_topologies():
    import ef_lightning as efl

    with pytest.raises(ValueError, match="topology='sharded'"):
        efl.EF21FSDPStrategy(topology="sharded")
