"""A local web page and JSON API that caption uploaded clips with a trained checkpoint.

    python serve.py [--checkpoint NAME|RUN_DIR|CKPT|URL] [--host 127.0.0.1] [--port 8000] [--max-upload-mb 200]
                    [--allowed-host NAME ...] [--max-clip-seconds 60] [--max-clip-frames 3000]
                    [--max-clip-pixels 8300000] [--time-limit 60] [--max-queue 8] [--read-workers 2]
                    [--upload-time-limit 60] [--upload-min-rate-kb 32] [--max-video-seconds 1800]
                    [--scenes-time-limit 600] [--max-scenes-queue 2] [--min-segment 2] [--max-scenes 1000]
                    [--scenes-per-turn 2]

    GET  /                   the page: choose or drop a clip; see its caption, the n-best list and the attention
    GET  /api/info           the checkpoint, its frames and the upload limit
    POST /api/caption        multipart/form-data with one `file` part; query: beam_size (default 5), n_best
                             (default 3), length_penalty (0), plot (1: the attention as a PNG data URL), job (an id
                             of the caller's choosing for /api/progress) -> JSON caption, n_best, attention, timings
    POST /api/scenes         the same upload, a long video captioned scene by scene (Captioner.scene_reader,
                             scene_batches, caption_scenes); query: segments (auto or SECONDS), beam_size (5), job ->
                             JSON cues [{start, end, caption, score}], srt and vtt (the cues as subtitle files), timings
    GET  /api/progress/JOB   {stage, done, total} of the request in flight with that job id

An upload goes to a temporary folder that is removed when its request ends, failures included (and, with its marker
file, at the next start if the server was killed); the body is counted as it streams in and refused (413) past
--max-upload-mb, and cut off (408) past --upload-time-limit or when it comes slower than --upload-min-rate-kb. Work is
bounded: at most --max-queue captions and --max-scenes-queue scene-by-scene requests are uploading, waiting or
working at once (more get 503 with Retry-After); a clip over --max-clip-seconds, -frames or -pixels is refused (413)
from its header before it is read and again while it is read; a request's work past --time-limit seconds after its
upload gets 408 (or 503 if it is still waiting for the model); a client that goes away has its reading stopped and
never reaches the model. A video captioned scene by scene has caps of its own: at most --max-video-seconds long (the
frame-size cap is --max-clip-pixels), segments no shorter than --min-segment, at most --max-scenes scenes and
--scenes-time-limit seconds of work. Videos are read in a pool of --read-workers threads, apart from the model, which
one request uses at a time: a scene-by-scene request takes it for --scenes-per-turn scenes at a time, so a caption
waits at most one such turn behind it. Only requests whose Host is 127.0.0.1, localhost or an --allowed-host name are
answered (400 otherwise), and a POST from a page of another origin gets 403: this stops other sites open in the same
browser (DNS rebinding, cross-site posts); it is no access control, and --host beyond loopback warns so. Every error
is a 4xx/5xx status with a one-line JSON body {"error": "..."} naming no server path.
"""
import argparse
import asyncio
import base64
import ipaddress
import math
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Callable
from pathlib import Path

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from captioner import Captioner
from util.atomic import left_by_dead_process, owner_tag
from util.errors import DataError, command
from util.scenes import MAX_SCENE, MIN_SCENE, parse_segments
from util.subtitles import cue_rows, merge_repeats, to_srt, to_vtt
from util.video import VIDEO_SUFFIXES, ClipLimits, OverLimit, ReadingStopped, VideoError

PAGE = Path(__file__).resolve().parent / "util" / "serve_page.html"
_JOB = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_BEAM = 20
LOCAL_HOSTS = ("127.0.0.1", "localhost")
DEFAULT_LIMITS = ClipLimits(seconds=60.0, frames=3000, pixels=3840 * 2160)
MAX_VIDEO_SECONDS = 1800.0  # scene by scene: half an hour of the demo's video takes about 80 s on 2 CPU cores
SCENES_TIME_LIMIT = 600.0
UPLOAD_GRACE_S = 2.0  # the minimum upload rate is owed from this many seconds after the upload starts
UPLOAD_PREFIX = "s2vt-serve-"
_UPLOAD_FOLDER = re.compile(rf"{UPLOAD_PREFIX}(s2vt-[0-9a-f]{{8}}-\d+)-\w+")
MARKER_FILE, MARKER_TEXT = ".s2vt-serve", "serve.py: an upload's folder, removed when its request ends\n"


