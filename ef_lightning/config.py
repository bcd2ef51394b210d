"""One source of truth for what an EF21-Muon run is configured with: :class:`EF21Config`.

Every entry point builds one and nothing else validates options: :class:`~ef_lightning.EF21Engine` and
:class:`~ef_lightning.Simulator` (``config=`` or keyword options), the Lightning strategy (keyword options), the
Accelerate plugin (fields filled from ``EF21_*`` environment variables). Every rule lives in
:meth:`EF21Config.__post_init__`, so a bad value fails the same way, with the same message, wherever it is given.

Plain PyTorch: no Lightning, no Accelerate (docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from typing import Any, TypeAlias

import torch

from ef_lightning import compressors as _comp
from ef_lightning.comm import TOPOLOGIES
from ef_lightning.optim import ROLES as MODEL_ROLES

__all__ = [
    "EF21Config",
    "EF21ConfigError",
    "CompressorSpec",
    "COMPRESSOR_ROLES",
    "ESTIMATORS",
    "NONFINITE",
    "TOPOLOGIES",
    "DEFAULT_UPLINK",
    "DEFAULT_DOWNLINK",
    "DEFAULT_TOPOLOGY",
    "OUTER_OPTIMIZERS",
    "DILOCO_OUTER_LR",
    "DILOCO_OUTER_MOMENTUM",
]

#: keys of a per-role compressor mapping: the model roles of :func:`ef_lightning.build_lmo_optimizer` (``other``
#: parameters are matrices or vectors and take those roles' compressors) plus ``default`` for roles not named
COMPRESSOR_ROLES: tuple[str, ...] = (*(r for r in MODEL_ROLES if r != "other"), "default")
#: what to do on a non-finite gradient on any rank
NONFINITE: tuple[str, ...] = ("skip", "raise")
#: gradient estimators (docs/algorithm.md §2 and §4; arXiv 2604.10689)
ESTIMATORS: tuple[str, ...] = ("ef21", "marina", "ef21_page", "mvr")
#: the outer step of local training (``sync_every > 1``): DiLoCo's Nesterov SGD, or the LMO step on the aggregate
OUTER_OPTIMIZERS: tuple[str, ...] = ("nesterov", "lmo")
#: DiLoCo's outer Nesterov SGD (Douillard et al., arXiv 2311.08105, §3: learning rate 0.7, momentum 0.9)
DILOCO_OUTER_LR = 0.7
DILOCO_OUTER_MOMENTUM = 0.9
#: the estimators with a refresh probability ``p``
REFRESH_ESTIMATORS: tuple[str, ...] = ("marina", "ef21_page")

#: Default compressors, from the measurements in docs/benchmarks.md (byte-level Llama, 2 gloo workers, sharded,
#: bytes to a target of the uncompressed loss + 1 %): uplink ``top_k:0.05+natural`` and downlink ``top_k:0.1+natural``
#: on matrices reach the target in 575 steps (uncompressed: 300) with 10.4x fewer uplink + downlink bytes and 13.2x
#: fewer uplink bytes per worker. Measured alternatives: ``top_k:0.1+natural`` both ways 9.0x total (550 steps),
#: ``top_k:0.05+natural`` both ways 10.8x (700 steps), the former ``top_k:0.5`` downlink 2.4x (425 steps),
#: ``natural`` 4.1x, ``top_k:0.2`` 4.3x, ``rank:4`` 5.8x (850 steps). Vectors (biases, norm gains) stay dense.
DEFAULT_UPLINK: Mapping[str, str] = types.MappingProxyType(
    {
        "hidden": "top_k:0.05+natural",
        "conv": "top_k:0.05+natural",
        "embedding": "top_k:0.05+natural",
        "head": "top_k:0.05+natural",
        "vector": "identity",
        "default": "identity",
    }
)
DEFAULT_DOWNLINK: Mapping[str, str] = types.MappingProxyType(
    {
        "hidden": "top_k:0.1+natural",
        "conv": "top_k:0.1+natural",
        "embedding": "top_k:0.1+natural",
        "head": "top_k:0.1+natural",
        "vector": "identity",
        "default": "identity",
    }
)
#: ``sharded``: per-rank traffic and Newton-Schulz work do not grow with the number of workers
DEFAULT_TOPOLOGY = "sharded"

#: a compressor spec for every tensor (``"top_k:0.05"``) or a mapping role -> spec (roles: :data:`COMPRESSOR_ROLES`)
CompressorSpec: TypeAlias = str | Mapping[str, str]


class _FrozenDict(dict):
    """A read-only dict: a config's compressor mapping cannot change after its checks. Still a dict (JSON, YAML,
    ``==`` with plain dicts) and picklable (the spawn launcher pickles the strategy)."""

    def _readonly(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("an EF21Config's compressor mapping is read-only; build a new config (config.replace(...))")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _readonly  # type: ignore[assignment]

    def __reduce__(self) -> tuple[Any, ...]:
        return (_FrozenDict, (dict(self),))

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))


class EF21ConfigError(ValueError):
    """A bad :class:`EF21Config` value. ``fields`` names the option(s) at fault, so an adapter can say where the
    value came from (an environment variable, a command-line flag)."""

    def __init__(self, fields: str | tuple[str, ...], message: str) -> None:
        super().__init__(message)
        self.fields = (fields,) if isinstance(fields, str) else tuple(fields)


def _check_spec(field: str, label: str, spec: Any) -> None:
    """A compressor spec string that :func:`ef_lightning.compressors.build` accepts, else an error on ``field``."""
    if not isinstance(spec, str):
        raise EF21ConfigError(
            field,
            f"{label} must be a compressor spec string such as 'top_k:0.05' or a mapping "
            f"role -> spec, got {type(spec).__name__} ({spec!r})",
        )
    try:
        _comp.build(spec)
    except (ValueError, TypeError) as e:
        raise EF21ConfigError(field, f"{label}={spec!r} is not a valid compressor spec: {e}") from None


def _specs(spec: CompressorSpec) -> list[str]:
    return list(spec.values()) if isinstance(spec, Mapping) else [spec]


def _is_fraction(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0.0 < float(x) <= 1.0


@dataclasses.dataclass(frozen=True)
class EF21Config:
    """The options of an EF21-Muon run, checked once, at construction.

    Args:
        uplink: worker -> server compressor: a spec for every tensor (``"top_k:0.05"``, ``"rank:4"``,
            ``"top_k:0.05+natural"``, ...; docs/algorithm.md §3) or a mapping role -> spec with roles
            :data:`COMPRESSOR_ROLES`. ``None``: :data:`DEFAULT_UPLINK`.
        downlink: server -> worker compressor (EF21-P), same forms. ``None``: :data:`DEFAULT_DOWNLINK`, or
            ``identity`` with ``topology="allgather"`` (which has no downlink).
        topology: who serves which layer: ``sharded`` (default), ``allgather``, ``server`` or ``hierarchical``
            (several processes per node: dense averaging inside a node, EF21 only across nodes; docs/algorithm.md §5).
        local_world_size: processes per node for ``topology="hierarchical"`` (consecutive ranks form a node, as
            ``torchrun`` and Lightning number them). ``None``: the launcher's (Lightning: ``devices``; ``torchrun`` /
            ``accelerate launch``: the ``LOCAL_WORLD_SIZE`` environment variable).
        server_rank: the server's rank with ``topology="server"``.
        seed: base seed of the compressors' shared random generators; identical on every rank.
        on_nonfinite: ``skip`` (a non-finite gradient on any rank skips the step everywhere, leaves every state
            untouched, warns and is counted) or ``raise`` (FloatingPointError).
        estimator: ``ef21`` (EF21-Muon) or a variance-reduced estimator ``marina`` (unbiased compressors only),
            ``ef21_page``, ``mvr`` (docs/algorithm.md §4, arXiv 2604.10689); these take a second gradient per step.
        p: refresh probability in (0, 1] of ``marina`` / ``ef21_page``; ``None``: bits(compressed) / bits(dense)
            per step (MARINA's choice, arXiv 2102.07845 Cor. 2.1).
        participation: fraction in (0, 1] of the workers that send each round (``topology="server"`` only, the
            federated setting); ``None`` or 1: every worker every round.
        fused: compress, pack and decode all layers of a group (same shape and compressors) with one tensor op each
            (default); ``False`` runs the per-layer reference path (same bytes, same updates; slower).
        overlap: start each bucket's uplink from the backward pass as soon as its gradients are ready
            (:class:`~ef_lightning.EF21Engine` only; the Simulator has no backward to overlap). ``False``: one
            uplink collective at ``optimizer.step()``.
        bucket_cap_mb: size of the uplink buckets in MiB of fp32 gradient (the first bucket is at most 1 MiB, as in
            DDP); only with ``overlap``.
        sync_every: H, optimizer steps per synchronisation. 1 (default): the EF21-Muon step above, every step.
            H > 1: local training (DiLoCo-style, arXiv 2311.08105): every ``optimizer.step()`` is an inner step
            with the optimizer's own rule and state on this worker's parameters (no communication); every H-th
            step then sends the outer delta W_start - W_j through the uplink with error feedback, the server takes
            the ``outer`` step on X and the downlink brings the new W to every worker (docs/algorithm.md,
            "Local steps"). Needs ``estimator="ef21"`` and every worker each round.
        outer: the server's step on the aggregated outer delta G when ``sync_every > 1``: ``nesterov`` (DiLoCo's
            Nesterov SGD: B <- m*B + G; X <- X - outer_lr*(G + m*B)) or ``lmo`` (the optimizer's LMO rule on G:
            X <- X - outer_lr*lr*scale*d(G), no momentum, no weight decay; parameters the optimizer steps with
            AdamW take the Nesterov step).
        outer_lr: the outer step size (dimensionless); ``None``: 0.7 for ``nesterov`` (DiLoCo), H for ``lmo`` (H
            inner radii: the distance H aligned inner steps travel).
        outer_momentum: m of the ``nesterov`` outer step, in [0, 1) (DiLoCo: 0.9). The three outer options need
            ``sync_every > 1`` (given with ``sync_every=1`` they are an error).
        fragments: F, streaming synchronisation (Streaming DiLoCo, arXiv 2501.18512): the layers are split into F
            contiguous fragments balanced by size, and fragment f synchronises after the steps s with
            (s + 1 + f*H//F) % H == 0, so each step's link carries about 1/F of a round's traffic instead of
            bursts every H steps. 1 (default): every layer every H steps. Needs ``sync_every > 1``, 1 <= F <= H.

    Raises:
        EF21ConfigError: (a ValueError) naming the option, the bad value and the valid choices.

    Example::

        cfg = EF21Config(uplink="top_k:0.05", downlink={"hidden": "top_k:0.2", "default": "identity"})
        engine = EF21Engine(model, optimizer, cfg)
    """

    uplink: CompressorSpec | None = None
    downlink: CompressorSpec | None = None
    topology: str = DEFAULT_TOPOLOGY
    server_rank: int = 0
    seed: int = 0
    on_nonfinite: str = "skip"
    estimator: str = "ef21"
    p: float | None = None
    participation: float | None = None
    fused: bool = True
    overlap: bool = True
    bucket_cap_mb: float = 25.0
    local_world_size: int | None = None
    sync_every: int = 1
    outer: str = "nesterov"
    outer_lr: float | None = None
    outer_momentum: float = DILOCO_OUTER_MOMENTUM
    fragments: int = 1

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731  (frozen: normalise once)
        # options left to their defaults: replace() resolves them again (a new topology, a new downlink default)
        set_("_defaulted", frozenset(n for n in ("uplink", "downlink") if getattr(self, n) is None))
        self._choice("topology", TOPOLOGIES)
        self._choice("on_nonfinite", NONFINITE)
        self._choice("estimator", ESTIMATORS)
        for name in ("fused", "overlap"):
            if not isinstance(getattr(self, name), bool):
                raise EF21ConfigError(name, f"{name}={getattr(self, name)!r}; valid values: True, False")
        cap = self.bucket_cap_mb
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not 0 < cap < float("inf"):
            raise EF21ConfigError("bucket_cap_mb", f"bucket_cap_mb={cap!r}; valid values: numbers > 0 (MiB)")
        set_("bucket_cap_mb", float(cap))
        for name in ("server_rank", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise EF21ConfigError(name, f"{name}={v!r}; valid values: integers >= 0")
        lws = self.local_world_size
        if lws is not None and (isinstance(lws, bool) or not isinstance(lws, int) or lws < 1):
            raise EF21ConfigError(
                "local_world_size", f"local_world_size={lws!r}; valid values: integers >= 1 (processes per node), None"
            )
        if self.topology == "hierarchical" and (self.estimator != "ef21" or self.participation not in (None, 1, 1.0)):
            raise EF21ConfigError(
                ("topology", "estimator"),
                f"topology='hierarchical' runs estimator='ef21' with every worker each round; got "
                f"estimator={self.estimator!r}, participation={self.participation!r} (valid: estimator='ef21', "
                "participation=None; the variance-reduced estimators and partial participation need topology "
                "'sharded' or 'server')",
            )
        self._check_local()
        uplink = self._compressor("uplink", DEFAULT_UPLINK if self.uplink is None else self.uplink)
        set_("uplink", uplink)
        downlink = self.downlink
        if downlink is None:
            downlink = "identity" if self.topology == "allgather" else DEFAULT_DOWNLINK
        downlink = self._compressor("downlink", downlink)
        set_("downlink", downlink)
        if self.topology == "allgather":
            bad = [s for s in _specs(downlink) if _comp.build(s).kind != "identity"]
            if bad:
                raise EF21ConfigError(
                    ("downlink", "topology"),
                    f"downlink={bad[0]!r} needs topology 'server' or "
                    "'sharded': with 'allgather' every rank already holds X, so there is no "
                    "downlink; valid choice: downlink='identity'",
                )
        if self.p is not None:
            if not _is_fraction(self.p):
                raise EF21ConfigError(
                    "p", f"p={self.p!r}: the refresh probability is out of range; valid values: numbers in (0, 1]"
                )
            if self.estimator not in REFRESH_ESTIMATORS:
                raise EF21ConfigError(
                    ("p", "estimator"),
                    f"p={self.p!r} only applies to estimator "
                    f"{' or '.join(map(repr, REFRESH_ESTIMATORS))}, not {self.estimator!r} "
                    f"(valid choices with p: {', '.join(REFRESH_ESTIMATORS)})",
                )
            set_("p", float(self.p))
        if self.participation is not None:
            if not _is_fraction(self.participation):
                raise EF21ConfigError(
                    "participation",
                    f"participation={self.participation!r}; valid values: "
                    "numbers in (0, 1] (a fraction of the workers), or None for every worker",
                )
            if float(self.participation) == 1.0:
                set_("participation", None)
            elif self.topology != "server":
                raise EF21ConfigError(
                    ("participation", "topology"),
                    f"participation={self.participation!r} needs "
                    "topology 'server' (partial participation is the federated setting: a server "
                    f"and a subset of clients per round), got topology={self.topology!r}",
                )
            else:
                set_("participation", float(self.participation))
        if self.estimator == "marina":
            bad = [s for s in _specs(uplink) if _comp.build(s).kind == "contractive"]
            if bad:
                raise EF21ConfigError(
                    ("uplink", "estimator"),
                    f"estimator='marina' needs unbiased compressors "
                    f"(rand_k:<r>:unbiased, natural, qsgd:<s>) or identity; uplink {bad[0]!r} is "
                    "contractive — valid estimators for contractive compressors: ef21_page, mvr",
                )

    def _check_local(self) -> None:
        """The local-training options (``sync_every``, ``outer``, ``outer_lr``, ``outer_momentum``)."""
        H = self.sync_every
        if isinstance(H, bool) or not isinstance(H, int) or H < 1:
            raise EF21ConfigError(
                "sync_every", f"sync_every={H!r}; valid values: integers >= 1 (optimizer steps per synchronisation)"
            )
        self._choice("outer", OUTER_OPTIMIZERS)
        lr = self.outer_lr
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < float("inf")):
            raise EF21ConfigError("outer_lr", f"outer_lr={lr!r}; valid values: numbers > 0, or None (the default)")
        m = self.outer_momentum
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= m < 1:
            raise EF21ConfigError("outer_momentum", f"outer_momentum={m!r}; valid values: numbers in [0, 1)")
        object.__setattr__(self, "outer_momentum", float(m))
        F = self.fragments
        if isinstance(F, bool) or not isinstance(F, int) or F < 1:
            raise EF21ConfigError("fragments", f"fragments={F!r}; valid values: integers >= 1")
        if F > 1 and not 1 < F <= H:
            raise EF21ConfigError(
                ("fragments", "sync_every"),
                f"fragments={F} with sync_every={H}: streaming staggers F fragments over the H steps of a round; "
                f"valid values: fragments in 1 .. sync_every (and sync_every > 1)",
            )
        if lr is not None:
            object.__setattr__(self, "outer_lr", float(lr))
        if H == 1:  # an outer option without local steps is a forgotten sync_every, not a no-op to skip quietly
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            given = [n for n in ("outer", "outer_lr", "outer_momentum") if getattr(self, n) != defaults[n]]
            if given:
                shown = ", ".join(f"{n}={getattr(self, n)!r}" for n in given)
                raise EF21ConfigError(
                    (*given, "sync_every"),
                    f"{shown} with sync_every=1: the outer step exists only with local steps; valid: sync_every > 1 "
                    "(e.g. 8, 32) with these, or leave outer, outer_lr and outer_momentum unset",
                )
        if H > 1 and (self.estimator != "ef21" or self.participation not in (None, 1, 1.0)):
            raise EF21ConfigError(
                ("sync_every", "estimator"),
                f"sync_every={H} (local steps) runs estimator='ef21' with every worker each round; got "
                f"estimator={self.estimator!r}, participation={self.participation!r} (valid: estimator='ef21', "
                "participation=None; or sync_every=1)",
            )

    @property
    def local_steps(self) -> bool:
        """True when workers take local steps between synchronisations (``sync_every > 1``)."""
        return self.sync_every > 1

    @property
    def outer_step_size(self) -> float:
        """``outer_lr`` resolved: the given value, else 0.7 (``nesterov``, DiLoCo) or ``sync_every`` (``lmo``)."""
        if self.outer_lr is not None:
            return self.outer_lr
        return DILOCO_OUTER_LR if self.outer == "nesterov" else float(self.sync_every)

    def _choice(self, name: str, choices: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise EF21ConfigError(name, f"{name}={value!r}; valid choices: {', '.join(choices)}")

    @staticmethod
    def _compressor(field: str, spec: Any) -> CompressorSpec:
        """``spec`` checked: a valid spec string, or a mapping from known roles to valid spec strings (copied)."""
        if not isinstance(spec, Mapping):
            _check_spec(field, field, spec)
            return spec
        bad = [k for k in spec if k not in COMPRESSOR_ROLES]
        if bad:
            raise EF21ConfigError(
                field, f"{field} mapping has unknown role(s) {bad}; valid roles: {', '.join(COMPRESSOR_ROLES)}"
            )
        for role, s in spec.items():
            _check_spec(field, f"{field}[{role!r}]", s)
        return _FrozenDict(spec)  # a copy: later changes to the caller's mapping do not reach the config

    # ------------------------------------------------------------------------------------------------ queries
    @property
    def variance_reduced(self) -> bool:
        """True for the estimators that take a second gradient per step (``marina``, ``ef21_page``, ``mvr``)."""
        return self.estimator != "ef21"

    def check_accumulation(self, micro_batches: int, setting: str) -> None:
        """The variance-reduced estimators take both gradients on ONE minibatch: with gradient accumulation the
        second one could only be re-evaluated on the last micro-batch. ``setting`` names the framework's option
        (``accumulate_grad_batches``, ``gradient_accumulation_steps``) for the error message."""
        if self.variance_reduced and micro_batches > 1:
            raise EF21ConfigError(
                "estimator",
                f"estimator={self.estimator!r} with {setting}={micro_batches}: the "
                "second gradient (at the previous point) would be taken on the last micro-batch "
                f"only, not on the accumulated minibatch; valid choices: {setting}=1 (use a larger "
                "batch), or estimator='ef21'",
            )

    def compressor(self, direction: str, role: str, shape: torch.Size) -> _comp.Compressor:
        """The compressor of one tensor.

        Args:
            direction: ``"uplink"`` or ``"downlink"``.
            role: the tensor's role (:data:`COMPRESSOR_ROLES` less ``default``); roles a mapping does not name take
                its ``default`` entry, else ``identity``.
            shape: the tensor's shape; a compressor that cannot handle it (``rank`` on a vector) falls back to
                ``identity`` (docs/algorithm.md §3).
        """
        spec = self.uplink if direction == "uplink" else self.downlink
        assert spec is not None  # __post_init__ replaced None by the default
        if isinstance(spec, Mapping):
            spec = spec.get(role, spec.get("default", "identity"))
        comp = _comp.build(spec)
        return comp if comp.supports(shape) else _comp.build("identity")

    def replace(self, **changes: Any) -> EF21Config:
        """A copy with ``changes`` applied (and checked again); options that were left to their defaults are
        resolved again (``EF21Config().replace(topology="allgather")`` has the identity downlink of allgather)."""
        defaulted: frozenset[str] = getattr(self, "_defaulted", frozenset())
        return dataclasses.replace(self, **{**dict.fromkeys(defaulted), **changes})

    def to_dict(self) -> dict[str, Any]:
        """Plain values (mappings as dicts), e.g. to store beside a checkpoint or in a run's resolved config."""
        return {
            f.name: (dict(v) if isinstance(v := getattr(self, f.name), Mapping) else v)
            for f in dataclasses.fields(self)
        }

    @classmethod
    def build(cls, config: EF21Config | None = None, **options: Any) -> EF21Config:
        """``config`` with ``options`` applied, or a new config from ``options``; unknown option names are a
        TypeError listing the valid ones."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in options if k not in valid]
        if unknown:
            raise TypeError(f"unknown EF21 option(s) {unknown}; valid options: {', '.join(valid)}")
        if config is not None and not isinstance(config, cls):
            raise TypeError(f"config must be an EF21Config, got {type(config).__name__}")
        return config.replace(**options) if config is not None else cls(**options)
