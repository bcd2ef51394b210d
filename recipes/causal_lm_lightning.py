"""Causal-LM fine-tuning with Lightning and ``strategy="ef21_muon"`` (EF21-Muon compressed data parallelism).

Offline by default: a small byte-level Llama (built from the config, no download) learns the Python standard
library's docstrings (recipes/text_data.py). With ``--model`` any causal LM is loaded with ``from_pretrained`` and
texts go through its tokenizer; with ``--dataset`` texts come from a `datasets` id or local .txt files.

    python recipes/causal_lm_lightning.py --config recipes/configs/causal_lm_lightning/default.yaml
    python recipes/causal_lm_lightning.py --config recipes/configs/causal_lm_lightning/tiny.yaml --devices 1
    python recipes/causal_lm_lightning.py --model HuggingFaceTB/SmolLM2-135M --dataset wikitext \\
        --dataset_config wikitext-2-raw-v1 --block 256 --batch_size 4 --preset muon --lr 0.002 --devices 2

Lightning starts the other ``devices - 1`` processes itself (it re-runs this command line). Outputs in ``out_dir``
(rank 0): ``resolved_config.yaml``, ``summary.json``, ``val_loss_vs_uplink.png``, CSV logs per run.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader
from transformers.hf_argparser import HfArg

import ef_lightning as efl
from ef_lightning.callbacks import CommunicationMonitor

sys.path.insert(0, str(Path(__file__).parent))
from recipe_utils import (PLOT_NAME, causal_lm_task, cpu_threads, plot_loss_vs_uplink, role_specs, summary_row,  # noqa: E402
                    write_summary)
from config import CausalLMConfig, override, parse_args, save_resolved  # noqa: E402

warnings.filterwarnings("ignore", ".*does not have many workers.*")  # the byte dataset is in memory
warnings.filterwarnings("ignore", ".*LitLogger.*")


@dataclasses.dataclass
class Config(CausalLMConfig):
    """Defaults of this recipe (a config file is a delta over these; see recipes/config.py)."""

    accelerator: str = HfArg(default="auto", help="Lightning accelerator: auto, cpu, gpu")
    devices: int = HfArg(default=2, help="processes (one per device)")
    precision: str = HfArg(default="32-true", help="Lightning precision, e.g. bf16-mixed (EF21 state stays float32)")
    out_dir: str = override(CausalLMConfig, "out_dir", "outputs/causal_lm_lightning")


class CausalLM(LightningModule):
    """Any Hugging Face causal LM, trained with the layer-wise LMO optimizer (``build_lmo_optimizer``)."""

    def __init__(self, model: torch.nn.Module, cfg: Config) -> None:
        super().__init__()
        self.model, self.cfg = model, cfg

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # averaged over ranks: the validation loss of the model every rank evaluates (the server model X)
        self.log("val_loss", self.model(**batch).loss, prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        opt = efl.build_lmo_optimizer(self.model, preset=self.cfg.preset, lr=self.cfg.lr,
                                      verbose=self.global_rank == 0)
        warmup = max(1, self.cfg.warmup)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class LossVsUplink(Callback):
    """Records ``(cumulative uplink bytes per worker, validation loss)`` after every validation, and the training
    time in seconds (process start-up and data loading excluded, validation included)."""

    def __init__(self) -> None:
        self.points: list[tuple[float, float]] = []
        self.seconds = 0.0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.seconds = -time.perf_counter()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.seconds += time.perf_counter()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        engine = trainer.strategy.engine
        if trainer.sanity_checking or engine is None or "val_loss" not in trainer.callback_metrics:
            return
        sent = engine.ledger.summary()["uplink_wire_bytes_per_worker"]
        self.points.append((float(sent), float(trainer.callback_metrics["val_loss"])))


def train(cfg: Config, data: tuple[Any, Any, Any], name: str, uplink: str, downlink: str,
          sync_every: int) -> tuple[dict, list, bool]:
    """One fit; returns its summary row, its loss-vs-uplink curve and whether this process is rank 0."""
    seed_everything(cfg.seed, workers=True)
    model, train_set, val_set = data
    module = CausalLM(model, cfg)
    strategy = efl.EF21MuonStrategy(uplink=role_specs(uplink), downlink=role_specs(downlink), topology=cfg.topology,
                                    seed=cfg.seed, sync_every=sync_every)
    curve = LossVsUplink()
    trainer = Trainer(accelerator=cfg.accelerator, devices=cfg.devices, strategy=strategy, precision=cfg.precision,
                      max_steps=cfg.steps, val_check_interval=cfg.val_every, check_val_every_n_epoch=None,
                      limit_val_batches=cfg.val_batches, num_sanity_val_steps=0,
                      logger=CSVLogger(cfg.out_dir, name=name), callbacks=[CommunicationMonitor(), curve],
                      log_every_n_steps=min(10, cfg.val_every), enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True),
                DataLoader(val_set, batch_size=cfg.batch_size))
    row = summary_row(name, curve.points[-1][1], curve.seconds, trainer.strategy.engine.ledger.summary(),
                      uplink=uplink, downlink=downlink, topology=cfg.topology, sync_every=sync_every,
                      processes=trainer.world_size)
    return row, curve.points, trainer.is_global_zero


def main(argv: list[str] | None = None) -> list[dict]:
    cfg = parse_args(Config, __doc__, argv)
    if cfg.val_every < 1 or cfg.steps % cfg.val_every:  # Lightning validates every val_every batches, not at the end
        raise ValueError(f"steps={cfg.steps} must be a multiple of val_every={cfg.val_every}, so that the final model "
                         f"is validated; valid val_every: divisors of steps")
    cpu_threads()
    # the uncompressed baseline synchronises every step: data-parallel Muon/Gluon
    runs = [("uncompressed", "identity", "identity", 1)] if cfg.baseline else []
    runs.append(("ef21_muon", cfg.uplink, cfg.downlink, cfg.sync_every))
    rows, curves, rank0 = [], {}, False
    for name, uplink, downlink, sync_every in runs:
        # a fresh model per run: the same initial weights (seeded), not the previous run's trained ones
        row, curves[name], rank0 = train(cfg, causal_lm_task(cfg), name, uplink, downlink, sync_every)
        rows.append(row)
    if rank0:
        save_resolved(cfg, cfg.out_dir)
        plot_loss_vs_uplink(curves, Path(cfg.out_dir) / PLOT_NAME,
                            title=f"causal LM, Lightning ef21_muon ({cfg.topology}, uplink {cfg.uplink}, downlink "
                                  f"{cfg.downlink}), processes: {rows[-1]['processes']}")
        write_summary(rows, cfg.out_dir, title=f"\ncausal LM with Lightning (strategy ef21_muon, {cfg.topology})")
    return rows


if __name__ == "__main__":
    main()
