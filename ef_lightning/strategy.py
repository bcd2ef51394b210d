"""Lightning strategy for EF21-Muon: ``Trainer(strategy="ef21_muon")``.

A thin :class:`~lightning.pytorch.strategies.DDPStrategy` subclass; all algorithm logic lives in
:class:`ef_lightning.ef21.EF21Engine`. What differs from DDP (ARCHITECTURE.md, checked on lightning 2.6.6):

* no DDP wrapper: Lightning ignores DDP comm hooks on CPU, so the module is not wrapped (rank 0's parameters and
  buffers are broadcast once instead) and nothing is all-reduced during backward;
* ``optimizer_step`` runs the training closure (forward, backward, gradient clipping) and then ``engine.step()``
  in place of ``optimizer.step()``: one sync per optimizer step, so ``accumulate_grad_batches`` costs no extra
  traffic and is correct for free;
* checkpoints keep every rank's own EF21 state (M_j, G_j and the served X, G): ``optimizer_state`` gathers them
  into rank 0's checkpoint file, ``load_optimizer_state_dict`` hands each rank its own;
* validation during fit runs at the server model X (gathered to every rank) when the downlink is compressed and W
  differs from X; training gradients are evaluated at W. When fit ends the module's parameters are set to X, so
  ``trainer.test``/``predict``/saving the module afterwards use the server model (checkpoints written during fit
  hold W in ``state_dict`` and X in the EF21 state, which is what an exact resume needs).

Gradient clipping (``gradient_clip_val``) applies to each worker's local gradient g_j, before momentum and
compression (as in DDP it would apply to the averaged gradient: with EF21 the average is never materialised).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from torch.optim import Optimizer

from ef_lightning import compressors as _comp
from ef_lightning.comm import TOPOLOGIES
from ef_lightning.ef21 import (DEFAULT_DOWNLINK, DEFAULT_TOPOLOGY, DEFAULT_UPLINK, ESTIMATORS, NONFINITE, ROLES,
                               EF21Engine)

__all__ = ["EF21MuonStrategy", "DEFAULT_UPLINK", "DEFAULT_DOWNLINK", "DEFAULT_TOPOLOGY"]

RESUME_POLICIES = ("error", "reinit")


def _validate_spec(spec: str | Mapping[str, str], what: str) -> None:
    specs = spec.items() if isinstance(spec, Mapping) else [("", spec)]
    for role, s in specs:
        if isinstance(spec, Mapping) and role not in ROLES:
            raise ValueError(f"{what} mapping has unknown role {role!r}; valid roles: {', '.join(ROLES)}")
        try:
            _comp.build(s)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{what}={s!r}: {e}") from None


class EF21MuonStrategy(DDPStrategy):
    """Data-parallel training with EF21-Muon compressed communication in both directions.

    Args:
        uplink: worker -> server compressor spec (``"top_k:0.05"``, ``"rank:4"``, ``"top_k:0.05+natural"``, ...) or a
            mapping role -> spec (roles: hidden, embedding, head, vector, conv, default). Default: :data:`DEFAULT_UPLINK`.
        downlink: server -> worker compressor spec or mapping (``identity`` only with ``topology="allgather"``).
            Default: :data:`DEFAULT_DOWNLINK` (``identity`` with allgather).
        topology: ``"sharded"`` (default: each rank serves a balanced share of whole layers; both directions
            compressed; per-rank traffic and LMO work independent of n), ``"allgather"`` (replicated server, no
            downlink) or ``"server"`` (rank ``server_rank`` serves every layer).
        server_rank: the server's rank for ``topology="server"``.
        seed: base seed of the compressors' shared random generators (same on every rank).
        on_nonfinite: ``"skip"`` (default: a non-finite gradient on any rank skips the step everywhere, warns and is
            counted in the ledger) or ``"raise"``.
        resume_world_size: what to do when a checkpoint was written with a different number of processes:
            ``"error"`` (default) or ``"reinit"`` (restore the server model X into every rank's parameters and start
            fresh error-feedback estimates M_j = G_j = G = 0; the optimizer's own state is kept).
        evaluate_at_server_model: run validation during fit at X (default True; only matters when W != X).
        estimator: ``"ef21"`` (default, EF21-Muon), or a variance-reduced estimator of arXiv 2604.10689
            (``"marina"`` with unbiased compressors, ``"ef21_page"``, ``"mvr"``; ALGORITHM.md §4). These need the
            gradient on the same batch at the previous point: the strategy re-runs the training closure (forward +
            backward of ``training_step``) with the previous W loaded — one extra forward/backward per step, counted
            in the ledger; that second pass does not log (``on_before_optimizer_step`` callbacks and gradient clipping
            do run for it). Not combinable with ``accumulate_grad_batches > 1``.
        p: refresh probability of ``marina`` / ``ef21_page`` (default: bits of the compressed message / dense bits).
        participation: fraction of workers sending each round (``topology="server"`` only; federated setting).
        process_group_backend, timeout, start_method, accelerator, parallel_devices, cluster_environment,
            checkpoint_io, precision_plugin: as for :class:`~lightning.pytorch.strategies.DDPStrategy`.
    """

    strategy_name = "ef21_muon"

    def __init__(
        self,
        uplink: str | Mapping[str, str] | None = None,
        downlink: str | Mapping[str, str] | None = None,
        topology: str = DEFAULT_TOPOLOGY,
        server_rank: int = 0,
        seed: int = 0,
        on_nonfinite: str = "skip",
        resume_world_size: str = "error",
        evaluate_at_server_model: bool = True,
        estimator: str = "ef21",
        p: float | None = None,
        participation: float | None = None,
        accelerator: Any = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: Any = None,
        checkpoint_io: Any = None,
        precision_plugin: Any = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = None,
        start_method: str = "popen",
    ) -> None:
        if topology not in TOPOLOGIES:
            raise ValueError(f"topology={topology!r}; valid choices: {', '.join(TOPOLOGIES)}")
        if on_nonfinite not in NONFINITE:
            raise ValueError(f"on_nonfinite={on_nonfinite!r}; valid choices: {', '.join(NONFINITE)}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator={estimator!r}; valid choices: {', '.join(ESTIMATORS)}")
        if p is not None and not (isinstance(p, (int, float)) and not isinstance(p, bool) and 0 < p <= 1):
            raise ValueError(f"p={p!r}: the refresh probability must be in (0, 1]")
        if participation is not None and topology != "server":
            raise ValueError(f"participation={participation!r} needs topology 'server', got {topology!r}")
        if resume_world_size not in RESUME_POLICIES:
            raise ValueError(f"resume_world_size={resume_world_size!r}; valid choices: {', '.join(RESUME_POLICIES)}")
        uplink = dict(DEFAULT_UPLINK) if uplink is None else uplink
        if downlink is None:
            downlink = "identity" if topology == "allgather" else dict(DEFAULT_DOWNLINK)
        _validate_spec(uplink, "uplink")
        _validate_spec(downlink, "downlink")
        if estimator == "marina":  # checked per tensor by the engine too; fail here, at construction, when we can
            specs = uplink.values() if isinstance(uplink, Mapping) else [uplink]
            bad = [s for s in specs if _comp.build(s).kind == "contractive"]
            if bad:
                raise ValueError(f"estimator='marina' needs unbiased compressors (rand_k:<r>:unbiased, natural, "
                                 f"qsgd:<s>) or identity; uplink {bad[0]!r} is contractive")
        if p is not None and estimator not in ("marina", "ef21_page"):
            raise ValueError(f"p={p!r} only applies to estimator 'marina' or 'ef21_page', not {estimator!r}")
        if topology == "allgather":
            specs = downlink.values() if isinstance(downlink, Mapping) else [downlink]
            bad = [s for s in specs if _comp.build(s).kind != "identity"]
            if bad:
                raise ValueError(f"downlink={bad[0]!r} needs topology 'server' or 'sharded': with 'allgather' every rank "
                                 "already holds X, so there is no downlink; use downlink='identity'")
        kwargs: dict[str, Any] = {}
        if timeout is not None:
            kwargs["timeout"] = timeout
        super().__init__(accelerator=accelerator, parallel_devices=parallel_devices,
                         cluster_environment=cluster_environment, checkpoint_io=checkpoint_io,
                         precision_plugin=precision_plugin, process_group_backend=process_group_backend,
                         start_method=start_method, **kwargs)
        self.uplink, self.downlink, self.topology = uplink, downlink, topology
        self.server_rank, self.seed, self.on_nonfinite = server_rank, seed, on_nonfinite
        self.resume_world_size = resume_world_size
        self.evaluate_at_server_model = evaluate_at_server_model
        self.estimator, self.p, self.participation = estimator, p, participation
        self.engines: dict[int, EF21Engine] = {}  # id(optimizer) -> engine
        self._at_x: contextlib.ExitStack | None = None  # open while validation runs at X

    # ------------------------------------------------------------------------------------------------ setup
    def configure_ddp(self) -> None:
        """No DDP wrapper (its comm hooks are ignored on CPU and its all-reduce is what we replace): align the
        replicas once by broadcasting rank 0's parameters and buffers."""
        _sync_module_states(self.model)

    def setup(self, trainer: Any) -> None:
        super().setup(trainer)
        for old in self.engines.values():  # a previous fit's engines let go of their optimizers
            old.detach()
        self.engines = {}
        if trainer.state.fn != "fit":
            return
        if self.estimator != "ef21" and trainer.accumulate_grad_batches > 1:
            raise ValueError(f"estimator={self.estimator!r} needs the gradient of one minibatch at two points; with "
                             f"accumulate_grad_batches={trainer.accumulate_grad_batches} only the last micro-batch "
                             "could be re-evaluated. Use accumulate_grad_batches=1 or estimator='ef21'")
        for opt in self.optimizers:
            self.engines[id(opt)] = self._new_engine(opt)

    def _new_engine(self, optimizer: Optimizer) -> EF21Engine:
        return EF21Engine(self.lightning_module, optimizer, uplink=self.uplink, downlink=self.downlink,
                          topology=self.topology, server_rank=self.server_rank, seed=self.seed,
                          on_nonfinite=self.on_nonfinite, sync_initial=False, estimator=self.estimator, p=self.p,
                          participation=self.participation)

    @property
    def engine(self) -> EF21Engine | None:
        """The engine of the (first) optimizer while fitting, else None."""
        return next(iter(self.engines.values()), None)

    def teardown(self) -> None:
        # engines stay readable after fit (``trainer.strategy.engine.ledger.summary()``); setup() makes new ones
        self._restore_w()
        super().teardown()

    # ------------------------------------------------------------------------------------------------ step
    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        """Run the closure (forward, backward, clipping), then EF21-Muon steps 2-7 instead of ``optimizer.step``."""
        raw = getattr(optimizer, "_optimizer", optimizer)  # LightningOptimizer -> torch optimizer
        engine = self.engines.get(id(raw))
        if engine is None:
            raise RuntimeError("EF21MuonStrategy has no engine for this optimizer; optimizers must be created in "
                               "configure_optimizers (they are wrapped when fitting starts)")

        # An instance attribute shadows the class's step for this call only. torch's LR schedulers keep their own
        # instance-level wrapper there; the engine's server step must reach it (not us), so it is put back meanwhile.
        original = raw.__dict__.get("step")

        def put_back() -> None:
            if original is None:
                raw.__dict__.pop("step", None)
            else:
                raw.step = original

        def engine_step(closure: Callable[[], Any] | None = None, **_: Any) -> Any:
            # precision plugins call optimizer.step(closure=...) (or GradScaler.step(optimizer) after running the
            # closure themselves): the closure fills .grad, then the engine replaces the local step.
            loss = closure() if closure is not None else None
            put_back()
            try:
                engine.step(self._quiet(closure) if engine.needs_previous_gradient else None)
            finally:
                raw.step = engine_step
            return loss

        raw.step = engine_step
        try:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        finally:
            put_back()

    def _quiet(self, closure: Callable[[], Any] | None) -> Callable[[], Any] | None:
        """The training closure without logging: its second run (at the previous W) must not overwrite metrics."""
        if closure is None:
            return None
        module = self.lightning_module

        # Lightning's Closure keeps the training-step output for the loop (progress bar, on_train_batch_end): the
        # second run must not replace it either. The precision plugin hands us partial(_wrap_closure, ..., Closure).
        inner = closure.args[-1] if isinstance(closure, functools.partial) and closure.args else None

        def run() -> Any:
            log, log_dict = module.log, module.log_dict
            kept = getattr(inner, "_result", None)
            module.log = module.log_dict = lambda *a, **k: None
            try:
                return closure()
            finally:
                module.log, module.log_dict = log, log_dict
                if kept is not None:
                    inner._result = kept

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
        raw = getattr(optimizer, "_optimizer", optimizer)
        engine = self.engines.get(id(raw))
        if engine is None:
            return state
        mine = engine.state_dict()
        if self.world_size == 1:
            gathered = [mine]
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
                    "from the checkpoint's server model X")

    def _reinit_from(self, engine: EF21Engine, saved: list[Mapping[str, Any]]) -> None:
        X: dict[str, torch.Tensor] = {}
        for s in saved:
            X.update(s["server"]["X"])
        engine.load_parameters(X)  # allgather with fp32 keeps X in the parameters: already loaded
        engine.detach()  # the old engine lets go of the optimizer before the new one takes it
        self.engines[id(engine.optimizer)] = self._new_engine(engine.optimizer)
        warnings.warn(f"EF21 state from {len(saved)} process(es) re-initialised for {self.world_size}: "
                      "server model restored, error-feedback estimates restarted from zero", UserWarning, stacklevel=2)

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        """Register ``ef21_muon`` (subprocess launcher, like ``ddp``) and ``ef21_muon_spawn``."""
        for name, method in (("ef21_muon", "popen"), ("ef21_muon_spawn", "spawn")):
            if name not in strategy_registry:
                strategy_registry.register(name, cls, description=f"EF21-Muon compressed data parallel ({method})",
                                           start_method=method)


EF21MuonStrategy.register_strategies(StrategyRegistry)
