"""Helpers for tests that start real torch.distributed processes (gloo, CPU) with torch.multiprocessing.

Scenario functions run in every child; results come back through files written with torch.save, so the parent
can compare them with an independent reference (the Simulator, plain data-parallel training).
"""

from __future__ import annotations

import hashlib

import datetime
import os
import socket
import subprocess
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable[..., Any], out_dir: str, kwargs: dict) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        result = fn(rank, world, **kwargs)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    except BaseException as e:  # the parent reads the error and re-raises it with the traceback
        torch.save({"__error__": repr(e), "type": type(e).__name__, "tb": traceback.format_exc()},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        try:
            dist.barrier()
            dist.destroy_process_group()
        except Exception:
            pass


def run_distributed(fn: Callable[..., Any], world: int, tmp_path: Path, **kwargs: Any) -> list[Any]:
    """Run ``fn(rank, world, **kwargs)`` in ``world`` gloo processes; return each rank's result (or error dict)."""
    out = Path(tmp_path) / f"dist_{fn.__name__}_{world}"
    out.mkdir(parents=True, exist_ok=True)
    files = [out / f"rank{r}.pt" for r in range(world)]
    try:
        mp.start_processes(_entry, args=(world, free_port(), fn, str(out), kwargs), nprocs=world, join=True,
                           start_method="spawn")
    except mp.ProcessExitedException:
        # gloo's teardown occasionally aborts a process at exit ("terminate called without an active exception")
        # after every rank has written its result; only a crash before that is a failure of the code under test.
        if not all(f.exists() for f in files):
            raise
    return [torch.load(f, weights_only=False) for f in files]


def check_ok(results: list[Any]) -> list[Any]:
    for r, res in enumerate(results):
        if isinstance(res, dict) and "__error__" in res:
            raise AssertionError(f"rank {r} failed: {res['tb']}")
    return results


# ----------------------------------------------------------------------------------------- shared test problem
def make_model(seed: int = 0) -> nn.Module:
    """A small MLP regression model (hidden matrices + biases + an output layer)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))


def make_data(n_workers: int, steps: int, batch: int = 16, seed: int = 1) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """data[step][worker] = (x, y): a fixed random teacher, each worker with its own shard."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(8, 4, generator=g)
    out = []
    for _ in range(steps):
        row = []
        for _ in range(n_workers):
            x = torch.randn(batch, 8, generator=g)
            row.append((x, torch.tanh(x @ teacher) + 0.01 * torch.randn(batch, 4, generator=g)))
        out.append(row)
    return out


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def grad_fn(data: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> Callable[[nn.Module, int, int], dict]:
    """Worker j's gradient at step k on its shard of ``data``, by parameter name (for ef_lightning.reference)."""
    def fn(model: nn.Module, k: int, j: int) -> dict:
        model.zero_grad(set_to_none=True)
        mse(model, data[k][j]).backward()
        return {name: q.grad.detach().clone() for name, q in model.named_parameters()}
    return fn


def simulate_nodes(cfg: dict, steps: int, nodes: int = 2, per_node: int = 2) -> tuple[Any, nn.Module]:
    """The reference of the hierarchical topology: a Simulator with one worker per node, fed the node's batches at
    once (MSE over the concatenation = the mean of its processes' gradients). Returns the Simulator and its model
    after ``steps``."""
    import ef_lightning as efl

    model = make_model(0)
    sim = efl.Simulator(model, make_optimizer(model), n_workers=nodes, **cfg)
    data = make_data(nodes * per_node, steps)
    for s in range(steps):
        batches = []
        for j in range(nodes):
            xs, ys = zip(*data[s][j * per_node:(j + 1) * per_node])
            batches.append((torch.cat(xs), torch.cat(ys)))
        sim.step(mse, batches)
    return sim, model


def make_optimizer(model: nn.Module, lr: float | None = None) -> torch.optim.Optimizer:
    from ef_lightning import build_lmo_optimizer

    # preset defaults (Scion lr 2**-12, radii 50 hidden / 3000 head); Newton-Schulz runs in float32 on CPU
    return build_lmo_optimizer(model, preset="gluon", lr=lr, momentum=0.9, verbose=False)


# ----------------------------------------------------------------------------------------- scenarios (run in children)
class CollectiveCounter:
    """Wraps torch.distributed collectives and records the bytes of the tensors each call is handed."""

    NAMES = ("all_gather_into_tensor", "all_to_all_single", "gather", "broadcast")

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.digests: list[str] = []  # sha1 of the bytes each call was handed (its input as sent)
        self._orig = {}

    def __enter__(self) -> "CollectiveCounter":
        for name in self.NAMES:
            orig = getattr(dist, name)
            self._orig[name] = orig

            def wrapped(*args, __name=name, __orig=orig, **kw):
                # input tensor: all_gather_into_tensor(out, inp), all_to_all_single(out, inp), gather(inp), broadcast(t)
                t = args[1] if __name in ("all_gather_into_tensor", "all_to_all_single") else args[0]
                self.calls.append((__name, t.numel() * t.element_size()))
                if __name == "broadcast" and kw.get("src", args[1] if len(args) > 1 else None) != dist.get_rank():
                    self.digests.append("received")  # a receiver's broadcast tensor is its (unfilled) output
                else:
                    data = t.detach().cpu().contiguous().view(torch.uint8).numpy()
                    self.digests.append(hashlib.sha1(data).hexdigest())
                return __orig(*args, **kw)

            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, orig in self._orig.items():
            setattr(dist, name, orig)


def _state_snapshot(model: nn.Module, engine: Any) -> dict[str, Any]:
    return {
        "X": engine.server_model(),
        "W": {n: p.detach().clone() for n, p in model.named_parameters()},
        "served": [L.name for L in engine.served],
        "ledger": engine.ledger.summary(),
        "records": [r.__dict__.copy() for r in engine.ledger.records],
    }


def engine_run(rank: int, world: int, configs: list[dict], steps: int, lr: float | None = None) -> dict[str, Any]:
    """Train the test MLP with EF21Engine for each config; return X, W, ledger, collective bytes, NS calls."""
    from ef_lightning import EF21Engine, lmo

    out = {}
    for cfg in configs:
        key = repr(sorted(cfg.items()))
        cfg = dict(cfg)
        n_steps = cfg.pop("_steps", steps)
        from ef_lightning import comm

        comm.PIECE_BYTES = cfg.pop("_piece_bytes", 64 << 10)  # small pieces: the multi-piece collectives run too
        model = make_model(0)
        opt = make_optimizer(model, lr)
        data = make_data(world, n_steps)
        ns_calls = []
        orig_ns = lmo.newton_schulz
        lmo.newton_schulz = lambda G, *a, **k: (ns_calls.append(tuple(G.shape)), orig_ns(G, *a, **k))[1]
        try:
            eng = EF21Engine(model, opt, **cfg)
            with CollectiveCounter() as counter:
                losses = []
                for s in range(n_steps):
                    opt.zero_grad(set_to_none=True)
                    loss = mse(model, data[s][rank])
                    loss.backward()
                    losses.append(loss.item())
                    eng.step()
        finally:
            lmo.newton_schulz = orig_ns
        res = _state_snapshot(model, eng)
        res["collectives"] = counter.calls
        res["digests"] = counter.digests
        res["ns_calls"] = len(ns_calls)
        res["losses"] = losses
        out[key] = res
    return out


def engine_resume(rank: int, world: int, cfg: dict, steps: int, split: int) -> dict[str, Any]:
    """Uninterrupted run vs. save at ``split`` + fresh process objects + load + continue."""
    from ef_lightning import EF21Engine

    data = make_data(world, steps)

    def train(model, opt, eng, lo, hi):
        for s in range(lo, hi):
            opt.zero_grad(set_to_none=True)
            mse(model, data[s][rank]).backward()
            eng.step()

    model = make_model(0); opt = make_optimizer(model); eng = EF21Engine(model, opt, **cfg)
    train(model, opt, eng, 0, steps)
    full = _state_snapshot(model, eng)

    model = make_model(0); opt = make_optimizer(model); eng = EF21Engine(model, opt, **cfg)
    train(model, opt, eng, 0, split)
    saved = {"model": {k: v.clone() for k, v in model.state_dict().items()},
             "opt": opt.state_dict(), "ef21": eng.state_dict()}
    torch.manual_seed(123)  # a fresh start must not depend on RNG state
    model = make_model(7); opt = make_optimizer(model); eng = EF21Engine(model, opt, sync_initial=False, **cfg)
    model.load_state_dict(saved["model"]); opt.load_state_dict(saved["opt"]); eng.load_state_dict(saved["ef21"])
    train(model, opt, eng, split, steps)
    return {"full": full, "resumed": _state_snapshot(model, eng)}


def engine_nan(rank: int, world: int, cfg: dict, steps: int, bad_step: int, bad_rank: int,
               in_backward: bool = False) -> dict[str, Any]:
    """Inject NaN into one rank's gradient at ``bad_step`` (after backward, or ``in_backward`` through the loss, so
    overlapped buckets are sent before anyone knows); report state before/after and the ledger."""
    import warnings

    from ef_lightning import EF21Engine

    model = make_model(0); opt = make_optimizer(model); eng = EF21Engine(model, opt, **cfg)
    data = make_data(world, steps)
    before = after = None
    warned = []
    for s in range(steps):
        opt.zero_grad(set_to_none=True)
        if s == bad_step:
            before = ({k: v.clone() for k, v in model.state_dict().items()}, eng.state_dict())
        loss = mse(model, data[s][rank])
        if s == bad_step and rank == bad_rank and in_backward:
            loss = loss * float("nan")
        loss.backward()
        if s == bad_step:
            if rank == bad_rank and not in_backward:
                next(model.parameters()).grad[0, 0] = float("nan")
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                applied = eng.step()
            warned = [str(x.message) for x in w]
            after = ({k: v.clone() for k, v in model.state_dict().items()}, eng.state_dict())
        else:
            eng.step()
    return {"before": before, "after": after, "applied": applied, "warned": warned,
            "ledger": eng.ledger.summary(), "loss": float(mse(model, data[-1][rank]))}


def engine_mismatch(rank: int, world: int) -> dict[str, Any]:
    """Ranks disagree on the uplink spec: construction must raise on every rank."""
    import time

    from ef_lightning import EF21Engine

    model = make_model(0); opt = make_optimizer(model)
    t0 = time.monotonic()
    try:
        EF21Engine(model, opt, uplink="top_k:0.1" if rank == 0 else "top_k:0.2", topology="sharded")
    except ValueError as e:
        return {"error": str(e), "seconds": time.monotonic() - t0}
    return {"error": None, "seconds": time.monotonic() - t0}


def engine_vr_run(rank: int, world: int, configs: list[dict], steps: int) -> dict[str, Any]:
    """Variance-reduced estimators / partial participation with EF21Engine.step(closure)."""
    from ef_lightning import EF21Engine

    out = {}
    for cfg in configs:
        model = make_model(0)
        opt = make_optimizer(model)
        data = make_data(world, steps)
        eng = EF21Engine(model, opt, **cfg)
        for s in range(steps):
            batch = data[s][rank]

            def closure(batch=batch):
                opt.zero_grad(set_to_none=True)
                loss = mse(model, batch)
                loss.backward()
                return loss

            closure()
            eng.step(closure if eng.needs_previous_gradient else None)
        out[repr(sorted(cfg.items()))] = {**_state_snapshot(model, eng)}
    return out


def engine_overlap(rank: int, world: int, steps: int) -> dict[str, Any]:
    """The same training with and without overlap (tiny buckets: one per layer), and with gradient clipping between
    backward and step; records the order of uplink collectives and the first layer's gradient in each backward."""
    import warnings

    from ef_lightning import EF21Engine

    out = {}
    data = make_data(world, steps)
    for overlap in (True, False):
        for clip in (False, True):
            model = make_model(0)
            opt = make_optimizer(model)
            eng = EF21Engine(model, opt, topology="sharded", uplink="top_k:0.25", downlink="top_k:0.5",
                             overlap=overlap, bucket_cap_mb=1e-4)
            events: list[str] = []
            first = next(model.parameters())  # the first layer's weight: among the last gradients of a backward
            first.register_post_accumulate_grad_hook(lambda p: events.append("first-layer-grad"))
            orig = dist.all_to_all_single

            def wrapped(*a, __orig=orig, **k):
                events.append("uplink")
                return __orig(*a, **k)

            dist.all_to_all_single = wrapped
            try:
                with warnings.catch_warnings(record=True) as w:
                    warnings.simplefilter("always")
                    mid_equal = None
                    for s in range(steps):
                        events.append("step")
                        opt.zero_grad(set_to_none=True)
                        before = eng.state_dict() if s == 1 else None
                        mse(model, data[s][rank]).backward()
                        events.append("backward-done")
                        if before is not None:  # buckets are in flight: the committed state has not moved
                            mid = eng.state_dict()
                            mid_equal = all(torch.equal(v, mid["worker"][k][n]) for k in ("M", "G")
                                            for n, v in before["worker"][k].items())
                        if clip:
                            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
                        opt.step()
            finally:
                dist.all_to_all_single = orig
            res = _state_snapshot(model, eng)
            res.update(events=events, n_buckets=eng.n_buckets, overlapping=eng.overlapping, resynced=eng.resynced,
                       timing=eng.ledger.overlap(), warned=[str(x.message) for x in w], mid_equal=mid_equal,
                       first_uplink_bytes=eng.ledger.records[0].uplink_wire_bytes)
            out[repr((overlap, clip))] = res
    return out


def engine_hierarchical(rank: int, world: int, cfg: dict, steps: int, local_world_size: int,
                        split: int | None = None) -> dict[str, Any]:
    """``topology="hierarchical"`` with ``local_world_size`` processes per node, next to plain DDP with the same LMO
    optimizer on a copy of the model (the reference for identity compressors). With ``split``, a second run saves
    the EF21 state at step ``split``, rebuilds model/optimizer/engine from it and continues (resume)."""
    from torch.nn.parallel import DistributedDataParallel

    from ef_lightning import EF21Engine

    data = make_data(world, steps)

    def train(model, opt, eng, lo, hi):
        _train_steps(model, opt, eng, data, rank, lo, hi)

    model = make_model(0)
    opt = make_optimizer(model)
    eng = EF21Engine(model, opt, topology="hierarchical", local_world_size=local_world_size, **cfg)
    with CollectiveCounter() as counter:
        train(model, opt, eng, 0, steps)
    res = _state_snapshot(model, eng)  # X gathered from every node and share
    res["collectives"] = counter.calls
    res["share"] = [L.name for L in eng.layers]
    ref = make_model(0)
    ddp = DistributedDataParallel(ref)
    ref_opt = make_optimizer(ref)
    for s in range(steps):
        ref_opt.zero_grad(set_to_none=True)
        mse(ddp, data[s][rank]).backward()
        ref_opt.step()
    res["ddp"] = {k: v.detach().clone() for k, v in ref.named_parameters()}
    if split is not None:
        model = make_model(0)
        opt = make_optimizer(model)
        eng = EF21Engine(model, opt, topology="hierarchical", local_world_size=local_world_size, **cfg)
        train(model, opt, eng, 0, split)
        saved = {"ef21": eng.state_dict(), "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
                 "opt": opt.state_dict()}
        eng.detach()
        model = make_model(5)  # different initial values: everything must come from the checkpoint
        model.load_state_dict(saved["model"])
        opt = make_optimizer(model)
        opt.load_state_dict(saved["opt"])
        eng = EF21Engine(model, opt, topology="hierarchical", local_world_size=local_world_size,
                         sync_initial=False, **cfg)
        eng.load_state_dict(saved["ef21"])
        train(model, opt, eng, split, steps)
        res["resumed"] = _state_snapshot(model, eng)
    return res


# ----------------------------------------------------------------------------------------- FSDP2 (sharded parameters)
def counting_batch(step: int, rank: int, n: int = 8, length: int = 12, vocab: int = 64) -> torch.Tensor:
    """Token sequences that count up from a random start (mod vocab): a language a tiny model learns in a few steps."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    return (start + torch.arange(length)) % vocab


def engine_fsdp(rank: int, world: int, local_world_size: int, steps: int, configs: list[dict]) -> dict[str, Any]:
    """A 2-layer Llama sharded with FSDP2 inside each node of ``local_world_size`` processes. Reference: HSDP (the
    same shards, FSDP2's own all-reduce across nodes) with the same optimizer; then EF21 across nodes on the local
    shards (``topology="hierarchical"``) for each config. Returns full parameters and losses of every run."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    from ef_lightning import EF21Engine, build_lmo_optimizer

    mesh = init_device_mesh("cpu", (world // local_world_size, local_world_size), mesh_dim_names=("replicate", "shard"))

    def build(on):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=2))
        for layer in model.model.layers:
            fully_shard(layer, mesh=on)
        fully_shard(model, mesh=on)
        return model, build_lmo_optimizer(model, preset="muon", lr=0.02, momentum=0.9, verbose=False)

    def train(model, opt, step):
        losses = []
        for s in range(steps):
            opt.zero_grad(set_to_none=True)
            ids = counting_batch(s, rank)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            losses.append(loss.item())
            step()
        return losses

    def full(model):
        return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}

    model, opt = build(mesh)  # HSDP: 2-D mesh, replicate x shard
    res: dict[str, Any] = {"hsdp": {"losses": train(model, opt, opt.step), "W": full(model)}}
    from ef_lightning import lmo

    for cfg in configs:
        model, opt = build(mesh["shard"])
        eng = EF21Engine(model, opt, topology="hierarchical", local_world_size=local_world_size, **cfg)
        ns_shapes = []  # what Newton-Schulz ran on: whole matrices (gathered once), on the layer's owner node only
        orig_ns = lmo.newton_schulz
        lmo.newton_schulz = lambda G, *a, **k: (ns_shapes.append(tuple(G.shape)), orig_ns(G, *a, **k))[1]
        try:
            losses = train(model, opt, eng.step)
        finally:
            lmo.newton_schulz = orig_ns
        res[repr(sorted(cfg.items()))] = {"losses": losses, "W": full(model), "ledger": eng.ledger.summary(),
                                          "shard_shapes": {L.name: tuple(L.shape) for L in eng.layers},
                                          "served": [L.name for L in eng.served], "ns_shapes": ns_shapes}
    return res


def group_timeout(rank: int, world: int) -> Any:
    """What ef_lightning.comm._group_timeout reads from WORLD (created by _entry with a 60 s timeout)."""
    from ef_lightning.comm import _group_timeout

    return _group_timeout(None)


# ----------------------------------------------------------------------------------------- several "nodes" on one machine
def run_nodes(script: list[str], out, nodes: int, env_extra: dict | None = None) -> None:
    """Run ``script`` once per node (NODE_RANK), each starting its own local processes, as on a real cluster."""
    import sys

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), **(env_extra or {})}
    run_many([[sys.executable, *script] for _ in range(nodes)], env, per_node_env=True)


