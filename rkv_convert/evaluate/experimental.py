"""Experimental quantizer changes the runtime cannot run (a least-squares encoder, value centring).

They change what the quantizer computes, so they would need kernel support before the runtime
could use them; the ablation scores them as rows marked *exp.* (docs/accuracy.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..calibrate.run import _run_pass
from ..export.format import Checkpoint
from ..quant.codec import KeyCodec, ValueCodec, rotate_groups
from ..quant.quantizer import SCALE_FLOOR, QuantizedTensor, dequantize, levels, quantize
from ..quant.sinks import detect_sinks
from .schemes import RotateKV, _heads_to_rows, _rows_to_heads

__all__ = ["lsq_quantize", "ExperimentalRotateKV", "value_means"]


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


def value_means(model, batches: torch.Tensor, checkpoint: Checkpoint, batch_size: int) -> list[torch.Tensor]:
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
