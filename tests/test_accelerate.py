"""Accelerate plugin and transformers integration.

References: plain Accelerate DDP with the same optimizer (identity compressors must match it), the top_k bit formula
of docs/algorithm.md §3, an uninterrupted run (resume), and plain single-process training. Multi-process cases run in 2
gloo processes started once per module (tests/accelerate_helpers.py); single-process cases run in this process.
"""

from __future__ import annotations

import math

import pytest
import torch
from accelerate.tracking import GeneralTracker

from accelerate_helpers import (RandomTokens, accelerate_scenarios, fresh_accelerator, fresh_accelerator_state,
                                hf_scenarios, run_hf_trainer, tiny_llama)
from dist_helpers import check_ok, make_data, make_model, make_optimizer, mse, run_distributed
from ef_lightning.accelerate import EF21Plugin


def topk_bits(d: int, ratio: float, f: int = 32) -> int:
    """docs/algorithm.md §3: K = ceil(r*d) values and indices, or values plus a d-bit mask, whichever is smaller."""
    K = math.ceil(ratio * d)
    return min(K * (f + math.ceil(math.log2(d))), f * K + d)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# torch's LR schedulers warn when optimizer.step() is not the method they wrapped, or was not called before them:
# the EF21 step must keep both contracts, whether the scheduler was built before prepare or after (transformers).
pytestmark = pytest.mark.filterwarnings(r"error:.*optimizer\.step\(\):UserWarning")


@pytest.fixture(autouse=True)
def _clean_accelerate_state():
    """Accelerate keeps process-wide state; every in-process test starts and ends without it."""
    fresh_accelerator_state()
    yield
    fresh_accelerator_state()


def _counts(ledger_state: dict) -> list[dict]:
    """A ledger state_dict's records without the wall-clock fields (uplink seconds differ between runs)."""
    drop = ("uplink_seconds", "uplink_overlap_seconds")
    return [{k: v for k, v in r.items() if k not in drop} for r in ledger_state["records"]]


# ------------------------------------------------------------------------------------------------ configuration
def test_env_configures_plugin_and_explicit_arguments_win(monkeypatch):
    for k, v in {"EF21_MUON": "1", "EF21_UPLINK": "top_k:0.05+natural", "EF21_DOWNLINK": "top_k:0.5",
                 "EF21_TOPOLOGY": "server", "EF21_SERVER_RANK": "1", "EF21_SEED": "7",
                 "EF21_ON_NONFINITE": "raise", "EF21_FUSED": "0", "EF21_OVERLAP": "off",
                 "EF21_BUCKET_CAP_MB": "4", "EF21_SYNC_EVERY": "8", "EF21_OUTER": "lmo", "EF21_OUTER_LR": "2.5",
                 "EF21_OUTER_MOMENTUM": "0.8", "EF21_FRAGMENTS": "2"}.items():
        monkeypatch.setenv(k, v)
    p = EF21Plugin()
    assert p.enabled is True
    assert p.config.to_dict() == {"uplink": "top_k:0.05+natural", "downlink": "top_k:0.5", "topology": "server",
                                  "server_rank": 1, "seed": 7, "on_nonfinite": "raise", "estimator": "ef21", "p": None,
                                  "participation": None, "fused": False, "overlap": False, "bucket_cap_mb": 4.0,
                                  "local_world_size": None, "sync_every": 8, "outer": "lmo", "outer_lr": 2.5,
                                  "outer_momentum": 0.8, "fragments": 2}
    for k in ("EF21_SYNC_EVERY", "EF21_OUTER", "EF21_OUTER_LR", "EF21_OUTER_MOMENTUM", "EF21_FRAGMENTS"):
        monkeypatch.delenv(k)
    q = EF21Plugin(enabled=False, uplink="identity", topology="sharded", seed=3)
    c = q.config
    assert (q.enabled, c.uplink, c.topology, c.seed, c.downlink) == (False, "identity", "sharded", 3, "top_k:0.5")
    assert q.downlink is None  # the field says what was given; .config what is in force
    # the environment's compressed downlink cannot go with an explicit allgather (which has no downlink): the
    # combination fails at start-up, naming the variable
    with pytest.raises(ValueError, match=r"EF21_DOWNLINK='top_k:0\.5'.*allgather.*downlink='identity'"):
        EF21Plugin(enabled=False, topology="allgather")
    monkeypatch.setenv("EF21_UPLINK", "hidden=top_k:0.1, default=identity")
    assert EF21Plugin().config.uplink == {"hidden": "top_k:0.1", "default": "identity"}