@dataclass(frozen=True)
class Settings:
    """The server's limits, as its flags set them (see main)."""
    max_upload_bytes: int = 200_000_000
    limits: ClipLimits = DEFAULT_LIMITS
    time_limit: float = 60.0
    max_queue: int = 8
    read_workers: int = 2
    allowed_hosts: tuple = ()
    upload_time_limit: float = 60.0
    upload_min_rate: float = 32_000.0  # bytes a second
    max_video_seconds: float = MAX_VIDEO_SECONDS
    scenes_time_limit: float = SCENES_TIME_LIMIT
    max_scenes_queue: int = 2
    min_segment: float = MIN_SCENE
    max_scenes: int = 1000
    scenes_per_turn: int = 2


class RequestError(Exception):
    """A request refused: its HTTP status, a one-line message and any headers of the answer."""

    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status, self.headers = status, headers


class UploadParts:
    """Callbacks for python_multipart's MultipartParser: the `file` part streams into folder/upload<suffix>;
    other parts are ignored."""

    def __init__(self, folder):
        self.folder = folder
        self.path = self.filename = self.file = None
        self.ended = False
        self._headers, self._field, self._value = {}, b"", b""

    def callbacks(self):
        return {"on_part_begin": self._headers.clear, "on_header_field": self._on_field,
                "on_header_value": self._on_value, "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished, "on_part_data": self._on_data,
                "on_part_end": self.close, "on_end": self._on_end}

    def _on_field(self, data, start, end):
        self._field += data[start:end]

    def _on_value(self, data, start, end):
        self._value += data[start:end]

    def _on_header_end(self):
        self._headers[self._field.strip().lower()] = self._value.strip()
        self._field, self._value = b"", b""

    def _on_headers_finished(self):
        _, options = parse_options_header(self._headers.get(b"content-disposition"))
        if options.get(b"name") != b"file":
            return
        if self.filename is not None:
            raise RequestError(400, "more than one `file` part in the upload")
        self.filename = options.get(b"filename", b"").decode("utf-8", "replace")
        suffix = check_file_name(self.filename)
        self.path = self.folder / f"upload{suffix}"  # never the client's name: it may be a path
        self.file = open(self.path, "wb")

    def _on_data(self, data, start, end):
        if self.file:
            self.file.write(data[start:end])

    def _on_end(self):
        self.ended = True

    def close(self):
        if self.file:
            self.file.close()
            self.file = None


def error_response(status, message, headers=None):
    """The API's answer to anything that went wrong: one line of JSON."""
    return JSONResponse({"error": " ".join(str(message).split())}, status, headers=headers)


class TrustedHosts:
    """Starlette's TrustedHostMiddleware deciding which Host headers are served, its refusal as the API's JSON: a
    page that rebinds its own domain name to 127.0.0.1 still sends that name, and is refused. Any client that reaches
    the port can send an allowed name: this is protection against DNS rebinding, not access control."""

    def __init__(self, app, allowed_hosts):
        self.app, self.allowed_hosts = app, list(allowed_hosts)
        self.check = TrustedHostMiddleware(self._allowed, self.allowed_hosts, www_redirect=False)

    @staticmethod
    async def _allowed(scope, receive, send):
        scope["s2vt.host_allowed"] = True

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            async def discard(message):  # Starlette's plain-text refusal; ours follows
                pass

            await self.check(scope, receive, discard)
            if not scope.pop("s2vt.host_allowed", False):
                host = Headers(scope=scope).get("host", "")
                return await error_response(400, f"host {host[:100]!r} is not served here (allowed: "
                                                 f"{', '.join(self.allowed_hosts)}; see --allowed-host)")(
                    scope, receive, send)
        await self.app(scope, receive, send)


