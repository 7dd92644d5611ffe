"""End to end on a LLaMA-2-7B-shaped model: fp16 transformers ``generate`` against rkv.

A random-weight model of the LLaMA-2-7B shape (32 layers, hidden 4096, 32 heads of 128, MLP
11008, vocab 32000, fp16; speed does not depend on the weights' values) runs one fixed job:
``--prompt`` random prompt tokens + ``--new`` greedy new tokens per sequence. It is calibrated
with ``rkv_convert.calibrate.run.calibrate`` on random token windows (timed: the calibration
wall time row), its value rotation fused, and then:

- **equal batch**: peak GPU memory (weights included, and without them), prefill and decode
  tokens/s of fp16 ``model.generate`` (transformers' ``DynamicCache``, SDPA) and of rkv
  (``stream_generate``: packed cache, Triton kernels, decode steps replayed from a CUDA graph;
  ``decode_tok_s`` counts every step, the first one's compilation and capture included,
  ``steady_decode_tok_s`` all but the first) at the same batch;
- **largest batch**: for each, the largest batch whose job fits in GPU memory (a first guess
  from a linear fit of peak memory over two batches, then up by 25 % steps until a job runs out
  of memory, then bisection), and the decode tokens/s there. rkv sizes its cache for the whole job at prefill, so its peak is reached
  there; at its largest batch only the first ``--largest-timed-tokens`` new tokens are timed
  (fp16's cache grows to the end, so its job runs in full).

rkv prefills in slices of ``--prefill-batch`` sequences (``stream_generate(prefill_batch=)``);
transformers prefills the whole batch in one forward, as ``generate`` does. rkv is calibrated
with ``rkv calibrate``'s defaults: the query-folded key layout (``--key-layout folded``,
``kernels.decode_folded``). ``--key-layout prerope --permutation none`` gives the pre-RoPE layout
that decodes with the chunk kernel, ``--key-layout prerope`` alone the head kernel.

The largest-batch search runs at most ``--max-tries`` jobs for rkv and ``--hf-max-tries`` for fp16
(each a full prefill at that batch), starting from the memory model: peak allocated bytes for rkv,
peak reserved bytes for fp16 (its cache grows by concatenation, and the twenty-ninth and thirtieth
sessions' H100 searches ran out of memory at batches 21-26 that its allocated bytes said would fit;
its largest is 17 there). When fp16 runs out of memory at twice ``--equal-batch`` (an 80 GB card),
its memory model is fitted over half and one ``--equal-batch``.

fp16 jobs are timed warm: each runs once untimed and then again, timed (``run_hf``), so that
transformers' growing ``DynamicCache`` finds its memory reserved, as in a steady serving loop; the
search's tries run once (only whether they fit counts) and fp16's largest batch is then timed warm.
rkv allocates its cache once per job; its ``steady_decode_tok_s`` leaves out the first step.

    python benchmarks/bench_end_to_end.py --csv benchmarks/results/end_to_end.csv
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

sys.path.insert(0, str(Path(__file__).parent))
from _random_model import calibrated_rkv, llama_config  # noqa: E402
from _timing import DEVICE, append_csv, markdown_table, print_table  # noqa: E402

from rkv_convert.calibrate.run import CalibrationOptions  # noqa: E402
from rkv_convert.calibrate.search import PERM_STATISTICS  # noqa: E402
from rkv_convert.export.format import DEFAULT_KEY_LAYOUT, KEY_LAYOUTS  # noqa: E402
from rkv_convert.runtime.generate import GenerationStats, RkvModel, SamplingOptions, stream_generate  # noqa: E402


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


class _Clock(BaseStreamer):
    """Times ``generate``: the first ``put`` is the prompt, the second the first new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        _sync()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        _sync()
        self.times.append(time.perf_counter())


def _peak_reset() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak() -> int:
    return torch.cuda.max_memory_allocated() if DEVICE.type == "cuda" else 0


def _reserved() -> int:
    """Peak bytes the caching allocator held (allocated plus its free blocks): what decides an out-of-memory."""
    return torch.cuda.max_memory_reserved() if DEVICE.type == "cuda" else 0


