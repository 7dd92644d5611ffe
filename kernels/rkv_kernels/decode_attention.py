"""Decode attention over a packed RotateKV cache: one new query token per sequence.

Storage layout of one decoder layer (``B`` batch, ``n_kv`` KV heads of ``d`` channels,
head groups of ``G`` consecutive heads, ``Gd = G*d``, ``n_hg = n_kv/G``; bits ``b_k, b_v``;
groups ``g_k`` (divides ``Gd``) and ``g_v`` (divides ``d``); codes packed with
:func:`rkv_convert.quant.packing.pack_codes`):

- ``k_codes uint8 [B, n_hg, T, Gd*b_k/8]``: codes of the centred, rotated pre-RoPE key
  ``y = (k - mean) @ R`` of each head group, in *rotated* channel order (never permuted).
- ``k_scale, k_zero fp16 [B, n_hg, T, Gd/g_k]``; ``k_gid int32 [n_hg, Gd]``: group of each
  rotated channel (from the calibrated permutation; see ``quantize_pack.group_ids_from_perm``).
- ``k_mean fp32 [n_kv*d]``, ``rotation fp32 [Gd, Gd]`` orthonormal (any size, e.g. 192).
  Decode: ``k = ŷ @ R.T + mean``, then RoPE at the key's own position.
- ``v_codes uint8 [B, n_kv, T, d*b_v/8]``, ``v_scale, v_zero fp16 [B, n_kv, T, d/g_v]``:
  values as stored (already rotated by the exported weights), groups of consecutive channels.
- ``pos int32 [B, T]``: RoPE position of each slot, ``-1`` = empty (zero attention weight).
- Full-precision segment (sinks + recent window): ``fp_k [B, n_kv, F, d]`` *pre-RoPE*
  original keys (not centred, not rotated), ``fp_v [B, n_kv, F, d]``, ``fp_pos int32 [B, F]``
  (``-1`` = empty); fp16/bf16/fp32.
- RoPE: Llama ``rotate_half`` convention (channel ``i`` pairs with ``i + d/2``), angle
  ``pos * inv_freq[i mod d/2]`` (``inv_freq fp32 [d/2]``), cos/sin times ``attention_scaling``,
  computed in fp32 from each key's position.

``q [B, n_q, d]`` is post-RoPE, ``n_q = n_kv * rep`` (query head ``i`` reads KV head
``i // rep``, as ``repeat_kv``). The output ``[B, n_q, d]`` (dtype of ``q``) is in the rotated
value space: ``softmax(sm_scale * q·k) @ v`` over every valid quantized and fp-segment token
(with ``softcap``, Gemma 2's attention-logit cap: ``softmax(softcap * tanh(sm_scale * q·k / softcap)) @ v``).

Kernel: grid ``(B, n_kv, n_splits + has_fp)``. A program owns one KV head and its ``rep``
query heads, and one contiguous split of the quantized tokens (the last program index
holds the fp segment). Per block of ``BLOCK_T`` tokens it unpacks the codes of the head
group's ``Gd`` rotated channels (``G`` chunks of ``d``, each read as four *planes*: plane
``j`` = channels ``4i + j``, which is what one shift of a packed byte tile yields, so no
reshape is needed), dequantizes them with per-channel scale/zero (a broadcast for one group
per row, else an exact one-hot ``tl.dot``: no gathers), and reconstructs the head's pre-RoPE
key ``k = ŷ @ R^T`` restricted to the head's ``d`` output channels, split in the two RoPE
halves so that RoPE is elementwise on ``(k_lo, k_hi)``
(``score = q_lo·(k_lo cos - k_hi sin) + q_hi·(k_hi cos + k_lo sin)``). Two paths, chosen by
:func:`prepare_rotation` (or the ``factored`` keyword):

- *factored* (``R = kron(A, B)``, ``A [G, G]``, ``B [d, d]``: every Sylvester Hadamard
  rotation of power-of-two size, e.g. ``512 = H_4 ⊗ H_128``, and every ``G = 1`` rotation
  with ``A = [[1]]``): with ``(g, i)`` = rotated channel ``g*d + i`` and ``jh`` the head's
  place in its group, ``k_c = Σ_i z_i B[c, i]`` with ``z = Σ_g A[jh, g] ŷ_g``. Per plane the
  ``G`` dequantized chunks are combined elementwise (``G`` FMAs per element, fp32), then one
  ``tl.dot`` of ``z`` against ``B^T``'s rows in plane order, whose 8 tiles ``[d/4, d/2]`` are
  loaded once per program. Cost per key token and head: ``d*d`` MACs, independent of ``G``.
- *dense* (any other orthonormal ``R``, e.g. ``192 = H_12 ⊗ H_16`` with ``d = 64``, which is
  not ``H_3 ⊗ H_64``): per chunk and plane one ``tl.dot`` against the head's columns of
  ``R^T`` (rows in plane order, loaded per token block). Cost: ``G*d*d`` MACs per key token
  and head.

cos/sin come from a Cody-Waite reduction to [-pi, pi] and the fast hardware unit (abs. error
~1e-6). Online softmax (fp32 ``m, l``, four plane accumulators), P@V on dequantized value
planes. A second small kernel merges the splits by log-sum-exp. Accumulation is fp32
everywhere; dot operands are fp16 for fp16 queries, IEEE fp32 for fp32 queries, and TF32
(fp32 operands, 10-bit mantissa, more precise than bf16) for bf16 queries: Triton's CPU
interpreter (3.9) computes bf16 dots wrongly, and one dot type per path keeps the tested
code the shipped code.

One program per KV head re-reads and unpacks the head group's key codes ``G`` times (from
cache) but keeps every tile at ``d`` channels and covers any rotation. One other kernel
covers a narrower case: ``kernel="chunk"``
(:mod:`rkv_convert.kernels.decode_chunk`: factored rotations whose key groups are the rotated
head chunks, i.e. calibrated with ``--permutation none``; raw codes meet ``B^T`` on the tensor
cores and scales, zeros and the mean act on score entries, not key elements; the fastest on
an H100, docs/benchmarks.md). ``kernel="auto"`` (the default) takes the chunk kernel where it
applies, else this one.

The split count is chosen so that the grid fills whole waves of resident programs (the
residency of each launch configuration is read from the compiled kernel after its first
launch; :mod:`rkv_convert.kernels._occupancy`).

The rotation may be passed raw (prepared on every call, which synchronises with the device
for the factorisation check) or as a :class:`PreparedRotation` made once per layer by
:func:`prepare_rotation`.

Dispatch (see :mod:`rkv_convert.kernels._common`): ``backend="auto"`` runs the kernel on
CUDA tensors or under ``TRITON_INTERPRET=1``, else :func:`decode_attention_ref`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import triton
import triton.language as tl

from rkv_convert.quant.packing import packed_width
from rkv_convert.runtime.ops import dequantize_keys, dequantize_values, rope

from ._common import Backend, cdiv, device_guard, next_pow2, resolve_backend, split_slots, triton_interpreting
from ._occupancy import record_residency, resident_per_sm, sm_count, wave_splits
from .decode_chunk import chunk_kernel_supports, code_column_factors, keys_grouped_by_chunk, launch_chunk_kernel
from ._chunk_parts import _log2_logits, launch_strides, logit_scales
from ._decode_parts import _NPLANES, _byte_tiles, _cos_sin, _plane_codes, _plane_order, _softmax_step
from ._split_merge import merge_parts
from .packed_kv import PackedKV

__all__ = ["KERNEL_DEFAULTS", "PreparedRotation", "decode_attention", "decode_attention_ref", "head_kernel_supports",
           "num_splits_for", "prepare_rotation"]

Kernel = Literal["auto", "head", "chunk"]
# Launch settings per kernel, the fastest timed on an H100 (benchmarks/bench_decode_attention.py --tune).
KERNEL_DEFAULTS: dict[str, dict[str, int]] = {
    "head": {"block_t": 32, "num_warps": 4, "num_stages": 1},
    "chunk": {"block_t": 64, "num_warps": 4, "num_stages": 1},
}
# fp32 queries (IEEE fp32 dots, unrolled into FMAs): the chunk kernel's 64-token steps took about 2 minutes to
# compile on the H200's host; 16-token steps compile in 12 s against 39 s at 32 (sm_90, offline, this project's
# 2-core host). fp32 decode is a reference-grade path: its speed was not timed.
IEEE_CHUNK_BLOCK_T = 16


def _dims(
    q: torch.Tensor,
    k_codes: torch.Tensor,
    k_scale: torch.Tensor,
    k_zero: torch.Tensor,
    v_codes: torch.Tensor,
    v_scale: torch.Tensor,
    v_zero: torch.Tensor,
    pos: torch.Tensor,
    rotation: torch.Tensor,
    k_mean: torch.Tensor,
    k_gid: torch.Tensor,
    inv_freq: torch.Tensor,
    k_bits: int,
    v_bits: int,
    k_group_size: int,
    v_group_size: int,
    fp_k: torch.Tensor | None,
    fp_v: torch.Tensor | None,
    fp_pos: torch.Tensor | None,
) -> dict[str, int]:
    """Validate shapes against the storage layout; return the dimensions."""
    if q.dim() != 3:
        raise ValueError(f"q must be [B, n_q, d], got {tuple(q.shape)}")
    B, n_q, d = q.shape
    if d % 2:
        raise ValueError(f"head dim must be even, got {d}")
    Gd = rotation.shape[0]
    if rotation.dim() != 2 or rotation.shape[1] != Gd or Gd % d:
        raise ValueError(f"rotation must be [G*d, G*d] with d={d}, got {tuple(rotation.shape)}")
    G = Gd // d
    if k_codes.dim() != 4 or k_codes.shape[0] != B:
        raise ValueError(f"k_codes must be [B, n_hg, T, Gd*b/8], got {tuple(k_codes.shape)}")
    n_hg, T = k_codes.shape[1], k_codes.shape[2]
    n_kv = n_hg * G
    if n_q % n_kv:
        raise ValueError(f"{n_q} query heads are not a multiple of {n_kv} KV heads")
    if Gd % k_group_size or d % v_group_size:
        raise ValueError(f"key group {k_group_size} must divide {Gd}, value group {v_group_size} must divide {d}")
    want = {
        "k_codes": (k_codes, (B, n_hg, T, packed_width(Gd, k_bits))),
        "k_scale": (k_scale, (B, n_hg, T, Gd // k_group_size)),
        "k_zero": (k_zero, (B, n_hg, T, Gd // k_group_size)),
        "v_codes": (v_codes, (B, n_kv, T, packed_width(d, v_bits))),
        "v_scale": (v_scale, (B, n_kv, T, d // v_group_size)),
        "v_zero": (v_zero, (B, n_kv, T, d // v_group_size)),
        "pos": (pos, (B, T)),
        "k_mean": (k_mean, (n_kv * d,)),
        "k_gid": (k_gid, (n_hg, Gd)),
        "inv_freq": (inv_freq, (d // 2,)),
    }
    F = 0
    if fp_k is not None or fp_v is not None or fp_pos is not None:
        if fp_k is None or fp_v is None or fp_pos is None:
            raise ValueError("fp_k, fp_v and fp_pos go together")
        F = fp_k.shape[2]
        want.update(fp_k=(fp_k, (B, n_kv, F, d)), fp_v=(fp_v, (B, n_kv, F, d)), fp_pos=(fp_pos, (B, F)))
    for name, (t, shape) in want.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    for name in ("k_codes", "v_codes"):
        if want[name][0].dtype != torch.uint8:
            raise ValueError(f"{name} must be uint8")
    for name in ("k_scale", "k_zero", "v_scale", "v_zero"):
        if want[name][0].dtype != torch.float16:
            raise ValueError(f"{name} must be float16")
    return dict(B=B, n_q=n_q, d=d, G=G, Gd=Gd, n_hg=n_hg, n_kv=n_kv, rep=n_q // n_kv, T=T, F=F)


def decode_attention_ref(
    q: torch.Tensor,
    kv: PackedKV,
    *,
    rotation: torch.Tensor,
    k_mean: torch.Tensor,
    k_gid: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float,
    sm_scale: float,
    k_bits: int,
    v_bits: int,
    k_group_size: int,
    v_group_size: int,
    softcap: float | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Pure-torch reference of :func:`decode_attention` (arguments as there).

    Dequantize and unrotate the keys (``runtime.ops.dequantize_keys``), RoPE at each key's
    position (``runtime.ops.rope``), dequantize the values (``runtime.ops.dequantize_values``):
    the same references the CPU runtime and ``rkv eval`` use; then ``repeat_kv``, scores
    ``sm_scale * q·k`` (soft-capped to ``softcap * tanh(scores / softcap)`` when ``softcap`` is
    given), softmax with ``-inf`` for empty slots, matmul with the values; all in fp32.
    A sequence without any valid token gets zeros (the kernel does the same).
    ``compute_dtype`` (tests only) rounds the matmul operands to a lower precision, as the
    kernel does for fp16/bf16 queries, to measure the error a low-precision computation has.

    Returns:
        ``[B, n_q, d]`` in ``q.dtype``.
    """
    k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, pos, fp_k, fp_v, fp_pos = kv
    dm = _dims(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, pos, rotation, k_mean, k_gid,
               inv_freq, k_bits, v_bits, k_group_size, v_group_size, fp_k, fp_v, fp_pos)
    B, d, G, Gd, n_hg, n_kv, rep, T = (dm[k] for k in ("B", "d", "G", "Gd", "n_hg", "n_kv", "rep", "T"))
    cd = compute_dtype

    def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a.to(cd) @ b.to(cd)).float()

    k = dequantize_keys(k_codes, k_scale, k_zero, k_gid, k_mean, rotation, k_bits, d, compute_dtype=cd)
    k = rope(k, pos, inv_freq, attention_scaling)
    v = dequantize_values(v_codes, v_scale, v_zero, v_bits, d)
    valid = pos >= 0
    if fp_k is not None:
        k = torch.cat([k, rope(fp_k.float(), fp_pos, inv_freq, attention_scaling)], 2)
        v = torch.cat([v, fp_v.float()], 2)
        valid = torch.cat([valid, fp_pos >= 0], 1)
    v = torch.where(valid[:, None, :, None], v, 0.0)  # empty slots may hold garbage
    k = k.repeat_interleave(rep, 1)  # repeat_kv: query head i reads KV head i // rep
    v = v.repeat_interleave(rep, 1)
    scores = mm(q.float()[:, :, None, :], k.transpose(-1, -2)).squeeze(2) * sm_scale  # [B, n_q, S]
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    p = torch.softmax(scores, -1).nan_to_num(0.0)  # a row without any valid token: zeros
    out = mm(p[:, :, None, :], v).squeeze(2)
    return out.to(q.dtype)


