"""Load test of ``rkv serve``: N concurrent streaming clients on loopback, and fp16 ``generate`` for comparison.

The server runs in a child process (its own interpreter: the client load does not share its GIL)
on a free loopback port, serving either an exported checkpoint (``--checkpoint``) or a random-weight
model of the LLaMA-2-7B shape (``--shape llama2-7b``, the default; calibrated on random tokens,
speed does not depend on the weights' values; prompts are random token ids and a word-per-id
tokenizer decodes them, EOS disabled so that every request runs ``--new`` tokens). ``--shape tiny``
is a two-layer model for checking the script on a CPU.

``--clients`` clients (asyncio + httpx, bounded) stream ``/v1/completions`` until ``--requests``
requests were sent or ``--duration`` seconds passed. Reported: requests/s, generated tokens/s, p50 and
p99 time to first token (TTFT) and inter-token latency (ITL), requests rejected by design (429/503)
and requests that failed (any other status, a transport error, a stream without ``[DONE]``; the
target is none). ``--check-alone`` first sends every distinct prompt alone, greedy, and counts the
accepted requests under load whose text differs (the target is none).

``--mode hf`` (or ``both``) runs fp16 transformers ``generate`` on the same model with static
batches: the largest batch that fits (searched as in ``bench_end_to_end.py``, or ``--hf-batch``)
doing the same job (``--prompt`` + ``--new`` greedy tokens), generated tokens/s over prefill and
decode, timed warm (``bench_end_to_end.run_hf``: the job runs once untimed first). ``both`` gives
two ratios, rkv served / fp16: generated tokens/s over the whole job (``ratio_tok_s``; prefill costs
the same per token in both and dominates 4k-token prompts with 128 new tokens) and decode tokens/s
(``ratio_decode_tok_s``: the server's own decode-step timing from ``/health`` against ``generate``'s
decode phase). Rows go to ``--csv`` with GPU name, versions, date.

On the H200 (the issue's target: 4k-token prompts, 128 new tokens, >= 5x fp16 tokens/s):

    python benchmarks/bench_serve.py --mode both --shape llama2-7b --prompt 4096 --new 128 \\
        --clients 256 --requests 512 --duration 420 --csv benchmarks/results/serve.csv

On a CPU (overload check: 4x the queue, only 429s, accepted requests as alone):

    python benchmarks/bench_serve.py --shape tiny --prompt 64 --new 16 --clients 32 --requests 32 \\
        --max-batch 4 --max-queue 8 --check-alone --csv benchmarks/results/serve.csv
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing as mp
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import DEVICE, append_csv, print_table  # noqa: E402

SHAPES = {
    "llama2-7b": dict(layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000),
    "tiny": dict(layers=2, hidden=256, intermediate=512, heads=4, kv_heads=2, vocab=512),
}
MODEL_NAME = "bench"


# ----- the model (random shape or checkpoint) ----------------------------------------------------
def _word_tokenizer(vocab: int):
    """A tokenizer whose id i is the word ``w<i>``: random ids decode to one piece per token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")


def _random_model(shape: str, max_positions: int):
    from transformers import AutoModelForCausalLM

    from _random_model import llama_config

    cfg = llama_config(**SHAPES[shape], max_positions=max_positions)
    cfg.eos_token_id = None  # random weights: never stop early, every request runs its max_tokens
    torch.manual_seed(0)
    dtype = torch.float16 if DEVICE.type == "cuda" else torch.float32
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    return model


def _rkv_model(args):
    """The served model: the checkpoint, or the random shape calibrated on random tokens."""
    if args.checkpoint is not None:
        import rkv_convert

        return rkv_convert.load(args.checkpoint)
    from _random_model import calibrated_rkv

    vocab = SHAPES[args.shape]["vocab"]
    model = _random_model(args.shape, args.prompt + args.new)
    # the default (folded) key layout: one Hadamard per KV head (head groups of 1), 2 bits, groups of 64
    rkv, _, _ = calibrated_rkv(model, vocab=vocab, samples=8, seqlen=min(512, args.prompt), head_group=1,
                               key_group=64, value_group=64, bits=2)  # fmt: skip
    rkv.tokenizer = _word_tokenizer(vocab)
    return rkv