def test_defaults_without_environment(monkeypatch):
    for k in ("EF21_MUON", "EF21_UPLINK", "EF21_DOWNLINK", "EF21_TOPOLOGY", "EF21_SERVER_RANK", "EF21_SEED",
              "EF21_ON_NONFINITE", "EF21_ESTIMATOR", "EF21_P", "EF21_PARTICIPATION", "EF21_SYNC_EVERY", "EF21_OUTER",
              "EF21_OUTER_LR", "EF21_OUTER_MOMENTUM", "EF21_FRAGMENTS"):
        monkeypatch.delenv(k, raising=False)
    p = EF21Plugin()
    assert p.enabled is False and p.ledger is None and p.metrics() == {}
    from ef_lightning.config import DEFAULT_DOWNLINK, DEFAULT_UPLINK, EF21Config

    assert p.config == EF21Config()  # the library's defaults, one source of truth
    assert p.config.to_dict() == {"uplink": dict(DEFAULT_UPLINK), "downlink": dict(DEFAULT_DOWNLINK),
                                  "topology": "sharded", "server_rank": 0, "seed": 0, "on_nonfinite": "skip",
                                  "estimator": "ef21", "p": None, "participation": None, "fused": True,
                                  "overlap": True, "bucket_cap_mb": 25.0, "local_world_size": None,
                                  "sync_every": 1, "outer": "nesterov", "outer_lr": None, "outer_momentum": 0.9,
                                  "fragments": 1}


def test_plugin_fields_are_the_config_options():
    """The plugin restates EF21Config's options as dataclass fields (one per environment variable, Accelerate's
    pattern): they must not drift apart."""
    import dataclasses

    from ef_lightning.config import DEFAULT_UPLINK, EF21Config

    assert [f.name for f in dataclasses.fields(EF21Plugin) if f.init] == ["enabled"] + [
        f.name for f in dataclasses.fields(EF21Config)]
    with pytest.raises(dataclasses.FrozenInstanceError):  # a later assignment could not reach .config: refused
        EF21Plugin().uplink = "rank:4"
    assert DEFAULT_UPLINK["hidden"] in dataclasses.fields(EF21Plugin)[1].metadata["help"]  # default from the constant


@pytest.mark.parametrize("var, value, choices", [
    ("EF21_UPLINK", "topk:0.1", "top_k"),
    ("EF21_DOWNLINK", "top_k:0", "ratio in (0, 1]"),
    ("EF21_UPLINK", "head=top_k:0.1,middle=identity", "hidden, conv, embedding, head"),
    ("EF21_TOPOLOGY", "ring", "sharded, allgather, server"),
    ("EF21_MUON", "maybe", "1, true, yes, on"),
    ("EF21_ON_NONFINITE", "ignore", "skip, raise"),
    ("EF21_SEED", "x1", "integers >= 0"),
    ("EF21_ESTIMATOR", "storm", "ef21, marina, ef21_page, mvr"),
    ("EF21_P", "1.5", "numbers in (0, 1]"),
    ("EF21_P", "often", "numbers in (0, 1]"),
    ("EF21_PARTICIPATION", "0", "numbers in (0, 1]"),
    ("EF21_SYNC_EVERY", "often", "integers >= 1"),
    ("EF21_SYNC_EVERY", "0", "integers >= 1"),
    ("EF21_OUTER", "adam", "nesterov, lmo"),
    ("EF21_OUTER_LR", "0.5", "sync_every > 1"),
    ("EF21_OUTER_MOMENTUM", "1", "numbers in [0, 1)"),
    ("EF21_FRAGMENTS", "x", "integers >= 1"),
])
def test_invalid_environment_fails_at_startup(monkeypatch, var, value, choices):
    monkeypatch.setenv("EF21_MUON", "1")
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError) as e:
        EF21Plugin()
    msg = str(e.value)
    assert var in msg and repr(value) in msg and choices in msg, msg


