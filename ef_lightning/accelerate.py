"""Accelerate integration: EF21-Muon behind one environment flag, ``accelerate launch`` unchanged.

Adaptation only (every option and rule is :class:`~ef_lightning.config.EF21Config`'s, the step is
:class:`~ef_lightning.EF21Engine`'s). A stock script swaps ``accelerator.prepare`` for :meth:`EF21Plugin.prepare`::

    plugin = EF21Plugin()                      # EF21_MUON, EF21_UPLINK, ... from the environment
    model, optimizer, loader, scheduler = plugin.prepare(accelerator, model, optimizer, loader, scheduler)
    for step, batch in enumerate(loader):
        with accelerator.accumulate(model):
            accelerator.backward(loss_fn(model, batch))
            optimizer.step()                   # EF21-Muon steps 2-7 when EF21_MUON=1 (once per optimizer step)
            scheduler.step()
            optimizer.zero_grad()
        accelerator.log(plugin.metrics(), step=step)   # {} without the flag

What the plugin does with the flag on: DDP's ``noop_hook`` (so ``param.grad`` keeps this worker's g_j); the engine
takes the inner optimizer over (``AcceleratedOptimizer.step`` still decides *whether* to step); a skipped step is
reported through ``optimizer.step_was_skipped``; ``save_state``/``load_state`` write and read one
``ef21_rank{r}.pt`` per rank; one process runs the engine as the only worker. Variance-reduced estimators take
``optimizer.step(closure)`` with the closure re-evaluating the previous point. The full guide (closures, checkpoints,
what is rejected and why): docs/accelerate.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DistributedType
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook
from torch.nn.parallel import DistributedDataParallel

from ef_lightning._atomic import atomic_save, rank_state_path, read_rank_state
from ef_lightning.comm import TOPOLOGIES, Ledger
from ef_lightning.config import (
    COMPRESSOR_ROLES,
    DEFAULT_DOWNLINK,
    DEFAULT_UPLINK,
    ESTIMATORS,
    NONFINITE,
    EF21Config,
    EF21ConfigError,
)
from ef_lightning.ef21 import EF21Engine

__all__ = ["ENV_PREFIX", "EF21Plugin"]

#: prefix of the environment variables the plugin reads (never ``ACCELERATE_``: Accelerate rejects unknown keys)
ENV_PREFIX = "EF21_"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")
# Accelerate modes that do not wrap the model in DDP (EF21 replaces DDP's all-reduce, nothing else)
_UNSUPPORTED = (DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.MEGATRON_LM, DistributedType.XLA)
_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(EF21Config))


def _spec_text(spec: Any) -> str:
    return ",".join(f"{k}={v}" for k, v in spec.items()) if isinstance(spec, Mapping) else str(spec)


# -------------------------------------------------------------------------------------- environment strings -> values
def _flag(text: str, where: str) -> bool:
    t = text.strip().lower()
    if t not in _TRUE + _FALSE:
        raise ValueError(
            f"{where}={text!r} is not a flag; valid values: {', '.join(_TRUE)} (on) or "
            f"{', '.join(v for v in _FALSE if v)} or empty (off)"
        )
    return t in _TRUE


#: integer options and their least valid value (the messages of a non-integer; ranges are EF21Config's job)
_INT_MIN = {"server_rank": 0, "seed": 0, "local_world_size": 1, "sync_every": 1, "fragments": 1}
_VALID_NUMBERS = {
    "bucket_cap_mb": "numbers > 0 (MiB)",
    "outer_lr": "numbers > 0",
    "outer_momentum": "numbers in [0, 1)",
}


def _from_env(name: str, text: str, where: str) -> Any:
    """An ``EF21_*`` string as the typed value :class:`EF21Config` checks (ranges and choices are its job)."""
    if name in _INT_MIN:
        try:
            return int(text)
        except ValueError:
            raise ValueError(
                f"{where}={text!r} is not an integer; valid values: integers >= {_INT_MIN[name]}"
            ) from None
    if name in ("fused", "overlap"):
        return _flag(text, where)
    if name in ("p", "participation", "bucket_cap_mb", "outer_lr", "outer_momentum"):
        try:
            return float(text)
        except ValueError:
            valid = _VALID_NUMBERS.get(name, "numbers in (0, 1]")
            raise ValueError(f"{where}={text!r} is not a number; valid values: {valid}") from None
    if name in ("uplink", "downlink") and "=" in text:
        pairs = [p.strip() for p in text.split(",") if p.strip()]
        if not all(p.count("=") == 1 for p in pairs):
            raise ValueError(
                f"{where}={text!r}: a per-role value is 'role=spec,role=spec' (e.g. "
                f"'hidden=top_k:0.05,default=identity'); roles: {', '.join(COMPRESSOR_ROLES)}"
            )
        return {k.strip(): v.strip() for k, v in (p.split("=") for p in pairs)}
    return text


_CONFIG_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EF21Config)}


def _field(env: str, help: str) -> Any:
    """A plugin field: ``None`` (read ``env``, else EF21Config's default, which the help names)."""
    name = env[len(ENV_PREFIX) :].lower()
    default = _CONFIG_DEFAULTS.get(name, dataclasses.MISSING)
    shown = "" if default in (None, dataclasses.MISSING) else f"; default {default!r}"
    return dataclasses.field(default=None, metadata={"help": f"{help}{shown}. Env {env}."})


@dataclasses.dataclass(frozen=True)
class EF21Plugin:
    """EF21-Muon for an Accelerate script: an :class:`~ef_lightning.config.EF21Config` filled from ``EF21_*``
    environment variables, Accelerate's own plugin pattern.

    Every field defaults to ``None``: read ``EF21_<FIELD>`` from the environment (``EF21_MUON`` for ``enabled``),
    else the default in the field's help; an explicit argument wins. :attr:`config` is the resolved, checked
    configuration. The runtime objects exist after :meth:`prepare` (or :meth:`attach`): :attr:`engine`,
    :attr:`ledger`.

    Args:
        enabled: run EF21-Muon; False makes :meth:`prepare` plain ``accelerator.prepare``.
        uplink, downlink, topology, server_rank, seed, on_nonfinite, estimator, p, participation, fused, overlap,
            bucket_cap_mb, local_world_size: the
            :class:`~ef_lightning.config.EF21Config` options of the same names. The variance-reduced estimators need
            ``optimizer.step(closure)`` (module docstring).
    """

    enabled: bool | None = _field("EF21_MUON", "Run EF21-Muon instead of plain DDP (1/true/yes/on); default off")
    uplink: str | Mapping[str, str] | None = _field(
        "EF21_UPLINK",
        "Uplink compressor spec ('top_k:0.05', 'top_k:0.05+natural', 'rank:4', ...) or a mapping "
        f"role -> spec ('role=spec,role=spec' in the environment; roles {', '.join(COMPRESSOR_ROLES)}); "
        f"default {_spec_text(DEFAULT_UPLINK)!r}",
    )
    downlink: str | Mapping[str, str] | None = _field(
        "EF21_DOWNLINK",
        "Downlink compressor spec or role mapping (identity with topology allgather); default "
        f"{_spec_text(DEFAULT_DOWNLINK)!r} ('identity' with allgather)",
    )
    topology: str | None = _field("EF21_TOPOLOGY", f"Who serves which layer: {', '.join(TOPOLOGIES)}")
    server_rank: int | None = _field("EF21_SERVER_RANK", "Rank of the parameter server with topology 'server'")
    seed: int | None = _field(
        "EF21_SEED",
        "Base seed of the compressors' shared random generators (rand_k, natural, ...), identical on every rank",
    )
    on_nonfinite: str | None = _field(
        "EF21_ON_NONFINITE", f"On a non-finite gradient on any rank: {', '.join(NONFINITE)}"
    )
    estimator: str | None = _field(
        "EF21_ESTIMATOR",
        f"Gradient estimator: {', '.join(ESTIMATORS)} (all but "
        f"{ESTIMATORS[0]!r} are variance-reduced and need optimizer.step(closure))",
    )
    p: float | None = _field(
        "EF21_P", "Refresh probability in (0, 1] of estimators marina / ef21_page; default bits(uplink)/bits(dense)"
    )
    participation: float | None = _field(
        "EF21_PARTICIPATION",
        "Fraction of workers in (0, 1] that take part in each round (topology 'server' only); default every worker",
    )
    fused: bool | None = _field(
        "EF21_FUSED", "Vectorised compress/decode of all layers of a shape at once (0: the per-layer reference path)"
    )
    overlap: bool | None = _field(
        "EF21_OVERLAP", "Start each bucket's uplink during backward as soon as its gradients are ready"
    )
    bucket_cap_mb: float | None = _field("EF21_BUCKET_CAP_MB", "Uplink bucket size in MiB of fp32 gradient")
    local_world_size: int | None = _field(
        "EF21_LOCAL_WORLD_SIZE",
        "Processes per node with topology 'hierarchical'; default the launcher's LOCAL_WORLD_SIZE (accelerate "
        "launch / torchrun set it)",
    )
    sync_every: int | None = _field(
        "EF21_SYNC_EVERY",
        "Optimizer steps per synchronisation: 1 = EF21-Muon every step; H > 1 = H local steps, then the compressed, "
        "error-corrected outer sync (DiLoCo-style)",
    )
    outer: str | None = _field("EF21_OUTER", "Outer step with sync_every > 1: nesterov (DiLoCo) or lmo")
    outer_lr: float | None = _field("EF21_OUTER_LR", "Outer step size; default 0.7 (nesterov) or sync_every (lmo)")
    outer_momentum: float | None = _field("EF21_OUTER_MOMENTUM", "Momentum of the nesterov outer step, in [0, 1)")
    fragments: int | None = _field(
        "EF21_FRAGMENTS", "Streaming with sync_every > 1: F layer fragments synchronised at staggered steps"
    )
    # resolved in __post_init__ (not arguments): the checked configuration, and what exists once attached
    config: EF21Config = dataclasses.field(init=False, repr=False, compare=False)
    _runtime: _Runtime | None = dataclasses.field(init=False, default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.enabled is None:
            object.__setattr__(self, "enabled", _flag(os.environ.get("EF21_MUON", ""), "EF21_MUON"))
        elif not isinstance(self.enabled, bool):
            object.__setattr__(self, "enabled", _flag(str(self.enabled), "enabled"))
        options: dict[str, Any] = {}
        raw: dict[str, tuple[str, str]] = {}  # option -> (environment variable, its text)
        for name in _CONFIG_FIELDS:
            value, env = getattr(self, name), ENV_PREFIX + name.upper()
            if value is None and env in os.environ:
                raw[name] = (env, os.environ[env])
                value = _from_env(name, os.environ[env], env)
            if value is not None:
                options[name] = value
        try:
            config = EF21Config(**options)
        except EF21ConfigError as e:
            named = [f"{raw[f][0]}={raw[f][1]!r}" for f in e.fields if f in raw]
            if not named:
                raise
            raise ValueError(f"{', '.join(named)}: {e}") from None
        # frozen: the fields say what was given (None: environment or default), .config what is in force
        object.__setattr__(self, "config", config)
        object.__setattr__(self, "_runtime", None)

    # ------------------------------------------------------------------------------------------------- runtime
    @property
    def engine(self) -> EF21Engine | None:
        """The engine after :meth:`prepare`/:meth:`attach` with EF21 enabled, else None."""
        return self._runtime.engine if self._runtime is not None else None

    @property
    def ledger(self) -> Ledger | None:
        """The engine's ledger of bits and wire bytes (``None`` until :meth:`prepare`, and when disabled)."""
        return self.engine.ledger if self.engine is not None else None

    def metrics(self, prefix: str = "comm/") -> dict[str, float]:
        """Per-step and cumulative communication numbers for ``accelerator.log`` (see :meth:`Ledger.metrics`)."""
        return self.ledger.metrics(prefix) if self.ledger is not None else {}

    def prepare(self, accelerator: Accelerator, *objects: Any) -> Any:
        """``accelerator.prepare(*objects)``, then (when enabled) EF21-Muon on the one model and one optimizer.

        Args:
            accelerator: the script's :class:`~accelerate.Accelerator`.
            *objects: what the script would pass to ``accelerator.prepare``; with EF21 enabled exactly one
                ``nn.Module`` and one ``torch.optim.Optimizer`` (over that module's parameters) among them.

        Returns:
            exactly what ``accelerator.prepare(*objects)`` returns.
        """
        if not self.enabled:
            return accelerator.prepare(*objects)
        models = [i for i, o in enumerate(objects) if isinstance(o, nn.Module)]
        optims = [i for i, o in enumerate(objects) if isinstance(o, torch.optim.Optimizer)]
        if len(models) != 1 or len(optims) != 1:
            raise ValueError(
                f"EF21Plugin.prepare needs exactly one model and one optimizer among the objects, got "
                f"{len(models)} model(s) and {len(optims)} optimizer(s)"
            )
        _check_accelerator(accelerator)
        out = accelerator.prepare(*objects)
        prepared = out if len(objects) > 1 else (out,)
        self.attach(accelerator, prepared[models[0]], prepared[optims[0]])
        return out

    @contextlib.contextmanager
    def at_server_model(self) -> Iterator[None]:
        """Evaluate at the server model X: inside the block the model's parameters hold X (gathered to every rank,
        a collective), afterwards W again. Validation loss is reported at X (docs/algorithm.md §2); with an identity
        downlink W == X and nothing is gathered. Without EF21 (flag off) it does nothing.

        Example::

            with plugin.at_server_model():
                val_loss = evaluate(model, val_loader)
        """
        if self.engine is None:
            yield
            return
        with self.engine.at_server_model():
            yield

    def attach(self, accelerator: Accelerator, model: nn.Module, optimizer: AcceleratedOptimizer) -> None:
        """Turn a model and optimizer already prepared by ``accelerator`` into an EF21-Muon pair.

        :meth:`prepare` calls this; frameworks that run ``accelerator.prepare`` themselves (the transformers
        Trainer) call it afterwards, before the first backward. Collective: every rank must call it.

        Args:
            accelerator: the Accelerator that prepared both objects.
            model: the prepared model (DDP-wrapped when there are several processes).
            optimizer: the prepared :class:`~accelerate.optimizer.AcceleratedOptimizer`.
        """
        if not isinstance(optimizer, AcceleratedOptimizer):
            raise TypeError(
                f"optimizer must be the AcceleratedOptimizer returned by accelerator.prepare, "
                f"got {type(optimizer).__name__}"
            )
        if self._runtime is not None:
            if optimizer is self._runtime.optimizer:
                return  # a second train() call on the same prepared objects
            raise ValueError("this EF21Plugin is already attached to another optimizer; use one plugin per run")
        _check_accelerator(accelerator)
        self.config.check_accumulation(accelerator.gradient_accumulation_steps, "gradient_accumulation_steps")
        if accelerator.num_processes > 1:
            ddp = _find_ddp(model)
            if ddp is None:
                raise ValueError(
                    f"with {accelerator.num_processes} processes the prepared model must be wrapped in "
                    f"DistributedDataParallel, got {type(model).__name__}"
                )
            ddp.register_comm_hook(state=None, hook=noop_hook)  # param.grad keeps g_j; EF21 does the exchange
        module = accelerator.unwrap_model(model, keep_torch_compile=False)
        # the loop has run backward before optimizer.step(closure): the closure re-evaluates the previous point
        engine = EF21Engine(
            module,
            optimizer.optimizer,
            self.config,
            backward_done=True,
            on_step=lambda applied: _report_skipped(optimizer, not applied),
            should_sync=lambda: accelerator.sync_gradients,  # overlap: send only on the step's last micro-batch
        )
        runtime = _Runtime(accelerator, optimizer, engine)
        object.__setattr__(self, "_runtime", runtime)
        optimizer.optimizer.register_load_state_dict_post_hook(lambda _: runtime.apply_pending())
        accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: self.save(output_dir))
        accelerator.register_load_state_pre_hook(lambda models, input_dir: runtime.stage(input_dir))

    # ------------------------------------------------------------------------------------------------- checkpoints
    def save(self, directory: str | os.PathLike) -> str:
        """Write this rank's EF21 state to ``directory/ef21_rank{r}.pt`` (every rank calls it); returns the path."""
        if self._runtime is None:
            raise ValueError("EF21Plugin.save: nothing to save before prepare()/attach() with EF21 enabled")
        path = self._runtime.path(directory)
        # atomic (temporary file, fsync, rename): a crash while saving leaves the previous file whole
        atomic_save({"config": self.config.to_dict(), "engine": self._runtime.engine.state_dict()}, path)
        return path

    def load(self, directory: str | os.PathLike) -> None:
        """Restore this rank's EF21 state from ``directory`` now (after the model and optimizer state are loaded)."""
        if self._runtime is None:
            raise ValueError("EF21Plugin.load: nothing to load into before prepare()/attach() with EF21 enabled")
        self._runtime.stage(directory)
        self._runtime.apply_pending()


@dataclasses.dataclass
class _Runtime:
    """What exists once the plugin is attached: the prepared objects, the engine, a staged checkpoint."""

    accelerator: Accelerator
    optimizer: AcceleratedOptimizer
    engine: EF21Engine
    pending: dict[str, Any] | None = None
    pending_path: str | None = None  # the file ``pending`` was read from

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    def path(self, directory: str | os.PathLike) -> str:
        return rank_state_path(directory, self.rank)

    def read(self, directory: str | os.PathLike) -> dict[str, Any]:
        """This rank's EF21 state from ``directory``; a missing, unreadable or malformed file is a ValueError
        naming the rank and the file."""
        # optimizer state is restored as loaded (not copied into existing tensors): load it onto the parameters' device
        device = self.engine.layers[0].param.device if self.engine.layers else "cpu"
        return read_rank_state(directory, self.rank, device, "save_state")

    def stage(self, directory: str | os.PathLike) -> None:
        # load_state's pre-hook runs before Accelerate loads the optimizer from rank 0's file, which would overwrite
        # the optimizer state of the layers this rank serves: read now, apply after optimizer.load_state_dict.
        self.pending, self.pending_path = self.read(directory), self.path(directory)

    def apply_pending(self) -> None:
        if self.pending is None:
            return
        state, path, self.pending, self.pending_path = self.pending, self.pending_path, None, None
        try:
            self.engine.load_state_dict(state)
        except Exception as e:
            raise ValueError(
                f"rank {self.rank}: the EF21 state in {path} does not fit this run ({type(e).__name__}: {e}); "
                "resume from a checkpoint this run's configuration saved, with the same number of processes"
            ) from e


# ------------------------------------------------------------------------------------------------- Accelerate facts
def _check_accelerator(accelerator: Accelerator) -> None:
    if accelerator.distributed_type in _UNSUPPORTED:
        raise ValueError(
            f"EF21-Muon replaces DDP's gradient all-reduce and needs plain data parallelism (or one "
            f"process); got distributed_type={accelerator.distributed_type.value}. Supported: NO, "
            f"MULTI_CPU, MULTI_GPU and the other MULTI_* (DDP) types"
            + (
                ". For FSDP2 inside a node with EF21 across nodes, shard the model with torch's fully_shard over "
                "each node's processes and drive it with EF21Engine(model, optimizer, topology='hierarchical'), or "
                "use Lightning's EF21FSDPStrategy (README, 'Multi-node clusters')"
                if accelerator.distributed_type == DistributedType.FSDP
                else ""
            )
        )
    if accelerator.scaler is not None:
        raise ValueError(
            f"mixed_precision={accelerator.mixed_precision!r} uses a GradScaler, whose per-rank "
            "overflow check would skip the collective EF21 step on some ranks only; valid choices "
            "with EF21: 'no', 'bf16'"
        )


def _report_skipped(optimizer: AcceleratedOptimizer, skipped: bool) -> None:
    """Make ``optimizer.step_was_skipped`` (read by ``AcceleratedScheduler`` and
    ``accelerator.optimizer_step_was_skipped``) report a skipped EF21 step, as after an fp16 overflow.

    Accelerate has no public setter: ``step_was_skipped`` returns the private ``_is_overflow`` (accelerate 1.15).
    tests/test_compat.py fails loudly if an upgrade changes that.
    """
    optimizer._is_overflow = skipped


def _find_ddp(model: nn.Module) -> DistributedDataParallel | None:
    """The DDP wrapper inside a prepared model (Accelerate may put ``torch.compile`` outside it; its
    ``_orig_mod`` has no public accessor: tests/test_compat.py pins it)."""
    while not isinstance(model, DistributedDataParallel):
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            return None
        model = inner
    return model
