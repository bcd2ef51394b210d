"""Lightning strategy: real 2-process CPU runs (gloo) of tests/lightning_scenarios.py against plain DDP."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ef_lightning as efl

pytestmark = pytest.mark.slow  # multi-process: the bulk of the suite's time (deselect: -m 'not slow')

HERE = Path(__file__).parent
TWO_PROC = ["vs_ddp", "topk_csv", "resume", "accumulate", "bf16", "adamw", "vr", "participation", "local"]


def _run(out: Path, devices: int, *scenarios: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(HERE / "lightning_scenarios.py"), str(out), str(devices), *scenarios],
                          env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"scenario run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lightning")
    _run(out, 2, *TWO_PROC)
    _run(out, 1, "world_change")
    return out


def _load(out: Path, name: str, rank: int = 0):
    return torch.load(out / f"{name}_rank{rank}.pt", weights_only=False)


def _maxdiff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_registry_resolves_strategy():
    from lightning.pytorch import Trainer
    from lightning.pytorch.strategies import StrategyRegistry

    assert "ef21_muon" in StrategyRegistry and "ef21_muon_spawn" in StrategyRegistry
    t = Trainer(strategy="ef21_muon", accelerator="cpu", devices=2, logger=False, enable_progress_bar=False)
    assert isinstance(t.strategy, efl.EF21MuonStrategy)


@pytest.mark.parametrize("kwargs,match", [({"uplink": "topk:0.1"}, "topk"), ({"uplink": "top_k:0"}, "top_k:0"),
                                          ({"topology": "allgather", "downlink": "top_k:0.1"}, "allgather"),
                                          ({"topology": "ring"}, "ring"), ({"uplink": {"hiden": "top_k:0.1"}}, "hiden"),
                                          ({"resume_world_size": "maybe"}, "maybe")])
def test_bad_strategy_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        efl.EF21MuonStrategy(**kwargs)


def test_identity_matches_ddp_with_same_lmo(runs):
    for r in (0, 1):
        ef, ddp = _load(runs, "vs_ddp_ef21", r)["weights"], _load(runs, "vs_ddp_ddp", r)["weights"]
        assert _maxdiff(ef, ddp) <= 1e-6


def test_any_torch_optimizer_matches_ddp(runs):
    res = _load(runs, "adamw")
    assert _maxdiff(res["ef21"], res["ddp"]) <= 1e-6


def _topk_bits(d: int, ratio: float, f: int = 32) -> int:
    K = math.ceil(ratio * d)
    return min(K * (f + math.ceil(math.log2(d))), f * K + d)


def test_monitor_logs_the_mean_over_ranks_when_workers_skip_rounds(runs):
    """participation=0.5 with 2 ranks: one rank sends per round, so each rank's own uplink count differs; the
    monitor logs the cross-rank mean (torchmetrics), which is the per-worker average."""
    own = [_load(runs, "participation", r)["records"] for r in (0, 1)]
    assert all((a > 0) != (b > 0) for a, b in zip(*own))  # exactly one sender per round
    rows = [r for r in csv.DictReader(open(runs / "participation_csv" / "version_0" / "metrics.csv"))
            if r.get("comm/uplink_bits")]
    assert len(rows) == 6
    for r, a, b in zip(rows, *own):
        assert float(r["comm/uplink_bits"]) == (a + b) / 2


def test_topk_bits_logged_in_csv_equal_closed_form(runs):
    res = _load(runs, "topk")
    per_step = sum(_topk_bits(math.prod(s), 0.1) for s in res["shapes"].values())
    rows = list(csv.DictReader(open(runs / "topk_csv" / "version_0" / "metrics.csv")))
    steps = [r for r in rows if r.get("comm/uplink_bits")]
    assert len(steps) == 10
    for i, r in enumerate(steps):
        assert float(r["comm/uplink_bits"]) == per_step
        assert float(r["comm/uplink_bits_total"]) == per_step * (i + 1)
        assert float(r["comm/compression_ratio"]) > 1
    assert res["summary"]["uplink_bits_per_worker"] == 10 * per_step
    assert any(r.get("val_loss") for r in rows)  # validation ran (at X: W != X with a top_k downlink)
    assert abs(res["val_logged"] - res["val_at_x"]) <= 1e-6  # validation is reported at the server model X
    assert abs(res["val_at_w"] - res["val_at_x"]) > 1e-6  # ... which differs from W here (compressed downlink)
    assert res["test_at_x"]  # after fit the module holds X, so test/predict evaluate the server model
    assert res["test"][0]["test_loss"] > 0 and res["n_predicted"] == 128  # test and predict loops (256 / 2 ranks)


def test_resume_from_checkpoint_is_bit_identical(runs):
    for r in (0, 1):
        res = _load(runs, "resume", r)
        for k, v in res["full"].items():
            assert torch.equal(v, res["resumed"][k]), k
        assert res["seen_full"][4:] == res["seen_resumed"]  # same data after resuming
        assert res["ledger_resumed"]["steps"] == 10  # the ledger came back with the checkpoint


def test_local_steps_with_accumulation_resume_mid_round_bit_identically(runs):
    """sync_every=4, accumulate_grad_batches=2, checkpoint at step 6 (mid-round): X, each rank's own W_j, its
    error-feedback state and the round's start all continue bit for bit; the monitor logs at outer rounds only."""
    per_rank = [_load(runs, "local", r) for r in (0, 1)]
    for res in per_rank:
        full, resumed = res["full"], res["resumed"]
        assert full["global_step"] == resumed["global_step"] == 10
        for part in ("X", "W"):
            for k, v in full[part].items():
                assert torch.equal(v, resumed[part][k]), (part, k)
        for k in ("G", "M"):
            for name, v in full["worker"][k].items():
                assert torch.equal(v, resumed["worker"][k][name]), (k, name)
        for name, v in full["local"]["start"].items():
            assert torch.equal(v, resumed["local"]["start"][name]), name
        assert full["seen"][12:] == resumed["seen"]  # 2 micro-batches per step: the same data after resuming
        synced = [r["step"] for r in full["records"] if r["synced"]]
        assert synced == [3, 7] and len(full["records"]) == 10  # one record per optimizer step, a sync every 4
        assert resumed["records"] == full["records"] or [r["step"] for r in resumed["records"]] == list(range(10))
    assert any(not torch.equal(per_rank[0]["full"]["W"][k], per_rank[1]["full"]["W"][k])
               for k in per_rank[0]["full"]["W"])  # mid-round the ranks' W_j differ: each resumed its own
    rows = list(csv.DictReader(open(runs / "local_csv" / "version_0" / "metrics.csv")))
    logged = [int(r["step"]) for r in rows if r.get("comm/uplink_bits")]
    assert logged == [3, 7]  # comm/... at the outer rounds (Lightning's step index of the logging batch)
    assert all(float(r["comm/outer_rounds"]) == i + 1 for i, r in enumerate(x for x in rows if x.get("comm/uplink_bits")))