def test_invalid_environment_fails_when_ef21_trainer_is_built(monkeypatch, tmp_path):
    from transformers import TrainingArguments

    from ef_lightning.callbacks.hf import EF21Trainer

    monkeypatch.setenv("EF21_MUON", "1")
    monkeypatch.setenv("EF21_UPLINK", "topk:0.1")
    with pytest.raises(ValueError, match=r"EF21_UPLINK='topk:0\.1'.*valid names: identity, top_k"):
        EF21Trainer(model=tiny_llama(), args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]))


# ------------------------------------------------------------------------------------------------ one process
def _single_process_run(plugin: EF21Plugin, steps: int = 10, **accelerator_kwargs):
    accelerator = fresh_accelerator(**accelerator_kwargs)
    model = make_model(0)
    model, optimizer = plugin.prepare(accelerator, model, make_optimizer(model))
    # a scheduler built on the prepared optimizer (as the transformers Trainer does) wraps its step() after prepare
    scheduler = accelerator.prepare(torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.9 ** s))
    if accelerator_kwargs.get("log_with"):
        accelerator.init_trackers("ef21")
    for step, batch in enumerate(row[0] for row in make_data(1, steps)):
        accelerator.backward(mse(model, batch))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        accelerator.log(plugin.metrics(), step=step)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, scheduler.get_last_lr()


class MemoryTracker(GeneralTracker):
    """An Accelerate tracker that keeps what ``accelerator.log`` sends it."""

    name = "memory"
    requires_logging_directory = False

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[int, dict]] = []

    @property
    def tracker(self):
        return self

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self.logged.append((step, dict(values)))


def test_single_process_with_flag_matches_plain_training():
    """One process (a debug run): the engine as the only worker; identity compressors = plain training."""
    from ef_lightning import EF21Engine

    W_plain, lr_plain = _single_process_run(EF21Plugin(enabled=False))
    plugin = EF21Plugin(enabled=True, uplink="identity", downlink="identity")
    W_ef21, lr_ef21 = _single_process_run(plugin)
    assert isinstance(plugin.engine, EF21Engine) and plugin.engine.transport.world_size == 1
    assert max_diff(W_plain, W_ef21) <= 1e-6
    assert lr_plain == lr_ef21 and lr_ef21[0] < make_optimizer(make_model()).defaults["lr"]
    assert plugin.ledger.summary()["steps"] == 10


def test_single_process_top_k_ledger_and_accelerator_log():
    plugin = EF21Plugin(enabled=True, uplink="top_k:0.1")
    tracker = MemoryTracker()
    W, _ = _single_process_run(plugin, steps=4, log_with=[tracker])
    per_step = sum(topk_bits(w.numel(), 0.1) for w in W.values())
    assert [r.uplink_bits for r in plugin.ledger.records] == [per_step] * 4
    assert [step for step, _ in tracker.logged] == [0, 1, 2, 3]
    for step, m in tracker.logged:
        assert m["comm/uplink_bits"] == per_step and m["comm/uplink_bits_total"] == (step + 1) * per_step
        assert m["comm/steps"] == step + 1 and m["comm/compression_ratio"] > 5
    assert tracker.logged[-1][1] == plugin.ledger.metrics()


def test_nonfinite_step_is_reported_as_skipped_and_scheduler_holds():
    accelerator = fresh_accelerator()
    model = make_model(0)
    optimizer = make_optimizer(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 ** s)
    plugin = EF21Plugin(enabled=True)
    model, optimizer, scheduler = plugin.prepare(accelerator, model, optimizer, scheduler)
    batch = make_data(1, 1)[0][0]
    accelerator.backward(mse(model, batch))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    next(model.parameters()).grad[0, 0] = float("nan")
    lr = scheduler.get_last_lr()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        optimizer.step()
    scheduler.step()
    assert optimizer.step_was_skipped and accelerator.optimizer_step_was_skipped
    assert scheduler.get_last_lr() == lr  # AcceleratedScheduler does not advance on a skipped step
    assert max_diff(before, {n: p.detach() for n, p in model.named_parameters()}) == 0
    optimizer.zero_grad()
    accelerator.backward(mse(model, batch))
    optimizer.step()
    scheduler.step()
    assert not accelerator.optimizer_step_was_skipped and scheduler.get_last_lr() != lr


