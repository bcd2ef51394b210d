"""The LMO optimizer (Scion / Gluon / Muon family) and presets that give every parameter a norm (docs/algorithm.md §1).

Three layers, each usable alone:

* pure update functions — :func:`momentum_direction_`, :func:`lmo_update_`, :func:`adamw_update_`;
* :class:`LMO`, a thin ``torch.optim.Optimizer`` that calls them per parameter group;
* :func:`param_groups` / :func:`build_lmo_optimizer`, which sort a model's parameters into roles (hidden matrix, conv
  kernel, input embedding, output head, vector) and give each role a norm, radius and learning rate from a preset.

Papers: Scion — Pethick et al., "Training Deep Learning Models with Norm-Constrained LMOs", arXiv 2502.07529, code
LIONS-EPFL/scion; Gluon — Riabinin, Shulgin, Gruntkowska, Richtárik, arXiv 2505.13416; Muon — Keller Jordan 2024,
https://kellerjordan.github.io/posts/muon/ (and ``torch.optim.Muon``).
"""

from __future__ import annotations

import fnmatch
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast, overload

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.adamw import adamw as _torch_adamw

from ef_lightning.lmo import EPS, NORMS, direction_parts, resolve_ns_dtype

__all__ = [
    "ADAMW",
    "GROUP_KEYS",
    "LMO",
    "PRESETS",
    "ROLES",
    "adamw_update_",
    "build_lmo_optimizer",
    "format_groups",
    "lmo_update_",
    "momentum_direction_",
    "param_groups",
]

ADAMW = "adamw"
# Exact set of keys a param group may carry (Keller's Muon checks its keys the same way: a typo is an error).
GROUP_KEYS: frozenset[str] = frozenset(
    {
        "params",
        "param_names",
        "role",
        "lr",
        "norm",
        "scale",
        "momentum",
        "nesterov",
        "weight_decay",
        "ns_steps",
        "ns_dtype",
        "constrained",
        "l0",
        "l1",
        "betas",
        "eps",
        "transpose",
    }
)
# Keys torch.optim.lr_scheduler writes into groups (LRScheduler: initial_lr; OneCycleLR: max_lr, min_lr;
# CyclicLR / OneCycleLR with cycle_momentum: max_momentum, base_momentum). Tolerated, never read.
_SCHEDULER_KEYS = frozenset({"initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum"})


# ----------------------------------------------------------------------------------------------------------------------
# Pure update functions


def momentum_direction_(M: Tensor, g: Tensor, momentum: float, nesterov: bool) -> Tensor:
    """EMA momentum, torch convention: M ← μ·M + (1−μ)·g (in place); returns D = (1−μ)·g + μ·M if nesterov else M.

    Exactly ``torch.optim.Muon``'s ``buf.lerp_(grad, 1 - momentum)`` / ``grad.lerp(buf, momentum)``. The papers' β
    is 1 − μ (Scion's ``momentum=0.1`` is μ = 0.9). Without nesterov the returned D *is* M: do not modify it in place.
    """
    M.lerp_(g, 1 - momentum)
    return g.lerp(M, momentum) if nesterov else M


def _adaptive(group: Mapping[str, Any]) -> bool:
    return group.get("l0") is not None or group.get("l1") is not None


