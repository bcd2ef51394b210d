"""Fault scenarios run as real multi-process Lightning scripts (``EF21MuonStrategy`` relaunches this file).

Usage: ``python tests/fault_scenarios.py OUT_DIR DEVICES SCENARIO [ARG ...]``; tests/test_faults.py starts it through
subprocess (Lightning's launcher re-runs the command line: under pytest it would re-run pytest) and reads what the
ranks wrote under ``OUT_DIR``:

* ``fault MODE RANK STEP TIMEOUT``: rank RANK dies (``os._exit(1)``, MODE ``die``) or stalls (``time.sleep``, MODE
  ``stall``) inside the EF21 step of optimizer step STEP, with a process-group timeout of TIMEOUT seconds. Each rank
  writes ``fault_rank<r>.json`` (when it faults) or ``exception_rank<r>.json`` (when its fit raises: time, type, text).
* ``crash_save``: checkpoints every 2 steps to ``ckpt/latest.ckpt``; rank 0 is killed half-way through writing the
  second one (``torch.save`` writes half of the bytes, then ``os._exit(1)``): ``crash.json`` says where.
* ``after_crash``: an uninterrupted 6-step run, then a 6-step run resumed from ``ckpt/latest.ckpt``; then one fit
  from each damaged copy in ``variants/`` (written by the test) and ``resume_world_size="reinit"`` fits from
  ``variants/missing_rank1.ckpt`` and ``variants/shape_rank1.ckpt``: ``after_crash_rank<r>.pt``.
* ``reinit_one``: the 2-process ``ckpt/latest.ckpt`` resumed by this run's DEVICES processes (1): error by default,
  ``reinit`` restores X: ``reinit_one_rank<r>.pt``.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

import ef_lightning as efl
from lightning_scenarios import Regressor, loaders, trainer, weights

STEPS = 6  # optimizer steps of the checkpoint scenarios; checkpoints every 2


def strategy(**kwargs: Any) -> efl.EF21MuonStrategy:
    """The compressed configuration of the checkpoint scenarios (W != X: the downlink is compressed too)."""
    return efl.EF21MuonStrategy(uplink="top_k:0.2", downlink="top_k:0.3", topology="sharded", **kwargs)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".part")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


class Fault(Callback):
    """Rank ``rank`` dies or stalls inside the EF21 step of optimizer step ``step`` (Lightning runs
    ``on_before_optimizer_step`` inside ``optimizer.step(closure)``, after the backward: mid-step)."""

    def __init__(self, out: Path, mode: str, rank: int, step: int, stall_s: float) -> None:
        self.out, self.mode, self.rank, self.step, self.stall_s = out, mode, rank, step, stall_s

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            _write_json(self.out / f"fault_rank{self.rank}.json", {"time": time.time(), "mode": self.mode})
            if self.mode == "die":
                os._exit(1)
            time.sleep(self.stall_s)

    def on_exception(self, trainer, pl_module, exception) -> None:
        _write_json(self.out / f"exception_rank{trainer.global_rank}.json",
                    {"time": time.time(), "type": type(exception).__name__, "message": str(exception)[:2000]})


def s_fault(out: Path, devices: int, mode: str, rank: str, step: str, timeout: str) -> None:
    seconds = float(timeout)
    seed_everything(0)
    t = trainer(devices, strategy(timeout=timedelta(seconds=seconds)), out, "fault", max_steps=STEPS,
                callbacks=[Fault(out, mode, int(rank), int(step), stall_s=20 * seconds)])
    t.fit(Regressor(step_data=True), loaders()[0])
    _write_json(out / f"finished_rank{t.global_rank}.json", {"time": time.time()})


class CrashingSave:
    """``torch.save`` that, at its ``at``-th call into a file (calls into memory buffers, e.g. pickling tensors for
    a collective, pass through), writes half of the bytes to the file and kills the process (``os._exit``: no
    cleanup runs), recording where it wrote."""

    def __init__(self, out: Path, at: int) -> None:
        self.out, self.at, self.calls, self.real = out, at, 0, torch.save

    def __call__(self, obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(f, io.BytesIO):
            return self.real(obj, f, *args, **kwargs)
        self.calls += 1
        if self.calls < self.at:
            return self.real(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        self.real(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        handle = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f  # noqa: SIM115 - never closed: crash
        handle.write(data[: len(data) // 2])
        handle.flush()
        os.fsync(handle.fileno())
        name = handle.name if isinstance(handle.name, str) else os.readlink(f"/proc/self/fd/{handle.fileno()}")
        _write_json(self.out / "crash.json", {"target": name, "size": len(data), "written": len(data) // 2})
        os._exit(1)


def s_crash_save(out: Path, devices: int) -> None:
    seed_everything(0)
    ck = ModelCheckpoint(dirpath=str(out / "ckpt"), filename="latest", every_n_train_steps=2,
                         enable_version_counter=False)
    t = trainer(devices, strategy(), out, "crash", max_steps=STEPS, ckpt=True, callbacks=[ck])
    if t.global_rank == 0:  # rank 0 writes the checkpoint files; it dies during the second one (step 4)
        torch.save = CrashingSave(out, at=2)
    t.fit(Regressor(step_data=True), loaders()[0])


class StartState(Callback):
    """The parameters, the global step and the EF21 state when training starts (after a checkpoint is restored)."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.step = trainer.global_step
        self.weights = weights(pl_module)
        self.ef21 = trainer.strategy.engine.state_dict()


