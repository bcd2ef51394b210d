"""The main demo: a real 2-process EF21-Muon run with ``Trainer(strategy="ef21_muon")`` on CPU.

A small Llama-architecture causal LM (built from a config, no download) learns byte-level language modelling on the
Python standard library's docstrings (offline, see recipes/text_data.py). Two worker processes talk over gloo; the
EF21-Muon strategy compresses both directions. At the end rank 0 prints a report: validation loss at the server
model X, uplink bytes per worker against the dense (uncompressed fp32) baseline, and the compression ratio. With
``--baseline`` it first trains the same model with identity compressors (= data-parallel Gluon) for comparison.

    bash recipes/demo.sh                # what the README runs (creates the venv on first use)
    python recipes/demo.py --steps 300 --uplink top_k:0.05 --downlink top_k:0.2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

import ef_lightning as efl
from ef_lightning.callbacks import CommunicationMonitor

sys.path.insert(0, str(Path(__file__).parent))
from text_data import byte_splits  # noqa: E402

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LitLogger.*")


class ByteLM(LightningModule):
    """A Llama causal LM over bytes, trained with the Gluon preset (layer-wise LMO: spectral hidden, col_norm
    embedding, sign head, bias_rms gains)."""

    def __init__(self, hidden: int = 128, layers: int = 2, lr: float | None = None) -> None:
        super().__init__()
        cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                          tie_word_embeddings=False)
        torch.manual_seed(0)
        self.model = LlamaForCausalLM(cfg)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(**batch).loss, prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        opt = efl.build_lmo_optimizer(self.model, preset="gluon", lr=self.lr, verbose=self.global_rank == 0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))  # short warm-up
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def run(args: argparse.Namespace, uplink: str, downlink: str, tag: str) -> dict:
    seed_everything(0, workers=True)
    train, val = byte_splits(block=args.block)
    model = ByteLM(args.hidden, args.layers, args.lr)
    strategy = efl.EF21MuonStrategy(uplink=uplink, downlink=downlink, topology=args.topology)
    trainer = Trainer(accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=args.steps,
                      val_check_interval=args.val_every, limit_val_batches=args.val_batches, num_sanity_val_steps=0,
                      logger=CSVLogger(args.out, name=tag), callbacks=[CommunicationMonitor()],
                      log_every_n_steps=10, enable_checkpointing=False, enable_model_summary=False)
    t0 = time.perf_counter()
    trainer.fit(model, DataLoader(train, batch_size=args.batch, shuffle=True),
                DataLoader(val, batch_size=args.batch))
    s = trainer.strategy.engine.ledger.summary()
    return {"tag": tag, "uplink": uplink, "downlink": downlink, "val_loss": float(trainer.callback_metrics["val_loss"]),
            "seconds": time.perf_counter() - t0, "rank": trainer.global_rank, **s}


def report(rows: list[dict]) -> str:
    MB = 1e6
    lines = ["", "EF21-Muon demo — 2 CPU processes (gloo), byte-level Llama on Python stdlib docstrings",
             f"{'run':<12} {'uplink':<18} {'downlink':<14} {'val loss @X':>11} {'uplink MB/worker':>17} "
             f"{'dense MB':>9} {'ratio':>6} {'downlink MB':>12} {'time s':>7}"]
    for r in rows:
        lines.append(f"{r['tag']:<12} {r['uplink']:<18} {r['downlink']:<14} {r['val_loss']:>11.4f} "
                     f"{r['uplink_wire_bytes_per_worker'] / MB:>17.2f} {r['dense_bytes_per_worker'] / MB:>9.2f} "
                     f"{r['compression_ratio']:>5.1f}x {r['downlink_wire_bytes'] / MB:>12.2f} {r['seconds']:>7.1f}")
    last = rows[-1]
    saved = last["dense_bytes_per_worker"] - last["uplink_wire_bytes_per_worker"]
    lines.append(f"\nEach worker sent {last['uplink_wire_bytes_per_worker'] / MB:.2f} MB instead of "
                 f"{last['dense_bytes_per_worker'] / MB:.2f} MB over {last['steps']} steps: {saved / MB:.2f} MB saved "
                 f"({last['compression_ratio']:.1f}x less uplink traffic; bytes are wire bytes handed to gloo).")
    if len(rows) > 1:
        gap = (last["val_loss"] - rows[0]["val_loss"]) / rows[0]["val_loss"] * 100
        lines.append(f"Validation loss vs uncompressed: {last['val_loss']:.4f} vs {rows[0]['val_loss']:.4f} "
                     f"({gap:+.1f}%).")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    p.add_argument("--devices", type=int, default=2, help="CPU processes (default 2)")
    p.add_argument("--uplink", default="top_k:0.1+natural", help="uplink compressor spec for matrices (vectors stay dense)")
    p.add_argument("--downlink", default="top_k:0.5", help="downlink compressor spec for matrices")
    p.add_argument("--topology", default="sharded", choices=["sharded", "server", "allgather"])
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also train with identity compressors first, for comparison (default on)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--block", type=int, default=128, help="sequence length in bytes")
    p.add_argument("--batch", type=int, default=16, help="sequences per worker per step")
    p.add_argument("--lr", type=float, default=None, help="LMO lr (default: the Gluon preset's, 2**-12)")
    p.add_argument("--val-every", type=int, default=50)
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--out", default="outputs/demo")
    args = p.parse_args()
    torch.set_num_threads(1)
    role = lambda spec: {"hidden": spec, "embedding": spec, "head": spec, "default": "identity"}  # noqa: E731
    down = lambda spec: role(spec) if args.topology != "allgather" else "identity"  # noqa: E731
    rows = []
    if args.baseline:
        rows.append(run(args, "identity", "identity", "uncompressed"))
    rows.append(run(args, role(args.uplink), down(args.downlink), "ef21_muon"))
    if rows[-1]["rank"] == 0:
        for r in rows:  # role mappings print as the matrix spec
            r["uplink"] = args.uplink if r["tag"] != "uncompressed" else "identity"
            r["downlink"] = (args.downlink if args.topology != "allgather" else "identity") \
                if r["tag"] != "uncompressed" else "identity"
        print(report(rows), flush=True)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "report.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
