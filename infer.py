"""Caption videos with a trained S2VT checkpoint.

    python infer.py IDS_FILE OUT_FILE [--checkpoint DIR|NAME|URL] [--feat-dir DIR] [--batch-size N] [--beam-size K]
    python infer.py --video CLIP.avi [CLIP2.mp4 ...] [--checkpoint DIR|NAME|URL]
    python infer.py IDS_FILE OUT_FILE --checkpoint RGB_RUN --fuse FLOW_RUN[:WEIGHT] [--fuse-feat-dir DIR]
    python infer.py --video LONG.mp4 --segments auto|SECONDS [--min-scene S] [--max-scene S]
                    [--srt OUT.srt] [--vtt OUT.vtt] [--json OUT.json]

Writes one `video_id,caption` line per id, in the order of IDS_FILE. Features are read from --feat-dir, or found
through the MLDS layout beside the ids file (<dir>/feat/ or <dir>/testing_data/feat/). With --video, raw clips
are run through the feature extractor recorded in the checkpoint, and `file,caption` lines are printed.
The checkpoint defaults to the best one of the newest run under checkpoints/.

--fuse fuses another run late, as S2VT fuses its RGB and flow models: at every decoding step each word scores
(1 - WEIGHT) * the checkpoint's log-probability + WEIGHT * the fused run's (WEIGHT 0.5 unless given). The fused run
reads its own features: --fuse-feat-dir, else the features folder itself when both runs' streams are the same, else
the folder beside it named for the fused run's stream (testing_data/feat -> testing_data/feat_flow); with --video
each run extracts its own from the clips.

--segments captions one long video scene by scene (Captioner.caption_segments: cuts detected with PySceneDetect, or
fixed windows of SECONDS), prints `start --> end caption` lines and writes the cues as SRT, WebVTT and JSON (start,
end, caption, score), each file whole or not at all; beam search of 5 unless --beam-size says otherwise.

Decoding never writes <UNK>, repeats no bigram nor a word right after itself (--no-repeat-ngram, 0 for off) and ends
no caption on a word the run's training captions never end on (--no-end-rule to allow it): decoding.Constraints.
"""
import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from tqdm import tqdm

from captioner import Captioner
from decoding import NO_REPEAT_NGRAM
from extract_features import FeatureSettings
from model import MATMUL_DTYPES
from util.atomic import refuse_overwriting_inputs, write_text_atomic
from util.evaluate import evaluate, format_table
from util.scenes import MAX_SCENE, MIN_SCENE, parse_segments
from util.subtitles import write_subtitles
from util.data import (find_feat_dir, load_feature_file, load_labels, manifest_differences, read_feature_manifest,
                       read_ids, warnings_as_lines)
from util.errors import DataError, command

DEFAULT_FUSE_WEIGHT = 0.5  # the two streams count alike unless told otherwise
SEGMENTS_BEAM = 5  # a video's few scene captions are worth beam search, as on the web page


def write_attention_plots(results, video_ids, out_dir, frames, video_dir=None):
    """One heatmap PNG per video in out_dir; with the clip found in video_dir, thumbnails of its frames on top."""
    from util.video import VideoError, read_frames

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for video_id, result in zip(video_ids, results):
        clip = Path(video_dir) / Path(video_id).name if video_dir else None
        thumbnails = result.frames
        if thumbnails is None and clip is not None and clip.is_file():
            try:
                thumbnails = read_frames(clip, frames, 96)
            except VideoError as error:
                print(f"warning: {error}; attention plot without thumbnails", file=sys.stderr)
        result_with_frames = result if thumbnails is None else replace(result, frames=thumbnails)
        result_with_frames.plot_attention(out_dir / f"{Path(video_id).name}.png",
                                          title=f"{Path(video_id).name}: {result.caption}")


def check_manifest_matches(feat_dir, run_config):
    """Refuse features made with other extraction settings (or another stream) than the checkpoint was trained on."""
    trained = run_config.get("features")
    found = read_feature_manifest(feat_dir)
    if trained and found is not None:
        differing = [f"{k}: {here!r} here, {there!r} in training"
                     for k, (here, there) in manifest_differences(found, trained).items()]
        if differing:
            raise DataError(f"{Path(feat_dir) / 'manifest.json'}: features differ from the checkpoint's "
                            f"({'; '.join(differing)})")


