"""Capture benchmark: what recording 1080p30 H.264 + AAC costs through the real capture pipeline (issue 3).

Threads: the main thread feeds packets (like the camera and microphone callbacks would) and measures;
the pipeline's own writer thread ("capture-writer") does the work; child processes run the shell
pipeline, the CPU hogs and the memory (RSS) measurement, each in a fresh interpreter.

Input: a clip of real 1080p30 H.264 (PyAV libx264, ~8 Mbit/s VBV-constrained, IDR every 30 frames, no
B-frames, SPS/PPS repeated before every IDR as picamera2 does) and AAC-LC 48 kHz mono 64 kbit/s, encoded
once and cached (`--cache`). Longer footage loops the clip (whole GOPs) with timestamps shifted, so the
pipeline sees one continuous media clock.

Figures (every one also in `--json`):
  1. CPU per hour of footage: `CapturePipeline` into `EvidenceStore` (mux, encrypt, hash, fsync, index,
     sign) fed as fast as it drains, process CPU from getrusage, split into writer thread (store calls
     and the rest) and feeding thread; beside it, in the same run on the same bytes, the shell pipeline
     `ffmpeg -c copy -f segment` (fMP4, 60 s) + `age -r` + `sync` + `sha256sum`, CPU from RUSAGE_CHILDREN.
  2. Start latency: press (`start_session`) -> `recording_started` (first fragment durable) -> the whole
     pre-event ring durable -> the fragment holding the first live packet durable; live packets paced in
     real time, the press at a random point of a GOP, the default 30 s ring full; p50/p99 over `--starts`.
  3. Memory: anonymous RSS of a fresh process with the pre-event ring empty, full (0/30/120 s) and while
     recording, payloads copied per packet as a camera hands over new buffers.
  4. Real time: `--realtime` seconds paced at 30 fps, once on a quiet machine and once with both cores
     busy (`stress-ng --cpu N`, else N busy Python processes): writer latency (submit -> handled)
     p50/p99/p99.9/max from the pipeline's own samples, `write_fragment` p50/p99, queue high water,
     packets dropped, CPU per hour at real time.

    .venv/bin/python bench/bench_capture.py           # default run: ~5 min on 2 cores (+~1.5 min once to encode)
    .venv/bin/python bench/bench_capture.py --quick      # smoke run, under a minute
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from bench_writer import (
    BenchKeys,
    chosen_parts,
    command_line,
    cpu_seconds,
    filesystem_type,
    machine_info,
    percentile,
    print_table,
    run_shell,
    work_dirs,
)

from agent.capture.packets import AudioParams, EncodedPacket, VideoParams
from agent.capture.pipeline import CapturePipeline, IgnoreEvents, PipelineConfig, RecordingStarted
from agent.clock import SystemClock
from agent.config import RecordingConfig
from agent.storage.segment_writer import FragmentInfo
from agent.storage.store import EvidenceStore

DEVICE_ID = "BWC-BENCH-0002"
WIDTH, HEIGHT, FPS = 1920, 1080, 30
SAMPLE_RATE, AAC_FRAME = 48_000, 1024
T0_US = 7_000_000_000  # an arbitrary monotonic media-clock start
AUDIO_LAG_US = 21_333  # a microphone delivers each 1024-sample buffer when it is full: one frame late
CLIP_FORMAT = 2  # bump when the clip generator changes, so stale caches are not reused


# --- the clip: real H.264 + AAC, encoded once, cached --------------------------------------------


@dataclass
class Clip:
    """Encoded packets of `seconds` of footage: payloads in one buffer, an index into it."""

    video_params: VideoParams
    audio_params: AudioParams
    video: list[tuple[int, int, bool]]  # (offset, size, keyframe) per frame
    audio: list[tuple[int, int]]  # (offset, size) per AAC frame
    data: bytes | FileSlices

    @property
    def seconds(self) -> float:
        return len(self.video) / FPS

    def video_payload(self, i: int) -> bytes | memoryview:
        off, size, _key = self.video[i]
        return self.data[off: off + size]

    def audio_payload(self, j: int) -> bytes | memoryview:
        off, size = self.audio[j]
        return self.data[off: off + size]

    @property
    def video_bitrate(self) -> float:
        return sum(s for _, s, _ in self.video) * 8 / self.seconds

    @property
    def audio_bitrate(self) -> float:
        return sum(s for _, s in self.audio) * 8 / self.seconds


def clip_paths(cache: Path, seconds: int, bitrate: int) -> tuple[Path, Path]:
    stem = f"clip-v{CLIP_FORMAT}-{WIDTH}x{HEIGHT}p{FPS}-{bitrate // 1000}k-{seconds}s"
    return cache / f"{stem}.json", cache / f"{stem}.bin"


def _frame(i: int, rng: Any, texture: Any) -> Any:
    """A yuv420p 1080p picture: a detailed texture panning 7 px right and 3 px down per frame, plus fresh
    sensor-like noise, so that x264 needs its whole bit budget every frame (as a body camera walking
    through a street does), not just on keyframes."""
    import numpy as np

    x, y = (i * 7) % WIDTH, (i * 3) % HEIGHT
    luma = texture[y: y + HEIGHT, x: x + WIDTH].copy()
    luma += rng.integers(0, 24, (HEIGHT, WIDTH), dtype=np.uint8)
    chroma = np.full((HEIGHT // 2, WIDTH), 128, np.uint8)
    return np.vstack([luma, chroma])


def encode_clip(cache: Path, seconds: int, bitrate: int) -> None:
    """Encode the clip with PyAV (libx264, aac) and write it to the cache as .bin + .json index."""
    import av
    import numpy as np

    from agent.capture.fmp4 import parameter_sets

    meta_path, bin_path = clip_paths(cache, seconds, bitrate)
    cache.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    texture = rng.integers(40, 200, (HEIGHT // 8 * 2, WIDTH // 8 * 2), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    v = av.CodecContext.create("libx264", "w")
    v.width, v.height, v.pix_fmt = WIDTH, HEIGHT, "yuv420p"
    v.time_base, v.framerate = Fraction(1, FPS), Fraction(FPS, 1)
    v.bit_rate = bitrate
    kbps = bitrate // 1000
    v.options = {"preset": "ultrafast",
                 "x264-params": f"keyint={FPS}:min-keyint={FPS}:scenecut=0:bframes=0:repeat-headers=1:"
                                f"vbv-maxrate={kbps * 115 // 100}:vbv-bufsize={kbps // 4}"}
    a = av.CodecContext.create("aac", "w")
    a.sample_rate, a.layout, a.format, a.bit_rate = SAMPLE_RATE, "mono", "fltp", 64_000
    a.open()
    frames = seconds * FPS
    video: list[tuple[int, int, bool]] = []
    audio: list[tuple[int, int]] = []
    offset = 0
    tmp = bin_path.with_suffix(".tmp")
    started = time.monotonic()
    with open(tmp, "wb") as out:
        def put(data: bytes) -> int:
            nonlocal offset
            out.write(data)
            offset += len(data)
            return offset - len(data)

        for i in range(frames + 1):
            packets = v.encode(None) if i == frames else v.encode(_video_frame(i, rng, texture))
            for p in packets:
                data = bytes(p)
                video.append((put(data), len(data), bool(p.is_keyframe)))
            if i % (FPS * 10) == 0:
                print(f"  encoding the clip: {i / FPS:.0f} of {seconds} s "
                      f"({time.monotonic() - started:.0f} s so far)", file=sys.stderr)
        n_audio = seconds * SAMPLE_RATE // AAC_FRAME
        t = np.arange(AAC_FRAME, dtype=np.float64)
        for j in range(n_audio + 4):
            if j < n_audio:
                tone = 0.2 * np.sin(2 * np.pi * (220 + (j // 47) % 8 * 55) * (t + j * AAC_FRAME) / SAMPLE_RATE)
                pcm = (tone + rng.normal(0, 0.02, AAC_FRAME)).astype(np.float32)
                frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="fltp", layout="mono")
                frame.sample_rate, frame.pts = SAMPLE_RATE, j * AAC_FRAME
                packets = a.encode(frame)
            else:
                packets = a.encode(None) if j == n_audio else []
            for p in packets:
                if len(audio) < n_audio:
                    data = bytes(p)
                    audio.append((put(data), len(data)))
    if len(video) != frames or not video[0][2]:
        raise RuntimeError(f"x264 gave {len(video)} packets for {frames} frames")
    with open(tmp, "rb") as fh:
        first = fh.read(video[0][1])
    sps, pps = parameter_sets(first)
    meta = {"format": CLIP_FORMAT, "width": WIDTH, "height": HEIGHT, "fps": FPS, "sps": sps.hex(), "pps": pps.hex(),
            "sample_rate": SAMPLE_RATE, "channels": 1, "asc": bytes(a.extradata).hex(), "video": video,
            "audio": audio, "encode_wall_s": time.monotonic() - started}
    os.replace(tmp, bin_path)
    meta_path.write_text(json.dumps(meta))


def _video_frame(i: int, rng: Any, texture: Any) -> Any:
    import av

    frame = av.VideoFrame.from_ndarray(_frame(i, rng, texture), format="yuv420p")
    frame.pts = i
    return frame


class FileSlices:
    """`data[a:b]` read from a file with pread: payloads without holding the clip in this process's memory."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_RDONLY)

    def __getitem__(self, span: slice) -> bytes:
        return os.pread(self.fd, span.stop - span.start, span.start)


