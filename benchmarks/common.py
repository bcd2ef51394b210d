"""Shared pieces of the benchmarks (docs/benchmarks.md): the standard CPU-sized NanoGPT task, optimizers of every
method, deterministic per-worker data shards, evaluation at the server model X, byte accounting for peers, process
helpers.

The task: a byte-level Llama causal LM built from a ``transformers.LlamaConfig`` (no download), **untied** input
embedding and output head, trained on the Python standard library's docstrings (``recipes/text_data.py``: offline,
identical on every machine with the same Python version). Worker j of n takes, at step s, the training blocks
``perm[(s*n + j)*B : (s*n + j + 1)*B]`` of one seeded permutation, so every method sees the same samples in the
same order, and a real process and the Simulator's worker j see the same shard.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import platform
import resource
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
TMP = Path(os.environ.get("TMPDIR", "/tmp")) / "ef_lightning_bench"  # scratch (per-rank result files)
sys.path.insert(0, str(ROOT / "recipes"))


# ------------------------------------------------------------------------------------------------------ the task
@dataclasses.dataclass
class Task:
    """Model and data sizes of one benchmark task; ``steps`` is the uncompressed run's budget (optimizer steps)."""

    hidden: int = 96
    layers: int = 2
    heads: int = 4
    block: int = 64  # sequence length in bytes (= tokens)
    batch: int = 8  # sequences per worker per step
    steps: int = 300  # uncompressed budget
    warmup: int = 20  # linear warm-up steps, then constant LR (same shape at every budget)
    val_every: int = 25
    val_batches: int = 8  # validation batches of ``batch`` sequences, fixed, split across ranks
    seed: int = 0

    def tokens_per_step(self, n_workers: int) -> int:
        return self.block * self.batch * n_workers


SMOKE = Task(hidden=32, layers=1, heads=2, block=32, batch=4, steps=6, warmup=2, val_every=3, val_batches=2)


def build_model(task: Task) -> nn.Module:
    """The byte-level Llama (untied head), initialised from ``task.seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=task.hidden,
        intermediate_size=4 * task.hidden,
        num_hidden_layers=task.layers,
        num_attention_heads=task.heads,
        num_key_value_heads=task.heads,
        max_position_embeddings=max(512, task.block),
        tie_word_embeddings=False,
    )
    torch.manual_seed(task.seed)
    return LlamaForCausalLM(cfg)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def fp32_bytes(model: nn.Module) -> int:
    """The model's size in fp32 bytes: the unit of bytes-to-target (docs/benchmarks.md)."""
    return 4 * n_params(model)


class Data:
    """Deterministic per-worker shards of the training blocks and a fixed validation set."""

    def __init__(self, task: Task) -> None:
        from text_data import byte_splits

        self.task = task
        self.train, self.val = byte_splits(block=task.block)
        g = torch.Generator().manual_seed(1000 + task.seed)
        self.perm = torch.randperm(len(self.train), generator=g)
        self.val_idx = list(range(min(len(self.val), task.val_batches * task.batch)))

    def _stack(self, ds: Any, idx: Sequence[int]) -> dict[str, torch.Tensor]:
        items = [ds[int(i)] for i in idx]
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}

    def batch(self, step: int, worker: int, n_workers: int) -> dict[str, torch.Tensor]:
        B = self.task.batch
        start = ((step * n_workers + worker) * B) % (len(self.perm) - B)
        return self._stack(self.train, self.perm[start : start + B].tolist())

    def val_batches(self, rank: int = 0, world: int = 1) -> list[dict[str, torch.Tensor]]:
        B = self.task.batch
        chunks = [self.val_idx[i : i + B] for i in range(0, len(self.val_idx), B)]
        return [self._stack(self.val, c) for c in chunks[rank::world]]


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


