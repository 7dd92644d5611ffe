"""The augmented checkpoint's ``rkv`` config section and tensor names (format version 7).

A checkpoint folder holds the source model's weights (with the value rotation fused into
``v_proj``/``o_proj``), its ``config.json`` with an ``rkv`` section (:class:`RkvConfig`),
tokenizer files, and ``rkv.safetensors`` with the per-layer calibration tensors named by
:func:`tensor_name`. docs/checkpoint-format.md specifies every field; the version rule:
a reader accepts exactly the format versions it knows and refuses others with a message.
Version 2 added ``key_layout`` (:class:`KeyLayout`); a version-1 checkpoint reads as ``prerope``.
Version 3 added per-layer key and value widths (``key_bits``, ``value_bits``); a version-1 or -2
checkpoint reads with every layer's keys and values at ``bits``. Version 4 added ``group_meta``
(:class:`~rkv_convert.quant.quantizer.GroupMeta`: fp16 or 8-bit group scales and zeros) and, for 8-bit
metadata, each layer's ``key_group_range``/``value_group_range``; an older checkpoint reads as ``fp16``.
Version 5 added ``salient_tokens`` (prompt tokens kept in full precision by the attention they draw at the
end of the prefill); an older checkpoint reads as 0. Version 6 added ``group_ranges``
(:class:`~rkv_convert.quant.quantizer.GroupRanges`: how the encoder sets each group's range); an older
checkpoint reads as ``minmax``. Version 7 added each layer's optional ``value_head_rotation`` (the learned value
rotations fused into the weights); an older checkpoint's values are rotated by ``value_rotation`` in every layer.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ..quant.packing import layout_for_bits
from ..quant.quantizer import GroupMeta, GroupRanges, bits_per_element, meta_scale_base

__all__ = [
    "FORMAT_VERSION",
    "READABLE_VERSIONS",
    "KeyLayout",
    "KEY_LAYOUTS",
    "DEFAULT_KEY_LAYOUT",
    "DEFAULT_SALIENT_TOKENS",
    "RKV_TENSORS_FILE",
    "CheckpointError",
    "RkvConfig",
    "LayerTensors",
    "tensor_name",
    "read_checkpoint",
    "check_weight_files",
    "value_rotations_per_layer",
]

FORMAT_VERSION = 7
READABLE_VERSIONS = (1, 2, 3, 4, 5, 6, 7)  # 1: before key_layout (pre-RoPE keys); 2: before per-layer key/value bits;
# 3: before group_meta (fp16 scales and zeros)
RKV_TENSORS_FILE = "rkv.safetensors"
SUPPORTED_BITS = (2, 3, 4)


class CheckpointError(ValueError):
    """An augmented checkpoint or calibration artifact is missing, corrupt or inconsistent."""


class KeyLayout(str, Enum):
    """How the quantized store holds a key (``mu`` = ``key_mean`` of the head, ``n`` = its position).

    - ``prerope``: RotateKV. ``y = (k_pre - mu) @ R`` per head group of ``G`` heads (``R =
      key_rotation [Gd, Gd]``), quantized in groups chosen by ``key_perm`` (codes in rotated channel
      order); decode undoes ``R`` and applies RoPE per cached key. Full-precision segment: pre-RoPE keys.
    - ``folded``: query-folded, post-RoPE. ``G = 1``; ``y = RoPE_n(k_pre - mu) @ R_h`` with ``R_h =
      key_rotation[:, perm_h]`` (``key_rotation [d, d]``, ``perm_h`` the head's block of ``key_perm``),
      quantized in groups of ``g_k`` *consecutive* channels of ``y`` (the permutation is folded into
      ``R_h``); decode scores ``(q R_h)·deq(y) + q·RoPE_n(mu)``. Full-precision segment: post-RoPE keys.

    Values are the same in both. Codes are packed as the checkpoint's ``layout`` says.
    """

    PREROPE = "prerope"
    FOLDED = "folded"


KEY_LAYOUTS = tuple(k.value for k in KeyLayout)
DEFAULT_KEY_LAYOUT = KeyLayout.FOLDED.value  # what `rkv calibrate` writes unless told otherwise
DEFAULT_SALIENT_TOKENS = 32  # what `rkv export` keeps unless told otherwise (export.store_choice)


@dataclass
class RkvConfig:
    """Everything the runtime needs besides tensors; stored as ``config.json["rkv"]``."""

    bits: int
    key_group_size: int
    value_group_size: int
    head_group_size: int
    num_layers: int
    num_key_value_heads: int
    head_dim: int
    source_fingerprint: str
    recent_window: int = 128
    flush_block: int = 64
    max_sinks: int = 8
    version: int = FORMAT_VERSION
    layout: str = ""
    calibration: dict = field(default_factory=dict)
    key_layout: str = KeyLayout.PREROPE.value  # a KeyLayout value; version 1 knew only prerope
    key_bits: list[int] = field(default_factory=list)  # per layer (version 3); empty: every layer at `bits`
    value_bits: list[int] = field(default_factory=list)  # per layer (version 3); empty: every layer at `bits`
    group_meta: str = GroupMeta.FP16.value  # a GroupMeta value (version 4); older versions: fp16
    salient_tokens: int = 0  # per sequence and layer, picked at the end of the prefill (version 5); older: 0
    group_ranges: str = GroupRanges.MINMAX.value  # a GroupRanges value (version 6); older versions: minmax

    def __post_init__(self) -> None:
        if not self.layout:
            self.layout = layout_for_bits(self.bits).value if self.bits in SUPPORTED_BITS else ""
        self.validate()

    def validate(self) -> None:
        if self.version not in READABLE_VERSIONS:
            raise CheckpointError(
                f"rkv format version {self.version} is not supported by this rkv (reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}); re-export the checkpoint with this rkv or upgrade rkv"
            )
        if self.key_layout not in KEY_LAYOUTS:
            raise CheckpointError(f"key_layout must be one of {', '.join(KEY_LAYOUTS)}, got {self.key_layout!r}")
        if self.version < 2 and self.key_layout != KeyLayout.PREROPE.value:
            raise CheckpointError(f"format version {self.version} has only the prerope key layout; re-export the checkpoint")
        if self.key_layout == KeyLayout.FOLDED.value:
            if self.head_group_size != 1:
                raise CheckpointError(f"the folded key layout rotates each KV head alone: head_group_size must be 1, got {self.head_group_size}")
            if self.head_dim % 2:
                raise CheckpointError(f"the folded key layout needs an even head_dim (RoPE pairs), got {self.head_dim}")
        if self.bits not in SUPPORTED_BITS:
            raise CheckpointError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.num_key_value_heads % self.head_group_size:
            raise CheckpointError(
                f"head-group size {self.head_group_size} does not divide the {self.num_key_value_heads} KV heads; "
                f"choose a divisor of {self.num_key_value_heads}"
            )
        group_channels = self.head_group_size * self.head_dim
        if group_channels % self.key_group_size:
            raise CheckpointError(
                f"key group size {self.key_group_size} must divide the {group_channels} channels of a head group"
            )
        if self.head_dim % self.value_group_size:
            raise CheckpointError(f"value group size {self.value_group_size} must divide head_dim {self.head_dim}")
        for name in ("key_bits", "value_bits"):
            widths = getattr(self, name)
            if widths and self.version < 3:
                raise CheckpointError(f"format version {self.version} has no per-layer {name}; re-export the checkpoint")
            if widths and (len(widths) != self.num_layers or any(b not in SUPPORTED_BITS for b in widths)):
                raise CheckpointError(f"{name} must list one of {SUPPORTED_BITS} per layer ({self.num_layers} layers), got {widths}")
        if self.group_meta not in {m.value for m in GroupMeta}:
            raise CheckpointError(f"group_meta must be one of {', '.join(m.value for m in GroupMeta)}, got {self.group_meta!r}")
        if self.group_meta != GroupMeta.FP16.value and (self.version < 4 or not self.folded):
            raise CheckpointError(f"{self.group_meta} group metadata needs format version 4 and the folded key layout "
                                  f"(got version {self.version}, {self.key_layout} keys); calibrate with --key-layout folded and export again")  # fmt: skip
        if self.layout != layout_for_bits(self.bits).value:
            raise CheckpointError(f"layout {self.layout!r} does not match {self.bits}-bit codes")
        if self.recent_window < 0 or self.flush_block <= 0 or self.max_sinks < 0:
            raise CheckpointError("recent_window and max_sinks must be >= 0 and flush_block > 0")
        if self.salient_tokens < 0 or (self.salient_tokens and self.version < 5):
            raise CheckpointError(f"salient_tokens must be >= 0 and needs format version 5, got {self.salient_tokens} "
                                  f"at version {self.version}; re-export the checkpoint")  # fmt: skip
        if self.group_ranges not in {r.value for r in GroupRanges}:
            raise CheckpointError(f"group_ranges must be one of {', '.join(r.value for r in GroupRanges)}, got {self.group_ranges!r}")
        if self.group_ranges != GroupRanges.MINMAX.value and (self.version < 6 or not self.folded):
            raise CheckpointError(f"{self.group_ranges} group ranges need format version 6 and the folded key layout (got "
                                  f"version {self.version}, {self.key_layout} keys); export with --group-ranges minmax "
                                  "or calibrate with --key-layout folded")  # fmt: skip

    @property
    def folded(self) -> bool:
        return self.key_layout == KeyLayout.FOLDED.value

    @property
    def head_group_channels(self) -> int:
        return self.head_group_size * self.head_dim

    def layer_bits(self, layer: int) -> tuple[int, int]:
        """``(key bits, value bits)`` of ``layer`` (each code's packing layout: ``layout_for_bits``)."""
        return (self.key_bits[layer] if self.key_bits else self.bits, self.value_bits[layer] if self.value_bits else self.bits)

    @property
    def mixed_bits(self) -> bool:
        """Whether some layer's keys or values differ from ``bits``."""
        return any(b != self.bits for b in (*self.key_bits, *self.value_bits))

    @property
    def meta(self) -> GroupMeta:
        """How the store holds group scales and zeros."""
        return GroupMeta(self.group_meta)

    @property
    def ranges(self) -> GroupRanges:
        """How the encoder sets each group's range."""
        return GroupRanges(self.group_ranges)

    @property
    def key_bits_per_element(self) -> float:
        """Stored bits per key element, averaged over layers (codes plus scale and zero per group)."""
        return sum(bits_per_element(self.layer_bits(i)[0], self.key_group_size, self.meta)
                   for i in range(self.num_layers)) / self.num_layers  # fmt: skip

    @property
    def value_bits_per_element(self) -> float:
        return sum(bits_per_element(self.layer_bits(i)[1], self.value_group_size, self.meta)
                   for i in range(self.num_layers)) / self.num_layers  # fmt: skip

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self), sort_keys=True))

    @classmethod
    def from_dict(cls, data: dict) -> "RkvConfig":
        if not isinstance(data, dict):
            raise CheckpointError("config.json's 'rkv' section is not an object")
        version = data.get("version")
        if version not in READABLE_VERSIONS:
            raise CheckpointError(
                f"rkv format version {version} is not supported (this rkv reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}); re-export the checkpoint with this rkv"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        if version == 1:  # written before key_layout existed: pre-RoPE keys
            names.discard("key_layout")
        if version < 3:  # written before per-layer widths: every layer at `bits`
            names -= {"key_bits", "value_bits"}
        if version < 4:  # written before group_meta: fp16 scales and zeros
            names.discard("group_meta")
        if version < 5:  # written before salient_tokens: none
            names.discard("salient_tokens")
        if version < 6:  # written before group_ranges: min-max ranges
            names.discard("group_ranges")
        unknown = sorted(set(data) - names)
        required = (({"key_layout"} if version >= 2 else set()) | ({"key_bits", "value_bits"} if version >= 3 else set())
                    | ({"group_meta"} if version >= 4 else set()) | ({"salient_tokens"} if version >= 5 else set())
                    | ({"group_ranges"} if version >= 6 else set()))  # fmt: skip
        missing = sorted(f.name for f in dataclasses.fields(cls) if (f.name in required or (f.default is dataclasses.MISSING
                         and f.default_factory is dataclasses.MISSING)) and f.name not in data)
        if unknown or missing:
            raise CheckpointError(f"rkv config fields: unknown {unknown}, missing {missing}")
        return cls(**data)


def tensor_name(layer: int, what: str) -> str:
    """``layers.{layer}.{what}`` for per-layer tensors (``key_mean``, ``key_perm``, ...)."""
    return f"layers.{layer}.{what}"


@dataclass
class LayerTensors:
    """Per-layer calibration tensors as the runtime reads them.

    - ``key_mean`` fp32 ``[n_kv*d]``: calibrated mean of the pre-RoPE keys, subtracted before rotation.
    - ``key_perm`` int64 ``[n_kv*d]``: channel permutation, block-diagonal over head groups;
      quantization group ``j`` of a head group holds rotated channels ``perm[j*g:(j+1)*g]``.
    - ``key_clip``, ``value_clip`` fp32 ``[]``: clip ratios for this layer at its key / value bits.
    - ``sink_channels`` int64 ``[s]``: hidden channels whose massive activations flag sink tokens.
    - ``sink_threshold`` fp32 ``[]``: a token is a sink when ``max |h[sink_channels]| > sink_threshold``
      (``h`` = the decoder layer's input); ``inf`` disables detection for the layer.
    - ``key_head_rotation`` fp32 ``[n_kv, d, d]`` or ``None`` (folded layout, version 3): each KV head's
      ``R_h``, learned by calibration and/or turned by the first-key fit (:mod:`.first_key`); absent,
      ``R_h = key_rotation[:, perm_h]``.
    - ``key_group_range``, ``value_group_range`` fp32 ``[]`` or ``None`` (8-bit group metadata, version 4):
      the largest unclipped group range (max - min) of the stored keys ``y`` / values on calibration
      text, which sets the base of the 8-bit scale codes (:meth:`meta_bases`).
    - ``value_head_rotation`` fp32 ``[n_kv, d, d]`` or ``None`` (version 7): each KV head's value rotation as fused
      into ``v_proj``/``o_proj``, learned by calibration; absent, ``value_rotation`` for every head. The runtime
      never applies it (the weights do); evaluation baselines undo it to quantize the source model's values.
    """

    key_mean: torch.Tensor
    key_perm: torch.Tensor
    key_clip: float
    value_clip: float
    sink_channels: torch.Tensor
    sink_threshold: float
    key_head_rotation: torch.Tensor | None = None
    key_group_range: float | None = None
    value_group_range: float | None = None
    value_head_rotation: torch.Tensor | None = None

    FIELDS = ("key_mean", "key_perm", "key_clip", "value_clip", "sink_channels", "sink_threshold")

    def meta_bases(self, key_bits: int, value_bits: int, key_clip: float | None = None,
                   value_clip: float | None = None) -> tuple[float, float]:  # fmt: skip
        """``(key base, value base)`` of 8-bit scale codes at these widths and clips (default: the layer's clips)."""
        if self.key_group_range is None or self.value_group_range is None:
            raise CheckpointError("8-bit group metadata needs the layer's key_group_range and value_group_range")
        return (meta_scale_base(self.key_group_range, key_bits, self.key_clip if key_clip is None else key_clip),
                meta_scale_base(self.value_group_range, value_bits, self.value_clip if value_clip is None else value_clip))


@dataclass
class Checkpoint:
    config: RkvConfig
    key_rotation: torch.Tensor  # fp32 [G*d, G*d], orthonormal, applied as y = x @ R (folded: [d, d], R_h = R[:, perm_h])
    value_rotation: torch.Tensor  # fp32 [d, d], fused into v_proj rows / o_proj columns (where no layer learned its own)
    layers: list[LayerTensors]

    def value_rotations(self) -> list[torch.Tensor]:
        """Each layer's value rotation per KV head as fused into the weights, fp32 ``[n_kv, d, d]``."""
        return value_rotations_per_layer(self.value_rotation, [layer.value_head_rotation for layer in self.layers],
                                         self.config.num_key_value_heads)  # fmt: skip


def value_rotations_per_layer(shared: torch.Tensor, learned: list[torch.Tensor | None], n_kv: int) -> list[torch.Tensor]:
    """Per layer fp32 ``[n_kv, d, d]``: the layer's learned value rotations, or ``shared [d, d]`` for every head."""
    every_head = shared.float().expand(n_kv, *shared.shape)
    return [every_head if r is None else r.float() for r in learned]


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read and validate ``config.json["rkv"]`` and ``rkv.safetensors`` of an exported folder."""
    folder = Path(path)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder} has no config.json: not an rkv checkpoint (run `rkv export` first)")
    try:
        full = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_path} is not valid JSON: {err}") from err
    if "rkv" not in full:
        raise CheckpointError(f"{config_path} has no 'rkv' section: a plain model, not an rkv export")
    config = RkvConfig.from_dict(full["rkv"])
    tensors_path = folder / RKV_TENSORS_FILE
    if not tensors_path.is_file():
        raise CheckpointError(f"{tensors_path} is missing; re-run `rkv export`")
    try:
        tensors = load_file(str(tensors_path))
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{tensors_path} is corrupt: {err}") from err
    check_weight_files(folder)
    return Checkpoint(config, *_unpack_tensors(tensors, config))


def check_weight_files(folder: str | Path) -> None:
    """Refuse weight files that are missing or cut short (an interrupted copy or download).

    Reads only each ``*.safetensors`` header, which safetensors checks against the file size.
    """
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    names = {p.name for p in folder.glob("*.safetensors")} - {RKV_TENSORS_FILE}
    if index.is_file():
        try:
            names |= set(json.loads(index.read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index} is corrupt ({err}); re-export the checkpoint with `rkv export --overwrite`") from err
    for name in sorted(names):
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing; re-export the checkpoint with `rkv export --overwrite`")
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise CheckpointError(
                f"{path} is truncated or corrupt ({err}); re-export the checkpoint with `rkv export --overwrite`"
            ) from err


def _head_rotation(tensors: dict[str, torch.Tensor], layer: int, config: RkvConfig) -> torch.Tensor | None:
    """A folded layer's learned ``R_h`` (``[n_kv, d, d]``) when the checkpoint has one."""
    name = tensor_name(layer, "key_head_rotation")
    if name not in tensors:
        return None
    shape = (config.num_key_value_heads, config.head_dim, config.head_dim)
    if not config.folded or config.version < 3 or tuple(tensors[name].shape) != shape:
        raise CheckpointError(f"{name} needs the folded key layout, format version 3 and shape {shape}; re-export the checkpoint")
    return tensors[name].float()


def _value_head_rotation(tensors: dict[str, torch.Tensor], layer: int, config: RkvConfig) -> torch.Tensor | None:
    """A layer's learned value rotations (``[n_kv, d, d]``, version 7) when the checkpoint has them."""
    name = tensor_name(layer, "value_head_rotation")
    if name not in tensors:
        return None
    shape = (config.num_key_value_heads, config.head_dim, config.head_dim)
    if config.version < 7 or tuple(tensors[name].shape) != shape:
        raise CheckpointError(f"{name} needs format version 7 and shape {shape}; re-export the checkpoint")
    return tensors[name].float()


def _group_ranges(tensors: dict[str, torch.Tensor], layer: int, config: RkvConfig) -> dict[str, float]:
    """An 8-bit-metadata checkpoint's per-layer group ranges (required there, refused elsewhere)."""
    names = {what: tensor_name(layer, what) for what in ("key_group_range", "value_group_range")}
    present = {what: name in tensors for what, name in names.items()}
    if config.meta is GroupMeta.FP16:
        if any(present.values()):
            raise CheckpointError(f"{names['key_group_range']} belongs to 8-bit group metadata, but group_meta is fp16; "
                                  "re-export the checkpoint")  # fmt: skip
        return {}
    out = {}
    for what, name in names.items():
        if not present[what] or tuple(tensors[name].shape) != () or not bool(torch.isfinite(tensors[name])):
            raise CheckpointError(f"{config.group_meta} group metadata needs a finite scalar {name!r}; re-export the checkpoint")
        out[what] = float(tensors[name])
    return out


def _unpack_tensors(tensors: dict[str, torch.Tensor], config: RkvConfig) -> tuple:
    def need(name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        if name not in tensors:
            raise CheckpointError(f"rkv tensors lack {name!r}")
        t = tensors[name]
        if shape is not None and tuple(t.shape) != shape:
            raise CheckpointError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
        return t

    channels = config.num_key_value_heads * config.head_dim
    gd = config.head_group_channels
    key_rotation = need("key_rotation", (gd, gd)).float()
    value_rotation = need("value_rotation", (config.head_dim, config.head_dim)).float()
    layers = []
    for i in range(config.num_layers):
        layers.append(
            LayerTensors(
                key_mean=need(tensor_name(i, "key_mean"), (channels,)).float(),
                key_perm=need(tensor_name(i, "key_perm"), (channels,)).long(),
                key_clip=float(need(tensor_name(i, "key_clip"), ())),
                value_clip=float(need(tensor_name(i, "value_clip"), ())),
                sink_channels=need(tensor_name(i, "sink_channels")).long(),
                sink_threshold=float(need(tensor_name(i, "sink_threshold"), ())),
                key_head_rotation=_head_rotation(tensors, i, config),
                **_group_ranges(tensors, i, config),
                value_head_rotation=_value_head_rotation(tensors, i, config),
            )
        )
    return key_rotation, value_rotation, layers
