"""Host (Python) time of one decode step of one layer on the default path.

What it times: :func:`rkv_convert.runtime.attention.rkv_attention` for one new token of one layer
of the default *folded* key layout -- RoPE of the query and key, the cache append (sinks,
window), the ``decode_folded`` wrapper (checks, operand preparation, the ``q @ r_planes`` matmul,
buffer allocations), the merge wrapper and the window flush (a store append every
``flush_block`` steps) -- on a SmolLM2-135M-shaped layer (9 query / 3 KV heads of 64, hidden
576) attached to a random-weight one-layer Llama model, fed the handler arguments the model
passes at a decode step.

``--device cpu`` (default): **Python/host work only**, not the GPU, and not Triton's own launch
cost (argument binding, specialization keys, the driver call: tens of microseconds per launch on
a GPU host). Every Triton kernel the path launches (``_query_prep_kernel``, ``_folded_kernel``,
``_merge_kernel``, ``_quantize_pack_kernel``) is replaced at its launch site by a stub that only
counts the launch; outputs are left uninitialised. ``TRITON_INTERPRET=1`` is set before
``triton`` is imported so that ``backend="auto"`` takes the Triton path on the CPU as it does on
CUDA (the interpreter never runs: the launches are stubs). The torch ops run on the CPU, so each
costs its dispatch plus a tiny CPU kernel, not a CUDA launch; the table therefore also counts,
per layer-call, the torch ops that would launch a CUDA kernel (``torch_kernels``: every aten op
but views and allocations) and the Python conversions of a tensor to a host value
(``host_syncs``: ``item``/``bool``/``int``/``float``/``tolist``/``__index__``; on CUDA each waits
for the GPU; syncs inside aten ops are not seen on the CPU).

``--device cuda``: the same call with the real kernels. ``median_us`` is then the host time of a
call without synchronising (what a host-bound decode step pays per layer, Triton launches
included), ``synced_us`` the time of a call with a synchronisation before and after it, and
``host_syncs`` adds what ``torch.cuda.set_sync_debug_mode("warn")`` reports.

Timings are ``time.perf_counter`` around single calls; the best round's median is reported (the
typical step), the mean includes the flush steps.

    python benchmarks/bench_host_overhead.py                 # CPU, launches stubbed
    python benchmarks/bench_host_overhead.py --device cuda   # GPU host, real launches
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import platform
import pstats
import statistics
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

def _load_project() -> None:
    """Import transformers, triton and rkv, once ``TRITON_INTERPRET`` is decided (triton reads it at import)."""
    global LlamaForCausalLM, llama_config, append_csv, print_table, attach, hadamard_matrix, rkv_attention  # noqa: PLW0603
    global CacheSettings, LayerCodec, RkvCache, cache_kwargs  # noqa: PLW0603
    from transformers import LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).parent))
    from _random_model import llama_config
    from _timing import append_csv, print_table

    import rkv_convert.kernels.decode_folded  # noqa: F401  (the modules whose launches are stubbed)
    import rkv_convert.kernels.quantize_pack  # noqa: F401
    from rkv_convert.models.adapters import attach
    from rkv_convert.models.compat import cache_kwargs
    from rkv_convert.quant.hadamard import hadamard_matrix
    from rkv_convert.runtime.attention import rkv_attention
    from rkv_convert.runtime.cache import CacheSettings, RkvCache
    from rkv_convert.runtime.layer_codec import LayerCodec


# SmolLM2-135M: hidden 576, 9 query / 3 KV heads of 64 (one layer of its 30)
SHAPE = dict(hidden=576, intermediate=1536, heads=9, kv_heads=3, vocab=1024)
_LAUNCHES = {  # module -> kernels launched from it on the folded decode path
    "rkv_convert.kernels.decode_folded": ("_query_prep_kernel", "_folded_kernel"),
    "rkv_convert.kernels.decode_attention": ("_merge_kernel",),
    "rkv_convert.kernels.quantize_pack": ("_quantize_pack_kernel",),
}
_NO_KERNEL = {  # aten ops that launch no CUDA kernel: views, metadata, allocations
    "view", "_unsafe_view", "reshape", "_reshape_alias", "expand", "unsqueeze", "squeeze", "slice", "select",
    "transpose", "t", "permute", "alias", "as_strided", "detach", "empty", "empty_strided", "empty_like",
    "new_empty", "new_empty_strided", "split", "unbind", "narrow", "lift_fresh", "_to_copy_noop", "sym_size",
    "sym_stride", "sym_numel", "is_same_size", "result_type",
}  # fmt: skip


class _Launches:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` only counts the launch."""

    def __init__(self, name: str, counter: Counter) -> None:
        self.name, self.counter = name, counter

    def __getitem__(self, grid: object) -> Callable[..., None]:
        def launch(*args: object, **kwargs: object) -> None:
            self.counter[self.name] += 1

        return launch


