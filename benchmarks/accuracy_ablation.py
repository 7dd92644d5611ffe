"""The accuracy ablation of docs/accuracy.md, in one command.

    python benchmarks/accuracy_ablation.py --out rkv-out/ablation            # GPU: ~5 min; CPU: hours

Calibrates SmolLM2-135M-Instruct on Python's own docs (``pydoc``) once per distinct option set,
then scores every variant of :func:`rkv_convert.evaluate.variants.default_variants` on the
first ``--windows`` windows of WikiText-2 test, and the main methods on a second domain
(installed Python packages' READMEs, see ``package_docs_text``), at 2, 3 and 4 bits in the
oneshot / sinks / deployed protocols. Writes ``ablation.json`` (every row and the setup),
``ablation.md`` (the tables) and ``rows.jsonl`` (rows as they come, survives a time-out).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import sysconfig
import time
from pathlib import Path

import torch

from rkv_convert.calibrate.run import CalibrationOptions
from rkv_convert.calibration_data.sources import development_windows, load_text, sample_batches
from rkv_convert.evaluate.ablation import run_ablation
from rkv_convert.evaluate.ablation_report import env_summary, markdown_table, selection_table
from rkv_convert.evaluate.domains import package_docs_text
from rkv_convert.evaluate.variants import ABLATION_BASE, default_variants, long_context_variants, second_domain_variants
from rkv_convert.evaluate.perplexity import token_windows
from rkv_convert.models.loading import DEFAULT_MODEL, load_model

WIKITEXT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--text", type=Path, default=WIKITEXT, help="WikiText-2 wiki.test.raw")
    p.add_argument("--second-text", type=Path, default=None,
                   help="second-domain text file (default: built from this Python's site-packages READMEs)")
    p.add_argument("--windows", type=int, default=24)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--bits", default="2,3,4")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--only", default="", help="comma list of variant names to keep (quick checks)")
    p.add_argument("--no-second", action="store_true", help="skip the second domain")
    p.add_argument("--dev-windows", type=int, default=16,
                   help="windows of held-out calibration-source text on which defaults are re-chosen (0: keep the defaults)")
    p.add_argument("--rows", choices=("default", "long"), default="default",
                   help="default: every component; long: sinks and window rows (issue 12), e.g. with --length 8192 --windows 2")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    log_file = (args.out / "log.txt").open("w")

    def log(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    bits_list = [int(b) for b in args.bits.split(",")]
    options = ABLATION_BASE
    loaded = load_model(args.model, torch.float32, args.device)
    tok = loaded.tokenizer
    cal = sample_batches(load_text(options.source), tok, options.num_samples, options.seqlen, options.seed)

    keep = {s.strip() for s in args.only.split(",") if s.strip()}

    def pick(make):
        def variants(base):
            vs = make(base)
            return [v for v in vs if v.name in keep or v.scheme == "fp" or v.name == "RotateKV default"] if keep else vs
        return variants

    wiki_text = args.text.read_text(encoding="utf-8")
    rows_of = long_context_variants if args.rows == "long" else default_variants
    texts = {"WikiText-2 test": (token_windows(tok, wiki_text, args.length, args.windows), pick(rows_of))}
    dev = None
    if args.dev_windows:
        # development text for choosing defaults: the last windows of the calibration source (never the evaluation text)
        dev = development_windows(load_text(options.source), tok, args.dev_windows, args.length)
    setup = {
        "model": args.model, "calibration": {**options.__dict__}, "windows": args.windows, "length": args.length,
        "texts": {"WikiText-2 test": {"path": str(args.text), "sha256": hashlib.sha256(wiki_text.encode()).hexdigest()}},
        "dev": f"last {args.dev_windows} × {args.length} tokens of '{options.source}'" if dev is not None else None,
        "env": env_summary(), "command": " ".join(sys.argv),
    }
    if not args.no_second:
        if args.second_text:
            second = args.second_text.read_text(encoding="utf-8")
            origin = str(args.second_text)
        else:
            origin = sysconfig.get_paths()["purelib"]
            second = package_docs_text(origin)
        label = "package READMEs"
        texts[label] = (token_windows(tok, second, args.length, args.windows), pick(second_domain_variants))
        setup["texts"][label] = {"origin": origin, "sha256": hashlib.sha256(second.encode()).hexdigest(),
                                 "chars": len(second)}
    log(f"setup: {json.dumps(setup)}")
    jsonl = (args.out / "rows.jsonl").open("w")

    def on_row(row: dict) -> None:
        jsonl.write(json.dumps(row) + "\n")
        jsonl.flush()

    start = time.perf_counter()
    rows, chosen, trail = run_ablation(loaded.model, cal, texts, bits_list, args.batch_size, options, log, on_row, dev)
    setup["seconds"] = round(time.perf_counter() - start, 1)
    setup["chosen"] = {k: v for k, v in chosen.items()}
    (args.out / "ablation.json").write_text(
        json.dumps({"setup": setup, "selection": trail, "rows": rows}, indent=2) + "\n")
    md = "\n".join(markdown_table(rows, label, bits_list) for label in texts)
    md += "\n" + selection_table(trail, chosen)
    (args.out / "ablation.md").write_text(md)
    log(f"done in {setup['seconds']} s → {args.out}")


if __name__ == "__main__":
    main()
