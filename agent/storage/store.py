"""EvidenceStore: the one door through which footage and records reach the disk.

Threads: `open_segment`/`OpenSegment` belong to the capture writer thread; the ledger, state transitions,
receipts and purges may be called from any thread (the database lock serialises them).

Guarantees:
- a segment's bytes are never rewritten, and no segment or record is deleted or edited; the single
  exception is `purge`, allowed only for a segment holding a verified bureau receipt, and itself a record;
- at start-up every unfinished segment is closed as `truncated` with the hashes of what survived
  (`recover`), so the ledger accounts for every file in `segments/`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent import __version__
from agent.clock import Clock
from agent.evidence.age import CIPHER_CHUNK_SIZE, AgeError, Recipient, read_header
from agent.evidence.receipts import VerifiedReceipt
from agent.evidence.records import (
    SEGMENT_FILE,
    SIDECAR_FILE,
    SIDECAR_TAGS,
    Sidecar,
    SignedRecord,
    sidecar_file_name,
)
from agent.evidence.signing import key_id, load_public_key, public_key_der
from agent.storage.db import Database, DatabaseFullError
from agent.storage.fs import FileSystem
from agent.storage.keys import IdentityKeyError, Signer
from agent.storage.ledger import Ledger
from agent.storage.segment_writer import (
    PART_SUFFIX,
    FragmentInfo,
    SegmentWriter,
    StorageError,
    StorageFullError,
    WriterTotals,
)

log = logging.getLogger(__name__)

SEGMENT_SUFFIX = ".age"
SEGMENTS_DIR = "segments"
DB_NAME = "ledger.db"
JOURNAL_NAME = "journal.jsonl"
# Free space a segment write may not eat into: room for the ledger (WAL growth, checkpoints and the
# records that close a segment, log the interruption and close the session) once footage fills the disk.
LEDGER_RESERVE_BYTES = 2 * 1024 * 1024


class SegmentState:
    OPEN = "OPEN"
    CLOSED = "CLOSED"
    QUEUED = "QUEUED"
    UPLOADING = "UPLOADING"
    UPLOADED = "UPLOADED"
    RECEIPTED = "RECEIPTED"
    PURGED = "PURGED"
    REJECTED = "REJECTED"
    # Terminal, set only by recovery: the row's file is missing, or its `.part` and `.age` are different
    # files. Both are left in place, one `recovery` record says so, and later starts leave the row alone.
    UNRESOLVED = "UNRESOLVED"


S = SegmentState
# Allowed transitions (DESIGN.md, "Sync"). RECEIPTED and PURGED are reached only through
# record_receipt() and purge(), never through transition().
TRANSITIONS: dict[str, set[str]] = {
    S.OPEN: {S.CLOSED},
    S.CLOSED: {S.QUEUED},
    S.QUEUED: {S.UPLOADING},
    S.UPLOADING: {S.UPLOADED, S.QUEUED, S.REJECTED},
    S.UPLOADED: {S.QUEUED, S.REJECTED},
    S.REJECTED: {S.QUEUED},
    S.RECEIPTED: set(),
    S.PURGED: set(),
    S.UNRESOLVED: set(),
}
RECEIPTABLE = {S.CLOSED, S.QUEUED, S.UPLOADING, S.UPLOADED, S.REJECTED}


class StateError(RuntimeError):
    """A segment transition the state machine does not allow (or an unknown segment)."""


class PurgeRefused(RuntimeError):
    """A purge of a segment without a verified receipt: footage is evidence (R22)."""


class SidecarError(ValueError):
    """A sidecar handed to `OpenSegment.close` that cannot be named by the segment record (wrong shape or
    name, missing, or not the bytes described). Raised before anything of the close happens."""


@dataclass(frozen=True)
class SpaceReport:
    total_bytes: int
    free_bytes: int
    unreceipted_bytes: int
    purgeable_bytes: int
    bitrate_bps: int

    @property
    def minutes_left(self) -> float:
        """Recording minutes that fit in free space plus what could be purged (receipted footage)."""
        return (self.free_bytes + self.purgeable_bytes) * 8 / self.bitrate_bps / 60

    def as_dict(self) -> dict[str, Any]:
        return {"total_bytes": self.total_bytes, "free_bytes": self.free_bytes,
                "unreceipted_bytes": self.unreceipted_bytes, "purgeable_bytes": self.purgeable_bytes,
                "bitrate_bps": self.bitrate_bps, "minutes_left": round(self.minutes_left, 1)}


def new_session_id(wall_us: int) -> str:
    stamp = datetime.fromtimestamp(wall_us / 1e6, UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"S{stamp}-{secrets.token_hex(3)}"


SEGMENT_ID_RE = re.compile(r"^(?P<session>.+)-(?P<index>\d{4,})$")
_SEGMENT_FILE_RE = re.compile(SEGMENT_FILE)
_SIDECAR_FILE_RE = re.compile(SIDECAR_FILE)
_HASHED_SIDECAR_RE = re.compile(r"(?P<sha256>[0-9a-f]{64})\.(?P<kind>context|note)\.age")


def _sidecar_entry(kind: str, path: Path) -> dict[str, Any]:
    """A segment record's `sidecars` entry for the file at `path`, as it is on disk now."""
    return {"kind": kind, "file": path.name, "size": path.stat().st_size, "sha256_cipher": _hash_file(path)}


