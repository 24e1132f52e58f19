"""A long video captioned scene by scene: cuts, bounded samples, merged cues, SRT/WebVTT/JSON read back, bad files."""
import json
import threading
import time
import wave

import numpy as np
import pytest
import srt
import webvtt

import infer
from tools.demo_data import FPS, clip_frames, parse_caption, write_clip
from tools.long_demo import make_long_video
from util.errors import DataError
from util.scenes import EvenSample, SceneReader
from util.subtitles import Cue, merge_repeats, to_srt, to_vtt
from util.video import OverLimit, ReadingStopped, VideoError


@pytest.fixture(scope="module")
def six_scenes(tmp_path_factory):
    """Six demo scenes of 4-8 s joined with hard cuts, and their plan."""
    path = tmp_path_factory.mktemp("long") / "six.avi"
    return path, make_long_video(path, scenes=6, seed=0)


def one_shot(path, seconds, seed=0):
    """One static-background scene of `seconds` (a slow red square moving right)."""
    write_clip(path, clip_frames("red", "square", "right", "big", np.random.default_rng(seed), int(seconds * FPS)))
    return path


def test_six_scenes_give_one_cue_each_at_the_cuts_with_the_right_attributes(six_scenes, tmp_path, capsys):
    path, plan = six_scenes
    out = {kind: tmp_path / f"six.{kind}" for kind in ("srt", "vtt", "json")}
    assert infer.main(["--video", str(path), "--segments", "auto", "--checkpoint", "s2vt-demo",
                       *(x for kind, p in out.items() for x in (f"--{kind}", str(p)))]) == 0
    from_srt = list(srt.parse(out["srt"].read_text()))
    from_vtt = webvtt.from_string(out["vtt"].read_text()).captions
    from_json = json.loads(out["json"].read_text())["cues"]
    assert len(from_srt) == len(from_vtt) == len(from_json) == len(plan) == 6
    right = 0
    for scene, a, b, c in zip(plan, from_srt, from_vtt, from_json):
        assert abs(a.start.total_seconds() - scene["start"]) <= 0.5 and abs(a.end.total_seconds() - scene["end"]) <= 0.5
        assert (b.start_time.in_milliseconds(), b.end_time.in_milliseconds()) == (
            round(a.start.total_seconds() * 1000), round(a.end.total_seconds() * 1000)) == (
            round(c["start"] * 1000), round(c["end"] * 1000))
        assert a.content == b.text == c["caption"] and c["score"] < 0  # beam search's score, a log-probability
        right += parse_caption(c["caption"]) == (scene["colour"], scene["shape"], scene["direction"])
    assert right >= 5
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"0.000 --> {from_json[0]['end']:.3f} {from_json[0]['caption']}" and len(printed) == 6


def test_cuts_fixed_windows_and_long_shots_split_with_a_bounded_sample(six_scenes, tmp_path):
    path, plan = six_scenes
    detected = list(SceneReader(path, size=32, keep=4))
    assert [round(s.start, 3) for s in detected] == [round(s["start"], 3) for s in plan]
    assert sum(s.decoded for s in detected) == sum(s["frames"] for s in plan)
    windows = list(SceneReader(path, size=32, keep=4, segments="10"))
    assert [round(s.start, 3) for s in windows] == [0, 10, 20, 30] and windows[-1].end == pytest.approx(plan[-1]["end"])
    shot = list(SceneReader(one_shot(tmp_path / "shot.avi", 25), size=32, keep=4, max_scene=10))
    assert [(round(s.start, 3), round(s.end, 3)) for s in shot] == [(0, 10), (10, 20), (20, 25)]
    assert all(4 <= len(s.frames) <= 8 and s.frames.shape[1:] == (32, 32, 3) for s in shot)
    short = list(SceneReader(one_shot(tmp_path / "short.avi", 1.5), size=32, keep=4))  # shorter than one scene
    assert [(s.start, round(s.end, 3), s.decoded) for s in short] == [(0, 1.5, 18)]


def test_a_sample_stays_bounded_and_evenly_spaced():
    sample = EvenSample(keep=5)
    for i in range(1000):
        sample.offer(lambda: i)
        assert len(sample.items) <= 10
    steps = np.diff(sample.items)
    assert len(sample.items) >= 5 and sample.items[0] == 0 and (steps == steps[0]).all() and steps[0] * 10 >= 1000 / 2


