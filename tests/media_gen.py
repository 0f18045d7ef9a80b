"""Real encoded media for tests: H.264 from PyAV libx264 and AAC from PyAV's aac encoder, as EncodedPackets.

Not a simulator of the camera (that is hw_sim); this only makes real packets quickly, without real-time
pacing, on a synthetic monotonic clock. Every picture carries its frame number as a 16-bit code of
black/white blocks in the top band, so a decoded frame proves which frame it is (`read_frame_number`).
Encoded payloads are cached per process; longer timelines reuse them cyclically (whole GOPs), with
timestamps assigned afresh.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from agent.capture.fmp4 import parameter_sets
from agent.capture.packets import AudioParams, EncodedPacket, VideoParams

WIDTH, HEIGHT, FPS, GOP = 320, 240, 30, 30
SAMPLE_RATE, AAC_FRAME = 48_000, 1024
CODE_BITS, CODE_BLOCK = 16, 16  # 16 bits, each a 16x32 block, left to right from x=32 in rows 0..31
T0_US = 5_000_000_000  # an arbitrary monotonic start, far from zero


def _picture(i: int, width: int, height: int) -> np.ndarray:
    """A yuv420p picture (as one (h*3/2, w) plane array) showing frame number `i`."""
    y = np.empty((height, width), np.uint8)
    ramp = (np.arange(width, dtype=np.int32) * 2 + i * 4) % 200 + 28
    y[:] = ramp.astype(np.uint8)
    x0 = (i * 3) % (width - 40)
    y[height // 2: height // 2 + 40, x0: x0 + 40] = 230  # a moving square
    y[:32, :] = 128
    for bit in range(CODE_BITS):
        value = 235 if (i >> (CODE_BITS - 1 - bit)) & 1 else 16
        y[:32, 32 + bit * CODE_BLOCK: 32 + (bit + 1) * CODE_BLOCK] = value
    chroma = np.full((height // 2, width), 128, np.uint8)
    return np.vstack([y, chroma])


def read_frame_number(gray: np.ndarray) -> int:
    """The frame number drawn by `_picture`, read back from a decoded luma plane."""
    n = 0
    for bit in range(CODE_BITS):
        x = 32 + bit * CODE_BLOCK
        n = (n << 1) | int(gray[8:24, x + 4: x + CODE_BLOCK - 4].mean() > 128)
    return n


@functools.lru_cache(maxsize=4)
def encoded_video(frames: int, width: int = WIDTH, height: int = HEIGHT, fps: int = FPS,
                  gop: int = GOP) -> tuple[VideoParams, tuple[tuple[bytes, bool], ...]]:
    """`frames` H.264 access units (Annex B, no B-frames, IDR every `gop` frames) and their parameters."""
    ctx = av.CodecContext.create("libx264", "w")
    ctx.width, ctx.height, ctx.pix_fmt = width, height, "yuv420p"
    ctx.time_base, ctx.framerate = Fraction(1, fps), Fraction(fps, 1)
    ctx.options = {"preset": "ultrafast", "tune": "zerolatency",
                   "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=0"}
    out: list[tuple[bytes, bool]] = []
    for i in range(frames):
        frame = av.VideoFrame.from_ndarray(_picture(i, width, height), format="yuv420p")
        frame.pts = i
        out += [(bytes(p), bool(p.is_keyframe)) for p in ctx.encode(frame)]
    out += [(bytes(p), bool(p.is_keyframe)) for p in ctx.encode(None)]
    if len(out) != frames or not out[0][1]:
        raise RuntimeError(f"encoder produced {len(out)} packets for {frames} frames")
    sps, pps = parameter_sets(out[0][0])
    assert sps and pps
    return VideoParams(width, height, fps, sps, pps), tuple(out)


@functools.lru_cache(maxsize=4)
def encoded_audio(frames: int, sample_rate: int = SAMPLE_RATE) -> tuple[AudioParams, tuple[bytes, ...]]:
    """`frames` raw AAC-LC frames (mono, 1024 samples each) of a tone, and the AudioSpecificConfig."""
    ctx = av.CodecContext.create("aac", "w")
    ctx.sample_rate, ctx.layout, ctx.format, ctx.bit_rate = sample_rate, "mono", "fltp", 64_000
    ctx.open()
    out: list[bytes] = []
    t = np.arange(AAC_FRAME, dtype=np.float64)
    for j in range(frames):
        pcm = (0.2 * np.sin(2 * np.pi * 440 * (t + j * AAC_FRAME) / sample_rate)).astype(np.float32)
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = sample_rate, j * AAC_FRAME
        out += [bytes(p) for p in ctx.encode(frame)]
    out += [bytes(p) for p in ctx.encode(None)]
    if len(out) < frames:
        raise RuntimeError(f"AAC encoder produced {len(out)} packets for {frames} frames")
    return AudioParams(sample_rate, 1, bytes(ctx.extradata), AAC_FRAME), tuple(out[:frames])


@dataclass
class Media:
    video_params: VideoParams
    audio_params: AudioParams
    video: list[EncodedPacket]
    audio: list[EncodedPacket]


def video_pts(i: int, t0_us: int = T0_US, fps: int = FPS) -> int:
    return t0_us + i * 1_000_000 // fps


def make_media(seconds: float, t0_us: int = T0_US, audio_ppm: float = 0.0, distinct_frames: int | None = None,
               fps: int = FPS) -> Media:
    """`seconds` of A/V on one synthetic clock starting at `t0_us`.

    `distinct_frames` limits how many different pictures are encoded (payloads then repeat whole GOPs;
    frame numbers repeat too). `audio_ppm` > 0 makes the microphone's clock run fast: its frames are
    stamped that much closer together on the shared clock, as a real sound card's would be.
    """
    n_video = int(round(seconds * fps))
    distinct = n_video if distinct_frames is None else min(n_video, distinct_frames)
    distinct = -(-distinct // GOP) * GOP
    vparams, vdata = encoded_video(distinct, fps=fps)
    video = []
    for i in range(n_video):
        data, key = vdata[i % distinct]
        pts = video_pts(i, t0_us, fps)
        video.append(EncodedPacket("video", data, pts, video_pts(i + 1, t0_us, fps) - pts, key, i))
    frame_us = AAC_FRAME * 1_000_000 / SAMPLE_RATE * (1 - audio_ppm * 1e-6)
    n_audio = int(seconds * SAMPLE_RATE // AAC_FRAME)
    aparams, adata = encoded_audio(min(n_audio, 2 * SAMPLE_RATE * 60 // AAC_FRAME))
    audio = []
    for j in range(n_audio):
        pts = t0_us + round(j * frame_us)
        audio.append(EncodedPacket("audio", adata[j % len(adata)], pts, round(frame_us), True, j))
    return Media(vparams, aparams, video, audio)


def arrival_order(media: Media, audio_lag_us: int = 0, video_lag_us: int = 0) -> list[EncodedPacket]:
    """Packets in the order they would reach the pipeline when each source delivers with a fixed lag."""
    tagged = [(p.pts_us + video_lag_us, 0, p) for p in media.video]
    tagged += [(p.pts_us + audio_lag_us, 1, p) for p in media.audio]
    tagged.sort(key=lambda t: (t[0], t[1]))
    return [p for _, _, p in tagged]
