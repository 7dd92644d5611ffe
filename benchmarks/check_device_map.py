"""Several GPUs: a model placed with ``device_map="auto"`` calibrates and generates with the packed cache.

A random-weight Llama (no weights can be fetched; placement does not depend on the values) is
saved to a temporary folder and loaded twice with transformers: once with ``device_map="auto"``
and a ``max_memory`` that spreads its layers over every visible GPU, once on GPU 0 alone. Each
copy is calibrated (random tokens), its value rotation fused, and generates greedily with the
2-bit cache. The script prints where each layer and its cache live, and compares the two runs:
calibration tensors, prefill logits and generated tokens.

    python benchmarks/check_device_map.py            # needs two or more CUDA GPUs
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from _random_model import calibrated_rkv, llama_config  # noqa: E402
from _timing import context  # noqa: E402

from rkv_convert.runtime.generate import GenerationStats, RkvModel, SamplingOptions, stream_generate  # noqa: E402


def _prepare(folder: Path, args: argparse.Namespace, device_map: str | dict, max_memory: dict | None):
    """Load, calibrate and fuse one copy; return the rkv model, the artifact and the calibration seconds."""
    dtype = torch.float32 if args.cpu_smoke else torch.float16
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device_map,
                                                 max_memory=max_memory).eval()  # fmt: skip
    return calibrated_rkv(model, vocab=args.vocab, samples=args.calib_samples, seqlen=args.calib_seqlen,
                          head_group=args.head_group, key_group=128, value_group=128, bits=2)  # fmt: skip


def _generate(rkv: RkvModel, ids: torch.Tensor, new: int) -> tuple[torch.Tensor, GenerationStats]:
    stats = GenerationStats()
    tokens = torch.stack(list(stream_generate(rkv, ids, max_new_tokens=new, sampling=SamplingOptions(0.0), stats=stats)), 1)
    return tokens.cpu(), stats


def _prefill(rkv: RkvModel, ids: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """Prefill logits with an rkv cache, and the device of each layer's quantized key store."""
    logits = rkv(ids.to(rkv.device)).logits[:, -1].float().cpu()
    return logits, [str(layer.k_codes.device) for layer in rkv.last_cache.layers]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--head-group", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--cpu-smoke", action="store_true", help="check the script's logic on the CPU (everything on one device)")
    args = p.parse_args()
    n_gpu = torch.cuda.device_count()
    if n_gpu < 2 and not args.cpu_smoke:
        raise SystemExit(f"this check needs two or more CUDA GPUs; {n_gpu} visible")
    print(context(), f"{n_gpu} GPUs", flush=True)

    cfg = llama_config(layers=args.layers, hidden=args.hidden, intermediate=int(2.6875 * args.hidden),
                       heads=args.heads, kv_heads=args.kv_heads, vocab=args.vocab)  # fmt: skip
    torch.manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        AutoModelForCausalLM.from_config(cfg, dtype=torch.float16).save_pretrained(folder)
        weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        share = math.ceil(weights * 1.4 / max(n_gpu, 1))  # room for accelerate's buffers; still too little for one GPU
        max_memory = {"cpu": 4 * weights} if args.cpu_smoke else {i: share for i in range(n_gpu)}
        split, split_art, split_s = _prepare(folder, args, "auto", max_memory)
        layer_devs = [str(next(layer.parameters()).device) for layer in split.model.model.layers]
        print(f"device_map='auto' with max_memory {max_memory}: decoder layer devices {layer_devs}")
        print("hf_device_map:", getattr(split.model, "hf_device_map", {}))
        split_logits, cache_devs = _prefill(split, ids)
        print("cache (quantized key store) device per layer:", cache_devs)
        split_tokens, split_stats = _generate(split, ids, args.new)
        single, single_art, single_s = _prepare(folder, args, {"": "cpu" if args.cpu_smoke else 0}, None)
        single_logits, single_cache = _prefill(single, ids)
        single_tokens, single_stats = _generate(single, ids, args.new)

    perm_same = sum(bool(torch.equal(a["key_perm"], b["key_perm"])) for a, b in zip(split_art.layers, single_art.layers))
    mean_diff = max(float((a["key_mean"].cpu() - b["key_mean"].cpu()).abs().max()) for a, b in zip(split_art.layers, single_art.layers))
    logit_diff = float((split_logits - single_logits).abs().max())
    same_tokens = float((split_tokens == single_tokens).float().mean())
    print(f"model: {args.layers} layers, hidden {args.hidden}, {args.heads} q / {args.kv_heads} KV heads, "
          f"{weights / 2**30:.2f} GiB fp16; batch {args.batch}, prompt {args.prompt}, {args.new} new tokens (greedy)")
    print(f"calibration: split {split_s:.1f} s, single GPU {single_s:.1f} s; key permutations identical in "
          f"{perm_same}/{len(split_art.layers)} layers; max |key mean difference| {mean_diff:.3g}")
    print(f"prefill logits with the rkv cache: max |split - single| {logit_diff:.3g} (max |logit| {single_logits.abs().max():.3g})")
    print(f"generated tokens identical: {same_tokens:.1%} of {split_tokens.numel()}")
    print(f"decode: split {split_stats.steady_decode_tokens_per_second:.0f} tok/s, single {single_stats.steady_decode_tokens_per_second:.0f} tok/s; "
          f"KV cache {split_stats.kv_bytes / 2**20:.1f} MiB ({split_stats.bits_per_element:.2f} bits/element all in)")
    ok = (len(set(cache_devs)) >= 2 or args.cpu_smoke) and cache_devs == layer_devs and same_tokens == 1.0
    print("RESULT:", "PASS" if ok else "FAIL", "(each layer's cache on its layer's GPU, two or more GPUs used, "
          "tokens identical to one GPU)")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
