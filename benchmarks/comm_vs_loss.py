"""Validation loss vs communicated bytes for EF21-Muon and its peers on the standard CPU-sized NanoGPT task.

Every method in one invocation (docs/benchmarks.md):

* ``real`` — n = 2 gloo processes on loopback (torch.multiprocessing, spawn): uncompressed EF21-Muon in the three
  topologies (= data-parallel Gluon) and DDP + the same LMO optimizer (their max weight difference is reported),
  EF21-Muon with uplink top_k (several ratios), rank:r, natural, top_k+natural, downlink identity and top_k in the
  server and sharded topologies; peers DDP + AdamW, DDP + torch.optim.Muon (hidden) + AdamW (rest), DDP + PowerSGD
  hook (rank 1 and 4, error feedback) + AdamW and + the LMO optimizer.
* ``sim`` — n = 4 workers in ``ef_lightning.Simulator`` (one process): uncompressed and a few compressors.
* ``bytes_vs_n`` — per-worker bytes per step for n = 2 … 64 in the Simulator (analytic from the ledger: two steps on
  synthetic gradients per point; message sizes do not depend on the values) for every compressor, beside DDP
  (dense fp32 rule and ring all-reduce) and PowerSGD.

The uncompressed run (EF21-Muon sharded, identity) has budget ``--steps``; its final validation loss × 1.01 is the
target. Every other method gets up to ``--budget-mult`` × that budget with the same schedule shape (linear warm-up,
then constant LR, so a longer budget is the same schedule run longer) and, by default, stops at the first
validation at or below the target (``--full-budget`` runs it out). Validation loss is measured at the server model X.

Outputs ``benchmarks/results/comm_vs_loss.json`` (a list of runs), ``comm_vs_loss_meta.json`` (machine, versions,
arguments, DDP/EF21 agreement, bytes vs n) and ``comm_vs_loss.png``.

    nice -n 10 timeout 3600 python benchmarks/comm_vs_loss.py              # the full run (~25 min on 2 cores)
    python benchmarks/comm_vs_loss.py --smoke                               # seconds; used by the tests
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
# server topology: ranks that serve no layer never step their optimizer, so their LR scheduler warns; harmless
warnings.filterwarnings("ignore", ".*lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`.*")
warnings.filterwarnings("ignore", ".*all_gather_into_tensor` is deprecated.*")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import common as C  # noqa: E402

# ----------------------------------------------------------------------------------------------- the method lists
REF = {"kind": "ef21", "topology": "sharded", "uplink": "identity", "downlink": "identity", "optimizer": "lmo",
       "budget_mult": 1, "reference": True}


def ef21(topology: str, up: str, down: str = "identity", mult: float | None = None) -> dict[str, Any]:
    return {"kind": "ef21", "topology": topology, "uplink": up, "downlink": down, "optimizer": "lmo",
            "budget_mult": mult}


def ddp(opt: str, rank: int | None = None, mult: float | None = None) -> dict[str, Any]:
    return {"kind": "ddp", "optimizer": opt, "psgd_rank": rank, "uplink": "dense_fp32" if not rank else f"powersgd:{rank}",
            "downlink": "identity", "budget_mult": mult}


def real_methods(smoke: bool) -> list[dict[str, Any]]:
    if smoke:
        return [REF, ef21("allgather", "identity", mult=1), ef21("server", "identity", mult=1), ddp("lmo", mult=1),
                ef21("sharded", "top_k:0.1", "top_k:0.5"), ef21("server", "rank:2"), ddp("adamw"), ddp("muon"),
                ddp("adamw", 1)]
    return [
        REF,
        ef21("allgather", "identity", mult=1), ef21("server", "identity", mult=1), ddp("lmo", mult=1),
        # uplink compressors (sharded, downlink dense)
        ef21("sharded", "top_k:0.1"), ef21("sharded", "top_k:0.05"), ef21("sharded", "rank:4"),
        ef21("sharded", "natural"), ef21("sharded", "top_k:0.1+natural"),
        # downlink compressed (sharded and server); compressed uplink on allgather
        ef21("sharded", "top_k:0.1", "top_k:0.5"), ef21("server", "top_k:0.1", "top_k:0.5"),
        ef21("allgather", "top_k:0.1"),
        # peers
        ddp("adamw"), ddp("muon"), ddp("adamw", 1), ddp("adamw", 4), ddp("lmo", 4),
    ]


def sim_methods(smoke: bool) -> list[dict[str, Any]]:
    sim = lambda up, down="identity", mult=None, ref=False: {  # noqa: E731
        "kind": "ef21", "topology": "sim", "uplink": up, "downlink": down, "optimizer": "lmo", "budget_mult": mult,
        "reference": ref}
    if smoke:
        return [sim("identity", mult=1, ref=True), sim("top_k:0.1", "top_k:0.5")]
    return [sim("identity", mult=1, ref=True), sim("top_k:0.1", "top_k:0.5")]


# ----------------------------------------------------------------------------------------------- training loops
def _curve_point(step: int, up: int, down: int, loss: float, t0: float) -> dict[str, Any]:
    return {"step": step, "uplink_bytes_per_worker": up, "downlink_bytes_total": down, "val_loss": loss,
            "seconds": time.perf_counter() - t0}


def train_real(rank: int, world: int, methods: list[dict[str, Any]], task: C.Task, budget_mult: float,
               early_stop: bool, partial: str | None = None) -> list[dict[str, Any]]:
    """Runs every method in turn inside the 2-process group (rank 0 returns the records)."""
    data = C.Data(task)
    val = data.val_batches(rank, world)
    target = None
    out = []
    for spec in methods:
        mult = spec["budget_mult"] or budget_mult
        budget = int(round(task.steps * mult))
        r = C.Runner(spec, task)
        curve, up, down = [], 0, 0
        t0 = time.perf_counter()
        curve.append(_curve_point(0, 0, 0, r.val_loss(val), t0))
        bar = tqdm(range(budget), desc=C.label(spec)[:48], unit="step", disable=rank != 0, leave=False, mininterval=10)
        for s in bar:
            loss = r.step(data.batch(s, rank, world))
            up += r.last_uplink_bytes
            down += r.last_downlink_bytes
            if (s + 1) % task.val_every == 0 or s + 1 == budget:
                v = r.val_loss(val)
                curve.append(_curve_point(s + 1, up, down, v, t0))
                bar.set_postfix(train=f"{loss:.3f}", val=f"{v:.3f}")
                # stop once the target is reached, but not before the uncompressed step count (loss at it is reported)
                if early_stop and target is not None and v <= target and s + 1 >= task.steps:
                    break
        seconds = time.perf_counter() - t0
        rec = {"spec": spec, "curve": curve, "budget_steps": budget, "steps": curve[-1]["step"], "seconds": seconds,
               "train_seconds_per_step": None}
        if r.engine is not None:
            rec["ledger"] = r.engine.ledger.summary()
        if r.counter is not None:
            rec["powersgd_measured_hook_bytes"] = r.counter.bytes
            rec["powersgd_analytic_bytes"] = sum(r.psgd if i >= 2 else r.dense for i in range(r.step_count))
            rec["powersgd_state_iter"] = r.psgd_state.iter
        if spec["uplink"] == "identity" or (spec["kind"] == "ddp" and spec["optimizer"] == "lmo"
                                            and not spec.get("psgd_rank")):
            rec["final_params"] = {k: v.float() for k, v in r.final_params().items()}
        rec["state_bytes"] = r.state_bytes()
        rec["peak_rss_mb"] = C.peak_rss_mb()
        r.close()
        if spec.get("reference"):
            target = curve[-1]["val_loss"] * 1.01
        out.append(rec)
        if partial and rank == 0:  # survives a timeout: --from-partial summarises what finished
            torch.save(out, partial)
    return out if rank == 0 else []


def agreement_trace(rank: int, world: int, task: C.Task, steps: int, every: int) -> list[dict[str, Any]]:
    """Uncompressed EF21-Muon (sharded) and DDP + the same LMO optimizer in lockstep on the same batches: the max
    |weight difference| every ``every`` steps (shows whether a gap is rounding amplified over time or a real
    difference: the latter would appear at once)."""
    data = C.Data(task)
    a = C.Runner(REF, task)
    b = C.Runner({"kind": "ddp", "optimizer": "lmo", "psgd_rank": None, "uplink": "dense_fp32",
                  "downlink": "identity"}, task)
    trace = []
    for s in range(steps):
        batch = data.batch(s, rank, world)
        a.step(batch)
        b.step(batch)
        if (s + 1) % every == 0 or s < 3:
            X, W = a.final_params(), dict(b.model.named_parameters())
            diffs = {k: float((X[k] - W[k].detach()).abs().max()) for k in X}
            worst = max(diffs, key=diffs.get)
            trace.append({"step": s + 1, "max_abs_weight_diff": diffs[worst], "worst_param": worst})
    return trace


def train_sim(methods: list[dict[str, Any]], task: C.Task, n: int, budget_mult: float,
              early_stop: bool) -> list[dict[str, Any]]:
    import ef_lightning as efl

    data = C.Data(task)
    val = data.val_batches()
    target = None
    out = []
    for spec in methods:
        mult = spec["budget_mult"] or budget_mult
        budget = int(round(task.steps * mult))
        model = C.build_model(task)
        opt = C.build_optimizer(model, "lmo", task)
        sched = C.warmup_scheduler(opt, task)
        sim = efl.Simulator(model, opt, n_workers=n, uplink=C.role_spec(spec["uplink"]),
                            downlink=C.role_spec(spec["downlink"]), seed=task.seed)
        t0 = time.perf_counter()
        curve, up, down = [_curve_point(0, 0, 0, C.evaluate(model, val), t0)], 0, 0
        bar = tqdm(range(budget), desc=f"sim n={n} {spec['uplink']}/{spec['downlink']}", unit="step", leave=False, mininterval=10)
        for s in bar:
            sim.step(C.lm_loss, [data.batch(s, j, n) for j in range(n)])
            sched.step()
            up += sim.ledger.last.uplink_wire_bytes
            down += sim.ledger.last.downlink_wire_bytes
            if (s + 1) % task.val_every == 0 or s + 1 == budget:
                v = C.evaluate_at(model, sim.server_model(), val)
                curve.append(_curve_point(s + 1, up, down, v, t0))
                bar.set_postfix(val=f"{v:.3f}")
                if early_stop and target is not None and v <= target and s + 1 >= task.steps:
                    break
        sim.detach()
        if spec.get("reference"):
            target = curve[-1]["val_loss"] * 1.01
        out.append({"spec": spec, "curve": curve, "budget_steps": budget, "steps": curve[-1]["step"],
                    "seconds": time.perf_counter() - t0, "ledger": sim.ledger.summary()})
    return out


def bytes_vs_n(task: C.Task, ns: list[int], specs: list[str], psgd_ranks: list[int]) -> list[dict[str, Any]]:
    """Per-worker bytes per step vs n: EF21 from the Simulator's ledger (2 steps on synthetic gradients)."""
    import ef_lightning as efl

    model = C.build_model(task)
    rows = []
    dense = C.ddp_bytes_per_step(model)
    g = torch.Generator().manual_seed(task.seed)
    for spec in tqdm(specs, desc="bytes vs n", unit="spec", leave=False):
        for n in ns:
            opt = C.build_optimizer(model, "lmo", task)
            down = "identity" if spec == "identity" else "top_k:0.5"
            sim = efl.Simulator(model, opt, n_workers=n, uplink=C.role_spec(spec), downlink=C.role_spec(down))
            for _ in range(2):
                sim.apply([[torch.randn(L.param.shape, generator=g) * 1e-3 for L in sim.layers] for _ in range(n)])
            last = sim.ledger.last
            rows.append({"method": "ef21_muon_sim", "uplink": spec, "downlink": down, "n_workers": n,
                         "uplink_bytes_per_worker_per_step": last.uplink_wire_bytes,
                         "uplink_bits_per_worker_per_step": last.uplink_bits,
                         "downlink_bytes_per_step": last.downlink_wire_bytes,
                         "sharded_bytes_sent_per_rank_per_step": last.uplink_wire_bytes + last.downlink_wire_bytes / n,
                         "dense_bytes_per_worker_per_step": dense,
                         "uplink_ratio_vs_dense": dense / last.uplink_wire_bytes})
            sim.detach()
            # restore the model's parameters (the Simulator stepped it)
            model = C.build_model(task)
    for n in ns:
        rows.append({"method": "ddp", "uplink": "dense_fp32", "downlink": "(all-reduce)", "n_workers": n,
                     "uplink_bytes_per_worker_per_step": dense,
                     "ring_allreduce_bytes_sent_per_worker_per_step": 2 * (n - 1) / n * dense,
                     "dense_bytes_per_worker_per_step": dense, "uplink_ratio_vs_dense": 1.0})
        for r in psgd_ranks:
            b = C.powersgd_bytes_per_step(model, r)
            rows.append({"method": f"ddp_powersgd_r{r}", "uplink": f"powersgd:{r}", "downlink": "(all-reduce)",
                         "n_workers": n, "uplink_bytes_per_worker_per_step": b,
                         "dense_bytes_per_worker_per_step": dense, "uplink_ratio_vs_dense": dense / b})
    return rows


