"""`python -m tools.datasets prepare`: MSVD, MSR-VTT and VATEX annotation files, as distributed, into the MLDS layout.

Each fixture is a handful of rows in the real format, with non-English rows, duplicate, empty and non-ASCII
captions, a video without captions and a clip the user does not have.
"""
import csv
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

import extract_features
import infer
import train
from conftest import ROOT, write_tiny_mlds
from test_reliability import assert_one_error, run_cli, shown_lines
from tools import datasets
from tools.demo_data import captions_for, render_clip
from util import evaluate
from util.data import load_labels, read_ids

SPLITS = ("training", "validation", "testing")

# (VideoID, Start, End, Language, Description) rows of "MSR Video Description Corpus.csv"
MSVD_ROWS = [
    ("a1B-c_d", "1", "5", "English", "A man is cooking."),
    ("a1B-c_d", "1", "5", "English", "A man is cooking."),
    ("a1B-c_d", "1", "5", "German", "Ein Mann kocht."),
    ("a1B-c_d", "1", "5", "English", "  A man is cooking.  "),
    ("a1B-c_d", "1", "5", "English", ""),
    ("a1B-c_d", "1", "5", "English", "A man, in a kitchen, cooks."),
    ("a1B-c_d", "1", "5", "English", "a man eats at a café"),
    ("Bb", "0", "10", "English", "a dog runs"),
    ("Bb", "0", "10", "Chinese", "一只狗在跑"),
    ("Cc", "3", "7", "English", "a cat sleeps"),
    ("Dd", "12", "20", "English", "a woman sings"),
    ("Ee", "5", "9", "English", "a boy swims"),
    ("Ee", "5", "9", "English", "a boy is swimming"),
    ("Ff", "1", "2", "Spanish", "un niño nada"),
    ("Gg", "4", "8", "English", "a car drives"),
    ("Hh", "0", "4", "English", "a clip that youtube_mapping.txt does not list"),
]
# youtube_mapping.txt, deliberately not in vid order; Ii_0_1 has no row in the corpus
MSVD_MAPPING = ["Ee_5_9 vid1301", "a1B-c_d_1_5 vid1", "Bb_0_10 vid2", "Cc_3_7 vid3", "Ii_0_1 vid4",
                "Dd_12_20 vid1201", "Gg_4_8 vid1303", "Ff_1_2 vid1302"]
MSVD_CLIPS = ["a1B-c_d_1_5.avi", "Bb_0_10.avi", "Dd_12_20.avi", "Ee_5_9.avi", "Ff_1_2.avi", "Gg_4_8.avi",
              "Hh_0_4.avi"]  # Cc_3_7.avi is the clip the user lacks


def write_msvd(folder, rows=MSVD_ROWS, mapping=MSVD_MAPPING):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "MSR Video Description Corpus.csv", "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(datasets.MSVD_COLUMNS)
        for n, (video, start, end, language, text) in enumerate(rows):
            writer.writerow([video, start, end, 100 + n, "clean", 20, language, text])
    (folder / "youtube_mapping.txt").write_text("".join(line + "\n" for line in mapping))
    return folder


def write_msrvtt(folder):
    folder.mkdir(parents=True, exist_ok=True)
    info = {"contributor": "fixture", "year": 2016}
    video = lambda n, split: {"category": 1, "url": f"https://www.youtube.com/watch?v=x{n}", "video_id": f"video{n}",
                              "start time": 1.0, "end time": 9.0, "split": split, "id": n}
    sentence = lambda n, text: {"caption": text, "video_id": f"video{n}", "sen_id": 0}
    train_val = {"info": info, "videos": [video(0, "train"), video(1, "train"), video(2, "train"),
                                          video(3, "validate"), video(4, "validate")],
                 "sentences": [sentence(0, "a man is talking"), sentence(0, "a man is talking"), sentence(0, " "),
                               sentence(1, "一个男人在说话"), sentence(1, "a café scene"), sentence(2, "a lost clip"),
                               sentence(3, "a dog barks")]}
    test = {"info": info, "videos": [video(5, "test"), video(6, "test")],
            "sentences": [sentence(5, "a car"), sentence(6, "a bus"), sentence(6, "a bus drives")]}
    (folder / "train_val_videodatainfo.json").write_text(json.dumps(train_val))
    (folder / "test_videodatainfo.json").write_text(json.dumps(test))
    return folder


