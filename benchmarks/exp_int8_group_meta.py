"""Experiment (issue 12): 8-bit group metadata, and the quarter bit it frees spent on 3-bit keys.

Every group of 64 channels stores an fp16 scale and zero today: 2 + 32/64 = 2.5 bits per element.
Here scale and zero take 8 bits each (2 + 16/64 = 2.25 bits), which at the same 2.5 bits on
average pays for 3-bit keys in half of the layers. The codes come from the library's quantizer
(``rkv_convert.quant.quantizer``: the same clipped range, the same rounding formula, ``dequantize``);
only the stored scale and zero change:

- **scale**: ``s' = base * 2**(e/16)``, ``e`` uint8, ``base`` one fp32 per layer, K/V and width,
  set on calibration text (``pydoc``) so that ``e = 255`` is 4x the largest scale seen there (the
  range then reaches 4 / 2**15.9 of that maximum at ``e = 0``). The step is 4.4 %. ``e`` is the
  nearest exponent in the log domain (``--scale-rounding nearest``) or the one above (``up``,
  the range always covered); the script measures both on calibration rows and uses the one with
  the lower reconstruction error (``auto``). Rounding up costs about 4.5 % more squared error inside
  the range; nearest moves the range ends by at most 2.2 %, like a clip change smaller than the clip
  search's step (the searched clips, 0.65-0.9, already cut the ends).
- **zero**: ``z' = s' * z / 4``, ``z`` int8. Inside the range the rounding error does not depend on
  where the grid lies, so the zero needs only enough precision to place the range ends: ``z`` is
  chosen to keep the centre of the grid (``zero + L*s/2``, ``L = 2**bits - 1``) where the fp16
  code had it, within ``s'/8``.
- **codes** are computed against the stored ``(s', z')`` (``round((x - z') / s')``, clamped), so the
  encoder absorbs the metadata rounding instead of decoding fp16-exact codes with inexact metadata.

Which layers get 3-bit keys is chosen on development text only (never WikiText): the KVTuner-style
sensitivity of ``rkv_convert.calibrate.allocate`` restricted to keys (all at 2 bits with 8-bit
metadata, one layer's keys at 3 bits at a time, mean NLL on the last 4 x 512 tokens of ``pydoc``,
sinks protocol), then ``allocate_bits`` at a budget that raises at most half the key layers. The
3-bit layers use their checkpoint's 3-bit clips (searched with fp16 metadata; not searched again).

Scores WikiText-2 test windows with ``evaluate.perplexity`` on an exported folded checkpoint, one-shot
and deployed: (1) the default, (2) 8-bit metadata at 2 bits, (3) 8-bit metadata with 3-bit keys in the
chosen layers, (4) fp16 metadata with the same layers. The runtime cannot run (2)-(3): it would need a
format and kernel change, so this is an experiment, not an option.

    OMP_NUM_THREADS=1 python benchmarks/exp_int8_group_meta.py CK --text ../shared/data/wikitext-2-raw/wiki.test.raw \\
        --windows 8 --csv benchmarks/results/exp_int8_group_meta.csv
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import append_csv, print_table  # noqa: E402
from _experiment import experiment_parser  # noqa: E402

from rkv_convert.calibrate.allocate import Sensitivity, allocate_bits  # noqa: E402
from rkv_convert.calibration_data.sources import development_windows, load_text, sample_batches  # noqa: E402
from rkv_convert.evaluate.checkpoints import clip_tables  # noqa: E402
from rkv_convert.evaluate.perplexity import perplexity, token_windows  # noqa: E402
from rkv_convert.evaluate.schemes import RotateKV, build_scheme, key_codecs, value_codecs  # noqa: E402
from rkv_convert.export.format import Checkpoint, read_checkpoint  # noqa: E402
from rkv_convert.quant.codec import FoldedKeyCodec, ValueCodec  # noqa: E402
from rkv_convert.quant.quantizer import QuantizedTensor, dequantize, levels, quantize  # noqa: E402
from rkv_convert.runtime.ops import apply_rope  # noqa: E402

EXP_STEPS = 16  # scale codes per octave: s' = base * 2**(e/16)
HEADROOM = 4.0  # e = 255 is this multiple of the largest scale seen on calibration text
CLAMPS = {"groups": 0, "scale": 0, "zero": 0}  # metadata codes that hit their range (reported, not used)


def meta8_base(max_range: float, bits: int, clip: float) -> float:
    """``base`` so that ``e = 255`` is :data:`HEADROOM` x the largest clipped scale ``clip*max_range/L``."""
    return HEADROOM * max(clip * max_range / levels(bits), 2.0**-14) / 2.0 ** (255 / EXP_STEPS)


def meta8_roundtrip(y: torch.Tensor, bits: int, group: int, clip: float, base: float, rounding: str) -> torch.Tensor:
    """``y [..., C]`` through the library's quantizer with scale and zero stored in 8 bits each, dequantized."""
    q = quantize(y, bits, group, clip)  # the library's range: fp16 scale and zero of each group
    s, z = q.scale.float(), q.zero.float()
    e = EXP_STEPS * torch.log2(s / base)
    e = (e.ceil() if rounding == "up" else e.round()).clamp(0, 255)
    s8 = base * torch.exp2(e / EXP_STEPS)
    centre = z + levels(bits) * s / 2
    zc = (4 * (centre - levels(bits) * s8 / 2) / s8).round().clamp(-128, 127)
    z8 = s8 * zc / 4
    CLAMPS["groups"] += s.numel()
    CLAMPS["scale"] += int(((e == 0) | (e == 255)).sum())
    CLAMPS["zero"] += int(((zc == -128) | (zc == 127)).sum())
    g = y.float().reshape(*y.shape[:-1], -1, group)
    codes = ((g - z8.unsqueeze(-1)) * (1.0 / s8).unsqueeze(-1)).round().clamp_(0, levels(bits)).to(torch.uint8)
    return dequantize(QuantizedTensor(codes.reshape(y.shape), s8, z8, bits, group), torch.float32)