@contextmanager
def stub_launches(counter: Counter) -> Iterator[None]:
    """Replace every Triton kernel of the path by a counting no-op at its launch site (restored after)."""
    mods = {m: sys.modules[m] for m in _LAUNCHES}
    saved = [(mods[m], n, getattr(mods[m], n)) for m, names in _LAUNCHES.items() for n in names]
    try:
        for m, n, _ in saved:
            setattr(m, n, _Launches(n, counter))
        yield
    finally:
        for m, n, k in saved:
            setattr(m, n, k)


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched (a CUDA kernel each, unless a view or an allocation)."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        name = func.__name__.split(".")[0]
        if name not in _NO_KERNEL and not (name == "copy_" and args and args[0].numel() == 0):
            self.kernels[name] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def count_host_syncs(counter: Counter) -> Iterator[None]:
    """Count tensor-to-Python conversions (each a device-to-host sync on CUDA)."""
    names = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def wrap(n: str, f: Callable) -> Callable:
        def counted(self, *a, **k):  # noqa: ANN001, ANN002, ANN003
            counter[n] += 1
            return f(self, *a, **k)

        return counted

    try:
        for n, f in saved.items():
            setattr(torch.Tensor, n, wrap(n, f))
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def make_layer(dtype: torch.dtype, device: torch.device, key_group: int, value_group: int, bits: int, settings):
    """A one-layer SmolLM2-shaped Llama model and an rkv cache for it (folded layout, Hadamard R_h, random mean)."""
    torch.manual_seed(0)
    cfg = llama_config(layers=1, **SHAPE)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    d, n_kv = cfg.hidden_size // cfg.num_attention_heads, cfg.num_key_value_heads
    rot = hadamard_matrix(d).float().to(device)
    codec = LayerCodec(
        key_bits=bits, value_bits=bits, key_group_size=key_group, value_group_size=value_group, head_dim=d,
        num_kv_heads=n_kv, k_mean=torch.randn(n_kv * d, device=device), rotation=rot,
        k_gid=(torch.arange(d, device=device) // key_group).to(torch.int32).expand(n_kv, d).contiguous(),
        key_clip=1.0, value_clip=1.0, sink_channels=torch.tensor([3, 77, 400], device=device), sink_threshold=1e4,
        key_layout="folded", head_rotation=rot.expand(n_kv, d, d).contiguous(),
    )  # fmt: skip
    rotary = model.model.rotary_emb
    cache = RkvCache([codec], settings, rotary.inv_freq.float(), float(rotary.attention_scaling))
    return model, cache


def capture_decode_call(model, cache: RkvCache, prompt: int) -> tuple[tuple, dict]:
    """Prefill ``prompt`` tokens, then the handler arguments of one decode step (as the model passes them)."""
    dev = next(model.parameters()).device
    ids = torch.randint(0, SHAPE["vocab"], (1, prompt), device=dev)
    seen: list = []

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003
        if cache.layers[0].length > 0:
            seen.append((args, dict(kwargs)))
        return rkv_attention(*args, **kwargs)

    with torch.no_grad(), attach(model, spy):
        out = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        model(input_ids=token, attention_mask=torch.ones(1, prompt + 1, dtype=torch.long, device=dev),
              position_ids=torch.tensor([[prompt]], device=dev), **cache_kwargs(model, cache), use_cache=True)  # fmt: skip
    return seen[0]


def time_calls(call: Callable[[], object], n: int, sync: Callable[[], None] | None = None) -> list[float]:
    """Microseconds of each of ``n`` calls (``sync`` before and after each one when given)."""
    times = []
    for _ in range(n):
        if sync:
            sync()
        t0 = time.perf_counter()
        call()
        if sync:
            sync()
        times.append((time.perf_counter() - t0) * 1e6)
    return times


@contextmanager
def cuda_sync_warnings(counter: Counter, on: bool) -> Iterator[None]:
    """Count the device-to-host syncs ``torch.cuda.set_sync_debug_mode("warn")`` reports (CUDA only)."""
    if not on:
        yield
        return
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
    counter["cuda_sync_warnings"] += sum("synchroniz" in str(w.message) for w in seen)


def profile_top(call: Callable[[], object], n: int, top: int) -> list[dict[str, object]]:
    """cProfile's top entries by own time over ``n`` calls, in microseconds per layer-call."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        call()
    prof.disable()
    st = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    for (file, line, fn), (_cc, calls, tottime, cumtime, _) in st.stats.items():
        where = f"{Path(file).name}:{line}({fn})" if line else fn
        rows.append({"function": where[-70:], "calls/step": calls / n, "own_us": tottime / n * 1e6,
                     "cum_us": cumtime / n * 1e6})  # fmt: skip
    rows.sort(key=lambda r: -r["own_us"])
    return rows[:top]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cpu: host work only, Triton launches stubbed; cuda: real kernels, host time unsynchronised")
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens before the timed steps")
    ap.add_argument("--steps", type=int, default=1000, help="timed decode calls of the layer per round")
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds (the best round's median is reported)")
    ap.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--top", type=int, default=25, help="cProfile entries to print")
    ap.add_argument("--label", default="", help="free text stored in the CSV row (e.g. before/after)")
    ap.add_argument("--csv", default=None, help="append the result row here")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    if not cuda:  # before triton is imported: backend="auto" then takes the Triton path on the CPU
        os.environ["TRITON_INTERPRET"] = "1"
    _load_project()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if cuda else None

    settings = CacheSettings()  # the checkpoint defaults: 8 sinks, window 128, flush block 64
    model, cache = make_layer(getattr(torch, args.dtype), device, 64, 64, args.bits, settings)
    total = args.prompt + 2 + (args.rounds * args.steps * (2 if cuda else 1) + args.steps + 200)
    cache.reserve(total)  # as stream_generate does: no store growth during the timed steps
    launches: Counter = Counter()
    with (nullcontext() if cuda else stub_launches(launches)), torch.no_grad():
        h_args, h_kwargs = capture_decode_call(model, cache, args.prompt)
        module = h_args[0]
        with attach(model, rkv_attention):  # the module's family/handler attributes as in generate
            call = lambda: rkv_attention(*h_args, **h_kwargs)  # noqa: E731
            time_calls(call, 100, sync)  # warm-up (compilation, caches of FoldedParams, plane order, ...)
            rounds = [time_calls(call, args.steps) for _ in range(args.rounds)]
            synced = [time_calls(call, args.steps, sync) for _ in range(args.rounds)] if cuda else []
            launches.clear()
            ops = _OpCounter()
            syncs: Counter = Counter()
            n_count = settings.flush_block  # one whole flush period
            with ops, count_host_syncs(syncs), cuda_sync_warnings(syncs, cuda):
                for _ in range(n_count):
                    call()
                if sync:
                    sync()
            n_launches = sum(launches.values())
            top = profile_top(call, args.steps, args.top)

    best = min(rounds, key=statistics.median)
    median, mean = statistics.median(best), statistics.fmean(best)
    layer = cache.layers[0]
    kinds = {
        "mask": "none" if h_args[5] is None else f"{h_args[5].dim()}D",
        "position_ids": "position_ids" in h_kwargs,
    }
    import rkv_convert

    print(f"rkv_convert from {Path(rkv_convert.__file__).parent}; layer: {module.__class__.__name__}, store "
          f"{layer.n_quant} slots, window {layer.n_window}, q {tuple(h_args[1].shape)} {h_args[1].dtype}, "
          f"handler inputs {kinds}")  # fmt: skip
    what = "real launches" if cuda else "launches stubbed"
    print_table(f"cProfile top {args.top} by own time, per layer-call ({args.steps} calls, {what})", top)
    per_step = {k: v / n_count for k, v in sorted(ops.kernels.items(), key=lambda kv: -kv[1])}
    print("torch ops launching a kernel, per layer-call:", ", ".join(f"{k} {v:.2f}" for k, v in per_step.items()))
    row = {
        "label": args.label,
        "device": args.device,
        "cpu": cpu_name(),
        "python": platform.python_version(),
        "dtype": args.dtype,
        "prompt": args.prompt,
        "median_us": round(median, 1),
        "mean_us": round(mean, 1),
        "p20_us": round(sorted(best)[len(best) // 5], 1),
        "p80_us": round(sorted(best)[4 * len(best) // 5], 1),
        "rounds_median_us": " ".join(f"{statistics.median(r):.1f}" for r in rounds),
        "synced_us": round(min(statistics.median(r) for r in synced), 1) if synced else "",
        "torch_kernels": round(sum(ops.kernels.values()) / n_count, 2),
        "triton_launches": round(n_launches / n_count, 2) if not cuda else "",
        "host_syncs": round(sum(syncs.values()) / n_count, 2),
        "x30_layers_ms": round(30 * median / 1e3, 2),
    }
    title = "GPU host time, real launches" if cuda else "CPU host time, Triton launches stubbed; not GPU time"
    print_table(f"one decode layer-call, folded layout ({title})", [row])
    print(f"host syncs over {n_count} calls: {dict(syncs) or 'none'}")
    if args.csv:
        note = "host time per call, real launches, unsynchronised" if cuda else "CPU host time only; Triton launches stubbed"
        append_csv(args.csv, {**row, "note": note})


if __name__ == "__main__":
    main()
