"""Fragmented MP4 (ISO/IEC 14496-12) muxing of H.264 + AAC, written for this project.

Thread: used only by the capture writer thread (one muxer per session timeline); not thread-safe.

Layout of every segment file (docs/FORMAT.md, "Media"):

    ftyp                                   isom, minor 0x200; compatible isom iso5 iso6 avc1 mp41
    moov
      mvhd                                 timescale 1000, duration 0 (fragmented), next_track_ID 3
      trak (video, track_ID 1)
        tkhd                               flags 3 (enabled, in movie), width/height 16.16
        mdia
          mdhd                             timescale 90000, language und
          hdlr                             vide
          minf
            vmhd, dinf(dref(url  self-contained))
            stbl: stsd(avc1(avcC)), empty stts/stsc/stsz/stco
      trak (audio, track_ID 2)             only when the session has audio
        tkhd, mdia(mdhd timescale = sample rate, hdlr soun, minf(smhd, dinf, stbl(stsd(mp4a(esds)), ...)))
      mvex: trex per track                 default sample description 1, no other defaults
    then per fragment (one per GOP):
    moof
      mfhd                                 sequence_number, increasing across the whole session
      traf (video)
        tfhd                               flags 0x020000 default-base-is-moof
        tfdt                               version 1, baseMediaDecodeTime = pts - session start (90 kHz)
        trun                               flags 0x000701: data offset, per-sample duration, size, flags
      traf (audio)                         omitted when the fragment has no audio
        tfhd                               flags 0x020020: default-base-is-moof, default sample flags (sync)
        tfdt                               version 1, in samples at the sample rate
        trun                               flags 0x000301: data offset, per-sample duration, size
    mdat                                   video samples of the fragment, then its audio samples

H.264 access units arrive in Annex B form and are stored as 4-byte length-prefixed NAL units. Access
unit delimiters are dropped (MP4 sample boundaries already delimit access units) and so are SPS/PPS
identical to the ones in avcC (the decoder has them from the sample entry; every segment repeats the
init). A parameter set that differs from avcC is kept in the sample, so nothing the encoder said is lost
and decoders (which accept in-band parameter sets) follow it.

Time: decode time = presentation time (sources guarantee no B-frames). Video times are each packet's
own pts converted to 90 kHz, so the video track never drifts from the media clock. Audio keeps a running
sample count (gapless, 1024-sample steps) and is re-anchored to the packet's pts whenever the two differ
by more than half a frame (a gap in capture, or a microphone clock that runs fast or slow), so audio
stays within one audio frame of video for any length of session.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from agent.capture.packets import AudioParams, EncodedPacket, VideoParams
from agent.storage.segment_writer import FragmentInfo

VIDEO_TRACK_ID = 1
AUDIO_TRACK_ID = 2
VIDEO_TIMESCALE = 90_000
MOVIE_TIMESCALE = 1000

NAL_SEI, NAL_IDR, NAL_SPS, NAL_PPS, NAL_AUD = 6, 5, 7, 8, 9

# Sample flags (14496-12 8.8.3.1): sample_depends_on=2 marks a sync sample; =1 plus
# sample_is_non_sync_sample marks a frame that needs earlier ones.
SYNC_SAMPLE_FLAGS = 0x0200_0000
NON_SYNC_SAMPLE_FLAGS = 0x0101_0000

TFHD_DEFAULT_SAMPLE_FLAGS = 0x00_0020
TFHD_DEFAULT_BASE_IS_MOOF = 0x02_0000
TRUN_DATA_OFFSET = 0x00_0001
TRUN_SAMPLE_DURATION = 0x00_0100
TRUN_SAMPLE_SIZE = 0x00_0200
TRUN_SAMPLE_FLAGS = 0x00_0400

UNITY_MATRIX = struct.pack(">9I", 0x0001_0000, 0, 0, 0, 0x0001_0000, 0, 0, 0, 0x4000_0000)
LANGUAGE_UND = ((ord("u") - 0x60) << 10) | ((ord("n") - 0x60) << 5) | (ord("d") - 0x60)


class MuxError(ValueError):
    """A packet the muxer cannot store (not H.264 Annex B, empty, or parameters missing)."""


# --- boxes -----------------------------------------------------------------------------------------


def box(kind: bytes, *payload: bytes) -> bytes:
    body = b"".join(payload)
    return struct.pack(">I4s", 8 + len(body), kind) + body


def full_box(kind: bytes, version: int, flags: int, *payload: bytes) -> bytes:
    return box(kind, struct.pack(">I", (version << 24) | flags), *payload)


def _descriptor(tag: int, body: bytes) -> bytes:
    """An MPEG-4 (14496-1) descriptor with its size in the 4-byte expandable form."""
    n = len(body)
    if n >= 1 << 28:
        raise MuxError(f"descriptor of {n} bytes is too large")
    size = bytes([0x80 | (n >> 21) & 0x7F, 0x80 | (n >> 14) & 0x7F, 0x80 | (n >> 7) & 0x7F, n & 0x7F])
    return bytes([tag]) + size + body


# --- H.264 Annex B ---------------------------------------------------------------------------------


def split_annex_b(access_unit: bytes) -> list[bytes]:
    """NAL units of an Annex B byte stream (start codes and trailing zero bytes removed)."""
    nals: list[bytes] = []
    start = access_unit.find(b"\x00\x00\x01")
    if start < 0:
        raise MuxError("video packet has no Annex B start code")
    pos = start + 3
    while True:
        nxt = access_unit.find(b"\x00\x00\x01", pos)
        end = len(access_unit) if nxt < 0 else nxt
        nal = access_unit[pos:end].rstrip(b"\x00")
        if nal:
            nals.append(nal)
        if nxt < 0:
            return nals
        pos = nxt + 3


def nal_type(nal: bytes) -> int:
    return nal[0] & 0x1F


def parameter_sets(access_unit: bytes) -> tuple[bytes | None, bytes | None]:
    """The first SPS and PPS in an access unit, if it carries them."""
    sps = pps = None
    for nal in split_annex_b(access_unit):
        if nal_type(nal) == NAL_SPS and sps is None:
            sps = nal
        elif nal_type(nal) == NAL_PPS and pps is None:
            pps = nal
    return sps, pps


def avcc_sample(access_unit: bytes, sps: bytes, pps: bytes) -> bytes:
    """An MP4 sample: the access unit's NAL units with 4-byte lengths, AUD and repeated SPS/PPS dropped."""
    out = bytearray()
    for nal in split_annex_b(access_unit):
        kind = nal_type(nal)
        if kind == NAL_AUD or (kind == NAL_SPS and nal == sps) or (kind == NAL_PPS and nal == pps):
            continue
        out += struct.pack(">I", len(nal))
        out += nal
    if not out:
        raise MuxError("video access unit holds no picture data")
    return bytes(out)


