"""The device-wide ledger: append-only, hash-chained, every record signed with the identity key.

Any thread may append; appends are serialised by the database lock, and a record is durable (committed
with synchronous=FULL) when `append` returns.

Every committed record is also appended, after the commit, to `journal.jsonl` (the export line format,
fsynced): a second, independent copy. At start-up `reconcile()` compares the two: records the journal
missed (a crash between commit and journal write) are appended to it, and records the database lost
(a damaged or truncated WAL) are restored from it after their chain and signatures check out.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from agent.clock import Clock
from agent.evidence.records import GENESIS_PREV, RecordError, SignedRecord, build_record
from agent.evidence.signing import SignatureError, verify_es256
from agent.storage.db import Database, DatabaseError
from agent.storage.keys import Signer

log = logging.getLogger(__name__)

# Called inside the append's transaction, so index rows commit atomically with the record.
AlsoInTransaction = Callable[[sqlite3.Connection, SignedRecord, int], None]


class Ledger:
    def __init__(self, db: Database, device_id: str, signer: Signer, clock: Clock, journal: Path | None = None):
        self.db = db
        self.device_id = device_id
        self.signer = signer
        self.clock = clock
        self.journal_path = journal
        self._journal = None
        self.journal_errors = 0
        if journal is not None:
            self._journal = open(journal, "ab")  # noqa: SIM115 - held open for the store's lifetime
            if journal.stat().st_size and not _ends_with_newline(journal):
                self._journal.write(b"\n")  # isolate a line torn by a crash; readers skip it

    def _journal_write(self, rec: SignedRecord) -> None:
        if self._journal is None:
            return
        try:
            self._journal.write(rec.to_line())
            self._journal.flush()
            os.fsync(self._journal.fileno())
        except OSError as exc:  # the record is committed; reconcile() fills the journal in at the next start
            self.journal_errors += 1
            log.error("ledger journal write failed (%s); the database holds the record", exc)

    def read_journal(self) -> tuple[dict[int, SignedRecord], int]:
        """Valid records in the journal by seq, and the number of lines that could not be read."""
        found: dict[int, SignedRecord] = {}
        bad = 0
        if self.journal_path is None or not self.journal_path.exists():
            return found, bad
        with open(self.journal_path, "rb") as fh:
            for line in fh:
                if not line.strip():
                    continue
                try:
                    rec = SignedRecord.from_line(line)
                    found[rec.fields["seq"]] = rec
                except (RecordError, KeyError, TypeError, ValueError):
                    bad += 1
        return found, bad

    def reconcile(self) -> int:
        """Bring database and journal back in step (see the module docstring). Returns records restored
        into the database. Raises DatabaseError if the two disagree about a record both hold."""
        if self.journal_path is None:
            return 0
        journal, bad = self.read_journal()
        if bad:
            log.warning("ledger journal: %d unreadable line(s) skipped (torn by a crash?)", bad)
        db_seq, db_hash = self.head()
        for seq in range(1, db_seq + 1):
            if seq in journal:
                continue
            for rec in self.records(seq):
                if rec.fields["seq"] not in journal:
                    self._journal_write(rec)
                    journal[rec.fields["seq"]] = rec
            break
        if db_seq and journal.get(db_seq) is not None and journal[db_seq].hash != db_hash:
            raise DatabaseError(f"ledger database and {self.journal_path.name} disagree at seq {db_seq}; "
                                "both left untouched")
        restored = 0
        seq, prev = db_seq, db_hash
        key = self.signer.public_key()
        while seq + 1 in journal:
            rec = journal[seq + 1]
            fields = rec.fields
            try:
                verify_es256(key, rec.data, rec.sig)
            except SignatureError as exc:
                raise DatabaseError(f"{self.journal_path.name} seq {seq + 1}: {exc}; not restored") from None
            if fields["prev"] != prev:
                raise DatabaseError(f"{self.journal_path.name} seq {seq + 1} does not chain to seq {seq}")
            with self.db.transaction() as conn:
                conn.execute("INSERT INTO ledger (seq, type, hash, data, sig, session_id) VALUES (?,?,?,?,?,?)",
                             (seq + 1, fields["type"], rec.hash, rec.data, rec.sig,
                              fields["body"].get("session_id")))
            seq, prev = seq + 1, rec.hash
            restored += 1
        if restored:
            log.error("restored %d ledger record(s) the database had lost, from %s", restored,
                      self.journal_path.name)
        return restored

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    def head(self) -> tuple[int, str]:
        """(seq, hash) of the last record, or (0, GENESIS_PREV) for an empty ledger."""
        with self.db.lock:  # never read another thread's uncommitted append on the shared connection
            row = self.db.conn.execute("SELECT seq, hash FROM ledger ORDER BY seq DESC LIMIT 1").fetchone()
        return (row[0], row[1]) if row else (0, GENESIS_PREV)

    def append(self, rtype: str, body: dict[str, Any], also: AlsoInTransaction | None = None) -> SignedRecord:
        """Validate, sign and durably append one record; returns it. Raises RecordError on a bad body."""
        with self.db.transaction() as conn:
            seq, prev = self.head()
            data = build_record(device=self.device_id, seq=seq + 1, prev=prev, rtype=rtype,
                                wall_us=self.clock.wall_us(), mono_us=self.clock.mono_us(),
                                clock=self.clock.status(), body=body)
            signed = SignedRecord(data, self.signer.sign(data))
            conn.execute("INSERT INTO ledger (seq, type, hash, data, sig, session_id) VALUES (?,?,?,?,?,?)",
                         (seq + 1, rtype, signed.hash, data, signed.sig, body.get("session_id")))
            if also is not None:
                also(conn, signed, seq + 1)
        self._journal_write(signed)
        return signed

    def records(self, from_seq: int = 1, rtype: str | None = None) -> Iterator[SignedRecord]:
        sql = "SELECT data, sig FROM ledger WHERE seq >= ?"
        params: tuple = (from_seq,)
        if rtype:
            sql += " AND type = ?"
            params += (rtype,)
        for data, sig in self.db.query_rows(sql + " ORDER BY seq", params):
            yield SignedRecord(bytes(data), bytes(sig))

    def export_jsonl(self, path: Path, from_seq: int = 1) -> int:
        """Write records from `from_seq` as JSON Lines (docs/FORMAT.md, "Ledger export"); returns count."""
        count = 0
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            for rec in self.records(from_seq):
                fh.write(rec.to_line())
                count += 1
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return count


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"