def parse_fuse(spec):
    """--fuse RUN[:WEIGHT] -> (RUN, weight): a last ':' part without '/' is the weight (URLs keep their ':')."""
    run, colon, weight_text = spec.rpartition(":")
    if not colon or "/" in weight_text:
        run, weight_text = spec, None
    if not run:
        raise DataError(f"--fuse {spec}: give the run to fuse, as RUN or RUN:WEIGHT")
    if weight_text is None:
        return run, DEFAULT_FUSE_WEIGHT
    try:
        weight = float(weight_text)
    except ValueError:
        weight = None
    if weight is None or not 0 < weight < 1:
        raise DataError(f"--fuse {spec}: the weight after ':' must be a number between 0 and 1 (exclusive; the "
                        f"checkpoint weighs 1 - WEIGHT), not {weight_text!r}")
    return run, weight


def stream_of(run_config):
    manifest = run_config.get("features")
    return FeatureSettings.from_manifest(manifest).stream if manifest else FeatureSettings.stream


def fused_feat_dir(feat_dir, captioner, member):
    """Where a fused run's features are found by default: feat_dir for the same stream, else feat_dir_<stream>."""
    stream = stream_of(member.run_config)
    return feat_dir if stream == stream_of(captioner.run_config) else feat_dir.with_name(f"{feat_dir.name}_{stream}")


def read_run_features(feat_dir, video_ids, captioner, what):
    """(videos, frames, dim) features of a run from feat_dir, after checking they are the run's kind."""
    if not feat_dir.is_dir():
        raise DataError(f"{feat_dir}: no features folder for {what} ({stream_of(captioner.run_config)} stream, "
                        f"{captioner.source}); extract them with extract_features.py and the run's settings")
    check_manifest_matches(feat_dir, captioner.run_config)
    # drawn only if loading takes over half a second, and cleared before any error line
    with tqdm(video_ids, desc="loading features", unit="video", leave=False, delay=0.5) as bar:
        return np.stack([load_feature_file(feat_dir / f"{v}.npy", captioner.frames, captioner.feature_dim)
                         for v in bar])