# ----------------------------------------------------------------------------------------------- summarising
def summarise(records: list[dict[str, Any]], n: int, task: C.Task, model_bytes: int, seed: int,
              tokens_per_step: int) -> list[dict[str, Any]]:
    ref = next(r for r in records if r["spec"].get("reference"))
    target = ref["curve"][-1]["val_loss"] * 1.01
    hit_ref = C.bytes_to_target(ref["curve"], target)
    same_topo_ref = {r["spec"]["topology"]: r for r in records
                     if r["spec"]["kind"] == "ef21" and r["spec"]["uplink"] == "identity"
                     and r["spec"]["downlink"] == "identity"}
    runs = []
    for r in records:
        spec, curve = r["spec"], r["curve"]
        hit = C.bytes_to_target(curve, target)
        row = {
            "method": "ef21_muon_sim" if spec.get("topology") == "sim" else C.method_name(spec),
            "label": C.label(spec), "topology": spec.get("topology", "allreduce"), "optimizer": spec["optimizer"],
            "uplink": spec["uplink"], "downlink": spec["downlink"], "n_workers": n, "seed": seed,
            "budget_steps": r["budget_steps"], "budget_tokens": r["budget_steps"] * tokens_per_step,
            "reference_steps": task.steps, "steps": r["steps"], "tokens_per_step": tokens_per_step,
            "final_val_loss": curve[-1]["val_loss"], "target_val_loss": target,
            "val_loss_at_reference_steps": C.loss_at_step(curve, task.steps),
            "reached_target": hit is not None,
            "steps_to_target": hit["step"] if hit else None,
            "bytes_to_target_per_worker": hit["uplink_bytes_per_worker"] if hit else None,
            "bytes_to_target_model_sizes": hit["uplink_bytes_per_worker"] / model_bytes if hit else None,
            "downlink_bytes_to_target": hit["downlink_bytes_total"] if hit else None,
            "saving_vs_uncompressed": (hit_ref["uplink_bytes_per_worker"] / hit["uplink_bytes_per_worker"])
            if hit and hit["uplink_bytes_per_worker"] else None,
            "uplink_bytes_total_per_worker": curve[-1]["uplink_bytes_per_worker"],
            "downlink_bytes_total": curve[-1]["downlink_bytes_total"],
            "seconds": r["seconds"],
            "val_curve": curve,
        }
        base = same_topo_ref.get(spec.get("topology"))
        if hit and base is not None:
            bh = C.bytes_to_target(base["curve"], target)
            if bh is not None:
                tot = hit["uplink_bytes_per_worker"] + hit["downlink_bytes_total"]
                row["total_bytes_to_target"] = tot
                row["saving_total_vs_uncompressed_same_topology"] = \
                    (bh["uplink_bytes_per_worker"] + bh["downlink_bytes_total"]) / tot
        for k in ("ledger", "powersgd_measured_hook_bytes", "powersgd_analytic_bytes", "powersgd_state_iter",
                  "state_bytes", "peak_rss_mb"):
            if k in r:
                row[k] = r[k]
        runs.append(row)
    return runs


