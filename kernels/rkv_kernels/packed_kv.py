"""One layer's packed cache as the decode kernels read it: :class:`PackedKV`."""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["PackedKV"]


class PackedKV(NamedTuple):
    """One layer's packed cache (``cap`` slots; ``b`` = key bits, ``b_v`` = value bits).

    - ``k_codes uint8 [B, n_hg, cap, Gd*b/8]``, ``k_scale, k_zero fp16 [B, n_hg, cap, Gd/g_k]``
      (``zero`` = group minimum times clip): the keys in the checkpoint's key layout. ``prerope``:
      centred, rotated per head group of ``G`` heads (``Gd = G*d`` channels, ``n_hg = n_kv/G``),
      quantized in the calibrated channel groups (``kernels.decode_attention``). ``folded``:
      ``y = RoPE_pos(k - mu) @ R_h`` per KV head (``n_hg = n_kv``, ``Gd = d``), groups of
      consecutive channels (``kernels.decode_folded``).
    - ``v_codes uint8 [B, n_kv, cap, d*b_v/8]``, ``v_scale, v_zero fp16 [B, n_kv, cap, d/g_v]``:
      values as stored (already rotated by the exported weights), groups of consecutive channels.
    - ``pos int32 [B, cap]``: RoPE position of each slot, ``-1`` = empty (never attended).
    - ``fp_k, fp_v [B, n_kv, F, d]`` (fp16/bf16/fp32): the full-precision segment (sinks +
      window): keys as the layout keeps them there (``prerope``: pre-RoPE, ``folded``: post-RoPE)
      and values; ``fp_pos int32 [B, F]`` (``-1`` = empty). All three or none.

    Only the last dimension of each tensor needs to be contiguous (views of preallocated buffers are fine).
    """

    k_codes: torch.Tensor
    k_scale: torch.Tensor
    k_zero: torch.Tensor
    v_codes: torch.Tensor
    v_scale: torch.Tensor
    v_zero: torch.Tensor
    pos: torch.Tensor
    fp_k: torch.Tensor | None = None
    fp_v: torch.Tensor | None = None
    fp_pos: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "PackedKV":
        """The same cache on ``device``."""
        return PackedKV(*(None if t is None else t.to(device) for t in self))

    def truncated(self, slots: int) -> "PackedKV":
        """The first ``slots`` store slots (views), the full-precision segment unchanged."""
        store = (t[:, :, :slots] if t.dim() == 4 else t[:, :slots] for t in self[:7])
        return PackedKV(*store, self.fp_k, self.fp_v, self.fp_pos)