# --- init segment ----------------------------------------------------------------------------------


def _tkhd(track_id: int, audio: bool, width: int = 0, height: int = 0) -> bytes:
    return full_box(b"tkhd", 0, 0x3, struct.pack(
        ">IIIII8xhhH2x", 0, 0, track_id, 0, 0, 0, 0, 0x0100 if audio else 0), UNITY_MATRIX,
        struct.pack(">II", width << 16, height << 16))


def _mdhd(timescale: int) -> bytes:
    return full_box(b"mdhd", 0, 0, struct.pack(">IIIIH2x", 0, 0, timescale, 0, LANGUAGE_UND))


def _hdlr(handler: bytes, name: str) -> bytes:
    return full_box(b"hdlr", 0, 0, struct.pack(">I4s12x", 0, handler), name.encode() + b"\x00")


def _dinf() -> bytes:
    return box(b"dinf", full_box(b"dref", 0, 0, struct.pack(">I", 1), full_box(b"url ", 0, 1)))


def _stbl(sample_entry: bytes) -> bytes:
    return box(b"stbl",
               full_box(b"stsd", 0, 0, struct.pack(">I", 1), sample_entry),
               full_box(b"stts", 0, 0, struct.pack(">I", 0)),
               full_box(b"stsc", 0, 0, struct.pack(">I", 0)),
               full_box(b"stsz", 0, 0, struct.pack(">II", 0, 0)),
               full_box(b"stco", 0, 0, struct.pack(">I", 0)))