MSRVTT_CLIPS = ["video0.mp4", "video1.mp4", "video3.mp4", "video4.mp4", "video5.mp4", "video6.mp4"]


def write_vatex(folder):
    folder.mkdir(parents=True, exist_ok=True)
    files = {"vatex_training_v1.0.json": [
                 {"videoID": "Aa_000001_000011", "enCap": ["a man plays", "a man plays", "", "a man is playing"],
                  "chCap": ["一个男人在玩"]},
                 {"videoID": "Bb-x_000005_000015", "enCap": ["a girl dances"], "chCap": ["一个女孩在跳舞"]},
                 {"videoID": "Cc_000000_000010", "enCap": ["a lost clip"], "chCap": ["丢失"]}],
             "vatex_validation_v1.0.json": [{"videoID": "Dd_000002_000012", "enCap": ["a café"], "chCap": ["咖啡"]}],
             "vatex_public_test_english_v1.1.json": [{"videoID": "Ee_000003_000013", "enCap": ["a boat sails"]},
                                                     {"videoID": "Ff_000004_000014", "enCap": [" "]}]}
    for name, entries in files.items():
        (folder / name).write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    return folder


VATEX_CLIPS = ["Aa_000001_000011.mp4", "Bb-x_000005_000015.mp4", "Dd_000002_000012.mp4", "Ee_000003_000013.mp4",
               "Ff_000004_000014.mp4"]


