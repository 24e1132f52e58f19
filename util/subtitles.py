"""Timed captions and the subtitle files made of them: SRT (written by `srt`), WebVTT (by `webvtt-py`) and JSON."""
import json
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Optional

import srt
import webvtt
from webvtt.models import Timestamp

from util.atomic import write_text_atomic


@dataclass(frozen=True)
class Cue:
    """One caption of a stretch of video: start and end in seconds (end exclusive), the caption, and beam search's
    score of it (log-probability / length**length_penalty; None for greedy decoding, which scores nothing)."""
    start: float
    end: float
    caption: str
    score: Optional[float] = None


def merge_repeats(cues):
    """Join each run of adjacent cues with the same caption into one cue spanning them; its score is the
    duration-weighted mean of theirs (None if any is None)."""
    merged = []
    for cue in cues:
        if merged and merged[-1][-1].caption == cue.caption:
            merged[-1].append(cue)
        else:
            merged.append([cue])
    return [run[0] if len(run) == 1 else Cue(run[0].start, run[-1].end, run[0].caption, _mean_score(run))
            for run in merged]


def _mean_score(cues):
    if any(c.score is None for c in cues):
        return None
    total = sum(c.end - c.start for c in cues)
    return sum(c.score * (c.end - c.start) for c in cues) / total if total > 0 else cues[0].score


def to_srt(cues):
    at = lambda seconds: timedelta(milliseconds=round(seconds * 1000))  # rounded, as the WebVTT writer does
    return srt.compose([srt.Subtitle(index, at(c.start), at(c.end), c.caption) for index, c in enumerate(cues, 1)],
                       reindex=False)


def to_vtt(cues):
    return webvtt.WebVTT(captions=[webvtt.Caption(str(Timestamp.from_seconds(c.start)),
                                                  str(Timestamp.from_seconds(c.end)), c.caption)
                                   for c in cues]).content


def cue_rows(cues):
    """[{start, end, caption, score}] of the cues, times in seconds rounded to the millisecond: the JSON form."""
    return [{**asdict(c), "start": round(c.start, 3), "end": round(c.end, 3),
             "score": None if c.score is None else round(c.score, 4)} for c in cues]


def to_json(cues, **about):
    """{**about, "cues": cue_rows(cues)}."""
    return json.dumps({**about, "cues": cue_rows(cues)}, indent=1)


def write_subtitles(cues, srt_path=None, vtt_path=None, json_path=None, **about):
    """Write whichever of the three files are asked for, each whole or not at all (util.atomic)."""
    for path, text in ((srt_path, to_srt), (vtt_path, to_vtt), (json_path, lambda c: to_json(c, **about))):
        if path:
            write_text_atomic(path, text(cues))
