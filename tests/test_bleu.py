import math

import pytest

from util.bleu import corpus_bleu1, main, read_captions, sentence_bleu1
from util.data import load_labels


def test_course_value_on_the_sample_answer(mlds, capsys):
    assert main([str(mlds / "sample_output_testset.txt"), "--labels", str(mlds / "testing_label.json")]) == 0
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert float(last_line) == pytest.approx(0.3661438826404313, abs=1e-9)


def test_library_value_on_the_sample_answer(mlds):
    references = dict(load_labels(mlds / "testing_label.json"))
    captions = read_captions(mlds / "sample_output_testset.txt")
    assert corpus_bleu1(captions, references) == pytest.approx(0.3661438826404313, abs=1e-9)


def test_exact_match_scores_one_and_empty_scores_zero():
    assert sentence_bleu1("a man is cooking", ["a man is cooking", "someone cooks"]) == 1.0
    assert sentence_bleu1("", ["a man is cooking"]) == 0.0
    assert sentence_bleu1("   ", ["a man is cooking"]) == 0.0


def test_counts_are_clipped_and_lowercased():
    # "the" appears twice in the candidate but at most once in any reference: clipped to 1 of 4 matched words
    assert sentence_bleu1("The the cat sat", ["the cat sat", "a dog"]) == pytest.approx(3 / 4)


def test_brevity_penalty_uses_the_closest_reference_and_the_earlier_on_a_tie():
    # candidate length 2; references of length 1 and 3 are equally close: the earlier (length 1) wins -> no penalty
    assert sentence_bleu1("a cat", ["cat", "a cat sat"]) == pytest.approx(1.0)
    # the other order: length 3 wins -> penalty exp(1 - 3/2)
    assert sentence_bleu1("a cat", ["a cat sat", "cat"]) == pytest.approx(math.exp(1 - 3 / 2))


def test_trailing_dots_of_references_are_stripped():
    assert corpus_bleu1({"v": "a cat sat"}, {"v": ["a cat sat."]}) == 1.0


def test_a_missing_video_is_an_error(tmp_path, capsys):
    labels = tmp_path / "labels.json"
    labels.write_text('[{"caption": ["a cat"], "id": "v1"}, {"caption": ["a dog"], "id": "v2"}]')
    out = tmp_path / "out.txt"
    out.write_text("v1,a cat\n")
    assert main([str(out), "--labels", str(labels)]) == 2
    assert "v2" in capsys.readouterr().err
