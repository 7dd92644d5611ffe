"""Named calibration text sources, turned into seeded ``n × seqlen`` token batches.

- ``pydoc`` (default, offline): Python's own documentation topics shipped in the standard
  library (``pydoc_data.topics``); the project commits no third-party text.
- ``wikitext2``, ``c4``, ``pile``: hub datasets (train / validation splits, never the
  WikiText-2 test split rkv evaluates on); a clear error when the hub is unreachable.
- a path to a local ``.txt``, ``.jsonl``/``.json`` or ``.parquet`` file, read through ``datasets``
  (a ``text`` column is used for json/parquet).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

__all__ = ["CalibrationDataError", "HUB_SOURCES", "DEFAULT_SOURCE", "load_text", "sample_batches", "describe_sources"]

DEFAULT_SOURCE = "pydoc"

# WikiText-2 test (the evaluation text): refused as calibration input, by name and by content.
_EVAL_SHA256 = "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"


class CalibrationDataError(ValueError):
    """A calibration source is unknown, unreachable, unreadable or is the evaluation text."""


@dataclass(frozen=True)
class HubSource:
    path: str
    name: str | None
    split: str
    column: str = "text"
    streaming: bool = False


HUB_SOURCES = {
    "wikitext2": HubSource("Salesforce/wikitext", "wikitext-2-raw-v1", "train"),
    "c4": HubSource("allenai/c4", "en", "validation", streaming=True),
    "pile": HubSource("monology/pile-uncopyrighted", None, "validation", streaming=True),
}


def _pydoc_text() -> str:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[key] for key in sorted(topics))


def _hub_text(key: str, max_chars: int) -> str:
    import datasets

    src = HUB_SOURCES[key]
    try:
        data = datasets.load_dataset(src.path, src.name, split=src.split, streaming=src.streaming)
    except Exception as err:  # datasets raises many connection/lookup error types
        raise CalibrationDataError(
            f"cannot load hub dataset {src.path!r} for calibration source {key!r} ({type(err).__name__}: {err}). "
            f"Offline? Use the built-in '{DEFAULT_SOURCE}' source or a local .txt/.jsonl/.parquet file"
        ) from err
    pieces, total = [], 0
    for row in data:
        text = row[src.column]
        if text.strip():
            pieces.append(text)
            total += len(text)
        if total >= max_chars:
            break
    return "\n\n".join(pieces)


def _file_text(path: Path) -> str:
    import datasets

    if not path.is_file():
        raise CalibrationDataError(f"calibration file not found: {path}")
    if path.name == "wiki.test.raw" or hashlib.sha256(path.read_bytes()).hexdigest() == _EVAL_SHA256:
        raise CalibrationDataError(f"{path} is the WikiText-2 test split, which rkv evaluates on: calibrate on other text")
    builders: dict[str, Callable[[], object]] = {
        ".txt": lambda: datasets.load_dataset("text", data_files=str(path), split="train", sample_by="paragraph"),
        ".jsonl": lambda: datasets.load_dataset("json", data_files=str(path), split="train"),
        ".json": lambda: datasets.load_dataset("json", data_files=str(path), split="train"),
        ".parquet": lambda: datasets.load_dataset("parquet", data_files=str(path), split="train"),
    }
    if path.suffix not in builders:
        raise CalibrationDataError(f"unsupported calibration file type {path.suffix!r}; use .txt, .jsonl, .json or .parquet")
    try:
        data = builders[path.suffix]()
    except Exception as err:
        raise CalibrationDataError(f"cannot read {path}: {err}") from err
    if "text" not in data.column_names:
        raise CalibrationDataError(f"{path} has no 'text' column (columns: {data.column_names})")
    return "\n\n".join(t for t in data["text"] if t)


def load_text(source: str, max_chars: int = 4_000_000) -> str:
    """All text of a named source or local file (hub sources stop after ``max_chars``)."""
    if source == DEFAULT_SOURCE:
        return _pydoc_text()
    if source in HUB_SOURCES:
        return _hub_text(source, max_chars)
    path = Path(source)
    if path.suffix or path.exists():
        return _file_text(path)
    raise CalibrationDataError(
        f"unknown calibration source {source!r}; use one of {describe_sources()} or a path to a text file"
    )


def describe_sources() -> str:
    return ", ".join([DEFAULT_SOURCE, *HUB_SOURCES])


def sample_batches(text: str, tokenizer: object, n: int, seqlen: int, seed: int) -> torch.Tensor:
    """``n`` windows of ``seqlen`` tokens at seeded random offsets: ``int64 [n, seqlen]``."""
    if n <= 0 or seqlen <= 1:
        raise CalibrationDataError(f"need n >= 1 samples of seqlen >= 2 tokens, got n={n}, seqlen={seqlen}")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if ids.numel() < seqlen + 1:
        raise CalibrationDataError(f"calibration text has {ids.numel()} tokens, fewer than seqlen={seqlen}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n,), generator=generator)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
