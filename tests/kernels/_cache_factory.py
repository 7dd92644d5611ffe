"""Random but realistic packed caches for the kernel tests (shared by the test modules)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rkv_convert.kernels.quantize_pack import group_ids_from_perm, quantize_pack_ref
from rkv_convert.quant.hadamard import hadamard_matrix


@dataclass
class Case:
    q: torch.Tensor
    cache: tuple[torch.Tensor, ...]  # k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, pos
    kw: dict = field(default_factory=dict)


def realistic_keys(*shape: int, channels: int, outliers: int = 3) -> torch.Tensor:
    """Pre-RoPE-like keys ``[..., channels]``: a shared per-channel offset, a few outlier channels."""
    offset = torch.randn(channels) * 2.0
    scale = torch.ones(channels)
    scale[torch.randperm(channels)[:outliers]] = 8.0
    return torch.randn(*shape, channels) * scale + offset


def make_case(
    *,
    B: int = 2,
    n_kv: int = 2,
    rep: int = 1,
    d: int = 64,
    G: int = 1,
    T: int = 40,
    F: int = 0,
    k_bits: int = 2,
    v_bits: int = 2,
    g_k: int = 64,
    g_v: int = 32,
    dtype: torch.dtype = torch.float32,
    clip: float = 0.9,
    left_pad: bool = True,
    nan_holes: bool = False,
    permute: bool = True,
) -> Case:
    Gd, n_hg, C = G * d, n_kv // G, n_kv * d
    rotation = hadamard_matrix(Gd)
    keys = realistic_keys(B, T + F, channels=C)
    k, fp_k_flat = keys[:, :T], keys[:, T:]
    k_mean = keys.reshape(-1, C).mean(0) + 0.05 * torch.randn(C)  # "calibrated" mean
    y = ((k - k_mean).reshape(B, T, n_hg, Gd) @ rotation).abs().mean((0, 1))  # [n_hg, Gd]
    perm = torch.cat([torch.argsort(y[h]) + h * Gd for h in range(n_hg)])  # sort by mean |y|
    if not permute:  # groups of consecutive rotated channels (calibrate --permutation none)
        perm = torch.arange(n_hg * Gd)
    k_gid = group_ids_from_perm(perm, Gd, g_k)
    kc, ks, kz = quantize_pack_ref(k.reshape(B, T, n_hg, Gd), k_bits, g_k, clip,
                                   rotation=rotation, mean=k_mean, gid=k_gid)
    v = torch.randn(B, T, n_kv, d) * 0.5 + 0.1 * torch.randn(d)
    vc, vs, vz = quantize_pack_ref(v, v_bits, g_v, clip)
    kc, ks, kz, vc, vs, vz = (t.transpose(1, 2).contiguous() for t in (kc, ks, kz, vc, vs, vz))
    pos = torch.arange(T, dtype=torch.int32).repeat(B, 1)
    if left_pad and B > 1:
        pad = T // 3
        pos[1, :pad] = -1
        pos[1, pad:] -= pad
    if T > 5:
        pos[0, 5] = -1  # a hole in the middle
    if nan_holes:
        ks[pos[:, None, :].expand_as(ks[..., 0]) < 0] = float("nan")
        vs[pos[:, None, :].expand_as(vs[..., 0]) < 0] = float("nan")
    kw = dict(
        rotation=rotation, k_mean=k_mean, k_gid=k_gid,
        inv_freq=1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)),
        attention_scaling=1.0, sm_scale=d**-0.5,
        k_bits=k_bits, v_bits=v_bits, k_group_size=g_k, v_group_size=g_v,
    )
    if F:
        fp_k = fp_k_flat.reshape(B, F, n_kv, d).transpose(1, 2).contiguous()
        fp_k[:, :, 0] *= 4.0  # a sink token far from the mean
        fp_v = (torch.randn(B, n_kv, F, d) * 0.5).contiguous()
        fp_pos = torch.arange(T, T + F, dtype=torch.int32).repeat(B, 1)
        fp_pos[:, 0] = 0  # sink kept at position 0
        if F > 2:
            fp_pos[0, 1] = -1  # an empty fp slot
        kw.update(fp_k=fp_k.to(dtype), fp_v=fp_v.to(dtype), fp_pos=fp_pos)
    q = (torch.randn(B, n_kv * rep, d) * 1.5).to(dtype)
    return Case(q, (kc, ks, kz, vc, vs, vz, pos), kw)


# Kernel tests run the Triton kernel on CUDA when present, else in the CPU interpreter
# (conftest sets TRITON_INTERPRET=1); references are always computed on CPU.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def on_device(obj):
    """``obj`` (tensor, tuple/list or dict of them) moved to :data:`DEVICE`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(DEVICE)
    if isinstance(obj, (list, tuple)):
        return type(obj)(on_device(o) for o in obj)
    if isinstance(obj, dict):
        return {k: on_device(v) for k, v in obj.items()}
    return obj


def on_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, (list, tuple)):
        return type(obj)(on_cpu(o) for o in obj)
    return obj


def fold_keys_pre(k: torch.Tensor, pos: torch.Tensor, mean: torch.Tensor, rotation: torch.Tensor,
                  inv_freq: torch.Tensor, attention_scaling: float) -> torch.Tensor:
    """Folded keys ``y = RoPE_pos(k - mu) @ R`` fp32 from pre-RoPE ``k [B, n_kv, T, d]`` (runtime.ops math)."""
    from rkv_convert.runtime.ops import fold_keys, mean_at, rope

    k_post = rope(k.float(), pos.clamp_min(0), inv_freq, attention_scaling)
    return fold_keys(k_post, mean_at(mean, pos, inv_freq, attention_scaling), rotation)


def quantize_folded(k: torch.Tensor, pos: torch.Tensor, mean: torch.Tensor, rotation: torch.Tensor,
                    inv_freq: torch.Tensor, attention_scaling: float, bits: int, g_k: int,
                    clip: float = 1.0, meta_base: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(k_codes, k_scale, k_zero)`` of folded keys, through the project's quantizer and packing
    (``meta_base``: 8-bit group metadata)."""
    from rkv_convert.quant.packing import pack_codes
    from rkv_convert.quant.quantizer import quantize

    y = fold_keys_pre(k, pos, mean, rotation, inv_freq, attention_scaling)
    qt = quantize(y, bits, g_k, clip, meta_base=meta_base)
    return pack_codes(qt.codes, bits), qt.scale, qt.zero
