"""Load test of serve.py over loopback: concurrent clients upload real clips mixed with hostile requests, and
optionally long videos captioned scene by scene.

    python -m tools.loadtest [--checkpoint s2vt-demo] [--clips ../shared/data/mlds_hw2_1/testing_data/video]
                             [--clients 8] [--seconds 60] [--beam-size 3]
                             [--scenes-clients 2 [--long-video LONG.avi | --long-minutes 10]]

Starts serve.py in a child process with a temporary folder of its own, warms it up, then runs --clients threads for
--seconds. --scenes-clients of them post a long video (--long-video, or one of --long-minutes made with
tools.long_demo in the temporary folder) to /api/scenes in a loop; each of the others sends in turn: a valid upload
of a real clip (half of its requests), and an upload over the size limit, a clip longer than the frame limit, an
upload cut short, a text file named .avi and a request for another Host name. Prints requests/s, the p50/p95 latency
of the valid captions (and of the scene-by-scene requests) and the answers by kind and status; then checks that
every answer was the one its kind expects, that the temporary folder holds nothing of the server's, that the
server's RSS is within 10% of its value after warm-up and that it still captions. Exit status 1 if a check fails.
Run it once with --scenes-clients and once without (--clients less that many) to see what long videos cost the
captions.
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
GAVE_UP = "gave up"  # a request its client left at its timeout: a scene-by-scene one still working when the load ends
EXPECTED = {"valid": {200}, "oversized": {413}, "overlong": {413}, "cut-short": {400}, "not-video": {422},
            "wrong-host": {400}, "scenes": {200, GAVE_UP}}
MIX = ["valid", "oversized", "valid", "overlong", "valid", "cut-short", "valid", "not-video", "valid", "wrong-host"]
RSS_TOLERANCE = 0.10
WARM_SCENES_S = 20  # seconds of the long video's warm-up request


def multipart(name, data, boundary="s2vt-load-boundary", close=True):
    """(body, content type) of a multipart/form-data upload of one file."""
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    if close:
        body += f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def requests_by_kind(clips, info, workdir, long_video=None):
    """{kind: [(body, headers), ...]}: the requests each kind sends, made to break the limits the server's /api/info
    announces; "scenes" (the long video) if one is given."""
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
        **({"scenes": [multipart(Path(long_video).name, Path(long_video).read_bytes())]} if long_video else {}),
    }
    return {kind: [(body, {"Content-Type": content_type, **({"Host": "evil.example"} if kind == "wrong-host" else {})})
                   for body, content_type in bodies] for kind, bodies in uploads.items()}


def send(port, body, headers, query="?beam_size=3", timeout=700, path="/api/caption"):
    """(status, seconds) of one POST; status GAVE_UP past the timeout, 0 if the connection failed."""
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", f"{path}{query}", body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        status = response.status
    except TimeoutError:
        status = GAVE_UP
    except (OSError, http.client.HTTPException):
        status = 0
    finally:
        connection.close()
    return status, time.perf_counter() - started


def get_json(port, path="/api/info"):
    """(status, JSON body) of a GET."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path)
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


