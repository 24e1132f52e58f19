import io
import json
import re
from urllib.parse import unquote

import pytest
from PIL import Image

from tools.gallery import (MAX_GIF_BYTES, RELEVANT_CIDER, SECTIONS, Scored, clip_gif, correct_and_relevant, main,
                          score_captions)
from util.bleu import sentence_bleu1
from util.errors import DataError
from util.plots import DPI

# Captions for the 8 real MLDS test clips: reference captions (correct), the right subject or action with the
# wrong rest (relevant but incorrect), and sentences sharing only function words with the references.
CORRECT = {"0lh_UWF9ZP4_62_69.avi": "A woman is mixing rice in a bowl.",
           "TZ860P4iTaM_15_28.avi": "A cat is hitting piano keys.",
           "qvg9eM4Hmzk_4_10.avi": "A man lifts the back end of a truck."}
RELEVANT = {"778mkceE0UQ_40_46.avi": "a car is flying in the sky",
            "ufFT2BWh3BQ_0_8.avi": "two dogs are playing",
            "UXs3eq68ZjE_250_255.avi": "a person is pouring milk into a glass"}
UNRELATED = {"WTf5EgVY5uU_124_128.avi": "MLDS is the greatest course",
             "PeUHy0A1GF0_114_121.avi": "the quick brown fox jumps over the lazy dog"}
LINK = re.compile(r"!\[[^\]]*\]\(([^)]+)\)")


@pytest.fixture
def clips(mlds, tmp_path):
    """(captions file, labels, video folder) for the 8 real clips."""
    captions = tmp_path / "out.txt"
    captions.write_text("".join(f"{v},{c}\n" for v, c in {**CORRECT, **RELEVANT, **UNRELATED}.items()))
    return captions, mlds / "testing_label.json", mlds / "testing_data" / "video"


def sections(markdown):
    """{section title: text under it}, checking both sections are there in order."""
    parts = re.split(r"^### (.+)$", markdown, flags=re.M)
    assert tuple(parts[1::2]) == SECTIONS
    return dict(zip(parts[1::2], parts[2::2]))


def linked_videos(text):
    return {unquote(link).rsplit("/", 1)[-1].removesuffix(".gif") + ".avi" for link in LINK.findall(text)}


def check_gif(path):
    assert path.stat().st_size <= MAX_GIF_BYTES
    with Image.open(path) as gif:
        assert gif.format == "GIF" and gif.is_animated and gif.n_frames > 1 and gif.width <= 160


def test_gifs_and_markdown_from_real_clips(clips, tmp_path, capsys):
    captions, labels, videos = clips
    gif_dir, readme = tmp_path / "repo" / "raw_videos", tmp_path / "repo" / "README.md"
    readme.parent.mkdir()
    assert main([str(captions), "--labels", str(labels), "--videos", str(videos), "--gifs", str(gif_dir),
                 "--markdown", str(readme), "--count", "6"]) == 0
    assert "6 GIFs" in capsys.readouterr().out
    markdown = readme.read_text()
    groups = sections(markdown)
    assert linked_videos(groups["Correct descriptions"]) == set(CORRECT)
    assert linked_videos(groups["Relevant but incorrect descriptions"]) == set(RELEVANT)
    for caption in {**CORRECT, **RELEVANT}.values():
        assert caption in markdown
    links = LINK.findall(markdown)
    assert all(link.startswith("raw_videos/") for link in links)  # relative to the README's folder
    for link in links:
        check_gif(readme.parent / unquote(link))
    assert len(list(gif_dir.iterdir())) == 6


def test_markdown_on_stdout_links_from_the_current_folder(clips, tmp_path, monkeypatch, capsys):
    captions, labels, videos = clips
    monkeypatch.chdir(tmp_path)
    assert main([str(captions), "--labels", str(labels), "--videos", str(videos), "--gifs", "raw_videos",
                 "--count", "2"]) == 0
    out, err = capsys.readouterr()
    groups = sections(out)
    assert linked_videos(groups["Correct descriptions"]) == {"qvg9eM4Hmzk_4_10.avi"}  # the top BLEU@1, 0.889
    assert linked_videos(groups["Relevant but incorrect descriptions"]) == {"778mkceE0UQ_40_46.avi"}  # the lowest
    for link in LINK.findall(out):
        assert link.startswith("raw_videos/") and (tmp_path / link).is_file()
    assert "2 GIFs" in err.splitlines()[-1]


