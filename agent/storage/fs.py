"""The few filesystem operations the store performs, in one place so that the simulator can put a
size limit (ENOSPC) under them. Every call is synchronous and durable where it says so."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import BinaryIO


class FileSystem:
    def create(self, path: Path) -> BinaryIO:
        """Create a new file for writing; fails if it exists (evidence is never overwritten)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        return os.fdopen(fd, "wb", buffering=0)

    def sync(self, fh: BinaryIO) -> None:
        fh.flush()
        os.fsync(fh.fileno())

    def rename_new(self, src: Path, dst: Path) -> None:
        """Rename without ever replacing an existing file (link + unlink of the old name)."""
        os.link(src, dst)
        os.unlink(src)

    def sync_dir(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def disk_usage(self, path: Path) -> tuple[int, int]:
        """(total, free-for-us) bytes of the filesystem holding `path`."""
        usage = shutil.disk_usage(path)
        return usage.total, usage.free
