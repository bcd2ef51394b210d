"""Scenarios for tests/test_accelerate.py that run inside real gloo processes (started by dist_helpers).

Each child already has a process group (dist_helpers._entry); :func:`_accelerate_env` adds the environment variables
Accelerate reads (RANK, WORLD_SIZE, LOCAL_RANK) so that ``Accelerator(cpu=True)`` picks that group up as MULTI_CPU.
Everything a scenario returns is compared in the parent with an independent reference (plain Accelerate DDP with the
same optimizer, the top_k bit formula).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from dist_helpers import make_data, make_model, make_optimizer, mse

STEPS = 10


def _accelerate_env(rank: int, world: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      ACCELERATE_USE_CPU="true")


@contextlib.contextmanager
def ef21_env(**values: str) -> Iterator[None]:
    """Set EF21_* variables for one scenario (EF21_MUON unset unless given), restore afterwards."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("EF21_")}
    for k in saved:
        del os.environ[k]
    os.environ.update({f"EF21_{k.upper()}": v for k, v in values.items()})
    try:
        yield
    finally:
        for k in [k for k in os.environ if k.startswith("EF21_")]:
            del os.environ[k]
        os.environ.update(saved)


def fresh_accelerator_state() -> None:
    """Forget Accelerate's process-wide state between scenarios (the process group itself is kept)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()


def fresh_accelerator(**kwargs: Any):
    """A new CPU Accelerator with fresh shared state."""
    from accelerate import Accelerator

    fresh_accelerator_state()
    return Accelerator(cpu=True, **kwargs)


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def train_script(rank: int, world: int, steps: int = STEPS) -> dict[str, Any]:
    """A stock Accelerate loop with a prepared DataLoader and LR scheduler; EF21 iff EF21_MUON is set."""
    from ef_lightning.accelerate import EF21Plugin

    accelerator = fresh_accelerator()
    model = make_model(0)
    optimizer = make_optimizer(model)
    flat = [b for row in make_data(world, steps) for b in row]
    dataset = torch.utils.data.TensorDataset(torch.cat([x for x, _ in flat]), torch.cat([y for _, y in flat]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.95 ** s)
    plugin = EF21Plugin()
    model, optimizer, loader, scheduler = plugin.prepare(accelerator, model, optimizer, loader, scheduler)
    losses, first_grad = [], None
    for x, y in loader:
        loss = mse(model, (x, y))
        accelerator.backward(loss)
        if first_grad is None:  # after DDP's hook: the average in plain DDP, this rank's own g_j under EF21
            first_grad = next(model.parameters()).grad.clone()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return {"W": _params(accelerator.unwrap_model(model)), "losses": losses, "lr": scheduler.get_last_lr(),
            "first_grad": first_grad,
            "engine": type(plugin.engine).__name__ if plugin.engine else None,
            "ledger": plugin.ledger.summary() if plugin.ledger else None,
            "records": [r.__dict__.copy() for r in plugin.ledger.records] if plugin.ledger else None,
            "metrics": plugin.metrics()}


def accumulate_script(rank: int, world: int, micro_batches: int = 8) -> dict[str, Any]:
    """``accelerator.accumulate`` with gradient_accumulation_steps=2 on explicit per-rank micro-batches."""
    from ef_lightning.accelerate import EF21Plugin

    accelerator = fresh_accelerator(gradient_accumulation_steps=2)
    model = make_model(0)
    optimizer = make_optimizer(model)
    inner_steps = []
    orig = optimizer.step
    optimizer.step = lambda *a, **k: (inner_steps.append(1), orig(*a, **k))[1]  # counts server/optimizer updates
    plugin = EF21Plugin()
    model, optimizer = plugin.prepare(accelerator, model, optimizer)
    data = make_data(world, micro_batches)
    syncs = 0
    for s in range(micro_batches):
        with accelerator.accumulate(model):
            accelerator.backward(mse(model, data[s][rank]))
            syncs += accelerator.sync_gradients
            optimizer.step()
            optimizer.zero_grad()
    return {"W": _params(accelerator.unwrap_model(model)), "syncs": syncs, "inner_steps": len(inner_steps),
            "engine_steps": plugin.engine.step_count if plugin.engine else None,
            "ledger": plugin.ledger.summary() if plugin.ledger else None}


def _ef21_snapshot(model: nn.Module, plugin: Any) -> dict[str, Any]:
    return {"W": _params(model), "X": plugin.engine.server_model(), "ef21": plugin.engine.state_dict()}


def resume_script(rank: int, world: int, ckpt: str, split: int = 3, steps: int = 6,
                  accumulation: int = 1) -> dict[str, Any]:
    """Train ``split`` micro-batches, save_state, continue to ``steps``; then fresh objects + load_state + the same
    continuation. ``accumulation``: Accelerate's gradient_accumulation_steps (the loop runs accelerator.accumulate)."""
    from ef_lightning.accelerate import EF21Plugin

    data = make_data(world, steps)

    def build(seed: int):
        from ef_lightning import build_lmo_optimizer

        accelerator = fresh_accelerator(gradient_accumulation_steps=accumulation)
        model = make_model(seed)
        # preset muon: AdamW state on the non-hidden layers, which only their owner holds in the sharded topology
        optimizer = build_lmo_optimizer(model, "muon", momentum=0.9, verbose=False)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.9 ** s)
        plugin = EF21Plugin()
        model, optimizer, scheduler = plugin.prepare(accelerator, model, optimizer, scheduler)
        return accelerator, model, optimizer, scheduler, plugin

    def train(model, optimizer, scheduler, accelerator, lo, hi):
        for s in range(lo, hi):
            with accelerator.accumulate(model):
                accelerator.backward(mse(model, data[s][rank]))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()

    def snapshot(model, plugin, scheduler):
        out = _ef21_snapshot(accelerator.unwrap_model(model), plugin)
        out["lr"] = scheduler.get_last_lr()
        out["records"] = [dict(vars(r)) for r in plugin.ledger.records]
        return out

    accelerator, model, optimizer, scheduler, plugin = build(0)
    train(model, optimizer, scheduler, accelerator, 0, split)
    accelerator.save_state(ckpt)
    accelerator.wait_for_everyone()
    files = sorted(f for f in os.listdir(ckpt) if f.startswith("ef21_"))
    train(model, optimizer, scheduler, accelerator, split, steps)
    full = snapshot(model, plugin, scheduler)
    accelerator.wait_for_everyone()

    torch.manual_seed(123)  # the fresh run must not depend on where the RNG happens to be
    accelerator, model, optimizer, scheduler, plugin = build(7)
    accelerator.load_state(ckpt)
    train(model, optimizer, scheduler, accelerator, split, steps)
    return {"full": full, "resumed": snapshot(model, plugin, scheduler), "files": files}


