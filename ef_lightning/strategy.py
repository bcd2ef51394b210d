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
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from datetime import timedelta
from types import TracebackType
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.pytorch.plugins.io import CheckpointIO, TorchCheckpointIO
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO
from lightning.pytorch.strategies import DDPStrategy, Strategy, StrategyRegistry
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from ef_lightning._atomic import atomic_save, damage
from ef_lightning.comm import broadcast_module_
from ef_lightning.config import EF21Config
from ef_lightning.ef21 import EF21Engine
from ef_lightning.state import dtensor_like

__all__ = ["EF21MuonStrategy"]

RESUME_POLICIES = ("error", "reinit")


class _EF21Driving(Strategy):
    """What the Lightning strategies share: an :class:`~ef_lightning.EF21Engine` per optimizer (it takes the
    optimizer over, so Lightning's ``optimizer.step(closure)`` is the EF21 step), gradient-accumulation blocks,
    validation at the server model X, X left in the module after fit. Mixed in before a Lightning strategy."""

    config: EF21Config
    engines: dict[int, EF21Engine]
    evaluate_at_server_model: bool
    _at_x: contextlib.ExitStack | None
    #: broadcast node 0's parameters when an engine is built (False: the strategy aligned the replicas already)
    _sync_initial = True

    # ------------------------------------------------------------------------------------------------ faults
    def on_exception(self, exception: BaseException) -> None:
        """Lightning's handling; in addition, on the process that started the others (the subprocess launcher),
        if the exception ends the script, children still running :data:`CHILD_GRACE_S` seconds later are killed.

        A rank that dies or stalls makes the others raise within the process group's ``timeout`` (a dead peer at
        once); Lightning already ends every process when a child fails, but a child stalled outside a collective
        would outlive a launcher that failed. An exception the script catches changes nothing.
        """
        super().on_exception(exception)
        procs = getattr(self.launcher, "procs", None)  # _SubprocessScriptLauncher's children (empty in a child)
        if procs and not isinstance(sys.excepthook, _StopChildrenOnUncaughtError):
            sys.excepthook = _StopChildrenOnUncaughtError(list(procs), sys.excepthook)

    def _start_engines(self, trainer: Any) -> None:
        """One engine per optimizer when fitting (a previous fit's engines let go of their optimizers first)."""
        for old in self.engines.values():
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

    def _new_engine(self, optimizer: Optimizer, config: EF21Config | None = None) -> EF21Engine:
        """The engine for ``optimizer``; ``hierarchical`` takes its node layout from the Trainer (``devices``
        processes per node) unless the config names one."""
        assert self.lightning_module is not None  # setup() connected it
        config = config or self.config
        if config.topology == "hierarchical" and config.local_world_size is None:
            config = config.replace(local_world_size=self.num_processes)  # type: ignore[attr-defined]  # devices
        return EF21Engine(self.lightning_module, optimizer, config, sync_initial=self._sync_initial, quiet=self._quiet)

    @contextlib.contextmanager
    def block_backward_sync(self) -> Iterator[None]:
        """Lightning's gradient-accumulation micro-batches: no bucket is sent before the step's last backward."""
        with contextlib.ExitStack() as stack:
            for engine in self.engines.values():
                stack.enter_context(engine.no_sync())
            yield

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

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The module's state. While validation holds X in the parameters (a checkpoint written when validation
        ends, e.g. by ``ModelCheckpoint(monitor="val_loss")``), the entries are the parameters' own values they
        replaced (W; this rank's W_j with local steps), so resuming continues training from where it was."""
        state = super().lightning_module_state_dict()
        for engine in self.engines.values():
            for name, w in engine.held_parameters().items():
                if name in state:
                    v = state[name]
                    state[name] = dtensor_like(v, w.to(v.dtype)) if isinstance(v, DTensor) else w.to(v.dtype)
        return state

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


class EF21MuonStrategy(_EF21Driving, DDPStrategy):
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
    _sync_initial = False  # configure_ddp broadcast rank 0's module already

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
        self._start_engines(trainer)

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
        """Load each optimizer's state, then hand every rank its own EF21 state (see ``resume_world_size``).

        Every rank checks every rank's entry first, so all of them take the same decision: a missing or damaged
        entry is a ValueError naming that rank and the checkpoint file on every rank, and so is an entry that then
        fails to load on its rank; with ``resume_world_size="reinit"`` the estimates restart from the intact
        entries' server model X instead.
        """
        states = list(checkpoint["optimizer_states"])
        ef21 = [s.get("ef21") if isinstance(s, Mapping) else None for s in states]
        stripped = [{k: v for k, v in s.items() if k != "ef21"} for s in states]
        super().load_optimizer_state_dict({**checkpoint, "optimizer_states": stripped})
        for index, (opt, saved) in enumerate(zip(self.optimizers, ef21)):
            engine = self.engines.get(id(opt))
            if engine is None or saved is None:
                continue
            self._load_ef21(engine, saved, index)

    def _load_ef21(self, engine: EF21Engine, saved: Any, index: int) -> None:
        where = f"optimizer_states[{index}]['ef21'] of checkpoint {self._checkpoint_path or '(path not known)'}"
        if not isinstance(saved, Sequence) or isinstance(saved, (str, bytes)):
            raise ValueError(
                f"{where} is a {type(saved).__name__}, not the list of per-rank EF21 states this strategy writes; "
                "resume from another checkpoint"
            )
        problems, n_saved = _entry_problems(saved)
        intact = [s for r, s in enumerate(saved) if r not in problems]
        layouts = sorted({_layout(s["topology"], s.get("local_world_size", 1)) for s in intact})
        mine = _layout(engine.topology, getattr(engine.transport, "local_world_size", 1))
        if problems:
            if self.resume_world_size == "reinit":
                self._reinit_from(engine, intact, problems)
                return
            listed = "; ".join(f"rank {r}: {why}" for r, why in sorted(problems.items()))
            raise ValueError(
                f"the EF21 state of rank(s) {', '.join(map(str, sorted(problems)))} in {where} (written by "
                f"{n_saved} process(es)) is missing or damaged ({listed}). A rank's error-feedback state exists only "
                "in its own entry; resume from another checkpoint, or pass "
                "EF21MuonStrategy(resume_world_size='reinit') to restart the estimates from the intact entries' "
                "server model X (the layers those ranks served restart from the checkpoint's weights)"
            )
        if n_saved != self.world_size or layouts != [mine]:
            if self.resume_world_size == "reinit":
                self._reinit_from(engine, intact)
                return
            raise ValueError(
                f"{where} holds EF21 state of {n_saved} process(es) with topology {', '.join(layouts)}; this run "
                f"has {self.world_size} with {mine}. "
                "Error-feedback state is per rank and cannot be re-split; pass "
                "EF21MuonStrategy(resume_world_size='reinit') to restart the estimates from the checkpoint's server "
                "model X"
            )
        rank, cause = self.global_rank, None
        try:
            engine.load_state_dict(saved[rank])
        except Exception as e:  # reported below, on every rank
            cause = e
        failed = self._ranks_failing(cause is not None)
        if failed and self.resume_world_size == "reinit":
            self._reinit_from(engine, [s for r, s in enumerate(saved) if r not in failed], failed)
        elif failed:
            own = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
            raise ValueError(
                f"rank(s) {', '.join(map(str, failed))} could not load their EF21 state from {where}; this is rank "
                f"{rank}{own}. Resume from another checkpoint, or pass EF21MuonStrategy(resume_world_size='reinit') "
                "to restart the error-feedback estimates from the server model X"
            ) from cause

    def _ranks_failing(self, failed: bool) -> list[int]:
        """The ranks for which ``failed`` is True (a collective when there are several processes)."""
        if self.world_size == 1 or not dist.is_initialized():
            return [self.global_rank] if failed else []
        flags = torch.zeros(self.world_size, dtype=torch.int32, device=self.root_device)
        flags[self.global_rank] = int(failed)
        dist.all_reduce(flags)
        return [r for r, f in enumerate(flags.tolist()) if f]

    def _reinit_from(self, engine: EF21Engine, saved: Sequence[Mapping[str, Any]], lost: Collection[int] = ()) -> None:
        X: dict[str, torch.Tensor] = {}
        for s in saved:
            X.update(s["server"]["X"])
        engine.load_parameters(X)  # allgather with fp32 keeps X in the parameters: already loaded
        self.engines[id(engine.optimizer)] = self._new_engine(engine.optimizer, engine.config)  # takes it over
        without = (
            f"; the entries of rank(s) {', '.join(map(str, sorted(lost)))} were missing or damaged, the layers "
            "they served keep the checkpoint's weights"
            if lost
            else ""
        )
        warnings.warn(
            f"EF21 state from {len(saved)} process(es) re-initialised for {self.world_size}: "
            f"server model restored, error-feedback estimates restarted from zero{without}",
            UserWarning,
            stacklevel=2,
        )

    #: the file :meth:`load_checkpoint` read last (named in errors about its EF21 state)
    _checkpoint_path: str | None = None

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Read the checkpoint (every rank reads the whole file). A truncated or corrupted file is a ValueError
        naming this rank and the file; any other load error propagates as it is."""
        self._checkpoint_path = str(checkpoint_path)
        try:
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        except Exception as e:
            why = damage(checkpoint_path) if isinstance(checkpoint_path, (str, os.PathLike)) else None
            if why is None:
                raise
            raise ValueError(
                f"rank {self.global_rank}: checkpoint {self._checkpoint_path} cannot be read: {why}. It was not "
                "written completely (a crash or a full disk during the save, a partial copy) or was damaged since; "
                "resume from another checkpoint (e.g. the one saved before it)"
            ) from e

    @property
    def checkpoint_io(self) -> CheckpointIO:
        """Lightning's checkpoint IO, except that the default one writes each file atomically
        (:class:`AtomicCheckpointIO`); a checkpoint IO given by the user (``checkpoint_io=``, ``plugins=``) is kept,
        and an ``AsyncCheckpointIO`` without a base gets the atomic one as its base."""
        if self._checkpoint_io is None:
            self._checkpoint_io = AtomicCheckpointIO()
        elif isinstance(self._checkpoint_io, _WrappingCheckpointIO):
            self._checkpoint_io.checkpoint_io = AtomicCheckpointIO()  # ignored when a base was configured
        return self._checkpoint_io

    @checkpoint_io.setter
    def checkpoint_io(self, io: CheckpointIO) -> None:
        self._checkpoint_io = io

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        """Register ``ef21_muon`` (subprocess launcher, like ``ddp``) and ``ef21_muon_spawn``."""
        for name, method in (("ef21_muon", "popen"), ("ef21_muon_spawn", "spawn")):
            if name not in strategy_registry:
                strategy_registry.register(
                    name, cls, description=f"EF21-Muon compressed data parallel ({method})", start_method=method
                )


#: keys every rank's entry of a checkpoint's EF21 list has (EF21Engine.state_dict)
_ENTRY_KEYS = ("rank", "world_size", "topology", "worker", "server", "optimizer", "step", "ledger")


def _entry_problems(saved: Sequence[Any]) -> tuple[dict[int, str], int]:
    """What is wrong with each rank's entry of a checkpoint's EF21 list (rank -> reason; intact entries absent) and
    how many processes wrote it: the ``world_size`` most entries carry (the list's length when none does)."""
    sizes: Counter[int] = Counter()
    for s in saved:
        n = s.get("world_size") if isinstance(s, Mapping) else None
        if isinstance(n, int) and not isinstance(n, bool):
            sizes[n] += 1
    n_saved = sizes.most_common(1)[0][0] if sizes else len(saved)
    problems: dict[int, str] = {}
    for r in range(max(n_saved, len(saved))):
        why = _entry_problem(saved[r] if r < len(saved) else None, r, n_saved, len(saved))
        if why is not None:
            problems[r] = why
    return problems, n_saved


def _entry_problem(entry: Any, rank: int, n_saved: int, length: int) -> str | None:
    if rank >= length:
        return f"no entry (the list has {length})"
    if entry is None:
        return "no entry (None)"
    if not isinstance(entry, Mapping):
        return f"a {type(entry).__name__}, not a state dict"
    missing = [k for k in _ENTRY_KEYS if k not in entry]
    if missing:
        return f"no {', '.join(map(repr, missing))}"
    if not isinstance(entry["topology"], str) or not isinstance(entry.get("local_world_size", 1), int):
        return f"topology={entry['topology']!r}, local_world_size={entry.get('local_world_size')!r}"
    if entry["rank"] != rank or entry["world_size"] != n_saved:
        return f"holds rank={entry['rank']!r} of world_size={entry['world_size']!r} at position {rank} of {n_saved}"
    for part in ("worker", "server"):
        if not isinstance(entry[part], Mapping):
            return f"{part!r} is a {type(entry[part]).__name__}, not a dict"
        for kind, tensors in entry[part].items():
            if not isinstance(tensors, Mapping):
                return f"{part}[{kind!r}] is a {type(tensors).__name__}, not a dict"
            for name, t in tensors.items():
                if not isinstance(t, torch.Tensor):
                    return f"{part}[{kind!r}][{name!r}] is a {type(t).__name__}, not a tensor"
    return None


def _layout(topology: str, local_world_size: int) -> str:
    return repr(topology) + (f" (local_world_size={local_world_size})" if local_world_size != 1 else "")


def _local_path(path: Any) -> str | None:
    """``path`` as a local file name, or None for a remote (fsspec URL) one."""
    if not isinstance(path, (str, os.PathLike)):
        return None
    text = os.fspath(path)
    if isinstance(text, bytes):
        return None
    if text.startswith("file://"):
        return text[len("file://") :]
    return None if "://" in text else text


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's :class:`~lightning.pytorch.plugins.io.TorchCheckpointIO` with crash-safe writes: a local file is
    written to a temporary file beside it, fsynced and renamed over the target
    (:func:`ef_lightning._atomic.atomic_save`), so a process killed while saving leaves the previous complete
    checkpoint at the path, never a partial one. Remote paths (fsspec URLs: object stores replace whole objects) and
    ``storage_options`` go to Lightning's implementation. :class:`EF21MuonStrategy` installs it by default.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically (see the class)."""
        local = _local_path(path)
        if storage_options is not None or local is None:
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        atomic_save(checkpoint, local)


#: seconds the launching process waits, after an error ended its script, for its children to end on their own
CHILD_GRACE_S = 5.0


class _StopChildrenOnUncaughtError:
    """``sys.excepthook`` of the launching process once a fit failed there: report the error as before, give the
    child processes :data:`CHILD_GRACE_S` seconds to end on their own (their errors get printed), kill the rest."""

    def __init__(self, procs: list[subprocess.Popen[Any]], previous: Callable[..., Any]) -> None:
        self.procs, self.previous = procs, previous

    def __call__(self, exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        self.previous(exc_type, exc, tb)
        deadline = time.monotonic() + CHILD_GRACE_S
        for local_rank, proc in enumerate(self.procs, start=1):
            if not _ended(proc, deadline - time.monotonic()):
                print(
                    f"EF21MuonStrategy: killing local rank {local_rank} (pid {proc.pid}), still running "
                    f"{CHILD_GRACE_S:g} s after the launching process failed",
                    file=sys.stderr,
                )
                proc.kill()


def _ended(proc: subprocess.Popen[Any], timeout: float) -> bool:
    """Whether ``proc`` ends within ``timeout`` seconds."""
    try:
        proc.wait(timeout=max(0.0, timeout))
    except subprocess.TimeoutExpired:
        return False
    return True


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