def placeholder_clips(folder, names):
    """Empty files: only their names and existence matter to `prepare`."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")
    return folder


def prepare(capsys, dataset, out, annotations, *options):
    return run_cli(datasets.main, ["prepare", dataset, out, "--annotations", annotations, *options], capsys)


def snapshot(folder):
    """Every path under folder with its bytes or link target: to compare a folder before and after."""
    if not folder.exists():
        return None
    state = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        state[key] = (("link", os.readlink(path)) if path.is_symlink()
                      else ("dir",) if path.is_dir() else ("file", path.read_bytes()))
    return state


def read_split(out, split):
    labels = load_labels(out / f"{split}_label.json")
    ids = [video_id for video_id, _ in labels]
    assert read_ids(out / f"{split}_id.txt") == ids == read_ids(out / f"{split}_data" / "id.txt")
    return dict(labels)


def test_msvd_keeps_english_rows_splits_by_the_mapping_and_lists_missing_clips(tmp_path, capsys):
    annotations = write_msvd(tmp_path / "msvd")
    videos_a = placeholder_clips(tmp_path / "clips_a", MSVD_CLIPS[:3] + ["notes.txt"])
    videos_b = placeholder_clips(tmp_path / "clips_b", MSVD_CLIPS[3:])
    out = tmp_path / "out"
    code, stdout, stderr = prepare(capsys, "msvd", out, annotations, "--videos", videos_a, "--videos", videos_b)
    print(stdout)
    assert code == 0 and not shown_lines(stderr), stderr
    splits = {split: read_split(out, split) for split in SPLITS}
    assert splits["training"] == {"a1B-c_d_1_5.avi": ["A man is cooking.", "A man, in a kitchen, cooks.",
                                                      "a man eats at a café"],
                                  "Bb_0_10.avi": ["a dog runs"]}
    assert splits["validation"] == {"Dd_12_20.avi": ["a woman sings"]}
    assert list(splits["testing"]) == ["Ee_5_9.avi", "Gg_4_8.avi"]  # vid order; Ff_1_2 has no English caption
    assert (out / "missing_clips.txt").read_text() == "training\tCc_3_7.avi\n"
    for split, labels in splits.items():
        video_dir = out / f"{split}_data" / "video"
        assert sorted(p.name for p in video_dir.iterdir()) == sorted(labels)
        for name in labels:
            link = video_dir / name
            source = (videos_a if name in MSVD_CLIPS[:3] else videos_b) / name
            assert link.is_symlink() and link.resolve() == source.resolve()
    record = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert record["dataset"] == "msvd" and record["clips"] == "linked"
    assert record["splits"]["training"] == {"clips": 2, "captions": 4, "missing": 1,
                                            "videos_without_captions": ["Ii_0_1.avi"]}
    assert record["splits"]["testing"]["videos_without_captions"] == ["Ff_1_2.avi"]
    table = {line.split()[0]: line.split()[1:] for line in stdout.splitlines() if line.split()[0] in SPLITS}
    assert table == {"training": ["2", "4", "1", "1"], "validation": ["1", "1", "0", "0"],
                     "testing": ["2", "3", "0", "1"]}
    assert "16 rows, 3 not English (dropped); 1 clips with English rows are not in youtube_mapping.txt" in stdout
    assert "captions: 1 empty and 2 duplicate dropped" in stdout
    assert f"1 missing clips listed in {out / 'missing_clips.txt'}" in stdout


def test_msvd_published_split_is_1200_100_670(tmp_path, capsys):
    numbers = list(range(1, 1971))
    random.Random(0).shuffle(numbers)
    rows = [(f"v{n:04d}", "0", "1", "English", f"caption of clip {n}") for n in numbers]
    annotations = write_msvd(tmp_path / "msvd", rows, [f"v{n:04d}_0_1 vid{n}" for n in numbers])
    code, stdout, stderr = prepare(capsys, "msvd", tmp_path / "out", annotations)
    assert code == 0, stderr
    splits = {split: list(read_split(tmp_path / "out", split)) for split in SPLITS}
    expected = {"training": range(1, 1201), "validation": range(1201, 1301), "testing": range(1301, 1971)}
    assert splits == {split: [f"v{n:04d}_0_1.avi" for n in numbers] for split, numbers in expected.items()}


def test_msrvtt_splits_by_the_split_field_with_captions_from_sentences(tmp_path, capsys):
    annotations = write_msrvtt(tmp_path / "msrvtt")
    videos = placeholder_clips(tmp_path / "clips", MSRVTT_CLIPS)
    out = tmp_path / "out"
    code, stdout, stderr = prepare(capsys, "msrvtt", out, annotations, "--videos", videos)
    print(stdout)
    assert code == 0 and not shown_lines(stderr), stderr
    splits = {split: read_split(out, split) for split in SPLITS}
    assert splits == {"training": {"video0.mp4": ["a man is talking"], "video1.mp4": ["一个男人在说话", "a café scene"]},
                      "validation": {"video3.mp4": ["a dog barks"]},
                      "testing": {"video5.mp4": ["a car"], "video6.mp4": ["a bus", "a bus drives"]}}
    assert "一个男人在说话" in (out / "training_label.json").read_text(encoding="utf-8")  # kept as is, not escaped
    assert (out / "missing_clips.txt").read_text() == "training\tvideo2.mp4\n"
    record = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert record["splits"]["validation"]["videos_without_captions"] == ["video4.mp4"]
    assert "captions: 1 empty and 1 duplicate dropped" in stdout


def test_vatex_takes_english_captions_one_file_per_split(tmp_path, capsys):
    annotations = write_vatex(tmp_path / "vatex")
    videos = placeholder_clips(tmp_path / "clips", VATEX_CLIPS)
    out = tmp_path / "out"
    code, stdout, stderr = prepare(capsys, "vatex", out, annotations, "--videos", videos)
    print(stdout)
    assert code == 0 and not shown_lines(stderr), stderr
    splits = {split: read_split(out, split) for split in SPLITS}
    assert splits == {"training": {"Aa_000001_000011.mp4": ["a man plays", "a man is playing"],
                                   "Bb-x_000005_000015.mp4": ["a girl dances"]},
                      "validation": {"Dd_000002_000012.mp4": ["a café"]},
                      "testing": {"Ee_000003_000013.mp4": ["a boat sails"]}}
    assert (out / "missing_clips.txt").read_text() == "training\tCc_000000_000010.mp4\n"


def test_without_videos_every_clip_is_listed_and_none_checked(tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, stderr = prepare(capsys, "msvd", out, write_msvd(tmp_path / "msvd"))
    print(stdout)
    assert code == 0, stderr
    assert list(read_split(out, "training")) == ["a1B-c_d_1_5.avi", "Bb_0_10.avi", "Cc_3_7.avi"]
    assert not (out / "training_data" / "video").exists() and not (out / "missing_clips.txt").exists()
    assert "clips not checked (no --videos)" in stdout
    assert json.loads((out / "dataset.json").read_text())["splits"]["training"]["missing"] is None


def test_rerun_gives_the_same_output_and_follows_the_clips_present(tmp_path, capsys):
    annotations = write_msvd(tmp_path / "msvd")
    videos = placeholder_clips(tmp_path / "clips", MSVD_CLIPS)
    out = tmp_path / "out"
    assert prepare(capsys, "msvd", out, annotations, "--videos", videos)[0] == 0
    first = snapshot(out)
    (out / "testing_data" / "feat").mkdir()  # features extracted meanwhile stay
    (out / "testing_data" / "feat" / "Ee_5_9.avi.npy").write_bytes(b"features")
    assert prepare(capsys, "msvd", out, annotations, "--videos", videos)[0] == 0
    second = snapshot(out)
    assert second.pop("testing_data/feat/Ee_5_9.avi.npy") == ("file", b"features")
    assert second.pop("testing_data/feat") == ("dir",)
    assert second == first

    (videos / "Gg_4_8.avi").unlink()  # the user lost a clip: the next run drops it everywhere
    code, stdout, _ = prepare(capsys, "msvd", out, annotations, "--videos", videos)
    assert code == 0
    assert list(read_split(out, "testing")) == ["Ee_5_9.avi"]
    assert [p.name for p in (out / "testing_data" / "video").iterdir()] == ["Ee_5_9.avi"]
    assert (out / "missing_clips.txt").read_text() == "training\tCc_3_7.avi\ntesting\tGg_4_8.avi\n"
    assert not [p for p in out.rglob(".*")]  # no temporary folder left

    code, stdout, _ = prepare(capsys, "msvd", out, annotations)  # then without --videos: clips stay, the list goes
    assert code == 0 and "clips: kept the 4 an earlier run placed" in stdout
    assert [p.name for p in (out / "testing_data" / "video").iterdir()] == ["Ee_5_9.avi"]
    assert not (out / "missing_clips.txt").exists()


def test_copy_copies_the_clips(tmp_path, capsys):
    videos = placeholder_clips(tmp_path / "clips", [])
    for name in MSRVTT_CLIPS:
        (videos / name).write_bytes(name.encode())
    out = tmp_path / "out"
    code, stdout, _ = prepare(capsys, "msrvtt", out, write_msrvtt(tmp_path / "msrvtt"), "--videos", videos, "--copy")
    assert code == 0 and "clips copied into" in stdout
    clip = out / "training_data" / "video" / "video1.mp4"
    assert not clip.is_symlink() and clip.read_bytes() == b"video1.mp4"


def byte_clips(folder, names):
    """Clips whose bytes are their names: a copy, a link or a lost clip tells itself apart."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(name.encode())
    return folder


