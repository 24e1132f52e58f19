"""A local web page and JSON API that caption uploaded clips with a trained checkpoint.

    python serve.py [--checkpoint NAME|RUN_DIR|CKPT|URL] [--host 127.0.0.1] [--port 8000] [--max-upload-mb 200]
                    [--allowed-host NAME ...] [--max-clip-seconds 60] [--max-clip-frames 3000]
                    [--max-clip-pixels 8300000] [--time-limit 60] [--max-queue 8] [--decode-workers 2]
                    [--max-video-seconds 1800] [--scenes-time-limit 600]

    GET  /                   the page: choose or drop a clip; see its caption, the n-best list and the attention
    GET  /api/info           the checkpoint, its frames and the upload limit
    POST /api/caption        multipart/form-data with one `file` part; query: beam_size (default 5), n_best
                             (default 3), length_penalty (0), plot (1: the attention as a PNG data URL), job (an id
                             of the caller's choosing for /api/progress) -> JSON caption, n_best, attention, timings
    POST /api/scenes         the same upload, a long video captioned scene by scene (Captioner.caption_segments);
                             query: segments (auto or SECONDS), beam_size (5), job -> JSON cues [{start, end,
                             caption, score}], srt and vtt (the cues as subtitle files), timings
    GET  /api/progress/JOB   {stage, done, total} of the request in flight with that job id

An upload goes to a temporary folder that is removed when its request ends, failures included; the body is
counted as it streams in and refused (413) past --max-upload-mb. Work is bounded: at most --max-queue captions
are uploading, waiting or working at once (more get 503 with Retry-After); a clip over --max-clip-seconds,
-frames or -pixels is refused (413) from its header before decoding and again while decoding; a request past
--time-limit seconds gets 408 (or 503 if it is still waiting for the model); a client that goes away has its
decoding stopped and never reaches the model. A video captioned scene by scene has caps of its own: at most
--max-video-seconds long (the frame-size cap is --max-clip-pixels) and --scenes-time-limit seconds of work. Clips are decoded in a pool of --decode-workers threads, apart from
the model, which one request uses at a time. Only requests for 127.0.0.1, localhost and --allowed-host names are
answered (400 otherwise), and a POST from a page of another origin gets 403, so other sites open in the same
browser cannot use the server. Every error is a 4xx/5xx status with a one-line JSON body {"error": "..."} naming
no server path.
"""
import argparse
import asyncio
import base64
import math
import re
import shutil
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
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
from util.errors import DataError, command
from util.scenes import SceneReader, parse_segments
from util.subtitles import cue_rows, to_srt, to_vtt
from util.video import VIDEO_SUFFIXES, ClipLimits, OverLimit, ReadingStopped, VideoError

PAGE = Path(__file__).resolve().parent / "util" / "serve_page.html"
_JOB = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_BEAM = 20
LOCAL_HOSTS = ("127.0.0.1", "localhost")
DEFAULT_LIMITS = ClipLimits(seconds=60.0, frames=3000, pixels=3840 * 2160)
MAX_VIDEO_SECONDS = 1800.0  # scene by scene: half an hour of the demo's video takes about 80 s on 2 CPU cores
SCENES_TIME_LIMIT = 600.0


class RequestError(Exception):
    """A bad request: its HTTP status and a one-line message."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


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
    page that rebinds its own domain name to 127.0.0.1 still sends that name, and is refused."""

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


def video_error_response(error, limit, client_gone, path, name):
    """The answer to a VideoError of an upload at `path` that the client named `name`: stopped, 499 if the client
    went away, else 408 (past the time limit of `limit` s); over a cap, 413; unreadable, 422."""
    if isinstance(error, ReadingStopped):
        if client_gone:  # nobody reads this answer
            return error_response(499, "the client went away")
        return error_response(408, f"the request took longer than the time limit of {limit:g} s")
    return error_response(413 if isinstance(error, OverLimit) else 422, str(error).replace(path, name))


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