def run_hf(model, batch: int, prompt: int, new: int, vocab: int, warm: bool = True) -> dict[str, float]:
    """One fp16 ``generate`` job. ``warm``: the same job first runs untimed, so that the timed one finds the blocks
    of its growing ``DynamicCache`` already reserved by the caching allocator, as in a steady serving loop (a run
    right after ``empty_cache`` reserves them as the cache grows, step by step)."""
    ids = torch.randint(0, vocab, (batch, prompt), device=DEVICE)
    _peak_reset()
    for timed in ((False, True) if warm else (True,)):
        if timed and DEVICE.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        clock = _Clock()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0, streamer=clock)  # fmt: skip
    prefill = clock.times[1] - t0
    decode = clock.times[-1] - clock.times[1]
    return {"prefill_tok_s": batch * prompt / prefill, "decode_tok_s": batch * (new - 1) / decode, "peak_bytes": _peak(),
            "reserved_bytes": _reserved()}  # fmt: skip


def warm_largest(model, batch: int, single: dict[str, float], prompt: int, new: int, vocab: int) -> dict[str, float]:
    """fp16 at the largest batch its search found, timed warm; ``single`` (the search's one run, without a warm-up)
    if running the job twice in a row runs out of memory, and then it says so."""
    warm = _try(run_hf, model, batch, prompt, new, vocab)
    if warm is None:
        print(f"  fp16 batch {batch}: out of memory when run twice in a row; its single run is reported", flush=True)
    return warm or single


def largest_hf(model, job: tuple[int, int, int], probe: tuple[int, int], results: dict[int, dict], limit: int,
               max_tries: int = 6, fails_at: int | None = None) -> tuple[int, dict[str, float]]:
    """fp16 ``generate``'s largest batch for ``job`` (prompt, new, vocab) and its result: searched by
    :func:`largest_batch` on reserved bytes with one untimed run per try, then timed warm (:func:`warm_largest`);
    the ``probe`` results must already be timed warm."""
    batch, single = largest_batch(lambda b: run_hf(model, b, *job, False), probe, results, limit, max_tries,
                                  fails_at, fit="reserved_bytes")  # fmt: skip
    return batch, single if batch in probe else warm_largest(model, batch, single, *job)


def run_rkv(
    rkv: RkvModel, batch: int, prompt: int, new: int, vocab: int, prefill_batch: int, timed_tokens: int | None = None
) -> dict[str, float]:
    """One job; ``timed_tokens`` stops after that many new tokens (the cache is still sized for ``new``)."""
    ids = torch.randint(0, vocab, (batch, prompt), device=DEVICE)
    _peak_reset()
    stats = GenerationStats()
    try:
        gen = stream_generate(rkv, ids, max_new_tokens=new, sampling=SamplingOptions(temperature=0), stats=stats,
                              prefill_batch=prefill_batch)  # fmt: skip
        for i, _ in enumerate(gen):
            if timed_tokens is not None and i + 1 >= timed_tokens:
                break
        gen.close()
        peak = _peak()
    finally:
        rkv.last_cache = None
    return {"prefill_tok_s": stats.prefill_tokens_per_second, "decode_tok_s": stats.decode_tokens_per_second,
            "steady_decode_tok_s": stats.steady_decode_tokens_per_second, "decode_path": stats.decode_path,
            "peak_bytes": peak, "kv_bytes": stats.kv_bytes, "bits_per_elem": stats.bits_per_element}  # fmt: skip


def _try(fn, *args) -> dict[str, float] | None:
    """``fn(*args)``, or None when it runs out of GPU memory (its tensors freed before the next try)."""
    try:
        return fn(*args)
    except torch.OutOfMemoryError:
        pass
    gc.collect()  # outside the except block, so the traceback's frames (and their tensors) can go
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return None


