"""Experiment (issue 12): each quantization group picks its own range at encode time.

The library's encoder sets a group's range to ``clip * [min, max]`` with one searched clip per layer.
Here the encoder tries every pair ``(a * min, b * max)`` for ``a, b`` in a grid of fractions (plus the
layer's clip) and keeps, per group, the pair whose dequantized group has the smallest squared error.
The stored format is unchanged (codes, scale and zero per group, fp16 or 8-bit metadata): only the
encoder works harder, so a reader (the decode kernels) would need no change; the write kernel would.

Scores an exported checkpoint as exported (each layer's key and value widths, its group metadata) on
windows of an evaluation text, one-shot and deployed, with the search on keys, on values or on both.
No setting is chosen on the evaluation text here; this measures what the lever is worth.

    python benchmarks/exp_group_range_search.py CK --text ../shared/data/wikitext-2-raw/wiki.test.raw --windows 8

``--grid`` takes one list of fractions for every code width, or one per width (``2:0.8,0.6/3:1.0,0.85``);
``--dev-windows N`` scores the last N windows of ``pydoc`` (the defaults' development text) instead of ``--text``.
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

from rkv_convert.calibration_data.sources import development_windows, load_text  # noqa: E402
from rkv_convert.evaluate.perplexity import perplexity, token_windows  # noqa: E402
from rkv_convert.evaluate.schemes import RotateKV, build_scheme  # noqa: E402
from rkv_convert.export.format import read_checkpoint  # noqa: E402
from rkv_convert.quant.codec import FoldedKeyCodec, ValueCodec  # noqa: E402
from rkv_convert.quant.quantizer import QuantizedTensor, group_codes, group_scale_zero, stored_group_meta  # noqa: E402


RANGE_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)
"""The default fractions of a group's min and max tried as its range ends (``--grid``)."""


def searched_quantize(x: torch.Tensor, bits: int, group_size: int, clip: float, meta_base: float | None,
                      fractions: tuple[float, ...], metric: torch.Tensor | None = None) -> QuantizedTensor:
    """:func:`rkv_convert.quant.quantizer.quantize` (no permutation) with each group's range chosen among
    ``(a * min, b * max)``, ``a, b`` in ``fractions + (clip,)``, by the group's squared error; with ``metric``
    (``[n_kv, C/g, g, m]``, ``x [B, n_kv, T, C]``) by ``|e @ metric[h, j]|^2`` of group ``j``'s error ``e``."""
    grouped = x.float().reshape(*x.shape[:-1], -1, group_size)
    mx, mn = grouped.amax(-1), grouped.amin(-1)
    best = torch.full(mx.shape, float("inf"), device=x.device)
    out_codes = torch.zeros(grouped.shape, dtype=torch.uint8, device=x.device)
    out_scale = out_zero = None
    for a, b in sorted({(clip, clip)} | {(a, b) for a in fractions for b in fractions}):
        scale, zero = stored_group_meta(mx * b, mn * a, bits, meta_base)
        s, z = group_scale_zero(scale, zero, meta_base)
        codes = group_codes(grouped, s, z, bits)
        diff = codes * s.unsqueeze(-1) + z.unsqueeze(-1) - grouped
        if metric is not None:
            diff = torch.einsum("bhtgc,hgcm->bhtgm", diff, metric)
        err = diff.square().sum(-1)
        better = err < best
        best = torch.where(better, err, best)
        out_codes = torch.where(better.unsqueeze(-1), codes.to(torch.uint8), out_codes)
        out_scale = scale if out_scale is None else torch.where(better, scale, out_scale)
        out_zero = zero if out_zero is None else torch.where(better, zero, out_zero)
    return QuantizedTensor(out_codes.reshape(x.shape), out_scale, out_zero, bits, group_size, None, meta_base)


