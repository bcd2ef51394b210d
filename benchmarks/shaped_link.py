"""Time-to-target over a rate-limited link: 2 ranks in separate network namespaces joined by a shaped veth pair.

Each rank runs in its own network namespace (``ip netns``); a veth pair (10.77.0.1 <-> 10.77.0.2, addresses that
exist only inside these namespaces) joins them, and ``tc qdisc ... tbf rate <R>`` shapes both ends. gloo runs over
that link (``GLOO_SOCKET_IFNAME``, ``init_method=tcp://10.77.0.1:<port>``).

1. With the link unlimited, time every method's step (median of ``--timed-steps``) and DDP's pure compute step
   (``DDP.no_sync``: forward, backward, optimizer, no all-reduce).
2. Choose the rates at which DDP's communication should take 1×, 4× and 10× its compute time: the dense fp32
   all-reduce moves numel·4 bytes per rank per step (2 ranks), so R = numel·4·8 / (k · t_compute). The comm/compute
   ratio actually reached, (t_step(DDP) − t_compute) / t_compute, is measured and reported.
3. At each rate time every method's step again. Time-to-target = steps-to-target (measured once, by
   ``comm_vs_loss.py`` on the same task and seed, n = 2) × the measured seconds per step; the compute-only bound
   = steps-to-target × seconds per step on the unlimited link.

Methods: uncompressed EF21-Muon (sharded, identity), the best EF21-Muon setting of each topology (fewest uplink +
downlink bytes to target in comm_vs_loss.json), the package default (``EF21Config()``: ``default`` is true on its rows),
and the peers ``ddp_powersgd_r4_lmo`` (DDP + PowerSGD rank 4 + LMO), ``ddp_muon`` (DDP + torch.optim.Muon),
``ddp_lmo`` (DDP + the LMO optimizer) and ``demo`` (DeMo, benchmarks/demo_peer.py: its all_gather really crosses the
link). Local steps (comm_vs_loss.py's ``local`` part): per H > 1 the EF21-Muon run with the fewest uplink +
downlink bytes to target (``best_local_h<H>``) and the DiLoCo peer (``diloco_h<H>``, benchmarks/diloco_peer.py: its
all_reduce really crosses the link); their step time is the mean over whole timed rounds (one round of warm-up, at
least two timed: :func:`timing_plan`), so it carries each step's share of the sync. A run chosen for several roles
is timed once (``role`` joins them with ``+``). Time to both targets of comm_vs_loss.json: ``target`` (uncompressed
EF21-Muon + 1 %) and ``target_adamw`` (fields with suffix ``_adamw``).

Needs root and ``ip``/``tc`` (iproute2). Namespaces are removed on exit, on error and on SIGINT/SIGTERM.
``--smoke`` uses a tiny model and a few steps, one shaped rate (or loopback with a stated reason when namespaces
are unavailable).

    nice -n 10 timeout 1800 python benchmarks/shaped_link.py          # after comm_vs_loss.py (~12 min)
    timeout 2400 python benchmarks/shaped_link.py --name shaped_link_local  # the run with the local-step methods
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import datetime
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C
import torch

ADDR0, ADDR1 = "10.77.0.1", "10.77.0.2"


# --------------------------------------------------------------------------------------------- namespaces
class Link:
    """Two namespaces joined by a veth pair; ``shape(mbit)`` sets tbf on both ends (None: unlimited)."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.ns = [f"eflb{tag}a", f"eflb{tag}b"]
        self.dev = [f"eflv{tag}a", f"eflv{tag}b"]
        self.up = False

    @staticmethod
    def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), check=check, capture_output=True, text=True)

    def create(self) -> None:
        self.up = True
        for ns in self.ns:
            self._sh("ip", "netns", "add", ns)
        self._sh("ip", "link", "add", self.dev[0], "type", "veth", "peer", "name", self.dev[1])
        for ns, dev, addr in zip(self.ns, self.dev, (ADDR0, ADDR1)):
            self._sh("ip", "link", "set", dev, "netns", ns)
            self._sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            self._sh("ip", "-n", ns, "link", "set", dev, "up")
            self._sh("ip", "-n", ns, "link", "set", "lo", "up")

    def shape(self, mbit: float | None) -> None:
        for ns, dev in zip(self.ns, self.dev):
            self._sh("tc", "-n", ns, "qdisc", "del", "dev", dev, "root", check=False)
            if mbit is not None:
                burst = max(16_000, int(mbit * 1e6 / 8 / 100))  # bytes: >= 10 ms worth of tokens
                self._sh(
                    "tc",
                    "-n",
                    ns,
                    "qdisc",
                    "add",
                    "dev",
                    dev,
                    "root",
                    "tbf",
                    "rate",
                    f"{mbit:.4f}mbit",
                    "burst",
                    str(burst),
                    "latency",
                    "200ms",
                )

    def destroy(self) -> None:
        if not self.up:
            return
        for ns in self.ns:  # deleting a namespace deletes the veth end inside it (and so the pair)
            self._sh("ip", "netns", "del", ns, check=False)
        self._sh("ip", "link", "del", self.dev[0], check=False)
        self.up = False


