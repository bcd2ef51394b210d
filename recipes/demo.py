"""The main demo: a real 2-process EF21-Muon run with ``Trainer(strategy="ef21_muon")`` on CPU.

A small Llama-architecture causal LM (built from a config, no download) learns byte-level language modelling on the
Python standard library's docstrings (offline, see recipes/text_data.py). Two worker processes talk over gloo.

1. The uncompressed run (identity compressors = data-parallel Gluon) trains for ``--steps`` steps; its final
   validation loss, measured at the server model X, is the target.
2. The compressed run (the strategy's default compressors, or ``--uplink`` / ``--downlink``) trains until its
   validation loss at X reaches that target, checked every ``--val-every`` steps, for at most ``--budget-mult`` times
   the uncompressed steps, and stops there.

Rank 0 then prints, for both runs, the steps and the bytes (uplink per worker, downlink, total) to the target loss,
the byte savings and both wall times, and writes them to ``<out>/report.json``. On loopback the wall time is not the
point: the bytes are what a slow link turns into time (docs/benchmarks.md, "Time to target over a shaped link").

    bash recipes/demo.sh                # what the README runs (creates the venv on first use)
    python recipes/demo.py --steps 300 --budget-mult 2 --uplink top_k:0.05 --downlink top_k:0.2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

import ef_lightning as efl
from ef_lightning.callbacks import CommunicationMonitor

sys.path.insert(0, str(Path(__file__).parent))
from text_data import byte_splits

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LitLogger.*")

MB = 1e6


class ByteLM(LightningModule):
    """A Llama causal LM over bytes, trained with the Gluon preset (layer-wise LMO: spectral hidden, col_norm
    embedding, sign head, bias_rms gains)."""

    def __init__(self, hidden: int = 128, layers: int = 2, lr: float | None = None) -> None:
        super().__init__()
        cfg = LlamaConfig(
            vocab_size=256,
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=512,
            tie_word_embeddings=False,
        )
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


class ValidationLog(Callback):
    """After every validation (at X): the step, the validation loss and the ledger's cumulative bytes at that step.
    With a ``target``, stops training at the first validation at or below it (the decision is reduced over the
    ranks, so every process stops at the same step)."""

    def __init__(self, target: float | None = None) -> None:
        self.target = target
        self.points: list[dict[str, float]] = []
        self.seconds = 0.0  # training loop, validations included; process start-up and set-up excluded
        self._t0 = 0.0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.seconds = time.perf_counter() - self._t0

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or "val_loss" not in trainer.callback_metrics:
            return
        s = trainer.strategy.engine.ledger.summary()
        loss = float(trainer.callback_metrics["val_loss"])
        self.points.append(
            {
                "step": trainer.global_step,
                "val_loss": loss,
                "uplink_bytes_per_worker": s["uplink_wire_bytes_per_worker"],
                "downlink_bytes": s["downlink_wire_bytes"],
                "ledger_steps": s["steps"],
            }
        )
        if self.target is not None:
            reached = trainer.strategy.reduce_boolean_decision(loss <= self.target, all=False)
            if reached and trainer.is_global_zero:
                print(
                    f"[demo] step {trainer.global_step}: validation loss at X {loss:.4f} <= target {self.target:.4f}, "
                    "stopping (Lightning may still report the epoch or step limit as the reason)",
                    flush=True,
                )
            trainer.should_stop = trainer.should_stop or reached


def run(args: argparse.Namespace, tag: str, max_steps: int, target: float | None = None, **options: Any) -> dict:
    """One fit; ``options`` go to EF21MuonStrategy (none: the package's default compressors)."""
    seed_everything(0, workers=True)
    train, val = byte_splits(block=args.block)
    model = ByteLM(args.hidden, args.layers, args.lr)
    strategy = efl.EF21MuonStrategy(topology=args.topology, **options)
    # a finite epoch of at most max_steps batches per process, and as many epochs as the steps need: the progress bar
    # reads "Epoch e/E" and "i/N" instead of Lightning's "Epoch 0/-2" for max_steps with max_epochs unset
    epoch = min(max_steps, math.ceil(math.ceil(len(train) / args.devices) / args.batch))
    log = ValidationLog(target)
    trainer = Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_steps=max_steps,
        max_epochs=math.ceil(max_steps / epoch),
        limit_train_batches=epoch,
        val_check_interval=args.val_every,
        check_val_every_n_epoch=None,  # validate every val_every steps counted over epochs, not at epoch ends
        limit_val_batches=args.val_batches,
        num_sanity_val_steps=0,
        logger=CSVLogger(args.out, name=tag),
        callbacks=[CommunicationMonitor(), log],
        log_every_n_steps=min(10, args.val_every),
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(train, batch_size=args.batch, shuffle=True), DataLoader(val, batch_size=args.batch))
    ledger = trainer.strategy.engine.ledger
    cfg = trainer.strategy.config
    hit = next((p for p in log.points if target is not None and p["val_loss"] <= target), None)
    return {
        "tag": tag,
        "uplink": _describe(cfg.uplink),
        "downlink": _describe(cfg.downlink),
        "topology": cfg.topology,
        "budget_steps": max_steps,
        "target": target,
        "reached": hit is not None,
        "hit": hit,
        "validations": log.points,
        "final": log.points[-1],
        "steps_run": trainer.global_step,
        "seconds": log.seconds,
        "rank": trainer.global_rank,
        "log_dir": trainer.logger.log_dir,
        "per_step": [  # the ledger's own records, so the report can be checked against them
            {"uplink_bytes_per_worker": r.uplink_wire_bytes, "downlink_bytes": r.downlink_wire_bytes}
            for r in ledger.records
        ],
        **ledger.summary(),
    }


