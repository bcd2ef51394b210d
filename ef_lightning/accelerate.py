"""Accelerate integration: EF21-Muon behind one environment flag, ``accelerate launch`` unchanged.

A stock Accelerate script swaps one call::

    from ef_lightning.accelerate import EF21Plugin

    plugin = EF21Plugin()                      # reads the EF21_* environment variables below
    model, optimizer, loader, scheduler = plugin.prepare(accelerator, model, optimizer, loader, scheduler)
    for step, batch in enumerate(loader):
        with accelerator.accumulate(model):
            accelerator.backward(loss_fn(model, batch))
            optimizer.step()                   # EF21-Muon steps 2-7 when EF21_MUON=1
            scheduler.step()
            optimizer.zero_grad()
        accelerator.log(plugin.metrics(), step=step)   # {} without the flag

The variance-reduced estimators of ALGORITHM.md §4 (``EF21_ESTIMATOR=marina|ef21_page|mvr``, arXiv 2604.10689)
need a second gradient on the SAME minibatch at the previous point; the loop hands over a closure the torch way::

        loss = loss_fn(model, batch)
        accelerator.backward(loss)             # g_j at the current W, as always

        def closure():                         # called by the engine with the previous W loaded
            optimizer.zero_grad()
            second = loss_fn(model, batch)     # same batch (and no fresh dropout masks you care about)
            accelerator.backward(second)
            return second

        optimizer.step(closure)

Launch as usual, e.g. ``EF21_MUON=1 EF21_UPLINK=top_k:0.05 accelerate launch --multi_gpu --num_processes 2
train.py`` (add ``ACCELERATE_USE_CPU=1`` for 2 CPU processes). Without ``EF21_MUON=1`` :meth:`EF21Plugin.prepare`
is exactly ``accelerator.prepare``. With it:

* DDP sends nothing: ``noop_hook`` (``torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks``) is registered on
  the DDP-wrapped model, so ``param.grad`` keeps this worker's own gradient g_j.
* The optimizer step *is* the EF21 sync. ``AcceleratedOptimizer.step`` is left as it is: it steps only when
  ``accelerator.sync_gradients`` is True, so under ``accelerator.accumulate`` the sync runs once per optimizer step.
  What it calls, the inner optimizer's ``step`` (patched on that instance only), runs
  :meth:`~ef_lightning.EF21Engine.step`; the engine's own call of the inner ``step`` for the server update
  (ALGORITHM.md §2 step 5) runs the original update. A step skipped for a non-finite gradient sets
  ``optimizer.step_was_skipped``, so ``accelerator.optimizer_step_was_skipped`` is True and a scheduler prepared by
  Accelerate does not advance, as after an fp16 overflow.
* ``accelerator.save_state`` / ``load_state`` keep every rank's own EF21 state (M_j and G_j differ per worker; X and
  G live on their owner): a save pre-hook writes ``ef21_rank{r}.pt`` into the checkpoint folder on every rank; the
  load pre-hook reads this rank's file and a ``load_state_dict`` post-hook of the optimizer applies it right after
  Accelerate has loaded the optimizer (from rank 0's file, so the served layers' optimizer state is restored after).
* The ledger of bits and wire bytes is :attr:`EF21Plugin.ledger` (the engine's, same ``summary()``);
  :meth:`EF21Plugin.metrics` gives per-step and cumulative numbers ready for ``accelerator.log``.

One process with the flag set (``python train.py``, a debug run): there is no process group to talk over, so the
plugin runs a one-worker :class:`~ef_lightning.Simulator` instead of :class:`~ef_lightning.EF21Engine`: the same
compressors, EF21 state and ledger, with W and X kept exactly as a one-rank run would. ``topology`` and
``server_rank`` have no meaning there and are ignored.

Environment variables (explicit constructor arguments win, like Accelerate's own plugins):

==================== ============================================================ ==============
variable             meaning                                                      default
==================== ============================================================ ==============
EF21_MUON            1/true/yes/on: run EF21-Muon; 0/false/no/off/unset: plain     off
EF21_UPLINK          compressor spec, or ``role=spec,role=spec`` per layer role    identity
EF21_DOWNLINK        the same for server -> workers (identity with allgather)      identity
EF21_TOPOLOGY        sharded, allgather or server                                  sharded
EF21_SERVER_RANK     the server's rank for topology=server                         0
EF21_SEED            base seed of the compressors' shared generators               0
EF21_ON_NONFINITE    skip (warn, skip the step everywhere) or raise                skip
EF21_ESTIMATOR       ef21, marina, ef21_page or mvr (ALGORITHM.md §2, §4)           ef21
EF21_P               refresh probability in (0, 1] (marina, ef21_page only)        bits(Q)/dense
EF21_PARTICIPATION   fraction of workers per round in (0, 1] (topology=server)     all workers
==================== ============================================================ ==============

Invalid values fail when the plugin is created, with a ValueError naming the variable, the value and the valid
choices; so do combinations the engine would reject later (``p`` with ``ef21``/``mvr``, ``participation`` < 1
without ``topology=server``).

Closures. With ``estimator=ef21`` a closure passed to ``optimizer.step(closure)`` keeps torch's meaning: it is called
once at the current point and its loss is returned. With a variance-reduced estimator the closure is *required*
(``ValueError`` otherwise, on the first step already) and is handed to :meth:`~ef_lightning.EF21Engine.step`, which
calls it only with the previous W loaded (from the second step on); the gradient at the current point must already
be in ``param.grad`` from the loop's own ``accelerator.backward``, and ``optimizer.step`` returns ``None``.
Gradient accumulation (``gradient_accumulation_steps > 1``) is rejected with a variance-reduced estimator: the
closure would recompute only the last micro-batch, so the two gradients of the estimator would not be on the same
minibatch. Manual accumulation without ``accelerator.accumulate`` cannot be detected; do not combine it with them. Not supported (rejected at ``prepare``): a GradScaler (``mixed_precision="fp16"``: its per-rank overflow
check would skip the collective step on some ranks only; use bf16), DeepSpeed, FSDP, Megatron-LM and XLA.

Differences from plain DDP that follow from the algorithm: ``accelerator.clip_grad_norm_`` clips each worker's own
gradient before compression (DDP clips the average), and the model holds W, the workers' copy: evaluate inside
``with plugin.server_model():`` to use the server model X (equal to W with an identity downlink).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import os
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DistributedType
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook
from torch.nn.parallel import DistributedDataParallel

from ef_lightning import compressors as _comp
from ef_lightning.comm import TOPOLOGIES, Ledger
from ef_lightning.ef21 import (DEFAULT_DOWNLINK, DEFAULT_TOPOLOGY, DEFAULT_UPLINK, ESTIMATORS, NONFINITE, ROLES,
                               EF21Engine, Simulator)

__all__ = ["ENV_PREFIX", "EF21Plugin"]

#: prefix of the environment variables the plugin reads (never ``ACCELERATE_``: Accelerate rejects unknown keys)
ENV_PREFIX = "EF21_"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")
# Accelerate modes that do not wrap the model in DDP (EF21 replaces DDP's all-reduce, nothing else)
_UNSUPPORTED = (DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.MEGATRON_LM, DistributedType.XLA)


# ---------------------------------------------------------------------------------------------------- value parsing
def _parse_flag(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ValueError(f"{where}={value!r} is not a flag; valid values: {', '.join(_TRUE)} (on) or "
                     f"{', '.join(v for v in _FALSE if v)} or empty (off)")


def _parse_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"{where} must be an int, got {type(value).__name__} ({value!r})")
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"{where}={value!r} is not an integer; valid values: integers >= 0") from None
    if n < 0:
        raise ValueError(f"{where}={value!r} is negative; valid values: integers >= 0")
    return n


def _parse_choice(value: Any, where: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{where}={value!r}; valid choices: {', '.join(choices)}")
    return value


def _parse_fraction(value: Any, where: str) -> float | None:
    """A number in (0, 1], or None (the engine's default). Strings come from the environment."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"{where} must be a number in (0, 1], got {type(value).__name__} ({value!r})")
    try:
        x = float(value)
    except ValueError:
        raise ValueError(f"{where}={value!r} is not a number; valid values: numbers in (0, 1]") from None
    if not 0.0 < x <= 1.0:  # also rejects nan
        raise ValueError(f"{where}={value!r} is out of range; valid values: numbers in (0, 1]")
    return x


def _check_spec(spec: Any, where: str) -> str:
    if not isinstance(spec, str):
        raise TypeError(f"{where} must be a compressor spec string such as 'top_k:0.05', got {type(spec).__name__}")
    try:
        _comp.build(spec)
    except ValueError as e:
        raise ValueError(f"{where}={spec!r} is not a valid compressor spec: {e}") from None
    return spec


def _parse_compressor(value: Any, where: str) -> str | dict[str, str]:
    """A compressor spec, or a per-role mapping given as a Mapping or as the string ``role=spec,role=spec``."""
    mapping = value
    if isinstance(value, str) and "=" in value:
        pairs = [p.strip() for p in value.split(",") if p.strip()]
        if not all(p.count("=") == 1 for p in pairs):
            raise ValueError(f"{where}={value!r}: a per-role value is 'role=spec,role=spec' "
                             f"(e.g. 'hidden=top_k:0.05,default=identity'); roles: {', '.join(ROLES)}")
        mapping = dict(tuple(s.strip() for s in p.split("=")) for p in pairs)
    if isinstance(mapping, Mapping):
        bad = [k for k in mapping if k not in ROLES]
        if bad:
            raise ValueError(f"{where}={value!r} names unknown role(s) {bad}; valid roles: {', '.join(ROLES)}")
        return {role: _check_spec(spec, f"{where}[{role!r}]") for role, spec in mapping.items()}
    return _check_spec(value, where)


@dataclasses.dataclass
class EF21Plugin:
    """EF21-Muon for an Accelerate script, configured by arguments or ``EF21_*`` environment variables.

    Every field defaults to ``None``, meaning "read ``EF21_<FIELD>`` from the environment, else the default in the
    field's help"; an explicit argument wins. The runtime objects exist after :meth:`prepare` (or :meth:`attach`):
    :attr:`engine`, :attr:`ledger`.

    Args:
        enabled: run EF21-Muon (env ``EF21_MUON``); False makes :meth:`prepare` plain ``accelerator.prepare``.
        uplink: compressor spec for worker -> server messages, or a mapping role -> spec (env ``EF21_UPLINK``).
        downlink: compressor spec for server -> worker messages (env ``EF21_DOWNLINK``).
        topology: ``sharded``, ``allgather`` or ``server`` (env ``EF21_TOPOLOGY``; see :mod:`ef_lightning.comm`).
        server_rank: the server's rank with ``topology="server"`` (env ``EF21_SERVER_RANK``).
        seed: base seed of the compressors' shared generators, same on every rank (env ``EF21_SEED``).
        on_nonfinite: ``skip`` or ``raise`` on a non-finite gradient on any rank (env ``EF21_ON_NONFINITE``).
        estimator: gradient estimator, one of ``ef21``, ``marina``, ``ef21_page``, ``mvr`` (env ``EF21_ESTIMATOR``;
            ALGORITHM.md §2/§4, arXiv 2604.10689). The last three need ``optimizer.step(closure)`` (module docstring).
        p: refresh probability of ``marina``/``ef21_page`` in (0, 1] (env ``EF21_P``); ``None``: the engine's
            default bits(Q)/bits(dense) (MARINA, arXiv 2102.07845 Cor. 2.1).
        participation: fraction of workers per round in (0, 1], ``topology=server`` only (env
            ``EF21_PARTICIPATION``); ``None``: every worker every round.
    """

    enabled: bool | None = dataclasses.field(default=None, metadata={
        "help": "Run EF21-Muon instead of plain DDP. Env EF21_MUON (1/true/yes/on); default off."})
    uplink: str | Mapping[str, str] | None = dataclasses.field(default=None, metadata={
        "help": "Uplink compressor spec ('top_k:0.05', 'top_k:0.05+natural', 'rank:4', ...) or a mapping "
                f"role -> spec with roles {', '.join(ROLES)}. Env EF21_UPLINK ('role=spec,role=spec' for a "
                "mapping); default 'identity'."})
    downlink: str | Mapping[str, str] | None = dataclasses.field(default=None, metadata={
        "help": "Downlink compressor spec or role mapping (must be identity with topology allgather). "
                "Env EF21_DOWNLINK; default 'identity'."})
    topology: str | None = dataclasses.field(default=None, metadata={
        "help": f"Who serves which layer: {', '.join(TOPOLOGIES)}. Env EF21_TOPOLOGY; default 'sharded'."})
    server_rank: int | None = dataclasses.field(default=None, metadata={
        "help": "Rank of the parameter server with topology 'server'. Env EF21_SERVER_RANK; default 0."})
    seed: int | None = dataclasses.field(default=None, metadata={
        "help": "Base seed of the compressors' shared random generators (rand_k, natural, ...), identical on every "
                "rank. Env EF21_SEED; default 0."})
    on_nonfinite: str | None = dataclasses.field(default=None, metadata={
        "help": f"On a non-finite gradient on any rank: {', '.join(NONFINITE)}. Env EF21_ON_NONFINITE; "
                "default 'skip'."})
    estimator: str | None = dataclasses.field(default=None, metadata={
        "help": f"Gradient estimator: {', '.join(ESTIMATORS)} (the last three are variance-reduced and need "
                "optimizer.step(closure)). Env EF21_ESTIMATOR; default 'ef21'."})
    p: float | None = dataclasses.field(default=None, metadata={
        "help": "Refresh probability in (0, 1] of estimators marina / ef21_page. Env EF21_P; default "
                "bits(uplink)/bits(dense)."})
    participation: float | None = dataclasses.field(default=None, metadata={
        "help": "Fraction of workers in (0, 1] that take part in each round (topology 'server' only). "
                "Env EF21_PARTICIPATION; default all workers."})

    def __post_init__(self) -> None:
        # the same defaults as the Lightning strategy (ef_lightning.ef21.DEFAULT_*, chosen in docs/benchmarks.md);
        # the downlink default depends on the topology (allgather has none), so it is resolved after the loop
        defaults = {"enabled": False, "uplink": dict(DEFAULT_UPLINK), "topology": DEFAULT_TOPOLOGY, "downlink": None,
                    "server_rank": 0, "seed": 0, "on_nonfinite": "skip", "estimator": "ef21", "p": None,
                    "participation": None}
        env_names = {"enabled": "EF21_MUON"}
        wheres: dict[str, str] = {}
        for name, default in defaults.items():
            env = env_names.get(name, ENV_PREFIX + name.upper())
            where = name
            if getattr(self, name) is None:
                if env in os.environ:
                    setattr(self, name, os.environ[env])
                    where = env
                else:
                    setattr(self, name, default)
            wheres[name] = where
            if name == "downlink" and getattr(self, name) is None:
                self.downlink = "identity" if self.topology == "allgather" else dict(DEFAULT_DOWNLINK)
            setattr(self, name, self._parse(name, getattr(self, name), where))
        self._check_combinations(wheres)
        # runtime state (not configuration, so not dataclass fields)
        self.engine: EF21Engine | Simulator | None = None
        self._accelerator: Accelerator | None = None
        self._optimizer: AcceleratedOptimizer | None = None
        self._pending: dict[str, Any] | None = None
        self._in_server_step = False

    @staticmethod
    def _parse(name: str, value: Any, where: str) -> Any:
        if name == "enabled":
            return _parse_flag(value, where)
        if name in ("uplink", "downlink"):
            return _parse_compressor(value, where)
        if name == "topology":
            return _parse_choice(value, where, TOPOLOGIES)
        if name == "on_nonfinite":
            return _parse_choice(value, where, NONFINITE)
        if name == "estimator":
            return _parse_choice(value, where, ESTIMATORS)
        if name in ("p", "participation"):
            return _parse_fraction(value, where)
        return _parse_int(value, where)

    def _check_combinations(self, wheres: Mapping[str, str]) -> None:
        """Fail at start-up on settings the engine would only reject at ``prepare`` (or on every rank at once)."""
        if self.p is not None and self.estimator not in ("marina", "ef21_page"):
            raise ValueError(f"{wheres['p']}={self.p!r} only applies to estimator 'marina' or 'ef21_page'; "
                             f"{wheres['estimator']}={self.estimator!r} (valid choices with p: marina, ef21_page)")
        if self.participation not in (None, 1.0) and self.topology != "server":
            raise ValueError(f"{wheres['participation']}={self.participation!r} needs topology 'server' (a server "
                             f"and a subset of clients per round); {wheres['topology']}={self.topology!r} "
                             "(valid choice with participation < 1: server)")

    @property
    def variance_reduced(self) -> bool:
        """True for the estimators that need a second gradient per step (``marina``, ``ef21_page``, ``mvr``)."""
        return self.estimator != "ef21"

    def to_kwargs(self) -> dict[str, Any]:
        """The resolved keyword arguments of :class:`~ef_lightning.EF21Engine` (``EF21Engine(model, opt, **kw)``)."""
        return {"uplink": self.uplink, "downlink": self.downlink, "topology": self.topology,
                "server_rank": self.server_rank, "seed": self.seed, "on_nonfinite": self.on_nonfinite,
                "estimator": self.estimator, "p": self.p, "participation": self.participation}

    # ------------------------------------------------------------------------------------------------- wiring
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
            raise ValueError(f"EF21Plugin.prepare needs exactly one model and one optimizer among the objects, got "
                             f"{len(models)} model(s) and {len(optims)} optimizer(s)")
        self._check_accelerator(accelerator)
        out = accelerator.prepare(*objects)
        prepared = out if len(objects) > 1 else (out,)
        self.attach(accelerator, prepared[models[0]], prepared[optims[0]])
        return out

    @contextlib.contextmanager
    def server_model(self) -> Iterator[None]:
        """Evaluate at the server model X: inside the block the model's parameters hold X (gathered to every rank,
        a collective), afterwards W again. ALGORITHM.md §2 reports validation loss at X; with an identity downlink
        W == X and nothing is gathered. Without EF21 (flag off) it does nothing.

        Example::

            with plugin.server_model():
                val_loss = evaluate(model, val_loader)
        """
        if self.engine is None:
            yield
            return
        with self.engine.at_server_model():
            yield

    @staticmethod
    def _check_accelerator(accelerator: Accelerator) -> None:
        if accelerator.distributed_type in _UNSUPPORTED:
            raise ValueError(f"EF21-Muon replaces DDP's gradient all-reduce and needs plain data parallelism (or one "
                             f"process); got distributed_type={accelerator.distributed_type.value}. Supported: NO, "
                             f"MULTI_CPU, MULTI_GPU and the other MULTI_* (DDP) types")
        if accelerator.scaler is not None:
            raise ValueError(f"mixed_precision={accelerator.mixed_precision!r} uses a GradScaler, whose per-rank "
                             "overflow check would skip the collective EF21 step on some ranks only; valid choices "
                             "with EF21: 'no', 'bf16'")

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
            raise TypeError(f"optimizer must be the AcceleratedOptimizer returned by accelerator.prepare, "
                            f"got {type(optimizer).__name__}")
        if self.engine is not None:
            if optimizer is self._optimizer:
                return  # a second train() call on the same prepared objects
            raise ValueError("this EF21Plugin is already attached to another optimizer; use one plugin per run")
        self._check_accelerator(accelerator)
        if self.variance_reduced and accelerator.gradient_accumulation_steps > 1:
            raise ValueError(f"estimator={self.estimator!r} with gradient_accumulation_steps="
                             f"{accelerator.gradient_accumulation_steps}: the closure would recompute the second "
                             "gradient on the last micro-batch only, not on the accumulated minibatch; valid choices: "
                             "gradient_accumulation_steps=1 (use a larger batch), or estimator='ef21'")
        module = accelerator.unwrap_model(model, keep_torch_compile=False)
        if accelerator.num_processes > 1:
            ddp = _find_ddp(model)
            if ddp is None:
                raise ValueError(f"with {accelerator.num_processes} processes the prepared model must be wrapped in "
                                 f"DistributedDataParallel, got {type(model).__name__}")
            ddp.register_comm_hook(state=None, hook=noop_hook)  # param.grad keeps g_j; EF21 does the exchange
            self.engine = EF21Engine(module, optimizer.optimizer, **self.to_kwargs())
        else:
            self.engine = Simulator(module, optimizer.optimizer, n_workers=1, uplink=self.uplink,
                                    downlink=self.downlink, seed=self.seed, on_nonfinite=self.on_nonfinite,
                                    estimator=self.estimator, p=self.p, participation=self.participation)
        self._accelerator, self._optimizer = accelerator, optimizer
        self._patch_step(optimizer.optimizer)
        optimizer.optimizer.register_load_state_dict_post_hook(lambda _: self._apply_pending())
        accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: self.save(output_dir))
        accelerator.register_load_state_pre_hook(self._stage_load)

    # ------------------------------------------------------------------------------------------------- the step
    def _patch_step(self, inner: torch.optim.Optimizer) -> None:
        """Make the inner optimizer's ``step`` the EF21 sync, keeping its own update for the engine's server step.

        ``AcceleratedOptimizer.step`` stays untouched and keeps deciding *whether* to step (``sync_gradients``); it
        calls ``inner.step``, which becomes :meth:`_sync_step`. The engine was given ``inner`` and calls
        ``inner.step()`` for ALGORITHM.md §2 step 5: that re-entrant call runs the original update. Patching below
        the AcceleratedOptimizer keeps LR schedulers working whichever object they wrapped, and when: torch's
        schedulers wrap ``optimizer.step`` of the optimizer they were built on (the raw one before ``prepare``, the
        AcceleratedOptimizer after it, as the transformers Trainer does) and call the wrapped method's function.
        """
        update = inner.step  # bound method, possibly already wrapped by an LR scheduler built before prepare
        plugin = self

        def step(opt: torch.optim.Optimizer, closure: Callable[[], Any] | None = None) -> Any:
            if plugin._in_server_step:
                return update(closure)
            return plugin._sync_step(closure)

        # It wraps the optimizer's step, and says so: an LR scheduler's "step() is patched" mark carries over.
        functools.update_wrapper(step, update)
        inner.step = types.MethodType(step, inner)  # a bound method, as torch's scheduler wrapper expects

    def _sync_step(self, closure: Callable[[], Any] | None) -> Any:
        """EF21-Muon steps 2-7 on this worker's gradients; reports a skipped step like an fp16 overflow.

        ``ef21``: a closure is torch's (called here at the current point, its loss returned). Variance-reduced
        estimators: the closure is the engine's second-gradient callback (called with the previous W loaded, from
        the second step on); the current gradient is already in ``param.grad``; returns ``None``.
        """
        loss = None
        if self.variance_reduced:
            if closure is None:  # fail on the first step, not only on the second when the engine needs it
                raise ValueError(f"estimator={self.estimator!r} needs optimizer.step(closure): a closure that calls "
                                 "optimizer.zero_grad(), recomputes the loss on the SAME batch and calls "
                                 "accelerator.backward(loss); it is evaluated at the previous point (valid estimator "
                                 "without a closure: 'ef21')")
        elif closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._in_server_step = True
        try:
            if isinstance(self.engine, Simulator):
                grads = [L.param.grad.detach().clone() if L.param.grad is not None else torch.zeros_like(L.param)
                         for L in self.engine.layers]
                prev = None
                if self.engine.needs_previous_gradient:
                    with self.engine.at_previous_point(), torch.enable_grad():
                        closure()
                    prev = [[L.param.grad.detach().clone() if L.param.grad is not None else torch.zeros_like(L.param)
                             for L in self.engine.layers]]
                applied = self.engine.apply([grads], prev)
            else:
                applied = self.engine.step(closure if self.variance_reduced else None)
        finally:
            self._in_server_step = False
        # what step_was_skipped reports: AcceleratedScheduler and accelerator.optimizer_step_was_skipped read it
        self._optimizer._is_overflow = not applied
        return loss

    # ------------------------------------------------------------------------------------------------- checkpoints
    def _path(self, directory: str | os.PathLike) -> str:
        return os.path.join(os.fspath(directory), f"ef21_rank{self._accelerator.process_index}.pt")

    def save(self, directory: str | os.PathLike) -> str:
        """Write this rank's EF21 state to ``directory/ef21_rank{r}.pt`` (every rank calls it); returns the path."""
        if self.engine is None:
            raise ValueError("EF21Plugin.save: nothing to save before prepare()/attach() with EF21 enabled")
        os.makedirs(directory, exist_ok=True)
        path = self._path(directory)
        torch.save({"config": self.to_kwargs(), "engine": self.engine.state_dict()}, path)
        return path

    def _read(self, directory: str | os.PathLike) -> dict[str, Any]:
        path = self._path(directory)
        if not os.path.isfile(path):
            found = sorted(os.path.basename(f) for f in glob.glob(os.path.join(os.fspath(directory), "ef21_rank*.pt")))
            raise ValueError(f"{path} does not exist (EF21 files in {os.fspath(directory)!r}: {found or 'none'}); "
                             "resume an EF21 run from a checkpoint it saved, with the same number of processes")
        # optimizer state is restored as loaded (not copied into existing tensors): load it onto the parameters' device
        device = self.engine.layers[0].param.device if self.engine.layers else "cpu"
        return torch.load(path, map_location=device, weights_only=True)["engine"]

    def load(self, directory: str | os.PathLike) -> None:
        """Restore this rank's EF21 state from ``directory`` now (after the model and optimizer state are loaded)."""
        self.engine.load_state_dict(self._read(directory))

    def _stage_load(self, models: list[nn.Module], input_dir: str) -> None:
        # load_state's pre-hook runs before Accelerate loads the optimizer from rank 0's file, which would overwrite
        # the optimizer state of the layers this rank serves: read now, apply after optimizer.load_state_dict.
        self._pending = self._read(input_dir)

    def _apply_pending(self) -> None:
        if self._pending is not None:
            state, self._pending = self._pending, None
            self.engine.load_state_dict(state)


def _find_ddp(model: nn.Module) -> DistributedDataParallel | None:
    """The DDP wrapper inside a prepared model (Accelerate may put ``torch.compile`` outside it)."""
    while not isinstance(model, DistributedDataParallel):
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            return None
        model = inner
    return model