@dataclass
class SearchedKeys(FoldedKeyCodec):
    fractions: tuple[float, ...] = ()
    query_weight: torch.Tensor | None = None  # [n_kv*d] rope_pair_weights of the calibration queries

    def __post_init__(self) -> None:
        super().__post_init__()
        self.metric = None
        if self.query_weight is not None:  # error in the store's frame e -> e @ R_h^T, weighted per channel
            n_kv, d, _ = self.head_rotations.shape
            root = self.query_weight.float().sqrt().reshape(n_kv, 1, d)
            m = self.head_rotations.transpose(1, 2) * root  # [n_kv, d, d]: rows are store channels
            self.metric = m.reshape(n_kv, d // self.group_size, self.group_size, d)

    def encode(self, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> QuantizedTensor:
        return searched_quantize(self.fold(k, cos, sin), self.bits, self.group_size, self.clip, self.meta_base,
                                 _for_bits(self.fractions, self.bits), self.metric)  # fmt: skip


@dataclass
class SearchedValues(ValueCodec):
    fractions: tuple[float, ...] = ()

    def encode(self, v: torch.Tensor) -> QuantizedTensor:
        return searched_quantize(v, self.bits, self.group_size, self.clip, self.meta_base, _for_bits(self.fractions, self.bits))


def _for_bits(fractions, bits: int) -> tuple[float, ...]:
    """The fractions a ``bits``-wide code tries: one tuple for all widths, or a dict by width."""
    return fractions[bits] if isinstance(fractions, dict) else fractions


def parse_grid(text: str) -> tuple[float, ...] | dict[int, tuple[float, ...]]:
    """``--grid``: ``f,f,...`` for every width, or ``bits:f,f/bits:f,f`` per width."""
    def fractions(part: str) -> tuple[float, ...]:
        values = tuple(float(f) for f in part.split(","))
        if not all(0.0 < f <= 1.0 for f in values):
            raise SystemExit(f"--grid fractions must lie in (0, 1], got {part}")
        return values

    if ":" not in text:
        return fractions(text)
    return {int(bits): fractions(part) for bits, part in (item.split(":") for item in text.split("/"))}


def with_search(codec, cls, fractions, **extra):
    """``codec`` (a key or value codec) as ``cls``, its searched form over ``fractions``."""
    return cls(**{f.name: getattr(codec, f.name) for f in fields(codec) if f.init}, fractions=fractions, **extra)


def query_weights(model, tokenizer, windows: int, length: int) -> list[torch.Tensor]:
    """Per layer ``rope_pair_weights`` of the mean squared pre-RoPE queries on ``pydoc`` calibration text (the
    calibrator's q·k objective, through its own query tap; never the evaluation text)."""
    from rkv_convert.calibrate.run import _query_energy, _run_pass
    from rkv_convert.calibrate.search import rope_pair_weights
    from rkv_convert.calibration_data.sources import load_text, sample_batches
    from rkv_convert.models.adapters import head_dim

    n_kv, d = model.config.num_key_value_heads, head_dim(model.config)
    energy: dict[int, torch.Tensor] = {}

    def observe(i: int, q: torch.Tensor, *_rest) -> None:
        e = _query_energy(q, n_kv)
        energy[i] = e if i not in energy else energy[i] + e

    batches = sample_batches(load_text("pydoc"), tokenizer, windows, length, seed=0)
    _run_pass(model, batches, 1, observe, "queries", None)
    return [rope_pair_weights((energy[i] / batches.numel()).float().cpu(), d) for i in sorted(energy)]


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = experiment_parser(__doc__.split("\n")[0])
    p.add_argument("--grid", default=",".join(map(str, RANGE_GRID)),
                   help="fractions of a group's min and max tried as its range ends")
    p.add_argument("--device", default="cpu")
    p.add_argument("--targets", default="none,keys,values,both", help="none, keys, values, both, qkeys, qboth "
                   "(q: keys ranked by the calibration queries' weighted error)")
    p.add_argument("--dev-windows", type=int, default=0, help="score the last N x --length tokens of pydoc "
                   "(development text) instead of --text")
    args = p.parse_args()
    fractions = parse_grid(args.grid)
    targets = args.targets.split(",")
    unknown = set(targets) - {"none", "keys", "values", "both", "qkeys", "qboth"}
    if unknown:
        raise SystemExit(f"unknown --targets {', '.join(sorted(unknown))}; choose from none, keys, values, both, qkeys, qboth")
    ck = read_checkpoint(args.checkpoint)
    if not ck.config.folded:
        raise SystemExit("the experiment needs a folded-key checkpoint (rkv calibrate's default)")
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval().to(args.device)
    tok = AutoTokenizer.from_pretrained(args.checkpoint)
    if args.dev_windows:
        ids = development_windows(load_text("pydoc"), tok, args.dev_windows, args.length)
    else:
        ids = token_windows(tok, args.text.read_text(encoding="utf-8"), args.length, args.windows)
    base = build_scheme("rotatekv", None, ck)
    fp = perplexity(model, ids, build_scheme("fp", None, ck), "oneshot", ck).perplexity
    keys = [with_search(c, SearchedKeys, fractions) for c in base.key_codecs]
    values = [with_search(c, SearchedValues, fractions) for c in base.value_codecs]
    variants = {"none": (base.key_codecs, base.value_codecs), "keys": (keys, base.value_codecs),
                "values": (base.key_codecs, values), "both": (keys, values)}  # fmt: skip
    if any(t.startswith("q") for t in targets):
        weights = query_weights(model, tok, 8, 1024)
        qkeys = [with_search(c, SearchedKeys, fractions, query_weight=w) for c, w in zip(base.key_codecs, weights)]
        variants |= {"qkeys": (qkeys, base.value_codecs), "qboth": (qkeys, values)}
    rows = []
    for protocol in args.protocols.split(","):
        for target in targets:
            kc, vc = variants[target]
            scheme = RotateKV(name=base.name, bits=base.bits, key_codecs=kc, value_codecs=vc)
            t0 = time.perf_counter()
            r = perplexity(model, ids, scheme, protocol, ck)
            row = {"searched": target, "grid": args.grid, "text": "pydoc dev" if args.dev_windows else args.text.name,
                   "protocol": protocol, "windows": ids.shape[0],
                   "length": args.length, "ppl": r.perplexity, "x_fp": r.perplexity / fp, "fp_ppl": fp,
                   "seconds": time.perf_counter() - t0}  # fmt: skip
            rows.append(row)
            report_row("per-group range search", row, args.csv)
    print_table(f"per-group range search ({args.checkpoint.name}, {args.windows} x {args.length})", rows)


if __name__ == "__main__":
    main()
