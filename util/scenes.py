"""Cut a long video into scenes in one pass over its frames, keeping a bounded, evenly spaced sample of each scene.

    reader = SceneReader("talk.mp4", size=96, keep=80)          # segments="auto": PySceneDetect's AdaptiveDetector
    reader.duration                                             # seconds, from the header (None if it gives none)
    for scene in reader:                                        # Scene(start, end, frames), in order
        ...

Cuts come from PySceneDetect's AdaptiveDetector fed the frames decoded here (scored at most DETECTION_WIDTH pixels
wide), at least min_scene seconds apart; a scene longer than max_scene seconds is split every max_scene seconds, so a
long static shot still gets a caption that often. segments=SECONDS cuts fixed windows instead, without scoring frames.
Times are the frames' own timestamps (CAP_PROP_POS_MSEC), so a variable frame rate keeps the file's clock; OpenCV
turns frames upright by the file's rotation flag (CAP_PROP_ORIENTATION_AUTO, on by default). Memory does not grow with
the video: a scene keeps between `keep` and 2 * `keep` of its frames (every stride-th, the stride doubling as the
scene goes on), resized to size x size, and only the frames a sample keeps are converted from the decoder at all when
no detector needs them. The file is opened, checked, capped and decoded by util.video: a file that cannot be read
raises its VideoError (OverLimit past a cap, ReadingStopped when stop() says so).
"""
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from util.errors import DataError
from util.video import ClipLimits, VideoError, open_video

DETECTION_WIDTH = 256  # frames wider than this are shrunk before scoring cuts, as PySceneDetect itself does
MIN_SCENE = 2.0  # seconds: no cut closer than this to the last one
MAX_SCENE = 10.0  # seconds: a longer scene is captioned every MAX_SCENE seconds
STOPPED_EARLY = 0.95  # decoding that ends before this share of the header's duration (and a second short) failed


@dataclass(frozen=True)
class Scene:
    """A stretch of video: start and end in seconds (end: the next scene's first frame, or the video's end), the
    number of frames decoded in it, and frames (n, size, size, 3) uint8 RGB evenly spaced over it, n <= 2 * keep."""
    start: float
    end: float
    decoded: int
    frames: np.ndarray


class EvenSample:
    """Every stride-th item offered, the stride doubling whenever more than 2 * keep are held: at most 2 * keep
    items, evenly spaced over all offered (all of them while fewer than 2 * keep were)."""

    def __init__(self, keep):
        self.keep, self.stride, self.items, self.offered = keep, 1, [], 0

    def wants_next(self):
        return self.offered % self.stride == 0

    def offer(self, make_item):
        """Count one more item; make_item() is called only if the sample keeps it."""
        if self.wants_next():
            self.items.append(make_item())
        self.offered += 1
        if len(self.items) > 2 * self.keep:
            self.items, self.stride = self.items[::2], self.stride * 2


def parse_segments(text):
    """--segments: "auto" (detected cuts) or a positive number of seconds (fixed windows)."""
    if text == "auto":
        return text
    try:
        seconds = float(text)
    except (TypeError, ValueError):
        seconds = None
    if seconds is None or not 0 < seconds < float("inf"):
        raise DataError(f"--segments must be 'auto' or a positive number of seconds, not {text!r}")
    return seconds


