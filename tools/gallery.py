"""Galleries of test clips with their generated captions: a PNG grid, or animated GIFs with a Markdown table.

    python -m tools.gallery OUT_FILE --labels testing_label.json --videos VIDEO_DIR [--out gallery.png] [--count 8]
    python -m tools.gallery OUT_FILE --labels testing_label.json --videos VIDEO_DIR --gifs raw_videos/
                           [--markdown FILE] [--count 8]

OUT_FILE is infer.py's output (`video_id,caption` lines). Shown are the captioned videos that have references in
the labels file and a clip in VIDEO_DIR; captioned, labelled videos without a clip are left out with one warning.

PNG (the default, --out): the middle frame of each clip with its caption and the closest reference; the first
half of the tiles are the best captions by MLDS BLEU@1, the rest the worst.

GIFs (--gifs DIR): one animated GIF per chosen clip in DIR, named after the video (`<id without .avi>.gif`), at
most 300 KB and 160 px wide: 8 fps and 64 colours, or fewer frames, colours and pixels where a clip needs it to
fit (GIF_STEPS). Then a Markdown table in the two sections of the course repository's README: "Correct
descriptions", the (--count + 1) // 2 captions closest to their references by MLDS BLEU@1, and "Relevant but
incorrect descriptions", the --count // 2 furthest. Both groups hold only relevant captions: per-video CIDEr-D
(pycocoevalcap, util.evaluate's fallback tokenizer, document frequencies over the references of all captioned,
labelled videos) of at least RELEVANT_CIDER. CIDEr-D weighs n-grams by how rare they are across videos, so a
caption that only shares "a", "is", "the" with the references scores about 0, where MLDS BLEU@1 gives it 0.4
(tests/test_gallery.py). The groups are ranks, not verdicts: look at the GIFs before publishing the table.
The Markdown goes to stdout, its links relative to the current folder (run from the repository root, they work in
its README), with the summary line on stderr; or with --markdown FILE to FILE, links relative to FILE's folder,
summary on stdout. Every GIF is made in memory before anything is written, each file is written atomically, and
a bad input (missing file or folder, an undecodable clip, --gifs naming a file) is one `error:` line, exit 2.
"""
import argparse
import io
import os
import re
import sys
import warnings
from collections import namedtuple
from pathlib import Path
from urllib.parse import quote

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from util.atomic import atomic_path, write_text_atomic
from util.bleu import read_captions, sentence_bleu1
from util.data import load_labels, warnings_as_lines
from util.errors import DataError, command
from util.evaluate import fallback_tokenize
from util.plots import caption_grid

MAX_GIF_BYTES = 300_000
# (fps, colours, width px), tried in order until the GIF fits: colours go first, then smoothness, then size
GIF_STEPS = ((8, 64, 160), (8, 32, 160), (6, 32, 160), (4, 32, 160), (4, 32, 120), (3, 32, 120), (2, 16, 120),
             (2, 16, 96))
PALETTE_FRAMES = 8
ASSUMED_FPS = 25.0
RELEVANT_CIDER = 0.1  # captions sharing only function words with the references score below 0.01
SECTIONS = ("Correct descriptions", "Relevant but incorrect descriptions")
COLUMNS = 4

Scored = namedtuple("Scored", "video_id caption references bleu1 cider")


def fit_width(frame, width):
    """The frame scaled down to `width` px, keeping its aspect ratio; a narrower frame is left as it is."""
    height, current = frame.shape[:2]
    if current <= width:
        return frame
    return cv2.resize(frame, (width, max(1, round(height * width / current))), interpolation=cv2.INTER_AREA)