class SameOriginPosts:
    """403 for a request that changes something (POST, ...) sent by a page of another origin: a browser names the
    page's origin in Origin; requests without one (curl, scripts) and the server's own page pass."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            headers = Headers(scope=scope)
            origin = headers.get("origin")
            if origin is not None and origin != f"{scope['scheme']}://{headers.get('host')}":
                return await error_response(403, f"cross-origin request from {origin[:100]!r} refused")(
                    scope, receive, send)
        await self.app(scope, receive, send)


async def http_error(request, error):
    """Starlette's own errors (404 no such route, 405 wrong method, ...) as the API's JSON."""
    return error_response(error.status_code, error.detail, getattr(error, "headers", None))


async def server_error(request, error):
    """An unexpected error: its type only (its message may hold server paths); the traceback goes to the log."""
    return error_response(500, f"internal error ({type(error).__name__}); see the server's log")


def check_file_name(name):
    """The upload's lowercase suffix, if its name is a plain file name with a video suffix."""
    if not name:
        raise RequestError(400, "the `file` part has no file name")
    if "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
        raise RequestError(400, f"{name!r}: a file name, not a path, is expected")
    suffix = Path(name).suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise RequestError(415, f"{name}: not a video file name (expected {', '.join(sorted(VIDEO_SUFFIXES))})")
    return suffix


def upload_boundary(headers, max_bytes):
    """The multipart boundary of an upload, once its headers are checked: a multipart/form-data body, its
    Content-Length (if given) a number within max_bytes."""
    content_type, options = parse_options_header(headers.get("content-type"))
    if content_type != b"multipart/form-data" or not options.get(b"boundary"):
        raise RequestError(415, f"expected a multipart/form-data upload with a `file` part, not "
                                f"{content_type.decode('latin-1') or 'no content type'}")
    length = headers.get("content-length", "0")
    if not length.isdigit():
        raise RequestError(400, f"Content-Length {length!r} is not a whole number")
    if int(length) > max_bytes:
        raise RequestError(413, f"upload of {int(length)} bytes is over the limit of {max_bytes} bytes")
    return options[b"boundary"]


@dataclass
class UploadPace:
    """An upload's deadline and minimum rate, on the event loop's clock: all of it within time_limit seconds, and
    by t seconds from its start at least min_rate * (t - UPLOAD_GRACE_S) bytes, so a trickle is cut off early."""
    time_limit: float
    min_rate: float
    started: float = field(default_factory=lambda: asyncio.get_running_loop().time())

    def next_check(self, received):
        """When the upload is cut off unless more than `received` bytes have come by then."""
        return self.started + min(self.time_limit, UPLOAD_GRACE_S + received / self.min_rate)

    def refusal(self, received):
        elapsed = asyncio.get_running_loop().time() - self.started
        if elapsed >= self.time_limit:
            return RequestError(408, f"the upload took longer than the limit of {self.time_limit:g} s")
        return RequestError(408, f"the upload came slower than {self.min_rate / 1000:g} kB/s ({received} bytes in "
                                 f"{elapsed:.1f} s)")


async def receive_upload(request, folder, max_bytes, pace):
    """Stream the multipart body into folder, counting bytes as they come, within the UploadPace: (path of the
    clip, client's name)."""
    parts, received = UploadParts(folder), 0
    try:
        parser = MultipartParser(upload_boundary(request.headers, max_bytes), parts.callbacks())
        async with asyncio.timeout_at(pace.next_check(0)) as timer:
            async for chunk in request.stream():
                received += len(chunk)
                if received > max_bytes:
                    raise RequestError(413, f"upload is over the limit of {max_bytes} bytes")
                parser.write(chunk)
                timer.reschedule(pace.next_check(received))
        parser.finalize()
    except TimeoutError:
        raise pace.refusal(received) from None
    except FormParserError as error:
        raise RequestError(400, f"malformed multipart body ({str(error).splitlines()[0]})") from None
    except ClientDisconnect:
        raise RequestError(400, f"upload cut off after {received} bytes") from None
    finally:
        parts.close()
    if not parts.ended:
        raise RequestError(400, f"upload cut off after {received} bytes (no closing boundary)")
    if parts.path is None:
        raise RequestError(400, "no `file` part in the upload")
    return parts.path, parts.filename


