"""The fMP4 muxer, the GOP assembler/segmenter and the pre-event ring, on real H.264/AAC packets (R16, R22).

The layout asserted here is the one docs/FORMAT.md describes; the files are also decoded by ffmpeg.
"""

from __future__ import annotations

import struct
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from agent.capture.fmp4 import FragmentedMp4Muxer, MuxError, avcc_sample, split_annex_b
from agent.capture.packets import EncodedPacket
from agent.capture.pipeline import PipelineConfig
from agent.capture.ring import PreEventRing
from agent.capture.segmenter import Gop, GopAssembler, Segmenter
from tests.media_gen import AAC_FRAME, SAMPLE_RATE, Media, arrival_order, encoded_video, make_media, video_pts

CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"dinf", b"stbl", b"mvex", b"moof", b"traf"}


def parse_boxes(data: bytes, start: int = 0, end: int | None = None, path: str = "") -> list[tuple[str, int, int]]:
    """(path, payload offset, payload end) of every box, depth first; sample entries opened too."""
    end = len(data) if end is None else end
    out = []
    pos = start
    while pos < end:
        size, kind = struct.unpack_from(">I4s", data, pos)
        assert size >= 8, f"bad box size at {pos}"
        name = f"{path}/{kind.decode()}"
        out.append((name, pos + 8, pos + size))
        if kind in CONTAINERS:
            out += parse_boxes(data, pos + 8, pos + size, name)
        elif kind in (b"dref", b"stsd"):  # full box + entry count, then entries
            out += parse_boxes(data, pos + 16, pos + size, name)
        elif kind == b"avc1":
            out += parse_boxes(data, pos + 8 + 78, pos + size, name)
        elif kind == b"mp4a":
            out += parse_boxes(data, pos + 8 + 28, pos + size, name)
        pos += size
    return out


def length_prefixed_nals(sample: bytes) -> list[bytes]:
    nals, pos = [], 0
    while pos < len(sample):
        (n,) = struct.unpack_from(">I", sample, pos)
        nals.append(sample[pos + 4: pos + 4 + n])
        pos += 4 + n
    assert pos == len(sample)
    return nals


def gops_of(media: Media, audio_lag_us: int = 0, expect_audio: bool = True) -> list[Gop]:
    assembler = GopAssembler(expect_audio)
    gops = []
    for packet in arrival_order(media, audio_lag_us=audio_lag_us):
        gops += assembler.push(packet)
    return gops + assembler.flush()


def trun_samples(data: bytes, traf_start: int, traf_end: int, moof_start: int) -> dict:
    boxes = {name.rsplit("/", 1)[1]: (a, b) for name, a, b in parse_boxes(data, traf_start, traf_end)}
    a, _ = boxes["tfhd"]
    flags = struct.unpack_from(">I", data, a)[0] & 0xFFFFFF
    track_id = struct.unpack_from(">I", data, a + 4)[0]
    a, _ = boxes["tfdt"]
    assert data[a] == 1
    base = struct.unpack_from(">Q", data, a + 4)[0]
    a, b = boxes["trun"]
    trun_flags = struct.unpack_from(">I", data, a)[0] & 0xFFFFFF
    count, offset = struct.unpack_from(">Ii", data, a + 4)
    per = 12 if trun_flags & 0x400 else 8
    rows = [struct.unpack_from(">III" if per == 12 else ">II", data, a + 12 + i * per) for i in range(count)]
    return {"track": track_id, "tfhd_flags": flags, "base": base, "offset": moof_start + offset, "rows": rows}


def fragments(data: bytes) -> list[dict]:
    """Each fragment's tracks with their tfdt, sample rows and the sample bytes they point at."""
    out = []
    for name, a, _b in parse_boxes(data):
        if name != "/moof":
            continue
        moof_start = a - 8
        frag = {}
        for tname, ta, tb in parse_boxes(data, a, _b, "/moof"):
            if tname == "/moof/mfhd":
                frag["sequence"] = struct.unpack_from(">I", data, ta + 4)[0]
            if tname == "/moof/traf":
                t = trun_samples(data, ta, tb, moof_start)
                pos, samples = t["offset"], []
                for row in t["rows"]:
                    samples.append(data[pos: pos + row[1]])
                    pos += row[1]
                t["samples"] = samples
                frag[t["track"]] = t
        out.append(frag)
    return out


@pytest.fixture(scope="module")
def media() -> Media:
    return make_media(6.0)


