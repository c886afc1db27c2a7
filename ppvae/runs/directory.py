"""One writer per run directory, and no leftovers from interrupted writes (DESIGN §6).

:class:`RunLock` is an exclusive OS lock (``flock``) on ``RUN/.lock``, held by the process that
creates or trains the run for as long as it does; the operating system drops it when that process
ends, however it ends. The file records the holder's pid and is emptied on a clean release, so a
pid found in it by the next writer names a process that was killed: its lock is taken over with a
notice. Temporary files of atomic writes (``.NAME.XXXX.tmp``) left by a kill are removed when the
next writer starts.
"""

from __future__ import annotations

import os
from pathlib import Path

from ppvae.checkpoint import TEMPORARY_SUFFIX
from ppvae.errors import PPVAEError

LOCK_FILE = ".lock"

try:  # POSIX; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None


class RunLock:
    """The exclusive lock of one run directory (see the module docstring)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_FILE
        self._handle = None

    @property
    def held(self) -> bool:
        return self._handle is not None

    def acquire(self) -> str | None:
        """Take the lock; a one-line error when another process holds it. Returns a notice when
        the lock of a killed writer was taken over."""
        if self._handle is not None:
            return None
        try:
            handle = open(self.path, "a+")  # noqa: SIM115 - held for the life of the lock
        except OSError as error:
            raise PPVAEError(
                f"cannot write to {self.path.parent}: {error.strerror}; check its permissions"
            ) from None
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                handle.close()
                if holder == str(os.getpid()):
                    raise PPVAEError(
                        f"{self.path.parent} is held by another Run object of this process; "
                        "train that one, or call its release_lock() first"
                    ) from None
                raise PPVAEError(
                    f"{self.path.parent} is being written by another ppvae process (pid {holder}); "
                    "wait for it to finish, or pick another --run-dir"
                ) from None
        handle.seek(0)
        previous = handle.read().strip()
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle
        if previous and previous != str(os.getpid()):
            return (
                f"the previous writer of {self.path.parent} (pid {previous}) ended without "
                "releasing it; its lock is taken over"
            )
        return None

    def release(self) -> None:
        """Empty the lock file (a clean end) and drop the lock."""
        if self._handle is None:
            return
        try:
            self._handle.seek(0)
            self._handle.truncate()
            self._handle.flush()
        except OSError:
            pass
        finally:
            self._handle.close()  # closing drops the flock
            self._handle = None

    def __del__(self):
        self.release()


def remove_temporary_files(run_dir: str | os.PathLike) -> list[Path]:
    """Delete what interrupted atomic writes left in ``run_dir``; returns the paths removed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    removed = []
    for path in run_dir.glob(f".*{TEMPORARY_SUFFIX}"):
        if path.is_file():
            try:
                path.unlink()
            except OSError:
                continue
            removed.append(path)
    return removed
