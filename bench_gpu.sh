#!/usr/bin/env bash
# The GPU measurement, one JSON line per figure: training and decoding on JAX at the reference size, batch 250,
# float32 and bfloat16, then the hand-written peers (PyTorch, JAX) in the same call. Needs a CUDA build of JAX,
# Keras and this checkout's requirements; PEER is ../shared/bench/gpu_anchor.py or a copy of it.
#   bash bench_gpu.sh [PEER]
# DEVICE=cpu CONFIG=demo BATCH=32 PEER_ARGS=--small bash bench_gpu.sh   checks the script on a CPU in a minute.
set -uo pipefail
cd "$(dirname "$0")"
export KERAS_BACKEND=jax TF_CPP_MIN_LOG_LEVEL=3
PEER=${1:-../shared/bench/gpu_anchor.py}
DEVICE=${DEVICE:-gpu} CONFIG=${CONFIG:-reference} BATCH=${BATCH:-250} PEER_ARGS=${PEER_ARGS:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
for dtype in float32 bfloat16; do
  python bench.py --device "$DEVICE" --what train --config "$CONFIG" --batch-size "$BATCH" --matmul-dtype "$dtype" \
    --runs 20 --warmup 3
done
for beam in 1 5; do
  python bench.py --device "$DEVICE" --what infer --config "$CONFIG" --batch-size "$BATCH" --beam-size "$beam" \
    --runs 10 --warmup 2
done
python bench.py --device "$DEVICE" --what extract --runs 6
if [ -f "$PEER" ]; then python "$PEER" --runs 20 --batches "$BATCH" $PEER_ARGS; else echo "{\"peer\": \"$PEER not found\"}"; fi