@torch.no_grad()
def lmo_update_(X: Tensor, D: Tensor, group: Mapping[str, Any]) -> None:
    """One LMO step on one tensor with one group's settings (no momentum: D is the direction-to-be, e.g. M).

    * default:       X ← X·(1 − lr·wd) − t·d(D),   t = lr·scale
    * ``constrained`` (Scion's Frank–Wolfe form, scion.py ``unconstrained=False``): X ← (1 − γ)·X − t·d(D), γ = t/scale,
      i.e. X ← (1 − lr)·X − lr·scale·d(D): the iterate is a convex combination that stays in the norm ball of radius
      ``scale``. It replaces weight decay (``weight_decay`` must be 0).
    * Gluon adaptive radius (``l0``/``l1`` set; arXiv 2505.13416, layer-wise (L0, L1)-smoothness):
      t = ‖D‖_* / (l0 + l1·‖D‖_*) replaces lr·scale; ‖D‖_* is computed as ⟨D, d(D)⟩, exact for sign / col_norm /
      row_norm / bias_rms and within the Newton–Schulz band for the spectral norms. It reads the value on the host
      (one sync per tensor). ``lr`` then only enters the weight decay, so LR schedules do not scale this step.

    Units: ``lr·scale`` (or t) is the step length in the group's norm (for ``spectral``: RMS→RMS operator norm per
    update); ``scale`` is Scion's radius multiplier. Spectral directions are applied as ``X.add_(NS, alpha=-t·c)``
    with the shape factor c folded into alpha, which is how torch.optim.Muon applies ``adjusted_lr``.
    """
    norm = group["norm"]
    if norm == ADAMW:
        raise ValueError("lmo_update_ got an 'adamw' group; AdamW groups are stepped by adamw_update_")
    T, c = direction_parts(
        norm,
        D,
        ns_steps=group.get("ns_steps", 5),
        ns_dtype=group.get("ns_dtype"),
        transpose=group.get("transpose", False),
    )
    lr, scale = float(group["lr"]), float(group.get("scale", 1.0))
    if _adaptive(group):
        l0, l1 = group.get("l0") or 0.0, group.get("l1") or 0.0
        dual = c * float(torch.sum(D.float() * T.float()))  # ⟨D, d(D)⟩ = ‖D‖_*
        t = dual / max(l0 + l1 * dual, EPS)
        shrink = t / scale
    else:
        t, shrink = lr * scale, lr
    if group.get("constrained", False):
        X.mul_(1 - shrink)
    elif group.get("weight_decay", 0.0):
        X.mul_(1 - lr * group["weight_decay"])
    X.add_(T, alpha=-t * c)


def _scalar_dtype() -> torch.dtype:  # torch.optim.optimizer._get_scalar_dtype() for non-fused state steps
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _adamw_state(p: Tensor) -> dict[str, Tensor]:
    """AdamW state exactly as torch.optim.AdamW creates it (non-capturable, non-fused: step is a CPU scalar)."""
    return {
        "step": torch.tensor(0.0, dtype=_scalar_dtype()),
        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
    }


@torch.no_grad()
def adamw_update_(params: list[Tensor], grads: list[Tensor], states: list[dict], group: Mapping[str, Any]) -> None:
    """torch.optim.AdamW's step (decoupled weight decay, no amsgrad) through torch's own functional ``adamw``.

    Same kernel choice as the class (``foreach=None, fused=None`` → torch's default), so results match
    ``torch.optim.AdamW(lr, betas, eps, weight_decay)`` bit for bit.
    """
    if not params:
        return
    beta1, beta2 = group["betas"]
    _torch_adamw(
        params,
        grads,
        [s["exp_avg"] for s in states],
        [s["exp_avg_sq"] for s in states],
        [],
        [s["step"] for s in states],
        foreach=None,
        fused=None,
        capturable=False,
        differentiable=False,
        has_complex=any(torch.is_complex(p) for p in params),
        amsgrad=False,
        beta1=beta1,
        beta2=beta2,
        lr=group["lr"],
        weight_decay=group["weight_decay"],
        eps=group["eps"],
        maximize=False,
    )


# ----------------------------------------------------------------------------------------------------------------------
# The optimizer


