"""Offline text for the recipes and the demo: real English prose that ships with every Python installation.

The corpus is the docstrings of the Python standard library (modules, classes and functions), read with ``ast``
from the interpreter's own ``Lib/`` sources: no download, identical on every machine with the same Python version.
Tokenisation is byte-level (vocabulary 256), so no tokenizer has to be fetched either. Users with a network pass
``--dataset``/``--model`` to the recipes for hub data and tokenizers instead.
"""

from __future__ import annotations

import ast
import hashlib
import random
import sysconfig
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

__all__ = ["stdlib_docstrings", "cached_docstrings", "ByteBlocks", "byte_splits", "stdlib_text_splits", "token_blocks",
           "load_texts", "DOC_FAMILIES", "family_docstrings", "labelled_docstrings", "load_labelled"]


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


# paths containing these are not prose of the library itself (tests, vendored, generated, the IDE, codecs tables)
_SKIP = ("test", "site-packages", "idlelib", "lib2to3", "encodings")


def _docstrings(path: Path, min_chars: int = 40) -> list[str]:
    """The docstrings (module, classes, functions) of one source file longer than ``min_chars``, in ``ast.walk``
    order; ``[]`` for a file that does not parse."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError):
        return []
    docs = [ast.get_docstring(n) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    return [d for d in docs if d and len(d) > min_chars]


def stdlib_docstrings(max_chars: int = 4_000_000) -> list[tuple[str, str]]:
    """(module path, text) pairs: every docstring of one stdlib module joined by blank lines, sorted by path.

    Args:
        max_chars: stop after this many characters in total.
    """
    root = _stdlib_root()
    out, total = [], 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if any(part in rel for part in _SKIP):
            continue
        text = "\n\n".join(_docstrings(path))
        if text:
            out.append((rel, text))
            total += len(text)
            if total >= max_chars:
                break
    return out


class ByteBlocks(Dataset):
    """Non-overlapping blocks of ``block + 1`` tokens (inputs and shifted labels come from one block); bytes, or any
    1-D tensor of token ids."""

    def __init__(self, data: torch.Tensor, block: int) -> None:
        self.data, self.block = data, block

    def __len__(self) -> int:
        return (self.data.numel() - 1) // self.block

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        chunk = self.data[i * self.block: i * self.block + self.block + 1].long()
        return {"input_ids": chunk[:-1], "labels": chunk[1:]}


def cached_docstrings(max_chars: int = 2_000_000) -> list[tuple[str, str]]:
    """:func:`stdlib_docstrings`, cached as JSON under ``~/.cache/ef_lightning`` (parsing the stdlib takes ~15 s).

    The cache key is the Python version and ``max_chars``; writes are atomic, so concurrent ranks are safe.
    """
    import json
    import os
    import sys
    import tempfile

    cache = Path(os.environ.get("EF_LIGHTNING_CACHE", Path.home() / ".cache" / "ef_lightning"))
    path = cache / f"stdlib_docstrings_py{sys.version_info[0]}{sys.version_info[1]}_{max_chars}.json"
    if path.exists():
        return [tuple(x) for x in json.loads(path.read_text(encoding="utf-8"))]
    docs = stdlib_docstrings(max_chars)
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(docs, f)
    os.replace(tmp, path)
    return docs


def stdlib_text_splits(val_fraction: float = 0.05, max_chars: int = 2_000_000) -> tuple[list[str], list[str]]:
    """Train/validation texts from the stdlib docstrings, split by module (every ``1/val_fraction``-th module is val,
    so no module's prose is in both)."""
    docs = cached_docstrings(max_chars)
    every = max(2, round(1 / val_fraction))
    return [t for i, (_, t) in enumerate(docs) if i % every], [t for i, (_, t) in enumerate(docs) if i % every == 0]


def token_blocks(texts: Sequence[str], block: int, tokenizer: Any = None) -> ByteBlocks:
    """The texts joined by blank lines as one token stream, cut into blocks of ``block`` tokens.

    Args:
        texts: documents.
        block: sequence length in tokens.
        tokenizer: a Hugging Face tokenizer (documents are encoded one by one, without special tokens, and separated
            by its EOS token when it has one); None: UTF-8 bytes (vocabulary 256).
    """
    if tokenizer is None:
        data = torch.frombuffer(bytearray("\n\n".join(texts).encode("utf-8")), dtype=torch.uint8).clone()
        return ByteBlocks(data, block)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = [i for doc in tokenizer(list(texts), add_special_tokens=False)["input_ids"] for i in doc + eos]
    return ByteBlocks(torch.tensor(ids, dtype=torch.int32), block)


def byte_splits(block: int = 128, val_fraction: float = 0.05, max_chars: int = 2_000_000) -> tuple[ByteBlocks, ByteBlocks]:
    """Train/validation byte datasets from the stdlib docstrings, split by module (every 20th module is val)."""
    train, val = stdlib_text_splits(val_fraction, max_chars)
    return token_blocks(train, block), token_blocks(val, block)


# ---------------------------------------------------------------------------------------------- user-given data
def _datasets() -> Any:
    """The `datasets` package, imported only when a recipe is given ``--dataset`` (it is not a dependency)."""
    try:
        import datasets
    except ImportError:
        raise ImportError("--dataset needs the Hugging Face `datasets` package: pip install datasets (without "
                          "--dataset the recipes run offline on the Python stdlib docstrings)") from None
    return datasets


def _load(dataset: str, config: str | None) -> Any:
    """A DatasetDict from a hub id, or from a local .csv/.json/.jsonl/.parquet/.txt file through `datasets`."""
    suffix = Path(dataset).suffix.lstrip(".")
    builder = {"jsonl": "json", "txt": "text"}.get(suffix, suffix)
    if Path(dataset).is_file() and builder in ("csv", "json", "parquet", "text"):
        return _datasets().load_dataset(builder, data_files=dataset)
    return _datasets().load_dataset(dataset, config)


def _eval_split(ds: Any) -> str | None:
    return next((name for name in ("validation", "test") if name in ds), None)


def load_texts(dataset: str | None = None, config: str | None = None, text_field: str = "text",
               val_fraction: float = 0.05) -> tuple[list[str], list[str]]:
    """Train/validation texts for language modelling.

    Args:
        dataset: None (the stdlib docstrings, offline); a local ``.txt`` file or a directory of them (read directly,
            no `datasets` needed; the last ``val_fraction`` of the characters is validation); otherwise a `datasets`
            hub id or data file, whose ``validation`` (else ``test``) split is validation, else every
            ``1/val_fraction``-th training row.
        config: the `datasets` configuration name (e.g. ``wikitext-2-raw-v1``).
        text_field: the column holding the text.
    """
    if dataset is None:
        return stdlib_text_splits(val_fraction)
    path = Path(dataset)
    if path.is_dir() or path.suffix == ".txt":
        files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
        if not files:
            raise ValueError(f"dataset={dataset!r}: no .txt files in this directory")
        text = "\n\n".join(f.read_text(encoding="utf-8") for f in files)
        cut = int(len(text) * (1 - val_fraction))
        return [text[:cut]], [text[cut:]]
    ds = _load(dataset, config)
    if text_field not in ds["train"].column_names:
        raise ValueError(f"text_field={text_field!r} is not a column of {dataset!r}; valid: {ds['train'].column_names}")
    split = _eval_split(ds)
    train = [t for t in ds["train"][text_field] if t]
    if split is not None:
        return train, [t for t in ds[split][text_field] if t]
    every = max(2, round(1 / val_fraction))
    return [t for i, t in enumerate(train) if i % every], [t for i, t in enumerate(train) if i % every == 0]


# ---------------------------------------------------------------------------------------------- classification
#: Labels of the offline classification task -> the top-level stdlib packages and modules whose docstrings carry
#: them. Six families with more than 200 distinct docstrings each on Python 3.11 (logging, the smallest, has 221);
#: unittest is left out because every path containing "test" is (as for the corpus).
DOC_FAMILIES: dict[str, tuple[str, ...]] = {
    "asyncio": ("asyncio",),
    "concurrency": ("concurrent", "multiprocessing", "threading"),
    "email": ("email", "imaplib", "mailbox", "poplib", "smtplib"),
    "logging": ("logging",),
    "web": ("http", "urllib", "wsgiref"),
    "xml": ("xml", "xmlrpc"),
}


def family_docstrings(families: Mapping[str, Sequence[str]] = DOC_FAMILIES) -> dict[str, list[str]]:
    """label -> the distinct docstrings (longer than 40 characters) of that family's stdlib sources.

    A docstring found in two families (``"Return repr(self)."``-like boilerplate) is dropped from both: its label
    would be arbitrary.
    """
    root = _stdlib_root()
    found: dict[str, list[str]] = {}
    for label, tops in families.items():
        seen: dict[str, None] = {}  # ordered set
        for top in tops:
            files = sorted((root / top).rglob("*.py")) if (root / top).is_dir() else [root / f"{top}.py"]
            for path in files:
                if path.is_file() and not any(part in path.relative_to(root).as_posix() for part in _SKIP):
                    seen.update(dict.fromkeys(_docstrings(path)))
        found[label] = list(seen)
    counts: dict[str, int] = {}
    for docs in found.values():
        for d in docs:
            counts[d] = counts.get(d, 0) + 1
    return {label: [d for d in docs if counts[d] == 1] for label, docs in found.items()}


def labelled_docstrings(per_class: int = 200, val_fraction: float = 0.2,
                        families: Mapping[str, Sequence[str]] = DOC_FAMILIES,
                        ) -> tuple[list[tuple[str, int]], list[tuple[str, int]], list[str]]:
    """A balanced, deterministic text-classification dataset: stdlib docstrings labelled by package family.

    Each family's docstrings are ordered by the SHA-1 of their text (deterministic on every machine with the same
    Python version, independent of file order and ``PYTHONHASHSEED``); the first ``per_class`` are kept, and of
    those the first ``round(per_class * val_fraction)`` are validation, the rest training. Both lists are shuffled
    with fixed seeds.

    Returns:
        ``(train, val, labels)``: lists of ``(text, label index)`` and the label names (index order).

    Raises:
        ValueError: ``per_class`` larger than the smallest family (the classes would not be balanced).
    """
    docs = family_docstrings(families)
    smallest = min(len(v) for v in docs.values())
    if not 0 < per_class <= smallest:
        raise ValueError(f"per_class={per_class!r}; valid: 1..{smallest} (the smallest family's size), sizes: "
                         f"{ {k: len(v) for k, v in docs.items()} }")
    labels = list(docs)
    train, val = [], []
    n_val = round(per_class * val_fraction)
    for y, label in enumerate(labels):
        chosen = sorted(docs[label], key=lambda t: hashlib.sha1(t.encode("utf-8")).hexdigest())[:per_class]
        val += [(t, y) for t in chosen[:n_val]]
        train += [(t, y) for t in chosen[n_val:]]
    # interleave the classes (seeded, not the global RNG), so any prefix of val is about balanced
    random.Random(0).shuffle(train)
    random.Random(1).shuffle(val)
    return train, val, labels


def load_labelled(dataset: str, config: str | None = None, text_field: str = "text", label_field: str = "label",
                  ) -> tuple[list[tuple[str, int]], list[tuple[str, int]], list[str]]:
    """``(train, val, labels)`` like :func:`labelled_docstrings` from a `datasets` hub id or local data file.

    Validation is the ``validation`` (else ``test``) split, else every 10th training row. Label names come from a
    ``ClassLabel`` column, else the sorted distinct values.
    """
    ds = _load(dataset, config)
    cols = ds["train"].column_names
    for key, col in (("text_field", text_field), ("label_field", label_field)):
        if col not in cols:
            raise ValueError(f"{key}={col!r} is not a column of {dataset!r}; valid: {cols}")
    feature = ds["train"].features[label_field]
    names = list(getattr(feature, "names", None) or sorted({str(v) for v in ds["train"][label_field]}))
    index = (lambda v: int(v)) if hasattr(feature, "names") else (lambda v: names.index(str(v)))  # noqa: E731
    rows = lambda split: [(t, index(y)) for t, y in zip(split[text_field], split[label_field]) if t]  # noqa: E731
    split = _eval_split(ds)
    if split is not None:
        return rows(ds["train"]), rows(ds[split]), names
    all_rows = rows(ds["train"])
    return [r for i, r in enumerate(all_rows) if i % 10], [r for i, r in enumerate(all_rows) if i % 10 == 0], names