def test_gradient_accumulation_syncs_once_per_optimizer_step(runs):
    res = _load(runs, "acc")
    assert res["global_step"] == 6 and res["batches"] == 12
    assert res["ledger_steps"] == 6  # one EF21 sync per optimizer step, not per micro-batch
    assert _maxdiff(res["ef21"], res["ddp"]) <= 1e-6
    assert res["ef21_overlap"] == (True, 0)  # overlapped, and block_backward_sync kept micro-batches from sending
    assert res["ef21_clip_overlap"] == (False, 0)  # gradient_clip_val: the sync waits for the clipped gradients


def test_bf16_mixed_trains_with_float32_state(runs):
    res = _load(runs, "bf16")
    assert res["dtypes"] == ["torch.float32"]
    assert res["last"] < 0.7 * res["first"]


def test_world_size_change_is_an_error_unless_reinit(runs):
    res = _load(runs, "world_change")
    assert res["error"] and "reinit" in res["error"] and "2 process" in res["error"]
    assert res["reinit_warned"] and res["global_step"] == 8


def test_lightning_cli_takes_strategy_name():
    from lightning.pytorch.cli import LightningCLI
    from lightning_scenarios import Regressor

    cli = LightningCLI(Regressor, run=False, save_config_callback=None,
                       args=["--trainer.strategy", "ef21_muon", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                             "--trainer.logger", "false"])
    assert isinstance(cli.trainer.strategy, efl.EF21MuonStrategy)


