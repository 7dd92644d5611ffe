"""Rebuild the evaluation-text guard's hash resource from the WikiText-2 raw test split.

    python -m rkv_convert.calibration_data.build_guard [path/to/wiki.test.raw]

Writes ``calibration_data/wikitext2_test_shingles.bin`` (see :mod:`.eval_guard`); the text
itself is never committed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
from pathlib import Path

from .eval_guard import RESOURCE, hash_set, write_hash_set

DEFAULT_TEXT = Path("../shared/data/wikitext-2-raw/wiki.test.raw")


def build(text_path: Path, out: Path) -> int:
    """Write the resource for ``text_path`` to ``out`` atomically; returns the number of hashes."""
    raw = text_path.read_bytes()
    hashes = hash_set(raw.decode("utf-8"))
    source = f"WikiText-2 raw test split (wiki.test.raw, sha256 {hashlib.sha256(raw).hexdigest()})"
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(write_hash_set(hashes, source))
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise
    return len(hashes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("text", nargs="?", type=Path, default=DEFAULT_TEXT, help="the WikiText-2 raw test file")
    args = parser.parse_args()
    if not args.text.is_file():
        parser.error(f"{args.text} not found; pass the path to wiki.test.raw")
    out = Path(__file__).resolve().parent / RESOURCE
    count = build(args.text, out)
    print(f"{count} hashes → {out} ({out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