def test_loading_a_checkpoint_without_ef21_state_says_what_is_missing(tmp_path):
    accelerator = fresh_accelerator()
    model = make_model(0)
    plugin = EF21Plugin(enabled=True)
    model, optimizer = plugin.prepare(accelerator, model, make_optimizer(model))
    accelerator.save_state(str(tmp_path / "ok"))
    assert (tmp_path / "ok" / "ef21_rank0.pt").is_file()
    accelerator.load_state(str(tmp_path / "ok"))
    (tmp_path / "ok" / "ef21_rank0.pt").rename(tmp_path / "ok" / "ef21_rank1.pt")
    with pytest.raises(ValueError, match=r"ef21_rank0\.pt does not exist .*\['ef21_rank1\.pt'\]"):
        accelerator.load_state(str(tmp_path / "ok"))


def test_prepare_rejects_grad_scaler_and_extra_models():
    accelerator = fresh_accelerator()
    model = make_model(0)
    accelerator.scaler = torch.amp.GradScaler("cpu")  # what mixed_precision="fp16" creates on a GPU
    with pytest.raises(ValueError, match=r"mixed_precision=.*valid choices with EF21: 'no', 'bf16'"):
        EF21Plugin(enabled=True).prepare(accelerator, model, make_optimizer(model))
    accelerator.scaler = None
    with pytest.raises(ValueError, match="exactly one model and one optimizer"):
        EF21Plugin(enabled=True).prepare(accelerator, model, make_model(1), make_optimizer(model))


# ------------------------------------------------------------------------------------------------ two processes
@pytest.fixture(scope="module")
def acc_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("accelerate")
    return check_ok(run_distributed(accelerate_scenarios, 2, tmp, ckpt=str(tmp / "ckpt")))


def test_without_flag_the_script_is_plain_accelerate(acc_results):
    for res in acc_results:
        assert res["plain"]["engine"] is None and res["plain"]["ledger"] is None and res["plain"]["metrics"] == {}
    # plain DDP: gradients are all-reduced, so both ranks hold the same gradient and weights
    assert torch.equal(acc_results[0]["plain"]["first_grad"], acc_results[1]["plain"]["first_grad"])
    assert max_diff(acc_results[0]["plain"]["W"], acc_results[1]["plain"]["W"]) == 0


def test_with_flag_ddp_sends_nothing(acc_results):
    """noop_hook: after backward each rank still holds its own gradient (EF21 does the exchange)."""
    g0, g1 = (res["ef21"]["first_grad"] for res in acc_results)
    assert not torch.allclose(g0, g1)
    torch.testing.assert_close((g0 + g1) / 2, acc_results[0]["plain"]["first_grad"], atol=1e-6, rtol=0)


def test_flag_with_identity_matches_plain_ddp(acc_results):
    for res in acc_results:
        assert res["ef21"]["engine"] == "EF21Engine"
        assert res["ef21"]["losses"][0] == res["plain"]["losses"][0]
        assert max_diff(res["plain"]["W"], res["ef21"]["W"]) <= 1e-6
        # the prepared LR scheduler stepped exactly as with plain Accelerate
        assert res["ef21"]["lr"] == res["plain"]["lr"]
        assert res["ef21"]["ledger"]["steps"] == 10 and res["ef21"]["ledger"]["compression_ratio"] == 1.0


def test_top_k_ledger_equals_closed_form(acc_results):
    for res in acc_results:
        W = res["topk"]["W"]
        per_step = sum(topk_bits(w.numel(), 0.1) for w in W.values())
        assert [r["uplink_bits"] for r in res["topk"]["records"]] == [per_step] * 3
        assert res["topk"]["ledger"]["uplink_bits_per_worker"] == 3 * per_step
        # identity downlink (sharded): every float of X once per step
        assert res["topk"]["ledger"]["downlink_bits"] == 3 * sum(32 * w.numel() for w in W.values())
        assert res["topk"]["metrics"]["comm/uplink_bits"] == per_step


