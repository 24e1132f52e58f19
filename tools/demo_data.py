"""The built-in demo corpus: real .avi clips of coloured shapes moving over varied backgrounds.

`python -m tools.demo_data OUT_DIR [--train N] [--test-seen N] [--test-unseen N] [--seed S]` writes the MLDS HW2-1
layout:
OUT_DIR/{training,testing}_label.json, {training,testing}_id.txt, {training,testing}_data/video/<id>.avi
and {training,testing}_data/id.txt. Everything is a function of the seed.

Captioned attributes: colour, shape, motion direction and size class. Speed, exact size, start position,
background colour, gradient and noise vary but are never captioned. The test split holds every
(colour, shape, direction) combination that training never shows, plus some seen ones.
"""
import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from util.errors import command

COLOURS = {"red": (40, 40, 220), "green": (40, 200, 40), "blue": (220, 90, 30), "yellow": (30, 220, 230)}  # BGR
# Shapes that differ in extent and topology (filled box, hollow ring, thin bar): seeded random VGG features tell
# them apart far better than square/ring/cross or circle/square/triangle (linear probes, docs/demo.md).
SHAPES = ("square", "ring", "bar")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SIZES = {"small": (11, 13), "big": (16, 19)}  # half-width in pixels at FRAME_SIZE
FRAME_SIZE = 96
FRAMES_PER_CLIP = 24
FPS = 12

# Words a caption may use for each attribute value; the first is the plain one.
SHAPE_WORDS = {"square": ("square", "box"), "ring": ("ring", "hoop"), "bar": ("bar", "stick")}
SIZE_WORDS = {"small": ("small", "little"), "big": ("big", "large")}
DIRECTION_PHRASES = {  # (moves ..., is moving ..., goes ...)
    "left": ("to the left", "left", "leftward"),
    "right": ("to the right", "right", "rightward"),
    "up": ("up", "up", "upward"),
    "down": ("down", "down", "downward"),
}
CAPTION_TEMPLATES = (
    "a {size} {colour} {shape} moves {dir_to}",
    "a {size} {colour} {shape} is moving {dir_plain}",
    "the {size} {colour} {shape} moves {dir_to}",
    "a {size2} {colour} {shape2} is sliding {dir_plain}",
    "a {colour} {shape} goes {dir_ward}",
    "there is a {size} {colour} {shape} moving {dir_plain}",
)


def captions_for(colour, shape, direction, size):
    """Paraphrased reference captions for one clip (len(CAPTION_TEMPLATES) of them)."""
    dir_to, dir_plain, dir_ward = DIRECTION_PHRASES[direction]
    words = dict(colour=colour, shape=SHAPE_WORDS[shape][0], shape2=SHAPE_WORDS[shape][1],
                 size=SIZE_WORDS[size][0], size2=SIZE_WORDS[size][1],
                 dir_to=dir_to, dir_plain=dir_plain, dir_ward=dir_ward)
    return [template.format(**words) for template in CAPTION_TEMPLATES]


def parse_caption(caption):
    """Read (colour, shape, direction) back out of a caption; None where a caption names none or several."""
    words = caption.lower().replace(",", " ").split()
    colour = [c for c in COLOURS if c in words]
    shape = [s for s, names in SHAPE_WORDS.items() if any(n in words for n in names)]
    direction = [d for d in DIRECTIONS if any(w.startswith(d) for w in words)]
    direction += ["up"] * ("top" in words) + ["down"] * ("bottom" in words)
    pick = lambda found: found[0] if len(set(found)) == 1 else None
    return pick(colour), pick(shape), pick(direction)


def _background(rng):
    """A low-saturation background: random tint, a linear gradient and pixel noise."""
    base = rng.uniform(70, 190) + rng.uniform(-15, 15, size=3)
    gradient_dir = rng.uniform(-1, 1, size=2)
    yy, xx = np.mgrid[0:FRAME_SIZE, 0:FRAME_SIZE] / FRAME_SIZE - 0.5
    ramp = (gradient_dir[0] * xx + gradient_dir[1] * yy)[..., None] * rng.uniform(20, 60)
    noise = rng.normal(0, rng.uniform(1, 4), size=(FRAME_SIZE, FRAME_SIZE, 3))
    return np.clip(base + ramp + noise, 0, 255).astype(np.uint8)