def run_many(commands: list[list[str]], env_extra: dict, per_node_env: bool = False, timeout: int = 600) -> None:
    """Start one command per node at once (``NODE_RANK`` = its index when ``per_node_env``); all must exit 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **env_extra}
    procs = [subprocess.Popen(cmd, env={**env, **({"NODE_RANK": str(n)} if per_node_env else {})},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n, cmd in enumerate(commands)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            p.kill()
    bad = [(n, p.returncode) for n, p in enumerate(procs) if p.returncode != 0]
    if bad:
        raise AssertionError(f"node runs failed {bad}:\n" + "\n".join(log[-4000:] for log in logs))


def untimed(records: list[dict]) -> list[dict]:
    """Ledger records without their wall-clock fields (which no two runs share)."""
    return [{k: v for k, v in x.items() if not k.endswith("seconds")} for x in records]


def engine_layout_mismatch(rank: int, world: int) -> Any:
    """Processes that disagree on local_world_size (rank 0 says 1, the others 2)."""
    from ef_lightning import EF21Engine

    model = make_model(0)
    EF21Engine(model, make_optimizer(model), topology="hierarchical", local_world_size=1 if rank == 0 else 2)


def _train_steps(model: nn.Module, opt: torch.optim.Optimizer, eng: Any, data: list, rank: int, lo: int,
                 hi: int) -> None:
    """Steps ``lo`` to ``hi`` of the test problem on this rank's shard, EF21 step by ``eng.step()``."""
    for s in range(lo, hi):
        opt.zero_grad(set_to_none=True)
        mse(model, data[s][rank]).backward()
        eng.step()
