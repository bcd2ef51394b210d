"""Faults lose nothing: ranks that die or stall, crashes while saving, damaged or missing EF21 state.

Multi-process cases run tests/fault_scenarios.py (2 gloo processes under Lightning's subprocess launcher) in a
session of its own, with its output in a file: afterwards no process of the run may be left (checked through /proc,
then killed whatever the outcome). References: the fault time each rank records against the process-group timeout;
an uninterrupted run of the same steps (bit-identical resume); the checkpoint's own entries (reinit). Single-process
cases (atomic writes, checkpoint IO selection, the Accelerate plugin's per-rank files) run here.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

import ef_lightning as efl
from accelerate_helpers import fresh_accelerator, fresh_accelerator_state
from dist_helpers import make_data, make_model, mse
from ef_lightning._atomic import atomic_save, damage
from ef_lightning.strategy import AtomicCheckpointIO

HERE = Path(__file__).parent
#: process-group timeout of the fault runs (seconds). Lightning's rendezvous waits this long for the child to start,
#: which takes ~10 s on a loaded 2-core machine: a run that never reached its fault is retried once.
TIMEOUT_S = 20
RUN_LIMIT_S = 150  # a run that has not ended by then hangs: the test fails
#: the runs are checked and cleaned up through /proc and process groups
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="multi-process fault runs use /proc and killpg")


# ------------------------------------------------------------------------------------------------ running scripts
def _group_alive(pgid: int) -> list[int]:
    """Processes (not zombies) of process group ``pgid`` (Linux /proc)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # pid (comm) state ppid pgrp ...: comm may hold spaces, so split after its closing parenthesis
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                alive.append(int(stat.parent.name))
    return alive


def _launch(out: Path, devices: int, *args: str) -> tuple[int, float, list[int]]:
    """Run the scenario script; returns (exit code, seconds until the launcher ended, processes of the run still
    alive 30 s after it ended). Everything left of the run is killed before returning."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    with open(out / "run.log", "wb") as log:  # a file, not a pipe: a process that outlived the run would hold a pipe
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, str(HERE / "fault_scenarios.py"), str(out), str(devices), *args],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=RUN_LIMIT_S)
            elapsed = time.monotonic() - start
            deadline = time.monotonic() + 30  # a child still raising when the launcher ended exits on its own
            while _group_alive(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            return rc, elapsed, _group_alive(proc.pid)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the run did not end within {RUN_LIMIT_S} s:\n{_tail(out)}") from None
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _tail(out: Path, n: int = 4000) -> str:
    return (out / "run.log").read_text(errors="replace")[-n:]


def _json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _fault_run(tmp_path: Path, mode: str, rank: int, step: int = 3) -> tuple[Path, int, float, list[int]]:
    for attempt in range(2):
        out = tmp_path / f"attempt{attempt}"
        rc, elapsed, alive = _launch(out, 2, "fault", mode, str(rank), str(step), str(TIMEOUT_S))
        if (out / f"fault_rank{rank}.json").exists():
            break  # else the rendezvous itself timed out (machine too loaded to start a child in TIMEOUT_S)
    return out, rc, elapsed, alive


def _same(a: Any, b: Any, where: str = "") -> None:
    """Bit-identical nested state (tensors with torch.equal; wall-clock ``*seconds*`` fields skipped)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping) and a.keys() == b.keys(), where
        for k in a:
            if "seconds" not in str(k):
                _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


# ------------------------------------------------------------------------------------------------ dead or stalled rank
@linux_only
@pytest.mark.parametrize("dead", [1, 0], ids=["child-dies", "launcher-dies"])
def test_rank_dying_mid_step_makes_the_other_raise_and_the_run_end(tmp_path, dead):
    """os._exit(1) inside the EF21 step of step 3: the other rank raises at once (far within the timeout), the
    launcher exits non-zero, and no process of the run is left."""
    out, rc, elapsed, alive = _fault_run(tmp_path, "die", dead)
    fault, other = _json(out / f"fault_rank{dead}.json"), _json(out / f"exception_rank{1 - dead}.json")
    assert fault is not None and other is not None, _tail(out)
    assert other["time"] - fault["time"] < TIMEOUT_S, (other, fault)  # a dead peer is seen at once, not at timeout
    assert rc != 0 and elapsed < RUN_LIMIT_S and not alive, (rc, elapsed, alive, _tail(out))
    assert not list(out.glob("finished_rank*.json"))


