"""tools.release and util.releases: export a tiny trained run, serve it from a local HTTP server, fetch it back
(or refuse it)."""
import csv
import fcntl
import functools
import gzip
import hashlib
import io
import json
import os
import tarfile
import threading
import time
import tracemalloc
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import h5py
import pytest

import infer
from conftest import TINY_RUN_FLAGS
from model import S2VT, ModelConfig, load_model
from tools.release import export_release, main
from util import releases
from util.checkpoints import latest_checkpoint, read_state
from util.errors import DataError
from util.releases import MARKER_FILE, MARKER_TEXT, PARTIAL_PREFIX, remove_stale_partials, resolve_checkpoint, \
    sha256_of

# as every caller fetches: each release loaded into its model before it is put in place
fetch_release = functools.partial(releases.fetch_release, check_run=load_model)

class Server:
    """A local HTTP server on 127.0.0.1 serving bytes by path, counting the requests for each path."""

    def __init__(self):
        self.files, self.short, self.custom = {}, set(), {}
        self.requests = Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests[self.path] += 1
                if self.path in server.custom:  # a misbehaving server: custom(handler) writes the answer
                    server.custom[self.path](self)
                    return
                if self.path not in server.files:
                    self.send_error(404)
                    return
                data = server.files[self.path]
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                # a "short" path announces the whole file but the connection drops halfway
                self.wfile.write(data[:len(data) // 2] if self.path in server.short else data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def serve_custom(self, path, answer):
        self.custom[path] = answer
        return f"http://127.0.0.1:{self.httpd.server_port}{path}"

    def serve(self, path, data, short=False):
        self.files[path] = data
        if short:
            self.short.add(path)
        return f"http://127.0.0.1:{self.httpd.server_port}{path}"


@pytest.fixture(scope="module")
def server():
    server = Server()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.fixture(scope="module")
def release(video_run, tmp_path_factory):
    """The session's tiny trained run (tests/conftest.py), exported: data, run (folders), bundle (path), sha256."""
    bundle = tmp_path_factory.mktemp("release") / "tiny.tar.gz"
    digest, size, _ = export_release(video_run, bundle)
    assert (digest, size) == (sha256_of(bundle), bundle.stat().st_size)
    return SimpleNamespace(data=video_run.parent / "data", run=video_run, bundle=bundle, sha256=digest)


def bundle_files(bundle):
    with tarfile.open(bundle) as tar:
        return {member.name: tar.extractfile(member).read() for member in tar}


def pack(files, extra_members=()):
    """A .tar.gz of {name: bytes}, then the given TarInfo members (links, odd names) filled with x's."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
        for member in extra_members:
            tar.addfile(member, io.BytesIO(b"x" * member.size))
    return buffer.getvalue()


def with_manifest(files):
    """files with MANIFEST.json rewritten to match them, so only the later checks can catch a change."""
    listed = {n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for n, d in files.items()
              if n != "MANIFEST.json"}
    return {**files, "MANIFEST.json": json.dumps({"files": listed}).encode()}


def the_error(capsys):
    """The one `error: ` line on stderr (the download progress goes there too)."""
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    return errors[0]


def test_export_bundle_layout(release):
    files = bundle_files(release.bundle)
    best = latest_checkpoint(release.run / "best")
    checkpoint = f"best/{best.name}"
    assert set(files) == {"config.json", "vocab.json", "feature_manifest.json", "metrics.json", "MANIFEST.json",
                          f"{checkpoint}/model.weights.h5", f"{checkpoint}/state.json"}
    for name in ("model.weights.h5", "state.json"):
        assert files[f"{checkpoint}/{name}"] == (best / name).read_bytes()
    for name in ("config.json", "vocab.json"):
        assert files[name] == (release.run / name).read_bytes()
    assert json.loads(files["feature_manifest.json"]) == json.loads(files["config.json"])["features"]
    assert json.loads(files["MANIFEST.json"]) == json.loads(with_manifest(files)["MANIFEST.json"])
    metrics = json.loads(files["metrics.json"])
    assert metrics["last"]["epoch"] == int(TINY_RUN_FLAGS[TINY_RUN_FLAGS.index("--epochs") + 1])
    assert metrics["epoch"] == read_state(best)["epoch"]
    # a tiny run's few validation videos choose by the validation loss (validation.MIN_VALIDATION_VIDEOS)
    assert metrics["select_metric"] == "loss" and metrics["split"] == "validation"
    with open(release.run / "history.csv", newline="") as history:
        val_losses = {int(row["epoch"]): float(row["val_loss"]) for row in csv.DictReader(history)}
    assert metrics["best_val_loss"] == min(val_losses.values()) == val_losses[metrics["epoch"]]


def test_export_holds_no_optimizer_state(release, tmp_path):
    """Inference weights only: no optimizer file, the weights file holds the model's weights and nothing else, and
    `--which last` (whose checkpoints carry optimizer.h5) leaves it out too."""
    last_bundle = tmp_path / "last.tar.gz"
    export_release(release.run, last_bundle, which="last")
    last = latest_checkpoint(release.run / "last")
    assert (last / "optimizer.h5").is_file()  # the run has optimizer state to leave out
    for bundle in (release.bundle, last_bundle):
        files = bundle_files(bundle)
        assert not [name for name in files if "optimizer" in name.lower()]
        (weights_name,) = [name for name in files if name.endswith("model.weights.h5")]
        (tmp_path / "weights.h5").write_bytes(files[weights_name])
        with h5py.File(tmp_path / "weights.h5", "r") as weights:
            names = []
            weights.visititems(lambda name, item: names.append(name) if isinstance(item, h5py.Dataset) else None)
        model = S2VT(ModelConfig.from_dict(json.loads(files["config.json"])["model"]))
        assert len(names) == len(model.weights) and not [n for n in names if "optimizer" in n]
        assert set(json.loads(files[weights_name.replace("model.weights.h5", "state.json")])) <= {
            "epoch", "batch_in_epoch", "best_score", "best_epoch", "step", "seed", "backend"}
    assert f"best/{last.name}/model.weights.h5" in bundle_files(last_bundle)  # unpacks as a run folder's best/


def test_download_then_infer_writes_captions(release, server, tmp_path, capsys):
    url = server.serve("/good/tiny.tar.gz", release.bundle.read_bytes())
    run_dir = fetch_release(url, directory=tmp_path / "checkpoints", sha256=release.sha256)
    assert run_dir == tmp_path / "checkpoints" / "tiny"
    checkpoint = resolve_checkpoint(release.run, load_model)[1]
    assert checkpoint.parent == release.run / "best"
    # local folders are not mistaken for release names; a path that is not there is no release name either
    assert [resolve_checkpoint(str(spec), load_model) for spec in (run_dir, checkpoint)] == [
        (run_dir, run_dir / "best" / checkpoint.name), (release.run, checkpoint)]
    with pytest.raises(DataError, match=f"^{tmp_path / 'tiny'}: no such checkpoint or run folder$"):
        resolve_checkpoint(str(tmp_path / "tiny"), load_model)
    assert json.loads((run_dir / "SOURCE.json").read_text())["sha256"] == release.sha256
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["tiny"]  # no partial folder left
    ids = release.data / "testing_id.txt"
    for name, checkpoint in (("released", run_dir), ("original", release.run)):
        assert infer.main([str(ids), str(tmp_path / f"{name}.txt"), "--checkpoint", str(checkpoint)]) == 0
    lines = (tmp_path / "released.txt").read_text().splitlines()
    assert [line.split(",", 1)[0] for line in lines] == ids.read_text().split()
    # one epoch may still caption with nothing at all, so compare with the run's own captions instead
    assert lines == (tmp_path / "original.txt").read_text().splitlines()


def test_second_use_of_a_name_makes_no_request(release, server, tmp_path, capsys):
    url = server.serve("/cached/tiny-v1.tar.gz", release.bundle.read_bytes())
    registry = tmp_path / "releases.json"
    registry.write_text(json.dumps([{"name": "tiny-v1", "url": url, "sha256": release.sha256,
                                     "size": release.bundle.stat().st_size,
                                     "trained_on": "tiny", "metrics": {}, "created": "2025-01-01T00:00:00Z"}]))
    args = ["download", "tiny-v1", "--dir", str(tmp_path / "checkpoints"), "--registry", str(registry)]
    assert main(args) == 0
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines() == [str(tmp_path / "checkpoints" / "tiny-v1")] * 2  # progress on stderr
    assert server.requests["/cached/tiny-v1.tar.gz"] == 1
    assert fetch_release(url, tmp_path / "checkpoints", release.sha256) == tmp_path / "checkpoints" / "tiny-v1"
    assert server.requests["/cached/tiny-v1.tar.gz"] == 1


def test_wrong_sha256_is_refused_and_deleted(release, server, tmp_path, capsys):
    url = server.serve("/wrong/tiny.tar.gz", release.bundle.read_bytes())
    assert main(["download", url, "--sha256", "0" * 64, "--dir", str(tmp_path)]) == 2
    err = the_error(capsys)
    assert "sha256 mismatch" in err and release.sha256 in err and "deleted" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("served, with_hash, message", [
    ("cut", True, "sha256 mismatch"),
    ("cut", False, "truncated or corrupt"),
    ("dropped", False, "download cut off after"),
    ("garbage", False, "truncated or corrupt"),
])
def test_truncated_or_corrupt_download_is_refused(release, server, tmp_path, served, with_hash, message):
    data = release.bundle.read_bytes()
    body = {"cut": data[:len(data) // 2], "dropped": data, "garbage": b"not an archive" * 100}[served]
    url = server.serve(f"/{served}/{with_hash}/tiny.tar.gz", body, short=served == "dropped")
    with pytest.raises(DataError, match=message):
        fetch_release(url, tmp_path, release.sha256 if with_hash else None, insecure_no_hash=not with_hash)
    assert list(tmp_path.iterdir()) == []


def test_404_is_refused(server, tmp_path, capsys):
    url = server.serve("/present.tar.gz", b"")
    assert main(["download", url.replace("present", "missing"), "--dir", str(tmp_path), "--insecure-no-hash"]) == 2
    err = the_error(capsys)
    assert "404" in err and "download failed" in err
    assert list(tmp_path.iterdir()) == []


def tar_member(name, kind=tarfile.REGTYPE, linkname=""):
    member = tarfile.TarInfo(name)
    member.type, member.linkname = kind, linkname
    member.size = 4 if kind == tarfile.REGTYPE else 0
    return member


def unsafe_members(kind, outside):
    """Tar members that would write the file `outside`, two levels above the unpacking folder."""
    return {"dotdot": [tar_member("../../../" + outside.name)],
            "absolute": [tar_member(str(outside))],
            "symlink": [tar_member("link", tarfile.SYMTYPE, str(outside.parent)), tar_member("link/" + outside.name)],
            "hardlink": [tar_member("hard", tarfile.LNKTYPE, str(outside))]}[kind]


@pytest.mark.parametrize("kind, refusal", [("dotdot", "points outside"), ("absolute", "points outside"),
                                           ("symlink", "link or special file"), ("hardlink", "link or special file")])
def test_unsafe_archive_member_is_refused_and_nothing_written_outside(release, server, tmp_path, kind, refusal):
    checkpoints = tmp_path / "a" / "checkpoints"  # unpacking happens in checkpoints/.s2vt-fetch.<name>.*.partial/run/
    outside = tmp_path / "a" / "escaped.txt"
    archive = pack(bundle_files(release.bundle), unsafe_members(kind, outside))
    url = server.serve(f"/unsafe/{kind}/tiny.tar.gz", archive)
    with pytest.raises(DataError, match=refusal):
        fetch_release(url, checkpoints, hashlib.sha256(archive).hexdigest())
    assert not outside.exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "checkpoints"]


@pytest.mark.parametrize("change, refusal", [
    ("vocab", "words, but the model was built for"),        # vocab.json no longer fits config.json
    ("vocab+config", "cannot be restored into this model"),  # both agree, but the weights are for another size
    ("unlisted", "differs from its MANIFEST.json entry"),    # a file changed without its manifest entry
])
def test_bundle_whose_vocab_does_not_fit_its_weights_is_refused(release, server, tmp_path, change, refusal):
    files = bundle_files(release.bundle)
    words = json.loads(files["vocab.json"]) + ["zebra"]
    files["vocab.json"] = json.dumps(words).encode()
    if change == "vocab+config":
        config = json.loads(files["config.json"])
        config["model"]["vocab_size"] = len(words)
        files["config.json"] = json.dumps(config).encode()
    archive = pack(files if change == "unlisted" else with_manifest(files))
    url = server.serve(f"/tampered/{change}/tiny.tar.gz", archive)
    with pytest.raises(DataError, match=refusal):
        fetch_release(url, tmp_path, hashlib.sha256(archive).hexdigest())
    assert list(tmp_path.iterdir()) == []


def test_url_without_hash_is_refused_unless_insecure_no_hash(release, server, tmp_path, capsys):
    url = server.serve("/nohash/tiny-nohash.tgz", release.bundle.read_bytes())
    assert main(["download", url, "--dir", str(tmp_path)]) == 2
    assert "no sha256 given" in the_error(capsys) and server.requests["/nohash/tiny-nohash.tgz"] == 0
    assert list(tmp_path.iterdir()) == []
    assert fetch_release(f"{url}#sha256={release.sha256}", tmp_path / "pinned") == tmp_path / "pinned" / "tiny-nohash"
    assert main(["download", url, "--dir", str(tmp_path), "--insecure-no-hash"]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "not verified" in err and f"--sha256 {release.sha256}" in err
    source = json.loads((tmp_path / "tiny-nohash" / "SOURCE.json").read_text())
    assert source["url"] == url and source["sha256"] == release.sha256 and source["sha256_given"] is False


def test_registry_url_without_scheme_is_the_file_beside_the_registry(release, tmp_path, capsys):
    """A release shipped in the repository: releases.json names the bundle by a path relative to itself; it is read
    from there, checked against the registry's sha256 and unpacked like a download."""
    shipped = tmp_path / "repo" / "checkpoints"
    (shipped / "bundles").mkdir(parents=True)
    (shipped / "bundles" / "tiny-local.tar.gz").write_bytes(release.bundle.read_bytes())
    (shipped / "bundles" / "spoiled.tar.gz").write_bytes(release.bundle.read_bytes()[:-100])
    registry = shipped / "releases.json"
    entries = [{"name": name, "url": f"bundles/{name}.tar.gz", "sha256": release.sha256,
                "size": release.bundle.stat().st_size, "trained_on": "tiny", "metrics": {},
                "created": "2025-01-01T00:00:00Z"} for name in ("tiny-local", "spoiled")]
    registry.write_text(json.dumps(entries))
    target = tmp_path / "fetched"
    run_dir = fetch_release("tiny-local", directory=target, registry=registry)
    assert run_dir == target / "tiny-local"
    source = json.loads((run_dir / "SOURCE.json").read_text())
    assert source["url"] == (shipped / "bundles" / "tiny-local.tar.gz").as_uri()
    assert source["sha256"] == release.sha256 and source["sha256_given"] is True
    assert resolve_checkpoint(run_dir, load_model)[1] == run_dir / "best" / latest_checkpoint(release.run / "best").name
    ids = release.data / "testing_id.txt"
    for name, checkpoint in (("shipped", run_dir), ("original", release.run)):
        assert infer.main([str(ids), str(tmp_path / f"{name}.txt"), "--checkpoint", str(checkpoint)]) == 0
    assert (tmp_path / "shipped.txt").read_text() == (tmp_path / "original.txt").read_text()
    # a shipped file that is not what the registry's sha256 says is refused, and nothing is left
    capsys.readouterr()
    assert main(["download", "spoiled", "--dir", str(target), "--registry", str(registry)]) == 2
    err = the_error(capsys)
    assert "sha256 mismatch" in err and (shipped / "bundles" / "spoiled.tar.gz").as_uri() in err
    assert sorted(p.name for p in target.iterdir()) == ["tiny-local"]


def stall(handler):
    """Accept the request and answer nothing."""
    time.sleep(3)


def announce_too_much(handler):
    handler.send_response(200)
    handler.send_header("Content-Length", str(10 ** 12))
    handler.end_headers()


def stream_without_length(handler):
    """No Content-Length: the body ends when the connection closes; it goes on past any cap."""
    handler.send_response(200)
    handler.end_headers()
    handler.close_connection = True
    try:
        for _ in range(30):
            handler.wfile.write(b"x" * 100_000)
    except OSError:
        pass


def announce_little_send_much(handler):
    handler.send_response(200)
    handler.send_header("Content-Length", "1000")
    handler.end_headers()
    try:
        handler.wfile.write(b"x" * 2_000_000)
    except OSError:
        pass


@pytest.mark.parametrize("answer, limits, refusal", [
    (stall, dict(timeout=0.5), "no answer within 0.5 s"),
    (announce_too_much, {}, f"announces {10 ** 12} bytes, over the limit of 1000000"),
    (stream_without_length, {}, "over the limit of 1000000 bytes"),
    (announce_little_send_much, {}, "truncated or corrupt"),  # only the 1000 bytes announced are read
])
def test_misbehaving_server_is_refused_in_bounded_time(server, tmp_path, answer, limits, refusal):
    url = server.serve_custom(f"/misbehaving/{answer.__name__}/x.tar.gz", answer)
    started = time.monotonic()
    with pytest.raises(DataError, match=refusal):
        fetch_release(url, tmp_path, insecure_no_hash=True, max_download_bytes=1_000_000, **limits)
    assert time.monotonic() - started < 2.5
    assert list(tmp_path.iterdir()) == []


def test_gzip_bomb_is_refused_before_unpacking(server, tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        member = tarfile.TarInfo("best/zeros.bin")
        member.size = 50_000_000
        tar.addfile(member, io.BytesIO(bytes(member.size)))
    bomb = buffer.getvalue()
    assert len(bomb) < 100_000
    url = server.serve("/bomb/x.tar.gz", bomb)
    with pytest.raises(DataError, match="unpacks to more than 10000000 bytes"):
        fetch_release(url, tmp_path, hashlib.sha256(bomb).hexdigest(), max_unpacked_bytes=10_000_000)
    assert list(tmp_path.iterdir()) == []


def test_partial_folders_of_killed_fetches_are_removed_and_no_others(release, server, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    ours = {tag: checkpoints / f"{PARTIAL_PREFIX}tiny.{tag}.partial" for tag in ("killed", "live", "starting")}
    others = [checkpoints / ".x.partial",  # another program's, with our marker file even: not our name
              checkpoints / ".tiny.old.partial"]  # an older s2vt's, or anyone's
    for folder in [*ours.values(), *others]:
        (folder / "run").mkdir(parents=True)
        (folder / ".lock").touch()
    for folder in (ours["killed"], ours["live"], *others):
        (folder / MARKER_FILE).write_text(MARKER_TEXT)  # the killed one's process died, and with it the lock
    os.utime(ours["starting"], (time.time() - 3600,) * 2)  # no marker, however old: not known to be ours
    with open(ours["live"] / MARKER_FILE) as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a fetch still running holds it
        url = server.serve("/partials/tiny.tar.gz", release.bundle.read_bytes())
        assert fetch_release(url, checkpoints, release.sha256) == checkpoints / "tiny"
        kept = [ours["live"].name, ours["starting"].name, *(folder.name for folder in others), "tiny"]
        assert sorted(p.name for p in checkpoints.iterdir()) == sorted(kept)
    remove_stale_partials(checkpoints)  # its fetch has ended without removing it: now it is stale
    kept.remove(ours["live"].name)
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted(kept)
    for folder in others:
        assert (folder / "run").is_dir() and (folder / MARKER_FILE).read_text() == MARKER_TEXT


def trickle(handler, data):
    """Send data a byte a second, until the client hangs up."""
    try:
        for byte in data:
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()
            time.sleep(1)
    except OSError:
        pass


def trickle_body(handler):
    handler.send_response(200)
    handler.send_header("Content-Length", "1000")
    handler.end_headers()
    trickle(handler, b"x" * 20)


def trickle_headers(handler):
    trickle(handler, b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")


@pytest.mark.parametrize("answer, flags, refusal, seconds", [
    (trickle_body, ["--timeout", "2", "--deadline", "2.5", "--min-rate-kb", "0"],
     "not done within the deadline of 2.5 s (--deadline)", 2.5),
    (trickle_body, ["--timeout", "1.5", "--min-rate-kb", "0.1"], "under the minimum of 0.1 kB/s (--min-rate-kb)", 2),
    (trickle_headers, ["--timeout", "2", "--deadline", "2", "--min-rate-kb", "0"],
     "not done within the deadline of 2 s (--deadline)", 2),
])
def test_a_server_trickling_a_byte_a_second_is_cut_off(server, tmp_path, capsys, answer, flags, refusal, seconds):
    url = server.serve_custom(f"/trickle/{answer.__name__}/{seconds}/x.tar.gz", answer)
    started = time.monotonic()
    assert main(["download", url, "--dir", str(tmp_path), "--insecure-no-hash", *flags]) == 2
    elapsed = time.monotonic() - started
    assert refusal in the_error(capsys)
    assert seconds - 0.1 < elapsed < seconds + 1.5, elapsed
    assert list(tmp_path.iterdir()) == []


def huge_header_archive(kind, size=150_000_000):
    """A .tar.gz whose first header is a PAX header or GNU long name of `size` bytes (about 146 kB for 150 MB),
    then a small file."""
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as archive:
        header = tarfile.TarInfo("././@PaxHeader" if kind == "pax" else "././@LongLink")
        header.type, header.size = (tarfile.XHDTYPE if kind == "pax" else tarfile.GNUTYPE_LONGNAME), size
        archive.write(header.tobuf(tarfile.USTAR_FORMAT))
        prefix = f"{size} comment=".encode() if kind == "pax" else b""
        archive.write(prefix)
        chunk, left = b"x" * (1 << 20), size - len(prefix) - 1
        while left > 0:
            archive.write(chunk[:left])
            left -= len(chunk)
        archive.write(b"\n" + bytes(-size % tarfile.BLOCKSIZE))
        member = tarfile.TarInfo("config.json")
        member.size = 2
        archive.write(member.tobuf(tarfile.USTAR_FORMAT) + b"{}" + bytes(tarfile.BLOCKSIZE - 2 + 2 * tarfile.BLOCKSIZE))
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["pax", "gnu-long-name"])
def test_a_huge_extended_header_is_refused_before_it_is_read(server, tmp_path, kind):
    archive = huge_header_archive(kind)
    assert len(archive) < 200_000
    url = server.serve(f"/huge-header/{kind}/x.tar.gz", archive)
    started = time.monotonic()
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"refused: extended \(PAX or GNU long-name\) headers of over 1048576 "
                                            r"bytes \(one of 150000000 bytes\)"):
            fetch_release(url, tmp_path, hashlib.sha256(archive).hexdigest())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(f"{kind}: refused in {time.monotonic() - started:.2f} s, {peak / 1e6:.1f} MB at most")
    assert peak < 20_000_000 and time.monotonic() - started < 2
    assert list(tmp_path.iterdir()) == []