def _serve(args, port: int) -> None:
    """Child process: build the model and serve it on 127.0.0.1:port until terminated."""
    import signal

    import uvicorn

    from rkv_convert.serve.serve_cli import ServerOptions, build_server

    rkv = _rkv_model(args)
    options = ServerOptions(max_batch=args.max_batch, cache_memory_gib=args.cache_memory, max_queue=args.max_queue,
                            max_model_len=args.prompt + args.new, default_max_tokens=args.new, model_name=MODEL_NAME,
                            prefill_tokens_per_step=args.prefill_tokens, cuda_graph=args.cuda_graph)  # fmt: skip
    app, worker = build_server(rkv, options)
    print(f"server: {worker.engine.max_batch} rows, queue {args.max_queue}, decode steps: {worker.engine.decode_path}",
          flush=True)  # fmt: skip
    signal.signal(signal.SIGTERM, lambda *_: None)  # uvicorn drains, then re-raises it: end cleanly
    try:
        uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")).run()
    finally:
        worker.stop()


# ----- the client load ---------------------------------------------------------------------------
@dataclass
class Record:
    index: int = 0  # which prompt
    status: int | None = None
    ok: bool = False
    sent: float = 0.0
    token_times: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    text: str = ""
    error: str = ""


async def _one(client, index: int, prompt: list[int], new: int) -> Record:
    import httpx

    rec = Record(index=index, sent=time.perf_counter())
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": new, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            rec.status = response.status_code
            if response.status_code != 200:
                rec.error = (await response.aread()).decode(errors="replace")[:200]
                return rec
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    rec.ok = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    rec.error = chunk["error"]["message"]
                    break
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    rec.token_times.append(time.perf_counter())
                    rec.text += chunk["choices"][0]["text"]
                if chunk.get("usage"):
                    rec.completion_tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as err:
        rec.error = f"{type(err).__name__}: {err}"
    return rec


async def _load(url: str, prompts: list[list[int]], args) -> tuple[list[Record], float]:
    """``args.clients`` workers stream the prompts (in order) until done or ``args.duration`` is over."""
    import httpx

    records: list[Record] = []
    queue = list(range(len(prompts)))
    deadline = time.perf_counter() + args.duration
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(args.duration + 60), limits=limits) as client:

        async def worker() -> None:
            while queue and time.perf_counter() < deadline:
                i = queue.pop(0)
                rec = await _one(client, i, prompts[i], args.new)
                rec.error = rec.error or ("" if rec.ok or rec.status != 200 else "stream ended without [DONE]")
                records.append(rec)

        start = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(args.clients))), args.duration + 120)
        wall = time.perf_counter() - start
    return records, wall


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def summarize(records: list[Record], wall: float) -> dict[str, object]:
    done = [r for r in records if r.ok]
    rejected = [r for r in records if r.status in (429, 503)]
    failed = [r for r in records if not r.ok and r.status not in (429, 503)]
    ttft = [r.token_times[0] - r.sent for r in done if r.token_times]
    itl = [b - a for r in done for a, b in zip(r.token_times, r.token_times[1:])]
    tokens = sum(r.completion_tokens for r in done)
    return {"requests": len(records), "completed": len(done), "rejected_429_503": len(rejected), "failed": len(failed),
            "wall_s": wall, "req_s": len(done) / wall, "tok_s": tokens / wall, "tokens": tokens,
            "ttft_p50_ms": 1e3 * _pct(ttft, 0.5), "ttft_p99_ms": 1e3 * _pct(ttft, 0.99),
            "itl_p50_ms": 1e3 * _pct(itl, 0.5), "itl_p99_ms": 1e3 * _pct(itl, 0.99),
            "failures": "; ".join(sorted({f"{r.status}: {r.error[:80]}" for r in failed}))[:300]}  # fmt: skip


