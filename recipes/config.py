"""Shared machinery of the fine-tuning recipes: one defaults dataclass per recipe, YAML deltas, plot and summary.

In the style of karpathy/nanoGPT's configurator: every knob is a field of the recipe's dataclass with its default
and a comment; a config file is a short YAML delta over it; command-line overrides (``--set key=value`` or
``--key value``) must name an existing key and give a value of the field's type. Unknown keys and wrong types are a
ValueError naming the key and the valid keys (or the expected type and the value). The resolved configuration is
written as ``resolved_config.yaml`` beside the outputs, and loads back through the same checks.

    python recipes/causal_lm_lightning.py --config recipes/configs/causal_lm_lightning/tiny.yaml --set steps=20
    python recipes/causal_lm_lightning.py --steps 20 --uplink top_k:0.05      # explicit flags, same rules

Precedence: field defaults < ``--config`` file < ``--set`` (in order) < explicit ``--key`` flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ef_lightning.ef21 import DEFAULT_DOWNLINK, DEFAULT_TOPOLOGY, DEFAULT_UPLINK

__all__ = ["RecipeConfig", "CausalLMConfig", "causal_lm_task", "load_config", "parse_args", "save_resolved",
           "role_specs", "ef21_plugins", "check_world_size", "cpu_threads", "dense_bytes", "plot_loss_vs_uplink",
           "summary_row", "write_summary", "RESOLVED_NAME", "PLOT_NAME", "SUMMARY_NAME"]

RESOLVED_NAME = "resolved_config.yaml"
PLOT_NAME = "val_loss_vs_uplink.png"
SUMMARY_NAME = "summary.json"
C = TypeVar("C", bound="RecipeConfig")
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")  # a float literal, as float() reads it


@dataclasses.dataclass
class RecipeConfig:
    """Keys every recipe shares; each recipe subclasses this with its own fields and defaults."""

    # data and model (None: offline defaults — the stdlib docstrings and the recipe's built-in model)
    model: str | None = None          # hub id or local path for from_pretrained
    dataset: str | None = None        # `datasets` hub id or data file (needs `pip install datasets`); the causal-LM
                                      # recipes also read a local .txt file or a folder of them without it
    dataset_config: str | None = None  # `datasets` configuration name, e.g. wikitext-2-raw-v1
    text_field: str = "text"          # column holding the text in a `datasets` dataset
    # training
    steps: int = 200                  # optimizer steps per run
    batch_size: int = 16              # sequences per worker per optimizer step
    lr: float | None = None           # LMO learning rate (None: the preset's default)
    preset: str = "gluon"             # build_lmo_optimizer preset: gluon, scion or muon
    warmup: int = 20                  # linear warm-up, optimizer steps
    seed: int = 0
    # EF21-Muon: compressors for matrices (vectors — biases, norm gains — always go dense)
    uplink: str = DEFAULT_UPLINK["hidden"]      # worker -> server, e.g. top_k:0.05, rank:4, top_k:0.05+natural
    downlink: str = DEFAULT_DOWNLINK["hidden"]  # server -> workers (identity with topology allgather)
    topology: str = DEFAULT_TOPOLOGY  # sharded, allgather or server
    baseline: bool = False            # also train once with identity compressors (uncompressed) for the plot
    # evaluation and outputs
    val_every: int = 50               # optimizer steps between validations
    val_batches: int = 8              # validation batches per process per evaluation
    out_dir: str = "outputs/recipe"


@dataclasses.dataclass
class CausalLMConfig(RecipeConfig):
    """Defaults of the causal-LM task, shared by its Lightning and Accelerate recipes."""

    # the built-in model (no --model): a byte-level Llama built from a config, no download
    hidden: int = 128                 # width
    layers: int = 2                   # decoder layers
    heads: int = 4                    # attention heads
    block: int = 128                  # sequence length in tokens (bytes for the built-in model)


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


# ------------------------------------------------------------------------------------------------------- loading
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(hint: Any) -> str:
    return " | ".join("None" if a is type(None) else a.__name__ for a in _members(hint))


def _members(hint: Any) -> tuple[Any, ...]:
    return typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)


def _check_key(cls: type, key: str) -> None:
    valid = [f.name for f in dataclasses.fields(cls)]
    if key not in valid:
        close = difflib.get_close_matches(key, valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown config key {key!r}{hint}; valid keys: {', '.join(valid)}")


def _typed(cls: type, key: str, value: Any) -> Any:
    """``value`` if it fits the field's declared type (an int is accepted for a float field), else ValueError."""
    _check_key(cls, key)
    hint = _hints(cls)[key]
    for t in _members(hint):
        if t is type(None) and value is None:
            return None
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)  # PyYAML reads 1e-3 (no dot) as a string: YAML 1.1 wants 1.0e-3
        if t is str and isinstance(value, str):
            return value
    raise ValueError(f"config key {key!r} expects {_type_name(hint)}, got {type(value).__name__} {value!r}")


