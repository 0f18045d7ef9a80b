"""The capture pipeline end to end: real H.264/AAC packets in, encrypted signed segments out, decoded back.

Everything asserted here is read back from what reached the disk: segments are decrypted with the
bureau identity and decoded with PyAV and with the real ffmpeg/ffprobe (R16 footage from arrival to
departure, R17 interruptions reported, R22 nothing lost, duplicated or unaccounted for).
"""

from __future__ import annotations

import errno
import io
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import av
import av.logging
import pytest

from agent.capture.packets import EncodedPacket
from agent.capture.pipeline import (
    CapturePipeline,
    IgnoreEvents,
    PipelineConfig,
    QueueOverflow,
    QueueRecovered,
    RecordingStarted,
    SegmentClosed,
    StorageFailed,
)
from agent.clock import SystemClock
from agent.evidence.age import AgeDecryptor, Identity
from agent.evidence.verify import Verifier
from agent.storage.fs import FileSystem
from agent.storage.keys import PemFileSigner
from agent.storage.store import EvidenceStore
from tests.conftest import DEVICE_ID
from tests.media_gen import AAC_FRAME, FPS, SAMPLE_RATE, Media, arrival_order, make_media, read_frame_number

AUDIO_FRAME_S = AAC_FRAME / SAMPLE_RATE
FRAME_S = 1 / FPS


@dataclass
class Recorder(IgnoreEvents):
    """Collects every event the pipeline reports."""

    started: list[RecordingStarted] = field(default_factory=list)
    closed: list[SegmentClosed] = field(default_factory=list)
    failed: list[StorageFailed] = field(default_factory=list)
    overflows: list[QueueOverflow] = field(default_factory=list)
    recovered: list[QueueRecovered] = field(default_factory=list)
    faults: list = field(default_factory=list)

    def recording_started(self, event):
        self.started.append(event)

    def segment_closed(self, event):
        self.closed.append(event)

    def storage_failed(self, event):
        self.failed.append(event)

    def queue_overflow(self, event):
        self.overflows.append(event)

    def queue_recovered(self, event):
        self.recovered.append(event)

    def fault(self, event):
        self.faults.append(event)


def feed(pipeline: CapturePipeline, packets: list[EncodedPacket], timeout: float = 30.0) -> None:
    """Submit like a source would, but never faster than the writer drains (tests must not overflow)."""
    deadline = time.monotonic() + timeout
    room = pipeline.config.queue_packets - 2
    for packet in packets:
        while pipeline.queue_depth >= room:
            assert time.monotonic() < deadline, "writer thread stopped draining the queue"
            time.sleep(0.001)
        assert pipeline.submit(packet)


def decrypt(path: Path, identity: Identity, truncated: bool = False) -> bytes:
    with open(path, "rb") as fh:
        return b"".join(AgeDecryptor(identity).chunks(fh, allow_truncated=truncated))


@dataclass
class Decoded:
    frame_numbers: list[int]
    video_times: list[float]
    audio_times: list[float]
    errors: list[str]


def decode_pyav(mp4: bytes) -> Decoded:
    """Decode every video frame (reading its drawn number) and demux every audio packet."""
    out = Decoded([], [], [], [])
    av.logging.set_level(av.logging.ERROR)
    try:
        with av.logging.Capture(local=True) as logs, av.open(io.BytesIO(mp4), format="mp4") as container:
            vs = container.streams.video[0]
            for packet in container.demux():
                if packet.stream.type == "audio":
                    if packet.pts is not None:
                        out.audio_times.append(float(packet.pts * packet.time_base))
                    continue
                for frame in packet.decode():  # the demuxer's last, empty packet flushes the decoder
                    out.frame_numbers.append(read_frame_number(frame.to_ndarray(format="gray")))
                    out.video_times.append(float(frame.pts * vs.time_base))
        out.errors = [f"{name}: {msg}" for level, name, msg in logs if level <= av.logging.ERROR]
    finally:
        av.logging.set_level(None)
    return out


def ffmpeg_decode_errors(*inputs: str) -> str:
    """Decode with the real ffmpeg; returns whatever it reports at error level (empty when clean)."""
    run = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", *inputs, "-f", "null", "-"],
                         capture_output=True, text=True, timeout=60)
    return run.stderr.strip() + ("" if run.returncode == 0 else f" (exit {run.returncode})")


def ffprobe_frames(path: Path) -> dict[str, int]:
    run = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-show_entries",
                          "stream=codec_type,nb_read_frames", "-of", "csv=p=0", str(path)],
                         capture_output=True, text=True, timeout=60, check=True)
    counts = {}
    for line in run.stdout.split():
        kind, n = line.split(",")
        counts[kind] = int(n)
    return counts


