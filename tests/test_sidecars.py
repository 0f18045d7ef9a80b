"""A segment's GPS track reaches its segment record (docs/FORMAT.md §10.5; R23: the track is only on the
device encrypted, and the signed record carries its hash; R5/R22: it is verified like the footage).

The GPS track comes from the real receiver reading real NMEA from the simulated GPS over a pty, stamped
on a clock the test steps in line with the media timestamps; the footage is real H.264/AAC through the
capture pipeline. Everything is asserted on records and files, decrypted with the bureau identity.
Also here: the store fixes that travel with sidecars (the recipients a segment's file was opened for,
and the migration that adds that column to an older database).
"""

from __future__ import annotations

import hashlib
import io
import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.capture.gps import GpsReceiver, GpsTrackRecorder, TrackPoint, parse_track
from agent.capture.pipeline import CapturePipeline, IgnoreEvents, PipelineConfig, SegmentClosed, SidecarFailed
from agent.clock import SystemClock
from agent.evidence.age import AgeDecryptor, Identity
from agent.evidence.verify import Verifier
from agent.storage.segment_writer import FragmentInfo
from agent.storage.store import EvidenceStore, SidecarError
from hw_sim.serial_devices import GpsTruth, SimulatedGps
from hw_sim.storage import SimStorage
from tests.conftest import DEVICE_ID
from tests.media_gen import T0_US, arrival_order, make_media

WAIT = 5.0
SECONDS = 6  # of footage: three 2 s segments, one GPS epoch per second in the middle of each second


@dataclass
class SteppedClock:
    """The device's monotonic clock as the test sets it (the GPS reader and the track read it)."""

    now_us: int = T0_US

    def __call__(self) -> int:
        return self.now_us


@dataclass
class Events(IgnoreEvents):
    closed: list[SegmentClosed] = field(default_factory=list)
    sidecar_failures: list[SidecarFailed] = field(default_factory=list)
    faults: list = field(default_factory=list)

    def segment_closed(self, event):
        self.closed.append(event)

    def sidecar_failed(self, event):
        self.sidecar_failures.append(event)

    def fault(self, event):
        self.faults.append(event)


@dataclass
class Shift:
    store: EvidenceStore
    pipeline: CapturePipeline
    events: Events
    truths: list[tuple[int, GpsTruth]]  # (device monotonic time it was read, what the receiver reported)


def record_shift(store: EvidenceStore, tmp_path: Path, provider_wrapper=None) -> Shift:
    """Record SECONDS of footage in 2 s segments while the simulated GPS reports once a second; the fix is
    lost in second 3. Each second: the GPS epoch is read (clock at its middle), then its packets are fed."""
    media = make_media(SECONDS)
    packets = arrival_order(media)
    clock = SteppedClock()
    track = GpsTrackRecorder(mono_us=clock)
    provider = track.sidecar_provider(store.segments_dir, store.recipients, store.fs)
    events = Events()
    pipeline = CapturePipeline(store, media.video_params, media.audio_params,
                               PipelineConfig(segment_seconds=2.0, pre_event_seconds=0), events,
                               sidecar_provider=provider_wrapper(provider) if provider_wrapper else provider)
    truths = []
    with SimulatedGps(tmp_path / "tty") as gps:
        receiver = GpsReceiver(gps.device_port, on_fix=track.add, mono_us=clock, reopen_backoff_s=(0.05, 0.2))
        receiver.start()
        try:
            assert receiver.wait_for(lambda s, _f: s.opens >= 1, WAIT)
            pipeline.start()
            pipeline.start_session("S-GPS", at_us=media.video[0].pts_us)
            for second in range(SECONDS):
                clock.now_us = T0_US + second * 1_000_000 + 500_000
                gps.set_fix(second != 3)
                used = receiver.stats().used
                truths.append((clock.now_us, gps.emit_epoch()))
                assert receiver.wait_for(lambda s, _f, used=used: s.used >= used + 2, WAIT)
                end = T0_US + (second + 1) * 1_000_000
                for packet in packets:
                    if end - 1_000_000 <= packet.pts_us < end:
                        assert pipeline.submit(packet)
                assert pipeline.flush(WAIT)
            pipeline.stop_session()
            assert pipeline.close(WAIT * 2)
        finally:
            receiver.stop()
    return Shift(store, pipeline, events, truths)


