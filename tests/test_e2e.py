"""The whole pipeline on a small demo corpus: clips -> features -> train -> infer, better than a constant caption."""
from collections import Counter

import pytest

import extract_features
import infer
import train
from util.bleu import corpus_bleu1, read_captions
from util.data import load_labels
from util.demo_data import attribute_accuracy, make_corpus


@pytest.fixture(scope="module")
def demo_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    make_corpus(root, train_videos=192, test_seen=8, seed=1)
    for split in ("training", "testing"):
        code = extract_features.main([str(root / f"{split}_data" / "video"), str(root / f"{split}_data" / "feat"),
                                      "--frames", "8", "--weights", "none", "--layer", "block3_pool",
                                      "--image-size", "96", "--pool", "max", "--grids", "1,2", "--batch-size", "64"])
        assert code == 0
    return root


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
