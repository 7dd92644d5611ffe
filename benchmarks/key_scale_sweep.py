"""Issue 12: `rkv calibrate --key-scale E` for several exponents, each exported with `rkv export`'s defaults, scored
on development text (how the default exponent is chosen) and on an evaluation text at two window lengths.

For each exponent: ``rkv calibrate MODEL --key-scale E`` and ``rkv export`` (the commands a user runs; one export per
``--export-variants`` entry), then
perplexity of full precision and of the exported store (``rkv eval``'s ``rotatekv`` at the checkpoint's own
widths): on the last ``--dev-windows`` x 1,024 tokens of ``pydoc`` (the defaults' development text; sinks protocol,
what the defaults' rule compares), and on ``--text`` windows of 1,024 and 8,192 tokens (one-shot and deployed).
Prints a table and appends rows to ``--csv``.

    python benchmarks/key_scale_sweep.py --text ../shared/data/wikitext-2-raw/wiki.test.raw --device cuda
    python benchmarks/key_scale_sweep.py --text ... --exponents 1 --export-variants ";--group-ranges searched"
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import print_table, report_row  # noqa: E402

from rkv_convert.calibration_data.sources import development_windows, load_text  # noqa: E402
from rkv_convert.evaluate.perplexity import perplexity, token_windows  # noqa: E402
from rkv_convert.evaluate.schemes import build_scheme  # noqa: E402
from rkv_convert.export.format import read_checkpoint  # noqa: E402


def _rkv(*args: str) -> None:
    print("$ rkv " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "rkv_convert.cli", *args], check=True)


def _score(args: argparse.Namespace, ck_dir: Path, text: str, lengths: list[int], counts: list[int], exponent: float,
           export_args: str, calibrate_s: float) -> list[dict]:
    """Rows of one exported checkpoint: dev text in three protocols, ``--text`` windows one-shot and deployed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ck = read_checkpoint(ck_dir)
    model = AutoModelForCausalLM.from_pretrained(ck_dir, dtype=torch.float32).to(args.device).eval()
    tok = AutoTokenizer.from_pretrained(ck_dir)
    cases = [("pydoc dev", development_windows(load_text("pydoc"), tok, args.dev_windows, 1024), ("sinks", "oneshot", "deployed"))
             ] if args.dev_windows else []  # fmt: skip
    cases += [(args.text.name, token_windows(tok, text, n, c), ("oneshot", "deployed")) for n, c in zip(lengths, counts)]
    rows = []
    for where, ids, protocols in cases:
        fp = perplexity(model, ids, build_scheme("fp", None, ck), "oneshot", ck).perplexity
        for protocol in protocols:
            r = perplexity(model, ids, build_scheme("rotatekv", None, ck), protocol, ck)
            row = {"exponent": exponent, "calibrate_args": args.calibrate_args, "export_args": export_args,
                   "group_ranges": ck.config.group_ranges, "text": where, "windows": ids.shape[0], "length": ids.shape[1],
                   "protocol": protocol, "ppl": r.perplexity, "fp_ppl": fp, "x_fp": r.perplexity / fp,
                   "key_bits": r.key_bits, "calibrate_s": round(calibrate_s, 1), "device": args.device}  # fmt: skip
            rows.append(row)
            report_row("key scale sweep", row, args.csv)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--exponents", default="0,0.5,1")
    p.add_argument("--text", type=Path, required=True, help="evaluation text (never used to choose)")
    p.add_argument("--lengths", default="1024,8192")
    p.add_argument("--windows", default="24,4", help="windows per length")
    p.add_argument("--dev-windows", type=int, default=4, help="development windows (0: none)")
    p.add_argument("--work", type=Path, default=Path("rkv-out/key-scale"), help="artifacts and checkpoints go here")
    p.add_argument("--calibrate-args", default="", help="more `rkv calibrate` options, e.g. --no-learn-rotation")
    p.add_argument("--export-variants", default="", help="';'-separated `rkv export` options, one checkpoint each from "
                   "the same calibration, e.g. ';--group-ranges searched' (the defaults, then searched group ranges)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--csv", type=Path, default=Path("benchmarks/results/key_scale_sweep.csv"))
    args = p.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    counts = [int(x) for x in args.windows.split(",")]
    text = args.text.read_text(encoding="utf-8")
    rows = []
    for exponent in [float(e) for e in args.exponents.split(",")]:
        cal = args.work / f"cal_{exponent:g}"
        t0 = time.perf_counter()
        _rkv("calibrate", args.model, "--out", str(cal), "--device", args.device, "--key-scale", f"{exponent:g}",
             "--overwrite", *args.calibrate_args.split())  # fmt: skip
        calibrate_s = time.perf_counter() - t0
        for v, export_args in enumerate(args.export_variants.split(";")):
            ck_dir = args.work / f"ck_{exponent:g}_{v}"
            _rkv("export", "--calibration", str(cal), "--model", args.model, "--out", str(ck_dir), "--overwrite",
                 *export_args.split())  # fmt: skip
            rows += _score(args, ck_dir, text, lengths, counts, exponent, export_args, calibrate_s)
    print_table("rkv calibrate --key-scale E, rkv export (defaults, or --export-variants)", rows)


if __name__ == "__main__":
    main()
