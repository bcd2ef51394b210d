"""Compute overhead of compression, peak memory, and training-state bytes of EF21-Muon vs DDP + the same optimizer.

On loopback (2 gloo processes, 1 thread each) communication is nearly free, so the step-time difference between a
compressed and the uncompressed EF21-Muon step is the compute cost of compress + pack + decode (plus the LMO, which
both run). All methods live in the same two processes and are timed **interleaved**: each round runs
``--block`` steps of every method in turn, for ``--rounds`` rounds; the reported time is the median over all timed
steps (the first round is warm-up and dropped), and ratios are taken within this one run (docs/benchmarks.md).

Two models (``--models``):

- ``benchmark``: the byte-level Llama of ``common.py`` (0.34 M parameters), every method of ``METHODS``.
- ``gpt2_124m``: the paper's model size, a GPT-2 small built from ``transformers.GPT2Config()``'s defaults (124 M
  parameters, n_embd 768, 12 layers, 12 heads, vocab 50257, tied head; random init, nothing downloaded) on
  ``--gpt2-batch`` x ``--gpt2-seq`` random token ids. Timing only, three methods: uncompressed EF21-Muon sharded
  (the reference), the package's default setting (``EF21Config()``) and DDP + the same LMO optimizer, one step each
  per round, ``--gpt2-warmup`` warm-up rounds then ``--gpt2-steps`` timed rounds. To fit 2 processes in memory the
  three methods share one model per process (each has its own optimizer, engine or DDP wrapper, and state).
  ``--smoke`` replaces it by a tiny GPT-2 labelled ``gpt2_smoke``. On 2 shared cores a 124M step takes ~20-60 s,
  almost all of it the LMO's Newton-Schulz (fp32 on CPU); fwd+bwd alone ~3 s.

The package's default setting (uplink, downlink, topology of ``EF21Config()``) is read at run time, never written
here; every record says whether it is that setting (``default``). Records: ``runs`` (one per model and method,
``model``, ``default``, ``overhead_vs_uncompressed`` as a fraction: 0.12 = +12 %), ``meta`` (per-model details under
``meta["models"]``). Running a subset of ``--models`` keeps the other models' records of an existing output file.

Peak RSS per process (benchmark model): every method again in a fresh pair of processes (a few steps), ``ru_maxrss``
of each rank, beside the floor (imports, data and one model, measured in the timing processes). State bytes:
optimizer state + EF21 state (M_j, G_j, and the served X, G) per rank, against DDP + the same LMO optimizer (its
momentum + DDP's fp32 gradient buckets).

    nice -n 10 timeout 1800 python benchmarks/overhead.py                              # ~12-15 min on 2 cores
    nice -n 10 timeout 900 python benchmarks/overhead.py --models gpt2_124m            # ~8 min, 2 x 8.5 GB RSS
    python benchmarks/overhead.py --smoke                                               # seconds
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore", r".*before `optimizer.step\(\)`.*")

import common as C  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ef_lightning.config import EF21Config  # noqa: E402


def ef21(topology: str, up: str, down: str = "identity") -> dict[str, Any]:
    return {"kind": "ef21", "topology": topology, "uplink": up, "downlink": down, "optimizer": "lmo"}


def default_method() -> dict[str, Any]:
    """The package's default setting, read from ``EF21Config()`` now (the defaults may change): its matrix
    compressors, expanded by ``common.role_spec`` (vectors dense) as every benchmark does; ``common.is_default``
    checks that this is exactly the default."""
    return ef21(C.package_defaults()["topology"], C.default_matrix_spec("uplink"), C.default_matrix_spec("downlink"))


def with_default(methods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``methods`` with the default setting second (after the reference), unless it is already listed."""
    if any(C.is_default(m) for m in methods):
        return methods
    return [*methods[:1], default_method(), *methods[1:]]


