"""Experiment (issue 12, one-shot gap): a per-channel key scale folded into the query, before the rotation.

In the folded layout the store holds ``y = x M_h`` (``x``: a centred post-RoPE key) and decode scores
``(q M_h^{-T})·deq(y)``, so ``M_h`` need not be orthogonal: any invertible matrix is free at decode once the
query is transformed by ``M_h^{-T}`` instead of ``R_h``. This tries ``M_h = D_h R_h`` with ``D_h`` diagonal.

Why a scale can help: after a rotation the quantization error of a group is spread evenly over its channels,
with a size set by the group's range, which grows with ``Σ_c d_c² s_c`` (``s_c = E x_c²``). Taken back to
the key, channel ``c`` carries ``1/d_c`` of it, and meets the query energy ``w_c``. The expected logit error
is then about ``(Σ_c d_c² s_c)(Σ_c w_c / d_c²)``, least at ``d_c² ∝ sqrt(w_c / s_c)`` (Cauchy-Schwarz):
channels the queries barely read are shrunk, so they stop widening the range of those the queries do read.
``--alphas`` scales the exponent (0: no scale, 1: that optimum), tied within RoPE pairs and normalised to a
geometric mean of 1. For each alpha the rotation is learned again from the Hadamard on the scaled keys
(``learn_rotations`` with weights ``w / d²``, the same objective; ``--steps 0``: the Hadamard itself, so that
alpha 0 is the Hadamard rotation) and each layer's clip searched again.

Statistics come from ``pydoc`` calibration windows (never the evaluation text); the checkpoint's key means,
widths, metadata format and 3-bit layers are kept. Scores one-shot and deployed perplexity. ``--range-search``
gives every variant's keys and values the per-group range search of ``exp_group_range_search.py`` at encode.

    python benchmarks/exp_key_scaling.py CK --text ../shared/data/wikitext-2-raw/wiki.test.raw --windows 8
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import print_table, report_row  # noqa: E402
from _experiment import experiment_parser  # noqa: E402
from exp_group_range_search import RANGE_GRID, SearchedKeys, SearchedValues, with_search  # noqa: E402

from rkv_convert.calibrate import search  # noqa: E402
from rkv_convert.calibrate.key_scale import key_scale  # noqa: E402
from rkv_convert.calibrate.run import _largest_group_range  # noqa: E402
from rkv_convert.calibrate.rotation import learn_rotations, weighted_errors  # noqa: E402
from rkv_convert.evaluate.perplexity import perplexity, token_windows  # noqa: E402
from rkv_convert.evaluate.schemes import RotateKV, build_scheme  # noqa: E402
from rkv_convert.export.format import read_checkpoint  # noqa: E402
from rkv_convert.quant.codec import FoldedKeyCodec, folded_head_rotations  # noqa: E402
from rkv_convert.quant.quantizer import meta_scale_base  # noqa: E402
from rkv_convert.quant.sinks import detect_sinks  # noqa: E402
from rkv_convert.runtime.ops import apply_rope  # noqa: E402


@dataclass
class ScaledKeys(FoldedKeyCodec):
    """Folded keys through ``M_h = diag(scale_h) R_h``: ``y = x M_h``, ``x̂ = ŷ M_h^{-1}``."""

    scale: torch.Tensor | None = None  # [n_kv, d] fp32

    def fold(self, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        k_post = apply_rope(k, cos.unsqueeze(1), sin.unsqueeze(1)).float()
        x = (k_post - self._mean_rope(cos, sin, k.device)) * self.scale.to(k.device)[None, :, None, :]
        return x @ self.head_rotations.to(k.device)[None]

    def unfold(self, y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:  # fmt: skip
        x = y.float() @ self.head_rotations.to(y.device).transpose(-1, -2)[None]
        return (x / self.scale.to(y.device)[None, :, None, :] + self._mean_rope(cos, sin, y.device)).to(dtype)


@dataclass
class ScaledSearchedKeys(SearchedKeys, ScaledKeys):
    """:class:`ScaledKeys` with the encoder of ``exp_group_range_search.SearchedKeys`` (each group picks its range)."""


def calibration_rows(model, tokenizer, ck, codecs: list[FoldedKeyCodec], windows: int, length: int, rows: int,
                     seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:  # fmt: skip
    """Per layer: centred post-RoPE keys ``x [rows, n_kv, d]`` of non-sink tokens (the checkpoint's sink rule, as
    the calibrator keeps them out) and ``rope_pair_weights`` of the queries ``[n_kv*d]``, on ``pydoc`` windows."""
    from rkv_convert.calibrate.run import _query_energy, _run_pass
    from rkv_convert.calibration_data.sources import load_text, sample_batches

    n_kv = codecs[0].head_means.shape[0]
    d = codecs[0].head_means.shape[1]
    energy: dict[int, torch.Tensor] = {}
    keys: dict[int, list[torch.Tensor]] = {}
    tokens = [0]

    def observe(i: int, q: torch.Tensor, k: torch.Tensor, v, h, pe) -> None:
        e = _query_energy(q, n_kv)
        energy[i] = e if i not in energy else energy[i] + e
        cos, sin = pe
        k_post = apply_rope(k.float(), cos.float().unsqueeze(1), sin.float().unsqueeze(1))
        x = k_post - codecs[i]._mean_rope(cos.float(), sin.float(), k.device)  # [B, n_kv, T, d]
        layer = ck.layers[i]  # every flagged token is a sink here (no per-sequence cap), as in the calibrator
        keep = ~detect_sinks(h, layer.sink_channels, layer.sink_threshold, h.shape[1]).reshape(-1)
        keys.setdefault(i, []).append(x.permute(0, 2, 1, 3).reshape(-1, n_kv, d)[keep])
        if i == 0:
            tokens[0] += q.shape[0] * q.shape[2]

    batches = sample_batches(load_text("pydoc"), tokenizer, windows, length, seed=seed)
    _run_pass(model, batches, 1, observe, "keys", None, rope=True)
    gen = torch.Generator().manual_seed(seed)
    xs, ws = [], []
    for i in sorted(energy):
        x = torch.cat(keys[i])
        xs.append(x[torch.randperm(x.shape[0], generator=gen)[:rows]])
        ws.append(search.rope_pair_weights((energy[i] / tokens[0]).float(), d))
    return xs, ws


def pair_scale(x: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """``[n_kv, d]``: the calibrator's key scale (``calibrate.key_scale``) of centred rows ``x [N, n_kv, d]``."""
    return key_scale(w.float().reshape(-1), x.pow(2).mean(0).reshape(-1), x.shape[2], alpha)


