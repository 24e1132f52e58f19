"""Standard benchmarks (MSVD, MSR-VTT, VATEX) in the MLDS layout, with their published splits.

    python -m tools.datasets prepare msvd|msrvtt|vatex OUT_DIR --annotations DIR [--videos DIR ...] [--copy]

Reads the annotation files as they are distributed (under their distributed names in --annotations DIR) and
writes the MLDS layout extended with a validation split:

    OUT_DIR/{training,validation,testing}_label.json   [{"caption": [...], "id": "<clip file name>"}, ...]
    OUT_DIR/{training,validation,testing}_id.txt and OUT_DIR/<split>_data/id.txt   the same ids, one a line
    OUT_DIR/<split>_data/video/<clip>   symbolic links to the user's clips (--copy: copies; links cost nothing
                                        for many GB of clips, copies survive moving OUT_DIR or the clips)
    OUT_DIR/missing_clips.txt   `split<TAB>clip` for each clip of the annotations not found in --videos
    OUT_DIR/dataset.json   which data set, from which files; marks the folder as made by `prepare`

Captions are stripped; empty ones and exact duplicates within a video are dropped; a video left without captions
is dropped from its split. With --videos only the clips found there are kept (a split left empty is an error);
without it every clip of the annotations is listed and no clip is checked (for features obtained elsewhere).
All input is read and checked before anything is written, and every file is written whole (util.atomic).

No clip is lost, whoever put it there. A --videos folder inside OUT_DIR (its path resolved through links) is
refused, as is a clip of --videos that resolves into OUT_DIR: linking OUT_DIR's clips to themselves would delete
them. A re-run replaces the links in <split>_data/video; a real file there (an earlier --copy, or put there by
hand) it replaces only with the same bytes (same size and sha256, e.g. --copy again from the same clips) and
otherwise refuses, naming the folder and the file: move it away, or prepare into another folder. A re-run without
--videos keeps the video folders as they are and says how many clips they hold. A refusal is one error line;
nothing is written or removed. A run's clips are placed in a work folder beside <split>_data/video and swapped in;
the work folder of a run that was killed (ours by name and by the marker inside, its process ended) is settled when
the next run starts: the earlier clips go back if the new ones never arrived, and the rest is removed.
"""
import argparse
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from util.atomic import atomic_path, left_by_dead_process, owner_tag
from util.data import read_json, sha256_of
from util.errors import DataError, command

SPLITS = ("training", "validation", "testing")
RECORD = "dataset.json"
MISSING = "missing_clips.txt"
MADE_BY = "python -m tools.datasets prepare"
# the same command before it moved from util/ to tools/: a folder it prepared is still ours to update
MADE_BY_NAMES = (MADE_BY, MADE_BY.replace("tools.", "util."))
# what `prepare` writes besides RECORD: a folder holding any of these without RECORD was made by someone else
OUTPUTS = tuple(name for split in SPLITS for name in (f"{split}_label.json", f"{split}_id.txt", f"{split}_data")) \
    + (MISSING,)

# <split>_data/.video.<owner tag>.work/: a run's clips are placed in work/video, the earlier folder moved to work/old
WORK_SUFFIX, WORK_MARKER, WORK_MARK = ".work", "made-by", f"{MADE_BY}: a run's clip folder, being swapped in\n"
_WORK = re.compile(r"\.video\.(s2vt-[0-9a-f]{8}-\d+)\.work")

MSVD_COLUMNS = ("VideoID", "Start", "End", "WorkerID", "Source", "AnnotationTime", "Language", "Description")
MSVD_USED_COLUMNS = ("VideoID", "Start", "End", "Language", "Description")
# youtube_mapping.txt numbers the 1970 clips vid1..vid1970; the published split cuts that order here
MSVD_SPLIT_ENDS = (("training", 1200), ("validation", 1300), ("testing", 1970))
MSVD_MAPPING_LINE = re.compile(r"(\S+_\d+_\d+)\s+vid(\d+)")
MSVD_TIME = re.compile(r"\d+(?:\.0*)?")  # seconds, an integer; "5.0" is taken as 5
MSRVTT_SPLITS = {"train": "training", "validate": "validation", "test": "testing"}


