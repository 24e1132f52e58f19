"""serve.py over 127.0.0.1: the JSON API on real clips, every kind of bad upload (a 4xx status, a one-line JSON
error, the server still serving and no temporary file left), progress of a request in flight, and the page in
headless Chromium."""
import asyncio
import base64
import errno
import http.client
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest

from captioner import Captioner
from conftest import ROOT

LIMIT_MB = 2  # over the largest real clip (1.25 MB)
MAX_FRAMES, MAX_PIXELS = 600, 640 * 480  # over the real test clips (360 frames, 640x480 at most)
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


class Server:
    def __init__(self, port, tmp, process, log):
        self.port, self.tmp, self.process, self.log = port, tmp, process, log

    def connection(self):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)

    def get(self, path):
        connection = self.connection()
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()

    def post(self, body, content_type, query="", path="/api/caption"):
        connection = self.connection()
        connection.request("POST", f"{path}{query}", body=body, headers={"Content-Type": content_type})
        response = connection.getresponse()
        return response.status, response.read()

    def caption(self, name, data, query=""):
        return self.post(*multipart(name, data), query=query)

    def raw(self, head, chunks=(), read=True):
        """Send a request's head and body chunks on a plain socket, as far as the server takes them; then
        (status, body) of its reply, or None without read (the socket is closed: an upload cut off)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            try:
                sock.sendall(head)
                for chunk in chunks:
                    sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError, socket.timeout):
                pass  # the server answered before reading everything
            if not read:
                return None
            sock.settimeout(60)
            reply = b""
            while b"\r\n\r\n" not in reply or len(reply.partition(b"\r\n\r\n")[2]) < _content_length(reply):
                data = sock.recv(65536)
                if not data:
                    break
                reply += data
        head, _, body = reply.partition(b"\r\n\r\n")
        return int(head.split()[1]), body

    def temp_entries(self):
        """The server's upload folders left in its TMPDIR (TensorFlow's autograph writes files there too)."""
        return sorted(p.name for p in self.tmp.glob("s2vt-serve-*"))


def _content_length(reply):
    for line in reply.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def multipart(name, data, field="file", boundary="s2vt-test-boundary", close=True):
    """(body, content type) of a multipart/form-data upload of one file."""
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    if close:
        body += f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(video_run, root, *flags):
    """serve.py in a child process, started from an unrelated folder, its temporary files in a folder of its own:
    yields the Server once it answers."""
    tmp = root / "tmp"
    tmp.mkdir()
    port = free_port()
    log = open(root / "serve.log", "w+")
    process = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--checkpoint", str(video_run),
                                "--port", str(port), *flags],
                               cwd=root, env=dict(os.environ, TMPDIR=str(tmp)), stdout=log, stderr=subprocess.STDOUT)
    server = Server(port, tmp, process, log)
    deadline = time.monotonic() + 120
    while True:
        try:
            if server.get("/api/info")[0] == 200:
                break
        except OSError:
            pass
        log.seek(0)
        assert process.poll() is None and time.monotonic() < deadline, f"serve.py did not start:\n{log.read()}"
        time.sleep(0.5)
    yield server
    process.terminate()
    process.wait(timeout=30)
    log.close()


class InProcessServer(Server):
    """serve.py's app under uvicorn in a thread of this process: its upload folders are this process's."""

    def temp_entries(self):
        from serve import UPLOAD_PREFIX
        from util.atomic import owner_tag

        return sorted(p.name for p in self.tmp.glob(f"{UPLOAD_PREFIX}{owner_tag()}-*"))


def serve_in_process(captioner, *flags):
    """The app serve.py's flags make around an already loaded captioner, under uvicorn in a thread of this process
    (a serve.py child spends seconds starting Keras): yields the Server once it answers. The serve.py command line
    itself runs in the `server` fixture's child."""
    import uvicorn

    import serve

    port = free_port()
    app = serve.create_app(captioner, serve.settings_of(serve.parse_args(["--port", str(port), *flags])))
    uvicorn_server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uvicorn_server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield InProcessServer(port, Path(tempfile.gettempdir()), None, None)
    uvicorn_server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(video_run, tmp_path_factory):
    yield from start_server(video_run, tmp_path_factory.mktemp("serve"), "--max-upload-mb", str(LIMIT_MB),
                            "--max-clip-frames", str(MAX_FRAMES), "--max-clip-pixels", str(MAX_PIXELS))


@pytest.fixture(scope="module")
def real_clip(video_run):
    clips = sorted((ROOT.parent / "shared" / "data" / "mlds_hw2_1" / "testing_data" / "video").glob("*.avi"))
    if not clips:
        pytest.skip("real MLDS clips not found in ../shared")
    return clips[0]