def test_cider_separates_what_bleu1_does_not(mlds):
    """Why the GIF gallery ranks by CIDEr-D: MLDS BLEU@1 puts a function-words-only caption near the others."""
    labels = json.loads((mlds / "testing_label.json").read_text())
    clip_labels = [(e["id"], e["caption"]) for e in labels if e["id"] in {**CORRECT, **RELEVANT, **UNRELATED}]
    scored = {s.video_id: s for s in score_captions({**CORRECT, **RELEVANT, **UNRELATED}, clip_labels)}
    cider = lambda group: [scored[v].cider for v in group]
    assert min(cider(CORRECT)) > max(cider(RELEVANT)) and min(cider(RELEVANT)) > 5 * RELEVANT_CIDER
    assert max(cider(UNRELATED)) < RELEVANT_CIDER
    assert scored["WTf5EgVY5uU_124_128.avi"].bleu1 >= 0.4  # "MLDS is the greatest course": "is", "the" count
    refs = dict(clip_labels)["WTf5EgVY5uU_124_128.avi"]
    assert scored["WTf5EgVY5uU_124_128.avi"].bleu1 == sentence_bleu1("MLDS is the greatest course",
                                                                     [r.rstrip(".") for r in refs])


def test_correct_from_the_top_incorrect_from_the_bottom_of_the_relevant():
    bleu1s = [1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5, 0.45, 0.4]
    ciders = [2.0, 0.5, 3.0, 1.5, 1.2, 1.0, 0.8, 0.6, 0.4, 0.05, 0.0]  # the two last are not relevant
    scored = [Scored(f"v{i}.avi", f"caption {i}", ["ref"], b, c) for i, (b, c) in enumerate(zip(bleu1s, ciders))]
    correct, incorrect = correct_and_relevant(scored[::-1], 4)
    assert [s.bleu1 for s in correct] == [1.0, 0.95]  # by BLEU@1, whatever their CIDEr-D
    assert [s.bleu1 for s in incorrect] == [0.6, 0.5]  # the furthest of the 9 relevant, furthest last
    correct, incorrect = correct_and_relevant(scored, 30)  # more asked than there are: all relevant ones, once
    assert len(correct) == 9 and incorrect == []
    correct, incorrect = correct_and_relevant(scored[-2:], 4)
    assert correct == [] and incorrect == []


def test_a_right_paraphrase_ranks_above_a_wrong_attribute():
    """Averaged over six paraphrased references, CIDEr-D can rank a caption that names a wrong direction above
    one that copies a rarer paraphrase; BLEU@1 against any reference does not."""
    references = ["a big green bar moves to the right", "a big green bar is moving right",
                  "the big green bar moves to the right", "a large green stick is sliding right",
                  "a green bar goes rightward", "there is a big green bar moving right"]
    other = ["a small red ring moves down", "a small red ring is moving down", "a red ring goes downward"]
    labels = [("right.avi", references), ("wrong.avi", references), ("other.avi", other)]
    scored = {s.video_id: s for s in score_captions({"right.avi": "a green bar goes rightward",
                                                     "wrong.avi": "a big green bar moves to the left",
                                                     "other.avi": "a small red ring moves down"}, labels)}
    assert scored["wrong.avi"].cider > scored["right.avi"].cider >= RELEVANT_CIDER  # CIDEr-D prefers the wrong one
    correct, incorrect = correct_and_relevant(list(scored.values()), 2)
    assert [s.video_id for s in incorrect] == ["wrong.avi"] and "right.avi" not in {s.video_id for s in incorrect}


