"""Accuracy ablation runner: every variant at 2, 3 and 4 bits in three protocols, defaults chosen on dev text.

The rows come from :mod:`.variants`; calibration goes through
:func:`~rkv_convert.calibrate.run.calibrate` (once per distinct option set), scores through
:func:`~.perplexity.perplexity`, tables through :mod:`.ablation_report`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Callable, Iterable

import torch

from ..calibrate.allocate import Sensitivity, allocate_bits, measure_sensitivity
from ..calibrate.artifact import CalibrationArtifact
from ..calibrate.run import CalibrationOptions, _run_pass, calibrate
from ..export.format import Checkpoint
from ..export.fuse import fuse_calibration
from ..export.writer import checkpoint_from_artifact
from ..quant.quantizer import bits_per_element
from ..quant.sinks import detect_sinks
from .perplexity import perplexity
from .schemes import KIVI, RTN, RotateKV, RotateKVSourceValues, Scheme, key_codecs, value_codecs
from .variants import ABLATION_BASE, SELECTION, Variant

__all__ = ["select_defaults", "run_ablation"]

Log = Callable[[str], None]


def _sink_counts(model, windows: torch.Tensor, checkpoint: Checkpoint, batch_size: int) -> float:
    """Mean number of tokens per window and layer that the online detector keeps in fp16."""
    flagged = []

    def observe(i, q, k, v, h):
        info = checkpoint.layers[i]
        flagged.append(detect_sinks(h, info.sink_channels, info.sink_threshold, checkpoint.config.max_sinks)
                       .sum(-1).float().cpu())

    _run_pass(model, windows, batch_size, observe, "sink count", None)
    return float(torch.cat(flagged).mean()) if flagged else 0.0


def _scheme(variant: Variant, bits: int, checkpoint: Checkpoint) -> Scheme:
    vr = checkpoint.value_rotations()
    if variant.scheme == "fp":
        return Scheme()
    if variant.scheme == "rtn":
        return RTN(name="rtn", bits=bits, value_rotations=vr)
    if variant.scheme == "kivi":
        return KIVI(name="kivi", bits=bits, value_rotations=vr, uses_sinks=variant.sinks)
    keys = key_codecs(checkpoint, None)  # the checkpoint's key layout and per-layer widths (the variant's)
    values = value_codecs(checkpoint, None)
    if not variant.value_rotation:
        return RotateKVSourceValues(name="rotatekv", bits=bits, key_codecs=keys, value_codecs=values,
                                    uses_sinks=variant.sinks, value_rotations=vr)  # fmt: skip
    return RotateKV(name="rotatekv", bits=bits, key_codecs=keys, value_codecs=values, uses_sinks=variant.sinks)


def _options_key(overrides: dict) -> tuple:
    return tuple(sorted(overrides.items()))


class _Lab:
    """The source model (calibrated, never modified), fused copies (evaluated: one for every artifact that fuses only
    the Hadamard, one more per artifact with learned value rotations or a key scale), cached artifacts."""

    def __init__(self, source_model, calibration_batches: torch.Tensor, base: dict, batch_size: int, log: Log,
                 dev_windows: torch.Tensor | None = None) -> None:  # fmt: skip
        self.source, self.batches, self.base, self.batch_size, self.log = source_model, calibration_batches, base, batch_size, log
        self.dev = dev_windows
        self.artifacts: dict[tuple, CalibrationArtifact] = {}
        self.sensitivities: dict[tuple, Sensitivity] = {}
        self.fused: dict[tuple, torch.nn.Module] = {}

    def model_for(self, overrides: dict) -> torch.nn.Module:
        """The evaluated model for an option set: the source with its artifact's value rotations and key scale fused."""
        artifact = self.artifact(overrides)
        own = artifact.key_scales is not None or any("value_head_rotation" in layer for layer in artifact.layers)
        key = _options_key({**self.base, **overrides}) if own else ()  # (): the Hadamard alone, the same for all
        if key not in self.fused:
            self.fused[key] = copy.deepcopy(self.source)
            fuse_calibration(self.fused[key], artifact)
        return self.fused[key]

    def artifact(self, overrides: dict) -> CalibrationArtifact:
        full = _options_key({**self.base, **overrides})
        if full not in self.artifacts:
            changed = {k: v for k, v in overrides.items() if self.base.get(k) != v}
            self.log(f"calibrating {changed or 'defaults'}")
            self.artifacts[full] = calibrate(self.source, self.batches, CalibrationOptions(**{**self.base, **overrides}))
        return self.artifacts[full]

    def widths(self, v: Variant, bits: int) -> tuple[list[int] | None, list[int] | None]:
        """Per-layer (key, value) widths of a variant at ``bits`` (``None``: every layer at ``bits``)."""
        artifact = self.artifact(v.options)
        n = artifact.meta["model"]["num_hidden_layers"]
        if v.allocation_extra is not None:
            if self.dev is None:
                raise ValueError(f"variant {v.name!r} chooses widths on development text: pass dev_windows")
            key = (tuple(sorted(v.options.items())), bits)
            if key not in self.sensitivities:
                self.log(f"measuring per-layer sensitivity at {bits} -> {bits + 1} bits on development text")
                at = lambda kb, vb: checkpoint_from_artifact(artifact, bits, key_bits=kb, value_bits=vb)  # noqa: E731
                self.sensitivities[key] = measure_sensitivity(self.model_for(v.options), self.dev, at, n, bits, bits + 1,
                                                              batch_size=self.batch_size)  # fmt: skip
            opts = artifact.meta["options"]
            budget = (bits_per_element(bits, opts["key_group_size"]) + bits_per_element(bits, opts["value_group_size"])) / 2
            chosen = allocate_bits(self.sensitivities[key], budget + v.allocation_extra, opts["key_group_size"],
                                   opts["value_group_size"])  # fmt: skip
            self.log(f"[{v.name}] {bits} bits: raised {chosen.raised} ({chosen.bits_per_element:.3f} bits/elem)")
            return chosen.key_bits, chosen.value_bits
        if v.key_extra_bits:
            return [min(4, bits + v.key_extra_bits)] * n, [bits] * n
        return None, None

    def score(self, v: Variant, bits: int, protocol: str, windows: torch.Tensor):
        artifact = self.artifact(v.options)
        b = 2 if bits == 16 else bits
        kb, vb = self.widths(v, b) if v.scheme == "rotatekv" else (None, None)
        ck = checkpoint_from_artifact(artifact, b, v.recent_window, max_sinks=v.max_sinks, key_bits=kb, value_bits=vb)
        scheme = _scheme(v, bits, ck)
        window = 0 if protocol == "sinks" else v.recent_window
        return perplexity(self.model_for(v.options), windows, scheme, "oneshot" if protocol == "oneshot" else "deployed",
                          ck, recent_window=window, batch_size=self.batch_size), window


