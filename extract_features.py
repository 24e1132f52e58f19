"""Turn a folder of video clips into S2VT frame features: one (frames, dim) .npy per clip.

    python extract_features.py VIDEO_DIR FEAT_DIR [--frames 80] [--cnn vgg16] [--weights imagenet|none|PATH]
                               [--stream rgb|flow] [--batch-size 32] [--dtype float32] [--ids FILE] [--shard i/n]
    python extract_features.py VIDEO_DIR FEAT_DIR --encoder NAME [--weights DIR|FILE] [--layer OUTPUT]
                               [--compute-dtype float32|bfloat16] ...

Defaults reproduce the MLDS/S2VT features: 80 uniformly sampled frames through VGG16 up to fc2 (fc7, 4096-d)
with ImageNet weights. `--cnn` also offers vgg19 (fc2, 4096-d), resnet50 and inception_v3 (global average pool,
2048-d). For VGG, `--layer` picks an earlier layer, run at `--image-size` and `--pool`ed to a pyramid of
`--grids`; the offline demo uses that (see docs/demo.md). `--stream flow` runs the CNN on images of the optical flow
from each sampled frame to the next decoded one instead of on the frames (S2VT's flow stream, for late fusion in
infer.py). FEAT_DIR/manifest.json records the settings: a re-run with other settings is refused, clips already
extracted are skipped, and clips that cannot be read are listed in FEAT_DIR/failed.txt (exit status 1) while the
rest go on.

`--encoder` takes today's frame encoders instead of a keras.applications CNN (util/encoders.py, docs/encoders.md):
clip_vit_base_patch32 and clip_vit_base_patch16 (the projected image embedding), siglip2_base_patch16_224 (the
pooled embedding), dinov2_small and dinov2_base (`--layer cls`, or `cls+patch_mean`), from the keras-hub preset
folder given as --weights DIR, each with its preset's preprocessing; and mobilenet_v2 with torchvision's ImageNet
weights (installed with pip, or a .pth given as --weights FILE). The manifest records the encoder, the weights'
sha256 and the preprocessing.
"""
import argparse
import json
import os
import sys
import time
import uuid
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Tuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2
import numpy as np
from tqdm import tqdm

from util import encoders
from util.atomic import atomic_path, write_text_atomic
from util.data import manifest_differences, prefetched, read_feature_manifest, read_ids, warnings_as_lines
from util.errors import DataError, command
from util.flags import positive_int
from util.video import (NO_LIMITS, VIDEO_SUFFIXES, VideoError, central_square, flow_pair_indices, frame_indices,
                        read_frame_pairs, read_frames)

MANIFEST = "manifest.json"
FC_LAYERS = ("fc1", "fc2")
# name: (keras.applications constructor, preprocessing module, default layer, native input size)
CNNS = {"vgg16": ("VGG16", "vgg16", "fc2", 224), "vgg19": ("VGG19", "vgg19", "fc2", 224),
        "resnet50": ("ResNet50", "resnet50", "avg_pool", 224),
        "inception_v3": ("InceptionV3", "inception_v3", "avg_pool", 299)}
STREAMS = ("rgb", "flow")
# Flow images: x and y flow as 128 + FLOW_SCALE * displacement, magnitude as FLOW_SCALE * length, clipped to
# 0..255, in pixels of a FLOW_REFERENCE_SIZE-pixel frame whatever --image-size: +-16 px per frame span 0..255.
FLOW_REFERENCE_SIZE = 224
FLOW_SCALE = 8.0


@dataclass(frozen=True)
class FeatureSettings:
    """Everything that decides what a feature file holds; stored as FEAT_DIR/manifest.json. Fields added later
    default to None, which is what a manifest written before them means."""
    cnn: Optional[str] = "vgg16"  # a keras.applications CNN; None with an encoder
    layer: str = "fc2"  # the CNN's layer, or the encoder's output
    image_size: int = 224
    pool: Optional[str] = None  # VGG conv layers only
    grids: Optional[Tuple[int, ...]] = None  # VGG conv layers only
    weights: str = "imagenet"  # imagenet, none or a weights file path; an encoder's preset folder or .pth file
    seed: Optional[int] = None  # weights "none" only
    random_weights: Optional[str] = None  # weights "none" only: "numpy", drawn the same way on every backend
    frames: int = 80
    dtype: str = "float32"
    stream: str = "rgb"  # rgb: the sampled frames; flow: images of the optical flow from each one (flow_images)
    encoder: Optional[str] = None  # a util.encoders.ENCODERS name instead of the CNN
    weights_sha256: Optional[str] = None  # the encoder's weights (util.encoders.weights_sha256)
    preprocessing: Optional[dict] = None  # the encoder's (util.encoders), JSON-ready; image_size is its center_crop
    compute_dtype: Optional[str] = None  # the encoder's computation, None meaning float32

    @property
    def read_size(self):
        """The side of the square frames read_clip gives: the encoder's resize, else image_size."""
        return self.preprocessing["resize"] if self.preprocessing else self.image_size

    @property
    def square_crop(self):
        return bool(self.preprocessing and self.preprocessing["crop_to_square"])

    def manifest(self, feature_dim):
        return {**asdict(self), "grids": list(self.grids) if self.grids else None, "feature_dim": feature_dim}

    @classmethod
    def from_manifest(cls, manifest):
        known = {k: v for k, v in manifest.items() if k in cls.__dataclass_fields__}
        if known.get("grids"):
            known["grids"] = tuple(known["grids"])
        return cls(**known)


