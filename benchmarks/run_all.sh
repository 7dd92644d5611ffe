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
# head and group kernels at their launch settings tuned earlier (KERNEL_DEFAULTS); the chunk kernel's tuned here
"$PY" benchmarks/bench_decode_attention.py --tune 64x4x1 128x8x1 --tune-shapes llama2-7b llama3-8b \
    --tune-kernels chunk --chunk-launch tuned \
    --csv "$OUT/decode_attention.csv" --markdown "$OUT/decode_attention.md"
"$PY" benchmarks/bench_quantize_pack.py --csv "$OUT/quantize_pack.csv" --markdown "$OUT/quantize_pack.md"
"$PY" benchmarks/bench_end_to_end.py --largest-timed-tokens 17 --csv "$OUT/end_to_end.csv" --markdown "$OUT/end_to_end.md"
echo "run_all.sh: $(( $(date +%s) - START )) s"