def decode_clip(path, width=None, fps=None):
    """(RGB frames, length in seconds) of a clip: at most `fps` frames a second if given, each at most `width` px
    wide if given. The frame rate comes from the container (ASSUMED_FPS where it gives none)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: clip not found")
    capture = cv2.VideoCapture(str(path))
    frames, index = [], 0
    try:
        if not capture.isOpened():
            raise DataError(f"{path}: not a video OpenCV can open")
        rate = capture.get(cv2.CAP_PROP_FPS)
        rate = rate if 0 < rate < 1000 else ASSUMED_FPS  # also catches NaN
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            if fps is None or index / rate >= len(frames) / fps:
                frames.append(cv2.cvtColor(fit_width(frame, width) if width else frame, cv2.COLOR_BGR2RGB))
            index += 1
    except cv2.error as error:
        raise DataError(f"{path}: cannot be decoded ({str(error).strip().splitlines()[-1]})") from None
    finally:
        capture.release()
    if not frames:
        raise DataError(f"{path}: no decodable frames")
    return frames, index / rate


def middle_frame(path):
    frames, _ = decode_clip(path)
    return frames[len(frames) // 2]


def spread(items, count):
    """`count` items evenly spaced over `items`, first and last included."""
    return [items[i] for i in np.linspace(0, len(items) - 1, min(count, len(items))).round().astype(int)]


def encode_gif(frames, seconds, fps, colours):
    """A looping GIF (bytes) of RGB `frames` lasting `seconds`, resampled to `fps`, on one palette of `colours`."""
    picked = spread(frames, max(2, round(seconds * fps)))
    # One palette for all frames and no dithering: unchanged areas stay identical, which GIF stores cheaply.
    palette = Image.fromarray(np.concatenate(spread(frames, PALETTE_FRAMES))).quantize(colours)
    images = [Image.fromarray(frame).quantize(palette=palette, dither=Image.Dither.NONE) for frame in picked]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], loop=0, optimize=True,
                   duration=round(1000 * seconds / len(images)))
    return buffer.getvalue()


def clip_gif(path, max_bytes=MAX_GIF_BYTES):
    """An animated GIF (bytes) of the clip at `path`, from the first of GIF_STEPS that fits in max_bytes."""
    frames, seconds = decode_clip(path, width=GIF_STEPS[0][2], fps=GIF_STEPS[0][0])
    for fps, colours, width in GIF_STEPS:
        frames = [fit_width(frame, width) for frame in frames]
        data = encode_gif(frames, seconds, fps, colours)
        if len(data) <= max_bytes:
            return data
    raise DataError(f"{path}: no GIF of it fits in {max_bytes} bytes ({len(data)} bytes at {fps} fps, {colours} "
                    f"colours, {width} px wide; {seconds:.0f} s long)")


def score_captions(captions, labels):
    """A Scored record (MLDS BLEU@1, CIDEr-D) for each labelled video that has a caption, in the labels' order."""
    from pycocoevalcap.cider.cider import Cider

    references = {v: refs for v, refs in labels if v in captions}
    if not references:
        return []
    candidate_tokens = {v: [fallback_tokenize(captions[v])] for v in references}
    reference_tokens = {v: [fallback_tokenize(r) for r in refs] for v, refs in references.items()}
    ciders = Cider().compute_score(reference_tokens, candidate_tokens)[1]  # per video, in the dicts' order
    return [Scored(v, captions[v], refs, sentence_bleu1(captions[v], [r.rstrip(".") for r in refs]), float(cider))
            for (v, refs), cider in zip(references.items(), ciders)]


def closest_reference(scored):
    return max(scored.references, key=lambda r: sentence_bleu1(scored.caption, [r.rstrip(".")]))


