"""Lightning scenarios run as a real multi-process script (``strategy="ef21_muon"`` relaunches this file).

Usage: ``python tests/lightning_scenarios.py OUT_DIR DEVICES SCENARIO [SCENARIO ...]``. Each scenario writes
``OUT_DIR/<scenario>_rank<r>.pt``; tests/test_lightning.py compares them with independent references (plain DDP).
Run through subprocess from the tests (Lightning's subprocess launcher re-runs the command line in child processes,
which under pytest would re-run pytest: docs/architecture.md).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ef_lightning as efl
from ef_lightning.callbacks import CommunicationMonitor

torch.set_num_threads(1)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LitLogger.*")


class Regressor(LightningModule):
    def __init__(self, optimizer: str = "gluon", lr: float | None = None, step_data: bool = False,
                 log_sum: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
        self.optimizer_name, self.lr, self.step_data, self.log_sum = optimizer, lr, step_data, log_sum
        self.seen: list[float] = []  # fingerprints of the batches trained on

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.step_data:  # data chosen by (optimizer step, rank): immune to how a resumed loop re-enters an epoch
            x, y = step_batch(self.global_step, self.global_rank)
        self.seen.append(float(x.sum()))
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        if self.log_sum:  # an epoch aggregate: a logged second run (at the previous point) would be added in
            self.log("train_loss_sum", loss, on_step=False, on_epoch=True, reduce_fx="sum")
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y), sync_dist=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", nn.functional.mse_loss(self(x), y), sync_dist=True)

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=1e-2)
        opt = efl.build_lmo_optimizer(self, preset="gluon", lr=self.lr, verbose=False)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def step_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(8, 8, generator=g)
    return x, torch.tanh(x @ torch.linspace(-1, 1, 32).view(8, 4))


class LossAtW(Callback):
    """The training loss at W_k computed independently (before the step, same batch), next to what Lightning
    logged (``train_loss``) and what the loop received from the training step (``outputs``)."""

    def __init__(self) -> None:
        self.expected: list[float] = []
        self.logged: list[float] = []
        self.outputs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        x, y = step_batch(pl_module.global_step, pl_module.global_rank)
        with torch.no_grad():
            self.expected.append(float(nn.functional.mse_loss(pl_module(x), y)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.logged.append(float(trainer.callback_metrics["train_loss"]))
        self.outputs.append(float(outputs["loss"]))


def loaders(n: int = 256, batch: int = 8):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g)
    y = torch.tanh(x @ torch.randn(8, 4, generator=g))
    ds = TensorDataset(x, y)
    return DataLoader(ds, batch_size=batch, shuffle=False), DataLoader(ds, batch_size=32, shuffle=False)


NUM_NODES = int(os.environ.get("EF21_TEST_NUM_NODES", "1"))  # >1: this script runs once per node (NODE_RANK)


def trainer(devices: int, strategy, out: Path, name: str, **kw) -> Trainer:
    kw.setdefault("max_steps", 20)
    kw.setdefault("logger", False)
    kw.setdefault("num_nodes", NUM_NODES)
    return Trainer(accelerator="cpu", devices=devices, strategy=strategy, enable_checkpointing=kw.pop("ckpt", False),
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                   limit_val_batches=kw.pop("limit_val_batches", 0), default_root_dir=str(out / name), **kw)


def weights(module: LightningModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def save(out: Path, name: str, trainer_: Trainer, payload: dict) -> None:
    torch.save(payload, out / f"{name}_rank{trainer_.global_rank}.pt")


def s_vs_ddp(out: Path, devices: int) -> None:
    """identity compressors vs strategy='ddp' with the same LMO optimizer (20 steps)."""
    for name, strategy in (("ef21", efl.EF21MuonStrategy(uplink="identity", downlink="identity", topology="sharded")),
                           ("ddp", "ddp")):
        seed_everything(0)
        model = Regressor()
        t = trainer(devices, strategy, out, f"vs_ddp_{name}")
        t.fit(model, loaders()[0])
        save(out, f"vs_ddp_{name}", t, {"weights": weights(model)})


class KeepW(Callback):
    """Copies the module's parameters (W) after every training batch."""

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.W = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def s_topk_csv(out: Path, devices: int) -> None:
    """top_k uplink + CSVLogger + CommunicationMonitor; validation at X with a compressed downlink."""
    seed_everything(0)
    model = Regressor()
    t = trainer(devices, efl.EF21MuonStrategy(uplink="top_k:0.1", downlink="top_k:0.25"), out, "topk",
                logger=CSVLogger(str(out), name="topk_csv", version=0), callbacks=[CommunicationMonitor(), keep := KeepW()],
                log_every_n_steps=1, max_steps=10, val_check_interval=5, limit_val_batches=2)
    t.fit(model, *loaders())
    eng = t.strategy.engine
    # independent check that validation ran at X: this rank's first 2 validation batches (DistributedSampler without
    # shuffle: indices rank::world) evaluated with X loaded into a copy of the model, averaged over ranks
    import copy

    import torch.distributed as dist

    X = eng.server_model()
    probe = copy.deepcopy(model.net)
    with torch.no_grad():
        for n, p in probe.named_parameters():
            p.copy_(X["net." + n])
        xs, ys = loaders()[1].dataset.tensors
        idx = torch.arange(t.global_rank, len(xs), t.world_size)[:64]
        at_x = torch.stack([nn.functional.mse_loss(probe(xs[b]), ys[b]) for b in idx.split(32)]).mean()
        w_model = copy.deepcopy(probe)
        for n, p in w_model.named_parameters():
            p.copy_(keep.W["net." + n])
        w_loss = torch.stack([nn.functional.mse_loss(w_model(xs[b]), ys[b]) for b in idx.split(32)]).mean()
    dist.all_reduce(at_x)
    dist.all_reduce(w_loss)
    at_x, w_loss = at_x / t.world_size, w_loss / t.world_size
    logged_val = float(t.callback_metrics["val_loss"])
    test_at_x = all(torch.equal(p, X["net." + n]) for n, p in model.net.named_parameters())
    tested = t.test(model, loaders()[1], verbose=False)
    predicted = t.predict(model, loaders()[1])
    save(out, "topk", t, {"shapes": {L.name: tuple(L.shape) for L in eng.layers},
                          "summary": eng.ledger.summary(), "weights": weights(model),
                          "test": tested, "n_predicted": sum(p.shape[0] for p in predicted),
                          "val_logged": logged_val, "test_at_x": test_at_x, "val_at_x": float(at_x), "val_at_w": float(w_loss)})


