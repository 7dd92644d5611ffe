"""The ablation's rows: which variants exist, and which options the greedy selection searches.

A :class:`Variant` is one row: calibration options (a fresh calibration when they differ from the
defaults), the scheme, what the runtime keeps in full precision, and (levers of issue 12) per-layer
or per-K/V widths. Protocols: ``oneshot`` (every key and value read back quantized), ``sinks``
(online-detected sinks in full precision, no window), ``deployed`` (sinks and the recent window).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..calibrate.run import CalibrationOptions

__all__ = [
    "Variant",
    "ABLATION_PROTOCOLS",
    "ABLATION_BASE",
    "SELECTION",
    "default_variants",
    "second_domain_variants",
    "long_context_variants",
]

ABLATION_PROTOCOLS = ("oneshot", "sinks", "deployed")


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
    protocols: tuple[str, ...] = ABLATION_PROTOCOLS
    key_extra_bits: int = 0  # keys at bits + this (at most 4), values at bits: separate K/V widths
    allocation_extra: float | None = None  # per-layer widths chosen by dev-text sensitivity, budget = uniform + this


# Choices searched before the table (greedy, in this order, on development text): option → values.
ABLATION_BASE = CalibrationOptions(key_layout="prerope", key_scale=0.0, learn_value_rotation=False, fit_first_key=False)
"""The ablation studies the components of the pre-RoPE RotateKV method (no key scale, the Hadamard for values); the
folded layout, the learned value rotations and the first-key fit are rows of it."""

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
    ("head_group_size", None): ("grouped-head rotation (G=3 H192)", "grouped-head rotation"),
    ("head_group_size", 1): ("per-head rotation (G=1 H64)", "grouped-head rotation"),
}


def default_variants(base: CalibrationOptions | None = None) -> list[Variant]:
    """Baselines, the default (``base``; the pre-RoPE RotateKV layout), and one change from it per row."""
    base = base or ABLATION_BASE
    rows = [
        Variant("full precision", "baseline", scheme="fp", protocols=("oneshot",)),
        Variant("RTN per token g64 post-RoPE", "baseline", scheme="rtn", sinks=False, protocols=("oneshot", "deployed")),
        Variant("KIVI-style (K per channel /32 tok; V g64)", "baseline", scheme="kivi", sinks=False,
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
        Variant("folded key layout: post-RoPE with H_d per head", "key layout", {"key_layout": "folded", "learn_rotation": False}),
        Variant("folded keys + learned rotation per head", "learned rotation", {"key_layout": "folded", "learn_rotation": True}),
        Variant("folded + learned rotation + key scale 0.5", "key scale",
                {"key_layout": "folded", "learn_rotation": True, "key_scale": 0.5}),
        Variant("folded + learned rotation + key scale 1", "key scale",
                {"key_layout": "folded", "learn_rotation": True, "key_scale": 1.0}),
        Variant("folded + learned rotation + key scale 1 + keys at RoPE positions [0; 8192)", "RoPE positions",
                {"key_layout": "folded", "learn_rotation": True, "key_scale": 1.0, "rope_span": 8192}),
        Variant("learned value rotation per head", "learned value rotation", {"learn_value_rotation": True}),
        Variant("folded + learned rotation + key scale 1 + learned value rotation", "learned value rotation",
                {"key_layout": "folded", "learn_rotation": True, "key_scale": 1.0, "learn_value_rotation": True}),
        Variant("folded + learned rotation + key scale 1 + learned value rotation + first-key fit", "first-key fit",
                {"key_layout": "folded", "learn_rotation": True, "key_scale": 1.0, "learn_value_rotation": True,
                 "fit_first_key": True}),
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
        Variant("keys +1 bit (K b+1 / V b)", "key/value bits", key_extra_bits=1),
        Variant("per-layer widths +0.25 bit budget", "bit allocation", allocation_extra=0.25),
        Variant("per-layer widths +0.5 bit budget", "bit allocation", allocation_extra=0.5),
    ]
    return rows


def second_domain_variants(base: CalibrationOptions | None = None) -> list[Variant]:
    """The methods compared on the second text domain."""
    keep = {"full precision", "RTN per token g64 post-RoPE", "KIVI-style (K per channel /32 tok; V g64)",
            "KIVI-style + sinks", "RotateKV default", "no key centring", "no permutation", "no sinks"}
    return [v for v in default_variants(base) if v.name in keep]


def long_context_variants(base: CalibrationOptions | None = None) -> list[Variant]:
    """Sinks and window at long context (issue 12): the default, sink caps and longer windows."""
    return [
        Variant("full precision", "baseline", scheme="fp", protocols=("oneshot",)),
        Variant("RotateKV default", "default"),
        Variant("no sinks", "sink protection", sinks=False, protocols=("deployed",)),
        Variant("max 2 sinks", "sink detection", max_sinks=2, protocols=("sinks", "deployed")),
        Variant("max 16 sinks", "sink detection", max_sinks=16, protocols=("sinks", "deployed")),
        Variant("recent window 64", "recent window", recent_window=64, protocols=("deployed",)),
        Variant("recent window 256", "recent window", recent_window=256, protocols=("deployed",)),
        Variant("recent window 512", "recent window", recent_window=512, protocols=("deployed",)),
    ]