def decoding_options(query, settings):
    """beam_size, n_best, length_penalty and plot from the query string, checked."""
    try:
        beam_size = int(query.get("beam_size", 5))
        n_best = int(query.get("n_best", min(3, beam_size)))
        length_penalty = float(query.get("length_penalty", 0.0))
    except ValueError as error:
        raise RequestError(400, f"bad decoding option ({error})") from None
    if not (1 <= beam_size <= MAX_BEAM and 1 <= n_best <= beam_size and 0 <= length_penalty <= 10):
        raise RequestError(400, f"need 1 <= beam_size <= {MAX_BEAM}, 1 <= n_best <= beam_size and "
                                f"0 <= length_penalty <= 10")
    if query.get("plot", "0") not in ("0", "1"):
        raise RequestError(400, "plot must be 0 or 1")
    return dict(beam_size=beam_size, n_best=n_best, length_penalty=length_penalty), query.get("plot") == "1"


def segment_options(query, settings):
    """segments and beam_size of a scene-by-scene request, checked: fixed windows no shorter than the server's
    --min-segment."""
    try:
        segments = parse_segments(query.get("segments", "auto"))
        beam_size = int(query.get("beam_size", 5))
    except (DataError, ValueError) as error:
        raise RequestError(400, f"bad option ({error})") from None
    if segments != "auto" and segments < settings.min_segment:
        raise RequestError(400, f"segments of {segments:g} s are shorter than this server's minimum of "
                                f"{settings.min_segment:g} s (--min-segment)")
    if not 1 <= beam_size <= MAX_BEAM:
        raise RequestError(400, f"need 1 <= beam_size <= {MAX_BEAM}")
    return segments, beam_size


def checkpoint_label(source):
    """The checkpoint as shown to clients: its run folder's name and the checkpoint's, no absolute path."""
    return "/".join(Path(str(source)).parts[-3:])


def make_upload_folder():
    """A new folder for one upload, named for this process and holding the marker file that says it is ours."""
    folder = None
    try:
        folder = Path(tempfile.mkdtemp(prefix=f"{UPLOAD_PREFIX}{owner_tag()}-"))
        (folder / MARKER_FILE).write_text(MARKER_TEXT)
        return folder
    except OSError as error:  # a full disk, say: this request is refused, the next may pass
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        raise RequestError(503, f"cannot store the upload now ({error.strerror or error}); try again later",
                           {"Retry-After": "60"}) from None


def remove_stale_uploads(folder=None):
    """Remove the upload folders that killed servers left in folder (the temporary folder): ours by name and by
    marker file, made by a process of this machine that has ended. Nothing else is touched."""
    with os.scandir(folder or tempfile.gettempdir()) as entries:
        for entry in entries:
            match = _UPLOAD_FOLDER.fullmatch(entry.name)
            if not (match and entry.is_dir(follow_symlinks=False) and left_by_dead_process(match.group(1))):
                continue
            try:
                ours = (Path(entry.path) / MARKER_FILE).read_text() == MARKER_TEXT
            except (OSError, UnicodeDecodeError):  # no marker: not known to be ours
                continue
            if ours:
                shutil.rmtree(entry.path, ignore_errors=True)


@dataclass(frozen=True)
class Work:
    """One kind of upload request: its queue's size, the seconds its work may take after the upload, its options
    (options_of(query, settings)) and the work itself (await run(job, options) -> the JSON body)."""
    queue_size: int
    time_limit: float
    options_of: Callable
    run: Callable


