"""The optical-flow stream (extract_features.py --stream flow) and late fusion of two runs (infer.py --fuse,
Captioner(fused=...)): flow images point the way things move, streams never mix, fused scores are the weighted
sum of the runs' log-probabilities."""
import json
import shutil
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

import extract_features
import infer
import train
from captioner import Captioner
from conftest import FEATURE_DIM, TINY_RUN_FLAGS, VIDEO_SETTINGS, decode_rgb, load_runs_once, train_video_run
from test_beam import features, random_model, teacher_forced_log_prob
from test_extract import FAST
from test_model import VOCAB
from test_reliability import assert_one_error, run_cli
from util import backend
from util.errors import DataError
from util.vocab import EOS, PAD, SPECIAL_TOKENS, Vocabulary

FLOW_SETTINGS = replace(VIDEO_SETTINGS, stream="flow")


def write_moving_square(path, step=(2, 0), frames=20, size=64, start=(10, 24)):
    """A clip of a 16-pixel square moving `step` pixels a frame over a smooth textured background; returns the
    square's top-left corner in each frame."""
    rng = np.random.default_rng(0)
    background = cv2.GaussianBlur(rng.uniform(60, 190, (size, size, 3)).astype(np.uint8), (5, 5), 0)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (size, size))
    corners = [(start[0] + step[0] * t, start[1] + step[1] * t) for t in range(frames)]
    for x, y in corners:
        frame = background.copy()
        cv2.rectangle(frame, (x, y), (x + 15, y + 15), (30, 30, 230), -1)
        writer.write(frame)
    writer.release()
    return corners


@pytest.mark.parametrize("step, channel", [((2, 0), 0), ((0, -2), 1)], ids=["right", "up"])
def test_flow_images_point_the_way_a_square_moves(tmp_path, step, channel):
    """Red is x flow, green y flow, around 128; each image is the flow to the next decoded frame (2 pixels), not to
    the next sampled one (6 or 7 frames on, which would saturate)."""
    clip = tmp_path / "square.avi"
    corners = write_moving_square(clip, step, start=(10, 24) if step[0] else (24, 44))
    settings = replace(FLOW_SETTINGS, frames=4, image_size=64)
    images = extract_features.read_clip(clip, settings)
    assert images.shape == (4, 64, 64, 3) and images.dtype == np.uint8
    pairs = extract_features.flow_pair_indices(20, 4)
    assert pairs.tolist() == [[0, 1], [6, 7], [13, 14], [18, 19]]  # the last sampled frame: the motion into it
    two_pixels = 128 + 2 * extract_features.FLOW_SCALE * extract_features.FLOW_REFERENCE_SIZE / 64  # 184
    sign = 1 if sum(step) > 0 else -1  # along the motion
    for image, (first, _) in zip(images, pairs):
        x, y = corners[first]
        square = image[y + 3:y + 13, x + 3:x + 13].reshape(-1, 3).mean(0)  # inside the square, off its edges
        along = 128 + sign * (square[channel] - 128)
        assert two_pixels - 35 < along < two_pixels + 15, square
        assert abs(square[1 - channel] - 128) < 10 and square[2] > 20, square
        corner = image[:8, 56:] if step[0] else image[56:, :8]  # background the square never reaches
        assert np.abs(corner[..., :2].astype(int) - 128).max() <= 3 and corner[..., 2].max() <= 5
    # the same images from frames already decoded (Captioner.caption(frames))
    np.testing.assert_array_equal(extract_features.sample_decoded(decode_rgb(clip), settings), images)