async def receive_upload(request, folder, max_bytes):
    """Stream the multipart body into folder, counting bytes as they come: (path of the clip, client's name)."""
    content_type, options = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data" or not options.get(b"boundary"):
        raise RequestError(415, f"expected a multipart/form-data upload with a `file` part, not "
                                f"{content_type.decode('latin-1') or 'no content type'}")
    length = request.headers.get("content-length", "0")
    if not length.isdigit():
        raise RequestError(400, f"Content-Length {length!r} is not a whole number")
    if int(length) > max_bytes:
        raise RequestError(413, f"upload of {int(length)} bytes is over the limit of {max_bytes} bytes")
    parts = UploadParts(folder)
    received = 0
    try:
        parser = MultipartParser(options[b"boundary"], parts.callbacks())
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes:
                raise RequestError(413, f"upload is over the limit of {max_bytes} bytes")
            parser.write(chunk)
        parser.finalize()
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


def decoding_options(query):
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


def segment_options(query):
    """segments and beam_size of a scene-by-scene request, checked."""
    try:
        segments = parse_segments(query.get("segments", "auto"))
        beam_size = int(query.get("beam_size", 5))
    except (DataError, ValueError) as error:
        raise RequestError(400, f"bad option ({error})") from None
    if not 1 <= beam_size <= MAX_BEAM:
        raise RequestError(400, f"need 1 <= beam_size <= {MAX_BEAM}")
    return segments, beam_size


def checkpoint_label(source):
    """The checkpoint as shown to clients: its run folder's name and the checkpoint's, no absolute path."""
    return "/".join(Path(str(source)).parts[-3:])


