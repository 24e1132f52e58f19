"""A PNG gallery of clips with their predicted and reference captions, like the S2VT paper's tables.

    python -m util.gallery CAPTIONS --labels testing_label.json --videos VIDEO_DIR --out gallery.png [--count 8]

Shows the middle frame of each clip; the first half of the tiles are the best-scoring captions (MLDS BLEU@1),
the rest the worst, so a reader sees both what works and what does not.
"""
import argparse
import sys
from pathlib import Path

import cv2

from util.bleu import read_captions, sentence_bleu1
from util.data import DataError, load_labels
from util.plots import caption_grid


def middle_frame(path):
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    if not frames:
        raise DataError(f"{path}: no decodable frames")
    return frames[len(frames) // 2][..., ::-1]  # BGR -> RGB


def pick_examples(captions, labels, count):
    """(video_id, predicted, best-matching reference) for the count//2 best and the rest worst captions."""
    scored = sorted(((sentence_bleu1(captions[v], [r.rstrip(".") for r in refs]), v, refs)
                     for v, refs in labels if v in captions), key=lambda item: (-item[0], item[1]))
    best, worst = scored[:count // 2], scored[len(scored) - (count - count // 2):]
    chosen = best + [item for item in worst if item not in best]
    closest = lambda predicted, refs: max(refs, key=lambda r: sentence_bleu1(predicted, [r.rstrip(".")]))
    return [(v, captions[v], closest(captions[v], refs)) for _, v, refs in chosen]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("captions", help="file of 'video_id,caption' lines (infer.py's output)")
    parser.add_argument("--labels", required=True, help="labels JSON with the reference captions")
    parser.add_argument("--videos", required=True, help="folder holding the clips")
    parser.add_argument("--out", default="gallery.png")
    parser.add_argument("--count", type=int, default=8, help="tiles: half best, half worst")
    args = parser.parse_args(argv)
    if args.count <= 0:
        parser.error("--count must be positive")
    try:
        examples = pick_examples(read_captions(args.captions), load_labels(args.labels), args.count)
        items = [(middle_frame(Path(args.videos) / v), predicted, reference) for v, predicted, reference in examples]
        caption_grid(items, args.out)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"gallery of {len(items)} clips in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
