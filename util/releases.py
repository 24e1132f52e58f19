"""Which checkpoint a --checkpoint names, and released checkpoints fetched by name or URL.

    resolve_checkpoint(spec, check_release)    # (run folder, checkpoint folder): the one place a checkpoint is chosen
    fetch_release(spec, check_run=...)         # a release's run folder, checkpoints/<name>, fetched once

The registry (checkpoints/releases.json) is a JSON list of {name, url, sha256, size, trained_on, metrics, created}; a
url without a scheme is a file beside the registry (a release shipped in the repository). A URL needs its sha256
(sha256=, or the URL ending in #sha256=HEX; insecure_no_hash installs it unverified). A download has a connect and
read timeout, an overall deadline, a minimum rate (over every timeout seconds) and a size cap, counted as it arrives
whatever the server announces; it is checked against its sha256, unpacked member by member (plain files and folders
only, nothing outside, their sizes checked against a cap before any is written, extended headers too before they
are read), checked against MANIFEST.json and restored into the model once (check_run), in a hidden folder
DIR/.s2vt-fetch.<name>.*.partial, and only then renamed to DIR/<name>: a reader never sees a half-unpacked release.
A partial folder left by a killed fetch is removed by the next fetch into DIR: one of that name holding the marker
file a fetch writes (and locks while it runs); any other folder, and one still locked, is kept.
DIR/<name>/SOURCE.json records where it came from; a second fetch of it makes no request. tools/release.py packs
releases and fetches them from the command line (--deadline, --min-rate-kb and the other limits).
"""
import fcntl
import gzip
import hashlib
import http.client
import json
import re
import shutil
import socket
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zlib
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from util.checkpoints import DEFAULT_ROOT, STATE_FILE, latest_checkpoint, newest_run
from util.data import read_json, sha256_of
from util.errors import DataError

DEFAULT_REGISTRY = DEFAULT_ROOT / "releases.json"
BUNDLE_MANIFEST = "MANIFEST.json"
SOURCE_FILE = "SOURCE.json"
URL_SCHEMES = ("http", "https", "file")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_DOWNLOAD_BYTES = 2_000_000_000
MAX_UNPACKED_BYTES = 4_000_000_000
MAX_MEMBERS = 10_000  # files and folders in a release; a real one holds under 10
TIMEOUT_S = 30.0  # to connect, and for each read
DEADLINE_S = 3600.0  # for a whole download
MIN_RATE = 10_000  # bytes a second at least, over every TIMEOUT_S
MAX_HEADER_BYTES = 1 << 20  # PAX and GNU long-name headers in all; a release's hold a few hundred bytes
CHUNK = 1 << 20
PARTIAL_PREFIX = ".s2vt-fetch."  # DIR/.s2vt-fetch.<name>.<random>.partial: a fetch's work folder
MARKER_FILE, MARKER_TEXT = ".s2vt-fetch", "tools.release: a fetch's work folder, locked while the fetch runs\n"


# ---- choosing a checkpoint ----

def resolve_checkpoint(spec, check_release):
    """(run_dir, checkpoint folder) for what a --checkpoint names: a run folder (its best checkpoint, else its
    newest), a best/ or last/ folder or a checkpoint folder; a release name (releases.json) or URL, fetched into
    checkpoints/ once (fetch_release, check_release vetting it); None: the newest run's. The one place where a
    checkpoint is chosen."""
    if not spec:
        path = newest_run()
    elif Path(spec).exists() or not _names_a_release(str(spec)):
        path = Path(spec)
    else:
        path = fetch_release(str(spec), check_run=check_release)
    if not path.is_dir():
        raise DataError(f"{path}: no such checkpoint or run folder")
    for run_dir, folders in ((path, ("best", "last")), (path.parent, (path.name,))):
        if (run_dir / "config.json").is_file():
            for folder in folders:
                found = latest_checkpoint(run_dir / folder)
                if found:
                    return run_dir, found
            if _is_tensorflow_run(run_dir):
                raise DataError(f"{run_dir}: holds TensorFlow checkpoints of an older s2vt; convert it with "
                                f"`python -m tools.convert_run {run_dir}` (needs TensorFlow)")
            raise DataError(f"{path}: holds no checkpoint")
    if (path / STATE_FILE).is_file() and (path.parent.parent / "config.json").is_file():
        return path.parent.parent, path
    raise DataError(f"{path}: not a run folder (no config.json)")