@torch.no_grad()
def evaluate(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], distributed: bool = False) -> float:
    """Mean validation loss over ``batches`` (each rank its share when ``distributed``; summed with all_reduce)."""
    was = model.training
    model.eval()
    tot = torch.zeros(2, dtype=torch.float64)
    for b in batches:
        tot[0] += float(lm_loss(model, b)) * b["input_ids"].shape[0]
        tot[1] += b["input_ids"].shape[0]
    if distributed:
        dist.all_reduce(tot)
    model.train(was)
    return float(tot[0] / tot[1])


@torch.no_grad()
def evaluate_at(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    batches: Sequence[dict[str, torch.Tensor]],
    distributed: bool = False,
) -> float:
    """Validation loss with the module's parameters temporarily replaced by ``params`` (the server model X)."""
    named = dict(model.named_parameters())
    saved = {k: named[k].detach().clone() for k in params}
    for k, v in params.items():
        named[k].copy_(v)
    try:
        return evaluate(model, batches, distributed)
    finally:
        for k, v in saved.items():
            named[k].copy_(v)


# ------------------------------------------------------------------------------------------------------ optimizers
ADAMW_LR = 3e-3  # peers' AdamW learning rate (default; comm_vs_loss.py's tune part picks a multiplier)
MUON_LR = 0.02  # torch.optim.Muon on hidden matrices (Keller's default)
DEMO_LR = 3e-3  # DeMo's sign step (an AdamW-sized step per entry; the tune part searches x1/3, x3 around it)
DEMO_BETA = 0.999  # DeMo's momentum decay (the paper's value)
DEMO_TOPK = 32  # DeMo's fast components kept per chunk (the paper's value)
DEMO_CHUNK = 64  # DeMo's chunk side (64x64, the paper's value)


def hidden_matrix_names(model: nn.Module) -> set[str]:
    """Names of the hidden 2-D weights (attention and MLP projections); embedding and head excluded."""
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return {n for n, p in model.named_parameters() if p.ndim == 2 and p is not emb and p is not head}


def build_optimizer(model: nn.Module, kind: str, task: Task, lr_mult: float = 1.0) -> torch.optim.Optimizer:
    """``lmo`` (the Gluon preset of ef_lightning, default LR), ``adamw``, ``muon`` (torch.optim.Muon on hidden
    matrices + AdamW on the rest, combined in one optimizer object) or ``demo`` (benchmarks/demo_peer.py, on every
    parameter). ``lr_mult`` multiplies every group's learning rate (the LR grid of comm_vs_loss.py's ``tune`` part)."""
    import ef_lightning as efl

    if kind == "lmo":
        opt: torch.optim.Optimizer = efl.build_lmo_optimizer(model, preset="gluon", verbose=False)
    elif kind == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=ADAMW_LR, betas=(0.9, 0.95), weight_decay=0.0)
    elif kind == "muon":
        hidden = hidden_matrix_names(model)
        named = list(model.named_parameters())
        opt = _Combined(
            [
                torch.optim.Muon(
                    [p for n, p in named if n in hidden],
                    lr=MUON_LR,
                    weight_decay=0.0,
                    momentum=0.95,
                    nesterov=True,
                    adjust_lr_fn="original",
                ),
                torch.optim.AdamW(
                    [p for n, p in named if n not in hidden], lr=ADAMW_LR, betas=(0.9, 0.95), weight_decay=0.0
                ),
            ]
        )
    elif kind == "demo":
        from demo_peer import DeMo

        opt = DeMo(model.parameters(), lr=DEMO_LR, beta=DEMO_BETA, topk=DEMO_TOPK, chunk=DEMO_CHUNK, weight_decay=0.0)
    else:
        raise ValueError(f"optimizer kind {kind!r}; valid: lmo, adamw, muon, demo")
    if lr_mult != 1.0:  # before the scheduler is built (LambdaLR records initial_lr from group["lr"])
        for g in opt.param_groups:
            g["lr"] = g["lr"] * lr_mult
    return opt