def test_info_names_the_checkpoint_and_the_limits_but_no_path(server, video_run):
    status, body = server.get("/api/info")
    info = json.loads(body)
    assert status == 200 and info["checkpoint"].startswith("run/best/") and info["frames"] == 6
    assert str(video_run.parent) not in body.decode() and not info["checkpoint"].startswith("/")
    assert info["max_upload_bytes"] == LIMIT_MB * 1_000_000 and info["max_clip_frames"] == MAX_FRAMES


def test_caption_real_clips(server, shared_captioner, mlds):
    for clip in sorted((mlds / "testing_data" / "video").glob("*.avi"))[:2]:
        status, raw = server.caption(clip.name, clip.read_bytes(), "?beam_size=3&n_best=2&plot=1")
        assert status == 200, raw
        body = json.loads(raw)
        want = shared_captioner.caption(clip, beam_size=3, n_best=2, attention=True)
        assert body["file"] == clip.name and body["caption"] == want.caption
        assert [h["caption"] for h in body["n_best"]] == [h.caption for h in want.n_best]
        assert [h["score"] for h in body["n_best"]] == pytest.approx([h.score for h in want.n_best], abs=1e-3)
        assert body["attention"]["words"] == list(want.words)
        np.testing.assert_allclose(body["attention"]["weights"], want.attention, atol=1e-3)
        assert body["decoding"] == {"beam_size": 3, "n_best": 2, "length_penalty": 0.0}
        png = body["attention_png"].removeprefix("data:image/png;base64,")
        assert base64.b64decode(png)[:8] == b"\x89PNG\r\n\x1a\n"
        assert set(body["timings"]) == {"upload_s", "read_s", "queued_s", "caption_s", "plot_s", "total_s"}
        assert body["checkpoint"].startswith("run/best/")
    assert not server.temp_entries()


