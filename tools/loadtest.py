"""Load test of serve.py over loopback: concurrent clients upload real clips mixed with hostile requests.

    python -m tools.loadtest [--checkpoint s2vt-demo] [--clips ../shared/data/mlds_hw2_1/testing_data/video]
                             [--clients 8] [--seconds 60] [--beam-size 3]

Starts serve.py in a child process with a temporary folder of its own, warms it up, then runs --clients threads for
--seconds, each sending in turn: a valid upload of a real clip (half of all requests), and an upload over the size
limit, a clip longer than the frame limit, an upload cut short, a text file named .avi and a request for another
Host name. Prints requests/s, the p50/p95 latency of the valid ones and the answers by kind and status; then checks
that every answer was the one its kind expects, that the temporary folder holds nothing of the server's, that the
server's RSS is within 10% of its value after warm-up and that it still captions. Exit status 1 if a check fails.
"""
import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

from util.errors import DataError, command

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CLIPS = ROOT.parent / "shared" / "data" / "mlds_hw2_1" / "testing_data" / "video"
# kind -> the statuses that are right for it; "valid" is every other request
EXPECTED = {"valid": {200}, "oversized": {413}, "overlong": {413}, "cut-short": {400}, "not-video": {422},
            "wrong-host": {400}}
MIX = ["valid", "oversized", "valid", "overlong", "valid", "cut-short", "valid", "not-video", "valid", "wrong-host"]
RSS_TOLERANCE = 0.10


def multipart(name, data, boundary="s2vt-load-boundary", close=True):
    """(body, content type) of a multipart/form-data upload of one file."""
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    if close:
        body += f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def requests_by_kind(clips, info, workdir):
    """{kind: [(body, headers), ...]}: the requests each kind sends, made to break the limits the server's /api/info
    announces."""
    overlong = Path(workdir) / "overlong.avi"
    writer = cv2.VideoWriter(str(overlong), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (16, 16))
    for i in range(info["max_clip_frames"] + 10):
        writer.write(np.full((16, 16, 3), i % 256, np.uint8))
    writer.release()
    uploads = {
        "valid": [multipart(clip.name, clip.read_bytes()) for clip in clips],
        "oversized": [multipart("big.avi", os.urandom(info["max_upload_bytes"] + 1000))],
        "overlong": [multipart("long.avi", overlong.read_bytes())],
        "cut-short": [multipart(clips[0].name, clips[0].read_bytes(), close=False)],
        "not-video": [multipart("notes.avi", b"not a video\n" * 100)],
        "wrong-host": [multipart(clips[0].name, clips[0].read_bytes())],
    }
    return {kind: [(body, {"Content-Type": content_type, **({"Host": "evil.example"} if kind == "wrong-host" else {})})
                   for body, content_type in bodies] for kind, bodies in uploads.items()}


def send(port, body, headers, query="?beam_size=3", timeout=120):
    """(status, seconds) of one POST /api/caption; status 0 if the connection failed."""
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", f"/api/caption{query}", body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        status = response.status
    except (OSError, http.client.HTTPException):
        status = 0
    finally:
        connection.close()
    return status, time.perf_counter() - started