DDP_LMO = {"kind": "ddp", "optimizer": "lmo", "psgd_rank": None, "uplink": "dense_fp32", "downlink": "identity"}
UNCOMPRESSED = ef21("sharded", "identity")  # the uncompressed path: the reference of the ratios
METHODS = with_default(
    [
        UNCOMPRESSED,
        ef21("sharded", "top_k:0.1", "top_k:0.5"),
        ef21("sharded", "top_k:0.05"),
        ef21("sharded", "rank:4"),
        ef21("sharded", "natural"),
        ef21("sharded", "top_k:0.1+natural", "top_k:0.5"),
        ef21("allgather", "identity"),
        ef21("allgather", "top_k:0.1"),
        DDP_LMO,
    ]
)
GPT2_METHODS = with_default([UNCOMPRESSED, DDP_LMO])
# the paper's size: GPT2Config() defaults; the smoke size: a tiny GPT-2 with the same code path
GPT2_SIZES: dict[str, dict[str, int]] = {
    "gpt2_124m": {},
    "gpt2_smoke": {"n_embd": 64, "n_layer": 2, "n_head": 2, "vocab_size": 1024, "n_positions": 128},
}
MODELS = ("benchmark", "gpt2_124m")


# ------------------------------------------------------------------------------------------------ benchmark model
def timing(
    rank: int, world: int, methods: list[dict[str, Any]], task: C.Task, rounds: int, block: int
) -> dict[str, Any]:
    import torch.distributed as dist

    data = C.Data(task)
    C.build_model(task)
    floor = C.peak_rss_mb()  # interpreter + torch + transformers + data + one model: the floor every method pays
    runners = [C.Runner(m, task) for m in methods]
    times: dict[str, list[float]] = {C.label(m): [] for m in methods}
    fwd_bwd: list[float] = []
    step = 0
    for rnd in tqdm(range(rounds), desc="rounds", disable=rank != 0, mininterval=10):
        for m, r in zip(methods, runners):
            for _ in range(block):
                b = data.batch(step, rank, world)
                step += 1
                dist.barrier()
                t0 = time.perf_counter()
                r.step(b)
                dt = time.perf_counter() - t0
                if rnd > 0:
                    times[C.label(m)].append(dt)
        # forward + backward only (no optimizer, no communication): the compute floor of every method
        r = runners[-1]
        for _ in range(block):
            b = data.batch(step, rank, world)
            step += 1
            dist.barrier()
            t0 = time.perf_counter()
            r.opt.zero_grad(set_to_none=True)
            with r.ddp.no_sync() if r.ddp is not None else torch.enable_grad():
                C.lm_loss(r.module, b).backward()
            if rnd > 0:
                fwd_bwd.append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    t = torch.tensor([*med.values(), statistics.median(fwd_bwd)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slower rank decides
    state = {C.label(m): r.state_bytes() for m, r in zip(methods, runners)}
    return {
        "median_step_seconds": dict(zip(med, t[:-1].tolist())),
        "fwd_bwd_seconds": float(t[-1]),
        "n_timed_steps": {k: len(v) for k, v in times.items()},
        "state_bytes": state,
        "floor_rss_mb": floor,
    }


def memory(rank: int, world: int, method: dict[str, Any], task: C.Task, steps: int) -> dict[str, Any]:
    data = C.Data(task)
    r = C.Runner(method, task)
    for s in range(steps):
        r.step(data.batch(s, rank, world))
    return {"peak_rss_mb": C.peak_rss_mb(), "state_bytes": r.state_bytes()}


# ------------------------------------------------------------------------------------------------ GPT-2
def build_gpt2(size: str, seed: int) -> torch.nn.Module:
    """GPT-2 from ``GPT2Config(**GPT2_SIZES[size])`` (no download), random init from ``seed``, dropout off."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    cfg = GPT2Config(**GPT2_SIZES[size], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg)


class SharedRunner:
    """One method on a model that the other methods of the process share (one copy of the 124 M weights, not one
    per method): its own LMO optimizer (gluon preset) and EF21Engine (``optimizer.step()`` is the EF21 step) or
    DDP wrapper. Only the stepping method may see a backward: the other engines' gradient hooks (``overlap``) are
    blocked with their ``no_sync()`` (``others``), and a backward through the bare model does not trigger DDP's
    reducer (it only expects gradients after a forward through the wrapper)."""

    def __init__(self, spec: dict[str, Any], model: torch.nn.Module, seed: int) -> None:
        import ef_lightning as efl

        self.spec, self.model = spec, model
        self.opt = efl.build_lmo_optimizer(model, preset="gluon", verbose=False)
        self.engine = self.ddp = None
        self.others: list[SharedRunner] = []  # the methods sharing the model (set once all are built)
        if spec["kind"] == "ef21":
            cfg = EF21Config(
                uplink=C.role_spec(spec["uplink"]),
                downlink=C.role_spec(spec["downlink"]),
                topology=spec["topology"],
                seed=seed,
            )
            self.engine = efl.EF21Engine(model, self.opt, cfg)
            self.module: torch.nn.Module = model
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp = DDP(model)
            self.module = self.ddp

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        self.opt.zero_grad(set_to_none=True)
        with blocked(self.others):
            loss = C.lm_loss(self.module, batch)
            loss.backward()
        self.opt.step()  # with an engine: the EF21 step (compress, exchange, LMO at the server, downlink)
        return float(loss.detach())

    def state_bytes(self) -> dict[str, int]:
        """As ``common.Runner.state_bytes``: optimizer state, EF21 state (M_j, G_j, X, G) or DDP's buckets."""

        def nbytes(ts: Any) -> int:
            return sum(t.numel() * t.element_size() for t in ts if torch.is_tensor(t))

        out = {"optimizer": nbytes(t for s in self.opt.state.values() for t in s.values())}
        if self.engine is not None:
            w, s = self.engine.worker, self.engine.server
            out.update(
                ef21_worker_M=nbytes(w.M.values()),
                ef21_worker_G=nbytes(w.G.values()),
                ef21_server_X=nbytes(s.X.values()),
                ef21_server_G=nbytes(s.G.values()),
            )
        else:
            out["ddp_buckets"] = C.fp32_bytes(self.model)
        out["total"] = sum(out.values())
        return out


@contextlib.contextmanager
def blocked(runners: list[SharedRunner]) -> Iterator[None]:
    """The runners' EF21 engines ignore the backward passes inside the block (``EF21Engine.no_sync``, where the
    engine has one: without it an engine that overlaps its uplink with backward would send on every method's
    backward and resync at its own step)."""
    with contextlib.ExitStack() as stack:
        for r in runners:
            if r.engine is not None and hasattr(r.engine, "no_sync"):
                stack.enter_context(r.engine.no_sync())
        yield


def gpt2_timing(
    rank: int,
    world: int,
    methods: list[dict[str, Any]],
    size: str,
    seed: int,
    batch: int,
    seq: int,
    warmup: int,
    steps: int,
) -> dict[str, Any]:
    """``warmup`` + ``steps`` rounds; each round one step of every method in turn, then one fwd+bwd only."""
    import torch.distributed as dist

    t_build = time.perf_counter()
    model = build_gpt2(size, seed)
    model.train()
    floor = C.peak_rss_mb()
    runners = [SharedRunner(m, model, seed) for m in methods]
    for r in runners:
        r.others = [o for o in runners if o is not r]
    build_s = time.perf_counter() - t_build
    gen = torch.Generator().manual_seed(10_000 * (seed + 1) + rank)  # each rank its own random token ids
    vocab = model.config.vocab_size

    def next_batch() -> dict[str, torch.Tensor]:
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)
        return {"input_ids": ids, "labels": ids}

    times: dict[str, list[float]] = {C.label(m): [] for m in methods}
    losses: dict[str, list[float]] = {C.label(m): [] for m in methods}
    fwd_bwd: list[float] = []
    if rank == 0:
        print(f"{size}: model and {len(runners)} methods built in {build_s:.0f} s", flush=True)
    every: list[dict[str, float]] = []  # rank 0's seconds of every round, warm-up included (printed as it goes)
    for rnd in range(warmup + steps):
        t_round = time.perf_counter()
        every.append({})
        for m, r in zip(methods, runners):
            b = next_batch()
            dist.barrier()
            t0 = time.perf_counter()
            losses[C.label(m)].append(r.step(b))
            every[-1][C.label(m)] = dt = time.perf_counter() - t0
            if rnd >= warmup:
                times[C.label(m)].append(dt)
        b = next_batch()
        dist.barrier()
        t0 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        with blocked(runners):
            C.lm_loss(model, b).backward()
        every[-1]["fwd_bwd"] = dt = time.perf_counter() - t0
        if rnd >= warmup:
            fwd_bwd.append(dt)
        if rank == 0:
            kind = "warm-up" if rnd < warmup else "timed"
            print(
                f"{size} round {rnd + 1}/{warmup + steps} ({kind}, {time.perf_counter() - t_round:.0f} s): "
                + ", ".join(f"{k} {v:.2f} s" for k, v in every[-1].items()),
                flush=True,
            )
    model.zero_grad(set_to_none=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    t = torch.tensor([*med.values(), statistics.median(fwd_bwd)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slower rank decides
    skipped = {
        C.label(m): r.engine.ledger.summary().get("skipped_steps") if r.engine is not None else None
        for m, r in zip(methods, runners)
    }
    return {
        "median_step_seconds": dict(zip(med, t[:-1].tolist())),
        "fwd_bwd_seconds": float(t[-1]),
        "n_timed_steps": {k: len(v) for k, v in times.items()},
        "step_seconds": times,
        "fwd_bwd_all_seconds": fwd_bwd,
        "every_round_seconds": every,
        "losses": losses,
        "skipped": skipped,
        "state_bytes": {C.label(m): r.state_bytes() for m, r in zip(methods, runners)},
        "floor_rss_mb": floor,
        "peak_rss_mb": C.peak_rss_mb(),
        "params": C.n_params(model),
        "build_seconds": build_s,
    }


# ------------------------------------------------------------------------------------------------ records
def records(
    model: str, methods: list[dict[str, Any]], tim: dict[str, Any], mem: dict[str, list[dict[str, Any]]], seed: int
) -> list[dict[str, Any]]:
    """One record per method; ratios within this model's run (reference: the first method)."""
    ref, ddp = C.label(methods[0]), C.label(DDP_LMO)
    t_ref, t_ddp = tim["median_step_seconds"][ref], tim["median_step_seconds"][ddp]
    rows = []
    for m in methods:
        lab = C.label(m)
        t = tim["median_step_seconds"][lab]
        st = [x["state_bytes"] for x in mem[lab]]
        rows.append(
            {
                "method": C.method_name(m),
                "label": lab,
                "model": model,
                "default": C.is_default(m),
                "topology": m.get("topology"),
                "uplink": m["uplink"],
                "downlink": m["downlink"],
                "median_step_seconds": t,
                "fwd_bwd_seconds": tim["fwd_bwd_seconds"],
                "overhead_vs_uncompressed": t / t_ref - 1,
                "ratio_vs_ddp_lmo": t / t_ddp,
                "sync_seconds": t - tim["fwd_bwd_seconds"],
                "peak_rss_mb_per_rank": [x["peak_rss_mb"] for x in mem[lab]],
                "state_bytes_per_rank": st,
                "state_bytes_total": sum(x["total"] for x in st),
                "state_bytes_rank0": tim["state_bytes"][lab],
                "n_timed_steps": tim["n_timed_steps"][lab],
                "seed": seed,
            }
        )
    ddp_state = next(r["state_bytes_total"] for r in rows if r["label"] == ddp)
    for r in rows:
        r["state_vs_ddp_lmo"] = r["state_bytes_total"] / ddp_state
    return rows


def run_benchmark(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    task = dataclasses.replace(C.SMOKE if args.smoke else C.Task(steps=300), seed=args.seed)
    rounds = args.rounds or (2 if args.smoke else 8)
    block = args.block or (2 if args.smoke else 5)
    mem_steps = args.mem_steps or (2 if args.smoke else 10)
    methods = [UNCOMPRESSED, *[m for m in METHODS if C.is_default(m)], DDP_LMO] if args.smoke else METHODS
    t0 = time.perf_counter()
    print(
        f"benchmark model: task {task} | seed {args.seed} | {rounds} rounds x {block} steps per method, "
        f"interleaved | 2 gloo processes on loopback, 1 thread each",
        flush=True,
    )
    tim = C.run_processes(timing, 2, C.TMP / "overhead", methods=methods, task=task, rounds=rounds, block=block)[0]
    mem = {}
    # smoke: only the floor gets its own processes; methods share (RSS is then not per method, see meta)
    for m in tqdm([] if args.smoke else methods, desc="memory", mininterval=10):
        mem[C.label(m)] = C.run_processes(memory, 2, C.TMP / "overhead", method=m, task=task, steps=mem_steps)
    if args.smoke:
        for m in methods:
            mem[C.label(m)] = [{"peak_rss_mb": None, "state_bytes": tim["state_bytes"][C.label(m)]}] * 2
    meta = {
        "task": dataclasses.asdict(task),
        "params": C.n_params(C.build_model(task)),
        "rounds": rounds,
        "block": block,
        "floor_peak_rss_mb_rank0": tim["floor_rss_mb"],
        "rss_note": "smoke: methods share processes, per-method RSS not measured"
        if args.smoke
        else "each method in a fresh pair of processes; floor = timing process after imports, data and one model",
        "reference": C.label(methods[0]),
        "seconds": time.perf_counter() - t0,
    }
    return records("benchmark", methods, tim, mem, args.seed), meta


def run_gpt2(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    size = "gpt2_smoke" if args.smoke else "gpt2_124m"
    warmup = args.gpt2_warmup if args.gpt2_warmup is not None else 1
    steps = args.gpt2_steps or (2 if args.smoke else 3)
    seq = args.gpt2_seq or (32 if args.smoke else 128)
    t0 = time.perf_counter()
    print(
        f"{size}: GPT2Config({GPT2_SIZES[size]}) | batch {args.gpt2_batch} x {seq} random token ids per rank | "
        f"{warmup} warm-up + {steps} timed rounds, one step per method per round, interleaved | 2 gloo processes "
        f"on loopback, 1 thread each, one shared model per process",
        flush=True,
    )
    res = C.run_processes(
        gpt2_timing,
        2,
        C.TMP / "overhead_gpt2",
        methods=GPT2_METHODS,
        size=size,
        seed=args.seed,
        batch=args.gpt2_batch,
        seq=seq,
        warmup=warmup,
        steps=steps,
    )
    tim = res[0]
    mem = {
        C.label(m): [{"peak_rss_mb": None, "state_bytes": x["state_bytes"][C.label(m)]} for x in res]
        for m in GPT2_METHODS
    }
    meta = {
        "size": size,
        "config": {"GPT2Config": GPT2_SIZES[size], "dropout": 0.0, "tied_head": True},
        "params": tim["params"],
        "batch": args.gpt2_batch,
        "seq": seq,
        "warmup_rounds": warmup,
        "timed_rounds": steps,
        "data": "uniform random token ids (timing only; the loss is not a result)",
        "smoke_size": args.smoke,
        "reference": C.label(GPT2_METHODS[0]),
        "floor_peak_rss_mb_per_rank": [x["floor_rss_mb"] for x in res],
        "peak_rss_mb_per_rank": [x["peak_rss_mb"] for x in res],
        "rss_note": "the methods share one model and the processes: peak RSS is of all methods together",
        "step_seconds_rank0": tim["step_seconds"],
        "fwd_bwd_seconds_rank0": tim["fwd_bwd_all_seconds"],
        "every_round_seconds_rank0": tim["every_round_seconds"],
        "train_losses_rank0": tim["losses"],
        "skipped_steps": tim["skipped"],
        "build_seconds_rank0": tim["build_seconds"],
        "seconds": time.perf_counter() - t0,
    }
    return records(size, GPT2_METHODS, tim, mem, args.seed), meta


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--models",
        default=",".join(MODELS),
        help=f"comma-separated subset of {', '.join(MODELS)} (default: both; smoke: gpt2_124m is the tiny gpt2_smoke)",
    )
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (first is warm-up; default 8)")
    p.add_argument("--block", type=int, default=None, help="steps per method per round (default 5)")
    p.add_argument("--mem-steps", type=int, default=None, help="steps per memory measurement (default 10)")
    p.add_argument("--gpt2-steps", type=int, default=None, help="GPT-2 timed rounds (default 3; smoke 2)")
    p.add_argument("--gpt2-warmup", type=int, default=None, help="GPT-2 warm-up rounds (default 1)")
    p.add_argument("--gpt2-seq", type=int, default=None, help="GPT-2 tokens per sequence (default 128; smoke 32)")
    p.add_argument("--gpt2-batch", type=int, default=1, help="GPT-2 sequences per rank per step (default 1)")
    p.add_argument("--out", default=str(C.RESULTS))
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad or not models:
        p.error(f"--models {args.models!r}: valid models are {', '.join(MODELS)}")
    torch.set_num_threads(1)
    out = Path(args.out) / ("overhead_smoke.json" if args.smoke else "overhead.json")
    t_all = time.perf_counter()
    rows: list[dict[str, Any]] = []
    per_model: dict[str, Any] = {}
    meta: dict[str, Any] = {"environment": C.environment(), "args": vars(args)}
    if "benchmark" in models:
        r, per_model["benchmark"] = run_benchmark(args)
        rows += r
        meta.update({k: v for k, v in per_model["benchmark"].items() if k != "seconds"})  # the fields docs read
    if "gpt2_124m" in models:
        r, m = run_gpt2(args)
        per_model[m["size"]] = m
        rows += r
    ran = {r["model"] for r in rows}
    kept = []
    if out.exists():  # a subset of --models: keep the other models' records (and their meta) of the existing file
        try:
            prev = json.loads(out.read_text())
        except (OSError, ValueError):
            prev = {}
        if isinstance(prev, dict) and all("model" in r for r in prev.get("runs", [])):
            kept = [r for r in prev.get("runs", []) if r["model"] not in ran]
            for k in {r["model"] for r in kept}:
                per_model[k] = prev.get("meta", {}).get("models", {}).get(k)
            if "benchmark" in {r["model"] for r in kept}:
                for k in ("task", "params", "rounds", "block", "floor_peak_rss_mb_rank0", "rss_note", "reference"):
                    meta.setdefault(k, prev.get("meta", {}).get(k))
    meta.update(
        {
            "models": per_model,
            "kept_from_previous_file": sorted({r["model"] for r in kept}),
            "default_config": C.package_defaults(),
            "overhead_note": "overhead_vs_uncompressed is a fraction (0.12 = +12 %) of the uncompressed EF21-Muon "
            "sharded step of the same model and run",
            "total_seconds": time.perf_counter() - t_all,
        }
    )
    C.write_json(out, {"runs": rows + kept, "meta": meta})
    print(
        f"\n{'model':<10} {'method':<52} {'def':>3} {'step ms':>9} {'overhead':>9} {'vs DDP':>7} "
        f"{'RSS MB r0/r1':>14} {'state MB':>9} {'vs DDP':>7}"
    )
    for r in rows:
        rss = "/".join(f"{x:.0f}" if x is not None else "-" for x in r["peak_rss_mb_per_rank"])
        print(
            f"{r['model'][:10]:<10} {r['label'][:52]:<52} {'*' if r['default'] else '':>3} "
            f"{r['median_step_seconds'] * 1e3:>9.1f} {r['overhead_vs_uncompressed']:>+9.1%} "
            f"{r['ratio_vs_ddp_lmo']:>6.2f}x {rss:>14} {r['state_bytes_total'] / 1e6:>9.2f} "
            f"{r['state_vs_ddp_lmo']:>6.2f}x"
        )
    for k, m in per_model.items():
        if m is None or k in meta["kept_from_previous_file"]:
            continue
        fb = next(r["fwd_bwd_seconds"] for r in rows if r["model"] == k)
        rss = m.get("floor_peak_rss_mb_rank0") or m.get("peak_rss_mb_per_rank")
        print(
            f"{k}: {m['params'] / 1e6:.2f} M parameters, fwd+bwd only {fb * 1e3:.1f} ms, RSS {rss} MB, "
            f"{m['seconds']:.0f} s"
        )
    print(f"default setting (EF21Config()): marked * | total {meta['total_seconds']:.0f} s -> {out}")


if __name__ == "__main__":
    main()
