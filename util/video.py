"""Reading video files, one way for every reader: the open-and-check, the caps, the frame loop, uniform sampling and
one family of errors (VideoError, a DataError; OverLimit and ReadingStopped are VideoErrors).

    with open_video(path, limits) as video:     # a file, not empty, a video OpenCV opens, its header within limits
        for index in video.frames(stop):        # every frame decoded in turn, the caps and stop() checked at each
            bgr = video.retrieve()              # converted only when a reader keeps it

Headers lie, so the caps are checked again on what decoding finds: the frame count and length as frames come, the
size of every frame retrieved, and under a pixel cap the CPU time frames take to decode. The last catches frames
larger than the header says: OpenCV scales each one back to the header's size, so its own size cannot be seen, while
FFmpeg decodes it at full size (a 12000x12000 MJPEG frame behind a 64x64 header: about 250 MB and 0.3 s a frame).
Under a pixel cap FFmpeg decodes in the reading thread (one decoding thread), whose CPU time a busy machine, other
threads and a slow disk leave alone.
"""
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from util.errors import DataError

VIDEO_SUFFIXES = {".avi", ".mp4", ".mkv", ".mov", ".webm", ".mpg", ".mpeg", ".m4v", ".wmv", ".flv"}
# A frame of the header's size decodes in FRAME_OVERHEAD_S of CPU plus its pixels at SLOW_DECODING pixels a second
# (one core decodes 4K MJPEG of noise at 80 Mpx/s, 4K MPEG-4 at 300, 320x240 H.264 in 0.4 ms); DECODING_GRACE_S
# more in all forgives a slow start. Decoding slower than that is a header hiding larger frames.
SLOW_DECODING = 5e6
FRAME_OVERHEAD_S = 0.02
DECODING_GRACE_S = 0.5


class VideoError(DataError):
    """A video that cannot be read: the message names the file and what is wrong."""


class OverLimit(VideoError):
    """A video longer, with more frames or larger frames than the ClipLimits it is read under."""


class ReadingStopped(VideoError):
    """Reading given up because its caller's stop() said so (a deadline passed, the client went away)."""


@dataclass(frozen=True)
class ClipLimits:
    """Caps on the videos read, checked from the container's header before decoding and again while decoding
    (headers lie); None: no cap. seconds counts frames at the header's frame rate; pixels is a frame's width * height.
    """
    seconds: Optional[float] = None
    frames: Optional[int] = None
    pixels: Optional[int] = None

    def check(self, path, frames, fps=0.0, width=0, height=0):
        """Raise OverLimit if a video of `frames` frames at `fps` of width x height breaks a cap."""
        if self.frames is not None and frames > self.frames:
            raise OverLimit(f"{path}: more than {self.frames} frames (the limit)")
        if self.seconds is not None and fps > 0 and frames / fps > self.seconds:
            raise OverLimit(f"{path}: longer than {self.seconds:g} s (the limit)")
        if self.pixels is not None and width * height > self.pixels:
            raise OverLimit(f"{path}: {width}x{height} frames are over the limit of {self.pixels} pixels")

    def check_decoding(self, path, frames, seconds, width, height):
        """Raise OverLimit if `frames` frames took `seconds` of CPU to decode, far longer than width x height frames
        take (a header without a size counts as the pixel cap's): frames larger than the header says. No pixel cap,
        no check."""
        if self.pixels is None:
            return
        per_frame = FRAME_OVERHEAD_S + (width * height or self.pixels) / SLOW_DECODING
        if seconds > DECODING_GRACE_S + frames * per_frame:
            raise OverLimit(f"{path}: frames take {seconds / frames:.2f} s of CPU each to decode, far longer than "
                            f"{width}x{height} frames do: larger than the header says (the limit is {self.pixels} "
                            f"pixels)")


NO_LIMITS = ClipLimits()


class Video:
    """A video file open_video opened and checked: its header's fps, frame_count, width and height, and its frames,
    decoded in turn by frames() and converted by retrieve(). A with block releases it."""

    def __init__(self, path, capture, limits):
        self.path, self.limits, self._capture = path, limits, capture
        self.fps = capture.get(cv2.CAP_PROP_FPS)
        self.frame_count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        self.width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
        self.height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        self.decoded = 0

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        self._capture.release()

    def frames(self, stop=None):
        """Decode the frames one by one, yielding each one's index (from 0) once it is decoded. stop(), if given, is
        asked at every frame, and True ends decoding with ReadingStopped; past a cap, OverLimit; no frame at all,
        VideoError."""
        decoding_s = 0.0
        while True:
            started = time.thread_time()
            found = self._decoder(self._capture.grab)
            decoding_s += time.thread_time() - started
            if not found:
                break
            if stop is not None and stop():
                raise ReadingStopped(f"{self.path}: decoding stopped after {self.decoded} frames")
            self.decoded += 1
            self.limits.check(self.path, self.decoded, self.fps)
            self.limits.check_decoding(self.path, self.decoded, decoding_s, self.width, self.height)
            yield self.decoded - 1
        if self.decoded == 0:
            raise VideoError(f"{self.path}: no decodable frames")

    def retrieve(self):
        """The frame frames() decoded last, BGR uint8, its size checked against the pixel cap."""
        found, frame = self._decoder(self._capture.retrieve)
        if not found:
            raise VideoError(f"{self.path}: frame {self.decoded - 1} was found but cannot be decoded")
        self.limits.check(self.path, self.decoded, self.fps, frame.shape[1], frame.shape[0])
        return frame

    def position_ms(self):
        """The timestamp of the frame frames() decoded last, in ms (the file's clock, variable frame rates too)."""
        return self._capture.get(cv2.CAP_PROP_POS_MSEC)

    def _decoder(self, call):
        try:
            return call()
        except cv2.error as error:
            raise VideoError(f"{self.path}: cannot be decoded ({str(error).strip().splitlines()[-1]})") from None


