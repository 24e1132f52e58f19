"""The Python API: Captioner.load(...).caption(...) on real clips, decoded frames and features, batched, with beam
search and attention; and `pip install -e .` used from another folder."""
import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest

import extract_features
from captioner import Caption, Captioner, Hypothesis, VideoError
from conftest import ROOT, VIDEO_SETTINGS, decode_rgb
from util.errors import DataError
from util.video import read_frames


@pytest.fixture(scope="module")
def captioner(video_run):
    return Captioner.load(video_run)


@pytest.fixture
def clips(mlds):
    return sorted((mlds / "testing_data" / "video").glob("*.avi"))


def extracted_features(clip, tmp_path):
    """The feature file extract_features.py writes for clip with the checkpoint's settings."""
    (tmp_path / "ids.txt").write_text(f"{clip.name}\n")
    argv = [clip.parent, tmp_path / "feat", "--ids", tmp_path / "ids.txt", "--weights", "none", "--seed", "0",
            "--layer", "block1_pool", "--image-size", "32", "--pool", "max", "--grids", "1", "--frames", "6"]
    assert extract_features.main([str(a) for a in argv]) == 0
    return np.load(tmp_path / "feat" / f"{clip.name}.npy")


def test_a_clip_its_decoded_frames_and_its_feature_file_give_the_same_caption(captioner, clips, tmp_path):
    clip = clips[0]
    plain = captioner.caption(clip)
    caption = plain.caption
    assert isinstance(plain, Caption) and isinstance(caption, str) and caption and plain.frames is None
    assert set(caption.split()) <= set(captioner.vocab.words)
    detailed = captioner.caption(str(clip), attention=True)
    assert detailed.caption == caption
    assert np.array_equal(detailed.frames, read_frames(clip, VIDEO_SETTINGS.frames, 32))

    # the attention weights follow the features continuously, so equal weights mean equal features
    for same in (captioner.caption(decode_rgb(clip), attention=True),
                 captioner.caption_features(extracted_features(clip, tmp_path), attention=True)):
        assert same.caption == caption and same.words == detailed.words
        np.testing.assert_allclose(same.attention, detailed.attention, atol=1e-5)
    assert [c.caption for c in captioner.caption_features(extracted_features(clip, tmp_path)[None])] == [caption]