def largest_batch(
    job: Callable[[int], dict], probe: tuple[int, int], results: dict[int, dict], limit: int, max_tries: int = 6,
    fails_at: int | None = None, fit: str = "peak_bytes",
) -> tuple[int, dict]:
    """The largest batch whose ``job(batch)`` runs: a first guess from a linear fit of peak memory
    at the two ``probe`` batches, then up by 25 % steps until one fails, then bisection between
    the largest success and the smallest failure (at most ``max_tries`` jobs). ``fails_at``: a batch
    already known to run out of memory (the guess stays below it). ``fit``: the results' key of bytes to fit
    (``reserved_bytes`` for fp16 ``generate``, whose concatenated cache leaves the allocator fragmented)."""
    (b1, b2) = probe
    p1, p2 = results[b1][fit], results[b2][fit]
    per_seq = max((p2 - p1) / (b2 - b1), 1.0)
    ok_b, ok_r = b2, results[b2]
    fail_b = fails_at
    guess = max(int((limit - (p1 - b1 * per_seq)) / per_seq), b2 + 1)
    if fail_b is not None:
        guess = min(guess, fail_b - 1)
    for _ in range(max_tries):
        if fail_b is not None and fail_b - ok_b <= 1:
            break
        out = _try(job, guess)
        print(f"  batch {guess}: {'ok' if out else 'out of memory'}", flush=True)
        if out is not None:
            ok_b, ok_r = guess, out
        else:
            fail_b = guess
        guess = int(guess * 1.25) + 1 if fail_b is None else (ok_b + fail_b) // 2
    return ok_b, ok_r


