"""Callbacks that record communicated bits (installed as ``ef_lightning.callbacks``).

* :class:`CommunicationMonitor` — Lightning (needs ``lightning``);
* the Hugging Face ``transformers`` callback lives in :mod:`ef_lightning.callbacks.hf` (needs ``transformers``).
"""

from __future__ import annotations

__all__ = ["CommunicationMonitor"]


def __getattr__(name: str):  # import framework modules only when asked for: each needs its own framework
    if name == "CommunicationMonitor":
        from ef_lightning.callbacks.lightning import CommunicationMonitor

        return CommunicationMonitor
    raise AttributeError(f"module 'ef_lightning.callbacks' has no attribute {name!r}")