def _names_a_release(spec):
    """Whether spec could name a release: a URL, or a name as releases.json holds them (a path cannot be one)."""
    return urllib.parse.urlsplit(spec).scheme in URL_SCHEMES or bool(_NAME.fullmatch(spec))


def _is_tensorflow_run(run_dir):
    return any((Path(run_dir) / folder / "checkpoint").is_file() for folder in ("best", "last"))


# ---- registry ----

def load_registry(path=DEFAULT_REGISTRY):
    """{name: entry} from a releases.json list of {name, url, sha256, size, trained_on, metrics, created}."""
    path = Path(path)
    entries = read_json(path, "release registry not found")
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a JSON list of {{name, url, sha256, ...}}")
    registry = {}
    for n, entry in enumerate(entries):
        if not (isinstance(entry, dict) and all(isinstance(entry.get(k), str) for k in ("name", "url", "sha256"))):
            raise DataError(f"{path}: entry {n} lacks a string name, url or sha256")
        _check_name(entry["name"], path)
        _check_sha256(entry["sha256"], f"{path}: {entry['name']}")
        if entry["name"] in registry:
            raise DataError(f"{path}: release {entry['name']} listed twice")
        registry[entry["name"]] = entry
    return registry


def _check_name(name, where):
    if not _NAME.fullmatch(name):
        raise DataError(f"{where}: {name!r} is not a release name (letters, digits, '.', '_', '-')")
    return name


def _check_sha256(digest, where):
    if not _SHA256.fullmatch(digest):
        raise DataError(f"{where}: {digest!r} is not a sha256 (64 lowercase hex digits)")
    return digest


# ---- download ----