class Service:
    """What the handlers share: the Captioner and its lock, the reading pool, the settings, the kinds of work with
    their queues, and the jobs in flight."""

    def __init__(self, captioner, settings):
        self.captioner, self.settings = captioner, settings
        self.label = checkpoint_label(captioner.source)
        self.model_lock = asyncio.Lock()
        self.readers = ThreadPoolExecutor(settings.read_workers, thread_name_prefix="read")
        self.jobs = {}  # job id -> {stage, done, total} while its request is in flight
        self.work = {"caption": Work(settings.max_queue, settings.time_limit, decoding_options, caption_clip),
                     "scenes": Work(settings.max_scenes_queue, settings.scenes_time_limit, segment_options,
                                    caption_scenes)}
        self.admitted = Counter()  # kind of work -> its requests uploading, waiting or working

    @contextmanager
    def queue_place(self, kind):
        """A place in the queue of this kind of work, released on every path; 503 if it is full."""
        size = self.work[kind].queue_size
        if self.admitted[kind] >= size:
            raise RequestError(503, f"busy: {size} {kind} requests are in flight; try again shortly",
                               {"Retry-After": str(max(1, math.ceil(self.work[kind].time_limit / 4)))})
        self.admitted[kind] += 1
        try:
            yield
        finally:
            self.admitted[kind] -= 1

    @asynccontextmanager
    async def job(self, request, time_limit):
        """The request's Job, its id registered for /api/progress and its upload folder made; both go at the end."""
        job_id = request.query_params.get("job")
        if job_id is not None and not _JOB.fullmatch(job_id):
            raise RequestError(400, "job must be 1-64 letters, digits, '-' or '_'")
        if job_id in self.jobs:
            raise RequestError(409, f"job id {job_id!r} is already in flight")
        job = Job(self, request, make_upload_folder(), time_limit)
        if job_id is not None:
            self.jobs[job_id] = job.progress
        try:
            yield job
        finally:
            job.end()
            self.jobs.pop(job_id, None)

    async def handle(self, request, kind):
        """What every upload request shares: a place in its queue, a Job, the options, then the work of its kind.
        Every failure is the API's JSON."""
        work = self.work[kind]
        try:
            with self.queue_place(kind):
                async with self.job(request, work.time_limit) as job:
                    options = work.options_of(request.query_params, self.settings)
                    try:
                        return JSONResponse(await work.run(job, options))
                    except VideoError as error:  # the upload's, on every route: stopped, over a cap, or unreadable
                        raise job.refusal(error) from None
        except RequestError as error:
            return error_response(error.status, error, error.headers)
        except Exception as error:  # the server goes on serving; the traceback goes to its log
            traceback.print_exc()
            return await server_error(request, error)


class Job:
    """One upload request in flight, the context its handler works in: its progress, its upload folder, its
    deadlines and whether its client has gone; and the reading pool and the model, taken in turn."""

    def __init__(self, service, request, folder, time_limit):
        self.service, self.request, self.folder, self.time_limit = service, request, folder, time_limit
        self.progress = {"stage": "uploading", "done": 0, "total": 0}
        self.path = self.name = self.deadline = self.watcher = None
        self.gone = asyncio.Event()
        self.started, self.spent = time.perf_counter(), Counter()  # spent: seconds reading, queued, captioning

    async def receive(self):
        """The upload, within its own deadline and minimum rate; then the work's time limit starts."""
        settings = self.service.settings
        pace = UploadPace(settings.upload_time_limit, settings.upload_min_rate)
        self.path, self.name = await receive_upload(self.request, self.folder, settings.max_upload_bytes, pace)
        self.spent["upload_s"] = time.perf_counter() - self.started
        self.deadline = time.monotonic() + self.time_limit
        self.watcher = asyncio.create_task(watch_disconnect(self.request, self.gone))

    def stop(self):
        """Asked by the reading and captioning threads between frames and batches."""
        return self.gone.is_set() or (self.deadline is not None and time.monotonic() > self.deadline)

    def report(self, stage, done, total):
        if self.stop():
            raise ReadingStopped("stopped")
        self.progress.update(stage=stage, done=done, total=total)

    async def read(self, function, *args):
        """function(*args) in the reading pool."""
        started = time.perf_counter()
        try:
            return await asyncio.get_running_loop().run_in_executor(self.service.readers, function, *args)
        finally:
            self.spent["read_s"] += time.perf_counter() - started

    async def with_model(self, function):
        """function() in a worker thread once this job's turn at the model comes: 503 if it does not come before
        the deadline; a job whose client left, or whose time is up, meanwhile lets the next in line go first."""
        waiting = time.perf_counter()
        try:
            await asyncio.wait_for(self.service.model_lock.acquire(), max(self.deadline - time.monotonic(), 0.001))
        except TimeoutError:
            raise RequestError(503, f"busy: no turn at the model within the time limit of "
                                    f"{self.time_limit:g} s") from None
        locked = time.perf_counter()
        self.spent["queued_s"] += locked - waiting
        try:
            if self.stop():
                raise ReadingStopped("stopped")
            return await run_in_threadpool(function)
        finally:
            self.service.model_lock.release()
            self.spent["caption_s"] += time.perf_counter() - locked

    def timings(self, *names):
        """{name: seconds} of these parts of the work, then total_s."""
        return {**{name: round(self.spent[name], 3) for name in names},
                "total_s": round(time.perf_counter() - self.started, 3)}

    def refusal(self, error):
        """The RequestError for a VideoError of the upload: stopped, 499 if the client went away, else 408 (past
        the time limit); over a cap, 413; unreadable, 422. The message names the client's file, not ours."""
        if isinstance(error, ReadingStopped):
            if self.gone.is_set():  # nobody reads this answer
                return RequestError(499, "the client went away")
            return RequestError(408, f"the request took longer than the time limit of {self.time_limit:g} s")
        return RequestError(413 if isinstance(error, OverLimit) else 422, str(error).replace(str(self.path),
                                                                                            str(self.name)))

    def end(self):
        if self.watcher is not None:
            self.watcher.cancel()
        shutil.rmtree(self.folder, ignore_errors=True)


