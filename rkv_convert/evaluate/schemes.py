"""KV quantization schemes compared by ``rkv eval``, all through the project's one quantizer.

Each scheme turns a layer's keys and values into what a reader of its cache gets back
(dequantized), given pre-RoPE keys; RoPE is applied where the scheme stores keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..export.format import Checkpoint
from ..quant.codec import FoldedKeyCodec, KeyCodec, ValueCodec
from ..quant.quantizer import GroupMeta, bits_per_element, fake_quantize
from ..runtime.ops import apply_rope

__all__ = ["Scheme", "FullPrecision", "RTN", "KIVI", "RotateKV", "RotateKVSourceValues", "build_scheme", "key_codecs", "value_codecs", "SCHEME_NAMES"]

SCHEME_NAMES = ("fp", "rtn", "kivi", "rotatekv")


def _heads_to_rows(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, T, d]`` → ``[B, T, H*d]``."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


def _rows_to_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


@dataclass
class Scheme:
    """Full precision; subclasses quantize. ``values`` arrive rotated (the exported weights rotate them)."""

    name: str = "fp"
    bits: int = 16
    uses_sinks: bool = False

    def keys(self, layer: int, k_pre: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Dequantized post-RoPE keys ``[B, n_kv, T, d]``."""
        return _rope(k_pre, cos, sin)

    def values(self, layer: int, v: torch.Tensor) -> torch.Tensor:
        return v

    def bits_per_element(self) -> tuple[float, float]:
        return 16.0, 16.0


