"""Hugging Face transformers integration: communication metrics in the Trainer's logs, and :class:`EF21Trainer`.

:class:`CommunicationCallback` reads a ledger (an :class:`~ef_lightning.accelerate.EF21Plugin`, an engine, a
Simulator or a :class:`~ef_lightning.Ledger`) and puts per-step and cumulative bits, wire bytes and the compression
ratio (:meth:`ef_lightning.Ledger.metrics`, keys ``comm/...``) into the Trainer's training log entries.

Why two pieces (checked on transformers 5.23): ``Trainer.log`` appends ``{**logs, "step": ...}`` to
``state.log_history`` and only then calls every callback's ``on_log``, and the reporting integrations
(``report_to=``: TensorBoard, W&B, ...) are callbacks placed *before* user callbacks. So a callback alone can complete
the entry already in ``state.log_history`` (it does, in ``on_log``; this reaches ``trainer_state.json``) but not what
the integrations already received. ``Trainer.log``'s docstring asks to "subclass and override this method to inject
custom behavior": :class:`EF21Trainer` does that, merging the callback's metrics before anything is reported.

:class:`EF21Trainer` runs the transformers Trainer on the EF21-Muon sync. The Trainer prepares the model and the
optimizer with its own Accelerator (``Trainer._prepare_for_training``); right after, at ``on_train_begin`` (before
the first backward), an internal callback hands ``trainer.accelerator``, ``trainer.model_wrapped`` (the DDP wrapper)
and ``trainer.optimizer`` (the AcceleratedOptimizer) to :meth:`EF21Plugin.attach`, which registers DDP's
``noop_hook`` and makes ``optimizer.step()`` the EF21 step. The Trainer already calls ``optimizer.step()`` once per
optimizer step (gradient accumulation included) and skips the scheduler when
``accelerator.optimizer_step_was_skipped``, so nothing else changes. Every rank writes its own EF21 state to
``checkpoint-N/ef21_rank{r}.pt`` in ``on_save``, and ``train(resume_from_checkpoint=...)`` restores it after the
Trainer has loaded the model and optimizer.

Caveats with EF21 on: ``max_grad_norm`` clips each worker's own gradient before compression (plain DDP clips the
average) and the logged ``grad_norm`` is rank 0's local norm; hyperparameter search (``model_init`` + trials) is not
supported; ``evaluate`` runs at the server model X (gathered to every rank). Not EF21-specific but easy to trip on:
transformers 5.23 multiplies the loss of models whose ``forward`` takes ``**kwargs`` (BERT) by the number of
processes unless ``TrainingArguments(average_tokens_across_devices=False)``.

Example::

    trainer = EF21Trainer(model=model, args=args, train_dataset=ds,
                          optimizers=(build_lmo_optimizer(model, "gluon"), None))
    trainer.train()        # plain DDP; with EF21_MUON=1 EF21-Muon (accelerate launch / torchrun unchanged)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ef_lightning.accelerate import EF21Plugin
from ef_lightning.comm import Ledger

__all__ = ["CommunicationCallback", "EF21Trainer"]


def _is_train_log(logs: dict[str, Any]) -> bool:
    # training-step entries carry "loss", the end-of-training summary "train_loss"; eval/predict entries neither
    return "loss" in logs or "train_loss" in logs


class CommunicationCallback(TrainerCallback):
    """Adds the communication ledger's per-step and cumulative numbers to the Trainer's training logs.

    Args:
        ledger_source: a :class:`~ef_lightning.Ledger`, an object with a ``.ledger`` attribute that may be ``None``
            until training starts (:class:`~ef_lightning.accelerate.EF21Plugin`, ``EF21Engine``, ``Simulator``),
            or a zero-argument callable returning a ledger. Resolved at every log, so it may be created late.
        prefix: prepended to the metric names (default ``"comm/"``).

    With a stock ``Trainer`` the metrics reach ``state.log_history`` (hence ``trainer_state.json``) and the callbacks
    after this one; use :class:`EF21Trainer` (or override ``Trainer.log`` the same way) to reach ``report_to``
    integrations too.
    """

    def __init__(self, ledger_source: Ledger | Any | Callable[[], Ledger | None], prefix: str = "comm/") -> None:
        if not (isinstance(ledger_source, Ledger) or hasattr(ledger_source, "ledger") or callable(ledger_source)):
            raise TypeError(
                "ledger_source must be a Ledger, an object with a .ledger attribute (EF21Plugin, "
                "EF21Engine, Simulator) or a callable returning a Ledger, got "
                f"{type(ledger_source).__name__}"
            )
        self.source = ledger_source
        self.prefix = prefix

    def ledger(self) -> Ledger | None:
        """The ledger now (``None`` while the source has none, e.g. EF21 disabled or not yet attached)."""
        src = self.source
        if isinstance(src, Ledger):
            return src
        if hasattr(src, "ledger"):
            return src.ledger
        return src()

    def metrics(self) -> dict[str, float]:
        """The numbers to log now (see :meth:`ef_lightning.Ledger.metrics`); ``{}`` before any step."""
        ledger = self.ledger()
        return ledger.metrics(self.prefix) if ledger is not None else {}

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs is None or not _is_train_log(logs):
            return
        missing = {k: v for k, v in self.metrics().items() if k not in logs}
        if not missing:
            return  # EF21Trainer.log merged them already, or nothing was communicated yet
        logs.update(missing)
        # Trainer.log stored a copy of logs as the last history entry before calling us: complete that entry
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(missing)


class _EF21Lifecycle(TrainerCallback):
    """Attaches the plugin after the Trainer's ``accelerator.prepare``, and saves/loads per-rank EF21 state."""

    def __init__(self, trainer: EF21Trainer) -> None:
        self.trainer = trainer

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        t = self.trainer
        if not t.ef21.enabled:
            return
        t.ef21.attach(t.accelerator, t.model_wrapped, t.optimizer)
        if t._ef21_resume is not None:
            t.ef21.load(t._ef21_resume)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        # called on every rank right after the Trainer's own checkpoint (written by rank 0 only)
        if self.trainer.ef21.engine is not None:
            out = args.output_dir if args.output_dir is not None else "."
            self.trainer.ef21.save(os.path.join(out, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))