def test_videos_batched_with_beam_search_n_best_and_attention(captioner, clips, tmp_path):
    results = captioner.caption(clips[:3], beam_size=3, n_best=2, attention=True)
    assert len(results) == 3 and all(isinstance(r, Caption) for r in results)
    for clip, result in zip(clips, results):
        alone = captioner.caption(clip, beam_size=3, n_best=2, attention=True)
        assert result.caption == alone.caption and [h.caption for h in result.n_best] == \
               [h.caption for h in alone.n_best]
        np.testing.assert_allclose(result.attention, alone.attention, atol=1e-5)
        assert len(result.n_best) == 2 and all(isinstance(h, Hypothesis) for h in result.n_best)
        assert result.n_best[0].caption == result.caption
        assert result.n_best[0].score >= result.n_best[1].score
        assert len(result.words) == len(result.caption.split()) + (result.words[-1] == "<EOS>")
        assert result.attention.shape == (len(result.words), VIDEO_SETTINGS.frames)
        np.testing.assert_allclose(result.attention.sum(axis=1), 1, atol=1e-4)
        assert result.frames.shape == (VIDEO_SETTINGS.frames, 32, 32, 3) and result.frames.dtype == np.uint8
    body = json.loads(json.dumps(results[0].to_dict()))
    assert body["caption"] == results[0].caption and len(body["n_best"]) == 2
    assert len(body["attention"]["weights"]) == len(body["attention"]["words"])
    results[0].plot_attention(tmp_path / "attention.png")
    assert (tmp_path / "attention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_type_whatever_the_options(captioner, clips):
    """A Caption per video, whatever is asked for: one for one video, a list for several."""
    # (videos, frames, H, W, 3): the first 20 frames of two clips at one size
    frames = np.stack([[cv2.resize(f, (64, 48)) for f in decode_rgb(clip, 20)] for clip in clips[:2]])
    assert isinstance(captioner.caption(clips[0], beam_size=3), Caption)
    both = captioner.caption(frames)
    assert isinstance(both, list) and len(both) == 2 and all(isinstance(c, Caption) for c in both)
    assert [c.caption for c in captioner.caption(list(frames))] == [c.caption for c in both]
    assert len(captioner.caption(clips[0], beam_size=3, n_best=2).n_best) == 2
    assert captioner.caption(clips[0], attention=True).n_best == ()  # greedy decoding scores nothing


def test_unreadable_clip_raises_or_stands_in_the_results(captioner, clips, tmp_path):
    bad = tmp_path / "notes.avi"
    bad.write_text("not a video\n" * 40)
    with pytest.raises(VideoError, match=f"^{bad}: not a video OpenCV can open$"):
        captioner.caption([clips[0], bad])
    good, failed = captioner.caption([clips[0], bad], errors="return")
    assert good.caption == captioner.caption(clips[0]).caption and isinstance(failed, VideoError)
    with pytest.raises(VideoError, match="no such file"):
        captioner.caption(tmp_path / "missing.mp4")


@pytest.mark.parametrize("call, message", [
    (lambda c: c.caption_features(np.zeros((5, 64))), r"features must be \(frames=6, dim=64\)"),
    (lambda c: c.caption(np.zeros((6, 64)), beam_size=2, n_best=3), "1 <= n_best <= beam_size"),
    (lambda c: c.caption(np.zeros((6, 48, 40, 3), np.float32)), r"\(frames, H, W, 3\) uint8"),
    (lambda c: c.caption(np.zeros((6, 64)), errors="ignore"), "errors must be"),
], ids=["features-shape", "n-best-over-beam", "float-frames", "errors-mode"])
def test_bad_arguments_say_what_is_wrong(captioner, call, message):
    with pytest.raises(ValueError, match=message):
        call(captioner)


def test_checkpoint_without_feature_extractor_captions_features_only(captioner, video_run, clips):
    config = dict(captioner.run_config, features=None)
    features_only = Captioner(captioner.model, captioner.vocab, config, captioner.source)
    assert isinstance(features_only.caption(np.zeros((6, 64))).caption, str)
    with pytest.raises(DataError, match="records no feature extractor"):
        features_only.caption(clips[0])


@pytest.mark.slow
def test_pip_install_editable_puts_no_generic_name_on_the_path(video_run, captioner, clips, tmp_path):
    """A throwaway venv that sees this one's packages gets `pip install -e .`: it installs no module named model,
    train or util; a script in an unrelated folder with the checkout on PYTHONPATH imports the API, finds
    checkpoints/releases.json and captions a clip."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # without setuptools here (a Python 3.12+ venv), pip fetches it into an isolated build environment
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", *isolation,
                    "-e", ROOT], check=True)
    elsewhere = tmp_path / "notebook"
    elsewhere.mkdir()
    script = textwrap.dedent(f"""
        import json
        import captioner, util.releases
        from captioner import Captioner
        print(json.dumps({{"module": captioner.__file__, "releases": sorted(util.releases.load_registry()),
                           "caption": Captioner.load({str(video_run)!r}).caption({str(clips[0])!r}).caption}}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    generic = ["model", "train", "util", "tools", "captioner"]
    found = subprocess.run([python, "-c", f"import importlib.util; print([importlib.util.find_spec(name) is None "
                                          f"for name in {generic!r}])"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
    assert found.stdout.strip() == str([True] * len(generic)), (generic, found.stdout)
    result = subprocess.run([python, "-c", script], cwd=elsewhere, env=dict(env, PYTHONPATH=str(ROOT)),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.splitlines()[-1])
    assert found["module"] == str(ROOT / "captioner.py")
    assert "s2vt-demo" in found["releases"]  # checkpoints/releases.json, found beside util/, not in the cwd
    assert found["caption"] == captioner.caption(clips[0]).caption  # the module's Captioner.load(video_run)