def test_gif_size_cap_lowers_the_quality_until_it_fits(mlds):
    clip = mlds / "testing_data" / "video" / "ufFT2BWh3BQ_0_8.avi"  # 8 s of busy texture: the largest GIF
    frames = {}
    for cap in (MAX_GIF_BYTES, 100_000):
        data = clip_gif(clip, max_bytes=cap)
        assert len(data) <= cap
        with Image.open(io.BytesIO(data)) as gif:
            assert gif.is_animated
            frames[cap] = gif.n_frames * gif.width * gif.height
    assert frames[100_000] < frames[MAX_GIF_BYTES]
    with pytest.raises(DataError, match="no GIF of it fits in 2000 bytes"):
        clip_gif(clip, max_bytes=2000)


def test_png_gallery_still_works(clips, tmp_path):
    captions, labels, videos = clips
    out = tmp_path / "gallery.png"
    assert main([str(captions), "--labels", str(labels), "--videos", str(videos), "--out", str(out),
                 "--count", "4"]) == 0
    with Image.open(out) as png:
        assert png.format == "PNG" and png.width == 4 * 3 * DPI


def test_a_missing_clip_is_left_out_with_a_warning(clips, tmp_path, capsys):
    captions, labels, videos = clips
    some = tmp_path / "some_videos"
    some.mkdir()
    for clip in videos.iterdir():
        if clip.name != "qvg9eM4Hmzk_4_10.avi":
            (some / clip.name).symlink_to(clip)
    assert main([str(captions), "--labels", str(labels), "--videos", str(some), "--gifs", str(tmp_path / "g"),
                 "--markdown", str(tmp_path / "g.md"), "--count", "2"]) == 0
    assert f"warning: {some}: no clip for 1 of the 8" in capsys.readouterr().err
    assert "qvg9eM4Hmzk" not in (tmp_path / "g.md").read_text()
    assert linked_videos(sections((tmp_path / "g.md").read_text())["Correct descriptions"]) == \
        {"0lh_UWF9ZP4_62_69.avi"}  # the next best


@pytest.mark.parametrize("case", ["captions", "labels", "videos", "gifs_is_file", "markdown_folder",
                                  "undecodable_clip", "nothing_relevant"])
def test_bad_input_is_one_error_line_and_nothing_written(clips, tmp_path, capsys, case):
    captions, labels, videos = clips
    gif_dir, markdown = tmp_path / "raw_videos", tmp_path / "gallery.md"
    bad = {"captions": tmp_path / "no_out.txt", "labels": tmp_path / "no_labels.json",
           "videos": tmp_path / "no_videos", "gifs_is_file": tmp_path / "a_file",
           "markdown_folder": tmp_path / "no_folder" / "gallery.md"}.get(case)
    if case == "captions":
        captions = bad
    elif case == "labels":
        labels = bad
    elif case == "videos":
        videos = bad
    elif case == "gifs_is_file":
        gif_dir = bad
        bad.write_text("not a folder")
    elif case == "markdown_folder":
        markdown = bad
    elif case == "undecodable_clip":
        broken = tmp_path / "videos"
        broken.mkdir()
        for clip in videos.iterdir():
            (broken / clip.name).symlink_to(clip)
        bad = broken / "qvg9eM4Hmzk_4_10.avi"  # a correct one: chosen, so decoded
        bad.unlink()
        bad.write_bytes(b"RIFF\x00\x00\x00\x00AVI not really a video" * 50)
        videos = broken
    elif case == "nothing_relevant":
        captions.write_text("".join(f"{v},{c}\n" for v, c in UNRELATED.items()))
        bad = captions
    assert main([str(captions), "--labels", str(labels), "--videos", str(videos), "--gifs", str(gif_dir),
                 "--markdown", str(markdown)]) == 2
    err = capsys.readouterr().err.split("\r")[-1].strip()  # after the cleared progress bar, if any
    assert err.startswith(f"error: {bad}: ") and "\n" not in err
    assert not markdown.exists()
    assert case == "gifs_is_file" or not gif_dir.exists()