def _row(base: dict, impl: str, case: str, batch: int, result: dict | None, weights: int) -> dict[str, object]:
    """One table row for a job's result (None: it ran out of memory)."""
    if impl != "rkv":
        base = {**base, "permutation": "", "key_layout": ""}
    if result is None:
        return {**base, "impl": impl, "case": case, "batch": batch, "note": "out of memory"}
    return {**base, "impl": impl, "case": case, "batch": batch, "prefill_tok_s": result["prefill_tok_s"],
            "decode_tok_s": result["decode_tok_s"], "steady_decode_tok_s": result.get("steady_decode_tok_s", ""),
            "decode_path": result.get("decode_path", ""), "peak_GiB": result["peak_bytes"] / 2**30,
            "peak_minus_weights_GiB": (result["peak_bytes"] - weights) / 2**30,
            "bits_per_elem": result.get("bits_per_elem", 16.0)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--prompt", type=int, default=4096)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--equal-batch", type=int, default=8, help="batch of the side-by-side rows (and first probe)")
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--head-group", type=int, default=None, help="prerope layout: KV heads per rotation group")
    p.add_argument("--key-group", type=int, default=CalibrationOptions().key_group_size)
    p.add_argument("--value-group", type=int, default=CalibrationOptions().value_group_size)
    p.add_argument("--prefill-batch", type=int, default=8)
    p.add_argument("--key-layout", default=DEFAULT_KEY_LAYOUT, choices=KEY_LAYOUTS, help="rkv's key layout")
    p.add_argument("--permutation", default=CalibrationOptions().perm_statistic, choices=PERM_STATISTICS,
                   help="key channel grouping calibrated for rkv (prerope: none decodes with the chunk kernel)")
    p.add_argument("--max-tries", type=int, default=4, help="rkv's jobs in the largest-batch search")
    p.add_argument("--hf-max-tries", type=int, default=4,
                   help="fp16's jobs in the largest-batch search (cheaper than rkv's: fewer sequences)")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--max-batch/--no-max-batch", dest="max_batch", default=True, action=argparse.BooleanOptionalAction)
    p.add_argument("--largest-timed-tokens", type=int, default=33,
                   help="rkv at its largest batch: new tokens timed (its cache is still sized for --new; peak is reached at prefill)")
    p.add_argument("--memory-limit", type=float, default=0.95, help="share of total GPU memory a job may peak at")
    p.add_argument("--csv", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None)
    args = p.parse_args()

    cfg = llama_config(layers=args.layers, hidden=args.hidden, intermediate=args.intermediate, heads=args.heads,
                       kv_heads=args.kv_heads, vocab=args.vocab, max_positions=args.prompt + args.new)  # fmt: skip
    torch.manual_seed(0)
    dtype = torch.float16 if DEVICE.type == "cuda" else torch.float32
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    shape = f"{args.layers}L h{args.hidden} {args.heads}q/{args.kv_heads}kv"

    rkv, _, calib_s = calibrated_rkv(model, vocab=args.vocab, samples=args.calib_samples, seqlen=args.calib_seqlen,
                                     head_group=args.head_group, key_group=args.key_group,
                                     value_group=args.value_group, bits=args.bits, permutation=args.permutation,
                                     key_layout=args.key_layout)  # fmt: skip
    print(f"calibration: {calib_s:.1f} s for {args.calib_samples * args.calib_seqlen} tokens", flush=True)

    job = (args.prompt, args.new, args.vocab)
    b1, b2 = args.equal_batch, 2 * args.equal_batch
    print("warm-up (Triton compilation)", flush=True)
    run_rkv(rkv, 1, 256, 72, args.vocab, args.prefill_batch)
    hf = {b: _try(run_hf, model, b, *job) for b in (b1, b2)}
    ours = {b: _try(run_rkv, rkv, b, *job, args.prefill_batch) for b in (b1, b2)}
    base = {"model": shape, "prompt": args.prompt, "new": args.new, "bits": args.bits, "weights_GiB": weights / 2**30,
            "permutation": args.permutation, "key_layout": args.key_layout}
    rows = [_row(base, name, "equal batch", b, r, weights) for name, res in (("hf-fp16", hf), ("rkv", ours))
            for b, r in res.items()]  # fmt: skip
    for r in rows:
        rate = f"decode {r['decode_tok_s']:.0f} tok/s" if "decode_tok_s" in r else r["note"]
        print(f"  {r['impl']} at batch {r['batch']}: {rate}", flush=True)
    hf_probe, hf_fails = (b1, b2), None
    if hf[b1] is not None and hf[b2] is None and b1 > 1:  # fp16 fits fewer than b2 (an 80 GB card): probe below b1
        hf_probe, hf_fails = (b1 // 2, b1), b2
        hf[b1 // 2] = _try(run_hf, model, b1 // 2, *job, False)  # only its peak memory is used
    search = args.max_batch and DEVICE.type == "cuda"
    if search and not (all(hf[b] for b in hf_probe) and all(ours.values())):
        print("largest batch: not searched (a probe batch ran out of memory: lower --equal-batch)", flush=True)
    elif search:
        limit = int(args.memory_limit * torch.cuda.get_device_properties(0).total_memory)
        print("largest batch, fp16 (one untimed run per try; the largest is then timed warm):", flush=True)
        hb, hr = largest_hf(model, job, hf_probe, hf, limit, args.hf_max_tries, hf_fails)
        print("largest batch, rkv:", flush=True)
        rb, rr = largest_batch(lambda b: run_rkv(rkv, b, *job, args.prefill_batch, args.largest_timed_tokens),
                               (b1, b2), ours, limit, args.max_tries)  # fmt: skip
        rows += [_row(base, "hf-fp16", "largest batch", hb, hr, weights), _row(base, "rkv", "largest batch", rb, rr, weights)]
        both = max(b for b in (b1, b2) if hf.get(b) and ours.get(b))  # the largest equal batch both ran
        print(f"ratios: batch {rb / hb:.2f}x, decode tok/s at largest batch {rr['decode_tok_s'] / hr['decode_tok_s']:.2f}x, "
              f"peak memory at batch {both} {hf[both]['peak_bytes'] / ours[both]['peak_bytes']:.2f}x (weights included), "
              f"{(hf[both]['peak_bytes'] - weights) / (ours[both]['peak_bytes'] - weights):.2f}x (without)")  # fmt: skip
    rows.append({**base, "impl": "rkv", "case": "calibration", "batch": args.calib_samples,
                 "note": f"{calib_s:.1f} s, {args.calib_samples * args.calib_seqlen} tokens ({args.calib_samples} x {args.calib_seqlen})"})  # fmt: skip
    if args.csv:
        for r in rows:
            append_csv(args.csv, {**{k: "" for k in _COLUMNS}, **r, "timing": "wall" if DEVICE.type == "cuda" else "cpu-smoke"})
    print_table(f"end to end, {shape}, {args.prompt}+{args.new} tokens ({DEVICE})", rows, _COLUMNS)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown_table(rows, _COLUMNS))


_COLUMNS = ["impl", "case", "batch", "prefill_tok_s", "decode_tok_s", "steady_decode_tok_s", "decode_path", "peak_GiB", "peak_minus_weights_GiB",
            "bits_per_elem", "note", "model", "prompt", "new", "bits", "weights_GiB", "key_layout", "permutation"]  # fmt: skip

if __name__ == "__main__":
    main()