def segment_bodies(store: EvidenceStore) -> list[dict]:
    return [r.fields["body"] for r in store.ledger.records(rtype="segment")]


def decrypt_track(store: EvidenceStore, identity: Identity, name: str) -> tuple[dict, list[TrackPoint]]:
    data = (store.segments_dir / name).read_bytes()
    return parse_track(b"".join(AgeDecryptor(identity).chunks(io.BytesIO(data))))


def expected_points(truths: list[tuple[int, GpsTruth]], start_us: int, end_us: int) -> list[tuple]:
    """(time, fix?, lat, lon) of what the receiver reported in [start, end): a lost fix is one point, at
    the epoch that lost it."""
    return [(at, t.fix, t.lat_ude if t.fix else None, t.lon_ude if t.fix else None)
            for at, t in truths if start_us <= at < end_us]


# --- a session recorded with a GPS track ------------------------------------------------------------


def test_every_segment_closed_in_a_session_names_its_encrypted_gps_track(store, bureau_identity, tmp_path):
    shift = record_shift(store, tmp_path)
    bodies = segment_bodies(store)
    assert [b["index"] for b in bodies] == [0, 1, 2] and all(not b["recovered"] for b in bodies)
    for body in bodies:
        (sidecar,) = body["sidecars"]
        data = (store.segments_dir / sidecar["file"]).read_bytes()
        assert sidecar == {"kind": "gps_track", "file": f"{body['segment_id']}.gps.age", "size": len(data),
                           "sha256_cipher": hashlib.sha256(data).hexdigest()}
        assert data.startswith(b"age-encryption.org/v1\n") and b"lat_ude" not in data  # never in clear (R23)
    assert [e.record.fields["body"] for e in shift.events.closed] == bodies
    assert shift.pipeline.stats().sidecar_failures == 0 and shift.events.faults == []


def test_each_track_holds_exactly_the_points_of_its_segments_time_span(store, bureau_identity, tmp_path):
    shift = record_shift(store, tmp_path)
    bodies = segment_bodies(store)
    spans = []
    for body in bodies:
        header, points = decrypt_track(store, bureau_identity, body["sidecars"][0]["file"])
        assert header["segment_id"] == body["segment_id"] and header["from_mono_us"] == body["first_pts_us"]
        assert header["to_mono_us"] > body["last_pts_us"]
        spans.append((header["from_mono_us"], header["to_mono_us"]))
        assert [(p.mono_us, p.fix, p.lat_ude, p.lon_ude) for p in points] == \
            expected_points(shift.truths, *spans[-1])
    # Consecutive spans meet: every point the receiver gave during the session is in exactly one track.
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert sum(len(decrypt_track(store, bureau_identity, b["sidecars"][0]["file"])[1]) for b in bodies) == SECONDS
    middle = decrypt_track(store, bureau_identity, bodies[1]["sidecars"][0]["file"])[1]
    assert [p.fix for p in middle] == [True, False]  # the loss of fix in second 3 is in the track


def test_the_bureau_verifier_checks_and_decrypts_every_gps_track(store, bureau_identity, tmp_path):
    record_shift(store, tmp_path)
    report = Verifier(identity=bureau_identity).verify_path(store.data_dir)
    assert report.problems == [] and report.ok
    assert report.sidecars == report.sidecars_ok == 3 and report.decrypted == 6  # 3 segments, 3 tracks
    assert store.recover() == []  # the tracks are named by their records: nothing for recovery to add

    name = segment_bodies(store)[1]["sidecars"][0]["file"]
    path = store.segments_dir / name
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    report = Verifier(identity=bureau_identity).verify_path(store.data_dir)
    assert [str(p) for p in report.problems] == [
        f"segments/{name}: sidecar size or SHA-256 differs from its segment record (record seq 3 (segment))"]


