"""The passkey task's results folder (``rkv eval --task passkey --out DIR``): written after every
result, read back to resume.

A long passkey run (four lengths × 50 trials × several paths) may not fit one time-limited call, so
``DIR/passkey.json`` is rewritten (atomically) after each path × bits × length, and a later run with the
same ``--out`` skips what is already there and adds the rest. Results combine only when they were made
the same way: the same trials, depths, seed and answer length, prompts fed the same way, on the same
checkpoint (its rkv tensors and its ``rkv`` config: window, sinks, salient tokens, widths;
:class:`PasskeySetup`); otherwise the run is refused before anything is decoded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..export.format import RKV_TENSORS_FILE
from ..outdir import atomic_write_text
from .passkey import PasskeyOptions, PasskeyResult, passkey_csv

__all__ = ["PasskeySetup", "RESULTS_JSON", "RESULTS_CSV", "load_results", "save_results", "checkpoint_digest"]

RESULTS_JSON = "passkey.json"
RESULTS_CSV = "passkey.csv"


PROMPT_FEEDING = "one piece"  # context and question prefilled together (before: "context, then question")


def checkpoint_digest(folder: str | Path) -> str:
    """sha256 of the checkpoint's rkv tensors (rotations, clips, sink channels) and its ``rkv`` config
    (window, sinks, salient tokens, widths): what makes one checkpoint's quantized answers differ from another's."""
    config = json.loads((Path(folder) / "config.json").read_text()).get("rkv")
    digest = hashlib.sha256((Path(folder) / RKV_TENSORS_FILE).read_bytes())
    digest.update(json.dumps(config, sort_keys=True).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class PasskeySetup:
    """What must match for two runs' results to share a table (lengths, paths and batch size may differ)."""

    trials: int
    depths: tuple[float, ...]
    seed: int
    max_new_tokens: int
    checkpoint_sha256: str
    prompt_feeding: str = PROMPT_FEEDING

    @classmethod
    def of(cls, options: PasskeyOptions, checkpoint: str | Path) -> "PasskeySetup":
        return cls(options.trials, tuple(options.depths), options.seed, options.max_new_tokens, checkpoint_digest(checkpoint))

    def as_dict(self) -> dict:
        return {**asdict(self), "depths": list(self.depths)}


def load_results(out: str | Path, setup: PasskeySetup) -> list[PasskeyResult]:
    """Results already in ``out`` (none if it holds no ``passkey.json``); refuses another setup's."""
    path = Path(out) / RESULTS_JSON
    if not path.is_file():
        return []
    try:
        saved = json.loads(path.read_text())
        theirs, records = saved["setup"], saved["results"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a resumable passkey results file ({err}); choose another --out") from err
    mine = setup.as_dict()
    differ = [k for k in mine if theirs.get(k) != mine[k]]
    if differ:
        what = ", ".join(f"{k} {theirs.get(k)!r} there, {mine[k]!r} now" for k in differ)
        raise ValueError(f"{path} was made another way ({what}); use the same settings and checkpoint, or another --out")
    fields = set(PasskeyResult.__dataclass_fields__)
    return [PasskeyResult(**{k: v for k, v in r.items() if k in fields}) for r in records]


def save_results(out: str | Path, setup: PasskeySetup, results: list[PasskeyResult]) -> None:
    """Write ``passkey.json`` (setup and every answer) and ``passkey.csv``, each replaced atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    payload = json.dumps({"setup": setup.as_dict(), "results": [r.as_dict() for r in results]}, indent=2)
    for name, text in ((RESULTS_JSON, payload), (RESULTS_CSV, passkey_csv(results))):
        atomic_write_text(out / name, text)
