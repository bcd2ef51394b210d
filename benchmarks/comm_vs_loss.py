"""Validation loss vs communicated bytes for EF21-Muon and its peers on the standard CPU-sized NanoGPT task.

Every method in one invocation (docs/benchmarks.md):

* ``tune`` — each peer's learning rate on a short grid: DDP + AdamW, DDP + torch.optim.Muon, DDP + PowerSGD r4 + LMO,
  DeMo and DDP + the LMO optimizer, each at LR × {1/3, 1, 3} for 1/3 of the uncompressed budget (2 processes); the
  multiplier with the lowest validation loss is used in the ``real``/``sim`` runs (ddp_lmo's also for every EF21-Muon
  run: the same LMO optimizer). Grid, losses and choice go to the meta JSON (``tune``).
* ``real`` — n = 2 gloo processes on loopback (torch.multiprocessing, spawn): uncompressed EF21-Muon in the three
  topologies (= data-parallel Gluon) and DDP + the same LMO optimizer (their max weight difference is reported);
  EF21-Muon with uplink top_k:0.05, rank:4 (sharded, dense downlink); the default uplink (``EF21Config()``'s,
  top_k:0.1+natural on matrices) in allgather (= any topology with a dense downlink) and with the downlinks top_k:0.5
  (the default), top_k:0.2, top_k:0.1+natural, rank:4, natural (sharded), and the best of them (fewest uplink +
  downlink bytes to target) in the server topology; peers DDP + AdamW, DDP + torch.optim.Muon (hidden) + AdamW (rest),
  DDP + PowerSGD hook (rank 4, error feedback) + the LMO optimizer, and DeMo (benchmarks/demo_peer.py, implemented
  from the paper; its all_gather is real). ``DROPPED`` lists the runs of the earlier list left out, and why.
* ``local`` — local steps (``sync_every`` = H): EF21-Muon (sharded, inner optimizer = the LMO optimizer at ddp_lmo's
  tuned LR) at H ∈ {1, 8, 32} × {identity, the package default's compressors, ``AGGRESSIVE``}, and the DiLoCo peer
  (benchmarks/diloco_peer.py: dense fp32 outer delta, Nesterov outer step, AdamW inner; implemented from the paper)
  at H ∈ {8, 32}; 2 gloo processes, after a grid on the reference budget: per H the outer step of EF21-Muon
  (``EF21_OUTER_GRID``, identity compressors) and DiLoCo's outer step × inner LR (``DILOCO_OUTER_GRID`` ×
  ``DILOCO_LR_GRID``). The reference, DDP + AdamW and DDP + LMO run again first (targets; every-step runs must
  reproduce: ``local_reproduced`` with ``--append``). Records carry the sync steps with their bytes (``local``),
  ``outer_rounds_to_target``, ``total_ratio_vs_dp_gluon``; the meta JSON the issue-14 goal (``goal_issue14``:
  ``GOAL_RULE``).
* ``sim`` — n = 4 workers in ``ef_lightning.Simulator`` (one process): uncompressed and a few compressors.
* ``bytes_vs_n`` — per-worker bytes per step for n = 2 … 64 in the Simulator (analytic from the ledger: two steps on
  synthetic gradients per point; message sizes do not depend on the values) for every compressor, beside DDP
  (dense fp32 rule and ring all-reduce) and PowerSGD.

Two targets. ``target``: the uncompressed run (EF21-Muon sharded, identity) has budget ``--steps``; its final
validation loss × 1.01. ``target_adamw``: DDP + AdamW's validation loss at that same budget × 1.01 (AdamW's ground,
where DeMo is judged in its paper). Every other method gets up to ``--budget-mult`` × that budget with the same
schedule shape (linear warm-up, then constant LR, so a longer budget is the same schedule run longer) and, by default,
stops at the first validation at or below both targets (``--full-budget`` runs it out). Validation loss is measured
at the server model X. Every record reports steps, seconds and bytes to both targets, ``default`` (the package's
``EF21Config()`` uplink, downlink and topology) and ``total_saving_vs_uncompressed`` (``TOTAL_RULE``).

Outputs ``benchmarks/results/comm_vs_loss.json`` (a list of runs), ``comm_vs_loss_meta.json`` (machine, versions,
arguments, DDP/EF21 agreement, bytes vs n) and ``comm_vs_loss.png``.

    nice -n 10 timeout 7200 python benchmarks/comm_vs_loss.py              # the full run (~45 min on 2 cores: tune
                                                                            # ~2, real ~17, local ~20, sim ~3)
    python benchmarks/comm_vs_loss.py --parts real --only demo --append  # rerun a method (keeps the LR choice)
    nice -n 10 python benchmarks/comm_vs_loss.py --parts local --append     # the local-step sweep alone
    python benchmarks/comm_vs_loss.py --smoke                               # seconds; used by the tests
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent))
# server topology: ranks that serve no layer never step their optimizer, so their LR scheduler warns; harmless
warnings.filterwarnings("ignore", ".*lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`.*")
warnings.filterwarnings("ignore", ".*all_gather_into_tensor` is deprecated.*")

import common as C  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

# ----------------------------------------------------------------------------------------------- the method lists
REF = {
    "kind": "ef21",
    "topology": "sharded",
    "uplink": "identity",
    "downlink": "identity",
    "optimizer": "lmo",
    "budget_mult": 1,
    "reference": True,
}
BEST = "@best_sharded"  # a downlink resolved during the run: the sharded candidate with the fewest bytes to target
#: methods dropped from the earlier list (docs/benchmarks.md), and why
DROPPED = {
    "ef21_muon_sharded up=top_k:0.1+natural down=identity": "the same arithmetic as ef21_muon_allgather "
    "up=top_k:0.1+natural (a dense downlink makes X = W in every topology: identical curves); the allgather run is "
    "kept (it is also EF21Config(topology='allgather')'s default) and is the dense-downlink baseline of the downlink "
    "candidates",
    "ef21_muon_sharded and ef21_muon_allgather up=top_k:0.1 down=identity": "plain top_k:0.1 sends the same "
    "indices as the default top_k:0.1+natural with 4x the value bytes and was dominated by it (6.0x vs 11.6x fewer "
    "uplink bytes to target); the one allgather compressed run is now the default uplink's (run-time budget)",
    "ef21_muon_sharded up=natural down=identity": "natural alone compresses 3.5x (388992 B/step) and is dominated by "
    "its combination top_k:0.1+natural (the default); natural stays among the downlink candidates",
    "ef21_muon_sharded/server up=top_k:0.1 down=top_k:0.5": "replaced by the downlink candidates on the default uplink "
    "(top_k:0.5 among them) and the best candidate in the server topology",
    "ddp_powersgd_r1_adamw": "never reached the target (final 2.877 vs 2.689); PowerSGD is kept as r4 + LMO",
    "ddp_powersgd_r4_adamw": "dominated by ddp_powersgd_r4_lmo (1075 vs 575 steps to target, same bytes per step)",
}


def ef21(topology: str, up: str, down: str = "identity", mult: float | None = None) -> dict[str, Any]:
    return {
        "kind": "ef21",
        "topology": topology,
        "uplink": up,
        "downlink": down,
        "optimizer": "lmo",
        "budget_mult": mult,
    }


def ddp(opt: str, rank: int | None = None, mult: float | None = None) -> dict[str, Any]:
    return {
        "kind": "ddp",
        "optimizer": opt,
        "psgd_rank": rank,
        "uplink": "dense_fp32" if not rank else f"powersgd:{rank}",
        "downlink": "identity",
        "budget_mult": mult,
    }


ADAMW_REF = dict(ddp("adamw"), adamw_reference=True)  # its loss at the reference budget defines target_adamw


_T = TypeVar("_T")


def _dedupe(xs: list[_T]) -> list[_T]:
    return list(dict.fromkeys(xs))


def downlink_candidates(smoke: bool) -> list[str]:
    """Downlinks tried on the default uplink (sharded): the package default and the issue's candidates."""
    if smoke:
        return _dedupe([C.default_matrix_spec("downlink"), "rank:4"])
    return _dedupe(
        [C.default_matrix_spec("downlink"), "top_k:0.5", "top_k:0.2", "top_k:0.1+natural", "rank:4", "natural"]
    )


