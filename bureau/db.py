"""The bureau's database, behind an interface so a bureau can move from SQLite to PostgreSQL.

`BureauDatabase` is the contract the service uses; `SqliteBureauDatabase` implements it with one
connection (WAL, synchronous=FULL: a commit is on disk when it returns) guarded by a lock, so any
request-handler thread may call any method. Every method that changes state is one transaction.
The SQL is plain (no SQLite-only syntax beyond `INSERT ... ON CONFLICT`, which PostgreSQL shares).

Nothing here ever deletes or edits a ledger record, a segment record or a receipt: triggers refuse it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

SCHEMA_VERSION = 2  # 2: segment sidecars indexed, uploads name the sidecar they carry


class BureauDatabaseError(RuntimeError):
    """The database cannot be opened, or refused a change that would break an invariant."""


class TokenProblem(StrEnum):
    UNKNOWN = "invalid_token"
    USED = "token_used"
    EXPIRED = "token_expired"


@dataclass(frozen=True)
class TokenRow:
    token_hash: str
    device_id: str
    created_us: int
    expires_us: int
    used_us: int | None
    used_by_serial: str | None  # the certificate the token bought


@dataclass(frozen=True)
class DeviceRow:
    device_id: str
    cert_pem: str
    cert_serial: str
    public_key_der: bytes
    enrolled_us: int
    status: str  # "active" or "revoked"


@dataclass(frozen=True)
class LedgerHead:
    seq: int
    hash: str
    signing_key_der: bytes | None  # the key that signs the next record (None before the first upload)


@dataclass(frozen=True)
class LedgerRow:
    seq: int
    hash: str
    type: str
    data: bytes
    sig: bytes


@dataclass(frozen=True)
class SidecarRow:
    """One `sidecars` entry of a signed segment record (docs/FORMAT.md §10.5)."""

    kind: str  # gps_track | context
    file: str
    size: int
    sha256_cipher: str


@dataclass(frozen=True)
class SegmentRow:
    """What the device's signed segment record says about one encrypted file and its sidecars."""

    device_id: str
    segment_id: str
    file: str
    size: int
    sha256_cipher: str
    record_seq: int
    record_hash: str
    sidecars: tuple[SidecarRow, ...] = ()

    def sidecar(self, kind: str) -> SidecarRow | None:
        return next((s for s in self.sidecars if s.kind == kind), None)


class UploadState(StrEnum):
    RECEIVING = "receiving"  # bytes still expected
    AWAITING_LEDGER = "awaiting_ledger"  # every byte here; the segment record has not arrived yet
    # A segment's upload only: verified and in the final store, but a sidecar its record names is not
    # committed yet, so no receipt yet.
    AWAITING_SIDECAR = "awaiting_sidecar"
    COMMITTED = "committed"  # verified, in the final store (a segment's: receipt issued)
    REJECTED = "rejected"  # every byte here but they do not match the signed record; kept, no receipt


@dataclass(frozen=True)
class UploadRow:
    upload_id: str
    device_id: str
    segment_id: str
    length: int
    offset: int
    metadata: str  # the Upload-Metadata header as the client sent it
    sha256_cipher: str  # from the metadata
    state: UploadState
    detail: str
    created_us: int
    updated_us: int
    sidecar: str = ""  # "" for the segment's own file, else the sidecar kind this upload carries


@dataclass(frozen=True)
class ReceiptRow:
    device_id: str
    segment_id: str
    data: bytes
    sig: bytes
    sha256: str
    issued_us: int
    upload_id: str | None


