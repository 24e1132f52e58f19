"""Write files so that a crash or a full disk never leaves a half-written one: temp name in the same folder, flushed
to disk, then renamed over the target."""
import os
import uuid
from contextlib import contextmanager
from pathlib import Path

from util.errors import DataError


def fsync_tree(path):
    """Flush a file, or a folder's files and the folder itself, to disk: a rename is only as durable as what it
    renames."""
    path = Path(path)
    items = [*sorted(path.rglob("*"), reverse=True), path] if path.is_dir() else [path]
    for item in items:
        fd = os.open(item, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success flush it and rename it over `path`, on any error remove it.

    The temporary file is made with the usual permissions (0666 less the umask, as open() does). A file-system error
    (missing folder, no permission, disk full, `path` is a folder) leaves any old file as it was and becomes a
    DataError naming `path`."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    made = False
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        made = True
        yield tmp
        fsync_tree(tmp)
        os.replace(tmp, path)
        fsync_tree(path.parent)
    except BaseException as error:
        if made:
            tmp.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise DataError(f"{path}: cannot write ({error.strerror or error})") from None
        raise


def write_text_atomic(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
