"""Atomic file writes: the package's one way to write a file that a crash must never leave half-written.

:class:`AtomicPath` makes a temporary file in the destination's folder and, on commit, fsyncs it and
renames it over the destination (``os.replace``, atomic on POSIX); on any error the temporary file is
removed and the destination is untouched. :func:`atomic_write` hands the caller an open file on top of it;
writers that need a file name (mdtraj's trajectory files) use :class:`AtomicPath` directly. Readers therefore see the old file or the
new one, never a mixture. The sampler's run directory writes through this too.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

__all__ = ["atomic_write", "AtomicPath", "TEMP_PREFIX"]

#: Prefix of the temporary files (a crash between create and rename can leave one behind).
TEMP_PREFIX = ".tmp-cgflow-"


class AtomicPath:
    """A temporary path beside ``path`` that replaces ``path`` on :meth:`commit` (or is removed on
    :meth:`discard`): for writers that need a file name, such as mdtraj's trajectory files.

    The folder is created if needed; the committed file gets mode 0o644. Also a context manager: commit on
    a clean exit, discard on an exception.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX, suffix=os.path.splitext(self.path)[1])
        os.close(fd)

    def commit(self) -> None:
        """Flush the temporary file to disk and rename it over the destination."""
        with open(self.tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(self.tmp, 0o644)
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        if os.path.exists(self.tmp):
            os.remove(self.tmp)

    def __enter__(self) -> "AtomicPath":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb"):
    """Context manager yielding a file object whose content replaces ``path`` on successful exit.

    ``mode``: "wb" (binary, default) or "w" (text). The folder is created if needed; the file gets mode
    0o644. Usage: ``with atomic_write(p) as fh: torch.save(obj, fh)``.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    with AtomicPath(path) as target:
        with open(target.tmp, mode) as fh:
            yield fh