class SceneReader:
    """The scenes of one video file, read once, in order (see the module's docstring)."""

    def __init__(self, path, size, keep, segments="auto", min_scene=MIN_SCENE, max_scene=MAX_SCENE,
                 max_seconds=None, max_pixels=None, stop=None):
        """max_seconds, max_pixels (width * height): caps checked from the header and again while decoding
        (util.video.OverLimit); stop(), if given, is asked at every frame and True ends reading with
        util.video.ReadingStopped."""
        self.path, self.size, self.keep = Path(path), int(size), int(keep)
        self.limits, self.stop = ClipLimits(seconds=max_seconds, pixels=max_pixels), stop
        self.segments = parse_segments(segments)
        if not 0 <= min_scene < max_scene:
            raise DataError(f"need 0 <= min_scene < max_scene, not min_scene={min_scene}, max_scene={max_scene}")
        self.min_scene, self.max_scene = float(min_scene), float(max_scene)
        with open_video(self.path, self.limits) as video:
            self.fps, frame_count = video.fps, video.frame_count
        if not self.fps > 0:
            raise VideoError(f"{self.path}: no video stream (no frame rate)")
        self.duration: Optional[float] = frame_count / self.fps if frame_count > 0 else None

    def __iter__(self):
        from scenedetect import AdaptiveDetector, FrameTimecode
        from scenedetect.common import Timecode

        detector = AdaptiveDetector(min_scene_len=self.min_scene) if self.segments == "auto" else None
        # AdaptiveDetector reports a cut event_buffer_length frames after the frame it cuts before
        lag = detector.event_buffer_length if detector else 0
        frame_ms = 1000.0 / self.fps
        window_ms = (self.segments if detector is None else self.max_scene) * 1000.0
        recent = deque()  # (ms, BGR frame or None) decoded, not yet placed: a cut before them may still come
        cuts = deque()  # ms of detected cuts not yet reached
        scene = None  # [start ms, EvenSample, frames decoded]
        last_ms = None

        def place(ms, bgr, video):
            nonlocal scene
            if scene is not None:
                at_cut = bool(cuts) and ms >= cuts[0] - frame_ms / 2
                while cuts and cuts[0] <= ms + frame_ms / 2:
                    cuts.popleft()
                if at_cut or ms - scene[0] >= window_ms - frame_ms / 2:
                    yield self._scene(scene, ms)
                    scene = None
            if scene is None:
                scene = [ms, EvenSample(self.keep), 0]
            scene[1].offer(lambda: self._resized(bgr if bgr is not None else video.retrieve()))
            scene[2] += 1

        with open_video(self.path, self.limits) as video:
            for _ in video.frames(self.stop):
                ms = video.position_ms()
                last_ms = ms = ms if last_ms is None else max(ms, last_ms + 1e-3)  # a decoder's repeated timestamp
                if detector is None:
                    yield from place(ms, None, video)
                    continue
                bgr = video.retrieve()
                timecode = FrameTimecode(Timecode(pts=round(ms), time_base=Fraction(1, 1000)), fps=self.fps)
                cuts.extend(float(cut.pts) for cut in detector.process_frame(timecode, self._for_detection(bgr)))
                recent.append((ms, bgr))
                while len(recent) > lag:
                    yield from place(*recent.popleft(), video)
        while recent:
            yield from place(*recent.popleft(), None)
        end_ms = last_ms + frame_ms
        if self.duration and end_ms < 1000 * self.duration * STOPPED_EARLY and end_ms < 1000 * self.duration - 1000:
            raise VideoError(f"{self.path}: decoding stopped at {end_ms / 1000:.1f} s of {self.duration:.1f} s "
                             f"(a corrupt or cut-off file)")
        yield self._scene(scene, end_ms)

    def _scene(self, scene, end_ms):
        start_ms, sample, decoded = scene
        return Scene(start_ms / 1000, end_ms / 1000, decoded, np.stack(sample.items))

    def _resized(self, bgr):
        """A frame as a sample keeps it: size x size RGB."""
        return cv2.resize(bgr, (self.size, self.size), interpolation=cv2.INTER_AREA)[..., ::-1]

    @staticmethod
    def _for_detection(bgr):
        width = bgr.shape[1]
        if width <= DETECTION_WIDTH:
            return bgr
        height = max(1, round(bgr.shape[0] * DETECTION_WIDTH / width))
        return cv2.resize(bgr, (DETECTION_WIDTH, height), interpolation=cv2.INTER_AREA)
