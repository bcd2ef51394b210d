"""Causal-LM fine-tuning with Accelerate; ``EF21_MUON=1`` turns on EF21-Muon through ``EF21Plugin``.

The same task as recipes/causal_lm_lightning.py (offline by default: a byte-level Llama on the Python stdlib
docstrings; ``--model`` / ``--dataset`` for hub models and data). The training loop is a stock Accelerate loop; the
one change is ``plugin.prepare(accelerator, ...)`` in place of ``accelerator.prepare(...)``. Without ``EF21_MUON=1``
it is plain Accelerate (DDP all-reduce); with it, the optimizer step is the EF21-Muon sync with the compressors and
topology of the config (the config's values win over ``EF21_UPLINK`` / ``EF21_DOWNLINK`` / ``EF21_TOPOLOGY``).

    # 2 CPU processes (``--cpu --num_processes 2`` would start only one)
    EF21_MUON=1 ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 \\
        recipes/causal_lm_accelerate.py --config recipes/configs/causal_lm_accelerate/default.yaml
    EF21_MUON=1 accelerate launch --multi_gpu --num_processes 8 recipes/causal_lm_accelerate.py  # 8 GPUs
    python recipes/causal_lm_accelerate.py --config recipes/configs/causal_lm_accelerate/tiny.yaml  # 1 process

Outputs in ``out_dir`` (main process): ``resolved_config.yaml``, ``summary.json``, ``val_loss_vs_uplink.png``.
Validation runs at the server model X (``plugin.at_server_model()``; W == X with an identity downlink; see
docs/accelerate.md). Uplink bytes of a plain run are the dense gradient all-reduced every step.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm
from transformers.hf_argparser import HfArg

import ef_lightning as efl
from ef_lightning.accelerate import EF21Plugin

sys.path.insert(0, str(Path(__file__).parent))
from recipe_utils import (PLOT_NAME, causal_lm_task, check_world_size, cpu_threads, dense_bytes, ef21_plugins,  # noqa: E402
                    plot_loss_vs_uplink, summary_row, write_summary)
from config import CausalLMConfig, override, parse_args, save_resolved  # noqa: E402


@dataclasses.dataclass
class Config(CausalLMConfig):
    """Defaults of this recipe (a config file is a delta over these; see recipes/config.py)."""

    mixed_precision: str = HfArg(default="no", help="Accelerate mixed precision: no or bf16 (fp16's GradScaler is "
                                 "not supported)")
    out_dir: str = override(CausalLMConfig, "out_dir", "outputs/causal_lm_accelerate")


@torch.no_grad()
def evaluate(accelerator: Accelerator, model: torch.nn.Module, loader: DataLoader) -> float:
    """Mean validation loss (nats per token) over the whole (prepared, sharded) validation loader."""
    model.eval()
    # one loss per sequence, as the transformers Trainer does; gather_for_metrics drops the padding of the last batch
    losses = [accelerator.gather_for_metrics(model(**b).loss.repeat(len(b["input_ids"]))) for b in loader]
    model.train()
    return torch.cat(losses).mean().item()


def train(cfg: Config, accelerator: Accelerator, name: str, plugin: EF21Plugin) -> tuple[dict, list]:
    """One training run; returns its summary row and its ``(uplink bytes per worker, val loss)`` curve."""
    set_seed(cfg.seed)
    model, train_set, val_set = causal_lm_task(cfg)
    per_step = dense_bytes(model)  # what plain DDP all-reduces per optimizer step
    opt = efl.build_lmo_optimizer(model, preset=cfg.preset, lr=cfg.lr, verbose=accelerator.is_main_process)
    warmup = max(1, cfg.warmup)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True)
    n_val = min(len(val_set), cfg.val_batches * cfg.batch_size * accelerator.num_processes)
    val_loader = DataLoader(Subset(val_set, range(n_val)), batch_size=cfg.batch_size)
    # the one line that differs from a stock Accelerate script
    model, opt, train_loader, val_loader, sched = plugin.prepare(accelerator, model, opt, train_loader, val_loader,
                                                                 sched)

    def sent(step: int) -> int:  # cumulative uplink bytes per worker after `step` optimizer steps
        return plugin.ledger.summary()["uplink_wire_bytes_per_worker"] if plugin.ledger else per_step * step

    curve: list[tuple[float, float]] = []
    shown: dict[str, str] = {}  # the progress bar's postfix
    bar = tqdm(total=cfg.steps, desc=name, disable=not accelerator.is_main_process)
    step, start = 0, time.perf_counter()
    while step < cfg.steps:  # epochs until the step budget is spent
        for batch in train_loader:
            loss = model(**batch).loss
            accelerator.backward(loss)
            opt.step()  # EF21-Muon: the compressed sync and the server step
            sched.step()
            opt.zero_grad()
            step += 1
            shown["loss"] = f"{loss.item():.3f}"
            if step % cfg.val_every == 0 or step == cfg.steps:
                with plugin.at_server_model():  # validation at X (docs/algorithm.md §2); W == X without a compressed downlink
                    curve.append((float(sent(step)), evaluate(accelerator, model, val_loader)))
                shown.update(val_loss=f"{curve[-1][1]:.3f}", uplink_MB=f"{curve[-1][0] / 1e6:.2f}")
            bar.set_postfix(shown, refresh=False)
            bar.update()
            if step == cfg.steps:
                break
    bar.close()
    seconds = time.perf_counter() - start
    row = summary_row(name, curve[-1][1], seconds, plugin.ledger.summary() if plugin.ledger else None, per_step, step,
                      ef21=plugin.enabled, uplink=plugin.config.uplink, downlink=plugin.config.downlink,
                      topology=plugin.config.topology, sync_every=plugin.config.sync_every,
                      processes=accelerator.num_processes)
    return row, curve


def main(argv: list[str] | None = None) -> list[dict]:
    cfg = parse_args(Config, __doc__, argv)
    cpu_threads()
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    check_world_size(accelerator.num_processes)

    runs = ef21_plugins(cfg)  # EF21_MUON=1: [uncompressed (if baseline),] ef21_muon; else: plain
    rows, curves = [], {}
    for name, p in runs:
        row, curves[name] = train(cfg, accelerator, name, p)
        rows.append(row)
    if accelerator.is_main_process:
        save_resolved(cfg, cfg.out_dir)
        mode = f"EF21-Muon {cfg.topology}" if runs[-1][1].enabled else "plain DDP"
        plot_loss_vs_uplink(curves, Path(cfg.out_dir) / PLOT_NAME,
                            title=f"causal LM, Accelerate {mode}, processes: {accelerator.num_processes}")
        write_summary(rows, cfg.out_dir, title=f"\ncausal LM with Accelerate ({mode})")
    accelerator.end_training()
    return rows


if __name__ == "__main__":
    main()