@linux_only
def test_rank_stalling_mid_step_makes_the_other_raise_within_the_timeout(tmp_path):
    """Rank 1 sleeps 20x the timeout inside the EF21 step: rank 0 raises a timeout error after the configured
    process-group timeout (the strategy's ``timeout`` reaches gloo), and the stalled child does not outlive the
    failed launcher (the strategy kills it after CHILD_GRACE_S)."""
    out, rc, elapsed, alive = _fault_run(tmp_path, "stall", 1)
    fault, other = _json(out / "fault_rank1.json"), _json(out / "exception_rank0.json")
    assert fault is not None and other is not None, _tail(out)
    waited = other["time"] - fault["time"]
    assert TIMEOUT_S - 3 <= waited <= TIMEOUT_S + 15, (waited, other)
    assert re.search(r"(?i)time[ds]?[ _]?out", other["message"]), other
    assert rc != 0 and not alive, (rc, alive, _tail(out))
    assert "killing local rank 1" in _tail(out)
    assert elapsed < TIMEOUT_S + 60 + efl.strategy.CHILD_GRACE_S, elapsed


# ------------------------------------------------------------------------------------------------ checkpoints (Lightning)
def _entries(ckpt: dict) -> list:
    return ckpt["optimizer_states"][0]["ef21"]


