"""Compute overhead of compression, peak memory, and training-state bytes of EF21-Muon vs DDP + the same optimizer.

On loopback (2 gloo processes, 1 thread each) communication is nearly free, so the step-time difference between a
compressed and the uncompressed EF21-Muon step is the compute cost of compress + pack + decode (plus the LMO, which
both run). All methods live in the same two processes and are timed **interleaved**: each round runs
``--block`` steps of every method in turn, for ``--rounds`` rounds; the reported time is the median over all timed
steps (the first round is warm-up and dropped), and ratios are taken within this one run (docs/benchmarks.md).

Peak RSS per process: every method again in a fresh pair of processes (a few steps), ``ru_maxrss`` of each rank,
beside the floor (imports, data and one model, measured in the timing processes). State bytes: optimizer state + EF21 state (M_j, G_j,
and the served X, G) per rank, against DDP + the same LMO optimizer (its momentum + DDP's fp32 gradient buckets).

    nice -n 10 timeout 1200 python benchmarks/overhead.py       # ~5 min on 2 cores
    python benchmarks/overhead.py --smoke                        # seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore", r".*before `optimizer.step\(\)`.*")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import common as C  # noqa: E402


def ef21(topology: str, up: str, down: str = "identity") -> dict[str, Any]:
    return {"kind": "ef21", "topology": topology, "uplink": up, "downlink": down, "optimizer": "lmo"}


DDP_LMO = {"kind": "ddp", "optimizer": "lmo", "psgd_rank": None, "uplink": "dense_fp32", "downlink": "identity"}
METHODS = [
    ef21("sharded", "identity"),                      # the uncompressed path: the reference of the ratios
    ef21("sharded", "top_k:0.1", "top_k:0.5"),        # the library default
    ef21("sharded", "top_k:0.05"),
    ef21("sharded", "rank:4"),
    ef21("sharded", "natural"),
    ef21("sharded", "top_k:0.1+natural", "top_k:0.5"),
    ef21("allgather", "identity"),
    ef21("allgather", "top_k:0.1"),
    DDP_LMO,
]


def timing(rank: int, world: int, methods: list[dict[str, Any]], task: C.Task, rounds: int,
           block: int) -> dict[str, Any]:
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
    t = torch.tensor(list(med.values()) + [statistics.median(fwd_bwd)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slower rank decides
    state = {C.label(m): r.state_bytes() for m, r in zip(methods, runners)}
    return {"median_step_seconds": dict(zip(med, t[:-1].tolist())), "fwd_bwd_seconds": float(t[-1]),
            "n_timed_steps": {k: len(v) for k, v in times.items()}, "state_bytes": state, "floor_rss_mb": floor}


def memory(rank: int, world: int, method: dict[str, Any], task: C.Task, steps: int) -> dict[str, Any]:
    data = C.Data(task)
    r = C.Runner(method, task)
    for s in range(steps):
        r.step(data.batch(s, rank, world))
    return {"peak_rss_mb": C.peak_rss_mb(), "state_bytes": r.state_bytes()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (first is warm-up; default 8)")
    p.add_argument("--block", type=int, default=None, help="steps per method per round (default 5)")
    p.add_argument("--mem-steps", type=int, default=None, help="steps per memory measurement (default 10)")
    p.add_argument("--out", default=str(C.RESULTS))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    task = dataclasses.replace(C.SMOKE if args.smoke else C.Task(steps=300), seed=args.seed)
    rounds = args.rounds or (2 if args.smoke else 8)
    block = args.block or (2 if args.smoke else 5)
    mem_steps = args.mem_steps or (2 if args.smoke else 10)
    methods = METHODS[:2] + [DDP_LMO] if args.smoke else METHODS
    out = Path(args.out)
    stem = "overhead_smoke" if args.smoke else "overhead"
    t_all = time.perf_counter()
    print(f"task {task} | seed {args.seed} | {rounds} rounds x {block} steps per method, interleaved | 2 gloo "
          f"processes on loopback, 1 thread each", flush=True)
    tim = C.run_processes(timing, 2, C.TMP / "overhead", methods=methods, task=task, rounds=rounds, block=block)[0]
    mem = {}
    # smoke: only the floor gets its own processes; methods share (RSS is then not per method, see meta)
    for m in tqdm([] if args.smoke else methods, desc="memory", mininterval=10):
        mem[C.label(m)] = C.run_processes(memory, 2, C.TMP / "overhead", method=m, task=task, steps=mem_steps)
    if args.smoke:
        for m in methods:
            mem[C.label(m)] = [{"peak_rss_mb": None, "state_bytes": tim["state_bytes"][C.label(m)]}] * 2
    ref = C.label(methods[0])
    ddp = C.label(DDP_LMO)
    t_ref, t_ddp = tim["median_step_seconds"][ref], tim["median_step_seconds"][ddp]
    rows = []
    for m in methods:
        lab = C.label(m)
        t = tim["median_step_seconds"][lab]
        st = [x["state_bytes"] for x in mem[lab]]
        rows.append({
            "method": C.method_name(m), "label": lab, "uplink": m["uplink"], "downlink": m["downlink"],
            "median_step_seconds": t, "fwd_bwd_seconds": tim["fwd_bwd_seconds"],
            "overhead_vs_uncompressed": t / t_ref - 1, "ratio_vs_ddp_lmo": t / t_ddp,
            "sync_seconds": t - tim["fwd_bwd_seconds"],
            "peak_rss_mb_per_rank": [x["peak_rss_mb"] for x in mem[lab]],
            "state_bytes_per_rank": st, "state_bytes_total": sum(x["total"] for x in st),
            "state_bytes_rank0": tim["state_bytes"][lab],
            "n_timed_steps": tim["n_timed_steps"][lab], "seed": args.seed,
        })
    ddp_state = next(r["state_bytes_total"] for r in rows if r["label"] == ddp)
    for r in rows:
        r["state_vs_ddp_lmo"] = r["state_bytes_total"] / ddp_state
    meta = {"environment": C.environment(), "args": vars(args), "task": dataclasses.asdict(task),
            "params": C.n_params(C.build_model(task)), "rounds": rounds, "block": block,
            "floor_peak_rss_mb_rank0": tim["floor_rss_mb"],
            "rss_note": "smoke: methods share processes, per-method RSS not measured" if args.smoke else
            "each method in a fresh pair of processes; floor = timing process after imports, data and one model",
            "reference": ref, "total_seconds": time.perf_counter() - t_all}
    C.write_json(out / f"{stem}.json", {"runs": rows, "meta": meta})
    print(f"\n{'method':<52} {'step ms':>8} {'overhead':>9} {'vs DDP':>7} {'RSS MB r0/r1':>14} {'state MB':>9} "
          f"{'vs DDP':>7}")
    for r in rows:
        rss = "/".join(f"{x:.0f}" if x is not None else "-" for x in r["peak_rss_mb_per_rank"])
        print(f"{r['label'][:52]:<52} {r['median_step_seconds'] * 1e3:>8.1f} {r['overhead_vs_uncompressed']:>+9.1%} "
              f"{r['ratio_vs_ddp_lmo']:>6.2f}x {rss:>14} {r['state_bytes_total'] / 1e6:>9.2f} "
              f"{r['state_vs_ddp_lmo']:>6.2f}x")
    print(f"fwd+bwd only: {tim['fwd_bwd_seconds'] * 1e3:.1f} ms; model+data floor RSS "
          f"{meta['floor_peak_rss_mb_rank0']:.0f} MB; total {meta['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