def flow_images(pairs):
    """Frame pairs (frames, 2, size, size, 3) uint8 RGB -> (frames, size, size, 3) uint8 images of the dense optical
    flow from each pair's first frame to its second: red x, green y (128 = still; right and down are brighter), blue
    the magnitude, scaled and clipped as FLOW_SCALE says. OpenCV's DIS flow (medium preset): on a textured 96-pixel
    test, as close to a square's true 2-pixel motion as Farneback (1.8 vs 1.9 px) with half its background noise,
    in half the time (0.7 ms a pair)."""
    dis = cv2.DISOpticalFlow_create(cv2.DISOpticalFlow_PRESET_MEDIUM)
    scale = FLOW_SCALE * FLOW_REFERENCE_SIZE / pairs.shape[3]
    images = np.empty((len(pairs), *pairs.shape[2:]), np.uint8)
    for i, (first, second) in enumerate(pairs):
        flow = dis.calc(cv2.cvtColor(first, cv2.COLOR_RGB2GRAY), cv2.cvtColor(second, cv2.COLOR_RGB2GRAY),
                        None) * scale  # (size, size, 2): x, y
        magnitude = np.hypot(flow[..., 0], flow[..., 1])
        images[i] = np.clip(np.rint(np.dstack([128 + flow, magnitude])), 0, 255)
    return images


def read_clip(path, settings, limits=NO_LIMITS, stop=None):
    """What the CNN sees of one clip: its sampled RGB frames, or with settings.stream "flow" their flow images;
    (frames, size, size, 3) uint8. limits and stop as for util.video.read_frames."""
    size, crop = settings.read_size, settings.square_crop
    if settings.stream == "flow":
        return flow_images(read_frame_pairs(path, settings.frames, size, limits, stop, crop))
    return read_frames(path, settings.frames, size, limits, stop, crop)


def sample_decoded(frames_rgb, settings):
    """read_clip for frames already decoded (all of a clip's, RGB, any size)."""
    size = (settings.read_size, settings.read_size)
    if settings.stream == "flow":
        picked = flow_pair_indices(len(frames_rgb), settings.frames)
    else:
        picked = frame_indices(len(frames_rgb), settings.frames)
    square = central_square if settings.square_crop else (lambda frame: frame)
    resized = np.stack([cv2.resize(square(frames_rgb[i]), size, interpolation=cv2.INTER_AREA)
                        for i in picked.reshape(-1)])
    return flow_images(resized.reshape(*picked.shape, *resized.shape[1:])) if settings.stream == "flow" else resized