def _rope(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return apply_rope(k, cos.unsqueeze(1), sin.unsqueeze(1)).to(k.dtype)


FullPrecision = Scheme


@dataclass
class _SourceValues(Scheme):
    """Baselines quantize the source model's values: undo the exported value rotations first."""

    value_rotations: list[torch.Tensor] | None = None  # per layer [n_kv, d, d]: Checkpoint.value_rotations()

    def _source(self, layer: int, v: torch.Tensor) -> torch.Tensor:
        """Values ``[B, n_kv, T, d]`` as the exported weights make them → as the source model makes them."""
        return torch.einsum("bhte,hde->bhtd", v, self.value_rotations[layer].to(v.device, v.dtype))

    def _back(self, layer: int, v: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bhtd,hde->bhte", v, self.value_rotations[layer].to(v.device, v.dtype))


@dataclass
class RTN(_SourceValues):
    """Round-to-nearest per token in groups of ``group_size`` channels, keys after RoPE."""

    group_size: int = 64

    def keys(self, layer, k_pre, cos, sin):
        return fake_quantize(_rope(k_pre, cos, sin), self.bits, self.group_size)

    def values(self, layer, v):
        return self._back(layer, fake_quantize(self._source(layer, v), self.bits, self.group_size))

    def bits_per_element(self):
        bpe = bits_per_element(self.bits, self.group_size)
        return bpe, bpe


@dataclass
class KIVI(_SourceValues):
    """KIVI-style: keys per channel over groups of ``token_group`` tokens (post-RoPE), values per token.

    A trailing partial token group stays in full precision, as in KIVI's residual.
    """

    token_group: int = 32
    group_size: int = 64

    def keys(self, layer, k_pre, cos, sin):
        k = _rope(k_pre, cos, sin)
        full = k.shape[2] // self.token_group * self.token_group
        if full == 0:
            return k
        head = k[:, :, :full].transpose(2, 3)  # [B, H, d, T']: groups run along tokens
        q = fake_quantize(head, self.bits, self.token_group).transpose(2, 3)
        return torch.cat([q, k[:, :, full:]], dim=2)

    def values(self, layer, v):
        return self._back(layer, fake_quantize(self._source(layer, v), self.bits, self.group_size))

    def bits_per_element(self):
        return bits_per_element(self.bits, self.token_group), bits_per_element(self.bits, self.group_size)


@dataclass
class RotateKV(Scheme):
    """Centred, rotated, permuted keys in the checkpoint's key layout; rotated values; sinks kept (deployed).

    ``key_codecs`` are :class:`KeyCodec` (``prerope``: grouped-head rotation of pre-RoPE keys) or
    :class:`FoldedKeyCodec` (``folded``: per-head rotation of post-RoPE keys), as the runtime stores them.
    """

    key_codecs: list[KeyCodec | FoldedKeyCodec] | None = None
    value_codecs: list[ValueCodec] | None = None
    uses_sinks: bool = True

    def keys(self, layer, k_pre, cos, sin):
        codec = self.key_codecs[layer]
        if isinstance(codec, FoldedKeyCodec):  # post-RoPE keys come back from the codec itself
            return codec.roundtrip(k_pre.float(), cos, sin).to(k_pre.dtype)
        rows = codec.roundtrip(_heads_to_rows(k_pre).float()).to(k_pre.dtype)
        return _rope(_rows_to_heads(rows, k_pre.shape[1]), cos, sin)

    def values(self, layer, v):
        rows = self.value_codecs[layer].roundtrip(_heads_to_rows(v).float()).to(v.dtype)
        return _rows_to_heads(rows, v.shape[1])

    def bits_per_element(self):
        """Stored bits per key and value element, averaged over layers (layers may differ in width and metadata)."""
        def cost(c: KeyCodec | FoldedKeyCodec | ValueCodec) -> float:
            meta = GroupMeta.FP16 if getattr(c, "meta_base", None) is None else GroupMeta.LOG8
            return bits_per_element(c.bits, c.group_size, meta)

        keys = [cost(c) for c in self.key_codecs]
        values = [cost(c) for c in self.value_codecs]
        return sum(keys) / len(keys), sum(values) / len(values)


@dataclass
class RotateKVSourceValues(RotateKV, _SourceValues):
    """RotateKV with values quantized as the source model holds them: the ablation's "no value rotation" row.

    The evaluated model's weights rotate values (``value_rotations``), so they are turned back before the
    codec and forward after it, as the baselines do.
    """

    def values(self, layer, v):
        return self._back(layer, super().values(layer, self._source(layer, v)))


def key_codecs(checkpoint: Checkpoint, bits: int | None, key_clips: list[float] | None = None) -> list[KeyCodec | FoldedKeyCodec]:
    """One key codec per layer in the checkpoint's key layout at ``bits`` (``None``: each layer's own key
    width, ``RkvConfig.layer_bits``); clips: the checkpoint's, or ``key_clips``."""
    cfg = checkpoint.config
    def make(i: int, layer) -> KeyCodec | FoldedKeyCodec:
        width = cfg.layer_bits(i)[0] if bits is None else bits
        clip = layer.key_clip if key_clips is None else key_clips[i]
        args = (layer.key_mean, checkpoint.key_rotation, layer.key_perm, width, cfg.key_group_size, clip)
        if not cfg.folded:
            return KeyCodec(*args)
        base = None if cfg.meta is GroupMeta.FP16 else layer.meta_bases(width, width, key_clip=clip)[0]
        return FoldedKeyCodec(*args, head_rotation=layer.key_head_rotation, meta_base=base, ranges=cfg.ranges)

    return [make(i, layer) for i, layer in enumerate(checkpoint.layers)]


def value_codecs(checkpoint: Checkpoint, bits: int | None, value_clips: list[float] | None = None) -> list[ValueCodec]:
    """One value codec per layer, like :func:`key_codecs` (8-bit group metadata where the checkpoint has it)."""
    cfg = checkpoint.config

    def make(i: int, layer) -> ValueCodec:
        width = cfg.layer_bits(i)[1] if bits is None else bits
        clip = layer.value_clip if value_clips is None else value_clips[i]
        base = None if cfg.meta is GroupMeta.FP16 else layer.meta_bases(width, width, value_clip=clip)[1]
        return ValueCodec(width, cfg.value_group_size, clip, meta_base=base, ranges=cfg.ranges)

    return [make(i, layer) for i, layer in enumerate(checkpoint.layers)]


def build_scheme(name: str, bits: int | None, checkpoint: Checkpoint, clips: dict[str, list[torch.Tensor]] | None = None,
                 group_size: int = 64) -> Scheme:
    """A scheme by name at ``bits``; RotateKV takes its tensors (and per-bit clips) from ``checkpoint``.

    RotateKV at ``bits=None`` runs the checkpoint as exported: each layer at its own key and value
    widths and clips (``RkvConfig.layer_bits``); the result is labelled with ``config.bits``."""
    vr = checkpoint.value_rotations()
    if name == "fp":
        return Scheme()
    if name == "rtn":
        return RTN(name="rtn", bits=bits, value_rotations=vr, group_size=group_size)
    if name == "kivi":
        return KIVI(name="kivi", bits=bits, value_rotations=vr, group_size=group_size)
    if name == "rotatekv":
        if bits is None:
            name = "rotatekv-mixed" if checkpoint.config.mixed_bits else "rotatekv"
            return RotateKV(name=name, bits=checkpoint.config.bits, key_codecs=key_codecs(checkpoint, None),
                            value_codecs=value_codecs(checkpoint, None))  # fmt: skip
        n = checkpoint.config.num_layers
        index = (2, 3, 4).index(bits)
        kc = [float(clips["key"][i][index]) for i in range(n)] if clips else None
        vc = [float(clips["value"][i][index]) for i in range(n)] if clips else None
        return RotateKV(name="rotatekv", bits=bits, key_codecs=key_codecs(checkpoint, bits, kc),
                        value_codecs=value_codecs(checkpoint, bits, vc))  # fmt: skip
    raise ValueError(f"unknown scheme {name!r}; choose from {', '.join(SCHEME_NAMES)}")
