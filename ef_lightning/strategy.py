"""Lightning strategy for EF21-Muon: ``Trainer(strategy="ef21_muon")``.

Adaptation only: a :class:`~lightning.pytorch.strategies.DDPStrategy` subclass that hands each optimizer to an
:class:`~ef_lightning.EF21Engine` (which owns every rule and check; options go to
:class:`~ef_lightning.config.EF21Config`). What differs from DDP (checked on lightning 2.6.6, docs/architecture.md):

* no DDP wrapper: Lightning ignores DDP comm hooks on CPU, so the module is not wrapped (rank 0's parameters and
  buffers are broadcast once instead) and nothing is all-reduced during backward;
* the engine makes ``optimizer.step(closure)`` the EF21 step, and Lightning's precision plugin already calls
  exactly that: the closure (forward, backward, gradient clipping) runs inside it, then EF21-Muon steps 2-7. One
  sync per optimizer step, so ``accumulate_grad_batches`` costs no extra traffic and is correct for free;
* checkpoints keep every rank's own EF21 state (M_j, G_j and the served X, G): ``optimizer_state`` gathers them
  into rank 0's checkpoint file, ``load_optimizer_state_dict`` hands each rank its own;
* validation during fit runs at the server model X (gathered to every rank) when the downlink is compressed and W
  differs from X; training gradients are evaluated at W. When fit ends the module's parameters are set to X, so
  ``trainer.test``/``predict``/saving the module afterwards use the server model (checkpoints written during fit
  hold W in ``state_dict`` and X in the EF21 state, which is what an exact resume needs).

Gradient clipping (``gradient_clip_val``) applies to each worker's local gradient g_j, before momentum and
compression (DDP would clip the averaged gradient: with EF21 the average is never materialised).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.optim import Optimizer

from ef_lightning._atomic import atomic_save, damage
from ef_lightning.comm import broadcast_module_
from ef_lightning.config import EF21Config
from ef_lightning.ef21 import EF21Engine

__all__ = ["EF21MuonStrategy"]

RESUME_POLICIES = ("error", "reinit")


class EF21MuonStrategy(DDPStrategy):
    """Data-parallel training with EF21-Muon compressed communication in both directions.

    Args:
        config: an :class:`~ef_lightning.config.EF21Config`; ``None``: one built from ``options``.
        resume_world_size: what to do when a checkpoint was written with a different number of processes:
            ``"error"`` (default) or ``"reinit"`` (restore the server model X into every rank's parameters and start
            fresh error-feedback estimates M_j = G_j = G = 0; the optimizer's own state is kept).
        evaluate_at_server_model: run validation during fit at X (default True; only matters when W != X).
        process_group_backend, timeout, start_method, accelerator, parallel_devices, cluster_environment,
            checkpoint_io, precision_plugin: as for :class:`~lightning.pytorch.strategies.DDPStrategy`.
        **options: :class:`~ef_lightning.config.EF21Config` fields: ``uplink`` (default
            :data:`~ef_lightning.config.DEFAULT_UPLINK`), ``downlink``, ``topology`` (default
            :data:`~ef_lightning.config.DEFAULT_TOPOLOGY`),
            ``server_rank``, ``seed``, ``on_nonfinite``, ``estimator``, ``p``, ``participation``.

    The variance-reduced estimators (``estimator="marina"|"ef21_page"|"mvr"``) need the gradient on the same batch
    at the previous point: the engine runs the training closure (forward + backward of ``training_step``) once more,
    first, with the previous W loaded and logging off — one extra forward/backward per step, counted in the ledger
    (``on_before_optimizer_step`` callbacks and gradient clipping run for it too). Not combinable with
    ``accumulate_grad_batches > 1``.

    ``topology="hierarchical"`` takes the node layout from the Trainer (``devices`` processes per node, ``num_nodes``
    nodes): gradients are averaged densely inside each node and only the inter-node link is compressed.

    Example::

        Trainer(strategy=EF21MuonStrategy(uplink="top_k:0.05", downlink="top_k:0.2"), devices=8, num_nodes=4)
        Trainer(strategy=EF21MuonStrategy(topology="hierarchical"), devices=8, num_nodes=4)
    """

    strategy_name = "ef21_muon"

    def __init__(
        self,
        config: EF21Config | None = None,
        *,
        resume_world_size: str = "error",
        evaluate_at_server_model: bool = True,
        accelerator: Any = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: Any = None,
        checkpoint_io: Any = None,
        precision_plugin: Any = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = None,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        **options: Any,
    ) -> None:
        self.config = EF21Config.build(config, **options)  # fails here, at construction, on a bad option
        if resume_world_size not in RESUME_POLICIES:
            raise ValueError(f"resume_world_size={resume_world_size!r}; valid choices: {', '.join(RESUME_POLICIES)}")
        kwargs: dict[str, Any] = {"timeout": timeout} if timeout is not None else {}
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            start_method=start_method,
            **kwargs,
        )
        self.resume_world_size = resume_world_size
        self.evaluate_at_server_model = evaluate_at_server_model
        self.engines: dict[int, EF21Engine] = {}  # id(optimizer) -> engine
        self._at_x: contextlib.ExitStack | None = None  # open while validation runs at X

    # ------------------------------------------------------------------------------------------------ setup
    def configure_ddp(self) -> None:
        """No DDP wrapper (its comm hooks are ignored on CPU and its all-reduce is what we replace): align the
        replicas once by broadcasting rank 0's parameters and buffers."""
        assert self.model is not None
        broadcast_module_(self.model)

    def setup(self, trainer: Any) -> None:
        super().setup(trainer)
        for old in self.engines.values():  # a previous fit's engines let go of their optimizers
            old.detach()
        self.engines = {}
        if trainer.state.fn != "fit":
            return
        self.config.check_accumulation(trainer.accumulate_grad_batches, "accumulate_grad_batches")
        config = self.config
        if config.overlap and trainer.gradient_clip_val:
            # Lightning clips between backward and optimizer.step(): buckets sent during backward would carry the
            # unclipped gradients, so the sync waits for the step (the clipped gradients are what EF21 compresses)
            config = config.replace(overlap=False)
            rank_zero_info("EF21-Muon: gradient_clip_val is set, so the uplink is sent at the step (overlap off)")
        for opt in self.optimizers:
            self.engines[id(opt)] = self._new_engine(opt, config)

    @contextlib.contextmanager
    def block_backward_sync(self) -> Iterator[None]:
        """Lightning's gradient-accumulation micro-batches: no bucket is sent before the step's last backward."""
        with contextlib.ExitStack() as stack:
            for engine in self.engines.values():
                stack.enter_context(engine.no_sync())
            yield

    def _new_engine(self, optimizer: Optimizer, config: EF21Config | None = None) -> EF21Engine:
        assert self.lightning_module is not None  # setup() connected it
        config = config or self.config
        if config.topology == "hierarchical" and config.local_world_size is None:
            config = config.replace(local_world_size=self.num_processes)  # Trainer(devices=G, num_nodes=N)
        return EF21Engine(self.lightning_module, optimizer, config, sync_initial=False, quiet=self._quiet)

    @property
    def engine(self) -> EF21Engine | None:
        """The engine of the (first) optimizer while fitting, else None."""
        return next(iter(self.engines.values()), None)

    def teardown(self) -> None:
        # engines stay readable after fit (``trainer.strategy.engine.ledger.summary()``); setup() makes new ones
        self._restore_w()
        super().teardown()

    def _quiet(self, closure: Callable[[], Any]) -> Callable[[], Any]:
        """The training closure with the module's logging switched off: its run at the previous point (the
        variance-reduced estimators' second gradient) must not log. The engine runs it before the current point's
        run, so the loop keeps the current point's training-step output."""

        def run() -> Any:
            with _logging_off(self.lightning_module):
                return closure()

        return run

    # ------------------------------------------------------------------------------------------------ evaluation at X
    def _swap_in_x(self) -> None:
        engine = self.engine
        if engine is None or not self.evaluate_at_server_model or self._at_x is not None:
            return
        self._at_x = contextlib.ExitStack()
        self._at_x.enter_context(engine.at_server_model())  # left in on_validation_end (or teardown)

    def _restore_w(self) -> None:
        if self._at_x is not None:
            self._at_x.close()
            self._at_x = None

    def on_train_end(self) -> None:
        """Leave the server model X in the module: it is the model training produced."""
        super().on_train_end()
        if self.engine is not None:
            self.engine.load_server_model()

    def on_validation_start(self) -> None:
        super().on_validation_start()
        self._swap_in_x()

    def on_validation_end(self) -> None:
        self._restore_w()
        super().on_validation_end()

    # ------------------------------------------------------------------------------------------------ checkpoints
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """The optimizer's state plus every rank's EF21 state (gathered on rank 0 under key ``"ef21"``)."""
        state = super().optimizer_state(optimizer)
        engine = self.engines.get(id(optimizer))
        if engine is None:
            return state
        mine = engine.state_dict()
        if self.world_size == 1:
            gathered: list[Any] | None = [mine]
        else:
            gathered = [None] * self.world_size if self.is_global_zero else None
            dist.gather_object(mine, gathered, dst=0)
        return {**state, "ef21": gathered}

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Load each optimizer's state, then hand every rank its own EF21 state (see ``resume_world_size``)."""
        states = list(checkpoint["optimizer_states"])
        ef21 = [s.get("ef21") if isinstance(s, Mapping) else None for s in states]
        stripped = [{k: v for k, v in s.items() if k != "ef21"} for s in states]
        super().load_optimizer_state_dict({**checkpoint, "optimizer_states": stripped})
        for opt, saved in zip(self.optimizers, ef21):
            engine = self.engines.get(id(opt))
            if engine is None or saved is None:
                continue
            if len(saved) == self.world_size and all(s["topology"] == engine.topology for s in saved):
                engine.load_state_dict(saved[self.global_rank])
            elif self.resume_world_size == "reinit":
                self._reinit_from(engine, saved)
            else:
                raise ValueError(
                    f"checkpoint holds EF21 state of {len(saved)} process(es) with topology {saved[0]['topology']!r}; "
                    f"this run has {self.world_size} with {engine.topology!r}. Error-feedback state is per rank and "
                    "cannot be re-split; pass EF21MuonStrategy(resume_world_size='reinit') to restart the estimates "
                    "from the checkpoint's server model X"
                )

    def _reinit_from(self, engine: EF21Engine, saved: list[Mapping[str, Any]]) -> None:
        X: dict[str, torch.Tensor] = {}
        for s in saved:
            X.update(s["server"]["X"])
        engine.load_parameters(X)  # allgather with fp32 keeps X in the parameters: already loaded
        self.engines[id(engine.optimizer)] = self._new_engine(engine.optimizer, engine.config)  # takes it over
        warnings.warn(
            f"EF21 state from {len(saved)} process(es) re-initialised for {self.world_size}: "
            "server model restored, error-feedback estimates restarted from zero",
            UserWarning,
            stacklevel=2,
        )

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        """Register ``ef21_muon`` (subprocess launcher, like ``ddp``) and ``ef21_muon_spawn``."""
        for name, method in (("ef21_muon", "popen"), ("ef21_muon_spawn", "spawn")):
            if name not in strategy_registry:
                strategy_registry.register(
                    name, cls, description=f"EF21-Muon compressed data parallel ({method})", start_method=method
                )


@contextlib.contextmanager
def _logging_off(module: Any) -> Iterator[None]:
    """``self.log`` / ``self.log_dict`` of a LightningModule do nothing inside the block (public methods, shadowed
    on the instance: Lightning has no public switch for this; tests/test_compat.py pins the behaviour)."""
    module.log = module.log_dict = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del module.log, module.log_dict


EF21MuonStrategy.register_strategies(StrategyRegistry)
