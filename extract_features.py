"""Turn a folder of video clips into S2VT frame features: one (frames, dim) float32 .npy per clip.

    python extract_features.py VIDEO_DIR FEAT_DIR [--frames 80] [--weights imagenet|none|PATH] [--batch-size 32]

Defaults reproduce the MLDS/S2VT features: 80 uniformly sampled frames through VGG16 up to fc2 (fc7, 4096-d)
with ImageNet weights. `--layer` picks an earlier VGG16 layer (run at `--image-size`, average-pooled to a
`--pool`ed to a pyramid of `--grids`); the offline demo uses that (see README). FEAT_DIR/manifest.json records the settings,
and re-running on the same FEAT_DIR with other settings is refused; clips already extracted are skipped.
"""
import argparse
import json
import os
import queue
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2
import numpy as np
from tqdm import tqdm

from util.atomic import atomic_path, write_text_atomic

VIDEO_SUFFIXES = {".avi", ".mp4", ".mkv", ".mov", ".webm", ".mpg", ".mpeg", ".m4v", ".wmv", ".flv"}
MANIFEST = "manifest.json"
FC_LAYERS = ("fc1", "fc2")


class VideoError(Exception):
    """A clip that cannot be read: the message names the file and what is wrong."""


def frame_indices(frame_count, frames):
    """`frames` indices spread uniformly over [0, frame_count); frames repeat when the clip is shorter."""
    return np.linspace(0, frame_count - 1, frames).round().astype(int)


def read_frames(path, frames, image_size):
    """Decode `frames` uniformly sampled RGB frames of `path`, resized to image_size: (frames, size, size, 3) uint8.

    The frame count comes from decoding the clip, since container headers (CAP_PROP_FRAME_COUNT) often lie.
    """
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: empty file (0 bytes)")
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise VideoError(f"{path}: not a video OpenCV can open")
        decoded = []
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            # Resize at once so a long or high-resolution clip never holds full-size frames in memory.
            decoded.append(cv2.resize(frame, (image_size, image_size), interpolation=cv2.INTER_AREA))
    finally:
        capture.release()
    if not decoded:
        raise VideoError(f"{path}: no decodable frames")
    picked = np.stack([decoded[i] for i in frame_indices(len(decoded), frames)])
    return picked[..., ::-1]  # OpenCV decodes BGR; keras.applications preprocessing expects RGB


def build_cnn(layer="fc2", weights="imagenet", image_size=224, pool="avg", grids=(2,), seed=0):
    """VGG16 from keras.applications, cut at `layer`.

    A conv layer's map is pooled (avg or max) to each g x g grid in `grids` and the flattened grids are
    concatenated: a spatial pyramid, so coarse grids keep what the object is and fine ones where it is.
    """
    import keras

    if weights == "none":
        weights = None
        keras.utils.set_random_seed(seed)  # random weights must be the same in every run that shares a FEAT_DIR
    if layer in FC_LAYERS:
        base = keras.applications.VGG16(weights=weights, include_top=True)
        return keras.Model(base.input, base.get_layer(layer).output, name=f"vgg16_{layer}")
    base = keras.applications.VGG16(weights=weights, include_top=False, input_shape=(image_size, image_size, 3))
    feature_map = base.get_layer(layer).output  # (batch, h, w, channels)
    pooling = {"avg": keras.layers.AveragePooling2D, "max": keras.layers.MaxPooling2D}[pool]
    pooled = []
    for grid in grids:
        size = feature_map.shape[1] // grid
        pooled.append(keras.layers.Flatten()(pooling(size, strides=size)(feature_map)))  # (batch, grid*grid*channels)
    output = pooled[0] if len(pooled) == 1 else keras.layers.Concatenate()(pooled)
    return keras.Model(base.input, output, name=f"vgg16_{layer}_{pool}pyramid")


def list_videos(video_dir, ids_file=None):
    video_dir = Path(video_dir)
    if not video_dir.is_dir():
        raise SystemExit(f"error: {video_dir}: video directory not found")
    if ids_file:
        names = [line.strip() for line in Path(ids_file).read_text().splitlines() if line.strip()]
        return [video_dir / name for name in names]
    return sorted(p for p in video_dir.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)


def check_manifest(feat_dir, settings):
    """Write FEAT_DIR/manifest.json, or refuse when the one already there records other settings."""
    path = Path(feat_dir) / MANIFEST
    if path.exists():
        recorded = json.loads(path.read_text())
        differing = {k: (recorded.get(k), v) for k, v in settings.items() if recorded.get(k) != v}
        if differing:
            detail = ", ".join(f"{k}: {old!r} there, {new!r} asked" for k, (old, new) in differing.items())
            raise SystemExit(f"error: {path}: features there were made with other settings ({detail}); "
                             "use another FEAT_DIR")
        return
    write_text_atomic(path, json.dumps(settings, indent=1))


def save_atomic(path, array):
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)


