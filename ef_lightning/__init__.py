"""ef_lightning: communication-efficient non-Euclidean optimizers (EF21-Muon, Gluon, Scion) for PyTorch,
Lightning, Accelerate and Hugging Face.

Public surface (docs/architecture.md)::

    import ef_lightning as efl
    efl.compressors.build("top_k:0.05")                       # compressors with exact bit accounting
    efl.build_lmo_optimizer(model, preset="gluon", lr=0.02)    # layer-wise LMO optimizer (efl.LMO)
    efl.Simulator(model, opt, n_workers=4, uplink="top_k:0.05") # n workers in one process
    efl.EF21Config(uplink="top_k:0.05", topology="sharded")     # every option, checked once
    efl.EF21Engine(model, opt, uplink=..., topology="sharded")  # one worker: optimizer.step() is the EF21 step
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ef_lightning import compressors, lmo, smoothness
from ef_lightning.comm import Ledger, assign_owners
from ef_lightning.config import EF21Config
from ef_lightning.ef21 import EF21Engine, Simulator
from ef_lightning.optim import LMO, build_lmo_optimizer, param_groups

if TYPE_CHECKING:
    from ef_lightning.strategy import EF21MuonStrategy as _EF21MuonStrategy
    from ef_lightning.strategy_fsdp import EF21FSDPStrategy as _EF21FSDPStrategy

EF21MuonStrategy: type[_EF21MuonStrategy] | None  # None without Lightning
EF21FSDPStrategy: type[_EF21FSDPStrategy] | None
try:  # importing registers "ef21_muon", "ef21_muon_spawn", "ef21_fsdp" with lightning.pytorch's StrategyRegistry
    import lightning.pytorch  # noqa: F401
except ImportError:  # Lightning is optional: the engine, Simulator and optimizer work without it
    EF21MuonStrategy = EF21FSDPStrategy = None
else:
    from ef_lightning.strategy import EF21MuonStrategy
    from ef_lightning.strategy_fsdp import EF21FSDPStrategy

__version__ = "0.1.0"

__all__ = [
    "compressors",
    "lmo",
    "smoothness",
    "LMO",
    "build_lmo_optimizer",
    "param_groups",
    "EF21Config",
    "EF21Engine",
    "EF21MuonStrategy",
    "EF21FSDPStrategy",
    "Simulator",
    "Ledger",
    "assign_owners",
]
