"""Atomic file writes: the package's one way to write a file that a crash must never leave half-written.

:func:`atomic_write` opens a temporary file in the destination's folder, hands it to the caller, flushes
and fsyncs it, then renames it over the destination (``os.replace``, atomic on POSIX); on any error the
temporary file is removed and the destination is untouched. Readers therefore see the old file or the
new one, never a mixture. The sampler's run directory writes through this too.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

__all__ = ["atomic_write", "TEMP_PREFIX"]

#: Prefix of the temporary files (a crash between create and rename can leave one behind).
TEMP_PREFIX = ".tmp-cgflow-"


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb"):
    """Context manager yielding a file object whose content replaces ``path`` on successful exit.

    ``mode``: "wb" (binary, default) or "w" (text). The folder is created if needed; the file gets mode
    0o644. Usage: ``with atomic_write(p) as fh: torch.save(obj, fh)``.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX, suffix=suffix)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
