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
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from model import MATMUL_DTYPES
from util.atomic import write_text_atomic
from util.checkpoints import load_model
from util.evaluate import evaluate, format_table
from util.release import checkpoint_location
from util.vocab import EOS
from util.data import (DataError, find_feat_dir, load_feature_file, load_labels, read_feature_manifest, read_ids,
                       warnings_as_lines)


def caption_features(model, vocab, features, batch_size, beam_size=1, length_penalty=0.0, n_best=1):
    """Captions for (videos, frames, dim) features, batch by batch, greedy (beam_size 1) or by beam search.

    Returns one dict per video: "caption", "attention" (one row per word and the closing <EOS>, frames),
    "words" (the rows' labels) and "n_best" [(caption, score, log_prob), ...] (beam search only)."""
    signature = [tf.TensorSpec([None, model.config.frames, model.config.feature_dim], tf.float32)]
    if beam_size == 1:
        decode = tf.function(model.greedy, input_signature=signature)
    else:
        decode = tf.function(lambda f: model.beam_search(f, beam_size, length_penalty, n_best=n_best),
                             input_signature=signature)
    results = []
    for start in tqdm(range(0, len(features), batch_size), desc="captioning", unit="batch", leave=False):
        outputs = decode(tf.constant(features[start:start + batch_size], tf.float32))
        if beam_size == 1:
            (words, attention), hypotheses = outputs, None
        else:
            hypotheses, scores, log_probs, attention = (t.numpy() for t in outputs)
            words = hypotheses[:, 0]  # (batch, steps): the best hypothesis
        for row, (ids, weights) in enumerate(zip(np.asarray(words), np.asarray(attention))):
            caption = vocab.decode(ids)
            labels = caption.split() + (["<EOS>"] if EOS in ids else [])
            result = {"caption": caption, "words": labels, "attention": weights[:len(labels)]}
            if hypotheses is not None:
                result["n_best"] = [(vocab.decode(h), float(sc), float(lp))
                                    for h, sc, lp in zip(hypotheses[row], scores[row], log_probs[row])]
            results.append(result)
    return results


def write_attention_plots(results, video_ids, out_dir, frames, video_dir=None):
    """One heatmap PNG per video in out_dir; with the clip found in video_dir, thumbnails of its frames on top."""
    import extract_features
    from util.plots import plot_attention

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for video_id, result in zip(video_ids, results):
        clip = Path(video_dir) / Path(video_id).name if video_dir else None
        thumbnails = None
        if clip is not None and clip.is_file():
            try:
                thumbnails = extract_features.read_frames(clip, frames, 96)
            except extract_features.VideoError as error:
                print(f"warning: {error}; attention plot without thumbnails", file=sys.stderr)
        plot_attention(result["words"], result["attention"], out_dir / f"{Path(video_id).name}.png",
                       frames_rgb=thumbnails, title=f"{Path(video_id).name}: {result['caption']}")


def check_manifest_matches(feat_dir, run_config):
    """Refuse features made with other extraction settings than the checkpoint was trained on."""
    trained = run_config.get("features")
    found = read_feature_manifest(feat_dir)
    if trained and found is not None:
        differing = [f"{k}: {found.get(k)!r} here, {v!r} in training" for k, v in trained.items() if found.get(k) != v]
        if differing:
            raise DataError(f"{Path(feat_dir) / 'manifest.json'}: features differ from the checkpoint's "
                            f"({'; '.join(differing)})")


