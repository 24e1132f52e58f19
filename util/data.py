"""MLDS HW2-1 layout: labels JSON, id lists, per-video feature files, the training and validation splits, and the
training batches.

    DATA_DIR/training_label.json   [{"caption": [...], "id": "xxx.avi"}, ...]   (validation_, testing_label.json alike)
    DATA_DIR/training_data/feat/<id>.npy   (frames, dim), float64 or float32   (validation_data, testing_data alike)
    DATA_DIR/testing_id.txt, DATA_DIR/testing_data/id.txt   one id per line
"""
import hashlib
import json
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from util.errors import DataError
from util.vocab import PAD

NPY_MAGIC = b"\x93NUMPY"
DEFAULT_VAL_FRACTION = 0.05  # of the training videos, held out for validation


def read_json(path, missing="file not found"):
    """Parse a JSON file; a missing or unparsable file is a DataError naming it (`missing` says what was sought)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {missing}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not valid JSON ({error})") from None


def sha256_of(path):
    """A file's sha256, as hex."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def load_labels(path):
    """[(video_id, [caption, ...]), ...] from an MLDS labels JSON, checked entry by entry."""
    path = Path(path)
    entries = read_json(path, "labels file not found")
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{path}: expected a non-empty JSON list of {{\"caption\": [...], \"id\": ...}}")
    labels = []
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or "caption" not in entry:
            raise DataError(f"{path}: entry {n} is not an object with a string \"id\" and a \"caption\" list")
        captions = entry["caption"]
        if not isinstance(captions, list) or not captions:
            raise DataError(f"{path}: entry {n} ({entry['id']}) has an empty or non-list caption field")
        if not all(isinstance(c, str) for c in captions):
            raise DataError(f"{path}: entry {n} ({entry['id']}) has a caption that is not a string")
        labels.append((entry["id"], captions))
    return labels


@contextmanager
def warnings_as_lines():
    """Print each warning raised inside as one `warning: message` line on stderr, as the command lines do."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)


def read_ids(path):
    """Video ids, one per line; blank lines, trailing white space and Windows line ends tolerated,
    duplicates dropped with a warning."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: ids file not found")
    try:
        ids = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    if not ids:
        raise DataError(f"{path}: no ids in the file")
    unique = list(dict.fromkeys(ids))
    if len(unique) < len(ids):
        warnings.warn(f"{path}: {len(ids) - len(unique)} duplicate ids, each captioned once", stacklevel=2)
    return unique