def decoded_clips(video_paths, frames, image_size, skip):
    """Yield (path, frames or VideoError) from a background thread, so decoding overlaps the CNN."""
    results = queue.Queue(maxsize=8)

    def decode_all():
        for path in video_paths:
            if skip(path):
                results.put((path, None))
                continue
            try:
                results.put((path, read_frames(path, frames, image_size)))
            except VideoError as error:
                results.put((path, error))
        results.put(None)

    threading.Thread(target=decode_all, daemon=True).start()
    while (item := results.get()) is not None:
        yield item


def extract(video_paths, feat_dir, cnn, frames, image_size, batch_size):
    """Extract every clip not yet in feat_dir. Returns (done, skipped, failures{name: reason}, frames_per_s).

    Frames from consecutive clips fill fixed-size CNN batches across clip boundaries; a clip's features
    are saved as soon as its last frame has been through the CNN.
    """
    import tensorflow as tf
    import keras

    feat_dir = Path(feat_dir)
    output_path = lambda path: feat_dir / f"{path.name}.npy"
    run_cnn = tf.function(lambda x: cnn(keras.applications.vgg16.preprocess_input(tf.cast(x, tf.float32)),
                                        training=False), input_signature=[
        tf.TensorSpec([None, image_size, image_size, 3], tf.uint8)])
    done, skipped, failures, frame_total, started = 0, 0, {}, 0, time.perf_counter()
    pending_frames, pending_clips, outputs = [], [], []  # frames waiting for the CNN; clips not yet complete

    def flush(final=False):
        nonlocal done, frame_total
        while pending_frames and (final or sum(len(f) for f in pending_frames) >= batch_size):
            batch = np.concatenate(pending_frames)
            take = batch[:batch_size]
            rest = batch[batch_size:]
            pending_frames[:] = [rest] if len(rest) else []
            outputs.append(run_cnn(take).numpy())
        produced = sum(len(o) for o in outputs)
        while pending_clips and produced >= frames:
            path = pending_clips.pop(0)
            features = np.concatenate(outputs)
            save_atomic(output_path(path), features[:frames].astype(np.float32))
            outputs[:] = [features[frames:]] if len(features) > frames else []
            produced -= frames
            done += 1
            frame_total += frames

    progress = tqdm(total=len(video_paths), desc="extracting", unit="clip")
    for path, clip in decoded_clips(video_paths, frames, image_size, lambda p: output_path(p).exists()):
        if clip is None:
            skipped += 1
        elif isinstance(clip, VideoError):
            failures[path.name] = str(clip)
            tqdm.write(f"failed: {clip}")
        else:
            pending_frames.append(clip)
            pending_clips.append(path)
            flush()
        progress.update(1)
        progress.set_postfix(frames_per_s=f"{frame_total / (time.perf_counter() - started):.1f}")
    flush(final=True)
    progress.close()
    return done, skipped, failures, frame_total / max(time.perf_counter() - started, 1e-9)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("video_dir")
    parser.add_argument("feat_dir")
    parser.add_argument("--ids", help="extract only the clips listed in this file, one name per line")
    parser.add_argument("--frames", type=int, default=80, help="frames sampled uniformly per clip (default 80)")
    parser.add_argument("--weights", default="imagenet", help="imagenet, none (random) or a .weights.h5 path")
    parser.add_argument("--layer", default="fc2", help="VGG16 layer: fc2 (default), fc1 or a conv/pool layer")
    parser.add_argument("--image-size", type=int, default=224, help="input size for conv layers (fc layers: 224)")
    parser.add_argument("--pool", choices=("avg", "max"), default="avg", help="pooling of a conv layer's map")
    parser.add_argument("--grids", default="2", help="comma-separated pyramid grids for conv layers, e.g. 1,2")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="with --weights none: the random weights' seed")
    args = parser.parse_args(argv)
    for name in ("frames", "batch_size", "image_size"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    try:
        grids = tuple(int(g) for g in args.grids.split(","))
    except ValueError:
        parser.error(f"--grids must be comma-separated whole numbers, not {args.grids!r}")
    if min(grids) <= 0:
        parser.error("--grids must be positive")
    if args.layer in FC_LAYERS:
        args.image_size, args.pool, grids = 224, None, None

    videos = list_videos(args.video_dir, args.ids)
    feat_dir = Path(args.feat_dir)
    feat_dir.mkdir(parents=True, exist_ok=True)
    cnn = build_cnn(args.layer, args.weights, args.image_size, args.pool, grids, args.seed)
    settings = {"cnn": "vgg16", "layer": args.layer, "image_size": args.image_size,
                "pool": args.pool, "grids": list(grids) if grids else None,
                "weights": args.weights if args.weights in ("imagenet", "none") else Path(args.weights).name,
                "seed": args.seed if args.weights == "none" else None,
                "frames": args.frames, "dtype": "float32", "feature_dim": int(cnn.output.shape[-1])}
    check_manifest(feat_dir, settings)
    done, skipped, failures, fps = extract(videos, feat_dir, cnn, args.frames, args.image_size, args.batch_size)
    if failures:
        (feat_dir / "failed.txt").write_text("".join(f"{name}\t{why}\n" for name, why in failures.items()))
    print(f"extracted {done}, skipped {skipped} (already there), failed {len(failures)}; "
          f"{fps:.1f} frames/s; features in {feat_dir}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
