"""Resumable uploads: the storage side of the tus endpoint (docs/PROTOCOL.md, "Uploads (tus 1.0)").

An upload carries one file of a segment: the segment's own file, or one of the sidecars its signed
record names (`UploadRow.sidecar` says which kind); both travel the same way. Each upload is a file
`DIR/incoming/<upload_id>` plus a database row whose `offset` says how many of the file's bytes are
durable. Bytes are streamed from the request to the file in 64 KiB blocks (memory
stays bounded whatever the request size), and the offset moves only after an fsync, so after a crash
or restart of the bureau the upload resumes from the recorded offset; a file tail beyond it (written
but not yet fsynced when the bureau died) is dropped before the next write.

Threads: every request runs in its own handler thread. At most one request works on a given upload
at a time: `claim` hands the upload to the caller, first cutting the connection of any request still
holding it (a stalled or abandoned PATCH, e.g. after the device was undocked), so a resuming client
never waits for a dead connection to time out. The cut request keeps what it had received.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from bureau.db import BureauDatabase, UploadRow, UploadState

log = logging.getLogger(__name__)

CHECKSUM_ALGORITHMS: dict[str, Callable[[], Any]] = {"sha256": hashlib.sha256, "sha1": hashlib.sha1}
BLOCK_BYTES = 64 * 1024
COMMIT_EVERY_BYTES = 4 * 1024 * 1024  # without a per-request checksum, progress is made durable this often
CLAIM_WAIT_S = 10.0


class UploadBusy(RuntimeError):
    """Another request holds the upload and did not let go in time."""


class UploadInterrupted(RuntimeError):
    """The request body stopped early (cut, reset, timeout); `offset` bytes of the upload are durable."""

    def __init__(self, offset: int, reason: str):
        super().__init__(f"request body ended early ({reason}); upload offset now {offset}")
        self.offset = offset


class ChecksumMismatch(ValueError):
    """The request body does not match its Upload-Checksum; its bytes were discarded."""


class UploadWriteError(RuntimeError):
    """The bureau could not write or sync the bytes (disk full, I/O error); nothing past `offset` is kept."""

    def __init__(self, offset: int, reason: str):
        super().__init__(f"cannot store upload bytes: {reason}; upload offset stays {offset}")
        self.offset = offset


class _ReadFailed(Exception):
    pass


def _now_us() -> int:
    return time.time_ns() // 1000


class _Slot:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.holder: socket.socket | None = None


class UploadStore:
    def __init__(self, incoming_dir: Path, db: BureauDatabase):
        self.incoming_dir = Path(incoming_dir)
        self.incoming_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        self.db = db
        self._slots: dict[str, _Slot] = {}
        self._slots_lock = threading.Lock()

    def path(self, upload_id: str) -> Path:
        return self.incoming_dir / upload_id

    def create(self, device_id: str, segment_id: str, length: int, metadata: str, sha256_cipher: str,
               sidecar: str = "") -> UploadRow:
        """A new, empty upload of a segment's file (`sidecar` "") or of its sidecar of that kind; its file
        and row are durable on return."""
        upload_id = secrets.token_hex(16)
        fd = os.open(self.path(upload_id), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        dfd = os.open(self.incoming_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        now = _now_us()
        row = UploadRow(upload_id, device_id, segment_id, length, 0, metadata, sha256_cipher, UploadState.RECEIVING,
                        "", now, now, sidecar)
        self.db.create_upload(row)
        return row

    @contextmanager
    def claim(self, upload_id: str, connection: socket.socket | None) -> Iterator[None]:
        """Hold the upload for the duration of the block, cutting off any request that holds it now."""
        with self._slots_lock:
            slot = self._slots.setdefault(upload_id, _Slot())
        if not slot.lock.acquire(blocking=False):
            holder = slot.holder
            if holder is not None:
                log.info("upload %s: a new request takes over; cutting the connection that held it", upload_id)
                # The base-class shutdown acts on the descriptor and leaves the TLS object to its owner.
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(holder, socket.SHUT_RDWR)
            if not slot.lock.acquire(timeout=CLAIM_WAIT_S):
                raise UploadBusy(f"upload {upload_id} is held by another request")
        slot.holder = connection
        try:
            yield
        finally:
            slot.holder = None
            slot.lock.release()

    def receive(self, row: UploadRow, stream: BinaryIO, length: int,
                checksum: tuple[str, bytes] | None = None) -> int:
        """Append `length` bytes read from `stream` at the upload's offset; returns the new durable offset.

        The caller holds the claim and has checked that offset + length <= upload length. With a
        `checksum` (algorithm, digest) the bytes count only if the whole body matches (else
        ChecksumMismatch, nothing kept); without one, a body that ends early keeps what arrived
        (UploadInterrupted says how much).
        """
        start = row.offset
        digest = CHECKSUM_ALGORITHMS[checksum[0]]() if checksum else None
        received = 0
        committed = start
        with open(self.path(row.upload_id), "r+b", buffering=0) as fh:
            fh.truncate(start)  # bytes past the durable offset were never acknowledged
            fh.seek(start)
            try:
                while received < length:
                    try:
                        block = stream.read(min(BLOCK_BYTES, length - received))
                    except (OSError, ValueError) as exc:  # timeout, reset, TLS error, cut by a takeover
                        raise _ReadFailed(f"{type(exc).__name__}: {exc}") from None
                    if not block:
                        raise _ReadFailed("connection closed")
                    fh.write(block)
                    if digest is not None:
                        digest.update(block)
                    received += len(block)
                    if digest is None and start + received - committed >= COMMIT_EVERY_BYTES:
                        os.fsync(fh.fileno())
                        committed = start + received
                        self.db.set_upload_offset(row.upload_id, committed, _now_us())
            except _ReadFailed as exc:
                keep = start if digest is not None else start + received
                fh.truncate(keep)
                os.fsync(fh.fileno())
                self.db.set_upload_offset(row.upload_id, keep, _now_us())
                raise UploadInterrupted(keep, str(exc)) from None
            except OSError as exc:
                self._roll_back(fh, row.upload_id, committed)
                raise UploadWriteError(committed, f"{exc.strerror or exc}") from None
            if digest is not None and not secrets.compare_digest(digest.digest(), checksum[1]):  # type: ignore[index]
                fh.truncate(start)
                os.fsync(fh.fileno())
                raise ChecksumMismatch(f"body does not match Upload-Checksum {checksum[0]}; "  # type: ignore[index]
                                       f"{length} bytes discarded, offset stays {start}")
            try:
                os.fsync(fh.fileno())
            except OSError as exc:
                self._roll_back(fh, row.upload_id, committed)
                raise UploadWriteError(committed, f"fsync: {exc.strerror or exc}") from None
        self.db.set_upload_offset(row.upload_id, start + length, _now_us())
        return start + length

    def _roll_back(self, fh: BinaryIO, upload_id: str, offset: int) -> None:
        try:
            fh.truncate(offset)
            os.fsync(fh.fileno())
        except OSError:
            log.exception("upload %s: cannot truncate back to %s after a write error", upload_id, offset)
        self.db.set_upload_offset(upload_id, offset, _now_us())

    def release_transfer_name(self, upload_id: str, stored: Path) -> None:
        """Drop the `incoming/` name of a file now held in the store under `stored` (the same inode).

        No bytes are removed: the store's name keeps them. Only done when both names are one file,
        so that no later request on this upload can ever reach the stored evidence.
        """
        path = self.path(upload_id)
        try:
            if path.exists() and os.path.samefile(path, stored):
                path.unlink()
        except OSError as exc:
            log.warning("upload %s: could not drop the transfer name %s: %s", upload_id, path, exc)
