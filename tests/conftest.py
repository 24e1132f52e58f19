import fcntl
import functools
import gc
import json
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# A test process holds about a million objects (TensorFlow, JAX, Keras and the graphs traced so far), which every full
# garbage collection walks: at Python's default thresholds the collections took 4% of the CPU time of four test files
# run in one process, at these 1%
gc.set_threshold(50_000, 20, 100)
# The tests' programs are tiny and most run once: compiling them (JAX's eager scans and loops) costs more than running
# them, and XLA's LLVM optimisations and its CPU fusion emitters (MLIR) are most of that compile time (without the
# emitters, a quarter less CPU time for the JAX runs of the neutral tests); the processes the tests start inherit this
QUICK_COMPILES = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                  "--xla_cpu_use_fusion_emitters=false")
if QUICK_COMPILES not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{QUICK_COMPILES} {os.environ.get('XLA_FLAGS', '')}".strip()
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data" / "mlds_hw2_1"


@pytest.fixture(scope="session", autouse=True)
def backend_settings(request, tmp_path_factory):
    """Made in the processes that run tests, not in pytest -n's controller (which so never imports Keras and
    TensorFlow). GPUs run float32 matmuls in TF32 (TensorFlow's default on Ampere and newer) or lower (JAX's
    default precision): the tests compare in full float32 there too. Eager JAX recompiles each scan at every call:
    reuse the programs compiled before, kept in pytest's cache folder (.pytest_cache; pytest --cache-clear empties
    it) from one session to the next. The JAX child processes of the tests (pytest included) inherit the folder
    through JAX's environment variables and share it."""
    folder = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if not folder:
        cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
        folder = cache.mkdir("xla_cache") if cache else tmp_path_factory.mktemp("xla_cache")
        os.environ.update(JAX_COMPILATION_CACHE_DIR=str(folder), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    from util import backend

    backend.full_float32_matmuls()
    backend.cache_compilations(folder)


FEATURE_DIM = 64


@functools.cache
def video_settings():
    """What extract_features.py does with --weights none --layer block1_pool --image-size 32 --pool max --grids 1."""
    import extract_features

    return extract_features.FeatureSettings(layer="block1_pool", image_size=32, pool="max", grids=(1,),
                                            weights="none", seed=0, random_weights="numpy", frames=6)


def __getattr__(name):
    """VIDEO_SETTINGS (`from conftest import VIDEO_SETTINGS`), made at first use: extract_features imports Keras."""
    if name == "VIDEO_SETTINGS":
        return video_settings()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@pytest.fixture
def mlds():
    """The real MLDS HW2-1 files in ../shared; the test is skipped only when that folder is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"real MLDS data not found at {SHARED} (../shared beside the checkout)")
    return SHARED


TINY_CAPTIONS = {0: ["a cat is running", "the cat runs fast", "a cat runs"],
                 1: ["a dog is jumping", "the dog jumps high", "a dog jumps"]}


def write_tiny_mlds(root, videos=(24, 8), frames=6, dim=12, seed=0):
    """A small MLDS-layout data set whose captions follow its features: class 1 clips have a bright feature 0."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for split, count in zip(("training", "testing"), videos):
        feat_dir = root / f"{split}_data" / "feat"
        feat_dir.mkdir(parents=True, exist_ok=True)
        labels = []
        for i in range(count):
            label = i % 2
            features = rng.uniform(0, 1, (frames, dim))
            features[:, 0] += 3.0 * label
            video_id = f"{split}_{i:03d}.avi"
            np.save(feat_dir / f"{video_id}.npy", features)  # float64, as the real MLDS files
            labels.append({"caption": TINY_CAPTIONS[label], "id": video_id})
        (root / f"{split}_label.json").write_text(json.dumps(labels))
        ids = "".join(e["id"] + "\n" for e in labels)
        (root / f"{split}_id.txt").write_text(ids)
        (root / f"{split}_data" / "id.txt").write_text(ids)
    return root


@pytest.fixture
def tiny_data(tmp_path):
    return write_tiny_mlds(tmp_path / "data")


# train.py flags of the tiny runs trained on write_tiny_mlds features
TINY_RUN_FLAGS = ["--hidden", "16", "--frames", "6", "--batch-size", "8", "--learning-rate", "0.01",
                  "--min-word-count", "1", "--epochs", "6"]


def train_video_run(root, settings=None, seed=0):
    """A tiny run trained on write_tiny_mlds features (drawn from seed) in root/data whose manifest claims
    `settings` (VIDEO_SETTINGS when None), so that it captions raw clips: root/run."""
    import train

    data = write_tiny_mlds(Path(root) / "data", dim=FEATURE_DIM, seed=seed)
    manifest = json.dumps((settings or video_settings()).manifest(FEATURE_DIM))
    for split in ("training", "testing"):
        (data / f"{split}_data" / "feat" / "manifest.json").write_text(manifest)
    run_dir = data.parent / "run"
    assert train.main(["--data-dir", str(data), "--ckpt-dir", str(run_dir), *TINY_RUN_FLAGS]) == 0
    return run_dir


def under_xdist(config):
    """Whether this process is a pytest -n worker (pytest-xdist gives those their worker input)."""
    return hasattr(config, "workerinput")


def made_once(request, tmp_path_factory, name, make):
    """make(folder) for the whole test run: under pytest -n, the first worker to ask makes it while the others wait
    for it (a lock file in the workers' common temporary folder), and all use that one folder."""
    root = tmp_path_factory.getbasetemp()
    if under_xdist(request.config):
        root = root.parent  # <basetemp>/popen-gw<n>: the folder above is the run's
    folder, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # let go when the file closes
        if not done.exists():
            folder.mkdir()
            made = make(folder)
            done.write_text(str(made))
    return Path(done.read_text())


@pytest.fixture(scope="session")
def video_run(request, tmp_path_factory):
    """A tiny trained run whose features claim to come from VIDEO_SETTINGS, so it captions raw clips."""
    return made_once(request, tmp_path_factory, "video_run", train_video_run)


def load_runs_once(monkeypatch, loaded, only=None):
    """From now on in this test, Captioner.load (infer.main's too) loads a run once per arguments (the run, its
    matmul dtype and batch size, the fused runs and their weights) and hands that Captioner to every later call
    asking the same: loading a run and compiling its decoder costs about a second a call. loaded: the store
    {arguments: Captioner}, which a module fixture may keep from test to test; only: the one run folder shared
    (other runs load anew)."""
    from captioner import Captioner

    load = Captioner.load

    def load_once(checkpoint=None, matmul_dtype=None, batch_size=100, fuse=()):
        if only is not None and (checkpoint is None or Path(checkpoint) != Path(only)):
            return load(checkpoint, matmul_dtype, batch_size, fuse)
        key = (checkpoint and Path(checkpoint), matmul_dtype, batch_size, tuple((Path(run), w) for run, w in fuse))
        if key not in loaded:
            loaded[key] = load(checkpoint, matmul_dtype, batch_size, fuse)
        return loaded[key]

    monkeypatch.setattr(Captioner, "load", staticmethod(load_once))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under pytest -n (--dist loadgroup), each test file runs on one worker, so its module fixtures are made once;
    test_backends.py's tests, child processes each, are shared out one by one. The files and tests holding a test
    marked slow go first (pyproject.toml keeps pytest-xdist from sorting the groups by size), so that no long test
    starts last while the other workers have nothing left; then the other files, larger first, so that the last
    file a worker takes (one ahead of need) is a small one."""
    if not under_xdist(config):
        return
    for item in items:
        if item.path.name != "test_backends.py":
            item.add_marker(pytest.mark.xdist_group(item.path.stem))
    items.sort(key=lambda item: (item.get_closest_marker("slow") is None, -item.path.stat().st_size))


def checkpoint_weights(checkpoint):
    """{path in the file: array} of every weight in a checkpoint folder's model.weights.h5, read with h5py."""
    import h5py

    arrays = {}

    def keep(name, item):
        if isinstance(item, h5py.Dataset):
            arrays[name] = item[()]

    with h5py.File(Path(checkpoint) / "model.weights.h5", "r") as file:
        file.visititems(keep)
    return arrays


def optimizer_iterations(checkpoint):
    """The optimizer's step count saved in a checkpoint folder's optimizer.h5 (Keras's first optimizer variable)."""
    import h5py

    with h5py.File(Path(checkpoint) / "optimizer.h5", "r") as file:
        return int(file["0"][()])


def decode_rgb(path, limit=None):
    """Every frame of a clip (or its first `limit`), full size, RGB."""
    capture = cv2.VideoCapture(str(path))
    frames = []
    while len(frames) != limit and (frame := capture.read())[0]:
        frames.append(frame[1][..., ::-1])
    capture.release()
    return np.stack(frames)


def hide_larger_frames(path, side=6000, frames=16):
    """Write an MJPEG AVI whose header says 64x64 (the size of its first frame, which FFmpeg probes) while every later
    frame is side x side: a progressive 4:4:4 JPEG of black, 400 kB at 6000 px, that FFmpeg decodes at full size
    (about 0.3 s a frame on one core) and OpenCV scales back to 64x64. The AVI's frame chunks and index are rewritten
    around the new frames."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 64))
    for _ in range(frames):
        writer.write(np.zeros((64, 64, 3), np.uint8))
    writer.release()
    large = cv2.imencode(".jpg", np.zeros((side, side, 3), np.uint8),
                         [cv2.IMWRITE_JPEG_PROGRESSIVE, 1, cv2.IMWRITE_JPEG_QUALITY, 10,
                          cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444])[1].tobytes()
    data = path.read_bytes()
    number = lambda at: int.from_bytes(data[at:at + 4], "little")
    movi = data.index(b"movi") - 8  # LIST size "movi" chunks..., then idx1 size entries (offsets from "movi")
    index = movi + 8 + number(movi + 4)
    chunks, entries = b"movi", b""
    for entry in range(index + 8, index + 8 + number(index + 4), 16):
        offset, size = number(entry + 8), number(entry + 12)
        payload = data[movi + 16 + offset:movi + 16 + offset + size] if entry == index + 8 else large
        entries += data[entry:entry + 8] + len(chunks).to_bytes(4, "little") + len(payload).to_bytes(4, "little")
        chunks += data[entry:entry + 4] + len(payload).to_bytes(4, "little") + payload + b"\0" * (len(payload) % 2)
    riff = data[:movi] + b"LIST" + len(chunks).to_bytes(4, "little") + chunks + b"idx1" + \
        len(entries).to_bytes(4, "little") + entries
    path.write_bytes(riff[:4] + (len(riff) - 8).to_bytes(4, "little") + riff[8:])
    return path


@pytest.fixture(scope="session")
def hidden_large_frames(tmp_path_factory):
    """hide_larger_frames's AVI, made once."""
    return hide_larger_frames(tmp_path_factory.mktemp("liar") / "liar.avi")


@pytest.fixture
def undecodable_frames(monkeypatch):
    """From now on in this test, every video opened finds its frames (grab) but cannot decode them (retrieve), as
    a broken file may."""
    opened = cv2.VideoCapture

    class FoundButUndecodable:
        def __init__(self, *arguments):
            self.capture = opened(*arguments)

        def __getattr__(self, name):
            return getattr(self.capture, name)

        def retrieve(self):
            return False, None

    monkeypatch.setattr(cv2, "VideoCapture", FoundButUndecodable)


def pytest_unconfigure(config):
    """pytest ends a session with five full garbage collections, each walking the million objects a test process
    holds, to report objects whose deletion raised: collect once here (its errors are reported the same way), then
    freeze what is left, so that pytest's collections walk only what finalizers make after that."""
    gc.collect()
    gc.freeze()
