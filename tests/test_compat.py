"""Pins on the framework behaviour the adapters rely on beyond public APIs. Each test fails loudly, naming what
changed, if an upgrade of torch, Lightning or Accelerate breaks the assumption (docs/architecture.md lists them)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import ef_lightning as efl
from dist_helpers import make_data, make_model, make_optimizer, mse


def test_accelerate_step_was_skipped_reads_is_overflow():
    """ef_lightning.accelerate._report_skipped sets AcceleratedOptimizer._is_overflow (no public setter exists):
    ``step_was_skipped`` and ``accelerator.optimizer_step_was_skipped`` must report it, as after an fp16 overflow."""
    from accelerate_helpers import fresh_accelerator, fresh_accelerator_state

    from ef_lightning.accelerate import _report_skipped

    fresh_accelerator_state()
    try:
        accelerator = fresh_accelerator()
        model = make_model(0)
        _, optimizer = accelerator.prepare(model, make_optimizer(model))
        assert optimizer.step_was_skipped is False
        _report_skipped(optimizer, True)
        assert optimizer.step_was_skipped is True, "AcceleratedOptimizer.step_was_skipped no longer reads _is_overflow"
        assert accelerator.optimizer_step_was_skipped is True
        _report_skipped(optimizer, False)
        assert accelerator.optimizer_step_was_skipped is False
    finally:
        fresh_accelerator_state()


def test_lightning_logging_off_silences_self_log(tmp_path):
    """ef_lightning.strategy._logging_off shadows a LightningModule's log/log_dict on the instance: inside it
    nothing reaches the trainer's metrics, outside it logging works, and the class methods are back afterwards."""
    from lightning.pytorch import LightningModule, Trainer

    from ef_lightning.strategy import _logging_off

    class Probe(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            loss = self.net(batch[0]).pow(2).mean()
            with _logging_off(self):
                self.log("silenced", 1.0)
                self.log_dict({"silenced_dict": 2.0})
            self.log("kept", 3.0)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 2)), batch_size=2)
    module = Probe()
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(module, data)
    assert "kept" in trainer.callback_metrics
    assert "silenced" not in trainer.callback_metrics and "silenced_dict" not in trainer.callback_metrics
    assert "log" not in vars(module) and "log_dict" not in vars(module)


@pytest.mark.parametrize("scheduler_first", [True, False])
def test_torch_lr_scheduler_wraps_the_engines_step(scheduler_first):
    """torch's LR schedulers wrap ``optimizer.step`` (they call ``step.__func__`` and mark it
    ``_wrapped_by_lr_sched``) and warn when it was not called before ``scheduler.step()``. The engine's step must keep
    both contracts whether the scheduler was built before or after the engine, and the LR must really change."""
    model = make_model(0)
    opt = make_optimizer(model)
    lr0 = opt.param_groups[0]["lr"]
    make_sched = lambda: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # noqa: E731
    sched = make_sched() if scheduler_first else None
    engine = efl.EF21Engine(model, opt, uplink="top_k:0.3", downlink="identity", topology="allgather")
    if sched is None:
        sched = make_sched()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r".*optimizer\.step\(\).*")
        for batch in make_data(1, 3):
            opt.zero_grad(set_to_none=True)
            mse(model, batch[0]).backward()
            opt.step()
            sched.step()
    assert engine.ledger.summary()["steps"] == 3
    assert opt.param_groups[0]["lr"] == pytest.approx(lr0 * 0.5**3)


def test_torch_compile_wrapper_exposes_the_wrapped_module_as_orig_mod():
    """ef_lightning.accelerate._find_ddp looks through ``torch.compile`` (which Accelerate may put outside the DDP
    wrapper) via ``OptimizedModule._orig_mod``; torch has no public accessor for it."""
    from ef_lightning.accelerate import _find_ddp

    module = nn.Linear(2, 2)
    compiled = torch.compile(module)  # wrapping only: nothing is compiled until it is called
    assert compiled._orig_mod is module, "torch.compile's OptimizedModule no longer exposes _orig_mod"
    assert _find_ddp(compiled) is None  # looked through the wrapper and found no DDP (one process)


def test_group_timeout_reads_the_backend_options(tmp_path):
    """ef_lightning.comm._group_timeout reads a process group's timeout from its backend's options (no public
    getter): the hierarchical topology gives its node and cross-node groups the run's timeout, not torch's 30 min."""
    import datetime

    from dist_helpers import check_ok, group_timeout, run_distributed

    (got,) = check_ok(run_distributed(group_timeout, 1, tmp_path))
    assert got == datetime.timedelta(seconds=60), f"ProcessGroup backend options no longer carry _timeout: {got!r}"
