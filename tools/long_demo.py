"""A long demo video: demo scenes (tools/demo_data.py's shapes and backgrounds, 4-8 s each) joined with hard cuts.

    python -m tools.long_demo OUT.avi [--scenes 6 | --minutes M] [--seed S]
    python -m tools.long_demo OUT.avi --check CUES.json     # infer.py --segments --json's cues against the scenes

Writes OUT.avi (XVID, FPS frames a second, FRAME_SIZE pixels square; OUT.webm: VP8, which browsers play) and
OUT.avi.json: each scene's start and end in seconds, colour, shape, direction, size and reference captions. Scenes
show only the (colour, shape, direction) combinations the demo's training split holds (split_combinations), so the
shipped s2vt-demo release knows them all, and no two adjacent scenes share a colour. Everything is a function of the
seed.
"""
import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tools.demo_data import FPS, SIZES, captions_for, clip_frames, parse_caption, split_combinations, write_clip
from util.atomic import atomic_path, write_text_atomic
from util.errors import DataError, command

SCENE_SECONDS = (4.0, 8.0)


def plan_scenes(scenes=None, minutes=None, seed=0):
    """[{start, end, frames, colour, shape, direction, size}] for `scenes` scenes, or as many as fill `minutes`."""
    rng = np.random.default_rng(seed)
    seen, _ = split_combinations(0)  # the shipped demo release's training combinations
    plan, at, previous = [], 0, None
    while (len(plan) < scenes) if scenes else (at < minutes * 60 * FPS):
        frames = int(round(rng.uniform(*SCENE_SECONDS) * FPS))
        choices = [t for t in seen if previous is None or t[0] != previous[0]]
        colour, shape, direction = previous = choices[int(rng.integers(len(choices)))]
        size = tuple(SIZES)[int(rng.integers(len(SIZES)))]
        plan.append({"start": at / FPS, "end": (at + frames) / FPS, "frames": frames, "colour": colour,
                     "shape": shape, "direction": direction, "size": size,
                     "captions": captions_for(colour, shape, direction, size)})
        at += frames
    return plan


def make_long_video(path, scenes=None, minutes=None, seed=0):
    """Write the video and its scene list (path + ".json"); returns the scene list."""
    if (scenes is None) == (minutes is None) or (scenes or minutes) <= 0:
        raise DataError("give a positive number of scenes or of minutes, not both")
    plan = plan_scenes(scenes, minutes, seed)
    rng = np.random.default_rng(seed + 1)
    clips = (clip_frames(s["colour"], s["shape"], s["direction"], s["size"], rng, s["frames"])
             for s in tqdm(plan, desc="scenes", unit="scene", leave=False))
    with atomic_path(path) as tmp:
        staged = tmp.with_name(tmp.stem + Path(path).suffix)  # the writer picks the container by the suffix
        try:
            write_clip(staged, itertools.chain.from_iterable(clips), "VP80" if staged.suffix == ".webm" else "XVID")
            staged.replace(tmp)
        finally:
            staged.unlink(missing_ok=True)
    write_text_atomic(f"{path}.json", json.dumps(plan, indent=1))
    return plan


def check_cues(plan, cues, tolerance=0.5):
    """How cues [{start, end, caption}] match the planned scenes: {cues, scenes, cuts_found (a cue boundary within
    `tolerance` s of each planned cut), attributes_right (scenes whose covering cue, at their middle, names their
    colour, shape and direction)}."""
    boundaries = [cue["start"] for cue in cues[1:]]
    cuts = [scene["start"] for scene in plan[1:]]
    found = sum(any(abs(b - cut) <= tolerance for b in boundaries) for cut in cuts)
    right = 0
    for scene in plan:
        middle = (scene["start"] + scene["end"]) / 2
        cue = next((c for c in cues if c["start"] <= middle < c["end"]), None)
        right += cue is not None and parse_caption(cue["caption"]) == (scene["colour"], scene["shape"],
                                                                       scene["direction"])
    return {"cues": len(cues), "scenes": len(plan), "cuts_found": f"{found}/{len(cuts)}",
            "attributes_right": f"{right}/{len(plan)}"}


@command
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the video to write, e.g. long.avi")
    parser.add_argument("--scenes", type=int, help="this many scenes")
    parser.add_argument("--minutes", type=float, help="instead: scenes filling this many minutes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", metavar="CUES_JSON", help="instead: compare infer.py --segments --json's cues with "
                        "OUT.avi.json's scenes")
    args = parser.parse_args(argv)
    if args.check:
        try:
            plan = json.loads(Path(f"{args.out}.json").read_text())
            cues = json.loads(Path(args.check).read_text())["cues"]
        except (OSError, ValueError, KeyError) as error:
            raise DataError(f"{args.out}.json or {args.check}: cannot be read ({error})") from None
        print(", ".join(f"{k} {v}" for k, v in check_cues(plan, cues).items()))
        return 0
    if (args.scenes is None) == (args.minutes is None):
        parser.error("give --scenes N or --minutes M")
    plan = make_long_video(args.out, args.scenes, args.minutes, args.seed)
    print(f"wrote {args.out}: {len(plan)} scenes, {plan[-1]['end']:.1f} s; scene list in {args.out}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