def s_resume(out: Path, devices: int) -> None:
    """Uninterrupted 10 steps vs. 4 steps + checkpoint + trainer.fit(ckpt_path=...) to 10 steps."""
    strategy = lambda: efl.EF21MuonStrategy(uplink="top_k:0.2", downlink="top_k:0.3", topology="sharded")  # noqa
    seed_everything(0)
    full = Regressor(step_data=True)
    t = trainer(devices, strategy(), out, "resume_full", max_steps=10)
    t.fit(full, loaders()[0])
    seed_everything(0)
    part = Regressor(step_data=True)
    ck = ModelCheckpoint(dirpath=str(out / "resume_ckpt"), every_n_train_steps=4, save_top_k=-1)
    t = trainer(devices, strategy(), out, "resume_part", max_steps=4, ckpt=True, callbacks=[ck])
    t.fit(part, loaders()[0])
    path = sorted((out / "resume_ckpt").glob("*.ckpt"))[-1]
    seed_everything(0)
    resumed = Regressor(step_data=True)
    t2 = trainer(devices, strategy(), out, "resume_resumed", max_steps=10)
    t2.fit(resumed, loaders()[0], ckpt_path=str(path))
    save(out, "resume", t2, {"full": weights(full), "resumed": weights(resumed), "ckpt": str(path),
                             "seen_full": full.seen, "seen_part": part.seen, "seen_resumed": resumed.seen,
                             "ledger_resumed": getattr(t2.strategy, "engine", None) and t2.strategy.engine.ledger.summary()})


def s_accumulate(out: Path, devices: int) -> None:
    """accumulate_grad_batches=2: one EF21 sync per optimizer step; equals DDP with the same accumulation."""
    res = {}
    runs = (("ef21", efl.EF21MuonStrategy(uplink="identity", downlink="identity", bucket_cap_mb=1e-4), None),
            ("ddp", "ddp", None), ("ef21_clip", efl.EF21MuonStrategy(uplink="identity", downlink="identity"), 1.0))
    for name, strategy, clip in runs:
        seed_everything(0)
        model = Regressor()
        t = trainer(devices, strategy, out, f"acc_{name}", max_steps=6, accumulate_grad_batches=2,
                    gradient_clip_val=clip)
        t.fit(model, loaders()[0])
        res[name] = weights(model)
        if name.startswith("ef21"):  # overlap: micro-batches send nothing (no resync); clipping turns overlap off
            res[f"{name}_overlap"] = (t.strategy.engine.overlapping, t.strategy.engine.resynced)
        if name == "ef21":
            res["ledger_steps"] = t.strategy.engine.ledger.summary()["steps"]
            res["global_step"] = t.global_step
            res["batches"] = t.fit_loop.epoch_loop.batch_progress.total.completed
    save(out, "acc", t, res)


