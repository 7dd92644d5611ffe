#!/usr/bin/env bash
# Every single-GPU benchmark of docs/benchmarks.md in one run, on one CUDA GPU
# (the two-GPU check is benchmarks/check_device_map.py):
#   bash benchmarks/run_all.sh [OUT]      (OUT: folder for the CSVs and Markdown tables, default benchmarks/results)
# CSV rows carry GPU name, date and versions; rerunning appends.
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
OUT="${1:-benchmarks/results}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
# the default (query-folded) layout's kernel against fp16 SDPA: the decode-attention target table
"$PY" benchmarks/bench_decode_folded.py --csv "$OUT/decode_folded.csv" --markdown "$OUT/decode_folded.md"
# the pre-RoPE layout's kernels (head, chunk) at their tuned launch settings (KERNEL_DEFAULTS), long contexts
"$PY" benchmarks/bench_decode_attention.py --contexts 4096 16384 65536 \
    --csv "$OUT/decode_attention.csv" --markdown "$OUT/decode_attention.md"
# cache writes: the default layout's fused encoder against the copy rate; the pre-RoPE layout's encoder
"$PY" benchmarks/bench_cache_writes.py --csv "$OUT/cache_writes.csv" --markdown "$OUT/cache_writes.md"
"$PY" benchmarks/bench_quantize_pack.py --csv "$OUT/quantize_pack.csv" --markdown "$OUT/quantize_pack.md"
# largest batches: at most three jobs per implementation from the memory model
"$PY" benchmarks/bench_end_to_end.py --largest-timed-tokens 17 --max-tries 3 \
    --csv "$OUT/end_to_end.csv" --markdown "$OUT/end_to_end.md"
echo "run_all.sh: $(( $(date +%s) - START )) s"