@dataclass
class Meta8FoldedKeys(FoldedKeyCodec):
    """Folded key codec with 8-bit group metadata (:func:`meta8_roundtrip`)."""

    base: float = 1.0
    rounding: str = "nearest"

    def roundtrip(self, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        yq = meta8_roundtrip(self.fold(k, cos, sin), self.bits, self.group_size, self.clip, self.base, self.rounding)
        return self.unfold(yq, cos, sin, k.dtype)


@dataclass
class Meta8Values(ValueCodec):
    """Value codec with 8-bit group metadata."""

    base: float = 1.0
    rounding: str = "nearest"

    def roundtrip(self, v: torch.Tensor) -> torch.Tensor:
        return meta8_roundtrip(v, self.bits, self.group_size, self.clip, self.base, self.rounding).to(v.dtype)


@dataclass
class MixedMeta(RotateKV):
    """RotateKV whose stored bits count 8-bit metadata where a codec has it (``b + 16/g``, else ``b + 32/g``)."""

    def bits_per_element(self) -> tuple[float, float]:
        def cost(cs: list) -> float:
            meta = [16 if isinstance(c, (Meta8FoldedKeys, Meta8Values)) else 32 for c in cs]
            return sum(c.bits + m / c.group_size for c, m in zip(cs, meta)) / len(cs)

        return cost(self.key_codecs), cost(self.value_codecs)


@dataclass
class _Recorder(RotateKV):
    """Full-precision reads that keep each layer's folded keys ``y`` and values (calibration rows)."""

    ys: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    vs: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    def keys(self, layer, k_pre, cos, sin):
        y = self.key_codecs[layer].fold(k_pre.float(), cos, sin)
        self.ys.setdefault(layer, []).append(y.reshape(-1, y.shape[-1]))
        return apply_rope(k_pre, cos.unsqueeze(1), sin.unsqueeze(1)).to(k_pre.dtype)

    def bits_per_element(self) -> tuple[float, float]:
        return 16.0, 16.0

    def values(self, layer, v):
        self.vs.setdefault(layer, []).append(v.float().transpose(1, 2).reshape(-1, v.shape[1] * v.shape[3]))
        return v


@dataclass
class Setup:
    """Everything the variants are built from."""

    ck: Checkpoint
    clips: dict[str, list[torch.Tensor]]
    key_range: list[float]  # per layer: largest unclipped group range of folded keys on calibration rows
    value_range: list[float]
    rounding: str = "nearest"

    def scheme(self, key_bits: list[int], meta8: bool) -> RotateKV:
        """Values at 2 bits, keys at ``key_bits`` per layer, 8-bit or fp16 metadata; each width's own clips."""
        at = {b: key_codecs(self.ck, b, [float(t[b - 2]) for t in self.clips["key"]]) for b in set(key_bits)}
        kc = [at[b][i] for i, b in enumerate(key_bits)]
        vc = value_codecs(self.ck, 2, [float(t[0]) for t in self.clips["value"]])
        if meta8:
            kc = [Meta8FoldedKeys(c.mean, c.rotation, c.perm, c.bits, c.group_size, c.clip, c.head_rotation,
                                  base=meta8_base(self.key_range[i], c.bits, c.clip), rounding=self.rounding)
                  for i, c in enumerate(kc)]  # fmt: skip
            vc = [Meta8Values(c.bits, c.group_size, c.clip, base=meta8_base(self.value_range[i], c.bits, c.clip),
                              rounding=self.rounding) for i, c in enumerate(vc)]  # fmt: skip
        return MixedMeta(name="rotatekv", bits=2, key_codecs=kc, value_codecs=vc)


def calibrate_meta(model: torch.nn.Module, setup: Setup, cal: torch.Tensor) -> list[dict[str, object]]:
    """Per-layer scale ranges from calibration rows; relative squared error of fp16 / 8-bit (up, nearest) metadata."""
    rec = _Recorder(name="rotatekv", bits=2, key_codecs=build_scheme("rotatekv", 2, setup.ck).key_codecs,
                    value_codecs=None)  # fmt: skip
    perplexity(model, cal, rec, "oneshot", setup.ck)
    n = setup.ck.config.num_layers
    ys = [torch.cat(rec.ys[i]) for i in range(n)]
    vs = [torch.cat(rec.vs[i]) for i in range(n)]
    group = setup.ck.config.key_group_size

    def span(x: torch.Tensor) -> float:
        g = x.reshape(x.shape[0], -1, group)
        return float((g.amax(-1) - g.amin(-1)).max())

    setup.key_range, setup.value_range = [span(y) for y in ys], [span(v) for v in vs]
    rows = []
    for what, xs, ranges, bits in (("keys", ys, setup.key_range, 2), ("keys", ys, setup.key_range, 3),
                                   ("values", vs, setup.value_range, 2)):  # fmt: skip
        err = {"fp16": 0.0, "up": 0.0, "nearest": 0.0}
        for i, x in enumerate(xs):
            clip = float(setup.clips["key" if what == "keys" else "value"][i][bits - 2])
            ref = float(x.square().sum())
            err["fp16"] += float((dequantize(quantize(x, bits, group, clip)) - x).square().sum()) / ref / n
            for r in ("up", "nearest"):
                xq = meta8_roundtrip(x, bits, group, clip, meta8_base(ranges[i], bits, clip), r)
                err[r] += float((xq - x).square().sum()) / ref / n
        rows.append({"rows": f"{what} {bits}b", **{f"rel_sq_err_{k}": v for k, v in err.items()}})
    return rows


def key_sensitivity(model: torch.nn.Module, setup: Setup, dev: torch.Tensor, log) -> Sensitivity:
    """``calibrate.allocate.measure_sensitivity`` for keys only, in the 8-bit-metadata store (sinks protocol)."""
    n = setup.ck.config.num_layers

    def nll(key_bits: list[int]) -> float:
        result = perplexity(model, dev, setup.scheme(key_bits, True), "sinks", setup.ck, batch_size=4)
        return math.log(result.perplexity)

    t0 = time.perf_counter()
    base = nll([2] * n)
    gains = []
    for layer in range(n):
        gains.append(base - nll([3 if i == layer else 2 for i in range(n)]))
        log(f"[sensitivity] k{layer} at 3 bits: NLL gain {gains[-1]:+.5f} ({time.perf_counter() - t0:.0f} s)")
    return Sensitivity(2, 3, base, gains, [0.0] * n, "sinks", int(dev.numel()))


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = experiment_parser(__doc__.split("\n")[0])
    p.add_argument("--cal-windows", type=int, default=4, help="pydoc calibration windows (seed 0) for the scale bases")
    p.add_argument("--dev-windows", type=int, default=4, help="last N x 512 pydoc tokens for the layer choice")
    p.add_argument("--key3-layers", default=None, help="comma list: skip the dev-text choice (e.g. to re-score)")
    p.add_argument("--scale-rounding", choices=("auto", "up", "nearest"), default="auto")
    args = p.parse_args()
    torch.set_num_threads(1)
    started, cpu_started = time.perf_counter(), time.process_time()
    ck = read_checkpoint(args.checkpoint)
    if not ck.config.folded or ck.config.key_group_size != ck.config.head_dim:
        raise SystemExit("the experiment needs a folded-key checkpoint with one key group per head "
                         "(rkv calibrate's default)")
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.checkpoint)
    n = ck.config.num_layers
    setup = Setup(ck, clip_tables(args.checkpoint, n), [], [])
    pydoc = load_text("pydoc")

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {msg}", flush=True)

    meta_rows = calibrate_meta(model, setup, sample_batches(pydoc, tok, args.cal_windows, 512, 0))
    print_table("relative squared error of the stored rows (calibration text), mean over layers", meta_rows)
    setup.rounding = args.scale_rounding
    if setup.rounding == "auto":
        setup.rounding = min(("up", "nearest"), key=lambda r: sum(row[f"rel_sq_err_{r}"] for row in meta_rows))
    log(f"scale rounding: {setup.rounding}; key ranges {min(setup.key_range):.3g}-{max(setup.key_range):.3g}, "
        f"value ranges {min(setup.value_range):.3g}-{max(setup.value_range):.3g}")  # fmt: skip

    if args.key3_layers is None:
        dev = development_windows(pydoc, tok, args.dev_windows, 512)
        sens = key_sensitivity(model, setup, dev, log)
        budget = 2.5 + (n // 2) / (2 * n) + 1e-9  # fp16-metadata accounting of allocate_bits: half the key layers
        raised = allocate_bits(sens, budget, ck.config.key_group_size, ck.config.value_group_size).raised
        key3 = sorted(int(r[1:]) for r in raised)
        log(f"dev NLL at 2 bits {sens.base_nll:.4f}; 3-bit key layers by gain: {raised}")
    else:
        key3 = [int(x) for x in args.key3_layers.split(",")]
    key_bits = [3 if i in key3 else 2 for i in range(n)]

    ids = token_windows(tok, args.text.read_text(encoding="utf-8"), args.length, args.windows)
    fp = perplexity(model, ids, build_scheme("fp", None, ck), "oneshot", ck)
    log(f"FP {fp.perplexity:.3f} ({fp.seconds:.0f} s)")
    variants = [
        ("default: fp16 metadata, K2 V2", build_scheme("rotatekv", 2, ck, setup.clips)),
        ("8-bit metadata, K2 V2", setup.scheme([2] * n, True)),
        (f"8-bit metadata, K3 in {len(key3)} layers, V2", setup.scheme(key_bits, True)),
        (f"fp16 metadata, K3 in {len(key3)} layers, V2", setup.scheme(key_bits, False)),
    ]
    rows = []
    for protocol in args.protocols.split(","):
        for label, scheme in variants:
            r = perplexity(model, ids, scheme, protocol, ck)
            kb, vb = scheme.bits_per_element()
            row = {"variant": label, "protocol": protocol, "windows": args.windows, "length": args.length,
                   "key_bits_per_elem": kb, "value_bits_per_elem": vb, "bits_per_elem": (kb + vb) / 2,
                   "ppl": r.perplexity, "x_fp": r.perplexity / fp.perplexity, "fp_ppl": fp.perplexity,
                   "seconds": r.seconds, "cpu_seconds": r.cpu_seconds, "scale_rounding": setup.rounding,
                   "key3_layers": " ".join(map(str, key3))}  # fmt: skip
            rows.append(row)
            log(f"{label} / {protocol}: {r.perplexity:.3f} ({r.perplexity / fp.perplexity:.3f}x FP, {r.seconds:.0f} s)")
            if args.csv:
                append_csv(args.csv, row)
    columns = ["variant", "protocol", "key_bits_per_elem", "value_bits_per_elem", "bits_per_elem", "ppl", "x_fp", "seconds"]
    print_table("8-bit group metadata (WikiText-2 test)", rows, columns)
    log(f"metadata codes at their range ends: scale {CLAMPS['scale']} / zero {CLAMPS['zero']} "
        f"of {CLAMPS['groups']} groups")
    log(f"done: {time.perf_counter() - started:.0f} s wall, {time.process_time() - cpu_started:.0f} s CPU")


if __name__ == "__main__":
    main()
