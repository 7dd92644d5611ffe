"""Is a calibration text the evaluation text in disguise? Hashed word 8-gram overlap with WikiText-2 test.

The project commits no third-party text, only :data:`RESOURCE`: a sample of the hashes of the
8-word sequences ("shingles") of the WikiText-2 raw test split, built by
``python -m rkv_convert.calibration_data.build_guard``. Words are lower-cased runs of letters
and digits, so spacing, punctuation, line breaks and WikiText's ``@-@`` markers do not matter.

A shingle is sampled when its 64-bit BLAKE2b hash is divisible by :data:`SAMPLE_EVERY`; the
same rule applies to the candidate text, so the fraction of its sampled shingles found in the
set estimates the fraction of its text copied from the evaluation split. Only the upper 32 bits
of each hash are stored (a chance collision with a set of ~15k entries: ~4e-6 per shingle).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from array import array
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Iterable, Iterator

__all__ = ["OVERLAP_LIMIT", "RESOURCE", "Overlap", "evaluation_hashes", "hash_set", "overlap", "words", "write_hash_set"]

SHINGLE_WORDS = 8
SAMPLE_EVERY = 16
OVERLAP_LIMIT = 0.2
"""Refuse a calibration text when more than this fraction of its sampled shingles are evaluation shingles."""
RESOURCE = "wikitext2_test_shingles.bin"
_FORMAT = "rkv-shingles"
_VERSION = 1
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class Overlap:
    """How many of a text's sampled shingles are in the evaluation set."""

    matched: int
    sampled: int

    @property
    def fraction(self) -> float:
        return self.matched / self.sampled if self.sampled else 0.0


def words(text: str) -> list[str]:
    """Lower-cased runs of letters and digits: what shingles are made of."""
    return _WORD.findall(text.lower())


def _sampled_hashes(tokens: list[str]) -> Iterator[int]:
    for i in range(len(tokens) - SHINGLE_WORDS + 1):
        digest = hashlib.blake2b(" ".join(tokens[i : i + SHINGLE_WORDS]).encode(), digest_size=8).digest()
        value = int.from_bytes(digest, "little")
        if value % SAMPLE_EVERY == 0:
            yield value >> 32


def hash_set(text: str) -> frozenset[int]:
    """The sampled shingle hashes of ``text`` (what :data:`RESOURCE` holds for the evaluation text)."""
    return frozenset(_sampled_hashes(words(text)))


def overlap(text: str, hashes: frozenset[int]) -> Overlap:
    """Sampled shingles of ``text`` and how many of them are in ``hashes``."""
    matched = sampled = 0
    for value in _sampled_hashes(words(text)):
        sampled += 1
        matched += value in hashes
    return Overlap(matched, sampled)


def _little_endian(values: array) -> array:
    """Swap ``values`` in place between little-endian storage and this machine's order (uint32 only)."""
    if values.itemsize != 4:
        raise RuntimeError("this platform's array('I') is not 32-bit")
    if sys.byteorder == "big":
        values.byteswap()
    return values


def _header() -> dict:
    return {"format": _FORMAT, "version": _VERSION, "shingle_words": SHINGLE_WORDS, "sample_every": SAMPLE_EVERY,
            "hash": "blake2b-64 of the space-joined lower-cased words, upper 32 bits"}  # fmt: skip


def write_hash_set(hashes: Iterable[int], source: str) -> bytes:
    """The resource's bytes: one JSON header line, then the sorted hashes as little-endian uint32."""
    values = _little_endian(array("I", sorted(hashes)))
    header = {**_header(), "source": source, "count": len(values)}
    return json.dumps(header, sort_keys=True).encode() + b"\n" + values.tobytes()


def _read_hash_set(data: bytes) -> frozenset[int]:
    line, _, body = data.partition(b"\n")
    header = json.loads(line)
    expected = _header()
    if {k: header.get(k) for k in expected} != expected:
        raise RuntimeError(
            f"{RESOURCE} was built with other settings ({header}); rebuild it: python -m rkv_convert.calibration_data.build_guard"
        )
    values = array("I")
    values.frombytes(body)
    values = _little_endian(values)
    if len(values) != header["count"]:
        raise RuntimeError(f"{RESOURCE} holds {len(values)} hashes, its header says {header['count']}; reinstall rkv")
    return frozenset(values)


@lru_cache(maxsize=1)
def evaluation_hashes() -> frozenset[int]:
    """The committed sample of WikiText-2 test shingle hashes (package data)."""
    return _read_hash_set(resources.files(__package__).joinpath(RESOURCE).read_bytes())