@triton.jit
def _expand_groups(sz_row, tmask, onehot, NG: tl.constexpr, NG_PAD: tl.constexpr, PW: tl.constexpr):
    """Per-channel fp32 ``[BLOCK_T, PW]`` from per-group fp16 ``[BLOCK_T, NG]`` rows.

    One group: a broadcast. Several: an exact one-hot ``tl.dot`` (``onehot fp16 [NG_PAD, PW]``).
    """
    if NG == 1:
        s = tl.load(sz_row, mask=tmask, other=0.0).to(tl.float32)
        return tl.broadcast_to(s[:, None], (s.shape[0], PW))
    else:
        g = tl.arange(0, NG_PAD)
        s = tl.load(sz_row[:, None] + g[None, :], mask=tmask[:, None] & (g[None, :] < NG), other=0.0)
        return tl.dot(s, onehot)


@triton.jit
def _scores(k_lo, k_hi, p_t, valid, q_lo, q_hi, freq, rope_scaling, qk_scale, cap_scale,
            PREC: tl.constexpr, USE_LIBDEVICE: tl.constexpr, SOFTCAP: tl.constexpr):
    """RoPE of pre-RoPE key halves ``[BLOCK_T, d/2]`` at ``p_t``, then logits ``[BLOCK_T, QP]`` (log2 units,
    soft-capped with ``SOFTCAP``: :func:`~._chunk_parts._log2_logits`)."""
    cos, sin = _cos_sin(p_t.to(tl.float32)[:, None] * freq[None, :], USE_LIBDEVICE)
    cos = cos * rope_scaling
    sin = sin * rope_scaling
    r_lo = (k_lo * cos - k_hi * sin).to(q_lo.dtype)
    r_hi = (k_hi * cos + k_lo * sin).to(q_lo.dtype)
    s = tl.dot(r_lo, tl.trans(q_lo), input_precision=PREC)
    s = tl.dot(r_hi, tl.trans(q_hi), s, input_precision=PREC)
    return tl.where(valid[:, None], _log2_logits(s, qk_scale, cap_scale, SOFTCAP), float("-inf"))