def _check_group(group: dict[str, Any]) -> None:
    """Value checks for one (defaults-filled) group; ValueError/TypeError name the value and the valid choices."""
    norm = group["norm"]
    if norm != ADAMW and norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; valid norms: {', '.join((*NORMS, ADAMW))}")
    for key in ("lr", "weight_decay", "scale", "eps"):
        if not float(group[key]) >= 0.0:
            raise ValueError(f"{key} must be >= 0, got {group[key]!r}")
    if not 0.0 <= group["momentum"] < 1.0:
        raise ValueError(f"momentum (EMA decay μ, torch convention) must be in [0, 1), got {group['momentum']!r}")
    if not isinstance(group["ns_steps"], int) or not 0 <= group["ns_steps"] < 100:
        raise ValueError(f"ns_steps must be an int in [0, 100), got {group['ns_steps']!r}")
    if group["ns_dtype"] is not None:
        resolve_ns_dtype(group["ns_dtype"], torch.device("cpu"))
    betas = group["betas"]
    if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
        raise ValueError(f"betas must be two values in [0, 1), got {betas!r}")
    for key in ("l0", "l1"):
        if group[key] is not None and not float(group[key]) >= 0.0:
            raise ValueError(f"{key} must be None or >= 0, got {group[key]!r}")
    if _adaptive(group) and not (group["l0"] or 0.0) + (group["l1"] or 0.0) > 0.0:
        raise ValueError("Gluon adaptive radius needs l0 > 0 or l1 > 0 (t = ‖D‖_*/(l0 + l1·‖D‖_*))")
    if group["constrained"] and not float(group["scale"]) > 0.0:
        raise ValueError(f"constrained=True needs scale (the ball's radius) > 0, got {group['scale']!r}")
    if group["constrained"] and group["weight_decay"]:
        raise ValueError(
            f"constrained=True already shrinks X by (1 - lr) each step (Scion, arXiv 2502.07529 §3); "
            f"set weight_decay=0 for this group, got weight_decay={group['weight_decay']!r}"
        )
    if group["transpose"] and norm != ADAMW:
        bad = [tuple(p.shape) for p in group["params"] if p.ndim != 2]
        if bad:
            raise ValueError(f"transpose=True needs 2-D parameters, got shapes {bad}")