def _variants(latest: Path, into: Path) -> None:
    """Damaged copies of a 2-process checkpoint: the whole file, a rank's entry, a rank's tensors."""
    into.mkdir()
    data = latest.read_bytes()
    (into / "truncated.ckpt").write_bytes(data[: len(data) * 2 // 3])
    for name, damage_ in (("missing_rank1", lambda e: e.__setitem__(1, None)),
                          ("short_list", lambda e: e.pop()),  # the list lacks rank 1's entry
                          ("corrupt_rank1", lambda e: e[1]["worker"]["G"].__setitem__(next(iter(e[1]["worker"]["G"])),
                                                                                    "garbage")),
                          ("shape_rank1", lambda e: e[1]["worker"]["G"].__setitem__(next(iter(e[1]["worker"]["G"])),
                                                                                  torch.zeros(3)))):
        ckpt = torch.load(latest, weights_only=False)
        damage_(_entries(ckpt))
        torch.save(ckpt, into / f"{name}.ckpt")


@pytest.fixture(scope="module")
def ckpt_runs(tmp_path_factory) -> Path:
    """crash_save (rank 0 killed half-way through writing the step-4 checkpoint), then the damaged copies of what
    it left, then after_crash (2 processes) and reinit_one (1 process) on them."""
    out = tmp_path_factory.mktemp("faults_ckpt")
    rc, _, alive = _launch(out, 2, "crash_save")
    assert rc != 0 and not alive, (rc, alive, _tail(out))
    assert (out / "crash.json").exists(), _tail(out)
    _variants(out / "ckpt" / "latest.ckpt", out / "variants")
    for devices, scenario in ((2, "after_crash"), (1, "reinit_one")):
        rc, _, alive = _launch(out, devices, scenario)
        assert rc == 0 and not alive, (scenario, rc, alive, _tail(out))
    return out


@linux_only
def test_crash_while_saving_leaves_the_previous_checkpoint_whole(ckpt_runs):
    crash = json.loads((ckpt_runs / "crash.json").read_text())
    partial, latest = Path(crash["target"]), ckpt_runs / "ckpt" / "latest.ckpt"
    # the bytes went to a temporary file beside the target, which the crash left half written ...
    assert partial.parent == latest.parent and partial.name.startswith(".latest.ckpt.") and partial.suffix == ".tmp"
    assert partial.stat().st_size == crash["written"] < crash["size"]
    assert damage(partial) is not None
    # ... while latest.ckpt is still the complete step-2 checkpoint, EF21 state of both ranks included
    assert damage(latest) is None
    ckpt = torch.load(latest, weights_only=False)
    assert ckpt["global_step"] == 2
    assert [e["rank"] for e in _entries(ckpt)] == [0, 1] and all(e["step"] == 2 for e in _entries(ckpt))


@linux_only
def test_resume_after_crash_is_bit_identical_to_an_uninterrupted_run(ckpt_runs):
    for r in (0, 1):
        res = torch.load(ckpt_runs / f"after_crash_rank{r}.pt", weights_only=False)
        full, resumed = res["full"], res["resumed"]
        assert resumed["start_step"] == 2 and full["global_step"] == resumed["global_step"] == 6
        _same(full["weights"], resumed["weights"], f"rank {r} weights")
        _same(full["ef21"], resumed["ef21"], f"rank {r} ef21")  # M_j, G_j, X, G, optimizer state, W_prev, ledger


@linux_only
@pytest.mark.parametrize("variant", ["truncated", "missing_rank1", "short_list", "corrupt_rank1", "shape_rank1"])
def test_damaged_ef21_state_is_a_value_error_naming_rank_and_file(ckpt_runs, variant):
    """Every rank raises (none is left waiting in a collective: the next fit in the same processes works), naming
    the damaged rank and the file, and saying what to do."""
    path = str(ckpt_runs / "variants" / f"{variant}.ckpt")
    for r in (0, 1):
        msg = torch.load(ckpt_runs / f"after_crash_rank{r}.pt", weights_only=False)["errors"][variant]
        assert msg is not None and path in msg and "another checkpoint" in msg, (r, msg)
        if variant == "truncated":  # each rank read the file itself
            assert msg.startswith(f"rank {r}: checkpoint {path} cannot be read: truncated"), msg
        elif variant == "shape_rank1":  # rank 1's own load failed; rank 0 learns it through a collective
            assert "rank(s) 1 could not load" in msg and f"this is rank {r}" in msg, msg
            assert ("RuntimeError" in msg) == (r == 1), msg
        else:
            assert "EF21 state of rank(s) 1 in" in msg and "resume_world_size='reinit'" in msg, msg
            assert {"missing_rank1": "no entry (None)", "short_list": "no entry (the list has 1)",
                    "corrupt_rank1": "is a str, not a tensor"}[variant] in msg, msg


@linux_only
@pytest.mark.parametrize("variant", ["missing_rank1", "shape_rank1"])
def test_reinit_restarts_from_the_intact_entries(ckpt_runs, variant):
    """resume_world_size='reinit' with rank 1's entry missing, or failing to load on rank 1: rank 0's layers restart
    from its X, rank 1's from the checkpoint's weights; training goes on to the end."""
    ckpt = torch.load(ckpt_runs / "variants" / f"{variant}.ckpt", weights_only=False)
    X0 = _entries(ckpt)[0]["server"]["X"]
    assert X0 and len(X0) < len(ckpt["state_dict"])  # sharded: rank 0 serves some layers only
    for r in (0, 1):
        res = torch.load(ckpt_runs / f"after_crash_rank{r}.pt", weights_only=False)["reinit"][variant]
        assert len(res["warnings"]) == 1 and "rank(s) 1 were missing or damaged" in res["warnings"][0]
        assert res["start_step"] == 2 and res["global_step"] == 6
        for name, w in res["weights"].items():
            assert torch.equal(w, X0[name] if name in X0 else ckpt["state_dict"][name]), (r, name)


@linux_only
def test_resume_with_fewer_processes_errors_or_reinitialises_from_x(ckpt_runs):
    """The 2-process checkpoint resumed by 1 process: a ValueError naming the file by default; with 'reinit' the
    parameters restart at the checkpoint's server model X (not its W: the downlink is compressed) and the
    error-feedback estimates at zero."""
    res = torch.load(ckpt_runs / "reinit_one_rank0.pt", weights_only=False)
    path = str(ckpt_runs / "ckpt" / "latest.ckpt")
    assert "2 process(es)" in res["error"] and "resume_world_size='reinit'" in res["error"] and path in res["error"]
    ckpt = torch.load(path, weights_only=False)
    X = {k: v for e in _entries(ckpt) for k, v in e["server"]["X"].items()}
    assert X.keys() == res["start_weights"].keys()
    for name, w in res["start_weights"].items():
        assert torch.equal(w, X[name]), name
    assert any(not torch.equal(X[n], ckpt["state_dict"][n]) for n in X)  # X, not the checkpoint's W
    assert all(not t.any() for part in res["start_ef21"]["worker"].values() for t in part.values())
    assert len(res["warnings"]) == 1 and res["start_step"] == 2 and res["global_step"] == 6


# ------------------------------------------------------------------------------------------------ single process
class _Killed(BaseException):
    """Stands for the process dying in the middle of a write."""


def _dies_half_way(monkeypatch) -> None:
    """torch.save into a file writes half of the bytes, then 'the process dies'."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(f, io.BytesIO):
            return real(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        real(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise _Killed

    monkeypatch.setattr(torch, "save", save)


def test_atomic_save_replaces_the_file_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "state.pt"
    atomic_save({"v": torch.arange(4)}, path)
    assert torch.equal(torch.load(path)["v"], torch.arange(4))
    with monkeypatch.context() as m:
        _dies_half_way(m)
        with pytest.raises(_Killed):
            atomic_save({"v": torch.arange(1000)}, path)
    assert torch.equal(torch.load(path)["v"], torch.arange(4))  # the previous content, whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.pt"]  # the partial temporary file is gone
    atomic_save({"v": torch.arange(5)}, path)
    assert torch.equal(torch.load(path)["v"], torch.arange(5))
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert path.stat().st_mode == plain.stat().st_mode  # the permissions open() gives (umask applied)


def test_damage_tells_truncated_and_corrupted_files(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"w": torch.arange(1000, dtype=torch.float32)}, path)
    assert damage(path) is None and damage(tmp_path / "absent.pt") is None
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    assert "truncated" in damage(tmp_path / "cut.pt")
    flipped = bytearray(data)
    at = data.index(torch.arange(1000, dtype=torch.float32).numpy().tobytes()) + 100
    flipped[at] ^= 0xFF
    (tmp_path / "flip.pt").write_bytes(bytes(flipped))
    assert "CRC" in damage(tmp_path / "flip.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    assert damage(tmp_path / "empty.pt") == "empty file"


def test_strategy_writes_atomically_by_default_and_keeps_a_users_checkpoint_io(tmp_path):
    from lightning.pytorch import Trainer
    from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

    class Mine(TorchCheckpointIO):
        pass

    assert type(efl.EF21MuonStrategy().checkpoint_io) is AtomicCheckpointIO
    mine = Mine()
    assert efl.EF21MuonStrategy(checkpoint_io=mine).checkpoint_io is mine

    def strategy_of(**kw) -> efl.EF21MuonStrategy:
        return Trainer(strategy=efl.EF21MuonStrategy(), accelerator="cpu", devices=2, logger=False,
                       enable_progress_bar=False, default_root_dir=str(tmp_path), **kw).strategy

    assert type(strategy_of().checkpoint_io) is AtomicCheckpointIO
    assert strategy_of(plugins=[mine2 := Mine()]).checkpoint_io is mine2
    wrapped = strategy_of(plugins=[AsyncCheckpointIO()]).checkpoint_io
    assert isinstance(wrapped, AsyncCheckpointIO) and type(wrapped.checkpoint_io) is AtomicCheckpointIO
    kept = strategy_of(plugins=[AsyncCheckpointIO(mine3 := Mine())]).checkpoint_io
    assert kept.checkpoint_io is mine3


def test_atomic_checkpoint_io_writes_local_files_and_hands_urls_to_lightning(tmp_path):
    io_ = AtomicCheckpointIO()
    io_.save_checkpoint({"a": torch.ones(2)}, tmp_path / "a.ckpt")
    io_.save_checkpoint({"a": torch.ones(2)}, f"file://{tmp_path}/b.ckpt")
    for name in ("a.ckpt", "b.ckpt"):
        assert torch.equal(io_.load_checkpoint(tmp_path / name)["a"], torch.ones(2))
    io_.save_checkpoint({"a": torch.zeros(2)}, "memory://faults/c.ckpt")  # fsspec: Lightning's own writer
    assert torch.equal(io_.load_checkpoint("memory://faults/c.ckpt")["a"], torch.zeros(2))
    with pytest.raises(TypeError, match="storage_options"):
        io_.save_checkpoint({}, tmp_path / "d.ckpt", storage_options={"x": 1})


def test_strategy_load_checkpoint_names_rank_and_file_only_for_damaged_files(tmp_path):
    s = efl.EF21MuonStrategy()
    path = tmp_path / "cut.ckpt"
    torch.save({"state_dict": {"w": torch.ones(100)}}, tmp_path / "ok.ckpt")
    path.write_bytes((tmp_path / "ok.ckpt").read_bytes()[:300])
    with pytest.raises(ValueError, match=rf"^rank 0: checkpoint {re.escape(str(path))} cannot be read: truncated"):
        s.load_checkpoint(path)
    with pytest.raises(FileNotFoundError):  # any other error as it was
        s.load_checkpoint(tmp_path / "absent.ckpt")


# ------------------------------------------------------------------------------------------------ Accelerate
@pytest.fixture
def clean_accelerate():
    fresh_accelerator_state()
    yield
    fresh_accelerator_state()


def _acc_build(seed: int):
    from ef_lightning import build_lmo_optimizer
    from ef_lightning.accelerate import EF21Plugin

    accelerator = fresh_accelerator()
    model = make_model(seed)
    optimizer = build_lmo_optimizer(model, "muon", momentum=0.9, verbose=False)
    plugin = EF21Plugin(enabled=True, uplink="top_k:0.1", downlink="top_k:0.3")
    model, optimizer = plugin.prepare(accelerator, model, optimizer)
    return accelerator, model, optimizer, plugin


def _acc_train(accelerator, model, optimizer, lo: int, hi: int) -> None:
    data = make_data(1, 4)
    for s in range(lo, hi):
        accelerator.backward(mse(model, data[s][0]))
        optimizer.step()
        optimizer.zero_grad()


def _acc_snapshot(accelerator, model, plugin) -> dict[str, Any]:
    W = {n: p.detach().clone() for n, p in accelerator.unwrap_model(model).named_parameters()}
    return {"W": W, "ef21": plugin.engine.state_dict()}


def test_accelerate_crash_while_saving_keeps_the_previous_state_and_resume_is_bit_identical(
    tmp_path, monkeypatch, clean_accelerate
):
    torch.manual_seed(0)
    accelerator, model, optimizer, plugin = _acc_build(0)
    _acc_train(accelerator, model, optimizer, 0, 4)
    reference = _acc_snapshot(accelerator, model, plugin)

    ckpt = tmp_path / "ckpt"
    accelerator, model, optimizer, plugin = _acc_build(0)
    _acc_train(accelerator, model, optimizer, 0, 2)
    accelerator.save_state(str(ckpt))
    _acc_train(accelerator, model, optimizer, 2, 3)
    with monkeypatch.context() as m:
        _dies_half_way(m)
        with pytest.raises(_Killed):
            accelerator.save_state(str(ckpt))  # EF21's pre-hook writes first: the crash comes before Accelerate's
    assert torch.load(ckpt / "ef21_rank0.pt")["engine"]["step"] == 2
    assert not [p.name for p in ckpt.iterdir() if p.name.startswith(".")]

    accelerator, model, optimizer, plugin = _acc_build(7)
    accelerator.load_state(str(ckpt))
    _acc_train(accelerator, model, optimizer, 2, 4)
    _same(reference, _acc_snapshot(accelerator, model, plugin))


def test_accelerate_missing_or_damaged_ef21_file_names_rank_and_file(tmp_path, clean_accelerate):
    accelerator, model, optimizer, plugin = _acc_build(0)
    _acc_train(accelerator, model, optimizer, 0, 1)
    ckpt = tmp_path / "ckpt"
    accelerator.save_state(str(ckpt))
    good = (ckpt / "ef21_rank0.pt").read_bytes()
    path = re.escape(str(ckpt / "ef21_rank0.pt"))

    def fails(match: str) -> None:
        for load in (lambda: accelerator.load_state(str(ckpt)), lambda: plugin.load(ckpt)):
            with pytest.raises(ValueError, match=match):
                load()

    (ckpt / "ef21_rank0.pt").write_bytes(good[: len(good) // 2])
    fails(rf"^rank 0: {path} cannot be read: truncated.*resume from another checkpoint")
    torch.save([1, 2], ckpt / "ef21_rank0.pt")
    fails(rf"^rank 0: {path} holds no EF21 state")
    saved = torch.load(_write(ckpt / "ef21_rank0.pt", good))
    saved["engine"]["rank"] = 1
    torch.save(saved, ckpt / "ef21_rank0.pt")
    fails(rf"^rank 0: the EF21 state in {path} does not fit this run \(ValueError: .*rank=1")
    (ckpt / "ef21_rank0.pt").unlink()
    fails(rf"^rank 0: {path} does not exist .*every rank needs its own file")
    _write(ckpt / "ef21_rank0.pt", good)
    accelerator.load_state(str(ckpt))  # the intact file loads again


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
