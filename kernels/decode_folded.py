"""Decode attention over a *query-folded* packed cache: post-RoPE keys, centred and rotated per KV head.

Storage layout of one decoder layer (``B`` batch, ``n_kv`` KV heads of ``d`` channels, ``cap``
slots; codes packed along channels with :func:`rkv_convert.quant.packing.pack_codes`):

- Keys: the key ``k_n`` (pre-RoPE) of the token at position ``n`` is stored as
  ``y_n = RoPE_n(k_n - mu_h) @ R_h`` (``mu_h fp32 [d]`` the calibrated pre-RoPE mean, ``R_h fp32
  [d, d]`` any orthonormal matrix, one per KV head, no mixing across heads), quantized per token,
  asymmetric min/max over groups of ``g_k`` consecutive channels of ``y`` (``quant.quantizer``).
- Values: as stored today (already rotated by the exported weights), groups of ``g_v``
  consecutive channels.
- RoPE: Llama ``rotate_half`` (channel ``i`` pairs with ``i + d/2``), angle ``n * inv_freq[i mod
  d/2]``, cos/sin times ``attention_scaling``: :func:`rkv_convert.runtime.ops.rope`.
- Full-precision segment (sinks + recent window): *post-RoPE* keys and values as the model made them.

Tensors travel as one :class:`PackedKV`; the per-layer constants as :class:`FoldedParams`.

Decode (one query token per sequence, ``q [B, n_q, d]`` post-RoPE, ``n_q = n_kv * rep``, query
head ``i`` reads KV head ``i // rep``). Since ``RoPE_n(k_n) = y_n R_h^T + RoPE_n(mu_h)``,

    q · RoPE_n(k_n) = (q R_h) · y_n + q · RoPE_n(mu_h),
    q · RoPE_n(mu)  = Σ_{i<d/2} A_i cos(n θ_i) + B_i sin(n θ_i)   (times attention_scaling),
    A_i = q_i mu_i + q_{i+d/2} mu_{i+d/2},   B_i = q_{i+d/2} mu_i - q_i mu_{i+d/2}.

Every key transform moves to the query, once per program: ``q' = q R_h`` and ``A, B``. What is
left per key is a plain dot with 2-bit codes plus the cos/sin dot of the mean term.

Kernel (grid ``(B, n_kv, n_parts)``, one program per KV head, its ``rep`` query heads and one
contiguous split of slots; split-K with a log-sum-exp merge, or one launch when there is a single
part):

- **Codes as four planes.** Plane ``j`` of a packed byte tile ``[BLOCK_N, d/4]`` holds channels
  ``4i + j`` (one shift per byte, no interleave); each plane meets the matching rows of ``q'`` in a
  ``tl.dot``. On CUDA, 2-bit planes become fp16 ``4 + code`` directly by byte permutes (two
  ``prmt`` per four codes, no conversion instruction); the bias ``4`` is folded into the zero term.
- **Scales and zeros on score entries, not key elements.** The dot's columns are
  ``(query row r, key group g)`` pairs: column ``(r, g)`` of ``q'`` keeps only group ``g``'s
  channels, so one dot gives every group's partial dot ``q'_g · c_g``; then
  ``score_r = Σ_g s_g (q'_g · c_g) + z_g Σ q'_g`` on ``[BLOCK_N, R, groups]`` entries.
- **The mean term by angle addition.** For a block whose valid slots hold consecutive positions
  ``n0 + k`` (true except where a block straddles a gap in positions; ``-1`` slots and left
  padding do not break it), ``cos((n0+k)θ) = cos(n0θ)cos(kθ) - sin(n0θ)sin(kθ)``: the program's
  constant ``[cos(kθ) | sin(kθ)]`` table (``[BLOCK_N, d]``, in registers) meets the coefficients
  ``(A, B)`` rotated by ``n0θ`` (``d`` cos/sin per block, not per key) in one more dot into an
  extra column slot of the same accumulator. Other blocks take the exact path: cos/sin of each
  slot's own position (the fast hardware unit after a Cody-Waite reduction), as fp32 queries
  always do. The angle-addition angle ``n0θ + kθ`` differs from ``fl(nθ)`` by fp32 rounding of
  the position product (``~n 2^-24`` rad), the same size as that rounding in RoPE itself.
- **Values:** the softmax weights times each value group's scale make the left operand
  ``[(r, g), BLOCK_N]`` of a dot with each value plane; zeros become one running sum per ``(r, g)``.
- Full-precision segment in its own part (the last program index), or inside the only split.

Dot operands are fp16 for fp16 queries and fp32 (IEEE) for fp32/bf16 queries, accumulation fp32
everywhere; ``q'`` itself is computed in-kernel in fp32 (3xTF32 for 16-bit queries).

Measured status (H200, ``benchmarks/results/decode_folded.csv``): correct, but NOT at memory
speed: 0.57-0.72x fp16 SDPA at >= 16k (about 400-520 GB/s, 9-12 % of the 2-bit byte floor).
Every compiled variant sits at 255 registers per thread (two programs per SM: latency-bound);
prefetching one block ahead spilled and was slower; the exact and angle-addition mean paths time
the same, so the bottleneck is the code/score/value tile traffic, not the trig.

Dispatch (see :mod:`rkv_convert.kernels._common`): ``backend="auto"`` runs the kernel on CUDA
tensors or under ``TRITON_INTERPRET=1``, else :func:`decode_folded_ref`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import triton
import triton.language as tl

from rkv_convert.quant.packing import packed_width
from rkv_convert.runtime.ops import dequantize_values, rope

from ._common import Backend, device_guard, next_pow2, resolve_backend, triton_interpreting
from ._decode_parts import _byte_tiles, _cos_sin, _plane_codes
from ._occupancy import sm_count
from .packed_kv import PackedKV
from .decode_attention import _merge

__all__ = ["FoldedParams", "FOLDED_DEFAULTS", "decode_folded", "decode_folded_ref", "folded_scores_ref"]

_LOG2E = 1.0 / math.log(2.0)
MeanTerm = Literal["auto", "angle", "exact"]
# Launch settings: the best of benchmarks/bench_decode_folded.py --tune on an H200 (prefetch spilled).
FOLDED_DEFAULTS: dict[str, int] = {"block_n": 128, "num_warps": 4, "num_stages": 1, "waves": 4, "prefetch": 0}


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

    def kernel_operands(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rtp, mean, inv_freq)`` fp32 contiguous on ``device``, made once per device.

        ``rtp [n_kv, 4, d/4, d]``: ``R_h^T`` with its rows in plane order (row ``(j, i)`` = column
        ``4i + j`` of ``R_h``), so that each plane's rows of ``q' = q R_h`` load as one tile.
        """
        if device not in self._on_device:
            n_kv, d = self.n_kv, self.head_dim
            rt = self.rotation.to(device=device, dtype=torch.float32).transpose(1, 2)
            rtp = rt.reshape(n_kv, d // 4, 4, d).permute(0, 2, 1, 3).contiguous()
            self._on_device[device] = (rtp, self.mean.to(device=device, dtype=torch.float32).contiguous(),
                                       self.inv_freq.to(device=device, dtype=torch.float32).contiguous())
        return self._on_device[device]

    def angle_table(self, device: torch.device, rows: int, dtype: torch.dtype) -> torch.Tensor:
        """``[rows, d]``: ``cos(k θ_i)`` in columns ``i < d/2``, ``sin(k θ_i)`` after, for ``k < rows`` (cached)."""
        key = ("angles", device, rows, dtype)
        if key not in self._on_device:
            ang = torch.arange(rows, dtype=torch.float64)[:, None] * self.inv_freq.double().cpu()[None, :]
            self._on_device[key] = torch.cat([ang.cos(), ang.sin()], 1).to(device=device, dtype=dtype).contiguous()
        return self._on_device[key]

    @property
    def value_bits(self) -> int:
        return self.bits if self.v_bits is None else self.v_bits

    @property
    def head_dim(self) -> int:
        return self.rotation.shape[-1]

    @property
    def n_kv(self) -> int:
        return self.rotation.shape[0]


def _dims(q: torch.Tensor, kv: PackedKV, p: FoldedParams, n_tokens: int | None) -> dict[str, int]:
    """Validate shapes against the layout; return the dimensions."""
    if q.dim() != 3:
        raise ValueError(f"q must be [B, n_q, d], got {tuple(q.shape)}")
    B, n_q, d = q.shape
    n_kv = p.n_kv
    if d != p.head_dim or n_q % n_kv:
        raise ValueError(f"q {tuple(q.shape)} does not fit {n_kv} KV heads of {p.head_dim}")
    cap = kv.k_codes.shape[2] if kv.k_codes.dim() == 4 else -1
    T = cap if n_tokens is None else int(n_tokens)
    if not 0 <= T <= max(cap, 0):
        raise ValueError(f"n_tokens={n_tokens} outside the cache's {cap} slots")
    want = {
        "k_codes": (kv.k_codes, (B, n_kv, cap, packed_width(d, p.bits)), torch.uint8),
        "k_scale": (kv.k_scale, (B, n_kv, cap, d // p.g_k), torch.float16),
        "k_zero": (kv.k_zero, (B, n_kv, cap, d // p.g_k), torch.float16),
        "v_codes": (kv.v_codes, (B, n_kv, cap, packed_width(d, p.value_bits)), torch.uint8),
        "v_scale": (kv.v_scale, (B, n_kv, cap, d // p.g_v), torch.float16),
        "v_zero": (kv.v_zero, (B, n_kv, cap, d // p.g_v), torch.float16),
        "pos": (kv.pos, (B, cap), torch.int32),
    }
    F = 0
    fp = (kv.fp_k, kv.fp_v, kv.fp_pos)
    if any(t is not None for t in fp):
        if any(t is None for t in fp):
            raise ValueError("fp_k, fp_v and fp_pos go together")
        F = kv.fp_k.shape[2]
        want.update(fp_k=(kv.fp_k, (B, n_kv, F, d), None), fp_v=(kv.fp_v, (B, n_kv, F, d), None),
                    fp_pos=(kv.fp_pos, (B, F), torch.int32))  # fmt: skip
    for name, (t, shape, dtype) in want.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        if dtype is not None and t.dtype != dtype:
            raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
    return dict(B=B, n_q=n_q, n_kv=n_kv, d=d, rep=n_q // n_kv, T=T, F=F)


def folded_scores_ref(
    q: torch.Tensor, y: torch.Tensor, pos: torch.Tensor, params: FoldedParams, compute_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Unscaled scores ``q · RoPE_pos(k)`` ``fp32 [B, n_q, T]`` from folded keys ``y [B, n_kv, T, d]``.

    ``(q R_h) · y + q · RoPE_pos(mu_h)`` (module docstring); ``pos [B, T]``, ``-1`` read as 0.
    ``compute_dtype`` rounds the operands of both dots (tests: the error a low-precision kernel may have).
    """
    B, n_q, d = q.shape
    n_kv = y.shape[1]
    rep = n_q // n_kv
    qf = q.float().reshape(B, n_kv, rep, d)
    q_rot = qf @ params.rotation.to(q.device, torch.float32)[None]  # [B, n_kv, rep, d]
    mu = params.mean.to(q.device, torch.float32)[None, :, None, :].expand(B, n_kv, y.shape[2], d)
    mu_rope = rope(mu, pos.clamp_min(0), params.inv_freq, params.attention_scaling)  # [B, n_kv, T, d]
    cd = compute_dtype
    s = (q_rot.to(cd) @ y.to(cd).transpose(-1, -2)).float() + (qf.to(cd) @ mu_rope.to(cd).transpose(-1, -2)).float()
    return s.reshape(B, n_q, -1)


def decode_folded_ref(
    q: torch.Tensor,
    kv: PackedKV,
    params: FoldedParams,
    *,
    n_tokens: int | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Pure-torch reference of :func:`decode_folded` (arguments as there), fp32 math.

    Dequantize (``runtime.ops.dequantize_values``, consecutive groups, for keys and values), fold
    (:func:`folded_scores_ref`), attend over valid slots and the fp segment. A sequence without
    any valid token gets zeros. ``compute_dtype`` (tests only) rounds every matmul's operands.

    Returns:
        ``[B, n_q, d]`` in ``q.dtype``.
    """
    dm = _dims(q, kv, params, n_tokens)
    B, n_q, d, rep, T = (dm[k] for k in ("B", "n_q", "d", "rep", "T"))
    cd = compute_dtype
    if T:
        y = dequantize_values(kv.k_codes[:, :, :T], kv.k_scale[:, :, :T], kv.k_zero[:, :, :T], params.bits, d)
        v = dequantize_values(kv.v_codes[:, :, :T], kv.v_scale[:, :, :T], kv.v_zero[:, :, :T], params.value_bits, d)
    else:  # (the dequantizer cannot view an empty tensor with -1)
        y = v = q.new_zeros(B, dm["n_kv"], 0, d, dtype=torch.float32)
    pos = kv.pos[:, :T]
    scores = folded_scores_ref(q, y, pos, params, cd)  # [B, n_q, T]
    valid = pos >= 0
    if dm["F"]:
        fk = kv.fp_k.float().repeat_interleave(rep, 1)  # [B, n_q, F, d]
        s_fp = (q.float()[:, :, None, :].to(cd) @ fk.to(cd).transpose(-1, -2)).float().squeeze(2)
        scores = torch.cat([scores, s_fp], -1)
        v = torch.cat([v, kv.fp_v.float()], 2)
        valid = torch.cat([valid, kv.fp_pos >= 0], 1)
    v = torch.where(valid[:, None, :, None], v, 0.0).repeat_interleave(rep, 1)  # empty slots may hold garbage
    scores = scores * params.sm_scale
    if params.softcap is not None:
        scores = params.softcap * torch.tanh(scores / params.softcap)
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    p = torch.softmax(scores, -1).nan_to_num(0.0)
    out = (p[:, :, None, :].to(cd) @ v.to(cd)).float().squeeze(2)
    return out.to(q.dtype)


@triton.jit
def _u2_plane_fp16(b, J: tl.constexpr):
    """fp16 ``4 + ((b >> 2J) & 3)`` of a uint8 tile, by byte permutes: no conversion instruction.

    The code lands in bits 8-9 of an fp16 whose exponent is that of 4.0 (one unit = 1 there).
    """
    if J == 0:
        asm: tl.constexpr = ("{.reg .b32 t, z; mov.b32 z, 0; and.b32 t, $2, 0x03030303; or.b32 t, t, 0x44444444; "
                             "prmt.b32 $0, t, z, 0x1404; prmt.b32 $1, t, z, 0x3424;}")
    elif J == 1:
        asm: tl.constexpr = ("{.reg .b32 t, z; mov.b32 z, 0; shr.b32 t, $2, 2; and.b32 t, t, 0x03030303; "
                             "or.b32 t, t, 0x44444444; prmt.b32 $0, t, z, 0x1404; prmt.b32 $1, t, z, 0x3424;}")
    elif J == 2:
        asm: tl.constexpr = ("{.reg .b32 t, z; mov.b32 z, 0; shr.b32 t, $2, 4; and.b32 t, t, 0x03030303; "
                             "or.b32 t, t, 0x44444444; prmt.b32 $0, t, z, 0x1404; prmt.b32 $1, t, z, 0x3424;}")
    else:
        asm: tl.constexpr = ("{.reg .b32 t, z; mov.b32 z, 0; shr.b32 t, $2, 6; and.b32 t, t, 0x03030303; "
                             "or.b32 t, t, 0x44444444; prmt.b32 $0, t, z, 0x1404; prmt.b32 $1, t, z, 0x3424;}")
    return tl.inline_asm_elementwise(asm, "=r,=r,r", [b], dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def _log2_logits(s, qk_scale, cap_scale, SOFTCAP: tl.constexpr):
    """Base-2 logits of unscaled scores: ``s * qk_scale`` (``sm_scale * log2 e``), or with a soft cap
    ``cap_scale * tanh(s * qk_scale)`` (``qk_scale = sm_scale / cap``, ``cap_scale = cap * log2 e``)."""
    if SOFTCAP:
        out = cap_scale * (1.0 - 2.0 / (tl.exp(2.0 * s * qk_scale) + 1.0))  # tanh, saturating at +-1
    else:
        out = s * qk_scale
    return out


@triton.jit
def _load_planes(row, tmask, ii, PW: tl.constexpr, BITS: tl.constexpr, FAST: tl.constexpr):
    """Byte tiles of one token row block: the raw uint8 low tile (FAST) or the int32 tiles of ``_byte_tiles``."""
    if FAST:
        raw = tl.load(row[:, None] + ii[None, :], mask=tmask[:, None], other=0)
        lo = raw
        hi = raw
    else:
        lo, hi = _byte_tiles(row, tmask, ii, 0, PW, BITS)
    return lo, hi


@triton.jit
def _plane(row, tmask, ii, lo, hi, j: tl.constexpr, PW: tl.constexpr, BITS: tl.constexpr, FAST: tl.constexpr,
           DT: tl.constexpr):
    """Codes of channels ``4*ii + j`` as ``DT [BLOCK_N, PW]`` (FAST: fp16 ``4 + code``)."""
    if FAST:
        out = _u2_plane_fp16(lo, j)
    else:
        out = _plane_codes(row, tmask, ii, j, 0, PW, lo, hi, BITS).to(tl.float32).to(DT)
    return out


@triton.jit
def _qstar(rot_base, ii, j: tl.constexpr, qexp_t, col_g, GK: tl.constexpr, PW: tl.constexpr, D: tl.constexpr,
           DT: tl.constexpr, QPREC: tl.constexpr):
    """Rows ``4i + j`` of ``q' = q R`` as ``[PW, QC]``: column ``(r, g)`` keeps group ``g``'s channels only.

    ``rot_base``: this head's plane-ordered ``R^T`` (row ``j*PW + i`` = column ``4i + j`` of ``R``).
    """
    qs = tl.dot(tl.load(rot_base + j * PW * D), qexp_t, input_precision=QPREC)
    keep = ((4 * ii + j) // GK)[:, None] == col_g[None, :]
    return tl.where(keep, qs, 0.0).to(DT)


@triton.jit
def _store_plane(acc, zacc, inv_l, gv, ii, j: tl.constexpr, dst, rmask, R: tl.constexpr, NGVP: tl.constexpr,
                 PW: tl.constexpr, GV: tl.constexpr):
    """Channels ``4i + j`` of the normalised output: row ``(r, g(c))`` of plane accumulator ``j``."""
    sel = (gv[:, None] == ((4 * ii + j) // GV)[None, :]).to(tl.float32)  # [NGVP, PW]
    a3 = tl.reshape(acc, (R, NGVP, PW))
    o = tl.sum(a3 * sel[None, :, :], 1) + tl.sum(zacc[:, :, None] * sel[None, :, :], 1)
    o = o * inv_l[:, None]
    tl.store(dst + (4 * ii + j)[None, :], o.to(dst.dtype.element_ty), mask=rmask[:, None])


@triton.jit
def _load_block(t0, t_stop, ptrs, ii, gk, gv, NG: tl.constexpr, NGV: tl.constexpr, PW: tl.constexpr,
                K_BITS: tl.constexpr, V_BITS: tl.constexpr, K_FAST: tl.constexpr, V_FAST: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """Every load of one block, issued together: masks depend on the slot range only (never on the
    positions), so no load waits for another; empty slots are zeroed by the caller."""
    pos_row, kc_base, ks_base, kz_base, vc_base, vs_base, vz_base, s_kct, s_kst, s_vct, s_vst = ptrs
    t = t0 + tl.arange(0, BLOCK_N)
    tmask = t < t_stop
    tt = t.to(tl.int64)
    p_t = tl.load(pos_row + tt, mask=tmask, other=-1)
    klo, khi = _load_planes(kc_base + tt * s_kct, tmask, ii, PW, K_BITS, K_FAST)
    vlo, vhi = _load_planes(vc_base + tt * s_vct, tmask, ii, PW, V_BITS, V_FAST)
    km = tmask[:, None] & (gk < NG)[None, :]
    sk = tl.load(ks_base + tt[:, None] * s_kst + gk[None, :], mask=km, other=0.0)
    zk = tl.load(kz_base + tt[:, None] * s_kst + gk[None, :], mask=km, other=0.0)
    vm = tmask[:, None] & (gv < NGV)[None, :]
    sv = tl.load(vs_base + tt[:, None] * s_vst + gv[None, :], mask=vm, other=0.0)
    zv = tl.load(vz_base + tt[:, None] * s_vst + gv[None, :], mask=vm, other=0.0)
    return p_t, klo, khi, sk, zk, vlo, vhi, sv, zv


@triton.jit
def _block(t0, t_stop, cur, state, consts, ptrs, ii, hh, rmask, gk, ANGLE: tl.constexpr,
           R: tl.constexpr, NG: tl.constexpr, NGP: tl.constexpr, NGVP: tl.constexpr,
           D: tl.constexpr, PW: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr, K_FAST: tl.constexpr,
           V_FAST: tl.constexpr, BLOCK_N: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
           USE_LIBDEVICE: tl.constexpr, SOFTCAP: tl.constexpr):
    """One block of ``BLOCK_N`` quantized slots (loaded by :func:`_load_block`): scores, online softmax,
    values. ``ANGLE``: the mean term by angle addition from the block's base position (valid positions
    consecutive), else from each slot's own position."""
    m_i, l_i, a0, a1, a2, a3, zacc = state
    q0, q1, q2, q3, qsum3, coef_a, coef_b, tab_ptr, freq, qk_scale, cap_scale = consts
    pos_row, kc_base, ks_base, kz_base, vc_base, vs_base, vz_base, s_kct, s_kst, s_vct, s_vst = ptrs
    p_t, klo, khi, sk, zk, vlo, vhi, sv, zv = cur
    H: tl.constexpr = D // 2
    QCV: tl.constexpr = R * NGVP
    KB: tl.constexpr = 4.0 if K_FAST else 0.0  # bias of the fast 2-bit planes (fp16 4 + code)
    VB: tl.constexpr = 4.0 if V_FAST else 0.0
    t = t0 + tl.arange(0, BLOCK_N)
    tmask = t < t_stop
    tt = t.to(tl.int64)
    valid = tmask & (p_t >= 0)

    # keys: one dot per plane into columns (r, g)
    krow = kc_base + tt * s_kct
    acc = tl.dot(_plane(krow, tmask, ii, klo, khi, 0, PW, K_BITS, K_FAST, DT), q0, input_precision=PREC)
    acc = tl.dot(_plane(krow, tmask, ii, klo, khi, 1, PW, K_BITS, K_FAST, DT), q1, acc, input_precision=PREC)
    acc = tl.dot(_plane(krow, tmask, ii, klo, khi, 2, PW, K_BITS, K_FAST, DT), q2, acc, input_precision=PREC)
    acc = tl.dot(_plane(krow, tmask, ii, klo, khi, 3, PW, K_BITS, K_FAST, DT), q3, acc, input_precision=PREC)

    # mean term into the slot-NG columns
    if ANGLE:  # [cos(kθ) | sin(kθ)] rows of the block offsets k (a small table, cached on chip)
        n0 = tl.max(tl.where(valid, p_t - (t - t0), 0), 0).to(tl.float32)
        c0, s0 = _cos_sin(n0 * freq, USE_LIBDEVICE)
        ca = coef_a * c0[:, None] + coef_b * s0[:, None]
        cb = coef_b * c0[:, None] - coef_a * s0[:, None]
        tab = tab_ptr + tl.arange(0, BLOCK_N)[:, None] * D + hh[None, :]
        acc = tl.dot(tl.load(tab), ca.to(DT), acc, input_precision=PREC)
        acc = tl.dot(tl.load(tab + H), cb.to(DT), acc, input_precision=PREC)
    else:
        cos_n, sin_n = _cos_sin(tl.maximum(p_t, 0).to(tl.float32)[:, None] * freq[None, :], USE_LIBDEVICE)
        acc = tl.dot(cos_n.to(DT), coef_a.to(DT), acc, input_precision=PREC)
        acc = tl.dot(sin_n.to(DT), coef_b.to(DT), acc, input_precision=PREC)

    # scores: Σ_g s_g (q'_g·c_g) + (z_g - KB s_g) Σq'_g + mean (empty slots' scales may hold NaN)
    sk = tl.where(valid[:, None], sk.to(tl.float32), 0.0)
    zk = tl.where(valid[:, None], zk.to(tl.float32), 0.0)
    wk = tl.where((gk == NG)[None, :], 1.0, sk)
    acc3 = tl.reshape(acc, (BLOCK_N, R, NGP))
    s = tl.sum(acc3 * wk[:, None, :] + (zk - KB * sk)[:, None, :] * qsum3[None, :, :], 2)  # [BLOCK_N, R]
    s = tl.where(valid[:, None] & rmask[None, :], _log2_logits(s, qk_scale, cap_scale, SOFTCAP), float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 0))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[None, :])
    l_i = l_i * alpha + tl.sum(p, 0)

    # values: weights p * s_g as rows (r, g), zeros into zacc
    sv = tl.where(valid[:, None], sv.to(tl.float32), 0.0)
    zv = tl.where(valid[:, None], zv.to(tl.float32), 0.0)
    zacc = zacc * alpha[:, None] + tl.sum(p[:, :, None] * (zv - VB * sv)[:, None, :], 0)
    w_t = tl.trans(tl.reshape(p[:, :, None] * sv[:, None, :], (BLOCK_N, QCV)).to(DT))
    alpha_c = tl.reshape(tl.broadcast_to(alpha[:, None], (R, NGVP)), (QCV,))[:, None]
    vrow = vc_base + tt * s_vct
    a0 = tl.dot(w_t, _plane(vrow, tmask, ii, vlo, vhi, 0, PW, V_BITS, V_FAST, DT), a0 * alpha_c, input_precision=PREC)
    a1 = tl.dot(w_t, _plane(vrow, tmask, ii, vlo, vhi, 1, PW, V_BITS, V_FAST, DT), a1 * alpha_c, input_precision=PREC)
    a2 = tl.dot(w_t, _plane(vrow, tmask, ii, vlo, vhi, 2, PW, V_BITS, V_FAST, DT), a2 * alpha_c, input_precision=PREC)
    a3 = tl.dot(w_t, _plane(vrow, tmask, ii, vlo, vhi, 3, PW, V_BITS, V_FAST, DT), a3 * alpha_c, input_precision=PREC)
    return m_new, l_i, a0, a1, a2, a3, zacc


@triton.jit
def _run_split(t_start, t_stop, state, consts, ptrs, ii, hh, rmask, gk, gv, ANGLE: tl.constexpr,
               PREFETCH: tl.constexpr, R: tl.constexpr, NG: tl.constexpr, NGP: tl.constexpr, NGV: tl.constexpr,
               NGVP: tl.constexpr, D: tl.constexpr, PW: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr,
               K_FAST: tl.constexpr, V_FAST: tl.constexpr, BLOCK_N: tl.constexpr, DT: tl.constexpr,
               PREC: tl.constexpr, USE_LIBDEVICE: tl.constexpr, SOFTCAP: tl.constexpr):
    """The slots ``[t_start, t_stop)``, block by block; ``PREFETCH``: each block's loads are issued one
    block ahead (while the previous block computes)."""
    nxt = _load_block(t_start, t_stop, ptrs, ii, gk, gv, NG, NGV, PW, K_BITS, V_BITS, K_FAST, V_FAST, BLOCK_N)
    for t0 in range(t_start, t_stop, BLOCK_N):
        if PREFETCH:
            cur = nxt
            nxt = _load_block(t0 + BLOCK_N, t_stop, ptrs, ii, gk, gv, NG, NGV, PW, K_BITS, V_BITS, K_FAST, V_FAST,
                              BLOCK_N)
        else:
            cur = _load_block(t0, t_stop, ptrs, ii, gk, gv, NG, NGV, PW, K_BITS, V_BITS, K_FAST, V_FAST, BLOCK_N)
        state = _block(t0, t_stop, cur, state, consts, ptrs, ii, hh, rmask, gk, ANGLE, R, NG, NGP, NGVP, D, PW,
                       K_BITS, V_BITS, K_FAST, V_FAST, BLOCK_N, DT, PREC, USE_LIBDEVICE, SOFTCAP)
    return state


@triton.jit
def _folded_kernel(
    q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, pos_ptr,
    rot_ptr, mean_ptr, freq_ptr, tab_ptr, fk_ptr, fv_ptr, fpos_ptr, o_ptr, lse_ptr,
    s_qb, s_qh, s_kcb, s_kch, s_kct, s_ksb, s_ksh, s_kst, s_vcb, s_vch, s_vct, s_vsb, s_vsh, s_vst,
    s_pb, s_fb, s_fh, s_ft, s_fpb,
    T, F, tokens_per_split, n_parts, n_q, qk_scale, cap_scale, rope_scaling,
    D: tl.constexpr, REP: tl.constexpr, R: tl.constexpr,
    NG: tl.constexpr, NGP: tl.constexpr, GK: tl.constexpr, NGV: tl.constexpr, NGVP: tl.constexpr, GV: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, K_FAST: tl.constexpr, V_FAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, HAS_FP: tl.constexpr, DIRECT: tl.constexpr,
    ANGLE: tl.constexpr, PREFETCH: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, QPREC: tl.constexpr,
    USE_LIBDEVICE: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """Grid ``(B, n_kv, n_parts)``. ``DIRECT`` (one part): the normalised output in ``o_ptr [B, n_q, d]``;
    else fp32 partial outputs ``o_ptr [B, n_q, n_parts, d]`` and log2-sum-exp ``lse_ptr [B, n_q, n_parts]``."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    split = tl.program_id(2)
    H: tl.constexpr = D // 2
    PW: tl.constexpr = D // 4
    QC: tl.constexpr = R * NGP
    QCV: tl.constexpr = R * NGVP

    ii = tl.arange(0, PW)
    kk = tl.arange(0, D)
    hh = tl.arange(0, H)
    rr = tl.arange(0, R)
    rmask = rr < REP
    col = tl.arange(0, QC)
    col_r = col // NGP
    col_g = col % NGP
    gk = tl.arange(0, NGP)
    gv = tl.arange(0, NGVP)

    # ---- per program: q' = q R (key dot operands), the mean-term coefficients A, B ----
    q_col = q_ptr + b * s_qb + (h * REP + col_r) * s_qh  # [QC]: column (r, g) reads query row r
    qc_mask = (col_r < REP)[None, :]
    qexp_t = tl.load(q_col[None, :] + kk[:, None], mask=qc_mask, other=0.0).to(tl.float32)  # [D, QC]
    rot_base = rot_ptr + h * D * D + ii[:, None] * D + kk[None, :]  # plane-ordered R^T rows
    q0 = _qstar(rot_base, ii, 0, qexp_t, col_g, GK, PW, D, DT, QPREC)
    q1 = _qstar(rot_base, ii, 1, qexp_t, col_g, GK, PW, D, DT, QPREC)
    q2 = _qstar(rot_base, ii, 2, qexp_t, col_g, GK, PW, D, DT, QPREC)
    q3 = _qstar(rot_base, ii, 3, qexp_t, col_g, GK, PW, D, DT, QPREC)
    qsum = (tl.sum(q0.to(tl.float32), 0) + tl.sum(q1.to(tl.float32), 0)
            + tl.sum(q2.to(tl.float32), 0) + tl.sum(q3.to(tl.float32), 0))  # [QC]: Σ_{c in g} q'_c (as rounded)
    qsum3 = tl.reshape(qsum, (R, NGP))
    q_lo = tl.load(q_col[None, :] + hh[:, None], mask=qc_mask, other=0.0).to(tl.float32)  # [H, QC]
    q_hi = tl.load(q_col[None, :] + H + hh[:, None], mask=qc_mask, other=0.0).to(tl.float32)
    mu_lo = tl.load(mean_ptr + h * D + hh)[:, None]
    mu_hi = tl.load(mean_ptr + h * D + H + hh)[:, None]
    slot = (col_g == NG)[None, :]  # the mean term's column of each query row
    coef_a = tl.where(slot, (q_lo * mu_lo + q_hi * mu_hi) * rope_scaling, 0.0)  # [H, QC]
    coef_b = tl.where(slot, (q_hi * mu_lo - q_lo * mu_hi) * rope_scaling, 0.0)
    freq = tl.load(freq_ptr + hh)

    m_i = tl.full((R,), -1.0e30, tl.float32)
    l_i = tl.zeros((R,), tl.float32)
    a0 = tl.zeros((QCV, PW), tl.float32)
    a1 = tl.zeros((QCV, PW), tl.float32)
    a2 = tl.zeros((QCV, PW), tl.float32)
    a3 = tl.zeros((QCV, PW), tl.float32)
    zacc = tl.zeros((R, NGVP), tl.float32)

    t_start = split * tokens_per_split
    t_stop = tl.minimum(T, t_start + tokens_per_split)
    pos_row = pos_ptr + b * s_pb
    kc_base = kc_ptr + b * s_kcb + h * s_kch
    ks_base = ks_ptr + b * s_ksb + h * s_ksh
    kz_base = kz_ptr + b * s_ksb + h * s_ksh
    vc_base = vc_ptr + b * s_vcb + h * s_vch
    vs_base = vs_ptr + b * s_vsb + h * s_vsh
    vz_base = vz_ptr + b * s_vsb + h * s_vsh
    state = (m_i, l_i, a0, a1, a2, a3, zacc)
    consts = (q0, q1, q2, q3, qsum3, coef_a, coef_b, tab_ptr, freq, qk_scale, cap_scale)
    ptrs = (pos_row, kc_base, ks_base, kz_base, vc_base, vs_base, vz_base, s_kct, s_kst, s_vct, s_vst)
    exact = True
    if ANGLE:  # angle addition when every block of the split holds consecutive valid positions
        n_gap = 0
        for t0 in range(t_start, t_stop, BLOCK_N):
            t = t0 + tl.arange(0, BLOCK_N)
            p_t = tl.load(pos_row + t.to(tl.int64), mask=t < t_stop, other=-1)
            off = tl.where(p_t >= 0, p_t - (t - t0), -1)
            n_gap += (tl.max(off, 0) > tl.min(tl.where(p_t >= 0, off, 2147483647), 0)).to(tl.int32)
        exact = n_gap > 0
    if exact:
        state = _run_split(t_start, t_stop, state, consts, ptrs, ii, hh, rmask, gk, gv, False, PREFETCH, R, NG, NGP,
                           NGV, NGVP, D, PW, K_BITS, V_BITS, K_FAST, V_FAST, BLOCK_N, DT, PREC, USE_LIBDEVICE,
                           SOFTCAP)
    else:
        state = _run_split(t_start, t_stop, state, consts, ptrs, ii, hh, rmask, gk, gv, True, PREFETCH, R, NG, NGP,
                           NGV, NGVP, D, PW, K_BITS, V_BITS, K_FAST, V_FAST, BLOCK_N, DT, PREC, USE_LIBDEVICE,
                           SOFTCAP)
    m_i, l_i, a0, a1, a2, a3, zacc = state

    if HAS_FP:  # the last part also attends to the full-precision segment (post-RoPE keys)
        f_stop = tl.where(split == n_parts - 1, F, 0)
        qd_t = qexp_t.to(DT)
        fk_base = fk_ptr + b * s_fb + h * s_fh
        fv_base = fv_ptr + b * s_fb + h * s_fh
        first = (gk == 0)[None, None, :]
        for f0 in range(0, f_stop, BLOCK_F):
            f = f0 + tl.arange(0, BLOCK_F)
            fmask = f < f_stop
            ff = f.to(tl.int64)
            fvalid = fmask & (tl.load(fpos_ptr + b * s_fpb + ff, mask=fmask, other=-1) >= 0)
            kf = tl.load(fk_base + ff[:, None] * s_ft + kk[None, :], mask=fvalid[:, None], other=0.0).to(DT)
            sf3 = tl.reshape(tl.dot(kf, qd_t, input_precision=PREC), (BLOCK_F, R, NGP))
            s = tl.sum(tl.where(first, sf3, 0.0), 2)
            s = tl.where(fvalid[:, None] & rmask[None, :], _log2_logits(s, qk_scale, cap_scale, SOFTCAP), float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 0))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[None, :])
            l_i = l_i * alpha + tl.sum(p, 0)
            m_i = m_new
            zacc = zacc * alpha[:, None]
            w_t = tl.trans(tl.reshape(tl.broadcast_to(p[:, :, None], (BLOCK_F, R, NGVP)), (BLOCK_F, QCV)).to(DT))
            alpha_c = tl.reshape(tl.broadcast_to(alpha[:, None], (R, NGVP)), (QCV,))[:, None]
            vf = tl.load(fv_base + ff[:, None] * s_ft + kk[None, :], mask=fvalid[:, None], other=0.0).to(DT)
            v_even, v_odd = tl.split(tl.reshape(vf, (BLOCK_F, PW, 2, 2)))  # channel 4i + 2u + w: split w
            v0, v2 = tl.split(v_even)  # then u
            v1, v3 = tl.split(v_odd)
            a0 = tl.dot(w_t, v0, a0 * alpha_c, input_precision=PREC)
            a1 = tl.dot(w_t, v1, a1 * alpha_c, input_precision=PREC)
            a2 = tl.dot(w_t, v2, a2 * alpha_c, input_precision=PREC)
            a3 = tl.dot(w_t, v3, a3 * alpha_c, input_precision=PREC)

    has = l_i > 0.0
    inv_l = 1.0 / tl.where(has, l_i, 1.0)
    if DIRECT:
        dst = o_ptr + ((b * n_q + h * REP + rr) * D)[:, None]
    else:
        row = (b * n_q + h * REP + rr) * n_parts + split
        dst = o_ptr + (row * D)[:, None]
        tl.store(lse_ptr + row, tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf")), mask=rmask)
    _store_plane(a0, zacc, inv_l, gv, ii, 0, dst, rmask, R, NGVP, PW, GV)
    _store_plane(a1, zacc, inv_l, gv, ii, 1, dst, rmask, R, NGVP, PW, GV)
    _store_plane(a2, zacc, inv_l, gv, ii, 2, dst, rmask, R, NGVP, PW, GV)
    _store_plane(a3, zacc, inv_l, gv, ii, 3, dst, rmask, R, NGVP, PW, GV)


def _last_contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _same_strides(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two tensors the kernel addresses with one stride set (copies only when they differ)."""
    a, b = _last_contig(a), _last_contig(b)
    if a.stride() != b.stride():
        a, b = a.contiguous(), b.contiguous()
    return a, b


def default_splits(programs: int, T: int, block_n: int, device: torch.device, waves: int) -> int:
    """Context splits so that ``programs * splits`` fills about ``waves`` programs per SM (at least one block each)."""
    n_blocks = triton.cdiv(T, block_n)
    if n_blocks == 0:
        return 0
    sms = sm_count(device) if device.type == "cuda" else 4
    splits = max(1, min(n_blocks, triton.cdiv(waves * sms, programs)))
    return triton.cdiv(n_blocks, triton.cdiv(n_blocks, splits))  # no empty split


def decode_folded(
    q: torch.Tensor,
    kv: PackedKV,
    params: FoldedParams,
    *,
    n_tokens: int | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    mean_term: MeanTerm = "auto",
    unpack: Literal["auto", "convert"] = "auto",
    prefetch: bool | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Attention of one new query token per sequence over a folded packed cache (module docstring).

    Args:
        q: ``[B, n_q, d]`` post-RoPE queries, fp16/bf16/fp32; ``d`` a power of two >= 64 for the kernel.
        kv: the layer's :class:`PackedKV`.
        params: the layer's :class:`FoldedParams` (tensors on ``q``'s device or movable there).
        n_tokens: slots ``[0, n_tokens)`` of the quantized store are read (None: all ``cap``;
            slots with ``pos == -1`` are skipped either way).
        num_splits: context splits of the quantized slots (None: about ``waves`` programs per SM,
            ``FOLDED_DEFAULTS``). With one split the fp segment joins it and the output is written
            by the one launch; otherwise the fp segment is its own part and a merge kernel follows.
        block_n: slots per inner step (power of two >= 16); num_warps, num_stages: launch settings.
        mean_term: ``"angle"`` (angle addition per block of consecutive positions, exact per slot
            elsewhere), ``"exact"`` (cos/sin per slot), ``"auto"``: angle for 16-bit queries,
            exact for fp32 queries.
        unpack: ``"auto"``: 2-bit codes of fp16 calls become fp16 by byte permutes (inline PTX,
            CUDA only), other codes by integer-to-float conversion; ``"convert"``: always the latter.
        prefetch: issue each block's loads one block ahead (None: ``FOLDED_DEFAULTS``).
        backend: ``"auto"``, ``"triton"`` or ``"reference"`` (see ``_common``).

    Returns:
        ``[B, n_q, d]`` in ``q.dtype`` (the rotated value space).
    """
    if not resolve_backend(backend, q):
        return decode_folded_ref(q, kv, params, n_tokens=n_tokens)
    dm = _dims(q, kv, params, n_tokens)
    B, n_q, n_kv, d, rep, T, F = (dm[k] for k in ("B", "n_q", "n_kv", "d", "rep", "T", "F"))
    if d & (d - 1) or d < 64:
        raise ValueError(f"the Triton kernel needs a power-of-two head dim >= 64, got {d}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"queries must be fp16/bf16/fp32, got {q.dtype}")
    if unpack not in ("auto", "convert"):
        raise ValueError(f"unpack must be 'auto' or 'convert', got {unpack!r}")
    if mean_term not in ("auto", "angle", "exact"):
        raise ValueError(f"mean_term must be 'auto', 'angle' or 'exact', got {mean_term!r}")
    block_n = FOLDED_DEFAULTS["block_n"] if block_n is None else block_n
    num_warps = FOLDED_DEFAULTS["num_warps"] if num_warps is None else num_warps
    num_stages = FOLDED_DEFAULTS["num_stages"] if num_stages is None else num_stages
    if block_n & (block_n - 1) or block_n < 16:
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    dev = q.device
    has_fp = F > 0
    if num_splits is None:
        num_splits = default_splits(B * n_kv, T, block_n, dev, FOLDED_DEFAULTS["waves"])
    num_splits = min(max(num_splits, 1), triton.cdiv(T, block_n)) if T > 0 else 0
    tokens_per_split = triton.cdiv(triton.cdiv(T, block_n), num_splits) * block_n if num_splits else block_n
    n_parts = max(num_splits, 1) if num_splits <= 1 else num_splits + int(has_fp)
    direct = n_parts == 1

    interp = triton_interpreting()
    fp16 = q.dtype == torch.float16
    prmt = fp16 and not interp and unpack == "auto"  # inline PTX: not in the interpreter
    dt = tl.float16 if fp16 else tl.float32
    R = max(2, next_pow2(rep))
    ng, ngv = d // params.g_k, d // params.g_v
    ngp = max(next_pow2(ng + 1), 16 // R)  # key groups + the mean slot; R * ngp >= 16 (dot width)
    ngvp = max(next_pow2(ngv), 16 // R)
    f32 = dict(device=dev, dtype=torch.float32)
    rot, mean, freq = params.kernel_operands(dev)
    angle = mean_term == "angle" or (mean_term == "auto" and q.dtype != torch.float32)
    tab = params.angle_table(dev, block_n, torch.float16 if fp16 else torch.float32) if angle else freq
    prefetch = bool(FOLDED_DEFAULTS["prefetch"]) if prefetch is None else prefetch
    qc = _last_contig(q)
    kc, vc, pos = _last_contig(kv.k_codes), _last_contig(kv.v_codes), _last_contig(kv.pos)
    ks, kz = _same_strides(kv.k_scale, kv.k_zero)
    vs, vz = _same_strides(kv.v_scale, kv.v_zero)
    if has_fp:
        fk, fv = _same_strides(kv.fp_k, kv.fp_v)
        fpos = _last_contig(kv.fp_pos)
    else:
        fk = fv = qc.new_empty(1, 1, 1, d)
        fpos = pos.new_empty(1, 1)
    if direct:
        o_part = torch.empty(B, n_q, d, device=dev, dtype=q.dtype)
        lse_part = o_part
    else:
        o_part = torch.empty(B, n_q, n_parts, d, **f32)
        lse_part = torch.empty(B, n_q, n_parts, **f32)
    if params.softcap is None:
        qk_scale, cap_scale = params.sm_scale * _LOG2E, 0.0
    else:
        qk_scale, cap_scale = params.sm_scale / params.softcap, params.softcap * _LOG2E
    with device_guard(qc):  # Triton launches on the current device
        _folded_kernel[(B, n_kv, n_parts)](
            qc, kc, ks, kz, vc, vs, vz, pos, rot, mean, freq, tab, fk, fv, fpos, o_part, lse_part,
            qc.stride(0), qc.stride(1), *kc.stride()[:3], *ks.stride()[:3], *vc.stride()[:3], *vs.stride()[:3],
            pos.stride(0), *fk.stride()[:3], fpos.stride(0),
            T, F, tokens_per_split, n_parts, n_q, qk_scale, cap_scale, float(params.attention_scaling),
            D=d, REP=rep, R=R, NG=ng, NGP=ngp, GK=params.g_k, NGV=ngv, NGVP=ngvp, GV=params.g_v,
            K_BITS=params.bits, V_BITS=params.value_bits,
            K_FAST=params.bits == 2 and prmt, V_FAST=params.value_bits == 2 and prmt,
            BLOCK_N=block_n, BLOCK_F=64, HAS_FP=has_fp, DIRECT=direct, ANGLE=angle, PREFETCH=prefetch,
            DT=dt, PREC="ieee" if q.dtype == torch.float32 or not fp16 else "tf32",
            QPREC="ieee" if q.dtype == torch.float32 or interp else "tf32x3",
            USE_LIBDEVICE=not interp, SOFTCAP=params.softcap is not None, num_warps=num_warps, num_stages=num_stages,
        )  # fmt: skip
    return o_part if direct else _merge(o_part, lse_part, q.dtype)