def get_info(port):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", "/api/info")
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def rss_bytes(pid):
    """Resident memory of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise DataError(f"process {pid}: no VmRSS in /proc/{pid}/status")


def server_temp_entries(tmp):
    return sorted(p.name for p in Path(tmp).glob("s2vt-serve-*"))


def run_load(port, pid, tmp, clips, clients=8, seconds=60.0, beam_size=3, warmup=3):
    """Warm the server at 127.0.0.1:port (process pid, temporary folder tmp) up with `warmup` valid requests, load
    it for `seconds` with `clients` threads, then check it: a dict of the figures and a list of failed checks."""
    status, info = get_info(port)
    if status != 200:
        raise DataError(f"127.0.0.1:{port}: /api/info answered {status}")
    query = f"?beam_size={beam_size}&n_best=1"
    with tempfile.TemporaryDirectory() as workdir:
        kinds = requests_by_kind(clips, info, workdir)
    for n in range(warmup):
        send(port, *kinds["valid"][n % len(kinds["valid"])], query=query)
    rss_warm = rss_bytes(pid)
    results = []  # (kind, status, seconds)
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(index):
        n = index
        while time.monotonic() < stop_at:
            kind = MIX[n % len(MIX)]
            body, headers = kinds[kind][n % len(kinds[kind])]
            status, took = send(port, body, headers, query)
            with lock:
                results.append((kind, status, took))
            n += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started

    deadline = time.monotonic() + 10  # an upload folder goes when its request's answer has been sent
    while server_temp_entries(tmp) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = server_temp_entries(tmp)
    rss_after = rss_bytes(pid)
    still, _ = send(port, *kinds["valid"][0], query=query)
    valid = sorted(took for kind, status, took in results if kind == "valid" and status == 200)
    unexpected = [(kind, status) for kind, status, _ in results if status not in EXPECTED[kind]]
    figures = {"clients": clients, "seconds": round(elapsed, 1), "requests": len(results),
               "requests_per_s": round(len(results) / elapsed, 2), "valid_ok": len(valid),
               "valid_p50_s": round(float(np.percentile(valid, 50)), 3) if valid else None,
               "valid_p95_s": round(float(np.percentile(valid, 95)), 3) if valid else None,
               "by_kind_and_status": {f"{kind} {status}": count for (kind, status), count in
                                      sorted(Counter((kind, status) for kind, status, _ in results).items())},
               "unexpected": len(unexpected), "rss_after_warmup_mb": round(rss_warm / 1e6, 1),
               "rss_after_mb": round(rss_after / 1e6, 1), "rss_change": round(rss_after / rss_warm - 1, 4),
               "temp_left": left, "still_captions": still == 200}
    failed = []
    if unexpected:
        failed.append(f"{len(unexpected)} unexpected answers: {dict(Counter(unexpected))}")
    if not valid:
        failed.append("no valid request was captioned")
    if left:
        failed.append(f"the temporary folder still holds {left}")
    if abs(rss_after / rss_warm - 1) > RSS_TOLERANCE:
        failed.append(f"RSS went from {rss_warm / 1e6:.0f} MB after warm-up to {rss_after / 1e6:.0f} MB")
    if still != 200:
        failed.append(f"after the load a valid request got {still}")
    return figures, failed


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(checkpoint, tmp, log, flags=()):
    """serve.py in a child process with TMPDIR=tmp, once it answers: (process, port)."""
    port = free_port()
    process = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--checkpoint", str(checkpoint),
                                "--port", str(port), *flags], cwd=ROOT, env=dict(os.environ, TMPDIR=str(tmp)),
                               stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if get_info(port)[0] == 200:
                return process, port
        except OSError:
            time.sleep(0.5)
    process.terminate()
    raise DataError(f"serve.py did not start (see {log.name})")


@command
def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.loadtest", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="s2vt-demo", help="what serve.py captions with")
    parser.add_argument("--clips", default=str(DEFAULT_CLIPS), help="folder of real .avi clips to upload")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    clips = sorted(Path(args.clips).glob("*.avi"))
    if not clips:
        raise DataError(f"{args.clips}: no .avi clips")
    with tempfile.TemporaryDirectory(prefix="s2vt-load-") as tmp:
        log_path = Path(tmp) / "serve.log"
        server_tmp = Path(tmp) / "tmp"
        server_tmp.mkdir()
        with open(log_path, "w") as log:
            process, port = start_server(args.checkpoint, server_tmp, log,
                                         ["--max-upload-mb", "3", "--max-clip-frames", "900"])
            try:
                figures, failed = run_load(port, process.pid, server_tmp, clips, args.clients, args.seconds,
                                           args.beam_size)
            finally:
                process.terminate()
                process.wait(timeout=30)
        for name, value in figures.items():
            print(f"{name:22} {value}")
    for failure in failed:
        print(f"FAILED: {failure}", file=sys.stderr)
    print(f"{figures['requests']} requests in {figures['seconds']} s ({figures['requests_per_s']}/s), valid p50 "
          f"{figures['valid_p50_s']} s p95 {figures['valid_p95_s']} s, {figures['unexpected']} unexpected, RSS "
          f"{figures['rss_change']:+.1%}: " + ("all checks passed" if not failed else f"{len(failed)} checks failed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
