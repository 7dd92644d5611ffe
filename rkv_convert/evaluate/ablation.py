"""Accuracy ablation: each RotateKV component on and off, at 2, 3 and 4 bits, in three protocols.

One row is a :class:`Variant`: calibration options (a fresh calibration when they differ
from the defaults), the scheme, and what the runtime keeps in full precision. Protocols:

- ``oneshot``: every key and value read back quantized, sinks included;
- ``sinks``: the online-detected sink tokens kept in full precision, no recent window
  (the deployed protocol with a window of 0: RotateKV's paper protocol);
- ``deployed``: sinks and the last ``recent_window`` tokens kept in full precision.

Everything goes through the project's quantizer (:mod:`rkv_convert.quant`), except the
rows marked *experimental*: those change what the quantizer computes (a least-squares
encoder, value centring) and would need kernel support before the runtime could use them.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..calibrate.artifact import CalibrationArtifact
from ..calibrate.run import CalibrationOptions, _run_pass, calibrate
from ..export.format import Checkpoint, LayerTensors, RkvConfig
from ..export.fuse import fuse_value_rotation
from ..models.adapters import head_dim
from ..quant.codec import KeyCodec, ValueCodec, rotate_groups
from ..quant.hadamard import hadamard_matrix
from ..quant.quantizer import SCALE_FLOOR, QuantizedTensor, dequantize, levels, quantize
from ..quant.sinks import detect_sinks
from .perplexity import perplexity
from .schemes import KIVI, RTN, RotateKV, Scheme, _heads_to_rows, _rows_to_heads, key_codecs

__all__ = [
    "Variant",
    "ABLATION_PROTOCOLS",
    "SELECTION",
    "default_variants",
    "select_defaults",
    "second_domain_variants",
    "checkpoint_from_artifact",
    "lsq_quantize",
    "ExperimentalRotateKV",
    "package_docs_text",
    "run_ablation",
    "markdown_table",
    "selection_table",
]

ABLATION_PROTOCOLS = ("oneshot", "sinks", "deployed")
Log = Callable[[str], None]


@dataclass
class Variant:
    """One row of the ablation table."""

    name: str
    component: str
    options: dict = field(default_factory=dict)  # CalibrationOptions overrides
    scheme: str = "rotatekv"  # fp, rtn, kivi, rotatekv
    sinks: bool = True  # keep online-detected sink tokens in fp16 (sinks, deployed protocols)
    recent_window: int = 128
    max_sinks: int = 8
    value_rotation: bool = True  # False: values quantized in the source basis
    lsq_encoder: bool = False  # experimental: least-squares scale/zero per group
    value_centring: bool = False  # experimental: calibrated value mean subtracted before quantizing
    protocols: tuple[str, ...] = ABLATION_PROTOCOLS

    @property
    def experimental(self) -> bool:
        return self.lsq_encoder or self.value_centring


# Choices searched before the table (greedy, in this order, on development text): option → values.
ABLATION_BASE = CalibrationOptions(key_layout="prerope")
"""The ablation studies the components of the pre-RoPE RotateKV method; the folded layout is one of its rows."""

SELECTION = (
    ("clip_objective", ("mse", "qk")),
    ("perm_statistic", ("mean_abs", "max_abs", "rms")),
    ("head_group_size", (None, 1)),
    ("sink_ratio", (32.0, 64.0, 128.0)),
)
_LABELS = {
    ("clip_objective", "mse"): ("clip searched by key MSE", "clip objective"),
    ("clip_objective", "qk"): ("clip searched by q·k error", "clip objective"),
    ("perm_statistic", "mean_abs"): ("permutation by mean|x|", "permutation statistic"),
    ("perm_statistic", "max_abs"): ("permutation by max|x|", "permutation statistic"),
    ("perm_statistic", "rms"): ("permutation by rms", "permutation statistic"),
    ("head_group_size", None): ("grouped-head rotation (G=3, H192)", "grouped-head rotation"),
    ("head_group_size", 1): ("per-head rotation (G=1, H64)", "grouped-head rotation"),
}


def default_variants(base: CalibrationOptions | None = None) -> list[Variant]:
    """Baselines, the default (``base``; the pre-RoPE RotateKV layout), and one change from it per row."""
    base = base or ABLATION_BASE
    rows = [
        Variant("full precision", "baseline", scheme="fp", protocols=("oneshot",)),
        Variant("RTN per token g64, post-RoPE", "baseline", scheme="rtn", sinks=False, protocols=("oneshot", "deployed")),
        Variant("KIVI-style (K per channel /32 tok, V g64)", "baseline", scheme="kivi", sinks=False,
                protocols=("oneshot", "deployed")),
        Variant("KIVI-style + sinks", "baseline", scheme="kivi", protocols=("sinks", "deployed")),
        Variant("RotateKV default", "default"),
    ]
    for option, values in SELECTION:
        for value in values:
            if getattr(base, option) == value:
                continue
            if option == "sink_ratio":
                rows.append(Variant(f"sink ratio {value:g}", "sink detection", {option: value}, protocols=("sinks", "deployed")))
            else:
                name, component = _LABELS[(option, value)]
                rows.append(Variant(name, component, {option: value}))
    rows += [
        Variant("folded key layout: post-RoPE, H_d per head", "key layout", {"key_layout": "folded"}),
        Variant("no key rotation", "grouped-head rotation", {"rotate_keys": False}),
        Variant("no value rotation", "value rotation", value_rotation=False),
        Variant("no permutation", "permutation", {"perm_statistic": "none"}),
        Variant("no clipping (clip 1.0)", "clipping", {"key_clip": 1.0, "value_clip": 1.0}),
        Variant("fixed clip 0.9", "clipping", {"key_clip": 0.9, "value_clip": 0.9}),
        Variant("no key centring", "key centring", {"center_keys": False}),
        Variant("no sinks", "sink protection", sinks=False, protocols=("deployed",)),
        Variant("max 2 sinks", "sink detection", max_sinks=2, protocols=("sinks", "deployed")),
        Variant("max 16 sinks", "sink detection", max_sinks=16, protocols=("sinks", "deployed")),
        Variant("recent window 32", "recent window", recent_window=32, protocols=("deployed",)),
        Variant("recent window 64", "recent window", recent_window=64, protocols=("deployed",)),
        Variant("key group 32", "group size", {"key_group_size": 32}),
        Variant("key group 192", "group size", {"key_group_size": 192}),
        Variant("value group 32", "group size", {"value_group_size": 32}),
        Variant("least-squares encoder (exp.)", "experimental", lsq_encoder=True),
        Variant("value centring (exp.)", "experimental", value_centring=True),
        Variant("least-squares encoder + value centring (exp.)", "experimental", lsq_encoder=True, value_centring=True),
    ]
    return rows


def second_domain_variants(base: CalibrationOptions | None = None) -> list[Variant]:
    """The methods compared on the second text domain."""
    keep = {"full precision", "RTN per token g64, post-RoPE", "KIVI-style (K per channel /32 tok, V g64)",
            "KIVI-style + sinks", "RotateKV default", "no key centring", "no permutation", "no sinks"}
    return [v for v in default_variants(base) if v.name in keep]


# --------------------------------------------------------------------------- checkpoints


def checkpoint_from_artifact(artifact: CalibrationArtifact, bits: int, recent_window: int = 128,
                             max_sinks: int = 8) -> Checkpoint:
    """The in-memory :class:`Checkpoint` that ``rkv export`` would write (weights aside)."""
    opts, shape = artifact.meta["options"], artifact.meta["model"]
    config = RkvConfig(
        bits=bits, key_group_size=opts["key_group_size"], value_group_size=opts["value_group_size"],
        head_group_size=opts["head_group_size"], num_layers=shape["num_hidden_layers"],
        num_key_value_heads=shape["num_key_value_heads"], head_dim=shape["head_dim"],
        source_fingerprint=artifact.meta["source_fingerprint"], recent_window=recent_window, max_sinks=max_sinks,
        key_layout=opts.get("key_layout", "prerope"),
    )
    layers = [
        LayerTensors(
            key_mean=layer["key_mean"].float(), key_perm=layer["key_perm"].long(),
            key_clip=artifact.clip_for(i, bits, "key"), value_clip=artifact.clip_for(i, bits, "value"),
            sink_channels=layer["sink_channels"].long(), sink_threshold=float(layer["sink_threshold"]),
        )
        for i, layer in enumerate(artifact.layers)
    ]
    return Checkpoint(config, artifact.key_rotation.float(), artifact.value_rotation.float(), layers)


# --------------------------------------------------------------------------- experimental quantizer


def lsq_quantize(x: torch.Tensor, bits: int, group_size: int, clip: float = 1.0, perm: torch.Tensor | None = None,
                 iters: int = 4) -> torch.Tensor:
    """Experimental encoder, same storage as :func:`quantize`: codes, fp16 scale, fp16 zero.

    Starts from the min/max grid and alternates: codes for the current grid, then the scale and
    zero that fit ``x ≈ code*scale + zero`` by least squares per group. The decoder is unchanged;
    the encoder (the runtime's quantize-pack kernel) is not. Returns the dequantized ``x``.
    """
    q = quantize(x, bits, group_size, clip, perm)
    xf = x.float()
    if perm is not None:
        xf = xf.index_select(-1, perm)
    g = xf.reshape(*xf.shape[:-1], -1, group_size)
    scale, zero = q.scale.float(), q.zero.float()
    top = levels(bits)
    for _ in range(iters):
        codes = ((g - zero.unsqueeze(-1)) / scale.unsqueeze(-1)).round().clamp(0, top)
        cm, xm = codes.mean(-1), g.mean(-1)
        var = (codes - cm.unsqueeze(-1)).pow(2).mean(-1)
        cov = ((codes - cm.unsqueeze(-1)) * (g - xm.unsqueeze(-1))).mean(-1)
        ok = var > 0
        new_scale = torch.where(ok, cov / var.clamp_min(1e-12), scale).clamp_min(SCALE_FLOOR)
        new_zero = torch.where(ok, xm - new_scale * cm, zero)
        scale, zero = new_scale.half().float(), new_zero.half().float()
    codes = ((g - zero.unsqueeze(-1)) / scale.unsqueeze(-1)).round().clamp(0, top).to(torch.uint8).reshape(xf.shape)
    if perm is not None:
        codes = codes.index_select(-1, torch.argsort(perm))
    return dequantize(QuantizedTensor(codes, scale.half(), zero.half(), bits, group_size, perm), x.dtype)


@dataclass
class ExperimentalRotateKV(RotateKV):
    """RotateKV with the experimental options of :class:`Variant` (and ``value_rotation=False``)."""

    lsq_encoder: bool = False
    value_means: list[torch.Tensor] | None = None
    value_rotation: torch.Tensor | None = None  # set: undo the fused rotation before quantizing values

    def _q(self, x, bits, group_size, clip, perm=None):
        if self.lsq_encoder:
            return lsq_quantize(x, bits, group_size, clip, perm)
        return dequantize(quantize(x, bits, group_size, clip, perm), x.dtype)

    def keys(self, layer, k_pre, cos, sin):
        c: KeyCodec = self.key_codecs[layer]
        if not isinstance(c, KeyCodec):  # folded keys: only the value options are experimental here
            if self.lsq_encoder:
                raise NotImplementedError("the least-squares encoder is implemented for prerope keys only")
            return super().keys(layer, k_pre, cos, sin)
        rows = _heads_to_rows(k_pre).float()
        y = rotate_groups(rows - c.mean.to(rows.device), c.rotation)
        back = rotate_groups(self._q(y, c.bits, c.group_size, c.clip, c.perm.to(rows.device)), c.rotation, inverse=True)
        k = _rows_to_heads((back + c.mean.to(rows.device)).to(k_pre.dtype), k_pre.shape[1])
        return super(RotateKV, self).keys(layer, k, cos, sin)

    def values(self, layer, v):
        c: ValueCodec = self.value_codecs[layer]
        rows = _heads_to_rows(v).float()
        if self.value_rotation is not None:
            rows = rotate_groups(rows, self.value_rotation, inverse=True)
        mean = self.value_means[layer].to(rows.device) if self.value_means is not None else 0.0
        out = self._q(rows - mean, c.bits, c.group_size, c.clip) + mean
        if self.value_rotation is not None:
            out = rotate_groups(out, self.value_rotation)
        return _rows_to_heads(out.to(v.dtype), v.shape[1])


def _value_means(model, batches: torch.Tensor, checkpoint: Checkpoint, batch_size: int) -> list[torch.Tensor]:
    """Per layer, the mean of the (rotated) values over calibration tokens that are not sinks."""
    n = checkpoint.config.num_layers
    totals: list[torch.Tensor | None] = [None] * n
    counts = [0] * n

    def observe(i, q, k, v, h):
        info = checkpoint.layers[i]
        sinks = detect_sinks(h, info.sink_channels, info.sink_threshold, 1 << 30).reshape(-1)
        rows = _heads_to_rows(v).reshape(-1, v.shape[1] * v.shape[3]).double()[~sinks]
        totals[i] = rows.sum(0) if totals[i] is None else totals[i] + rows.sum(0)
        counts[i] += rows.shape[0]

    _run_pass(model, batches, batch_size, observe, "value means", None)
    return [(t / c).float().cpu() for t, c in zip(totals, counts)]


def _sink_counts(model, windows: torch.Tensor, checkpoint: Checkpoint, batch_size: int) -> float:
    """Mean number of tokens per window and layer that the online detector keeps in fp16."""
    flagged = []

    def observe(i, q, k, v, h):
        info = checkpoint.layers[i]
        flagged.append(detect_sinks(h, info.sink_channels, info.sink_threshold, checkpoint.config.max_sinks)
                       .sum(-1).float().cpu())

    _run_pass(model, windows, batch_size, observe, "sink count", None)
    return float(torch.cat(flagged).mean()) if flagged else 0.0


# --------------------------------------------------------------------------- second text domain


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


# --------------------------------------------------------------------------- running


def _scheme(variant: Variant, bits: int, checkpoint: Checkpoint, value_means) -> Scheme:
    vr = checkpoint.value_rotation
    if variant.scheme == "fp":
        return Scheme()
    if variant.scheme == "rtn":
        return RTN(name="rtn", bits=bits, value_rotation=vr)
    if variant.scheme == "kivi":
        return KIVI(name="kivi", bits=bits, value_rotation=vr, uses_sinks=variant.sinks)
    cfg = checkpoint.config
    keys = key_codecs(checkpoint, bits)  # in the checkpoint's key layout (prerope or folded)
    values = [ValueCodec(bits, cfg.value_group_size, l.value_clip) for l in checkpoint.layers]
    if variant.experimental or not variant.value_rotation:
        return ExperimentalRotateKV(
            name="rotatekv", bits=bits, key_codecs=keys, value_codecs=values, uses_sinks=variant.sinks,
            lsq_encoder=variant.lsq_encoder, value_means=value_means if variant.value_centring else None,
            value_rotation=None if variant.value_rotation else vr,
        )
    return RotateKV(name="rotatekv", bits=bits, key_codecs=keys, value_codecs=values, uses_sinks=variant.sinks)


def _options_key(overrides: dict) -> tuple:
    return tuple(sorted(overrides.items()))


class _Lab:
    """The source model (calibrated, never modified), a fused copy (evaluated), and cached artifacts."""

    def __init__(self, source_model, calibration_batches: torch.Tensor, base: dict, batch_size: int, log: Log) -> None:
        self.source, self.batches, self.base, self.batch_size, self.log = source_model, calibration_batches, base, batch_size, log
        self.artifacts: dict[tuple, CalibrationArtifact] = {}
        self.model = copy.deepcopy(source_model)
        fuse_value_rotation(self.model, hadamard_matrix(head_dim(source_model.config)))
        self._value_means = None

    def artifact(self, overrides: dict) -> CalibrationArtifact:
        full = _options_key({**self.base, **overrides})
        if full not in self.artifacts:
            changed = {k: v for k, v in overrides.items() if self.base.get(k) != v}
            self.log(f"calibrating {changed or 'defaults'}")
            self.artifacts[full] = calibrate(self.source, self.batches, CalibrationOptions(**{**self.base, **overrides}))
        return self.artifacts[full]

    def value_means(self) -> list[torch.Tensor]:
        if self._value_means is None:
            ck = checkpoint_from_artifact(self.artifact({}), 2)
            self._value_means = _value_means(self.model, self.batches, ck, self.batch_size)
        return self._value_means

    def score(self, v: Variant, bits: int, protocol: str, windows: torch.Tensor):
        artifact = self.artifact(v.options)
        ck = checkpoint_from_artifact(artifact, 2 if bits == 16 else bits, v.recent_window, v.max_sinks)
        scheme = _scheme(v, bits, ck, self.value_means() if v.value_centring else None)
        window = 0 if protocol == "sinks" else v.recent_window
        return perplexity(self.model, windows, scheme, "oneshot" if protocol == "oneshot" else "deployed", ck,
                          recent_window=window, batch_size=self.batch_size), window


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
    unmodified: calibration runs on it, evaluation on a copy with the value rotation fused.
    ``texts`` maps a label to (windows ``int64 [n, length]``, variants). Returns (rows,
    chosen option overrides, selection trail); ``on_row`` sees each row as it is produced.
    """
    base_opts = base_options or ABLATION_BASE
    lab = _Lab(source_model, calibration_batches, dataclasses.asdict(base_opts), batch_size, log)
    chosen, trail = ({}, []) if dev_windows is None else select_defaults(lab, dev_windows)
    if chosen:
        log(f"[select] chosen: {chosen}")
        lab.base = {**lab.base, **chosen}
    options = CalibrationOptions(**lab.base)
    default_ck = checkpoint_from_artifact(lab.artifact({}), 2)

    rows: list[dict] = []
    for label, (windows, variants) in texts.items():
        variants = variants(options) if callable(variants) else variants
        sinks_per_window = _sink_counts(lab.model, windows, default_ck, batch_size)
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
                        "text": label, "variant": v.name, "component": v.component, "experimental": v.experimental,
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


# --------------------------------------------------------------------------- reporting


def markdown_table(rows: list[dict], text: str, bits_list: Iterable[int] = (2, 3, 4)) -> str:
    """One table per text: a row per variant, PPL (× FP) per bit width and protocol."""
    rows = [r for r in rows if r["text"] == text]
    if not rows:
        return ""
    bits_list = list(bits_list)
    first = rows[0]
    fp = next((r["ppl"] for r in rows if r["scheme"] == "fp"), None)
    cols = [(b, p) for b in bits_list for p in ABLATION_PROTOCOLS]
    head = "| variant | component | K/V bits/elem @2b |" + "".join(f" {b}b {p} |" for b, p in cols)
    lines = [
        f"**{text}**: {first['windows']} windows × {first['window_length']} tokens; full precision PPL "
        f"{fp:.3f}." if fp else f"**{text}**",
        "",
        head,
        "|" + "---|" * (3 + len(cols)),
    ]
    order: list[str] = []
    for r in rows:
        if r["variant"] not in order:
            order.append(r["variant"])
    for name in order:
        mine = [r for r in rows if r["variant"] == name]
        if mine[0]["scheme"] == "fp":
            lines.append(f"| {name} | baseline | 16 / 16 |" + f" {fp:.2f} |" + " |" * (len(cols) - 1))
            continue
        at2 = next((r for r in mine if r["bits"] == 2), mine[0])
        cells = []
        for b, p in cols:
            r = next((r for r in mine if r["bits"] == b and r["protocol"] == p), None)
            cells.append(f" {r['ppl']:.2f} ({r['ratio_fp']:.2f}×) |" if r else " – |")
        cell = name.replace("|", "\\|")  # markdown: a bare | would split the cell
        lines.append(f"| {cell} | {mine[0]['component']} | {at2['key_bits']:.2f} / {at2['value_bits']:.2f} |" + "".join(cells))
    return "\n".join(lines) + "\n"


def env_summary() -> dict:
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    else:
        info["device"] = f"cpu ({os.cpu_count()} cores)"
    return info


def selection_table(trail: list[dict], chosen: dict) -> str:
    """The greedy selection, as markdown."""
    if not trail:
        return ""
    lines = ["**Selection** (2-bit, sinks protocol, development text; a value must gain > 0.5 % to replace the default)", "",
             "| option | value | given | dev PPL |", "|---|---|---|---|"]
    for t in trail:
        mark = " ✔" if chosen.get(t["option"], "unchanged") == t["value"] else ""
        lines.append(f"| {t['option']} | {t['value']!r}{mark} | {t['given'] or '-'} | {t['dev_ppl']:.3f} |")
    lines.append(f"\nchosen overrides: {chosen or 'none (defaults kept)'}")
    return "\n".join(lines) + "\n"
