#!/usr/bin/env bash
# Several one-GPU benchmark scripts in one device call on nvidia-h200-x2: two lanes, one per GPU, each
# running its scripts in turn under a time limit, logs in $OUT, every script's closing table last.
#   LANE0="a.py b.py" LANE1="c.py" DEADLINE_S=540 bash benchmarks/gpu/run_lanes_gpu.sh
# A script name may carry arguments after a colon, commas for spaces: "bench_moe_gpu.py:--decode-prompts,500".
# "tp1" in a lane runs DESIGN.md's three workloads at TP=1 on that lane's GPU (run_tp_gpu.sh tp1).
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
DEADLINE_S=${DEADLINE_S:-540}
lane() {  # lane GPU SCRIPTS...
  local gpu=$1; shift
  for item in "$@"; do
    local left=$(( DEADLINE_S - ($(date +%s) - T0) ))
    [ "$left" -gt 20 ] || { echo "[gpu$gpu] no time left for $item" >> "$OUT/lanes.txt"; continue; }
    local name=${item%%:*} args=""
    [ "$item" != "$name" ] && args=${item#*:} && args=${args//,/ }
    local log="$OUT/$(basename "$name" .py).log" start=$(date +%s)
    if [ "$name" = tp1 ]; then
      CUDA_VISIBLE_DEVICES=$gpu OUT=$OUT timeout "$left" bash benchmarks/gpu/run_tp_gpu.sh tp1 > "$log" 2>&1
    else
      # shellcheck disable=SC2086
      CUDA_VISIBLE_DEVICES=$gpu timeout "$left" python3 "benchmarks/gpu/$name" $args > "$log" 2>&1
    fi
    echo "[gpu$gpu] $item rc=$? in $(( $(date +%s) - start )) s" >> "$OUT/lanes.txt"
  done
}
# shellcheck disable=SC2086
lane 0 ${LANE0:-} &
# shellcheck disable=SC2086
lane 1 ${LANE1:-} &
wait
cat "$OUT/lanes.txt"
for log in "$OUT"/*.log; do
  echo "===== $(basename "$log")"
  grep -v -E "^INFO|Warning|warn|it/s\]|^\s*$" "$log" | tail -22
done