class EF21Trainer(Trainer):
    """A transformers ``Trainer`` whose optimizer step is the EF21-Muon sync when the plugin is enabled.

    Args:
        *args: the ``Trainer``'s positional arguments.
        ef21: the configuration; default ``EF21Plugin()``, i.e. the ``EF21_*`` environment variables (EF21 off
            unless ``EF21_MUON=1``, and then exactly a stock ``Trainer`` plus the communication metrics).
        **kwargs: the ``Trainer``'s keyword arguments. Pass the optimizer through ``optimizers=(opt, sched)``
            (e.g. :func:`~ef_lightning.build_lmo_optimizer`); with the Trainer's default AdamW, EF21 feeds AdamW the
            aggregated estimate G (there is no worker momentum then).

    Attributes:
        ef21: the :class:`~ef_lightning.accelerate.EF21Plugin` (``trainer.ef21.ledger`` after training starts).
        communication: the :class:`CommunicationCallback` whose metrics :meth:`log` merges.
    """

    def __init__(self, *args: Any, ef21: EF21Plugin | None = None, **kwargs: Any) -> None:
        # resolve (and validate) the EF21_* configuration before the Trainer's heavier set-up
        self.ef21 = ef21 if ef21 is not None else EF21Plugin()
        if not isinstance(self.ef21, EF21Plugin):
            raise TypeError(f"ef21 must be an EF21Plugin, got {type(self.ef21).__name__}")
        self._ef21_resume: str | None = None
        super().__init__(*args, **kwargs)
        self.communication = CommunicationCallback(self.ef21)
        self.add_callback(_EF21Lifecycle(self))
        self.add_callback(self.communication)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; remembers the checkpoint so each rank can restore its own EF21 state from it."""
        ckpt = resume_from_checkpoint
        if ckpt is True:  # the Trainer resolves True the same way
            ckpt = get_last_checkpoint(self.args.output_dir)
        self._ef21_resume = ckpt or None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """``Trainer.evaluate`` at the server model X (docs/algorithm.md §2); W == X with an identity downlink."""
        with self.ef21.at_server_model():
            return super().evaluate(*args, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """``Trainer.log`` with the communication metrics merged into training entries before anything reports."""
        if _is_train_log(logs):
            logs.update(self.communication.metrics())
        super().log(logs, start_time)