def s_bf16(out: Path, devices: int) -> None:
    """precision='bf16-mixed' trains; EF21 state stays float32."""
    seed_everything(0)
    model = Regressor()
    t = trainer(devices, efl.EF21MuonStrategy(uplink="top_k:0.25", downlink="top_k:0.5"), out, "bf16",
                precision="bf16-mixed", max_steps=30)
    first = None
    x, y = next(iter(loaders()[0]))
    with torch.no_grad():
        first = nn.functional.mse_loss(model(x), y).item()
    t.fit(model, loaders()[0])
    st = t.strategy.engine.state_dict()
    dtypes = {str(v.dtype) for part in ("worker", "server") for d in st[part].values() for v in d.values()}
    with torch.no_grad():
        last = nn.functional.mse_loss(model(x), y).item()
    save(out, "bf16", t, {"dtypes": sorted(dtypes), "first": first, "last": last})


def s_adamw(out: Path, devices: int) -> None:
    """Any torch optimizer: AdamW under EF21 identity equals DDP + AdamW."""
    res = {}
    for name, strategy in (("ef21", efl.EF21MuonStrategy(uplink="identity", downlink="identity")), ("ddp", "ddp")):
        seed_everything(0)
        model = Regressor(optimizer="adamw")
        t = trainer(devices, strategy, out, f"adamw_{name}", max_steps=10)
        t.fit(model, loaders()[0])
        res[name] = weights(model)
    save(out, "adamw", t, res)


def s_world_change(out: Path, devices: int) -> None:
    """Resume a checkpoint written by 2 processes with this run's devices: error by default, 'reinit' opt-in."""
    path = sorted((out / "resume_ckpt").glob("*.ckpt"))[-1]
    res = {}
    seed_everything(0)
    t = trainer(devices, efl.EF21MuonStrategy(uplink="top_k:0.2", downlink="top_k:0.3"), out, "wc_err", max_steps=6)
    try:
        t.fit(Regressor(), loaders()[0], ckpt_path=str(path))
        res["error"] = None
    except ValueError as e:
        res["error"] = str(e)
    seed_everything(0)
    model = Regressor()
    t = trainer(devices, efl.EF21MuonStrategy(uplink="top_k:0.2", downlink="top_k:0.3", resume_world_size="reinit"),
                out, "wc_reinit", max_steps=6)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        t.fit(model, loaders()[0])  # plain fit with 1 device works
        t = trainer(devices, efl.EF21MuonStrategy(uplink="top_k:0.2", downlink="top_k:0.3",
                                                  resume_world_size="reinit"), out, "wc_reinit2", max_steps=8)
        t.fit(model, loaders()[0], ckpt_path=str(path))
    res["reinit_warned"] = any("re-initialised" in str(x.message) for x in w)
    res["global_step"] = t.global_step
    t = trainer(devices, efl.EF21MuonStrategy(uplink="top_k:0.2", estimator="mvr"), out, "vr_acc", max_steps=2,
                accumulate_grad_batches=2)
    try:
        t.fit(Regressor(), loaders()[0])
        res["vr_accumulate_error"] = ""
    except ValueError as e:
        res["vr_accumulate_error"] = str(e)
    save(out, "world_change", t, res)


def s_vr(out: Path, devices: int) -> None:
    """Each variance-reduced estimator under the strategy: trains, and resumes bit-identically from a checkpoint."""
    res = {}
    for est, up in (("marina", "natural"), ("ef21_page", "top_k:0.2"), ("mvr", "top_k:0.2")):
        strategy = lambda: efl.EF21MuonStrategy(uplink=up, downlink="top_k:0.5", estimator=est)  # noqa: E731
        seed_everything(0)
        full = Regressor(step_data=True, log_sum=True)
        losses = LossAtW()
        t = trainer(devices, strategy(), out, f"vr_{est}_full", max_steps=8, callbacks=[losses])
        t.fit(full, loaders()[0])
        summary = t.strategy.engine.ledger.summary()
        logged = {"expected": losses.expected, "logged": losses.logged, "outputs": losses.outputs,
                  "epoch_sum": float(t.callback_metrics["train_loss_sum"])}
        seed_everything(0)
        part = Regressor(step_data=True)
        ck = ModelCheckpoint(dirpath=str(out / f"vr_{est}_ckpt"), every_n_train_steps=3, save_top_k=-1)
        t = trainer(devices, strategy(), out, f"vr_{est}_part", max_steps=3, ckpt=True, callbacks=[ck])
        t.fit(part, loaders()[0])
        seed_everything(0)
        resumed = Regressor(step_data=True)
        t = trainer(devices, strategy(), out, f"vr_{est}_resumed", max_steps=8)
        t.fit(resumed, loaders()[0], ckpt_path=str(sorted((out / f"vr_{est}_ckpt").glob("*.ckpt"))[-1]))
        res[est] = {"full": weights(full), "resumed": weights(resumed), "summary": summary,
                    "logged_loss_steps": len(full.seen), **logged}
    save(out, "vr", t, res)