def scaled_codec(codec: FoldedKeyCodec, x: torch.Tensor, w: torch.Tensor, alpha: float,
                 steps: int) -> tuple[ScaledKeys, float, float]:  # fmt: skip
    """The layer's codec with ``D`` at ``alpha``, rotations learned again from the Hadamard, clip searched again;
    and the weighted key error (the calibrator's objective) before (the checkpoint's codec) and after."""
    n_kv, d = x.shape[1:]
    scale = pair_scale(x, w, alpha)
    hadamard = folded_head_rotations(codec.rotation, codec.perm, d)
    wh = w.reshape(n_kv, d)
    rots = learn_rotations(x * scale, wh / scale.pow(2), hadamard, codec.bits, codec.group_size, codec.clip,
                           steps=steps).rotation
    y = torch.einsum("nhd,hde->nhe", x * scale, rots).reshape(x.shape[0], -1)
    weight = (wh / scale.pow(2)).reshape(-1)
    clip, _ = search.search_clip(y, codec.bits, codec.group_size, None, weight, torch.block_diag(*rots))
    before = float(weighted_errors(x, codec.head_rotations.float(), wh, codec.bits, codec.group_size, codec.clip).sum())
    after = float(weighted_errors(x * scale, rots, wh / scale.pow(2), codec.bits, codec.group_size, clip).sum())
    group_range = float(_largest_group_range(y, codec.group_size))
    base = None if codec.meta_base is None else meta_scale_base(group_range, codec.bits, clip)
    init = {f.name: getattr(codec, f.name) for f in fields(codec) if f.init}
    out = ScaledKeys(**init | {"head_rotation": rots, "clip": clip, "meta_base": base, "scale": scale})
    return out, before, after


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = experiment_parser(__doc__.split("\n")[0])
    p.add_argument("--alphas", default="0,0.5,1", help="exponent strengths of the scale; 0 = rotation relearned only")
    p.add_argument("--calib-windows", type=int, default=16, help="pydoc windows of --calib-length for the statistics")
    p.add_argument("--calib-length", type=int, default=512)
    p.add_argument("--rows", type=int, default=4096, help="key rows per layer for learning and clip search")
    p.add_argument("--steps", type=int, default=150, help="Adam steps of each learned rotation (0: the Hadamard)")
    p.add_argument("--range-search", action="store_true", help="every variant's keys and values also pick each "
                   "group's range at encode (exp_group_range_search.py's encoder and grid)")
    p.add_argument("--dev-windows", type=int, default=0, help="score on the last N x --length tokens of pydoc instead "
                   "of --text: the development text the calibrator's defaults are chosen on (docs/accuracy.md)")
    args = p.parse_args()
    alphas = [float(a) for a in args.alphas.split(",")]
    ck = read_checkpoint(args.checkpoint)
    if not ck.config.folded:
        raise SystemExit("the experiment needs a folded-key checkpoint (rkv calibrate's default)")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.checkpoint)
    base = build_scheme("rotatekv", None, ck)
    t0 = time.perf_counter()
    xs, ws = calibration_rows(model, tok, ck, base.key_codecs, args.calib_windows, args.calib_length, args.rows)
    print(f"calibration rows: {len(xs)} layers x {tuple(xs[0].shape)} in {time.perf_counter() - t0:.0f} s", flush=True)
    variants: dict[str, list] = {"checkpoint": base.key_codecs}
    errors: dict[str, float] = {"checkpoint": 1.0}
    for alpha in alphas:
        t0 = time.perf_counter()
        made = [scaled_codec(c, x, w, alpha, args.steps) for c, x, w in zip(base.key_codecs, xs, ws)]
        name = f"{'learned' if args.steps else 'hadamard'} alpha={alpha:g}"
        variants[name] = [m[0] for m in made]
        errors[name] = sum(m[2] for m in made) / sum(m[1] for m in made)
        print(f"{name}: weighted key error {errors[name]:.3f} of the checkpoint's; clips "
              f"{[round(m[0].clip, 2) for m in made]} ({time.perf_counter() - t0:.0f} s)", flush=True)
    values = base.value_codecs
    if args.range_search:
        values = [with_search(c, SearchedValues, RANGE_GRID) for c in values]
        variants = {name: [with_search(c, ScaledSearchedKeys if isinstance(c, ScaledKeys) else SearchedKeys, RANGE_GRID)
                           for c in keys] for name, keys in variants.items()}  # fmt: skip
        variants = {f"{name} + range search": keys for name, keys in variants.items()}
        errors = {f"{name} + range search": e for name, e in errors.items()}
    if args.dev_windows:
        from rkv_convert.calibration_data.sources import development_windows, load_text

        ids, where = development_windows(load_text("pydoc"), tok, args.dev_windows, args.length), "pydoc dev"
    else:
        text = args.text.read_text(encoding="utf-8")
        ids, where = token_windows(tok, text, args.length, args.windows), args.text.name
    fp = perplexity(model, ids, build_scheme("fp", None, ck), "oneshot", ck).perplexity
    rows = []
    for protocol in args.protocols.split(","):
        for name, keys in variants.items():
            scheme = RotateKV(name=base.name, bits=base.bits, key_codecs=keys, value_codecs=values)
            t0 = time.perf_counter()
            r = perplexity(model, ids, scheme, protocol, ck)
            row = {"keys": name, "key_error": errors[name], "text": where, "protocol": protocol,
                   "windows": ids.shape[0], "length": args.length, "ppl": r.perplexity, "x_fp": r.perplexity / fp,
                   "fp_ppl": fp, "seconds": time.perf_counter() - t0}  # fmt: skip
            rows.append(row)
            report_row("key scaling", row, args.csv)
    print_table(f"key scale ({args.checkpoint.name}, {where}, {ids.shape[0]} x {args.length})", rows)


if __name__ == "__main__":
    main()