async def watch_disconnect(request, gone, every=0.2):
    """Set `gone` once the client has closed its connection (after its upload was read)."""
    while not await request.is_disconnected():
        await asyncio.sleep(every)
    gone.set()


async def caption_clip(job, options):
    """POST /api/caption's work: the clip read in the reading pool, then captioned at the model's turn."""
    decoding, plot = options
    captioner = job.service.captioner
    await job.receive()
    job.progress.update(stage="reading")
    clip = await job.read(captioner.read_clip, job.path, job.service.settings.limits, job.stop)
    job.progress.update(stage="queued")
    result = await job.with_model(lambda: captioner.caption(clip, attention=True, progress=job.report, **decoding))
    body = {"file": job.name, "checkpoint": job.service.label, "decoding": decoding, **result.to_dict(),
            "frames": captioner.frames}
    if plot:
        job.progress.update(stage="plotting", done=0, total=0)
        started, png = time.perf_counter(), job.folder / "attention.png"
        await run_in_threadpool(result.plot_attention, png, f"{job.name}: {result.caption}")
        body["attention_png"] = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
        job.spent["plot_s"] = time.perf_counter() - started
    body["timings"] = job.timings("upload_s", "read_s", "queued_s", "caption_s", "plot_s")
    return body


async def caption_scenes(job, options):
    """POST /api/scenes's work: the video read in the reading pool a batch of scenes at a time, each batch
    captioned at its own turn at the model, so a caption request waits at most one batch behind it."""
    segments, beam_size = options
    captioner, settings = job.service.captioner, job.service.settings
    await job.receive()
    job.progress.update(stage="checking")
    reader = await job.read(lambda: captioner.scene_reader(job.path, segments, settings.min_segment, None,
                                                           settings.max_video_seconds, settings.limits.pixels,
                                                           job.stop))
    total = round(reader.duration or 0, 1)
    if segments != "auto" and total / segments > settings.max_scenes:
        raise OverLimit(f"{job.path}: more than {settings.max_scenes} scenes of {segments:g} s (the limit)")
    scenes = iter(reader)
    batches = captioner.scene_batches(reader, scenes, most=settings.scenes_per_turn)
    cues, turns = [], 0
    try:
        job.report("scenes", 0, total)
        while batch := await job.read(next, batches, None):
            if len(cues) + len(batch) > settings.max_scenes:
                raise OverLimit(f"{job.path}: more than {settings.max_scenes} scenes (the limit)")
            cues += await job.with_model(lambda: captioner.caption_scenes(batch, beam_size))
            turns += 1
            job.report("scenes", round(batch[-1].end, 1), total)
    finally:  # the video is closed now, not when the generators are collected, if the work ended early
        batches.close()
        scenes.close()
    cues = merge_repeats(cues)
    return {"file": job.name, "checkpoint": job.service.label, "segments": segments, "beam_size": beam_size,
            "duration_s": round(cues[-1].end, 3), "cues": cue_rows(cues), "srt": to_srt(cues), "vtt": to_vtt(cues),
            "timings": {**job.timings("upload_s", "read_s", "queued_s", "caption_s"), "turns": turns}}