def build_extractor(settings):
    """The CNN from keras.applications, or the encoder (util.encoders.build), as one compiled function: uint8 frames
    (n, size, size, 3) as read_clip gives them -> numpy features (n, dim); and dim.

    A VGG conv layer's map is pooled (avg, max or both) to each g x g grid in `grids` and the flattened grids are
    concatenated: a spatial pyramid, so coarse grids keep what the object is and fine ones where it is.
    """
    if settings.encoder:
        return encoders.build(settings)
    import keras

    from util import backend

    constructor, module, default_layer, native_size = CNNS[settings.cnn]
    weights = None if settings.weights == "none" else settings.weights
    if weights is None and settings.random_weights != "numpy":
        raise DataError(f"features made with random weights seeded by TensorFlow (an older s2vt, manifest "
                        f"{settings}); extract them again: random weights are now drawn with numpy, the same on "
                        f"every backend")
    build = getattr(keras.applications, constructor)
    if settings.layer == default_layer and default_layer in FC_LAYERS:
        base = build(weights=weights, include_top=True)
        cnn = keras.Model(base.input, base.get_layer(settings.layer).output)
    elif settings.layer == default_layer:
        cnn = build(weights=weights, include_top=False, pooling="avg",
                    input_shape=(settings.image_size, settings.image_size, 3))
    else:
        base = build(weights=weights, include_top=False, input_shape=(settings.image_size, settings.image_size, 3))
        feature_map = base.get_layer(settings.layer).output  # (batch, h, w, channels)
        poolings = {"avg": keras.layers.AveragePooling2D, "max": keras.layers.MaxPooling2D}
        pooled = []
        for grid in settings.grids:
            size = feature_map.shape[1] // grid
            for pool in settings.pool.split("+"):  # avg keeps how much of a thing there is, max what is there
                pooled.append(keras.layers.Flatten()(poolings[pool](size, strides=size)(feature_map)))  # (batch, g*g*c)
        cnn = keras.Model(base.input, pooled[0] if len(pooled) == 1 else keras.layers.Concatenate()(pooled))
    if weights is None:  # random weights are the same in every run sharing a FEAT_DIR, on every backend
        draw_random_weights(cnn, settings.seed or 0)
    preprocess = getattr(keras.applications, module).preprocess_input
    features = backend.compile_function(
        cnn, lambda frames_rgb: cnn(preprocess(keras.ops.cast(frames_rgb, "float32")), training=False))
    return (lambda frames_rgb: backend.to_numpy(features(frames_rgb))), int(cnn.output.shape[-1])


def draw_random_weights(cnn, seed):
    """Keras's default initialisation (Glorot-uniform kernels; biases and batch-norm statistics as built), with
    the kernels drawn by numpy from the seed, so that every backend and machine gets the same network."""
    rng = np.random.default_rng(seed)
    for variable in cnn.weights:
        if variable.name == "kernel":
            shape = tuple(variable.shape)
            receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
            limit = np.sqrt(6.0 / (receptive * (shape[-2] + shape[-1])))
            variable.assign(uniform_float32(rng, limit, shape))


def uniform_float32(rng, limit, shape, chunk=1 << 20):
    """rng.uniform(-limit, limit, shape).astype("float32"), the same numbers drawn a chunk at a time: no float64
    copy of the whole (VGG16's fc1 kernel: 6 s to draw whole on a 2-core AMD EPYC, 0.9 s by chunks)."""
    kernel = np.empty(shape, np.float32)
    flat = kernel.reshape(-1)
    for start in range(0, flat.size, chunk):
        flat[start:start + chunk] = rng.uniform(-limit, limit, min(chunk, flat.size - start))
    return kernel


def in_shard(name, shard):
    """Deterministic, disjoint partition by file name: shard (i, n) holds the names whose CRC32 % n == i."""
    index, count = shard
    return zlib.crc32(name.encode()) % count == index