# ----- fp16 transformers generate, static batches ------------------------------------------------
def hf_static(args) -> dict[str, object]:
    """fp16 ``generate`` at the largest batch that fits (or ``--hf-batch``): generated tokens/s of one batch job."""
    from bench_end_to_end import largest_hf, run_hf

    if args.checkpoint is not None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(args.checkpoint), dtype=torch.float16).to(DEVICE).eval()
        vocab = model.config.vocab_size
    else:
        model = _random_model(args.shape, args.prompt + args.new)
        vocab = SHAPES[args.shape]["vocab"]
    job = (args.prompt, args.new, vocab)
    if args.hf_batch:
        batch, result = args.hf_batch, run_hf(model, args.hf_batch, *job)
    else:
        b1, b2 = 8, 16
        probes = {b: run_hf(model, b, *job) for b in (b1, b2)}
        limit = int(0.95 * torch.cuda.get_device_properties(0).total_memory) if DEVICE.type == "cuda" else 2**34
        batch, result = largest_hf(model, job, (b1, b2), probes, limit)
    seconds = batch * args.prompt / result["prefill_tok_s"] + batch * (args.new - 1) / result["decode_tok_s"]
    del model
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
    return {"hf_batch": batch, "hf_tok_s": batch * args.new / seconds, "hf_decode_tok_s": result["decode_tok_s"],
            "hf_peak_GiB": result["peak_bytes"] / 2**30}  # fmt: skip


# ----- main --------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc, timeout: float) -> None:
    import httpx

    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if not proc.is_alive():
            raise SystemExit("the server process died while starting")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server did not answer /health within {timeout:.0f} s")


def _prompts(args) -> list[list[int]]:
    vocab = SHAPES[args.shape]["vocab"] if args.checkpoint is None else args.checkpoint_vocab
    gen = torch.Generator().manual_seed(0)
    distinct = [torch.randint(4, vocab, (args.prompt,), generator=gen).tolist() for _ in range(min(args.requests, args.distinct))]
    return [distinct[i % len(distinct)] for i in range(args.requests)]