def open_video(path, limits=NO_LIMITS):
    """The Video at `path` once checked: a file, not empty, a video OpenCV can open, its header within limits."""
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: empty file (0 bytes)")
    # check_decoding times this thread, so under a pixel cap FFmpeg decodes in it (H.264 takes threads of its own)
    capture = cv2.VideoCapture(str(path), cv2.CAP_ANY, [] if limits.pixels is None else [cv2.CAP_PROP_N_THREADS, 1])
    if not capture.isOpened():
        capture.release()
        raise VideoError(f"{path}: not a video OpenCV can open")
    video = Video(path, capture, limits)
    try:
        limits.check(path, video.frame_count, video.fps, video.width, video.height)
    except OverLimit:
        capture.release()
        raise
    return video


def frame_indices(frame_count, frames):
    """`frames` indices spread uniformly over [0, frame_count); frames repeat when the clip is shorter."""
    return np.linspace(0, frame_count - 1, frames).round().astype(int)


def flow_pair_indices(frame_count, frames):
    """(frames, 2) indices: each uniformly sampled frame and the frame after it, or for the clip's last frame the
    one before it and itself (a one-frame clip pairs its frame with itself: no motion)."""
    first = np.clip(np.minimum(frame_indices(frame_count, frames), frame_count - 2), 0, None)
    return np.stack([first, np.minimum(first + 1, frame_count - 1)], 1)


def read_frames(path, frames, image_size, limits=NO_LIMITS, stop=None, square_crop=False):
    """Decode `frames` uniformly sampled RGB frames of `path`, resized to image_size: (frames, size, size, 3) uint8.

    The frames are chosen before decoding and only they are converted and kept, so memory does not grow with the
    clip's length. They are chosen from the container's frame count (CAP_PROP_FRAME_COUNT), which decoding then
    checks: headers often lie, and when this one did the clip is decoded a second time with the true count.
    limits (ClipLimits) caps the clip (OverLimit); stop(), if given, is asked between frames and True ends decoding
    with ReadingStopped. square_crop: each frame's central square is resized rather than the whole frame.
    """
    return _read_picked(path, lambda count: frame_indices(count, frames), image_size, limits, stop, square_crop)


def read_frame_pairs(path, frames, image_size, limits=NO_LIMITS, stop=None, square_crop=False):
    """Like read_frames, each sampled frame with the decoded frame after it (flow_pair_indices):
    (frames, 2, size, size, 3) uint8 RGB; only these 2 * frames frames are kept."""
    picked = _read_picked(path, lambda count: flow_pair_indices(count, frames).reshape(-1), image_size, limits, stop,
                          square_crop)
    return picked.reshape(frames, 2, *picked.shape[1:])


def _read_picked(path, indices_for, image_size, limits, stop, square_crop=False):
    """Decode the frames at indices_for(frame count) of `path`, resized: (len(indices), size, size, 3) uint8 RGB."""
    with open_video(path, limits) as video:
        header_count = video.frame_count
        picked = _decode_picked(video, indices_for(header_count) if header_count > 0 else [], image_size, stop,
                                square_crop)
    if video.decoded != header_count:
        with open_video(path, limits) as again:
            picked = _decode_picked(again, indices_for(video.decoded), image_size, stop, square_crop)
    return picked[..., ::-1]  # OpenCV decodes BGR; keras.applications preprocessing expects RGB


def _decode_picked(video, indices, image_size, stop, square_crop=False):
    """Decode every frame of the video, keeping those at `indices` (repeats allowed), each resized at once so a
    high-resolution clip never holds full-size frames: (len(indices), size, size, 3) BGR. Only the kept frames are
    converted (retrieve)."""
    wanted = {}
    for position, index in enumerate(indices):
        wanted.setdefault(int(index), []).append(position)
    picked = np.zeros((len(indices), image_size, image_size, 3), np.uint8)
    for index in video.frames(stop):
        if index in wanted:
            frame = central_square(video.retrieve()) if square_crop else video.retrieve()
            picked[wanted[index]] = cv2.resize(frame, (image_size, image_size), interpolation=cv2.INTER_AREA)
    return picked


def central_square(image):
    """The largest square at the centre of an (h, w, ...) image: what encoders trained on centre crops see."""
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return image[top:top + side, left:left + side]
