"""What the recipes share besides their configuration (recipes/config.py): the causal-LM task, the EF21 runs of the
Accelerate-based recipes, process checks, and the plot and summary every recipe writes."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ef_lightning.config import DEFAULT_UPLINK

from config import CausalLMConfig, RecipeConfig

__all__ = ["causal_lm_task", "role_specs", "ef21_plugins", "check_world_size", "cpu_threads", "dense_bytes",
           "plot_loss_vs_uplink", "summary_row", "write_summary", "PLOT_NAME", "SUMMARY_NAME"]

PLOT_NAME = "val_loss_vs_uplink.png"
SUMMARY_NAME = "summary.json"


def causal_lm_task(cfg: CausalLMConfig) -> tuple[Any, Any, Any]:
    """``(model, train dataset, validation dataset)`` of the causal-LM recipes.

    Without ``cfg.model`` the model is a small Llama over bytes (vocabulary 256) built from the config with seed
    ``cfg.seed``, and texts are UTF-8 bytes; with it, ``AutoModelForCausalLM.from_pretrained(cfg.model)`` and texts
    go through its tokenizer. Texts come from :func:`text_data.load_texts` (the stdlib docstrings without
    ``cfg.dataset``).
    """
    import torch
    from text_data import load_texts, token_blocks
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if cfg.model is None:
        torch.manual_seed(cfg.seed)  # same initial weights on every rank and for the baseline
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=256, hidden_size=cfg.hidden, intermediate_size=4 * cfg.hidden, num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads, max_position_embeddings=max(512, cfg.block),
            tie_word_embeddings=False))
        tokenizer = None
    else:
        model = AutoModelForCausalLM.from_pretrained(cfg.model)
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    train, val = load_texts(cfg.dataset, cfg.dataset_config, cfg.text_field)
    return model, token_blocks(train, cfg.block, tokenizer), token_blocks(val, cfg.block, tokenizer)


# ------------------------------------------------------------------------------------------------------- helpers
def role_specs(spec: str) -> dict[str, str] | str:
    """A matrix compressor spec as the library's per-role mapping: matrices compressed, vectors dense.

    Vectors (biases, norm gains) are a tiny share of the bytes and stay dense, as in the library's defaults
    (``ef_lightning.config.DEFAULT_UPLINK``, whose roles this mapping covers). ``"identity"`` stays a string.
    """
    if spec == "identity":
        return spec
    return {role: (spec if DEFAULT_UPLINK[role] != "identity" else "identity") for role in DEFAULT_UPLINK}


def ef21_plugins(cfg: RecipeConfig) -> list[tuple[str, Any]]:
    """The runs of an Accelerate-based recipe as ``[(run name, EF21Plugin)]``.

    ``EF21_MUON`` (the environment, as for any ``EF21Plugin``) decides whether EF21-Muon runs; the compressors,
    topology and seed come from the config. With EF21 on: run ``ef21_muon``, after ``uncompressed`` (identity
    compressors, synchronised every step, i.e. data-parallel Muon/Gluon, with the same byte ledger) when
    ``cfg.baseline``. With EF21 off:
    one run ``plain`` (plain DDP), which is itself the uncompressed baseline.
    """
    from ef_lightning.accelerate import EF21Plugin

    def plugin(uplink: str, downlink: str, sync_every: int = cfg.sync_every) -> EF21Plugin:
        return EF21Plugin(uplink=role_specs(uplink), downlink=role_specs(downlink), topology=cfg.topology,
                          seed=cfg.seed, sync_every=sync_every)

    main = plugin(cfg.uplink, cfg.downlink)
    if not main.enabled:
        return [("plain", main)]
    return ([("uncompressed", plugin("identity", "identity", 1))] if cfg.baseline else []) + [("ef21_muon", main)]


def check_world_size(processes: int) -> None:
    """ValueError when the launcher started more processes than the framework joined into one run.

    On a machine without GPUs, ``torchrun`` and ``accelerate launch --multi_gpu`` start N processes, but Accelerate
    (and the transformers Trainer on it) only joins them on CPU with ``ACCELERATE_USE_CPU=1``; otherwise each one
    trains alone and they overwrite each other's outputs.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != processes:
        raise ValueError(f"the launcher started WORLD_SIZE={launched} processes but training runs on {processes}; "
                         "on CPU set ACCELERATE_USE_CPU=1 (valid: WORLD_SIZE equal to the number of processes)")