async def page(request):
    return HTMLResponse(PAGE.read_text())


async def info(request):
    service = request.app.state.service
    settings = service.settings
    return JSONResponse({"checkpoint": service.label, "frames": service.captioner.frames,
                         "max_upload_bytes": settings.max_upload_bytes, "max_beam_size": MAX_BEAM,
                         "max_clip_seconds": settings.limits.seconds, "max_clip_frames": settings.limits.frames,
                         "max_clip_pixels": settings.limits.pixels, "time_limit_s": settings.time_limit,
                         "max_queue": settings.max_queue, "upload_time_limit_s": settings.upload_time_limit,
                         "upload_min_rate_kb": settings.upload_min_rate / 1000,
                         "max_video_seconds": settings.max_video_seconds,
                         "scenes_time_limit_s": settings.scenes_time_limit,
                         "max_scenes_queue": settings.max_scenes_queue, "min_segment_s": settings.min_segment,
                         "max_scenes": settings.max_scenes})


async def progress(request):
    job = request.app.state.service.jobs.get(request.path_params["job"])
    if job is None:
        return error_response(404, f"no request in flight with job id {request.path_params['job']!r}")
    return JSONResponse(job)


async def caption(request):
    return await request.app.state.service.handle(request, "caption")


async def scenes(request):
    return await request.app.state.service.handle(request, "scenes")


@asynccontextmanager
async def lifespan(app):
    """At start, the upload folders of killed servers go; at the end, the reading pool."""
    remove_stale_uploads()
    yield
    app.state.service.readers.shutdown(wait=False, cancel_futures=True)


def create_app(captioner, settings=Settings()):
    """The Starlette app around one Captioner. A Captioner that cannot read clips is refused (DataError)."""
    if captioner.feature_settings is None:
        raise DataError(f"{checkpoint_label(captioner.source)}: the checkpoint records no feature extractor (its "
                        f"features were not made by extract_features.py), so it cannot caption uploaded clips")
    middleware = [Middleware(TrustedHosts, allowed_hosts=[*LOCAL_HOSTS, *settings.allowed_hosts]),
                  Middleware(SameOriginPosts)]
    app = Starlette(routes=[Route("/", page), Route("/api/info", info),
                            Route("/api/caption", caption, methods=["POST"]),
                            Route("/api/scenes", scenes, methods=["POST"]),
                            Route("/api/progress/{job}", progress)],
                    middleware=middleware, exception_handlers={HTTPException: http_error, Exception: server_error},
                    lifespan=lifespan)
    app.state.service = Service(captioner, settings)
    return app