# --------------------------------------------------------------------------- variance-reduced estimators (closures)
#: (estimator, EF21_* settings) of the VR scenarios; the parent builds the same Simulator from these
VR_CASES: dict[str, dict[str, str]] = {
    "marina": {"estimator": "marina", "uplink": "rand_k:0.25:unbiased", "downlink": "identity", "topology": "sharded"},
    "ef21_page": {"estimator": "ef21_page", "uplink": "top_k:0.2", "downlink": "top_k:0.5", "topology": "sharded",
                  "p": "0.3"},
    "mvr": {"estimator": "mvr", "uplink": "top_k:0.2", "downlink": "identity", "topology": "server",
            "participation": "0.5"},
}
VR_STEPS = 6


def _vr_train(model, optimizer, accelerator, data, rank: int, lo: int, hi: int) -> list[float]:
    """The documented loop: backward at the current point, then ``optimizer.step(closure)`` on the same batch."""
    losses = []
    for s in range(lo, hi):
        batch = data[s][rank]
        loss = mse(model, batch)
        accelerator.backward(loss)

        def closure(batch=batch):
            optimizer.zero_grad()
            second = mse(model, batch)
            accelerator.backward(second)
            return second

        optimizer.step(closure)
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def vr_script(rank: int, world: int, steps: int = VR_STEPS) -> dict[str, Any]:
    """One VR estimator (EF21_* from the environment) on data[s][rank]; returns W, the gathered X and the ledger."""
    from ef_lightning.accelerate import EF21Plugin

    accelerator = fresh_accelerator()
    model = make_model(0)
    optimizer = make_optimizer(model)
    plugin = EF21Plugin()
    model, optimizer = plugin.prepare(accelerator, model, optimizer)
    losses = _vr_train(model, optimizer, accelerator, make_data(world, steps), rank, 0, steps)
    return {"W": _params(accelerator.unwrap_model(model)), "X": plugin.engine.server_model(),
            "losses": losses, "ledger": plugin.ledger.summary(), "p": plugin.engine.p}


def vr_resume_script(rank: int, world: int, ckpt: str, split: int = 3, steps: int = 6) -> dict[str, Any]:
    """save_state after ``split`` VR steps, continue; fresh objects + load_state + the same continuation."""
    from ef_lightning.accelerate import EF21Plugin

    data = make_data(world, steps)

    def build(seed: int):
        accelerator = fresh_accelerator()
        model = make_model(seed)
        optimizer = make_optimizer(model)
        plugin = EF21Plugin()
        model, optimizer = plugin.prepare(accelerator, model, optimizer)
        return accelerator, model, optimizer, plugin

    accelerator, model, optimizer, plugin = build(0)
    _vr_train(model, optimizer, accelerator, data, rank, 0, split)
    accelerator.save_state(ckpt)
    accelerator.wait_for_everyone()
    _vr_train(model, optimizer, accelerator, data, rank, split, steps)
    full = _ef21_snapshot(accelerator.unwrap_model(model), plugin)
    accelerator.wait_for_everyone()

    torch.manual_seed(123)
    accelerator, model, optimizer, plugin = build(7)
    accelerator.load_state(ckpt)
    _vr_train(model, optimizer, accelerator, data, rank, split, steps)
    return {"full": full, "resumed": _ef21_snapshot(accelerator.unwrap_model(model), plugin)}