# --- a GPS problem never costs footage ------------------------------------------------------------------


def test_a_failing_sidecar_provider_does_not_stop_recording(store, bureau_identity, tmp_path):
    def failing_for_the_middle_segment(provider):
        def provide(segment_id, first_pts_us, end_pts_us):
            if segment_id.endswith("-0001"):
                raise OSError(5, "Input/output error", "gps track")
            return provider(segment_id, first_pts_us, end_pts_us)
        return provide

    shift = record_shift(store, tmp_path, failing_for_the_middle_segment)
    bodies = segment_bodies(store)
    assert [len(b["sidecars"]) for b in bodies] == [1, 0, 1]
    assert sum(b["video_frames"] for b in bodies) == SECONDS * 30 and all(not b["truncated"] for b in bodies)
    (failure,) = shift.events.sidecar_failures
    assert failure.segment_id == bodies[1]["segment_id"] and isinstance(failure.error, OSError)
    assert shift.pipeline.stats().sidecar_failures == 1 and shift.events.faults == []
    report = Verifier(identity=bureau_identity).verify_path(store.data_dir)
    assert report.problems == [] and report.sidecars_ok == 2


def test_a_sidecar_entry_the_store_refuses_leaves_the_segment_closed_without_it(store, bureau_identity, tmp_path):
    def lying_about_the_hash(provider):
        def provide(segment_id, first_pts_us, end_pts_us):
            return [dict(entry, sha256_cipher="0" * 64) for entry in provider(segment_id, first_pts_us, end_pts_us)]
        return provide

    shift = record_shift(store, tmp_path, lying_about_the_hash)
    assert [b["sidecars"] for b in segment_bodies(store)] == [[], [], []]
    assert len(shift.events.sidecar_failures) == 3
    assert all(isinstance(f.error, SidecarError) for f in shift.events.sidecar_failures)
    # The files stay (nothing is deleted) and are accounted for once, as sidecars no record names.
    details = sorted(r.fields["body"]["detail"] for r in store.recover())
    assert details == [f"S-GPS-000{i}.gps.age: sidecar named by no record; left in place" for i in range(3)]
    assert store.recover() == []


def test_close_refuses_a_sidecar_that_is_not_the_file_on_disk_and_then_closes_without_it(store, bureau_identity):
    track = GpsTrackRecorder()
    track.add(None, mono_us=500_000)
    seg = store.open_segment("SR", 0)
    seg.write_fragment(b"\x00" * 1000, FragmentInfo(30, 48_000, 0, 966_667))
    (entry,) = track.sidecar_for("SR-0000", 0, 1_000_000, store.segments_dir, store.recipients)
    refused = {
        "misnamed": [dict(entry, file="SR-0001.gps.age")],
        "size differs": [dict(entry, size=entry["size"] + 1)],
        "twice": [entry, entry],
        "not a sidecar": [{"kind": "gps_track"}],
        "absent": [dict(entry, kind="context", file="SR-0000.context.age")],
    }
    for case, sidecars in refused.items():
        with pytest.raises(SidecarError, match="SR-0000"):
            seg.close(sidecars=sidecars)
        assert store.row("SR-0000")["state"] == "OPEN", case
    record = seg.close()
    assert record.fields["body"]["sidecars"] == [] and not record.fields["body"]["recovered"]


# --- crash recovery ---------------------------------------------------------------------------------------


class PowerCut(BaseException):
    """The simulated power cut: nothing after it runs (not an Exception, so nothing catches it)."""


def _raise_power_cut() -> None:
    raise PowerCut


