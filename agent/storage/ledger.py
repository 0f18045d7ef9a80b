"""The device-wide ledger: append-only, hash-chained, every record signed with the identity key.

Any thread may append; appends are serialised by the database lock, and a record is durable (committed
with synchronous=FULL) when `append` returns.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from agent.clock import Clock
from agent.evidence.records import GENESIS_PREV, SignedRecord, build_record
from agent.storage.db import Database
from agent.storage.keys import Signer

# Called inside the append's transaction, so index rows commit atomically with the record.
AlsoInTransaction = Callable[[sqlite3.Connection, SignedRecord, int], None]


class Ledger:
    def __init__(self, db: Database, device_id: str, signer: Signer, clock: Clock):
        self.db = db
        self.device_id = device_id
        self.signer = signer
        self.clock = clock

    def head(self) -> tuple[int, str]:
        """(seq, hash) of the last record, or (0, GENESIS_PREV) for an empty ledger."""
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