def caption_videos(model, vocab, run_config, prefix, video_paths, batch_size, **decoding):
    """Caption raw clips with the extraction settings recorded at training time.
    Returns (clip names, caption_features results, failures)."""
    import extract_features

    if not run_config.get("features"):
        raise DataError(f"{prefix}: the checkpoint records no feature extractor (its features were not made by "
                        "extract_features.py), so it cannot caption raw videos")
    settings = extract_features.FeatureSettings.from_manifest(run_config["features"])
    run_cnn, _ = extract_features.build_extractor(settings)
    features = {}
    _, _, failures, _ = extract_features.extract(
        [Path(p) for p in video_paths], settings, run_cnn, batch_size=32, desc="reading clips",
        on_clip=lambda path, array: features.__setitem__(str(path), array.astype(np.float32)))
    names = [str(Path(p)) for p in video_paths if str(Path(p)) in features]
    results = caption_features(model, vocab, np.stack([features[n] for n in names]), batch_size,
                               **decoding) if names else []
    return names, results, failures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ids_file", nargs="?", help="video ids, one per line (e.g. testing_id.txt)")
    parser.add_argument("out_file", nargs="?", help="where to write `video_id,caption` lines")
    parser.add_argument("--video", nargs="+", metavar="CLIP", help="caption these raw clips instead")
    parser.add_argument("--checkpoint", help="run folder, checkpoint, release name (checkpoints/releases.json) or "
                                             "URL of a released .tar.gz (default: the newest run's best)")
    parser.add_argument("--feat-dir", help="folder of <id>.npy features (default: found beside the ids file)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--labels", help="labels JSON: score the captions (MLDS BLEU@1 and the COCO metrics)")
    parser.add_argument("--beam-size", type=int, default=1, help="1 (default) decodes greedily")
    parser.add_argument("--length-penalty", type=float, default=0.0, help="beam score = log-prob / length^A")
    parser.add_argument("--n-best", type=int, default=1, help="write the N best captions with scores to "
                        "OUT_FILE.nbest.json (needs --beam-size >= N)")
    parser.add_argument("--matmul-dtype", choices=MATMUL_DTYPES,
                        help="precision of the large matmuls (default: as trained); bfloat16 is faster on CPUs with "
                             "AVX512-BF16 and on GPUs")
    parser.add_argument("--attention-dir", help="write a PNG of attention over frames per video here")
    parser.add_argument("--video-dir", help="raw clips for the attention plots' thumbnails "
                        "(default: the video/ folder beside the features)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    if args.batch_size <= 0:
        parser.error("--batch-size must be positive")
    if not args.video and not (args.ids_file and args.out_file):
        parser.error("give IDS_FILE OUT_FILE, or --video CLIP ...")
    if args.beam_size <= 0 or not 0 < args.n_best <= args.beam_size:
        parser.error("--beam-size must be positive and --n-best between 1 and --beam-size")
    decoding = dict(beam_size=args.beam_size, length_penalty=args.length_penalty, n_best=args.n_best)
    try:
        args.checkpoint = checkpoint_location(args.checkpoint)  # a release name or URL is fetched once
        started = time.perf_counter()
        if args.video:
            model, vocab, run_config, prefix = load_model(args.checkpoint, args.matmul_dtype)
            names, results, failures = caption_videos(model, vocab, run_config, prefix, args.video, args.batch_size,
                                                      **decoding)
            for name, result in zip(names, results):
                print(f"{name},{result['caption']}")
            if args.attention_dir:
                write_attention_plots(results, names, args.attention_dir, model.config.frames,
                                      video_dir=Path(names[0]).parent if names else None)
            return 2 if failures else 0
        with warnings_as_lines():
            video_ids = read_ids(args.ids_file)
        out_dir = Path(args.out_file).resolve().parent
        if not out_dir.is_dir():  # checked now rather than after captioning every video
            raise DataError(f"{args.out_file}: output folder {out_dir} does not exist")
        if Path(args.out_file).is_dir():
            raise DataError(f"{args.out_file}: is a folder; give a file name to write the captions to")
        model, vocab, run_config, prefix = load_model(args.checkpoint, args.matmul_dtype)
        feat_dir = Path(args.feat_dir) if args.feat_dir else find_feat_dir(args.ids_file)
        check_manifest_matches(feat_dir, run_config)
        # drawn only if loading takes over half a second, and cleared before any error line
        with tqdm(video_ids, desc="loading features", unit="video", leave=False, delay=0.5) as bar:
            features = np.stack([load_feature_file(feat_dir / f"{v}.npy", model.config.frames,
                                                   model.config.feature_dim) for v in bar])
        results = caption_features(model, vocab, features, args.batch_size, **decoding)
        captions = [r["caption"] for r in results]
        write_text_atomic(args.out_file, "".join(f"{v},{c}\n" for v, c in zip(video_ids, captions)))
        if args.n_best > 1:
            write_text_atomic(f"{args.out_file}.nbest.json", json.dumps(
                {v: [{"caption": c, "score": sc, "log_prob": lp} for c, sc, lp in r["n_best"]]
                 for v, r in zip(video_ids, results)}, indent=1))
        if args.attention_dir:
            write_attention_plots(results, video_ids, args.attention_dir, model.config.frames,
                                  video_dir=args.video_dir or feat_dir.parent / "video")
        decoder = "greedy" if args.beam_size == 1 else f"beam {args.beam_size}"
        print(f"captioned {len(video_ids)} videos ({decoder}) with {prefix} in {time.perf_counter() - started:.1f} s; "
              f"wrote {args.out_file}")
        if args.labels:
            wanted = set(video_ids)
            references = {v: refs for v, refs in load_labels(args.labels) if v in wanted}
            print(format_table(evaluate(dict(zip(video_ids, captions)), references, source=args.out_file)))
    except DataError as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