def create_app(captioner, max_upload_bytes, limits=DEFAULT_LIMITS, time_limit=60.0, max_queue=8, decode_workers=2,
               allowed_hosts=(), max_video_seconds=MAX_VIDEO_SECONDS, scenes_time_limit=SCENES_TIME_LIMIT):
    """The Starlette app around one Captioner. A Captioner that cannot read clips is refused (DataError)."""
    if captioner.feature_settings is None:
        raise DataError(f"{checkpoint_label(captioner.source)}: the checkpoint records no feature extractor (its "
                        f"features were not made by extract_features.py), so it cannot caption uploaded clips")
    model_lock = asyncio.Lock()
    decoders = ThreadPoolExecutor(decode_workers, thread_name_prefix="decode")
    jobs = {}  # job id -> {stage, done, total} while its request is in flight
    admitted = {"count": 0}  # requests uploading, waiting or working
    label = checkpoint_label(captioner.source)

    async def page(request):
        return HTMLResponse(PAGE.read_text())

    async def info(request):
        return JSONResponse({"checkpoint": label, "frames": captioner.frames, "max_upload_bytes": max_upload_bytes,
                             "max_beam_size": MAX_BEAM, "max_clip_seconds": limits.seconds,
                             "max_clip_frames": limits.frames, "max_clip_pixels": limits.pixels,
                             "time_limit_s": time_limit, "max_queue": max_queue,
                             "max_video_seconds": max_video_seconds, "scenes_time_limit_s": scenes_time_limit})

    async def progress(request):
        job = jobs.get(request.path_params["job"])
        if job is None:
            return error_response(404, f"no request in flight with job id {request.path_params['job']!r}")
        return JSONResponse(job)

    async def take_upload(request, limit, options_of, work):
        """What every upload request shares: a place in the queue, the job id, the options (options_of(query)),
        the upload into a temporary folder removed at the end, the time limit and the client's leaving; then
        await work(options, path, name, folder, job, stop, report, deadline, times) -> the JSON body. Every failure
        is the API's JSON."""
        if admitted["count"] >= max_queue:
            return error_response(503, f"busy: {max_queue} requests are in flight; try again shortly",
                                  {"Retry-After": str(max(1, math.ceil(time_limit / 4)))})
        admitted["count"] += 1
        job_id, job = request.query_params.get("job"), {"stage": "uploading", "done": 0, "total": 0}
        folder = Path(tempfile.mkdtemp(prefix="s2vt-serve-"))
        times = {"started": time.perf_counter()}
        deadline = time.monotonic() + limit
        gone = asyncio.Event()
        watcher = None
        try:
            if job_id is not None:
                if not _JOB.fullmatch(job_id):
                    raise RequestError(400, "job must be 1-64 letters, digits, '-' or '_'")
                if job_id in jobs:
                    raise RequestError(409, f"job id {job_id!r} is already in flight")
                jobs[job_id] = job
            options = options_of(request.query_params)
            try:
                async with asyncio.timeout_at(asyncio.get_running_loop().time() + limit):
                    path, name = await receive_upload(request, folder, max_upload_bytes)
            except TimeoutError:
                raise RequestError(408, f"the upload took longer than the time limit of {limit:g} s") from None
            times["uploaded"] = time.perf_counter()
            watcher = asyncio.create_task(watch_disconnect(request, gone))

            def stop():  # asked by the decoding and captioning threads between frames and batches
                return gone.is_set() or time.monotonic() > deadline

            def report(stage, done, total):
                if stop():
                    raise ReadingStopped("stopped")
                job.update(stage=stage, done=done, total=total)

            return JSONResponse(await work(options, path, name, folder, job, stop, report, deadline, times))
        except VideoError as error:  # the upload's, on every route: stopped, over a cap, or unreadable
            return video_error_response(error, limit, gone.is_set(), str(path), name)
        except RequestError as error:
            return error_response(error.status, error)
        except Exception as error:  # the server goes on serving; the traceback goes to its log
            traceback.print_exc()
            return await server_error(request, error)
        finally:
            admitted["count"] -= 1
            if watcher is not None:
                watcher.cancel()
            if jobs.get(job_id) is job:
                del jobs[job_id]
            shutil.rmtree(folder, ignore_errors=True)

    async def model_turn(deadline, limit):
        """Wait for the model until the deadline: 503 past it."""
        try:
            await asyncio.wait_for(model_lock.acquire(), max(deadline - time.monotonic(), 0.001))
        except TimeoutError:
            raise RequestError(503, f"busy: no turn at the model within the time limit of {limit:g} s") from None

    async def caption_clip(options, path, name, folder, job, stop, report, deadline, times):
        decoding, plot = options
        job.update(stage="decoding")
        clip = await asyncio.get_running_loop().run_in_executor(
            decoders, lambda: captioner.read_clip(path, limits, stop))
        decoded = time.perf_counter()
        job.update(stage="queued")
        await model_turn(deadline, time_limit)
        try:
            if stop():  # the client left or the time is up while waiting: the next in line goes first
                raise ReadingStopped("stopped")
            locked = time.perf_counter()
            result = await run_in_threadpool(captioner.caption, clip, attention=True, progress=report, **decoding)
        finally:
            model_lock.release()
        captioned = time.perf_counter()
        body = {"file": name, "checkpoint": label, "decoding": decoding, **result.to_dict(),
                "frames": captioner.frames}
        if plot:
            job.update(stage="plotting", done=0, total=0)
            png = folder / "attention.png"
            await run_in_threadpool(result.plot_attention, png, f"{name}: {result.caption}")
            body["attention_png"] = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
        finished = time.perf_counter()
        body["timings"] = {"upload_s": round(times["uploaded"] - times["started"], 3),
                           "decode_s": round(decoded - times["uploaded"], 3), "queued_s": round(locked - decoded, 3),
                           "caption_s": round(captioned - locked, 3), "plot_s": round(finished - captioned, 3),
                           "total_s": round(finished - times["started"], 3)}
        return body

    async def caption_scenes(options, path, name, folder, job, stop, report, deadline, times):
        segments, beam_size = options
        job.update(stage="checking")
        reader = await asyncio.get_running_loop().run_in_executor(  # the header's caps, before waiting for the model
            decoders, lambda: SceneReader(path, 1, 1, segments, max_seconds=max_video_seconds,
                                          max_pixels=limits.pixels))
        job.update(stage="queued", done=0, total=round(reader.duration or 0, 1))
        await model_turn(deadline, scenes_time_limit)
        try:
            if stop():
                raise ReadingStopped("stopped")
            locked = time.perf_counter()
            cues = await run_in_threadpool(
                captioner.caption_segments, path, segments, beam_size=beam_size, max_seconds=max_video_seconds,
                max_pixels=limits.pixels, stop=stop,
                progress=lambda done, total: report("scenes", round(done, 1), round(total or 0, 1)))
        finally:
            model_lock.release()
        finished = time.perf_counter()
        return {"file": name, "checkpoint": label, "segments": segments, "beam_size": beam_size,
                "duration_s": round(cues[-1].end, 3),
                "cues": cue_rows(cues),
                "srt": to_srt(cues), "vtt": to_vtt(cues),
                "timings": {"upload_s": round(times["uploaded"] - times["started"], 3),
                            "queued_s": round(locked - times["uploaded"], 3), "caption_s": round(finished - locked, 3),
                            "total_s": round(finished - times["started"], 3)}}

    async def caption(request):
        return await take_upload(request, time_limit, decoding_options, caption_clip)

    async def scenes(request):
        return await take_upload(request, scenes_time_limit, segment_options, caption_scenes)

    middleware = [Middleware(TrustedHosts, allowed_hosts=[*LOCAL_HOSTS, *allowed_hosts]),
                  Middleware(SameOriginPosts)]
    return Starlette(routes=[Route("/", page), Route("/api/info", info),
                             Route("/api/caption", caption, methods=["POST"]),
                             Route("/api/scenes", scenes, methods=["POST"]),
                             Route("/api/progress/{job}", progress)],
                     middleware=middleware, exception_handlers={HTTPException: http_error, Exception: server_error})


