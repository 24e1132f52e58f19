"""extract_features.py on real H.264 clips, lying headers, short clips, shards, kills, broken files; infer --video."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

import extract_features
import infer
from conftest import ROOT
from tools.demo_data import make_corpus
from util import backend, video
from util.checkpoints import latest_checkpoint
from util.errors import DataError

# Small, fast settings for tests: seeded random VGG16 up to block1_pool at 32 px, globally pooled (64-d).
FAST = ["--weights", "none", "--layer", "block1_pool", "--image-size", "32", "--pool", "max", "--grids", "1",
        "--batch-size", "16"]


def write_clip(path, values, size=(48, 40), fourcc="MJPG"):
    """A clip whose frame i is a flat grey of values[i], so a sampled frame tells which one it was."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 10, size)
    for value in values:
        writer.write(np.full((size[1], size[0], 3), value, np.uint8))
    writer.release()


def test_real_clips_give_80_by_4096_features(mlds, tmp_path, monkeypatch):
    """The defaults sample 80 frames a clip through VGG16 up to fc2 (4096-d): a real clip goes through the whole
    network at full size with --frames 2, and the defaults' run, the CNN stubbed, gives 80 rows and the same
    manifest but for its frame count (80 frames of VGG16 at 224 px take half a minute of CPU)."""
    video_dir = mlds / "testing_data" / "video"
    ids = tmp_path / "ids.txt"
    ids.write_text(sorted(os.listdir(video_dir))[0] + "\n")
    out = tmp_path / "feat"
    assert extract_features.main([str(video_dir), str(out), "--weights", "none", "--ids", str(ids), "--frames",
                                  "2"]) == 0
    (feature_file,) = out.glob("*.avi.npy")
    features = np.load(feature_file)
    assert features.shape == (2, 4096) and features.dtype == np.float32 and np.isfinite(features).all()
    assert features.std() > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["cnn"] == "vgg16" and manifest["layer"] == "fc2" and manifest["feature_dim"] == 4096
    assert manifest["image_size"] == 224 and manifest["frames"] == 2

    built = []

    def stub_cnn(settings):  # the settings the defaults give, and a CNN of VGG16 fc2's output size
        built.append(settings)
        return (lambda frames_rgb: np.zeros((len(frames_rgb), 4096), np.float32)), 4096

    monkeypatch.setattr(extract_features, "build_extractor", stub_cnn)
    defaults = tmp_path / "defaults"
    assert extract_features.main([str(video_dir), str(defaults), "--weights", "none", "--ids", str(ids)]) == 0
    assert np.load(defaults / feature_file.name).shape == (80, 4096)
    assert built == [extract_features.FeatureSettings.from_manifest(dict(manifest, frames=80))]
    assert json.loads((defaults / "manifest.json").read_text()) == dict(manifest, frames=80)


def test_real_clips_decode_and_sample_uniformly(mlds):
    clip = sorted((mlds / "testing_data" / "video").iterdir())[0]
    frames = video.read_frames(clip, 80, 64)
    assert frames.shape == (80, 64, 64, 3) and frames.dtype == np.uint8 and frames.std() > 5


def test_frame_count_comes_from_decoding_not_a_lying_header(tmp_path):
    path = tmp_path / "liar.avi"
    write_clip(path, [10 * i for i in range(20)])
    data = bytearray(path.read_bytes())
    avih = data.index(b"avih")
    data[avih + 24:avih + 28] = (1000).to_bytes(4, "little")  # avih.dwTotalFrames
    strh = data.index(b"strh")
    data[strh + 40:strh + 44] = (1000).to_bytes(4, "little")  # strh.dwLength
    path.write_bytes(bytes(data))
    capture = cv2.VideoCapture(str(path))
    header_count = capture.get(cv2.CAP_PROP_FRAME_COUNT)
    capture.release()
    assert header_count != 20  # the header lies
    frames = video.read_frames(path, 5, 16)
    expected = np.array([10 * i for i in np.linspace(0, 19, 5).round().astype(int)])
    np.testing.assert_allclose(frames.reshape(5, -1).mean(1), expected, atol=3)