def new_pipeline(store: EvidenceStore, media: Media, events: Recorder, **config) -> CapturePipeline:
    pipeline = CapturePipeline(store, media.video_params, media.audio_params, PipelineConfig(**config), events)
    pipeline.start()
    return pipeline


def segment_records(store: EvidenceStore) -> list[dict]:
    return [r.fields["body"] for r in store.ledger.records(rtype="segment")]


# --- one recording with 100+ splits, shared by the tests that read it ---------------------------


@dataclass
class Recording:
    store: EvidenceStore
    identity: Identity
    media: Media
    events: Recorder
    plain: dict[str, bytes]  # segment file name -> decrypted fMP4
    decoded: dict[str, Decoded]
    folder: Path


SPLITS_SECONDS = 103.0


@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> Recording:
    """A 103 s session cut into 1 s segments (so 100+ splits), audio arriving 80 ms after its video."""
    root = tmp_path_factory.mktemp("splits")
    identity = Identity.generate()
    store = EvidenceStore(root / "device", DEVICE_ID, PemFileSigner.generate(root / "key.pem"),
                          [identity.recipient], SystemClock())
    media = make_media(SPLITS_SECONDS)
    events = Recorder()
    pipeline = new_pipeline(store, media, events, segment_seconds=1.0, pre_event_seconds=0)
    pipeline.start_session("S-SPLITS", at_us=media.video[0].pts_us)
    feed(pipeline, arrival_order(media, audio_lag_us=80_000))
    pipeline.stop_session()
    assert pipeline.close(30)
    folder = root / "plain"
    folder.mkdir()
    plain, decoded = {}, {}
    for body in segment_records(store):
        plain[body["file"]] = decrypt(store.segments_dir / body["file"], identity)
        (folder / (body["file"] + ".mp4")).write_bytes(plain[body["file"]])
        decoded[body["file"]] = decode_pyav(plain[body["file"]])
    yield Recording(store, identity, media, events, plain, decoded, folder)
    store.close()


def test_a_long_session_is_split_at_least_100_times(recording):
    records = segment_records(recording.store)
    assert len(records) >= 101
    assert [r["index"] for r in records] == list(range(len(records)))
    assert all(not r["truncated"] for r in records)
    assert len(recording.events.closed) == len(records)
    assert recording.events.faults == []


def test_every_segment_decodes_with_pyav_without_errors(recording):
    for name, decoded in recording.decoded.items():
        assert decoded.errors == [], name
        assert decoded.frame_numbers, name


