import json
import shutil

import pytest
from pycocoevalcap.meteor import meteor as meteor_module

from util.errors import DataError
from util.evaluate import evaluate, fallback_tokenize, main

# Punctuation, a contraction and a hyphenated word, so the PTB and fallback tokenizers give different scores.
REFERENCES = {
    "v1.avi": ["A man is slicing a cucumber.", "Someone cuts a cucumber on a cutting-board.", "A man slices a vegetable."],
    "v2.avi": ["A dog is running on the grass.", "The dog runs across a lawn.", "A puppy isn't walking, it's running."],
    "v3.avi": ["Two women are dancing.", "Women dance on a stage.", "Two girls are dancing together."],
    "v4.avi": ["A cat is playing the piano.", "A cat plays a keyboard.", "The cat is pressing piano keys."],
}
CAPTIONS = {"v1.avi": "a man is cutting a cucumber on a cutting-board", "v2.avi": "A dog isn't walking.",
            "v3.avi": "two women are singing", "v4.avi": "a cat is playing a piano", "extra.avi": "not labelled"}

# Computed once with pycocoevalcap 1.2 and OpenJDK 17 on this example:
#   evaluate(CAPTIONS, REFERENCES, use_java=True)    (PTBTokenizer, METEOR 1.5)
#   evaluate(CAPTIONS, REFERENCES, use_java=False)   (fallback tokenizer)
PINNED_PTB = {"mlds_bleu1": 0.7456689431405632, "bleu1": 0.8749999999635417, "bleu2": 0.8100925872638534,
              "bleu3": 0.7173491935027823, "bleu4": 0.5511666900328739, "meteor": 0.3881078501450811,
              "rouge_l": 0.7164355855336485, "cider": 2.470505041622674}
PINNED_FALLBACK = {"mlds_bleu1": 0.7456689431405632, "bleu1": 0.8799999999648, "bleu2": 0.7928249671373586,
                   "bleu3": 0.6929726188125316, "bleu4": 0.5656739975064035, "rouge_l": 0.7232267282803518,
                   "cider": 2.352441355987766}


@pytest.fixture(scope="module")
def ptb_run():
    """The one evaluation with Java (METEOR takes ~10 s to start), and every METEOR object it made."""
    if shutil.which("java") is None:
        pytest.skip("no `java` on PATH: PTBTokenizer and METEOR need it")
    started = []

    class RecordingMeteor(meteor_module.Meteor):
        def __init__(self):
            super().__init__()
            started.append(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(meteor_module, "Meteor", RecordingMeteor)
        scores = evaluate(CAPTIONS, REFERENCES, use_java=True)
    return scores, started


@pytest.fixture
def no_java(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs: None)


def test_pinned_values_with_java(ptb_run):
    scores, _ = ptb_run
    assert scores["tokenizer"] == "ptb"
    assert scores["videos"] == 4  # extra.avi has no references: not scored
    assert scores["meteor_note"] is None
    for key, value in PINNED_PTB.items():
        assert scores[key] == pytest.approx(value, abs=1e-6), key


def test_meteor_starts_once_and_its_java_process_is_stopped(ptb_run):
    _, started = ptb_run
    assert len(started) == 1
    assert started[0].meteor_p.poll() is not None  # exited, not left running until garbage collection


def test_without_java_meteor_is_unavailable_and_the_rest_is_given(no_java):
    scores = evaluate(CAPTIONS, REFERENCES)
    assert scores["tokenizer"] == "fallback"
    assert scores["meteor"] is None
    assert "java" in scores["meteor_note"].lower() and "\n" not in scores["meteor_note"]
    for key, value in PINNED_FALLBACK.items():
        assert scores[key] == pytest.approx(value, abs=1e-6), key


def test_use_java_true_without_java_is_an_error(no_java):
    with pytest.raises(RuntimeError, match="java"):
        evaluate(CAPTIONS, REFERENCES, use_java=True)


def test_identical_captions_score_bleu4_one_and_cider_above_one():
    # several different videos, so CIDEr's document frequencies down-weight the n-grams they share
    references = {"v1": ["a man is slicing a cucumber", "someone cuts a cucumber"],
                  "v2": ["a dog is running on the grass", "the dog runs across a lawn"],
                  "v3": ["two women are dancing on a stage", "women dance together"],
                  "v4": ["a cat is playing the piano", "a cat plays a keyboard"]}
    captions = {video_id: refs[0] for video_id, refs in references.items()}
    scores = evaluate(captions, references, use_java=False)
    assert scores["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert scores["mlds_bleu1"] == pytest.approx(1.0)
    assert scores["rouge_l"] == pytest.approx(1.0)
    assert scores["cider"] > 1.0


def test_fallback_tokenizer_lowercases_and_drops_punctuation():
    assert fallback_tokenize("  A man's Cutting-board, isn't it?") == "a man s cutting board isn t it"


def test_a_labelled_video_without_caption_is_an_error_naming_the_source():
    captions = {video_id: caption for video_id, caption in CAPTIONS.items() if video_id != "v3.avi"}
    with pytest.raises(DataError, match=r"out\.txt: no caption for 1 of the 4 labelled videos, e.g. v3\.avi"):
        evaluate(captions, REFERENCES, use_java=False, source="out.txt")


def write_inputs(folder, captions):
    labels = folder / "labels.json"
    labels.write_text(json.dumps([{"caption": refs, "id": video_id} for video_id, refs in REFERENCES.items()]))
    out = folder / "out.txt"
    out.write_text("".join(f"{video_id},{caption}\n" for video_id, caption in captions.items()))
    return out, labels


def test_cli_prints_a_table_and_writes_json(tmp_path, capsys, no_java):
    out, labels = write_inputs(tmp_path, CAPTIONS)
    assert main([str(out), "--labels", str(labels), "--json", str(tmp_path / "scores.json")]) == 0
    table = capsys.readouterr().out
    assert "tokenizer: fallback" in table and "CIDEr" in table and "METEOR       unavailable" in table
    report = json.loads((tmp_path / "scores.json").read_text())
    assert report["cider"] == pytest.approx(PINNED_FALLBACK["cider"], abs=1e-6)
    assert report["meteor"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.json", "out.txt", "scores.json"]  # no temp left


@pytest.mark.parametrize("problem", ["missing caption", "missing file", "bad labels"])
def test_cli_bad_input_exits_2_with_a_one_line_error(tmp_path, capsys, no_java, problem):
    out, labels = write_inputs(tmp_path, {k: v for k, v in CAPTIONS.items() if k != "v2.avi"})
    if problem == "missing file":
        out = tmp_path / "absent.txt"
    if problem == "bad labels":
        labels.write_text("{not json")
    assert main([str(out), "--labels", str(labels)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert (str(labels) if problem == "bad labels" else str(out)) in err
    if problem == "missing caption":
        assert "v2.avi" in err


def test_course_bleu1_of_the_sample_answer(mlds, tmp_path, no_java):
    report_path = tmp_path / "scores.json"
    assert main([str(mlds / "sample_output_testset.txt"), "--labels", str(mlds / "testing_label.json"),
                 "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["videos"] == 100
    assert report["mlds_bleu1"] == pytest.approx(0.3661438826404313, abs=1e-12)