def find_feat_dir(ids_file):
    """The MLDS feature folder for an ids file: <dir>/feat, <dir>/testing_data/feat or <dir>/training_data/feat."""
    base = Path(ids_file).resolve().parent
    stem = Path(ids_file).name.split("_")[0]
    candidates = [base / "feat", base / f"{stem}_data" / "feat", base / "testing_data" / "feat"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise DataError(f"{ids_file}: no feature folder found beside it (looked in "
                    f"{', '.join(str(c) for c in candidates)}); give --feat-dir")


# Feature manifest fields added after manifests were first written, and what a manifest without one means
MANIFEST_DEFAULTS = {"stream": "rgb"}


def read_feature_manifest(feat_dir):
    """FEAT_DIR/manifest.json as extract_features.py wrote it (its settings and dimension), or None if absent."""
    path = Path(feat_dir) / "manifest.json"
    if not path.is_file():
        return None
    manifest = read_json(path)
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: expected a JSON object of feature settings")
    return manifest


def manifest_differences(recorded, wanted):
    """{field: (recorded value, wanted value)} for the fields of `wanted` (and MANIFEST_DEFAULTS) on which two
    feature manifests disagree, a field a manifest lacks counting as its default."""
    recorded, wanted = {**MANIFEST_DEFAULTS, **recorded}, {**MANIFEST_DEFAULTS, **wanted}
    return {k: (recorded.get(k), v) for k, v in wanted.items() if recorded.get(k) != v}


def check_same_extraction(feat_dir, other_dir):
    """Refuse features in other_dir made with other extraction settings (another CNN or encoder, other weights) than
    feat_dir's, when both folders have a manifest."""
    first, other = read_feature_manifest(feat_dir), read_feature_manifest(other_dir)
    differing = manifest_differences(first, other) if first is not None and other is not None else {}
    if differing:
        detail = "; ".join(f"{k}: {here!r} here, {there!r} in {feat_dir}" for k, (there, here) in differing.items())
        raise DataError(f"{Path(other_dir) / 'manifest.json'}: features made otherwise than the training ones "
                        f"({detail})")


def open_feature_file(path, frames=None, feature_dim=None, mmap=False):
    """One (frames, dim) float feature array, never unpickling, its shape checked; with mmap, memory-mapped: its
    header and size are checked and no data is read."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: feature file not found")
    with open(path, "rb") as file:
        if file.read(len(NPY_MAGIC)) != NPY_MAGIC:  # else np.load reports a text file as pickled data
            raise DataError(f"{path}: not a .npy file (no NUMPY header)")
    try:
        array = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except ValueError as error:
        raise DataError(f"{path}: not a plain, complete .npy array ({error})") from None
    except (OSError, EOFError) as error:
        raise DataError(f"{path}: unreadable or truncated .npy file ({error})") from None
    if not isinstance(array, np.ndarray) or array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        raise DataError(f"{path}: expected a 2-d float array (frames, dim), got {getattr(array, 'shape', '?')} "
                        f"{getattr(array, 'dtype', '')}")
    if frames is not None and array.shape[0] != frames:
        raise DataError(f"{path}: has {array.shape[0]} frames, expected {frames}")
    if feature_dim is not None and array.shape[1] != feature_dim:
        raise DataError(f"{path}: features are {array.shape[1]}-d, expected {feature_dim}-d")
    return array


def load_feature_file(path, frames=None, feature_dim=None):
    """One (frames, dim) feature array as float32, never unpickling; shape and values checked."""
    array = open_feature_file(path, frames, feature_dim)
    if not np.isfinite(array).all():
        raise DataError(f"{path}: holds NaN or infinite values")
    return array.astype(np.float32, copy=False)


def _feature_paths(feat_dir, video_ids):
    feat_dir = Path(feat_dir)
    if not feat_dir.is_dir():
        raise DataError(f"{feat_dir}: feature folder not found")
    return [feat_dir / f"{video_id}.npy" for video_id in video_ids]


def _check_same_shape(path, shape, first_path, first_shape):
    if shape != first_shape:
        raise DataError(f"{path}: shape {shape} differs from {first_path.name}'s {first_shape}; "
                        "the folder mixes features of different kinds")


def load_features(feat_dir, video_ids, frames=None, feature_dim=None, dtype=np.float16):
    """Stack every video's features: (videos, frames, dim), float16 by default to halve memory."""
    paths = _feature_paths(feat_dir, video_ids)
    first = load_feature_file(paths[0], frames, feature_dim)
    stacked = np.empty((len(paths),) + first.shape, dtype)
    for i, path in enumerate(paths):
        array = first if i == 0 else load_feature_file(path, frames, feature_dim)
        _check_same_shape(path, array.shape, paths[0], first.shape)
        stacked[i] = array
    return stacked


class FeatureFiles:
    """Videos' features left in their .npy files and read when indexed: indexing it like the (videos, frames, dim)
    array of load_features (an int, a slice, an int array) reads those videos' files, as float32 holding float16
    values. Every file's header and size are checked up front, its values when read. Memory does not grow with the
    number of videos."""

    def __init__(self, feat_dir, video_ids, frames=None, feature_dim=None):
        self.paths = _feature_paths(feat_dir, video_ids)
        shapes = (open_feature_file(path, frames, feature_dim, mmap=True).shape for path in self.paths)
        first = next(shapes)
        for path, shape in zip(self.paths[1:], shapes):
            _check_same_shape(path, shape, self.paths[0], first)
        self.shape, self.dtype = (len(self.paths),) + first, np.dtype(np.float32)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        picked = np.arange(len(self.paths))[index]
        if np.ndim(picked) == 0:
            return self._read(picked)
        return np.stack([self._read(i) for i in picked]) if len(picked) else np.zeros((0,) + self.shape[1:], np.float32)

    def _read(self, i):
        """Rounded through float16 as load_features stores them: in memory or from files, the same batches."""
        return load_feature_file(self.paths[i]).astype(np.float16).astype(np.float32)  # via float32, as stored


class Split:
    """Videos: their ids, features (videos, frames, dim) and reference captions. The features are in memory as
    float16 (load_features) or, with in_memory=False, read from their files a batch at a time (FeatureFiles)."""

    def __init__(self, labels, feat_dir, frames=None, feature_dim=None, in_memory=True):
        self.labels = labels
        self.video_ids = [video_id for video_id, _ in labels]
        self.references = dict(labels)
        self.features = (load_features if in_memory else FeatureFiles)(feat_dir, self.video_ids, frames, feature_dim)


def hold_out_videos(labels, fraction, seed):
    """Split labels into (training, validation) by whole videos: round(fraction * videos) of them, at least one
    when fraction > 0, drawn with the seed; both keep the labels' order."""
    count = int(round(fraction * len(labels))) or (1 if fraction > 0 else 0)
    held = set(np.random.default_rng([seed, 1]).choice(len(labels), count, replace=False).tolist())
    return ([entry for i, entry in enumerate(labels) if i not in held],
            [entry for i, entry in enumerate(labels) if i in held])


def split_off_ids(labels, video_ids, source):
    """Split labels into (the rest, the videos named in video_ids, in the labels' order); every id must be there."""
    wanted = set(video_ids)
    unknown = wanted - {video_id for video_id, _ in labels}
    if unknown:
        raise DataError(f"{source}: {len(unknown)} ids are not in the training labels, e.g. {sorted(unknown)[0]}")
    return ([e for e in labels if e[0] not in wanted], [e for e in labels if e[0] in wanted])


def load_splits(data_dir, val_ids=None, val_fraction=None, seed=0, frames=None, features=None):
    """A data folder's training and validation videos, as train.py's flags choose the validation split: the
    training videos val_ids (a file of ids) names, else DATA_DIR/validation_label.json with validation_data/feat
    when the folder has one and no val_fraction is given, else val_fraction (default DEFAULT_VAL_FRACTION) of the
    training videos drawn with seed. features: "memory", "files" or None (memory when they fit, see
    features_fit_in_memory). Returns (training, validation or None, description of the validation split, the labels
    files read), the splits as Split objects."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data folder not found")
    labels_files = [data_dir / "training_label.json"]
    labels = load_labels(labels_files[0])
    feat_dir = data_dir / "training_data" / "feat"
    own_split = data_dir / "validation_label.json"
    if val_ids:
        with warnings_as_lines():
            training, validation = split_off_ids(labels, read_ids(val_ids), val_ids)
        val_feat_dir, source = feat_dir, f"the training videos listed in {val_ids}"
    elif own_split.is_file() and val_fraction is None:
        training, validation = labels, load_labels(own_split)
        overlap = {video_id for video_id, _ in validation} & {video_id for video_id, _ in training}
        if overlap:
            raise DataError(f"{own_split}: {len(overlap)} videos are in the training labels too, e.g. "
                            f"{sorted(overlap)[0]}; a video is never in both splits")
        val_feat_dir, source = data_dir / "validation_data" / "feat", str(own_split)
        labels_files.append(own_split)
    else:
        fraction = DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
        training, validation = hold_out_videos(labels, fraction, seed)
        val_feat_dir, source = feat_dir, f"{fraction:g} of the training videos, drawn with seed {seed}"
    if not training:
        raise DataError(f"{labels_files[0]}: no training videos left after holding out {len(validation)} for "
                        f"validation")
    if val_feat_dir != feat_dir:
        check_same_extraction(feat_dir, val_feat_dir)
    in_memory = features_fit_in_memory(feat_dir, training, frames) if features is None else features == "memory"
    train_split = Split(training, feat_dir, frames=frames, in_memory=in_memory)
    val_split = (Split(validation, val_feat_dir, frames=frames, feature_dim=train_split.features.shape[2],
                       in_memory=in_memory) if validation else None)
    return train_split, val_split, source, labels_files


def features_fit_in_memory(feat_dir, labels, frames, share=0.25):
    """Whether the videos' features, as float16, take at most `share` of this machine's memory (judged from the
    first video's file)."""
    first = open_feature_file(Path(feat_dir) / f"{labels[0][0]}.npy", frames, mmap=True)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return len(labels) * first.size * 2 <= share * total


def feature_moments(features, chunk_videos=16):
    """Per-dimension mean and variance of (videos, frames, dim) features over all videos and frames, in one pass
    over chunks of videos: float64 accumulators and one float64 chunk at a time, never a copy of all features."""
    dim = features.shape[-1]
    count, mean, sum_squares = 0, np.zeros(dim), np.zeros(dim)  # sum_squares: of deviations from the mean
    for start in range(0, len(features), chunk_videos):
        chunk = features[start:start + chunk_videos].reshape(-1, dim)  # (chunk videos * frames, dim)
        chunk_mean = chunk.mean(0, dtype=np.float64)
        chunk_squares = np.square(chunk - chunk_mean).sum(0)
        delta, total = chunk_mean - mean, count + len(chunk)
        # Chan et al.'s pairwise update: exact, and stable where sum(x^2) - n*mean^2 is not
        mean += delta * len(chunk) / total
        sum_squares += chunk_squares + delta * delta * count * len(chunk) / total
        count = total
    return mean, sum_squares / max(count, 1)


def encode_captions(labels, vocab, max_len):
    """Every (video index, caption ids) pair: video_index (pairs,), caption_ids (pairs, max_len) <PAD>-padded."""
    video_index, rows = [], []
    for i, (_, captions) in enumerate(labels):
        for caption in captions:
            ids = vocab.encode(caption, max_len)
            video_index.append(i)
            rows.append(ids + [PAD] * (max_len - len(ids)))
    return np.array(video_index, np.int32), np.array(rows, np.int32)


def epoch_pairs(video_index, caption_ids, mode, seed, epoch):
    """The (video, caption) pairs of one epoch in a fixed order for (seed, epoch).

    mode "all": every pair, as the reference did (~24k on MSVD). mode "sample": one random caption per video.
    """
    rng = np.random.default_rng([seed, epoch])
    if mode == "sample":
        videos = np.unique(video_index)
        starts = np.searchsorted(video_index, videos)
        counts = np.diff(np.append(starts, len(video_index)))
        chosen = starts + (rng.random(len(videos)) * counts).astype(int)
    elif mode == "all":
        chosen = np.arange(len(video_index))
    else:
        raise ValueError(f"pairs mode must be 'all' or 'sample', not {mode!r}")
    chosen = chosen[rng.permutation(len(chosen))]
    return video_index[chosen], caption_ids[chosen]


def replica_slices(pairs, batch_size, replicas, skip_batches=0):
    """(starts, stops), each (batches, replicas): global batch k is pairs [k*batch_size, k*batch_size + size),
    cut into `replicas` consecutive slices whose sizes differ by at most one (a short last batch may leave a
    replica an empty slice)."""
    starts = np.arange(skip_batches * batch_size, pairs, batch_size)
    sizes = np.minimum(batch_size, pairs - starts)
    bounds = starts[:, None] + np.arange(replicas + 1) * sizes[:, None] // replicas
    return bounds[:, :-1], bounds[:, 1:]


def batch_arrays(features, video_index, caption_ids, rows=None, width_multiple=1):
    """One batch: frame_features (batch, frames, dim) float32 gathered from the in-memory features, and
    caption_ids cut to the batch's longest caption (one step for an empty batch), that width rounded up to a
    multiple of width_multiple and, with rows, padded with empty (all-<PAD>) rows to that many: fixed shapes
    spare a compiler (XLA) one compilation per shape, and a <PAD> row counts for nothing in the loss."""
    length = max(1, int(np.max(np.sum(caption_ids != PAD, axis=1), initial=0)))
    length = -(-length // width_multiple) * width_multiple
    frame_features = np.asarray(features[video_index], np.float32)  # float16 in memory, float32 from files
    captions = np.full((len(caption_ids), length), PAD, np.int32)
    captions[:, :min(length, caption_ids.shape[1])] = caption_ids[:, :length]
    if rows is not None and rows > len(captions):
        frame_features = np.concatenate([frame_features, np.zeros((rows - len(captions),) + frame_features.shape[1:],
                                                                  np.float32)])
        captions = np.concatenate([captions, np.full((rows - len(captions), length), PAD, np.int32)])
    return frame_features, captions


def batches(features, video_index, caption_ids, batch_size, skip_batches=0, slices=(1, 0, 1), rows=None,
            width_multiple=1, prepare=lambda slices: slices):
    """The global batches of already-ordered pairs, from batch skip_batches on, gathered one ahead in a background
    thread. Each is a list of this process's slices [(frame_features, caption_ids), ...]: slices = (count, first,
    local) cuts every global batch into `count` parts (util.data.replica_slices) of which this process gathers
    `local` from `first` on; rows and width_multiple pad each part (batch_arrays); prepare(slices), in the thread
    too, may put them on the devices."""
    count, first, local = slices
    starts, stops = replica_slices(len(video_index), batch_size, count, skip_batches)

    def produce():
        for batch_starts, batch_stops in zip(starts[:, first:first + local], stops[:, first:first + local]):
            yield prepare([batch_arrays(features, video_index[a:b], caption_ids[a:b], rows, width_multiple)
                           for a, b in zip(batch_starts, batch_stops)])

    return prefetched(produce())


def prefetched(iterable, depth=2):
    """Iterate in a background thread, up to `depth` items ahead (numpy's gathers and casts run without the GIL).
    An error in the thread is raised here."""
    import queue
    import threading

    items, done = queue.Queue(maxsize=depth), object()

    def fill():
        try:
            for item in iterable:
                items.put(item)
        except BaseException as error:  # handed over and raised by the consumer
            items.put(error)
        items.put(done)

    threading.Thread(target=fill, daemon=True).start()
    while (item := items.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item