def load_clip(cache: Path, seconds: int, bitrate: int, from_file: bool = False) -> Clip:
    meta_path, bin_path = clip_paths(cache, seconds, bitrate)
    if not meta_path.exists() or not bin_path.exists():
        encode_clip(cache, seconds, bitrate)
    meta = json.loads(meta_path.read_text())
    data: bytes | FileSlices = FileSlices(bin_path) if from_file else bin_path.read_bytes()
    vp = VideoParams(meta["width"], meta["height"], meta["fps"], bytes.fromhex(meta["sps"]), bytes.fromhex(meta["pps"]))
    ap = AudioParams(meta["sample_rate"], meta["channels"], bytes.fromhex(meta["asc"]), AAC_FRAME)
    video = [(o, s, bool(k)) for o, s, k in meta["video"]]
    audio = [(o, s) for o, s in meta["audio"]]
    if len(video) % FPS:
        raise RuntimeError(f"clip of {len(video)} frames is not whole GOPs")
    return Clip(vp, ap, video, audio, data)


class Timeline:
    """The clip looped into one continuous stream on the media clock, in arrival order.

    A cursor remembers where the stream is, so successive calls continue it (the media clock never goes
    back). `copy=True` gives every packet its own payload object, as a camera hands over new buffers;
    otherwise payloads are shared slices of the clip.
    """

    def __init__(self, clip: Clip, t0_us: int = T0_US, copy: bool = False):
        self.clip = clip
        self.t0_us = t0_us
        self.copy = copy
        self.next_video = 0
        self.next_audio = 0
        self._video_cache: list[bytes] | None = None
        self._audio_cache: list[bytes] | None = None
        if not copy:
            self._video_cache = [bytes(clip.video_payload(i)) for i in range(len(clip.video))]
            self._audio_cache = [bytes(clip.audio_payload(j)) for j in range(len(clip.audio))]

    def video_pts(self, i: int) -> int:
        return self.t0_us + i * 1_000_000 // FPS

    def audio_pts(self, j: int) -> int:
        return self.t0_us + round(j * AAC_FRAME * 1_000_000 / SAMPLE_RATE)

    @property
    def media_us(self) -> int:
        """Media-clock time of the next video frame."""
        return self.video_pts(self.next_video)

    def _video(self, i: int) -> EncodedPacket:
        n = i % len(self.clip.video)
        data = self._video_cache[n] if self._video_cache is not None else bytes(self.clip.video_payload(n))
        pts = self.video_pts(i)
        return EncodedPacket("video", data, pts, self.video_pts(i + 1) - pts, self.clip.video[n][2], i)

    def _audio(self, j: int) -> EncodedPacket:
        n = j % len(self.clip.audio)
        data = self._audio_cache[n] if self._audio_cache is not None else bytes(self.clip.audio_payload(n))
        pts = self.audio_pts(j)
        return EncodedPacket("audio", data, pts, self.audio_pts(j + 1) - pts, True, j)

    def packets(self, seconds: float) -> Iterator[tuple[int, EncodedPacket]]:
        """(arrival time on the media clock, packet) for the next `seconds` of video, with its audio."""
        end_video = self.next_video + int(round(seconds * FPS))
        end_us = self.video_pts(end_video)

        def videos() -> Iterator[tuple[int, int, int]]:
            while self.next_video < end_video:
                i = self.next_video
                self.next_video += 1
                yield self.video_pts(i), 0, i

        def audios() -> Iterator[tuple[int, int, int]]:
            while self.audio_pts(self.next_audio) + AUDIO_LAG_US < end_us:
                j = self.next_audio
                self.next_audio += 1
                yield self.audio_pts(j) + AUDIO_LAG_US, 1, j

        for at, kind, n in heapq.merge(videos(), audios()):
            yield at, (self._video(n) if kind == 0 else self._audio(n))

    def skip_to_keyframe(self) -> None:
        """Move the cursor to the next GOP start (used between sessions of the start-latency trials)."""
        self.next_video = -(-self.next_video // FPS) * FPS
        while self.audio_pts(self.next_audio) < self.video_pts(self.next_video):
            self.next_audio += 1


# --- instruments ------------------------------------------------------------------------------------


@dataclass
class FragmentWrite:
    done_s: float  # perf_counter when write_fragment returned
    elapsed_s: float
    thread_cpu_s: float
    info: FragmentInfo | None
    nbytes: int


class TimedSegment:
    """Wraps an OpenSegment: times every store call on the writer thread (wall and thread CPU)."""

    def __init__(self, inner: Any, owner: TimedStore):
        self._inner, self._owner = inner, owner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def write_fragment(self, data: bytes, info: FragmentInfo | None = None, *args: Any, **kwargs: Any) -> None:
        c0, t0 = time.thread_time(), time.perf_counter()
        self._inner.write_fragment(data, info, *args, **kwargs)
        t1 = time.perf_counter()
        self._owner.writes.append(FragmentWrite(t1, t1 - t0, time.thread_time() - c0, info, len(data)))
        self._owner.store_cpu_s += time.thread_time() - c0

    def close(self, *args: Any, **kwargs: Any) -> Any:
        c0 = time.thread_time()
        try:
            return self._inner.close(*args, **kwargs)
        finally:
            self._owner.store_cpu_s += time.thread_time() - c0


class TimedStore:
    """Wraps an EvidenceStore for the pipeline (which only calls `open_segment`), recording every write."""

    def __init__(self, inner: EvidenceStore):
        self.inner = inner
        self.writes: list[FragmentWrite] = []
        self.store_cpu_s = 0.0  # writer-thread CPU inside open_segment / write_fragment / close

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def open_segment(self, *args: Any, **kwargs: Any) -> TimedSegment:
        c0 = time.thread_time()
        try:
            return TimedSegment(self.inner.open_segment(*args, **kwargs), self)
        finally:
            self.store_cpu_s += time.thread_time() - c0


class Events(IgnoreEvents):
    def __init__(self) -> None:
        self.started: list[tuple[float, RecordingStarted]] = []
        self.faults: list[Any] = []
        self.overflows: list[Any] = []
        self.started_event = threading.Event()

    def recording_started(self, event: RecordingStarted) -> None:
        self.started.append((time.perf_counter(), event))
        self.started_event.set()

    def queue_overflow(self, event: Any) -> None:
        self.overflows.append(event)

    def fault(self, event: Any) -> None:
        self.faults.append(event)


def thread_cpu(native_id: int | None) -> float:
    """User + system CPU seconds of one thread of this process, from /proc (0 if unknown)."""
    if native_id is None:
        return 0.0
    try:
        fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_status(key: str) -> int:
    """A kB figure from /proc/self/status (VmRSS, VmHWM, RssAnon, ...), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def default_pipeline_config(**overrides: Any) -> PipelineConfig:
    """The pipeline as the daemon builds it from the default agent config (agent/daemon.py)."""
    rc = RecordingConfig()
    base = {"segment_seconds": float(rc.segment_s), "pre_event_seconds": float(rc.pre_event_s),
            "pre_event_audio": rc.pre_event_audio, "queue_packets": rc.queue_packets}
    return PipelineConfig(**{**base, **overrides})


@dataclass
class Rig:
    """A fresh store in `data_dir` and a started pipeline writing into it."""

    store: EvidenceStore
    timed: TimedStore
    pipeline: CapturePipeline
    events: Events

    @classmethod
    def open(cls, data_dir: Path, keys: BenchKeys, clip: Clip, **config: Any) -> Rig:
        store = EvidenceStore(data_dir, DEVICE_ID, keys.signer, [keys.identity.recipient], SystemClock())
        timed = TimedStore(store)
        events = Events()
        pipeline = CapturePipeline(timed, clip.video_params, clip.audio_params,  # type: ignore[arg-type]
                                   default_pipeline_config(**config), events)
        pipeline.start()
        return cls(store, timed, pipeline, events)

    def close(self) -> None:
        if not self.pipeline.close(60):
            raise RuntimeError("capture writer did not stop within 60 s")
        self.store.close()

    @property
    def writer_native_id(self) -> int | None:
        thread = self.pipeline._thread  # the bench reads the writer thread's CPU from /proc
        return thread.native_id if thread is not None else None


def submit_fast(pipeline: CapturePipeline, packets: Iterator[tuple[int, EncodedPacket]], deadline_s: float = 600
                ) -> int:
    """Submit as fast as the writer drains: never let the inbox overflow (sleep 2 ms when nearly full)."""
    room = pipeline.config.queue_packets - 8
    limit = time.monotonic() + deadline_s
    n = 0
    for _at, packet in packets:
        while pipeline.queue_depth >= room:
            if time.monotonic() > limit:
                raise RuntimeError("capture writer stopped draining")
            time.sleep(0.002)
        if not pipeline.submit(packet):
            raise RuntimeError("inbox overflow while feeding as fast as it drains")
        n += 1
    return n


@dataclass
class PacedFeed:
    submitted: int = 0
    dropped: int = 0
    max_queue_depth: int = 0  # inbox depth seen right after each submit


def submit_paced(pipeline: CapturePipeline, packets: Iterator[tuple[int, EncodedPacket]], anchor_media_us: int,
                 anchor_wall_s: float, until: Any = None) -> PacedFeed:
    """Submit each packet at its arrival time in real time (anchor: media time <-> perf_counter), as the
    camera and microphone callbacks would. Stops early when `until()` is true."""
    feed = PacedFeed()
    for at, packet in packets:
        delay = anchor_wall_s + (at - anchor_media_us) / 1e6 - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        if pipeline.submit(packet):
            feed.submitted += 1
        else:
            feed.dropped += 1
        feed.max_queue_depth = max(feed.max_queue_depth, pipeline.queue_depth)
        if until is not None and until():
            break
    return feed


# --- 1. CPU per hour of footage: ours ------------------------------------------------------------


def run_ours_throughput(clip: Clip, footage_s: float, work: Path, keys: BenchKeys) -> dict[str, Any]:
    """Record `footage_s` of footage fed as fast as the pipeline drains; CPU of the whole process."""
    timeline = Timeline(clip)
    packets = list(timeline.packets(footage_s))  # built before measuring: the camera's work, not ours
    rig = Rig.open(work, keys, clip)
    main_c0 = time.thread_time()
    u0, s0 = cpu_seconds()
    w0 = thread_cpu(rig.writer_native_id)
    t0 = time.perf_counter()
    rig.pipeline.start_session("SCPU", at_us=packets[0][1].pts_us)
    submit_fast(rig.pipeline, iter(packets))
    rig.pipeline.stop_session()
    if not rig.pipeline.flush(120):
        raise RuntimeError("pipeline did not finish within 120 s")
    wall = time.perf_counter() - t0
    writer = thread_cpu(rig.writer_native_id) - w0
    u1, s1 = cpu_seconds()
    feeder = time.thread_time() - main_c0
    stats = rig.pipeline.stats()
    records = [r.fields["body"] for r in rig.store.ledger.records(rtype="segment")]
    rig.close()
    cpu = (u1 - u0) + (s1 - s0)
    writes = rig.timed.writes
    video_bytes = sum(len(p.data) for _, p in packets if p.kind == "video")
    audio_bytes = sum(len(p.data) for _, p in packets if p.kind == "audio")
    on_disk = sum(r["size"] for r in records)
    return {
        "footage_s": footage_s, "packets": len(packets), "segments": len(records),
        "fragments": stats.fragments_written, "media_bytes": video_bytes + audio_bytes,
        "fmp4_bytes": stats.bytes_written, "on_disk_bytes": on_disk,
        "wall_s": wall, "x_real_time": footage_s / wall, "mb_per_s": (video_bytes + audio_bytes) / 1e6 / wall,
        "cpu_user_s": u1 - u0, "cpu_sys_s": s1 - s0, "cpu_s": cpu,
        "cpu_s_per_footage_hour": cpu / footage_s * 3600,
        "writer_cpu_s_per_hour": writer / footage_s * 3600,
        "store_cpu_s_per_hour": rig.timed.store_cpu_s / footage_s * 3600,
        "mux_and_rest_cpu_s_per_hour": (writer - rig.timed.store_cpu_s) / footage_s * 3600,
        "feeder_cpu_s_per_hour": feeder / footage_s * 3600,
        "write_ms_p50": 1000 * percentile([w.elapsed_s for w in writes], 50),
        "write_ms_p99": 1000 * percentile([w.elapsed_s for w in writes], 99),
        "packets_dropped": stats.packets_dropped, "faults": len(rig.events.faults),
        "video_frames_recorded": sum(r["video_frames"] for r in records),
        "video_frames_fed": sum(1 for _, p in packets if p.kind == "video"),
        "fmp4_overhead_pct": 100 * (stats.bytes_written - video_bytes - audio_bytes) / (video_bytes + audio_bytes),
    }


# --- 1. the same footage through ffmpeg + age + sha256sum ------------------------------------------


def adts_header(size: int, sample_rate: int = SAMPLE_RATE, channels: int = 1) -> bytes:
    """A 7-byte ADTS header (AAC-LC, no CRC) for a raw AAC frame of `size` bytes."""
    rates = [96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350]
    n = size + 7
    sf = rates.index(sample_rate)
    return bytes([0xFF, 0xF1, (1 << 6) | (sf << 2) | (channels >> 2), ((channels & 3) << 6) | (n >> 11),
                  (n >> 3) & 0xFF, ((n & 7) << 5) | 0x1F, 0xFC])


def stage_elementary_streams(clip: Clip, footage_s: float, folder: Path) -> tuple[Path, Path]:
    """The same footage as raw Annex B H.264 and ADTS AAC files (what `rpicam-vid -o -` style tools give)."""
    folder.mkdir(parents=True, exist_ok=True)
    video_path, audio_path = folder / "footage.h264", folder / "footage.aac"
    timeline = Timeline(clip)
    with open(video_path, "wb") as v, open(audio_path, "wb") as a:
        for _at, p in timeline.packets(footage_s):
            if p.kind == "video":
                v.write(p.data)
            else:
                a.write(adts_header(len(p.data)) + p.data)
    return video_path, audio_path


SHELL_SEGMENT = r"""
set -euo pipefail
ffmpeg -nostdin -v error -fflags +genpts -framerate "$FPS" -f h264 -i "$VIDEO" -f aac -i "$AUDIO" \
  -map 0:v -map 1:a -c copy -f segment -segment_time 60 -segment_format mp4 \
  -segment_format_options movflags=+frag_keyframe+empty_moov+default_base_moof "$PLAIN/seg-%04d.mp4"
"""
SHELL_ENCRYPT = r"""
set -euo pipefail
for f in "$PLAIN"/*.mp4; do
  o="$OUT/$(basename "$f" .mp4).age"
  age -r "$RECIPIENT" < "$f" > "$o"
  sync "$o"
done
"""
SHELL_HASH = r"""
set -euo pipefail
for f in "$PLAIN"/*.mp4; do
  sha256sum "$f" "$OUT/$(basename "$f" .mp4).age"
done > "$OUT/SHA256SUMS"
"""


def run_theirs(video: Path, audio: Path, plain: Path, out: Path, keys: BenchKeys, footage_s: float) -> dict[str, Any]:
    plain.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    env = {"VIDEO": str(video), "AUDIO": str(audio), "PLAIN": str(plain), "OUT": str(out), "FPS": str(FPS),
           "RECIPIENT": str(keys.identity.recipient)}
    steps = {"ffmpeg": run_shell(SHELL_SEGMENT, env), "age": run_shell(SHELL_ENCRYPT, env),
             "sha256sum": run_shell(SHELL_HASH, env)}
    result: dict[str, Any] = {k: sum(s[k] for s in steps.values()) for k in ("wall_s", "cpu_user_s", "cpu_sys_s",
                                                                             "cpu_s")}
    for name, s in steps.items():
        result[f"{name}_cpu_s_per_hour"] = s["cpu_s"] / footage_s * 3600
        result[f"{name}_wall_s"] = s["wall_s"]
    result["segments"] = len(list(plain.glob("*.mp4")))
    result["cpu_s_per_footage_hour"] = result["cpu_s"] / footage_s * 3600
    result["on_disk_bytes"] = sum(p.stat().st_size for p in out.glob("*.age"))
    return result


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        out[key] = statistics.median(values) if isinstance(values[0], (int, float)) else values[0]
    out["repeats"] = len(runs)
    return out


# --- 2. start latency ------------------------------------------------------------------------------


def run_start_trials(clip: Clip, trials: int, work: Path, keys: BenchKeys, seed: int) -> dict[str, Any]:
    """Per trial: fill the pre-event ring (fed fast), then feed live in real time, press at a random point
    of a GOP, keep feeding until the fragment holding the first live packet is durable, stop."""
    rng = random.Random(seed)
    rig = Rig.open(work, keys, clip)
    ring_s = rig.pipeline.config.pre_event_seconds
    timeline = Timeline(clip)
    rows: list[dict[str, float]] = []
    try:
        for n in range(trials):
            timeline.skip_to_keyframe()
            submit_fast(rig.pipeline, timeline.packets(ring_s + 1.0))
            if not rig.pipeline.flush(30):
                raise RuntimeError("pipeline did not drain the fill")
            ring = rig.pipeline.stats()
            rig.events.started_event.clear()
            writes_before = len(rig.timed.writes)
            anchor_media, anchor_wall = timeline.media_us, time.perf_counter() + 0.02
            press_after_s = rng.uniform(0.2, 1.2)  # lands anywhere in a 1 s GOP
            press: dict[str, float] = {}

            def live_written(press: dict[str, float] = press, writes_before: int = writes_before,
                             anchor_media: int = anchor_media, anchor_wall: float = anchor_wall,
                             press_after_s: float = press_after_s, session: str = f"SSTART{n:04d}") -> bool:
                """Presses once `press_after_s` of live feed has passed; true once the live fragment is durable."""
                if "wall" not in press:
                    if time.perf_counter() - anchor_wall < press_after_s:
                        return False
                    press["media"] = anchor_media + int((time.perf_counter() - anchor_wall) * 1e6)
                    press["wall"] = time.perf_counter()
                    rig.pipeline.start_session(session, at_us=int(press["media"]))
                    return False
                return any(w.info is not None and w.info.last_pts_us >= press["media"]
                           for w in rig.timed.writes[writes_before:])

            submit_paced(rig.pipeline, timeline.packets(6.0), anchor_media, anchor_wall, until=live_written)
            rig.pipeline.stop_session()
            if not rig.pipeline.flush(30):
                raise RuntimeError("pipeline did not finish a start trial")
            writes = rig.timed.writes[writes_before:]
            live = next(w for w in writes if w.info is not None and w.info.last_pts_us >= press["media"])
            ring_writes = [w for w in writes if w.info is not None and w.info.last_pts_us < press["media"]]
            started_at = rig.events.started[-1][0]
            rows.append({
                "started_ms": 1000 * (started_at - press["wall"]),
                "ring_written_ms": 1000 * (ring_writes[-1].done_s - press["wall"]) if ring_writes else 0.0,
                "live_written_ms": 1000 * (live.done_s - press["wall"]),
                "ring_fragments": len(ring_writes), "ring_mb": ring.ring_bytes / 1e6, "ring_s": ring.ring_seconds,
                "live_gop_left_ms": (live.info.last_pts_us - press["media"]) / 1000 if live.info else 0.0,
            })
    finally:
        rig.close()

    def dist(key: str) -> dict[str, float]:
        values = [r[key] for r in rows]
        return {"p50": percentile(values, 50), "p99": percentile(values, 99), "max": max(values)}

    return {"trials": len(rows), "ring_seconds_config": ring_s,
            "ring_mb_median": statistics.median(r["ring_mb"] for r in rows),
            "ring_fragments_median": statistics.median(r["ring_fragments"] for r in rows),
            "press_to_started_ms": dist("started_ms"), "press_to_ring_written_ms": dist("ring_written_ms"),
            "press_to_live_written_ms": dist("live_written_ms"),
            "live_fragment_media_after_press_ms": dist("live_gop_left_ms")}


# --- 3. memory: a child process per ring size --------------------------------------------------------


def rss_child(args: argparse.Namespace) -> None:
    """Fresh process: READY with the ring filling, full, then recording; anonymous RSS at each stage."""
    clip = load_clip(Path(args.cache), args.clip_seconds, args.bitrate, from_file=True)
    keys = BenchKeys.create(Path(args.dir) / "keys")
    rig = Rig.open(Path(args.dir) / "data", keys, clip, pre_event_seconds=args.rss_ring)
    timeline = Timeline(clip, copy=True)
    out: dict[str, Any] = {"ring_seconds": args.rss_ring, "rss_anon_ready_empty": proc_status("RssAnon")}
    submit_fast(rig.pipeline, timeline.packets(args.rss_ring + 15))
    rig.pipeline.flush(60)
    stats = rig.pipeline.stats()
    out.update({"rss_anon_ring_full": proc_status("RssAnon"), "ring_bytes": stats.ring_bytes,
                "ring_buffered_s": stats.ring_seconds})
    submit_fast(rig.pipeline, timeline.packets(30))  # the ring keeps evicting: memory must not grow
    rig.pipeline.flush(60)
    out["rss_anon_ring_full_later"] = proc_status("RssAnon")
    rig.pipeline.start_session("SRSS", at_us=timeline.media_us)
    submit_fast(rig.pipeline, timeline.packets(30))
    rig.pipeline.flush(60)
    out["rss_anon_recording"] = proc_status("RssAnon")
    out["vm_hwm"] = proc_status("VmHWM")
    rig.close()
    print(json.dumps(out))


def run_rss(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    rows = []
    for ring in args.rss_rings:
        child_dir = work / f"rss-{ring:g}"
        cmd = [sys.executable, __file__, "--rss-child", "--rss-ring", str(ring), "--dir", str(child_dir),
               "--cache", args.cache, "--clip-seconds", str(args.clip_seconds), "--bitrate", str(args.bitrate)]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if run.returncode != 0:
            raise RuntimeError(f"rss child failed: {run.stderr[-2000:]}")
        row = json.loads(run.stdout.strip().splitlines()[-1])
        row["ring_cost_bytes"] = row["rss_anon_ring_full"] - row["rss_anon_ready_empty"]
        rows.append(row)
        shutil.rmtree(child_dir, ignore_errors=True)
    return rows


# --- 4. real time, quiet and loaded ----------------------------------------------------------------


def start_cpu_hogs(n: int, seconds: float) -> tuple[str, list[subprocess.Popen]]:
    """N processes that keep a core busy each and end by themselves after `seconds`."""
    if shutil.which("stress-ng"):
        proc = subprocess.Popen(["stress-ng", "--cpu", str(n), "--cpu-method", "matrixprod", "--timeout",
                                 f"{int(seconds)}s", "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return f"stress-ng --cpu {n} --cpu-method matrixprod", [proc]
    hog = f"import time\nend = time.monotonic() + {seconds:f}\nwhile time.monotonic() < end:\n    pass\n"
    return f"{n} busy Python processes", [subprocess.Popen([sys.executable, "-c", hog]) for _ in range(n)]


REALTIME_WARMUP_S = 3.0  # the ring drain at the press is over by then; CPU and "steady" latency start here


def run_realtime(clip: Clip, seconds: float, work: Path, keys: BenchKeys, load: int) -> dict[str, Any]:
    """Fill the ring, press, record `seconds` paced in real time; with `load` busy processes alongside.

    CPU is taken from REALTIME_WARMUP_S after the press to the end (steady recording, the press's ring
    burst excluded: it is in the start-latency figure), per thread: the writer thread, and the feeding
    thread (which stands in for the camera and microphone callbacks: a sleep and a submit per packet).
    """
    expected = int((seconds + 40) * (FPS + SAMPLE_RATE / AAC_FRAME)) + 1000
    rig = Rig.open(work, keys, clip, latency_samples=min(1_000_000, expected))
    timeline = Timeline(clip, copy=True)
    ring_s = rig.pipeline.config.pre_event_seconds
    hogs: list[subprocess.Popen] = []
    load_desc = "none"
    marks: dict[str, Any] = {}
    try:
        submit_fast(rig.pipeline, timeline.packets(ring_s + 1.0))
        rig.pipeline.flush(30)
        before = rig.pipeline.stats()
        fill_samples = len(before.writer_latency_us)
        writes_before = len(rig.timed.writes)
        if load:
            load_desc, hogs = start_cpu_hogs(load, seconds + REALTIME_WARMUP_S + 15)
            time.sleep(2.0)  # let the hogs get going
        load0 = os.getloadavg()[0]
        anchor_media, anchor_wall = timeline.media_us, time.perf_counter() + 0.05
        writer_id = rig.writer_native_id

        def mark_warm() -> bool:
            if "cpu" not in marks and time.perf_counter() - anchor_wall >= REALTIME_WARMUP_S:
                marks.update(cpu=cpu_seconds(), writer=thread_cpu(writer_id), feeder=time.thread_time(),
                             wall=time.perf_counter(), samples=len(rig.pipeline.stats().writer_latency_us),
                             writes=len(rig.timed.writes))
            return False

        rig.pipeline.start_session("SREAL", at_us=anchor_media)
        feed = submit_paced(rig.pipeline, timeline.packets(seconds + REALTIME_WARMUP_S), anchor_media, anchor_wall,
                            until=mark_warm)
        u1, s1 = cpu_seconds()
        writer1, feeder1, wall1 = thread_cpu(writer_id), time.thread_time(), time.perf_counter()
        rig.pipeline.stop_session()
        rig.pipeline.flush(60)
        load1 = os.getloadavg()[0]
    finally:
        for h in hogs:
            if h.poll() is None:
                h.terminate()
            try:
                h.wait(10)
            except subprocess.TimeoutExpired:
                h.kill()
    stats = rig.pipeline.stats()
    rig.close()
    all_samples = [x / 1000 for x in stats.writer_latency_us[fill_samples:]]  # ms, packets since the press
    steady = [x / 1000 for x in stats.writer_latency_us[marks["samples"]:]]
    writes = [w.elapsed_s * 1000 for w in rig.timed.writes[marks["writes"]:]]
    ring_writes = [w.elapsed_s * 1000 for w in rig.timed.writes[writes_before:writes_before + before.ring_gops]]
    accounted = stats.packets_out + stats.ring_evicted_packets + stats.packets_lost_to_storage + sum(
        stats.discarded.values())
    live = wall1 - marks["wall"]
    u0, s0 = marks["cpu"]
    cpu = (u1 - u0) + (s1 - s0)
    return {
        "seconds": live, "load": load_desc, "loadavg_1min_start": load0, "loadavg_1min_end": load1,
        "packets_submitted": feed.submitted + feed.dropped, "packets_dropped": stats.packets_dropped,
        "overflow_episodes": stats.overflow_episodes, "queue_max_live": feed.max_queue_depth,
        "queue_capacity": stats.queue_capacity, "faults": stats.faults,
        "packets_unaccounted": stats.packets_in - accounted,
        "latency_samples": len(all_samples),
        "latency_ms_p50": percentile(all_samples, 50), "latency_ms_p99": percentile(all_samples, 99),
        "latency_ms_p999": percentile(all_samples, 99.9), "latency_ms_max": max(all_samples),
        "steady_latency_ms_p99": percentile(steady, 99), "steady_latency_ms_max": max(steady),
        "write_ms_p50": percentile(writes, 50), "write_ms_p99": percentile(writes, 99), "write_ms_max": max(writes),
        "ring_burst_write_ms": sum(ring_writes),
        "cpu_s": cpu, "cpu_s_per_footage_hour": cpu / live * 3600,
        "writer_cpu_s_per_hour": (writer1 - marks["writer"]) / live * 3600,
        "feeder_cpu_s_per_hour": (feeder1 - marks["feeder"]) / live * 3600,
    }


# --- main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--footage", type=float, default=600.0, help="seconds of footage for the CPU figure (default 600)")
    p.add_argument("--repeat", type=int, default=3, help="runs of the CPU comparison; medians reported")
    p.add_argument("--clip-seconds", type=int, default=120, help="seconds of distinct encoded footage (default 120)")
    p.add_argument("--bitrate", type=int, default=8_000_000, help="H.264 target bit/s (default 8000000)")
    p.add_argument("--starts", type=int, default=50, help="start-latency trials (default 50)")
    p.add_argument("--realtime", type=float, default=60.0, help="seconds of each real-time run (default 60)")
    p.add_argument("--load", type=int, default=len(os.sched_getaffinity(0)),
                   help="busy processes in the loaded real-time run (default: one per core; 0 skips it)")
    p.add_argument("--rss-rings", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 30.0, 120.0],
                   help="pre-event ring sizes for the memory figure (default 0,30,120)")
    p.add_argument("--shell", action=argparse.BooleanOptionalAction, default=True,
                   help="compare with ffmpeg + age + sha256sum (default on)")
    p.add_argument("--only", help="comma-separated parts to run: cpu,start,rss,realtime (default all)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 60 s footage, 1 repeat, 5 starts, 10 s real time")
    p.add_argument("--cache", default="/var/tmp/bwc-bench-cache", help="where the encoded clip is kept")
    p.add_argument("--dir", help="where to write (a disk, not tmpfs); default a temp dir under /var/tmp")
    p.add_argument("--shm", default="/dev/shm", help="RAM filesystem for the shell pipeline's plaintext")
    p.add_argument("--keep", action="store_true", help="keep the written files")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", help="also write the figures as JSON to this file")
    p.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rss-ring", type=float, default=30.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.footage, args.repeat, args.starts, args.realtime = 60.0, 1, 5, 10.0
        args.clip_seconds = min(args.clip_seconds, 10)
        args.rss_rings = [0.0, 30.0]
    if args.clip_seconds < 1 or args.footage < 1 or args.repeat < 1 or args.starts < 1 or args.realtime < 1:
        p.error("--clip-seconds, --footage, --repeat, --starts and --realtime must be at least 1")
    args.parts = chosen_parts(p, args.only, ("cpu", "start", "rss", "realtime"))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rss_child:
        rss_child(args)
        return 0
    work, shm = work_dirs(args, "capture")
    machine = machine_info(work)
    machine["plaintext_fs"] = filesystem_type(shm)
    machine["ffmpeg"] = subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True).stdout.split("\n")[0] \
        if shutil.which("ffmpeg") else "not installed"
    machine["stress_ng"] = "installed" if shutil.which("stress-ng") else "not installed"
    if machine["data_fs"] == "tmpfs":
        print("warning: --dir is on tmpfs; fsync costs nothing there", file=sys.stderr)
    keys = BenchKeys.create(work / "keys")
    clip = load_clip(Path(args.cache), args.clip_seconds, args.bitrate)
    report: dict[str, Any] = {
        "bench": "capture", "command": command_line(), "machine": machine,
        "clip": {"seconds": clip.seconds, "width": WIDTH, "height": HEIGHT, "fps": FPS,
                 "video_mbit_s": clip.video_bitrate / 1e6, "audio_kbit_s": clip.audio_bitrate / 1e3,
                 "keyframe_kb_median": statistics.median(s for _, s, k in clip.video if k) / 1e3,
                 "other_frame_kb_median": statistics.median(s for _, s, k in clip.video if not k) / 1e3},
        "pipeline_config": {k: getattr(default_pipeline_config(), k) for k in
                            ("segment_seconds", "pre_event_seconds", "pre_event_audio", "queue_packets")},
    }
    has_tools = all(shutil.which(t) for t in ("ffmpeg", "age", "sha256sum"))
    if args.shell and not has_tools:
        print("warning: ffmpeg, age or sha256sum missing; no shell comparison", file=sys.stderr)
    try:
        if "cpu" in args.parts:
            staged = stage_elementary_streams(clip, args.footage, shm / "in") if args.shell and has_tools else None
            ours, theirs = [], []
            for r in range(args.repeat):
                ours.append(run_ours_throughput(clip, args.footage, work / f"ours-{r}", keys))
                if staged is not None:
                    theirs.append(run_theirs(*staged, shm / f"plain-{r}", work / f"theirs-{r}", keys, args.footage))
                    shutil.rmtree(shm / f"plain-{r}", ignore_errors=True)
                if not args.keep:
                    shutil.rmtree(work / f"ours-{r}", ignore_errors=True)
                    shutil.rmtree(work / f"theirs-{r}", ignore_errors=True)
                print(f"  cpu run {r + 1}/{args.repeat} done", file=sys.stderr)
            cpu: dict[str, Any] = {"ours": median_of(ours)}
            if theirs:
                cpu["theirs"] = median_of(theirs)
                cpu["ratio_cpu"] = cpu["ours"]["cpu_s"] / cpu["theirs"]["cpu_s"]
                cpu["ratio_wall"] = cpu["ours"]["wall_s"] / cpu["theirs"]["wall_s"]
            report["cpu"] = cpu
            shutil.rmtree(shm / "in", ignore_errors=True)
        if "start" in args.parts:
            report["start"] = run_start_trials(clip, args.starts, work / "start", keys, args.seed)
            print("  start trials done", file=sys.stderr)
            if not args.keep:
                shutil.rmtree(work / "start", ignore_errors=True)
        if "rss" in args.parts:
            report["rss"] = run_rss(args, work)
            print("  memory done", file=sys.stderr)
        if "realtime" in args.parts:
            rows = [run_realtime(clip, args.realtime, work / "rt-quiet", keys, 0)]
            print("  real-time run (quiet) done", file=sys.stderr)
            if args.load:
                rows.append(run_realtime(clip, args.realtime, work / "rt-loaded", keys, args.load))
                print("  real-time run (loaded) done", file=sys.stderr)
            report["realtime"] = rows
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        if args.keep:
            print(f"  kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def print_report(report: dict[str, Any]) -> None:
    m, c = report["machine"], report["clip"]
    print(f"$ {report['command']}")
    print(f"{m['date_utc']}  {m['nproc']} CPUs  {m['cpu_model']}  Python {m['python']}  "
          f"cryptography {m['cryptography']}  age {m['age_cli']}  {m['ffmpeg']}  data on {m['data_fs']}  "
          f"load {m['loadavg_at_start']:.2f}  code {m['code']}")
    print(f"clip: {c['seconds']:.0f} s of {c['width']}x{c['height']}p{c['fps']} H.264 at {c['video_mbit_s']:.2f} "
          f"Mbit/s (keyframes {c['keyframe_kb_median']:.0f} kB, other frames {c['other_frame_kb_median']:.0f} kB "
          f"median) + AAC {c['audio_kbit_s']:.0f} kbit/s; pipeline {report['pipeline_config']}")
    if "cpu" in report:
        o = report["cpu"]["ours"]
        print_table(f"CPU per hour of footage: CapturePipeline -> EvidenceStore, {o['footage_s']:.0f} s of footage fed "
                    f"as fast as it drains, {o['repeats']} run(s), medians",
                    ["CPU s/h", "user s", "sys s", "writer s/h", "(store", "mux+rest)", "feeder s/h", "x real time",
                     "MB/s", "segments", "write p50 ms", "p99 ms", "dropped", "frames fed", "recorded"],
                    [[o["cpu_s_per_footage_hour"], o["cpu_user_s"], o["cpu_sys_s"], o["writer_cpu_s_per_hour"],
                      o["store_cpu_s_per_hour"], o["mux_and_rest_cpu_s_per_hour"], o["feeder_cpu_s_per_hour"],
                      o["x_real_time"], o["mb_per_s"], o["segments"], o["write_ms_p50"], o["write_ms_p99"],
                      o["packets_dropped"], o["video_frames_fed"], o["video_frames_recorded"]]])
        if "theirs" in report["cpu"]:
            t = report["cpu"]["theirs"]
            print_table("Side by side, same footage: ffmpeg -c copy -f segment (fMP4, 60 s) ; age -r R ; sync ; "
                        "sha256sum plain cipher",
                        ["ours CPU s/h", "theirs CPU s/h", "(ffmpeg", "age", "sha256sum)", "CPU ours/theirs",
                         "ours wall s", "theirs wall s", "wall ours/theirs", "their segments"],
                        [[o["cpu_s_per_footage_hour"], t["cpu_s_per_footage_hour"], t["ffmpeg_cpu_s_per_hour"],
                          t["age_cpu_s_per_hour"], t["sha256sum_cpu_s_per_hour"], report["cpu"]["ratio_cpu"],
                          o["wall_s"], t["wall_s"], report["cpu"]["ratio_wall"], t["segments"]]])
    if "start" in report:
        s = report["start"]
        print_table(f"Start latency, {s['trials']} presses, {s['ring_seconds_config']:g} s pre-event ring full "
                    f"({s['ring_mb_median']:.1f} MB, {s['ring_fragments_median']:.0f} fragments), live feed in "
                    "real time",
                    ["from the press to", "p50 ms", "p99 ms", "max ms"],
                    [[label, s[key]["p50"], s[key]["p99"], s[key]["max"]] for label, key in (
                        ("recording_started (1st fragment durable)", "press_to_started_ms"),
                        ("whole pre-event ring durable", "press_to_ring_written_ms"),
                        ("fragment with 1st live packet durable", "press_to_live_written_ms"),
                        ("(media in that fragment after the press)", "live_fragment_media_after_press_ms"))])
    if "rss" in report:
        print_table("Memory (anonymous RSS of a fresh process; payloads copied per packet as a camera hands them over)",
                    ["ring s", "ring MB held", "RssAnon ready+empty MB", "ring full MB", "+30 s later MB",
                     "recording MB", "ring cost MB", "peak VmHWM MB (incl. libraries)"],
                    [[r["ring_seconds"], r["ring_bytes"] / 1e6, r["rss_anon_ready_empty"] / 1e6,
                      r["rss_anon_ring_full"] / 1e6, r["rss_anon_ring_full_later"] / 1e6,
                      r["rss_anon_recording"] / 1e6, r["ring_cost_bytes"] / 1e6, r["vm_hwm"] / 1e6]
                     for r in report["rss"]])
    if "realtime" in report:
        print_table("Real time (ring filled, press, paced at 30 fps): writer latency = submit() -> packet handled; "
                    f"'steady' and CPU from {REALTIME_WARMUP_S:g} s after the press",
                    ["load", "s", "loadavg", "packets", "dropped", "queue max", "lat p50 ms", "p99 ms", "p99.9 ms",
                     "max ms", "steady p99", "steady max", "write p50 ms", "write p99 ms", "ring burst ms",
                     "CPU s/h", "(writer", "feeder)", "unaccounted"],
                    [[r["load"], r["seconds"], r["loadavg_1min_end"], r["packets_submitted"], r["packets_dropped"],
                      f"{r['queue_max_live']}/{r['queue_capacity']}", r["latency_ms_p50"], r["latency_ms_p99"],
                      r["latency_ms_p999"], r["latency_ms_max"], r["steady_latency_ms_p99"],
                      r["steady_latency_ms_max"], r["write_ms_p50"], r["write_ms_p99"], r["ring_burst_write_ms"],
                      r["cpu_s_per_footage_hour"], r["writer_cpu_s_per_hour"], r["feeder_cpu_s_per_hour"],
                      r["packets_unaccounted"]] for r in report["realtime"]])


if __name__ == "__main__":
    sys.exit(main())
