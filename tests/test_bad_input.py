"""Damaged files, bad keys, a full disk and illegal requests: each gets a clear error naming the problem,
and nothing already recorded is lost or rewritten (DESIGN.md "What done means"; R5, R22)."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from agent.clock import SystemClock
from agent.evidence.age import CIPHER_CHUNK_SIZE, AgeDecryptor, Identity
from agent.evidence.verify import Verifier
from agent.storage.db import DatabaseError
from agent.storage.keys import IdentityKeyError, PemFileSigner
from agent.storage.segment_writer import FragmentInfo, StorageFullError
from agent.storage.store import EvidenceStore, OpenSegment, PurgeRefused, SegmentState, StateError
from hw_sim.clock import SimClock
from hw_sim.storage import SimStorage
from tests.conftest import DEVICE_ID, write_segment

S = SegmentState


# --- helpers ----------------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under `folder`, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def write_fragments(seg: OpenSegment, sizes: list[int]) -> list[bytes]:
    frags = [os.urandom(n) for n in sizes]
    for i, frag in enumerate(frags):
        seg.write_fragment(frag, FragmentInfo(video_frames=30, audio_samples=48_000, first_pts_us=i * 1_000_000,
                                              last_pts_us=i * 1_000_000 + 966_667))
    return frags


def crash(store: EvidenceStore, *open_segments: OpenSegment) -> None:
    """The process dies: open files are dropped as they are, nothing is closed properly."""
    for seg in open_segments:
        seg.writer.abandon()
    store.close()


def decrypted(path: Path, identity: Identity, truncated: bool) -> bytes:
    with open(path, "rb") as fh:
        return b"".join(AgeDecryptor(identity).chunks(fh, allow_truncated=truncated))


def contains_in_order(plain: bytes, frags: list[bytes]) -> bool:
    pos = 0
    for frag in frags:
        found = plain.find(frag, pos)
        if found < 0:
            return False
        pos = found + len(frag)
    return True


def segment_record(store: EvidenceStore, segment_id: str) -> dict:
    bodies = [r.fields["body"] for r in store.ledger.records(rtype="segment")
              if r.fields["body"]["segment_id"] == segment_id]
    assert len(bodies) == 1, bodies
    return bodies[0]


def verify(data_dir: Path, identity: Identity):
    report = Verifier(identity=identity).verify_path(data_dir)
    return report, [str(p) for p in report.problems]


# --- a damaged .part --------------------------------------------------------------------------------


def _damage_header(data: bytes) -> bytes:
    return os.urandom(30) + data[30:]


def _cut_mid_header(data: bytes) -> bytes:
    return data[:40]


def _zero_bytes(data: bytes) -> bytes:
    return b""


def _short_trailing_garbage(data: bytes) -> bytes:
    return data + os.urandom(CIPHER_CHUNK_SIZE - 1)


def _long_trailing_garbage(data: bytes) -> bytes:
    return data + os.urandom(CIPHER_CHUNK_SIZE * 2 + 5)


@pytest.mark.parametrize("damage, fragments, outcome", [
    (_damage_header, 2, "header destroyed"),
    (_cut_mid_header, 0, "no footage"),
    (_zero_bytes, 0, "no footage"),
    (_short_trailing_garbage, 2, "verifies"),
    (_long_trailing_garbage, 2, "garbage chunk"),
])
def test_damaged_part_is_closed_as_truncated_without_rewriting_a_byte(open_store, bureau_identity, damage,
                                                                       fragments, outcome):
    """Recovery never rewrites: the damaged bytes become the segment file as they are, recorded truncated
    with their hash. What verify then says is decided by what the damage destroyed:
    - a `.part` cut inside its age header with no fragment written is what a power cut while a segment is
      being created leaves (zero bytes, half a header): it holds no footage, and verify passes with a note;
    - a header destroyed after fragments were written can only be damage: verify names the file and says
      that N written fragments cannot be decrypted (the bureau must hear of lost footage);
    - garbage after the last complete chunk shorter than a chunk is a torn write: ignored, verify passes
      and every fragment decrypts;
    - garbage long enough to pass for whole chunks fails authentication: verify names the file and chunk.
    The other segments verify in every case."""
    store = open_store()
    write_segment(store, "S1", 0)
    seg = store.open_segment("S1", 1)
    frags = write_fragments(seg, [30_000, 90_000][:fragments])
    crash(store, seg)
    part = store.segments_dir / "S1-0001.age.part"
    intact = (store.segments_dir / "S1-0000.age").read_bytes()
    damaged = damage(part.read_bytes())
    part.write_bytes(damaged)

    store = open_store()
    store.recover()
    final = store.segments_dir / "S1-0001.age"
    assert not part.exists() and final.read_bytes() == damaged
    assert (store.segments_dir / "S1-0000.age").read_bytes() == intact
    body = segment_record(store, "S1-0001")
    assert body["truncated"] and body["recovered"] and body["fragments"] == fragments
    assert body["size"] == len(damaged) and body["sha256_cipher"] == hashlib.sha256(damaged).hexdigest()
    assert store.row("S1-0001")["state"] == S.CLOSED
    store.close()

    report, problems = verify(store.data_dir, bureau_identity)
    if outcome == "no footage":
        assert problems == [] and report.ok
        assert report.notes == ["segments/S1-0001.age: cut before its age header was complete; holds no footage"]
    elif outcome == "header destroyed":
        assert problems == ["segments/S1-0001.age: no readable age header although 2 fragment(s) had been "
                            "written: footage damaged before recovery"]
    elif outcome == "verifies":
        assert problems == [] and report.decrypted == 2
        assert contains_in_order(decrypted(final, bureau_identity, truncated=True), frags)
    else:
        assert len(problems) == 1 and problems[0].startswith("segments/S1-0001.age: decryption failed: chunk ")
        assert "failed authentication" in problems[0]
    assert report.segments_ok >= 1  # S1-0000 is intact whatever happened to S1-0001


def test_stray_part_without_index_row_is_adopted_and_closed(open_store, bureau_identity):
    """A cut between creating the file and committing its index row leaves a `.part` the database does not
    know; recovery adopts it under its file name, so no file is ever unaccounted for."""
    store = open_store()
    write_segment(store, "S2", 0)
    store.close()
    stray = store.segments_dir / "S2-0001.age.part"
    stray.write_bytes(b"age-encryption.org/v1\n-> X25519 ")
    content = stray.read_bytes()

    store = open_store()
    records = store.recover()
    assert [r.fields["type"] for r in records] == ["segment", "recovery"]
    assert (store.segments_dir / "S2-0001.age").read_bytes() == content
    assert segment_record(store, "S2-0001")["session_id"] == "S2"
    store.close()
    report, problems = verify(store.data_dir, bureau_identity)
    assert problems == [] and report.segments == 2


# --- a damaged ledger database ----------------------------------------------------------------------


def _record_segments(store: EvidenceStore, n: int) -> None:
    for i in range(n):
        write_segment(store, "S3", i, (2_000,))


def test_truncated_ledger_database_is_refused_and_left_byte_identical(open_store, data_dir):
    store = open_store()
    _record_segments(store, 12)
    store.close()
    db = data_dir / "ledger.db"
    db.write_bytes(db.read_bytes()[: db.stat().st_size // 2])
    before = snapshot(data_dir)

    with pytest.raises(DatabaseError) as err:
        open_store()
    assert str(db) in str(err.value) and "left untouched" in str(err.value)
    after = snapshot(data_dir)
    assert {k: v for k, v in after.items() if k in before} == before  # ledger.db and every segment
    assert set(after) - set(before) <= {"ledger.db-wal", "ledger.db-shm"}


def _crash_copy(store: EvidenceStore, dest: Path) -> None:
    """What the disk holds if the power goes now: the database, its WAL (recent commits) and the segments."""
    shutil.copytree(store.data_dir, dest)


def test_ledger_in_the_wal_after_a_crash_is_kept(open_store, data_dir, signer, bureau_identity, tmp_path):
    """Commits since the last checkpoint live only in ledger.db-wal after a crash; opening replays them."""
    store = open_store()
    _record_segments(store, 4)
    store.db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    for i in range(4, 7):  # these commits are only in the WAL
        write_segment(store, "S3", i, (2_000,))
    head = store.ledger.head()
    crashed = tmp_path / "crashed"
    _crash_copy(store, crashed)
    store.close()
    assert (crashed / "ledger.db-wal").stat().st_size > 0

    again = EvidenceStore(crashed, DEVICE_ID, signer, [bureau_identity.recipient], SystemClock())
    assert again.ledger.head() == head
    assert again.recover() == []
    again.close()
    report, problems = verify(crashed, bureau_identity)
    assert problems == [] and report.segments_ok == 7


def test_truncated_ledger_database_with_a_wal_is_refused_and_both_left_byte_identical(
        open_store, signer, bureau_identity, tmp_path):
    """Opening must not checkpoint a WAL into a damaged database (that would rewrite the evidence)."""
    store = open_store()
    _record_segments(store, 12)
    store.db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    for i in range(12, 15):
        write_segment(store, "S3", i, (2_000,))
    crashed = tmp_path / "crashed"
    _crash_copy(store, crashed)
    store.close()
    db = crashed / "ledger.db"
    db.write_bytes(db.read_bytes()[: db.stat().st_size // 2])
    before = snapshot(crashed)

    with pytest.raises(DatabaseError, match=str(db)):
        EvidenceStore(crashed, DEVICE_ID, signer, [bureau_identity.recipient], SystemClock())
    after = snapshot(crashed)
    for name in ("ledger.db", "ledger.db-wal", *(k for k in before if k.startswith("segments/"))):
        assert after[name] == before[name], name


# --- unreadable or wrong keys -----------------------------------------------------------------------


def _pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_key(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


@pytest.mark.parametrize("case, expected", [
    ("missing", "cannot read"),
    ("mode 0644", "mode 644 lets others read it; expected 0600"),
    ("garbage PEM", "not a readable unencrypted PEM private key"),
    ("password-protected", "not a readable unencrypted PEM private key"),
    ("RSA", "key type RSA; ES256 needs an ECDSA P-256"),
    ("P-384", "key type EC secp384r1; ES256 needs an ECDSA P-256"),
])
def test_unusable_identity_key_is_refused_with_a_clear_error(tmp_path, case, expected):
    path = tmp_path / "device-key.pem"
    if case == "mode 0644":
        _write_key(path, _pem(ec.generate_private_key(ec.SECP256R1())), 0o644)
    elif case == "garbage PEM":
        _write_key(path, b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    elif case == "password-protected":
        key = ec.generate_private_key(ec.SECP256R1())
        _write_key(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.BestAvailableEncryption(b"secret")))
    elif case == "RSA":
        _write_key(path, _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)))
    elif case == "P-384":
        _write_key(path, _pem(ec.generate_private_key(ec.SECP384R1())))
    with pytest.raises(IdentityKeyError) as err:
        PemFileSigner.load(path)
    assert str(path) in str(err.value) and expected in str(err.value)


def test_a_key_that_is_not_the_ledgers_key_is_refused_and_nothing_is_written(open_store, data_dir, bureau_identity,
                                                                            tmp_path):
    store = open_store()
    write_segment(store, "S4", 0)
    head = store.ledger.head()
    store.close()
    before = snapshot(data_dir)
    stranger = PemFileSigner.generate(tmp_path / "other-device.pem")

    with pytest.raises(IdentityKeyError, match="is not the key this ledger is signed with"):
        EvidenceStore(data_dir, DEVICE_ID, stranger, [bureau_identity.recipient], SystemClock())
    store = open_store()
    assert store.ledger.head() == head
    store.close()
    assert {k: v for k, v in snapshot(data_dir).items() if k.startswith("segments/")} == \
        {k: v for k, v in before.items() if k.startswith("segments/")}


# --- a full disk --------------------------------------------------------------------------------------


def _assert_full_disk_closed_truncated(store: EvidenceStore, seg: OpenSegment, kept: list[bytes],
                                       identity: Identity, earlier: str) -> None:
    store_dir = store.data_dir
    records = seg.abort("storage full")
    assert [r.fields["type"] for r in records] == ["segment", "recovery"]
    body = records[0].fields["body"]
    assert body["truncated"] and body["recovered"] and body["fragments"] == len(kept)
    assert store.row(seg.segment_id)["state"] == S.CLOSED
    plain = decrypted(store.segments_dir / body["file"], identity, truncated=True)
    assert contains_in_order(plain, kept)
    report, problems = verify(store_dir, identity)
    assert problems == [] and report.segments_truncated == 1
    assert segment_record(store, earlier)["truncated"] is False


def test_disk_full_during_a_fragment_raises_storage_full_and_keeps_everything_before(data_dir, signer,
                                                                                    bureau_identity):
    """ENOSPC in the middle of a fragment (hw_sim quota, no ledger reserve so the write really fails)."""
    sim = SimStorage(data_dir)
    store = EvidenceStore(data_dir, DEVICE_ID, signer, [bureau_identity.recipient], SystemClock(), fs=sim,
                          reserve_bytes=0)
    write_segment(store, "S5", 0)
    seg = store.open_segment("S5", 1)
    kept = write_fragments(seg, [50_000, 120_000])
    sim.set_quota(sim.used_bytes() + 100_000)
    size_before = seg.writer.part_path.stat().st_size

    with pytest.raises(StorageFullError, match="No space left on device"):
        write_fragments(seg, [300_000])
    assert sim.enospc_count >= 1 and sim.free_bytes() == 0
    assert seg.writer.part_path.stat().st_size == size_before + 100_000  # the part that fitted
    with pytest.raises(Exception, match="failed earlier"):
        write_fragments(seg, [10])
    _assert_full_disk_closed_truncated(store, seg, kept, bureau_identity, "S5-0000")

    # Space comes back (receipted footage purged, say): recording goes on in the same ledger.
    sim.set_quota(None)
    write_segment(store, "S5", 2)
    store.close()
    report, problems = verify(data_dir, bureau_identity)
    assert problems == [] and report.segments_ok == 3


def test_fragment_that_would_eat_the_ledger_reserve_is_refused_before_a_byte_is_written(data_dir, signer,
                                                                                        bureau_identity):
    sim = SimStorage(data_dir)
    store = EvidenceStore(data_dir, DEVICE_ID, signer, [bureau_identity.recipient], SystemClock(), fs=sim)
    write_segment(store, "S6", 0)
    seg = store.open_segment("S6", 1)
    kept = write_fragments(seg, [40_000])
    sim.set_quota(sim.used_bytes() + store.reserve_bytes + 200_000)
    size_before = seg.writer.part_path.stat().st_size

    with pytest.raises(StorageFullError, match="kept free for the ledger"):
        write_fragments(seg, [250_000])
    assert seg.writer.part_path.stat().st_size == size_before and sim.enospc_count == 0
    _assert_full_disk_closed_truncated(store, seg, kept, bureau_identity, "S6-0000")
    sim.fill(10**9)
    assert store.space(bitrate_bps=4_000_000).free_bytes == 0
    sim.release()
    store.close()


def test_simulated_io_error_is_a_storage_error_naming_the_file(data_dir, signer, bureau_identity):
    sim = SimStorage(data_dir)
    store = EvidenceStore(data_dir, DEVICE_ID, signer, [bureau_identity.recipient], SystemClock(), fs=sim)
    seg = store.open_segment("S7", 0)
    kept = write_fragments(seg, [30_000])
    sim.fail_next("sync", errno.EIO)
    with pytest.raises(Exception, match=r"S7-0000\.age\.part: Input/output error") as err:
        write_fragments(seg, [30_000])
    assert not isinstance(err.value, StorageFullError)
    seg.abort("I/O error")
    assert contains_in_order(decrypted(store.segment_path("S7-0000"), bureau_identity, True), kept)
    store.close()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 6 MiB tmpfs: the kernel's own ENOSPC, for segment files and SQLite alike."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m,mode=0700", "tmpfs", str(mnt)],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot run mount: {exc}")
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs not permitted here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def _record_until_full(store: EvidenceStore, session: str) -> tuple[OpenSegment, list[bytes], StorageFullError]:
    seg = store.open_segment(session, 1)
    kept: list[bytes] = []
    for _ in range(100):
        frag = os.urandom(250_000)
        try:
            seg.write_fragment(frag)
        except StorageFullError as exc:
            return seg, kept, exc
        kept.append(frag)
    raise AssertionError("a 6 MiB tmpfs never filled up")


def test_real_full_tmpfs_with_ledger_reserve_closes_the_segment_cleanly(small_tmpfs, signer, bureau_identity):
    data_dir = small_tmpfs / "device"
    store = EvidenceStore(data_dir, DEVICE_ID, signer, [bureau_identity.recipient], SystemClock())
    write_segment(store, "S8", 0)
    seg, kept, exc = _record_until_full(store, "S8")
    assert "kept free for the ledger" in str(exc) and kept
    _assert_full_disk_closed_truncated(store, seg, kept, bureau_identity, "S8-0000")
    store.close()


def test_real_full_tmpfs_without_reserve_loses_nothing_even_when_sqlite_is_full(small_tmpfs, signer,
                                                                               bureau_identity):
    """Without the reserve the kernel's ENOSPC hits the segment, and SQLite may be unable to commit the
    truncated close too. Then abort() says so (StorageFullError naming the segment); the footage stays on
    disk; once space is back, recovery writes the record and everything verifies."""
    data_dir = small_tmpfs / "device"
    store = EvidenceStore(data_dir, DEVICE_ID, signer, [bureau_identity.recipient], SystemClock(), reserve_bytes=0)
    write_segment(store, "S9", 0)
    seg, kept, exc = _record_until_full(store, "S9")
    assert "No space left on device" in str(exc)
    try:
        seg.abort("storage full")
        recorded_at_once = True
    except StorageFullError as full:
        assert "S9-0001" in str(full) and "record could not be written" in str(full)
        recorded_at_once = False
    store.close()
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_tmpfs)], check=True, timeout=30)

    store = EvidenceStore(data_dir, DEVICE_ID, signer, [bureau_identity.recipient], SystemClock())
    store.recover()
    body = segment_record(store, "S9-0001")
    assert body["truncated"] and body["recovered"]
    assert contains_in_order(decrypted(store.segment_path("S9-0001"), bureau_identity, True), kept)
    store.close()
    report, problems = verify(data_dir, bureau_identity)
    assert problems == [] and report.segments_ok == 2, (recorded_at_once, problems)


# --- purges and state transitions -------------------------------------------------------------------


def test_purge_of_a_segment_without_a_verified_receipt_is_refused(store):
    write_segment(store, "SP", 0)
    path = store.segment_path("SP-0000")
    content = path.read_bytes()
    head = store.ledger.head()
    for state in (S.CLOSED, S.QUEUED, S.UPLOADING, S.UPLOADED):
        if state != S.CLOSED:
            store.transition("SP-0000", state)
        with pytest.raises(PurgeRefused, match=f"SP-0000 is {state} without a verified receipt"):
            store.purge("SP-0000")
        assert path.read_bytes() == content and store.row("SP-0000")["state"] == state
    assert store.ledger.head() == head
    assert store.purge_for_space(10**15) == [] and path.exists()


@pytest.mark.parametrize("path_to, illegal", [
    ([], S.UPLOADING),  # a closed segment must be queued before it can be uploading
    ([], S.UPLOADED),
    ([], S.RECEIPTED),  # only record_receipt() with a verified receipt
    ([], S.PURGED),  # only purge()
    ([], S.OPEN),  # a closed file never reopens
    ([S.QUEUED, S.UPLOADING, S.UPLOADED], S.CLOSED),
    ([S.QUEUED, S.UPLOADING, S.REJECTED], S.UPLOADED),
    ([S.QUEUED], S.RECEIPTED),
])
def test_illegal_segment_transitions_are_refused_and_change_nothing(store, path_to, illegal):
    write_segment(store, "ST", 0)
    for state in path_to:
        store.transition("ST-0000", state)
    current = store.row("ST-0000")["state"]
    transitions = store.db.query_rows("SELECT COUNT(*) FROM transitions")[0][0]
    with pytest.raises(StateError, match=f"ST-0000: {current} -> {illegal} is not allowed"):
        store.transition("ST-0000", illegal)
    assert store.row("ST-0000")["state"] == current
    assert store.db.query_rows("SELECT COUNT(*) FROM transitions")[0][0] == transitions


def test_transitions_of_an_open_or_unknown_segment_are_refused(store):
    seg = store.open_segment("SU", 0)
    with pytest.raises(StateError, match="SU-0000: OPEN -> QUEUED is not allowed"):
        store.transition("SU-0000", S.QUEUED)
    with pytest.raises(StateError, match="unknown segment 'NOPE-0000'"):
        store.transition("NOPE-0000", S.QUEUED)
    with pytest.raises(PurgeRefused):
        store.purge("SU-0000")
    seg.close()


# --- untrusted time ---------------------------------------------------------------------------------


def test_records_made_under_an_unset_clock_say_so_and_are_never_rewritten_by_a_later_sync(data_dir, signer,
                                                                                           bureau_identity):
    """A board that booted without a time source records anyway, flagging each record `unset`; the sync
    that follows changes later records only (DESIGN.md "Time"; R5)."""
    clock = SimClock()
    clock.set_unset()
    store = EvidenceStore(data_dir, DEVICE_ID, signer, [bureau_identity.recipient], clock)
    write_segment(store, "SC", 0)
    early = [r.data for r in store.ledger.records()]
    clock.advance(5_000_000)
    clock.mark_synced("bureau", wall_us=1_767_261_600_000_000)
    write_segment(store, "SC", 1)
    records = [r.fields for r in store.ledger.records()]
    store.close()

    reopened = EvidenceStore(data_dir, DEVICE_ID, signer, [bureau_identity.recipient], clock)
    assert [r.data for r in reopened.ledger.records()][: len(early)] == early
    reopened.close()
    first, last = records[1], records[-1]
    assert first["clock"] == {"source": "sim", "quality": "unset"} and first["wall_us"] < 1_000_000_000_000_000
    assert last["clock"] == {"source": "bureau", "quality": "synced"} and last["wall_us"] == 1_767_261_600_000_000
    assert last["mono_us"] - first["mono_us"] == 5_000_000  # the monotonic clock never jumped
    report, problems = verify(data_dir, bureau_identity)
    assert problems == [] and report.segments_ok == 2
