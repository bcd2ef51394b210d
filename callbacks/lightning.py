"""Lightning callback that logs what EF21-Muon communicated, and checks that compression really ran."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torchmetrics import Metric

__all__ = ["CommunicationMonitor"]

#: per-worker counts: identical on every rank unless workers skip rounds (partial participation); always present,
#: so every rank synchronises the same vector; the compression ratio is recomputed from their means
_PER_WORKER = ("uplink_bits", "uplink_bytes", "uplink_bits_total", "uplink_bytes_total", "dense_bytes_total")


class _MeanOverRanks(Metric):
    """The mean over processes of a vector of per-rank counts: one synchronisation per ``compute()``."""

    full_state_update = False
    total: torch.Tensor  # sum over processes of their count vectors
    ranks: torch.Tensor  # number of processes that contributed

    def __init__(self, size: int) -> None:
        super().__init__(sync_on_compute=True)
        self.add_state("total", default=torch.zeros(size, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("ranks", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor) -> None:
        self.total += values
        self.ranks += 1

    def compute(self) -> torch.Tensor:
        return self.total / self.ranks


#: shown in the progress bar
_PROG_BAR = ("uplink_bytes_total", "compression_ratio")


class CommunicationMonitor(Callback):
    """Log communicated bits and bytes per optimizer step under ``strategy="ef21_muon"``.

    Logs :meth:`ef_lightning.Ledger.metrics` every optimizer step, the same names as the Accelerate plugin and the
    transformers callback: ``comm/uplink_bits`` / ``uplink_bytes`` (what one worker sent this step: theoretical
    bits, wire bytes), ``comm/downlink_bits`` / ``downlink_bytes`` (what the server side sent; 0 with
    ``allgather``), the same with ``_total`` (cumulative, restored with the checkpoint), ``comm/dense_bytes_total``,
    ``comm/compression_ratio`` (cumulative dense bytes / uplink wire bytes), ``comm/steps``, ``comm/skipped_steps``.
    Values are float64, so bit counts stay exact up to 2**53. With local steps (``sync_every=H > 1``) the monitor
    logs at the synchronisations only (every H-th optimizer step, or each fragment's with ``fragments``; the inner
    steps send nothing), straight to the trainer's loggers (not the progress bar), with ``comm/outer_rounds``;
    ``comm/compression_ratio`` then counts the dense bytes of every step, the inner ones included.

    Per-worker counts are identical on every rank, except with partial participation (``participation=``), where a
    rank sends only in the rounds it takes part in: then they are averaged over the ranks with a torchmetrics
    metric synchronised across processes (one synchronisation of a 5-vector per step); and with
    ``topology="hierarchical"`` (and ``EF21FSDPStrategy``), where a worker is a node and each of its G processes
    sends its share: then the per-worker counts are the node's (G times the mean over processes), the inter-node
    traffic of one node, and ``comm/intra_node_bytes`` is this process's traffic inside its node.

    The monitor also checks that the compressed sync really ran (DeepSpeed's Muon once trained plain SGD silently):
    an optimizer step that produced no EF21 record, or compressors that sent as many bytes as dense, raises
    RuntimeError. Under any other strategy it warns once and logs nothing.

    Args:
        prog_bar: show ``comm/uplink_bytes_total`` and ``comm/compression_ratio`` in the progress bar.
        check: raise when a step ran without the EF21 sync (see above).
    """

    def __init__(self, prog_bar: bool = True, check: bool = True) -> None:
        self.prog_bar = prog_bar
        self.check = check
        self._seen = 0
        self._stepped = 0
        self._active = False
        self._mean: _MeanOverRanks | None = None
        self._per_node = 1  # hierarchical: processes per node (a worker's counts are its node's)
        self._compressing = False

    @staticmethod
    def _engine(trainer: Trainer) -> Any:
        return getattr(trainer.strategy, "engine", None)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from ef_lightning.strategy import _EF21Driving

        self._active = isinstance(trainer.strategy, _EF21Driving)
        if not self._active:
            warnings.warn(
                f"CommunicationMonitor: strategy is {type(trainer.strategy).__name__}, not ef21_muon; "
                "nothing is compressed and nothing will be logged",
                UserWarning,
                stacklevel=2,
            )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._active:
            return
        engine = self._engine(trainer)
        self._seen = len(engine.ledger.records)  # a resumed run's ledger already holds the earlier steps
        self._stepped = trainer.global_step
        self._compressing = any(L.up.kind != "identity" for L in engine.layers)
        self._mean = None
        hierarchical = getattr(engine, "hierarchical", False)
        self._per_node = getattr(engine.transport, "local_world_size", 1) if hierarchical else 1
        varies = getattr(engine, "participation", None) is not None or hierarchical
        if varies and trainer.world_size > 1:
            self._mean = _MeanOverRanks(len(_PER_WORKER)).to(pl_module.device)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._active:
            return
        engine = self._engine(trainer)
        records = engine.ledger.records
        new = records[self._seen :]
        self._seen = len(records)
        stepped, before = trainer.global_step, self._stepped  # optimizer steps Lightning has counted
        self._stepped = stepped
        if not new:
            if self.check and stepped > before:
                raise RuntimeError(
                    f"optimizer step {stepped} ran without the EF21 sync (no ledger record): the "
                    "optimizer's step was bypassed"
                )
            return
        if self.check and self._compressing:
            for rec in new:
                if not rec.skipped and rec.uplink_wire_bytes >= rec.dense_bytes > 0:
                    raise RuntimeError(
                        f"uplink compressors are configured but step {rec.step} sent "
                        f"{rec.uplink_wire_bytes} bytes >= dense {rec.dense_bytes}: compression did "
                        "not run"
                    )
        local = getattr(engine, "local_steps", False)
        if local and all(not rec.synced for rec in new):  # inner steps between synchronisations: nothing was sent
            return
        metrics = engine.ledger.metrics(prefix="")
        if self._mean is not None:  # partial participation: the mean over ranks
            self._mean.update(torch.tensor([float(metrics[k]) for k in _PER_WORKER], dtype=torch.float64))
            metrics.update(zip(_PER_WORKER, (v * self._per_node for v in self._mean.compute().tolist())))
            self._mean.reset()
            metrics.pop("compression_ratio", None)
            if metrics["uplink_bytes_total"]:
                metrics["compression_ratio"] = metrics["dense_bytes_total"] / metrics["uplink_bytes_total"]
        if local:
            # straight to the loggers, at the outer round's step: a value given to self.log would be logged again,
            # stale, at every inner step until the epoch ends (Lightning keeps on_step values for the epoch)
            if trainer.is_global_zero:
                logged = {f"comm/{k}": float(v) for k, v in metrics.items()}
                for logger in trainer.loggers:
                    logger.log_metrics(logged, step=trainer.global_step - 1)
            return
        for key, value in metrics.items():
            pl_module.log(
                f"comm/{key}",
                torch.tensor(float(value), dtype=torch.float64),
                on_step=True,
                on_epoch=False,
                sync_dist=False,
                batch_size=1,
                prog_bar=self.prog_bar and key in _PROG_BAR,
            )