def test_init_segment_has_the_documented_box_layout(media):
    muxer = FragmentedMp4Muxer(media.video_params, media.audio_params, media.video[0].pts_us)
    layout = [name for name, _, _ in parse_boxes(muxer.init_segment())]
    track = ["/mdia", "/mdia/mdhd", "/mdia/hdlr", "/mdia/minf", "/mdia/minf/{mh}", "/mdia/minf/dinf",
             "/mdia/minf/dinf/dref", "/mdia/minf/dinf/dref/url ", "/mdia/minf/stbl", "/mdia/minf/stbl/stsd",
             "/mdia/minf/stbl/stsd/{se}", "/mdia/minf/stbl/stsd/{se}/{cfg}", "/mdia/minf/stbl/stts",
             "/mdia/minf/stbl/stsc", "/mdia/minf/stbl/stsz", "/mdia/minf/stbl/stco"]
    video = ["/moov/trak", "/moov/trak/tkhd"] + ["/moov/trak" + p.format(mh="vmhd", se="avc1", cfg="avcC")
                                                 for p in track]
    audio = ["/moov/trak", "/moov/trak/tkhd"] + ["/moov/trak" + p.format(mh="smhd", se="mp4a", cfg="esds")
                                                 for p in track]
    assert layout == ["/ftyp", "/moov", "/moov/mvhd", *video, *audio, "/moov/mvex", "/moov/mvex/trex",
                      "/moov/mvex/trex"]
    video_only = FragmentedMp4Muxer(media.video_params, None, 0).init_segment()
    assert [n for n, _, _ in parse_boxes(video_only)].count("/moov/trak") == 1


def test_a_fragment_is_moof_then_mdat_and_its_runs_point_at_the_samples(media):
    gop = gops_of(media)[1]
    muxer = FragmentedMp4Muxer(media.video_params, media.audio_params, media.video[0].pts_us)
    data, info = muxer.fragment(gop.video, gop.audio, gop.end_us, gop.next_audio_pts_us)
    assert [n for n, _, _ in parse_boxes(data) if n.count("/") == 1] == ["/moof", "/mdat"]
    (frag,) = fragments(data)
    video, audio = frag[1], frag[2]
    assert video["tfhd_flags"] == 0x020000 and audio["tfhd_flags"] == 0x020020
    assert video["samples"] == [avcc_sample(p.data, media.video_params.sps, media.video_params.pps)
                                for p in gop.video]
    assert audio["samples"] == [p.data for p in gop.audio]
    flags = [row[2] for row in video["rows"]]
    assert flags[0] == 0x02000000 and set(flags[1:]) == {0x01010000}
    assert video["base"] == (gop.start_us - media.video[0].pts_us) * 90_000 // 1_000_000
    assert info.video_frames == 30 and info.audio_samples == len(gop.audio) * AAC_FRAME
    assert info.first_pts_us == gop.start_us


def test_access_unit_delimiters_and_repeated_parameter_sets_are_not_stored_but_new_ones_are(media):
    sps, pps = media.video_params.sps, media.video_params.pps
    idr = media.video[0].data
    aud = b"\x00\x00\x00\x01\x09\xf0"
    stored = length_prefixed_nals(avcc_sample(aud + idr, sps, pps))
    kinds = [n[0] & 0x1F for n in stored]
    assert 9 not in kinds and 7 not in kinds and 8 not in kinds and 5 in kinds
    other_pps = pps[:-1] + bytes([pps[-1] ^ 0x40])
    kept = avcc_sample(b"\x00\x00\x01\x68" + other_pps[1:] + idr, sps, pps)
    assert other_pps in kept
    with pytest.raises(MuxError, match="start code"):
        split_annex_b(b"not h264")


def test_decode_time_runs_on_across_fragments_and_segments(media):
    segmenter = Segmenter(media.video_params, media.audio_params, segment_us=2_000_000)
    segmenter.begin()
    files: dict[int, bytes] = {}
    for gop in gops_of(media, audio_lag_us=60_000):
        out = segmenter.add(gop)
        files[out.segment_index] = files.get(out.segment_index, b"") + out.data
    assert sorted(files) == [0, 1, 2]
    frags = [f for i in sorted(files) for f in fragments(files[i])]
    assert [f["sequence"] for f in frags] == list(range(1, len(frags) + 1))
    for track, step in ((1, None), (2, AAC_FRAME)):
        runs = [f[track] for f in frags]
        for before, after in zip(runs, runs[1:], strict=False):
            assert after["base"] == before["base"] + sum(row[0] for row in before["rows"])
        if step:
            assert {row[0] for run in runs for row in run["rows"]} == {step}
    assert frags[0][1]["base"] == 0
    assert frags[-1][1]["base"] == (media.video[150].pts_us - media.video[0].pts_us) * 90_000 // 1_000_000


@pytest.mark.parametrize("audio_lag_us, video_lag_us", [(400_000, 0), (0, 400_000)])
def test_audio_is_routed_by_timestamp_not_arrival(media, audio_lag_us, video_lag_us):
    # One source reaches the pipeline 400 ms after the other: later than the next GOP's keyframe.
    assembler = GopAssembler(expect_audio=True)
    gops = []
    for packet in arrival_order(media, audio_lag_us=audio_lag_us, video_lag_us=video_lag_us):
        gops += assembler.push(packet)
    gops += assembler.flush()
    for gop in gops:
        assert gop.audio, "every GOP has its audio"
        assert all(gop.start_us <= p.pts_us < (gop.end_us or 1 << 62) for p in gop.audio)
    assert [p.seq for gop in gops for p in gop.audio] == list(range(len(media.audio)))


