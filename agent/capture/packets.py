"""The data that flows from the encoders to the segmenter: encoded packets on one monotonic media clock.

Every source (picamera2, OpenCV+PyAV, PyAudio+PyAV, and hw_sim's fakes) produces these; the
segmenter and muxer consume them. Timestamps are microseconds on the shared monotonic clock
(`Clock.mono_us`), so audio is routed by timestamp, never by arrival order (DESIGN.md, "Recording").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class VideoParams:
    width: int
    height: int
    fps: int
    sps: bytes  # H.264 sequence parameter set NAL unit, without start code
    pps: bytes  # H.264 picture parameter set NAL unit, without start code


@dataclass(frozen=True)
class AudioParams:
    sample_rate: int
    channels: int
    asc: bytes  # AAC AudioSpecificConfig (2+ bytes), as carried in the MP4 esds box
    frame_samples: int = 1024


@dataclass(frozen=True)
class EncodedPacket:
    kind: Literal["video", "audio"]
    data: bytes  # video: one H.264 access unit in Annex B form; audio: one raw AAC frame (no ADTS header)
    pts_us: int  # presentation time on the shared monotonic media clock
    duration_us: int
    keyframe: bool  # video: IDR access unit (starts a GOP); audio: always True
    seq: int = 0  # per-kind running number assigned by the source (lets tests prove nothing was lost)