def placed(out):
    """{split/clip: ("link", target) or ("file", bytes)} of every clip in out's video folders."""
    return {key: value for key, value in snapshot(out).items() if "/video/" in key}


def assert_copies_intact(out):
    clips = placed(out)
    assert sorted(clips) == sorted(f"{split}_data/video/{name}" for split, names in
                                   [("training", ["video0.mp4", "video1.mp4"]), ("validation", ["video3.mp4"]),
                                    ("testing", ["video5.mp4", "video6.mp4"])] for name in names)
    for key, value in clips.items():
        assert value == ("file", key.rsplit("/", 1)[1].encode()), key


def test_videos_pointing_into_its_own_copies_is_refused_and_the_copies_stay(tmp_path, capsys):
    annotations, out = write_msrvtt(tmp_path / "msrvtt"), tmp_path / "out"
    assert prepare(capsys, "msrvtt", out, annotations, "--videos", byte_clips(tmp_path / "clips", MSRVTT_CLIPS),
                   "--copy")[0] == 0
    before = snapshot(out)
    own = out / "training_data" / "video"
    assert_one_error(prepare(capsys, "msrvtt", out, annotations, "--videos", own), own, "inside the output folder")
    assert snapshot(out) == before
    assert_copies_intact(out)


@pytest.mark.parametrize("how", ["folder", "link"])
def test_videos_inside_the_output_folder_is_refused(tmp_path, capsys, how):
    out = tmp_path / "out"
    clips = byte_clips(out / "raw", MSRVTT_CLIPS)
    videos = clips if how == "folder" else tmp_path / "clips"
    if how == "link":
        videos.symlink_to(clips)
    before = snapshot(out)
    result = prepare(capsys, "msrvtt", out, write_msrvtt(tmp_path / "msrvtt"), "--videos", videos)
    assert_one_error(result, videos, "lies inside the output folder")
    assert snapshot(out) == before