def accelerate_scenarios(rank: int, world: int, ckpt: str) -> dict[str, Any]:
    """Every Accelerate scenario in one launch (process start-up dominates on 2 cores)."""
    _accelerate_env(rank, world)
    out: dict[str, Any] = {}
    with ef21_env():
        out["plain"] = train_script(rank, world)
        out["plain_accum"] = accumulate_script(rank, world)
    with ef21_env(muon="1", uplink="identity", downlink="identity"):  # identity: must equal plain DDP
        out["ef21"] = train_script(rank, world)
        out["ef21_accum"] = accumulate_script(rank, world)
    with ef21_env(muon="1", uplink="top_k:0.1", downlink="identity", topology="sharded"):
        out["topk"] = train_script(rank, world, steps=3)
    with ef21_env(muon="1", uplink="top_k:0.1", downlink="top_k:0.3", topology="sharded"):
        out["resume"] = resume_script(rank, world, ckpt)
    with ef21_env(muon="1", uplink="top_k:0.1", downlink="top_k:0.3", sync_every="3"):
        # EF21_SYNC_EVERY with gradient accumulation 2: saved after 4 optimizer steps, one into a round
        out["local_resume"] = resume_script(rank, world, ckpt + "_local", split=8, steps=14, accumulation=2)
    for name, settings in VR_CASES.items():
        with ef21_env(muon="1", **settings):
            out[f"vr_{name}"] = vr_script(rank, world)
    with ef21_env(muon="1", estimator="mvr", uplink="top_k:0.1", downlink="top_k:0.3", topology="sharded"):
        out["vr_resume"] = vr_resume_script(rank, world, ckpt + "_mvr")
    return out


# --------------------------------------------------------------------------------------------- transformers Trainer
def tiny_llama(seed: int = 0) -> nn.Module:
    """A 1-layer Llama small enough for CPU tests (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))


class RandomTokens(torch.utils.data.Dataset):
    """``n`` fixed random sequences of ``length`` tokens; labels = inputs (the model shifts them)."""

    def __init__(self, n: int = 64, length: int = 16, vocab: int = 64, seed: int = 0) -> None:
        self.ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def run_hf_trainer(out_dir: str, *, ef21: bool, steps: int, trainer_cls: str = "EF21Trainer", resume: str | None = None,
                   save_steps: int | None = None, accumulate: int = 1, **ef21_kwargs: Any) -> dict[str, Any]:
    """Train the tiny Llama with a transformers Trainer; return W, log history and the engine's ledger."""
    from transformers import Trainer, TrainingArguments

    from ef_lightning import build_lmo_optimizer
    from ef_lightning.accelerate import EF21Plugin
    from ef_lightning.callbacks.hf import EF21Trainer

    fresh_accelerator_state()
    model = tiny_llama(0)
    optimizer = build_lmo_optimizer(model, "gluon", momentum=0.9, verbose=False)
    args = TrainingArguments(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=4, learning_rate=optimizer.defaults["lr"],
        logging_steps=1, save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        report_to=[], use_cpu=True, max_grad_norm=0.0, dataloader_num_workers=0, disable_tqdm=True, seed=0,
        lr_scheduler_type="constant", save_only_model=False, gradient_accumulation_steps=accumulate,
    )
    kwargs: dict[str, Any] = dict(model=model, args=args, train_dataset=RandomTokens(), optimizers=(optimizer, None))
    if trainer_cls == "EF21Trainer":
        trainer = EF21Trainer(ef21=EF21Plugin(enabled=ef21, **ef21_kwargs), **kwargs)
    else:
        trainer = Trainer(**kwargs)
    trainer.train(resume_from_checkpoint=resume)
    plugin = getattr(trainer, "ef21", None)
    return {"W": _params(model), "log_history": trainer.state.log_history,
            "ledger": plugin.ledger.summary() if plugin is not None and plugin.ledger else None,
            "shapes": {n: tuple(p.shape) for n, p in model.named_parameters()},
            "world": trainer.args.world_size}


def hf_scenarios(rank: int, world: int, out_dir: str) -> dict[str, Any]:
    """EF21Trainer (identity) vs the stock Trainer's DDP, both accumulating 2 micro-batches per optimizer step;
    EF21Trainer resume from a mid-run checkpoint."""
    _accelerate_env(rank, world)
    out = {}
    with ef21_env():
        out["plain"] = run_hf_trainer(os.path.join(out_dir, "plain"), ef21=False, steps=4, trainer_cls="Trainer",
                                      accumulate=2)
        out["ef21"] = run_hf_trainer(os.path.join(out_dir, "ef21"), ef21=True, steps=4, accumulate=2,
                                     uplink="identity", downlink="identity")
        full_dir = os.path.join(out_dir, "full")
        out["full"] = run_hf_trainer(full_dir, ef21=True, steps=4, save_steps=2, uplink="top_k:0.2",
                                     downlink="top_k:0.5")
        out["resumed"] = run_hf_trainer(os.path.join(out_dir, "resumed"), ef21=True, steps=4, uplink="top_k:0.2",
                                        downlink="top_k:0.5", resume=os.path.join(full_dir, "checkpoint-2"))
    return out
