"""Caption vocabulary: words seen at least `min_count` times in training, after the 4 special tokens."""
import json
import re
from collections import Counter
from pathlib import Path

from util.atomic import write_text_atomic

SPECIAL_TOKENS = ("<PAD>", "<BOS>", "<EOS>", "<UNK>")
PAD, BOS, EOS, UNK = range(4)
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(caption):
    """Lowercase and drop punctuation: "A man's dog, running." -> ['a', "man's", 'dog', 'running']."""
    return _WORD.findall(caption.lower())


class Vocabulary:
    def __init__(self, words):
        self.words = list(words)
        if tuple(self.words[:4]) != SPECIAL_TOKENS:
            raise ValueError(f"a vocabulary starts with {SPECIAL_TOKENS}")
        self.index = {word: i for i, word in enumerate(self.words)}

    @classmethod
    def build(cls, captions, min_count=3):
        """Words in at least `min_count` occurrences, most frequent first (ties alphabetical)."""
        counts = Counter(word for caption in captions for word in tokenize(caption))
        kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls(SPECIAL_TOKENS + tuple(kept))

    def __len__(self):
        return len(self.words)

    def encode(self, caption, max_len=50):
        """Token ids of a caption, <UNK> for unknown words, cut so that with the closing <EOS> it has max_len."""
        ids = [self.index.get(word, UNK) for word in tokenize(caption)][: max_len - 1]
        return ids + [EOS]

    def decode(self, ids):
        """Ids back to text, stopping at <EOS>, skipping <PAD> and <BOS>."""
        words = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i not in (PAD, BOS):
                words.append(self.words[i] if 0 <= i < len(self.words) else SPECIAL_TOKENS[UNK])
        return " ".join(words)

    def save(self, path):
        write_text_atomic(path, json.dumps(self.words, indent=0))

    @classmethod
    def load(cls, path):
        return cls(json.loads(Path(path).read_text(encoding="utf-8")))