def test_every_segment_decodes_with_ffmpeg_and_ffprobe_counts_match_the_records(recording):
    files = sorted(recording.folder.iterdir())
    playlist = recording.folder.parent / "segments.txt"
    playlist.write_text("".join(f"file '{path}'\n" for path in files))
    assert ffmpeg_decode_errors("-f", "concat", "-safe", "0", "-i", str(playlist)) == ""
    records = {r["file"]: r for r in segment_records(recording.store)}
    for path in files[:: max(1, len(files) // 8)]:  # ffprobe -count_frames on a spread of segments
        rec = records[path.name[: -len(".mp4")]]
        assert ffmpeg_decode_errors("-i", str(path)) == ""
        assert ffprobe_frames(path) == {"video": rec["video_frames"], "audio": rec["audio_samples"] // AAC_FRAME}


def test_no_frame_is_lost_or_duplicated_across_splits(recording):
    numbers = [n for name in sorted(recording.decoded) for n in recording.decoded[name].frame_numbers]
    assert numbers == list(range(len(recording.media.video)))
    records = segment_records(recording.store)
    assert sum(r["video_frames"] for r in records) == len(recording.media.video)
    assert sum(r["audio_samples"] for r in records) == len(recording.media.audio) * AAC_FRAME


def test_every_segment_starts_with_a_keyframe_and_ends_where_the_next_begins(recording):
    media, records = recording.media, segment_records(recording.store)
    keyframe_pts = {p.pts_us for p in media.video if p.keyframe}
    for before, after in zip(records, records[1:], strict=False):
        assert after["first_pts_us"] in keyframe_pts
        assert before["last_pts_us"] < after["first_pts_us"]


def test_presentation_time_is_continuous_across_splits(recording):
    times = [t for name in sorted(recording.decoded) for t in recording.decoded[name].video_times]
    steps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert times[0] == 0
    assert min(steps) > FRAME_S * 0.9 and max(steps) < FRAME_S * 1.1
    audio = [t for name in sorted(recording.decoded) for t in recording.decoded[name].audio_times]
    audio_steps = [b - a for a, b in zip(audio, audio[1:], strict=False)]
    assert min(audio_steps) == pytest.approx(AUDIO_FRAME_S, abs=1e-4)
    assert max(audio_steps) == pytest.approx(AUDIO_FRAME_S, abs=1e-4)


def test_every_finished_segment_verifies(recording):
    report = Verifier(identity=recording.identity).verify_path(recording.store.data_dir)
    assert report.problems == [] and report.ok
    assert report.segments_ok == report.decrypted == len(segment_records(recording.store))


def test_recording_started_reports_the_first_fragment_on_disk(recording):
    (started,) = recording.events.started
    assert started.first_pts_us == recording.media.video[0].pts_us
    assert started.segment_id.endswith("-0000") and started.pre_event_us == 0


# --- pre-event buffer ---------------------------------------------------------------------------------


def test_first_segment_begins_with_the_gops_from_before_the_press(store, bureau_identity):
    media = make_media(9.0)
    events = Recorder()
    pipeline = new_pipeline(store, media, events, pre_event_seconds=3.0, segment_seconds=60.0)
    packets = arrival_order(media)
    press_frame = 180  # 6 s in; frames 0..179 were captured while READY
    press_us = media.video[press_frame].pts_us
    before = [p for p in packets if p.pts_us < press_us]
    feed(pipeline, before)
    assert pipeline.flush(10)
    stats = pipeline.stats()
    assert stats.ring_seconds == pytest.approx(3.0, abs=0.01) and stats.ring_bytes > 0
    pipeline.start_session("S-PRE", at_us=press_us)
    feed(pipeline, packets[len(before):])
    pipeline.stop_session()
    assert pipeline.close(10)

    (body,) = segment_records(store)
    decoded = decode_pyav(decrypt(store.segments_dir / body["file"], bureau_identity))
    # The ring keeps whole GOPs covering at least 3 s; the GOP in progress at the press (150..179)
    # follows them, so the footage starts at frame 60: 4 s before the press.
    assert decoded.frame_numbers == list(range(60, len(media.video)))
    assert decoded.errors == []
    (started,) = events.started
    assert started.pre_event_us >= 3_000_000
    assert started.first_pts_us == media.video[60].pts_us


def test_pre_event_ring_without_audio_still_records_live_audio(store, bureau_identity):
    media = make_media(5.0)
    pipeline = new_pipeline(store, media, Recorder(), pre_event_seconds=2.0, pre_event_audio=False)
    packets = arrival_order(media)
    press_us = media.video[120].pts_us
    feed(pipeline, [p for p in packets if p.pts_us < press_us])
    pipeline.start_session("S-NOAUDIO", at_us=press_us)
    feed(pipeline, [p for p in packets if p.pts_us >= press_us])
    pipeline.stop_session()
    assert pipeline.close(10)
    (body,) = segment_records(store)
    decoded = decode_pyav(decrypt(store.segments_dir / body["file"], bureau_identity))
    assert decoded.frame_numbers[0] <= 120 - 60
    first_audio = decoded.audio_times[0] + body["first_pts_us"] / 1e6
    assert first_audio >= press_us / 1e6 - 1.0  # audio only from the GOP in progress at the press on


# --- queue overflow -------------------------------------------------------------------------------------


class GatedFileSystem(FileSystem):
    """A disk whose fsync can be held up, as a slow card would."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.open.set()
        self.blocked = threading.Event()

    def sync(self, fh) -> None:
        if not self.open.is_set():
            self.blocked.set()
            self.open.wait(20)
        super().sync(fh)


def test_a_full_queue_drops_counts_and_reports_once_per_episode(open_store):
    fs = GatedFileSystem()
    store = open_store(fs=fs)
    media = make_media(6.0)
    events = Recorder()
    keyframe_requests = []
    pipeline = CapturePipeline(store, media.video_params, media.audio_params,
                               PipelineConfig(queue_packets=20, pre_event_seconds=0), events,
                               request_keyframe=lambda: keyframe_requests.append(1))
    pipeline.start()
    packets = arrival_order(media)
    pipeline.start_session("S-FULL", at_us=packets[0].pts_us)
    gop2_us = media.video[60].pts_us
    first = [p for p in packets if p.pts_us < gop2_us]
    feed(pipeline, first)
    assert pipeline.flush(10)
    fs.open.clear()
    # The keyframe of the third GOP (and the audio just after it) completes the second: its write blocks.
    release = [p for p in packets[len(first):] if p.pts_us <= gop2_us + 25_000]
    feed(pipeline, release)
    assert fs.blocked.wait(10)
    sent = len(first) + len(release)
    burst = packets[sent: sent + 100]
    accepted = [pipeline.submit(p) for p in burst]
    assert accepted.count(True) <= 20 and accepted.count(False) >= 80
    fs.open.set()
    assert pipeline.flush(20)
    feed(pipeline, packets[sent + 100:])
    pipeline.stop_session()
    assert pipeline.close(20)

    stats = pipeline.stats()
    assert stats.packets_dropped == accepted.count(False)
    assert stats.overflow_episodes == 1 and len(events.overflows) == 1
    assert events.recovered == [QueueRecovered(1, accepted.count(False))]
    assert keyframe_requests, "after losing frames the source is asked for a keyframe"
    assert stats.packets_in == len(packets) - stats.packets_dropped
    assert stats.queue_high_water == 20 and stats.writer_latency_us
    store.close()


# --- storage failure ------------------------------------------------------------------------------------


class _CappedFile:
    def __init__(self, fh, fs: CappedFileSystem):
        self._fh, self._fs = fh, fs

    def write(self, data) -> int:
        if self._fs.written + len(data) > self._fs.limit:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._fs.written += len(data)
        return self._fh.write(data)

    def flush(self) -> None:
        self._fh.flush()

    def fileno(self) -> int:
        return self._fh.fileno()

    def close(self) -> None:
        self._fh.close()


class CappedFileSystem(FileSystem):
    """A data partition that fills up after `limit` bytes of segment data."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.written = 0

    def create(self, path: Path):
        return _CappedFile(super().create(path), self)


def test_storage_full_closes_the_segment_as_truncated_reports_it_and_resume_continues(open_store,
                                                                                      bureau_identity):
    fs = CappedFileSystem(limit=300_000)
    store = open_store(fs=fs)
    media = make_media(12.0)
    events = Recorder()
    pipeline = new_pipeline(store, media, events, segment_seconds=60.0, pre_event_seconds=5.0)
    packets = arrival_order(media)
    pipeline.start_session("S-FULLDISK", at_us=packets[0].pts_us)
    half = [p for p in packets if p.pts_us < media.video[180].pts_us]
    feed(pipeline, half)
    assert pipeline.flush(10)
    (failure,) = events.failed
    assert failure.storage_full and failure.segment_id == "S-FULLDISK-0000"
    assert pipeline.state == "INTERRUPTED"
    fs.limit = 1 << 40  # space freed (receipted footage purged)
    pipeline.resume_session()
    feed(pipeline, packets[len(half):])
    pipeline.stop_session()
    assert pipeline.close(10)

    first, second = segment_records(store)
    assert first["truncated"] and first["index"] == 0
    assert not second["truncated"] and second["index"] == 1
    report = Verifier(identity=bureau_identity).verify_path(store.data_dir)
    assert report.problems == [] and report.segments_truncated == 1
    kept = decode_pyav(decrypt(store.segments_dir / first["file"], bureau_identity, truncated=True))
    resumed = decode_pyav(decrypt(store.segments_dir / second["file"], bureau_identity))
    assert resumed.errors == []
    # What was written before the disk filled is kept; after resume, the buffered GOPs come first,
    # and from there on nothing is missing up to the stop.
    assert kept.frame_numbers == list(range(len(kept.frame_numbers)))
    assert resumed.frame_numbers == list(range(resumed.frame_numbers[0], len(media.video)))
    assert resumed.video_times[0] > kept.video_times[-1]  # one timeline for the session


# --- long run: audio/video drift ---------------------------------------------------------------------


def test_audio_video_drift_stays_within_one_audio_frame_over_ten_minutes_with_a_fast_mic_clock(
        store, bureau_identity):
    media = make_media(600.0, audio_ppm=200.0, distinct_frames=300)
    pipeline = new_pipeline(store, media, Recorder(), segment_seconds=60.0, pre_event_seconds=0,
                            queue_packets=2000)
    pipeline.start_session("S-LONG", at_us=media.video[0].pts_us)
    feed(pipeline, arrival_order(media, audio_lag_us=40_000), timeout=60)
    pipeline.stop_session()
    assert pipeline.close(30)

    base = media.video[0].pts_us
    audio_times: list[float] = []
    video_times: list[float] = []
    for body in segment_records(store):
        with av.open(io.BytesIO(decrypt(store.segments_dir / body["file"], bureau_identity)), format="mp4") as c:
            for packet in c.demux():
                if packet.pts is None:
                    continue
                (audio_times if packet.stream.type == "audio" else video_times).append(
                    float(packet.pts * packet.time_base))
    assert len(audio_times) == len(media.audio) and len(video_times) == len(media.video)
    video_error = max(abs(t - (p.pts_us - base) / 1e6) for t, p in zip(video_times, media.video, strict=True))
    audio_error = max(abs(t - (p.pts_us - base) / 1e6) for t, p in zip(audio_times, media.audio, strict=True))
    assert video_error < 0.001
    assert audio_error <= AUDIO_FRAME_S
    # A muxer that only counted samples would be 120 ms off by now: the check can fail.
    assert len(media.audio) * AUDIO_FRAME_S - (media.audio[-1].pts_us - media.audio[0].pts_us) / 1e6 > 0.1
