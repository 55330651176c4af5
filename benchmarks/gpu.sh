#!/usr/bin/env bash
# The device check, one prepared script for a machine with CUDA devices (never part of CI):
#   1. the CUDA-only tests (skipped on CPU machines) and the sharding tests;
#   2. benchmarks/gpu.py: every engine on CUDA against the exact posterior, speed per engine on
#      the 16x16 UNet prior, batched (plated) against one-by-one runs;
#   3. benchmarks/sharded.py on the GPUs: one MCGDiff run of 10^5 particles at d = 800, one
#      process against one process per GPU (nccl), both noise modes;
#   4. benchmarks/image_scale.py on one GPU: the 256x256 patch-prior problems with DPS at its
#      paper's 1000 steps and PiGDM at its 100, which the CPU run could not afford.
# Results go to benchmarks/results/ (and to $OUT when set, for the device tool to bring back).
# Budget: about 10 minutes on one H200 (each part has its own time limit below).
#
#   bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c "import diffpost" 2>/dev/null; then  # a bare machine with torch installed
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . || exit 1
fi
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "${GPUS:-0}" -lt 1 ]; then
    echo "no CUDA device: nothing to check" >&2
    exit 2
fi
echo "devices: $GPUS x $("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")"
status=0
run() {  # run LIMIT_SECONDS NAME COMMAND...: time-bounded, its status remembered, never fatal
    local limit=$1 name=$2
    shift 2
    echo "== $name (at most $limit s)"
    local start=$SECONDS
    timeout "$limit" "$@"
    local code=$?
    echo "== $name: exit $code after $((SECONDS - start)) s"
    [ $code -eq 0 ] || status=1
}

run 120 "CUDA tests" "$PY" -m pytest -q -rs -p no:cacheprovider \
    tests/test_operators.py tests/test_diagnostics.py tests/test_sharding.py \
    -k "cuda or device_follows or shard or launch"
run 210 "engines on CUDA" "$PY" -m benchmarks.gpu --output benchmarks/results/gpu.md
run 90 "sharded on GPUs" "$PY" -m benchmarks.sharded --part time --device cuda \
    --processes "$GPUS" --particles 100000 --repeats 2 --output benchmarks/results/sharded_gpu.md
run 180 "image scale on a GPU" "$PY" -m benchmarks.image_scale --device cuda --threads 4 \
    --tasks denoise deblur super_resolution --engines DDRM PiGDM DPS \
    --steps DPS=1000 PiGDM=100 --particles 16 --output benchmarks/results/image_scale_gpu.md

if [ -n "${OUT:-}" ]; then
    cp benchmarks/results/gpu.md benchmarks/results/sharded_gpu.md \
        benchmarks/results/image_scale_gpu.md "$OUT"/ 2>/dev/null
    cp -r benchmarks/results/image_scale_gpu "$OUT"/ 2>/dev/null
fi
exit $status
