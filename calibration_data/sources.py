"""Named calibration text sources, turned into seeded ``n × seqlen`` token batches.

- ``pydoc`` (default, offline): Python's own documentation topics shipped in the standard
  library (``pydoc_data.topics``); the project commits no third-party text.
- ``wikitext2``, ``c4``, ``pile``: hub datasets (train / validation splits, never the
  WikiText-2 test split rkv evaluates on); a clear error when the hub is unreachable.
- a path to a local ``.txt`` file (read as UTF-8), or a ``.jsonl``/``.json`` or ``.parquet`` file
  read through ``datasets`` with a throw-away cache (its ``text`` column).

Local files are refused, naming the file and the problem, when empty, binary, not UTF-8, or
when they substantially overlap the WikiText-2 test split rkv evaluates on (:mod:`.eval_guard`).
"""

from __future__ import annotations

import codecs
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from . import eval_guard

__all__ = ["CalibrationDataError", "HUB_SOURCES", "DEFAULT_SOURCE", "check_not_evaluation_text", "check_source", "load_text",
           "sample_batches", "development_windows", "describe_sources"]

DEFAULT_SOURCE = "pydoc"

# WikiText-2 test (the evaluation text): refused as calibration input by name here, by content in eval_guard.
_EVAL_FILE_NAME = "wiki.test.raw"


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


_READERS = (".txt", ".jsonl", ".json", ".parquet")
_PARQUET_MAGIC = b"PAR1"
_SNIFF_BYTES = 1 << 16


def _check_readable(path: Path) -> bytes:
    """The first bytes of ``path``; refuses a missing, unreadable or empty file or an unknown suffix."""
    if not path.exists():
        raise CalibrationDataError(f"calibration file not found: {path}")
    if not path.is_file():
        raise CalibrationDataError(f"{path} is not a file; pass a .txt, .jsonl, .json or .parquet file")
    if path.suffix not in _READERS:
        raise CalibrationDataError(f"unsupported calibration file type {path.suffix!r}; use .txt, .jsonl, .json or .parquet")
    try:
        with path.open("rb") as handle:
            head = handle.read(_SNIFF_BYTES)
    except OSError as err:
        raise CalibrationDataError(f"cannot read {path}: {err.strerror or err}") from err
    if not head:
        raise CalibrationDataError(f"{path} is empty; pass a file with calibration text")
    return head


def _check_text_bytes(path: Path, head: bytes) -> None:
    """Refuse bytes that are not UTF-8 text, or only whitespace (``head``: the first bytes of the file)."""
    if not head.strip() and len(head) < _SNIFF_BYTES:
        raise CalibrationDataError(f"{path} has no text (only whitespace)")
    if b"\x00" in head:
        raise CalibrationDataError(f"{path} is not text (NUL bytes: a binary file?); pass a UTF-8 text file")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < _SNIFF_BYTES)
    except UnicodeDecodeError as err:
        raise CalibrationDataError(
            f"{path} is not UTF-8 text (invalid byte at offset {err.start}); convert it to UTF-8"
        ) from err


def check_source(source: str) -> None:
    """Cheap checks of a calibration source before any model loads: a known name, or a readable
    non-empty file of a supported type whose first bytes look right. Raises :class:`CalibrationDataError`."""
    if source == DEFAULT_SOURCE or source in HUB_SOURCES:
        return
    path = Path(source)
    if not (path.suffix or path.exists()):
        raise CalibrationDataError(
            f"unknown calibration source {source!r}; use one of {describe_sources()} or a path to a text file"
        )
    if path.name == _EVAL_FILE_NAME:
        raise CalibrationDataError(f"{path} is the WikiText-2 test split, which rkv evaluates on: calibrate on other text")
    head = _check_readable(path)
    if path.suffix == ".parquet":
        if not head.startswith(_PARQUET_MAGIC):
            raise CalibrationDataError(f"{path} is not a parquet file (no PAR1 header)")
    else:
        _check_text_bytes(path, head)


def check_not_evaluation_text(text: str, label: str, hashes: frozenset[int] | None = None,
                              limit: float = eval_guard.OVERLAP_LIMIT) -> None:
    """Refuse ``text`` when more than ``limit`` of its word 8-grams are WikiText-2 test 8-grams
    (``hashes``: the committed sample by default; see :mod:`.eval_guard`)."""
    found = eval_guard.overlap(text, eval_guard.evaluation_hashes() if hashes is None else hashes)
    if found.fraction > limit:
        raise CalibrationDataError(
            f"{label} shares {found.fraction:.0%} of its 8-word sequences with the WikiText-2 test split, which rkv "
            f"evaluates on (limit {limit:.0%}): calibrating on it would make the perplexity figures meaningless; "
            "calibrate on other text"
        )


def _datasets_column(path: Path) -> list[str]:
    """The ``text`` column of a json/jsonl/parquet file, read through ``datasets`` with a throw-away cache."""
    import datasets

    builder = "parquet" if path.suffix == ".parquet" else "json"
    with tempfile.TemporaryDirectory(prefix="rkv-datasets-") as cache:
        try:
            data = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache)
        except Exception as err:  # datasets wraps the parser's error; its cause names the problem
            cause = err.__cause__ or err
            raise CalibrationDataError(f"cannot read {path} as {builder}: {type(cause).__name__}: {cause}") from err
        if "text" not in data.column_names:
            raise CalibrationDataError(f"{path} has no 'text' column (columns: {data.column_names})")
        return [t for t in data["text"] if t]


def _file_text(path: Path) -> str:
    check_source(str(path))
    if path.suffix == ".txt":
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise CalibrationDataError(f"{path} is not UTF-8 text (invalid byte at offset {err.start}); convert it to UTF-8") from err
    else:
        text = "\n\n".join(_datasets_column(path))
    if not text.strip():
        raise CalibrationDataError(f"{path} has no text (only whitespace)")
    check_not_evaluation_text(text, str(path))
    return text


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


def development_windows(text: str, tokenizer: object, count: int, length: int) -> torch.Tensor:
    """The last ``count`` x ``length`` tokens of ``text`` as ``int64 [count, length]``: the development text that
    defaults are chosen on (the calibration source's end, never the evaluation text; docs/accuracy.md)."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if ids.numel() < count * length:
        raise CalibrationDataError(f"development text has {ids.numel()} tokens, fewer than {count} x {length}")
    return ids[-count * length :].reshape(count, length)