def s_participation(out: Path, devices: int) -> None:
    """Partial participation (server topology): per-worker counts differ per rank; the monitor logs their mean."""
    seed_everything(0)
    model = Regressor()
    t = trainer(devices, efl.EF21MuonStrategy(uplink="top_k:0.1", downlink="identity", topology="server",
                                              participation=0.5), out, "participation",
                logger=CSVLogger(str(out), name="participation_csv", version=0), callbacks=[CommunicationMonitor()],
                log_every_n_steps=1, max_steps=6)
    t.fit(model, loaders()[0])
    save(out, "participation", t, {"records": [r.uplink_bits for r in t.strategy.engine.ledger.records]})


def s_hierarchical(out: Path, devices: int) -> None:
    """num_nodes x devices processes, topology="hierarchical": identity vs strategy="ddp" (20 steps); compressed
    (20 steps, data by (step, rank), for the parent's Simulator); compressed resumed from a step-4 checkpoint."""
    res = {}
    compressed = {"uplink": "top_k:0.25", "downlink": "top_k:0.5"}
    runs = (("ddp", lambda: "ddp", False),
            ("identity", lambda: efl.EF21MuonStrategy(topology="hierarchical", uplink="identity", downlink="identity"),
             False),
            ("compressed", lambda: efl.EF21MuonStrategy(topology="hierarchical", **compressed), True))
    for name, strategy, step_data in runs:
        seed_everything(0)
        model = Regressor(step_data=step_data)
        monitored = {"logger": CSVLogger(str(out), name="hier_csv", version=0), "callbacks": [CommunicationMonitor()],
                     "log_every_n_steps": 1} if name == "compressed" else {}
        t = trainer(devices, strategy(), out, f"hier_{name}", max_steps=20 if name != "compressed" else 10,
                    **monitored)
        t.fit(model, loaders()[0])
        eng = getattr(t.strategy, "engine", None)
        res[name] = {"weights": weights(model), "records": [dict(vars(r)) for r in eng.ledger.records] if eng else None,
                     "share": [L.name for L in eng.layers] if eng else None}
    seed_everything(0)
    part = Regressor(step_data=True)
    ck = ModelCheckpoint(dirpath=str(out / "hier_ckpt"), every_n_train_steps=4, save_top_k=-1)
    t = trainer(devices, efl.EF21MuonStrategy(topology="hierarchical", **compressed), out, "hier_part", max_steps=4,
                ckpt=True, callbacks=[ck])
    t.fit(part, loaders()[0])
    seed_everything(0)
    resumed = Regressor(step_data=True)
    t = trainer(devices, efl.EF21MuonStrategy(topology="hierarchical", **compressed), out, "hier_resumed", max_steps=10)
    t.fit(resumed, loaders()[0], ckpt_path=str(sorted((out / "hier_ckpt").glob("*.ckpt"))[-1]))
    res["resumed"] = {"weights": weights(resumed), "records": [dict(vars(r)) for r in t.strategy.engine.ledger.records]}
    save(out, "hierarchical", t, res)


class ShardedRegressor(Regressor):
    """The regressor, sharded with FSDP2 over the processes of each node (EF21FSDPStrategy's "shard" mesh)."""

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=self.device_mesh["shard"])
        fully_shard(self, mesh=self.device_mesh["shard"])

    def configure_optimizers(self):
        return efl.build_lmo_optimizer(self, preset="muon", lr=0.05, verbose=False)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y), sync_dist=True)
        self.val_weights = {k: v.full_tensor().detach().clone() for k, v in self.state_dict().items()}


def full_weights(module: LightningModule) -> dict[str, torch.Tensor]:
    return {k: v.full_tensor().detach().clone() for k, v in module.state_dict().items()}