def select_defaults(lab: _Lab, dev_windows: torch.Tensor, bits: int = 2, protocol: str = "sinks",
                    min_gain: float = 0.005) -> tuple[dict, list[dict]]:
    """Greedy choice over :data:`SELECTION` by PPL on ``dev_windows`` (never the evaluation text):
    a value replaces the current one only if it lowers PPL by more than ``min_gain`` (relative)."""
    chosen: dict = {}
    trail = []
    for option, values in SELECTION:
        current = lab.base.get(option)
        results = {}
        for value in values:
            result, _ = lab.score(Variant("dev", "selection", {**chosen, option: value}), bits, protocol, dev_windows)
            results[value] = result.perplexity
            trail.append({"option": option, "value": value, "dev_ppl": result.perplexity, "given": dict(chosen)})
            lab.log(f"[select] {option}={value!r} (with {chosen or 'defaults'}): dev PPL {result.perplexity:.3f}")
        best = min(results, key=results.get)
        if results[best] < results[current] * (1 - min_gain):
            chosen[option] = best
    return chosen, trail


def run_ablation(
    source_model,
    calibration_batches: torch.Tensor,
    texts: dict[str, tuple[torch.Tensor, list[Variant] | Callable[[CalibrationOptions], list[Variant]]]],
    bits_list: Iterable[int] = (2, 3, 4),
    batch_size: int = 8,
    base_options: CalibrationOptions | None = None,
    log: Log = print,
    on_row: Callable[[dict], None] | None = None,
    dev_windows: torch.Tensor | None = None,
) -> tuple[list[dict], dict, list[dict]]:
    """Score every variant of every text at every bit width and protocol.

    With ``dev_windows``, the defaults are first chosen by :func:`select_defaults` and the
    variants (a callable of the chosen options) are built around them. ``source_model`` stays
    unmodified: calibration runs on it, evaluation on copies with each artifact's transforms fused.
    ``texts`` maps a label to (windows ``int64 [n, length]``, variants). Returns (rows,
    chosen option overrides, selection trail); ``on_row`` sees each row as it is produced.
    """
    base_opts = base_options or ABLATION_BASE
    lab = _Lab(source_model, calibration_batches, dataclasses.asdict(base_opts), batch_size, log, dev_windows)
    chosen, trail = ({}, []) if dev_windows is None else select_defaults(lab, dev_windows)
    if chosen:
        log(f"[select] chosen: {chosen}")
        lab.base = {**lab.base, **chosen}
    options = CalibrationOptions(**lab.base)
    default_ck = checkpoint_from_artifact(lab.artifact({}), 2)

    rows: list[dict] = []
    for label, (windows, variants) in texts.items():
        variants = variants(options) if callable(variants) else variants
        sinks_per_window = _sink_counts(lab.model_for({}), windows, default_ck, batch_size)
        log(f"[{label}] {windows.shape[0]} windows × {windows.shape[1]} tokens; sinks per window and layer: "
            f"{sinks_per_window:.2f}")
        fp_ppl = None
        for v in variants:
            for bits in ([16] if v.scheme == "fp" else list(bits_list)):
                for protocol in v.protocols:
                    if protocol == "sinks" and not v.sinks:
                        continue
                    result, window = lab.score(v, bits, protocol, windows)
                    if v.scheme == "fp":
                        fp_ppl = result.perplexity
                    kb, vb = result.key_bits, result.value_bits
                    length = windows.shape[1]
                    eff = result.effective_bits if protocol != "oneshot" else (kb + vb) / 2
                    if v.sinks and protocol != "oneshot" and bits < 16:
                        eff += sinks_per_window * (16 - (kb + vb) / 2) / length
                    row = {
                        "text": label, "variant": v.name, "component": v.component,
                        "scheme": v.scheme, "bits": bits, "protocol": protocol if bits < 16 else "-",
                        "key_bits": kb, "value_bits": vb, "effective_bits": round(eff, 4),
                        "recent_window": window if protocol != "oneshot" else 0, "ppl": result.perplexity,
                        "ratio_fp": result.perplexity / fp_ppl if fp_ppl else math.nan,
                        "windows": int(windows.shape[0]), "window_length": int(length),
                        "sinks_per_window": sinks_per_window if v.sinks and protocol != "oneshot" else 0.0,
                    }
                    rows.append(row)
                    log(f"[{label}] {v.name:48s} {bits:>2}b {row['protocol']:9s} K/V {kb:.2f}/{vb:.2f} "
                        f"eff {eff:5.2f}  PPL {result.perplexity:8.3f}  ×FP {row['ratio_fp']:.3f}")
                    if on_row:
                        on_row(row)
    return rows, chosen, trail


