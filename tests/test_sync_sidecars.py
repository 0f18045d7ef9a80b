"""Sidecars travel with their segment (docs/FORMAT.md §10.5, docs/PROTOCOL.md "Uploads"; R20, R22, R23).

A segment whose signed record names an encrypted GPS track is uploaded with that track, against the
real reference bureau on 127.0.0.1: the bureau checks the track against the record, stores it beside
the segment, and receipts the segment only when it holds both, so the bureau's copy verifies (S8) and a
purge after the receipt may remove both. The tracks are sealed by the real GpsTrackRecorder.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

import pytest
from cryptography import x509

from agent.capture.gps import GpsFix, GpsTrackRecorder
from agent.evidence.age import Identity
from agent.evidence.verify import Verifier
from agent.storage.segment_writer import FragmentInfo
from agent.storage.store import EvidenceStore, PurgeRefused, SegmentState
from bureau.testing import running_bureau
from tests.test_bureau_uploads import create, patch, path_of, receipts, verify_receipt
from tests.test_sync import Rig

S = SegmentState
SEGMENT_US = 2_000_000


def fix_at(mono_us: int, n: int) -> GpsFix:
    return GpsFix(mono_us=mono_us, utc_us=1_750_000_000_000_000 + mono_us, lat_ude=48_858_370 + n,
                  lon_ude=2_294_481 - n, alt_mm=35_000, quality=1, sats=9, hdop_centi=90, speed_mmps=1_400,
                  course_cdeg=27_000)


def record_with_tracks(store: EvidenceStore, session: str, count: int, points: int = 3,
                       fragment_bytes: int = 60_000) -> list[dict]:
    """`count` closed segments of 2 s, each with the GPS track of its span as a sidecar; their records' bodies."""
    track = GpsTrackRecorder()
    bodies = []
    for i in range(count):
        start = i * SEGMENT_US
        seg = store.open_segment(session, i)
        for f in range(2):
            seg.write_fragment(os.urandom(fragment_bytes),
                               FragmentInfo(30, 48_000, start + f * 1_000_000, start + f * 1_000_000 + 966_667))
        for n in range(points):
            track.add(fix_at(start + n * (SEGMENT_US // points), n))
        sidecars = track.sidecar_for(seg.segment_id, start, start + SEGMENT_US, store.segments_dir, store.recipients,
                                     store.fs)
        bodies.append(seg.close(sidecars=sidecars).fields["body"])
    assert all(len(b["sidecars"]) == 1 for b in bodies)
    return bodies


@pytest.fixture
def bureau(tmp_path):
    with running_bureau(tmp_path / "bureau") as server:
        yield server


@pytest.fixture
def rig(bureau, tmp_path):
    made = Rig(tmp_path, bureau.port, tmp_path / "bureau", device_id="BWC-SIDE-01")
    yield made
    made.dev.close()


def bureau_copy(rig: Rig) -> Path:
    return rig.bureau_dir / "store" / rig.dev.device_id


def verify(rig: Rig, root: Path):
    identity = Identity.load(rig.bureau_dir / "keys" / "bureau-identity.txt")
    device_key = x509.load_pem_x509_certificate(rig.dev.enrolled.cert_file.read_bytes()).public_key()
    return Verifier(identity, pinned_key=device_key).verify_path(root)


def status(rig: Rig, segment_id: str) -> dict:
    return receipts(rig.dev, segment_id)[segment_id]


def stop_when(condition):
    """should_stop/on_progress pair: the sync stops at the first progress report where `condition` holds."""
    stop = {"now": False}

    def on_progress(p) -> None:
        stop["now"] = stop["now"] or condition(p)

    return (lambda: stop["now"]), on_progress


# --- the whole path ------------------------------------------------------------------------------------


def test_a_session_with_gps_tracks_syncs_and_the_bureau_copy_verifies_every_track(rig):
    bodies = record_with_tracks(rig.dev.store, "SGPS-aaaa", 2)
    progress = []
    result = rig.syncer(on_progress=lambda p: progress.append(p.as_dict(0))).sync_once()
    assert result.error is None and result.uploaded == [b["segment_id"] for b in bodies]
    assert set(rig.states().values()) == {S.RECEIPTED}
    # Progress counts the tracks' bytes with the footage.
    total = sum(b["size"] + b["sidecars"][0]["size"] for b in bodies)
    assert progress[-1]["queued_bytes"] == progress[-1]["done_bytes"] == total
    # Each track sits beside its segment in the bureau's store, byte for byte.
    for body in bodies:
        for name in (body["file"], body["sidecars"][0]["file"]):
            assert (bureau_copy(rig) / "segments" / name).read_bytes() == \
                (rig.dev.store.segments_dir / name).read_bytes()
    report = verify(rig, bureau_copy(rig))
    assert report.problems == [] and report.ok
    assert report.sidecars == report.sidecars_ok == 2 and report.decrypted == 4  # 2 segments, 2 tracks


def test_the_receipt_arrives_only_after_the_segments_track_is_committed(rig):
    (body,) = record_with_tracks(rig.dev.store, "SORD-bbbb", 1)
    sid, track = body["segment_id"], body["sidecars"][0]
    should_stop, on_progress = stop_when(lambda p: p.done_bytes >= body["size"])  # the footage is all there
    first = rig.syncer(should_stop=should_stop, on_progress=on_progress).sync_once()
    assert first.interrupted and first.receipted == [] and rig.states() == {sid: S.QUEUED}
    waiting = status(rig, sid)
    assert waiting["status"] == "awaiting_sidecar" and "receipt" not in waiting and track["file"] in waiting["detail"]
    assert waiting["sidecars"] == [{"sidecar": "gps_track", "file": track["file"], "status": "not_uploaded"}]
    assert (bureau_copy(rig) / "segments" / body["file"]).exists()  # stored, not yet acknowledged

    second = rig.syncer().sync_once()
    assert second.error is None and second.receipted == [sid] and rig.states() == {sid: S.RECEIPTED}
    assert status(rig, sid)["status"] == "receipted"


def test_an_upload_interrupted_mid_track_resumes_from_the_bureaus_offset(rig):
    (body,) = record_with_tracks(rig.dev.store, "SRES-cccc", 1, points=600)  # a track of several requests
    sid, track = body["segment_id"], body["sidecars"][0]
    request = 16 * 1024
    assert track["size"] > 3 * request
    should_stop, on_progress = stop_when(lambda p: p.done_bytes > body["size"])  # one request of the track in
    first = rig.syncer(request_bytes=request, should_stop=should_stop, on_progress=on_progress)
    assert first.sync_once().interrupted and rig.states() == {sid: S.QUEUED}
    (part,) = status(rig, sid)["sidecars"]
    assert part["status"] == "uploading" and part["offset"] == request and part["length"] == track["size"]
    # The upload URLs are persisted, the segment's by its id and the track's by its file name.
    keys = {r[0] for r in rig.dev.store.db.query_rows("SELECT segment_id FROM uploads")}
    assert keys == {sid, track["file"]}

    second = rig.syncer(request_bytes=request)
    assert second.sync_once().receipted == [sid]
    resent = first.tus.bytes_sent + second.tus.bytes_sent - body["size"] - track["size"]
    assert resent == 0  # every request was acknowledged before the stop: nothing is sent twice
    assert verify(rig, bureau_copy(rig)).ok


# --- what the bureau refuses ------------------------------------------------------------------------------


def test_a_track_whose_bytes_differ_from_its_record_is_refused_and_no_receipt_is_issued(rig):
    (body,) = record_with_tracks(rig.dev.store, "SBAD-dddd", 1)
    sid, track = body["segment_id"], body["sidecars"][0]
    path = rig.dev.store.segments_dir / track["file"]
    damaged = bytearray(path.read_bytes())
    damaged[-1] ^= 1  # same size, other bytes: not what the record vouches for
    path.write_bytes(bytes(damaged))

    result = rig.syncer().sync_once()
    assert result.receipted == [] and result.rejected == [sid] and rig.states() == {sid: S.REJECTED}
    refused = status(rig, sid)
    assert refused["status"] == "rejected" and "receipt" not in refused
    assert track["file"] in refused["detail"] and "SHA-256" in refused["detail"]
    alarms = [r.fields["body"] for r in rig.dev.store.ledger.records(rtype="alarm")]
    assert [a["code"] for a in alarms] == ["segment_rejected"]
    assert not (bureau_copy(rig) / "segments" / track["file"]).exists()
    with pytest.raises(PurgeRefused):
        rig.dev.store.purge(sid)


def test_track_uploads_that_contradict_the_signed_record_are_refused_at_creation(rig):
    (body,) = record_with_tracks(rig.dev.store, "SMIS-eeee", 1)
    track = body["sidecars"][0]
    assert rig.syncer().upload_ledger() > 0
    dev = rig.dev

    def create_track(**meta):
        meta = {"sidecar": "gps_track", "sha256_cipher": track["sha256_cipher"], **meta}
        return create(dev, {**body, "size": meta.pop("size", track["size"])}, **meta)

    cases = {
        "wrong hash": (create_track(sha256_cipher="ab" * 32), 422, "record_mismatch"),
        "wrong length": (create_track(size=track["size"] + 1), 422, "record_mismatch"),
        "kind the record does not name": (create_track(sidecar="context"), 422, "record_mismatch"),
        "no such kind": (create_track(sidecar="audio_notes"), 400, "bad_metadata"),
    }
    for case, (reply, code, error) in cases.items():
        assert (reply.status, reply.json()["error"]) == (code, error), case
    assert path_of(create_track())  # the right declaration is accepted
    assert status(rig, body["segment_id"])["status"] == "not_uploaded"


def test_the_receipt_follows_the_last_part_whatever_the_order_the_parts_arrive_in(rig):
    (body,) = record_with_tracks(rig.dev.store, "SANY-llll", 1)
    sid, track = body["segment_id"], body["sidecars"][0]
    dev, folder = rig.dev, rig.dev.store.segments_dir
    track_upload = path_of(create(dev, {**body, "size": track["size"]}, sidecar="gps_track",
                                  sha256_cipher=track["sha256_cipher"]))  # before the ledger, even
    reply = patch(dev, track_upload, 0, (folder / track["file"]).read_bytes())
    assert reply.headers["bwc-upload-state"] == "awaiting_ledger"
    rig.syncer().upload_ledger()
    assert status(rig, sid)["status"] == "not_uploaded"  # the track is committed; the footage is not here
    assert (bureau_copy(rig) / "segments" / track["file"]).exists()
    reply = patch(dev, path_of(create(dev, body)), 0, (folder / body["file"]).read_bytes())
    assert reply.headers["bwc-upload-state"] == "committed"  # the last part: the receipt is issued now
    verified = verify_receipt(dev, body, status(rig, sid))
    assert verified.fields["record_hash"] == next(dev.store.ledger.records(rtype="segment")).hash


def test_a_segment_the_bureau_holds_without_its_track_is_queued_again_and_completed(rig):
    (body,) = record_with_tracks(rig.dev.store, "SOLD-ffff", 1)
    sid = body["segment_id"]
    syncer = rig.syncer()
    syncer.upload_ledger()
    segment_part = syncer.upload_parts(rig.dev.store.row(sid))[0]
    syncer.tus.upload(rig.dev.store.segments_dir / body["file"], segment_part.metadata)  # as an older agent did
    for state in (S.QUEUED, S.UPLOADING, S.UPLOADED):
        rig.dev.store.transition(sid, state)

    first = rig.syncer().sync_once()
    assert first.receipted == [] and rig.states() == {sid: S.QUEUED}
    assert rig.syncer().sync_once().receipted == [sid]


def test_a_track_missing_on_the_device_raises_an_alarm_and_the_segment_waits(rig):
    (body,) = record_with_tracks(rig.dev.store, "SGON-gggg", 1)
    sid, track = body["segment_id"], body["sidecars"][0]
    (rig.dev.store.segments_dir / track["file"]).unlink()  # a damaged data directory

    result = rig.syncer().sync_once()
    assert result.error is None and result.uploaded == [] and rig.states() == {sid: S.QUEUED}
    (alarm,) = [r.fields["body"] for r in rig.dev.store.ledger.records(rtype="alarm")]
    assert alarm["code"] == "sidecar_missing" and track["file"] in alarm["detail"]
    waiting = status(rig, sid)
    assert waiting["status"] == "awaiting_sidecar" and waiting["sidecars"][0]["status"] == "not_uploaded"


# --- purge ------------------------------------------------------------------------------------------------


def test_purge_after_the_receipt_removes_segment_and_track_and_the_purged_data_dir_verifies(rig):
    bodies = record_with_tracks(rig.dev.store, "SPUR-hhhh", 2)
    assert rig.syncer().sync_once().error is None
    store = rig.dev.store
    store.purge(bodies[0]["segment_id"])
    (purge,) = [r.fields["body"] for r in store.ledger.records(rtype="purge")]
    assert (purge["file"], purge["sha256_cipher"]) == (bodies[0]["file"], bodies[0]["sha256_cipher"])
    assert sorted(p.name for p in store.segments_dir.iterdir()) == \
        sorted([bodies[1]["file"], bodies[1]["sidecars"][0]["file"]])
    report = verify(rig, store.data_dir)
    assert report.problems == [] and report.ok
    assert report.segments_purged == 1 and report.sidecars_ok == 1
    # The purge record reaches the bureau, whose copy keeps both files and still verifies.
    assert rig.syncer().sync_once().error is None
    assert verify(rig, bureau_copy(rig)).ok


def test_purge_leaves_a_track_that_is_no_longer_the_recorded_bytes(rig):
    (body,) = record_with_tracks(rig.dev.store, "SKEP-iiii", 1)
    assert rig.syncer().sync_once().receipted == [body["segment_id"]]
    store = rig.dev.store
    path = store.segments_dir / body["sidecars"][0]["file"]
    changed = bytearray(path.read_bytes())
    changed[0] ^= 1
    path.write_bytes(bytes(changed))
    store.purge(body["segment_id"])
    assert not (store.segments_dir / body["file"]).exists() and path.read_bytes() == bytes(changed)
    report = verify(rig, store.data_dir)
    assert [p.where for p in report.problems] == [f"segments/{path.name}"]  # S8 reports it; nothing hid it


# --- an older bureau database ------------------------------------------------------------------------


def test_a_version_1_bureau_database_learns_the_tracks_of_records_it_already_holds(tmp_path):
    bureau_dir = tmp_path / "bureau"
    with running_bureau(bureau_dir) as server:
        rig = Rig(tmp_path, server.port, bureau_dir, device_id="BWC-SIDE-02")
        (body,) = record_with_tracks(rig.dev.store, "SMIG-jjjj", 1)
        rig.syncer().upload_ledger()
    with sqlite3.connect(bureau_dir / "bureau.db") as conn:  # as the schema before sidecars left it
        conn.execute("DROP TABLE segment_sidecars")
        conn.execute("ALTER TABLE uploads DROP COLUMN sidecar")
        conn.execute("PRAGMA user_version=1")
    conn.close()
    with running_bureau(bureau_dir) as server:
        rig.port = server.port
        result = rig.syncer(port=server.port).sync_once()
        assert result.error is None and result.receipted == [body["segment_id"]]
        track = body["sidecars"][0]
        stored = bureau_dir / "store" / rig.dev.device_id / "segments" / track["file"]
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == track["sha256_cipher"]
    rig.dev.close()