def _avcc(sps: bytes, pps: bytes) -> bytes:
    if len(sps) < 4:
        raise MuxError(f"SPS of {len(sps)} bytes is too short to describe a stream")
    return box(b"avcC", bytes([1, sps[1], sps[2], sps[3], 0xFF, 0xE1]), struct.pack(">H", len(sps)), sps,
               b"\x01", struct.pack(">H", len(pps)), pps)


def _avc1(video: VideoParams, sps: bytes, pps: bytes) -> bytes:
    compressor = b"\x00" * 32
    return box(b"avc1", bytes(6), struct.pack(">H", 1),  # SampleEntry: reserved, data_reference_index
               bytes(16), struct.pack(">HHIIIH", video.width, video.height, 0x0048_0000, 0x0048_0000, 0, 1),
               compressor, struct.pack(">Hh", 0x0018, -1), _avcc(sps, pps))


def _esds(audio: AudioParams) -> bytes:
    decoder_specific = _descriptor(0x05, audio.asc)
    # objectTypeIndication 0x40 = MPEG-4 Audio; streamType 5 (audio) << 2 | reserved 1 = 0x15.
    decoder_config = _descriptor(0x04, struct.pack(">BB", 0x40, 0x15) + bytes(3) + struct.pack(">II", 0, 0)
                                 + decoder_specific)
    sl_config = _descriptor(0x06, b"\x02")
    es = _descriptor(0x03, struct.pack(">HB", AUDIO_TRACK_ID, 0) + decoder_config + sl_config)
    return full_box(b"esds", 0, 0, es)


def _mp4a(audio: AudioParams) -> bytes:
    if audio.sample_rate >= 1 << 16:
        raise MuxError(f"sample rate {audio.sample_rate} does not fit an MP4 audio sample entry")
    return box(b"mp4a", bytes(6), struct.pack(">H", 1), bytes(8),
               struct.pack(">HHHHI", audio.channels, 16, 0, 0, audio.sample_rate << 16), _esds(audio))


def _trak(track_id: int, tkhd: bytes, timescale: int, handler: bytes, name: str, media_header: bytes,
          sample_entry: bytes) -> bytes:
    return box(b"trak", tkhd, box(b"mdia", _mdhd(timescale), _hdlr(handler, name),
                                  box(b"minf", media_header, _dinf(), _stbl(sample_entry))))


def _trex(track_id: int) -> bytes:
    return full_box(b"trex", 0, 0, struct.pack(">IIIII", track_id, 1, 0, 0, 0))


# --- the muxer -------------------------------------------------------------------------------------


def _ticks(us: int, timescale: int) -> int:
    return (us * timescale + 500_000) // 1_000_000