def test_repeated_captions_merge_and_both_formats_read_back():
    cues = [Cue(0, 4.5, "a red ring moves up", -1.0), Cue(4.5, 6.5, "a red ring moves up", -2.0),
            Cue(6.5, 3725.25, "a blue bar goes down", None), Cue(3725.25, 3730.0, "a blue bar goes down", -1.0)]
    merged = merge_repeats(cues)
    assert merged == [Cue(0, 6.5, "a red ring moves up", pytest.approx((-4.5 - 4.0) / 6.5)),
                      Cue(6.5, 3730.0, "a blue bar goes down", None)]
    back_srt = list(srt.parse(to_srt(merged)))
    back_vtt = webvtt.from_string(to_vtt(merged)).captions
    assert [(s.start.total_seconds(), s.end.total_seconds(), s.content) for s in back_srt] == \
           [(c.start, c.end, c.caption) for c in merged]
    assert [(v.start, v.end, v.text) for v in back_vtt] == [("00:00:00.000", "00:00:06.500", "a red ring moves up"),
                                                            ("00:00:06.500", "01:02:10.000", "a blue bar goes down")]


def bad_files(tmp_path, six):
    """{what: file} for each kind of file that is no long video to caption."""
    data = six.read_bytes()
    middle = bytearray(data)
    middle[len(data) // 3:len(data) // 3 + 20000] = bytes(20000)
    audio = tmp_path / "audio.wav"
    with wave.open(str(audio), "wb") as sound:
        sound.setnchannels(1), sound.setsampwidth(2), sound.setframerate(8000)
        sound.writeframes(bytes(16000))
    files = {"corrupt middle": bytes(middle), "cut off": data[:len(data) // 2], "no video stream": b"not a video " * 99,
             "empty": b""}
    for name, content in files.items():
        (tmp_path / f"{name.replace(' ', '_')}.avi").write_bytes(content)
    return {**{name: tmp_path / f"{name.replace(' ', '_')}.avi" for name in files}, "audio only": audio}


@pytest.mark.parametrize("what, message", [("corrupt middle", "decoding stopped at"), ("cut off", "decoding stopped at"),
                                           ("no video stream", "not a video OpenCV can open"),
                                           ("audio only", "not a video OpenCV can open"),
                                           ("empty", "empty file")])
def test_a_bad_file_gets_one_line_and_nothing_written(six_scenes, tmp_path, capsys, what, message):
    video = bad_files(tmp_path, six_scenes[0])[what]
    out = tmp_path / "out"
    out.mkdir()
    code = infer.main(["--video", str(video), "--segments", "auto", "--checkpoint", "s2vt-demo",
                       "--srt", str(out / "a.srt"), "--vtt", str(out / "a.vtt"), "--json", str(out / "a.json")])
    printed = capsys.readouterr()
    assert code == 2 and list(out.iterdir()) == [] and printed.out == ""
    assert printed.err.strip().splitlines()[-1].startswith(f"error: {video}: {message}")


def test_bad_segment_settings_are_refused(six_scenes):
    for settings in ({"segments": "soon"}, {"segments": "-3"}, {"min_scene": 5, "max_scene": 5}):
        with pytest.raises(DataError, match="segments|min_scene"):
            SceneReader(six_scenes[0], size=32, keep=4, **settings)


def test_caps_and_stop_end_the_reading(six_scenes):
    path, plan = six_scenes
    with pytest.raises(OverLimit, match="longer than 30 s"):
        SceneReader(path, size=32, keep=4, max_seconds=30)
    with pytest.raises(OverLimit, match="96x96 frames are over the limit of 9000 pixels"):
        SceneReader(path, size=32, keep=4, max_pixels=9000)
    from captioner import Captioner

    asked, threads = [], threading.active_count()
    with pytest.raises(ReadingStopped):
        Captioner.load("s2vt-demo").caption_segments(path, stop=lambda: asked.append(1) or len(asked) > 100)
    for _ in range(50):  # the reading thread ends too
        if threading.active_count() == threads:
            break
        time.sleep(0.1)
    assert threading.active_count() == threads and len(asked) < sum(s["frames"] for s in plan)


def test_a_header_hiding_larger_frames_stops_the_reading(hidden_large_frames):
    decoded = []
    with pytest.raises(OverLimit, match="frames take .* s of CPU each to decode, far longer than 64x64 frames do"):
        list(SceneReader(hidden_large_frames, size=32, keep=4, max_pixels=640 * 480, stop=lambda: decoded.append(1)))
    assert len(decoded) < 16  # stopped early: decoding all 16 frames takes about 5 s


def test_a_first_frame_found_but_undecodable_is_a_video_error(tmp_path, undecodable_frames):
    """Cutting scenes (segments auto) converts every frame: the first one failing once ended in a TypeError."""
    path = one_shot(tmp_path / "shot.avi", 2)
    with pytest.raises(VideoError, match=f"^{path}: frame 0 was found but cannot be decoded$"):
        list(SceneReader(path, size=32, keep=4))