def test_rerun_without_videos_keeps_the_copied_clips(tmp_path, capsys):
    annotations, out = write_msrvtt(tmp_path / "msrvtt"), tmp_path / "out"
    clips = byte_clips(tmp_path / "clips", MSRVTT_CLIPS)
    assert prepare(capsys, "msrvtt", out, annotations, "--videos", clips, "--copy")[0] == 0
    for clip in clips.iterdir():  # the user keeps only the copies
        clip.unlink()
    code, stdout, stderr = prepare(capsys, "msrvtt", out, annotations)
    assert code == 0, stderr
    assert "clips: kept the 5 an earlier run placed" in stdout
    assert_copies_intact(out)


def test_rerun_without_videos_keeps_the_linked_clips(tmp_path, capsys):
    annotations, out = write_msrvtt(tmp_path / "msrvtt"), tmp_path / "out"
    clips = byte_clips(tmp_path / "clips", MSRVTT_CLIPS)
    assert prepare(capsys, "msrvtt", out, annotations, "--videos", clips)[0] == 0
    links = placed(out)
    code, stdout, stderr = prepare(capsys, "msrvtt", out, annotations)
    assert code == 0, stderr
    assert "clips: kept the 5 an earlier run placed" in stdout
    assert placed(out) == links and len(links) == 5
    assert all(kind == "link" and os.path.exists(target) for kind, target in links.values())


def test_rerun_replaces_copied_clips_only_with_the_same_bytes(tmp_path, capsys):
    annotations, out = write_msrvtt(tmp_path / "msrvtt"), tmp_path / "out"
    assert prepare(capsys, "msrvtt", out, annotations, "--videos", byte_clips(tmp_path / "clips", MSRVTT_CLIPS),
                   "--copy")[0] == 0
    before = snapshot(out)
    other = byte_clips(tmp_path / "other", MSRVTT_CLIPS)
    (other / "video3.mp4").write_bytes(b"another clip of that name")
    assert_one_error(prepare(capsys, "msrvtt", out, annotations, "--videos", other, "--copy"),
                     out / "validation_data" / "video", "video3.mp4")
    assert snapshot(out) == before
    (other / "video3.mp4").write_bytes(b"video3.mp4")  # the same bytes elsewhere: nothing is lost, the run goes on
    assert prepare(capsys, "msrvtt", out, annotations, "--videos", other, "--copy")[0] == 0
    assert_copies_intact(out)


