"""CIDEr-D (Vedantam et al., CVPR 2015) on token-id sequences, vectorised with numpy: the reward of self-critical
training, computed on the host once per step for every sampled caption.

Each caption is a vector of tf-idf weights over its 1- to 4-grams, g(w) = count(w) * (log(videos) - log(max(1,
df(w)))), with df(w) the number of videos whose references hold w. CIDEr-D_n(c, refs) = 10/|refs| sum_r
exp(-(l_c - l_r)^2 / (2 sigma^2)) sum_w min(g_c(w), g_r(w)) g_r(w) / (|g_c| |g_r|), sigma 6, and CIDEr-D is its mean
over n = 1..4: the same numbers as pycocoevalcap's Cider (its lengths l count bigrams, as here). Sequences are
<PAD>-padded rows; a caption is its ids before the first <PAD>, so an <EOS> it holds is a word of its n-grams and a
caption cut off without one ("a man is a") matches no reference's ending.
"""
import numpy as np

from util.vocab import PAD

MAX_N = 4
SIGMA = 6.0
KEY_BASE = 2 ** 15  # ids below it; 4-grams of such ids fit int64 keys


def ngram_counts(sequences, max_n=MAX_N):
    """The distinct n-grams (n = 1..max_n) of each <PAD>-padded row of sequences (rows, length), as arrays: row,
    n-gram key (the ids + 1 read as digits in base KEY_BASE, so n-grams of different n differ), n (1..max_n) and count.
    Also each row's length in bigrams (words - 1, at least 0)."""
    sequences = np.asarray(sequences, np.int64)
    rows, length = sequences.shape
    words = np.argmax(np.concatenate([sequences, np.full((rows, 1), PAD)], 1) == PAD, axis=1)
    if sequences.max(initial=0) + 1 >= KEY_BASE or max_n > MAX_N:
        raise ValueError(f"ids below {KEY_BASE - 1} and n-grams up to {MAX_N} words fit 64-bit keys")
    row_parts, key_parts, n_parts = [], [], []
    for n in range(1, min(max_n, length) + 1):
        starts = np.arange(length - n + 1)
        keys = sum((sequences[:, starts + i] + 1) * KEY_BASE ** i for i in range(n))  # (rows, length - n + 1)
        valid = starts[None] + n <= words[:, None]
        row_parts.append(np.nonzero(valid)[0])
        key_parts.append(keys[valid])
        n_parts.append(np.full(int(valid.sum()), n))
    row, key, n = (np.concatenate(parts) if parts else np.zeros(0, np.int64)
                   for parts in (row_parts, key_parts, n_parts))
    order = np.lexsort((key, row))
    row, key, n = row[order], key[order], n[order]
    first = np.ones(len(row), bool)
    first[1:] = (row[1:] != row[:-1]) | (key[1:] != key[:-1])
    starts = np.flatnonzero(first)
    counts = np.diff(np.append(starts, len(row)))
    return row[starts], key[starts], n[starts], counts, np.maximum(words - 1, 0)


class CiderD:
    """CIDEr-D against fixed references: references[v] is video v's reference captions, a <PAD>-padded id array
    (captions, length) or a list of id lists. The document frequencies are those references' (computed once, here):
    in training, the training captions'."""

    def __init__(self, references, max_n=MAX_N, sigma=SIGMA):
        self.max_n, self.sigma = max_n, sigma
        refs = [pad_rows(captions) for captions in references]
        width = max(r.shape[1] for r in refs)
        stacked = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]))) for r in refs])
        self.ref_counts = np.array([len(r) for r in refs])
        self.ref_starts = np.concatenate([[0], np.cumsum(self.ref_counts)[:-1]])
        ref_video = np.repeat(np.arange(len(refs)), self.ref_counts)
        ref, key, n, count, self.ref_length = ngram_counts(stacked, max_n)
        self.keys, compact = np.unique(key, return_inverse=True)  # every reference n-gram, sorted
        # df: the videos whose references hold the n-gram
        video_key = np.unique(ref_video[ref].astype(np.int64) * len(self.keys) + compact)
        df = np.bincount(video_key % len(self.keys), minlength=len(self.keys))
        self.log_videos = np.log(float(len(refs)))
        self.idf = self.log_videos - np.log(np.maximum(df, 1.0))
        weight = count * self.idf[compact]
        self.ref_norm = self.norms(ref, n, weight, len(stacked))
        self.table = ref * len(self.keys) + compact  # sorted: rows by reference, then keys
        self.table_weight = weight

    def norms(self, row, n, weight, rows):
        """|g| per row and n: (rows, max_n)."""
        return np.sqrt(np.bincount(row * self.max_n + n - 1, weight ** 2, rows * self.max_n)).reshape(rows,
                                                                                                      self.max_n)

    def __call__(self, candidates, videos):
        """CIDEr-D of each candidate (a <PAD>-padded id array (rows, length)) against the references of its video
        (videos (rows,) indices into references): (rows,) float64."""
        candidates = pad_rows(candidates)
        videos = np.asarray(videos, np.int64)
        row, key, n, count, length = ngram_counts(candidates, self.max_n)
        found = np.searchsorted(self.keys, key)
        found = np.minimum(found, len(self.keys) - 1)
        known = self.keys[found] == key
        # an n-gram no reference holds has df 0: the full weight log(videos), and nothing to match
        weight = count * np.where(known, self.idf[found], self.log_videos)
        norm = self.norms(row, n, weight, len(candidates))
        row, compact, n, weight = row[known], found[known], n[known], weight[known]
        # each known n-gram of a candidate against each reference of its video
        refs_each = self.ref_counts[videos[row]]
        pair_row = np.repeat(np.arange(len(row)), refs_each)
        ref = np.repeat(self.ref_starts[videos[row]] - np.cumsum(refs_each) + refs_each, refs_each) \
            + np.arange(len(pair_row))
        place = np.searchsorted(self.table, ref * len(self.keys) + compact[pair_row])
        place = np.minimum(place, len(self.table) - 1)
        matched = self.table[place] == ref * len(self.keys) + compact[pair_row]
        pair_row, ref, place = pair_row[matched], ref[matched], place[matched]
        candidate, n = row[pair_row], n[pair_row] - 1
        ref_weight = self.table_weight[place]
        denominator = norm[candidate, n] * self.ref_norm[ref, n]
        delta = length[candidate] - self.ref_length[ref]
        similarity = (np.minimum(weight[pair_row], ref_weight) * ref_weight
                      / np.where(denominator > 0, denominator, 1.0)
                      * np.exp(-delta.astype(np.float64) ** 2 / (2 * self.sigma ** 2)))
        summed = np.bincount(candidate, similarity, len(candidates))
        return 10.0 * summed / (self.max_n * self.ref_counts[videos])


def pad_rows(captions):
    """Captions as a <PAD>-padded int64 array (rows, length): an array as it is, a list of id lists padded."""
    if isinstance(captions, np.ndarray):
        return captions.astype(np.int64)
    width = max((len(c) for c in captions), default=0)
    out = np.full((len(captions), max(width, 1)), PAD, np.int64)
    for i, caption in enumerate(captions):
        out[i, :len(caption)] = caption
    return out
