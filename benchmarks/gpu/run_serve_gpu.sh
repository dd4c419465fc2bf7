#!/usr/bin/env bash
# DESIGN.md's serve benchmark in one device call: `aphrodite run` on the Llama-3.1-8B shape with
# dummy weights and no tokenizer, then `aphrodite bench serve` (random token-id prompts, 1024 in /
# 128 out, ignore_eos) at rate inf and at 10 req/s, a table last. Logs and result JSONs go to $OUT.
#
# The GPU image has no FastAPI/uvicorn/pydantic: carry their wheels (.whl/, see
# /work/.library/device/README.md) and this script installs them into /tmp/site first:
#   run(command="bash benchmarks/gpu/run_serve_gpu.sh", carry=[".whl"], timeout_s=540)
#
# Knobs (environment): MODEL_SHAPE (llama-3.1-8b) or MODEL_DIR (a directory holding a config.json),
# NUM_PROMPTS (1000, rate inf), RATE (10), RATE_PROMPTS (1000; cut to what fits before DEADLINE_S),
# INPUT_LEN (1024), OUTPUT_LEN (128), WARMUP_PROMPTS (32; an untimed pass first, so the timed runs
# meet no first-use kernel compiles), SERVER_ARGS (extra `aphrodite run` flags), PORT (2242),
# PY (python3), WHEELS (1: install .whl/*.whl), DEADLINE_S (500: seconds from the start by which
# everything should be done), SRC (the checkout: the tree whose `aphrodite` package runs; point it
# at a `git archive` of a commit, carried, to time that commit whatever the working tree holds).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SRC=$(cd "${SRC:-$ROOT}" && pwd)
cd "$SRC"  # `python -m` puts the current directory first on sys.path
T0=$(date +%s)
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
PY=${PY:-python3}
MODEL_SHAPE=${MODEL_SHAPE:-llama-3.1-8b}
NUM_PROMPTS=${NUM_PROMPTS:-1000}
RATE=${RATE:-10}
RATE_PROMPTS=${RATE_PROMPTS:-1000}
INPUT_LEN=${INPUT_LEN:-1024}
OUTPUT_LEN=${OUTPUT_LEN:-128}
WARMUP_PROMPTS=${WARMUP_PROMPTS:-32}
PORT=${PORT:-2242}
DEADLINE_S=${DEADLINE_S:-500}
SERVER_ARGS=${SERVER_ARGS:-}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