def _describe(spec: str | Mapping[str, str]) -> str:
    """A compressor spec, a mapping shown as roles grouped by spec (``hidden,head=top_k:0.1 vector=identity``)."""
    if isinstance(spec, str):
        return spec
    groups: dict[str, list[str]] = {}
    for role, s in spec.items():
        groups.setdefault(s, []).append(role)
    return " ".join(f"{','.join(roles)}={s}" for s, roles in groups.items())


def _to_loss(r: dict) -> dict[str, float]:
    """Steps and bytes to the target loss: at the first validation at or below it (else over the whole run)."""
    p = r["hit"] or r["final"]
    up, down = p["uplink_bytes_per_worker"], p["downlink_bytes"]
    return {"steps": p["step"], "uplink": up, "downlink": down, "total": up + down, "seconds": r["seconds"]}


def report(base: dict | None, comp: dict, args: argparse.Namespace) -> str:
    lines = [
        "",
        f"EF21-Muon demo — {args.devices} CPU processes (gloo), byte-level Llama on Python stdlib docstrings, "
        f"topology {comp['topology']}",
        f"  compressed run: uplink {comp['uplink']}",
        f"                  downlink {comp['downlink']}",
    ]
    if base is None:  # --no-baseline: no target, just what the compressed run sent
        f = comp["final"]
        lines.append(
            f"Compressed run, {f['step']} steps: validation loss at X {f['val_loss']:.4f} nats/byte; uplink "
            f"{f['uplink_bytes_per_worker'] / MB:.2f} MB per worker ({comp['compression_ratio']:.1f}x less than dense "
            f"fp32), downlink {f['downlink_bytes'] / MB:.2f} MB; {comp['seconds']:.1f} s."
        )
        return "\n".join(lines)
    target = comp["target"]
    lines += [
        f"Target: validation loss {target:.4f} nats/byte at the server model X = the uncompressed run's final loss "
        f"after {base['budget_steps']} steps.",
        f"The compressed run is validated every {args.val_every} steps and stops at the first validation at or below "
        f"the target (budget {comp['budget_steps']} steps).",
        "",
        f"{'run':<13} {'steps to loss':>13} {'uplink MB/worker':>16} {'downlink MB':>11} {'total MB':>9} {'wall s':>7}",
    ]
    b, c = _to_loss(base), _to_loss(comp)
    for name, t, r in (("uncompressed", b, base), ("ef21_muon", c, comp)):
        n = str(t["steps"]) if r["reached"] else f">{t['steps']}"  # not reached: the bytes of the whole budget
        lines.append(
            f"{name:<13} {n:>13} {t['uplink'] / MB:>16.2f} {t['downlink'] / MB:>11.2f} "
            f"{t['total'] / MB:>9.2f} {t['seconds']:>7.1f}"
        )
    lines.append(
        "(MB = 1e6 bytes, the wire bytes handed to gloo; total = one worker's uplink + the server side's downlink; "
        "wall s = the training loop with its validations, process start-up excluded"
        + ("" if comp["reached"] else "; >N steps: not reached within the budget, bytes of the whole budget")
        + ")"
    )
    lines.append("")
    if comp["reached"]:
        lines.append(
            f"Reached the uncompressed loss ({comp['hit']['val_loss']:.4f} <= {target:.4f}) in {c['steps']} steps "
            f"instead of {b['steps']} ({c['steps'] / b['steps']:.2f}x the steps), sending "
            f"{b['uplink'] / c['uplink']:.1f}x "
            f"less uplink per worker ({b['uplink'] / MB:.2f} -> {c['uplink'] / MB:.2f} MB) and "
            f"{b['total'] / c['total']:.1f}x fewer bytes in total ({b['total'] / MB:.2f} -> {c['total'] / MB:.2f} MB)."
        )
    else:
        best = min(comp["validations"], key=lambda p: p["val_loss"])
        gap = best["val_loss"] - target
        lines.append(
            f"NOT REACHED: the compressed run's budget of {comp['budget_steps']} steps ran out before its validation "
            f"loss reached {target:.4f}; its best was {best['val_loss']:.4f} at step {best['step']}, "
            f"{gap:.4f} nats/byte ({gap / target * 100:.1f}%) above the target. Over its whole budget it sent "
            f"{c['uplink'] / MB:.2f} MB uplink per worker and {c['total'] / MB:.2f} MB in total, against "
            f"{b['uplink'] / MB:.2f} and {b['total'] / MB:.2f} MB for the uncompressed run; no saving to the target "
            f"loss is shown by this run."
        )
    same = next((p for p in comp["validations"] if p["step"] == b["steps"]), None)
    if same is not None:
        lines.append(
            f"At equal steps ({b['steps']}) the compressed run's validation loss was {same['val_loss']:.4f} vs "
            f"{target:.4f} ({(same['val_loss'] - target) / target * 100:+.1f}%)."
        )
    lines.append(
        f"Wall time: {b['seconds']:.1f} s uncompressed, {c['seconds']:.1f} s compressed. Two processes on one machine "
        "talk over loopback, where moving bytes is nearly free, so time is not the point here, bytes are: on a slow "
        "link the bytes saved become time saved (measured over a shaped link in docs/benchmarks.md)."
    )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150, help="optimizer steps of the uncompressed run (default 150)")
    p.add_argument(
        "--budget-mult",
        type=float,
        default=3.0,
        help="the compressed run may take up to this many times --steps to reach the uncompressed loss (default 3)",
    )
    p.add_argument("--devices", type=int, default=2, help="CPU processes (default 2)")
    p.add_argument(
        "--uplink",
        default=None,
        help="uplink compressor spec for matrices, vectors stay dense (default: the package's)",
    )
    p.add_argument("--downlink", default=None, help="downlink compressor spec for matrices (default: the package's)")
    p.add_argument("--topology", default="sharded", choices=["sharded", "server", "allgather"])
    p.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="first train with identity compressors to set the target loss (default on; off: one compressed run of "
        "--steps steps, no target)",
    )
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--block", type=int, default=128, help="sequence length in bytes")
    p.add_argument("--batch", type=int, default=16, help="sequences per worker per step")
    p.add_argument("--lr", type=float, default=None, help="LMO lr (default: the Gluon preset's, 2**-12)")
    p.add_argument("--val-every", type=int, default=25, help="validate (at X) every this many steps (default 25)")
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--out", default="outputs/demo")
    args = p.parse_args()
    if args.val_every < 1 or args.steps % args.val_every:  # Lightning validates every val_every steps, not at the end
        p.error(
            f"--steps {args.steps} must be a multiple of --val-every {args.val_every}, so the final model is validated"
        )
    if args.budget_mult < 1:
        p.error(f"--budget-mult {args.budget_mult} must be >= 1")
    torch.set_num_threads(1)
    role = lambda spec: {"hidden": spec, "embedding": spec, "head": spec, "default": "identity"}  # noqa: E731
    options: dict[str, Any] = {}  # none given: the strategy's defaults
    if args.uplink is not None:
        options["uplink"] = role(args.uplink)
    if args.downlink is not None:
        options["downlink"] = role(args.downlink) if args.topology != "allgather" else "identity"
    base = None
    if args.baseline:
        base = run(args, "uncompressed", args.steps, uplink="identity", downlink="identity")
        # its steps to its own final loss: the first validation at or below it (the final one unless the loss rose)
        base["target"] = base["final"]["val_loss"]
        base["hit"] = next(q for q in base["validations"] if q["val_loss"] <= base["target"])
        base["reached"] = True
        budget = math.ceil(args.steps * args.budget_mult / args.val_every) * args.val_every
        comp = run(args, "ef21_muon", budget, target=base["target"], **options)
    else:
        comp = run(args, "ef21_muon", args.steps, **options)
    if comp["rank"] == 0:
        print(report(base, comp, args), flush=True)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        rows = [r for r in (base, comp) if r is not None]
        summary = {"runs": rows, "to_loss": {r["tag"]: _to_loss(r) for r in rows}} if base else {"runs": rows}
        (Path(args.out) / "report.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