@pytest.mark.parametrize("cut", ["while recording", "in the close, mid-rename"])
def test_recovery_after_a_crash_lists_the_finished_track_once(data_dir, signer, bureau_identity, cut):
    def open_store() -> EvidenceStore:
        storage = SimStorage(data_dir, power_cut=_raise_power_cut)
        return EvidenceStore(data_dir, DEVICE_ID, signer, [bureau_identity.recipient], SystemClock(), fs=storage)

    store = open_store()
    track = GpsTrackRecorder()
    for second in range(3):
        track.add(None, mono_us=second * 1_000_000 + 100)
    seg = store.open_segment("SX", 0)
    seg.write_fragment(b"\x01" * 70_000, FragmentInfo(30, 48_000, 0, 966_667))
    sidecars = track.sidecar_for("SX-0000", 0, 2_000_000, store.segments_dir, store.recipients, store.fs)
    if cut == "while recording":
        seg.writer.abandon()
    else:
        store.fs.cut_power_at("rename")  # the segment's own rename: linked to its final name, .part still there
        with pytest.raises(PowerCut):
            seg.close(sidecars=sidecars)
    store.close()

    store = open_store()
    first = store.recover()
    assert [r.fields["type"] for r in first] == ["segment", "recovery"]
    body = first[0].fields["body"]
    assert body["sidecars"] == sidecars and body["recovered"]
    assert body["truncated"] == (cut == "while recording")
    store.close()
    store = open_store()
    assert store.recover() == []
    store.close()
    report = Verifier(identity=bureau_identity).verify_path(data_dir)
    assert report.problems == [] and report.sidecars == report.sidecars_ok == 1
    _, points = decrypt_track(store, bureau_identity, sidecars[0]["file"])
    assert [p.mono_us for p in points] == [100, 1_000_100]


# --- the recipients a segment's file was opened for -----------------------------------------------------


def test_a_segment_closed_by_recovery_after_a_recipients_change_records_the_recipients_of_its_file(
        data_dir, signer, bureau_identity):
    old = bureau_identity
    new = Identity.generate()
    store = EvidenceStore(data_dir, DEVICE_ID, signer, [old.recipient], SystemClock())
    seg = store.open_segment("SK", 0)
    seg.write_fragment(b"\x02" * 70_000, FragmentInfo(30, 48_000, 0, 966_667))
    seg.writer.abandon()  # power cut while recording
    store.close()

    store = EvidenceStore(data_dir, DEVICE_ID, signer, [new.recipient], SystemClock())  # re-provisioned
    (record, _note) = store.recover()
    assert record.fields["body"]["recipients"] == [old.recipient.key_id]
    later = store.open_segment("SK", 1)
    later.write_fragment(b"\x03" * 1000, FragmentInfo(30, 48_000, 1_000_000, 1_966_667))
    assert later.close().fields["body"]["recipients"] == [new.recipient.key_id]
    store.close()
    report = Verifier(identity=old).verify_path(data_dir)
    assert [str(p) for p in report.problems if "SK-0000" in p.where] == []


def test_an_older_database_gains_the_recipients_column_and_its_open_rows_still_recover(
        data_dir, signer, bureau_identity):
    store = EvidenceStore(data_dir, DEVICE_ID, signer, [bureau_identity.recipient], SystemClock())
    seg = store.open_segment("SM", 0)
    seg.write_fragment(b"\x04" * 1000, FragmentInfo(30, 48_000, 0, 966_667))
    seg.writer.abandon()
    store.close()
    with sqlite3.connect(data_dir / "ledger.db") as conn:  # as software before the column wrote it
        conn.execute("ALTER TABLE segments DROP COLUMN recipients")
    conn.close()

    store = EvidenceStore(data_dir, DEVICE_ID, signer, [bureau_identity.recipient], SystemClock())
    assert store.row("SM-0000")["recipients"] is None
    (record, _note) = store.recover()
    assert record.fields["body"]["recipients"] == [bureau_identity.recipient.key_id]
    store.open_segment("SM", 1)
    assert json.loads(store.row("SM-0001")["recipients"]) == [bureau_identity.recipient.key_id]
    store.close()
