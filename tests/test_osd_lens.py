"""OSD watermark (DESIGN.md "Recording", R5/R21: who, when, where in the picture) and lens-covered detection
(R17 obstruction), alone and through the picamera2 adapter on the simulated camera."""

from __future__ import annotations

import av
import numpy as np

from agent.capture.camera_picamera2 import Picamera2VideoSource
from agent.capture.lens import LensCoverDetector, LensCoverSettings
from agent.capture.osd import UNSET_CLOCK_TEXT, OsdOverlay
from agent.events import LensCovered, LensUncovered
from hw_sim.clock import SimClock
from hw_sim.frames import SyntheticScene
from hw_sim.picamera2 import CameraSimulator
from tests.test_sources import FRAME_US, SMALL, H, Recorder, W, wait_for


def synthetic_i420(number: int = 7) -> np.ndarray:
    scene = SyntheticScene(W, H)
    frame = scene.new_i420()
    scene.draw_i420(frame, number, number * FRAME_US)
    return frame


def test_osd_stamps_time_device_officer_and_gps_into_its_region_only() -> None:
    clock = SimClock()
    osd = OsdOverlay(clock, "BWC-TEST-0001", officer_id="OF-42")
    osd.set_position(31.2304, 121.4737)
    assert osd.lines() == ["2026-01-01 10:00:00 UTC", "DEV BWC-TEST-0001  OFC OF-42", "GPS 31.23040N 121.47370E"]
    clean = synthetic_i420()
    stamped = clean.copy()
    osd.stamp_i420(stamped, W, H)
    x, y, w, h = osd.region(W, H)
    changed_rows, changed_cols = np.nonzero(stamped[:H] != clean[:H])
    assert changed_rows.size > 0
    assert changed_rows.min() >= y and changed_rows.max() < y + h
    assert changed_cols.min() >= x and changed_cols.max() < x + w
    box = stamped[y:y + h, x:x + w]
    assert (box > 200).sum() > 50, "white text"
    assert np.median(box) < 30, "on a dark box"


def test_osd_shows_an_unset_clock_as_such() -> None:
    clock = SimClock()
    clock.set_unset()
    osd = OsdOverlay(clock, "BWC-TEST-0001")
    assert osd.lines()[0].startswith(UNSET_CLOCK_TEXT)
    assert osd.lines()[1:] == ["DEV BWC-TEST-0001  OFC -", "GPS NO FIX"]
    unset_frame = synthetic_i420()
    osd.stamp_i420(unset_frame, W, H)
    clock.mark_synced("bureau", wall_us=1_767_261_600_000_000)
    assert "UTC" in osd.lines()[0]
    set_frame = synthetic_i420()
    osd.stamp_i420(set_frame, W, H)
    x, y, w, h = osd.region(W, H)
    assert (unset_frame[y:y + h // 3, x:x + w] != set_frame[y:y + h // 3, x:x + w]).any()


def test_osd_renders_once_per_second_and_stamps_every_frame() -> None:
    clock = SimClock()
    osd = OsdOverlay(clock, "BWC-TEST-0001")
    frames = [synthetic_i420(n) for n in range(60)]
    for n, frame in enumerate(frames):
        osd.stamp_i420(frame, W, H)
        clock.advance(FRAME_US)
        if n == 45:
            osd.set_officer("OF-7")  # a change shows at once
    assert osd.renders == 3  # seconds 0 and 1, plus the officer change
    x, y, w, h = osd.region(W, H)
    first_box = frames[0][y:y + h, x:x + w]
    assert all((f[y:y + h, x:x + w] == first_box).all() for f in frames[1:29])


def covered(at_us: int, detector: LensCoverDetector, dark: bool) -> None:
    luma = np.full((H, W), 10, dtype=np.uint8) if dark else synthetic_i420()[:H]
    detector.observe_luma(luma, at_us)


def test_lens_covered_is_reported_after_the_configured_time_and_cleared() -> None:
    events: list[object] = []
    detector = LensCoverDetector(events.append, LensCoverSettings(covered_after_s=2.0, cleared_after_s=0.5))
    t = 0
    for _ in range(30):  # normal second
        covered(t, detector, dark=False)
        t += FRAME_US
    for _ in range(45):  # 1.5 s covered: shorter than the configured 2 s, nothing reported
        covered(t, detector, dark=True)
        t += FRAME_US
    covered(t, detector, dark=False)
    t += FRAME_US
    assert events == []
    covered_from = t
    for _ in range(75):
        covered(t, detector, dark=True)
        t += FRAME_US
    assert events == [LensCovered(at_us=covered_from)]
    uncovered_from = t
    for _ in range(30):
        covered(t, detector, dark=False)
        t += FRAME_US
    assert events == [LensCovered(at_us=covered_from), LensUncovered(at_us=uncovered_from)]


def test_camera_source_detects_a_covered_lens_and_burns_the_osd_into_the_footage() -> None:
    clock = SimClock(rate=4.0)
    rig = CameraSimulator(clock)
    rec = Recorder()
    osd = OsdOverlay(clock, "BWC-TEST-0001", officer_id="OF-42")
    lens = LensCoverDetector(rec.event, LensCoverSettings(covered_after_s=1.0, cleared_after_s=0.5))
    source = Picamera2VideoSource(rec.packet, clock=clock, settings=SMALL, osd=osd, lens=lens,
                                  picamera2_module=rig.module)
    source.start()
    try:
        wait_for(lambda: len(rec.packets) >= 15)
        rig.faults.covered = True
        wait_for(lambda: any(isinstance(e, LensCovered) for e in rec.events))
        rig.faults.covered = False
        wait_for(lambda: any(isinstance(e, LensUncovered) for e in rec.events))
    finally:
        source.stop()
    kinds = [type(e) for e in rec.events]
    assert kinds == [LensCovered, LensUncovered]
    covered_event, uncovered_event = rec.events
    assert uncovered_event.at_us - covered_event.at_us >= 1_000_000
    # The OSD is in the encoded footage: decode the first frame and look at the overlay's box.
    decoder = av.CodecContext.create("h264", "r")
    first = next(iter(decoder.decode(av.Packet(rec.packets[0].data)))).to_ndarray(format="gray")
    x, y, w, h = osd.region(W, H)
    box = first[y:y + h, x:x + w]
    assert (box > 180).sum() > 50 and np.median(box) < 40