class BureauDatabase(Protocol):
    """What the service needs from its database. Implementations must be thread-safe."""

    # enrollment
    def add_token(self, token_hash: str, device_id: str, created_us: int, expires_us: int) -> None: ...
    def get_token(self, token_hash: str) -> TokenRow | None: ...
    def enroll(self, token_hash: str, now_us: int, device: DeviceRow) -> TokenProblem | None: ...
    def get_device(self, device_id: str) -> DeviceRow | None: ...
    def devices(self) -> list[str]: ...

    # ledger
    def ledger_head(self, device_id: str) -> LedgerHead: ...
    def ledger_hashes(self, device_id: str, first_seq: int, last_seq: int) -> dict[int, str]: ...
    def ledger_rows(self, device_id: str, from_seq: int) -> Iterator[LedgerRow]: ...
    def append_ledger(self, device_id: str, expect_head_seq: int, rows: list[LedgerRow], segments: list[SegmentRow],
                      signing_key_der: bytes, now_us: int) -> None: ...
    def get_segment(self, device_id: str, segment_id: str) -> SegmentRow | None: ...
    def segment_owners(self, segment_id: str) -> list[str]: ...

    # uploads and receipts
    def create_upload(self, row: UploadRow) -> None: ...
    def get_upload(self, upload_id: str) -> UploadRow | None: ...
    def latest_upload(self, device_id: str, segment_id: str, sidecar: str = "",
                      states: tuple[UploadState, ...] | None = None) -> UploadRow | None: ...
    def set_upload_offset(self, upload_id: str, offset: int, now_us: int) -> None: ...
    def set_upload_state(self, upload_id: str, state: UploadState, detail: str, now_us: int) -> None: ...
    def complete_uploads(self, device_id: str | None = None) -> list[UploadRow]: ...
    def commit_receipt(self, upload_id: str, receipt: ReceiptRow, now_us: int) -> None: ...
    def get_receipt(self, device_id: str, segment_id: str) -> ReceiptRow | None: ...

    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    token_hash TEXT PRIMARY KEY, device_id TEXT NOT NULL, created_us INTEGER NOT NULL,
    expires_us INTEGER NOT NULL, used_us INTEGER, used_by_serial TEXT);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY, cert_pem TEXT NOT NULL, cert_serial TEXT NOT NULL, public_key_der BLOB NOT NULL,
    enrolled_us INTEGER NOT NULL, status TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS certificates (
    cert_serial TEXT PRIMARY KEY, device_id TEXT NOT NULL, cert_pem TEXT NOT NULL, issued_us INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS ledger (
    device_id TEXT NOT NULL, seq INTEGER NOT NULL, hash TEXT NOT NULL, type TEXT NOT NULL, data BLOB NOT NULL,
    sig BLOB NOT NULL, received_us INTEGER NOT NULL, PRIMARY KEY (device_id, seq));
CREATE TABLE IF NOT EXISTS ledger_keys (
    device_id TEXT PRIMARY KEY, signing_key_der BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS segments (
    device_id TEXT NOT NULL, segment_id TEXT NOT NULL, file TEXT NOT NULL, size INTEGER NOT NULL,
    sha256_cipher TEXT NOT NULL, record_seq INTEGER NOT NULL, record_hash TEXT NOT NULL,
    PRIMARY KEY (device_id, segment_id));
CREATE INDEX IF NOT EXISTS segments_by_id ON segments (segment_id);
CREATE TABLE IF NOT EXISTS segment_sidecars (
    device_id TEXT NOT NULL, segment_id TEXT NOT NULL, kind TEXT NOT NULL, file TEXT NOT NULL, size INTEGER NOT NULL,
    sha256_cipher TEXT NOT NULL, PRIMARY KEY (device_id, segment_id, kind));
CREATE TABLE IF NOT EXISTS uploads (
    upload_id TEXT PRIMARY KEY, device_id TEXT NOT NULL, segment_id TEXT NOT NULL, length INTEGER NOT NULL,
    "offset" INTEGER NOT NULL, metadata TEXT NOT NULL, sha256_cipher TEXT NOT NULL, state TEXT NOT NULL,
    detail TEXT NOT NULL, created_us INTEGER NOT NULL, updated_us INTEGER NOT NULL, sidecar TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS uploads_by_segment ON uploads (device_id, segment_id);
CREATE TABLE IF NOT EXISTS receipts (
    device_id TEXT NOT NULL, segment_id TEXT NOT NULL, data BLOB NOT NULL, sig BLOB NOT NULL, sha256 TEXT NOT NULL,
    issued_us INTEGER NOT NULL, upload_id TEXT, PRIMARY KEY (device_id, segment_id));
CREATE TRIGGER IF NOT EXISTS ledger_no_update BEFORE UPDATE ON ledger
BEGIN SELECT RAISE(ABORT, 'ledger is append-only: records are never edited'); END;
CREATE TRIGGER IF NOT EXISTS ledger_no_delete BEFORE DELETE ON ledger
BEGIN SELECT RAISE(ABORT, 'ledger is append-only: records are never deleted'); END;
CREATE TRIGGER IF NOT EXISTS segments_no_update BEFORE UPDATE ON segments
BEGIN SELECT RAISE(ABORT, 'segment records are never edited'); END;
CREATE TRIGGER IF NOT EXISTS segments_no_delete BEFORE DELETE ON segments
BEGIN SELECT RAISE(ABORT, 'segment records are never deleted'); END;
CREATE TRIGGER IF NOT EXISTS segment_sidecars_no_update BEFORE UPDATE ON segment_sidecars
BEGIN SELECT RAISE(ABORT, 'segment records are never edited'); END;
CREATE TRIGGER IF NOT EXISTS segment_sidecars_no_delete BEFORE DELETE ON segment_sidecars
BEGIN SELECT RAISE(ABORT, 'segment records are never deleted'); END;
CREATE TRIGGER IF NOT EXISTS receipts_no_update BEFORE UPDATE ON receipts
BEGIN SELECT RAISE(ABORT, 'receipts are never edited'); END;
CREATE TRIGGER IF NOT EXISTS receipts_no_delete BEFORE DELETE ON receipts
BEGIN SELECT RAISE(ABORT, 'receipts are never deleted'); END;
"""

_UPLOAD_COLS = ('upload_id, device_id, segment_id, length, "offset", metadata, sha256_cipher, state, detail, '
                'created_us, updated_us, sidecar')


def _upload(row: tuple | None) -> UploadRow | None:
    if row is None:
        return None
    return UploadRow(row[0], row[1], row[2], row[3], row[4], row[5], row[6], UploadState(row[7]), row[8], row[9],
                     row[10], row[11])


def _sidecars_of_record(data: bytes) -> list[tuple[str, str, int, str]]:
    """(kind, file, size, sha256_cipher) of each sidecar a stored, already verified segment record names."""
    body = json.loads(data).get("body", {})
    return [(s["kind"], s["file"], s["size"], s["sha256_cipher"]) for s in body.get("sidecars", [])]


class SqliteBureauDatabase:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.RLock()
        if not self.path.exists():  # token hashes and device certificates: not for every local user
            self.path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))
        try:
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            with self._lock:
                self._migrate()
        except sqlite3.DatabaseError as exc:
            raise BureauDatabaseError(f"{self.path}: cannot open the bureau database: {exc}") from exc

    def _migrate(self) -> None:
        """Create the schema, or bring a version-1 database up to it in one transaction (only additions:
        the `sidecar` column of uploads, and the sidecar index filled from the stored segment records)."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            upload_cols = {r[1] for r in conn.execute("PRAGMA table_info(uploads)")}
            if upload_cols and "sidecar" not in upload_cols:
                conn.execute("ALTER TABLE uploads ADD COLUMN sidecar TEXT NOT NULL DEFAULT ''")
            for stmt in _SCHEMA.split(";\n"):  # a trigger's inner ";" is followed by " END", not a newline
                if stmt.strip():
                    conn.execute(stmt)
            if version < 2:
                for device_id, segment_id, data in conn.execute(
                        "SELECT s.device_id, s.segment_id, l.data FROM segments s JOIN ledger l"
                        " ON l.device_id = s.device_id AND l.seq = s.record_seq").fetchall():
                    conn.executemany("INSERT INTO segment_sidecars (device_id, segment_id, kind, file, size,"
                                     " sha256_cipher) VALUES (?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                                     [(device_id, segment_id, *s) for s in _sidecars_of_record(bytes(data))])
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _one(self, sql: str, params: tuple = ()) -> tuple | None:
        with self._lock:
            return self._conn.execute(sql, params).fetchone()

    def _all(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    # --- enrollment -------------------------------------------------------------------------------

    def add_token(self, token_hash: str, device_id: str, created_us: int, expires_us: int) -> None:
        with self._tx() as conn:
            conn.execute("INSERT INTO tokens (token_hash, device_id, created_us, expires_us) VALUES (?,?,?,?)",
                         (token_hash, device_id, created_us, expires_us))

    def get_token(self, token_hash: str) -> TokenRow | None:
        row = self._one("SELECT token_hash, device_id, created_us, expires_us, used_us, used_by_serial FROM tokens"
                        " WHERE token_hash=?", (token_hash,))
        return TokenRow(*row) if row else None

    def enroll(self, token_hash: str, now_us: int, device: DeviceRow) -> TokenProblem | None:
        """Consume the token and store the device's new certificate, atomically.

        Returns the reason the token cannot be used (nothing changed then), or None on success.
        """
        with self._tx() as conn:
            row = conn.execute("SELECT device_id, expires_us, used_us FROM tokens WHERE token_hash=?",
                               (token_hash,)).fetchone()
            if row is None or row[0] != device.device_id:
                return TokenProblem.UNKNOWN
            if row[2] is not None:
                return TokenProblem.USED
            if row[1] <= now_us:
                return TokenProblem.EXPIRED
            conn.execute("UPDATE tokens SET used_us=?, used_by_serial=? WHERE token_hash=?",
                         (now_us, device.cert_serial, token_hash))
            conn.execute("INSERT INTO certificates (cert_serial, device_id, cert_pem, issued_us) VALUES (?,?,?,?)",
                         (device.cert_serial, device.device_id, device.cert_pem, now_us))
            conn.execute("INSERT INTO devices (device_id, cert_pem, cert_serial, public_key_der, enrolled_us, status)"
                         " VALUES (?,?,?,?,?,?) ON CONFLICT (device_id) DO UPDATE SET cert_pem=excluded.cert_pem,"
                         " cert_serial=excluded.cert_serial, public_key_der=excluded.public_key_der,"
                         " enrolled_us=excluded.enrolled_us, status=excluded.status",
                         (device.device_id, device.cert_pem, device.cert_serial, device.public_key_der,
                          device.enrolled_us, device.status))
        return None

    def get_device(self, device_id: str) -> DeviceRow | None:
        row = self._one("SELECT device_id, cert_pem, cert_serial, public_key_der, enrolled_us, status FROM devices"
                        " WHERE device_id=?", (device_id,))
        return DeviceRow(row[0], row[1], row[2], bytes(row[3]), row[4], row[5]) if row else None

    def devices(self) -> list[str]:
        return [r[0] for r in self._all("SELECT device_id FROM devices ORDER BY device_id")]

    # --- ledger -----------------------------------------------------------------------------------

    def ledger_head(self, device_id: str) -> LedgerHead:
        row = self._one("SELECT seq, hash FROM ledger WHERE device_id=? ORDER BY seq DESC LIMIT 1", (device_id,))
        key = self._one("SELECT signing_key_der FROM ledger_keys WHERE device_id=?", (device_id,))
        seq, digest = (row[0], row[1]) if row else (0, "0" * 64)
        return LedgerHead(seq, digest, bytes(key[0]) if key else None)

    def ledger_hashes(self, device_id: str, first_seq: int, last_seq: int) -> dict[int, str]:
        rows = self._all("SELECT seq, hash FROM ledger WHERE device_id=? AND seq BETWEEN ? AND ?",
                         (device_id, first_seq, last_seq))
        return {seq: digest for seq, digest in rows}

    def ledger_rows(self, device_id: str, from_seq: int) -> Iterator[LedgerRow]:
        seq = from_seq
        while True:  # in pages, so a long ledger is never all in memory
            rows = self._all("SELECT seq, hash, type, data, sig FROM ledger WHERE device_id=? AND seq>=?"
                             " ORDER BY seq LIMIT 500", (device_id, seq))
            if not rows:
                return
            for r in rows:
                yield LedgerRow(r[0], r[1], r[2], bytes(r[3]), bytes(r[4]))
            seq = rows[-1][0] + 1

    def append_ledger(self, device_id: str, expect_head_seq: int, rows: list[LedgerRow], segments: list[SegmentRow],
                      signing_key_der: bytes, now_us: int) -> None:
        """Append verified records (and the segment index they carry) in one transaction.

        Raises BureauDatabaseError if the head moved since it was read (a concurrent upload won).
        """
        with self._tx() as conn:
            head = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM ledger WHERE device_id=?",
                                (device_id,)).fetchone()[0]
            if head != expect_head_seq:
                raise BureauDatabaseError(f"ledger head of {device_id} moved from {expect_head_seq} to {head}")
            try:
                conn.executemany("INSERT INTO ledger (device_id, seq, hash, type, data, sig, received_us)"
                                 " VALUES (?,?,?,?,?,?,?)",
                                 [(device_id, r.seq, r.hash, r.type, r.data, r.sig, now_us) for r in rows])
                conn.executemany("INSERT INTO segments (device_id, segment_id, file, size, sha256_cipher, record_seq,"
                                 " record_hash) VALUES (?,?,?,?,?,?,?)",
                                 [(s.device_id, s.segment_id, s.file, s.size, s.sha256_cipher, s.record_seq,
                                   s.record_hash) for s in segments])
                conn.executemany("INSERT INTO segment_sidecars (device_id, segment_id, kind, file, size, sha256_cipher)"
                                 " VALUES (?,?,?,?,?,?)",
                                 [(s.device_id, s.segment_id, c.kind, c.file, c.size, c.sha256_cipher)
                                  for s in segments for c in s.sidecars])
            except sqlite3.IntegrityError as exc:
                raise BureauDatabaseError(f"ledger of {device_id}: {exc} (a segment id recorded twice?)") from exc
            conn.execute("INSERT INTO ledger_keys (device_id, signing_key_der) VALUES (?,?) ON CONFLICT (device_id)"
                         " DO UPDATE SET signing_key_der=excluded.signing_key_der", (device_id, signing_key_der))

    def get_segment(self, device_id: str, segment_id: str) -> SegmentRow | None:
        with self._lock:
            row = self._one("SELECT device_id, segment_id, file, size, sha256_cipher, record_seq, record_hash"
                            " FROM segments WHERE device_id=? AND segment_id=?", (device_id, segment_id))
            if row is None:
                return None
            sidecars = self._all("SELECT kind, file, size, sha256_cipher FROM segment_sidecars"
                                 " WHERE device_id=? AND segment_id=? ORDER BY kind", (device_id, segment_id))
        return SegmentRow(*row, sidecars=tuple(SidecarRow(*s) for s in sidecars))

    def segment_owners(self, segment_id: str) -> list[str]:
        return [r[0] for r in self._all("SELECT device_id FROM segments WHERE segment_id=?", (segment_id,))]

    # --- uploads and receipts ---------------------------------------------------------------------

    def create_upload(self, row: UploadRow) -> None:
        with self._tx() as conn:
            conn.execute(f"INSERT INTO uploads ({_UPLOAD_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                         (row.upload_id, row.device_id, row.segment_id, row.length, row.offset, row.metadata,
                          row.sha256_cipher, row.state.value, row.detail, row.created_us, row.updated_us,
                          row.sidecar))

    def get_upload(self, upload_id: str) -> UploadRow | None:
        return _upload(self._one(f"SELECT {_UPLOAD_COLS} FROM uploads WHERE upload_id=?", (upload_id,)))

    def latest_upload(self, device_id: str, segment_id: str, sidecar: str = "",
                      states: tuple[UploadState, ...] | None = None) -> UploadRow | None:
        """The newest upload of one part of a segment: its own file (`sidecar` "") or the sidecar of that
        kind; with `states`, the newest one in one of them."""
        where = "device_id=? AND segment_id=? AND sidecar=?"
        params: tuple = (device_id, segment_id, sidecar)
        if states:
            where += f" AND state IN ({','.join('?' * len(states))})"
            params += tuple(s.value for s in states)
        return _upload(self._one(f"SELECT {_UPLOAD_COLS} FROM uploads WHERE {where}"
                                 " ORDER BY created_us DESC, rowid DESC LIMIT 1", params))

    def set_upload_offset(self, upload_id: str, offset: int, now_us: int) -> None:
        with self._tx() as conn:
            conn.execute('UPDATE uploads SET "offset"=?, updated_us=? WHERE upload_id=?', (offset, now_us, upload_id))

    def set_upload_state(self, upload_id: str, state: UploadState, detail: str, now_us: int) -> None:
        with self._tx() as conn:
            conn.execute("UPDATE uploads SET state=?, detail=?, updated_us=? WHERE upload_id=?",
                         (state.value, detail, now_us, upload_id))

    def complete_uploads(self, device_id: str | None = None) -> list[UploadRow]:
        """Uploads holding every byte but not yet committed or rejected (to finish after a restart), and
        stored segments still waiting for a sidecar."""
        sql = (f"SELECT {_UPLOAD_COLS} FROM uploads WHERE \"offset\"=length AND state IN (?,?,?)"
               + (" AND device_id=?" if device_id else "") + " ORDER BY created_us, rowid")
        params = (UploadState.RECEIVING.value, UploadState.AWAITING_LEDGER.value,
                  UploadState.AWAITING_SIDECAR.value) + ((device_id,) if device_id else ())
        return [_upload(r) for r in self._all(sql, params)]  # type: ignore[misc]

    def commit_receipt(self, upload_id: str, receipt: ReceiptRow, now_us: int) -> None:
        """Record the receipt and mark the upload committed in one transaction."""
        with self._tx() as conn:
            conn.execute("INSERT INTO receipts (device_id, segment_id, data, sig, sha256, issued_us, upload_id)"
                         " VALUES (?,?,?,?,?,?,?) ON CONFLICT (device_id, segment_id) DO NOTHING",
                         (receipt.device_id, receipt.segment_id, receipt.data, receipt.sig, receipt.sha256,
                          receipt.issued_us, receipt.upload_id))
            conn.execute("UPDATE uploads SET state=?, detail=?, updated_us=? WHERE upload_id=?",
                         (UploadState.COMMITTED.value, "", now_us, upload_id))

    def get_receipt(self, device_id: str, segment_id: str) -> ReceiptRow | None:
        row = self._one("SELECT device_id, segment_id, data, sig, sha256, issued_us, upload_id FROM receipts"
                        " WHERE device_id=? AND segment_id=?", (device_id, segment_id))
        return ReceiptRow(row[0], row[1], bytes(row[2]), bytes(row[3]), row[4], row[5], row[6]) if row else None

    def close(self) -> None:
        with self._lock:
            self._conn.close()
