#!/usr/bin/env bash
# GPU serving benchmark in one command (about 5 minutes on one H200): the bare batched model and the
# whole HTTP service (embedded queue, 512² PNG) for the `paper` preset (random weights) and the
# bundled `lite` weights, at concurrency 1 and 32 with batches of up to 32, plus the GPU's mean
# utilisation while the service runs. Prints the JSON of each run and then one Markdown table.
#
#   bash bench/gpu_bench.sh                       # on a machine with a CUDA GPU
#   DEVICE=cpu PRESETS=tiny REQUESTS=8 CONCURRENCY=1,2 MAX_BATCH=2 bash bench/gpu_bench.sh   # dry run
#
# Python packages it needs besides torch (a GPU box that has only torch can install them from wheels
# carried in .whl/, see below): fastapi starlette pydantic pydantic-core pydantic-settings
# typing-inspection annotated-types typing-extensions python-dotenv uvicorn h11 click anyio sniffio
# idna httpx httpcore certifi python-multipart prometheus-client redis pydicom pillow
# opencv-python-headless fpng lazy-loader numpy safetensors pyyaml.
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=${DEVICE:-cuda}
PRESETS=${PRESETS:-paper lite}
REQUESTS=${REQUESTS:-640}
CONCURRENCY=${CONCURRENCY:-1,32}
MAX_BATCH=${MAX_BATCH:-32}
OUT_DIR=${OUT:-${TMPDIR:-/tmp}}/gpu-bench
mkdir -p "$OUT_DIR"

if [ -d .whl ] && ! python3 -c "import fastapi, fpng, pydicom, redis" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}

sampler_pid=""
if command -v nvidia-smi >/dev/null 2>&1 && [ "$DEVICE" != "cpu" ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT_DIR/gpu.txt" || true
    nvidia-smi --query-gpu=timestamp,utilization.gpu --format=csv,noheader,nounits -lms 250 \
        > "$OUT_DIR/utilisation.csv" 2>/dev/null &
    sampler_pid=$!
fi
trap '[ -n "$sampler_pid" ] && kill "$sampler_pid" 2>/dev/null || true' EXIT

for preset in $PRESETS; do
    weights=()
    if [ "$preset" = "lite" ]; then weights=(--weights model/weights/tmagenet-lite.safetensors); fi
    date +%s.%N > "$OUT_DIR/$preset.start"
    python3 bench/serve_bench.py --preset "$preset" "${weights[@]}" --device "$DEVICE" \
        --requests "$REQUESTS" --concurrency "$CONCURRENCY" --max-batch-size "$MAX_BATCH" \
        --max-wait-ms 5 > "$OUT_DIR/$preset.json"
    date +%s.%N > "$OUT_DIR/$preset.end"
    cat "$OUT_DIR/$preset.json"
done

python3 bench/gpu_table.py "$OUT_DIR" $PRESETS
