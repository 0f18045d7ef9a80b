"""GPS over NMEA 0183 (issue 3, "GPS"): fix, loss of fix, bad sentences, time hint, and the encrypted track
sidecar (R23: the track is never in cleartext on the device; its hash goes into the segment record).

The simulated receiver writes real NMEA into a pty pair; the receiver under test reads it with pyserial.
Epochs are stepped by the test (`emit_epoch`), or run accelerated; every wait is bounded.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pyrage
import pytest

from agent.capture.gps import (
    SIDECAR_SUFFIX,
    GpsFix,
    GpsReceiver,
    GpsTrackRecorder,
    NmeaValueError,
    TrackPoint,
    parse_angle,
    parse_track,
)
from agent.evidence.age import AgeDecryptor, Identity
from agent.evidence.records import Sidecar
from hw_sim.serial_devices import SimulatedGps, nmea_sentence

WAIT = 5.0


@pytest.fixture
def gps(tmp_path: Path):
    with SimulatedGps(tmp_path / "tty") as sim:
        yield sim


@pytest.fixture
def track() -> GpsTrackRecorder:
    return GpsTrackRecorder()


@pytest.fixture
def receiver(gps: SimulatedGps, track: GpsTrackRecorder):
    rx = GpsReceiver(gps.device_port, on_fix=track.add, reopen_backoff_s=(0.05, 0.2))
    rx.start()
    assert rx.wait_for(lambda s, _f: s.opens >= 1, WAIT)
    yield rx
    rx.stop()


def emit(gps: SimulatedGps, rx: GpsReceiver, n: int = 1):
    """Emit n epochs and wait until the receiver has taken all their sentences in (each epoch ends a fix
    or a loss, so waiting on `used` is enough)."""
    before = rx.stats().used
    truths = [gps.emit_epoch() for _ in range(n)]
    assert rx.wait_for(lambda s, _f: s.used >= before + 2 * n, WAIT)
    return truths


# --- parsing ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "hemisphere", "digits", "micro_degrees"), [
    ("4807.038", "N", 2, 48_117_300),
    ("01131.000", "E", 3, 11_516_667),
    ("3113.82496", "N", 2, 31_230_416),
    ("12128.42206", "E", 3, 121_473_701),
    ("3351.4560", "S", 2, -33_857_600),
    ("07000.00000", "W", 3, -70_000_000),
    ("0000.0000", "N", 2, 0),
])
def test_nmea_angles_convert_exactly_to_integer_micro_degrees(value, hemisphere, digits, micro_degrees):
    assert parse_angle(value, hemisphere, digits) == micro_degrees


@pytest.mark.parametrize(("value", "hemisphere", "digits"), [
    ("4861.000", "N", 2),  # 61 minutes
    ("9100.000", "N", 2),  # beyond the pole
    ("4807.038", "E", 2),  # longitude hemisphere on a latitude
    ("48x7.038", "N", 2),
    ("807.038", "N", 2),  # too few degree digits
])
def test_impossible_angles_are_refused_naming_the_value(value, hemisphere, digits):
    with pytest.raises(NmeaValueError, match="angle|minutes|hemisphere"):
        parse_angle(value, hemisphere, digits)


# --- the receiver on a serial line ----------------------------------------------------------------------


def test_fix_is_reported_in_integer_micro_degrees_with_quality_and_utc(gps: SimulatedGps, receiver: GpsReceiver):
    truths = emit(gps, receiver, 3)
    fix = receiver.current_fix()
    assert fix is not None
    last = truths[-1]
    assert (fix.lat_ude, fix.lon_ude, fix.alt_mm, fix.quality, fix.sats) == \
        (last.lat_ude, last.lon_ude, last.alt_mm, 1, 9)
    assert fix.utc_us == int(last.utc.timestamp()) * 1_000_000
    assert (fix.hdop_centi, fix.speed_mmps, fix.course_cdeg) == (90, 1400, 4500)
    assert all(isinstance(v, int) for v in vars(fix).values())
    assert receiver.stats().fixes == 3


def test_loss_of_fix_clears_the_position_and_a_new_fix_restores_it(gps: SimulatedGps, receiver: GpsReceiver,
                                                                   track: GpsTrackRecorder):
    emit(gps, receiver, 2)
    gps.set_fix(False)
    emit(gps, receiver, 2)
    assert receiver.current_fix() is None
    assert receiver.stats().fix_losses == 1
    gps.set_fix(True)
    truth = emit(gps, receiver)[0]
    assert receiver.current_fix().lat_ude == truth.lat_ude
    assert [p.fix for p in track.points_between(0, 2**62)] == [True, True, False, True]


def test_rmc_utc_time_is_kept_as_a_time_hint_with_its_arrival_time(gps: SimulatedGps, receiver: GpsReceiver):
    truth = emit(gps, receiver)[0]
    hint = receiver.time_hint()
    assert hint is not None and hint.source == "gps"
    assert hint.utc_us == int(truth.utc.timestamp()) * 1_000_000
    assert hint.mono_us > 0
    gps.set_fix(False)
    emit(gps, receiver)  # RMC status V: its time is not trusted, the hint stays the last valid one
    assert receiver.time_hint() == hint


def test_garbage_and_bad_checksum_sentences_are_counted_and_ignored(gps: SimulatedGps, receiver: GpsReceiver):
    gps.garbage_next = 2
    gps.bad_checksum_next = 3
    gps.inject(b"complete nonsense\r\n")
    gps.inject(b"$GPGGA,1,2,3\r\n")  # no checksum: refused, checksums are required
    gps.inject(b"x" * 500 + b"\r\n")
    gps.inject(nmea_sentence("GPGSV,1,1,01,07,79,048,42"))  # valid, not used
    gps.inject(nmea_sentence("GPGGA,075959.00,9912.000,N,12128.42206,E,1,09,0.9,12.5,M,8.1,M,,"))  # lat 99
    truths = [gps.emit_epoch() for _ in range(3)]
    assert receiver.wait_for(lambda s, _f: s.fixes >= 3 and s.rejected.total() >= 9, WAIT), receiver.stats()
    stats = receiver.stats()
    assert dict(stats.rejected) == {"not_ascii": 2, "bad_checksum": 4, "unparseable": 1, "oversized": 1,
                                    "bad_value": 1}
    assert stats.ignored == 1
    assert receiver.current_fix().lat_ude == truths[-1].lat_ude  # the good sentences still made fixes


def test_unplugged_receiver_means_no_fix_and_reading_resumes_when_plugged_back(gps: SimulatedGps,
                                                                                receiver: GpsReceiver):
    emit(gps, receiver, 2)
    gps.unplug()
    assert receiver.wait_for(lambda s, f: s.line_losses == 1 and f is None, WAIT)
    assert receiver.current_fix() is None
    gps.plug()
    assert receiver.wait_for(lambda s, _f: s.opens == 2, WAIT)
    truth = emit(gps, receiver)[0]
    assert receiver.current_fix().lon_ude == truth.lon_ude


def test_accelerated_simulated_receiver_emits_a_moving_track(gps: SimulatedGps, receiver: GpsReceiver,
                                                             track: GpsTrackRecorder):
    gps.run(speed=50)
    assert receiver.wait_for(lambda s, _f: s.fixes >= 20, WAIT)
    gps.stop()
    points = track.points_between(0, 2**62)[:20]
    assert all(b.lat_ude > a.lat_ude and b.lon_ude > a.lon_ude for a, b in zip(points, points[1:], strict=False))
    assert all(b.utc_us - a.utc_us == 1_000_000 for a, b in zip(points, points[1:], strict=False))
    assert [p.lat_ude for p in points] == [t.lat_ude for t in gps.emitted[:20]]


# --- the track sidecar ----------------------------------------------------------------------------------


def test_track_sidecar_decrypts_with_the_bureau_identity_to_the_recorded_points(
        gps: SimulatedGps, receiver: GpsReceiver, track: GpsTrackRecorder, bureau_identity: Identity,
        tmp_path: Path):
    truths = emit(gps, receiver, 4)
    gps.set_fix(False)
    emit(gps, receiver)
    points = track.points_between(0, 2**62)
    sealed = track.seal("S1-0000", points[0].mono_us, points[-1].mono_us + 1, [bureau_identity.recipient])
    sidecar = sealed.write(tmp_path / "sidecars")

    path = tmp_path / "sidecars" / sidecar.file
    assert sidecar.file == "S1-0000" + SIDECAR_SUFFIX and sidecar.kind == "gps_track"
    on_disk = path.read_bytes()
    assert (len(on_disk), hashlib.sha256(on_disk).hexdigest()) == (sidecar.size, sidecar.sha256_cipher)
    Sidecar.model_validate(sidecar.model_dump())  # it fits the segment record's schema
    # Never cleartext: no coordinate and no field name is readable on disk, and no stray plaintext file.
    assert on_disk.startswith(b"age-encryption.org/v1\n")
    assert str(truths[0].lat_ude).encode() not in on_disk and b"lat_ude" not in on_disk
    assert sorted(p.name for p in path.parent.iterdir()) == [sidecar.file]

    plaintext = b"".join(AgeDecryptor(bureau_identity).chunks(io.BytesIO(on_disk)))
    header, decoded = parse_track(plaintext)
    assert header["segment_id"] == "S1-0000" and header["points"] == 5
    assert decoded == points
    assert [(p.lat_ude, p.lon_ude) for p in decoded if p.fix] == [(t.lat_ude, t.lon_ude) for t in truths]
    assert not decoded[-1].fix
    # The reference age implementation reads it too.
    reference = pyrage.decrypt(on_disk, [pyrage.x25519.Identity.from_str(str(bureau_identity))])
    assert reference == plaintext


def test_track_points_are_routed_to_segments_by_their_timestamps(bureau_identity: Identity):
    recorder = GpsTrackRecorder()
    for second in range(10):
        recorder.add(GpsFix(mono_us=second * 1_000_000, utc_us=None, lat_ude=second, lon_ude=0, alt_mm=None,
                            quality=1, sats=None, hdop_centi=None, speed_mmps=None, course_cdeg=None))
    recorder.add(None, mono_us=10_500_000)
    first = [p.lat_ude for p in recorder.points_between(0, 6_000_000)]
    second = recorder.points_between(6_000_000, 11_000_000)
    assert first == [0, 1, 2, 3, 4, 5]
    assert [p.lat_ude for p in second] == [6, 7, 8, 9, None]
    assert second[-1] == TrackPoint(mono_us=10_500_000, fix=False)
    assert recorder.seal("S1-0001", 6_000_000, 11_000_000, [bureau_identity.recipient]).points == 5


def test_track_memory_is_bounded_and_drops_are_counted():
    recorder = GpsTrackRecorder(retention_s=5.0, max_points=100)
    for second in range(20):
        recorder.add(None, mono_us=second * 1_000_000)
    assert len(recorder.points_between(0, 2**62)) == 6  # seconds 14..19
    assert recorder.dropped_points == 14


def test_a_sidecar_is_never_overwritten(track: GpsTrackRecorder, bureau_identity: Identity, tmp_path: Path):
    track.add(None, mono_us=1)
    sealed = track.seal("S1-0002", 0, 10, [bureau_identity.recipient])
    sealed.write(tmp_path)
    with pytest.raises(FileExistsError):
        sealed.write(tmp_path)
    assert (tmp_path / sealed.file_name).read_bytes() == sealed.ciphertext


def test_a_segment_without_track_points_gets_no_sidecar_file(bureau_identity: Identity, tmp_path: Path):
    recorder = GpsTrackRecorder(mono_us=lambda: 7_000_000)
    recorder.add(None)  # a loss of fix is stamped on the recorder's clock (the media clock), not the system's
    provide = recorder.sidecar_provider(tmp_path, [bureau_identity.recipient])
    assert provide("S1-0000", 0, 7_000_000) == [] and list(tmp_path.iterdir()) == []
    (entry,) = provide("S1-0001", 7_000_000, 8_000_000)
    assert entry["file"] == "S1-0001.gps.age" and Sidecar.model_validate(entry).kind == "gps_track"
    assert [p.name for p in tmp_path.iterdir()] == ["S1-0001.gps.age"]