# re-runs `prepare msrvtt OUT --annotations A --videos CLIPS --copy` and SIGKILLs itself at one point of placing the
# training clips: "copying" after the first copy, "aside" when the earlier folder is moved aside and the new one not
# yet in, "swapped" when the new one is in and the work folder not yet cleared
PREPARE_KILLED = """
import os, shutil, signal, sys
sys.path.insert(0, sys.argv[1])
from tools import datasets

point = sys.argv[2]
real_copy, real_replace, real_settle = shutil.copyfile, os.replace, datasets.settle


def copyfile(source, target):
    real_copy(source, target)
    if point == "copying":
        os.kill(os.getpid(), signal.SIGKILL)


def replace(source, target):
    moving_in = os.path.basename(source) == "video" and os.path.dirname(source).endswith(".work")
    if point == "aside" and moving_in:
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(source, target)


def settle(work, video_dir):
    if point == "swapped" and (video_dir / "video0.mp4").exists():
        os.kill(os.getpid(), signal.SIGKILL)
    real_settle(work, video_dir)


shutil.copyfile, os.replace, datasets.settle = copyfile, replace, settle
datasets.main(sys.argv[3:])
"""


@pytest.mark.parametrize("point", ["copying", "aside", "swapped"])
def test_a_killed_copy_run_is_settled_at_the_next_start_and_only_ours(tmp_path, capsys, point):
    from util.atomic import HOST

    annotations, out = write_msrvtt(tmp_path / "msrvtt"), tmp_path / "out"
    clips = byte_clips(tmp_path / "clips", MSRVTT_CLIPS)
    argv = ["prepare", "msrvtt", out, "--annotations", annotations, "--videos", clips, "--copy"]
    assert prepare(capsys, "msrvtt", out, annotations, "--videos", clips, "--copy")[0] == 0
    killed = subprocess.run([sys.executable, "-c", PREPARE_KILLED, str(ROOT), point, *map(str, argv)])
    assert killed.returncode == -signal.SIGKILL
    training = out / "training_data"
    (work,) = training.glob(".video.s2vt-*.work")  # what the killed run left, gigabytes with --copy
    assert (training / "video").exists() == (point != "aside")
    ended = subprocess.Popen(["true"])
    ended.wait()
    live = subprocess.Popen(["sleep", "60"])
    others = {".video.4242.tmp": None,  # another program's, or an older s2vt's (no marker)
              f".video.s2vt-{HOST}-{ended.pid}.work": None,  # our name, but no marker: not known to be ours
              f".video.s2vt-{HOST}-{live.pid}.work": datasets.WORK_MARK}  # a run still going
    try:
        for name, mark in others.items():
            (training / name).mkdir()
            (training / name / "clip.mp4").write_bytes(b"someone's clip")
            if mark:
                (training / name / datasets.WORK_MARKER).write_text(mark)
        code, stdout, stderr = prepare(capsys, "msrvtt", out, annotations)  # the next start, without --videos
        assert code == 0, stderr
        assert "clips: kept the 5 an earlier run placed" in stdout
        assert_copies_intact(out)  # the earlier clips are back where the killed run had moved them aside
        assert sorted(p.name for p in training.iterdir()) == sorted([*others, "id.txt", "video"])
        for name in others:
            assert (training / name / "clip.mp4").read_bytes() == b"someone's clip"
    finally:
        live.kill()
        live.wait()


def corrupt_msvd_columns(root):
    path = write_msvd(root / "msvd") / "MSR Video Description Corpus.csv"
    path.write_text(path.read_text(encoding="utf-8").replace("Language", "Lang", 1), encoding="utf-8")
    return "msvd", root / "msvd", path, "no column Language"


def corrupt_msvd_csv(root):
    path = write_msvd(root / "msvd") / "MSR Video Description Corpus.csv"
    with open(path, "a", encoding="utf-8") as file:
        file.write('Zz,1,2,3,clean,4,English,"an unclosed quote\n')
    return "msvd", root / "msvd", path, "not a readable CSV file"