def netns_unavailable() -> str | None:
    """Why shaped namespaces cannot be used here, or None."""
    if os.geteuid() != 0:
        return "not root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (apt-get install iproute2)"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`ip netns` failed: {probe.stderr.strip()}"
    return None


# --------------------------------------------------------------------------------------------- worker (per rank)
def worker(cfg_path: str, rank: int) -> None:
    """One rank: time each method's step; rank 0 writes the results JSON."""
    warnings.filterwarnings("ignore", r".*before `optimizer.step\(\)`.*")
    warnings.filterwarnings("ignore", ".*all_gather_into_tensor` is deprecated.*")
    import torch.distributed as dist

    cfg = json.loads(Path(cfg_path).read_text())
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=cfg["init"], rank=rank, world_size=2, timeout=datetime.timedelta(seconds=600)
    )
    task = C.Task(**cfg["task"])
    data = C.Data(task)
    out = []
    for spec in cfg["methods"]:
        r = C.Runner(spec, task)
        warm, timed, H = timing_plan(spec, cfg["warmup_steps"], cfg["timed_steps"])
        times = []
        up = down = 0
        for s in range(warm + timed):
            b = data.batch(s, rank, 2)
            dist.barrier()
            t0 = time.perf_counter()
            r.step(b)
            times.append(time.perf_counter() - t0)
            if s >= warm:
                up, down = up + r.last_uplink_bytes, down + r.last_downlink_bytes
        times = times[warm:]
        # the slower rank decides the step time: median of single steps, or the mean over whole rounds (H > 1)
        t = torch.tensor([statistics.median(times) if H == 1 else sum(times) / len(times)], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        out.append(
            {
                "label": C.label(spec),
                "seconds_per_step": float(t),
                "sync_every": H,
                "timed_steps": timed,
                "all_step_seconds": times,
                # per step: the last step's bytes; local steps (H > 1): the mean over the timed whole rounds
                "uplink_bytes_per_step": r.last_uplink_bytes if H == 1 else up / timed,
                "downlink_bytes_per_step": r.last_downlink_bytes if H == 1 else down / timed,
                # EF21: uplink wall time per step and the part hidden behind backward (the engine's ledger)
                "uplink_overlap": r.engine.ledger.overlap() if r.engine is not None else None,
            }
        )
        r.close()
    if cfg.get("compute_only"):
        r = C.Runner(
            {"kind": "ddp", "optimizer": "muon", "psgd_rank": None, "uplink": "dense_fp32", "downlink": "identity"},
            task,
        )
        times = []
        for s in range(cfg["warmup_steps"] + cfg["timed_steps"]):
            b = data.batch(s, rank, 2)
            t0 = time.perf_counter()
            with r.ddp.no_sync():
                r.opt.zero_grad(set_to_none=True)
                C.lm_loss(r.ddp, b).backward()
                r.opt.step()
            times.append(time.perf_counter() - t0)
        t = torch.tensor([statistics.median(times[cfg["warmup_steps"] :])], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        out.append({"label": "ddp_muon compute only (no_sync)", "seconds_per_step": float(t)})
    if rank == 0:
        Path(cfg["result"]).write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


def timing_plan(spec: dict[str, Any], warmup: int, timed: int) -> tuple[int, int, int]:
    """(warm-up steps, timed steps, H) for one method. Every-step methods: as given (the median step is timed).
    Local-step methods (``sync_every`` H > 1, EF21-Muon or DiLoCo): one whole round of warm-up and at least two
    whole rounds timed (``timed`` rounded up to a multiple of H), so the mean step includes its share of a sync."""
    H = C.sync_every(spec)
    if H == 1:
        return warmup, timed, 1
    return H, H * max(2, -(-timed // H)), H


def run_pair(link: Link | None, cfg: dict[str, Any], tmp: Path, timeout: float) -> list[dict[str, Any]]:
    """Start both ranks (in the namespaces when ``link``), wait, return rank 0's results."""
    port = C.free_port()
    cfg = dict(cfg, init=f"tcp://{ADDR0 if link else '127.0.0.1'}:{port}", result=str(tmp / "result.json"))
    cfg_path = tmp / "cfg.json"
    cfg_path.write_text(json.dumps(cfg))
    (tmp / "result.json").unlink(missing_ok=True)
    procs = []
    try:
        for rank in range(2):
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", cfg_path.as_posix(), "--rank", str(rank)]
            if link:
                env["GLOO_SOCKET_IFNAME"] = link.dev[rank]
                cmd = ["ip", "netns", "exec", link.ns[rank], *cmd]
            else:
                env["GLOO_SOCKET_IFNAME"] = "lo"
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        deadline = time.monotonic() + timeout
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        if any(p.returncode != 0 for p in procs) and not (tmp / "result.json").exists():
            logs = "\n".join((p.stdout.read() if p.stdout else "")[-3000:] for p in procs)
            raise RuntimeError(f"worker failed (rc {[p.returncode for p in procs]}):\n{logs}")
        return json.loads((tmp / "result.json").read_text())
    finally:
        for p in procs:  # only the processes this function started
            if p.poll() is None:
                p.kill()
                p.wait()


# --------------------------------------------------------------------------------------------- method choice
def spec_of(run: dict[str, Any]) -> dict[str, Any]:
    """The Runner spec of one comm_vs_loss.json record (its LR multiplier does not change the step time; the outer
    options of a local-step run are kept: they are part of its label)."""
    H = C.sync_every(run)
    if run["method"].startswith("ef21_muon_"):
        spec = {
            "kind": "ef21",
            "topology": run["topology"],
            "uplink": run["uplink"],
            "downlink": run["downlink"],
            "optimizer": "lmo",
        }
        if H > 1:
            spec.update(sync_every=H, **{k: run.get(k) for k in C.OUTER_KEYS})
        return spec
    if run["method"].startswith("diloco_"):
        return C.diloco_spec(H, outer_lr=run.get("outer_lr"), outer_momentum=run.get("outer_momentum"))
    if run["method"] == "demo":
        return C.demo_spec()
    rank = int(run["uplink"].split(":")[1]) if run["uplink"].startswith("powersgd") else None
    return {
        "kind": "ddp",
        "optimizer": run["optimizer"],
        "psgd_rank": rank,
        "uplink": run["uplink"],
        "downlink": "identity",
    }


def choose_methods(cvl: list[dict[str, Any]] | None, smoke: bool) -> list[dict[str, Any]]:
    """(spec, steps to both targets, source) for each method timed on the link; a run chosen for several roles is
    timed once (``role`` joins them with ``+``)."""
    if cvl is None:  # smoke without a comm_vs_loss run: fixed methods, placeholder step counts
        up, down = C.default_matrix_spec("uplink"), C.default_matrix_spec("downlink")
        default = {"kind": "ef21", "topology": "sharded", "uplink": up, "downlink": down, "optimizer": "lmo"}
        specs = [
            dict(default, uplink="identity", downlink="identity"),
            default,
            {"kind": "ddp", "optimizer": "muon", "psgd_rank": None, "uplink": "dense_fp32", "downlink": "identity"},
            {"kind": "ddp", "optimizer": "lmo", "psgd_rank": None, "uplink": "dense_fp32", "downlink": "identity"},
            C.demo_spec(),
            dict(default, sync_every=2, outer="nesterov", outer_lr=None, outer_momentum=None),
            C.diloco_spec(2),
        ]
        roles = ["uncompressed", "best_sharded+default", "ddp_muon", "ddp_lmo", "demo", "best_local_h2", "diloco_h2"]
        return [
            {
                "spec": s,
                "role": r,
                "steps_to_target": 10,
                "reached_target": True,
                "steps_to_target_adamw": 8,
                "reached_target_adamw": True,
                "budget_steps": 10,
                "steps_source": "placeholder (smoke: no comm_vs_loss run)",
            }
            for s, r in zip(specs, roles)
        ]
    runs = [r for r in cvl if r["n_workers"] == 2 and C.sync_every(r) == 1]
    local = [r for r in cvl if r["n_workers"] == 2 and C.sync_every(r) > 1]
    chosen: list[dict[str, Any]] = []

    def add(run: dict[str, Any] | None, role: str) -> None:
        if run is None:
            return
        same = next((c for c in chosen if c["label"] == run["label"]), None)
        if same is not None:
            same["role"] += f"+{role}"
            return
        chosen.append(
            {
                "spec": spec_of(run),
                "role": role,
                "steps_to_target": run["steps_to_target"],
                "reached_target": run["reached_target"],
                "steps_to_target_adamw": run.get("steps_to_target_adamw"),
                "reached_target_adamw": run.get("reached_target_adamw"),
                "budget_steps": run["budget_steps"],
                "steps_source": "comm_vs_loss.json (n=2, same task and seed)"
                + (f"; from the {run['source_label']} run (same arithmetic)" if "source_label" in run else ""),
                "label": run["label"],
            }
        )

    def cost(r: dict[str, Any]) -> float:  # what crosses the link until the target: uplink + downlink
        if r["method"] == "ef21_muon_allgather" or "source_label" in r:
            return r["bytes_to_target_per_worker"]
        return r.get("total_bytes_to_target_per_worker") or r["bytes_to_target_per_worker"]

    add(
        next(
            (
                r
                for r in runs
                if r["method"] == "ef21_muon_sharded" and r["uplink"] == "identity" and r["downlink"] == "identity"
            ),
            None,
        ),
        "uncompressed",
    )
    for topo in ("sharded", "server", "allgather"):
        cand = [
            r for r in runs if r["method"] == f"ef21_muon_{topo}" and r["reached_target"] and r["uplink"] != "identity"
        ]
        if topo == "allgather":
            # with a dense downlink every topology runs the same arithmetic (X = W): a sharded/server run with
            # downlink identity has exactly the allgather run's curve (comm_vs_loss shows identical curves), so its
            # steps-to-target carry over; allgather sends no downlink, so rank them by uplink bytes alone
            cand += [
                dict(
                    r,
                    method="ef21_muon_allgather",
                    topology="allgather",
                    label=r["label"].replace(r["method"], "ef21_muon_allgather"),
                    source_label=r["label"],
                )
                for r in runs
                if r["method"] != "ef21_muon_allgather"
                and r["method"].startswith("ef21_muon_")
                and r["downlink"] == "identity"
                and r["uplink"] != "identity"
                and r["reached_target"]
            ]
        add(min(cand, key=cost) if cand else None, f"best_{topo}")
    add(next((r for r in runs if C.is_default(spec_of(r))), None), "default")
    psgd = [r for r in runs if r["method"].startswith("ddp_powersgd")]
    reached = [r for r in psgd if r["reached_target"]]
    add(
        next((r for r in psgd if r["method"] == "ddp_powersgd_r4_lmo"), None)
        or (min(reached, key=cost) if reached else (min(psgd, key=lambda r: r["final_val_loss"]) if psgd else None)),
        "ddp_powersgd",
    )
    for name in ("ddp_muon", "ddp_lmo", "demo"):
        add(next((r for r in runs if r["method"] == name), None), name)
    # local steps: per H the EF21-Muon run with the fewest uplink + downlink bytes to target, and DiLoCo at each H
    for H in sorted({r["sync_every"] for r in local}):
        cand = [r for r in local if r["method"].startswith("ef21_") and r["sync_every"] == H and r["reached_target"]]
        add(min(cand, key=cost) if cand else None, f"best_local_h{H}")
        add(next((r for r in local if r["method"] == f"diloco_h{H}"), None), f"diloco_h{H}")
    return chosen


def summary_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per method, time to target at every rate (slowest last), the step time on the unlimited
    link, and at the slowest rate the speed-up vs DDP + Muon, the ratio to the compute-only bound and the time to
    target_adamw."""
    f = lambda v, fmt: (fmt % v) if v is not None else "—"  # noqa: E731
    rates = sorted({r["link_mbit"] for r in rows if r["link_mbit"]}, reverse=True)
    slow = rates[-1] if rates else None
    by = {(r["label"], r["link_mbit"]): r for r in rows}
    head = [
        f"s→target at {m:.1f} Mbit/s (comm/compute {by[next(iter(by))[0], m]['comm_to_compute']:.1f})" for m in rates
    ]
    lines = [
        "| method | role | H | steps→target | s/step unlimited | "
        + " | ".join(head)
        + " | vs DDP+Muon (slowest) | ÷ compute bound (slowest) | s→AdamW target (slowest) |",
        "|---" * (8 + len(rates)) + "|",
    ]
    for lab in dict.fromkeys(r["label"] for r in rows):
        r0 = by[lab, None]
        rs = by.get((lab, slow), r0)
        name = ("**" + lab + "** (default)") if r0["default"] else lab
        cells = [name, r0["role"], str(C.sync_every(r0)), f(r0["steps_to_target"], "%d")]
        cells.append(f"{r0['seconds_per_step'] * 1e3:.0f} ms")
        cells += [f(by[lab, m]["seconds_to_target"], "%.1f") for m in rates]
        cells += [
            f(rs["speedup_vs_ddp_muon"], "%.2f×"),
            f(rs["ratio_to_compute_bound"], "%.2f"),
            f(rs["seconds_to_target_adamw"], "%.1f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model, few steps, one rate (seconds)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ratios", default="1,4,10", help="DDP comm/compute ratios to shape the link for")
    p.add_argument("--timed-steps", type=int, default=None, help="timed steps per method per rate (default 12)")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument(
        "--comm-vs-loss",
        default=str(C.RESULTS / "comm_vs_loss.json"),
        help="steps-to-target source (comm_vs_loss.py output, same task and seed)",
    )
    p.add_argument("--out", default=str(C.RESULTS))
    p.add_argument(
        "--name",
        default="shaped_link",
        help="stem of the output files (<name>.json, <name>_meta.json; smoke: <name>_smoke...): a new run can sit "
        "beside an earlier one that other figures cite (default shaped_link)",
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.rank)
        return
    out = Path(args.out)
    stem = args.name + ("_smoke" if args.smoke else "")
    task = dataclasses.replace(C.SMOKE if args.smoke else C.Task(steps=300), seed=args.seed)
    timed = args.timed_steps or (3 if args.smoke else 12)
    ratios = [float(x) for x in args.ratios.split(",")][: 1 if args.smoke else None]
    cvl_path = Path(args.comm_vs_loss)
    cvl = None
    if not args.smoke:
        if not cvl_path.exists():
            sys.exit(f"{cvl_path} not found: run benchmarks/comm_vs_loss.py first (steps-to-target come from it)")
        cvl = json.loads(cvl_path.read_text())
        cvl_task = json.loads(cvl_path.with_name(cvl_path.stem + "_meta.json").read_text())["task"]
        if cvl_task != dataclasses.asdict(task):
            sys.exit(f"task mismatch with {cvl_path}: {cvl_task} vs {dataclasses.asdict(task)}")
    chosen = choose_methods(cvl, args.smoke)
    reason = netns_unavailable()
    if reason and not args.smoke:
        sys.exit(f"shaped link unavailable: {reason}")
    link = None if reason else Link()
    tmp = C.TMP / "shaped_link"
    tmp.mkdir(parents=True, exist_ok=True)

    def cleanup(*_: Any) -> None:
        if link is not None:
            link.destroy()

    def on_signal(signum: int, _frame: Any) -> None:
        cleanup()
        raise SystemExit(128 + signum)

    atexit.register(cleanup)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    model_numel = C.n_params(C.build_model(task))
    print(
        f"task {task} | {model_numel} params | seed {args.seed} | {timed} timed steps (+{args.warmup_steps} "
        f"warm-up) per method per rate | link: {'veth in 2 netns, tbf' if link else 'loopback (' + reason + ')'}",
        flush=True,
    )
    for c in chosen:
        print(f"  {c['role']:<14} {C.label(c['spec']):<60} steps-to-target {c['steps_to_target']}", flush=True)
    cfg = {
        "task": dataclasses.asdict(task),
        "methods": [c["spec"] for c in chosen],
        "timed_steps": timed,
        "warmup_steps": args.warmup_steps,
    }
    t_all = time.perf_counter()
    rows, rates = [], []
    try:
        if link:
            link.create()
            link.shape(None)
        base = run_pair(link, dict(cfg, compute_only=True), tmp, 1200)
        t_compute = base[-1]["seconds_per_step"]
        unlimited = {b["label"]: b["seconds_per_step"] for b in base[:-1]}
        ddp_bytes = 4 * model_numel
        print(
            f"unlimited link: DDP compute-only step {t_compute * 1e3:.1f} ms; step times (ms): "
            + ", ".join(f"{k}: {v * 1e3:.1f}" for k, v in unlimited.items()),
            flush=True,
        )
        phases = [(None, None, base[:-1])]
        for k in ratios:
            mbit = ddp_bytes * 8 / (k * t_compute) / 1e6
            if link:
                link.shape(mbit)
            t0 = time.perf_counter()
            res = run_pair(link, cfg, tmp, 1800)
            print(
                f"rate {mbit:.2f} Mbit/s (aimed comm/compute {k:g}x): {time.perf_counter() - t0:.0f} s; step (ms): "
                + ", ".join(f"{r['label']}: {r['seconds_per_step'] * 1e3:.0f}" for r in res),
                flush=True,
            )
            phases.append((mbit, k, res))

        def has(c: dict[str, Any], role: str) -> bool:
            return role in c["role"].split("+")

        ddp_c = next((c for c in chosen if has(c, "ddp_muon")), None)
        for mbit, k, res in phases:
            by = {r["label"]: r for r in res}
            ddp_t = by[C.label(ddp_c["spec"])]["seconds_per_step"] if ddp_c else None
            measured_ratio = (ddp_t - t_compute) / t_compute if ddp_t else None
            rates.append(
                {
                    "link_mbit": mbit,
                    "aimed_comm_to_compute": k,
                    "comm_to_compute": measured_ratio,
                    "ddp_muon_seconds_per_step": ddp_t,
                    "ddp_compute_seconds_per_step": t_compute,
                }
            )
            for c in chosen:
                lab = C.label(c["spec"])
                sps = by[lab]["seconds_per_step"]
                row = {
                    "method": C.method_name(c["spec"]),
                    "label": lab,
                    "role": c["role"],
                    "uplink": c["spec"]["uplink"],
                    "downlink": c["spec"]["downlink"],
                    "default": C.is_default(c["spec"]),
                    "link_mbit": mbit,
                    "link": ("unlimited veth" if link else "loopback") if mbit is None else "veth tbf",
                    "aimed_comm_to_compute": k,
                    "comm_to_compute": measured_ratio,
                    "steps_source": c["steps_source"],
                    "seconds_per_step": sps,
                    "unlimited_seconds_per_step": unlimited[lab],
                    "sync_every": by[lab]["sync_every"],
                    "seconds_per_step_rule": "median of single timed steps"
                    if by[lab]["sync_every"] == 1
                    else "mean over whole timed rounds (inner steps and the sync)",
                }
                for sfx in ("", "_adamw"):  # time to the target and to target_adamw (comm_vs_loss.json)
                    st = c[f"steps_to_target{sfx}"]
                    sec = st * sps if st else None
                    bound = st * unlimited[lab] if st else None
                    ddp_st = (ddp_c[f"steps_to_target{sfx}"] or ddp_c["budget_steps"]) if ddp_c else None
                    ddp_time = ddp_st * ddp_t if ddp_st and ddp_t else None
                    row.update(
                        {
                            f"steps_to_target{sfx}": st,
                            f"reached_target{sfx}": c[f"reached_target{sfx}"],
                            f"seconds_to_target{sfx}": sec,
                            f"compute_bound_seconds{sfx}": bound,
                            f"ratio_to_compute_bound{sfx}": sec / bound if sec and bound else None,
                            f"speedup_vs_ddp_muon{sfx}": (ddp_time / sec) if sec and ddp_time else None,
                            f"speedup_vs_ddp_muon{sfx}_is_lower_bound": bool(sec)
                            and ddp_c is not None
                            and not ddp_c[f"reached_target{sfx}"],
                        }
                    )
                row.update(
                    {
                        "uplink_bytes_per_step": by[lab]["uplink_bytes_per_step"],
                        "downlink_bytes_per_step": by[lab]["downlink_bytes_per_step"],
                        "uplink_overlap": by[lab].get("uplink_overlap"),
                        "all_step_seconds": by[lab].get("all_step_seconds"),
                        "seed": args.seed,
                        "timed_steps": timed,
                        "warmup_steps": args.warmup_steps,
                        "reference_budget_steps": task.steps,
                    }
                )
                rows.append(row)
    finally:
        cleanup()
    meta = {
        "environment": C.environment(),
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "rank")},
        "task": dataclasses.asdict(task),
        "params": model_numel,
        "rates": rates,
        "link": "veth pair in two network namespaces, tbf on both ends" if link else f"loopback ({reason})",
        "method": "time-to-target = steps-to-target (comm_vs_loss.py, n=2) x median measured seconds per step",
        "targets": "target: uncompressed EF21-Muon's final val loss x 1.01; target_adamw (suffix _adamw): "
        "DDP + AdamW's val loss at the reference budget x 1.01 (comm_vs_loss_meta.json: target_rule, "
        "target_adamw_rule)",
        "default_rule": "default: EF21-Muon with ef_lightning.config.EF21Config()'s uplink, downlink and topology",
        "package_defaults": C.package_defaults(),
        "total_seconds": time.perf_counter() - t_all,
    }
    C.write_json(out / f"{stem}.json", rows)
    C.write_json(out / f"{stem}_meta.json", meta)
    print(
        f"\n{'method':<76} {'Mbit/s':>8} {'comm/comp':>9} {'s/step':>7} {'s→target':>9} {'bound s':>8} "
        f"{'vs bound':>8} {'× vs DDP+Muon':>13} {'s→tgtA':>7} {'×A':>6}"
    )
    f = lambda v, fmt: (fmt % v) if v is not None else "-"  # noqa: E731
    for r in rows:
        print(
            f"{('* ' if r['default'] else '') + r['label'].replace('ef21_muon_', 'EF21 ')[:74]:<76} "
            f"{f(r['link_mbit'], '%.2f'):>8} "
            f"{f(r['comm_to_compute'], '%.2f'):>9} "
            f"{r['seconds_per_step']:>7.3f} {f(r['seconds_to_target'], '%.1f'):>9} "
            f"{f(r['compute_bound_seconds'], '%.1f'):>8} {f(r['ratio_to_compute_bound'], '%.2f'):>8} "
            f"{f(r['speedup_vs_ddp_muon'], '%.2f'):>13} {f(r['seconds_to_target_adamw'], '%.1f'):>7} "
            f"{f(r['speedup_vs_ddp_muon_adamw'], '%.2f'):>6}"
        )
    print(
        "* = the package default (EF21Config()); A = to target_adamw (DDP + AdamW's loss at the reference budget "
        "x 1.01)"
    )
    print("\n" + summary_table(rows))
    print(f"total {meta['total_seconds']:.0f} s; wrote {out / (stem + '.json')}")


if __name__ == "__main__":
    main()
