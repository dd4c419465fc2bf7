#!/usr/bin/env bash
# One device call: correctness first, then DESIGN.md's workloads on the H100, a table last.
#   stage "check": engine correctness + ceilings + a short latency run (a few minutes)
#   stage "bench": the full workloads with the HF baseline (about 8 minutes)
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
stage=${1:-check}
bench() { python3 -m aphrodite.endpoints.cli bench "$@"; }
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv,noheader
if [ "$stage" = profile ]; then
  python3 benchmarks/gpu/check_engine_gpu.py 2>&1 | tee "$OUT/check.log" | grep -E "identical|CEILINGS|ENGINE"
  python3 benchmarks/gpu/profile_decode.py 2>&1 | tee "$OUT/profile.log" | grep -v -E "^INFO"
  exit 0
fi
if [ "$stage" = check ]; then
  python3 benchmarks/gpu/check_engine_gpu.py 2>&1 | tee "$OUT/check.log" | grep -v -E "^INFO|Warning|warn"
  bench latency --model-shape llama-3.1-8b --batch-size 1 --input-len 128 --output-len 256 \
      --num-iters-warmup 1 --num-iters 3 2>&1 | tee "$OUT/lat8b.log" | grep -E "INFO|latency|tok|Time|start"
  bench throughput --model-shape llama-3.1-8b --num-prompts 200 --input-len 128 --output-len 256 \
      2>&1 | tee "$OUT/tp8b_small.log" | grep -E "Throughput|start-up|KV|graphs|Memory"
  exit 0
fi
if [ "$stage" = all ]; then python3 benchmarks/gpu/check_engine_gpu.py 2>&1 | tee "$OUT/check.log" | grep -E "identical|CEILINGS|ENGINE"; fi
S=llama-3.1-8b
bench latency --model-shape $S --batch-size 1 --input-len 128 --output-len 256 --num-iters-warmup 2 --num-iters 5 \
    --baseline hf --hf-num-iters-warmup 1 --hf-num-iters 1 2>&1 | tee "$OUT/latency1.log" | grep -E "Avg|tok|Time|Speedup|start"
bench throughput --model-shape $S --num-prompts 1000 --input-len 1024 --output-len 128 \
    --baseline hf --hf-num-prompts 32 --hf-batch-size 32 2>&1 | tee "$OUT/prefill.log" | grep -E "Throughput|Speedup|start-up"
bench throughput --model-shape $S --num-prompts 1000 --input-len 128 --output-len 1024 \
    --baseline hf --hf-num-prompts 32 --hf-batch-size 32 2>&1 | tee "$OUT/decode.log" | grep -E "Throughput|Speedup|start-up"
bench latency --model-shape smollm2-135m --batch-size 1 --input-len 128 --output-len 256 --num-iters-warmup 2 \
    --num-iters 5 2>&1 | tee "$OUT/small_latency.log" | grep -E "Avg|tok|Time"
bench throughput --model-shape smollm2-135m --num-prompts 1000 --input-len 1024 --output-len 128 \
    2>&1 | tee "$OUT/small_prefill.log" | grep -E "Throughput"
echo "== table =="; grep -h -E "^(CEILINGS|ENGINE|Throughput|HF baseline Throughput|Output token|HF baseline Output|Speedup|Engine start)" "$OUT"/*.log
