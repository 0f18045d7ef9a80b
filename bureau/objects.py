"""The bureau's final store, behind an interface so a bureau can move to S3-compatible storage.

`ObjectStore` is the contract; `FileObjectStore` keeps each device's archive in the layout a device
bundle has, so `bwc-agent verify DIR/store/<device_id> --identity ...` checks the bureau's copy:

    DIR/store/<device_id>/ledger.jsonl        every verified record, in seq order (docs/FORMAT.md)
    DIR/store/<device_id>/segments/<file>     each committed segment and sidecar (docs/FORMAT.md §10.5),
                                              byte for byte as the device wrote it, under its recorded name

Objects are only ever added: a segment or sidecar file is never replaced (a second commit of the same bytes is
a no-op, of other bytes an error), and the ledger file is only appended to. Callers serialise calls
per device (the committer holds a per-device lock); different devices may be written concurrently.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

SAFE_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,200}$")


class ObjectStoreError(RuntimeError):
    """The store cannot accept an object, or holds something that contradicts the database."""


@dataclass(frozen=True)
class StoredObject:
    location: str
    size: int
    sha256: str


class ObjectStore(Protocol):
    """Where verified ledgers and segments end up. Implementations must make each call durable on return."""

    def sync_ledger(self, device_id: str, rows_from: Callable[[int], Iterator[bytes]]) -> int:
        """Bring the device's ledger copy up to date; `rows_from(n)` yields export lines from the n-th
        (1-based) record. Returns the number of records the copy holds."""
        ...

    def put_segment(self, device_id: str, file_name: str, source: Path, size: int, sha256: str) -> StoredObject:
        """Commit an uploaded segment or sidecar file (already checked by the caller) under `file_name`,
        beside the device's other segments; never replaces an object that holds other bytes."""
        ...


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileObjectStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o750)
        self._ledger_counts: dict[str, int] = {}  # records known to be in each ledger.jsonl
        self._lock = threading.Lock()  # guards _ledger_counts only

    def device_dir(self, device_id: str) -> Path:
        return self.root / device_id

    def ledger_path(self, device_id: str) -> Path:
        return self.device_dir(device_id) / "ledger.jsonl"

    def segment_path(self, device_id: str, file_name: str) -> Path:
        if not SAFE_FILE_RE.match(file_name) or file_name.endswith(".part"):
            raise ObjectStoreError(f"segment file name {file_name!r} is not a plain file name")
        return self.device_dir(device_id) / "segments" / file_name

    # --- ledger -----------------------------------------------------------------------------------

    def _count_lines(self, path: Path) -> tuple[int, bytes]:
        """(complete lines, bytes of a torn last line) of a ledger copy."""
        count, tail = 0, b""
        if not path.exists():
            return 0, b""
        with open(path, "rb") as fh:
            for line in fh:
                if line.endswith(b"\n"):
                    count += 1
                else:
                    tail = line
        return count, tail

    def sync_ledger(self, device_id: str, rows_from: Callable[[int], Iterator[bytes]]) -> int:
        path = self.ledger_path(device_id)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        with self._lock:
            known = self._ledger_counts.get(device_id)
        tail = b""
        if known is None:
            known, tail = self._count_lines(path)
        written = known
        with open(path, "ab") as fh:
            for line in rows_from(known + 1):
                if tail:
                    # A crash tore the last append: finish that line rather than rewrite anything.
                    if not line.startswith(tail):
                        raise ObjectStoreError(f"{path}: last line is torn and does not match record "
                                               f"{known + 1} in the database; left untouched for an operator")
                    line, tail = line[len(tail):], b""
                fh.write(line)
                written += 1
            if tail:
                raise ObjectStoreError(f"{path}: last line is torn and the database has no record {known + 1}")
            fh.flush()
            os.fsync(fh.fileno())
        if known == 0:
            _fsync_dir(path.parent)
        with self._lock:
            self._ledger_counts[device_id] = written
        return written

    # --- segments ---------------------------------------------------------------------------------

    def put_segment(self, device_id: str, file_name: str, source: Path, size: int, sha256: str) -> StoredObject:
        dest = self.segment_path(device_id, file_name)
        dest.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        if dest.exists():
            if dest.stat().st_size == size and _sha256_file(dest) == sha256:
                return StoredObject(str(dest), size, sha256)  # committed before a restart: idempotent
            raise ObjectStoreError(f"{dest} already holds other bytes; refusing to replace stored evidence")
        try:
            os.link(source, dest)  # same inode: no copy, and never replaces an existing name
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP):
                raise
            tmp = dest.with_name(dest.name + ".part")
            if tmp.exists():
                tmp.unlink()  # our own unfinished copy from before a crash; the source is intact
            with open(source, "rb") as src, open(tmp, "xb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
            os.link(tmp, dest)
            os.unlink(tmp)
        os.chmod(dest, 0o440)
        _fsync_dir(dest.parent)
        return StoredObject(str(dest), size, sha256)
