"""Caption vocabulary: words seen at least `min_count` times in training, after the 4 special tokens."""
import json
import math
import re
from collections import Counter
from pathlib import Path

from util.atomic import write_text_atomic

SPECIAL_TOKENS = ("<PAD>", "<BOS>", "<EOS>", "<UNK>")
# a word cannot end a caption when it is the last word of less than this share of its uses in the training
# captions, and a word ending captions as often as words do on average would show so few ends with at most this
# chance: "a", "the", "is", "on", and in MSVD transitive verbs ("slicing")
CANNOT_END_SHARE, CANNOT_END_CHANCE = 0.01, 0.01
PAD, BOS, EOS, UNK = range(4)
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(caption):
    """Lowercase and drop punctuation: "A man's dog, running." -> ['a', "man's", 'dog', 'running']."""
    return _WORD.findall(caption.lower())


def binomial_cdf(k, n, p):
    """P(X <= k) for X ~ Binomial(n, p)."""
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k + 1))


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

    def cannot_end(self, captions):
        """The vocabulary's words that do not end a caption, judged from training captions (CANNOT_END_*): too
        few of their uses are last for chance to explain."""
        seen, last = Counter(), Counter()
        for caption in captions:
            words = tokenize(caption)
            seen.update(words)
            last.update(words[-1:])
        base = sum(last.values()) / max(sum(seen.values()), 1)  # the share of words that end their caption
        return [word for word in self.words[len(SPECIAL_TOKENS):]
                if last[word] < CANNOT_END_SHARE * seen[word]
                and binomial_cdf(last[word], seen[word], base) < CANNOT_END_CHANCE]

    def ids(self, words):
        """The ids of those of words that the vocabulary holds."""
        return tuple(self.index[word] for word in words if word in self.index)

    def save(self, path):
        write_text_atomic(path, json.dumps(self.words, indent=0))

    @classmethod
    def load(cls, path):
        return cls(json.loads(Path(path).read_text(encoding="utf-8")))
