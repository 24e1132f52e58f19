#!/usr/bin/env bash
# The whole pipeline on the built-in demo corpus: make clips, extract features, train, caption, score.
# Run from a shell whose `python` has requirements.txt installed (the README's first command does that).
set -euo pipefail
cd "$(dirname "$0")"
export TF_CPP_MIN_LOG_LEVEL=3
DATA=${DEMO_DATA:-demo_data}
RUN=${DEMO_RUN:-demo}
start=$(date +%s)

python -m tools.demo_data "$DATA"
# 720 training clips; 64 test clips, 16 of them of the 8 (colour, shape, direction) combinations training never shows.
# Offline there are no ImageNet weights, so the demo uses seeded random VGG16 weights up to block3_pool at 96 px,
# max-pooled over a 1x1 + 2x2 pyramid (1280-d): measured to keep colour, shape and motion (README, "The demo").
for split in training testing; do
  python extract_features.py "$DATA/${split}_data/video" "$DATA/${split}_data/feat" --frames 12 --weights none \
    --layer block3_pool --image-size 96 --pool max --grids 1,2 --batch-size 64
done
# Validation: 36 of the 720 training clips (--val-fraction 0.05, drawn with --seed) pick the best epoch.
python train.py --data-dir "$DATA" --run "$RUN" --frames 12 --hidden 128 --batch-size 32 --epochs 20 \
  --learning-rate 2e-3 --dropout 0.3 --schedule linear --teacher-forcing-start 1.0 --teacher-forcing-end 0.8
# The test split, scored once, after training, with the best checkpoint by validation BLEU@1.
python infer.py "$DATA/testing_id.txt" out.txt --checkpoint "checkpoints/$RUN"
python -m util.evaluate out.txt --labels "$DATA/testing_label.json"
python -m tools.demo_data --check out.txt --labels "$DATA/testing_label.json"
echo "demo done in $(( $(date +%s) - start )) s; captions in out.txt, run in checkpoints/$RUN"
