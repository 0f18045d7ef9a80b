"""The device's SQLite database: the ledger (append-only, enforced by triggers) and the segment index.

WAL journal, `synchronous=FULL`: a commit is on disk when it returns. One connection, guarded by a lock,
shared by the threads that write (capture writer, sync, state machine).
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlite_utils

SCHEMA_VERSION = 1


class DatabaseError(RuntimeError):
    """The database cannot be opened or is damaged; it has been left untouched."""


class DatabaseFullError(RuntimeError):
    """The disk is full: a transaction could not commit and was rolled back; nothing was lost."""


_TRIGGERS = """
CREATE TRIGGER IF NOT EXISTS ledger_no_update BEFORE UPDATE ON ledger
BEGIN SELECT RAISE(ABORT, 'ledger is append-only: records are never edited'); END;
CREATE TRIGGER IF NOT EXISTS ledger_no_delete BEFORE DELETE ON ledger
BEGIN SELECT RAISE(ABORT, 'ledger is append-only: records are never deleted'); END;
CREATE TRIGGER IF NOT EXISTS segments_no_delete BEFORE DELETE ON segments
BEGIN SELECT RAISE(ABORT, 'segment rows are never deleted; a purge is a state'); END;
"""


class Database:
    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.RLock()
        fresh = not path.exists()
        try:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            if not fresh:
                problems = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
                if problems != ["ok"]:
                    conn.close()
                    raise DatabaseError(f"{path}: database is damaged ({'; '.join(problems[:3])}); "
                                        "left untouched, see docs/OPERATIONS.md 'Recovering a device'")
        except sqlite3.DatabaseError as exc:
            raise DatabaseError(f"{path}: cannot open ledger database: {exc}; left untouched") from exc
        self.conn = conn
        self.db = sqlite_utils.Database(conn)
        self._create_schema()

    def _create_schema(self) -> None:
        with self.transaction():
            if "ledger" not in self.db.table_names():
                self.db["ledger"].create(
                    {"seq": int, "type": str, "hash": str, "data": bytes, "sig": bytes, "session_id": str},
                    pk="seq", not_null={"type", "hash", "data", "sig"})
                self.db["ledger"].create_index(["hash"], unique=True)
                self.db["ledger"].create_index(["session_id"])
            if "segments" not in self.db.table_names():
                self.db["segments"].create(
                    {"segment_id": str, "session_id": str, "idx": int, "file": str, "state": str,
                     "record_seq": int, "size": int, "sha256_cipher": str, "fragments": int,
                     "video_frames": int, "audio_samples": int, "first_pts_us": int, "last_pts_us": int,
                     "plain_size": int, "sha256_plain": str, "flagged": int, "opened_wall_us": int,
                     "updated_wall_us": int},
                    pk="segment_id", not_null={"file", "state"}, defaults={"flagged": 0, "fragments": 0,
                                                                          "video_frames": 0, "audio_samples": 0})
                self.db["segments"].create_index(["state"])
            if "transitions" not in self.db.table_names():
                self.db["transitions"].create(
                    {"id": int, "segment_id": str, "from_state": str, "to_state": str, "wall_us": int,
                     "note": str}, pk="id")
            if "receipts" not in self.db.table_names():
                self.db["receipts"].create(
                    {"segment_id": str, "receipt": bytes, "sig": bytes, "receipt_sha256": str,
                     "bureau_key_id": str, "verified_wall_us": int}, pk="segment_id")
            if "uploads" not in self.db.table_names():
                self.db["uploads"].create({"segment_id": str, "upload_url": str, "created_wall_us": int},
                                          pk="segment_id")
            if "meta" not in self.db.table_names():
                self.db["meta"].create({"key": str, "value": str}, pk="key")
            for stmt in _TRIGGERS.strip().split("END;"):
                if stmt.strip():
                    self.conn.execute(stmt + "END;")
            self.conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT under the lock; rolled back if the block or the COMMIT raises.

        A full disk raises DatabaseFullError: nothing of the transaction was written, and the
        connection is usable again once space is freed.
        """
        with self.lock:
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self.conn
                    self.conn.execute("COMMIT")
                except BaseException:
                    # SQLite may already have rolled back (e.g. SQLITE_FULL at COMMIT); a transaction left
                    # open here would make every later BEGIN fail.
                    if self.conn.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            self.conn.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as exc:
                if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
                    raise DatabaseFullError(f"{self.path}: disk full, the transaction was rolled back "
                                            f"(nothing written): {exc}") from exc
                raise

    def query(self, sql: str, params: tuple = ()) -> list[dict]:
        with self.lock:
            cur = self.conn.execute(sql, params)
            cols = [c[0] for c in cur.description or ()]
            return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]

    def query_rows(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self.lock:
            return self.conn.execute(sql, params).fetchall()

    def get_meta(self, key: str) -> str | None:
        rows = self.query_rows("SELECT value FROM meta WHERE key=?", (key,))
        return rows[0][0] if rows else None

    def set_meta(self, key: str, value: str | None) -> None:
        with self.transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?,?)", (key, value))

    def close(self) -> None:
        with self.lock:
            self.conn.close()
