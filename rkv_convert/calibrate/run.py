"""``rkv calibrate``: three streaming passes over calibration text build the RotateKV artifact.

1. residual-stream magnitudes → sink channels and their online threshold, per layer;
2. per-channel mean and variance of the pre-RoPE keys over non-sink tokens (key centring) and the
   queries' second moments; from them, with ``key_scale`` > 0, each layer's key scale
   (:mod:`.key_scale`: keys times ``d``, queries times ``1/d``, folded into the weights at export);
3. centred (and scaled) keys rotated by the grouped-head Hadamard → channel magnitudes (permutation),
   row samples of keys and rotated values → clip ratios searched per layer and bit width, the
   queries' second moments weighting key errors. With ``key_layout="folded"`` the keys of this pass are
   post-RoPE: ``RoPE_n(k - mu)`` rotated per KV head by the Hadamard of order ``d`` (what the
   folded cache quantizes, up to the permutation the pass decides). With ``learn_value_rotation`` each layer's
   values get a learned rotation per KV head (:mod:`.rotation`), fused into the weights at export. With
   ``fit_first_key`` (folded) the pass also averages each window's first key, which the export stores almost
   exactly (:mod:`rkv_convert.export.first_key`).

A last forward over seeded random tokens (no text) scores each KV head as a retrieval head
(:mod:`.retrieval`), for ``rkv export --key-bits retrieval``.

The defaults are the ones docs/accuracy.md measured best; every other setting of an
option is one row of that ablation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ..export.format import DEFAULT_KEY_LAYOUT, KEY_LAYOUTS, KeyLayout
from ..models.adapters import adapter_for, attach, attention_modules, head_dim, layer_rope, stock_attention, text_config
from ..models.compat import check_transformers_version
from ..quant.codec import folded_head_rotations, rotate_groups
from ..quant.hadamard import hadamard_matrix
from ..runtime.ops import rope
from . import search
from .key_scale import DEFAULT_KEY_SCALE, key_scale
from .retrieval import induction_scores
from .rotation import learn_rotations, output_metric
from .artifact import ARTIFACT_VERSION, CalibrationArtifact, weights_fingerprint
from .observers import ActivationObserver, FirstKeyObserver, KeyMomentObserver, RotatedKeyObserver, flatten_heads

__all__ = ["CalibrationOptions", "calibrate", "model_shape"]

Progress = Callable[[str, int, int], None]


@dataclass
class CalibrationOptions:
    """Calibration settings (recorded in the artifact)."""

    source: str = "pydoc"
    num_samples: int = 32
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 4
    head_group_size: int | None = None  # None: search.default_head_group_size
    key_group_size: int = 64
    value_group_size: int = 64
    sink_ratio: float = 64.0
    max_sink_channels: int = 8
    clip_samples: int = 4096
    # Fields below were added with the accuracy ablation (docs/accuracy.md); append, never rename.
    center_keys: bool = True  # subtract the calibrated per-channel key mean before rotation
    rotate_keys: bool = True  # False: identity instead of the grouped-head Hadamard (ablation only)
    perm_statistic: str = "mean_abs"  # one of search.PERM_STATISTICS
    clip_objective: str = "qk"  # one of search.CLIP_OBJECTIVES: key error as is ("mse"), or as attention-logit error ("qk")
    key_clip: float | None = None  # a fixed key clip ratio instead of the per-layer search
    value_clip: float | None = None  # a fixed value clip ratio instead of the per-layer search
    key_layout: str = DEFAULT_KEY_LAYOUT  # one of export.format.KEY_LAYOUTS: prerope (RotateKV) or folded
    learn_rotation: bool | None = None  # learned per-head key rotations (calibrate.rotation); None: on for folded
    rotation_steps: int = 150  # Adam steps of the learned rotation per KV head
    key_scale: float = DEFAULT_KEY_SCALE  # exponent of the per-channel key scale (calibrate.key_scale); 0: none
    # folded layout: observe each key at a RoPE position drawn uniformly from [0, rope_span) instead of its own
    # position in its window (0); better at long contexts as deployed, worse one-shot (docs/accuracy.md)
    rope_span: int = 0
    # learned per-head value rotations (calibrate.rotation, o_proj-weighted error), fused into v_proj/o_proj at export
    learn_value_rotation: bool = True
    # folded layout: calibrate the first token's key (the attention sink), which the export's first-key fit
    # (export.first_key) then stores almost exactly; None: on for folded
    fit_first_key: bool | None = None


def model_shape(config: object) -> dict:
    text = text_config(config)  # the language model of a multimodal config (Gemma 3)
    return {
        "model_type": config.model_type,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "head_dim": head_dim(config),
        "hidden_size": text.hidden_size,
    }


class _Tap:
    """Attention handler that hands each layer's pre-RoPE queries, keys, values and residual input to a callback
    (with ``rope=True`` also the layer's ``position_embeddings``, the model's ``(cos, sin)``)."""

    def __init__(self, callback: Callable[..., None], rope: bool = False) -> None:
        self.callback = callback
        self.rope = rope

    def __call__(self, module, query, key, value, position_embeddings, attention_mask, cache, layer_input, **kw):
        if self.rope:
            self.callback(module.layer_idx, query, key, value, layer_input, position_embeddings)
        else:
            self.callback(module.layer_idx, query, key, value, layer_input)
        return stock_attention(module, query, key, value, position_embeddings, attention_mask, cache, **kw)


def _draw_positions(batch: int, tokens: int, span: int, generator: torch.Generator) -> torch.Tensor:
    """int64 ``[batch, tokens]`` RoPE positions drawn uniformly from ``[0, span)``: where the rotated-key pass puts
    each centred key (``CalibrationOptions.rope_span``)."""
    return torch.randint(0, span, (batch, tokens), generator=generator)


def _run_pass(model: nn.Module, batches: torch.Tensor, batch_size: int, callback, label: str, progress: Progress | None,
              rope: bool = False):  # fmt: skip
    device = next(model.parameters()).device
    steps = range(0, batches.shape[0], batch_size)
    with torch.no_grad(), attach(model, _Tap(callback, rope)):
        for i, start in enumerate(steps):
            model(batches[start : start + batch_size].to(device), use_cache=False)
            if progress:
                progress(label, i + 1, len(steps))


def _validate(options: CalibrationOptions, shape: dict) -> int:
    n_kv, d = shape["num_key_value_heads"], shape["head_dim"]
    if options.key_layout not in KEY_LAYOUTS:
        raise ValueError(f"key_layout must be one of {', '.join(KEY_LAYOUTS)}, got {options.key_layout!r}")
    folded = options.key_layout == KeyLayout.FOLDED.value
    if folded and options.head_group_size not in (None, 1):
        raise ValueError(
            f"the folded key layout rotates each KV head alone (head groups of 1); head_group_size "
            f"{options.head_group_size} applies to the prerope layout only"
        )
    if folded and d % 2:
        raise ValueError(f"the folded key layout needs an even head dim (RoPE pairs), got {d}")
    g = 1 if folded else options.head_group_size or search.default_head_group_size(n_kv, d)
    if n_kv % g:
        raise ValueError(f"head-group size {g} does not divide the {n_kv} KV heads; use a divisor of {n_kv}")
    if (g * d) % options.key_group_size:
        raise ValueError(f"key group size {options.key_group_size} must divide the {g * d} channels of a head group")
    if d % options.value_group_size:
        raise ValueError(f"value group size {options.value_group_size} must divide head_dim {d}")
    if options.perm_statistic not in search.PERM_STATISTICS:
        raise ValueError(f"perm_statistic must be one of {search.PERM_STATISTICS}, got {options.perm_statistic!r}")
    if options.clip_objective not in search.CLIP_OBJECTIVES:
        raise ValueError(f"clip_objective must be one of {search.CLIP_OBJECTIVES}, got {options.clip_objective!r}")
    if options.learn_rotation and not folded:
        raise ValueError("learned key rotations need the folded key layout (pre-RoPE keys would need the rotation "
                         "undone per cached key at decode); use key_layout='folded' or learn_rotation=False")
    if options.rope_span and not folded:
        raise ValueError("rope_span applies to the folded key layout (the prerope layout caches keys before RoPE, at "
                         "no position); leave it at 0 or use key_layout='folded'")
    if options.fit_first_key and not folded:
        raise ValueError("the first-key fit needs the folded key layout (it turns each head's key rotation, free at "
                         "decode only there); use key_layout='folded' or fit_first_key=False")
    if options.rope_span < 0:
        raise ValueError(f"rope_span must be >= 0 (0: the calibration windows' own positions), got {options.rope_span}")
    if not 0.0 <= options.key_scale <= 2.0:
        raise ValueError(f"key_scale is an exponent in [0, 2] (0: no scale, 1: the error optimum), got {options.key_scale}")
    for name in ("key_clip", "value_clip"):
        clip = getattr(options, name)
        if clip is not None and not 0.0 < clip <= 1.0:
            raise ValueError(f"{name} must lie in (0, 1], got {clip}")
    return g


def _query_energy(query: torch.Tensor, n_kv: int) -> torch.Tensor:
    """``[B, n_q, T, d]`` → per KV channel the sum over its query heads of q^2, summed over tokens."""
    b, n_q, t, d = query.shape
    q = query.float().reshape(b, n_kv, n_q // n_kv, t, d)
    return q.pow(2).sum(dim=(0, 2, 3)).reshape(-1).double()


def _clips(rows, bits_list, group_size, perm, fixed, weight=None, rotation=None) -> list[float]:
    if fixed is not None:
        return [float(fixed)] * len(bits_list)
    return [search.search_clip(rows, b, group_size, perm, weight, rotation)[0] for b in bits_list]


def _learned_heads(x: torch.Tensor, inits: torch.Tensor, weights: torch.Tensor, group_size: int, clip: float,
                   options: CalibrationOptions, device: torch.device) -> torch.Tensor:  # fmt: skip
    """Per KV head ``R_h [n_kv, d, d]`` (fp32, on the CPU) learned from ``inits[h]`` at 2 bits and ``clip`` for
    ``weights[h]`` (per channel ``[d]`` or a root ``[d, d]``; :mod:`.rotation`), all heads at once on ``device``.
    ``x [N, n_kv, d]``: the rows the rotations will turn."""
    learned = learn_rotations(x.to(device), weights, inits, search.QUANT_BITS[0], group_size, clip,
                              steps=options.rotation_steps)  # fmt: skip
    return learned.rotation.cpu().contiguous()


def _through_heads(x: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """Rows ``x [N, n_kv, d]`` (centred post-RoPE keys, or values) → ``[N, n_kv*d]``, each head times its ``R_h``."""
    return torch.einsum("nhd,hde->nhe", x, heads.float().to(x.device)).reshape(x.shape[0], -1)


def _key_errors(rows: torch.Tensor, rotation: torch.Tensor, perm: torch.Tensor | None, clips: list[float],
                weight: torch.Tensor | None, group_size: int, device: torch.device) -> list[float]:  # fmt: skip
    """The clip search's objective (query-weighted key error: the expected squared logit error) of ``rows`` (keys as
    quantized, ``rotation`` per head group, groups by ``perm``) at each width of ``search.QUANT_BITS`` and its clip:
    what ``rkv export --key-bits auto`` ranks layers by."""
    rows, rotation = rows.float().to(device), rotation.float().to(device)
    perm = None if perm is None else perm.to(device)
    return [search.clip_error(rows, b, group_size, c, perm, weight, rotation) for b, c in zip(search.QUANT_BITS, clips)]


def _largest_group_range(rows: torch.Tensor, group_size: int) -> torch.Tensor:
    """fp32 ``[]``: the largest ``max - min`` over groups of ``group_size`` consecutive channels of ``rows [N, C]``."""
    g = rows.float().reshape(rows.shape[0], -1, group_size)
    return (g.amax(-1) - g.amin(-1)).max().cpu().reshape(())


def calibrate(
    model: nn.Module, batches: torch.Tensor, options: CalibrationOptions, progress: Progress | None = None
) -> CalibrationArtifact:
    """Run the three passes over ``batches`` (``int64 [n, seqlen]``) and return the artifact. ``model`` is left
    as it was: a key scale is applied to what the passes observe, and fused into the weights at export."""
    check_transformers_version()
    offloaded = [name for name, p in model.named_parameters() if p.is_meta]
    if offloaded:
        raise ValueError(
            f"weights offloaded to disk (meta device), e.g. {offloaded[0]} ({len(offloaded)} in all): calibration "
            "fingerprints every weight, so all must be in memory. Give device_map more room (max_memory) or load "
            "the model on one device"
        )
    shape = model_shape(model.config)
    g = _validate(options, shape)
    n_layers, d = shape["num_hidden_layers"], shape["head_dim"]
    key_rotation = hadamard_matrix(g * d) if options.rotate_keys else torch.eye(g * d)
    value_rotation = hadamard_matrix(d)
    folded = options.key_layout == KeyLayout.FOLDED.value  # g == 1: key_rotation is H_d

    acts = [ActivationObserver() for _ in range(n_layers)]
    _run_pass(model, batches, options.batch_size, lambda i, q, k, v, h: acts[i].update(h), "sinks", progress)
    sinks = []
    for obs in acts:
        token_max, token_argmax, median = obs.result()
        sinks.append(search.select_sink_channels(token_max, token_argmax, median, options.sink_ratio, options.max_sink_channels))

    def keep_mask(layer: int, hidden: torch.Tensor) -> torch.Tensor:
        channels, threshold, _ = sinks[layer]
        flat = hidden.reshape(-1, hidden.shape[-1])
        if channels.numel() == 0:
            return torch.ones(flat.shape[0], dtype=torch.bool, device=flat.device)
        return flat[:, channels.to(flat.device)].abs().amax(-1) <= threshold

    n_kv = shape["num_key_value_heads"]
    moments = [KeyMomentObserver() for _ in range(n_layers)]
    query_sq: list[torch.Tensor | None] = [None] * n_layers
    query_tokens = [0] * n_layers

    def observe_moments(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor) -> None:
        # The qk clip objective weights key errors by rope_pair_weights of the pre-RoPE query energy.
        # For folded (post-RoPE) keys that carries over: RoPE turns q and k by the same angle per pair,
        # so E[q_post,i^2] = (E[q_i^2] + E[q_{i+d/2}^2]) / 2 averaged over positions, the pair weight
        # up to a constant factor, which does not move the argmin of the clip search.
        moments[i].update(flatten_heads(k), keep_mask(i, h))
        energy = _query_energy(q, n_kv)
        query_sq[i] = energy if query_sq[i] is None else query_sq[i] + energy
        query_tokens[i] += q.shape[0] * q.shape[2]

    _run_pass(model, batches, options.batch_size, observe_moments, "key means", progress)
    if options.center_keys:
        key_means = [m.result() for m in moments]
    else:
        key_means = [torch.zeros(n_kv * d) for _ in range(n_layers)]
    scales: list[torch.Tensor] | None = None
    if options.key_scale:  # keys times d from here on (their means too), queries times 1/d
        shared = adapter_for(model.config).shared_qk_scale
        scales = [key_scale(query_sq[i].cpu(), moments[i].spread(options.center_keys), d, options.key_scale, shared)
                  for i in range(n_layers)]  # fmt: skip
        key_means = [m * s.reshape(-1) for m, s in zip(key_means, scales)]
        query_sq = [e / s.reshape(-1).double().to(e.device).pow(2) for e, s in zip(query_sq, scales)]

    n_batches = -(-batches.shape[0] // options.batch_size)
    rows_per_batch = -(-options.clip_samples // n_batches)
    span = options.rope_span if folded else 0
    ropes = layer_rope(model) if span else []
    positions = torch.Generator().manual_seed(options.seed) if span else None
    rotated = [RotatedKeyObserver(options.clip_samples, options.seed + i) for i in range(n_layers)]
    first_keys = [FirstKeyObserver() for _ in range(n_layers)] if folded and options.fit_first_key is not False else []

    def observe_rotated(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor, pe=None) -> None:
        if scales is not None:  # equal within RoPE pairs: commutes with RoPE
            k = k.float() * scales[i].to(k.device).view(1, n_kv, 1, d)
        # post-RoPE centred keys RoPE_n(k - mu) in fp32, n the window's own position or drawn from [0, span): pre-RoPE
        # keys do not depend on position, and the cache holds them at every position up to the context
        if folded:
            mu = key_means[i].to(k.device).view(1, -1, 1, d)
            k_c = k.float() - mu
            if first_keys:  # position 0, where RoPE is the identity
                first_keys[i].update(k_c[:, :, 0])
            if span:
                centred = flatten_heads(rope(k_c, _draw_positions(k.shape[0], k.shape[2], span, positions), *ropes[i]))
            else:
                cos, sin = pe
                centred = flatten_heads(apply_rotary_pos_emb(k_c, k_c, cos.float(), sin.float())[1])
        else:
            centred = flatten_heads(k) - key_means[i].to(k.device)
        rot = rotate_groups(centred, key_rotation.to(k.device))
        values = rotate_groups(flatten_heads(v), value_rotation.to(v.device))
        rotated[i].update(centred, rot, values, keep_mask(i, h), rows_per_batch)

    _run_pass(model, batches, options.batch_size, observe_rotated, "rotated keys", progress, rope=folded)

    induction = induction_scores(model, shape["num_key_value_heads"], options.seed)
    if progress:
        progress("retrieval heads", 1, 1)
    device = next(model.parameters()).device
    attentions = attention_modules(model)
    layers = []
    for i in range(n_layers):
        stats = rotated[i].result()
        perm = search.permutation_for(options.perm_statistic, stats, g * d)
        weight = None
        if options.clip_objective == "qk":
            weight = search.rope_pair_weights((query_sq[i] / query_tokens[i]).float().cpu(), d).to(device)
        # the search runs where the model runs (same grid and error, many small kernels)
        key_clips = _clips(stats["key_rows"].to(device), search.QUANT_BITS, options.key_group_size, perm.to(device),
                           options.key_clip, weight, key_rotation.to(device))
        value_rows = stats["value_rows"]  # rotated by value_rotation
        learned_values = None
        if options.learn_value_rotation:  # R_h per KV head from H_d at its 2-bit clip, for the error after o_proj
            clip = _clips(value_rows.to(device), search.QUANT_BITS[:1], options.value_group_size, None, options.value_clip)[0]
            x = rotate_groups(value_rows.float(), value_rotation, inverse=True).reshape(-1, n_kv, d)
            metric = output_metric(attentions[i].o_proj.weight.float().cpu(), n_kv, d)
            learned_values = _learned_heads(x, value_rotation.expand(n_kv, d, d), metric, options.value_group_size, clip,
                                            options, device)  # fmt: skip
            value_rows = _through_heads(x, learned_values)
        # clips of what the cache stores
        value_clips = _clips(value_rows.to(device), search.QUANT_BITS, options.value_group_size, None, options.value_clip)
        learned, key_rows, key_rot, key_perm, ranges = None, stats["key_rows"], key_rotation, perm, {}
        if folded:
            x = rotate_groups(stats["key_rows"].float(), key_rotation, inverse=True).reshape(-1, shape["num_key_value_heads"], d)
            if options.learn_rotation is not False and options.rotate_keys:
                w = weight.float().cpu() if weight is not None else torch.ones(n_kv * d)
                learned = _learned_heads(x, folded_head_rotations(key_rotation, perm, d), w.reshape(n_kv, d),
                                         options.key_group_size, key_clips[0], options, device)  # fmt: skip
            y = _through_heads(x, learned if learned is not None else folded_head_rotations(key_rotation, perm, d))
            if learned is not None:  # the learned R_h: groups of consecutive channels of y, clips searched again
                key_rows, key_rot, key_perm = y, torch.block_diag(*learned.float()), None
                if options.key_clip is None:
                    key_clips = _clips(y.to(device), search.QUANT_BITS, options.key_group_size, None, None, weight,
                                       key_rot.to(device))  # fmt: skip
            # the stored keys y: what the 8-bit metadata's scale base is set from (export.format.LayerTensors)
            ranges = {"key_group_range": _largest_group_range(y, options.key_group_size),
                      "value_group_range": _largest_group_range(value_rows, options.value_group_size)}
        key_errors = _key_errors(key_rows, key_rot, key_perm, key_clips, weight, options.key_group_size, device)
        channels, threshold, flagged = sinks[i]
        layers.append(
            {
                "key_mean": key_means[i],
                "key_perm": perm,
                "key_abs_mean_before": stats["abs_before"],
                "key_abs_mean_after": stats["abs_after"],
                "key_clip_by_bits": torch.tensor(key_clips, dtype=torch.float32),
                "key_error_by_bits": torch.tensor(key_errors, dtype=torch.float32),
                "key_induction": induction[i].float(),
                "value_clip_by_bits": torch.tensor(value_clips, dtype=torch.float32),
                "sink_channels": channels,
                "sink_threshold": torch.tensor(threshold, dtype=torch.float32),
                "sink_tokens_flagged": flagged,
                **({"key_head_rotation": learned} if learned is not None else {}),
                **({"value_head_rotation": learned_values} if learned_values is not None else {}),
                **({"key_first_token": first_keys[i].result()} if first_keys else {}),
                **({"key_scale": scales[i].reshape(-1)} if scales is not None else {}),
                **ranges,
            }
        )
        if progress:
            progress("settings", i + 1, n_layers)
    meta = {
        "artifact_version": ARTIFACT_VERSION,
        "model": shape,
        "source_fingerprint": weights_fingerprint(model),
        "options": {**asdict(options), "head_group_size": g, "bits_searched": list(search.QUANT_BITS)},
        "sink_tokens_flagged": [layer.pop("sink_tokens_flagged") for layer in layers],
        "calibration_tokens": int(batches.numel()),
    }
    return CalibrationArtifact(meta, key_rotation, value_rotation, layers)
