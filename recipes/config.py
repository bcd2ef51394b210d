"""Configuration of the fine-tuning recipes: a defaults dataclass per recipe, read by ``transformers.HfArgumentParser``.

As in karpathy/nanoGPT, every knob is a field of the recipe's dataclass with its default and its help (``--help``
lists them); a config file is a short YAML delta over the defaults, and command-line flags override the file:

    python recipes/causal_lm_lightning.py --config recipes/configs/causal_lm_lightning/tiny.yaml --steps 20
    python recipes/causal_lm_lightning.py --steps 20 --uplink top_k:0.05 --baseline

Precedence: field defaults < ``--config`` file < ``--key value`` flags (the last one given wins). An unknown key in
the file or on the command line is a ValueError naming it (with the closest valid key and the list of valid keys);
a value of the wrong type is a ValueError (file) or argparse's usage error (flag). ``null`` in a file sets an
optional key to None. The resolved configuration is written as ``resolved_config.yaml`` beside the outputs and loads
back through the same checks (:func:`load_config`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from transformers.hf_argparser import HfArg, HfArgumentParser

from ef_lightning.config import DEFAULT_DOWNLINK, DEFAULT_TOPOLOGY, DEFAULT_UPLINK

__all__ = ["RecipeConfig", "CausalLMConfig", "override", "load_config", "parse_args", "save_resolved",
           "RESOLVED_NAME"]

RESOLVED_NAME = "resolved_config.yaml"
C = TypeVar("C", bound="RecipeConfig")


@dataclasses.dataclass
class RecipeConfig:
    """Keys every recipe shares; each recipe subclasses this with its own fields and defaults (:func:`override`)."""

    # data and model (None: offline defaults, the stdlib docstrings and the recipe's built-in model)
    model: str | None = HfArg(default=None, help="hub id or local path for from_pretrained (None: built-in model)")
    dataset: str | None = HfArg(default=None, help="`datasets` hub id or data file (needs `pip install datasets`); "
                                "the causal-LM recipes also read a local .txt file or a folder of them without it")
    dataset_config: str | None = HfArg(default=None, help="`datasets` configuration name, e.g. wikitext-2-raw-v1")
    text_field: str = HfArg(default="text", help="column holding the text in a `datasets` dataset")
    # training
    steps: int = HfArg(default=200, help="optimizer steps per run")
    batch_size: int = HfArg(default=16, help="sequences per worker per optimizer step")
    lr: float | None = HfArg(default=None, help="LMO learning rate (None: the preset's default)")
    preset: str = HfArg(default="gluon", help="build_lmo_optimizer preset: gluon, scion or muon")
    warmup: int = HfArg(default=20, help="linear warm-up, optimizer steps")
    seed: int = HfArg(default=0, help="initial weights, data order and the compressors' randomness")
    # EF21-Muon: compressors for matrices (vectors, i.e. biases and norm gains, as in the library's defaults)
    uplink: str = HfArg(default=DEFAULT_UPLINK["hidden"], help="worker -> server compressor of the matrices, e.g. "
                        f"top_k:0.05, rank:4, top_k:0.05+natural; vectors stay {DEFAULT_UPLINK['vector']}; default "
                        "from the library's DEFAULT_UPLINK")
    downlink: str = HfArg(default=DEFAULT_DOWNLINK["hidden"], help="server -> workers compressor of the matrices "
                          f"(identity with topology allgather); vectors stay {DEFAULT_DOWNLINK['vector']}; default "
                          "from the library's DEFAULT_DOWNLINK")
    topology: str = HfArg(default=DEFAULT_TOPOLOGY, help="sharded, allgather or server; default from the library's "
                          "DEFAULT_TOPOLOGY")
    sync_every: int = HfArg(default=1, help="optimizer steps per synchronisation: 1 = EF21-Muon every step; H > 1 = "
                            "H local steps, then the compressed outer sync (DiLoCo-style, outer Nesterov)")
    baseline: bool = HfArg(default=False, help="also train once with identity compressors (uncompressed) for the plot")
    # evaluation and outputs
    val_every: int = HfArg(default=50, help="optimizer steps between validations")
    val_batches: int = HfArg(default=8, help="validation batches per process per evaluation")
    out_dir: str = HfArg(default="outputs/recipe", help="where the resolved config, summary, plot and logs go")

    def __post_init__(self) -> None:
        """Check every value against its field's type (an int is a valid float); HfArgumentParser's ``parse_dict``
        does not, and argparse only converts command-line strings."""
        for key, hint in typing.get_type_hints(type(self)).items():
            value, allowed = getattr(self, key), typing.get_args(hint) or (hint,)
            if float in allowed and type(value) is int:
                setattr(self, key, float(value))
            elif type(value) not in allowed:  # exact types: a bool is not an int, an int not a str
                names = " | ".join("None" if t is type(None) else t.__name__ for t in allowed)
                raise ValueError(f"config key {key!r} expects {names}, got {type(value).__name__} {value!r}")


@dataclasses.dataclass
class CausalLMConfig(RecipeConfig):
    """Defaults of the causal-LM task, shared by its Lightning and Accelerate recipes."""

    # the built-in model (no --model): a byte-level Llama built from a config, no download
    hidden: int = HfArg(default=128, help="width of the built-in model")
    layers: int = HfArg(default=2, help="decoder layers of the built-in model")
    heads: int = HfArg(default=4, help="attention heads of the built-in model")
    block: int = HfArg(default=128, help="sequence length in tokens (bytes for the built-in model)")


def override(cls: type, key: str, default: Any, help: str | None = None) -> Any:
    """Field ``key`` of dataclass ``cls`` with a new default (and help, if given), for a recipe's subclass:
    ``steps: int = override(RecipeConfig, "steps", 100)``."""
    (base,) = [f for f in dataclasses.fields(cls) if f.name == key]
    return HfArg(default=default, help=help or base.metadata.get("help"))


class _Loader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, where ``3e-4`` (no dot) is a string; this loader reads it as a float, as YAML 1.2."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                              list("-+.0123456789"))


def _unknown(cls: type, key: str, where: str) -> ValueError:
    valid = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"{where}: unknown config key {key!r}{hint}; valid keys: {', '.join(valid)}")


def load_config(cls: type[C], path: str | Path) -> C:
    """``cls``'s defaults updated by the YAML mapping in ``path`` (a delta, or a complete resolved config).

    Raises:
        ValueError: an unknown key (the message names the closest valid key and lists them all), a value of the
            wrong type, a file that is not a mapping.
    """
    data = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_Loader) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file is a mapping of keys to values, got {type(data).__name__}")
    valid = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in valid:
            raise _unknown(cls, str(key), str(path))
    try:
        (cfg,) = HfArgumentParser(cls).parse_dict(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return cfg


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The recipe's docstring as written, and every flag's default."""


def parse_args(cls: type[C], description: str, argv: Sequence[str] | None = None) -> C:
    """A recipe's command line: ``[--config file.yaml] [--<key> value ...]``, flags over the file over the defaults."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    file = pre.parse_known_args(argv)[0].config
    parser = HfArgumentParser(cls, description=description, formatter_class=_HelpFormatter, allow_abbrev=False)
    parser.add_argument("--config", help="YAML file: a delta over the defaults above (null for None); flags override "
                        "it")
    if file is not None:
        parser.set_defaults(**dataclasses.asdict(load_config(cls, file)))
    cfg, _, rest = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True, look_for_args_file=False)
    if rest:
        flag = next((a for a in rest if a.startswith("-")), rest[0])
        raise _unknown(cls, flag.lstrip("-").partition("=")[0].replace("-", "_"), f"command line {' '.join(rest)}")
    return cfg


def save_resolved(cfg: RecipeConfig, out_dir: str | Path) -> Path:
    """Write the full resolved configuration (every key) to ``out_dir/resolved_config.yaml``; returns the path."""
    path = Path(out_dir) / RESOLVED_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False), encoding="utf-8")
    return path
