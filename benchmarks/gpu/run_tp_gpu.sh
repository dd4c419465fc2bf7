#!/usr/bin/env bash
# Issue 15's numbers on nvidia-h200-x2, DESIGN.md's workloads, in device calls of under 10 minutes:
#   bash benchmarks/gpu/run_tp_gpu.sh tp2     # check_tp_gpu.py, then latency-1 / prefill / decode at TP=2
#   bash benchmarks/gpu/run_tp_gpu.sh serve   # `aphrodite run -tp 2` + `aphrodite bench serve` (carry .whl)
#   bash benchmarks/gpu/run_tp_gpu.sh tp1     # the same workloads at TP=1 on GPU 0 of the same machine
# Llama-3.1-8B shape, dummy bf16 weights, defaults otherwise. NVLink multicast stays off in every process.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
stage=${1:-tp2}
S=llama-3.1-8b
bench() { timeout "$1" python3 -m aphrodite.endpoints.cli bench "${@:2}"; }
workloads() {  # workloads TAG TP
  local tag=$1 tp=$2
  bench 120 latency --model-shape $S -tp "$tp" --batch-size 1 --input-len 128 --output-len 256 \
    --num-iters-warmup 2 --num-iters 5 2>&1 | tee "$OUT/${tag}_latency.log" | grep -E "Avg latency|start-up"
  bench 150 throughput --model-shape $S -tp "$tp" --num-prompts 1000 --input-len 1024 --output-len 128 \
    2>&1 | tee "$OUT/${tag}_prefill.log" | grep -E "Throughput|start-up"
  bench 200 throughput --model-shape $S -tp "$tp" --num-prompts 1000 --input-len 128 --output-len 1024 \
    2>&1 | tee "$OUT/${tag}_decode.log" | grep -E "Throughput|start-up"
}
case $stage in
  tp2)
    if [ "${CHECK:-1}" = 1 ]; then
      timeout 330 python3 benchmarks/gpu/check_tp_gpu.py --skip-nccl-only > "$OUT/check_tp.log" 2>&1
      grep -v -E "^INFO|Warning|warn|it/s\]|Traceback|^  File|^    " "$OUT/check_tp.log" | tail -24
    fi
    workloads tp2 2 ;;
  serve)
    SERVER_ARGS="-tp 2" RATE_PROMPTS=400 DEADLINE_S=330 bash benchmarks/gpu/run_serve_gpu.sh ;;
  tp1)
    CUDA_VISIBLE_DEVICES=${TP1_GPU:-0} workloads tp1 1 ;;
esac
echo "== $stage table =="
grep -h -E "^(Avg latency|Throughput|Engine start-up)" "$OUT"/tp*_*.log 2>/dev/null