def test_a_silent_microphone_holds_video_back_no_longer_than_the_audio_wait(media):
    assembler = GopAssembler(expect_audio=True, audio_wait_us=500_000)
    released_at = {}
    for packet in media.video:
        for gop in assembler.push(packet):
            released_at[gop.start_us] = packet.pts_us
    assert len(released_at) == 5  # the sixth GOP has no successor yet
    for start, when in released_at.items():
        gop_end = start + 1_000_000
        assert gop_end + 500_000 - 40_000 <= when <= gop_end + 500_000 + 40_000


def test_video_before_the_first_keyframe_and_malformed_packets_are_discarded_and_counted(media):
    assembler = GopAssembler(expect_audio=False)
    for packet in media.video[10:]:
        assembler.push(packet)
    assembler.push(EncodedPacket("video", b"garbage", media.video[-1].pts_us + 40_000, 33_333, False))
    assert assembler.counts.video_before_keyframe == 20
    assert assembler.counts.malformed == 1


def test_without_keyframes_the_segmenter_asks_for_one_and_the_segment_runs_on(tmp_path: Path):
    params, units = encoded_video(300, gop=150)  # a camera ignoring its 1 s keyframe interval: 5 s GOPs
    packets = [EncodedPacket("video", data, video_pts(i), 33_333, key, i) for i, (data, key) in enumerate(units)]
    requests = []
    segmenter = Segmenter(params, None, segment_us=1_000_000, keyframe_grace_us=2_000_000,
                          request_keyframe=lambda: requests.append(1))
    assembler = GopAssembler(expect_audio=False, max_gop_us=2_000_000)
    segmenter.begin()
    files: dict[int, bytes] = {}
    frames = []

    def write(gop: Gop) -> None:
        out = segmenter.add(gop)
        frames.extend(p.seq for p in gop.video)
        files[out.segment_index] = files.get(out.segment_index, b"") + out.data
        if out.new_segment:
            assert gop.keyframe_led

    for packet in packets:
        segmenter.note_video(packet)
        for gop in assembler.push(packet):
            write(gop)
    for gop in assembler.flush():
        write(gop)
    assert frames == list(range(300))
    assert sorted(files) == [0, 1]  # split only where a keyframe came (frame 150)
    assert len(requests) == 2  # 3 s into the first segment, then again 2 s later
    assert len(fragments(files[0])) == 3  # the 5 s GOP was written in pieces of at most 2 s
    for index, data in files.items():
        path = tmp_path / f"{index}.mp4"
        path.write_bytes(data)
        run = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-f", "null", "-"],
                             capture_output=True, text=True, timeout=30)
        assert run.returncode == 0 and run.stderr == ""


# --- pre-event ring -----------------------------------------------------------------------------------------


def test_ring_keeps_the_fewest_whole_gops_covering_its_length_and_reports_bytes(media):
    ring = PreEventRing(seconds=2.5)
    gops = gops_of(media)
    for gop in gops:
        ring.push(gop)
    kept = ring.drain()
    assert [g.start_us for g in kept] == [g.start_us for g in gops[-3:]]
    assert ring.seconds == 0 and ring.nbytes == 0
    ring.push(gops[0])
    assert ring.nbytes == gops[0].nbytes and ring.seconds == pytest.approx(1.0, abs=0.001)


def test_ring_of_zero_seconds_keeps_nothing_and_bad_lengths_are_refused(media):
    ring = PreEventRing(seconds=0)
    for gop in gops_of(media):
        ring.push(gop)
    assert len(ring) == 0 and ring.evicted_gops == 6
    for bad in (-1, 120.5):
        with pytest.raises(ValueError, match="outside 0..120"):
            PreEventRing(seconds=bad)


def test_ring_without_audio_drops_audio_and_evicts_continuations_with_their_head(media):
    gops = gops_of(media)
    ring = PreEventRing(seconds=1.5, include_audio=False)
    head = gops[0]
    piece = Gop([replace(p, keyframe=False) for p in gops[1].video], [], gops[1].end_us)
    ring.push(head)
    ring.push(piece)
    ring.push(gops[2])
    ring.push(gops[3])
    kept = ring.drain()
    assert [g.start_us for g in kept] == [gops[2].start_us, gops[3].start_us]
    assert all(not g.audio for g in kept)


def test_pipeline_config_names_the_bad_key():
    with pytest.raises(ValueError, match="capture.segment_seconds"):
        PipelineConfig(segment_seconds=0.1)
    with pytest.raises(ValueError, match="capture.pre_event_seconds"):
        PipelineConfig(pre_event_seconds=121)


def test_each_track_counts_time_in_its_own_timescale(media):
    init = FragmentedMp4Muxer(media.video_params, media.audio_params, 0).init_segment()
    timescales = [struct.unpack_from(">I", init, a + 12)[0] for n, a, _ in parse_boxes(init) if n.endswith("mdhd")]
    assert timescales == [90_000, SAMPLE_RATE]
