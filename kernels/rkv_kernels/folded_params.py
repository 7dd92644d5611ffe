"""The per-layer constants of the query-folded key layout, shared by its decode and write kernels."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from rkv_convert.quant.packing import packed_width
from rkv_convert.quant.quantizer import GroupMeta, GroupRanges

from ._decode_parts import _plane_order
from .packed_kv import PackedKV

__all__ = ["FoldedParams"]


@dataclass(frozen=True, eq=False)
class FoldedParams:
    """Per-layer constants of the folded layout.

    Attributes:
        rotation: fp32 ``[n_kv, d, d]``, orthonormal ``R_h`` (keys stored as ``RoPE(k - mu) @ R_h``).
        mean: fp32 ``[n_kv, d]``, calibrated pre-RoPE key mean ``mu_h``.
        inv_freq: fp32 ``[d/2]``; attention_scaling: RoPE's cos/sin factor; sm_scale: score factor.
        bits: key code bits (2, 3 or 4); v_bits: value code bits (None: same as ``bits``).
        g_k, g_v: channels per key / value quantization group (dividing ``d``).
        softcap: attention-logit soft cap (Gemma 2): logits ``softcap * tanh(sm_scale * s / softcap)``;
            None: plain ``sm_scale * s``.
        meta_bases: ``(key base, value base)``: scales and zeros stored as 8-bit codes
            (``GroupMeta.LOG8``, :mod:`rkv_convert.quant.quantizer`); None: fp16.
        ranges: how the cache writes set each group's range (``GroupRanges``; readers need not know).
    """

    rotation: torch.Tensor
    mean: torch.Tensor
    inv_freq: torch.Tensor
    attention_scaling: float
    sm_scale: float
    bits: int
    g_k: int
    g_v: int
    v_bits: int | None = None
    softcap: float | None = None
    meta_bases: tuple[float, float] | None = None
    ranges: GroupRanges = GroupRanges.MINMAX
    _on_device: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.rotation.dim() != 3 or self.rotation.shape[1] != self.rotation.shape[2]:
            raise ValueError(f"rotation must be [n_kv, d, d], got {tuple(self.rotation.shape)}")
        n_kv, d = self.rotation.shape[:2]
        if tuple(self.mean.shape) != (n_kv, d):
            raise ValueError(f"mean must be [{n_kv}, {d}], got {tuple(self.mean.shape)}")
        if tuple(self.inv_freq.shape) != (d // 2,) or d % 2:
            raise ValueError(f"inv_freq must be [{d // 2}] for an even head dim, got {tuple(self.inv_freq.shape)}")
        for name, b in (("bits", self.bits), ("v_bits", self.value_bits)):
            if b not in (2, 3, 4):
                raise ValueError(f"{name} must be 2, 3 or 4, got {b}")
        if self.softcap is not None and not self.softcap > 0:
            raise ValueError(f"softcap must be positive or None, got {self.softcap}")
        if self.g_k <= 0 or d % self.g_k or self.g_v <= 0 or d % self.g_v:
            raise ValueError(f"group sizes {self.g_k}/{self.g_v} must divide the head dim {d}")
        if self.meta_bases is not None and (len(self.meta_bases) != 2 or not all(b > 0 for b in self.meta_bases)):
            raise ValueError(f"meta_bases must be two positive bases (keys, values) or None, got {self.meta_bases}")
        object.__setattr__(self, "ranges", GroupRanges(self.ranges))

    def kernel_operands(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(r_planes, mean, inv_freq)`` fp32 contiguous on ``device``, made once per device.

        ``r_planes [n_kv, d, d]``: ``R_h`` with its columns in plane order (column ``j*d/4 + i`` =
        column ``4i + j`` of ``R_h``), so that ``q @ r_planes`` is ``q' = q R_h`` in plane order.
        """
        if device not in self._on_device:
            order = _plane_order(self.head_dim, self.head_dim, device)
            r_planes = self.rotation.to(device=device, dtype=torch.float32)[:, :, order].contiguous()
            self._on_device[device] = (r_planes, self.mean.to(device=device, dtype=torch.float32).contiguous(),
                                       self.inv_freq.to(device=device, dtype=torch.float32).contiguous())
        return self._on_device[device]

    def rotation_planes(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``r_planes`` of :meth:`kernel_operands` in the dtype :func:`~.decode_folded.rotate_queries` multiplies
        ``dtype`` queries with (fp16 for fp16, else fp32), made once per device and dtype."""
        r_planes = self.kernel_operands(device)[0]
        if dtype != torch.float16:
            return r_planes
        key = ("planes", device, torch.float16)
        if key not in self._on_device:
            self._on_device[key] = r_planes.to(torch.float16)
        return self._on_device[key]

    def encode_operands(self, device: torch.device, fp16: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rotation, mean, inv_freq)`` contiguous on ``device`` for the cache writes (:mod:`.encode_folded`),
        made once. ``rotation [n_kv, d, d]``: fp16 (rounded once) for ``fp16``, else fp32. The others fp32."""
        key = ("encode", device, fp16)
        if key not in self._on_device:
            r = self.rotation.to(device=device, dtype=torch.float32)
            r = r.to(torch.float16) if fp16 else r  # as fold_keys(..., operands=torch.float16) rounds it
            self._on_device[key] = (r.contiguous(), self.mean.to(device=device, dtype=torch.float32).contiguous(),
                                    self.inv_freq.to(device=device, dtype=torch.float32).contiguous())
        return self._on_device[key]

    def to(self, device: torch.device | str) -> "FoldedParams":
        """The same constants with their tensors on ``device``."""
        return FoldedParams(self.rotation.to(device), self.mean.to(device), self.inv_freq.to(device),
                            self.attention_scaling, self.sm_scale, self.bits, self.g_k, self.g_v, self.v_bits,
                            self.softcap, self.meta_bases, self.ranges)  # fmt: skip

    def empty_rows(self, batch: int, slots: int, device: torch.device | str) -> PackedKV:
        """Uninitialised store tensors of ``slots`` slots in the layout these constants describe (no fp segment)."""
        k_width, k_groups, v_width, v_groups = self.row_widths
        lead = (batch, self.n_kv, slots)
        u8 = dict(dtype=torch.uint8, device=device)
        s_dt, z_dt = self.group_meta.dtypes
        return PackedKV(torch.empty(*lead, k_width, **u8), torch.empty(*lead, k_groups, dtype=s_dt, device=device),
                        torch.empty(*lead, k_groups, dtype=z_dt, device=device), torch.empty(*lead, v_width, **u8),
                        torch.empty(*lead, v_groups, dtype=s_dt, device=device),
                        torch.empty(*lead, v_groups, dtype=z_dt, device=device),
                        torch.empty(batch, slots, dtype=torch.int32, device=device))  # fmt: skip

    @property
    def value_bits(self) -> int:
        return self.bits if self.v_bits is None else self.v_bits

    @property
    def group_meta(self) -> GroupMeta:
        """How the store holds each group's scale and zero."""
        return GroupMeta.FP16 if self.meta_bases is None else GroupMeta.LOG8

    @property
    def key_meta_base(self) -> float | None:
        return None if self.meta_bases is None else float(self.meta_bases[0])

    @property
    def value_meta_base(self) -> float | None:
        return None if self.meta_bases is None else float(self.meta_bases[1])

    @functools.cached_property
    def row_widths(self) -> tuple[int, int, int, int]:
        """Per slot and head: key code bytes, key groups, value code bytes, value groups (checked
        against every call's cache, so computed once)."""
        d = self.head_dim
        return packed_width(d, self.bits), d // self.g_k, packed_width(d, self.value_bits), d // self.g_v

    @property
    def head_dim(self) -> int:
        return self.rotation.shape[-1]

    @property
    def n_kv(self) -> int:
        return self.rotation.shape[0]
