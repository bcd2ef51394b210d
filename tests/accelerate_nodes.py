"""An Accelerate training script for a multi-node run of ``topology="hierarchical"``, launched once per node by
``accelerate launch --multi_gpu --num_machines N --machine_rank r --num_processes N*G ...`` (tests/test_hierarchical.py).

Usage: ``python tests/accelerate_nodes.py OUT_DIR``. The EF21 settings come from the environment (``EF21_MUON=1``,
``EF21_TOPOLOGY=hierarchical``; the node layout from the launcher's ``LOCAL_WORLD_SIZE``), as a user's script gets
them. Runs: plain DDP (flag off), identity compressors, compressed; then the compressed run saved at step 4 with
``save_state`` and continued by fresh objects after ``load_state``. Writes ``OUT_DIR/accelerate_rank<r>.pt``.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from accelerate_helpers import ef21_env, fresh_accelerator  # noqa: E402
from dist_helpers import make_data, make_model, make_optimizer, mse  # noqa: E402

warnings.filterwarnings("ignore")
torch.set_num_threads(1)
STEPS, SPLIT = 12, 4
COMPRESSED = {"uplink": "top_k:0.25", "downlink": "top_k:0.5"}


def run(out: Path, ckpt: Path) -> dict:
    from ef_lightning.accelerate import EF21Plugin

    def build(seed: int):
        accelerator = fresh_accelerator()
        model = make_model(seed)
        optimizer = make_optimizer(model)
        plugin = EF21Plugin()
        model, optimizer = plugin.prepare(accelerator, model, optimizer)
        return accelerator, model, optimizer, plugin

    def train(accelerator, model, optimizer, lo, hi):
        rank = accelerator.process_index
        for s in range(lo, hi):
            accelerator.backward(mse(model, data[s][rank]))
            optimizer.step()
            optimizer.zero_grad()

    def params(accelerator, model):
        return {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).named_parameters()}

    res: dict = {}
    for name, env in (("ddp", {}), ("identity", {"muon": "1", "topology": "hierarchical", "uplink": "identity",
                                                  "downlink": "identity"}),
                      ("compressed", {"muon": "1", "topology": "hierarchical", **COMPRESSED})):
        with ef21_env(**env):
            accelerator, model, optimizer, plugin = build(0)
            data = make_data(accelerator.num_processes, STEPS)
            train(accelerator, model, optimizer, 0, STEPS)
            res[name] = {"W": params(accelerator, model),
                         "records": [dict(vars(r)) for r in plugin.ledger.records] if plugin.engine else None,
                         "local_world_size": getattr(plugin.engine.transport, "local_world_size", None)
                         if plugin.engine else None}
            if name == "compressed":
                res[name]["X"] = plugin.engine.server_model()
    with ef21_env(muon="1", topology="hierarchical", **COMPRESSED):
        accelerator, model, optimizer, plugin = build(0)
        train(accelerator, model, optimizer, 0, SPLIT)
        accelerator.save_state(str(ckpt))
        accelerator.wait_for_everyone()
        torch.manual_seed(123)
        accelerator, model, optimizer, plugin = build(7)
        accelerator.load_state(str(ckpt))
        train(accelerator, model, optimizer, SPLIT, STEPS)
        res["resumed"] = {"W": params(accelerator, model), "X": plugin.engine.server_model(),
                          "records": [dict(vars(r)) for r in plugin.ledger.records]}
    torch.save(res, out / f"accelerate_rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    return res


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    run(out, out / "ckpt")
    os._exit(0)  # gloo's teardown can abort at interpreter exit; every result is written
