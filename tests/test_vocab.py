from collections import Counter

from util.data import load_labels
from util.vocab import BOS, EOS, PAD, SPECIAL_TOKENS, UNK, Vocabulary, tokenize


def test_tokenize_lowercases_and_strips_punctuation():
    assert tokenize("A man's dog, RUNNING fast!") == ["a", "man's", "dog", "running", "fast"]


def test_vocabulary_from_the_real_training_labels(mlds, tmp_path):
    captions = [c for _, caps in load_labels(mlds / "training_label.json") for c in caps]
    assert len(captions) == 24232
    vocab = Vocabulary.build(captions, min_count=3)
    assert vocab.words[:4] == list(SPECIAL_TOKENS) and (PAD, BOS, EOS, UNK) == (0, 1, 2, 3)
    counts = Counter(w for c in captions for w in tokenize(c))
    kept = set(vocab.words[4:])
    assert all(counts[w] >= 3 for w in kept)
    assert {w for w, n in counts.items() if n >= 3} == kept
    assert len(vocab) == 2891  # measured on the MLDS training labels (see README)
    vocab.save(tmp_path / "vocab.json")
    assert Vocabulary.load(tmp_path / "vocab.json").words == vocab.words


def test_encode_caps_length_and_ends_with_eos():
    vocab = Vocabulary.build(["a cat sat"] * 3)
    assert vocab.encode("A cat sat on the mat") == [vocab.index["a"], vocab.index["cat"], vocab.index["sat"],
                                                     UNK, UNK, UNK, EOS]
    long_ids = vocab.encode(" ".join(["cat"] * 80), max_len=50)
    assert len(long_ids) == 50 and long_ids[-1] == EOS
    assert vocab.decode(long_ids) == " ".join(["cat"] * 49)
    assert vocab.decode([BOS, vocab.index["cat"], EOS, vocab.index["sat"]]) == "cat"