def test_monitor_warns_under_another_strategy(tmp_path):
    from lightning.pytorch import Trainer
    from lightning_scenarios import Regressor, loaders

    from ef_lightning.callbacks import CommunicationMonitor

    t = Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, callbacks=[CommunicationMonitor()], default_root_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="not ef21_muon"):
        t.fit(Regressor(), loaders()[0])


def test_variance_reduced_estimators_train_and_resume(runs):
    for r in (0, 1):
        res = _load(runs, "vr", r)
        for est, out in res.items():
            for k, v in out["full"].items():
                assert torch.equal(v, out["resumed"][k]), (est, k)
            # 8 steps: the first takes one gradient, the other 7 two (the second at the previous point)
            assert out["summary"]["gradient_evaluations_per_worker"] == 15, est
            assert out["logged_loss_steps"] == 8 + 7  # training_step ran twice on 7 of the 8 steps


def test_variance_reduced_step_logs_the_loss_at_the_current_point(runs):
    """The second gradient (at the previous point) must not reach the logs or the loop: the logged ``train_loss``,
    the training-step output and an epoch-summed metric are those of W_k, computed independently before each step."""
    for r in (0, 1):
        for est, out in _load(runs, "vr", r).items():
            assert len(out["expected"]) == 8, est
            for step, (want, logged, output) in enumerate(zip(out["expected"], out["logged"], out["outputs"])):
                assert math.isclose(logged, want, rel_tol=1e-5, abs_tol=1e-7), (est, step, logged, want)
                assert math.isclose(output, want, rel_tol=1e-5, abs_tol=1e-7), (est, step, output, want)
            assert math.isclose(out["epoch_sum"], sum(out["expected"]), rel_tol=1e-5), (est, out["epoch_sum"])
            # the previous point is a different point: had its loss been logged, the numbers above would differ
            assert out["expected"][1:] != out["expected"][:-1]


def test_strategy_validates_estimator_arguments(runs):
    assert efl.EF21MuonStrategy(uplink="top_k:0.2", estimator="mvr").config.estimator == "mvr"
    with pytest.raises(ValueError, match="estimator='storm'"):
        efl.EF21MuonStrategy(estimator="storm")
    with pytest.raises(ValueError, match="participation"):
        efl.EF21MuonStrategy(participation=0.5)  # sharded: no partial participation
    with pytest.raises(ValueError, match="p=0"):
        efl.EF21MuonStrategy(estimator="marina", uplink="natural", p=0)
    with pytest.raises(ValueError, match="contractive"):
        efl.EF21MuonStrategy(estimator="marina")  # the default uplink is top_k
    with pytest.raises(ValueError, match="only applies"):
        efl.EF21MuonStrategy(p=0.5)
    # accumulation is checked when fitting starts (1-process run)
    assert "accumulate_grad_batches=2" in _load(runs, "world_change")["vr_accumulate_error"]


def test_monitor_raises_when_a_step_ran_without_the_sync():
    """A Lightning optimizer step that produced no EF21 record (the strategy's step was bypassed) is an error."""
    from types import SimpleNamespace

    from ef_lightning.callbacks import CommunicationMonitor
    from ef_lightning.comm import Ledger

    engine = SimpleNamespace(ledger=Ledger(), layers=[])
    trainer = SimpleNamespace(strategy=SimpleNamespace(engine=engine), global_step=0)
    mon = CommunicationMonitor()
    mon._active = True
    mon.on_train_start(trainer, None)
    trainer.global_step = 1  # Lightning counted an optimizer step ...
    with pytest.raises(RuntimeError, match="without the EF21 sync"):
        mon.on_train_batch_end(trainer, None, None, None, 0)  # ... but the ledger has no record of it