def agreement(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Max |weight difference| between uncompressed EF21-Muon (each topology) and DDP + the same LMO optimizer."""
    ddp = next((r for r in records if r["spec"]["kind"] == "ddp" and r["spec"]["optimizer"] == "lmo"
                and not r["spec"].get("psgd_rank")), None)
    out = {}
    if ddp is None:
        return out
    for r in records:
        if r["spec"]["kind"] == "ef21" and r["spec"]["uplink"] == "identity" and "final_params" in r:
            P, Q = r["final_params"], ddp["final_params"]
            out[f"ef21_muon_{r['spec']['topology']} vs ddp_lmo"] = {
                "max_abs_weight_diff": max(float((P[k] - Q[k]).abs().max()) for k in P),
                "max_abs_weight": max(float(Q[k].abs().max()) for k in Q),
                "final_val_loss_diff": abs(r["curve"][-1]["val_loss"] - ddp["curve"][-1]["val_loss"]),
                "steps": r["steps"]}
    return out


def plot(runs: list[dict[str, Any]], path: Path, model_bytes: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [("n = 2 gloo processes", [r for r in runs if r["n_workers"] == 2]),
              ("n = 4 Simulator", [r for r in runs if r["method"] == "ef21_muon_sim"])]
    groups = [g for g in groups if g[1]]
    fig, axes = plt.subplots(1, len(groups), figsize=(8 * len(groups), 6), squeeze=False)
    for ax, (title, rs) in zip(axes[0], groups):
        for r in rs:
            xs = [max(c["uplink_bytes_per_worker"], 1) / model_bytes for c in r["val_curve"][1:]]
            ys = [c["val_loss"] for c in r["val_curve"][1:]]
            style = "-" if r["method"].startswith("ef21") else "--"
            ax.plot(xs, ys, style, label=r["label"].replace("ef21_muon_", "EF21 "), lw=1.2)
        if rs:
            ax.axhline(rs[0]["target_val_loss"], color="k", lw=0.8, ls=":", label="target (uncompressed × 1.01)")
        ax.set_xscale("log")
        ax.set_xlabel("cumulative uplink bytes per worker / fp32 model size")
        ax.set_ylabel("validation loss at X (nats/byte)")
        ax.set_title(title)
        lo = min(r["target_val_loss"] for r in rs)
        ax.set_ylim(lo * 0.95, lo * 1.6)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model and a handful of steps (seconds)")
    p.add_argument("--seed", type=int, default=0, help="model init, data order and compressor seed (default 0)")
    p.add_argument("--steps", type=int, default=None, help="uncompressed budget in optimizer steps (default 300)")
    p.add_argument("--budget-mult", type=float, default=4.0, help="compressed/peer budget × uncompressed (default 4)")
    p.add_argument("--full-budget", action="store_true", help="do not stop a run once it reached the target")
    p.add_argument("--parts", default="real,agreement,sim,bytes_vs_n", help="comma list of: real, agreement, sim, bytes_vs_n")
    p.add_argument("--sim-workers", type=int, default=4)
    p.add_argument("--only", default=None, help="comma list of substrings: keep only real methods whose label "
                   "contains one (the reference and ddp_lmo are always kept)")
    p.add_argument("--out", default=str(C.RESULTS), help="results folder")
    p.add_argument("--append", action="store_true",
                   help="merge into the existing results (runs of the parts run now replace those with the same "
                        "label and n; meta keys are updated)")
    p.add_argument("--from-partial", action="store_true",
                   help="summarise the real-process methods that finished in an interrupted run (no training)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    task = dataclasses.replace(C.SMOKE if args.smoke else C.Task(steps=300), seed=args.seed)
    if args.steps:
        task = dataclasses.replace(task, steps=args.steps)
    out = Path(args.out)
    stem = "comm_vs_loss_smoke" if args.smoke else "comm_vs_loss"
    parts = set(args.parts.split(","))
    model_bytes = C.fp32_bytes(C.build_model(task))
    print(f"task: {task} | params {model_bytes // 4} (untied head) | fp32 model {model_bytes / 1e6:.3f} MB | "
          f"seed {args.seed} | uncompressed budget {task.steps} steps, others up to {args.budget_mult}x", flush=True)
    runs, meta = [], {"environment": C.environment(), "args": vars(args), "task": dataclasses.asdict(task),
                      "params": model_bytes // 4, "fp32_model_bytes": model_bytes, "tied_head": False,
                      "target_rule": "uncompressed final val loss x 1.01", "early_stop_at_target": not args.full_budget}
    t_all = time.perf_counter()
    if "real" in parts:
        methods = real_methods(args.smoke)
        if args.only:
            keys = args.only.split(",")
            methods = [m for m in methods if m.get("reference") or (m["kind"] == "ddp" and m["optimizer"] == "lmo"
                       and not m.get("psgd_rank")) or any(k in C.label(m) for k in keys)]
        t0 = time.perf_counter()
        partial = C.TMP / "comm_vs_loss" / f"{stem}_partial.pt"
        if args.from_partial:
            recs = torch.load(partial, weights_only=False)
            meta["partial"] = f"interrupted run: {len(recs)} of {len(methods)} real methods finished"
        else:
            recs = C.run_processes(train_real, 2, C.TMP / "comm_vs_loss", methods=methods, task=task,
                                   budget_mult=args.budget_mult, early_stop=not args.full_budget,
                                   partial=str(partial))[0]
        meta["real_seconds"] = time.perf_counter() - t0
        meta["agreement_ef21_identity_vs_ddp_lmo"] = agreement(recs)
        runs += summarise(recs, 2, task, model_bytes, args.seed, task.tokens_per_step(2))
    if "agreement" in parts:
        t0 = time.perf_counter()
        meta["agreement_trace_ef21_sharded_identity_vs_ddp_lmo"] = C.run_processes(
            agreement_trace, 2, C.TMP / "comm_vs_loss", task=task, steps=task.steps, every=max(1, task.steps // 30))[0]
        meta["agreement_trace_seconds"] = time.perf_counter() - t0
        for x in meta["agreement_trace_ef21_sharded_identity_vs_ddp_lmo"]:
            print(f"agreement step {x['step']:>4}: max |ΔW| = {x['max_abs_weight_diff']:.3g} ({x['worst_param']})")
    if "sim" in parts:
        t0 = time.perf_counter()
        recs = train_sim(sim_methods(args.smoke), task, args.sim_workers, args.budget_mult, not args.full_budget)
        meta["sim_seconds"] = time.perf_counter() - t0
        runs += summarise(recs, args.sim_workers, task, model_bytes, args.seed, task.tokens_per_step(args.sim_workers))
    if "bytes_vs_n" in parts:
        ns = [2, 4, 8] if args.smoke else [2, 4, 8, 16, 32, 64]
        specs = ["identity", "top_k:0.1", "rank:4"] if args.smoke else \
            ["identity", "top_k:0.2", "top_k:0.1", "top_k:0.05", "rank:4", "rank:8", "natural", "top_k:0.1+natural"]
        meta["bytes_vs_n"] = bytes_vs_n(task, ns, specs, [1, 4])
    meta["total_seconds"] = time.perf_counter() - t_all
    if args.append and (out / f"{stem}.json").exists():
        import json

        new = {(r["label"], r["n_workers"]) for r in runs}
        runs = [r for r in json.loads((out / f"{stem}.json").read_text()) if (r["label"], r["n_workers"]) not in new] \
            + runs
        old = json.loads((out / f"{stem}_meta.json").read_text())
        old.setdefault("invocations", []).append(meta["args"])
        meta["total_seconds"] += old.get("total_seconds", 0)
        meta = {**old, **{k: v for k, v in meta.items() if k not in ("args",)}}
        runs.sort(key=lambda r: r["n_workers"])
    C.write_json(out / f"{stem}.json", runs)
    C.write_json(out / f"{stem}_meta.json", meta)
    if runs:
        plot(runs, out / f"{stem}.png", model_bytes)
    # a readable table (units: bytes are per worker; "x" = times fewer bytes than uncompressed)
    print(f"\n{'config':<58} {'n':>2} {'final val':>9} {'@ref steps':>10} {'steps→tgt':>9} "
          f"{'up MB→tgt':>9} {'saving':>7} {'total sav':>9}")
    for r in runs:
        f = lambda v, fmt: (fmt % v) if v is not None else "-"  # noqa: E731
        print(f"{r['label'][:58]:<58} {r['n_workers']:>2} {r['final_val_loss']:>9.4f} "
              f"{f(r['val_loss_at_reference_steps'], '%.4f'):>10} {f(r['steps_to_target'], '%d'):>9} "
              f"{f(r['bytes_to_target_per_worker'] and r['bytes_to_target_per_worker'] / 1e6, '%.2f'):>9} "
              f"{f(r['saving_vs_uncompressed'], '%.2fx'):>7} "
              f"{f(r.get('saving_total_vs_uncompressed_same_topology'), '%.2fx'):>9}")
    for k, v in meta.get("agreement_ef21_identity_vs_ddp_lmo", {}).items():
        print(f"agreement {k}: max |ΔW| = {v['max_abs_weight_diff']:.3g} (max |W| {v['max_abs_weight']:.3g}), "
              f"|Δ val loss| = {v['final_val_loss_diff']:.3g}")
    print(f"total {meta['total_seconds']:.1f} s; wrote {out / (stem + '.json')}")


if __name__ == "__main__":
    main()