def truncated(clip):
    body, content_type = multipart(clip.name, clip.read_bytes())
    return body[:len(body) // 2], content_type


def oversized_head(content_length):
    return (f"POST /api/caption HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {content_length}\r\n\r\n").encode()


def pieces(data, size):
    return [data[start:start + size] for start in range(0, len(data), size)]


def chunked(parts):
    return [f"{len(part):x}\r\n".encode() + part + b"\r\n" for part in parts] + [b"0\r\n\r\n"]


# (send, status, error): send(server, clip) makes the request and returns (status, body)
BAD_UPLOADS = {
    "text-named-avi": (lambda s, clip: s.caption("notes.avi", b"not a video\n" * 100), 422,
                       "notes.avi: not a video OpenCV can open"),
    "text-file-name": (lambda s, clip: s.caption("notes.txt", b"not a video\n"), 415,
                       "notes.txt: not a video file name"),
    "empty-file": (lambda s, clip: s.caption("empty.avi", b""), 422, "empty.avi: empty file (0 bytes)"),
    "path-like-name": (lambda s, clip: s.caption("../../x.avi", clip.read_bytes()), 400,
                       "'../../x.avi': a file name, not a path, is expected"),
    "windows-path-name": (lambda s, clip: s.caption("..\\..\\x.avi", clip.read_bytes()), 400,
                          "a file name, not a path, is expected"),
    "json-content-type": (lambda s, clip: s.post(b'{"file": "x.avi"}', "application/json"), 415,
                          "expected a multipart/form-data upload with a `file` part, not application/json"),
    "no-file-part": (lambda s, clip: s.post(*multipart("x.avi", clip.read_bytes(), field="video")), 400,
                     "no `file` part in the upload"),
    "no-closing-boundary": (lambda s, clip: s.post(*multipart(clip.name, clip.read_bytes(), close=False)), 400,
                            "no closing boundary"),
    "bad-beam-size": (lambda s, clip: s.caption(clip.name, clip.read_bytes(), "?beam_size=0"), 400,
                      "need 1 <= beam_size <= 20"),
    # refused on its Content-Length before any of the body is read
    "oversized-declared": (lambda s, clip: s.raw(oversized_head(3 * LIMIT_MB * 1_000_000)), 413,
                           f"upload of {3 * LIMIT_MB * 1_000_000} bytes is over the limit of "
                           f"{LIMIT_MB * 1_000_000} bytes"),
    # no Content-Length: counted as it streams in, refused once past the limit
    "oversized-streamed": (lambda s, clip: s.raw(
        b"POST /api/caption HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n", chunked(pieces(multipart("big.avi", b"x" * 3 * LIMIT_MB * 1_000_000,
                                                                  boundary="b")[0], 250_000))),
        413, f"upload is over the limit of {LIMIT_MB * 1_000_000} bytes"),
}


def still_serves(server, clip):
    status, body = server.caption(clip.name, clip.read_bytes())
    assert status == 200 and len(json.loads(body)["n_best"]) == 3, body  # the default beam 5, 3 best


def no_temp_files_left(server, wait=0.0):
    deadline = time.monotonic() + wait
    while server.temp_entries() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not server.temp_entries(), server.temp_entries()


@pytest.mark.parametrize("case", BAD_UPLOADS)
def test_bad_upload_gets_a_4xx_and_one_json_line(server, real_clip, case):
    send, status, error = BAD_UPLOADS[case]
    got_status, body = send(server, real_clip)
    assert got_status == status, body
    message = json.loads(body)
    assert list(message) == ["error"] and error in message["error"]
    assert "\n" not in message["error"] and b"\n" not in body
    no_temp_files_left(server)
    still_serves(server, real_clip)
    no_temp_files_left(server)


def test_upload_cut_off_midway(server, real_clip):
    body, content_type = multipart(real_clip.name, real_clip.read_bytes())
    head = (f"POST /api/caption HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    server.raw(head, [body[:len(body) // 2]], read=False)  # then the client goes away
    no_temp_files_left(server, wait=10)
    still_serves(server, real_clip)
    server.log.seek(0)
    assert "Traceback" not in server.log.read()


def test_progress_of_a_request_in_flight(server, real_clip):
    job = uuid.uuid4().hex
    body, content_type = multipart(real_clip.name, real_clip.read_bytes())
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall((f"POST /api/caption?job={job} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n").encode() + body[:1000])
        deadline = time.monotonic() + 10
        while (progress := server.get(f"/api/progress/{job}"))[0] == 404 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert progress == (200, b'{"stage":"uploading","done":0,"total":0}')
        assert server.caption(real_clip.name, b"", f"?job={job}")[0] == 409  # the id is taken while in flight
        sock.sendall(body[1000:])
        reply = b""
        while b"}" not in reply:
            reply += sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 200")
    status, missing = server.get(f"/api/progress/{job}")
    assert status == 404 and json.loads(missing)["error"] == f"no request in flight with job id {job!r}"


def headless_chromium(tmp_path, height=1000):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", f"--window-size=1000,{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


@pytest.mark.skipif(not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
                    reason="needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver")
def test_page_in_headless_chromium(server, shared_captioner, real_clip, tmp_path):
    """Choose a clip on the page, with beam size 3, and read its caption, n-best list and attention picture; then
    a bad file."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = headless_chromium(tmp_path)
    try:
        driver.get(f"http://127.0.0.1:{server.port}/")
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "frames").text == "6")
        expected = shared_captioner.caption(real_clip, beam_size=3, n_best=3)
        driver.find_element(By.ID, "beam").clear()
        driver.find_element(By.ID, "beam").send_keys("3")
        driver.find_element(By.ID, "file").send_keys(str(real_clip))
        WebDriverWait(driver, 60).until(
            lambda d: d.find_element(By.ID, "result").is_displayed() or d.find_element(By.ID, "error").is_displayed())
        assert not driver.find_element(By.ID, "error").is_displayed()
        assert expected.caption and driver.find_element(By.ID, "caption").text == expected.caption
        rows = driver.find_elements(By.CSS_SELECTOR, "#nbest tbody tr")
        assert [row.find_elements(By.TAG_NAME, "td")[1].text for row in rows] == [h.caption for h in expected.n_best]
        assert driver.execute_script("return document.getElementById('attention').naturalWidth") > 100

        bad = tmp_path / "notes.avi"
        bad.write_text("not a video\n" * 100)
        driver.find_element(By.ID, "file").send_keys(str(bad))
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "error").is_displayed())
        assert driver.find_element(By.ID, "error").text == "notes.avi: not a video OpenCV can open"
        assert not driver.find_element(By.ID, "result").is_displayed()
    finally:
        driver.quit()
    no_temp_files_left(server)


def one_json_error(body):
    """The error of a one-line JSON body {"error": ...}."""
    assert b"\n" not in body.strip(), body
    message = json.loads(body)
    assert list(message) == ["error"], message
    return message["error"]


def request(server, method, path, headers, body=b""):
    connection = server.connection()
    connection.request(method, path, body=body, headers=headers)
    response = connection.getresponse()
    return response.status, response.read()


def test_other_host_names_are_refused(server, real_clip):
    """A page that rebinds its own domain to 127.0.0.1 still sends its name in Host."""
    upload = multipart(real_clip.name, real_clip.read_bytes())
    for method, path, body, content_type in (("GET", "/api/info", b"", "text/plain"), ("POST", "/api/caption", *upload)):
        status, reply = request(server, method, path, {"Host": "evil.example", "Content-Type": content_type}, body)
        assert status == 400 and "'evil.example' is not served here" in one_json_error(reply)
    assert request(server, "GET", "/api/info", {"Host": f"localhost:{server.port}"})[0] == 200


def test_cross_origin_post_is_refused_and_same_origin_served(server, real_clip):
    body, content_type = multipart(real_clip.name, real_clip.read_bytes())
    status, reply = request(server, "POST", "/api/caption",
                            {"Origin": "https://attacker.example", "Content-Type": content_type}, body)
    assert status == 403 and "cross-origin" in one_json_error(reply)
    status, reply = request(server, "POST", "/api/caption",
                            {"Origin": f"http://127.0.0.1:{server.port}", "Content-Type": content_type}, body)
    assert status == 200 and json.loads(reply)["caption"]
    no_temp_files_left(server)


def test_unknown_route_and_wrong_method_are_json(server):
    status, reply = server.get("/no/such/page")
    assert status == 404 and one_json_error(reply) == "Not Found"
    status, reply = server.get("/api/caption")
    assert status == 405 and one_json_error(reply) == "Method Not Allowed"


def write_clip(path, frames, width, height, fps=25.0):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (width, height))
    for i in range(frames):
        writer.write(np.full((height, width, 3), i % 256, np.uint8))
    writer.release()
    return path


@pytest.mark.parametrize("frames, size, refusal", [(MAX_FRAMES + 5, (16, 16), f"more than {MAX_FRAMES} frames"),
                                                   (2, (700, 480), f"over the limit of {MAX_PIXELS} pixels")])
def test_clip_over_a_limit_is_refused_from_its_header(server, real_clip, tmp_path, frames, size, refusal):
    clip = write_clip(tmp_path / "big.avi", frames, *size)
    status, reply = server.caption("big.avi", clip.read_bytes())
    error = one_json_error(reply)
    assert status == 413 and error.startswith("big.avi: ") and refusal in error
    assert str(server.tmp) not in reply.decode()
    no_temp_files_left(server)


@pytest.fixture(scope="module")
def shared_captioner(video_run):
    """One Captioner for the tests that run the app in this process, so that each decoder compiles once."""
    return Captioner.load(video_run)


async def asgi_post(app, path, body, content_type, query=""):
    """(status, body) of a POST to the ASGI app, in this process (where a test can break OpenCV or the disk),
    through the app's middleware and routes as over a socket; the client never leaves."""
    sent, parts = [], [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if parts:
            return parts.pop()
        await asyncio.Event().wait()

    async def send(message):
        sent.append(message)

    headers = [(b"host", b"127.0.0.1"), (b"content-type", content_type.encode()),
               (b"content-length", str(len(body)).encode())]
    await app({"type": "http", "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
               "raw_path": path.encode(), "query_string": query.encode(), "root_path": "", "headers": headers,
               "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def post_in_process(app, uploads):
    """(status, body) of each (path, (body, content type)[, query]) POSTed in turn with asgi_post."""
    async def post_all():
        return [await asgi_post(app, path, *upload, *query) for path, upload, *query in uploads]

    return asyncio.run(post_all())


def test_a_frame_that_cannot_be_decoded_gets_422(shared_captioner, tmp_path, undecodable_frames):
    """A file whose first frame is found but cannot be decoded is a bad file (422) on both routes, scene by scene
    included (it once gave a 500)."""
    import serve

    app = serve.create_app(shared_captioner, serve.Settings(max_upload_bytes=20_000_000))
    clip = write_clip(tmp_path / "clip.avi", 30, 48, 40)
    answers = post_in_process(app, [(route, multipart("clip.avi", clip.read_bytes()))
                                    for route in ("/api/caption", "/api/scenes")])
    assert [(status, one_json_error(body)) for status, body in answers] == \
           [(422, "clip.avi: frame 0 was found but cannot be decoded")] * 2


def test_a_header_hiding_larger_frames_gets_413(shared_captioner, hidden_large_frames):
    """Decoding stops once frames take far longer than the header's 64x64 explains: 413, not a 422 or 408 later."""
    import serve

    app = serve.create_app(shared_captioner, serve.Settings(max_upload_bytes=20_000_000))
    (status, body), = post_in_process(app, [("/api/caption", multipart("liar.avi", hidden_large_frames.read_bytes()))])
    assert status == 413 and one_json_error(body).startswith("liar.avi: frames take ")


@pytest.fixture(scope="module")
def strict_server(shared_captioner):
    """serve.py's app with a queue of one, a 3-second time limit, uploads within 4 s at 1 kB/s at least."""
    yield from serve_in_process(shared_captioner, "--max-queue", "1", "--time-limit", "3", "--upload-time-limit", "4",
                                "--upload-min-rate-kb", "1")


def test_full_queue_gets_503_and_a_stalled_upload_408(strict_server, real_clip):
    body, content_type = multipart(real_clip.name, real_clip.read_bytes())
    head = (f"POST /api/caption HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", strict_server.port), timeout=30) as stalled:
        stalled.sendall(head + body[:1000])  # and no more: it holds the only place in the queue
        deadline = time.monotonic() + 10
        while not strict_server.temp_entries() and time.monotonic() < deadline:
            time.sleep(0.05)
        connection = strict_server.connection()
        connection.request("POST", "/api/caption", body=body, headers={"Content-Type": content_type})
        busy = connection.getresponse()
        assert busy.status == 503 and int(busy.getheader("Retry-After")) >= 1
        assert "busy" in one_json_error(busy.read())
        reply = b""
        while b"}" not in reply:
            reply += stalled.recv(65536)
    head, _, answer = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and "the upload came slower than 1 kB/s" in one_json_error(answer)
    no_temp_files_left(strict_server, wait=5)
    # the place in the queue is free again (a first caption, compiling the model, may not fit in 3 s)
    status, reply = strict_server.caption("notes.avi", b"not a video\n" * 100)
    assert status == 422 and "not a video" in one_json_error(reply)


def slow_upload(server, body, content_type, size, every, give_up=15):
    """POST body to /api/caption `size` bytes every `every` seconds until the server answers: (status, error,
    seconds until the answer)."""
    head = (f"POST /api/caption HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    started, reply = time.monotonic(), b""
    with socket.create_connection(("127.0.0.1", server.port), timeout=give_up) as sock:
        sock.sendall(head)
        for start in range(0, len(body), size):
            if select.select([sock], [], [], every)[0]:  # the server answered
                break
            try:
                sock.sendall(body[start:start + size])
            except (BrokenPipeError, ConnectionResetError):  # it answered and closed meanwhile
                break
        while b"}" not in reply and (data := sock.recv(65536)):
            reply += data
    head, _, answer = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), one_json_error(answer), time.monotonic() - started


@pytest.mark.parametrize("size, every, refusal, seconds", [
    (1, 0.5, "the upload came slower than 1 kB/s", 2.0),  # a byte every half second: under the rate at 2 s
    (1000, 0.5, "the upload took longer than the limit of 4 s", 4.0),  # 2 kB/s: over the rate, past the deadline
], ids=["trickle", "past-deadline"])
def test_a_slow_upload_is_cut_off_and_its_place_freed(strict_server, real_clip, size, every, refusal, seconds):
    """A client trickling its upload holds the only place in the queue until it falls under --upload-min-rate-kb
    (after the first 2 s) or passes --upload-time-limit: then 408, and the next request is served."""
    status, error, took = slow_upload(strict_server, *multipart(real_clip.name, real_clip.read_bytes()), size, every)
    assert status == 408 and error.startswith(refusal) and seconds - 0.1 < took < seconds + 2
    no_temp_files_left(strict_server, wait=5)
    status, reply = strict_server.caption("notes.avi", b"not a video\n" * 100)  # not a 503: the place is free
    assert status == 422 and "not a video" in one_json_error(reply)


def test_a_temporary_folder_that_cannot_be_made_loses_no_place(shared_captioner, real_clip, monkeypatch):
    """mkdtemp failing (a full disk) --max-queue + 1 times: each of those requests gets 503, and the next valid one
    is served: no place in the queue was lost."""
    import serve

    made, failed = tempfile.mkdtemp, []

    def full_disk(*args, prefix=None, **kwargs):
        if prefix and prefix.startswith(serve.UPLOAD_PREFIX) and len(failed) < 3:
            failed.append(prefix)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return made(*args, prefix=prefix, **kwargs)

    monkeypatch.setattr(tempfile, "mkdtemp", full_disk)
    app = serve.create_app(shared_captioner, serve.Settings(max_upload_bytes=20_000_000, max_queue=2))
    answers = post_in_process(app, [("/api/caption", multipart(real_clip.name, real_clip.read_bytes()))] * 4)
    assert [(status, one_json_error(body)) for status, body in answers[:3]] == [
        (503, "cannot store the upload now (No space left on device); try again later")] * 3
    assert answers[3][0] == 200 and json.loads(answers[3][1])["caption"] and len(failed) == 3


def test_tiny_segments_are_refused_and_the_scene_cap_holds(shared_captioner, tmp_path):
    """segments=1e-9 once made every frame a scene: segments under --min-segment get 400; a video cut into more
    than --max-scenes scenes gets 413, from its header (fixed windows) or while it is read (auto)."""
    import serve

    app = serve.create_app(shared_captioner, serve.Settings(max_upload_bytes=20_000_000, max_scenes=2))
    short = multipart("short.avi", write_clip(tmp_path / "short.avi", 20, 48, 40, fps=10).read_bytes())
    long = multipart("long.avi", write_clip(tmp_path / "long.avi", 250, 48, 40, fps=10).read_bytes())  # 25 s
    answers = post_in_process(app, [("/api/scenes", short, "segments=1e-9"), ("/api/scenes", short, "segments=1.5"),
                                    ("/api/scenes", short, "segments=2"), ("/api/scenes", long, "segments=5"),
                                    ("/api/scenes", long, "segments=auto")])
    errors = [(status, one_json_error(body)) for status, body in answers[:2] + answers[3:]]
    assert errors == [(400, "segments of 1e-09 s are shorter than this server's minimum of 2 s (--min-segment)"),
                      (400, "segments of 1.5 s are shorter than this server's minimum of 2 s (--min-segment)"),
                      (413, "long.avi: more than 2 scenes of 5 s (the limit)"),
                      (413, "long.avi: more than 2 scenes (the limit)")]  # auto: split every 10 s, 3 scenes
    assert answers[2][0] == 200 and len(json.loads(answers[2][1])["cues"]) == 1


def test_a_caption_is_served_while_a_long_video_is_read(shared_captioner, real_clip, tmp_path):
    """A scene-by-scene request reads its video in the reading pool and takes the model a turn of scenes at a
    time: a caption sent meanwhile is answered (no 503) before the video is done, after waiting about one turn."""
    import serve
    from tools.long_demo import make_long_video

    make_long_video(tmp_path / "four.avi", minutes=4)
    app = serve.create_app(shared_captioner, serve.Settings(max_upload_bytes=20_000_000, scenes_per_turn=1))
    clip = multipart(real_clip.name, real_clip.read_bytes())
    long = multipart("four.avi", (tmp_path / "four.avi").read_bytes())
    jobs = app.state.service.jobs

    async def caption_during_scenes():
        # the one decoder both use (beam 5, 1 best, a batch of one) compiled first
        assert (await asgi_post(app, "/api/caption", *clip, "n_best=1"))[0] == 200
        scenes = asyncio.create_task(asgi_post(app, "/api/scenes", *long, "job=long"))
        while not jobs.get("long", {}).get("done"):  # its first turn is over
            await asyncio.sleep(0.01)
        caption = await asgi_post(app, "/api/caption", *clip, "n_best=1")
        return caption, scenes.done(), await scenes

    (status, body), scenes_done_first, (scenes_status, scenes_body) = asyncio.run(caption_during_scenes())
    assert status == 200 and scenes_status == 200 and not scenes_done_first
    waited, scenes = json.loads(body)["timings"]["queued_s"], json.loads(scenes_body)["timings"]
    turn = scenes["caption_s"] / scenes["turns"]
    assert scenes["turns"] >= 20 and waited <= 2 * turn + 0.2, (waited, scenes)


def test_host_beyond_loopback_warns(video_run, monkeypatch, capsys):
    """The Host check only stops DNS rebinding: listening beyond loopback says so."""
    import uvicorn

    import serve

    assert [serve.exposure_warning(host) for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost")] == [None] * 4
    listened = []
    monkeypatch.setattr(uvicorn, "run", lambda app, host, **options: listened.append(host))
    assert serve.main(["--checkpoint", str(video_run), "--host", "0.0.0.0", "--port", str(free_port())]) == 0
    warning = capsys.readouterr().err.strip()
    assert listened == ["0.0.0.0"] and warning == serve.exposure_warning("0.0.0.0")
    assert warning.startswith("warning: --host 0.0.0.0 answers other machines too") and "DNS rebinding" in warning
    assert serve.exposure_warning("192.168.1.5") and serve.exposure_warning("example.org")


def test_upload_folders_of_killed_servers_go_at_start_and_only_those(shared_captioner, tmp_path, monkeypatch):
    """At start (the app's lifespan) the upload folders of killed servers go: ours by name and marker file, of a
    process that has ended; nothing else."""
    import serve
    from util.atomic import HOST, owner_tag

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    dead = f"s2vt-{HOST}-{ended.pid}"
    folders = {f"{serve.UPLOAD_PREFIX}{dead}-killed": serve.MARKER_TEXT,
               f"{serve.UPLOAD_PREFIX}{owner_tag()}-live": serve.MARKER_TEXT,  # this process's: in use
               f"{serve.UPLOAD_PREFIX}{dead}-nomarker": None,  # our name, no marker: not known to be ours
               f"{serve.UPLOAD_PREFIX}{dead}-othermarker": "another program's\n",
               f"other-{dead}-killed": serve.MARKER_TEXT}  # another program's name
    for name, marker in folders.items():
        (tmp_path / name).mkdir()
        if marker is not None:
            (tmp_path / name / serve.MARKER_FILE).write_text(marker)
    (tmp_path / f"{serve.UPLOAD_PREFIX}{dead}-link").symlink_to(tmp_path / f"other-{dead}-killed")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    app = serve.create_app(shared_captioner)
    events, sent = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}], []

    async def receive():
        return events.pop(0)

    async def send(message):
        sent.append(message["type"])

    asyncio.run(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send))
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    kept = [name for name in folders if name != f"{serve.UPLOAD_PREFIX}{dead}-killed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + [f"{serve.UPLOAD_PREFIX}{dead}-link"])


def test_checkpoint_that_cannot_read_clips_is_refused_at_start(video_run, tmp_path, capsys):
    import serve

    run = tmp_path / "run"
    shutil.copytree(video_run, run)
    config = json.loads((run / "config.json").read_text())
    config["features"] = None
    (run / "config.json").write_text(json.dumps(config))
    assert serve.main(["--checkpoint", str(run), "--port", str(free_port())]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "records no feature extractor" in error and str(tmp_path) not in error


def test_short_load_of_valid_and_hostile_requests(server, real_clip):
    """tools.loadtest's run, small: 3 clients for 4 s; every answer the one its kind expects, nothing left in the
    temporary folder, RSS steady and the server still captioning."""
    from tools.loadtest import run_load

    clips = sorted(real_clip.parent.glob("*.avi"))[:3]
    figures, failed = run_load(server.port, server.process.pid, server.tmp, clips, clients=3, seconds=4, warmup=3)
    assert not failed, (failed, figures)
    assert figures["valid_ok"] >= 3 and figures["unexpected"] == 0 and figures["still_captions"]
    hostile = {key.split()[0] for key in figures["by_kind_and_status"]} - {"valid"}
    assert hostile == {"oversized", "overlong", "cut-short", "not-video", "wrong-host"}


def test_decoder_cache_keeps_the_most_recently_used(video_run, monkeypatch):
    """A compiled decoder per beam size, n-best and constraints; only DECODER_CACHE stay."""
    import captioner as captioner_module
    from decoding import Constraints

    monkeypatch.setattr(captioner_module.backend, "compile_function", lambda models, function: function)
    captioner = Captioner.load(video_run)
    made = {beam_size: captioner._decoder(beam_size, 1, Constraints()) for beam_size in (2, 3, 4, 5)}
    assert captioner._decoder(2, 1, Constraints()) is made[2]  # used again: kept, and now the most recent
    captioner._decoder(6, 1, Constraints())  # the oldest other goes
    assert captioner_module.DECODER_CACHE == 4
    assert [key[0] for key in captioner._decoders] == [4, 5, 2, 6]


def test_length_penalty_is_data_not_a_compile(video_run, real_clip, monkeypatch):
    """Every length_penalty in [0, 10] runs the one compiled beam search (traced once); others get 400."""
    import decoding
    import serve

    traced, beam_search = [], decoding.beam_search

    def counted(*args, **kwargs):  # runs once per trace of the compiled decoder
        traced.append(1)
        return beam_search(*args, **kwargs)

    monkeypatch.setattr(decoding, "beam_search", counted)
    captioner = Captioner.load(video_run)
    app = serve.create_app(captioner, serve.Settings(max_upload_bytes=20_000_000))
    upload = multipart(real_clip.name, real_clip.read_bytes())
    penalties = ("0", "0.25", "0.7", "1.3", "2", "9.5")
    answers = post_in_process(app, [("/api/caption", upload, f"beam_size=3&length_penalty={p}") for p in penalties])
    assert [status for status, _ in answers] == [200] * len(penalties)
    assert [json.loads(body)["decoding"]["length_penalty"] for _, body in answers] == [float(p) for p in penalties]
    assert len(traced) == 1 and len(captioner._decoders) == 1
    refused = post_in_process(app, [("/api/caption", upload, f"length_penalty={p}") for p in ("11", "-1", "nan")])
    assert [(status, "0 <= length_penalty <= 10" in one_json_error(body)) for status, body in refused] == \
           [(400, True)] * 3


@pytest.fixture(scope="module")
def long_video(tmp_path_factory):
    """Six demo scenes joined with hard cuts (37.8 s), as WebM, which Chromium plays, and their plan."""
    from tools.long_demo import make_long_video

    path = tmp_path_factory.mktemp("long") / "six.webm"
    return path, make_long_video(path, scenes=6, seed=0)


@pytest.fixture(scope="module")
def demo_server():
    """serve.py's app with the shipped s2vt-demo release, videos captioned scene by scene capped at 40 s."""
    yield from serve_in_process(Captioner.load("s2vt-demo"), "--max-video-seconds", "40")


def test_long_video_scene_by_scene_over_the_api(demo_server, long_video, tmp_path):
    import srt
    import webvtt

    from tools.demo_data import parse_caption
    from tools.long_demo import check_cues, make_long_video

    path, plan = long_video
    status, body = demo_server.post(*multipart(path.name, path.read_bytes()), path="/api/scenes")
    assert status == 200, body
    reply = json.loads(body)
    cues = reply["cues"]
    assert check_cues(plan, cues)["attributes_right"] in ("5/6", "6/6") and reply["duration_s"] == pytest.approx(
        plan[-1]["end"], abs=0.01)
    assert [c["caption"] for c in cues] == [s.content for s in srt.parse(reply["srt"])] == \
           [c.text for c in webvtt.from_string(reply["vtt"]).captions]
    assert parse_caption(cues[0]["caption"]) == (plan[0]["colour"], plan[0]["shape"], plan[0]["direction"])
    longer = make_long_video(tmp_path / "longer.avi", minutes=0.75)  # over the server's 40 s
    status, body = demo_server.post(*multipart("longer.avi", (tmp_path / "longer.avi").read_bytes()),
                                    path="/api/scenes")
    assert status == 413 and one_json_error(body) == "longer.avi: longer than 40 s (the limit)" and longer
    status, body = demo_server.post(*multipart(path.name, path.read_bytes()), path="/api/scenes", query="?segments=0")
    assert status == 400 and "segments" in one_json_error(body)
    no_temp_files_left(demo_server)


@pytest.mark.skipif(not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
                    reason="needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver")
def test_long_video_page_plays_with_captions_in_headless_chromium(demo_server, long_video, tmp_path):
    """Caption the six-scene video scene by scene on the page: the video plays with its cues as a track, the scene
    list seeks, SRT and WebVTT download; a screenshot (S2VT_SCREENSHOT=PATH keeps it there)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    path, plan = long_video
    driver = headless_chromium(tmp_path, height=1100)
    player = "document.getElementById('player')"
    try:
        driver.get(f"http://127.0.0.1:{demo_server.port}/")
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "video-limit").text == "0.7")
        driver.find_element(By.ID, "scene-mode").click()
        driver.find_element(By.ID, "file").send_keys(str(path))
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "scenes-result").is_displayed()
                                        or d.find_element(By.ID, "error").is_displayed())
        assert not driver.find_element(By.ID, "error").is_displayed()
        rows = [row.find_elements(By.TAG_NAME, "td") for row in
                driver.find_elements(By.CSS_SELECTOR, "#scene-list tbody tr")]
        assert len(rows) >= len(plan) and rows[0][0].text == "0:00.0" and rows[-1][1].text == "0:37.8"
        WebDriverWait(driver, 30).until(lambda d: d.execute_script(
            f"return {player}.readyState >= 1 && {player}.textTracks[0].cues && {player}.textTracks[0].cues.length"))
        track = driver.execute_script(f"const t = {player}.textTracks[0]; return [t.kind, t.mode, "
                                      f"Array.from(t.cues, c => [c.startTime, c.endTime, c.text])]")
        assert track[:2] == ["captions", "showing"] and [c[2] for c in track[2]] == [row[2].text for row in rows]
        assert driver.execute_script(f"return {player}.duration") == pytest.approx(plan[-1]["end"], abs=0.1)
        rows[2][2].click()  # seeks to the third scene; its middle shows its cue
        WebDriverWait(driver, 10).until(lambda d: d.execute_script(f"return !{player}.seeking"))
        assert driver.execute_script(f"return {player}.currentTime") == pytest.approx(track[2][2][0], abs=0.01)
        middle = (track[2][2][0] + track[2][2][1]) / 2
        driver.execute_script(f"{player}.currentTime = {middle}")
        WebDriverWait(driver, 10).until(lambda d: d.execute_script(
            f"return !{player}.seeking && {player}.readyState >= 2 && {player}.textTracks[0].activeCues.length"))
        assert driver.execute_script(f"return {player}.textTracks[0].activeCues[0].text") == rows[2][2].text
        for kind in ("srt", "vtt"):
            link = driver.find_element(By.ID, f"download-{kind}")
            text = driver.execute_script("return fetch(arguments[0].href).then(r => r.text())", link)
            assert link.get_attribute("download") == f"six.{kind}" and rows[2][2].text in text
        shot = Path(os.environ.get("S2VT_SCREENSHOT") or tmp_path / "scenes.png")
        assert driver.save_screenshot(str(shot)) and cv2.imread(str(shot)).shape[1] >= 900
    finally:
        driver.quit()
    no_temp_files_left(demo_server)