def test_gradient_accumulation_syncs_once_per_optimizer_step(acc_results):
    for res in acc_results:
        plain, ef21 = res["plain_accum"], res["ef21_accum"]
        assert plain["syncs"] == ef21["syncs"] == 4  # 8 micro-batches / 2
        assert ef21["engine_steps"] == ef21["syncs"] == ef21["ledger"]["steps"]
        assert ef21["inner_steps"] == plain["inner_steps"] == 4  # sharded: this rank's server step, once per sync
        assert max_diff(plain["W"], ef21["W"]) <= 1e-6


def test_save_state_load_state_continues_bit_identically(acc_results):
    for r, res in enumerate(acc_results):
        out = res["resume"]
        assert out["files"] == ["ef21_rank0.pt", "ef21_rank1.pt"]
        full, resumed = out["full"], out["resumed"]
        for part in ("W", "X"):
            for k, v in full[part].items():
                assert torch.equal(v, resumed[part][k]), (r, part, k)
        for part in ("worker", "server"):
            for kind, tensors in full["ef21"][part].items():
                for k, v in tensors.items():
                    assert torch.equal(v, resumed["ef21"][part][kind][k]), (r, part, kind, k)
        assert _counts(full["ef21"]["ledger"]) == _counts(resumed["ef21"]["ledger"]) and full["ef21"]["step"] == 6
        assert full["lr"] == resumed["lr"]
    # per-rank state really differs (a checkpoint of rank 0's state alone would not resume rank 1)
    g0, g1 = (res["resume"]["full"]["ef21"]["worker"]["G"] for res in acc_results)
    assert any(not torch.equal(g0[k], g1[k]) for k in g0)


def test_local_steps_with_accumulation_resume_mid_round_bit_identically(acc_results):
    """EF21_SYNC_EVERY=3, gradient_accumulation_steps=2, save_state after 4 optimizer steps (one into a round)."""
    Ws = []
    for r, res in enumerate(acc_results):
        full, resumed = res["local_resume"]["full"], res["local_resume"]["resumed"]
        for part in ("W", "X"):
            for k, v in full[part].items():
                assert torch.equal(v, resumed[part][k]), (r, part, k)
        for kind, tensors in full["ef21"]["local"].items():
            for k, v in tensors.items():
                assert torch.equal(v, resumed["ef21"]["local"][kind][k]), (r, kind, k)
        assert full["ef21"]["step"] == 7 and full["ef21"]["local_options"]["sync_every"] == 3 and full["lr"] == resumed["lr"]
        assert [x["synced"] for x in full["records"]] == [False, False, True] * 2 + [False]
        assert _counts(full["ef21"]["ledger"]) == _counts(resumed["ef21"]["ledger"])
        Ws.append(full["W"])
    assert any(not torch.equal(Ws[0][k], Ws[1][k]) for k in Ws[0])  # mid-round each rank holds its own W_j


# ------------------------------------------------------------------------------------------------ transformers
def test_communication_callback_reaches_stock_trainer_log_history(tmp_path):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from ef_lightning.callbacks.hf import CommunicationCallback
    from ef_lightning.comm import Ledger, StepRecord

    ledger = Ledger()

    class FakeEngine(TrainerCallback):  # stands in for any engine that records one StepRecord per optimizer step
        def on_optimizer_step(self, args, state, control, **kwargs):
            ledger.record(StepRecord(step=len(ledger.records), uplink_bits=800, uplink_wire_bytes=100,
                                     dense_bytes=400))

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, logging_steps=1,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=RandomTokens(16),
                      callbacks=[FakeEngine(), CommunicationCallback(ledger)])
    trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["comm/uplink_bits_total"] for h in steps] == [800, 1600, 2400]
    assert all(h["comm/uplink_bits"] == 800 and h["comm/compression_ratio"] == 4.0 for h in steps)
    assert trainer.state.log_history[-1]["comm/steps"] == 3  # the end-of-training summary entry too


def test_ef21_trainer_single_process_logs_closed_form_bits(tmp_path):
    out = run_hf_trainer(str(tmp_path), ef21=True, steps=3, uplink="top_k:0.1")
    per_step = sum(topk_bits(math.prod(s), 0.1) for s in out["shapes"].values())
    steps = [h for h in out["log_history"] if "loss" in h]
    assert [h["comm/uplink_bits_total"] for h in steps] == [per_step, 2 * per_step, 3 * per_step]
    assert all(h["comm/uplink_bits"] == per_step for h in steps)
    assert out["ledger"]["steps"] == 3