def real_methods(smoke: bool) -> list[dict[str, Any]]:
    """The 2-process runs in order: the reference first, then DDP + AdamW (so both targets are known before the
    runs that stop at them), the uncompressed runs, the uplink sweep, the downlink candidates on the default uplink
    (sharded) and the best of them in the server topology, then the peers."""
    up = C.default_matrix_spec("uplink")
    downs = [ef21("sharded", up, d) for d in downlink_candidates(smoke)] + [ef21("server", up, BEST)]
    peers = [ddp("muon"), ddp("lmo", 4), C.demo_spec()]
    head = [
        REF,
        ADAMW_REF,
        ef21("allgather", "identity", mult=1),
        ef21("server", "identity", mult=1),
        ddp("lmo", mult=1),
    ]
    if smoke:
        return [*head, *downs, *peers]
    uplinks = [ef21("sharded", u) for u in _dedupe(["top_k:0.05", "rank:4"]) if u != up]
    # a stronger uplink (top_k:0.05 sends ceil(log2 d)-bit indices, below the 1-bit-per-entry bitmap of top_k:0.1)
    # with a downlink as strong as itself or as the default uplink
    stronger = [ef21("sharded", "top_k:0.05+natural", d) for d in ("top_k:0.05+natural", "top_k:0.1+natural")]
    return [*head, *uplinks, ef21("allgather", up), *downs, *peers, *stronger]


def tune_methods() -> list[dict[str, Any]]:
    """The peers whose LR the ``tune`` part picks (ddp_lmo's choice also sets every EF21-Muon run's LR: the same
    LMO optimizer, and uncompressed EF21-Muon is DDP + LMO)."""
    return [ddp("adamw"), ddp("muon"), ddp("lmo", 4), C.demo_spec(), ddp("lmo")]


def tune_key(spec: dict[str, Any]) -> str:
    """Which tuned LR a run uses: its own method's, or ddp_lmo's for EF21-Muon."""
    return "ddp_lmo" if spec["kind"] == "ef21" else C.method_name(spec)


def with_lr(methods: list[dict[str, Any]], chosen: dict[str, Any]) -> list[dict[str, Any]]:
    """Copies of ``methods`` with ``lr_mult`` from the tune choice (1 where none); DiLoCo keeps the multiplier of
    the local part's own grid (already in its spec)."""
    return [
        m if m["kind"] == "diloco" else dict(m, lr_mult=chosen.get(tune_key(m), {}).get("lr_mult", 1.0))
        for m in methods
    ]


def sim_methods(smoke: bool) -> list[dict[str, Any]]:
    sim = lambda up, down="identity", mult=None, ref=False: {  # noqa: E731
        "kind": "ef21",
        "topology": "sim",
        "uplink": up,
        "downlink": down,
        "optimizer": "lmo",
        "budget_mult": mult,
        "reference": ref,
    }
    if smoke:
        return [sim("identity", mult=1, ref=True), sim("top_k:0.1", "top_k:0.5")]
    return [sim("identity", mult=1, ref=True), sim("top_k:0.1", "top_k:0.5")]


# ----------------------------------------------------------------------------------------------- local steps
SYNC_EVERY = (1, 8, 32)  # H of the local-step sweep (``local`` part); smoke: SMOKE_SYNC_EVERY
SMOKE_SYNC_EVERY = (1, 4)
#: a stronger uplink than the package default with a compressed downlink (the third compressor of the sweep)
AGGRESSIVE = ("top_k:0.02+natural", "top_k:0.05+natural")
#: outer Nesterov steps (outer_lr, outer_momentum) tried per H for EF21-Muon and DiLoCo alike: the paper's (0.7, 0.9),
#: a lighter momentum, and plain averaging of the workers' models (lr 1, momentum 0: local SGD / FedAvg). The paper's
#: momentum extrapolates a consistent delta ~1/(1 - 0.9) = 10x; it was tuned for H = 500 on far longer runs
NESTEROV_GRID: tuple[tuple[float, float], ...] = ((0.7, 0.9), (0.7, 0.5), (1.0, 0.0))
#: EF21-Muon's outer steps per H (identity compressors; the choice is used for every compressor at that H): the
#: Nesterov grid and the LMO rule on the aggregate at its default step (H inner radii, outer_lr None) and at H/2
EF21_OUTER_GRID: tuple[dict[str, Any], ...] = (
    *({"outer": "nesterov", "outer_lr": lr, "outer_momentum": mu} for lr, mu in NESTEROV_GRID),
    {"outer": "lmo", "outer_lr": None, "outer_momentum": None},
    {"outer": "lmo", "outer_lr": 0.5, "outer_momentum": None},  # x H (an lmo outer_lr counts inner radii)
)
#: DiLoCo's inner AdamW LR multipliers (× common.ADAMW_LR): the tune part's grid one step lower, as AdamW won at its
#: low edge there (ddp_adamw ×1/3)
DILOCO_LR_GRID: tuple[float, ...] = (1 / 9, 1 / 3, 1.0)
#: DiLoCo's outer steps per H, each with every inner LR of DILOCO_LR_GRID
DILOCO_OUTER_GRID: tuple[dict[str, Any], ...] = tuple(
    {"outer_lr": lr, "outer_momentum": mu} for lr, mu in NESTEROV_GRID
)


def local_pairs(smoke: bool) -> list[tuple[str, str]]:
    """(uplink, downlink) of the local-step sweep: uncompressed, the package default (``EF21Config()``'s matrix
    compressors) and, in the full run, :data:`AGGRESSIVE`."""
    pairs = [("identity", "identity"), (C.default_matrix_spec("uplink"), C.default_matrix_spec("downlink"))]
    return _dedupe(pairs if smoke else [*pairs, AGGRESSIVE])


def _outer_for(H: int, o: dict[str, Any]) -> dict[str, Any]:
    """A grid entry of :data:`EF21_OUTER_GRID` at this H (the lmo entry with a fraction is that fraction × H)."""
    lr = o["outer_lr"]
    if o["outer"] == "lmo" and lr is not None:
        lr = lr * H
    return {"outer": o["outer"], "outer_lr": lr, "outer_momentum": o["outer_momentum"]}


def local_tune_methods(smoke: bool) -> list[dict[str, Any]]:
    """The grid of the local part's tune step: per H > 1, EF21-Muon (identity, sharded) with each outer step of
    :data:`EF21_OUTER_GRID` (inner LR: ddp_lmo's choice, set by the caller) and DiLoCo with each outer step of
    :data:`DILOCO_OUTER_GRID` (its inner LR multiplier is crossed with the LR grid by the caller)."""
    Hs = [H for H in (SMOKE_SYNC_EVERY if smoke else SYNC_EVERY) if H > 1]
    grid = EF21_OUTER_GRID[::3] if smoke else EF21_OUTER_GRID  # smoke: nesterov (0.7, 0.9) and lmo (H)
    dgrid = DILOCO_OUTER_GRID[:1] if smoke else DILOCO_OUTER_GRID
    ef = [dict(ef21("sharded", "identity"), sync_every=H, **_outer_for(H, o)) for H in Hs for o in grid]
    return ef + [C.diloco_spec(H, **o) for H in Hs for o in dgrid]