class LMO(Optimizer):
    """Layer-wise LMO optimizer: Scion, Gluon and Muon in one class, plus AdamW groups (docs/algorithm.md §1.3).

    Per group, for each parameter X with gradient g (units: ``lr·scale`` is the step length in the group's norm —
    for ``spectral``, "spectral norm per update" in RMS→RMS units, Keller's phrase for Muon's lr):

        M ← μ·M + (1−μ)·g;   D ← (1−μ)·g + μ·M if nesterov else M
        X ← X·(1 − lr·wd) − lr·scale·d(D)

    with d from :mod:`ef_lightning.lmo`; see :func:`lmo_update_` for ``constrained`` and the Gluon radius. A group with
    ``norm="adamw"`` is torch.optim.AdamW exactly (``betas``, ``eps``, decoupled ``weight_decay``).

    Group keys (exactly :data:`GROUP_KEYS`; anything else is a ValueError; LR-scheduler keys such as ``initial_lr`` are
    tolerated): ``params``, ``param_names``, ``role`` (free-form label from :func:`param_groups`), ``lr``, ``norm``
    (one of :data:`ef_lightning.lmo.NORMS` or ``"adamw"``), ``scale`` (radius multiplier), ``momentum``, ``nesterov``,
    ``weight_decay``, ``ns_steps``, ``ns_dtype`` (None → bf16 on CUDA, float32 on CPU; a dtype or its name),
    ``constrained``, ``l0``, ``l1``, ``betas``, ``eps`` (AdamW only), ``transpose`` (the tensor is stored (d_in, d_out):
    ``nn.Embedding``, GPT-2 ``Conv1D``; d is computed on its transpose).

    State is created eagerly in ``add_param_group`` (microsoft/dion style), so ``state_dict()`` has the same keys on
    every rank before the first step: ``momentum_buffer`` for LMO groups, ``step``/``exp_avg``/``exp_avg_sq`` for
    AdamW groups.

    Args:
        params: parameters or param-group dicts.
        lr: learning rate (default for groups without ``lr``).
        momentum: EMA decay μ of the momentum (torch convention; 0.95 is Muon's default).
        nesterov: use D = (1−μ)·g + μ·M.
        weight_decay: decoupled weight decay, X ← X·(1 − lr·wd).
        norm, scale, ns_steps, ns_dtype, constrained, l0, l1, betas, eps, transpose: defaults for groups that omit
            them. ``betas=(0.9, 0.95)``, ``eps=1e-10`` are Keller Jordan's MuonWithAuxAdam AdamW defaults.
        external_momentum: if True, ``step()`` takes ``p.grad`` to be the already momentum-averaged direction D and
            keeps no momentum buffer (AdamW groups are unaffected). The EF21 engine, which applies worker momentum
            itself, sets this. Set it at construction so that no buffers are allocated; flipping the attribute later
            leaves existing buffers in place, unused.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.95,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        *,
        norm: str = "spectral",
        scale: float = 1.0,
        ns_steps: int = 5,
        ns_dtype: torch.dtype | str | None = None,
        constrained: bool = False,
        l0: float | None = None,
        l1: float | None = None,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-10,
        transpose: bool = False,
        external_momentum: bool = False,
    ) -> None:
        self.external_momentum = external_momentum  # read by add_param_group, which Optimizer.__init__ calls
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "nesterov": nesterov,
            "weight_decay": weight_decay,
            "norm": norm,
            "scale": scale,
            "ns_steps": ns_steps,
            "ns_dtype": ns_dtype,
            "constrained": constrained,
            "l0": l0,
            "l1": l1,
            "betas": betas,
            "eps": eps,
            "transpose": transpose,
        }
        _check_group({**defaults, "params": []})
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate keys and values, add the group, and create its state eagerly."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        unknown = set(param_group) - GROUP_KEYS - _SCHEDULER_KEYS
        if unknown:
            raise ValueError(f"unknown param-group key(s) {sorted(unknown)}; valid keys: {sorted(GROUP_KEYS)}")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_group(group)
        except (ValueError, TypeError):
            self.param_groups.pop()
            raise
        for p in group["params"]:
            if group["norm"] == ADAMW:
                self.state[p] = _adamw_state(p)
            elif not self.external_momentum:
                self.state[p] = {"momentum_buffer": torch.zeros_like(p, memory_format=torch.preserve_format)}

    @overload
    def step(self, closure: None = None) -> None: ...
    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One step for every parameter with a gradient (parameters whose ``grad`` is None are skipped)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["norm"] == ADAMW:
                for p in params:
                    if not self.state[p]:  # state dropped (e.g. loaded from a checkpoint without it)
                        self.state[p] = _adamw_state(p)
                adamw_update_(params, [p.grad for p in params], [self.state[p] for p in params], group)
                continue
            for p in params:
                if self.external_momentum:
                    D = p.grad
                else:
                    state = self.state[p]
                    if "momentum_buffer" not in state:  # e.g. external_momentum switched off after construction
                        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    D = momentum_direction_(state["momentum_buffer"], p.grad, group["momentum"], group["nesterov"])
                lmo_update_(p, D, group)
        return loss


# ----------------------------------------------------------------------------------------------------------------------
# Roles and presets

PRESETS: tuple[str, ...] = ("gluon", "scion", "muon")
ROLES: tuple[str, ...] = ("hidden", "conv", "embedding", "head", "vector", "other")

# Scion defaults: LIONS-EPFL/scion README, nanoGPT (weight sharing) example — radius 50 for the transformer blocks
# (Spectral), radius*60 = 3000 for the (tied) head (Sign), lr = 2**-12, Scion momentum=0.1 (μ = 0.9), constrained;
# train_gpt_scion.py uses the same scale=50 / last_scale=3000 (with lr 3.6e-4). Scion has no untied embedding or
# bias/gain in that model: as in its DeiT example (norm 'Auto' with the block radius for all remaining parameters),
# embeddings (ColNorm, their recommendation for one-hot inputs), conv kernels and vectors take the block radius.
# Gluon (arXiv 2505.13416) analyses the same layer-wise LMO step without the Frank–Wolfe shrink and reports stepsizes
# matching Scion's tuned ones, so preset "gluon" = Scion's norms and radii, unconstrained, constant radius (set l0/l1
# through overrides for the adaptive radius).
SCION_LR = 2.0**-12
SCION_MOMENTUM = 0.9
SCION_RADIUS = 50.0
SCION_HEAD_RADIUS = 3000.0
# Muon defaults: Keller Jordan's SingleDeviceMuonWithAuxAdam — Muon lr 0.02, momentum 0.95, nesterov; AdamW lr 3e-4,
# betas (0.9, 0.95), eps 1e-10, weight decay 0. torch.optim.Muon also defaults to momentum 0.95, nesterov=True.
MUON_LR = 0.02
MUON_MOMENTUM = 0.95
ADAMW_LR = 3e-4
ADAMW_BETAS = (0.9, 0.95)
ADAMW_EPS = 1e-10

_HEAD_NAMES = frozenset({"lm_head", "head", "classifier", "score", "fc_out", "output", "output_layer", "logits"})


def _role_settings(preset: str, lr: float | None, adamw_lr: float | None) -> dict[str, dict[str, Any]]:
    """Per-role group settings of a preset (see the module constants for where each number comes from)."""
    if preset == "muon":
        muon = {"norm": "spectral_muon", "lr": MUON_LR if lr is None else lr}
        adam = {"norm": ADAMW, "lr": ADAMW_LR if adamw_lr is None else adamw_lr, "betas": ADAMW_BETAS, "eps": ADAMW_EPS}
        # Keller: "hidden convolutional weights can be trained using Muon by viewing them as 2D".
        return {"hidden": muon, "conv": muon, "embedding": adam, "head": adam, "vector": adam, "other": adam}
    base = {"lr": SCION_LR if lr is None else lr, "constrained": preset == "scion"}
    return {
        "hidden": {**base, "norm": "spectral", "scale": SCION_RADIUS},
        "conv": {**base, "norm": "spectral_conv", "scale": SCION_RADIUS},
        "embedding": {**base, "norm": "col_norm", "scale": SCION_RADIUS},
        "head": {**base, "norm": "sign", "scale": SCION_HEAD_RADIUS},
        "vector": {**base, "norm": "bias_rms", "scale": SCION_RADIUS},
        "other": {**base, "norm": "spectral", "scale": SCION_RADIUS},
    }


def _call(model: nn.Module, method: str) -> nn.Module | None:
    fn = getattr(model, method, None)
    if not callable(fn):
        return None
    try:
        out = fn()
    except (NotImplementedError, AttributeError):
        return None
    return out if isinstance(out, nn.Module) else None


def _is_conv1d_transposed(m: nn.Module | None) -> bool:
    """transformers.pytorch_utils.Conv1D (GPT-2): a Linear whose weight is stored (in, out). Matched by name so that
    transformers stays optional."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def _find_head(model: nn.Module) -> Tensor | None:
    """The output head's weight: ``get_output_embeddings()`` (transformers), else the last ``nn.Linear``/``Conv1D``
    whose own name is one of lm_head, head, classifier, score, fc_out, output, output_layer, logits; else, for models
    without ``get_output_embeddings`` (plain torch), the last such layer in module registration order (the output
    layer of an ``nn.Sequential`` MLP or a CNN). Registration order need not be forward order: when it is wrong,
    fix it with ``overrides={"name.weight": {"role": "head"}}``."""
    weight = getattr(_call(model, "get_output_embeddings"), "weight", None)
    if isinstance(weight, Tensor):
        return weight
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) or _is_conv1d_transposed(m)]
    named = [m for name, m in linears if name.rsplit(".", 1)[-1] in _HEAD_NAMES]
    if named:
        return cast(Tensor, named[-1].weight)  # a Linear's / Conv1D's weight (Module.__getattr__ is typed wider)
    if linears and not hasattr(model, "get_output_embeddings"):
        return cast(Tensor, linears[-1][1].weight)
    return None