def fetch_release(spec, directory=None, sha256=None, registry=None, insecure_no_hash=False,
                  max_download_bytes=MAX_DOWNLOAD_BYTES, max_unpacked_bytes=MAX_UNPACKED_BYTES, timeout=TIMEOUT_S,
                  deadline=DEADLINE_S, min_rate=MIN_RATE, *, check_run):
    """The run folder DIR/<name> of a release given by registry name or URL, downloaded and checked if not there yet;
    check_run(run folder) loads it before it is put in place (model.load_model: its vocabulary, config and weights
    fit), a DataError refusing it. A URL without a sha256 (sha256=, or #sha256=HEX on the URL) is refused unless
    insecure_no_hash. timeout: seconds to connect and for each read; deadline: seconds for the whole download;
    min_rate: bytes a second at least, over every `timeout` seconds (0: no minimum)."""
    directory = Path(directory) if directory else DEFAULT_ROOT
    sha256 = _check_sha256(sha256.lower(), "--sha256") if sha256 else None
    if urllib.parse.urlsplit(spec).scheme in URL_SCHEMES:
        url, fragment = urllib.parse.urldefrag(spec)
        if fragment.startswith("sha256="):
            pinned = _check_sha256(fragment.removeprefix("sha256=").lower(), f"{spec}: #sha256=")
            if sha256 and sha256 != pinned:
                raise DataError(f"{spec}: --sha256 {sha256} differs from the URL's #sha256={pinned}")
            sha256 = pinned
        name = _check_name(PurePosixPath(urllib.parse.urlsplit(url).path).name.removesuffix(".tar.gz")
                           .removesuffix(".tgz"), url)
        if sha256 is None and not insecure_no_hash:
            raise DataError(f"{url}: no sha256 given, so the download could not be checked; pass --sha256 HEX (or end "
                            f"the URL with #sha256=HEX), or --insecure-no-hash to install it unverified")
    else:
        registry_path = Path(registry) if registry else DEFAULT_REGISTRY
        # a missing default registry just means no names; a registry asked for must exist
        releases = load_registry(registry_path) if registry or registry_path.is_file() else {}
        if spec not in releases:
            raise DataError(f"{spec}: not a local checkpoint, a URL, or a release name in {registry_path}")
        name, url = spec, releases[spec]["url"]
        if not urllib.parse.urlsplit(url).scheme:  # shipped beside the registry
            url = (registry_path.resolve().parent / url).as_uri()
        if sha256 and sha256 != releases[spec]["sha256"]:
            raise DataError(f"{spec}: --sha256 {sha256} differs from the registry's {releases[spec]['sha256']}")
        sha256 = releases[spec]["sha256"]
    target = directory / name
    if target.exists():
        return _already_fetched(target, url, sha256)
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(directory)
    # download and unpack in a hidden folder beside the target, so the final rename is atomic
    work = Path(tempfile.mkdtemp(prefix=f"{PARTIAL_PREFIX}{name}.", suffix=".partial", dir=directory))
    try:
        with open(work / MARKER_FILE, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # remove_stale_partials in other processes keeps out while it is held
            lock.write(MARKER_TEXT)
            lock.flush()
            pace = _Pace(url, timeout, deadline, min_rate)
            archive, digest = _download(url, sha256, work, max_download_bytes, pace)
            run_dir = _unpack(archive, work / "run", url, max_unpacked_bytes)
            _verify_bundle(run_dir, url, check_run)
            (run_dir / SOURCE_FILE).write_text(json.dumps({"name": name, "url": url, "sha256": digest,
                                                           "sha256_given": sha256 is not None,
                                                           "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                    time.gmtime())}, indent=1))
            try:
                run_dir.rename(target)
            except OSError:
                if not target.exists():
                    raise
                return _already_fetched(target, url, sha256)  # another process fetched it meanwhile
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if sha256 is None:
        warnings.warn(f"{url}: --insecure-no-hash: the download was not verified; its sha256 is {digest} "
                      f"(recorded in {target / SOURCE_FILE}; pass --sha256 {digest} next time)", stacklevel=2)
    return target


def remove_stale_partials(directory):
    """Remove the work folders of fetches into DIR that were killed: named DIR/.s2vt-fetch.*.partial and holding
    the marker file a fetch writes, which no process holds locked. Nothing else is touched: not another program's
    folder, nor one whose fetch is still running or has not written its marker yet."""
    for folder in Path(directory).glob(f"{PARTIAL_PREFIX}*.partial"):
        if folder.is_symlink():
            continue
        try:
            with open(folder / MARKER_FILE, "r") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if lock.read() == MARKER_TEXT:
                    shutil.rmtree(folder, ignore_errors=True)  # while locked, so no one else takes it meanwhile
        except (OSError, UnicodeDecodeError):  # BlockingIOError: a live fetch; FileNotFoundError: no marker
            continue


def _already_fetched(target, url, sha256):
    """An earlier fetch of the same release, or an error if target holds something else."""
    try:
        source = json.loads((target / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        raise DataError(f"{target}: exists but was not fetched by tools.release; remove it or choose --dir") from None
    same = source.get("sha256") == sha256 if sha256 else source.get("url") == url
    if not same:
        raise DataError(f"{target}: holds another release ({source.get('url')}, sha256 {source.get('sha256')}); "
                        f"remove it or choose --dir")
    return target


class _Pace:
    """A download's overall deadline and minimum rate. The rate is checked as each piece arrives, over windows of
    `timeout` seconds (a longer silence is the read timeout's); at the deadline a timer shuts the connection's
    socket, so a server trickling its headers, before any piece arrives, is cut off too."""

    def __init__(self, url, timeout, deadline, min_rate):
        self.url, self.timeout, self.deadline, self.min_rate = url, timeout, deadline, min_rate
        self.started = self.window_start = None
        self.window_bytes = 0
        self.sockets, self.lock, self.expired = [], threading.Lock(), False
        self.timer = threading.Timer(deadline, self._expire)
        self.timer.daemon = True

    def __enter__(self):
        self.started = self.window_start = time.monotonic()
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()

    def _expire(self):
        with self.lock:
            self.expired = True
            for sock in self.sockets:
                _shut(sock)

    def record(self, sock):
        """A connection's socket, once connected: shut at the deadline (at once if that has passed)."""
        with self.lock:
            self.sockets.append(sock)
            if self.expired:
                _shut(sock)

    def opener(self):
        return urllib.request.build_opener(_RecordingHTTP(self.record), _RecordingHTTPS(self.record))

    def too_late(self):
        return DataError(f"{self.url}: download refused: not done within the deadline of {self.deadline:g} s "
                         f"(--deadline)")

    def arrived(self, size):
        now = time.monotonic()
        if self.expired or now - self.started > self.deadline:
            raise self.too_late()
        self.window_bytes += size
        if now - self.window_start >= self.timeout:
            rate = self.window_bytes / (now - self.window_start)
            if rate < self.min_rate:
                raise DataError(f"{self.url}: download refused: {rate:.0f} bytes/s over the last "
                                f"{now - self.window_start:.1f} s, under the minimum of {self.min_rate / 1e3:g} kB/s "
                                f"(--min-rate-kb)")
            self.window_start, self.window_bytes = now, 0


def _shut(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)  # a read blocked on it returns at once
    except OSError:
        pass


class _Recording:
    """A urllib handler that hands each connection's socket to record() once connected."""

    def __init__(self, record, **kwargs):
        super().__init__(**kwargs)
        self.record = record

    def do_open(self, http_class, req, **kwargs):
        def connection(*args, **options):
            made = http_class(*args, **options)
            connect = made.connect

            def connect_and_record():
                connect()
                self.record(made.sock)
            made.connect = connect_and_record
            return made
        return super().do_open(connection, req, **kwargs)


class _RecordingHTTP(_Recording, urllib.request.HTTPHandler):
    pass


class _RecordingHTTPS(_Recording, urllib.request.HTTPSHandler):
    pass


def _download(url, sha256, folder, max_bytes, pace):
    """Stream url into folder/release.tar.gz within pace's timeout, deadline and minimum rate, refusing it past
    max_bytes (announced or counted) and, when a sha256 is given, unless it matches: (path, its sha256)."""
    path = folder / "release.tar.gz"
    with pace:
        try:
            digest = _stream(url, path, max_bytes, pace)
        except DataError:
            if pace.expired:  # the timer shut the socket: whatever broke, the deadline did it
                raise pace.too_late() from None
            raise
        if pace.expired:  # a body without Content-Length ends quietly when its socket is shut
            raise pace.too_late()
    if sha256 and digest.hexdigest() != sha256:
        raise DataError(f"{url}: sha256 mismatch (expected {sha256}, got {digest.hexdigest()}); "
                        f"the download was refused and deleted")
    return path, digest.hexdigest()


def _stream(url, path, max_bytes, pace):
    """Copy url's body into path, each piece as it arrives: its sha256 object."""
    digest, received, timeout = hashlib.sha256(), 0, pace.timeout
    try:
        with pace.opener().open(url, timeout=timeout) as response, open(path, "wb") as out:
            announced = response.headers.get("Content-Length")
            announced = int(announced) if announced and announced.isdigit() else None
            if announced is not None and announced > max_bytes:
                raise DataError(f"{url}: refused: the server announces {announced} bytes, over the limit of "
                                f"{max_bytes} (--max-download-mb)")
            with tqdm(total=announced, unit="B", unit_scale=True, desc="downloading", leave=False,
                      file=sys.stderr) as progress:  # stdout may carry captions
                while chunk := response.read1(CHUNK):  # what has arrived, so the pace is checked between pieces
                    received += len(chunk)
                    if received > max_bytes:
                        raise DataError(f"{url}: refused: over the limit of {max_bytes} bytes (--max-download-mb)")
                    pace.arrived(len(chunk))
                    out.write(chunk)
                    digest.update(chunk)
                    progress.update(len(chunk))
            if announced is not None and received < announced:  # http.client ends such a read quietly
                raise DataError(f"{url}: download cut off after {received} of {announced} bytes")
    except urllib.error.HTTPError as error:
        raise DataError(f"{url}: download failed (HTTP {error.code} {error.reason})") from None
    except urllib.error.URLError as error:
        raise DataError(f"{url}: download failed ({error.reason})") from None
    except TimeoutError:
        raise DataError(f"{url}: download failed (no answer within {timeout:g} s)") from None
    except http.client.IncompleteRead as error:
        raise DataError(f"{url}: download cut off after {received + len(error.partial)} of "
                        f"{received + len(error.partial) + (error.expected or 0)} bytes") from None
    except (OSError, http.client.HTTPException) as error:
        raise DataError(f"{url}: download failed ({type(error).__name__}: {error})") from None
    return digest


def _unpack(archive, out_dir, url, max_bytes=MAX_UNPACKED_BYTES):
    """Extract plain files and folders only, each checked to stay inside out_dir and within max_bytes in all
    before it is written, and their extended headers within MAX_HEADER_BYTES before they are read."""
    out_dir.mkdir()
    try:
        with tarfile.open(archive, "r:gz", tarinfo=_CappedTarInfo) as tar:
            tar.extractall(out_dir, members=_safe_members(tar, url, max_bytes), filter="data")
    except _RefusedHeader as error:
        raise DataError(f"{url}: refused: {error}") from None
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise DataError(f"{url}: not a complete .tar.gz archive, truncated or corrupt ({error})") from None
    return out_dir


class _RefusedHeader(Exception):
    """An archive header refused before tarfile reads what it announces."""


class _CappedTarInfo(tarfile.TarInfo):
    """tarfile reads a PAX or GNU long-name header's whole announced size into memory, and a sparse member's map
    however long, before the member is seen: the headers' sizes are counted first, and sparse members (never in a
    release) refused before their maps are read."""
    EXTENDED = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                tarfile.GNUTYPE_LONGLINK)

    def _refuse_sparse(self, *args):
        raise _RefusedHeader("the archive holds a sparse member, which a release never does")

    _proc_sparse = _proc_gnusparse_00 = _proc_gnusparse_01 = _proc_gnusparse_10 = _refuse_sparse

    def _proc_member(self, tar):
        if self.type in self.EXTENDED:
            tar.extended_header_bytes = getattr(tar, "extended_header_bytes", 0) + self.size
            if tar.extended_header_bytes > MAX_HEADER_BYTES:
                raise _RefusedHeader(f"extended (PAX or GNU long-name) headers of over {MAX_HEADER_BYTES} bytes "
                                     f"(one of {self.size} bytes)")
        return super()._proc_member(tar)


def _safe_members(tar, url, max_bytes):
    total = 0
    for count, member in enumerate(tar, 1):
        total += member.size
        if total > max_bytes:
            raise DataError(f"{url}: refused: unpacks to more than {max_bytes} bytes (--max-unpacked-mb)")
        if count > MAX_MEMBERS:
            raise DataError(f"{url}: refused: more than {MAX_MEMBERS} files in the archive")
        path = PurePosixPath(member.name)
        if path.is_absolute() or ".." in path.parts:
            raise DataError(f"{url}: refused: archive member {member.name!r} points outside the release folder")
        if not (member.isfile() or member.isdir()):
            raise DataError(f"{url}: refused: archive member {member.name!r} is a link or special file")
        yield member


def _verify_bundle(run_dir, url, check_run):
    """Every file as listed in MANIFEST.json, and a vocabulary and config that fit the weights (check_run)."""
    try:
        listed = json.loads((run_dir / BUNDLE_MANIFEST).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        listed = None
    if not isinstance(listed, dict):
        raise DataError(f"{url}: refused: no readable {BUNDLE_MANIFEST} in the archive")
    present = {path.relative_to(run_dir).as_posix(): path for path in run_dir.rglob("*")
               if path.is_file() and path.name != BUNDLE_MANIFEST}
    if set(listed) != set(present):
        raise DataError(f"{url}: refused: files missing {sorted(set(listed) - set(present))} or unlisted "
                        f"{sorted(set(present) - set(listed))} in {BUNDLE_MANIFEST}")
    for name, path in present.items():
        if listed[name] != {"sha256": sha256_of(path), "size": path.stat().st_size}:
            raise DataError(f"{url}: refused: {name} differs from its {BUNDLE_MANIFEST} entry")
    try:
        check_run(run_dir)  # checks vocab.json against config.json and restores the weights into that model
    except DataError as error:
        raise DataError(f"{url}: refused: {error}") from None
    except (ValueError, TypeError, KeyError) as error:
        raise DataError(f"{url}: refused: config.json or vocab.json is malformed ({error})") from None