def test_a_short_clip_repeats_frames(tmp_path):
    path = tmp_path / "short.avi"
    write_clip(path, [0, 60, 120, 180, 240])
    frames = video.read_frames(path, 12, 16)
    means = frames.reshape(12, -1).mean(1)
    assert frames.shape[0] == 12
    np.testing.assert_allclose(means, [60 * i for i in video.frame_indices(5, 12)], atol=3)
    assert len(np.unique(means.round(-1))) == 5 and np.all(np.diff(means) >= -3)


def test_shards_partition_the_collection(mlds):
    video_dir = mlds / "testing_data" / "video"
    everything = {p.name for p in extract_features.list_videos(video_dir)}
    first = {p.name for p in extract_features.list_videos(video_dir, shard=(0, 2))}
    second = {p.name for p in extract_features.list_videos(video_dir, shard=(1, 2))}
    assert first | second == everything and not first & second and first and second
    assert first == {p.name for p in extract_features.list_videos(video_dir, shard=(0, 2))}  # deterministic


# extract_features.py in a child that SIGKILLs itself half-way through writing its fifth feature file, four whole
KILLED_WRITING_THE_FIFTH_FILE = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
import extract_features
from util import backend

backend.full_float32_matmuls()  # as the tests' process computes
real_save, saved = np.save, []