def caption_long_video(args, fuse, started):
    """--segments: the cues of one video printed and written; nothing is written unless the whole video was read."""
    segments = parse_segments(args.segments)
    outputs = [Path(p) for p in (args.srt, args.vtt, args.json) if p]
    for out in outputs:  # checked before the video is read, not after
        if out.is_dir() or not out.resolve().parent.is_dir():
            raise DataError(f"{out}: is a folder, or its folder does not exist")
    captioner = Captioner.load(args.checkpoint, args.matmul_dtype, args.batch_size, fuse)
    video = args.video[0]
    cues = captioner.caption_segments(video, segments, args.min_scene, args.max_scene, args.beam_size,
                                      args.length_penalty, no_repeat_ngram=args.no_repeat_ngram,
                                      end_rule=not args.no_end_rule)
    for cue in cues:
        print(f"{cue.start:.3f} --> {cue.end:.3f} {cue.caption}")
    write_subtitles(cues, args.srt, args.vtt, args.json, video=str(video), checkpoint=str(captioner.source),
                    segments=segments, beam_size=args.beam_size)
    seconds = time.perf_counter() - started
    written = "; wrote " + ", ".join(map(str, outputs)) if outputs else ""
    print(f"captioned {video}: {len(cues)} cues over {cues[-1].end:.1f} s of video in {seconds:.1f} s"
          f"{written}", file=sys.stderr)
    return 0


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ids_file", nargs="?", help="video ids, one per line (e.g. testing_id.txt)")
    parser.add_argument("out_file", nargs="?", help="where to write `video_id,caption` lines")
    parser.add_argument("--video", nargs="+", metavar="CLIP", help="caption these raw clips instead")
    parser.add_argument("--checkpoint", help="run folder, checkpoint, release name (checkpoints/releases.json) or "
                                             "URL of a released .tar.gz (default: the newest run's best)")
    parser.add_argument("--feat-dir", help="folder of <id>.npy features (default: found beside the ids file)")
    parser.add_argument("--fuse", metavar="RUN[:WEIGHT]", help="fuse this run's word log-probabilities with the "
                        f"checkpoint's at every step, weighing WEIGHT (default {DEFAULT_FUSE_WEIGHT}) against "
                        "1 - WEIGHT: e.g. a flow-stream run with an RGB one")
    parser.add_argument("--fuse-feat-dir", help="the fused run's features (default: --feat-dir for the same stream, "
                        "else the folder beside it named <feat dir>_<stream>, e.g. feat_flow)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--labels", help="labels JSON: score the captions (MLDS BLEU@1 and the COCO metrics)")
    parser.add_argument("--beam-size", type=int, help=f"1 decodes greedily (the default, but {SEGMENTS_BEAM} with "
                                                       "--segments)")
    parser.add_argument("--length-penalty", type=float, default=0.0, help="beam score = log-prob / length^A")
    parser.add_argument("--n-best", type=int, default=1, help="write the N best captions with scores to "
                        "OUT_FILE.nbest.json (needs --beam-size >= N)")
    parser.add_argument("--no-repeat-ngram", type=int, default=NO_REPEAT_NGRAM, metavar="N",
                        help=f"no n-gram of N words twice in a caption, and no word right after itself (0: off; "
                             f"default {NO_REPEAT_NGRAM})")
    parser.add_argument("--no-end-rule", action="store_true", help="let a caption end on any word (by default not "
                        "on one that the run's training captions never end on: 'a', 'the', 'is', ...)")
    parser.add_argument("--matmul-dtype", choices=MATMUL_DTYPES,
                        help="precision of the large matmuls (default: as trained); bfloat16 is faster on CPUs with "
                             "AVX512-BF16 and on GPUs")
    parser.add_argument("--attention-dir", help="write a PNG of attention over frames per video here")
    parser.add_argument("--video-dir", help="raw clips for the attention plots' thumbnails "
                        "(default: the video/ folder beside the features)")
    parser.add_argument("--segments", metavar="auto|SECONDS", help="with one --video: caption it scene by scene, "
                        "cutting where the shots change (auto) or every SECONDS")
    parser.add_argument("--min-scene", type=float, default=MIN_SCENE,
                        help=f"with --segments auto: seconds at least between cuts (default {MIN_SCENE:g})")
    parser.add_argument("--max-scene", type=float, default=MAX_SCENE,
                        help=f"with --segments auto: split longer scenes every this many seconds (default "
                             f"{MAX_SCENE:g})")
    parser.add_argument("--srt", help="with --segments: write the cues as SubRip subtitles here")
    parser.add_argument("--vtt", help="with --segments: write the cues as WebVTT subtitles here")
    parser.add_argument("--json", help="with --segments: write the cues (start, end, caption, score) as JSON here")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def parse_args(argv=None):
    """The flags, checked together; an output that would replace an input or another output is refused here."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.beam_size is None:
        args.beam_size = SEGMENTS_BEAM if args.segments else 1
    if args.segments is not None:
        if not args.video or len(args.video) != 1 or args.ids_file:
            parser.error("--segments captions one video: give --video LONG.mp4 and no IDS_FILE")
        if args.attention_dir or args.n_best != 1:
            parser.error("--segments writes one caption per scene: no --attention-dir or --n-best")
        if not 0 <= args.min_scene < args.max_scene:
            parser.error("need 0 <= --min-scene < --max-scene")
    elif args.srt or args.vtt or args.json:
        parser.error("--srt, --vtt and --json need --segments")
    if args.batch_size <= 0:
        parser.error("--batch-size must be positive")
    if not args.video and not (args.ids_file and args.out_file):
        parser.error("give IDS_FILE OUT_FILE, or --video CLIP ...")
    if args.beam_size <= 0 or not 0 < args.n_best <= args.beam_size:
        parser.error("--beam-size must be positive and --n-best between 1 and --beam-size")
    if args.no_repeat_ngram < 0:
        parser.error("--no-repeat-ngram must be 0 (off) or positive")
    if args.fuse_feat_dir and not args.fuse:
        parser.error("--fuse-feat-dir needs --fuse")
    captions_file = None if args.video else args.out_file  # with --video the captions go to stdout
    n_best_file = f"{captions_file}.nbest.json" if captions_file and args.n_best > 1 else None
    refuse_overwriting_inputs([("OUT_FILE", captions_file), ("--n-best", n_best_file), ("--srt", args.srt),
                               ("--vtt", args.vtt), ("--json", args.json)],
                              [("IDS_FILE", args.ids_file), ("--labels", args.labels),
                               *(("--video", clip) for clip in args.video or ())])
    return args


def decoding_options(args):
    return dict(beam_size=args.beam_size, length_penalty=args.length_penalty, n_best=args.n_best,
                no_repeat_ngram=args.no_repeat_ngram, end_rule=not args.no_end_rule)


def caption_clips(args, fuse):
    """--video: a `file,caption` line per clip on stdout, an error line per clip that cannot be read (exit 2)."""
    captioner = Captioner.load(args.checkpoint, args.matmul_dtype, args.batch_size, fuse)
    results = captioner.caption([Path(p) for p in args.video], attention=True, errors="return",
                                **decoding_options(args))
    good = [(name, r) for name, r in zip(args.video, results) if not isinstance(r, Exception)]
    for name, result in zip(args.video, results):
        if isinstance(result, Exception):
            print(f"error: {result}", file=sys.stderr)
        else:
            print(f"{name},{result.caption}")
    if args.attention_dir:
        write_attention_plots([r for _, r in good], [n for n, _ in good], args.attention_dir, captioner.frames)
    return 2 if len(good) < len(results) else 0


def caption_ids(args, fuse, started):
    """IDS_FILE OUT_FILE: the captions of features on disk, written whole; n-best, attention plots and scores if
    asked."""
    with warnings_as_lines():
        video_ids = read_ids(args.ids_file)
    out_dir = Path(args.out_file).resolve().parent
    if not out_dir.is_dir():  # checked now rather than after captioning every video
        raise DataError(f"{args.out_file}: output folder {out_dir} does not exist")
    if Path(args.out_file).is_dir():
        raise DataError(f"{args.out_file}: is a folder; give a file name to write the captions to")
    captioner = Captioner.load(args.checkpoint, args.matmul_dtype, args.batch_size, fuse)
    feat_dir = Path(args.feat_dir) if args.feat_dir else find_feat_dir(args.ids_file)
    features = read_run_features(feat_dir, video_ids, captioner, "the checkpoint")
    fused_features = [read_run_features(Path(args.fuse_feat_dir) if args.fuse_feat_dir else
                                        fused_feat_dir(feat_dir, captioner, member), video_ids, member, "--fuse")
                      for member, _ in captioner.fused]
    results = captioner.decode(features, fused_features=fused_features, **decoding_options(args))
    write_outputs(args, video_ids, results, captioner, feat_dir)
    decoder = "greedy" if args.beam_size == 1 else f"beam {args.beam_size}"
    fused = "".join(f" fused with {member.source} (weight {weight:g} against {captioner.weight:g})"
                    for member, weight in captioner.fused)
    print(f"captioned {len(video_ids)} videos ({decoder}) with {captioner.source}{fused} in "
          f"{time.perf_counter() - started:.1f} s; wrote {args.out_file}")
    if args.labels:
        wanted = set(video_ids)
        references = {v: refs for v, refs in load_labels(args.labels) if v in wanted}
        print(format_table(evaluate({v: r.caption for v, r in zip(video_ids, results)}, references,
                                    source=args.out_file)))
    return 0


def write_outputs(args, video_ids, results, captioner, feat_dir):
    """OUT_FILE, OUT_FILE.nbest.json (--n-best) and the attention plots (--attention-dir)."""
    write_text_atomic(args.out_file, "".join(f"{v},{r.caption}\n" for v, r in zip(video_ids, results)))
    if args.n_best > 1:
        write_text_atomic(f"{args.out_file}.nbest.json", json.dumps(
            {v: [{"caption": h.caption, "score": h.score, "log_prob": h.log_prob} for h in r.n_best]
             for v, r in zip(video_ids, results)}, indent=1))
    if args.attention_dir:
        write_attention_plots(results, video_ids, args.attention_dir, captioner.frames,
                              video_dir=args.video_dir or feat_dir.parent / "video")


@command
def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    fuse = [parse_fuse(args.fuse)] if args.fuse else []
    if args.segments is not None:
        return caption_long_video(args, fuse, started)
    if args.video:
        return caption_clips(args, fuse)
    return caption_ids(args, fuse, started)


if __name__ == "__main__":
    sys.exit(main())
