"""The MLDS 2018 HW2 course metric: BLEU@1 per video against all its references, averaged over videos.

    python -m util.bleu OUT_FILE --labels testing_label.json     (last line printed: the score)

Matches the course scorer: references lose their trailing '.', unigrams are lowercased, candidate counts are
clipped by the largest count in any one reference, and the brevity penalty uses the reference length closest
to the candidate's (a tie goes to the earlier reference). An empty caption scores 0.
"""
import argparse
import math
import sys
from collections import Counter
from pathlib import Path

from util.data import load_labels
from util.errors import DataError, command


def sentence_bleu1(candidate, references):
    words = candidate.strip().split()
    if not words:
        return 0.0
    candidate_counts = Counter(w.lower() for w in words)
    reference_words = [r.strip().split() for r in references]
    reference_counts = [Counter(w.lower() for w in r) for r in reference_words]
    clipped = sum(min(n, max(rc.get(w, 0) for rc in reference_counts)) for w, n in candidate_counts.items())
    precision = clipped / len(words)
    closest = min((len(r) for r in reference_words), key=lambda length: abs(length - len(words)))
    brevity = 1.0 if len(words) > closest else math.exp(1 - closest / len(words))
    return precision * brevity


def corpus_bleu1(captions, references):
    """captions {video_id: caption}; references {video_id: [caption, ...]}: mean over the referenced videos."""
    missing = [video_id for video_id in references if video_id not in captions]
    if missing:
        raise KeyError(f"no caption for {len(missing)} labelled videos, e.g. {missing[0]}")
    scores = [sentence_bleu1(captions[v], [r.rstrip(".") for r in refs]) for v, refs in references.items()]
    return sum(scores) / len(scores)


def read_captions(path):
    """{video_id: caption} from `id,caption` lines (the caption may itself hold commas)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: captions file not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    captions = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if "," not in line:
            raise DataError(f"{path}: line {n} is not 'video_id,caption'")
        video_id, caption = line.rstrip().split(",", 1)
        captions[video_id.strip()] = caption
    return captions


@command
def main(argv=None):
    parser = argparse.ArgumentParser(description="MLDS course BLEU@1 of a captions file")
    parser.add_argument("captions", help="file of 'video_id,caption' lines")
    parser.add_argument("--labels", required=True, help="labels JSON, e.g. testing_label.json")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    references = dict(load_labels(args.labels))
    captions = read_captions(args.captions)
    try:
        score = corpus_bleu1(captions, references)
    except KeyError as error:
        raise DataError(f"{args.captions}: {error}") from error
    print(f"videos: {len(references)}")
    print(f"Average bleu score is {score}")
    print(score)
    return 0


if __name__ == "__main__":
    sys.exit(main())
