"""A local web page and JSON API that caption uploaded clips with a trained checkpoint.

    python serve.py [--checkpoint NAME|RUN_DIR|CKPT|URL] [--host 127.0.0.1] [--port 8000] [--max-upload-mb 200]

    GET  /                   the page: choose or drop a clip; see its caption, the n-best list and the attention
    GET  /api/info           the checkpoint, its frames and the upload limit
    POST /api/caption        multipart/form-data with one `file` part; query: beam_size (default 5), n_best
                             (default 3), length_penalty (0), plot (1: the attention as a PNG data URL), job (an id
                             of the caller's choosing for /api/progress) -> JSON caption, n_best, attention, timings
    GET  /api/progress/JOB   {stage, done, total} of the request in flight with that job id

An upload goes to a temporary folder that is removed when its request ends, failures included; the body is
counted as it streams in and refused (413) past --max-upload-mb. One request uses the model at a time. Each bad
request gets a 4xx status and a one-line JSON body {"error": "..."}.
"""
import argparse
import asyncio
import base64
import re
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from captioner import Captioner, VideoError
from extract_features import VIDEO_SUFFIXES
from util.errors import command

PAGE = Path(__file__).resolve().parent / "util" / "serve_page.html"
_JOB = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_BEAM = 20


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


def create_app(captioner, max_upload_bytes):
    """The Starlette app around one Captioner."""
    model_lock = asyncio.Lock()
    jobs = {}  # job id -> {stage, done, total} while its request is in flight

    async def page(request):
        return HTMLResponse(PAGE.read_text())

    async def info(request):
        return JSONResponse({"checkpoint": str(captioner.source), "frames": captioner.frames,
                             "max_upload_bytes": max_upload_bytes, "max_beam_size": MAX_BEAM})

    async def progress(request):
        job = jobs.get(request.path_params["job"])
        if job is None:
            return JSONResponse({"error": f"no request in flight with job id {request.path_params['job']!r}"}, 404)
        return JSONResponse(job)

    async def caption(request):
        job_id, job = request.query_params.get("job"), {"stage": "uploading", "done": 0, "total": 0}
        folder = Path(tempfile.mkdtemp(prefix="s2vt-serve-"))
        started = time.perf_counter()
        try:
            if job_id is not None:
                if not _JOB.fullmatch(job_id):
                    raise RequestError(400, "job must be 1-64 letters, digits, '-' or '_'")
                if job_id in jobs:
                    raise RequestError(409, f"job id {job_id!r} is already in flight")
                jobs[job_id] = job
            decoding, plot = decoding_options(request.query_params)
            path, name = await receive_upload(request, folder, max_upload_bytes)
            uploaded = time.perf_counter()
            job.update(stage="queued")

            def report(stage, done, total):
                job.update(stage=stage, done=done, total=total)

            async with model_lock:
                locked = time.perf_counter()
                try:
                    result = await run_in_threadpool(captioner.caption, path, attention=True, progress=report,
                                                     **decoding)
                except VideoError as error:
                    raise RequestError(422, f"{name}: {str(error).removeprefix(f'{path}: ')}") from None
            captioned = time.perf_counter()
            body = {"file": name, "checkpoint": str(captioner.source), "decoding": decoding, **result.to_dict(),
                    "frames": captioner.frames}
            if plot:
                job.update(stage="plotting", done=0, total=0)
                png = folder / "attention.png"
                await run_in_threadpool(result.plot_attention, png, f"{name}: {result.caption}")
                body["attention_png"] = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
            finished = time.perf_counter()
            body["timings"] = {"upload_s": round(uploaded - started, 3), "queued_s": round(locked - uploaded, 3),
                               "caption_s": round(captioned - locked, 3), "plot_s": round(finished - captioned, 3),
                               "total_s": round(finished - started, 3)}
            return JSONResponse(body)
        except RequestError as error:
            return JSONResponse({"error": str(error)}, error.status)
        except Exception as error:  # the server goes on serving; the traceback goes to its log
            traceback.print_exc()
            return JSONResponse({"error": f"internal error: {type(error).__name__}: "
                                          f"{(str(error).splitlines() or [''])[0]}"}, 500)
        finally:
            if jobs.get(job_id) is job:
                del jobs[job_id]
            shutil.rmtree(folder, ignore_errors=True)

    return Starlette(routes=[Route("/", page), Route("/api/info", info),
                             Route("/api/caption", caption, methods=["POST"]),
                             Route("/api/progress/{job}", progress)])


@command
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="run folder, checkpoint, release name (checkpoints/releases.json) or "
                                             "URL of a released .tar.gz (default: the newest run's best)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-upload-mb", type=float, default=200, help="larger uploads are refused (413)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    if args.max_upload_mb <= 0:
        parser.error("--max-upload-mb must be positive")
    import uvicorn

    captioner = Captioner.load(args.checkpoint)
    print(f"captioning with {captioner.source}: open http://{args.host}:{args.port}/ (Ctrl-C stops)", flush=True)
    uvicorn.run(create_app(captioner, int(args.max_upload_mb * 1e6)), host=args.host, port=args.port,
                log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