def cpu_threads() -> int:
    """Use ``OMP_NUM_THREADS`` intra-op threads in this process (default 1, also for the processes it starts).

    Recipes start one process per core on CPU; more threads per process only compete for the same cores
    (tests/conftest.py, 2-core CI machine: a 32x32 matmul took 16 ms with two competing threads instead of 4 us).
    """
    import torch

    threads = int(os.environ.setdefault("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)
    return threads


def dense_bytes(model: Any) -> int:
    """Bytes of one dense gradient of ``model``'s trainable parameters (what plain DDP all-reduces per step);
    the same count as the ledger's ``dense_bytes`` (numel times element size)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------------- reporting
def plot_loss_vs_uplink(curves: Mapping[str, Sequence[tuple[float, float]]], path: str | Path,
                        title: str = "") -> Path:
    """PNG of validation loss against cumulative uplink bytes per worker, one line per run.

    Args:
        curves: run name -> ``[(cumulative uplink bytes per worker, validation loss), ...]``.
        path: the PNG file to write.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for name, points in curves.items():
        if points:
            x, y = zip(*sorted(points))
            ax.plot([v / 1e6 for v in x], y, marker="o", label=name)
    xs = [x for pts in curves.values() for x, _ in pts]
    if xs and min(xs) > 0 and max(xs) / min(xs) > 20:
        ax.set_xscale("log")  # compressed and dense runs differ by the compression ratio
        # plain numbers at 1, 2, 5 x 10^k: matplotlib's default labels minor ticks as 2x10^2, 3x10^2... which overlap
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("cumulative uplink per worker (MB, wire bytes)")
    ax.set_ylabel("validation loss")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# (key, header, width, format); byte columns are shown in MB (1e6 bytes)
_COLUMNS = (("run", "run", 14, "{}"), ("val_loss", "val loss", 9, "{:.4f}"),
            ("uplink_bytes_per_worker", "uplink MB/worker", 16, "{:.3f}"),
            ("dense_bytes_per_worker", "dense MB/worker", 15, "{:.3f}"),
            ("compression_ratio", "ratio", 7, "{:.1f}x"), ("downlink_bytes", "downlink MB", 11, "{:.3f}"),
            ("seconds", "time s", 7, "{:.1f}"))


def summary_row(run: str, val_loss: float, seconds: float, ledger: Mapping[str, float] | None = None,
                dense_per_step: int = 0, steps: int = 0, **extra: Any) -> dict[str, Any]:
    """One run's row for :func:`write_summary`.

    Args:
        run: the run's name.
        val_loss: final validation loss (nats per token, or per example for classification).
        seconds: wall-clock training time.
        ledger: ``Ledger.summary()`` of an EF21 run; None for plain data parallel, whose every step all-reduces the
            dense gradient: ``dense_per_step`` bytes each way (see :func:`dense_bytes`) for ``steps`` steps.
        **extra: more keys for ``summary.json`` (compressor specs, topology, number of processes...); mappings (the
            library's read-only per-role compressor specs) are copied to dicts, which JSON can write.
    """
    if ledger is None:
        dense = dense_per_step * steps
        ledger = {"uplink_wire_bytes_per_worker": dense, "dense_bytes_per_worker": dense, "downlink_wire_bytes": dense,
                  "compression_ratio": 1.0, "steps": steps}
    return {"run": run, "val_loss": float(val_loss),
            "uplink_bytes_per_worker": int(ledger["uplink_wire_bytes_per_worker"]),
            "dense_bytes_per_worker": int(ledger["dense_bytes_per_worker"]),
            "compression_ratio": float(ledger["compression_ratio"]),
            "downlink_bytes": int(ledger["downlink_wire_bytes"]),
            "steps": int(ledger["steps"]), "seconds": float(seconds),
            **{k: dict(v) if isinstance(v, Mapping) else v for k, v in extra.items()}}  # read-only specs -> JSON


def write_summary(rows: Sequence[Mapping[str, Any]], out_dir: str | Path, title: str = "") -> str:
    """Print a table of the runs (rows from :func:`summary_row`) and write them to ``out_dir/summary.json``.

    Returns:
        the table as printed.
    """
    lines = [title] if title else []
    lines.append(" ".join(f"{h:<{w}}" if k == "run" else f"{h:>{w}}" for k, h, w, _ in _COLUMNS))
    for r in rows:
        cells = []
        for key, _, width, fmt in _COLUMNS:
            v = r[key] / 1e6 if "bytes" in key else r[key]
            cells.append(f"{fmt.format(v):<{width}}" if key == "run" else f"{fmt.format(v):>{width}}")
        lines.append(" ".join(cells))
    table = "\n".join(lines)
    print(table, flush=True)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / SUMMARY_NAME).write_text(json.dumps(list(rows), indent=2), encoding="utf-8")
    return table
