#!/usr/bin/env bash
# Every single-GPU benchmark of docs/benchmarks.md in one run, on one CUDA GPU
# (the two-GPU check is benchmarks/check_device_map.py):
#   bash benchmarks/run_all.sh [OUT] [CHECKPOINT]
# OUT: folder for the CSVs and Markdown tables (default benchmarks/results). CHECKPOINT: an `rkv export` folder of
# SmolLM2-135M for issue 11's batch-1 row (bench_batch1.py); without it that step is skipped and says so.
# CSV rows carry GPU name, date and versions; rerunning appends. Each step prints its seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
OUT="${1:-benchmarks/results}"
CHECKPOINT="${2:-}"
if [[ -n "$CHECKPOINT" && ! -f "$CHECKPOINT/config.json" ]]; then
    echo "run_all.sh: $CHECKPOINT is not an rkv checkpoint (no config.json); export one with 'rkv export'" >&2
    exit 2
fi
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
step() {  # step NAME COMMAND...: run it, then print its seconds
  local name=$1 t0
  t0=$(date +%s)
  shift
  "$@"
  echo "run_all.sh: $name took $(( $(date +%s) - t0 )) s"
}
# the default (query-folded) layout's kernel against fp16 SDPA: the decode-attention target table
# (decode_attention.csv: its speedup_vs_sdpa column is the default cache's kernel against SDPA)
step decode_attention "$PY" benchmarks/bench_decode_folded.py --csv "$OUT/decode_attention.csv" --markdown "$OUT/decode_attention.md"
# the pre-RoPE layout's kernels (head, chunk) at their tuned launch settings (KERNEL_DEFAULTS), long contexts
step decode_attention_prerope "$PY" benchmarks/bench_decode_attention.py --contexts 4096 16384 65536 \
    --csv "$OUT/decode_attention_prerope.csv" --markdown "$OUT/decode_attention_prerope.md"
# cache writes: the default layout's fused encoder against the copy rate (8-bit group metadata, the default store's,
# then fp16 metadata); the pre-RoPE layout's encoder
step cache_writes "$PY" benchmarks/bench_cache_writes.py --csv "$OUT/cache_writes.csv" --markdown "$OUT/cache_writes.md"
step cache_writes_fp16_meta "$PY" benchmarks/bench_cache_writes.py --group-meta fp16 --csv "$OUT/cache_writes.csv"
step quantize_pack "$PY" benchmarks/bench_quantize_pack.py --csv "$OUT/quantize_pack.csv" --markdown "$OUT/quantize_pack.md"
# end to end at the issue's equal batch 16; largest batches from the memory model: at most two rkv jobs, four fp16 ones
step end_to_end "$PY" benchmarks/bench_end_to_end.py --equal-batch 16 --calib-samples 8 --largest-timed-tokens 17 \
    --max-tries 2 --csv "$OUT/end_to_end.csv" --markdown "$OUT/end_to_end.md"
# batch 1 on a real checkpoint: RkvModel.generate and stream_generate (rkv run) against fp16 generate
if [[ -n "$CHECKPOINT" ]]; then
    step batch1 "$PY" benchmarks/bench_batch1.py "$CHECKPOINT" --csv "$OUT/batch1.csv"
else
    echo "run_all.sh: batch1 skipped (no CHECKPOINT argument)"
fi
echo "run_all.sh: $(( $(date +%s) - START )) s"