@dataclass
class Annotations:
    """A data set as read: per split, (clip file name, captions as given) in the published order."""
    splits: dict
    notes: list = field(default_factory=list)  # one-line remarks for the summary


def read_msvd(files):
    """MSVD: English rows of the corpus CSV, split by the vid<N> order of youtube_mapping.txt (1200/100/670)."""
    import pandas as pd

    corpus, mapping = files["corpus"], files["mapping"]
    try:  # every column as text: no NaN for an empty description, no float for a start time
        table = pd.read_csv(corpus, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"{corpus}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise DataError(f"{corpus}: not a readable CSV file ({' '.join(str(error).split())})") from None
    absent = [c for c in MSVD_USED_COLUMNS if c not in table.columns]
    if absent:
        raise DataError(f"{corpus}: no column {', '.join(absent)} (expected the columns {', '.join(MSVD_COLUMNS)})")
    english = table[table["Language"].str.strip() == "English"]
    captions = {}
    for row, (video, start, end, text) in zip(english.index, english[["VideoID", "Start", "End", "Description"]]
                                              .itertuples(index=False, name=None)):
        start, end = start.strip(), end.strip()
        if not video.strip() or not MSVD_TIME.fullmatch(start) or not MSVD_TIME.fullmatch(end):
            raise DataError(f"{corpus}: data row {row + 1}: expected a VideoID and whole seconds in Start and End, "
                            f"got {video!r}, {start!r}, {end!r}")
        clip = f"{video.strip()}_{int(float(start))}_{int(float(end))}"
        captions.setdefault(clip, []).append(text)

    order = read_msvd_mapping(mapping)
    splits = {split: [] for split in SPLITS}
    for number, clip in sorted(order.items()):
        split = next(name for name, end in MSVD_SPLIT_ENDS if number <= end)
        splits[split].append((f"{clip}.avi", captions.get(clip, [])))
    unmapped = len(captions.keys() - set(order.values()))
    notes = [f"{corpus.name}: {len(table)} rows, {len(table) - len(english)} not English (dropped)"
             + (f"; {unmapped} clips with English rows are not in {mapping.name} (ignored)" if unmapped else "")]
    return Annotations(splits, notes)


def read_msvd_mapping(path):
    """{N: clip} from youtube_mapping.txt lines `<VideoID>_<Start>_<End> vid<N>`, N in 1..1970, each once."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    order, seen = {}, set()
    last = MSVD_SPLIT_ENDS[-1][1]
    for line_number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        match = MSVD_MAPPING_LINE.fullmatch(line.strip())
        if not match:
            raise DataError(f"{path}: line {line_number}: expected '<VideoID>_<Start>_<End> vid<N>', "
                            f"got {line.strip()[:80]!r}")
        clip, number = match.group(1), int(match.group(2))
        if not 1 <= number <= last:
            raise DataError(f"{path}: line {line_number}: vid{number} is outside vid1..vid{last}")
        if number in order or clip in seen:
            raise DataError(f"{path}: line {line_number}: {'vid' + str(number) if number in order else clip} "
                            "is listed twice")
        order[number] = clip
        seen.add(clip)
    if not order:
        raise DataError(f"{path}: no '<VideoID>_<Start>_<End> vid<N>' lines")
    return order


def json_list(path, data, key, item_keys):
    """The list under `key` of a parsed JSON object (key None: the whole document), each item an object with
    item_keys."""
    if key is not None:
        if not isinstance(data, dict) or key not in data:
            raise DataError(f"{path}: no \"{key}\" list at the top level")
        data = data[key]
    where = f"\"{key}\"" if key else "the file"
    if not isinstance(data, list):
        raise DataError(f"{path}: {where} is not a list")
    for n, item in enumerate(data):
        if not isinstance(item, dict) or any(k not in item for k in item_keys):
            raise DataError(f"{path}: item {n} of {where} is not an object with {', '.join(item_keys)}")
    return data


def read_msrvtt(files):
    """MSR-VTT: each video's split from its `split` field (train/validate/test: 6513/497/2990), captions from
    `sentences`; both files together."""
    documents = {path: read_json(path) for path in files.values()}
    videos = {path: json_list(path, data, "videos", ("video_id", "split")) for path, data in documents.items()}
    sentences = {path: json_list(path, data, "sentences", ("video_id", "caption"))
                 for path, data in documents.items()}
    splits = {split: [] for split in SPLITS}
    captions, where = {}, {}
    for path, listed in videos.items():
        for n, video in enumerate(listed):
            video_id, split = video["video_id"], video["split"]
            if not isinstance(video_id, str) or split not in MSRVTT_SPLITS:
                raise DataError(f"{path}: video {n}: expected a string video_id and a split of "
                                f"{', '.join(MSRVTT_SPLITS)}, got {video_id!r}, {split!r}")
            if video_id in captions:
                raise DataError(f"{path}: video {n}: {video_id} is listed twice (also in {where[video_id].name})")
            captions[video_id], where[video_id] = [], path
            splits[MSRVTT_SPLITS[split]].append(video_id)
    for path, listed in sentences.items():  # after every file's videos: a sentence may name another file's video
        for n, sentence in enumerate(listed):
            video_id, caption = sentence["video_id"], sentence["caption"]
            if not isinstance(caption, str) or video_id not in captions:
                raise DataError(f"{path}: sentence {n}: expected a string caption of a listed video, got "
                                f"{video_id!r}: {caption!r}")
            captions[video_id].append(caption)
    return Annotations({split: [(f"{v}.mp4", captions[v]) for v in ids] for split, ids in splits.items()})


def read_vatex(files):
    """VATEX: one file per split, a list of {"videoID", "enCap": [...]}; the Chinese captions are not used."""
    splits, seen = {}, {}
    for split, path in files.items():
        splits[split] = []
        for n, video in enumerate(json_list(path, read_json(path), None, ("videoID", "enCap"))):
            video_id, captions = video["videoID"], video["enCap"]
            if not isinstance(video_id, str) or not isinstance(captions, list) \
                    or not all(isinstance(c, str) for c in captions):
                raise DataError(f"{path}: item {n}: expected a string videoID and a list of strings in enCap")
            if video_id in seen:
                raise DataError(f"{path}: item {n}: {video_id} is listed twice (also in {seen[video_id].name})")
            seen[video_id] = path
            splits[split].append((f"{video_id}.mp4", captions))
    return Annotations(splits)


@dataclass(frozen=True)
class DatasetFormat:
    files: dict  # role -> the file's distributed name
    read: object  # {role: path} -> Annotations


DATASETS = {
    "msvd": DatasetFormat({"corpus": "MSR Video Description Corpus.csv", "mapping": "youtube_mapping.txt"},
                          read_msvd),
    "msrvtt": DatasetFormat({"train_val": "train_val_videodatainfo.json", "test": "test_videodatainfo.json"},
                            read_msrvtt),
    "vatex": DatasetFormat({"training": "vatex_training_v1.0.json", "validation": "vatex_validation_v1.0.json",
                            "testing": "vatex_public_test_english_v1.1.json"}, read_vatex),
}


def clean_captions(captions):
    """Stripped captions, empty ones and repeats dropped, first occurrence order: (kept, empty, duplicates)."""
    stripped = [c.strip() for c in captions]
    kept = list(dict.fromkeys(c for c in stripped if c))
    empty = sum(1 for c in stripped if not c)
    return kept, empty, len(captions) - empty - len(kept)


def find_clips(video_dirs):
    """{file name: real path} of the files directly in each folder; the first folder holding a name wins.
    Real paths: a link made to a link (say, to an earlier prepare's video/ folder) would break when that goes."""
    clips = {}
    for folder in video_dirs:
        folder = Path(folder)
        if not folder.is_dir():
            raise DataError(f"{folder}: videos folder not found")
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name not in clips and entry.is_file():
                    clips[entry.name] = Path(entry.path).resolve()
    return clips


def check_out_dir(out_dir, dataset):
    """Refuse an output folder that holds another data set, or MLDS files that `prepare` did not write."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a folder")
    record_path = out_dir / RECORD
    if record_path.exists():
        record = read_json(record_path)
        if not isinstance(record, dict) or record.get("made_by") not in MADE_BY_NAMES or "dataset" not in record:
            raise DataError(f"{record_path}: not a record written by `{MADE_BY}`; choose a new or empty folder")
        if record["dataset"] != dataset:
            raise DataError(f"{out_dir}: holds the {record['dataset']} data set (see {RECORD}); prepare {dataset} "
                            "into another folder")
        return
    found = [name for name in OUTPUTS if (out_dir / name).exists()]
    if found:
        raise DataError(f"{out_dir}: holds {found[0]} not made by `prepare` (no {RECORD}); choose a new or empty "
                        "folder")


@dataclass
class Plan:
    """Everything `prepare` will write, decided from checked input."""
    dataset: str
    record: dict
    labels: dict  # split -> [{"caption": [...], "id": clip}]
    sources: dict  # split -> [(clip, absolute path of the user's clip)]; empty without --videos
    missing: dict  # split -> [clip]
    notes: list
    kept: int = 0  # without --videos: the clips an earlier run placed in <split>_data/video, kept as they are


def plan(dataset, annotations_dir, video_dirs=None, copy=False):
    """Read and check every input and decide the output; nothing is written. A DataError names what is wrong."""
    fmt = DATASETS[dataset]
    annotations_dir = Path(annotations_dir)
    if not annotations_dir.is_dir():
        raise DataError(f"{annotations_dir}: annotations folder not found")
    files = {role: (annotations_dir / name).resolve() for role, name in fmt.files.items()}
    for role, path in files.items():
        if not path.is_file():
            wanted = " and ".join(f'"{name}"' for name in fmt.files.values())
            raise DataError(f"{annotations_dir / fmt.files[role]}: annotation file not found ({dataset} needs "
                            f"{wanted} in the --annotations folder)")
    annotations = fmt.read(files)
    clips = find_clips(video_dirs) if video_dirs else None

    labels, sources, missing, no_captions = {}, {}, {}, {}
    dropped_empty = dropped_duplicate = 0
    for split in SPLITS:
        labels[split], sources[split], missing[split], no_captions[split] = [], [], [], []
        for clip, raw in annotations.splits[split]:
            captions, empty, duplicate = clean_captions(raw)
            dropped_empty += empty
            dropped_duplicate += duplicate
            if not captions:
                no_captions[split].append(clip)
            elif clips is not None and clip not in clips:
                missing[split].append(clip)
            else:
                labels[split].append({"caption": captions, "id": clip})
                if clips is not None:
                    sources[split].append((clip, clips[clip]))
        if not labels[split]:
            named = annotations.splits[split]
            if named and clips is not None and missing[split]:
                raise DataError(f"{video_dirs[0]}: none of the {len(missing[split])} {split} clips is there "
                                f"(e.g. {missing[split][0]}); the {split} split would be empty")
            raise DataError(f"{annotations_dir}: the {split} split has no video with a caption "
                            f"({len(named)} videos listed)")

    notes = annotations.notes + [f"captions: {dropped_empty} empty and {dropped_duplicate} duplicate dropped"]
    record = {"made_by": MADE_BY, "dataset": dataset,
              "annotations": {role: {"path": str(path), "sha256": sha256_of(path)} for role, path in files.items()},
              "videos": [str(Path(d).resolve()) for d in video_dirs] if video_dirs else None,
              "clips": ("copied" if copy else "linked") if video_dirs else "not checked",
              "splits": {split: {"clips": len(labels[split]),
                                 "captions": sum(len(e["caption"]) for e in labels[split]),
                                 "missing": len(missing[split]) if clips is not None else None,
                                 "videos_without_captions": no_captions[split]} for split in SPLITS}}
    return Plan(dataset, record, labels, sources, missing, notes)


def write_text(path, text):
    """UTF-8 whatever the locale (captions may be in any script), written whole."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def remove(path):
    """Remove a file, link or folder tree of an earlier run (links are removed, never followed)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def place_clips(video_dir, sources, copy, progress):
    """Fill video_dir with links to (or copies of) the clips: built in this run's work folder beside it, then
    swapped in whole."""
    work = video_dir.with_name(f".video.{owner_tag()}{WORK_SUFFIX}")
    if work.is_dir():  # a dead process's of this pid, or this process's earlier call's
        settle(work, video_dir)
    work.mkdir()
    (work / WORK_MARKER).write_text(WORK_MARK)
    building, old = work / "video", work / "old"
    building.mkdir()
    try:
        for clip, source in sources:
            if copy:
                shutil.copyfile(source, building / clip)
            else:
                os.symlink(source, building / clip)
            progress.update()
        if video_dir.exists() or video_dir.is_symlink():
            os.replace(video_dir, old)
        os.replace(building, video_dir)
    finally:
        settle(work, video_dir)


def settle(work, video_dir):
    """Finish a work folder's swap: the earlier video folder it moved aside goes back if nothing took its place;
    then the work folder goes, its marker last, so that what a kill leaves is still known to be ours."""
    old = work / "old"
    if (old.exists() or old.is_symlink()) and not (video_dir.exists() or video_dir.is_symlink()):
        os.replace(old, video_dir)
    for item in work.iterdir():
        if item.name != WORK_MARKER:
            remove(item)
    (work / WORK_MARKER).unlink(missing_ok=True)
    work.rmdir()


def settle_killed_runs(out_dir):
    """Settle the work folders that killed `prepare` runs left in out_dir: ours by name and marker, of a process
    that has ended. Another program's folders, and those of a run still going, are left alone."""
    for split in SPLITS:
        split_dir = out_dir / f"{split}_data"
        if not split_dir.is_dir() or split_dir.is_symlink():
            continue
        for work in split_dir.iterdir():
            match = _WORK.fullmatch(work.name)
            if match and left_by_dead_process(match.group(1)) and not work.is_symlink() and _marked(work):
                try:
                    settle(work, split_dir / "video")
                except OSError as error:
                    raise DataError(f"{work}: cannot clear what a killed run left ({error.strerror or error})") \
                        from None


def _marked(work):
    try:
        return (work / WORK_MARKER).read_text() == WORK_MARK
    except (OSError, UnicodeDecodeError):
        return False


def write(plan, out_dir, copy=False):
    """Write a checked plan into out_dir (the record first, so that a run cut short can be run again)."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text(out_dir / RECORD, json.dumps(plan.record, indent=1, ensure_ascii=False) + "\n")
        clips_total = sum(len(s) for s in plan.sources.values())
        with tqdm(total=clips_total, desc="copying clips" if copy else "linking clips", unit="clip", leave=False,
                  disable=not clips_total) as progress:
            for split in SPLITS:
                split_dir = out_dir / f"{split}_data"
                split_dir.mkdir(exist_ok=True)
                ids = "".join(entry["id"] + "\n" for entry in plan.labels[split])
                write_text(out_dir / f"{split}_label.json",
                           json.dumps(plan.labels[split], indent=1, ensure_ascii=False) + "\n")
                write_text(out_dir / f"{split}_id.txt", ids)
                write_text(split_dir / "id.txt", ids)
                if plan.record["videos"]:
                    place_clips(split_dir / "video", plan.sources[split], copy, progress)
                # without --videos an earlier run's video folder stays: its clips may be the only copies
        missing = "".join(f"{split}\t{clip}\n" for split in SPLITS for clip in plan.missing[split])
        if missing:
            write_text(out_dir / MISSING, missing)
        else:
            remove(out_dir / MISSING)
    except OSError as error:
        raise DataError(f"{error.filename or out_dir}: cannot write ({error.strerror or error})") from None


def summary(plan, out_dir):
    """The lines printed after `prepare`: per split, clips kept, captions, missing; where the files are."""
    splits = plan.record["splits"]
    checked = plan.record["videos"] is not None
    lines = [f"{plan.dataset}: " + note for note in plan.notes]
    lines.append(f"{'split':<11} {'clips':>6} {'captions':>9} {'missing':>8} {'no captions':>12}")
    for split in SPLITS:
        s = splits[split]
        lines.append(f"{split:<11} {s['clips']:>6} {s['captions']:>9} {s['missing'] if checked else '-':>8} "
                     f"{len(s['videos_without_captions']):>12}")
    if checked:
        missing = sum(s["missing"] for s in splits.values())
        lines.append(f"clips {plan.record['clips']} into {out_dir}/<split>_data/video/; "
                     + (f"{missing} missing clips listed in {out_dir / MISSING}" if missing else "no clip missing"))
    else:
        lines.append("clips not checked (no --videos): the labels list every clip of the annotations")
        if plan.kept:
            lines.append(f"clips: kept the {plan.kept} an earlier run placed in {out_dir}/<split>_data/video/")
    lines.append(f"prepared {plan.dataset} in {out_dir}: <split>_label.json, <split>_id.txt, <split>_data/id.txt "
                 f"for {', '.join(SPLITS)}; {RECORD}")
    return "\n".join(lines)


def within(path, folder):
    """Whether path is folder or lies under it, both resolved through links."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def check_videos_outside(out_dir, video_dirs):
    """Refuse a --videos folder inside out_dir: its clips would be linked to themselves, or replaced."""
    for folder in video_dirs or ():
        if within(folder, out_dir):
            raise DataError(f"{folder}: this --videos folder lies inside the output folder {out_dir}; give the "
                            "folder the clips came from, or move them out of it first")


def same_bytes(a, b):
    return a.stat().st_size == b.stat().st_size and sha256_of(a) == sha256_of(b)


def check_placed_clips(out_dir, plan):
    """Refuse a run that would lose a clip in <split>_data/video; return how many clips stay there untouched
    (all of them without --videos, none with it)."""
    kept = 0
    for split in SPLITS:
        sources = dict(plan.sources[split])
        for source in sources.values():
            if within(source, out_dir):  # a link in --videos that leads back into out_dir
                raise DataError(f"{source}: a clip of --videos that lies inside the output folder {out_dir}; give "
                                "the folder the clips came from")
        video_dir = out_dir / f"{split}_data" / "video"
        if not video_dir.is_dir():
            continue
        if not plan.record["videos"]:
            kept += sum(1 for _ in video_dir.iterdir())
            continue
        if video_dir.is_symlink():  # replacing a link to a folder removes the link only
            continue
        for entry in sorted(video_dir.iterdir()):
            if entry.is_symlink():  # replacing a link loses no clip
                continue
            source = sources.get(entry.name)
            if source is None or not entry.is_file():
                raise DataError(f"{video_dir}: holds {entry.name}, not a link, which this run would remove (no clip of "
                                "that name takes its place); move it away, or prepare into another folder")
            if not same_bytes(entry, source):
                raise DataError(f"{video_dir}: holds {entry.name}, not a link, which this run would replace with "
                                f"the different {source}; move it away, or prepare into another folder")
    return kept


def prepare(dataset, out_dir, annotations_dir, video_dirs=None, copy=False):
    """Check everything, then write the data set into out_dir; returns the Plan written."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir, dataset)
    check_videos_outside(out_dir, video_dirs)
    settle_killed_runs(out_dir)  # before the clips there are checked: a killed run may have moved them aside
    checked = plan(dataset, annotations_dir, video_dirs, copy)
    checked.kept = check_placed_clips(out_dir, checked)
    if checked.kept:
        checked.record["clips"] = f"not checked; {checked.kept} kept from an earlier run"
    write(checked, out_dir, copy)
    return checked


@command
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="write a benchmark's published splits in the MLDS layout")
    prep.add_argument("dataset", choices=sorted(DATASETS), help="which benchmark")
    prep.add_argument("out_dir", help="output folder (new, empty, or made by an earlier prepare of this data set)")
    prep.add_argument("--annotations", required=True, metavar="DIR",
                      help="folder holding the annotation files under their distributed names: "
                           + "; ".join(f"{name}: {', '.join(repr(f) for f in fmt.files.values())}"
                                       for name, fmt in DATASETS.items()))
    prep.add_argument("--videos", action="append", metavar="DIR",
                      help="folder of the clips (repeat for several); without it no clip is checked or linked")
    prep.add_argument("--copy", action="store_true", help="copy the clips instead of linking to them")
    prep.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    if args.copy and not args.videos:
        prep.error("--copy needs --videos")
    prepared = prepare(args.dataset, args.out_dir, args.annotations, args.videos, args.copy)
    print(summary(prepared, Path(args.out_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
