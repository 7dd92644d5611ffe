"""Fused encode of KV rows: centre, rotate, group-quantize and bit-pack in one kernel.

A *row* is one token's channels of one block: a head group of keys (``W = G*d`` channels,
rotated) or one value head (``W = d`` channels, not rotated). Input ``x [..., n_blocks, W]``.

Per row (semantics of :func:`rkv_convert.quant.quantizer.quantize`, bit for bit):

1. ``y = x - mean[block]`` when ``mean`` is given (``mean fp32 [n_blocks*W]``, i.e. the
   layer's ``[C]`` key mean, ``C = n_kv*d``);
2. ``y = y @ R`` when ``rotation`` is given (``R fp32 [W, W]`` orthonormal, same for every block);
3. groups: channel ``c`` of block ``b`` belongs to group ``gid[b, c]`` (``gid int32
   [n_blocks, W]``, each group holding exactly ``group_size`` channels; it encodes the
   calibrated permutation: group ``j`` = channels ``perm[j*g:(j+1)*g]``). Without ``gid`` the
   groups are consecutive channels (values);
4. ``hi = clip*max``, ``lo = clip*min`` over the group, ``scale = fp16(max((hi-lo)/L, 2^-14))``,
   ``zero = fp16(lo)``, ``code = clamp(round_half_even((y - zero) * (1/scale)), 0, L)``,
   ``L = 2**bits - 1``, with IEEE division for the per-group ``(hi-lo)/L`` and ``1/scale``;
5. codes are packed in *rotated channel order* (never permuted) with
   :func:`rkv_convert.quant.packing.pack_codes` layouts (``U2_LSB4``, ``U3_PLANES``, ``U4_LSB2``).

Outputs: ``codes uint8 [..., n_blocks, W*bits/8]``, ``scale fp16 [..., n_blocks, W/g]``,
``zero fp16 [..., n_blocks, W/g]``: exactly the runtime cache's storage rows
(``k_codes/k_scale/k_zero`` with ``n_blocks = n_hg``; ``v_codes/v_scale/v_zero`` with
``n_blocks = n_kv``), before the caller moves the token axis next to the block axis.

Dispatch (see :mod:`rkv_convert.kernels._common`): ``backend="auto"`` runs the kernel on CUDA
tensors or under ``TRITON_INTERPRET=1``, else :func:`quantize_pack_ref`.

Exactness: without a rotation the kernel's codes, scales and zeros equal the reference's
(``torch.equal``; compare against the reference computed on CPU: CUDA torch divides by the
level count through a reciprocal). With a rotation, the fp32 matmul may round differently
from torch's, which moves a code by one step for values sitting on a rounding boundary.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from rkv_convert.quant.packing import pack_codes, packed_width
from rkv_convert.quant.quantizer import SCALE_FLOOR, GroupMeta, GroupRanges, levels, quantize

from ._common import Backend, cdiv, device_guard, next_pow2, resolve_backend, triton_interpreting

__all__ = ["quantize_pack", "quantize_pack_ref", "group_ids_from_perm", "perm_from_group_ids"]

def group_ids_from_perm(perm: torch.Tensor, block_width: int, group_size: int) -> torch.Tensor:
    """Per-channel group index of each block from a block-diagonal permutation.

    Args:
        perm: int64 ``[n_blocks*W]`` global permutation (``KeyCodec.perm``), each block of
            ``W = block_width`` channels permuted within itself.
        block_width: ``W`` (``G*d`` for keys).
        group_size: channels per quantization group, dividing ``W``.

    Returns:
        int32 ``[n_blocks, W]``: ``gid[b, c] = j`` for ``c`` in ``perm_b[j*g:(j+1)*g]``.
    """
    if perm.numel() % block_width or block_width % group_size:
        raise ValueError(f"perm of {perm.numel()} channels, block {block_width}, group {group_size} do not tile")
    n_blocks = perm.numel() // block_width
    local = perm.reshape(n_blocks, block_width) - torch.arange(n_blocks, device=perm.device)[:, None] * block_width
    if local.min() < 0 or local.max() >= block_width:
        raise ValueError("perm moves channels across blocks; it must be block-diagonal")
    groups = (torch.arange(block_width, device=perm.device) // group_size).expand(n_blocks, -1)
    gid = torch.empty(n_blocks, block_width, dtype=torch.int32, device=perm.device)
    gid.scatter_(1, local, groups.to(torch.int32))
    return gid


def perm_from_group_ids(gid: torch.Tensor, group_size: int) -> torch.Tensor:
    """A permutation (int64 ``[W]``) realising one block's ``gid int32 [W]`` (stable order)."""
    counts = torch.bincount(gid.long(), minlength=gid.numel() // group_size)
    if counts.numel() != gid.numel() // group_size or not bool((counts == group_size).all()):
        raise ValueError(f"every group must hold exactly {group_size} channels, got counts {counts.tolist()}")
    return torch.argsort(gid.long(), stable=True)


def _check_args(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    clip: float,
    rotation: torch.Tensor | None,
    mean: torch.Tensor | None,
    gid: torch.Tensor | None,
) -> tuple[int, int]:
    if x.dim() < 2:
        raise ValueError(f"x must be [..., n_blocks, W], got shape {tuple(x.shape)}")
    n_blocks, width = x.shape[-2:]
    if bits not in (2, 3, 4):
        raise ValueError(f"bits must be 2, 3 or 4, got {bits}")
    packed_width(width, bits)
    if group_size <= 0 or width % group_size:
        raise ValueError(f"group size {group_size} must divide the row width {width}")
    if not 0.0 < clip <= 1.0:
        raise ValueError(f"clip ratio must lie in (0, 1], got {clip}")
    if rotation is not None and tuple(rotation.shape) != (width, width):
        raise ValueError(f"rotation must be [{width}, {width}], got {tuple(rotation.shape)}")
    if mean is not None and mean.numel() != n_blocks * width:
        raise ValueError(f"mean must hold n_blocks*W = {n_blocks * width} values, got {mean.numel()}")
    if gid is not None and tuple(gid.shape) != (n_blocks, width):
        raise ValueError(f"gid must be [{n_blocks}, {width}], got {tuple(gid.shape)}")
    return n_blocks, width


def quantize_pack_ref(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    clip: float = 1.0,
    *,
    rotation: torch.Tensor | None = None,
    mean: torch.Tensor | None = None,
    gid: torch.Tensor | None = None,
    meta_base: float | None = None,
    ranges: GroupRanges = GroupRanges.MINMAX,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure-torch reference of :func:`quantize_pack`, built on ``quantize`` and ``pack_codes``
    (``meta_base``: 8-bit group metadata, and ``ranges``: searched group ranges, which only the folded writes of
    :mod:`.encode_folded` produce).

    Args:
        x: ``[..., n_blocks, W]`` fp16/bf16/fp32 rows.
        bits: 2, 3 or 4.
        group_size: channels per group ``g`` (divides ``W``).
        clip: clip ratio in (0, 1].
        rotation: fp32 ``[W, W]`` or None.
        mean: fp32 ``[n_blocks*W]`` or None.
        gid: int32 ``[n_blocks, W]`` group of each channel, or None for consecutive groups.

    Returns:
        ``codes uint8 [..., n_blocks, W*bits/8]``, ``scale fp16 [..., n_blocks, W/g]``,
        ``zero fp16 [..., n_blocks, W/g]``.
    """
    n_blocks, width = _check_args(x, bits, group_size, clip, rotation, mean, gid)
    if x.numel() == 0:  # quantize() cannot reshape an empty tensor with -1
        lead = (*x.shape[:-1],)
        s_dt, z_dt = (GroupMeta.FP16 if meta_base is None else GroupMeta.LOG8).dtypes
        return (x.new_empty(*lead, width * bits // 8, dtype=torch.uint8),
                x.new_empty(*lead, width // group_size, dtype=s_dt),
                x.new_empty(*lead, width // group_size, dtype=z_dt))
    y = x.float()
    if mean is not None:
        y = y - mean.to(device=x.device, dtype=torch.float32).reshape(n_blocks, width)
    if rotation is not None:
        y = y @ rotation.to(device=x.device, dtype=torch.float32)
    if gid is None:
        q = quantize(y, bits, group_size, clip, meta_base=meta_base, ranges=ranges)
        return pack_codes(q.codes, bits), q.scale, q.zero
    if meta_base is not None or GroupRanges(ranges) is not GroupRanges.MINMAX:
        raise ValueError("8-bit group metadata and searched ranges are written for consecutive groups only (the folded layout)")
    codes, scales, zeros = [], [], []
    for b in range(n_blocks):
        q = quantize(y[..., b, :], bits, group_size, clip, perm_from_group_ids(gid[b].to(x.device), group_size))
        codes.append(pack_codes(q.codes, bits))
        scales.append(q.scale)
        zeros.append(q.zero)
    return torch.stack(codes, -2), torch.stack(scales, -2), torch.stack(zeros, -2)


@triton.jit
def _load_rows(
    x_ptr, rot_ptr, mean_ptr, row_off, rmask, blk, oc,
    W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_ROT: tl.constexpr, HAS_MEAN: tl.constexpr,
):
    """Columns ``[oc*BLOCK_C, (oc+1)*BLOCK_C)`` of ``(x - mean) @ R`` for BLOCK_R rows, fp32."""
    cols = tl.arange(0, BLOCK_C)
    if HAS_ROT:
        y = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        for ic in range(0, W // BLOCK_C):
            icols = ic * BLOCK_C + cols
            xin = tl.load(x_ptr + row_off[:, None] + icols[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
            if HAS_MEAN:
                xin = xin - tl.load(mean_ptr + blk * W + icols)[None, :]
            r = tl.load(rot_ptr + icols[:, None] * W + (oc * BLOCK_C + cols)[None, :])
            y = tl.dot(xin, r, y, input_precision="ieee")
    else:
        ocols = oc * BLOCK_C + cols
        y = tl.load(x_ptr + row_off[:, None] + ocols[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
        if HAS_MEAN:
            y = y - tl.load(mean_ptr + blk * W + ocols)[None, :]
    return y


@triton.jit
def _clipped_scale(mn, mx, lo_frac, hi_frac, scale_floor, LEVELS: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """fp32 ``(hi, lo, scale)`` of groups with minimum ``mn`` and maximum ``mx``: ``hi = hi_frac*max``,
    ``lo = lo_frac*min``, ``scale = max((hi - lo) / LEVELS, scale_floor)`` (module docstring, step 4, before the
    fp16 rounding; both fractions are the clip there, a searched range's own fractions in :mod:`.encode_folded`)."""
    if USE_LIBDEVICE:  # explicit IEEE ops: the compiler must not fuse clip*max - clip*min into an FMA
        hi = libdevice.mul_rn(mx, hi_frac)
        lo = libdevice.mul_rn(mn, lo_frac)
        width = libdevice.sub_rn(hi, lo)
    else:  # the interpreter (numpy) rounds every op
        hi = mx * hi_frac
        lo = mn * lo_frac
        width = hi - lo
    return hi, lo, tl.maximum(tl.math.div_rn(width, LEVELS * 1.0), scale_floor)


@triton.jit
def _scale_zero(mn, mx, lo_frac, hi_frac, scale_floor, LEVELS: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """fp16 ``(scale, zero)`` of groups with minimum ``mn`` and maximum ``mx`` (module docstring, step 4)."""
    _, lo, scale = _clipped_scale(mn, mx, lo_frac, hi_frac, scale_floor, LEVELS, USE_LIBDEVICE)
    return scale.to(tl.float16, fp_downcast_rounding="rtne"), lo.to(tl.float16, fp_downcast_rounding="rtne")


@triton.jit
def _round_even(v, USE_LIBDEVICE: tl.constexpr):
    """fp32 round half to even of ``|v| < 2**22`` (``torch.round``'s rule)."""
    if USE_LIBDEVICE:
        return libdevice.rint(v)
    return (v + 12582912.0) - 12582912.0  # 1.5 * 2**23: the interpreter (numpy) rounds every op


@triton.jit
def _meta8(mn, mx, lo_frac, hi_frac, scale_floor, base, LEVELS: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """8-bit group metadata of groups with minimum ``mn`` and maximum ``mx`` (range ``[lo_frac*min, hi_frac*max]``):
    ``(e uint8, z int8, scale, zero)``, the last two decoded in fp32 (``quant.quantizer.encode_group_meta`` and
    ``group_scale_zero``, op for op)."""
    hi, lo, scale = _clipped_scale(mn, mx, lo_frac, hi_frac, scale_floor, LEVELS, USE_LIBDEVICE)
    if USE_LIBDEVICE:  # explicit IEEE ops: no FMA contraction, so the reference's roundings are reproduced
        centre = libdevice.mul_rn(libdevice.add_rn(hi, lo), 0.5)
        l2 = libdevice.log2(tl.math.div_rn(scale, base))
    else:
        centre = (hi + lo) * 0.5
        l2 = tl.log2(tl.math.div_rn(scale, base))
    e = _round_even(tl.minimum(tl.maximum(l2 * 16.0, 0.0), 255.0), USE_LIBDEVICE)
    if USE_LIBDEVICE:
        s8 = base * libdevice.exp2(e * 0.0625)
        half_grid = libdevice.mul_rn(LEVELS * 0.5, s8)
        z = _round_even(tl.minimum(tl.maximum(tl.math.div_rn(4.0 * libdevice.sub_rn(centre, half_grid), s8), -128.0),
                                   127.0), USE_LIBDEVICE)  # fmt: skip
    else:
        s8 = base * tl.exp2(e * 0.0625)
        z = _round_even(tl.minimum(tl.maximum(tl.math.div_rn(4.0 * (centre - LEVELS * 0.5 * s8), s8), -128.0), 127.0),
                        USE_LIBDEVICE)  # fmt: skip
    return e.to(tl.uint8), z.to(tl.int8), s8, s8 * z * 0.25


@triton.jit
def _codes(y, inv_scale, zero, LEVELS: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """int32 codes of fp32 ``y`` with its channels' fp32 ``1/scale`` and ``zero`` (round half to even)."""
    v = (y - zero) * inv_scale
    if USE_LIBDEVICE:  # one F2I.U32.RN (torch.round's rule; a negative value saturates to 0), then the top clamp
        return tl.minimum(libdevice.float2uint_rn(v), LEVELS).to(tl.int32)
    v = tl.minimum(tl.maximum(v, 0.0), LEVELS * 1.0)
    # fp32 (v + 2**23) - 2**23 rounds half to even for 0 <= v < 2**23 (the interpreter: numpy rounds every op)
    return ((v + 8388608.0) - 8388608.0).to(tl.int32)


@triton.jit
def _reciprocal(scale):
    """IEEE ``1/scale`` of fp32 ``scale`` (per group, as the reference's ``1.0 / scale``)."""
    return tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)


@triton.jit
def _store_packed(codes_ptr, c_off, rmask, codes, col0, R: tl.constexpr, C: tl.constexpr, W: tl.constexpr,
                  BITS: tl.constexpr):
    """Pack ``codes int32 [R, C]`` (channels ``col0 .. col0+C`` of ``W``-channel rows) into the rows'
    bytes at ``codes_ptr + c_off [R]`` (``pack_codes`` layouts)."""
    if BITS == 4:
        c2 = tl.reshape(codes, (R, C // 2, 2))
        packed = tl.sum(c2 << (tl.arange(0, 2) * 4)[None, None, :], axis=2)
        bcols = col0 // 2 + tl.arange(0, C // 2)
        tl.store(codes_ptr + c_off[:, None] + bcols[None, :], packed.to(tl.uint8), mask=rmask[:, None])
    else:
        c4 = tl.reshape(codes & 3, (R, C // 4, 4))
        packed = tl.sum(c4 << (tl.arange(0, 4) * 2)[None, None, :], axis=2)
        bcols = col0 // 4 + tl.arange(0, C // 4)
        tl.store(codes_ptr + c_off[:, None] + bcols[None, :], packed.to(tl.uint8), mask=rmask[:, None])
        if BITS == 3:
            high = tl.reshape(codes >> 2, (R, C // 8, 8))
            packed_hi = tl.sum(high << tl.arange(0, 8)[None, None, :], axis=2)
            hcols = W // 4 + col0 // 8 + tl.arange(0, C // 8)
            tl.store(codes_ptr + c_off[:, None] + hcols[None, :], packed_hi.to(tl.uint8), mask=rmask[:, None])


@triton.jit(do_not_specialize=["M", "n_blocks"])  # lengths: one compile for all
def _quantize_pack_kernel(
    x_ptr, rot_ptr, mean_ptr, gid_ptr, codes_ptr, scale_ptr, zero_ptr,
    M, n_blocks, clip, scale_floor,
    W: tl.constexpr, BITS: tl.constexpr, LEVELS: tl.constexpr, GS: tl.constexpr, NG: tl.constexpr, NG_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_ROT: tl.constexpr, HAS_MEAN: tl.constexpr, HAS_GID: tl.constexpr, USE_LIBDEVICE: tl.constexpr,
):
    """Grid ``(n_blocks, cdiv(M, BLOCK_R))``; x viewed as contiguous ``[M, n_blocks, W]``."""
    blk = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < M
    row = rows.to(tl.int64) * n_blocks + blk
    x_off = row * W
    cols = tl.arange(0, BLOCK_C)
    grp = tl.arange(0, NG_PAD)

    # Pass 1: per-group min/max of the transformed row, groups selected by gid.
    mx = tl.full((BLOCK_R, NG_PAD), float("-inf"), tl.float32)
    mn = tl.full((BLOCK_R, NG_PAD), float("inf"), tl.float32)
    for oc in range(0, W // BLOCK_C):
        y = _load_rows(x_ptr, rot_ptr, mean_ptr, x_off, rmask, blk, oc, W, BLOCK_R, BLOCK_C, HAS_ROT, HAS_MEAN)
        if HAS_GID:
            g = tl.load(gid_ptr + blk * W + oc * BLOCK_C + cols)
        else:
            g = (oc * BLOCK_C + cols) // GS
        sel = (g[:, None] == grp[None, :])[None, :, :]  # [1, BLOCK_C, NG_PAD]
        y3 = y[:, :, None]
        mx = tl.maximum(mx, tl.max(tl.where(sel, y3, float("-inf")), axis=1))
        mn = tl.minimum(mn, tl.min(tl.where(sel, y3, float("inf")), axis=1))
    scale16, zero16 = _scale_zero(mn, mx, clip, clip, scale_floor, LEVELS, USE_LIBDEVICE)
    sz_off = row[:, None] * NG + grp[None, :]
    sz_mask = rmask[:, None] & (grp[None, :] < NG)
    tl.store(scale_ptr + sz_off, scale16, mask=sz_mask)
    tl.store(zero_ptr + sz_off, zero16, mask=sz_mask)
    inv_scale = _reciprocal(scale16.to(tl.float32))
    zero = zero16.to(tl.float32)

    # Pass 2: codes from the fp16-rounded scale and zero, packed in rotated channel order.
    c_off = row * (W * BITS // 8)
    for oc in range(0, W // BLOCK_C):
        y = _load_rows(x_ptr, rot_ptr, mean_ptr, x_off, rmask, blk, oc, W, BLOCK_R, BLOCK_C, HAS_ROT, HAS_MEAN)
        if HAS_GID:
            g = tl.load(gid_ptr + blk * W + oc * BLOCK_C + cols)
        else:
            g = (oc * BLOCK_C + cols) // GS
        sel = (g[:, None] == grp[None, :])[None, :, :]
        s_c = tl.sum(tl.where(sel, inv_scale[:, None, :], 0.0), axis=2)
        z_c = tl.sum(tl.where(sel, zero[:, None, :], 0.0), axis=2)
        codes = _codes(y, s_c, z_c, LEVELS, USE_LIBDEVICE)
        _store_packed(codes_ptr, c_off, rmask, codes, oc * BLOCK_C, BLOCK_R, BLOCK_C, W, BITS)


def _block_c(width: int) -> int:
    for bc in (64, 32, 16):
        if width % bc == 0:
            return bc
    raise ValueError(f"the Triton encoder needs a row width divisible by 16, got {width}")


def quantize_pack(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    clip: float = 1.0,
    *,
    rotation: torch.Tensor | None = None,
    mean: torch.Tensor | None = None,
    gid: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centre, rotate, quantize and pack rows (see module docstring).

    Args:
        x: ``[..., n_blocks, W]`` fp16/bf16/fp32 rows (keys: ``W = G*d`` pre-RoPE channels of
            a head group; values: ``W = d`` channels of a head).
        bits: 2, 3 or 4.
        group_size: channels per quantization group (divides ``W``).
        clip: clip ratio in (0, 1].
        rotation: fp32 ``[W, W]`` orthonormal, applied as ``y = x @ R``; None for values.
        mean: fp32 ``[n_blocks*W]`` subtracted before the rotation; None for values.
        gid: int32 ``[n_blocks, W]`` group of each (rotated) channel; None: consecutive groups.
        backend: ``"auto"``, ``"triton"`` or ``"reference"`` (see ``_common``).

    Returns:
        ``codes uint8 [..., n_blocks, W*bits/8]``, ``scale fp16 [..., n_blocks, W/g]``,
        ``zero fp16 [..., n_blocks, W/g]``.
    """
    n_blocks, width = _check_args(x, bits, group_size, clip, rotation, mean, gid)
    if not resolve_backend(backend, x):
        return quantize_pack_ref(x, bits, group_size, clip, rotation=rotation, mean=mean, gid=gid)
    lead = x.shape[:-2]
    xc = x.contiguous()
    m = xc.numel() // (n_blocks * width)
    n_groups = width // group_size
    dev = x.device
    codes = torch.empty(*lead, n_blocks, width * bits // 8, dtype=torch.uint8, device=dev)
    scale = torch.empty(*lead, n_blocks, n_groups, dtype=torch.float16, device=dev)
    zero = torch.empty_like(scale)
    if m == 0:
        return codes, scale, zero
    rot = rotation.to(device=dev, dtype=torch.float32).contiguous() if rotation is not None else xc
    mu = mean.to(device=dev, dtype=torch.float32).contiguous() if mean is not None else xc
    g = gid.to(device=dev, dtype=torch.int32).contiguous() if gid is not None else xc
    block_r = 16
    grid = (n_blocks, cdiv(m, block_r))
    with device_guard(x):  # Triton launches on the current device
        _quantize_pack_kernel[grid](
            xc, rot, mu, g, codes, scale, zero,
            m, n_blocks, float(clip), SCALE_FLOOR,
            W=width, BITS=bits, LEVELS=levels(bits), GS=group_size, NG=n_groups, NG_PAD=max(next_pow2(n_groups), 2),
            BLOCK_R=block_r, BLOCK_C=_block_c(width),
            HAS_ROT=rotation is not None, HAS_MEAN=mean is not None, HAS_GID=gid is not None,
            USE_LIBDEVICE=not triton_interpreting(),
        )
    return codes, scale, zero
