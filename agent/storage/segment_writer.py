"""Writes one segment's media as an age file, fragment by fragment, durably.

Thread: owned by the capture writer thread; one instance per open segment, not shared.

Every call to `write_fragment` ends on an age chunk boundary: the fragment is followed by an ISO-BMFF
`free` box that pads the plaintext to a multiple of 64 KiB, so all of it can be sealed as full chunks,
written and fsynced at once. Nothing of a finished fragment waits in memory, so a power cut loses at
most the fragment being written. `close` seals a final short chunk (a small `free` box, or the caller's
closing bytes) flagged last, fsyncs, renames `.part` to the final name and fsyncs the directory.
Plaintext exists only in memory.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from agent.evidence.age import CHUNK_SIZE, TAG_SIZE, AgeEncryptor, Recipient
from agent.storage.fs import FileSystem

FREE_BOX_HEADER = 8
PART_SUFFIX = ".part"


class StorageError(RuntimeError):
    """Writing evidence failed; what is already on disk is intact and will be closed as truncated."""


class StorageFullError(StorageError):
    """ENOSPC while writing a segment."""


def free_box(size: int) -> bytes:
    """An ISO-BMFF `free` box of exactly `size` bytes (size >= 8); players skip it."""
    return struct.pack(">I4s", size, b"free") + bytes(size - FREE_BOX_HEADER)


def padding_for(length: int) -> int:
    """Bytes of `free` box that bring `length` to a multiple of CHUNK_SIZE (0, or at least 8)."""
    pad = -length % CHUNK_SIZE
    if 0 < pad < FREE_BOX_HEADER:
        pad += CHUNK_SIZE
    return pad


@dataclass
class FragmentInfo:
    """What the muxer knows about one fragment; accumulated into the segment record."""

    video_frames: int = 0
    audio_samples: int = 0
    first_pts_us: int | None = None
    last_pts_us: int | None = None


@dataclass
class WriterTotals:
    fragments: int = 0
    video_frames: int = 0
    audio_samples: int = 0
    first_pts_us: int | None = None
    last_pts_us: int | None = None
    plain_size: int = 0
    cipher_size: int = 0
    chunks: int = 0
    sha256_plain: str | None = None
    sha256_cipher: str | None = None
    recipients: list[str] = field(default_factory=list)

    def add(self, info: FragmentInfo) -> None:
        self.fragments += 1
        self.video_frames += info.video_frames
        self.audio_samples += info.audio_samples
        if self.first_pts_us is None:
            self.first_pts_us = info.first_pts_us
        if info.last_pts_us is not None:
            self.last_pts_us = info.last_pts_us


class SegmentWriter:
    def __init__(self, final_path: Path, recipients: Iterable[Recipient], fs: FileSystem | None = None,
                 pad_fragments: bool = True, min_free_bytes: int = 0):
        """`min_free_bytes`: a fragment that would leave less free space than this is refused with
        StorageFullError before any of it is written, so the ledger still has room to record the close."""
        self.final_path = final_path
        self.min_free_bytes = min_free_bytes
        self.part_path = final_path.with_name(final_path.name + PART_SUFFIX)
        self.fs = fs or FileSystem()
        self.pad_fragments = pad_fragments
        recipients = list(recipients)
        self._enc = AgeEncryptor(recipients)
        self._plain_hash = hashlib.sha256()
        self._cipher_hash = hashlib.sha256()
        self._pending = bytearray()
        self.totals = WriterTotals(recipients=[str(r) for r in recipients])
        self.failed: StorageError | None = None
        self.closed = False
        self._fh = self.fs.create(self.part_path)
        self._write(self._enc.header())
        self._sync()

    def _write(self, data: bytes) -> None:
        try:
            view = memoryview(data)
            while view:
                n = self._fh.write(view)
                if n is None or n == 0:
                    raise OSError(errno.EIO, "short write")
                view = view[n:]
        except OSError as exc:
            self._fail(exc)
        self._cipher_hash.update(data)
        self.totals.cipher_size += len(data)

    def _sync(self) -> None:
        try:
            self.fs.sync(self._fh)
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        cls = StorageFullError if exc.errno == errno.ENOSPC else StorageError
        self.failed = cls(f"{self.part_path.name}: {exc.strerror or exc}")
        raise self.failed from exc

    def _check_usable(self) -> None:
        if self.closed:
            raise StorageError(f"{self.final_path.name}: segment already closed")
        if self.failed:
            raise StorageError(f"{self.final_path.name}: writer failed earlier ({self.failed})")

    def _seal_full_chunks(self, keep_last: bool) -> None:
        # keep_last: without padding we cannot know whether a full chunk is the file's last one.
        limit = CHUNK_SIZE if keep_last else 0
        while len(self._pending) > limit and len(self._pending) >= CHUNK_SIZE:
            chunk = bytes(self._pending[:CHUNK_SIZE])
            del self._pending[:CHUNK_SIZE]
            self._write(self._enc.seal_chunk(chunk, last=False))
            self.totals.chunks += 1

    def _check_space(self, nbytes: int) -> None:
        if not self.min_free_bytes:
            return
        try:
            free = self.fs.disk_usage(self.part_path.parent)[1]
        except OSError as exc:
            self._fail(exc)
        # Upper bound of the ciphertext this fragment adds: its bytes, padding, and a tag per chunk.
        needed = nbytes + CHUNK_SIZE + TAG_SIZE * (nbytes // CHUNK_SIZE + 2)
        if free - needed < self.min_free_bytes:
            self.failed = StorageFullError(
                f"{self.part_path.name}: {free} bytes free; a {nbytes}-byte fragment would leave less than "
                f"the {self.min_free_bytes} bytes kept free for the ledger (storage full)")
            raise self.failed

    def write_fragment(self, data: bytes, info: FragmentInfo | None = None) -> None:
        """Append one media fragment; when this returns it is on disk (fsynced).

        Raises StorageFullError (nothing of this fragment written) when it would eat into
        `min_free_bytes`, or when the disk itself is full (part of it may be on disk; recovery keeps
        only whole chunks)."""
        self._check_usable()
        self._check_space(len(data))
        self._append_plain(data)
        if self.pad_fragments:
            pad = padding_for(self.totals.plain_size)
            if pad:
                self._append_plain(free_box(pad))
        self._seal_full_chunks(keep_last=not self.pad_fragments)
        self._sync()
        self.totals.add(info or FragmentInfo())

    def _append_plain(self, data: bytes) -> None:
        self._pending += data
        self._plain_hash.update(data)
        self.totals.plain_size += len(data)

    def close_payload(self, closing: bytes = b"") -> WriterTotals:
        """Seal the last chunk and fsync; the file is complete but still named `.part`."""
        self._check_usable()
        if self.pad_fragments and not closing:
            closing = free_box(FREE_BOX_HEADER)  # the last chunk may not be empty once others exist
        self._append_plain(closing)
        self._seal_full_chunks(keep_last=True)
        self._write(self._enc.seal_chunk(bytes(self._pending), last=True))
        self.totals.chunks += 1
        self._pending.clear()
        self._sync()
        self._fh.close()
        self.totals.sha256_plain = self._plain_hash.hexdigest()
        self.totals.sha256_cipher = self._cipher_hash.hexdigest()
        self.closed = True
        return self.totals

    def publish(self) -> None:
        """Rename `.part` to the final name and fsync the directory."""
        try:
            self.fs.rename_new(self.part_path, self.final_path)
            self.fs.sync_dir(self.final_path.parent)
        except OSError as exc:
            self._fail(exc)

    def close(self, closing: bytes = b"") -> WriterTotals:
        """close_payload() then publish()."""
        totals = self.close_payload(closing)
        self.publish()
        return totals

    def abandon(self) -> None:
        """Stop writing after a failure; the `.part` stays for recovery to close as truncated."""
        with contextlib.suppress(OSError):
            self._fh.close()
        self.closed = True