async def watch_disconnect(request, gone, every=0.2):
    """Set `gone` once the client has closed its connection (after its upload was read)."""
    while not await request.is_disconnected():
        await asyncio.sleep(every)
    gone.set()


@command
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="run folder, checkpoint, release name (checkpoints/releases.json) or "
                                             "URL of a released .tar.gz (default: the newest run's best)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
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
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds a request may take (408)")
    parser.add_argument("--max-queue", type=int, default=8,
                        help="requests uploading, waiting or working at once; more get 503 with Retry-After")
    parser.add_argument("--decode-workers", type=int, default=2, help="threads decoding clips")
    parser.add_argument("--max-video-seconds", type=float, default=MAX_VIDEO_SECONDS,
                        help="videos captioned scene by scene (/api/scenes) may be this long (413 past it)")
    parser.add_argument("--scenes-time-limit", type=float, default=SCENES_TIME_LIMIT,
                        help="seconds a scene-by-scene request may take (408)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    for flag in ("max_upload_mb", "max_clip_seconds", "max_clip_frames", "max_clip_pixels", "time_limit",
                 "max_queue", "decode_workers", "max_video_seconds", "scenes_time_limit"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be positive")
    import uvicorn

    captioner = Captioner.load(args.checkpoint)
    limits = ClipLimits(args.max_clip_seconds, args.max_clip_frames, args.max_clip_pixels)
    app = create_app(captioner, int(args.max_upload_mb * 1e6), limits, args.time_limit, args.max_queue,
                     args.decode_workers, args.allowed_host, args.max_video_seconds, args.scenes_time_limit)
    print(f"captioning with {captioner.source}: open http://{args.host}:{args.port}/ (Ctrl-C stops)", flush=True)
    # uvicorn's own cap on open requests (GETs included) backs up --max-queue's
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", limit_concurrency=4 * args.max_queue + 16)
    return 0


if __name__ == "__main__":
    sys.exit(main())