def s_fsdp(out: Path, devices: int, name: str = "fsdp", **options) -> None:
    """EF21FSDPStrategy on num_nodes x devices: 8 steps with validation at X; 4 steps + distributed checkpoint +
    resume to 8; the losses and the ledger of the first run. ``options``: more EF21 options."""
    strategy = lambda: efl.EF21FSDPStrategy(uplink="top_k:0.25", downlink="top_k:0.5", **options)  # noqa: E731
    seed_everything(0)
    full = ShardedRegressor(step_data=True)
    losses = LossAtW()
    # 8 steps = one epoch of 256 samples in batches of 8 over 4 processes: validation (at X) ends it
    t = trainer(devices, strategy(), out, f"{name}_full", max_steps=8, limit_val_batches=1, callbacks=[losses])
    t.fit(full, *loaders())
    res = {"full": full_weights(full), "at_validation": full.val_weights, "losses": losses.expected,
           "records": [dict(vars(r)) for r in t.strategy.engine.ledger.records],
           "X": t.strategy.engine.server_model(), "shard": {L.name: tuple(L.shape) for L in t.strategy.engine.layers}}
    seed_everything(0)
    part = ShardedRegressor(step_data=True)
    ck = ModelCheckpoint(dirpath=str(out / f"{name}_ckpt"), every_n_train_steps=4, save_top_k=-1)
    t = trainer(devices, strategy(), out, f"{name}_part", max_steps=4, ckpt=True, callbacks=[ck], limit_val_batches=1)
    t.fit(part, *loaders())
    seed_everything(1)  # a different initial model: everything must come from the checkpoint
    resumed = ShardedRegressor(step_data=True)
    t = trainer(devices, strategy(), out, f"{name}_resumed", max_steps=8, limit_val_batches=1)
    t.fit(resumed, *loaders(), ckpt_path=str(sorted((out / f"{name}_ckpt").glob("*.ckpt"))[-1]))
    res["resumed"] = full_weights(resumed)
    res["resumed_records"] = [dict(vars(r)) for r in t.strategy.engine.ledger.records]
    save(out, name, t, res)


def s_local(out: Path, devices: int) -> None:
    """sync_every=4 with accumulate_grad_batches=2: uninterrupted 10 steps vs. a checkpoint at step 6 (two inner
    steps into the second round) + trainer.fit(ckpt_path=...) to 10; the CommunicationMonitor logs to CSV. The
    checkpoint is written when validation ends (ModelCheckpoint(monitor="val_loss")), while X is in the module."""
    strategy = lambda: efl.EF21MuonStrategy(uplink="top_k:0.2", downlink="top_k:0.3", sync_every=4)  # noqa: E731

    def run(name: str, steps: int, resume: str | None = None, **kw):
        seed_everything(0)
        model = Regressor(step_data=True)
        keep = KeepW()
        t = trainer(devices, strategy(), out, name, max_steps=steps, accumulate_grad_batches=2,
                    callbacks=[keep, *kw.pop("callbacks", [])], **kw)
        t.fit(model, *loaders()[: 1 + kw.get("limit_val_batches", 0)], ckpt_path=resume)
        eng = t.strategy.engine
        return t, {"X": weights(model), "W": keep.W, "worker": eng.worker.state_dict(eng.layers),
                   "local": eng.state_dict()["local"], "records": [dict(vars(r)) for r in eng.ledger.records],
                   "seen": model.seen, "global_step": t.global_step}

    _, full = run("local_full", 10, logger=CSVLogger(str(out), name="local_csv", version=0),
                  callbacks=[CommunicationMonitor()], log_every_n_steps=1)
    ck = ModelCheckpoint(dirpath=str(out / "local_ckpt"), monitor="val_loss", save_top_k=1)
    _, part = run("local_part", 6, ckpt=True, callbacks=[ck], val_check_interval=12, limit_val_batches=1)
    t, resumed = run("local_resumed", 10, resume=str(sorted((out / "local_ckpt").glob("*.ckpt"))[-1]))
    save(out, "local", t, {"full": full, "part": part, "resumed": resumed})


def s_fsdp_local(out: Path, devices: int) -> None:
    """The FSDP scenario with local steps (sync_every=3): the checkpoint at step 4 is one step into a round."""
    s_fsdp(out, devices, "fsdp_local", sync_every=3)


SCENARIOS = {f.__name__[2:]: f for f in (s_vs_ddp, s_topk_csv, s_resume, s_accumulate, s_bf16, s_adamw,
                                          s_world_change, s_vr, s_participation, s_hierarchical,
                                          s_fsdp, s_local, s_fsdp_local)}

if __name__ == "__main__":
    out_dir, devices, *names = sys.argv[1:]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PL_DISABLE_FORK", "1")
    for name in names:
        SCENARIOS[name](out, int(devices))