def list_videos(video_dir, ids_file=None, shard=(0, 1)):
    video_dir = Path(video_dir)
    if not video_dir.is_dir():
        raise DataError(f"{video_dir}: video folder not found")
    if ids_file:
        paths = [video_dir / name for name in read_ids(ids_file)]
    else:
        paths = sorted(p for p in video_dir.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
    return [p for p in paths if in_shard(p.name, shard)]


def create_whole(path, text):
    """Write `path` unless it exists, never replacing one that another run creates at the same moment: the text
    goes to a file of this run's own and is hard-linked into place whole. True if this call created it."""
    candidate = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        candidate.write_text(text)
        os.link(candidate, path)  # unlike a rename, fails when `path` exists
        return True
    except FileExistsError:
        return False
    except OSError as error:
        raise DataError(f"{path}: cannot write ({error.strerror or error})") from None
    finally:
        candidate.unlink(missing_ok=True)


def check_manifest(feat_dir, manifest):
    """Write FEAT_DIR/manifest.json, or refuse when the one already there records other settings.
    Shards started together race to write it: the first one's stands and the others compare with it."""
    path = Path(feat_dir) / MANIFEST
    if path.exists() or not create_whole(path, json.dumps(manifest, indent=1)):
        differing = manifest_differences(read_feature_manifest(feat_dir), manifest)
        if differing:
            detail = ", ".join(f"{k}: {old!r} there, {new!r} asked" for k, (old, new) in differing.items())
            raise DataError(f"{path}: features there were made with other settings ({detail}); "
                            "use another FEAT_DIR")


def extracted_before(feat_dir, videos, settings, output_path):
    """Whether every clip's features are in feat_dir already, made with these settings: a re-run then has nothing
    to do, and builds no CNN (seconds of Keras start-up) to learn its feature dimension."""
    manifest = read_feature_manifest(feat_dir)
    return (manifest is not None and all(output_path(path).exists() for path in videos)
            and not manifest_differences(manifest, settings.manifest(manifest.get("feature_dim"))))


def make_folder(path):
    """mkdir -p, a failure (e.g. a file of that name) as a DataError naming the path."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"{path}: cannot create the feature folder ({error.strerror})") from None


def save_atomic(path, array):
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)


class DecodingFailed(DataError):
    """An unexpected error in the decoding thread (not a bad clip): it ends the run with one line naming the clip."""


def decoded_clips(video_paths, settings, skip=lambda path: False):
    """Yield (path, read_clip's images | VideoError | None if skipped) decoded in a background thread, so decoding
    (and optical flow) overlaps the CNN. Any other error in the thread is raised here as DecodingFailed rather than
    leaving the loop waiting."""

    def decode_all():
        for path in video_paths:
            try:
                yield path, None if skip(path) else read_clip(path, settings)
            except VideoError as error:
                yield path, error
            except Exception as error:
                raise DecodingFailed(f"{path}: decoding failed unexpectedly ({type(error).__name__}: {error})") \
                    from error

    return prefetched(decode_all(), depth=8)


def extract(video_paths, settings, run_cnn, batch_size, on_clip, skip=lambda path: False, desc="extracting"):
    """Run every clip through the CNN, calling on_clip(path, features) as each one completes.

    Frames from consecutive clips fill fixed-size CNN batches across clip boundaries, so the CNN neither waits
    for one clip's decoding nor runs half-empty batches. Returns (done, skipped, failures{name: why}, frames/s).
    """
    done, skipped, failures, frame_total, started = 0, 0, {}, 0, time.perf_counter()
    waiting = []  # uint8 frames not yet through the CNN
    outputs = []  # features of frames through the CNN whose clip is not complete
    clips = []  # clips whose features are not all out yet, in order
    frames = settings.frames

    def run_batches(final=False):
        nonlocal done, frame_total
        while waiting and (final or sum(len(w) for w in waiting) >= batch_size):
            pending = np.concatenate(waiting)
            waiting[:] = [pending[batch_size:]] if len(pending) > batch_size else []
            outputs.append(run_cnn(pending[:batch_size]))
        while clips and sum(len(o) for o in outputs) >= frames:
            features = np.concatenate(outputs)
            outputs[:] = [features[frames:]] if len(features) > frames else []
            on_clip(clips.pop(0), features[:frames].astype(settings.dtype))
            done += 1
            frame_total += frames

    # cleared when done or failed, so stderr keeps only the error lines; the caller prints a summary
    with tqdm(total=len(video_paths), desc=desc, unit="clip", leave=False) as progress:
        try:
            for path, clip in decoded_clips(video_paths, settings, skip):
                if clip is None:
                    skipped += 1
                elif isinstance(clip, VideoError):
                    failures[path.name] = str(clip)
                    tqdm.write(f"error: {clip}", file=sys.stderr)
                else:
                    waiting.append(clip)
                    clips.append(path)
                    run_batches()
                progress.update(1)
                progress.set_postfix(frames_per_s=f"{frame_total / (time.perf_counter() - started):.1f}")
        except DecodingFailed:  # the clips decoded before the failure are still extracted and kept
            run_batches(final=True)
            raise
        run_batches(final=True)
    return done, skipped, failures, frame_total / max(time.perf_counter() - started, 1e-9)


def settings_from_args(args, parser):
    if args.encoder:
        if args.cnn or args.image_size:
            parser.error("--cnn and --image-size are not for --encoder (its preset gives its image size)")
        return encoder_settings(args.encoder, args.weights, args.layer, args.compute_dtype, frames=args.frames,
                                dtype=args.dtype, stream=args.stream)
    if args.compute_dtype != "float32":
        parser.error("--compute-dtype is for --encoder")
    args.cnn = args.cnn or "vgg16"
    _, _, default_layer, native_size = CNNS[args.cnn]
    layer = args.layer or default_layer
    if layer == default_layer:
        pool, grids, image_size = None, None, native_size
    elif args.cnn in ("vgg16", "vgg19"):
        try:
            grids = tuple(int(g) for g in args.grids.split(","))
        except ValueError:
            parser.error(f"--grids must be comma-separated whole numbers, not {args.grids!r}")
        if min(grids) <= 0:
            parser.error("--grids must be positive")
        pool, image_size = args.pool, args.image_size or native_size
    else:
        parser.error(f"--layer is for vgg16/vgg19; {args.cnn} gives its {default_layer} output")
    weights = args.weights or "imagenet"
    if weights not in ("imagenet", "none"):
        if not Path(weights).is_file():
            parser.error(f"--weights {weights}: no such weights file")
        weights = str(Path(weights).resolve())
    return FeatureSettings(cnn=args.cnn, layer=layer, image_size=image_size, pool=pool, grids=grids, weights=weights,
                           seed=args.seed if weights == "none" else None,
                           random_weights="numpy" if weights == "none" else None, frames=args.frames, dtype=args.dtype,
                           stream=args.stream)


def encoder_settings(name, weights=None, layer=None, compute_dtype="float32", **fields):
    """FeatureSettings of --encoder NAME (fields: frames, dtype, stream): its weights resolved and hashed, its
    preprocessing from its preset. DataError, one line, for a layer it does not have or weights not found."""
    outputs = encoders.ENCODERS[name].outputs
    layer = layer or outputs[0]
    if layer not in outputs:
        raise DataError(f"--layer of --encoder {name}: {' or '.join(outputs)}, not {layer}")
    weights = encoders.resolve_weights(name, weights)
    preprocessing = encoders.preprocessing(name, weights)
    return FeatureSettings(cnn=None, layer=layer, image_size=preprocessing["center_crop"], weights=weights,
                           encoder=name, weights_sha256=encoders.weights_sha256(weights), preprocessing=preprocessing,
                           compute_dtype=None if compute_dtype == "float32" else compute_dtype, **fields)


def parse_shard(text):
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must look like i/n, e.g. 0/4, not {text!r}") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"needs 0 <= i < n, not {text!r}")
    return index, count


@command
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("video_dir")
    parser.add_argument("feat_dir")
    parser.add_argument("--ids", help="extract only the clips listed in this file, one name per line")
    parser.add_argument("--frames", type=positive_int, default=80, help="frames sampled uniformly per clip")
    parser.add_argument("--cnn", choices=sorted(CNNS), help="a keras.applications CNN (default vgg16)")
    parser.add_argument("--encoder", choices=sorted(encoders.ENCODERS), help="an encoder instead of the CNN")
    parser.add_argument("--weights", help="--cnn: imagenet (default), none (seeded random) or a weights file; "
                        "--encoder: its keras-hub preset folder, or mobilenet_v2's .pth (default: the installed one)")
    parser.add_argument("--layer", help="VGG layer (default fc2) e.g. block3_pool; other CNNs use their avg pool; "
                        "dinov2 encoders: cls (default) or cls+patch_mean")
    parser.add_argument("--image-size", type=positive_int, help="input size for VGG conv layers")
    parser.add_argument("--pool", choices=("avg", "max", "avg+max"), default="avg",
                        help="pooling of a VGG conv layer's map (avg+max: both, concatenated)")
    parser.add_argument("--grids", default="2", help="comma-separated pyramid grids for VGG conv layers, e.g. 1,2")
    parser.add_argument("--stream", choices=STREAMS, default="rgb",
                        help="rgb: the CNN sees the sampled frames; flow: images of the optical flow from each to the "
                             "next decoded frame")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="the stored features'")
    parser.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="--encoder: the dtype it computes in")
    parser.add_argument("--shard", type=parse_shard, default=(0, 1), help="i/n: this run's part of the clips")
    parser.add_argument("--seed", type=int, default=0, help="with --weights none: the random weights' seed")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    settings = settings_from_args(args, parser)
    feat_dir = Path(args.feat_dir)
    output_path = lambda path: feat_dir / f"{path.name}.npy"
    failed_path = feat_dir / ("failed.txt" if args.shard == (0, 1) else f"failed.{args.shard[0]}of{args.shard[1]}.txt")
    with warnings_as_lines():
        videos = list_videos(args.video_dir, args.ids, args.shard)
    make_folder(feat_dir)
    if extracted_before(feat_dir, videos, settings, output_path):
        done, skipped, failures, fps = 0, len(videos), {}, None
    else:
        run_cnn, feature_dim = build_extractor(settings)
        check_manifest(feat_dir, settings.manifest(feature_dim))
        done, skipped, failures, fps = extract(videos, settings, run_cnn, args.batch_size,
                                               on_clip=lambda path, features: save_atomic(output_path(path), features),
                                               skip=lambda path: output_path(path).exists())
    if failures:
        write_text_atomic(failed_path, "".join(f"{name}\t{why}\n" for name, why in failures.items()))
    print(f"extracted {done}, skipped {skipped} (already there), failed {len(failures)}"
          + (f" (see {failed_path})" if failures else "") + (f"; {fps:.1f} frames/s" if fps is not None else "")
          + f"; features in {feat_dir}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
