"""Generation speed and cache size: the rkv runtime against transformers' fp16 DynamicCache.

Not a test: ``python tests/runtime/bench_generate.py --layers 8 --prompt 4096 --new 128 --batch 1``.
A random-weight Llama-shaped model (no download), a light in-memory calibration (rkv_fixtures).
Prints one CSV row per configuration.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, str(Path(__file__).parent))
from rkv_fixtures import make_checkpoint  # noqa: E402

from rkv_convert.runtime.cache import CacheSettings  # noqa: E402
from rkv_convert.runtime.generate import GenerationStats, RkvModel, SamplingOptions, stream_generate  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-group", type=int, default=4)
    p.add_argument("--prompt", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--bits", type=int, default=2)
    args = p.parse_args()
    dev = torch.device("cuda")
    cfg = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                      max_position_embeddings=32768, tie_word_embeddings=False)  # fmt: skip
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16).eval()
    ckpt = make_checkpoint(model, bits=args.bits, key_group_size=128, value_group_size=64, head_group_size=args.head_group,
                           recent_window=128, flush_block=64, max_sinks=8)  # fmt: skip
    rkv = RkvModel(model, ckpt, settings=CacheSettings(128, 64, 8))
    print("device,batch,prompt,new,impl,prefill_tok_s,decode_tok_s,kv_MiB,fp16_MiB,bits_per_elem")
    for batch in args.batch:
        for prompt in args.prompt:
            ids = torch.randint(0, 32000, (batch, prompt), device=dev)
            stats = GenerationStats()
            for _ in stream_generate(rkv, ids, max_new_tokens=8, sampling=SamplingOptions(temperature=0)):
                pass  # warm-up (Triton compilation)
            for _ in stream_generate(rkv, ids, max_new_tokens=args.new, sampling=SamplingOptions(temperature=0), stats=stats):
                pass
            name = torch.cuda.get_device_name(dev)
            print(f"{name},{batch},{prompt},{stats.new_tokens},rkv-{args.bits}bit,{stats.prefill_tokens_per_second:.0f},"
                  f"{stats.decode_tokens_per_second:.1f},{stats.kv_bytes / 2**20:.1f},{stats.fp16_equivalent_bytes / 2**20:.1f},"
                  f"{stats.bits_per_element:.2f}", flush=True)  # fmt: skip
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)  # warm-up
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
                torch.cuda.synchronize()
                t1 = time.perf_counter()
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0)
                torch.cuda.synchronize()
                t2 = time.perf_counter()
            prefill = t1 - t0
            decode = (t2 - t1) - prefill
            kv = 2 * args.layers * batch * (prompt + args.new) * args.kv_heads * (args.hidden // args.heads) * 2
            print(f"{name},{batch},{prompt},{args.new},hf-fp16-dynamic,{batch * prompt / prefill:.0f},"
                  f"{batch * (args.new - 1) / decode:.1f},{kv / 2**20:.1f},{kv / 2**20:.1f},16.00", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
