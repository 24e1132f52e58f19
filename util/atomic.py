"""Write files so that a crash or a full disk never leaves a half-written one: temp name in the same folder, then rename."""
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success rename it over `path`, on any error remove it.

    A file-system error (missing folder, no permission, disk full, `path` is a folder) leaves any old file as it
    was and becomes a DataError naming `path`."""
    from util.data import DataError  # imported here: util.data imports util.vocab, which imports this module

    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the finished file gets the usual permissions
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as error:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise DataError(f"{path}: cannot write ({error.strerror or error})") from None
        raise


def write_text_atomic(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
