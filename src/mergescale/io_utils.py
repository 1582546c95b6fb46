"""Atomic writes: a killed job never leaves a file or directory that looks finished.

Write errors (disk full, quota, file size limit, permissions) surface as
``OutputWriteError`` naming the file being written, never as a silently short file.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# errno values meaning "no room": full disk, exceeded quota, RLIMIT_FSIZE (or a file
# system's maximum file size).
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class OutputWriteError(OSError):
    """Writing an output file failed; the message names the file and what to do.

    `note` (optional) says what became of the output, e.g. that nothing was kept.
    """

    def __init__(self, path: Path | str, cause: OSError, note: str | None = None):
        super().__init__(cause.errno, cause.strerror, str(path))
        self.path = Path(path)
        self.cause = cause
        why = f" ({cause.strerror or cause})" + (f"; {note}" if note else "")
        if cause.errno in _NO_SPACE:
            self.message = (
                f"no space left / file too large while writing {path}{why}; free disk "
                "space (or raise the quota / file size limit) and run again"
            )
        else:
            self.message = f"cannot write {path}{why}"

    def __str__(self) -> str:
        return self.message


@contextmanager
def reporting_write_errors(path: Path | str) -> Iterator[None]:
    """Turn an OSError raised while writing ``path`` into an OutputWriteError naming it
    (or naming the file the error itself names, when opening one failed)."""
    try:
        yield
    except OutputWriteError:
        raise
    except OSError as e:
        raise OutputWriteError(e.filename or path, e) from e


def _temporary_name(path: Path) -> Path:
    """A fresh ``.<name>.<random>.tmp`` sibling of ``path`` (created with O_EXCL / mkdir).

    Not tempfile's mkstemp/mkdtemp: their mode 0600/0700 would carry over to the
    finished output, unreadable to colleagues on a shared cluster; os.open and mkdir
    honour the umask.
    """
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with reporting_write_errors(path), os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _temporaries(path: Path) -> list[Path]:
    """What earlier attempts at ``path`` may have left: ``.<name>.*.tmp`` siblings."""
    return [Path(p) for p in glob.glob(os.path.join(glob.escape(str(path.parent)),
                                                    f".{glob.escape(path.name)}.*.tmp"))]


@contextmanager
def atomic_directory(path: Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes ``path`` on success.

    On any exception the temporary directory is removed and ``path`` is left as it was.
    An existing ``path`` is replaced (``replace=True``) only after the new directory is
    complete; with ``replace=False`` one that appeared meanwhile raises FileExistsError.
    Every temporary is named ``.<name>.*.tmp``, which the next attempt removes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A job killed with SIGKILL cannot clean up: remove what an earlier attempt left.
    # (Snakemake never runs two jobs for the same output at once.)
    for stale in _temporaries(path):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = _temporary_name(path)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            if not replace:
                raise FileExistsError(f"{path} appeared while it was being written; not replacing it")
            # Move the old one aside and delete it after the swap: a kill never leaves
            # a half-deleted `path`, and the aside name is one the next attempt clears.
            old = path.with_name(f".{path.name}.old-{os.getpid()}.tmp")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