def test_the_stream_is_recorded_and_streams_never_share_a_folder(tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    write_moving_square(videos / "clip.avi")
    flow_dir, rgb_dir = tmp_path / "feat_flow", tmp_path / "feat"
    assert extract_features.main([str(videos), str(flow_dir), *FAST, "--frames", "4", "--stream", "flow"]) == 0
    assert json.loads((flow_dir / "manifest.json").read_text())["stream"] == "flow"
    capsys.readouterr()
    assert extract_features.main([str(videos), str(flow_dir), *FAST, "--frames", "4"]) == 2
    assert "stream: 'flow' there, 'rgb' asked" in capsys.readouterr().err
    assert extract_features.main([str(videos), str(rgb_dir), *FAST, "--frames", "4"]) == 0
    flow, rgb = np.load(flow_dir / "clip.avi.npy"), np.load(rgb_dir / "clip.avi.npy")
    assert flow.shape == rgb.shape == (4, 64) and not np.allclose(flow, rgb, rtol=0.1)
    # a folder of an older s2vt, whose manifest names no stream, holds RGB features
    manifest = json.loads((rgb_dir / "manifest.json").read_text())
    del manifest["stream"]
    (rgb_dir / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert extract_features.main([str(videos), str(rgb_dir), *FAST, "--frames", "4"]) == 0
    assert "skipped 1" in capsys.readouterr().out
    assert extract_features.main([str(videos), str(rgb_dir), *FAST, "--frames", "4", "--stream", "flow"]) == 2
    assert "stream: 'rgb' there, 'flow' asked" in capsys.readouterr().err


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    """A tiny trained run whose features claim to be VIDEO_SETTINGS's flow stream, with video_run's captions (so
    its vocabulary) and features of its own."""
    return train_video_run(tmp_path_factory.mktemp("flow_run"), FLOW_SETTINGS, seed=1)


def test_infer_and_train_refuse_features_of_the_other_stream(video_run, flow_run, tmp_path, capsys):
    flow_features = flow_run.parent / "data" / "testing_data" / "feat"
    ids, out = flow_run.parent / "data" / "testing_id.txt", tmp_path / "out.txt"
    assert_one_error(run_cli(infer.main, [ids, out, "--checkpoint", video_run, "--feat-dir", flow_features], capsys),
                     flow_features / "manifest.json", "stream: 'flow' here, 'rgb' in training")
    # a run of an older s2vt, whose manifest names no stream, was trained on RGB features
    older = shutil.copytree(video_run, tmp_path / "older")
    config = json.loads((older / "config.json").read_text())
    del config["features"]["stream"]
    (older / "config.json").write_text(json.dumps(config))
    assert_one_error(run_cli(infer.main, [ids, out, "--checkpoint", older, "--feat-dir", flow_features], capsys),
                     flow_features / "manifest.json", "stream: 'flow' here, 'rgb' in training")
    assert not out.exists()
    # resuming the RGB run on flow features
    data = shutil.copytree(video_run.parent / "data", tmp_path / "data")
    manifest = data / "training_data" / "feat" / "manifest.json"
    manifest.write_text(json.dumps(dict(json.loads(manifest.read_text()), stream="flow")))
    run = shutil.copytree(video_run, tmp_path / "run")
    assert_one_error(run_cli(train.main, ["--data-dir", data, "--ckpt-dir", run, *TINY_RUN_FLAGS, "--resume"], capsys),
                     data / "training_data" / "feat", "features differ from those the run was trained on")


def tiny_vocab(words=None):
    return Vocabulary(SPECIAL_TOKENS + tuple(words or (f"w{i}" for i in range(len(SPECIAL_TOKENS), VOCAB))))


def fused_captioner(rgb, flow, weight, vocab=None):
    vocab = vocab or tiny_vocab()
    return Captioner(rgb, vocab, {}, Path("rgb"), fused=[(Captioner(flow, vocab, {}, Path("flow")), weight)])


def test_fused_log_probs_are_the_weighted_sum_of_the_runs():
    """Beam search's n best, fused: each log-probability is 0.7 * the RGB run's teacher-forced one (its features)
    + 0.3 * the flow run's (its own features)."""
    rgb, flow = random_model(0), random_model(1)
    rgb_features, flow_features = features(8, seed=3), features(8, seed=4)
    vocab, max_len = tiny_vocab(), rgb.config.max_caption_len
    results = fused_captioner(rgb, flow, 0.3, vocab).decode(rgb_features, beam_size=3, n_best=3,
                                                             fused_features=[flow_features])
    videos, captions, log_probs = [], [], []
    for video, result in enumerate(results):
        for hypothesis in result.n_best:
            ids = [vocab.index[word] for word in hypothesis.caption.split()]
            ids += [EOS] if len(ids) < max_len else []  # max_len words: it never ended
            videos.append(video)
            captions.append(ids + [PAD] * (max_len - len(ids)))
            log_probs.append(hypothesis.log_prob)
    captions = np.array(captions, np.int32)
    alone = [teacher_forced_log_prob(model, f[videos], captions) for model, f in ((rgb, rgb_features),
                                                                                  (flow, flow_features))]
    assert np.abs(alone[0] - alone[1]).max() > 1.0  # the runs disagree
    np.testing.assert_allclose(log_probs, 0.7 * alone[0] + 0.3 * alone[1], atol=1e-4)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_a_fusion_weighing_one_run_almost_alone_captions_as_that_run(beam_size, monkeypatch):
    """The decoders run eagerly, 4 times faster than compiling each of them: what they decode is the claim here
    (the tests beside it decode with compiled fused decoders)."""
    monkeypatch.setattr(backend, "compile_function", lambda models, function: function)
    rgb, flow = random_model(1), random_model(2)
    rgb_features, flow_features = features(8, seed=3), features(8, seed=4)
    alone = [[r.caption for r in Captioner(model, tiny_vocab(), {}, Path("alone")).decode(f, beam_size)]
             for model, f in ((rgb, rgb_features), (flow, flow_features))]
    assert alone[0] != alone[1]
    for weight, expected in ((1e-6, alone[0]), (1 - 1e-6, alone[1])):
        fused = fused_captioner(rgb, flow, weight).decode(rgb_features, beam_size, fused_features=[flow_features])
        assert [r.caption for r in fused] == expected


def test_fusion_refuses_another_vocabulary_and_bad_weights():
    rgb, flow = random_model(0), random_model(1)
    words = [f"w{i}" for i in range(len(SPECIAL_TOKENS), VOCAB)]
    swapped = tiny_vocab([words[0], words[2], words[1], *words[3:]])
    with pytest.raises(DataError, match=r"^flow: its vocabulary \(13 words\) differs from that of rgb \(13 words; "
                                        r"word 5 is 'w6' there, 'w5' here\)"):
        Captioner(rgb, tiny_vocab(), {}, Path("rgb"), fused=[(Captioner(flow, swapped, {}, Path("flow")), 0.5)])
    for weight in (0, 1, 1.5, float("nan"), "0.5"):
        with pytest.raises(ValueError, match="weight must be a number in"):
            fused_captioner(rgb, flow, weight)
    with pytest.raises(ValueError, match="one array per run"):
        fused_captioner(rgb, flow, 0.5).caption(features(1)[0])
    with pytest.raises(ValueError, match="for each of the 1 fused runs"):
        fused_captioner(rgb, flow, 0.5).decode(features(2))


@pytest.fixture
def loaded_once(monkeypatch):
    """Captioner.load (infer.main's too) loads a run once per arguments in this test (conftest.load_runs_once):
    loading two runs and compiling their fused decoder costs seconds a call. infer.main must ask for the same runs
    and weights as the test's own Captioner.load to be handed its Captioner."""
    load_runs_once(monkeypatch, {})


@pytest.fixture
def fused_layout(video_run, flow_run, tmp_path):
    """The RGB run's test features in testing_data/feat and the flow run's beside them in testing_data/feat_flow."""
    for run, name in ((video_run, "feat"), (flow_run, "feat_flow")):
        shutil.copytree(run.parent / "data" / "testing_data" / "feat", tmp_path / "testing_data" / name)
    shutil.copy(video_run.parent / "data" / "testing_id.txt", tmp_path / "testing_id.txt")
    return tmp_path


def test_infer_fuses_a_run_reading_its_features_beside_the_checkpoint_s(video_run, flow_run, fused_layout, capsys,
                                                                      loaded_once):
    ids, out = fused_layout / "testing_id.txt", fused_layout / "out.txt"
    code, printed, _ = run_cli(infer.main, [ids, out, "--checkpoint", video_run, "--fuse", f"{flow_run}:0.4",
                                            "--beam-size", "3", "--n-best", "2"], capsys)
    assert code == 0 and " fused with " in printed and "(weight 0.4 against 0.6)" in printed
    video_ids = ids.read_text().split()
    captioner = Captioner.load(video_run, fuse=[(flow_run, 0.4)])
    loaded = [np.stack([np.load(fused_layout / "testing_data" / name / f"{v}.npy") for v in video_ids])
              for name in ("feat", "feat_flow")]
    expected = captioner.decode(loaded[0], 3, n_best=2, fused_features=loaded[1:])
    nbest = json.loads(Path(f"{out}.nbest.json").read_text())
    for video_id, result in zip(video_ids, expected):
        assert [h["caption"] for h in nbest[video_id]] == [h.caption for h in result.n_best]
        np.testing.assert_allclose([h["log_prob"] for h in nbest[video_id]], [h.log_prob for h in result.n_best],
                                   atol=1e-5)
    # --fuse-feat-dir names the folder instead
    moved = shutil.move(fused_layout / "testing_data" / "feat_flow", fused_layout / "flow_features")
    again = fused_layout / "again.txt"
    assert run_cli(infer.main, [ids, again, "--checkpoint", video_run, "--fuse", f"{flow_run}:0.4", "--beam-size",
                                "3", "--n-best", "2", "--fuse-feat-dir", moved], capsys)[0] == 0
    assert again.read_text() == out.read_text()


def test_infer_fuse_bad_input_is_one_line(video_run, flow_run, fused_layout, capsys, tmp_path):
    ids, out = fused_layout / "testing_id.txt", fused_layout / "out.txt"
    for spec in (f"{flow_run}:abc", f"{flow_run}:1.5", f"{flow_run}:0", f"{flow_run}:1", f"{flow_run}:"):
        assert_one_error(run_cli(infer.main, [ids, out, "--checkpoint", video_run, "--fuse", spec], capsys),
                         f"--fuse {spec}", "the weight after ':' must be a number between 0 and 1")
    # the flow run's features are not there
    flow_dir = fused_layout / "testing_data" / "feat_flow"
    shutil.rmtree(flow_dir)
    assert_one_error(run_cli(infer.main, [ids, out, "--checkpoint", video_run, "--fuse", flow_run], capsys),
                     flow_dir, f"no features folder for --fuse (flow stream, {flow_run / 'best'}")
    # ... or they are RGB features
    rgb_dir = fused_layout / "testing_data" / "feat"
    assert_one_error(run_cli(infer.main, [ids, out, "--checkpoint", video_run, "--fuse", flow_run,
                                          "--fuse-feat-dir", rgb_dir], capsys),
                     rgb_dir / "manifest.json", "stream: 'rgb' here, 'flow' in training")
    assert not out.exists()
    # a run whose vocabulary differs (two words swapped)
    other = shutil.copytree(flow_run, tmp_path / "other")
    words = json.loads((other / "vocab.json").read_text())
    words[4], words[5] = words[5], words[4]
    (other / "vocab.json").write_text(json.dumps(words))
    assert_one_error(run_cli(infer.main, ["--video", tmp_path / "any.avi", "--checkpoint", video_run, "--fuse",
                                          other], capsys), other / "best", "its vocabulary (")


def test_infer_video_with_fuse_extracts_both_streams(video_run, flow_run, tmp_path, capsys, loaded_once):
    """The fused caption of a clip is the one of its RGB features and its flow features as extract_features.py
    writes them."""
    videos = tmp_path / "videos"
    videos.mkdir()
    write_moving_square(videos / "clip.avi", size=48, start=(4, 16))
    clip = videos / "clip.avi"
    extracted = []
    for stream in ("rgb", "flow"):
        assert extract_features.main([str(videos), str(tmp_path / stream), *FAST, "--frames", "6", "--stream",
                                      stream]) == 0
        extracted.append(np.load(tmp_path / stream / "clip.avi.npy")[None])
    assert extracted[0].shape == extracted[1].shape == (1, 6, FEATURE_DIM)
    assert not np.allclose(extracted[0], extracted[1], rtol=0.1)
    captioner = Captioner.load(video_run, fuse=[(flow_run, 0.5)])
    (expected,) = captioner.decode(extracted[0], 3, n_best=3, fused_features=extracted[1:])
    for video in (clip, decode_rgb(clip)):
        result = captioner.caption(video, beam_size=3, n_best=3)
        assert [h.caption for h in result.n_best] == [h.caption for h in expected.n_best]
        np.testing.assert_allclose([h.log_prob for h in result.n_best], [h.log_prob for h in expected.n_best],
                                   atol=1e-5)
    (greedy,) = captioner.decode(extracted[0], fused_features=extracted[1:])
    code, printed, _ = run_cli(infer.main, ["--video", clip, "--checkpoint", video_run, "--fuse", flow_run], capsys)
    assert code == 0 and printed == f"{clip},{greedy.caption}\n"


def test_the_probe_tells_what_the_features_hold(tmp_path, capsys):
    """tools.probe: an attribute written into the features is told from them; one that is not, at chance."""
    from tools.demo_data import captions_for
    from tools.probe import main as probe_main

    rng = np.random.default_rng(0)
    directions = ("left", "right", "up", "down")
    for split, count in (("training", 80), ("testing", 40)):
        feat_dir = tmp_path / split
        feat_dir.mkdir()
        labels = []
        for i in range(count):
            colour, shape, direction = ("red", "green")[rng.integers(2)], "ring", directions[i % 4]
            clip = rng.normal(size=(3, 8))
            clip[:, i % 4] += 3.0  # the direction, in every frame
            np.save(feat_dir / f"{split}_{i}.avi.npy", clip)
            labels.append({"id": f"{split}_{i}.avi", "caption": captions_for(colour, shape, direction, "big")})
        (tmp_path / f"{split}_label.json").write_text(json.dumps(labels))
    capsys.readouterr()
    assert probe_main([str(tmp_path / "training"), str(tmp_path / "testing"),
                       "--train-labels", str(tmp_path / "training_label.json"),
                       "--test-labels", str(tmp_path / "testing_label.json")]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:4]}
    assert rows["direction"][1:4:2] == ["4", "100.0%"] and rows["shape"][3] == "100.0%"  # one shape: always right
    assert 20 < float(rows["colour"][3].rstrip("%")) < 80
