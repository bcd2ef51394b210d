"""Callbacks that record communicated bits (installed as ``ef_lightning.callbacks``).

* :class:`CommunicationMonitor` — Lightning (needs ``lightning``);
* :class:`CommunicationCallback` and :class:`EF21Trainer` — Hugging Face ``transformers`` (see
  :mod:`ef_lightning.callbacks.hf`; needs ``transformers`` and ``accelerate``).
"""

from __future__ import annotations

__all__ = ["CommunicationMonitor", "CommunicationCallback", "EF21Trainer"]


def __getattr__(name: str):  # import framework modules only when asked for: each needs its own framework
    if name == "CommunicationMonitor":
        from ef_lightning.callbacks.lightning import CommunicationMonitor

        return CommunicationMonitor
    if name in ("CommunicationCallback", "EF21Trainer"):
        from ef_lightning.callbacks import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'ef_lightning.callbacks' has no attribute {name!r}")