def choose_local(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (family, H) the grid row with the lowest validation loss (non-finite = +inf; ties: the first row):
    ``ef21_h<H>`` → its outer options, ``diloco_h<H>`` → its outer options and inner LR multiplier."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        family = "diloco" if r["method"].startswith("diloco") else "ef21"
        groups.setdefault(f"{family}_h{r['sync_every']}", []).append(r)
    best = {k: min(rs, key=_val_loss) for k, rs in groups.items()}
    return {k: {x: r.get(x) for x in (*C.OUTER_KEYS, "lr_mult", "lrs", "val_loss")} for k, r in best.items()}


def local_methods(smoke: bool, chosen: dict[str, Any]) -> list[dict[str, Any]]:
    """The local part's 2-process runs: the reference, DDP + AdamW and DDP + LMO first (both targets and the DDP
    byte baseline, rerun: every-step runs must be unchanged), then EF21-Muon (sharded) at each H × each compressor
    pair of :func:`local_pairs` (H > 1 with the outer step ``chosen[ef21_h<H>]``; (identity, H = 1) is the
    reference itself), then DiLoCo at each H > 1 (``chosen[diloco_h<H>]``). LR multipliers are set by the caller
    (:func:`with_lr`) except DiLoCo's, which comes from ``chosen``."""
    head = [REF, ADAMW_REF, ddp("lmo", mult=1)]
    Hs = SMOKE_SYNC_EVERY if smoke else SYNC_EVERY
    runs = []
    for H in Hs:
        for up, down in local_pairs(smoke):
            if H == 1 and up == down == "identity":
                continue
            spec = ef21("sharded", up, down)
            if H > 1:
                o = chosen.get(f"ef21_h{H}", {"outer": "nesterov"})
                spec.update(sync_every=H, **{k: o.get(k) for k in C.OUTER_KEYS})
            runs.append(spec)
    for H in Hs:
        if H > 1:
            o = chosen.get(f"diloco_h{H}", {})
            runs.append(
                dict(
                    C.diloco_spec(H, outer_lr=o.get("outer_lr"), outer_momentum=o.get("outer_momentum")),
                    lr_mult=o.get("lr_mult", 1.0),
                )
            )
    return [*head, *runs]


def demo_meta(task: C.Task) -> dict[str, Any]:
    """What the DeMo peer is and how its bytes are counted (benchmarks/demo_peer.py)."""
    import demo_peer

    model = C.build_model(task)
    shapes = [p.shape for p in model.parameters()]
    b = demo_peer.payload_bytes(shapes, C.DEMO_TOPK, C.DEMO_CHUNK)
    return {
        "source": "benchmarks/demo_peer.py: implemented from the paper's Algorithm 1; not the authors' code",
        "paper": demo_peer.PAPER,
        "beta": C.DEMO_BETA,
        "topk": C.DEMO_TOPK,
        "chunk": C.DEMO_CHUNK,
        "lr_default": C.DEMO_LR,
        "update": "theta <- theta - lr * sign(Q), Q = mean over workers of IDCT(q_j); weight decay 0",
        "parameters": "every parameter (as the paper): matrices in chunks of the largest divisors <= 64 of "
        "(shape[0], numel/shape[0]); 1-D tensors (RMSNorm gains) as one row in chunks of the largest divisor "
        "<= 64 of their length (96 -> 48), k = min(32, chunk numel)",
        "byte_rule": "per worker per step = sum over chunks of k * (4 B fp32 value + 2 B int16 index): the exact "
        "size of the uint8 buffer handed to torch.distributed.all_gather (int16 indices travel as bytes; gloo "
        "has no int16). Downlink 0 (every worker decodes the gathered q's itself), like the DDP rule",
        "bytes_per_step": b,
        "packed_index_bytes_per_step": demo_peer.packed_bits_bytes(shapes, C.DEMO_TOPK, C.DEMO_CHUNK),
        "packed_index_rule": "indices at ceil(log2(chunk numel)) bits (12 for 64x64): reported, not sent",
        "dense_fp32_bytes_per_step": C.fp32_bytes(model),
        "ratio_vs_dense": C.fp32_bytes(model) / b,
    }


def diloco_meta(task: C.Task) -> dict[str, Any]:
    """What the DiLoCo peer is and how its bytes are counted (benchmarks/diloco_peer.py)."""
    import diloco_peer

    numel = C.n_params(C.build_model(task))
    return {
        "source": "benchmarks/diloco_peer.py: implemented from the paper's Algorithm 1; not the authors' code",
        "paper": diloco_peer.PAPER,
        "inner": "AdamW (betas 0.9, 0.95, weight decay 0; LR common.ADAMW_LR x the local tune's multiplier), the "
        "same warm-up-then-constant schedule as every method; inner state kept on the worker across rounds",
        "outer": "Nesterov SGD on the averaged pseudo-gradient (theta_start - theta_j): b <- mu b + D; theta <- "
        "theta - lr (D + mu b) (torch.optim.SGD nesterov=True); the paper's lr 0.7, mu 0.9, the local tune's grid",
        "paper_outer_lr": diloco_peer.OUTER_LR,
        "paper_outer_momentum": diloco_peer.OUTER_MOMENTUM,
        "byte_rule": "per worker per round = 4 * numel: the flat fp32 buffer handed to torch.distributed.all_reduce "
        "(the DDP peers' rule: an all-reduce counted as one dense fp32 send per worker, downlink 0; at n = 2 a ring "
        "all-reduce sends exactly this much per worker and receives as much); 0 on inner steps",
        "bytes_per_round": diloco_peer.round_bytes(numel),
        "upload_download_bytes_per_round": diloco_peer.round_bytes(numel, download=True),
        "evaluated_at": "the shared model theta of the last finished round",
    }


# ----------------------------------------------------------------------------------------------- training loops
def _curve_point(step: int, up: int, down: int, loss: float, t0: float) -> dict[str, Any]:
    return {
        "step": step,
        "uplink_bytes_per_worker": up,
        "downlink_bytes_total": down,
        "val_loss": loss,
        "seconds": time.perf_counter() - t0,
    }


def _bytes_to(curve: list[dict[str, Any]], target: float | None) -> float | None:
    """Uplink per worker + downlink received per worker (the server side's downlink messages) to ``target``."""
    hit = C.bytes_to_target(curve, target) if target is not None else None
    return hit["uplink_bytes_per_worker"] + hit["downlink_bytes_total"] if hit else None


def resolve_best(spec: dict[str, Any], done: list[dict[str, Any]], target: float | None) -> dict[str, Any] | None:
    """``spec`` with downlink ``BEST`` replaced by the sharded run on the same uplink with a compressed downlink and
    the fewest uplink + downlink bytes to the target (the lowest final loss when none reached it); None: no such run."""
    cands = [
        r
        for r in done
        if r["spec"]["kind"] == "ef21"
        and r["spec"]["topology"] == "sharded"
        and r["spec"]["uplink"] == spec["uplink"]
        and r["spec"]["downlink"] not in ("identity", BEST)
    ]
    if not cands:
        return None
    reached = [r for r in cands if _bytes_to(r["curve"], target) is not None]
    best = (
        min(reached, key=lambda r: _bytes_to(r["curve"], target))
        if reached
        else min(cands, key=lambda r: r["curve"][-1]["val_loss"])
    )
    return dict(
        spec,
        downlink=best["spec"]["downlink"],
        downlink_choice=f"{BEST}: the sharded run on this uplink with the fewest uplink + downlink bytes to "
        "target (lowest final loss if none reached it)",
    )


def train_real(
    rank: int,
    world: int,
    methods: list[dict[str, Any]],
    task: C.Task,
    budget_mult: float,
    early_stop: bool,
    partial: str | None = None,
) -> list[dict[str, Any]]:
    """Runs every method in turn inside the 2-process group (rank 0 returns the records). A run stops early (with
    ``early_stop``, not before the reference's step count) once it reached both targets known so far."""
    import torch.distributed as dist

    data = C.Data(task)
    val = data.val_batches(rank, world)
    target = target_adamw = None
    out = []
    for spec in methods:
        if spec["downlink"] == BEST:
            box = [resolve_best(spec, out, target)]
            dist.broadcast_object_list(box, src=0)  # the same choice on every rank
            if box[0] is None:
                continue
            spec = box[0]
        mult = spec["budget_mult"] or budget_mult
        budget = round(task.steps * mult)
        r = C.Runner(spec, task)
        curve, up, down = [], 0, 0
        hit, hit_a = False, False
        rounds: list[tuple[int, int, int]] = []  # local-step runs: (step, uplink, downlink bytes) of each sync
        inner_steps, inner_bytes_max = 0, 0
        t0 = time.perf_counter()
        curve.append(_curve_point(0, 0, 0, r.val_loss(val), t0))
        bar = tqdm(range(budget), desc=C.label(spec)[:48], unit="step", disable=rank != 0, leave=False, mininterval=10)
        for s in bar:
            loss = r.step(data.batch(s, rank, world))
            up += r.last_uplink_bytes
            down += r.last_downlink_bytes
            if r.local and r.last_synced:
                rounds.append((s + 1, r.last_uplink_bytes, r.last_downlink_bytes))
            elif r.local:
                inner_steps += 1
                inner_bytes_max = max(inner_bytes_max, r.last_uplink_bytes + r.last_downlink_bytes)
            if (s + 1) % task.val_every == 0 or s + 1 == budget:
                v = r.val_loss(val)
                curve.append(_curve_point(s + 1, up, down, v, t0))
                bar.set_postfix(train=f"{loss:.3f}", val=f"{v:.3f}")
                hit = hit or (target is not None and v <= target)
                hit_a = hit_a or target_adamw is None or v <= target_adamw
                # stop once the targets are reached, but not before the uncompressed step count (loss at it is reported)
                if early_stop and hit and hit_a and s + 1 >= task.steps:
                    break
        seconds = time.perf_counter() - t0
        rec = {
            "spec": spec,
            "curve": curve,
            "budget_steps": budget,
            "steps": curve[-1]["step"],
            "seconds": seconds,
            "train_seconds_per_step": None,
            "base_lrs": r.base_lrs,
        }
        if r.engine is not None:
            rec["ledger"] = r.engine.ledger.summary()
        if r.counter is not None:
            rec["powersgd_measured_hook_bytes"] = r.counter.bytes
            rec["powersgd_analytic_bytes"] = sum(r.psgd if i >= 2 else r.dense for i in range(r.step_count))
            rec["powersgd_state_iter"] = r.psgd_state.iter
        if r.local:  # every sync step with its bytes; inner steps must have sent nothing
            rec["local"] = {
                "sync_every": spec["sync_every"],
                "round_steps": [x[0] for x in rounds],
                "round_uplink_bytes": [x[1] for x in rounds],
                "round_downlink_bytes": [x[2] for x in rounds],
                "inner_steps": inner_steps,
                "inner_step_bytes_max": inner_bytes_max,
            }
            if r.engine is not None:
                rec["local"]["outer_step_size"] = r.engine.config.outer_step_size
        if r.diloco is not None:
            rec["diloco_bytes_per_round"] = r.diloco.bytes_per_round
        if spec["kind"] == "demo":
            rec["demo_bytes_per_step"] = r.opt.bytes_per_step
            rec["demo_measured_bytes_total"] = up
            rec["demo_packed_bits_bytes_per_step"] = r.opt.packed_bits_bytes_per_step
        if spec["uplink"] == "identity" or (
            spec["kind"] == "ddp" and spec["optimizer"] == "lmo" and not spec.get("psgd_rank")
        ):
            rec["final_params"] = {k: v.float() for k, v in r.final_params().items()}
        rec["state_bytes"] = r.state_bytes()
        rec["peak_rss_mb"] = C.peak_rss_mb()
        r.close()
        if spec.get("reference"):
            target = curve[-1]["val_loss"] * 1.01
        if spec.get("adamw_reference"):
            target_adamw = C.loss_at_step(curve, task.steps) * 1.01
        out.append(rec)
        if partial and rank == 0:  # survives a timeout: --from-partial summarises what finished
            torch.save(out, partial)
    return out if rank == 0 else []


def train_grid(rank: int, world: int, specs: list[dict[str, Any]], task: C.Task, steps: int) -> list[dict[str, Any]]:
    """Each fully specified run (``lr_mult`` and any outer options set) for ``steps`` steps (same schedule shape);
    its validation loss at the end (at X). Rank 0 returns one row per spec."""
    data = C.Data(task)
    val = data.val_batches(rank, world)
    out = []
    for spec in specs:
        m = spec.get("lr_mult") or 1.0
        r = C.Runner(spec, task)
        t0 = time.perf_counter()
        for s in range(steps):
            r.step(data.batch(s, rank, world))
        v = r.val_loss(val)
        out.append(
            {
                "method": C.method_name(spec),
                "label": C.label(spec),
                "lr_mult": m,
                "base_lrs": [x / m for x in r.base_lrs],
                "lrs": r.base_lrs,
                "steps": steps,
                "val_loss": v,
                "seconds": time.perf_counter() - t0,
            }
        )
        for k in ("sync_every", *C.OUTER_KEYS):
            if spec.get(k) is not None:
                out[-1][k] = spec[k]
        r.close()
        if rank == 0:
            print(f"tune {C.label(spec)[:60]:<60} lr x{m:<6.3g} val {v:.4f} ({out[-1]['seconds']:.0f} s)", flush=True)
    return out if rank == 0 else []


def run_real(
    methods: list[dict[str, Any]],
    task: C.Task,
    args: argparse.Namespace,
    partial_name: str,
    meta: dict[str, Any],
    part: str,
) -> list[dict[str, Any]]:
    """``methods`` in 2 real processes (``train_real``), each finished record kept in ``partial_name`` under the
    scratch directory; with ``--from-partial`` the records of an interrupted run instead (noted in ``meta``)."""
    partial = C.TMP / "comm_vs_loss" / partial_name
    if args.from_partial:
        recs = torch.load(partial, weights_only=False)
        key = "partial" if part == "real" else f"{part}_partial"
        meta[key] = f"interrupted run: {len(recs)} of {len(methods)} {part} methods finished"
        return recs
    return C.run_processes(
        train_real,
        2,
        C.TMP / "comm_vs_loss",
        methods=methods,
        task=task,
        budget_mult=args.budget_mult,
        early_stop=not args.full_budget,
        partial=str(partial),
    )[0]


def train_tune(
    rank: int, world: int, methods: list[dict[str, Any]], grid: list[float], task: C.Task, steps: int
) -> list[dict[str, Any]]:
    """Each method at each LR multiplier for ``steps`` steps (same schedule shape); validation loss at the end."""
    return train_grid(rank, world, [dict(spec, lr_mult=m) for spec in methods for m in grid], task, steps)


def _val_loss(row: dict[str, Any]) -> float:
    """A grid row's validation loss for choosing: non-finite (a diverged run) counts as +inf."""
    import math

    return row["val_loss"] if math.isfinite(row["val_loss"]) else math.inf


def choose_lrs(grid_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per method the multiplier with the lowest validation loss (non-finite counts as +inf; ties: the smaller LR)."""
    chosen = {}
    for name in dict.fromkeys(r["method"] for r in grid_rows):
        rows = [r for r in grid_rows if r["method"] == name]
        best = min(rows, key=lambda r: (_val_loss(r), r["lr_mult"]))
        chosen[name] = {
            "lr_mult": best["lr_mult"],
            "lrs": best["lrs"],
            "base_lrs": best["base_lrs"],
            "val_loss": best["val_loss"],
        }
    return chosen


def agreement_trace(rank: int, world: int, task: C.Task, steps: int, every: int) -> list[dict[str, Any]]:
    """Uncompressed EF21-Muon (sharded) and DDP + the same LMO optimizer in lockstep on the same batches: the max
    |weight difference| every ``every`` steps (shows whether a gap is rounding amplified over time or a real
    difference: the latter would appear at once)."""
    data = C.Data(task)
    a = C.Runner(REF, task)
    b = C.Runner(
        {"kind": "ddp", "optimizer": "lmo", "psgd_rank": None, "uplink": "dense_fp32", "downlink": "identity"}, task
    )
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


def train_sim(
    methods: list[dict[str, Any]], task: C.Task, n: int, budget_mult: float, early_stop: bool
) -> list[dict[str, Any]]:
    import ef_lightning as efl

    data = C.Data(task)
    val = data.val_batches()
    target = None
    out = []
    for spec in methods:
        mult = spec["budget_mult"] or budget_mult
        budget = round(task.steps * mult)
        model = C.build_model(task)
        opt = C.build_optimizer(model, "lmo", task, spec.get("lr_mult") or 1.0)
        sched = C.warmup_scheduler(opt, task)
        sim = efl.Simulator(
            model,
            opt,
            n_workers=n,
            uplink=C.role_spec(spec["uplink"]),
            downlink=C.role_spec(spec["downlink"]),
            seed=task.seed,
        )
        t0 = time.perf_counter()
        curve, up, down = [_curve_point(0, 0, 0, C.evaluate(model, val), t0)], 0, 0
        bar = tqdm(
            range(budget),
            desc=f"sim n={n} {spec['uplink']}/{spec['downlink']}",
            unit="step",
            leave=False,
            mininterval=10,
        )
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
        out.append(
            {
                "spec": spec,
                "curve": curve,
                "budget_steps": budget,
                "steps": curve[-1]["step"],
                "seconds": time.perf_counter() - t0,
                "ledger": sim.ledger.summary(),
                "base_lrs": C.base_lrs(opt),
            }
        )
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
            rows.append(
                {
                    "method": "ef21_muon_sim",
                    "uplink": spec,
                    "downlink": down,
                    "n_workers": n,
                    "uplink_bytes_per_worker_per_step": last.uplink_wire_bytes,
                    "uplink_bits_per_worker_per_step": last.uplink_bits,
                    "downlink_bytes_per_step": last.downlink_wire_bytes,
                    "sharded_bytes_sent_per_rank_per_step": last.uplink_wire_bytes + last.downlink_wire_bytes / n,
                    "dense_bytes_per_worker_per_step": dense,
                    "uplink_ratio_vs_dense": dense / last.uplink_wire_bytes,
                }
            )
            sim.detach()
            # restore the model's parameters (the Simulator stepped it)
            model = C.build_model(task)
    for n in ns:
        rows.append(
            {
                "method": "ddp",
                "uplink": "dense_fp32",
                "downlink": "(all-reduce)",
                "n_workers": n,
                "uplink_bytes_per_worker_per_step": dense,
                "ring_allreduce_bytes_sent_per_worker_per_step": 2 * (n - 1) / n * dense,
                "dense_bytes_per_worker_per_step": dense,
                "uplink_ratio_vs_dense": 1.0,
            }
        )
        for r in psgd_ranks:
            b = C.powersgd_bytes_per_step(model, r)
            rows.append(
                {
                    "method": f"ddp_powersgd_r{r}",
                    "uplink": f"powersgd:{r}",
                    "downlink": "(all-reduce)",
                    "n_workers": n,
                    "uplink_bytes_per_worker_per_step": b,
                    "dense_bytes_per_worker_per_step": dense,
                    "uplink_ratio_vs_dense": dense / b,
                }
            )
    return rows


# ----------------------------------------------------------------------------------------------- summarising
GOAL_RULE = (
    "issue 14: bytes-to-target (uplink + downlink per worker, total_bytes_to_target_per_worker) of the best "
    "EF21-Muon run (any sync_every, n = 2) >= 100x below the uncompressed data-parallel Gluon run (the reference: "
    "EF21-Muon sharded, identity, sync_every 1, counted uplink + downlink like every EF21 run), and below the best "
    "DiLoCo run's at the same target (DiLoCo counted by the DDP rule: its all-reduce = one dense fp32 send per worker "
    "per round, downlink 0; diloco_upload_download_bytes counts the averaged delta received as well). Both targets."
)
TOTAL_RULE = (
    "total bytes to a target per worker = uplink bytes it sent + downlink bytes it received (the server "
    "side's downlink messages, downlink_bytes_total); total_saving_vs_uncompressed = that of the same "
    "topology's uncompressed EF21-Muon run (up=identity down=identity; the Simulator's for sim) / this "
    "run's. DDP-family peers (DDP+AdamW/Muon/LMO, PowerSGD, DeMo) are compared with ddp_lmo (the uncompressed "
    "DDP run) by the DDP rule: all-reduce counted as one dense fp32 send per worker per step (numel*4 B), "
    "downlink 0; PowerSGD: r(m+n) fp32 per compressed matrix; DeMo: the bytes of its all_gather buffer, "
    "downlink 0. Suffix _adamw: the same at target_adamw."
)


def summarise(
    records: list[dict[str, Any]], n: int, task: C.Task, model_bytes: int, seed: int, tokens_per_step: int
) -> list[dict[str, Any]]:
    ref = next(r for r in records if r["spec"].get("reference"))
    target = ref["curve"][-1]["val_loss"] * 1.01
    adamw = next((r for r in records if r["spec"].get("adamw_reference")), None)
    targets = {"": target, "_adamw": C.loss_at_step(adamw["curve"], task.steps) * 1.01 if adamw is not None else None}
    same_topo_ref = {
        r["spec"]["topology"]: r
        for r in records
        if r["spec"]["kind"] == "ef21"
        and r["spec"]["uplink"] == "identity"
        and r["spec"]["downlink"] == "identity"
        and not C.local_options(r["spec"])
    }
    ddp_ref = next(
        (
            r
            for r in records
            if r["spec"]["kind"] == "ddp" and r["spec"]["optimizer"] == "lmo" and not r["spec"].get("psgd_rank")
        ),
        None,
    )
    runs = []
    for r in records:
        spec, curve = r["spec"], r["curve"]
        row = {
            "method": "ef21_muon_sim" if spec.get("topology") == "sim" else C.method_name(spec),
            "label": C.label(spec),
            "topology": spec.get("topology", "allreduce"),
            "optimizer": spec["optimizer"],
            "uplink": spec["uplink"],
            "downlink": spec["downlink"],
            "default": C.is_default(spec),
            "default_compressors": C.is_default(spec, topology=False),
            "n_workers": n,
            "seed": seed,
            "lr_mult": spec.get("lr_mult", 1.0),
            "lrs": r.get("base_lrs"),
            "budget_steps": r["budget_steps"],
            "budget_tokens": r["budget_steps"] * tokens_per_step,
            "reference_steps": task.steps,
            "steps": r["steps"],
            "tokens_per_step": tokens_per_step,
            "final_val_loss": curve[-1]["val_loss"],
            "target_val_loss": target,
            "target_adamw_val_loss": targets["_adamw"],
            "val_loss_at_reference_steps": C.loss_at_step(curve, task.steps),
        }
        if "downlink_choice" in spec:
            row["downlink_choice"] = spec["downlink_choice"]
        row["sync_every"] = C.sync_every(spec)
        if row["sync_every"] > 1:
            row.update({k: spec.get(k) for k in C.OUTER_KEYS})
        base = same_topo_ref.get(spec.get("topology")) if spec["kind"] == "ef21" else ddp_ref
        for sfx, tgt in targets.items():
            hit = C.bytes_to_target(curve, tgt) if tgt is not None else None
            hit_ref = C.bytes_to_target(ref["curve"], tgt) if tgt is not None else None
            tot, base_tot = _bytes_to(curve, tgt), _bytes_to(base["curve"], tgt) if base is not None else None
            ref_tot = _bytes_to(ref["curve"], tgt)
            row.update(
                {
                    f"reached_target{sfx}": hit is not None,
                    f"steps_to_target{sfx}": hit["step"] if hit else None,
                    f"seconds_to_target{sfx}": hit["seconds"] if hit else None,
                    f"bytes_to_target{sfx}_per_worker": hit["uplink_bytes_per_worker"] if hit else None,
                    f"bytes_to_target{sfx}_model_sizes": hit["uplink_bytes_per_worker"] / model_bytes if hit else None,
                    f"downlink_bytes_to_target{sfx}": hit["downlink_bytes_total"] if hit else None,
                    f"total_bytes_to_target{sfx}_per_worker": tot,
                    f"saving_vs_uncompressed{sfx}": (
                        hit_ref["uplink_bytes_per_worker"] / hit["uplink_bytes_per_worker"]
                    )
                    if hit and hit_ref and hit["uplink_bytes_per_worker"]
                    else None,
                    f"total_saving_vs_uncompressed{sfx}": base_tot / tot if tot and base_tot else None,
                    f"total_ratio_vs_dp_gluon{sfx}": ref_tot / tot if tot and ref_tot else None,
                }
            )
            if "local" in r:  # outer rounds up to the validation that reached the target
                row[f"outer_rounds_to_target{sfx}"] = (
                    sum(st <= hit["step"] for st in r["local"]["round_steps"]) if hit else None
                )
        row.update(
            {
                "uplink_bytes_total_per_worker": curve[-1]["uplink_bytes_per_worker"],
                "downlink_bytes_total": curve[-1]["downlink_bytes_total"],
                "seconds": r["seconds"],
                "val_curve": curve,
            }
        )
        for k in (
            "ledger",
            "powersgd_measured_hook_bytes",
            "powersgd_analytic_bytes",
            "powersgd_state_iter",
            "demo_bytes_per_step",
            "demo_measured_bytes_total",
            "diloco_bytes_per_round",
            "local",
            "demo_packed_bits_bytes_per_step",
            "state_bytes",
            "peak_rss_mb",
        ):
            if k in r:
                row[k] = r[k]
        runs.append(row)
    return runs


def goal_issue14(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue-14 goal (:data:`GOAL_RULE`) from the n = 2 records, at both targets; {} without the reference."""
    rs = [r for r in runs if r["n_workers"] == 2]
    ref = next(
        (
            r
            for r in rs
            if r["method"] == "ef21_muon_sharded"
            and r["uplink"] == r["downlink"] == "identity"
            and C.sync_every(r) == 1
        ),
        None,
    )
    ddp_lmo = next((r for r in rs if r["method"] == "ddp_lmo"), None)
    if ref is None:
        return {}
    out: dict[str, Any] = {"rule": GOAL_RULE}
    for sfx in ("", "_adamw"):
        key = f"total_bytes_to_target{sfx}_per_worker"
        ours = [r for r in rs if r["method"].startswith("ef21_muon_") and r.get(key)]
        dil = [r for r in rs if r["method"].startswith("diloco_")]
        dil_hit = [r for r in dil if r.get(key)]
        best = min(ours, key=lambda r: r[key]) if ours else None
        dbest = min(dil_hit, key=lambda r: r[key]) if dil_hit else None
        g: dict[str, Any] = {
            "reference": ref["label"],
            "reference_bytes": ref[key],
            "ddp_lmo_bytes_ddp_rule": ddp_lmo[key] if ddp_lmo else None,
            "best": best["label"] if best else None,
            "best_bytes": best[key] if best else None,
            "best_steps": best[f"steps_to_target{sfx}"] if best else None,
            "ratio_vs_dp_gluon": ref[key] / best[key] if best and ref[key] else None,
            "ratio_vs_ddp_lmo_ddp_rule": ddp_lmo[key] / best[key] if best and ddp_lmo and ddp_lmo[key] else None,
            "best_per_sync_every": {
                str(H): min((r for r in ours if C.sync_every(r) == H), key=lambda r: r[key])["label"]
                for H in sorted({C.sync_every(r) for r in ours})
            },
            "diloco_runs": [r["label"] for r in dil],
            "diloco_reached": [r["label"] for r in dil_hit],
            "diloco_best": dbest["label"] if dbest else None,
            "diloco_best_bytes": dbest[key] if dbest else None,
            "diloco_best_upload_download_bytes": 2 * dbest[key] if dbest else None,
            "diloco_final_losses": {r["label"]: r["final_val_loss"] for r in dil},
        }
        g["met_100x"] = bool(g["ratio_vs_dp_gluon"] and g["ratio_vs_dp_gluon"] >= 100)
        if best and dbest:
            g["ratio_vs_diloco"] = dbest[key] / best[key]
            g["ratio_vs_diloco_upload_download"] = 2 * dbest[key] / best[key]
            g["beats_diloco"] = best[key] < dbest[key]
        else:  # DiLoCo never reached the target: ours beats it when ours did
            g["ratio_vs_diloco"] = g["ratio_vs_diloco_upload_download"] = None
            g["beats_diloco"] = bool(best) and bool(dil) and not dil_hit
        out["target" + sfx] = g
    return out


def local_table(runs: list[dict[str, Any]], goal: dict[str, Any]) -> str:
    """Markdown table of the local-step sweep (n = 2): the reference, DDP + LMO / AdamW, EF21-Muon (sharded) with
    the compressor pairs of :func:`local_pairs` at every H, and DiLoCo; bytes in MB (10^6 B) per worker, uplink +
    downlink; × = how many times fewer bytes to the same target."""
    from diloco_peer import OUTER_LR

    f = lambda v, fmt: (fmt % v) if v is not None else "—"  # noqa: E731
    pairs = set(local_pairs(False)) | set(local_pairs(True))
    dil = {k: goal.get("target" + k, {}).get("diloco_best_bytes") for k in ("", "_adamw")}
    lines = [
        "| method | H | outer lr/momentum | LR × | rounds→target | steps→target | MB→target (up + down) | "
        "× vs DP Gluon | × vs best DiLoCo | steps→AdamW target | MB→AdamW target | × vs DP Gluon (AdamW target) | "
        "× vs best DiLoCo (AdamW target) | final loss (steps) |",
        "|---" * 14 + "|",
    ]

    def mb(r: dict[str, Any], sfx: str) -> str:
        tot = r[f"total_bytes_to_target{sfx}_per_worker"]
        if tot is None:
            return "—"
        up = r[f"bytes_to_target{sfx}_per_worker"]
        return f"{tot / 1e6:.2f} ({up / 1e6:.2f} + {(tot - up) / 1e6:.2f})"

    def keep(r: dict[str, Any]) -> bool:
        if r["n_workers"] != 2:
            return False
        if C.sync_every(r) > 1 or r["method"] in ("ddp_lmo", "ddp_adamw"):
            return True
        return r["method"] == "ef21_muon_sharded" and (r["uplink"], r["downlink"]) in pairs

    for r in filter(keep, runs):
        H = C.sync_every(r)
        outer = "—"
        if H > 1:  # the outer step size used: EF21's from its engine config, DiLoCo's given or the paper's
            lr = r["local"].get("outer_step_size") or r.get("outer_lr") or OUTER_LR
            mom = r.get("outer_momentum")
            outer = f"{r.get('outer') or 'nesterov'} {lr:g}" + (f"/{mom:g}" if mom is not None else "")
        cells = [
            r["label"].split(" H=")[0].split(" olr=")[0],
            str(H),
            outer,
            f"{r['lr_mult']:.3g}",
            f(r.get("outer_rounds_to_target"), "%d"),
            f(r["steps_to_target"], "%d"),
            mb(r, ""),
            f(r.get("total_ratio_vs_dp_gluon"), "%.1f×"),
        ]
        tot = r["total_bytes_to_target_per_worker"]
        cells.append(f(tot and dil[""] and dil[""] / tot, "%.2f×"))
        tot_a = r["total_bytes_to_target_adamw_per_worker"]
        cells += [
            f(r["steps_to_target_adamw"], "%d"),
            mb(r, "_adamw"),
            f(r.get("total_ratio_vs_dp_gluon_adamw"), "%.1f×"),
            f(tot_a and dil["_adamw"] and dil["_adamw"] / tot_a, "%.2f×"),
            f"{r['final_val_loss']:.4f} ({r['steps']})",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def agreement(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Max |weight difference| between uncompressed EF21-Muon (each topology) and DDP + the same LMO optimizer."""
    ddp = next(
        (
            r
            for r in records
            if r["spec"]["kind"] == "ddp" and r["spec"]["optimizer"] == "lmo" and not r["spec"].get("psgd_rank")
        ),
        None,
    )
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
                "steps": r["steps"],
            }
    return out


def plot(runs: list[dict[str, Any]], path: Path, model_bytes: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def local(r: dict[str, Any]) -> bool:
        return C.sync_every(r) > 1

    def is_ref(r: dict[str, Any]) -> bool:
        return r["method"] == "ef21_muon_sharded" and r["uplink"] == "identity" and not local(r)

    up = lambda c: c["uplink_bytes_per_worker"]  # noqa: E731
    total = lambda c: c["uplink_bytes_per_worker"] + c["downlink_bytes_total"]  # noqa: E731
    n2 = [r for r in runs if r["n_workers"] == 2]
    groups = [("n = 2 gloo processes, a sync every step", [r for r in n2 if not local(r)], up, "uplink")]
    if any(map(local, n2)):
        groups.append(
            (
                "n = 2: local steps (H > 1) and DiLoCo (DDP byte rule) vs the uncompressed reference",
                [r for r in n2 if local(r) or is_ref(r) or r["method"] in ("ddp_lmo", "ddp_adamw")],
                total,
                "uplink + downlink",
            )
        )
    groups.append(("n = 4 Simulator", [r for r in runs if r["method"] == "ef21_muon_sim"], up, "uplink"))
    groups = [g for g in groups if g[1]]
    fig, axes = plt.subplots(1, len(groups), figsize=(8 * len(groups), 9), squeeze=False)
    for ax, (title, rs, xbytes, xname) in zip(axes[0], groups):
        for r in rs:
            pts = [c for c in r["val_curve"][1:] if xbytes(c) > 0]  # local steps: nothing sent before round 1
            xs = [xbytes(c) / model_bytes for c in pts]
            ys = [c["val_loss"] for c in pts]
            style = "-" if r["method"].startswith("ef21") else (":" if r["method"].startswith("diloco") else "--")
            name = r["label"].replace("ef21_muon_", "EF21 ").split(" outer=")[0]
            if r["method"].startswith("diloco"):
                name = f"DiLoCo H={r['sync_every']} (from the paper; AdamW inner)"
            name += " (default)" if r.get("default") else ""
            ax.plot(xs, ys, style, label=name, lw=2.0 if r.get("default") else 1.2)
        if rs:
            ax.axhline(rs[0]["target_val_loss"], color="k", lw=0.8, ls=":", label="target (uncompressed × 1.01)")
            if rs[0].get("target_adamw_val_loss"):
                ax.axhline(
                    rs[0]["target_adamw_val_loss"],
                    color="grey",
                    lw=0.8,
                    ls="-.",
                    label="target_adamw (DDP+AdamW at reference steps × 1.01)",
                )
        ax.set_xscale("log")
        ax.set_xlabel(f"cumulative {xname} bytes per worker / fp32 model size")
        ax.set_ylabel("validation loss at X (nats/byte)")
        ax.set_title(title)
        lo = min(r["target_val_loss"] for r in rs)
        ax.set_ylim(lo * 0.95, lo * 1.6)
        ax.legend(fontsize=6, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def only(methods: list[dict[str, Any]], keys: str | None) -> list[dict[str, Any]]:
    """``--only``: the methods whose label contains one of the comma-separated ``keys``, plus the reference, DDP +
    AdamW and DDP + LMO (the targets and the DDP byte baseline); all of them when ``keys`` is None."""
    if not keys:
        return methods
    ks = keys.split(",")
    return [
        m
        for m in methods
        if m.get("reference")
        or m.get("adamw_reference")
        or (m["kind"] == "ddp" and m["optimizer"] == "lmo" and not m.get("psgd_rank"))
        or any(k in C.label(m) for k in ks)
    ]


def run_local(
    args: argparse.Namespace,
    task: C.Task,
    chosen: dict[str, Any],
    meta: dict[str, Any],
    model_bytes: int,
    stem: str,
    out: Path,
    done: set[tuple[str, int]],
) -> list[dict[str, Any]]:
    """The ``local`` part: the outer-step grid (:func:`local_tune_methods`, DiLoCo crossed with the LR grid; on the
    reference budget, 2 processes; ``--local-tune reuse`` takes the choice from the meta JSON appended to), then the
    2-process runs of :func:`local_methods`. Every-step records already summarised in this invocation (``done``:
    (label, n)) are not repeated; the reruns of records in the results appended to are compared with them
    (``local_reproduced``: every-step runs must be unchanged). Returns the summarised records."""
    import json

    old_path = out / f"{stem}_meta.json"
    if args.local_tune == "reuse":
        src = json.loads(old_path.read_text())["local_tune"]
        local_chosen = src["chosen"]
        meta["local_tune"] = dict(src, reused_from=str(old_path))
    else:
        grid = (
            [float(x) for x in args.tune_grid.split(",")]
            if args.tune_grid
            else ([1.0, 3.0] if args.smoke else list(DILOCO_LR_GRID))
        )
        lmo_mult = chosen.get("ddp_lmo", {}).get("lr_mult", 1.0)
        specs = [
            dict(m, lr_mult=lmo_mult) if m["kind"] == "ef21" else dict(m, lr_mult=g)
            for m in local_tune_methods(args.smoke)
            for g in ([None] if m["kind"] == "ef21" else grid)
        ]
        steps = max(2, round(task.steps * args.tune_frac))
        t0 = time.perf_counter()
        rows = C.run_processes(train_grid, 2, C.TMP / "comm_vs_loss", specs=specs, task=task, steps=steps)[0]
        local_chosen = choose_local(rows)
        meta["local_tune"] = {
            "ef21_outer_grid": list(EF21_OUTER_GRID),
            "ef21_outer_grid_note": "outer 'lmo' with outer_lr 0.5 means 0.5 x H (outer_lr of lmo counts inner "
            "radii); None = the package default (nesterov 0.7, lmo H); EF21 inner LR = ddp_lmo's tuned multiplier",
            "diloco_outer_grid": list(DILOCO_OUTER_GRID),
            "diloco_lr_grid": grid,
            "steps": steps,
            "n_workers": 2,
            "rows": rows,
            "chosen": local_chosen,
            "rule": "per (family, H) the lowest validation loss (at X / DiLoCo's shared model) after `steps` steps; "
            "EF21-Muon tuned with identity compressors, its choice used for every compressor at that H",
            "seconds": time.perf_counter() - t0,
        }
    for k, v in local_chosen.items():
        print(f"local tune: {k:<12} { ({x: v[x] for x in ('outer', 'outer_lr', 'outer_momentum', 'lr_mult')}) }")
    methods = only(with_lr(local_methods(args.smoke, local_chosen), chosen), args.only)
    t0 = time.perf_counter()
    recs = run_real(methods, task, args, f"{stem}_local_partial.pt", meta, "local")
    meta["local_seconds"] = time.perf_counter() - t0
    rows = summarise(recs, 2, task, model_bytes, args.seed, task.tokens_per_step(2))
    if args.append and (out / f"{stem}.json").exists():  # every-step reruns vs the records they replace
        old = {r["label"]: r for r in json.loads((out / f"{stem}.json").read_text()) if r["n_workers"] == 2}
        meta["local_reproduced"] = {
            r["label"]: max(
                abs(a["val_loss"] - b["val_loss"]) for a, b in zip(r["val_curve"], old[r["label"]]["val_curve"])
            )
            for r in rows
            if r["sync_every"] == 1 and r["label"] in old
        }
        meta["local_reproduced_rule"] = (
            "max |val loss difference| over the common validation points between each every-step run of the local "
            "part and the record of the same label it replaces (0: unchanged)"
        )
    return [r for r in rows if (r["label"], r["n_workers"]) not in done]


# ----------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model and a handful of steps (seconds)")
    p.add_argument("--seed", type=int, default=0, help="model init, data order and compressor seed (default 0)")
    p.add_argument("--steps", type=int, default=None, help="uncompressed budget in optimizer steps (default 300)")
    p.add_argument("--budget-mult", type=float, default=4.0, help="compressed/peer budget × uncompressed (default 4)")
    p.add_argument("--full-budget", action="store_true", help="do not stop a run once it reached the target")
    p.add_argument(
        "--parts",
        default="tune,real,local,agreement,sim,bytes_vs_n",
        help="comma list of: tune, real, local, agreement, sim, bytes_vs_n",
    )
    p.add_argument(
        "--local-tune",
        choices=("run", "reuse"),
        default="run",
        help="the local part's outer-step / DiLoCo LR grid: run it, or reuse the choice in the meta JSON appended to",
    )
    p.add_argument("--tune-grid", default=None, help="LR multipliers of the tune part (default 0.333,1,3; smoke 1,3)")
    p.add_argument(
        "--tune-frac",
        type=float,
        default=1.0,
        help="tune runs' length as a fraction of the uncompressed budget (default 1: the whole budget; a 1/3-budget "
        "tune picked LR x3 for the LMO, which at 300 steps reached 2.758 vs 2.662 at x1: short tunes favour large LRs)",
    )
    p.add_argument(
        "--lr-from",
        default=None,
        help="without the tune part: take the LR choice from this meta JSON's tune.chosen (default with "
        "--append: the meta JSON appended to)",
    )
    p.add_argument("--sim-workers", type=int, default=4)
    p.add_argument(
        "--only",
        default=None,
        help="comma list of substrings: keep only real methods whose label "
        "contains one (the reference, ddp_adamw and ddp_lmo are always kept)",
    )
    p.add_argument("--out", default=str(C.RESULTS), help="results folder")
    p.add_argument(
        "--append",
        action="store_true",
        help="merge into the existing results (runs of the parts run now replace those with the same "
        "label and n; meta keys are updated)",
    )
    p.add_argument(
        "--from-partial",
        action="store_true",
        help="summarise the real-process methods that finished in an interrupted run (no training)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    task = dataclasses.replace(C.SMOKE if args.smoke else C.Task(steps=300), seed=args.seed)
    if args.steps:
        task = dataclasses.replace(task, steps=args.steps)
    out = Path(args.out)
    stem = "comm_vs_loss_smoke" if args.smoke else "comm_vs_loss"
    parts = set(args.parts.split(","))
    model_bytes = C.fp32_bytes(C.build_model(task))
    print(
        f"task: {task} | params {model_bytes // 4} (untied head) | fp32 model {model_bytes / 1e6:.3f} MB | "
        f"seed {args.seed} | uncompressed budget {task.steps} steps, others up to {args.budget_mult}x",
        flush=True,
    )
    runs, meta = (
        [],
        {
            "environment": C.environment(),
            "args": vars(args),
            "task": dataclasses.asdict(task),
            "params": model_bytes // 4,
            "fp32_model_bytes": model_bytes,
            "tied_head": False,
            "target_rule": "target: the uncompressed EF21-Muon run's (sharded, identity; = DDP + LMO) final "
            "val loss x 1.01",
            "target_adamw_rule": "target_adamw: the DDP + AdamW run's val loss at the uncompressed budget "
            "(reference_steps; its final loss when given the reference's budget; the schedule is warm-up "
            "then constant, so this is the prefix of its longer run) x 1.01",
            "early_stop_at_target": not args.full_budget,
            "early_stop_rule": "a run stops at the first validation at or below both targets (once both "
            "were reached), not before reference_steps",
            "seconds_to_target_rule": "seconds from the run's start to the first validation at or below "
            "the target, validations included (2 processes on this machine's cores)",
            "total_saving_rule": TOTAL_RULE,
            "default_rule": "default: EF21-Muon with uplink, downlink (role by role) and topology equal to "
            "ef_lightning.config.EF21Config()'s, read at run time (package_defaults); default_compressors: "
            "the same without the topology",
            "package_defaults": C.package_defaults(),
            "dropped_methods": DROPPED,
            "demo": demo_meta(task),
            "diloco": diloco_meta(task),
            "goal_rule": GOAL_RULE,
        },
    )
    t_all = time.perf_counter()
    chosen: dict[str, Any] = {}
    if "tune" in parts:
        grid = [float(x) for x in (args.tune_grid or ("1,3" if args.smoke else "0.333333,1,3")).split(",")]
        steps = max(2, round(task.steps * args.tune_frac))
        t0 = time.perf_counter()
        rows = C.run_processes(
            train_tune, 2, C.TMP / "comm_vs_loss", methods=tune_methods(), grid=grid, task=task, steps=steps
        )[0]
        chosen = choose_lrs(rows)
        meta["tune"] = {
            "grid": grid,
            "steps": steps,
            "n_workers": 2,
            "rows": rows,
            "chosen": chosen,
            "rule": "each peer at each LR multiplier (every group's LR x mult, same warm-up/constant "
            "schedule) for `steps` steps; the multiplier with the lowest validation loss at the end is "
            "used in the real runs; ddp_lmo's choice is also every EF21-Muon run's (same LMO optimizer) "
            "and the Simulator's",
            "seconds": time.perf_counter() - t0,
        }
        for k, v in chosen.items():
            print(
                f"tune: {k:<22} lr x{v['lr_mult']:.3g} (lrs {', '.join(f'{x:.3g}' for x in v['lrs'])}) "
                f"val {v['val_loss']:.4f}",
                flush=True,
            )
    elif args.lr_from or (args.append and (out / f"{stem}_meta.json").exists()):
        import json

        # --append without the tune part: the runs added keep the LR choice of the results they join
        lr_from = args.lr_from or str(out / f"{stem}_meta.json")
        src = json.loads(Path(lr_from).read_text())
        chosen = src.get("tune", {}).get("chosen", {})
        meta["tune"] = dict(src["tune"], reused_from=lr_from) if "tune" in src else {"reused_from": lr_from}
        print(f"LR multipliers from {lr_from}: {({k: v['lr_mult'] for k, v in chosen.items()}) or 'none (x1)'}")
    meta["lr_mults"] = {k: v["lr_mult"] for k, v in chosen.items()}
    if "real" in parts:
        methods = only(with_lr(real_methods(args.smoke), chosen), args.only)
        t0 = time.perf_counter()
        recs = run_real(methods, task, args, f"{stem}_partial.pt", meta, "real")
        meta["real_seconds"] = time.perf_counter() - t0
        meta["agreement_ef21_identity_vs_ddp_lmo"] = agreement(recs)
        runs += summarise(recs, 2, task, model_bytes, args.seed, task.tokens_per_step(2))
    if "local" in parts:
        done = {(r["label"], r["n_workers"]) for r in runs}
        runs += run_local(args, task, chosen, meta, model_bytes, stem, out, done)
    if "agreement" in parts:
        t0 = time.perf_counter()
        meta["agreement_trace_ef21_sharded_identity_vs_ddp_lmo"] = C.run_processes(
            agreement_trace, 2, C.TMP / "comm_vs_loss", task=task, steps=task.steps, every=max(1, task.steps // 30)
        )[0]
        meta["agreement_trace_seconds"] = time.perf_counter() - t0
        for x in meta["agreement_trace_ef21_sharded_identity_vs_ddp_lmo"]:
            print(f"agreement step {x['step']:>4}: max |ΔW| = {x['max_abs_weight_diff']:.3g} ({x['worst_param']})")
    if "sim" in parts:
        t0 = time.perf_counter()
        recs = train_sim(
            with_lr(sim_methods(args.smoke), chosen), task, args.sim_workers, args.budget_mult, not args.full_budget
        )
        meta["sim_seconds"] = time.perf_counter() - t0
        runs += summarise(recs, args.sim_workers, task, model_bytes, args.seed, task.tokens_per_step(args.sim_workers))
    if "bytes_vs_n" in parts:
        ns = [2, 4, 8] if args.smoke else [2, 4, 8, 16, 32, 64]
        specs = (
            ["identity", "top_k:0.1", "rank:4"]
            if args.smoke
            else [
                "identity",
                "top_k:0.2",
                "top_k:0.1",
                "top_k:0.05",
                "rank:4",
                "rank:8",
                "natural",
                "top_k:0.1+natural",
            ]
        )
        meta["bytes_vs_n"] = bytes_vs_n(task, ns, specs, [1, 4])
    meta["total_seconds"] = time.perf_counter() - t_all
    if args.append and (out / f"{stem}.json").exists():
        import json

        new = {(r["label"], r["n_workers"]) for r in runs}
        runs = [
            r for r in json.loads((out / f"{stem}.json").read_text()) if (r["label"], r["n_workers"]) not in new
        ] + runs
        old = json.loads((out / f"{stem}_meta.json").read_text())
        old.setdefault("invocations", []).append(meta["args"])
        meta["total_seconds"] += old.get("total_seconds", 0)
        meta = {**old, **{k: v for k, v in meta.items() if k not in ("args",)}}
        runs.sort(key=lambda r: r["n_workers"])
    goal = goal_issue14(runs)
    if goal:
        meta["goal_issue14"] = goal
    C.write_json(out / f"{stem}.json", runs)
    C.write_json(out / f"{stem}_meta.json", meta)
    if runs:
        plot(runs, out / f"{stem}.png", model_bytes)
    # a readable table (units: bytes are per worker; "x" = times fewer bytes than uncompressed)
    print(
        f"\n{'config':<54} {'n':>2} {'lr x':>5} {'final val':>9} {'@ref steps':>10} {'steps→tgt':>9} "
        f"{'up MB→tgt':>9} {'saving':>7} {'total sav':>9} {'steps→tgtA':>10} {'total savA':>10}"
    )
    for r in runs:
        f = lambda v, fmt: (fmt % v) if v is not None else "-"  # noqa: E731
        print(
            f"{('* ' if r['default'] else '') + r['label'][:52]:<54} {r['n_workers']:>2} {r['lr_mult']:>5.3g} "
            f"{r['final_val_loss']:>9.4f} "
            f"{f(r['val_loss_at_reference_steps'], '%.4f'):>10} {f(r['steps_to_target'], '%d'):>9} "
            f"{f(r['bytes_to_target_per_worker'] and r['bytes_to_target_per_worker'] / 1e6, '%.2f'):>9} "
            f"{f(r['saving_vs_uncompressed'], '%.2fx'):>7} "
            f"{f(r['total_saving_vs_uncompressed'], '%.2fx'):>9} {f(r['steps_to_target_adamw'], '%d'):>10} "
            f"{f(r['total_saving_vs_uncompressed_adamw'], '%.2fx'):>10}"
        )
    print(
        "* = the package default (EF21Config()); savings: bytes to target of the uncompressed run / this run's; "
        "A = at target_adamw (DDP + AdamW's loss at the reference budget x 1.01)"
    )
    for k, v in meta.get("agreement_ef21_identity_vs_ddp_lmo", {}).items():
        print(
            f"agreement {k}: max |ΔW| = {v['max_abs_weight_diff']:.3g} (max |W| {v['max_abs_weight']:.3g}), "
            f"|Δ val loss| = {v['final_val_loss_diff']:.3g}"
        )
    if any(C.sync_every(r) > 1 for r in runs):
        print("\n" + local_table(runs, goal))
    for sfx, g in ((k[len("target") :], v) for k, v in goal.items() if k.startswith("target")):
        f = lambda v, fmt: (fmt % v) if v is not None else "-"  # noqa: E731
        print(
            f"goal (issue 14) at target{sfx}: best {g['best']}: {f(g['best_bytes'] and g['best_bytes'] / 1e6, '%.3f')} "
            f"MB vs DP Gluon {g['reference_bytes'] / 1e6:.1f} MB = {f(g['ratio_vs_dp_gluon'], '%.1f')}x "
            f"({'met' if g['met_100x'] else 'missed'}); best DiLoCo {g['diloco_best']}: "
            f"{f(g['diloco_best_bytes'] and g['diloco_best_bytes'] / 1e6, '%.3f')} MB, ratio "
            f"{f(g['ratio_vs_diloco'], '%.2f')}x ({'beats' if g['beats_diloco'] else 'does not beat'} DiLoCo)"
        )
    print(f"total {meta['total_seconds']:.1f} s; wrote {out / (stem + '.json')}")


if __name__ == "__main__":
    main()
