"""FSDP2 inside a node, EF21-Muon across nodes on the local shards (``topology="hierarchical"`` with DTensor
parameters): 4 gloo processes as 2 nodes x 2, a 2-layer Llama sharded with ``fully_shard``. Identity compressors equal
HSDP (the same shards, FSDP2's own dense all-reduce across nodes) with the same optimizer; compressed, it trains."""

from __future__ import annotations

import pytest
import torch

from dist_helpers import check_ok, engine_fsdp, run_distributed

pytestmark = pytest.mark.slow  # multi-process

STEPS = 16
IDENTITY = {"uplink": "identity", "downlink": "identity"}
COMPRESSED = {"uplink": "top_k:0.1+natural", "downlink": "top_k:0.2+natural"}


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    return check_ok(run_distributed(engine_fsdp, 4, tmp_path_factory.mktemp("fsdp"), local_world_size=2, steps=STEPS,
                                    configs=[IDENTITY, COMPRESSED]))


def test_identity_equals_hsdp_with_the_same_optimizer(fsdp_run):
    key = repr(sorted(IDENTITY.items()))
    for r, res in enumerate(fsdp_run):
        for name, w in res[key]["W"].items():
            torch.testing.assert_close(w, res["hsdp"]["W"][name], atol=1e-5, rtol=0, msg=f"rank {r} {name}")
        assert res[key]["losses"] == pytest.approx(res["hsdp"]["losses"], abs=1e-5)


def test_ef21_state_is_the_local_shard(fsdp_run):
    key = repr(sorted(IDENTITY.items()))
    for r, res in enumerate(fsdp_run):
        for name, shape in res[key]["shard_shapes"].items():
            full = res[key]["W"][name].shape
            assert shape[0] < full[0] or full[0] == 1 or shape[0] == 0 and tuple(shape[1:]) == tuple(full[1:])
    # the same layer has the same owner node on both processes of a node (its LMO runs on their shards together)
    for node in (0, 1):
        assert fsdp_run[2 * node][key]["served"] == fsdp_run[2 * node + 1][key]["served"]


def test_compressed_trains(fsdp_run):
    """Loss falls by at least half as much as uncompressed HSDP's over the same steps, on ~7x fewer uplink bytes."""
    key = repr(sorted(COMPRESSED.items()))
    for res in fsdp_run:
        losses, dense = res[key]["losses"], res["hsdp"]["losses"]
        end = lambda xs: sum(xs[-3:]) / 3  # noqa: E731
        assert losses[0] - end(losses) > 0.5 * (dense[0] - end(dense)) > 0, (losses, dense)
        assert res[key]["ledger"]["compression_ratio"] > 3