def corrupt_msvd_encoding(root):
    path = write_msvd(root / "msvd") / "MSR Video Description Corpus.csv"
    with open(path, "ab") as file:
        file.write(b"Zz,1,2,3,clean,4,English,caf\xe9\n")  # Latin-1, not UTF-8
    return "msvd", root / "msvd", path, "not UTF-8 text"


def msvd_start_not_seconds(root):
    path = write_msvd(root / "msvd", MSVD_ROWS + [("Zz", "1:05", "2", "English", "a clock")]) / \
        "MSR Video Description Corpus.csv"
    return "msvd", root / "msvd", path, "data row 17: expected a VideoID and whole seconds in Start and End"


def corrupt_msvd_mapping(root):
    path = write_msvd(root / "msvd", mapping=MSVD_MAPPING + ["Zz_1_2 video9"]) / "youtube_mapping.txt"
    return "msvd", root / "msvd", path, "line 9: expected '<VideoID>_<Start>_<End> vid<N>'"


def msvd_mapping_beyond_1970(root):
    path = write_msvd(root / "msvd", mapping=MSVD_MAPPING + ["Zz_1_2 vid1971"]) / "youtube_mapping.txt"
    return "msvd", root / "msvd", path, "vid1971 is outside vid1..vid1970"


def msvd_mapping_missing(root):
    (write_msvd(root / "msvd") / "youtube_mapping.txt").unlink()
    return "msvd", root / "msvd", root / "msvd" / "youtube_mapping.txt", "annotation file not found"


def msrvtt_without(key):
    def corrupt(root):
        path = write_msrvtt(root / "msrvtt") / "test_videodatainfo.json"
        data = json.loads(path.read_text())
        del data[key]
        path.write_text(json.dumps(data))
        return "msrvtt", root / "msrvtt", path, f'no "{key}" list'
    corrupt.__name__ = f"msrvtt_without_{key}"
    return corrupt


def msrvtt_unparsable(root):
    path = write_msrvtt(root / "msrvtt") / "train_val_videodatainfo.json"
    path.write_text(path.read_text()[:-10])
    return "msrvtt", root / "msrvtt", path, "not valid JSON"


def vatex_without_english(root):
    path = write_vatex(root / "vatex") / "vatex_validation_v1.0.json"
    path.write_text(json.dumps([{"videoID": "Dd_000002_000012", "chCap": ["咖啡"]}], ensure_ascii=False),
                    encoding="utf-8")
    return "vatex", root / "vatex", path, "item 0 of the file is not an object with videoID, enCap"


def msvd_split_without_clips(root):
    (root / "clips" / "Dd_12_20.avi").unlink()  # the only validation clip
    return "msvd", write_msvd(root / "msvd"), root / "clips", "none of the 1 validation clips is there"


def videos_folder_missing(root):
    return "msvd", write_msvd(root / "msvd"), root / "no_such_folder", "videos folder not found"


def out_holds_another_dataset(root):
    assert datasets.main(["prepare", "msrvtt", str(root / "out"), "--annotations", str(write_msrvtt(root / "msrvtt")),
                          "--videos", str(placeholder_clips(root / "msrvtt_clips", MSRVTT_CLIPS))]) == 0
    return "msvd", write_msvd(root / "msvd"), root / "out", "holds the msrvtt data set"


def out_holds_mlds_files(root):
    write_tiny_mlds(root / "out")
    return "msvd", write_msvd(root / "msvd"), root / "out", "holds training_label.json not made by `prepare`"


@pytest.mark.parametrize("corrupt", [
    corrupt_msvd_columns, corrupt_msvd_csv, corrupt_msvd_encoding, msvd_start_not_seconds, corrupt_msvd_mapping,
    msvd_mapping_beyond_1970, msvd_mapping_missing, msrvtt_without("videos"), msrvtt_without("sentences"),
    msrvtt_unparsable, vatex_without_english, msvd_split_without_clips, videos_folder_missing,
    out_holds_another_dataset, out_holds_mlds_files], ids=lambda corrupt: corrupt.__name__)
