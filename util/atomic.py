"""Write files so that a crash or a full disk never leaves a half-written one: temp name in the same folder, flushed
to disk, then renamed over the target. A temp file's name says which process wrote it (owner_tag), so that the next
write into its folder removes those of processes killed while writing, and only those. refuse_overwriting_inputs
keeps a command's outputs off its inputs and off each other."""
import os
import re
import socket
import uuid
import zlib
from contextlib import contextmanager
from pathlib import Path

from util.errors import DataError

HOST = f"{zlib.crc32(socket.gethostname().encode()):08x}"  # a pid names a process of one machine only
_OWNER = re.compile(r"s2vt-([0-9a-f]{8})-(\d+)")
_TEMP_FILE = re.compile(r"\..+\.(s2vt-[0-9a-f]{8}-\d+)\.[0-9a-f]{12}\.tmp")
_swept = set()  # the folders whose dead temp files this process has removed already


def fsync(path):
    """Flush one file, or one folder's entries, to disk: a rename is only as durable as what it renames."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder):
    """fsync every file and folder under folder, then folder itself."""
    for item in sorted(Path(folder).rglob("*"), reverse=True):
        fsync(item)
    fsync(folder)


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success flush it and rename it over `path`, on any error remove it.

    The temporary file is made with the usual permissions (0666 less the umask, as open() does). A file-system error
    (missing folder, no permission, disk full, `path` is a folder) leaves any old file as it was and becomes a
    DataError naming `path`."""
    path = Path(path)
    remove_dead_temp_files(path.parent)
    tmp = path.parent / f".{path.name}.{owner_tag()}.{uuid.uuid4().hex[:12]}.tmp"
    made = False
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        made = True
        yield tmp
        fsync(tmp)
        os.replace(tmp, path)
        fsync(path.parent)
    except BaseException as error:
        if made:
            tmp.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise DataError(f"{path}: cannot write ({error.strerror or error})") from None
        raise


def write_text_atomic(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def owner_tag():
    """This process as named in its temporary files and folders: s2vt-<hash of the host name>-<pid>."""
    return f"s2vt-{HOST}-{os.getpid()}"


def left_by_dead_process(tag):
    """Whether an owner_tag() names a process of this machine, other than this one, that has ended."""
    match = _OWNER.fullmatch(tag)
    if not match or match.group(1) != HOST or int(match.group(2)) == os.getpid():
        return False
    try:
        os.kill(int(match.group(2)), 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):  # another user's live process, or no pid at all
        return False
    return False


def remove_dead_temp_files(folder):
    """Remove folder's .NAME.<owner tag>.<hex>.tmp files of processes killed while writing them; once per folder in
    a process, so that writing many files into one folder scans it once."""
    key = os.path.abspath(folder)
    if key in _swept:
        return
    _swept.add(key)
    try:
        with os.scandir(folder) as entries:
            dead = [entry.path for entry in entries if (match := _TEMP_FILE.fullmatch(entry.name))
                    and entry.is_file(follow_symlinks=False) and left_by_dead_process(match.group(1))]
    except OSError:  # no such folder: the write itself says so
        return
    for path in dead:
        try:
            os.unlink(path)
        except OSError:
            pass


def same_file(a, b):
    """Whether two paths name one file: the same file when both exist (hard links too), else the same path once
    symbolic links are resolved."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def refuse_overwriting_inputs(outputs, inputs):
    """Refuse, before any work, an output file that is one of the inputs or another output: writing it would replace
    that file. outputs and inputs are (what, path) pairs, e.g. ("--json", "talk.json"); a None path is skipped."""
    outputs = [(what, path) for what, path in outputs if path]
    inputs = [(what, path) for what, path in inputs if path]
    for n, (what, path) in enumerate(outputs):
        for other_what, other in inputs:
            if same_file(path, other):
                raise DataError(f"{path}: the {what} output is the input {other_what} {other}; writing it would "
                                f"replace that file, so give the output another name")
        for other_what, other in outputs[:n]:
            if same_file(path, other):
                raise DataError(f"{path}: given as both the {other_what} and the {what} output; give each its own "
                                f"file")
