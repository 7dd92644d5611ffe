"""The cache store `rkv export` writes unless told otherwise: group metadata, per-layer key widths, group ranges,
salient tokens.

Chosen on measured accuracy (``docs/accuracy.md``, "Chosen defaults"): in the folded key layout at 2 and 3 bits,
8-bit group metadata pays for 3-bit (or 4-bit) keys in half the layers at the same stored bits per element, and
32 salient prompt tokens per sequence and layer stay in full precision. Together they keep passkey retrieval
within 2 points of full precision to 8k tokens, where fp16 metadata with uniform widths loses 16. Elsewhere (the
pre-RoPE layout, whose kernels read fp16 metadata only, and 4 bits, where 8-bit metadata was never measured) the
store is fp16 metadata with every layer at ``bits``. Group ranges stay min-max unless asked: searched ranges
(``GroupRanges.SEARCHED``, folded layout only) lower perplexity (3.6 % on development text) but lost 4 points of
passkey retrieval at 8k tokens on two calibrations and make the cache writes about 4x slower
(``docs/accuracy.md``, "Searched group ranges").
"""

from __future__ import annotations

from dataclasses import dataclass

from ..calibrate.allocate import key_bits_by_error, key_bits_for_retrieval
from ..calibrate.artifact import CalibrationArtifact
from ..quant.quantizer import GroupMeta, GroupRanges
from .format import CheckpointError, KeyLayout

__all__ = ["KEY_BITS_RULES", "LOG8_BITS", "CacheStore", "choose_store"]

KEY_BITS_RULES = ("auto", "retrieval")
LOG8_BITS = (2, 3)  # widths where 8-bit metadata and raised key layers were measured


@dataclass(frozen=True)
class CacheStore:
    """What a checkpoint's cache stores: per-layer key widths, group metadata, and why (for the CLI to print)."""

    key_bits: list[int]
    group_meta: GroupMeta
    group_ranges: GroupRanges
    note: str


def _default_meta(artifact: CalibrationArtifact, bits: int) -> GroupMeta:
    folded = artifact.key_layout == KeyLayout.FOLDED.value
    return GroupMeta.LOG8 if folded and bits in LOG8_BITS else GroupMeta.FP16


def _raised_key_bits(artifact: CalibrationArtifact, bits: int, rule: str) -> list[int]:
    """Half the layers' keys above ``bits``: by calibrated key error (``auto``) or retrieval heads first."""
    needs = ("key_error_by_bits",) if rule == "auto" else ("key_error_by_bits", "key_induction")
    missing = [name for name in needs if any(name not in layer for layer in artifact.layers)]
    if missing:
        raise CheckpointError(f"--key-bits {rule} (the default under log8 metadata) needs each layer's {' and '.join(missing)}, which this calibration "
                              "artifact lacks (made by an older rkv); re-run `rkv calibrate`, or pass --key-bits with "
                              "a width and --group-meta fp16 for the uniform store")  # fmt: skip
    if bits not in LOG8_BITS:
        raise CheckpointError(f"--key-bits {rule} raises keys above --bits, so --bits must be 2 or 3, got {bits}")
    errors = [layer["key_error_by_bits"].tolist() for layer in artifact.layers]
    steps = len(artifact.layers) // 2
    if rule == "auto":
        return key_bits_by_error(errors, bits, steps)
    induction = [layer["key_induction"].tolist() for layer in artifact.layers]
    return key_bits_for_retrieval(errors, induction, bits, steps)


def choose_store(
    artifact: CalibrationArtifact, bits: int, key_bits: list[int] | str | None, group_meta: GroupMeta | None,
    group_ranges: GroupRanges | None = None,
) -> CacheStore:
    """The store for ``artifact`` at ``bits``: what is given, the rest by the defaults above.

    ``key_bits``: one width per layer, a rule in :data:`KEY_BITS_RULES`, or ``None`` (``auto`` under 8-bit metadata,
    where the quarter bit it saves pays for the raised layers; every layer at ``bits`` under fp16 metadata).
    ``group_meta``: ``None`` picks 8-bit metadata in the folded layout at 2 or 3 bits, else fp16.
    ``group_ranges``: ``None`` picks min-max ranges (searched: folded layout only)."""
    meta = _default_meta(artifact, bits) if group_meta is None else group_meta
    ranges = GroupRanges.MINMAX if group_ranges is None else group_ranges
    if ranges is GroupRanges.SEARCHED and artifact.key_layout != KeyLayout.FOLDED.value:
        raise CheckpointError("--group-ranges searched needs the folded key layout (the pre-RoPE writer takes min-max "
                              "ranges); pass --group-ranges minmax or calibrate with --key-layout folded")  # fmt: skip
    if key_bits is None:
        key_bits = "auto" if meta is GroupMeta.LOG8 and bits in LOG8_BITS else [bits] * len(artifact.layers)
    if isinstance(key_bits, str):
        if key_bits not in KEY_BITS_RULES:
            raise CheckpointError(f"key bits take a width per layer or one of {', '.join(KEY_BITS_RULES)}, got {key_bits!r}")
        rule, key_bits = key_bits, _raised_key_bits(artifact, bits, key_bits)
        raised = {w: [i for i, b in enumerate(key_bits) if b == w] for w in sorted(set(key_bits) - {bits})}
        note = "; ".join(f"keys at {w} bits in layers {', '.join(map(str, layers))}" for w, layers in raised.items())
        note = f"--key-bits {rule}: {note or 'no layer raised'}"
    else:
        widths = sorted(set(key_bits))
        note = f"keys at {widths[0]} bits in every layer" if len(widths) == 1 else f"keys at {key_bits} bits by layer"
    return CacheStore(list(key_bits), meta, ranges, f"{note}; {meta.value} group metadata; {ranges.value} group ranges")