def server_temp_entries(tmp, wait=0.0):
    """The server's upload folders in tmp, once gone or after `wait` seconds: an upload folder goes when its request
    has ended."""
    deadline = time.monotonic() + wait
    while (left := sorted(p.name for p in Path(tmp).glob("s2vt-serve-*"))) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def load(port, kinds, clients, scenes_clients, seconds, query):
    """Run `clients` threads for `seconds`, the first scenes_clients posting the long video to /api/scenes (and
    leaving the one still in flight when the time is up), the others the MIX to /api/caption: ([(kind, status,
    seconds)], seconds elapsed, seconds of long video captioned as /api/progress last reported them)."""
    results, lock, scenes_done = [], threading.Lock(), {}  # scenes_done: job id -> seconds of video captioned
    stop_at = time.monotonic() + seconds

    def client(index):
        n = index
        while time.monotonic() < stop_at:
            kind = "scenes" if index < scenes_clients else MIX[n % len(MIX)]
            body, headers = kinds[kind][n % len(kinds[kind])]
            if kind == "scenes":
                job = f"load-{index}-{n}"
                scenes_done[job] = 0
                status, took = send(port, body, headers, f"{query}&job={job}", stop_at - time.monotonic() + 1,
                                    "/api/scenes")
            else:
                status, took = send(port, body, headers, query)
            with lock:
                results.append((kind, status, took))
            n += 1

    def watch():  # a scene-by-scene request left at the end reports nothing itself
        while time.monotonic() < stop_at:
            for job in list(scenes_done):
                status, progress = get_json(port, f"/api/progress/{job}")
                scenes_done[job] = progress["done"] if status == 200 else scenes_done[job]
            time.sleep(1)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)] + [threading.Thread(target=watch)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, time.monotonic() - started, sum(scenes_done.values())


def percentiles(seconds, name):
    """{name_p50_s, name_p95_s} of latencies (None if there are none)."""
    return {f"{name}_p{q}_s": round(float(np.percentile(seconds, q)), 3) if seconds else None for q in (50, 95)}


def run_load(port, pid, tmp, clips, clients=8, seconds=60.0, beam_size=3, warmup=3, long_video=None,
             scenes_clients=0):
    """Warm the server at 127.0.0.1:port (process pid, temporary folder tmp) up with `warmup` valid requests (and a
    scene-by-scene one with scenes_clients), load it for `seconds` with `clients` threads, scenes_clients of them
    posting long_video to /api/scenes, then check it: a dict of the figures and a list of failed checks."""
    status, info = get_json(port)
    if status != 200:
        raise DataError(f"127.0.0.1:{port}: /api/info answered {status}")
    query = f"?beam_size={beam_size}&n_best=1"
    with tempfile.TemporaryDirectory() as workdir:
        kinds = requests_by_kind(clips, info, workdir, long_video if scenes_clients else None)
    for n in range(warmup):
        send(port, *kinds["valid"][n % len(kinds["valid"])], query=query)
    if scenes_clients:  # its first turns compile the scenes' decoder; then it is left, and ends with its turn
        send(port, *kinds["scenes"][0], query=query, timeout=WARM_SCENES_S, path="/api/scenes")
        server_temp_entries(tmp, wait=30)
    rss_warm = rss_bytes(pid)
    results, elapsed, scenes_video_s = load(port, kinds, clients, scenes_clients, seconds, query)
    left = server_temp_entries(tmp, wait=10)
    rss_after = rss_bytes(pid)
    still, _ = send(port, *kinds["valid"][0], query=query)
    valid, scenes = ([took for k, status, took in results if k == kind and status == 200]
                     for kind in ("valid", "scenes"))
    unexpected = [(kind, status) for kind, status, _ in results if status not in EXPECTED[kind]]
    figures = {"clients": clients, "scenes_clients": scenes_clients, "seconds": round(elapsed, 1),
               "requests": len(results), "requests_per_s": round(len(results) / elapsed, 2), "valid_ok": len(valid),
               **percentiles(valid, "valid"), "scenes_ok": len(scenes), **percentiles(scenes, "scenes"),
               "scenes_video_s": round(scenes_video_s, 1),
               "by_kind_and_status": {f"{kind} {status}": count for (kind, status), count in
                                      sorted(Counter((kind, status) for kind, status, _ in results).items(), key=str)},
               "unexpected": len(unexpected), "rss_after_warmup_mb": round(rss_warm / 1e6, 1),
               "rss_after_mb": round(rss_after / 1e6, 1), "rss_change": round(rss_after / rss_warm - 1, 4),
               "temp_left": left, "still_captions": still == 200}
    failed = [failure for failure, failing in [
        (f"{len(unexpected)} unexpected answers: {dict(Counter(unexpected))}", unexpected),
        ("no valid request was captioned", not valid), (f"the temporary folder still holds {left}", left),
        (f"RSS went from {rss_warm / 1e6:.0f} MB after warm-up to {rss_after / 1e6:.0f} MB",
         abs(rss_after / rss_warm - 1) > RSS_TOLERANCE),
        (f"after the load a valid request got {still}", still != 200)] if failing]
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
            if get_json(port)[0] == 200:
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
    parser.add_argument("--scenes-clients", type=int, default=0,
                        help="of the clients, this many post the long video to /api/scenes in a loop")
    parser.add_argument("--long-video", help="the long video they post (default: one of --long-minutes made with "
                                             "tools.long_demo in the temporary folder)")
    parser.add_argument("--long-minutes", type=float, default=10.0)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    if not 0 <= args.scenes_clients < args.clients:
        parser.error("--scenes-clients must be from 0 to fewer than --clients")
    clips = sorted(Path(args.clips).glob("*.avi"))
    if not clips:
        raise DataError(f"{args.clips}: no .avi clips")
    with tempfile.TemporaryDirectory(prefix="s2vt-load-") as tmp:
        log_path = Path(tmp) / "serve.log"
        server_tmp = Path(tmp) / "tmp"
        server_tmp.mkdir()
        long_video = args.long_video
        if args.scenes_clients and not long_video:
            from tools.long_demo import make_long_video

            long_video = Path(tmp) / "long.avi"
            make_long_video(long_video, minutes=args.long_minutes)
        with open(log_path, "w") as log:
            process, port = start_server(args.checkpoint, server_tmp, log,
                                         ["--max-upload-mb", "3", "--max-clip-frames", "900"])
            try:
                figures, failed = run_load(port, process.pid, server_tmp, clips, args.clients, args.seconds,
                                           args.beam_size, long_video=long_video, scenes_clients=args.scenes_clients)
            finally:
                process.terminate()
                process.wait(timeout=30)
        for name, value in figures.items():
            print(f"{name:22} {value}")
    for failure in failed:
        print(f"FAILED: {failure}", file=sys.stderr)
    scenes = (f", {figures['scenes_video_s']} s of long video captioned scene by scene ({figures['scenes_ok']} "
              f"requests answered)" if args.scenes_clients else "")
    print(f"{figures['requests']} requests in {figures['seconds']} s ({figures['requests_per_s']}/s), valid p50 "
          f"{figures['valid_p50_s']} s p95 {figures['valid_p95_s']} s{scenes}, {figures['unexpected']} unexpected, RSS "
          f"{figures['rss_change']:+.1%}: " + ("all checks passed" if not failed else f"{len(failed)} checks failed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