def _fit_error(devices: int, out: Path, name: str, ckpt: Path, **kwargs: Any) -> str | None:
    seed_everything(0)
    t = trainer(devices, strategy(**kwargs), out, name, max_steps=STEPS)
    try:
        t.fit(Regressor(step_data=True), loaders()[0], ckpt_path=str(ckpt))
    except ValueError as e:
        return str(e)
    return None


def s_after_crash(out: Path, devices: int) -> None:
    res: dict[str, Any] = {}
    for name, ckpt in (("full", None), ("resumed", out / "ckpt" / "latest.ckpt")):
        seed_everything(0)
        model, start = Regressor(step_data=True), StartState()
        t = trainer(devices, strategy(), out, f"after_{name}", max_steps=STEPS, callbacks=[start])
        t.fit(model, loaders()[0], ckpt_path=None if ckpt is None else str(ckpt))
        res[name] = {"weights": weights(model), "ef21": t.strategy.engine.state_dict(), "start_step": start.step,
                     "global_step": t.global_step}
    res["errors"] = {p.stem: _fit_error(devices, out, f"bad_{p.stem}", p)
                     for p in sorted((out / "variants").glob("*.ckpt"))}
    res["reinit"] = {}
    for variant in ("missing_rank1", "shape_rank1"):  # rank 1's entry absent / failing to load on rank 1
        seed_everything(0)
        start = StartState()
        t = trainer(devices, strategy(resume_world_size="reinit"), out, f"reinit_{variant}", max_steps=STEPS,
                    callbacks=[start])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t.fit(Regressor(step_data=True), loaders()[0], ckpt_path=str(out / "variants" / f"{variant}.ckpt"))
        res["reinit"][variant] = {"warnings": [str(w.message) for w in caught if "re-initialised" in str(w.message)],
                                  "start_step": start.step, "global_step": t.global_step, "weights": start.weights}
    torch.save(res, out / f"after_crash_rank{t.global_rank}.pt")


def s_reinit_one(out: Path, devices: int) -> None:
    ckpt = out / "ckpt" / "latest.ckpt"
    res: dict[str, Any] = {"error": _fit_error(devices, out, "one_error", ckpt)}
    seed_everything(0)
    start = StartState()
    t = trainer(devices, strategy(resume_world_size="reinit"), out, "one_reinit", max_steps=STEPS,
                callbacks=[start])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(Regressor(step_data=True), loaders()[0], ckpt_path=str(ckpt))
    res.update(warnings=[str(w.message) for w in caught if "re-initialised" in str(w.message)],
               start_step=start.step, start_weights=start.weights, start_ef21=start.ef21, global_step=t.global_step)
    torch.save(res, out / f"reinit_one_rank{t.global_rank}.pt")


SCENARIOS = {"fault": s_fault, "crash_save": s_crash_save, "after_crash": s_after_crash, "reinit_one": s_reinit_one}

if __name__ == "__main__":
    out_dir, devices, name, *args = sys.argv[1:]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PL_DISABLE_FORK", "1")
    SCENARIOS[name](out, int(devices), *args)