@pytest.fixture(scope="module")
def hf_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf")
    return check_ok(run_distributed(hf_scenarios, 2, tmp, out_dir=str(tmp / "runs")))


def test_ef21_trainer_matches_stock_trainer_ddp(hf_results):
    """2 processes, 4 optimizer steps of 2 accumulated micro-batches each: one EF21 sync per optimizer step."""
    for res in hf_results:
        assert res["plain"]["world"] == res["ef21"]["world"] == 2
        assert max_diff(res["plain"]["W"], res["ef21"]["W"]) <= 1e-6
        assert res["plain"]["ledger"] is None and res["ef21"]["ledger"]["steps"] == 4
        logged = [h for h in res["ef21"]["log_history"] if "loss" in h]
        assert [h["comm/steps"] for h in logged] == [1, 2, 3, 4]
        assert logged[-1]["comm/uplink_bits_total"] == res["ef21"]["ledger"]["uplink_bits_per_worker"]
        assert not any(k.startswith("comm/") for h in res["plain"]["log_history"] for k in h)


def test_ef21_trainer_resume_is_bit_identical(hf_results):
    for res in hf_results:
        full, resumed = res["full"], res["resumed"]
        for k, v in full["W"].items():
            assert torch.equal(v, resumed["W"][k]), k
        assert full["ledger"] == resumed["ledger"]


# ------------------------------------------------------------------------------------------------ VR estimators
def test_estimator_environment_reaches_engine_kwargs(monkeypatch):
    for k, v in {"EF21_MUON": "1", "EF21_ESTIMATOR": "marina", "EF21_P": "0.25", "EF21_TOPOLOGY": "server",
                 "EF21_PARTICIPATION": "0.5", "EF21_UPLINK": "natural"}.items():
        monkeypatch.setenv(k, v)
    cfg = EF21Plugin().config
    assert (cfg.estimator, cfg.p, cfg.participation, cfg.topology) == ("marina", 0.25, 0.5, "server")
    monkeypatch.delenv("EF21_P")
    assert EF21Plugin(estimator="mvr").estimator == "mvr"  # an explicit argument wins over EF21_ESTIMATOR


@pytest.mark.parametrize("env, var, valid", [
    ({"EF21_ESTIMATOR": "mvr", "EF21_P": "0.5"}, "EF21_P", "marina, ef21_page"),
    ({"EF21_ESTIMATOR": "ef21", "EF21_P": "0.5"}, "EF21_P", "marina, ef21_page"),
    ({"EF21_PARTICIPATION": "0.5", "EF21_TOPOLOGY": "sharded"}, "EF21_PARTICIPATION", "server"),
])
def test_inconsistent_estimator_settings_fail_at_startup(monkeypatch, env, var, valid):
    monkeypatch.setenv("EF21_MUON", "1")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError) as e:
        EF21Plugin()
    msg = str(e.value)
    assert var in msg and repr(float(env[var])) in msg and valid in msg, msg


def test_vr_estimator_without_closure_raises_on_first_step():
    accelerator = fresh_accelerator()
    model = make_model(0)
    plugin = EF21Plugin(enabled=True, estimator="mvr", uplink="top_k:0.2")
    model, optimizer = plugin.prepare(accelerator, model, make_optimizer(model))
    accelerator.backward(mse(model, make_data(1, 1)[0][0]))
    with pytest.raises(ValueError, match=r"estimator='mvr' needs optimizer\.step\(closure\).*'ef21'"):
        optimizer.step()


def test_vr_estimator_rejects_gradient_accumulation():
    accelerator = fresh_accelerator(gradient_accumulation_steps=2)
    model = make_model(0)
    with pytest.raises(ValueError, match=r"estimator='ef21_page' with gradient_accumulation_steps=2.*valid choices"):
        EF21Plugin(enabled=True, estimator="ef21_page", uplink="top_k:0.2").prepare(
            accelerator, model, make_optimizer(model))


def _simulator_reference(estimator: str, world: int, steps: int, **kwargs):
    """The independent reference: the Simulator (n = world workers in this process) on the same shards."""
    from ef_lightning import Simulator

    model = make_model(0)
    sim = Simulator(model, make_optimizer(model), n_workers=world, estimator=estimator, **kwargs)
    data = make_data(world, steps)
    for s in range(steps):
        sim.step(mse, data[s])
    return {n: p.detach().clone() for n, p in model.named_parameters()}, sim.server_model(), sim