def segment_id_for(session_id: str, index: int) -> str:
    return f"{session_id}-{index:04d}"


def _hash_file(path: Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    remaining = limit
    with open(path, "rb") as fh:
        while remaining is None or remaining > 0:
            block = fh.read(1 << 20 if remaining is None else min(1 << 20, remaining))
            if not block:
                break
            h.update(block)
            if remaining is not None:
                remaining -= len(block)
    return h.hexdigest()


def survey_age_file(path: Path) -> dict[str, Any]:
    """What can be said of an age file without its key: size, hash, and the complete chunks in it.

    A chunk counts as complete when all its bytes are present; the last chunk of a closed file is
    short and is counted too when `closed` holds. Used for crash recovery, never rewrites a byte.
    """
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            payload_offset = read_header(fh).payload_offset
    except AgeError:
        payload_offset = None
    if payload_offset is None or size < payload_offset:
        chunks, complete = 0, 0
    else:
        chunks = (size - payload_offset) // CIPHER_CHUNK_SIZE
        complete = payload_offset + chunks * CIPHER_CHUNK_SIZE
    return {"size": size, "sha256_cipher": _hash_file(path), "chunks": chunks, "complete_size": complete,
            "sha256_complete": _hash_file(path, complete)}


class EvidenceStore:
    def __init__(self, data_dir: Path, device_id: str, signer: Signer, recipients: Iterable[Recipient],
                 clock: Clock, fs: FileSystem | None = None, reserve_bytes: int = LEDGER_RESERVE_BYTES):
        self.data_dir = Path(data_dir)
        self.reserve_bytes = reserve_bytes
        self.device_id = device_id
        self.signer = signer
        self.recipients = list(recipients)
        if not self.recipients:
            raise ValueError("at least one bureau recipient is required to record")
        self.clock = clock
        self.fs = fs or FileSystem()
        self.segments_dir = self.data_dir / SEGMENTS_DIR
        self.segments_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        self.db = Database(self.data_dir / DB_NAME)
        self._migrate()
        self.ledger = Ledger(self.db, device_id, signer, clock, self.data_dir / JOURNAL_NAME)
        self.restored_records = self.ledger.reconcile()
        self._bind_identity()
        if self.restored_records:
            self.ledger.append("recovery", {"action": "index_rebuilt", "detail":
                                            f"{self.restored_records} ledger record(s) restored from {JOURNAL_NAME}"})

    def _migrate(self) -> None:
        """Bring a database written by older software up to this schema (columns are only ever added)."""
        segments = self.db.db["segments"]
        if "recipients" not in segments.columns_dict:
            # The key ids a segment's file is encrypted to, fixed when it is opened (JSON list). NULL in
            # rows opened before this column existed: their records then name the recipients in force.
            with self.db.transaction():
                segments.add_column("recipients", str)

    # --- identity ---------------------------------------------------------------------------------

    def _bind_identity(self) -> None:
        pub = self.signer.public_key()
        recipients = [str(r) for r in self.recipients]
        if self.ledger.head()[0] == 0:
            self.ledger.append("device_init", {
                "public_key": base64.b64encode(public_key_der(pub)).decode(), "key_id": key_id(pub),
                "recipients": recipients, "software": f"bwc-agent {__version__}"})
            return
        current_key, current_recipients = self.ledger_identity()
        if public_key_der(current_key) != public_key_der(pub):
            raise IdentityKeyError(
                f"identity key {key_id(pub)} is not the key this ledger is signed with "
                f"({key_id(current_key)}); refusing to write. A key change must be signed by the old key.")
        if current_recipients != recipients:
            self.ledger.append("key_change", {"kind": "recipients", "key_ids": [r.key_id for r in self.recipients],
                                              "recipients": recipients, "detail": "bureau recipients changed"})

    def ledger_identity(self) -> tuple[Any, list[str]]:
        """The signing key and recipients in force at the head of the ledger."""
        key, recipients = None, []
        for rec in self.ledger.records(rtype="device_init"):
            body = rec.fields["body"]
            key, recipients = body["public_key"], body["recipients"]
        for rec in self.ledger.records(rtype="key_change"):
            body = rec.fields["body"]
            if body["kind"] == "identity" and body.get("public_key"):
                key = body["public_key"]
            if body["kind"] == "recipients" and body.get("recipients") is not None:
                recipients = body["recipients"]
        return load_public_key(base64.b64decode(key)), recipients

    # --- segments ---------------------------------------------------------------------------------

    def segment_path(self, segment_id: str) -> Path:
        return self.segments_dir / f"{segment_id}{SEGMENT_SUFFIX}"

    def open_segment(self, session_id: str | None, index: int) -> OpenSegment:
        segment_id = segment_id_for(session_id or "NOSESSION", index)
        path = self.segment_path(segment_id)
        # .part exists and is fsynced first
        writer = SegmentWriter(path, self.recipients, self.fs, min_free_bytes=self.reserve_bytes)
        self.fs.sync_dir(self.segments_dir)
        now = self.clock.wall_us()
        # The row keeps the recipients the file is encrypted to, so a close by recovery after a recipients
        # change still records the set this file was really written for (C11, S5b, S6).
        key_ids = json.dumps([r.key_id for r in self.recipients])
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO segments (segment_id, session_id, idx, file, state, opened_wall_us, updated_wall_us,"
                " recipients) VALUES (?,?,?,?,?,?,?,?)",
                (segment_id, session_id, index, path.name, S.OPEN, now, now, key_ids))
        return OpenSegment(self, segment_id, session_id, index, writer)

    def _row_recipients(self, row: dict[str, Any]) -> list[str]:
        """Key ids of the recipients a segment's file was opened for; the set in force now if the row
        predates the `recipients` column or was made by recovery from a bare `.part` file."""
        stored = row.get("recipients")
        if stored:
            try:
                key_ids = json.loads(stored)
            except ValueError:
                key_ids = None
            if isinstance(key_ids, list) and key_ids and all(isinstance(k, str) for k in key_ids):
                return key_ids
            log.error("segment %s: unreadable recipients column %r; recording the recipients in force",
                      row["segment_id"], stored)
        return [r.key_id for r in self.recipients]

    def _segment_body(self, row: dict[str, Any], *, file: str, size: int, sha256_cipher: str, chunks: int,
                      complete_size: int, sha256_complete: str, truncated: bool, recovered: bool,
                      plain_size: int | None, sha256_plain: str | None,
                      sidecars: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "segment_id": row["segment_id"], "session_id": row["session_id"], "index": row["idx"] or 0,
            "file": file, "size": size, "sha256_cipher": sha256_cipher, "plain_size": plain_size,
            "sha256_plain": sha256_plain, "chunks": chunks, "complete_size": complete_size,
            "sha256_complete": sha256_complete, "fragments": row["fragments"] or 0,
            "first_pts_us": row["first_pts_us"], "last_pts_us": row["last_pts_us"],
            "video_frames": row["video_frames"] or 0, "audio_samples": row["audio_samples"] or 0,
            "recipients": self._row_recipients(row), "truncated": truncated, "recovered": recovered,
            "sidecars": sidecars,
        }

    def _commit_segment_record(self, segment_id: str, body: dict[str, Any]) -> SignedRecord:
        def also(conn, signed: SignedRecord, seq: int) -> None:
            conn.execute("UPDATE segments SET state=?, record_seq=?, size=?, sha256_cipher=?, plain_size=?,"
                         " sha256_plain=?, updated_wall_us=? WHERE segment_id=?",
                         (S.CLOSED, seq, body["size"], body["sha256_cipher"], body["plain_size"],
                          body["sha256_plain"], self.clock.wall_us(), segment_id))
            self._log_transition(conn, segment_id, S.OPEN, S.CLOSED, "closed" if not body["recovered"]
                                 else "closed by recovery")

        return self.ledger.append("segment", body, also=also)

    def row(self, segment_id: str) -> dict[str, Any]:
        rows = self.db.query("SELECT * FROM segments WHERE segment_id=?", (segment_id,))
        if not rows:
            raise StateError(f"unknown segment {segment_id!r}")
        return rows[0]

    def segments(self, states: Iterable[str] | None = None) -> list[dict[str, Any]]:
        if states is None:
            return self.db.query("SELECT * FROM segments ORDER BY opened_wall_us, segment_id")
        states = list(states)
        marks = ",".join("?" * len(states))
        return self.db.query(f"SELECT * FROM segments WHERE state IN ({marks}) ORDER BY opened_wall_us, segment_id",
                             tuple(states))

    # --- state ------------------------------------------------------------------------------------

    def _log_transition(self, conn, segment_id: str, old: str, new: str, note: str) -> None:
        conn.execute("INSERT INTO transitions (segment_id, from_state, to_state, wall_us, note) VALUES (?,?,?,?,?)",
                     (segment_id, old, new, self.clock.wall_us(), note))

    def transition(self, segment_id: str, new: str, note: str = "") -> None:
        """Move a segment to `new`; durable when this returns. Raises StateError if not allowed."""
        with self.db.transaction() as conn:
            old = self.row(segment_id)["state"]
            if new not in TRANSITIONS.get(old, set()):
                raise StateError(f"segment {segment_id}: {old} -> {new} is not allowed")
            conn.execute("UPDATE segments SET state=?, updated_wall_us=? WHERE segment_id=?",
                         (new, self.clock.wall_us(), segment_id))
            self._log_transition(conn, segment_id, old, new, note)

    def set_flagged(self, session_id: str) -> None:
        """Mark a session's segments as upload priority (mandatory stage or flagged session)."""
        with self.db.transaction() as conn:
            conn.execute("UPDATE segments SET flagged=1 WHERE session_id=?", (session_id,))

    def record_receipt(self, segment_id: str, receipt: VerifiedReceipt) -> SignedRecord:
        """Store a verified bureau receipt, append a `receipt` record, and mark the segment RECEIPTED."""
        row = self.row(segment_id)
        if row["state"] not in RECEIPTABLE:
            raise StateError(f"segment {segment_id}: cannot take a receipt in state {row['state']}")
        if receipt.fields["segment_id"] != segment_id or receipt.fields["sha256_cipher"] != row["sha256_cipher"]:
            raise StateError(f"segment {segment_id}: receipt is for other bytes")

        def also(conn, signed: SignedRecord, seq: int) -> None:
            conn.execute("INSERT OR REPLACE INTO receipts (segment_id, receipt, sig, receipt_sha256, bureau_key_id,"
                         " verified_wall_us) VALUES (?,?,?,?,?,?)",
                         (segment_id, receipt.data, receipt.sig, receipt.sha256, receipt.fields["bureau_key_id"],
                          self.clock.wall_us()))
            conn.execute("UPDATE segments SET state=?, updated_wall_us=? WHERE segment_id=?",
                         (S.RECEIPTED, self.clock.wall_us(), segment_id))
            self._log_transition(conn, segment_id, row["state"], S.RECEIPTED, f"receipt {receipt.sha256[:16]}")

        return self.ledger.append("receipt", {"segment_id": segment_id, "receipt_sha256": receipt.sha256,
                                              "bureau_key_id": receipt.fields["bureau_key_id"]}, also=also)

    def purge(self, segment_id: str, reason: str = "space_needed") -> SignedRecord:
        """Remove a receipted segment's file and the sidecar files its segment record names. The only
        deletion the device can make; logged as one `purge` record.

        The receipt names the segment record by hash, that record carries each sidecar's hash, and the
        bureau receipts a segment only once it holds the segment and every such sidecar (docs/PROTOCOL.md,
        "Commit"); so the purge record, naming the segment, accounts for its sidecars too (docs/FORMAT.md
        §12)."""
        row = self.row(segment_id)
        receipts = self.db.query("SELECT receipt_sha256 FROM receipts WHERE segment_id=?", (segment_id,))
        if row["state"] != S.RECEIPTED or not receipts:
            raise PurgeRefused(f"segment {segment_id} is {row['state']} without a verified receipt; "
                               "only receipted footage may be purged (R22)")

        def also(conn, signed: SignedRecord, seq: int) -> None:
            conn.execute("UPDATE segments SET state=?, updated_wall_us=? WHERE segment_id=?",
                         (S.PURGED, self.clock.wall_us(), segment_id))
            self._log_transition(conn, segment_id, S.RECEIPTED, S.PURGED, reason)

        record = self.ledger.append("purge", {"segment_id": segment_id, "file": row["file"],
                                              "sha256_cipher": row["sha256_cipher"],
                                              "receipt_sha256": receipts[0]["receipt_sha256"], "reason": reason},
                                    also=also)
        self._unlink_purged(row["file"])
        log.info("purged receipted segment %s (%s bytes, reason %s, record seq %s)", segment_id, row["size"],
                 reason, record.fields["seq"])
        return record

    def _unlink_purged(self, file: str) -> None:
        """Delete a purged segment's file, then each sidecar its segment record names that still holds the
        recorded bytes (one that differs is left in place for a verifier to report, S8); the directory is
        fsynced after. Also run by recovery for a purge whose record committed before the deletions."""
        deleted = False
        path = self.segments_dir / file
        if path.exists():
            path.unlink()
            deleted = True
        segment_id = file[: -len(SEGMENT_SUFFIX)]
        # Cheap first: recovery calls this for every purged row at each start.
        if any((self.segments_dir / sidecar_file_name(segment_id, kind)).exists() for kind in SIDECAR_TAGS):
            found = self.db.query_rows("SELECT l.data, l.sig FROM segments s JOIN ledger l ON l.seq = s.record_seq"
                                       " WHERE s.segment_id=? AND s.state=? AND l.type='segment'",
                                       (segment_id, S.PURGED))
            body = SignedRecord(bytes(found[0][0]), bytes(found[0][1])).fields["body"] if found else {}
            for sidecar in body.get("sidecars", []) if body.get("segment_id") == segment_id else []:
                sidecar_path = self.segments_dir / sidecar["file"]
                if sidecar_path.is_symlink() or not sidecar_path.is_file():
                    continue
                if (sidecar_path.stat().st_size != sidecar["size"]
                        or _hash_file(sidecar_path) != sidecar["sha256_cipher"]):
                    log.error("purge of %s: sidecar %s differs from its segment record; left in place", segment_id,
                              sidecar["file"])
                    continue
                sidecar_path.unlink()
                deleted = True
        if deleted:
            self.fs.sync_dir(self.segments_dir)

    def purge_for_space(self, needed_free_bytes: int) -> list[str]:
        """Purge receipted segments, oldest first, until `needed_free_bytes` are free. Never touches others."""
        purged = []
        for row in self.segments([S.RECEIPTED]):
            if self.fs.disk_usage(self.data_dir)[1] >= needed_free_bytes:
                break
            self.purge(row["segment_id"], "space_needed")
            purged.append(row["segment_id"])
        return purged

    def space(self, bitrate_bps: int) -> SpaceReport:
        total, free = self.fs.disk_usage(self.data_dir)
        unreceipted = self.db.query_rows(
            "SELECT COALESCE(SUM(size),0) FROM segments WHERE state NOT IN (?,?)", (S.RECEIPTED, S.PURGED))[0][0]
        purgeable = self.db.query_rows("SELECT COALESCE(SUM(size),0) FROM segments WHERE state=?",
                                       (S.RECEIPTED,))[0][0]
        return SpaceReport(total, free, unreceipted, purgeable, bitrate_bps)

    # --- crash recovery ---------------------------------------------------------------------------

    def recover(self) -> list[SignedRecord]:
        """Close every segment a crash left open; account for stray files. Returns the records written.

        Each finding is recorded once: a row recovery cannot close becomes UNRESOLVED, and a stray file
        already named by an `unknown_file` record is not recorded again at the next start."""
        written: list[SignedRecord] = []
        for row in self.segments([S.OPEN]):
            written += self._recover_row(row)
        known = {r["file"] for r in self.segments()}
        for part in sorted(self.segments_dir.glob(f"*{SEGMENT_SUFFIX}{PART_SUFFIX}")):
            final_name = part.name[: -len(PART_SUFFIX)]
            # Only a segment's own name is adopted; a sidecar's or an odd name is recorded as a stray below.
            if (final_name in known or not _SEGMENT_FILE_RE.fullmatch(final_name)
                    or _SIDECAR_FILE_RE.fullmatch(final_name) or _HASHED_SIDECAR_RE.fullmatch(final_name)):
                continue
            segment_id = final_name[: -len(SEGMENT_SUFFIX)]
            m = SEGMENT_ID_RE.match(segment_id)
            session_id, index = (m["session"], int(m["index"])) if m else (None, 0)
            with self.db.transaction() as conn:
                conn.execute("INSERT INTO segments (segment_id, session_id, idx, file, state, opened_wall_us,"
                             " updated_wall_us) VALUES (?,?,?,?,?,?,?)",
                             (segment_id, session_id, index, final_name, S.OPEN, self.clock.wall_us(),
                              self.clock.wall_us()))
            written += self._recover_row(self.row(segment_id))
        written += self._record_strays()
        for row in self.segments([S.PURGED]):
            self._unlink_purged(row["file"])  # a purge whose record committed before the unlink ran
        return written

    def _record_strays(self) -> list[SignedRecord]:
        """One `unknown_file` record for each file in segments/ that no row or record accounts for."""
        rows = {r["segment_id"]: r for r in self.segments()}
        accounted = {r["file"] for r in rows.values()}
        accounted |= {r["file"] + PART_SUFFIX for r in rows.values() if r["state"] == S.UNRESOLVED}
        reported: set[str] | None = None
        self._carried_hashes: set[str] | None = None
        written = []
        for path in sorted(self.segments_dir.iterdir()):
            name = path.name
            if name in accounted or self._is_recorded_sidecar(name, rows):
                continue
            if name.endswith(PART_SUFFIX):
                detail = f"{name}: unfinished file recovery cannot close; left in place"
            elif _SIDECAR_FILE_RE.fullmatch(name) or _HASHED_SIDECAR_RE.fullmatch(name):
                detail = f"{name}: sidecar named by no record; left in place"
            else:
                detail = f"{name}: file with no segment row; left in place"
            if reported is None:
                reported = {r.fields["body"]["detail"] for r in self.ledger.records(rtype="recovery")
                            if r.fields["body"]["action"] == "unknown_file"}
            if detail in reported:
                continue  # recorded at an earlier start
            written.append(self.ledger.append("recovery", {"action": "unknown_file", "detail": detail}))
            reported.add(detail)
        return written

    def _is_recorded_sidecar(self, name: str, rows: dict[str, dict[str, Any]]) -> bool:
        """Whether a record names this sidecar: its segment record, or (for a hash-named one) any record
        carrying its hash."""
        m = _HASHED_SIDECAR_RE.fullmatch(name)
        if m:
            if self._carried_hashes is None:  # read once per recovery, and only if such a file exists
                self._carried_hashes = {
                    f"{rec.fields['body'][field]}.{kind}{SEGMENT_SUFFIX}"
                    for kind, field, types in (("note", "note_sha256", ("marker",)),
                                               ("context", "context_sha256", ("session_open", "session_context")))
                    for rtype in types for rec in self.ledger.records(rtype=rtype)
                    if rec.fields["body"].get(field)}
            return name in self._carried_hashes
        m = _SIDECAR_FILE_RE.fullmatch(name)
        if m:
            row = rows.get(name[: -len(f".{m[1]}{SEGMENT_SUFFIX}")])
            if row is None or row["record_seq"] is None:
                return False
            found = self.db.query_rows("SELECT data, sig FROM ledger WHERE seq=? AND type='segment'",
                                       (row["record_seq"],))
            if not found:
                return False
            body = SignedRecord(bytes(found[0][0]), bytes(found[0][1])).fields["body"]
            return any(s["file"] == name for s in body.get("sidecars", []))
        return False

    def _leave_unresolved(self, row: dict[str, Any], detail: str) -> list[SignedRecord]:
        """Record once what recovery cannot close, and take the row out of OPEN so no later start repeats it."""
        segment_id = row["segment_id"]

        def also(conn, signed: SignedRecord, seq: int) -> None:
            conn.execute("UPDATE segments SET state=?, updated_wall_us=? WHERE segment_id=?",
                         (S.UNRESOLVED, self.clock.wall_us(), segment_id))
            self._log_transition(conn, segment_id, row["state"], S.UNRESOLVED, detail)

        log.error("segment %s: %s", segment_id, detail)
        return [self.ledger.append("recovery", {"segment_id": segment_id, "action": "unknown_file",
                                                "detail": detail}, also=also)]

    def _recover_sidecars(self, segment_id: str) -> list[dict[str, Any]]:
        """The finished sidecar files of a segment being recovered (a `.part` sidecar is left to the stray
        pass: nothing vouches that it was written whole). The same entries a normal close with those
        sidecars writes (`OpenSegment.close`), in the same order."""
        found = []
        for kind in SIDECAR_TAGS:
            path = self.segments_dir / sidecar_file_name(segment_id, kind)
            if path.is_file() and not path.is_symlink():
                found.append(_sidecar_entry(kind, path))
        return found

    def _checked_sidecars(self, segment_id: str, sidecars: Iterable[Sidecar | dict[str, Any]]) -> list[dict[str, Any]]:
        """The segment record's `sidecars` for files a caller wrote (docs/FORMAT.md §10.5), each checked
        against the file on disk. Raises SidecarError naming the first problem; touches nothing."""
        entries: list[dict[str, Any]] = []
        for item in sidecars:
            try:
                sidecar = item if isinstance(item, Sidecar) else Sidecar.model_validate(item)
            except ValueError as exc:
                raise SidecarError(f"segment {segment_id}: not a sidecar entry {item!r}: {exc}") from None
            expected = sidecar_file_name(segment_id, sidecar.kind)
            if sidecar.file != expected:
                raise SidecarError(f"segment {segment_id}: {sidecar.kind} sidecar must be named {expected!r}, "
                                   f"not {sidecar.file!r}")
            if any(e["kind"] == sidecar.kind for e in entries):
                raise SidecarError(f"segment {segment_id}: more than one {sidecar.kind} sidecar")
            path = self.segments_dir / sidecar.file
            if path.is_symlink() or not path.is_file():
                raise SidecarError(f"segment {segment_id}: sidecar {sidecar.file} is not a regular file in "
                                   f"{self.segments_dir} (it must be written before the close)")
            try:
                found = _sidecar_entry(sidecar.kind, path)
            except OSError as exc:
                raise SidecarError(f"segment {segment_id}: sidecar {sidecar.file} unreadable: {exc}") from None
            if found != sidecar.model_dump():
                raise SidecarError(f"segment {segment_id}: sidecar {sidecar.file} on disk is {found['size']} bytes, "
                                   f"SHA-256 {found['sha256_cipher']}, not the {sidecar.size} bytes, "
                                   f"{sidecar.sha256_cipher} given")
            entries.append(found)
        order = list(SIDECAR_TAGS)
        return sorted(entries, key=lambda e: order.index(e["kind"]))

    def _recover_row(self, row: dict[str, Any]) -> list[SignedRecord]:
        final = self.segments_dir / row["file"]
        part = final.with_name(final.name + PART_SUFFIX)
        complete = row["sha256_plain"] is not None  # close_payload() finished: every chunk is on disk
        if part.exists() and final.exists():
            if not final.samefile(part):
                return self._leave_unresolved(row, f"{part.name} and {final.name} are different files; both left "
                                                   "in place")
            # A rename cut between its link and its unlink: both names are the same file.
            part.unlink()
            self.fs.sync_dir(self.segments_dir)
        elif part.exists():
            self.fs.rename_new(part, final)
            self.fs.sync_dir(self.segments_dir)
        if not final.exists():
            return self._leave_unresolved(row, "segment row without a file")
        survey = survey_age_file(final)
        body = self._segment_body(
            row, file=final.name, size=survey["size"], sha256_cipher=survey["sha256_cipher"],
            chunks=survey["chunks"] + (1 if complete and survey["complete_size"] < survey["size"] else 0),
            complete_size=survey["size"] if complete else survey["complete_size"],
            sha256_complete=survey["sha256_cipher"] if complete else survey["sha256_complete"],
            truncated=not complete, recovered=True,
            plain_size=row["plain_size"] if complete else None, sha256_plain=row["sha256_plain"] if complete else None,
            sidecars=self._recover_sidecars(row["segment_id"]))
        record = self._commit_segment_record(row["segment_id"], body)
        note = self.ledger.append("recovery", {
            "segment_id": row["segment_id"], "action": "closed_complete" if complete else "closed_truncated",
            "detail": f"{survey['chunks']} complete chunks, {survey['size']} bytes on disk"})
        log.warning("recovered segment %s as %s", row["segment_id"], "complete" if complete else "truncated")
        return [record, note]

    def close(self) -> None:
        self.ledger.close()
        self.db.close()


class OpenSegment:
    """A segment being written. Owned by the capture writer thread."""

    def __init__(self, store: EvidenceStore, segment_id: str, session_id: str | None, index: int,
                 writer: SegmentWriter):
        self.store = store
        self.segment_id = segment_id
        self.session_id = session_id
        self.index = index
        self.writer = writer

    @property
    def totals(self) -> WriterTotals:
        return self.writer.totals

    def write_fragment(self, data: bytes, info: FragmentInfo | None = None) -> None:
        """Durably append one fragment (file fsynced, index row committed) before returning."""
        self.writer.write_fragment(data, info)
        t = self.writer.totals
        try:
            with self.store.db.transaction() as conn:
                conn.execute("UPDATE segments SET fragments=?, video_frames=?, audio_samples=?, first_pts_us=?,"
                             " last_pts_us=? WHERE segment_id=?",
                             (t.fragments, t.video_frames, t.audio_samples, t.first_pts_us, t.last_pts_us,
                              self.segment_id))
        except DatabaseFullError as exc:
            # The fragment is on disk; only its count in the index is behind. Stop here like any full disk.
            self.writer.failed = StorageFullError(f"segment {self.segment_id}: fragment written, but the index "
                                                  f"could not be updated ({exc})")
            raise self.writer.failed from exc

    def close(self, closing: bytes = b"", sidecars: Iterable[Sidecar | dict[str, Any]] = ()) -> SignedRecord:
        """Finish the file and append its signed segment record; the segment is CLOSED on return.

        `sidecars`: entries (`records.Sidecar` or its dict) for sidecar files of this segment, at most one
        per kind, named `<segment_id>.<tag>.age` and already written, fsynced and renamed in `segments/`
        (docs/FORMAT.md §10.5). Each is checked against its file first; a bad one raises SidecarError before
        anything of the close has happened, so the caller may close again without it.
        """
        checked = self.store._checked_sidecars(self.segment_id, sidecars)
        t = self.writer.totals
        # The final plaintext hash must be known before the rename, so recovery can finish a close
        # interrupted between the rename and the record.
        self.writer.close_payload(closing)
        with self.store.db.transaction() as conn:
            conn.execute("UPDATE segments SET plain_size=?, sha256_plain=? WHERE segment_id=?",
                         (t.plain_size, t.sha256_plain, self.segment_id))
        self.writer.publish()
        return self.store._commit_segment_record(self.segment_id, self.store._segment_body(
            self.store.row(self.segment_id), file=self.writer.final_path.name, size=t.cipher_size,
            sha256_cipher=t.sha256_cipher, chunks=t.chunks, complete_size=t.cipher_size,
            sha256_complete=t.sha256_cipher, truncated=False, recovered=False, plain_size=t.plain_size,
            sha256_plain=t.sha256_plain, sidecars=checked))

    def abort(self, reason: str) -> list[SignedRecord]:
        """After a write failure: keep what reached the disk and close it as truncated now.

        If the ledger cannot take the record (disk full there too), raises StorageFullError; the file
        stays on disk and `abort` may be called again, or recovery records it at the next start.
        """
        self.writer.abandon()
        log.error("segment %s aborted: %s", self.segment_id, reason)
        try:
            return self.store._recover_row(self.store.row(self.segment_id))
        except DatabaseFullError as exc:
            raise StorageFullError(f"segment {self.segment_id}: what was written is kept on disk, but its "
                                   f"record could not be written ({exc}); free space and call abort() again, "
                                   "or recovery records it at the next start") from exc

    @property
    def failed(self) -> StorageError | None:
        return self.writer.failed