def base_lrs(opt: torch.optim.Optimizer) -> list[float]:
    """The distinct learning rates of ``opt``'s groups (as built, before any scheduler factor)."""
    return sorted({float(g.get("initial_lr", g["lr"])) for g in opt.param_groups})


class _Combined(torch.optim.Optimizer):
    """Several optimizers stepping together behind one Optimizer (so one LR scheduler drives them all)."""

    def __init__(self, opts: list[torch.optim.Optimizer]) -> None:
        self.opts = opts
        self.param_groups = [g for o in opts for g in o.param_groups]
        self.defaults = {}
        self.state = {}
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for o in self.opts:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.opts:
            o.zero_grad(set_to_none=set_to_none)

    def state_tensors(self) -> list[torch.Tensor]:
        return [t for o in self.opts for s in o.state.values() for t in s.values() if torch.is_tensor(t)]


def warmup_scheduler(opt: torch.optim.Optimizer, task: Task) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up for ``task.warmup`` steps, then constant: the same shape at every budget (so a stretched
    budget is the same schedule run longer, and stopping at the target is the prefix of the full run)."""
    w = max(1, task.warmup)
    if isinstance(opt, _Combined):
        scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, (s + 1) / w)) for o in opt.opts]
        return _MultiSched(scheds)  # type: ignore[return-value]
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / w))


class _MultiSched:
    def __init__(self, scheds: list[Any]) -> None:
        self.scheds = scheds

    def step(self) -> None:
        for s in self.scheds:
            s.step()


def role_spec(spec: str) -> dict[str, str] | str:
    """Compressor on every matrix role; vectors (norm gains) stay dense (what the strategy's defaults do)."""
    if spec == "identity":
        return "identity"
    return {"hidden": spec, "embedding": spec, "head": spec, "conv": spec, "vector": "identity", "default": "identity"}


# ------------------------------------------------------------------------------------------------------ byte rules
def ddp_bytes_per_step(model: nn.Module) -> int:
    """DDP's per-worker send volume per step by the benchmark rule: the dense fp32 gradient, numel·4 bytes."""
    return fp32_bytes(model)


def powersgd_bytes_per_step(model: nn.Module, rank: int, min_compression_rate: float = 2.0) -> int:
    """PowerSGD (torch hook) per-worker bytes per step: r·(m+n) fp32 values per compressed matrix (the hook views a
    tensor as shape[0] × rest and compresses it when m·n > r·(m+n)·min_compression_rate), dense fp32 otherwise."""
    total = 0
    for p in model.parameters():
        if p.ndim <= 1:
            total += 4 * p.numel()
            continue
        m, n = p.shape[0], p.numel() // p.shape[0]
        total += 4 * (rank * (m + n) if m * n > rank * (m + n) * min_compression_rate else m * n)
    return total


def bytes_to_target(curve: Sequence[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first validation point with ``val_loss <= target`` (None: never reached)."""
    return next((c for c in curve if c["val_loss"] <= target), None)


def loss_at_step(curve: Sequence[dict[str, Any]], step: int) -> float | None:
    """Validation loss at the last evaluation at or before ``step``."""
    pts = [c for c in curve if c["step"] <= step]
    return pts[-1]["val_loss"] if pts else None


# ------------------------------------------------------------------------------------------------------ processes
def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, init: str, fn: Callable[..., Any], out_dir: str, kwargs: dict) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import warnings

    warnings.filterwarnings("ignore", r".*before `optimizer.step\(\)`.*")
    warnings.filterwarnings("ignore", ".*all_gather_into_tensor` is deprecated.*")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300)
    )
    try:
        res = fn(rank, world, **kwargs)
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    except BaseException as e:
        torch.save({"__error__": repr(e), "tb": traceback.format_exc()}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        try:
            dist.barrier()
            dist.destroy_process_group()
        except Exception:
            pass


def run_processes(fn: Callable[..., Any], world: int, out_dir: Path, **kwargs: Any) -> list[Any]:
    """``fn(rank, world, **kwargs)`` in ``world`` spawned gloo processes on loopback; each rank's return value."""
    import torch.multiprocessing as mp

    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / f"rank{r}.pt" for r in range(world)]
    for f in files:
        f.unlink(missing_ok=True)
    try:
        mp.start_processes(
            _entry,
            args=(world, f"tcp://127.0.0.1:{free_port()}", fn, str(out_dir), kwargs),
            nprocs=world,
            join=True,
            start_method="spawn",
        )
    except mp.ProcessExitedException:
        if not all(f.exists() for f in files):  # gloo sometimes aborts at exit after the results are written
            raise
    res = [torch.load(f, weights_only=False) for f in files]
    for r, x in enumerate(res):
        if isinstance(x, dict) and "__error__" in x:
            raise RuntimeError(f"rank {r} failed:\n{x['tb']}")
    return res


def _version(md: Any, pkg: str) -> str | None:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def source_revision() -> dict[str, Any]:
    """The git commit of the checkout the benchmark ran from and whether its package sources (``ef_lightning/``)
    differed from it (None where git is unavailable)."""
    import subprocess

    def git(*a: str) -> str | None:
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    dirty = git("status", "--porcelain", "--", "ef_lightning")
    return {"commit": git("rev-parse", "HEAD"), "package_modified": None if dirty is None else bool(dirty)}


def environment() -> dict[str, Any]:
    """Machine and versions, for every results file."""
    import importlib.metadata as md

    vers = {}
    for pkg in ("torch", "transformers", "lightning", "accelerate", "ef_lightning"):
        vers[pkg] = _version(md, pkg)
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    return {
        "source": source_revision(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "versions": vers,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "threads_per_process": 1,
    }


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=float))


# ------------------------------------------------------------------------------------------------------ methods
def method_name(spec: dict[str, Any]) -> str:
    """``ef21_muon_<topology>`` for ours, ``ddp_<optimizer>`` / ``ddp_powersgd_r<rank>_<optimizer>`` / ``demo`` /
    ``diloco_h<H>`` for peers."""
    if spec["kind"] == "ef21":
        return f"ef21_muon_{spec['topology']}"
    if spec["kind"] == "demo":
        return "demo"
    if spec["kind"] == "diloco":
        return f"diloco_h{spec['sync_every']}"
    if spec.get("psgd_rank"):
        return f"ddp_powersgd_r{spec['psgd_rank']}_{spec['optimizer']}"
    return f"ddp_{spec['optimizer']}"


def demo_spec(mult: float | None = None) -> dict[str, Any]:
    """The DeMo peer (benchmarks/demo_peer.py): ``uplink`` names its message (top-k DCT coefficients per chunk)."""
    return {
        "kind": "demo",
        "optimizer": "demo",
        "psgd_rank": None,
        "topology": "allgather",
        "uplink": f"dct_top{DEMO_TOPK}_chunk{DEMO_CHUNK}",
        "downlink": "identity",
        "budget_mult": mult,
    }


def diloco_spec(
    sync_every: int, mult: float | None = None, outer_lr: float | None = None, outer_momentum: float | None = None
) -> dict[str, Any]:
    """The DiLoCo peer (benchmarks/diloco_peer.py) at H = ``sync_every`` inner AdamW steps per round; ``outer_lr`` /
    ``outer_momentum`` None: the paper's 0.7 / 0.9. ``uplink`` names its message (a dense fp32 outer delta)."""
    return {
        "kind": "diloco",
        "optimizer": "adamw",
        "psgd_rank": None,
        "topology": "allreduce",
        "uplink": "dense_fp32_outer_delta",
        "downlink": "identity",
        "sync_every": sync_every,
        "outer": "nesterov",
        "outer_lr": outer_lr,
        "outer_momentum": outer_momentum,
        "budget_mult": mult,
    }


#: the outer-step options of a local-step spec or record (``sync_every`` > 1)
OUTER_KEYS = ("outer", "outer_lr", "outer_momentum")


def sync_every(spec: dict[str, Any]) -> int:
    """H of a spec or a record: inner steps per sync (1, every step, where absent or None)."""
    return int(spec.get("sync_every") or 1)


def local_options(spec: dict[str, Any]) -> dict[str, Any]:
    """The local-training options of an EF21-Muon spec as ``EF21Config`` fields: empty for ``sync_every`` 1 (the
    every-step EF21-Muon run, built exactly as before local steps existed), else ``sync_every``, ``outer`` and the
    outer step size / momentum when given (None: the package's defaults)."""
    H = sync_every(spec)
    if H == 1:
        return {}
    out: dict[str, Any] = {"sync_every": H, "outer": spec.get("outer") or "nesterov"}
    for k in ("outer_lr", "outer_momentum"):
        if spec.get(k) is not None:
            out[k] = spec[k]
    return out


def _outer_given(spec: dict[str, Any]) -> str:
    """`` olr=<outer_lr>`` / `` omomentum=<outer_momentum>`` for the outer options given (not left to defaults)."""
    return "".join(
        f" {k.replace('outer_', 'o')}={spec[k]:g}" for k in ("outer_lr", "outer_momentum") if spec.get(k) is not None
    )


def _outer_label(spec: dict[str, Any]) -> str:
    """`` H=<H>`` plus the outer rule and the outer options given (empty for every-step methods)."""
    o = local_options(spec)
    return f" H={o['sync_every']} outer={o['outer']}{_outer_given(spec)}" if o else ""


def _roles(spec: Any, keys: set[str]) -> dict[str, str]:
    """A compressor spec (string or per-role mapping) as one string per role in ``keys``."""
    if isinstance(spec, str):
        return dict.fromkeys(keys, spec)
    d = dict(spec)
    return {k: d.get(k, d.get("default", "identity")) for k in keys}


def package_defaults() -> dict[str, Any]:
    """``ef_lightning.config.EF21Config()``'s uplink, downlink and topology, read now (they may change)."""
    from ef_lightning.config import EF21Config

    cfg = EF21Config()
    return {
        "uplink": cfg.uplink if isinstance(cfg.uplink, str) else dict(cfg.uplink),
        "downlink": cfg.downlink if isinstance(cfg.downlink, str) else dict(cfg.downlink),
        "topology": cfg.topology,
    }


def default_matrix_spec(which: str) -> str:
    """The package default's compressor on matrices (``hidden``) for ``which`` = uplink | downlink."""
    spec = package_defaults()[which]
    return spec if isinstance(spec, str) else spec.get("hidden", spec.get("default", "identity"))


def is_default(spec: dict[str, Any], topology: bool = True) -> bool:
    """True when ``spec`` is EF21-Muon with the package's default uplink and downlink (role by role, as
    :func:`role_spec` maps the spec), a step every step (``sync_every`` 1, ``EF21Config()``'s) and, with
    ``topology``, its default topology: what ``EF21Config()`` gives."""
    if spec.get("kind") != "ef21" or local_options(spec):
        return False
    d = package_defaults()
    for which in ("uplink", "downlink"):
        ours = role_spec(spec[which])
        keys = set(ours if isinstance(ours, dict) else ()) | set(d[which] if isinstance(d[which], dict) else ())
        keys = keys or {"default"}
        if _roles(ours, keys) != _roles(d[which], keys):
            return False
    return not topology or spec["topology"] == d["topology"]


def label(spec: dict[str, Any]) -> str:
    """A unique, readable name of one configuration (method + compressors + local-step options when H > 1; the
    labels of every-step runs are as before local steps existed)."""
    if spec["kind"] == "ef21":
        return f"{method_name(spec)} up={spec['uplink']} down={spec['downlink']}{_outer_label(spec)}"
    if spec["kind"] == "diloco":
        return method_name(spec) + _outer_given(spec)
    return method_name(spec)


class _CountAllReduce:
    """Counts the bytes of tensors handed to ``torch.distributed.all_reduce`` from Python (the PowerSGD hook's
    P/Q factors and its uncompressed tensors); DDP's own C++ reducer does not pass through here."""

    def __init__(self) -> None:
        self.bytes = 0
        self._orig = dist.all_reduce

    def __enter__(self) -> _CountAllReduce:
        orig = self._orig

        def wrapped(tensor: torch.Tensor, *a: Any, **k: Any) -> Any:
            self.bytes += tensor.numel() * tensor.element_size()
            return orig(tensor, *a, **k)

        dist.all_reduce = wrapped
        return self

    def __exit__(self, *exc: Any) -> None:
        dist.all_reduce = self._orig


class Runner:
    """One method on one rank of a gloo group: model, optimizer, engine or DDP wrapper, and a ``step(batch)``.

    ``step`` returns the training loss; ``last_uplink_bytes``/``last_downlink_bytes`` are that step's per-worker
    uplink bytes and server-side downlink bytes (EF21: the ledger's wire bytes, 0 on the inner steps of a local-step
    run; DDP: the dense fp32 rule; PowerSGD: r·(m+n) floats per compressed matrix, from the hook's own accounting
    rule, after its dense warm-up steps; DeMo: the bytes of the buffer it hands to all_gather, downlink 0; DiLoCo:
    the bytes of the buffer it hands to all_reduce at the end of a round, 0 on inner steps, downlink 0);
    ``last_synced`` says whether the step communicated (False only on inner steps of local-step methods).
    ``spec["lr_mult"]`` scales the optimizer's (the inner optimizer's) LR."""

    def __init__(self, spec: dict[str, Any], task: Task) -> None:
        import ef_lightning as efl

        self.spec, self.task = spec, task
        self.model = build_model(task)
        self.opt = build_optimizer(self.model, spec["optimizer"], task, spec.get("lr_mult") or 1.0)
        self.sched = warmup_scheduler(self.opt, task)
        self.engine = self.ddp = self.psgd_state = self.diloco = None
        self.counter = None
        self.step_count = 0
        if spec["kind"] == "ef21":
            self.engine = efl.EF21Engine(
                self.model,
                self.opt,
                uplink=role_spec(spec["uplink"]),
                downlink=role_spec(spec["downlink"]),
                topology=spec["topology"],
                seed=task.seed,
                **local_options(spec),
            )
            self.module = self.model
        elif spec["kind"] == "diloco":  # DiLoCo communicates inside its step (one all_reduce per round)
            from diloco_peer import OUTER_LR, OUTER_MOMENTUM, DiLoCo

            self.diloco = DiLoCo(
                self.model.named_parameters(),
                self.opt,
                sync_every=spec["sync_every"],
                outer_lr=OUTER_LR if spec.get("outer_lr") is None else spec["outer_lr"],
                outer_momentum=OUTER_MOMENTUM if spec.get("outer_momentum") is None else spec["outer_momentum"],
            )
            self.module = self.model
        elif spec["kind"] == "demo":  # DeMo communicates inside its step (one all_gather of the fast components)
            self.module = self.model
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # one bucket (explicit cap: the default puts a 1 MiB first bucket in front). With two buckets the PowerSGD
            # hook over gloo aborted here with a collective size mismatch (torch 2.13, see docs/benchmarks.md)
            self.ddp = DDP(self.model, bucket_cap_mb=25)
            if spec.get("psgd_rank"):
                from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as P

                self.psgd_state = P.PowerSGDState(
                    process_group=None,
                    matrix_approximation_rank=spec["psgd_rank"],
                    start_powerSGD_iter=2,
                    use_error_feedback=True,
                    warm_start=True,
                    random_seed=task.seed,
                )
                self.ddp.register_comm_hook(self.psgd_state, P.powerSGD_hook)
                self.counter = _CountAllReduce()
            self.module = self.ddp
        self.base_lrs = base_lrs(self.opt)
        self.dense = ddp_bytes_per_step(self.model)
        self.psgd = powersgd_bytes_per_step(self.model, spec["psgd_rank"]) if spec.get("psgd_rank") else None
        self.measured_hook_bytes = 0
        self.last_uplink_bytes = self.last_downlink_bytes = 0
        self.last_synced = True
        self.local = bool(local_options(spec)) or self.diloco is not None

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        self.opt.zero_grad(set_to_none=True)
        if self.counter is not None:
            with self.counter:
                loss = lm_loss(self.module, batch)
                loss.backward()
        else:
            loss = lm_loss(self.module, batch)
            loss.backward()
        if self.engine is not None:
            self.engine.step()
            rec = self.engine.ledger.last
            self.last_uplink_bytes, self.last_downlink_bytes = rec.uplink_wire_bytes, rec.downlink_wire_bytes
            self.last_synced = getattr(rec, "synced", True)
        elif self.diloco is not None:
            self.diloco.step()
            self.last_uplink_bytes, self.last_downlink_bytes = self.diloco.last_bytes, 0
            self.last_synced = self.diloco.last_synced
        elif self.spec["kind"] == "demo":
            self.opt.step()
            self.last_uplink_bytes, self.last_downlink_bytes = self.opt.last_bytes, 0
        else:
            self.opt.step()
            warm = self.psgd is not None and self.step_count >= self.psgd_state.start_powerSGD_iter
            self.last_uplink_bytes = self.psgd if warm else self.dense
            self.last_downlink_bytes = 0
        self.sched.step()
        self.step_count += 1
        return float(loss.detach())

    def server_params(self) -> dict[str, torch.Tensor] | None:
        """X for evaluation (a collective for sharded/server topologies; DiLoCo: its shared θ, the model of the
        last round); None when the module already holds it (between rounds of a local-step run it holds the
        worker's own W_j, never X)."""
        if self.diloco is not None:
            return self.diloco.global_params()
        if self.engine is None or (self.engine.topology == "allgather" and not self.local):
            return None
        return self.engine.server_model()

    def val_loss(self, batches: Sequence[dict[str, torch.Tensor]]) -> float:
        X = self.server_params()
        if X is None:
            return evaluate(self.model, batches, distributed=True)
        return evaluate_at(self.model, X, batches, distributed=True)

    def final_params(self) -> dict[str, torch.Tensor]:
        X = self.server_params()
        return X if X is not None else {k: v.detach().clone() for k, v in self.model.named_parameters()}

    def state_bytes(self) -> dict[str, int]:
        """Bytes of per-rank training state beyond the model: optimizer state, EF21 state (M_j, G_j, X, G), DDP
        gradient buckets (dense fp32 copy of the gradients), PowerSGD error-feedback residuals and factors."""

        def nbytes(ts: Any) -> int:
            return sum(t.numel() * t.element_size() for t in ts if torch.is_tensor(t))

        opt = (
            self.opt.state_tensors()
            if isinstance(self.opt, _Combined)
            else [t for s in self.opt.state.values() for t in s.values()]
        )
        out = {"optimizer": nbytes(opt)}
        if self.engine is not None:
            w, s = self.engine.worker, self.engine.server
            out["ef21_worker_M"] = nbytes(w.M.values())
            out["ef21_worker_G"] = nbytes(w.G.values())
            out["ef21_server_X"] = nbytes(s.X.values())
            out["ef21_server_G"] = nbytes(s.G.values())
        elif self.diloco is not None:
            out["diloco_theta_and_outer_momentum"] = nbytes(self.diloco.state_tensors())
        elif self.spec["kind"] != "demo":
            out["ddp_buckets"] = self.dense
            if self.psgd_state is not None:
                st = self.psgd_state
                out["powersgd"] = nbytes(
                    list(st.error_dict.values()) + list(st.p_memory_dict.values()) + list(st.q_memory_dict.values())
                )
        out["total"] = sum(out.values())
        return out

    def close(self) -> None:
        if self.engine is not None:
            self.engine.detach()