def _draw(frame, shape, centre, half, colour):
    x, y = int(round(centre[0])), int(round(centre[1]))
    stroke = max(2, half // 3)
    if shape == "square":
        cv2.rectangle(frame, (x - half, y - half), (x + half, y + half), colour, -1, cv2.LINE_AA)
    elif shape == "ring":
        cv2.circle(frame, (x, y), half - stroke // 2, colour, stroke, cv2.LINE_AA)
    else:  # a horizontal bar, 2 strokes thick
        cv2.rectangle(frame, (x - half, y - stroke), (x + half, y + stroke), colour, -1, cv2.LINE_AA)


def clip_frames(colour, shape, direction, size, rng, frames=FRAMES_PER_CLIP):
    """One clip's BGR frames (frames, FRAME_SIZE, FRAME_SIZE, 3) uint8: the object crosses 30-50% of the frame,
    whatever the number of frames (more frames: slower)."""
    half = int(rng.integers(*SIZES[size], endpoint=True))
    travel = rng.uniform(0.30, 0.50) * FRAME_SIZE
    dx, dy = DIRECTIONS[direction]
    margin = half + 2
    start = np.empty(2)
    for axis, step in enumerate((dx, dy)):  # start so the whole path stays inside the frame
        lo, hi = (margin + travel, FRAME_SIZE - margin) if step < 0 else (margin, FRAME_SIZE - margin - travel * abs(step))
        start[axis] = rng.uniform(lo, hi)
    background = _background(rng)
    clip = np.empty((frames, FRAME_SIZE, FRAME_SIZE, 3), np.uint8)
    for t in range(frames):
        centre = start + np.array([dx, dy]) * travel * t / (frames - 1)
        clip[t] = background
        _draw(clip[t], shape, centre, half, COLOURS[colour])
    return clip


def write_clip(path, frames_bgr, fourcc="XVID"):
    """Write BGR frames to `path` at FPS: XVID (in AVI), or e.g. VP80 (in WebM, which browsers play)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), FPS, (FRAME_SIZE, FRAME_SIZE))
    if not writer.isOpened():
        raise RuntimeError(f"{path}: OpenCV cannot write {fourcc} video here")
    for frame in frames_bgr:
        writer.write(frame)
    writer.release()


def render_clip(path, colour, shape, direction, size, rng):
    """Write one demo clip to `path` (XVID in AVI, FRAMES_PER_CLIP frames)."""
    write_clip(path, clip_frames(colour, shape, direction, size, rng))


def split_combinations(seed, held_out=8):
    """Choose `held_out` (colour, shape, direction) triples that training never sees.

    No two held-out triples share a (colour, shape), (colour, direction) or (shape, direction) pair, so every pair
    inside an unseen triple is still seen in training with all but one value of the third attribute. (Holding out
    both "red square left" and "red square right" taught the model that a red thing moving sideways is never a
    square: it named them bars.)"""
    triples = list(itertools.product(COLOURS, SHAPES, DIRECTIONS))
    rng = np.random.default_rng(seed)
    while True:
        picked, pairs = [], set()
        for index in rng.permutation(len(triples)):
            colour, shape, direction = triple = triples[index]
            mine = {("cs", colour, shape), ("cd", colour, direction), ("sd", shape, direction)}
            if not mine & pairs:
                picked.append(triple)
                pairs |= mine
            if len(picked) == held_out:
                seen = [t for t in triples if t not in picked]
                return seen, picked


def make_corpus(out_dir, train_videos=720, test_seen=48, seed=0, test_unseen=16):
    """Write the demo corpus in the MLDS layout under out_dir; returns {split: [label dicts]}.

    The test split holds `test_unseen` clips cycling through the combinations training never shows (at least
    one each) and `test_seen` clips of seen ones, spread over them (each at most once until all have been used)."""
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    seen, unseen = split_combinations(seed)
    if test_unseen < len(unseen):
        raise ValueError(f"test_unseen must be at least {len(unseen)}, one clip per unseen combination")
    order = rng.permutation(len(seen))
    plan = {"training": [seen[i % len(seen)] for i in range(train_videos)],
            "testing": [unseen[i % len(unseen)] for i in range(test_unseen)]
                       + [seen[order[i % len(seen)]] for i in range(test_seen)]}
    labels = {}
    for split, triples in plan.items():
        video_dir = out_dir / f"{split}_data" / "video"
        video_dir.mkdir(parents=True, exist_ok=True)
        entries = []
        for index, (colour, shape, direction) in enumerate(tqdm(triples, desc=f"demo {split} clips", unit="clip")):
            size = ("small", "big")[int(rng.integers(2))]
            video_id = f"demo_{split[:-3]}_{index:04d}_{colour}_{shape}_{direction}.avi"
            render_clip(video_dir / video_id, colour, shape, direction, size, rng)
            entries.append({"caption": captions_for(colour, shape, direction, size), "id": video_id})
        labels[split] = entries
        ids = "".join(e["id"] + "\n" for e in entries)
        for path, text in ((out_dir / f"{split}_label.json", json.dumps(entries, indent=1)),
                           (out_dir / f"{split}_id.txt", ids), (out_dir / f"{split}_data" / "id.txt", ids)):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
    return labels


def attribute_accuracy(captions, labels):
    """Share of videos whose caption names the right colour, shape and direction (each, and all three)."""
    right = {"colour": 0, "shape": 0, "direction": 0, "all": 0}
    for video_id, references in labels:
        truth = parse_caption(references[0])
        guess = parse_caption(captions.get(video_id, ""))
        hits = [g == t for g, t in zip(guess, truth)]
        for name, hit in zip(("colour", "shape", "direction"), hits):
            right[name] += hit
        right["all"] += all(hits)
    return {name: count / len(labels) for name, count in right.items()}


@command
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", help="where to write the corpus")
    parser.add_argument("--train", type=int, default=720, help="training clips (default 720)")
    parser.add_argument("--test-seen", type=int, default=48, help="test clips of seen combinations (default 48)")
    parser.add_argument("--test-unseen", type=int, default=16,
                        help="test clips of the 8 combinations training never shows (default 16, at least 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", metavar="CAPTIONS", help="instead: score a captions file's attributes "
                        "against --labels")
    parser.add_argument("--labels", help="with --check: the demo labels JSON")
    args = parser.parse_args(argv)
    if args.check:
        from util.bleu import read_captions
        from util.data import load_labels

        if not args.labels:
            parser.error("--check needs --labels")
        accuracy = attribute_accuracy(read_captions(args.check), load_labels(args.labels))
        print("attributes right: " + ", ".join(f"{k} {v:.1%}" for k, v in accuracy.items()))
        return 0
    if not args.out_dir:
        parser.error("give OUT_DIR, or --check CAPTIONS --labels LABELS")
    labels = make_corpus(args.out_dir, args.train, args.test_seen, args.seed, args.test_unseen)
    print(f"demo corpus: {len(labels['training'])} training and {len(labels['testing'])} test clips in {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