if [ "${WHEELS:-1}" = 1 ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$ROOT"/.whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$SRC
else
  export PYTHONPATH=$SRC${PYTHONPATH:+:$PYTHONPATH}
fi
echo "aphrodite from $SRC$([ -f "$SRC/COMMIT" ] && echo " (commit $(cat "$SRC/COMMIT"))")"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
$PY -c "import fastapi, uvicorn, pydantic, starlette, httpx; print('server packages:', 'fastapi', fastapi.__version__, \
'uvicorn', uvicorn.__version__, 'pydantic', pydantic.__version__, 'starlette', starlette.__version__)" || exit 1

# The model: a shape's public config.json (dummy weights need nothing else), or a given directory.
if [ -n "${MODEL_DIR:-}" ]; then
  NAME=$(basename "$MODEL_DIR")
else
  MODEL_DIR=/tmp/aphrodite-serve-$MODEL_SHAPE; NAME=$MODEL_SHAPE
  $PY -c "from aphrodite.benchmarks.model_shapes import write_model_shape as w; w('$MODEL_SHAPE', '$MODEL_DIR')" \
    || exit 1
fi

# shellcheck disable=SC2086  # SERVER_ARGS is a list of words
$PY -m aphrodite.endpoints.cli run "$MODEL_DIR" --load-format dummy --skip-tokenizer-init --served-model-name "$NAME" \
  --host 127.0.0.1 --port "$PORT" --disable-log-requests --uvicorn-log-level warning $SERVER_ARGS \
  >"$OUT/server.log" 2>&1 &
SERVER=$!
stop_server() {
  if kill -0 $SERVER 2>/dev/null; then
    kill -INT $SERVER; for _ in $(seq 60); do kill -0 $SERVER 2>/dev/null || break; sleep 0.5; done
    kill -0 $SERVER 2>/dev/null && kill -KILL $SERVER
  fi
}
trap stop_server EXIT

# Ready when /health answers 200 (dummy init, memory profiling and graph capture come first).
if ! $PY - "$PORT" "$SERVER" <<'EOF'
import os, sys, time, urllib.request
port, pid = sys.argv[1], int(sys.argv[2])
start = time.time()
while time.time() - start < 300:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("server exited")
    try:
        if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
            print(f"server ready after {time.time() - start:.1f} s")
            sys.exit(0)
    except OSError:
        pass
    time.sleep(0.5)
sys.exit("server not ready after 300 s")
EOF
then
  tail -40 "$OUT/server.log"; exit 1
fi
grep -E "KV cache|blocks|graph|start-up|ready|Memory" "$OUT/server.log" | tail -8

serve() {  # serve LOGNAME TIMEOUT_S bench-serve-args...
  local name=$1 limit=$2; shift 2
  timeout "$limit" $PY -m aphrodite.endpoints.cli bench serve --host 127.0.0.1 --port "$PORT" \
    --random-input-len "$INPUT_LEN" --random-output-len "$OUTPUT_LEN" --disable-tqdm "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  grep -v -E "^INFO" "$OUT/$name.log" | tail -32
  [ $rc = 0 ] || echo "bench serve ($name) exited with $rc"
}

if [ "$WARMUP_PROMPTS" -gt 0 ]; then
  echo "== warm-up: $WARMUP_PROMPTS prompts, rate inf (untimed) =="
  serve warmup 120 --num-prompts "$WARMUP_PROMPTS" --seed 1 >/dev/null
  grep -E "^(Successful|Failed)" "$OUT/warmup.log"
fi

echo "== rate inf: $NUM_PROMPTS prompts =="
serve serve_inf 240 --num-prompts "$NUM_PROMPTS" --result-dir "$OUT" --result-filename serve_inf.json \
  --metadata "shape=$NAME"

# 10 req/s needs RATE_PROMPTS / RATE seconds of arrivals plus the tail; cut the prompts if the
# deadline would otherwise pass (the table says how many ran).
LEFT=$(( DEADLINE_S - ($(date +%s) - T0) - 30 ))
FIT=$(( LEFT * ${RATE%.*} ))
if [ "$FIT" -lt "$RATE_PROMPTS" ]; then
  echo "only ${LEFT}s left: $FIT prompts at $RATE req/s instead of $RATE_PROMPTS"
  RATE_PROMPTS=$(( FIT > 50 ? FIT : 50 ))
fi
echo "== rate $RATE: $RATE_PROMPTS prompts =="
serve serve_rate "$(( LEFT > 20 ? LEFT + 25 : 45 ))" --num-prompts "$RATE_PROMPTS" --request-rate "$RATE" --result-dir "$OUT" \
  --result-filename serve_rate.json --metadata "shape=$NAME"

stop_server
echo "== table: $NAME, dummy weights, no tokenizer, random ${INPUT_LEN} in / ${OUTPUT_LEN} out, ignore_eos =="
$PY - "$OUT" <<'EOF' | tee "$OUT/table.md"
import json, os, sys
rows = ["| rate | prompts | ok/failed | duration s | req/s | out tok/s | total tok/s | TTFT mean/med/p99 ms "
        "| TPOT mean/med/p99 ms | ITL mean/med/p99 ms |", "|---" * 10 + "|"]
for name in ("serve_inf.json", "serve_rate.json"):
    path = os.path.join(sys.argv[1], name)
    if not os.path.exists(path):
        rows.append(f"| {name}: no result (see its log) |")
        continue
    r = json.load(open(path))
    trio = lambda m: " / ".join(f"{r[f'{s}_{m}_ms']:,.1f}" for s in ("mean", "median", "p99"))
    rows.append(f"| {r['request_rate']} | {r['num_prompts']} | {r['completed']}/{r['failed']} | {r['duration']:.1f} "
                f"| {r['request_throughput']:.2f} | {r['output_throughput']:,.0f} | {r['total_token_throughput']:,.0f} "
                f"| {trio('ttft')} | {trio('tpot')} | {trio('itl')} |")
print("\n".join(rows))
EOF
echo "total $(( $(date +%s) - T0 )) s"