@triton.jit
def _pv(p, v, valid, acc, alpha, PREC: tl.constexpr):
    """``acc * alpha + p^T @ v`` for one value plane ``v [BLOCK_T, d/4]`` (empty slots zeroed)."""
    v = tl.where(valid[:, None], v, 0.0).to(p.dtype)
    return tl.dot(tl.trans(p), v, acc * alpha[:, None], input_precision=PREC)


@triton.jit(do_not_specialize=["T", "F", "n_splits", "n_parts"])  # lengths: one compile for all
def _decode_kernel(
    q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, pos_ptr,
    rtp_ptr, a_ptr, btp_ptr, mean_ptr, gidp_ptr, freq_ptr, fk_ptr, fv_ptr, fpos_ptr, o_ptr, lse_ptr,
    s_qb, s_qh,
    s_kcb, s_kch, s_kct, s_ksb, s_ksh, s_kst, s_kzb, s_kzh, s_kzt,
    s_vcb, s_vch, s_vct, s_vsb, s_vsh, s_vst, s_vzb, s_vzh, s_vzt,
    s_pb, s_fkb, s_fkh, s_fkt, s_fvb, s_fvh, s_fvt, s_fpb,
    T, F, tokens_per_split, n_splits, n_parts, qk_scale, cap_scale, rope_scaling,
    D: tl.constexpr, G: tl.constexpr, REP: tl.constexpr, QP: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, NGK: tl.constexpr, NGK_PAD: tl.constexpr,
    GV: tl.constexpr, NGV: tl.constexpr, NGV_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, HAS_FP: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr,
    USE_LIBDEVICE: tl.constexpr, KRON: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """Grid ``(B, n_kv, n_parts)``; writes fp32 partial outputs and log2-sum-exp per part.

    ``rtp [Gd, Gd]`` is ``R^T`` with its rows (input channels) in plane order: row
    ``g*d + j*d/4 + i`` holds input channel ``g*d + 4i + j``; ``gidp [n_hg, Gd]`` likewise.
    ``KRON`` (``R = kron(A, B)``): ``a fp32 [G, G]`` is ``A`` and ``btp [d, d]`` is ``B^T`` with
    its rows in plane order (``rtp`` unused); else ``a``/``btp`` are unused.
    """
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    split = tl.program_id(2)
    hg = h // G
    jh = h % G  # this head's place in its head group
    GD: tl.constexpr = G * D
    HALF: tl.constexpr = D // 2
    PW: tl.constexpr = D // 4  # plane width
    K_LOB: tl.constexpr = 4 if K_BITS == 4 else 2  # bits per channel in the low plane bytes
    dt: tl.constexpr = DOT_DTYPE

    qi = tl.arange(0, QP)
    qmask = qi < REP
    c = tl.arange(0, HALF)
    ii = tl.arange(0, PW)
    q_row = q_ptr + b * s_qb + (h * REP + qi)[:, None] * s_qh
    q_lo = tl.load(q_row + c[None, :], mask=qmask[:, None], other=0.0).to(dt)
    q_hi = tl.load(q_row + HALF + c[None, :], mask=qmask[:, None], other=0.0).to(dt)
    freq = tl.load(freq_ptr + c)
    mean_lo = tl.load(mean_ptr + h * D + c)
    mean_hi = tl.load(mean_ptr + h * D + HALF + c)
    gk = tl.arange(0, NGK_PAD)
    gv = tl.arange(0, NGV_PAD)

    if KRON:  # the 8 plane tiles [d/4, d/2] of B^T (shared by all heads) are loop-invariant: load once
        bt_base = btp_ptr + ii[:, None] * D + c[None, :]
        b0l = tl.load(bt_base)
        b0h = tl.load(bt_base + HALF)
        b1l = tl.load(bt_base + PW * D)
        b1h = tl.load(bt_base + PW * D + HALF)
        b2l = tl.load(bt_base + 2 * PW * D)
        b2h = tl.load(bt_base + 2 * PW * D + HALF)
        b3l = tl.load(bt_base + 3 * PW * D)
        b3h = tl.load(bt_base + 3 * PW * D + HALF)

    m_i = tl.full((QP,), -1.0e30, tl.float32)
    l_i = tl.zeros((QP,), tl.float32)
    acc0 = tl.zeros((QP, PW), tl.float32)
    acc1 = tl.zeros((QP, PW), tl.float32)
    acc2 = tl.zeros((QP, PW), tl.float32)
    acc3 = tl.zeros((QP, PW), tl.float32)

    # quantized tokens of this split (none for the fp-segment program)
    t_start = split * tokens_per_split
    t_stop = tl.minimum(T, t_start + tokens_per_split)
    kc_base = kc_ptr + b * s_kcb + hg * s_kch
    ks_base = ks_ptr + b * s_ksb + hg * s_ksh
    kz_base = kz_ptr + b * s_kzb + hg * s_kzh
    vc_base = vc_ptr + b * s_vcb + h * s_vch
    vs_base = vs_ptr + b * s_vsb + h * s_vsh
    vz_base = vz_ptr + b * s_vzb + h * s_vzh
    for t0 in range(t_start, t_stop, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tmask = t < t_stop
        tt = t.to(tl.int64)
        p_t = tl.load(pos_ptr + b * s_pb + tt, mask=tmask, other=-1)
        valid = tmask & (p_t >= 0)
        # keys: k = y @ R^T restricted to this head's output channels, accumulated over the
        # chunks g and planes j of the group's input channels. KRON: z_j = sum_g A[jh, g] y_gj
        # (elementwise, fp32), each plane's z_j dotted with B^T's plane tiles once its last
        # chunk is in (G == 1: z = y, A = [[1]], no combination).
        k_lo = tl.zeros((BLOCK_T, HALF), tl.float32)
        k_hi = tl.zeros((BLOCK_T, HALF), tl.float32)
        krow = kc_base + tt * s_kct
        for g in tl.static_range(G):
            lo0 = g * D * K_LOB // 8
            hi0 = GD // 4 + g * D // 8
            blo, bhi = _byte_tiles(krow, tmask, ii, lo0, hi0, K_BITS)
            if KRON:
                if G > 1:
                    a_hg = tl.load(a_ptr + jh * G + g)  # A[jh, g], fp32 scalar
            for j in tl.static_range(4):
                prow = g * D + j * PW + ii  # plane-ordered input channels
                codes = _plane_codes(krow, tmask, ii, j, lo0, hi0, blo, bhi, K_BITS)
                if NGK == 1:
                    onehot = gk
                else:
                    onehot = (tl.load(gidp_ptr + hg * GD + prow)[None, :] == gk[:, None]).to(tl.float16)
                sc = _expand_groups(ks_base + tt * s_kst, tmask, onehot, NGK, NGK_PAD, PW)
                zc = _expand_groups(kz_base + tt * s_kzt, tmask, onehot, NGK, NGK_PAD, PW)
                y = codes.to(tl.float32) * sc + zc
                if KRON:
                    if G > 1:
                        y = a_hg * y
                    if g > 0:  # plus the earlier chunks' share of plane j
                        if j == 0:
                            y = z0 + y
                        elif j == 1:
                            y = z1 + y
                        elif j == 2:
                            y = z2 + y
                        else:
                            y = z3 + y
                    if g < G - 1:
                        if j == 0:
                            z0 = y
                        elif j == 1:
                            z1 = y
                        elif j == 2:
                            z2 = y
                        else:
                            z3 = y
                    else:  # z_j complete: one product with B^T's plane-j rows
                        if j == 0:
                            bl, bh = b0l, b0h
                        elif j == 1:
                            bl, bh = b1l, b1h
                        elif j == 2:
                            bl, bh = b2l, b2h
                        else:
                            bl, bh = b3l, b3h
                        y = y.to(dt)
                        k_lo = tl.dot(y, bl, k_lo, input_precision=PREC)
                        k_hi = tl.dot(y, bh, k_hi, input_precision=PREC)
                else:  # dense: the head's columns of R^T, rows of chunk g plane j
                    rt = rtp_ptr + prow[:, None] * GD + jh * D + c[None, :]
                    y = y.to(dt)
                    k_lo = tl.dot(y, tl.load(rt), k_lo, input_precision=PREC)
                    k_hi = tl.dot(y, tl.load(rt + HALF), k_hi, input_precision=PREC)
        s = _scores(k_lo + mean_lo[None, :], k_hi + mean_hi[None, :], p_t, valid, q_lo, q_hi, freq,
                    rope_scaling, qk_scale, cap_scale, PREC, USE_LIBDEVICE, SOFTCAP)
        m_i, l_i, alpha, p = _softmax_step(s, m_i, l_i)
        p = p.to(dt)
        # values: plane j of the head's channels, dequantized, into accumulator j
        vrow = vc_base + tt * s_vct
        vlo, vhi = _byte_tiles(vrow, tmask, ii, 0, D // 4, V_BITS)
        for j in tl.static_range(4):
            codes = _plane_codes(vrow, tmask, ii, j, 0, D // 4, vlo, vhi, V_BITS)
            if NGV == 1:
                onehot = gv
            else:
                onehot = (((4 * ii + j) // GV)[None, :] == gv[:, None]).to(tl.float16)
            v = codes.to(tl.float32) * _expand_groups(vs_base + tt * s_vst, tmask, onehot, NGV, NGV_PAD, PW)
            v = v + _expand_groups(vz_base + tt * s_vzt, tmask, onehot, NGV, NGV_PAD, PW)
            if j == 0:
                acc0 = _pv(p, v, valid, acc0, alpha, PREC)
            elif j == 1:
                acc1 = _pv(p, v, valid, acc1, alpha, PREC)
            elif j == 2:
                acc2 = _pv(p, v, valid, acc2, alpha, PREC)
            else:
                acc3 = _pv(p, v, valid, acc3, alpha, PREC)

    if HAS_FP:  # the last program index attends to the full-precision segment
        f_stop = tl.where(split == n_splits, F, 0)
        fk_base = fk_ptr + b * s_fkb + h * s_fkh
        fv_base = fv_ptr + b * s_fvb + h * s_fvh
        for f0 in range(0, f_stop, BLOCK_T):
            f = f0 + tl.arange(0, BLOCK_T)
            fmask = f < f_stop
            ff = f.to(tl.int64)
            p_t = tl.load(fpos_ptr + b * s_fpb + ff, mask=fmask, other=-1)
            valid = fmask & (p_t >= 0)
            k_row = fk_base + ff[:, None] * s_fkt
            k_lo = tl.load(k_row + c[None, :], mask=fmask[:, None], other=0.0).to(tl.float32)
            k_hi = tl.load(k_row + HALF + c[None, :], mask=fmask[:, None], other=0.0).to(tl.float32)
            s = _scores(k_lo, k_hi, p_t, valid, q_lo, q_hi, freq, rope_scaling, qk_scale, cap_scale, PREC,
                        USE_LIBDEVICE, SOFTCAP)
            m_i, l_i, alpha, p = _softmax_step(s, m_i, l_i)
            p = p.to(dt)
            v_row = fv_base + ff[:, None] * s_fvt + 4 * ii[None, :]
            acc0 = _pv(p, tl.load(v_row, mask=fmask[:, None], other=0.0).to(tl.float32), valid, acc0, alpha, PREC)
            acc1 = _pv(p, tl.load(v_row + 1, mask=fmask[:, None], other=0.0).to(tl.float32), valid, acc1, alpha, PREC)
            acc2 = _pv(p, tl.load(v_row + 2, mask=fmask[:, None], other=0.0).to(tl.float32), valid, acc2, alpha, PREC)
            acc3 = _pv(p, tl.load(v_row + 3, mask=fmask[:, None], other=0.0).to(tl.float32), valid, acc3, alpha, PREC)

    has = l_i > 0.0
    inv_l = 1.0 / tl.where(has, l_i, 1.0)
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    row = (b * (tl.num_programs(1) * REP) + h * REP + qi) * n_parts + split  # [B, n_q, n_parts]
    o_row = o_ptr + row[:, None] * D + 4 * ii[None, :]
    tl.store(o_row, acc0 * inv_l[:, None], mask=qmask[:, None])
    tl.store(o_row + 1, acc1 * inv_l[:, None], mask=qmask[:, None])
    tl.store(o_row + 2, acc2 * inv_l[:, None], mask=qmask[:, None])
    tl.store(o_row + 3, acc3 * inv_l[:, None], mask=qmask[:, None])
    tl.store(lse_ptr + row, lse, mask=qmask)

def _kron_factors(
    rotation: torch.Tensor, head_dim: int, rtol: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(A [G, G], B [d, d])`` in fp64 with ``kron(A, B) == rotation`` (within ``rtol`` of ``max|R|``), else None.

    Block ``(h, g)`` of ``R = kron(A, B)`` is ``A[h, g] * B``. ``B`` is the largest block scaled
    to Frobenius norm ``sqrt(d)`` (so ``B`` and ``A`` are orthonormal when ``R`` is; the joint
    sign/scale of the pair is arbitrary), ``A[h, g] = <block(h, g), B> / d``; the factorisation
    is accepted only if ``kron(A, B)`` rebuilds ``R``.
    """
    gd, d = rotation.shape[0], head_dim
    G = gd // d
    r = rotation.detach().to(torch.float64)
    if G == 1:
        return torch.ones(1, 1, dtype=torch.float64, device=r.device), r
    blocks = r.reshape(G, d, G, d).permute(0, 2, 1, 3)  # [h, g, c, i]
    norms = blocks.pow(2).sum((-1, -2)).reshape(-1)
    ref = int(norms.argmax())
    big = float(norms[ref])
    if not math.isfinite(big) or big == 0.0:
        return None
    b = blocks.reshape(G * G, d, d)[ref] * (d / big) ** 0.5
    a = (blocks * b).sum((-1, -2)) / d
    err = float((torch.kron(a, b) - r).abs().max())
    return (a, b) if err <= rtol * float(r.abs().max()) else None


def head_kernel_supports(*, d: int, dot_dtype: torch.dtype, device: torch.device) -> str | None:
    """None if the head kernel compiles for this head dim and dot operand type on ``device``, else why not.

    Its rotation tiles live in shared memory. At head dim 256 with fp32 operands (fp32 and bf16
    queries) they need 327,680 B on an H200, whose limit is 232,448 B; the interpreter has no limit.
    """
    if device.type == "cuda" and d >= 256 and dot_dtype == torch.float32:
        return (f"head dim {d} with fp32 dot operands (float32 or bfloat16 queries) needs about 320 KB of shared "
                f"memory on CUDA, more than a GPU has; run the model in float16, or calibrate the folded key "
                f"layout (rkv calibrate's default)")
    return None


def _dot_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dot operand dtype of the kernel for queries (or operands) of ``dtype``: fp16 or fp32."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"queries must be fp16/bf16/fp32, got {dtype}")
    return torch.float16 if dtype == torch.float16 else torch.float32


@dataclass(frozen=True, eq=False)
class PreparedRotation:
    """A key rotation ``R [Gd, Gd]`` preprocessed for :func:`decode_attention` (see :func:`prepare_rotation`).

    Attributes:
        rotation: fp32 ``[Gd, Gd]``, ``R`` itself (reference backend, shape checks).
        head_dim: ``d``; ``group_heads = Gd / d``.
        dot_dtype: dtype of the kernel's dot operands (fp16 for fp16 queries, fp32 for fp32/bf16).
        factored: True if ``R = kron(A, B)`` was found (always for ``G == 1``): the kernel's
            factored path (``d*d`` MACs per key token and head); False: the dense path
            (``G*d*d``), e.g. ``Gd = 192 = H_12 ⊗ H_16`` with ``d = 64``.
        rtp: ``[Gd, Gd]`` in ``dot_dtype``, ``R^T`` with rows in plane order (dense path).
        a: fp32 ``[G, G]``, the factor ``A`` (None when not factored).
        btp: ``[d, d]`` in ``dot_dtype``, ``B^T`` with rows in plane order (None when not factored).
        bt32: fp32 ``B^T`` (the chunk kernel's operands; None when not factored).
        k_gid: the key group ids this rotation was prepared with (None: not given), and
        keys_by_chunk: whether they group each rotated chunk of ``d`` channels alone (the chunk
            kernel's condition; None when ``k_gid`` was not given).
    """

    rotation: torch.Tensor
    head_dim: int
    dot_dtype: torch.dtype
    factored: bool
    rtp: torch.Tensor
    a: torch.Tensor | None
    btp: torch.Tensor | None
    bt32: torch.Tensor | None = None
    k_gid: torch.Tensor | None = None
    keys_by_chunk: bool | None = None
    _chunk_operands: dict = field(default_factory=dict, repr=False)

    def chunk_operands(self, k_bits: int, v_bits: int, one_value_group: bool) -> tuple[torch.Tensor, ...]:
        """``(m, beta, vcol)`` of the chunk kernel (:func:`~.decode_chunk.launch_chunk_kernel`), made once."""
        key = (k_bits, v_bits, one_value_group)
        if key not in self._chunk_operands:
            d, dev = self.head_dim, self.rotation.device
            m = (self.bt32 * code_column_factors(k_bits, d, dev)[:, None]).to(self.dot_dtype).contiguous()
            beta = self.bt32.sum(0).contiguous()
            vcol = code_column_factors(v_bits, d, dev) if one_value_group else torch.ones(d, device=dev)
            self._chunk_operands[key] = (m, beta, vcol.contiguous())
        return self._chunk_operands[key]

    @property
    def group_heads(self) -> int:
        return self.rotation.shape[0] // self.head_dim

    @property
    def device(self) -> torch.device:
        return self.rtp.device


def prepare_rotation(
    rotation: torch.Tensor, head_dim: int, dot_dtype: torch.dtype, k_gid: torch.Tensor | None = None
) -> PreparedRotation:
    """Precompute, on ``rotation``'s device, what :func:`decode_attention` needs of ``R``.

    Detects a Kronecker factorisation ``R = kron(A, B)`` (``A [G, G]``, ``B [d, d]``; true for
    Sylvester Hadamard rotations of power-of-two size, e.g. ``512 = H_4 ⊗ H_128``) by rebuilding
    ``kron(A, B)`` and comparing with ``R`` (``1e-5`` relative to ``max|R|``); without one
    (``192 = H_12 ⊗ H_16`` with ``d = 64``, learned rotations) the dense path is recorded in
    ``factored``. Call once per layer and pass the result as ``rotation=`` to avoid per-call
    host work (the check synchronises with the device).

    Args:
        rotation: ``[G*d, G*d]`` (any float dtype; used in fp32/fp64).
        head_dim: ``d`` (even, divides the rotation size).
        dot_dtype: the kernel's dot operand dtype, ``torch.float16`` for fp16 queries and
            ``torch.float32`` for fp32/bf16 queries; the query dtype itself is accepted too
            (bf16 maps to fp32).
        k_gid: the layer's key group ids (int32 ``[n_hg, Gd]``), optional: recorded with whether
            they group each rotated chunk alone, so that ``kernel="auto"`` can pick the chunk
            kernel without reading them on every call. Pass this same tensor as ``k_gid=``.
    """
    if rotation.dim() != 2 or rotation.shape[0] != rotation.shape[1] or head_dim <= 0 or rotation.shape[0] % head_dim:
        raise ValueError(f"rotation must be [G*d, G*d] with d={head_dim}, got {tuple(rotation.shape)}")
    gd, d = rotation.shape[0], head_dim
    dt = _dot_dtype(dot_dtype)
    dev = rotation.device
    r32 = rotation.detach().to(torch.float32).contiguous()
    rtp = r32.T.index_select(0, _plane_order(gd, d, dev)).to(dt).contiguous()
    ab = _kron_factors(r32, d) if d % _NPLANES == 0 else None
    a = btp = bt32 = None
    if ab is not None:
        a = ab[0].to(torch.float32).contiguous()
        bt32 = ab[1].T.to(torch.float32).contiguous()
        btp = bt32.to(dt).index_select(0, _plane_order(d, d, dev)).contiguous()
    by_chunk = None if k_gid is None else keys_grouped_by_chunk(k_gid, d)
    return PreparedRotation(rotation=r32, head_dim=d, dot_dtype=dt, factored=ab is not None, rtp=rtp, a=a, btp=btp,
                            bt32=bt32, k_gid=k_gid, keys_by_chunk=by_chunk)  # fmt: skip


def num_splits_for(
    batch: int, n_kv: int, T: int, block_t: int, device: torch.device, resident_per_sm: int | None = None
) -> int:
    """Context splits of the ``batch * n_kv`` programs (``n_kv``: the kernel's head units).

    With ``resident_per_sm`` (programs of the compiled kernel that fit on one SM): the split count
    that fills whole waves (:func:`~._occupancy.wave_splits`). Without (before a configuration's
    first launch): about two programs per SM.
    """
    n_blocks = cdiv(T, block_t)
    if n_blocks == 0:
        return 0
    sms = sm_count(device)
    if resident_per_sm is not None:
        splits = wave_splits(batch * n_kv, n_blocks, resident_per_sm * sms)
    else:
        splits = max(1, min(n_blocks, cdiv(2 * sms, batch * n_kv)))
    return cdiv(n_blocks, cdiv(n_blocks, splits))  # no empty splits


def decode_attention(
    q: torch.Tensor,
    kv: PackedKV,
    *,
    rotation: torch.Tensor | PreparedRotation,
    k_mean: torch.Tensor,
    k_gid: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float,
    sm_scale: float,
    k_bits: int,
    v_bits: int,
    k_group_size: int,
    v_group_size: int,
    softcap: float | None = None,
    num_splits: int | None = None,
    block_t: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    factored: bool | None = None,
    kernel: Kernel = "auto",
    backend: Backend = "auto",
) -> torch.Tensor:
    """Attention of one new query token per sequence over the packed cache (module docstring).

    Args:
        q: ``[B, n_q, d]`` post-RoPE queries, fp16/bf16/fp32; ``d`` a power of two >= 64.
        kv: the layer's :class:`~rkv_convert.kernels.packed_kv.PackedKV` in the ``prerope`` layout
            (``T`` store slots; the full-precision segment holds pre-RoPE keys).
        rotation: fp32 ``[Gd, Gd]``, or a :class:`PreparedRotation` of it (from
            :func:`prepare_rotation` with this ``d``, the dot dtype of ``q`` and on ``q``'s
            device) to skip the per-call preparation; k_mean: fp32 ``[n_kv*d]``; k_gid: int32 ``[n_hg, Gd]``.
        inv_freq: fp32 ``[d/2]``; attention_scaling: cos/sin factor; sm_scale: score factor.
        k_bits, v_bits: 2, 3 or 4; k_group_size, v_group_size: channels per group.
        softcap: attention-logit soft cap (Gemma 2): logits ``softcap * tanh(sm_scale * q·k / softcap)``;
            None: no cap.
        num_splits: context splits of the quantized tokens (None: about two programs per SM).
        block_t: tokens per inner step of the kernel (power of two >= 16; None: ``KERNEL_DEFAULTS``, and
            ``IEEE_CHUNK_BLOCK_T`` for the chunk kernel with fp32 queries).
        num_warps: warps per program of the main kernel.
        num_stages: software-pipelining stages of its token loop.
            None takes each kernel's defaults (``KERNEL_DEFAULTS``: the fastest configuration
            timed on an H100, docs/benchmarks.md).
        factored: inverse rotation path: True the Kronecker-factored one (``d*d`` MACs per key
            token and head; needs ``R = kron(A, B)``, else ValueError), False the dense one
            (``G*d*d``), None: factored whenever the factorisation exists.
        kernel: which Triton kernel: ``"auto"`` (default) the chunk kernel where it applies,
            else the head kernel; ``"head"`` one program per KV head (this module; any rotation
            and group count); ``"chunk"`` (:mod:`rkv_convert.kernels.decode_chunk`: needs a
            factored rotation, 2- or 4-bit codes and key groups equal to the rotated head chunks). An explicit kernel that does not cover
            the call raises ValueError naming the reason. ``"auto"`` knows the key groups
            without reading ``k_gid`` when ``rotation`` is a :class:`PreparedRotation` made with
            this ``k_gid`` (else the head kernel, or a check when the rotation is raw).
            ``factored=False`` concerns the head kernel only.
        backend: ``"auto"``, ``"triton"`` or ``"reference"`` (see ``_common``).

    Returns:
        ``[B, n_q, d]`` in ``q.dtype`` (rotated value space).
    """
    prep = rotation if isinstance(rotation, PreparedRotation) else None
    if prep is not None:
        rotation = prep.rotation
    kw = dict(rotation=rotation, k_mean=k_mean, k_gid=k_gid, inv_freq=inv_freq,
              attention_scaling=attention_scaling, sm_scale=sm_scale, k_bits=k_bits, v_bits=v_bits,
              k_group_size=k_group_size, v_group_size=v_group_size, softcap=softcap)
    qk_scale, cap_scale = logit_scales(sm_scale, softcap)  # refuses a cap <= 0 on every backend
    if not resolve_backend(backend, q):
        return decode_attention_ref(q, kv, **kw)
    k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, pos, fp_k, fp_v, fp_pos = kv
    dm = _dims(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, pos, rotation, k_mean, k_gid,
               inv_freq, k_bits, v_bits, k_group_size, v_group_size, fp_k, fp_v, fp_pos)
    B, n_q, d, G, Gd, n_kv, rep, T, F = (dm[k] for k in ("B", "n_q", "d", "G", "Gd", "n_kv", "rep", "T", "F"))
    if d & (d - 1) or d < 64:
        raise ValueError(f"the Triton kernel needs a power-of-two head dim >= 64, got {d}")
    dev = q.device
    dot_dtype = _dot_dtype(q.dtype)
    if prep is None:
        prep = prepare_rotation(rotation.to(dev), d, dot_dtype, k_gid=k_gid)
    elif prep.head_dim != d or prep.dot_dtype != dot_dtype or prep.device != dev:
        raise ValueError(
            f"PreparedRotation for d={prep.head_dim}, dot dtype {prep.dot_dtype} on {prep.device}; this call needs "
            f"d={d}, {dot_dtype} (queries {q.dtype}) on {dev}"
        )
    if factored is None:
        factored = prep.factored
    elif factored and not prep.factored:
        raise ValueError(f"factored=True needs a rotation of the form kron(A [{G}, {G}], B [{d}, {d}])")
    n_gk, n_gv = Gd // k_group_size, d // v_group_size
    if kernel not in ("auto", "head", "chunk"):
        raise ValueError(f"kernel must be 'auto', 'head' or 'chunk', got {kernel!r}")
    if kernel in ("auto", "chunk"):
        by_chunk = prep.keys_by_chunk if prep.k_gid is k_gid else None
        if by_chunk is None and kernel == "chunk":
            by_chunk = keys_grouped_by_chunk(k_gid, d)
        why_not = chunk_kernel_supports(factored=bool(factored), G=G, rep=rep, d=d, k_bits=k_bits, v_bits=v_bits,
                                        k_group_size=k_group_size, keys_by_chunk=bool(by_chunk), n_gv=n_gv)  # fmt: skip
        if why_not is not None and kernel == "chunk":
            raise ValueError(f"kernel='chunk' does not cover this call: {why_not}; use kernel='head'")
        kernel = "chunk" if why_not is None else "head"
    if kernel == "head" and (why_not := head_kernel_supports(d=d, dot_dtype=dot_dtype, device=dev)) is not None:
        raise ValueError(f"the pre-RoPE decode kernel does not cover this call: {why_not}")
    dflt = KERNEL_DEFAULTS[kernel]
    if block_t is None:
        block_t = IEEE_CHUNK_BLOCK_T if kernel == "chunk" and q.dtype == torch.float32 else dflt["block_t"]
    num_warps = dflt["num_warps"] if num_warps is None else num_warps
    num_stages = dflt["num_stages"] if num_stages is None else num_stages
    if block_t & (block_t - 1) or block_t < 16:
        raise ValueError(f"block_t must be a power of two >= 16, got {block_t}")
    has_fp = fp_k is not None
    residency_key = (kernel, dev, block_t, num_warps, num_stages, G, rep, d, k_bits, v_bits, n_gk, n_gv,
                     q.dtype, has_fp, bool(factored), softcap is not None)  # fmt: skip
    if num_splits is None:
        num_splits = num_splits_for(B, n_kv // G if kernel == "chunk" else n_kv, T, block_t, dev, resident_per_sm(residency_key))
    num_splits, tokens_per_split = split_slots(T, block_t, num_splits)
    n_parts = num_splits + int(has_fp)
    if n_parts == 0:
        raise ValueError("nothing to attend to: no quantized tokens and no fp segment")

    def last_dim_contig(t: torch.Tensor) -> torch.Tensor:
        return t if t.stride(-1) == 1 else t.contiguous()

    qc = last_dim_contig(q)
    if not has_fp:  # placeholders: the kernels take the segment's pointers and strides either way
        kv = kv._replace(fp_k=qc.new_empty(1, 1, 1, d), fp_v=qc.new_empty(1, 1, 1, d), fp_pos=pos.new_empty(1, 1))
    kv = PackedKV(*map(last_dim_contig, kv))
    f32 = dict(device=dev, dtype=torch.float32)
    mean = k_mean.to(**f32).contiguous()
    freq = inv_freq.to(**f32).contiguous()
    o_part = torch.empty(B, n_q, n_parts, d, **f32)
    lse_part = torch.empty(B, n_q, n_parts, **f32)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    if kernel == "chunk":
        m, beta, vcol = prep.chunk_operands(k_bits, v_bits, n_gv == 1)
        compiled = launch_chunk_kernel(
            qc, kv, a=prep.a, m=m, beta=beta, vcol=vcol, mean=mean, freq=freq, o_part=o_part, lse_part=lse_part,
            dims=dm, tokens_per_split=tokens_per_split, num_splits=num_splits, has_fp=has_fp,
            k_bits=k_bits, v_bits=v_bits, v_group_size=v_group_size,
            qk_scale=qk_scale, cap_scale=cap_scale, softcap=softcap is not None,
            rope_scaling=float(attention_scaling), dot_dtype=dot_dtype,
            precision=precision, use_libdevice=not triton_interpreting(),
            block_t=block_t, num_warps=num_warps, num_stages=num_stages,
        )
        record_residency(residency_key, compiled, dev)
        return merge_parts(o_part, lse_part, q.dtype)
    gidp = k_gid.to(device=dev, dtype=torch.int32).index_select(1, _plane_order(Gd, d, dev)).contiguous()
    a, btp = (prep.a, prep.btp) if factored else (prep.rtp, prep.rtp)  # unused by the dense path
    with device_guard(qc):  # Triton launches on the current device
        compiled = _decode_kernel[(B, n_kv, n_parts)](
            qc, *kv[:7], prep.rtp, a, btp, mean, gidp, freq, *kv[7:], o_part, lse_part, *launch_strides(qc, kv),
            T, F, tokens_per_split, num_splits, n_parts, qk_scale, cap_scale, float(attention_scaling),
            D=d, G=G, REP=rep, QP=max(16, next_pow2(rep)),
            K_BITS=k_bits, V_BITS=v_bits, NGK=n_gk, NGK_PAD=max(16, next_pow2(n_gk)),
            GV=v_group_size, NGV=n_gv, NGV_PAD=max(16, next_pow2(n_gv)),
            BLOCK_T=block_t, HAS_FP=has_fp, DOT_DTYPE=tl.float16 if dot_dtype == torch.float16 else tl.float32,
            PREC=precision,
            USE_LIBDEVICE=not triton_interpreting(), KRON=bool(factored), SOFTCAP=softcap is not None,
            num_warps=num_warps, num_stages=num_stages,
        )
    record_residency(residency_key, compiled, dev)
    return merge_parts(o_part, lse_part, q.dtype)
