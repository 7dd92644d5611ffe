"""One decoder layer's codec as the packed cache uses it: quantizer widths and groups, clips, the key
rotation and mean, sink channels, on the layer's device; built from a checkpoint layer, and preparing
once what the decode kernels take (:class:`~rkv_convert.kernels.folded_params.FoldedParams`, the pre-RoPE
:class:`~rkv_convert.kernels.decode_attention.PreparedRotation`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..export.format import KeyLayout, LayerTensors, RkvConfig
from ..kernels.decode_attention import PreparedRotation, prepare_rotation
from ..kernels.folded_params import FoldedParams
from ..kernels.quantize_pack import group_ids_from_perm
from ..quant.codec import folded_head_rotations
from ..quant.quantizer import GroupMeta, GroupRanges

__all__ = ["LayerCodec"]


@dataclass
class LayerCodec:
    """One layer's quantizer settings and calibration tensors, on the cache's device."""

    key_bits: int  # the layer's key code width (RkvConfig.layer_bits)
    value_bits: int  # the layer's value code width
    key_group_size: int
    value_group_size: int
    head_dim: int
    num_kv_heads: int
    k_mean: torch.Tensor  # fp32 [n_kv*d]
    rotation: torch.Tensor  # fp32 [Gd, Gd], y = x @ R
    k_gid: torch.Tensor  # int32 [n_hg, Gd]: quantization group of each rotated channel (folded: c // g_k)
    key_clip: float
    value_clip: float
    sink_channels: torch.Tensor  # int64 [s]
    sink_threshold: float
    key_layout: str = KeyLayout.PREROPE.value
    head_rotation: torch.Tensor | None = None  # folded: fp32 [n_kv, d, d], R_h = rotation[:, perm_h]
    meta_bases: tuple[float, float] | None = None  # 8-bit group metadata: (key base, value base); None: fp16
    ranges: GroupRanges = GroupRanges.MINMAX  # how the cache writes set each group's range (folded layout)
    _prepared: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def folded(self) -> bool:
        return self.key_layout == KeyLayout.FOLDED.value

    @property
    def meta(self) -> GroupMeta:
        """How this layer's store holds group scales and zeros."""
        return GroupMeta.FP16 if self.meta_bases is None else GroupMeta.LOG8

    @property
    def key_meta_base(self) -> float | None:
        return None if self.meta_bases is None else self.meta_bases[0]

    @property
    def value_meta_base(self) -> float | None:
        return None if self.meta_bases is None else self.meta_bases[1]

    @property
    def head_mean(self) -> torch.Tensor:
        """fp32 ``[n_kv, d]`` view of the key mean."""
        return self.k_mean.view(self.num_kv_heads, self.head_dim)

    def folded_params(
        self, inv_freq: torch.Tensor, attention_scaling: float, sm_scale: float, softcap: float | None = None
    ) -> FoldedParams:
        """This layer's :class:`FoldedParams` for the folded decode kernel (built once per layer)."""
        if not self.folded:
            raise ValueError(f"folded_params() of a {self.key_layout} layer")
        key = ("folded", float(attention_scaling), float(sm_scale), softcap)
        if key not in self._prepared:
            self._prepared[key] = FoldedParams(
                rotation=self.head_rotation, mean=self.head_mean, inv_freq=inv_freq.to(self.device, torch.float32),
                attention_scaling=float(attention_scaling), sm_scale=float(sm_scale), bits=self.key_bits,
                v_bits=self.value_bits,
                g_k=self.key_group_size, g_v=self.value_group_size, softcap=softcap, meta_bases=self.meta_bases,
                ranges=self.ranges,
            )
        return self._prepared[key]

    @property
    def device(self) -> torch.device:
        """The device of this layer's calibration tensors (its decoder layer's device)."""
        return self.k_mean.device

    def prepared_rotation(self, query_dtype: torch.dtype) -> PreparedRotation:
        """The rotation as the decode kernel wants it for ``query_dtype`` queries (prepared once)."""
        if self.folded:
            raise ValueError("a folded layer has no pre-RoPE rotation to prepare; use folded_params()")
        if query_dtype not in self._prepared:
            self._prepared[query_dtype] = prepare_rotation(self.rotation, self.head_dim, query_dtype, k_gid=self.k_gid)
        return self._prepared[query_dtype]

    @property
    def group_channels(self) -> int:
        return self.k_gid.shape[1]

    @property
    def num_head_groups(self) -> int:
        return self.k_gid.shape[0]

    @classmethod
    def from_checkpoint(cls, config: RkvConfig, rotation: torch.Tensor, layer: LayerTensors, device: torch.device,
                        layer_index: int | None = None) -> "LayerCodec":  # fmt: skip
        """``layer`` (number ``layer_index``, which sets its key and value widths) on ``device``."""
        if layer_index is None and config.mixed_bits:
            raise ValueError("this checkpoint's layers differ in key/value bits: pass layer_index")
        key_bits, value_bits = config.layer_bits(layer_index or 0)
        head_rotation = None
        if config.folded:  # the permutation is folded into R_h: key groups are consecutive channels of y
            d, n_kv = config.head_dim, config.num_key_value_heads
            head_rotation = layer.key_head_rotation if layer.key_head_rotation is not None else (
                folded_head_rotations(rotation, layer.key_perm, d))
            head_rotation = head_rotation.to(device, torch.float32).contiguous()
            gid = (torch.arange(d) // config.key_group_size).to(torch.int32).expand(n_kv, d)
        else:
            gid = group_ids_from_perm(layer.key_perm.long(), config.head_group_channels, config.key_group_size)
        return cls(
            key_bits=key_bits,
            value_bits=value_bits,
            key_group_size=config.key_group_size,
            value_group_size=config.value_group_size,
            head_dim=config.head_dim,
            num_kv_heads=config.num_key_value_heads,
            k_mean=layer.key_mean.to(device, torch.float32).contiguous(),
            rotation=rotation.to(device, torch.float32).contiguous(),
            k_gid=gid.to(device).contiguous(),
            key_clip=float(layer.key_clip),
            value_clip=float(layer.value_clip),
            sink_channels=layer.sink_channels.to(device),
            sink_threshold=float(layer.sink_threshold),
            key_layout=config.key_layout,
            head_rotation=head_rotation,
            meta_bases=None if config.meta is GroupMeta.FP16 else layer.meta_bases(key_bits, value_bits),
            ranges=config.ranges,
        )
