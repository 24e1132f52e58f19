"""Caption videos with a trained S2VT checkpoint.

    python infer.py IDS_FILE OUT_FILE [--checkpoint DIR] [--feat-dir DIR] [--batch-size N]
    python infer.py --video CLIP.avi [CLIP2.mp4 ...] [--checkpoint DIR]

Writes one `video_id,caption` line per id, in the order of IDS_FILE. Features are read from --feat-dir, or found
through the MLDS layout beside the ids file (<dir>/feat/ or <dir>/testing_data/feat/). With --video, raw clips
are run through the feature extractor recorded in the checkpoint, and `file,caption` lines are printed.
The checkpoint defaults to the best one of the newest run under checkpoints/.
"""
import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from util.atomic import write_text_atomic
from util.bleu import corpus_bleu1
from util.checkpoints import load_model
from util.data import DataError, find_feat_dir, load_feature_file, load_labels, read_ids


def caption_features(model, vocab, features, batch_size):
    """Greedy captions for (videos, frames, dim) features, batch by batch."""
    greedy = tf.function(model.greedy, input_signature=[
        tf.TensorSpec([None, model.config.frames, model.config.feature_dim], tf.float32)])
    captions = []
    for start in tqdm(range(0, len(features), batch_size), desc="captioning", unit="batch", leave=False):
        words, _ = greedy(tf.constant(features[start:start + batch_size], tf.float32))
        captions.extend(vocab.decode(ids) for ids in words.numpy())
    return captions


def check_manifest_matches(feat_dir, run_config):
    """Refuse features made with other extraction settings than the checkpoint was trained on."""
    path = Path(feat_dir) / "manifest.json"
    trained = run_config.get("features")
    if trained and path.is_file():
        found = json.loads(path.read_text())
        differing = [f"{k}: {found.get(k)!r} here, {v!r} in training" for k, v in trained.items() if found.get(k) != v]
        if differing:
            raise DataError(f"{path}: features differ from the checkpoint's ({'; '.join(differing)})")


def caption_videos(model, vocab, run_config, video_paths, batch_size):
    """Caption raw clips with the extraction settings recorded at training time. Returns (captions, failures)."""
    import extract_features

    if not run_config.get("features"):
        raise DataError("the checkpoint records no feature extractor (its features were not made by "
                        "extract_features.py), so it cannot caption raw videos")
    settings = extract_features.FeatureSettings.from_manifest(run_config["features"])
    run_cnn, _ = extract_features.build_extractor(settings)
    features = {}
    _, _, failures, _ = extract_features.extract(
        [Path(p) for p in video_paths], settings, run_cnn, batch_size=32, desc="reading clips",
        on_clip=lambda path, array: features.__setitem__(str(path), array.astype(np.float32)))
    names = [str(Path(p)) for p in video_paths if str(Path(p)) in features]
    captions = caption_features(model, vocab, np.stack([features[n] for n in names]), batch_size) if names else []
    return dict(zip(names, captions)), failures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ids_file", nargs="?", help="video ids, one per line (e.g. testing_id.txt)")
    parser.add_argument("out_file", nargs="?", help="where to write `video_id,caption` lines")
    parser.add_argument("--video", nargs="+", metavar="CLIP", help="caption these raw clips instead")
    parser.add_argument("--checkpoint", help="run folder or checkpoint (default: newest run's best)")
    parser.add_argument("--feat-dir", help="folder of <id>.npy features (default: found beside the ids file)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--labels", help="labels JSON: print the MLDS BLEU@1 of the captions")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    if args.batch_size <= 0:
        parser.error("--batch-size must be positive")
    if not args.video and not (args.ids_file and args.out_file):
        parser.error("give IDS_FILE OUT_FILE, or --video CLIP ...")
    try:
        started = time.perf_counter()
        if args.video:
            model, vocab, run_config, _ = load_model(args.checkpoint)
            captions, failures = caption_videos(model, vocab, run_config, args.video, args.batch_size)
            for name, caption in captions.items():
                print(f"{name},{caption}")
            for why in failures.values():
                print(f"error: {why}", file=sys.stderr)
            return 2 if failures else 0
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            video_ids = read_ids(args.ids_file)
        out_dir = Path(args.out_file).resolve().parent
        if not out_dir.is_dir():
            raise DataError(f"{args.out_file}: output folder {out_dir} does not exist")
        model, vocab, run_config, prefix = load_model(args.checkpoint)
        feat_dir = Path(args.feat_dir) if args.feat_dir else find_feat_dir(args.ids_file)
        check_manifest_matches(feat_dir, run_config)
        features = np.stack([load_feature_file(feat_dir / f"{v}.npy", model.config.frames, model.config.feature_dim)
                             for v in tqdm(video_ids, desc="loading features", unit="video", leave=False)])
        captions = caption_features(model, vocab, features, args.batch_size)
        try:
            write_text_atomic(args.out_file, "".join(f"{v},{c}\n" for v, c in zip(video_ids, captions)))
        except OSError as error:
            raise DataError(f"{args.out_file}: cannot write ({error.strerror})") from None
        print(f"captioned {len(video_ids)} videos with {prefix} in {time.perf_counter() - started:.1f} s; "
              f"wrote {args.out_file}")
        if args.labels:
            references = {v: refs for v, refs in load_labels(args.labels) if v in set(video_ids)}
            print(f"MLDS BLEU@1 over {len(references)} labelled videos: "
                  f"{corpus_bleu1(dict(zip(video_ids, captions)), references):.4f}")
    except DataError as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