def _from_text(cls: type, key: str, text: str) -> Any:
    """A command-line string converted to the field's type (``none``/``null`` for None), else ValueError."""
    _check_key(cls, key)
    hint = _hints(cls)[key]
    members = _members(hint)
    if text.strip().lower() in ("none", "null") and type(None) in members:
        return None
    for t in members:
        if t is bool:
            low = text.strip().lower()
            if low in ("true", "1", "yes", "on", "false", "0", "no", "off"):
                return low in ("true", "1", "yes", "on")
        elif t in (int, float):
            try:
                return t(text)
            except ValueError:
                continue
        elif t is str:
            return text
    raise ValueError(f"config key {key!r} expects {_type_name(hint)}, got {text!r}")


def load_config(cls: type[C], path: str | Path | None = None, overrides: Sequence[str] = (),
                flags: Mapping[str, str] | None = None) -> C:
    """The recipe's defaults, then a YAML delta file, then ``key=value`` overrides, then explicit flags.

    Args:
        cls: the recipe's config dataclass (a :class:`RecipeConfig` subclass).
        path: YAML file holding a mapping of keys to values (a delta: only what differs from the defaults).
        overrides: ``"key=value"`` strings (``--set``), the value converted to the field's type.
        flags: ``{key: value string}`` from explicit ``--key value`` options.

    Raises:
        ValueError: an unknown key (the message lists the valid keys), a value of the wrong type, a bad file.
    """
    values: dict[str, Any] = {}
    if path is not None:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a config file is a mapping of keys to values, got {type(data).__name__}")
        values.update({k: _typed(cls, k, v) for k, v in data.items()})
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected key=value, e.g. --set steps=100")
        values[key.strip()] = _from_text(cls, key.strip(), text)
    for key, text in (flags or {}).items():
        values[key] = _from_text(cls, key, text)
    return cls(**values)


def parse_args(cls: type[C], description: str, argv: Sequence[str] | None = None) -> C:
    """The command line of a recipe: ``--config file.yaml``, ``--set key=value`` (repeatable), ``--<key> value``."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file: a delta over the defaults below")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one key (repeatable)")
    defaults = cls()
    for f in dataclasses.fields(cls):
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        p.add_argument(*names, dest=f"flag_{f.name}", default=argparse.SUPPRESS,
                       metavar=_type_name(_hints(cls)[f.name]), help=f"default: {getattr(defaults, f.name)!r}")
    ns = vars(p.parse_args(argv))
    flags = {k.removeprefix("flag_"): v for k, v in ns.items() if k.startswith("flag_")}
    return load_config(cls, ns["config"], ns["set"], flags)


def save_resolved(cfg: RecipeConfig, out_dir: str | Path) -> Path:
    """Write the full resolved configuration (every key) to ``out_dir/resolved_config.yaml``; returns the path."""
    path = Path(out_dir) / RESOLVED_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------------- helpers
def role_specs(spec: str) -> dict[str, str] | str:
    """A matrix compressor spec as the library's per-role mapping: matrices compressed, vectors dense.

    Vectors (biases, norm gains) are a tiny share of the bytes and stay dense, as in the library's defaults
    (``ef_lightning.ef21.DEFAULT_UPLINK``, whose roles this mapping covers). ``"identity"`` stays a string.
    """
    if spec == "identity":
        return spec
    return {role: (spec if DEFAULT_UPLINK[role] != "identity" else "identity") for role in DEFAULT_UPLINK}


def ef21_plugins(cfg: RecipeConfig) -> list[tuple[str, Any]]:
    """The runs of an Accelerate-based recipe as ``[(run name, EF21Plugin)]``.

    ``EF21_MUON`` (the environment, as for any ``EF21Plugin``) decides whether EF21-Muon runs; the compressors,
    topology and seed come from the config. With EF21 on: run ``ef21_muon``, after ``uncompressed`` (identity
    compressors, i.e. data-parallel Muon/Gluon, with the same byte ledger) when ``cfg.baseline``. With EF21 off:
    one run ``plain`` (plain DDP), which is itself the uncompressed baseline.
    """
    from ef_lightning.accelerate import EF21Plugin

    def plugin(uplink: str, downlink: str) -> EF21Plugin:
        return EF21Plugin(uplink=role_specs(uplink), downlink=role_specs(downlink), topology=cfg.topology,
                          seed=cfg.seed)

    main = plugin(cfg.uplink, cfg.downlink)
    if not main.enabled:
        return [("plain", main)]
    return ([("uncompressed", plugin("identity", "identity"))] if cfg.baseline else []) + [("ef21_muon", main)]


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
        **extra: more keys for ``summary.json`` (compressor specs, topology, number of processes...).
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
            "steps": int(ledger["steps"]), "seconds": float(seconds), **extra}


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
