"""Every record is kept twice (ledger.db and journal.jsonl), so damage to one copy loses nothing (R5, R22)."""

from __future__ import annotations

import shutil
import sqlite3

import pytest

from agent.evidence.verify import Verifier
from agent.storage.db import DatabaseError
from tests.conftest import write_segment


def test_journal_holds_every_committed_record(store):
    write_segment(store, "S1", 0)
    journal, bad = store.ledger.read_journal()
    assert bad == 0
    assert [journal[s].data for s in sorted(journal)] == [r.data for r in store.ledger.records()]


def test_records_lost_from_the_database_are_restored_from_the_journal(open_store, bureau_identity):
    st = open_store()
    for i in range(3):
        write_segment(st, "S1", i)
    head = st.ledger.head()
    st.close()
    # Simulate a damaged WAL/database that lost its last records: rebuild the DB without them.
    db = st.data_dir / "ledger.db"
    conn = sqlite3.connect(db)
    conn.execute("DROP TRIGGER ledger_no_delete")
    conn.execute("DELETE FROM ledger WHERE seq > 2")
    conn.commit()
    conn.close()
    report = Verifier(bureau_identity).verify_path(st.data_dir)
    assert any("missing from the database" in str(p) for p in report.problems)
    again = open_store()
    assert again.restored_records == head[0] - 2
    assert again.ledger.head()[0] == head[0] + 1  # plus the recovery record saying so
    last = list(again.ledger.records(rtype="recovery"))[-1].fields["body"]
    assert last["action"] == "index_rebuilt" and "restored from journal.jsonl" in last["detail"]
    again.close()
    report = Verifier(bureau_identity).verify_path(st.data_dir)
    assert report.ok, report.problems


def test_journal_catches_up_when_a_crash_came_between_commit_and_journal(open_store):
    st = open_store()
    write_segment(st, "S1", 0)
    st.close()
    journal = st.data_dir / "journal.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(lines[0] + lines[1][:40])  # the second line torn, the rest never written
    again = open_store()
    recs, bad = again.ledger.read_journal()
    assert bad == 1 and sorted(recs) == [1, 2]
    write_segment(again, "S1", 1)
    recs, _ = again.ledger.read_journal()
    assert sorted(recs) == [1, 2, 3]
    again.close()


def test_disagreeing_copies_are_refused_and_left_untouched(open_store, tmp_path):
    st = open_store()
    write_segment(st, "S1", 0)
    st.close()
    journal = st.data_dir / "journal.jsonl"
    other_dir = tmp_path / "other"
    shutil.copytree(st.data_dir, other_dir)
    lines = journal.read_bytes().splitlines(keepends=True)
    forged = lines[1].replace(b'"index":0', b'"index":7')
    journal.write_bytes(lines[0] + forged)
    before = journal.read_bytes()
    with pytest.raises(DatabaseError, match="disagree at seq 2"):
        open_store()
    assert journal.read_bytes() == before