def test_bad_input_is_one_error_line_and_writes_nothing(tmp_path, capsys, corrupt):
    clips = placeholder_clips(tmp_path / "clips", MSVD_CLIPS + MSRVTT_CLIPS + VATEX_CLIPS)
    dataset, annotations, path, what = corrupt(tmp_path)
    videos = path if what == "videos folder not found" else clips
    out = tmp_path / "out"
    before = snapshot(out)
    result = prepare(capsys, dataset, out, annotations, "--videos", videos)
    assert_one_error(result, path, what)
    assert snapshot(out) == before


def test_unknown_dataset_is_a_usage_error(tmp_path, capsys):
    code, _, stderr = run_cli(datasets.main, ["prepare", "kinetics", tmp_path / "out", "--annotations", tmp_path],
                              capsys)
    lines = shown_lines(stderr)
    assert code == 2 and lines[0].startswith("usage:") and "Traceback" not in stderr
    assert re.fullmatch(r"\S+ prepare: error: argument dataset: invalid choice: 'kinetics' .*", lines[-1]), lines
    assert not (tmp_path / "out").exists()


def test_prepared_msvd_runs_through_extract_train_infer_evaluate(tmp_path, capsys, monkeypatch):
    """The chain on a small MSVD-format set with real clips. Written against today's train.py (it validates on
    the testing split); adapt when train.py takes validation_label.json. util.evaluate runs without Java here
    (METEOR's start-up alone takes 10 s of CPU; tests/test_evaluate.py runs it)."""
    rng = np.random.default_rng(0)
    plan = [("red", "square", "left"), ("blue", "ring", "up"), ("green", "bar", "right"), ("yellow", "square", "down"),
            ("red", "ring", "down"), ("blue", "bar", "left"), ("green", "square", "up"), ("yellow", "ring", "right")]
    numbers = [1, 2, 3, 4, 5, 1201, 1301, 1302]
    rows, mapping, videos = [], [], tmp_path / "clips"
    videos.mkdir()
    for n, attributes in zip(numbers, plan):
        video = f"clip{n}"
        rows += [(video, "0", "2", "English", caption) for caption in captions_for(*attributes, "big")[:3]]
        rows.append((video, "0", "2", "French", "une forme bouge"))
        mapping.append(f"{video}_0_2 vid{n}")
        if n != 5:  # the clip the user lacks
            render_clip(videos / f"{video}_0_2.avi", *attributes, "big", rng)
    data, run_dir = tmp_path / "data", tmp_path / "run"
    code, stdout, stderr = prepare(capsys, "msvd", data, write_msvd(tmp_path / "msvd", rows, mapping),
                                   "--videos", videos)
    assert code == 0, stderr
    assert [len(read_split(data, split)) for split in SPLITS] == [4, 1, 2]
    for split in SPLITS:
        assert extract_features.main([str(data / f"{split}_data" / "video"), str(data / f"{split}_data" / "feat"),
                                      "--frames", "4", "--weights", "none", "--layer", "block1_pool",
                                      "--image-size", "32", "--pool", "max", "--grids", "1", "--batch-size", "16"]) == 0
        assert sorted(p.name for p in (data / f"{split}_data" / "feat").glob("*.npy")) == \
            sorted(f"{video_id}.npy" for video_id in read_split(data, split))
    assert train.main(["--data-dir", str(data), "--ckpt-dir", str(run_dir), "--hidden", "16", "--frames", "4",
                       "--batch-size", "4", "--epochs", "1", "--min-word-count", "1"]) == 0
    captions = tmp_path / "captions.txt"
    assert infer.main([str(data / "testing_id.txt"), str(captions), "--checkpoint", str(run_dir)]) == 0
    assert [line.split(",")[0] for line in captions.read_text().splitlines()] == ["clip1301_0_2.avi",
                                                                                  "clip1302_0_2.avi"]
    capsys.readouterr()
    monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs: None)
    assert evaluate.main([str(captions), "--labels", str(data / "testing_label.json")]) == 0
    assert "videos: 2" in capsys.readouterr().out