class FragmentedMp4Muxer:
    """Turns GOPs of packets into fMP4 fragments on one continuous session timeline.

    `base_pts_us` is the session's time zero; every fragment's tfdt is measured from it, so
    presentation time runs on across the segment files of a session. One muxer serves the whole
    session; each segment file starts with `init_segment()`.
    """

    def __init__(self, video: VideoParams, audio: AudioParams | None, base_pts_us: int, first_sequence: int = 1):
        if not video.sps or not video.pps:
            raise MuxError("video parameters lack SPS/PPS; cannot describe the stream in avcC")
        self.video = video
        self.audio = audio
        self.base_pts_us = base_pts_us
        self.sequence = first_sequence
        self._last_video_dts: int | None = None
        self._next_audio_dts: int | None = None

    def init_segment(self) -> bytes:
        ftyp = box(b"ftyp", b"isom", struct.pack(">I", 0x200), b"isom", b"iso5", b"iso6", b"avc1", b"mp41")
        mvhd = full_box(b"mvhd", 0, 0, struct.pack(">IIII", 0, 0, MOVIE_TIMESCALE, 0),
                        struct.pack(">IH10x", 0x0001_0000, 0x0100), UNITY_MATRIX, bytes(24),
                        struct.pack(">I", AUDIO_TRACK_ID + 1))
        traks = [_trak(VIDEO_TRACK_ID, _tkhd(VIDEO_TRACK_ID, False, self.video.width, self.video.height),
                       VIDEO_TIMESCALE, b"vide", "VideoHandler", full_box(b"vmhd", 0, 1, bytes(8)),
                       _avc1(self.video, self.video.sps, self.video.pps))]
        trexes = [_trex(VIDEO_TRACK_ID)]
        if self.audio is not None:
            traks.append(_trak(AUDIO_TRACK_ID, _tkhd(AUDIO_TRACK_ID, True), self.audio.sample_rate, b"soun",
                               "SoundHandler", full_box(b"smhd", 0, 0, bytes(4)), _mp4a(self.audio)))
            trexes.append(_trex(AUDIO_TRACK_ID))
        return ftyp + box(b"moov", mvhd, *traks, box(b"mvex", *trexes))

    def _video_times(self, video: Sequence[EncodedPacket], next_pts_us: int | None) -> tuple[int, list[int]]:
        dts = [_ticks(p.pts_us - self.base_pts_us, VIDEO_TIMESCALE) for p in video]
        if dts[0] < 0 or (self._last_video_dts is not None and dts[0] <= self._last_video_dts):
            raise MuxError(f"video pts {video[0].pts_us} is not after the previous frame on this timeline")
        if any(b <= a for a, b in zip(dts, dts[1:], strict=False)):
            raise MuxError("video timestamps within a fragment are not strictly increasing")
        end = (_ticks(next_pts_us - self.base_pts_us, VIDEO_TIMESCALE) if next_pts_us is not None
               else dts[-1] + max(1, _ticks(video[-1].duration_us, VIDEO_TIMESCALE)))
        if end <= dts[-1]:
            end = dts[-1] + max(1, _ticks(video[-1].duration_us, VIDEO_TIMESCALE))
        self._last_video_dts = dts[-1]
        return dts[0], [b - a for a, b in zip(dts, dts[1:] + [end], strict=True)]

    def _audio_dts(self, pts_us: int, expected: int | None, previous: int | None) -> int:
        assert self.audio is not None
        target = _ticks(pts_us - self.base_pts_us, self.audio.sample_rate)
        if expected is not None and abs(target - expected) <= self.audio.frame_samples // 2:
            return expected
        return target if previous is None else max(target, previous + 1)

    def _audio_times(self, audio: Sequence[EncodedPacket], next_pts_us: int | None) -> tuple[int, list[int]]:
        assert self.audio is not None
        step = self.audio.frame_samples
        dts: list[int] = []
        expected = self._next_audio_dts
        previous = None if expected is None else expected - step
        for p in audio:
            d = self._audio_dts(p.pts_us, expected, previous)
            if d < 0:
                raise MuxError(f"audio pts {p.pts_us} is before the session start {self.base_pts_us}")
            dts.append(d)
            previous, expected = d, d + step
        end = expected
        if next_pts_us is not None:
            end = self._audio_dts(next_pts_us, expected, previous)
        self._next_audio_dts = end
        return dts[0], [b - a for a, b in zip(dts, dts[1:] + [end], strict=True)]

    def fragment(self, video: Sequence[EncodedPacket], audio: Sequence[EncodedPacket] = (),
                 next_video_pts_us: int | None = None,
                 next_audio_pts_us: int | None = None) -> tuple[bytes, FragmentInfo]:
        """One moof+mdat holding `video` (decode order) and `audio` (pts order).

        `next_*_pts_us` are the times of the packets that follow (if known) and fix the duration of
        the fragment's last sample; without them the packet's own `duration_us` is used.
        """
        if not video and not audio:
            raise MuxError("a fragment needs at least one sample")
        if audio and self.audio is None:
            raise MuxError("audio packets given to a muxer without an audio track")
        tracks: list[tuple[int, int, list[int], list[bytes], list[int] | None]] = []
        if video:
            base, durations = self._video_times(video, next_video_pts_us)
            samples = [avcc_sample(p.data, self.video.sps, self.video.pps) for p in video]
            flags = [SYNC_SAMPLE_FLAGS if p.keyframe else NON_SYNC_SAMPLE_FLAGS for p in video]
            tracks.append((VIDEO_TRACK_ID, base, durations, samples, flags))
        if audio:
            if any(not p.data for p in audio):
                raise MuxError("empty audio packet")
            base, durations = self._audio_times(audio, next_audio_pts_us)
            tracks.append((AUDIO_TRACK_ID, base, durations, [p.data for p in audio], None))
        data = self._moof_mdat(tracks)
        self.sequence += 1
        pts = [p.pts_us for p in (*video, *audio)]
        info = FragmentInfo(video_frames=len(video), audio_samples=len(audio) * (self.audio.frame_samples
                                                                                 if self.audio else 0),
                            first_pts_us=min(pts), last_pts_us=max(pts))
        return data, info

    def _moof_mdat(self, tracks: list[tuple[int, int, list[int], list[bytes], list[int] | None]]) -> bytes:
        # The trun data offsets depend on the moof's size, which does not depend on their values:
        # build once with zero offsets to measure, then for real.
        def moof(offsets: list[int]) -> bytes:
            trafs = []
            for (track_id, base, durations, samples, flags), offset in zip(tracks, offsets, strict=True):
                if flags is None:
                    tfhd = full_box(b"tfhd", 0, TFHD_DEFAULT_BASE_IS_MOOF | TFHD_DEFAULT_SAMPLE_FLAGS,
                                    struct.pack(">II", track_id, SYNC_SAMPLE_FLAGS))
                    trun_flags = TRUN_DATA_OFFSET | TRUN_SAMPLE_DURATION | TRUN_SAMPLE_SIZE
                    rows = b"".join(struct.pack(">II", d, len(s)) for d, s in zip(durations, samples, strict=True))
                else:
                    tfhd = full_box(b"tfhd", 0, TFHD_DEFAULT_BASE_IS_MOOF, struct.pack(">I", track_id))
                    trun_flags = TRUN_DATA_OFFSET | TRUN_SAMPLE_DURATION | TRUN_SAMPLE_SIZE | TRUN_SAMPLE_FLAGS
                    rows = b"".join(struct.pack(">III", d, len(s), f)
                                    for d, s, f in zip(durations, samples, flags, strict=True))
                trafs.append(box(b"traf", tfhd, full_box(b"tfdt", 1, 0, struct.pack(">Q", base)),
                                 full_box(b"trun", 0, trun_flags, struct.pack(">Ii", len(samples), offset), rows)))
            return box(b"moof", full_box(b"mfhd", 0, 0, struct.pack(">I", self.sequence)), *trafs)

        moof_size = len(moof([0] * len(tracks)))
        offsets, position = [], moof_size + 8  # first sample follows the mdat header
        for track in tracks:
            offsets.append(position)
            position += sum(len(s) for s in track[3])
        payload = b"".join(b"".join(track[3]) for track in tracks)
        if 8 + len(payload) >= 1 << 32:
            raise MuxError("fragment larger than 4 GiB")
        return moof(offsets) + box(b"mdat", payload)