def serve_load(args) -> dict[str, object]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = mp.get_context("spawn").Process(target=_serve, args=(args, port), daemon=True)
    proc.start()
    try:
        _wait_ready(url, proc, args.startup_timeout)
        prompts = _prompts(args)
        alone: dict[int, str] = {}
        if args.check_alone:
            import httpx

            with httpx.Client(base_url=url, timeout=600) as client:
                for i, p in enumerate(prompts[: args.distinct]):
                    body = {"model": MODEL_NAME, "prompt": p, "max_tokens": args.new, "temperature": 0}
                    alone[i] = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        import httpx

        warm = {"model": MODEL_NAME, "prompt": prompts[0][: min(256, args.prompt)], "max_tokens": 8, "temperature": 0}
        httpx.post(f"{url}/v1/completions", json=warm, timeout=600).raise_for_status()  # compiles the kernels, untimed
        health = httpx.get(f"{url}/health", timeout=30).json()
        before = health["stats"]
        records, wall = asyncio.run(_load(url, prompts, args))
        row = summarize(records, wall)
        after = httpx.get(f"{url}/health", timeout=30).json()["stats"]  # the engine's own timing, this load only
        d = {k: after[k] - before[k] for k in ("decode_tokens", "decode_seconds", "decode_steps", "prefill_seconds",
                                               "prefills", "graph_replays", "graph_replay_seconds", "graph_captures",
                                               "eager_steps")}  # fmt: skip
        row.update(server_rows=d["decode_tokens"] / max(d["decode_steps"], 1),
                   server_decode_tok_s=d["decode_tokens"] / d["decode_seconds"] if d["decode_seconds"] else 0.0,
                   server_prefill_share=d["prefill_seconds"] / wall, decode_path=health["decode_path"],
                   server_prefill_ms=1e3 * d["prefill_seconds"] / max(d["prefills"], 1),
                   server_step_ms=1e3 * d["decode_seconds"] / max(d["decode_steps"], 1),
                   server_replay_ms=1e3 * d["graph_replay_seconds"] / max(d["graph_replays"], 1),
                   server_steps_replay_capture_eager=f"{d['graph_replays']}/{d['graph_captures']}/{d['eager_steps']}")  # fmt: skip
        if args.check_alone:
            row["alone_mismatches"] = sum(alone[r.index % args.distinct] != r.text for r in records if r.ok)
        return row
    finally:
        proc.terminate()
        proc.join(60)
        if proc.is_alive():
            proc.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=("serve", "hf", "both"), default="serve")
    p.add_argument("--shape", choices=tuple(SHAPES), default="llama2-7b", help="random-weight model (without --checkpoint)")
    p.add_argument("--checkpoint", type=Path, default=None, help="serve this rkv checkpoint folder instead")
    p.add_argument("--prompt", type=int, default=4096, help="prompt tokens per request (random ids)")
    p.add_argument("--new", type=int, default=128, help="max_tokens per request")
    p.add_argument("--clients", type=int, default=64, help="concurrent clients")
    p.add_argument("--requests", type=int, default=256, help="requests in all")
    p.add_argument("--distinct", type=int, default=64, help="distinct prompts (requests cycle through them)")
    p.add_argument("--duration", type=float, default=300.0, help="stop sending after this many seconds")
    p.add_argument("--max-batch", type=int, default=None)
    p.add_argument("--max-queue", type=int, default=None, help="server queue (default: --requests, no 429)")
    p.add_argument("--cache-memory", type=float, default=None, help="server cache budget in GiB")
    p.add_argument("--prefill-tokens", type=int, default=8192, help="server: prompt tokens prefilled per engine step")
    p.add_argument("--hf-batch", type=int, default=None, help="fp16 batch (default: the largest that fits)")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="server: decode steps from CUDA graphs (default: where they can be captured)")
    p.add_argument("--check-alone", action="store_true", help="compare each accepted text with the prompt served alone")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--csv", type=Path, default=None)
    args = p.parse_args()
    args.max_queue = args.max_queue or args.requests
    args.checkpoint_vocab = None
    if args.checkpoint is not None:
        from transformers import AutoConfig

        args.checkpoint_vocab = AutoConfig.from_pretrained(str(args.checkpoint)).vocab_size

    base = {"model": str(args.checkpoint or args.shape), "prompt": args.prompt, "new": args.new, "clients": args.clients,
            "max_batch": args.max_batch or "auto", "max_queue": args.max_queue}  # fmt: skip
    row: dict[str, object] = dict(base)
    if args.mode in ("hf", "both"):
        row.update(hf_static(args))
        print(f"fp16 generate: batch {row['hf_batch']}, {row['hf_tok_s']:.1f} tok/s", flush=True)
    if args.mode in ("serve", "both"):
        row.update(serve_load(args))
    if args.mode == "both":
        row["ratio_tok_s"] = row["tok_s"] / row["hf_tok_s"]
        row["ratio_decode_tok_s"] = row["server_decode_tok_s"] / row["hf_decode_tok_s"]
    print_table(f"rkv serve load test ({DEVICE})", [{"metric": c, "value": row[c]} for c in _COLUMNS if c in row])
    if args.csv:
        append_csv(args.csv, {**{c: "" for c in _COLUMNS}, **row, "timing": "wall" if DEVICE.type == "cuda" else "cpu-smoke"})


_COLUMNS = ["model", "prompt", "new", "clients", "max_batch", "max_queue", "requests", "completed", "rejected_429_503",
            "failed", "alone_mismatches", "wall_s", "req_s", "tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms",
            "itl_p99_ms", "server_rows", "server_decode_tok_s", "server_prefill_share", "server_prefill_ms", "server_step_ms",
            "server_replay_ms", "server_steps_replay_capture_eager", "decode_path", "hf_batch", "hf_tok_s",
            "hf_decode_tok_s", "hf_peak_GiB", "ratio_tok_s", "ratio_decode_tok_s", "tokens", "failures"]  # fmt: skip

if __name__ == "__main__":
    main()