def exposure_warning(host):
    """A warning for --host beyond loopback, or None: the Host check stops DNS rebinding, not other machines."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost
        loopback = False
    if loopback:
        return None
    return (f"warning: --host {host} answers other machines too: the Host check (--allowed-host) only refuses "
            f"pages that rebind their domain name to this machine (DNS rebinding); it is not access control, and "
            f"any machine that reaches the port can send 'Host: localhost' and caption")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="run folder, checkpoint, release name (checkpoints/releases.json) or "
                                             "URL of a released .tar.gz (default: the newest run's best)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only; "
                                                            "any other warns: there is no access control)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-upload-mb", type=float, default=200, help="larger uploads are refused (413)")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="also answer requests for this host name (repeatable; 127.0.0.1 and localhost always)")
    parser.add_argument("--max-clip-seconds", type=float, default=DEFAULT_LIMITS.seconds,
                        help="longer clips are refused (413)")
    parser.add_argument("--max-clip-frames", type=int, default=DEFAULT_LIMITS.frames,
                        help="clips with more frames are refused (413)")
    parser.add_argument("--max-clip-pixels", type=int, default=DEFAULT_LIMITS.pixels,
                        help="clips with larger frames (width * height) are refused (413); default 4K")
    parser.add_argument("--time-limit", type=float, default=Settings.time_limit,
                        help="seconds a caption's work may take after its upload (408)")
    parser.add_argument("--max-queue", type=int, default=Settings.max_queue,
                        help="captions uploading, waiting or working at once; more get 503 with Retry-After")
    parser.add_argument("--read-workers", type=int, default=Settings.read_workers, help="threads reading videos")
    parser.add_argument("--upload-time-limit", type=float, default=Settings.upload_time_limit,
                        help="seconds an upload may take (408)")
    parser.add_argument("--upload-min-rate-kb", type=float, default=Settings.upload_min_rate / 1000,
                        help=f"an upload slower than this many kB/s (after its first {UPLOAD_GRACE_S:g} s) is cut off "
                             f"(408)")
    parser.add_argument("--max-video-seconds", type=float, default=MAX_VIDEO_SECONDS,
                        help="videos captioned scene by scene (/api/scenes) may be this long (413 past it)")
    parser.add_argument("--scenes-time-limit", type=float, default=SCENES_TIME_LIMIT,
                        help="seconds a scene-by-scene request's work may take after its upload (408)")
    parser.add_argument("--max-scenes-queue", type=int, default=Settings.max_scenes_queue,
                        help="scene-by-scene requests uploading, waiting or working at once (503 past it)")
    parser.add_argument("--min-segment", type=float, default=Settings.min_segment,
                        help=f"seconds at least between cuts, fixed windows included (400 for shorter segments); "
                             f"from {MIN_SCENE:g} up to {MAX_SCENE:g}")
    parser.add_argument("--max-scenes", type=int, default=Settings.max_scenes,
                        help="scenes a video may be cut into (413 past it)")
    parser.add_argument("--scenes-per-turn", type=int, default=Settings.scenes_per_turn,
                        help="scenes captioned at each turn of a scene-by-scene request at the model: a caption "
                             "waits at most one such turn")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    for flag in ("max_upload_mb", "max_clip_seconds", "max_clip_frames", "max_clip_pixels", "time_limit",
                 "max_queue", "read_workers", "upload_time_limit", "upload_min_rate_kb", "max_video_seconds",
                 "scenes_time_limit", "max_scenes_queue", "max_scenes", "scenes_per_turn"):
        if not getattr(args, flag) > 0:
            parser.error(f"--{flag.replace('_', '-')} must be positive")
    if not MIN_SCENE <= args.min_segment < MAX_SCENE:
        parser.error(f"--min-segment must be from {MIN_SCENE:g} up to (not including) {MAX_SCENE:g}")
    return args


def settings_of(args):
    """The Settings that parse_args's flags give."""
    return Settings(max_upload_bytes=int(args.max_upload_mb * 1e6),
                    limits=ClipLimits(args.max_clip_seconds, args.max_clip_frames, args.max_clip_pixels),
                    time_limit=args.time_limit, max_queue=args.max_queue, read_workers=args.read_workers,
                    allowed_hosts=tuple(args.allowed_host), upload_time_limit=args.upload_time_limit,
                    upload_min_rate=args.upload_min_rate_kb * 1000, max_video_seconds=args.max_video_seconds,
                    scenes_time_limit=args.scenes_time_limit, max_scenes_queue=args.max_scenes_queue,
                    min_segment=args.min_segment, max_scenes=args.max_scenes, scenes_per_turn=args.scenes_per_turn)


@command
def main(argv=None):
    args = parse_args(argv)
    warning = exposure_warning(args.host)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    import uvicorn

    captioner = Captioner.load(args.checkpoint)
    app = create_app(captioner, settings_of(args))
    print(f"captioning with {captioner.source}: open http://{args.host}:{args.port}/ (Ctrl-C stops)", flush=True)
    # uvicorn's own cap on open requests (GETs included) backs up the queues
    uvicorn.run(app, host=args.host, port=args.port, log_level="info",
                limit_concurrency=4 * (args.max_queue + args.max_scenes_queue) + 16)
    return 0


if __name__ == "__main__":
    sys.exit(main())
