"""The simulator's storage switch: the store's FileSystem over a real directory, with a byte quota
(ENOSPC), one-shot I/O errors and power-cut points.

Threads: the capture writer thread calls the FileSystem methods (create/write/sync/rename); a test or
scenario thread flips the switches (`set_quota`, `fill`, `release`, `cut_power_*`, `fail_next`). A lock
guards the counters they share.

What it limits: bytes written through files it created (segments), checked against
`quota - filler - bytes of all files under root`. SQLite writes the ledger through its own VFS, not
through this seam, so the database is counted in the usage but never refused; the real-kernel test
on a size-limited tmpfs covers SQLite hitting a full disk.

A power cut is a SIGKILL of the current process at a chosen point (`cut_power_at`, `cut_power_after_bytes`):
what the kernel already has stays, exactly as after a crash, and recovery runs on the next start.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from agent.storage.fs import FileSystem

CUT_POINTS = ("create", "sync", "rename", "sync_dir")


def kill_this_process() -> None:
    """The default power cut: the process dies at once, with no cleanup and no flush of user buffers."""
    os.kill(os.getpid(), signal.SIGKILL)


class SimStorage(FileSystem):
    """A FileSystem on `root` whose size is `quota_bytes` (None: the real filesystem's size)."""

    def __init__(self, root: Path, quota_bytes: int | None = None,
                 power_cut: Callable[[], None] = kill_this_process):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._quota = quota_bytes
        self._filler = 0
        self._used_cache = 0
        self._power_cut = power_cut
        self._cut_points: dict[str, int] = {}  # point -> occurrences left until the cut
        self._cut_after_bytes: int | None = None
        self._fail_next: dict[str, int] = {}  # operation -> errno for its next call
        self.enospc_count = 0  # writes refused or cut short for lack of space
        self._refresh_usage()

    # --- switches ---------------------------------------------------------------------------------

    def set_quota(self, quota_bytes: int | None) -> None:
        """The simulated partition size in bytes (None: unlimited, the real disk's figures)."""
        with self._lock:
            self._quota = quota_bytes
            self._refresh_usage()

    def fill(self, nbytes: int) -> None:
        """Take `nbytes` of space as if other data had filled the partition."""
        if nbytes < 0:
            raise ValueError(f"fill({nbytes}): use release() to free space")
        with self._lock:
            self._filler += nbytes

    def release(self, nbytes: int | None = None) -> None:
        """Give back `nbytes` (default: all) of the space taken by `fill`."""
        with self._lock:
            self._filler = 0 if nbytes is None else max(0, self._filler - nbytes)

    def cut_power_at(self, point: str, occurrence: int = 1) -> None:
        """Cut power right after the `occurrence`-th call of `point` from now:
        create (file exists, empty), sync (file fsynced), rename (new name linked, old not yet removed),
        sync_dir (directory fsynced)."""
        if point not in CUT_POINTS:
            raise ValueError(f"unknown power-cut point {point!r}; expected one of {CUT_POINTS}")
        if occurrence < 1:
            raise ValueError(f"occurrence must be >= 1, got {occurrence}")
        with self._lock:
            self._cut_points[point] = occurrence

    def cut_power_after_bytes(self, nbytes: int) -> None:
        """Cut power once `nbytes` more bytes have been written (mid-write when the count falls inside one)."""
        if nbytes < 0:
            raise ValueError(f"cut_power_after_bytes({nbytes}) must be >= 0")
        with self._lock:
            self._cut_after_bytes = nbytes

    def fail_next(self, operation: str, code: int = errno.EIO) -> None:
        """Make the next `operation` (write, sync, rename, sync_dir) raise OSError(code) once."""
        if operation not in ("write", "sync", "rename", "sync_dir"):
            raise ValueError(f"unknown operation {operation!r}")
        with self._lock:
            self._fail_next[operation] = code

    # --- figures ----------------------------------------------------------------------------------

    def _refresh_usage(self) -> None:
        total = 0
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                try:
                    total += os.lstat(os.path.join(dirpath, name)).st_size
                except FileNotFoundError:
                    continue
        self._used_cache = total

    def used_bytes(self) -> int:
        """Bytes in use: every file under root plus the filler."""
        with self._lock:
            self._refresh_usage()
            return self._used_cache + self._filler

    def free_bytes(self) -> int:
        with self._lock:
            self._refresh_usage()
            return self._free_locked()

    def _free_locked(self) -> int:
        if self._quota is None:
            return shutil.disk_usage(self.root).free
        return max(0, self._quota - self._used_cache - self._filler)

    def disk_usage(self, path: Path) -> tuple[int, int]:
        if self._quota is None:
            return super().disk_usage(path)
        with self._lock:
            self._refresh_usage()
            return self._quota, self._free_locked()

    # --- FileSystem -------------------------------------------------------------------------------

    def _check_fail(self, operation: str, target: object) -> None:
        code = self._fail_next.pop(operation, None)
        if code is not None:
            raise OSError(code, os.strerror(code), str(target))

    def _reached(self, point: str) -> bool:
        left = self._cut_points.get(point)
        if left is None:
            return False
        if left > 1:
            self._cut_points[point] = left - 1
            return False
        del self._cut_points[point]
        return True

    def create(self, path: Path) -> BinaryIO:
        path = Path(path)
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise ValueError(f"{path} is outside the simulated partition {self.root}")
        fh = _LimitedFile(self, path)
        with self._lock:
            self._refresh_usage()
            cut = self._reached("create")
        if cut:
            self._power_cut()
        return fh  # type: ignore[return-value]

    def sync(self, fh: BinaryIO) -> None:
        with self._lock:
            self._check_fail("sync", getattr(fh, "name", fh))
        super().sync(fh)
        with self._lock:
            cut = self._reached("sync")
        if cut:
            self._power_cut()

    def rename_new(self, src: Path, dst: Path) -> None:
        with self._lock:
            self._check_fail("rename", src)
            cut = self._reached("rename")
        os.link(src, dst)
        if cut:
            self._power_cut()  # both names now exist; recovery must finish the rename
        os.unlink(src)

    def sync_dir(self, path: Path) -> None:
        with self._lock:
            self._check_fail("sync_dir", path)
        super().sync_dir(path)
        with self._lock:
            cut = self._reached("sync_dir")
        if cut:
            self._power_cut()

    def _allow_write(self, name: str, wanted: int) -> tuple[int, bool]:
        """(bytes that may be written now, whether power is cut after them). Raises ENOSPC when none fit."""
        with self._lock:
            self._check_fail("write", name)
            allowed = wanted
            if self._quota is not None:
                free = self._free_locked()
                if free == 0 and wanted:
                    self.enospc_count += 1
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
                if free < wanted:
                    self.enospc_count += 1
                allowed = min(wanted, free)
            cut = False
            if self._cut_after_bytes is not None and self._cut_after_bytes <= allowed:
                allowed, cut = self._cut_after_bytes, True
                self._cut_after_bytes = None
            elif self._cut_after_bytes is not None:
                self._cut_after_bytes -= allowed
            return allowed, cut

    def _wrote(self, nbytes: int) -> None:
        with self._lock:
            self._used_cache += nbytes


class _LimitedFile(io.FileIO):
    """A new file opened O_EXCL, mode 0640, whose writes pass the storage's quota and power switches.

    Like the kernel, a write that does not fit is cut short (it returns fewer bytes than asked), and
    the next one fails with ENOSPC.
    """

    def __init__(self, storage: SimStorage, path: Path):
        super().__init__(path, "xb", opener=lambda p, _flags: os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                                                                        0o640))
        self._storage = storage

    def write(self, data) -> int:  # type: ignore[override]
        view = memoryview(data).cast("B")
        allowed, cut = self._storage._allow_write(str(self.name), len(view))
        written = super().write(view[:allowed]) if allowed else 0
        self._storage._wrote(written or 0)
        if cut:
            self._storage._power_cut()
        return written or 0