def save_then_die(file, array, *args, **kwargs):
    if len(saved) == 4:
        real_save(file, array[:len(array) // 2], *args, **kwargs)
        file.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(file, array, *args, **kwargs)
    saved.append(file)


np.save = save_then_die
sys.exit(extract_features.main(sys.argv[2:]))
"""


def test_a_killed_run_restarts_and_gives_the_same_files(tmp_path, capsys, monkeypatch):
    """Killed at a set point (while a feature file is half written), not when a timer fires, which a busy machine
    lets the run outlast. Four clips of 40 frames are 10 whole CNN batches of 16, so the restart's batches are the
    first run's and its features equal them to the last bit: a frame's features can differ in the last bit with the
    size of its batch (a last, partial one), which made the files differ when the kill fell after an odd count."""
    make_corpus(tmp_path / "corpus", train_videos=8, test_seen=0, seed=3, test_unseen=8)
    video_dir = tmp_path / "corpus" / "training_data" / "video"
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    assert extract_features.main([str(video_dir), str(clean), *FAST, "--frames", "40"]) == 0
    result = subprocess.run([sys.executable, "-c", KILLED_WRITING_THE_FIFTH_FILE, str(ROOT), str(video_dir),
                             str(killed), *FAST, "--frames", "40"], capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert len(list(killed.glob("*.avi.npy"))) == 4
    assert [p for p in killed.iterdir() if p.name.startswith(".")]  # the half-written file, under its temporary name
    capsys.readouterr()
    assert extract_features.main([str(video_dir), str(killed), *FAST, "--frames", "40"]) == 0
    assert "skipped 4" in capsys.readouterr().out
    names = sorted(p.name for p in clean.glob("*.npy"))
    assert names == sorted(p.name for p in killed.glob("*.npy")) and len(names) == 8
    assert not [p for p in killed.iterdir() if p.name.startswith(".")]  # no temp file left behind
    for name in names:
        np.testing.assert_array_equal(np.load(clean / name), np.load(killed / name))
    # a third run finds every clip there, made with its settings: it builds no CNN; other settings are still refused
    building = extract_features.build_extractor
    monkeypatch.setattr(extract_features, "build_extractor", lambda settings: pytest.fail("a CNN built for nothing"))
    assert extract_features.main([str(video_dir), str(killed), *FAST, "--frames", "40"]) == 0
    assert "extracted 0, skipped 8 (already there)" in capsys.readouterr().out
    monkeypatch.setattr(extract_features, "build_extractor", building)
    assert extract_features.main([str(video_dir), str(killed), *FAST, "--frames", "20"]) == 2
    assert "features there were made with other settings (frames: 40 there, 20 asked)" in capsys.readouterr().err


def test_broken_files_are_reported_and_the_rest_complete(mlds, tmp_path, capsys):
    video_dir = tmp_path / "videos"
    video_dir.mkdir()
    good = sorted((mlds / "testing_data" / "video").iterdir())[:2]
    for clip in good:
        shutil.copy(clip, video_dir / clip.name)
    (video_dir / "empty.avi").write_bytes(b"")
    (video_dir / "notes.avi").write_text("this is not a video\n" * 50)
    truncated = video_dir / "truncated.avi"
    truncated.write_bytes(good[0].read_bytes()[:3000])
    out = tmp_path / "feat"
    assert extract_features.main([str(video_dir), str(out), *FAST, "--frames", "8"]) == 1
    printed = capsys.readouterr()
    assert "extracted 2" in printed.out and "failed 3" in printed.out
    failed = (out / "failed.txt").read_text()
    assert "empty.avi" in failed and "0 bytes" in failed and "notes.avi" in failed and "truncated.avi" in failed
    assert sorted(p.name for p in out.glob("*.npy")) == sorted(f"{c.name}.npy" for c in good)


def test_other_settings_on_the_same_feature_folder_are_refused(tmp_path, capsys):
    write_clip(tmp_path / "clip.avi", range(0, 200, 20))
    out = tmp_path / "feat"
    assert extract_features.main([str(tmp_path), str(out), *FAST, "--frames", "4"]) == 0
    capsys.readouterr()
    assert extract_features.main([str(tmp_path), str(out), *FAST, "--frames", "6"]) == 2
    err = capsys.readouterr().err
    assert "manifest.json" in err and "frames: 4 there, 6 asked" in err


def test_float16_output(tmp_path):
    write_clip(tmp_path / "clip.avi", range(0, 200, 20))
    assert extract_features.main([str(tmp_path), str(tmp_path / "feat"), *FAST, "--frames", "4",
                                  "--dtype", "float16"]) == 0
    assert np.load(tmp_path / "feat" / "clip.avi.npy").dtype == np.float16


def test_random_weights_are_drawn_by_numpy_from_the_seed():
    """--weights none: Keras's Glorot-uniform kernels drawn by numpy from the seed, biases as built (zeros)."""
    import keras

    def drawn(seed):
        inputs = keras.Input((8, 8, 3))
        cnn = keras.Model(inputs, keras.layers.Dense(5)(keras.layers.Flatten()(keras.layers.Conv2D(4, 3)(inputs))))
        extract_features.draw_random_weights(cnn, seed)
        return [(v.name, keras.ops.convert_to_numpy(v)) for v in cnn.weights]

    first, again, other = drawn(0), drawn(0), drawn(1)
    assert [name for name, _ in first] == ["kernel", "bias", "kernel", "bias"]
    for (name, value), (_, same), (_, different) in zip(first, again, other):
        np.testing.assert_array_equal(value, same)
        if name == "kernel":
            fan_in, fan_out = (3 * 3 * 3, 3 * 3 * 4) if value.ndim == 4 else (6 * 6 * 4, 5)  # as Keras counts them
            limit = np.sqrt(6 / (fan_in + fan_out))
            assert np.abs(value).max() <= limit and np.abs(value).max() > 0.9 * limit and abs(value.mean()) < limit / 4
            assert not np.array_equal(value, different)
        else:
            assert not value.any() and not different.any()
    # drawn a chunk at a time, the numbers of one whole draw, as the feature files made before drawing by chunks
    whole = np.random.default_rng(5).uniform(-0.2, 0.2, (3, 10, 7)).astype("float32")
    chunked = extract_features.uniform_float32(np.random.default_rng(5), 0.2, (3, 10, 7), chunk=16)
    assert chunked.dtype == np.float32 and np.array_equal(chunked, whole)


# extract_features.py --weights none in a child process under the other Keras backend
EXTRACT_ON = """
import sys
sys.path.insert(0, sys.argv[1])
import extract_features
from util import backend
backend.full_float32_matmuls()  # as the tests' process computes
sys.exit(extract_features.main(sys.argv[2:]))
"""


def test_random_weight_features_are_the_same_on_tensorflow_and_jax(tmp_path, capsys):
    """The random CNN is drawn by numpy, so a FEAT_DIR extracted on one backend goes on with the other: extracted
    on the tests' backend here and on the other in a child process."""
    here = backend.BACKEND
    other = "jax" if here == "tensorflow" else "tensorflow"
    write_clip(tmp_path / "a.avi", range(0, 240, 30))
    write_clip(tmp_path / "b.avi", [200 - 20 * (i % 5) for i in range(12)], size=(64, 48))
    capsys.readouterr()
    assert extract_features.main([str(tmp_path), str(tmp_path / f"feat_{here}"), *FAST, "--frames", "4"]) == 0
    assert "extracted 2" in capsys.readouterr().out
    result = subprocess.run([sys.executable, "-c", EXTRACT_ON, str(ROOT), str(tmp_path),
                             str(tmp_path / f"feat_{other}"), *FAST, "--frames", "4"], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "KERAS_BACKEND": other})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "extracted 2" in result.stdout
    features = {}
    for name in ("tensorflow", "jax"):
        out = tmp_path / f"feat_{name}"
        features[name] = {clip: np.load(out / f"{clip}.npy") for clip in ("a.avi", "b.avi")}
        assert json.loads((out / "manifest.json").read_text())["random_weights"] == "numpy"
    assert (tmp_path / "feat_tensorflow" / "manifest.json").read_text() == \
           (tmp_path / "feat_jax" / "manifest.json").read_text()
    for clip, array in features["tensorflow"].items():
        assert array.shape == (4, 64) and array.std() > 0
        # float32 convolutions summed in another order: the tolerance scales with the features' size
        np.testing.assert_allclose(features["jax"][clip], array, rtol=1e-5, atol=1e-6 * np.abs(array).max(),
                                   err_msg=clip)
    assert not np.allclose(features["tensorflow"]["a.avi"], features["tensorflow"]["b.avi"])


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Two short clips for the session's video_run (tests/conftest.py) to caption."""
    folder = tmp_path_factory.mktemp("clips")
    write_clip(folder / "a.avi", range(0, 200, 20))
    write_clip(folder / "b.avi", [250 - 20 * (i % 6) for i in range(12)], size=(64, 48))
    return sorted(folder.iterdir())


def test_infer_captions_raw_video_files(video_run, clips, capsys):
    capsys.readouterr()
    assert infer.main(["--video", *map(str, clips), "--checkpoint", str(video_run)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(",", 1)[0] for line in lines] == [str(c) for c in clips]
    assert all(line.split(",", 1)[1].strip() for line in lines)


def test_infer_video_reports_missing_and_broken_clips(video_run, clips, tmp_path, capsys):
    good = clips[0]
    broken = tmp_path / "broken.avi"
    broken.write_text("not a video")
    capsys.readouterr()
    code = infer.main(["--video", str(good), str(broken), str(tmp_path / "missing.mp4"), "--checkpoint",
                       str(video_run)])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out.startswith(f"{good},")
    assert "broken.avi: not a video" in captured.err and "missing.mp4: no such file" in captured.err


def test_infer_refuses_features_made_with_other_settings(video_run, tmp_path, capsys):
    root, run_dir = video_run.parent / "data", video_run
    feat_dir = tmp_path / "feat"
    shutil.copytree(root / "testing_data" / "feat", feat_dir)
    manifest = json.loads((feat_dir / "manifest.json").read_text())
    manifest.update(cnn="resnet50", feature_dim=2048)
    (feat_dir / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    code = infer.main([str(root / "testing_id.txt"), str(tmp_path / "out.txt"), "--checkpoint", str(run_dir),
                       "--feat-dir", str(feat_dir)])
    assert code == 2
    err = capsys.readouterr().err
    assert "manifest.json" in err and "resnet50" in err


def peak_kib():
    """This process's peak resident memory (VmHWM) in KiB."""
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


@pytest.mark.skipif(not os.path.isfile("/proc/self/status"), reason="reads peak memory from Linux's /proc")
def test_a_long_clip_keeps_only_its_sampled_frames(tmp_path, monkeypatch):
    """20,000 frames at 64x64: only the 80 sampled frames (at 160 px, 6 MB) are kept, not all 20,000 (1.5 GB). The
    peak resident memory restarts from the current one (writing 5 to /proc/self/clear_refs), a short clip is
    extracted, then the long one with the same CNN: how much further the peak goes."""
    cnns, build = {}, extract_features.build_extractor

    def built_once(settings):  # both clips through one CNN, as one run over both would
        if settings not in cnns:
            cnns[settings] = build(settings)
        return cnns[settings]

    monkeypatch.setattr(extract_features, "build_extractor", built_once)
    short_dir, long_dir = tmp_path / "short", tmp_path / "long"
    short_dir.mkdir()
    long_dir.mkdir()
    write_clip(short_dir / "short.avi", range(0, 250, 10), size=(64, 64))
    write_clip(long_dir / "long.avi", [i * 250 // 20000 for i in range(20000)], size=(64, 64))
    settings = ["--weights", "none", "--layer", "block1_pool", "--image-size", "160", "--pool", "max", "--grids", "1",
                "--frames", "80", "--batch-size", "16"]
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    assert extract_features.main([str(short_dir), str(tmp_path / "f1"), *settings]) == 0
    before = peak_kib()
    assert extract_features.main([str(long_dir), str(tmp_path / "f2"), *settings]) == 0
    growth_mib = (peak_kib() - before) / 1024
    all_frames_mib = 20000 * 160 * 160 * 3 / 2**20
    print(f"a 20,000-frame clip: peak memory grew {growth_mib:.0f} MiB (all its frames at 160 px: "
          f"{all_frames_mib:.0f} MiB)")
    assert growth_mib < all_frames_mib / 7  # about 200 MiB: TensorFlow's own allocations vary by some tens
    frames = video.read_frames(long_dir / "long.avi", 9, 16)
    expected = [i * 250 // 20000 for i in video.frame_indices(20000, 9)]
    np.testing.assert_allclose(frames.reshape(9, -1).mean(1), expected, atol=3)


def test_an_unexpected_error_in_the_decoding_thread_ends_the_run(tmp_path, capsys, monkeypatch):
    for name in ("a", "b", "c", "d"):
        write_clip(tmp_path / f"{name}.avi", range(0, 200, 20))
    out = tmp_path / "feat"
    read_frames = extract_features.read_frames

    def failing_read(path, *args):
        if path.name == "c.avi":
            raise MemoryError("injected")
        return read_frames(path, *args)

    monkeypatch.setattr(extract_features, "read_frames", failing_read)
    result = {}
    runner = threading.Thread(target=lambda: result.setdefault("code", extract_features.main(
        [str(tmp_path), str(out), *FAST, "--frames", "4"])), daemon=True)
    started = time.perf_counter()
    runner.start()
    runner.join(timeout=60)
    assert not runner.is_alive(), "the run waited forever for the decoding thread"
    print(f"the run ended {time.perf_counter() - started:.1f} s after it started")
    assert result["code"] == 2
    err = [line.rsplit("\r", 1)[-1] for line in capsys.readouterr().err.split("\n") if line.rsplit("\r", 1)[-1].strip()]
    assert err == [f"error: {tmp_path / 'c.avi'}: decoding failed unexpectedly (MemoryError: injected)"]
    assert sorted(p.name for p in out.glob("*.npy")) == ["a.avi.npy", "b.avi.npy"]  # finished clips are kept


def test_a_run_on_random_features_of_an_older_s2vt_refuses_raw_video(video_run, clips, tmp_path, capsys):
    """Its manifest has weights "none" without random_weights: TensorFlow drew that CNN, which no backend draws
    again, so captioning a clip would give features the model never saw."""
    root, run_dir = video_run.parent / "data", video_run
    run = shutil.copytree(run_dir, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    del config["features"]["random_weights"]
    (run / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert infer.main(["--video", str(clips[0]), "--checkpoint", str(run)]) == 2
    out, err = capsys.readouterr()
    lines = [line.rsplit("\r", 1)[-1] for line in err.split("\n") if line.rsplit("\r", 1)[-1].strip()]
    checkpoint = run / "best" / latest_checkpoint(run_dir / "best").name
    assert out == "" and len(lines) == 1 and lines[0].startswith(f"error: {checkpoint}: "), err
    assert "random weights seeded by TensorFlow (an older s2vt" in lines[0]
    # features made as it was trained still caption
    assert infer.main([str(root / "testing_id.txt"), str(tmp_path / "out.txt"), "--checkpoint", str(run),
                       "--feat-dir", str(root / "testing_data" / "feat")]) == 0
    assert len((tmp_path / "out.txt").read_text().splitlines()) == 8


def with_header_frame_count(path, count):
    """Rewrite an MJPG AVI's frame count in its headers (avih.dwTotalFrames, strh.dwLength) to `count`."""
    data = bytearray(path.read_bytes())
    avih, strh = data.index(b"avih"), data.index(b"strh")
    data[avih + 24:avih + 28] = count.to_bytes(4, "little")
    data[strh + 40:strh + 44] = count.to_bytes(4, "little")
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("limits, refusal", [
    (video.ClipLimits(frames=10), "more than 10 frames (the limit)"),
    (video.ClipLimits(seconds=1.5), "longer than 1.5 s (the limit)"),  # 20 frames at 10 fps
    (video.ClipLimits(pixels=48 * 40 - 1), "48x40 frames are over the limit of 1919 pixels"),
])
def test_a_clip_over_a_limit_is_refused_from_its_header_before_decoding(tmp_path, monkeypatch, limits, refusal):
    path = tmp_path / "clip.avi"
    write_clip(path, range(0, 200, 10))
    assert video.read_frames(path, 5, 16, video.ClipLimits(seconds=2, frames=20, pixels=48 * 40)).shape[0] == 5
    monkeypatch.setattr(video.Video, "frames", lambda *args: pytest.fail("decoded"))
    with pytest.raises(video.OverLimit, match=f"^{path}: {re.escape(refusal)}$"):
        extract_features.read_clip(path, extract_features.FeatureSettings(frames=5, image_size=16), limits)


def test_a_header_that_under_counts_is_caught_while_decoding(tmp_path):
    path = tmp_path / "liar.avi"
    write_clip(path, range(0, 200, 10))
    with_header_frame_count(path, 5)
    capture = cv2.VideoCapture(str(path))
    assert capture.get(cv2.CAP_PROP_FRAME_COUNT) == 5  # the header says 5 frames; there are 20
    capture.release()
    with pytest.raises(video.OverLimit, match="more than 10 frames"):
        video.read_frames(path, 5, 16, video.ClipLimits(frames=10))
    assert video.read_frames(path, 5, 16).shape == (5, 16, 16, 3)  # no limits: read as before


def test_stop_ends_decoding(tmp_path):
    path = tmp_path / "clip.avi"
    write_clip(path, range(0, 200, 10))
    asked = []
    with pytest.raises(video.ReadingStopped):
        video.read_frames(path, 5, 16, stop=lambda: asked.append(1) or len(asked) > 3)
    assert len(asked) == 4  # asked between frames; the fourth answer stopped it


def test_a_header_hiding_larger_frames_is_caught_while_decoding(hidden_large_frames):
    """A 64x64 header over 6000x6000 MJPEG frames: OpenCV hands back 64x64 frames, so the decoding time tells."""
    capture = cv2.VideoCapture(str(hidden_large_frames))
    assert (capture.get(cv2.CAP_PROP_FRAME_WIDTH), capture.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (64, 64)
    capture.release()
    decoded = []
    with pytest.raises(video.OverLimit, match=f"^{hidden_large_frames}: frames take .* s of CPU each to decode, far "
                                              f"longer than 64x64 frames do: larger than the header says"):
        extract_features.read_clip(hidden_large_frames, extract_features.FeatureSettings(frames=5, image_size=16),
                                   video.ClipLimits(pixels=640 * 480), stop=lambda: decoded.append(1))
    assert len(decoded) < 16  # stopped early: decoding all 16 frames takes about 5 s


def test_a_frame_found_but_undecodable_is_a_video_error(tmp_path, undecodable_frames):
    path = tmp_path / "clip.avi"
    write_clip(path, range(0, 200, 10))
    with pytest.raises(video.VideoError, match=f"^{path}: frame 0 was found but cannot be decoded$"):
        extract_features.read_clip(path, extract_features.FeatureSettings(frames=5, image_size=16))


def test_every_reading_error_is_a_video_error_and_a_data_error(tmp_path):
    path = tmp_path / "clip.avi"
    write_clip(path, range(0, 200, 10))
    caught = {}
    for kind, read in {"missing": lambda: video.read_frames(tmp_path / "missing.avi", 5, 16),
                       "over a cap": lambda: video.read_frames(path, 5, 16, video.ClipLimits(frames=10)),
                       "stopped": lambda: video.read_frames(path, 5, 16, stop=lambda: True)}.items():
        with pytest.raises(DataError) as error:
            read()
        caught[kind] = type(error.value)
    assert caught == {"missing": video.VideoError, "over a cap": video.OverLimit, "stopped": video.ReadingStopped}
    assert issubclass(video.OverLimit, video.VideoError) and issubclass(video.ReadingStopped, video.VideoError)