def _classify(model: nn.Module) -> list[tuple[str, Tensor, str, bool, list[str]]]:
    """(name, param, role, stored_transposed, all names) for every trainable parameter, shared ones once."""
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        for pname, p in m.named_parameters(recurse=False, remove_duplicate=False):
            if p is not None:
                owners.setdefault(id(p), []).append((f"{mname}.{pname}" if mname else pname, m, pname))
    head = _find_head(model)
    inp = _call(model, "get_input_embeddings")
    input_weight = getattr(inp, "weight", None)
    result: list[tuple[str, Tensor, str, bool, list[str]]] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        own = owners.get(id(p), [(name, None, name)])
        transposed = False
        if p is head:
            role = "head"  # a tied head/embedding lands here: sign in scion/gluon (docs/algorithm.md §1.4)
        elif p is input_weight or any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for _, m, _ in own):
            role, transposed = "embedding", p.ndim == 2  # stored (vocab, dim): d on the (dim, vocab) map
        elif p.ndim <= 1:
            role = "vector"
        elif any(_is_conv1d_transposed(m) and pn == "weight" for _, m, pn in own):
            role, transposed = "hidden", True
        elif any(
            (isinstance(m, nn.Linear) and pn == "weight")
            or (isinstance(m, nn.MultiheadAttention) and pn.endswith("proj_weight"))
            for _, m, pn in own
        ):
            role = "hidden"
        elif any(isinstance(m, nn.modules.conv._ConvNd) and pn == "weight" for _, m, pn in own):
            role = "conv"
        else:
            role = "other"
        result.append((name, p, role, transposed, [n for n, _, _ in own]))
    return result


