"""A second evaluation domain built from what is installed: the READMEs of Python packages."""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["package_docs_text"]


def package_docs_text(site_packages: str | Path, max_chars: int = 3_000_000) -> str:
    """Second evaluation domain: the long descriptions (READMEs) of installed Python packages.

    The body of every ``*.dist-info/METADATA`` under ``site_packages`` (after its header),
    sorted by folder name, duplicates dropped. Neither the calibration text (Python's own
    docs) nor WikiText; record the text's sha256 with any result, since it depends on what is
    installed.
    """
    pieces, seen, total = [], set(), 0
    for meta in sorted(Path(site_packages).glob("*.dist-info/METADATA")):
        raw = meta.read_text(encoding="utf-8", errors="replace")
        _, sep, body = raw.partition("\n\n")
        body = body.strip()
        digest = hashlib.sha256(body.encode()).hexdigest()
        if not sep or len(body) < 500 or digest in seen:
            continue
        seen.add(digest)
        pieces.append(body)
        total += len(body)
        if total >= max_chars:
            break
    return "\n\n".join(pieces)
