"""The second launch of split-K decode attention: partial outputs of context splits merged by log-sum-exp.

Every decode kernel that splits a sequence's slots across programs writes, per (batch, query head) and part,
an fp32 partial output normalised within its part and its log2-sum-exp; :func:`merge_parts` combines them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import device_guard, next_pow2

__all__ = ["merge_parts"]


@triton.jit(do_not_specialize=["n_parts"])  # lengths: one compile for all
def _merge_kernel(o_ptr, lse_ptr, out_ptr, n_parts, D: tl.constexpr, P_PAD: tl.constexpr):
    """Log-sum-exp merge of ``n_parts`` partial outputs of one (batch, query head)."""
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, P_PAD)
    smask = s < n_parts
    dd = tl.arange(0, D)
    lse = tl.load(lse_ptr + row * n_parts + s, mask=smask, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    o = tl.load(o_ptr + (row * n_parts + s)[:, None] * D + dd[None, :], mask=smask[:, None], other=0.0)
    den = tl.sum(w, 0)
    res = tl.sum(w[:, None] * o, 0) / tl.where(den > 0.0, den, 1.0)  # no valid token at all: zeros
    tl.store(out_ptr + row * D + dd, res.to(out_ptr.dtype.element_ty))


def merge_parts(o_part: torch.Tensor, lse_part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Merge ``[B, n_q, n_parts, d]`` fp32 partial outputs by their log2-sum-exp ``[B, n_q, n_parts]`` into
    ``[B, n_q, d]`` of ``dtype``. A row whose parts hold no valid token gets zeros."""
    B, n_q, n_parts, d = o_part.shape
    out = torch.empty(B, n_q, d, device=o_part.device, dtype=dtype)
    with device_guard(out):  # Triton launches on the current device
        _merge_kernel[(B * n_q,)](o_part, lse_part, out, n_parts, D=d, P_PAD=max(2, next_pow2(n_parts)))
    return out