def best_and_worst(scored, count):
    """The count // 2 best captions by MLDS BLEU@1, then the count - count // 2 worst (the PNG gallery)."""
    ranked = sorted(scored, key=lambda s: (-s.bleu1, s.video_id))
    best = ranked[:count // 2]
    return best + [s for s in ranked[max(0, len(ranked) - (count - count // 2)):] if s not in best]


def correct_and_relevant(scored, count):
    """(correct, relevant but incorrect): of the captions that share content with their references (CIDEr-D at
    least RELEVANT_CIDER), the (count + 1) // 2 closest to their references by MLDS BLEU@1 (CIDEr-D breaking ties),
    then the count // 2 furthest of the rest, furthest last. BLEU@1 ranks a caption by the words it gets right
    against any reference, where CIDEr-D, averaged over the references, also ranks which paraphrase it chose."""
    ranked = sorted((s for s in scored if s.cider >= RELEVANT_CIDER), key=lambda s: (-s.bleu1, -s.cider, s.video_id))
    correct, rest = ranked[:(count + 1) // 2], ranked[(count + 1) // 2:]
    return correct, rest[max(0, len(rest) - count // 2):]


def gallery_candidates(captions_path, labels_path, video_dir):
    """The Scored captioned, labelled videos whose clip is in video_dir (the others are left out with a warning)."""
    captions = read_captions(captions_path)
    labels = load_labels(labels_path)
    video_dir = Path(video_dir)
    if not video_dir.is_dir():
        raise DataError(f"{video_dir}: video folder not found")
    scored = score_captions(captions, labels)
    if not scored:
        raise DataError(f"{captions_path}: none of its videos is in {labels_path}")
    present = [s for s in scored if (video_dir / s.video_id).is_file()]
    missing = [s.video_id for s in scored if s not in present]
    if not present:
        raise DataError(f"{video_dir}: no clip of any of the {len(scored)} captioned, labelled videos "
                        f"(e.g. {missing[0]})")
    if missing:
        warnings.warn(f"{video_dir}: no clip for {len(missing)} of the {len(scored)} captioned, labelled videos "
                      f"(e.g. {missing[0]}); they are left out")
    return present


def escape_markdown(text):
    return re.sub(r"([\\`*_\[\]<>|#])", r"\\\1", " ".join(text.split()))


def markdown_tables(groups):
    """Markdown for [(section title, [(GIF link, video id, caption, reference), ...]), ...]: per section a heading
    and a table of COLUMNS clips a row, each GIF above its caption and the closest reference."""
    lines = []
    for title, cells in groups:
        lines += [f"### {title}", ""]
        if not cells:
            lines += ["_No caption in this group._", ""]
            continue
        columns = min(COLUMNS, len(cells))
        for start in range(0, len(cells), columns):
            row = cells[start:start + columns]
            padding = [""] * (columns - len(row))
            lines.append("| " + " | ".join([f"![{escape_markdown(v)}]({link})" for link, v, _, _ in row] + padding)
                         + " |")
            if start == 0:
                lines.append("|" + " :---: |" * columns)
            lines.append("| " + " | ".join([f"{escape_markdown(c)}<br><sub>reference: {escape_markdown(r)}</sub>"
                                            for _, _, c, r in row] + padding) + " |")
        lines.append("")
    return "\n".join(lines)


def gif_name(video_id):
    return Path(video_id).stem + ".gif"


def check_markdown_path(path):
    """Fail before any work where the Markdown could not be written at the end."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a Markdown file")
    if not path.parent.is_dir():
        raise DataError(f"{path}: its folder does not exist")


def write_gif_gallery(groups, video_dir, gif_dir, link_base):
    """Write the GIFs of the clips in groups (correct, relevant but incorrect) into gif_dir; return (Markdown
    linking them from the folder link_base, summary line)."""
    gif_dir = Path(gif_dir)
    if gif_dir.exists() and not gif_dir.is_dir():
        raise DataError(f"{gif_dir}: not a folder")
    chosen = [s for group in groups for s in group]
    with tqdm(chosen, desc="GIFs", unit="clip", leave=False) as bar:  # closed before an error line is printed
        gifs = {s.video_id: clip_gif(Path(video_dir) / s.video_id) for s in bar}
    try:
        gif_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"{gif_dir}: cannot create the folder ({error.strerror or error})") from None
    for video_id, data in gifs.items():
        with atomic_path(gif_dir / gif_name(video_id)) as tmp:
            tmp.write_bytes(data)
    link = lambda v: quote(Path(os.path.relpath((gif_dir / gif_name(v)).absolute(), Path(link_base).absolute()))
                           .as_posix())
    markdown = markdown_tables([(title, [(link(s.video_id), s.video_id, s.caption, closest_reference(s))
                                         for s in group]) for title, group in zip(SECTIONS, groups)])
    sizes = [len(data) for data in gifs.values()]
    summary = (f"{len(gifs)} GIFs in {gif_dir} ({sum(sizes) / 1000:.0f} KB in all, largest {max(sizes) / 1000:.0f}"
               f" KB): {len(groups[0])} correct, {len(groups[1])} relevant but incorrect")
    return markdown, summary


@command
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("captions", metavar="OUT_FILE", help="infer.py's output: 'video_id,caption' lines")
    parser.add_argument("--labels", required=True, help="labels JSON with the reference captions")
    parser.add_argument("--videos", required=True, help="folder holding the clips")
    parser.add_argument("--out", help="PNG grid of middle frames (the default gallery; default gallery.png)")
    parser.add_argument("--gifs", metavar="DIR", help="instead: animated GIFs into DIR and a Markdown table of them")
    parser.add_argument("--markdown", metavar="FILE",
                        help="with --gifs: write the Markdown to FILE (links relative to its folder), not stdout")
    parser.add_argument("--count", type=int, default=8,
                        help="clips in all: PNG half best, half worst; GIFs half correct, half relevant but incorrect")
    args = parser.parse_args(argv)
    if args.count <= 0:
        parser.error("--count must be positive")
    if args.gifs and args.out:
        parser.error("--out (a PNG grid) and --gifs (GIFs and Markdown) are two galleries: give one")
    if args.markdown and not args.gifs:
        parser.error("--markdown goes with --gifs")
    with warnings_as_lines():
        if args.markdown:
            check_markdown_path(args.markdown)
        scored = gallery_candidates(args.captions, args.labels, args.videos)
        if args.gifs:
            groups = correct_and_relevant(scored, args.count)
            if not any(groups):
                raise DataError(f"{args.captions}: no caption of a clip in {args.videos} scores CIDEr-D "
                                f"{RELEVANT_CIDER} or more: nothing to show")
            link_base = Path(args.markdown).parent if args.markdown else Path.cwd()
            markdown, summary = write_gif_gallery(groups, args.videos, args.gifs, link_base)
            if args.markdown:
                write_text_atomic(args.markdown, markdown)
                summary += f"; Markdown in {args.markdown}"
            else:
                print(markdown)
        else:
            out = args.out or "gallery.png"
            items = [(middle_frame(Path(args.videos) / s.video_id), s.caption, closest_reference(s))
                     for s in best_and_worst(scored, args.count)]
            caption_grid(items, out)
            summary = f"gallery of {len(items)} clips in {out}"
    print(summary, file=sys.stderr if args.gifs and not args.markdown else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
