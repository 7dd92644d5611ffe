"""Experiment (issue 12): symmetric 2-bit keys in groups of 32 against the default asymmetric groups of 64.

Both store 2.5 bits per key element: the default keeps an fp16 scale and an fp16 zero per 64
channels (2 + 32/64); the symmetric code keeps only an fp16 scale per 32 channels (2 + 16/32). The
folded keys are centred by the calibrated mean and rotated, so they are close to symmetric around 0,
and halving the group halves the range each scale covers. Levels ``(c - 1.5) * s`` for codes
``c = 0..3``, ``s = clip * max|y| / 1.5`` per group. Values are unchanged (the checkpoint's codec).

Scores WikiText-2 test windows with ``evaluate.perplexity`` on an exported folded checkpoint, in the
one-shot and deployed protocols, for the default keys and for symmetric keys at a few clips (no clip
is chosen here: nothing is selected on the evaluation text). The runtime cannot run this code: it
would need a format and kernel change, so it is an experiment, not an option.

    python benchmarks/exp_symmetric_keys.py rkv-out/checkpoint --text ../shared/data/wikitext-2-raw/wiki.test.raw --windows 8
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import print_table, report_row  # noqa: E402
from _experiment import experiment_parser  # noqa: E402

from rkv_convert.evaluate.checkpoints import clip_tables  # noqa: E402
from rkv_convert.evaluate.perplexity import perplexity, token_windows  # noqa: E402
from rkv_convert.evaluate.schemes import RotateKV, build_scheme  # noqa: E402
from rkv_convert.export.format import read_checkpoint  # noqa: E402
from rkv_convert.quant.codec import FoldedKeyCodec  # noqa: E402


def symmetric_roundtrip(y: torch.Tensor, group: int, clip: float) -> torch.Tensor:
    """``y [..., C]`` through 2-bit symmetric codes per ``group`` channels (fp16 scale), dequantized."""
    g = y.float().reshape(*y.shape[:-1], -1, group)
    scale = (g.abs().amax(-1, keepdim=True) * clip / 1.5).clamp_min(1e-8).half().float()
    codes = (g / scale + 2.0).floor().clamp(0, 3)  # nearest of (c - 1.5) * s: boundaries at y/s = -1, 0, 1
    return ((codes - 1.5) * scale).reshape(y.shape)


@dataclass
class SymmetricFoldedKeys(FoldedKeyCodec):
    """A folded key codec whose quantizer is :func:`symmetric_roundtrip` (same transform, other code)."""

    sym_group: int = 32
    sym_clip: float = 1.0

    def roundtrip(self, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        y = symmetric_roundtrip(self.fold(k, cos, sin), self.sym_group, self.sym_clip)
        return self.unfold(y, cos, sin, k.dtype)


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = experiment_parser(__doc__.split("\n")[0])
    p.add_argument("--clips", default="0.8,0.9,1.0")
    args = p.parse_args()
    ck = read_checkpoint(args.checkpoint)
    if not ck.config.folded:
        raise SystemExit("the experiment needs a folded-key checkpoint (rkv calibrate's default)")
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.checkpoint)
    ids = token_windows(tok, args.text.read_text(encoding="utf-8"), args.length, args.windows)
    base = build_scheme("rotatekv", 2, ck, clip_tables(args.checkpoint, ck.config.num_layers))
    fp = perplexity(model, ids, build_scheme("fp", None, ck), "oneshot", ck).perplexity
    rows = []
    for protocol in args.protocols.split(","):
        variants = [("asymmetric g64 (default)", base)]
        for clip in (float(c) for c in args.clips.split(",")):
            codecs = [SymmetricFoldedKeys(c.mean, c.rotation, c.perm, c.bits, c.group_size, c.clip, c.head_rotation,
                                          sym_group=32, sym_clip=clip) for c in base.key_codecs]  # fmt: skip
            variants.append((f"symmetric g32, clip {clip}", RotateKV(name="rotatekv", bits=2, key_codecs=codecs,
                                                                     value_codecs=base.value_codecs)))  # fmt: skip
        for label, scheme in variants:
            r = perplexity(model, ids, scheme, protocol, ck)
            row = {"keys": label, "protocol": protocol, "windows": args.windows, "length": args.length,
                   "key_bits_per_elem": 2.5, "ppl": r.perplexity, "x_fp": r.perplexity / fp, "fp_ppl": fp}  # fmt: skip
            rows.append(row)
            report_row("symmetric keys", row, args.csv)
    print_table("symmetric keys (2-bit keys, 2.5 bits per element both ways)", rows)


if __name__ == "__main__":
    main()
