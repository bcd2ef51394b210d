"""Lightning callback that logs what EF21-Muon communicated, and checks that compression really ran."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torchmetrics.aggregation import SumMetric

__all__ = ["CommunicationMonitor"]

_FIELDS = (("uplink_bits", "uplink_bits"), ("uplink_bytes", "uplink_wire_bytes"),
           ("downlink_bits", "downlink_bits"), ("downlink_bytes", "downlink_wire_bytes"), ("dense_bytes", "dense_bytes"))


class CommunicationMonitor(Callback):
    """Log communicated bits and bytes per optimizer step under ``strategy="ef21_muon"``.

    Logged every optimizer step (to the logger, and the totals and ratio to the progress bar):

    * ``comm/uplink_bits``, ``comm/uplink_bytes``: what one worker sent this step (theoretical bits, wire bytes);
    * ``comm/downlink_bits``, ``comm/downlink_bytes``: what the server side sent this step (0 with ``allgather``);
    * ``comm/<name>_total``: cumulative sums since the start of training (restored with the checkpoint);
    * ``comm/compression_ratio``: cumulative dense bytes (uncompressed, training dtype) / uplink wire bytes.

    Values are logged as float64 so bit counts stay exact up to 2**53. Totals are aggregated with torchmetrics
    ``SumMetric`` per process; uplink counts are per worker and identical on every rank, so no cross-rank sync.

    The monitor also checks that the compressed sync really ran (PEERS.md: DeepSpeed Muon once trained plain SGD
    silently): an optimizer step that produced no EF21 record, or compressors that sent as many bytes as dense,
    raises RuntimeError. Under any other strategy it warns once and logs nothing.

    Args:
        prog_bar: show ``comm/uplink_bytes_total`` and ``comm/compression_ratio`` in the progress bar.
        check: raise when a step ran without the EF21 sync (see above).
    """

    def __init__(self, prog_bar: bool = True, check: bool = True) -> None:
        self.prog_bar = prog_bar
        self.check = check
        self._totals: dict[str, SumMetric] = {}
        self._seen = 0
        self._stepped = 0
        self._active = False

    def _engine(self, trainer: Trainer) -> Any:
        return getattr(trainer.strategy, "engine", None)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from ef_lightning.strategy import EF21MuonStrategy

        self._active = isinstance(trainer.strategy, EF21MuonStrategy)
        if not self._active:
            warnings.warn(f"CommunicationMonitor: strategy is {type(trainer.strategy).__name__}, not ef21_muon; "
                          "nothing is compressed and nothing will be logged", UserWarning, stacklevel=2)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._active:
            return
        ledger = self._engine(trainer).ledger
        self._totals = {}
        for name, field in _FIELDS:  # start from the ledger, which a checkpoint restores
            m = SumMetric(nan_strategy="error", sync_on_compute=False).set_dtype(torch.float64)
            m.update(torch.tensor(float(sum(getattr(r, field) for r in ledger.records)), dtype=torch.float64))
            self._totals[name] = m
        self._seen = len(ledger.records)
        self._stepped = trainer.global_step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._active:
            return
        engine = self._engine(trainer)
        records = engine.ledger.records
        new = records[self._seen:]
        self._seen = len(records)
        stepped = trainer.global_step  # optimizer steps Lightning has counted
        if not new:
            if self.check and stepped > self._stepped:
                raise RuntimeError(f"optimizer step {stepped} ran without the EF21 sync (no ledger record): the "
                                   "strategy's optimizer_step was bypassed")
            self._stepped = stepped
            return
        self._stepped = stepped
        compressing = any(L.up.kind != "identity" for L in engine.layers)
        for rec in new:
            if self.check and compressing and not rec.skipped and rec.uplink_wire_bytes >= rec.dense_bytes > 0:
                raise RuntimeError(f"uplink compressors are configured but step {rec.step} sent "
                                   f"{rec.uplink_wire_bytes} bytes >= dense {rec.dense_bytes}: compression did not run")
            for name, field in _FIELDS:
                self._totals[name].update(torch.tensor(float(getattr(rec, field)), dtype=torch.float64))
        rec = new[-1]
        log = dict(on_step=True, on_epoch=False, sync_dist=False, batch_size=1)
        f64 = lambda v: torch.tensor(float(v), dtype=torch.float64)  # noqa: E731  exact integers up to 2**53
        for name, field in _FIELDS[:4]:
            pl_module.log(f"comm/{name}", f64(getattr(rec, field)), **log)
        totals = {name: self._totals[name].compute() for name, _ in _FIELDS}
        for name, _ in _FIELDS[:4]:
            pl_module.log(f"comm/{name}_total", totals[name], prog_bar=self.prog_bar and name == "uplink_bytes", **log)
        up = float(totals["uplink_bytes"])
        ratio = float(totals["dense_bytes"]) / up if up else float("inf")
        pl_module.log("comm/compression_ratio", f64(ratio), prog_bar=self.prog_bar, **log)