def _match(pattern: str, names: list[str]) -> bool:
    if pattern.startswith("re:"):
        return any(re.fullmatch(pattern[3:], n) for n in names)
    return any(fnmatch.fnmatchcase(n, pattern) for n in names)


def param_groups(
    model: nn.Module,
    preset: str = "gluon",
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    lr: float | None = None,
    adamw_lr: float | None = None,
) -> list[dict[str, Any]]:
    """Assign every trainable parameter of ``model`` to exactly one :class:`LMO` param group, by role.

    Roles come from module types and names, not from ``ndim`` alone:

    * ``head``: the output layer's weight (see ``_find_head``: ``get_output_embeddings()``, else a Linear named
      lm_head/head/classifier/score/fc_out/output/output_layer/logits, else — plain torch models only — the last
      Linear in registration order). A head tied to the input embedding (same Parameter) is one ``head`` entry.
    * ``embedding``: ``nn.Embedding``/``nn.EmbeddingBag`` weights and ``get_input_embeddings()``; stored (vocab, dim),
      so the group gets ``transpose=True`` and col_norm normalises each embedding vector to RMS 1.
    * ``vector``: every 0-/1-D parameter (biases, LayerNorm/RMSNorm gains).
    * ``hidden``: ``nn.Linear`` weights, ``nn.MultiheadAttention`` projection weights, and transformers' ``Conv1D``
      (GPT-2) weights — stored (in, out), so those get ``transpose=True``.
    * ``conv``: ``nn.Conv1d/2d/3d`` (and ConvTranspose, not reoriented) kernels.
    * ``other``: any other matrix (custom ``nn.Parameter``); a warning lists them — give them a role by override.

    Presets (defaults and their sources are the module constants ``SCION_*``, ``MUON_*``, ``ADAMW_*``):

    =========  =====================  ==========================  ===========  =========  ========
    preset     hidden / other         conv                        embedding    head       vector
    =========  =====================  ==========================  ===========  =========  ========
    scion      spectral, r=50         spectral_conv, r=50         col_norm 50  sign 3000  bias_rms 50  (constrained)
    gluon      same radii and norms as scion, unconstrained
    muon       spectral_muon, lr .02  spectral_muon               adamw 3e-4   adamw      adamw (other → adamw)
    =========  =====================  ==========================  ===========  =========  ========

    Embeddings and heads never get a spectral norm from a preset.

    Args:
        model: the module.
        preset: ``"gluon"``, ``"scion"`` or ``"muon"``.
        overrides: ``{pattern: {key: value}}`` applied in order (later wins) to parameters whose name matches —
            any of its names if shared. A pattern is an ``fnmatch`` glob on the dotted parameter name
            (``"*.bias"``, ``"lm_head.weight"``), or a regular expression (``re.fullmatch``) when prefixed ``"re:"``.
            Values are group keys (:data:`GROUP_KEYS` minus params/param_names); ``"role"`` re-assigns the role and
            takes that role's preset settings before the other keys apply. A pattern matching nothing is an error.
        lr: learning rate of the LMO groups (default: preset's, ``SCION_LR`` or ``MUON_LR``).
        adamw_lr: learning rate of the AdamW groups of preset ``muon`` (default ``ADAMW_LR``).

    Returns:
        Group dicts with ``params``, ``param_names``, ``role`` and the settings, in role order
        (hidden, conv, embedding, head, vector, other), parameters in model order within a group.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    settings_by_role = _role_settings(preset, lr, adamw_lr)
    overrides = dict(overrides or {})
    allowed = GROUP_KEYS - {"params", "param_names"}
    for pattern, values in overrides.items():
        bad = set(values) - allowed
        if bad:
            raise ValueError(f"override {pattern!r}: unknown key(s) {sorted(bad)}; valid keys: {sorted(allowed)}")
        if "role" in values and values["role"] not in ROLES:
            raise ValueError(f"override {pattern!r}: unknown role {values['role']!r}; valid roles: {', '.join(ROLES)}")
    entries = _classify(model)
    for pattern in overrides:
        if not any(_match(pattern, names) for *_, names in entries):
            raise ValueError(f"override pattern {pattern!r} matches no trainable parameter of the model")

    groups: dict[tuple[int, str, str], dict[str, Any]] = {}
    others = []
    for name, p, role, transposed, names in entries:
        matched = [v for pattern, v in overrides.items() if _match(pattern, names)]
        for values in matched:
            role = values.get("role", role)
        if role == "other":
            others.append(name)
        settings = dict(settings_by_role[role])
        if transposed and settings["norm"] != ADAMW:
            settings["transpose"] = True
        for values in matched:
            settings.update({k: v for k, v in values.items() if k != "role"})
        key = (ROLES.index(role), role, repr(sorted(settings.items())))
        group = groups.setdefault(key, {"params": [], "param_names": [], "role": role, **settings})
        group["params"].append(p)
        group["param_names"].append(name)
    if others:
        warnings.warn(
            f"parameters of unknown role (treated as 'other'): {others}; set a role with overrides", stacklevel=2
        )
    return [groups[k] for k in sorted(groups, key=lambda k: k[0])]  # stable: model order within a role


def format_groups(groups: Iterable[Mapping[str, Any]]) -> str:
    """A table of groups: role, norm, scale, lr, flags, tensor count and parameter (element) count."""
    rows = [("role", "norm", "scale", "lr", "flags", "tensors", "params")]
    total_t = total_p = 0
    for g in groups:
        flags = [k for k in ("transpose", "constrained", "nesterov") if g.get(k) and g["norm"] != ADAMW]
        flags += [f"l0={g['l0']},l1={g['l1']}"] if _adaptive(g) else []
        n_t, n_p = len(g["params"]), sum(p.numel() for p in g["params"])
        total_t, total_p = total_t + n_t, total_p + n_p
        scale = "-" if g["norm"] == ADAMW else f"{g.get('scale', 1.0):g}"
        rows.append(
            (
                str(g.get("role", "")),
                g["norm"],
                scale,
                f"{float(g['lr']):.3g}",
                ",".join(flags) or "-",
                str(n_t),
                f"{n_p:,}",
            )
        )
    rows.append(("total", "", "", "", "", str(total_t), f"{total_p:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) if i < 5 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows
    )


def build_lmo_optimizer(
    model: nn.Module,
    preset: str = "gluon",
    *,
    lr: float | None = None,
    momentum: float | None = None,
    nesterov: bool | None = None,
    weight_decay: float = 0.0,
    adamw_lr: float | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    external_momentum: bool = False,
    verbose: bool = True,
) -> LMO:
    """An :class:`LMO` over all trainable parameters of ``model`` with a preset's norms (see :func:`param_groups`).

    Args:
        model: the module.
        preset: ``"gluon"`` | ``"scion"`` | ``"muon"``.
        lr: LMO groups' learning rate; ``lr·scale`` is the step in the group's norm per update. Default: Scion's
            2**-12 (gluon/scion), Keller's 0.02 (muon).
        momentum: EMA decay μ. Default 0.9 for gluon/scion (Scion's ``momentum=0.1``), 0.95 for muon (Keller, torch).
        nesterov: default False for gluon/scion (Scion's plain EMA), True for muon (Keller, torch.optim.Muon).
        weight_decay: decoupled weight decay for every group (0 like Keller's defaults). Preset ``scion`` is
            constrained, which already decays by lr, so it needs 0 here.
        adamw_lr: AdamW groups' learning rate (muon preset), default 3e-4.
        overrides: per-parameter-name settings, see :func:`param_groups`.
        external_momentum: see :class:`LMO`.
        verbose: print the table of groups (:func:`format_groups`).
    """
    groups = param_groups(model, preset, overrides, lr=lr, adamw_lr=adamw_lr)
    muon = preset == "muon"
    opt = LMO(
        groups,
        lr=(MUON_LR if muon else SCION_LR) if lr is None else lr,
        momentum=(MUON_MOMENTUM if muon else SCION_MOMENTUM) if momentum is None else momentum,
        nesterov=muon if nesterov is None else nesterov,
        weight_decay=weight_decay,
        external_momentum=external_momentum,
    )
    if verbose:
        print(f"ef_lightning LMO optimizer, preset {preset!r}:\n{format_groups(opt.param_groups)}")
    return opt
