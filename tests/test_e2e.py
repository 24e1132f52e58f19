"""The whole pipeline on a small demo corpus: clips -> features -> train -> infer, better than a constant caption."""
from collections import Counter

import pytest

import extract_features
import infer
import train
from util.bleu import corpus_bleu1, read_captions
from util.data import load_labels
from util.demo_data import COLOURS, DIRECTIONS, SHAPES, attribute_accuracy, make_corpus, parse_caption


@pytest.fixture(scope="module")
def demo_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    make_corpus(root, train_videos=192, test_seen=8, seed=1, test_unseen=8)
    for split in ("training", "testing"):
        code = extract_features.main([str(root / f"{split}_data" / "video"), str(root / f"{split}_data" / "feat"),
                                      "--frames", "8", "--weights", "none", "--layer", "block3_pool",
                                      "--image-size", "96", "--pool", "max", "--grids", "1,2", "--batch-size", "64"])
        assert code == 0
    return root


def test_demo_corpus_holds_unseen_combinations_and_parseable_captions(demo_corpus):
    splits = {split: load_labels(demo_corpus / f"{split}_label.json") for split in ("training", "testing")}
    triples = {split: [parse_caption(caps[0]) for _, caps in labels] for split, labels in splits.items()}
    for split, labels in splits.items():
        for (video_id, captions), triple in zip(labels, triples[split]):
            assert len(set(captions)) >= 5 and None not in triple
            assert all(parse_caption(c) == triple for c in captions)  # every paraphrase names the same attributes
            assert video_id.endswith("_".join(triple) + ".avi")
            assert (demo_corpus / f"{split}_data" / "video" / video_id).stat().st_size > 0
    unseen = set(triples["testing"]) - set(triples["training"])
    assert len(unseen) == 8 and len(triples["testing"]) == 16
    for k, values in enumerate((COLOURS, SHAPES, DIRECTIONS)):  # each value on its own is still seen in training
        assert {t[k] for t in triples["training"]} == set(values)


def test_trained_demo_model_beats_the_most_frequent_caption(demo_corpus, tmp_path):
    run_dir = tmp_path / "run"
    assert train.main(["--data-dir", str(demo_corpus), "--ckpt-dir", str(run_dir), "--frames", "8",
                       "--hidden", "96", "--batch-size", "32", "--epochs", "10", "--learning-rate", "3e-3",
                       "--dropout", "0.3", "--schedule", "linear", "--teacher-forcing-end", "0.7"]) == 0
    out = tmp_path / "out.txt"
    assert infer.main([str(demo_corpus / "testing_id.txt"), str(out), "--checkpoint", str(run_dir)]) == 0
    labels = load_labels(demo_corpus / "testing_label.json")
    references = dict(labels)
    captions = read_captions(out)
    # baseline: the most frequent training caption, given for every test video
    training = [c for _, caps in load_labels(demo_corpus / "training_label.json") for c in caps]
    constant = Counter(training).most_common(1)[0][0]
    baseline = corpus_bleu1({v: constant for v in references}, references)
    score = corpus_bleu1(captions, references)
    accuracy = attribute_accuracy(captions, labels)
    print(f"demo e2e: BLEU@1 {score:.3f} vs constant-caption baseline {baseline:.3f}; attributes {accuracy}")
    assert score >= baseline + 0.15
    assert accuracy["colour"] >= 0.75  # a constant caption gets 1 colour in 4 right