def test_single_process_vr_with_closure_matches_simulator():
    """One process: the plugin's closure path gives the 1-worker Simulator's trajectory and gradient count."""
    from accelerate_helpers import _vr_train

    plugin = EF21Plugin(enabled=True, estimator="ef21_page", uplink="top_k:0.2", downlink="identity", p=0.5)
    accelerator = fresh_accelerator()
    model = make_model(0)
    model, optimizer = plugin.prepare(accelerator, model, make_optimizer(model))
    _vr_train(model, optimizer, accelerator, make_data(1, 5), 0, 0, 5)
    W_ref, X_ref, sim = _simulator_reference("ef21_page", 1, 5, uplink="top_k:0.2", downlink="identity", p=0.5)
    assert max_diff(W_ref, {n: p.detach() for n, p in model.named_parameters()}) <= 1e-6
    assert max_diff(X_ref, plugin.engine.server_model()) <= 1e-6
    # 1 gradient on the first step, 2 on each later one (docs/algorithm.md §4: two evaluations per step)
    assert plugin.ledger.summary()["gradient_evaluations_per_worker"] == 1 + 2 * 4


def test_vr_estimators_match_simulator(acc_results):
    """2 processes with optimizer.step(closure) = the Simulator with the same estimator, compressors and shards."""
    from accelerate_helpers import VR_CASES, VR_STEPS

    for name, settings in VR_CASES.items():
        kwargs = {k: v for k, v in settings.items() if k in ("uplink", "downlink")}
        if "p" in settings:
            kwargs["p"] = float(settings["p"])
        if "participation" in settings:
            kwargs["participation"] = float(settings["participation"])
        W_ref, X_ref, sim = _simulator_reference(settings["estimator"], 2, VR_STEPS, **kwargs)
        for r, res in enumerate(acc_results):
            out = res[f"vr_{name}"]
            assert out["p"] == sim.p, (name, r)
            assert max_diff(W_ref, out["W"]) <= 1e-6, (name, r, max_diff(W_ref, out["W"]))
            assert max_diff(X_ref, out["X"]) <= 1e-6, (name, r, max_diff(X_ref, out["X"]))
            assert out["ledger"]["steps"] == VR_STEPS


def test_vr_save_state_load_state_is_bit_identical(acc_results):
    for r, res in enumerate(acc_results):
        full, resumed = res["vr_resume"]["full"], res["vr_resume"]["resumed"]
        for part in ("W", "X"):
            for k, v in full[part].items():
                assert torch.equal(v, resumed[part][k]), (r, part, k)
        assert full["ef21"]["worker"]["V"], "mvr keeps V_j"
        for kind, tensors in full["ef21"]["worker"].items():
            for k, v in tensors.items():
                assert torch.equal(v, resumed["ef21"]["worker"][kind][k]), (r, kind, k)
        for k, v in full["ef21"]["W_prev"].items():
            assert torch.equal(v, resumed["ef21"]["W_prev"][k]), (r, "W_prev", k)
        assert _counts(full["ef21"]["ledger"]) == _counts(resumed["ef21"]["ledger"]) and full["ef21"]["applied"] == 6


def test_server_model_context_loads_x_and_restores_w():
    """One process (the engine as the only worker) with a compressed downlink: inside the block the parameters are X, then W."""
    model = make_model()
    opt = make_optimizer(model)
    acc = fresh_accelerator()
    plugin = EF21Plugin(enabled=True, uplink="top_k:0.3", downlink="top_k:0.3")
    model, opt = plugin.prepare(acc, model, opt)
    data = make_data(1, 3)
    for k in range(3):
        opt.zero_grad()
        acc.backward(mse(model, data[k][0]))
        opt.step()
    X = plugin.engine.server_model()
    W = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert any(not torch.equal(X[n], W[n]) for n in X)
    with plugin.at_server_model():
        for n, p in model.named_parameters():
            assert torch.equal(p, X[n])
    for n, p in model.named_parameters():
        assert torch.equal(p, W[n])
