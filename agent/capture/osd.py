"""The on-screen watermark burnt into every frame: UTC time, device id, officer id, GPS fix when known.

DESIGN.md "Recording": rendered once a second, stamped on every frame. R5 (traceable), R21 (who, when,
where): the watermark says so in the picture itself, not only in the ledger.

Rendering (OpenCV text into a small opaque box) happens at most once per wall-clock second, or when the
officer or GPS fix changes; stamping is one slice copy into the frame (plus neutral chroma under the box
for I420), so it costs next to nothing per frame. An unset clock is shown as "CLOCK UNSET" with the time
since boot instead of a date that would mislead (DESIGN.md "Time").

Threads: `stamp_i420` / `stamp_bgr` run on the camera's frame thread (picamera2's pre_callback, or the
OpenCV capture thread). `set_officer` / `set_position` may be called from any thread: they swap one
immutable tuple, which the frame thread picks up at its next frame.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import cv2
import numpy as np

from agent.evidence.records import ClockQuality

UNSET_CLOCK_TEXT = "CLOCK UNSET"
_FONT = cv2.FONT_HERSHEY_SIMPLEX


class OsdOverlay:
    """Watermark renderer for frames of one size. `clock` is an `agent.clock.Clock`."""

    def __init__(self, clock: Any, device_id: str, *, officer_id: str | None = None, margin_px: int = 8) -> None:
        self._clock = clock
        self._device_id = device_id
        self._margin = margin_px
        # (officer id, (latitude, longitude) or None); replaced whole, never mutated.
        self._info: tuple[str | None, tuple[float, float] | None] = (officer_id, None)
        self._rendered_key: tuple[Any, ...] | None = None
        self._patch_bgr: np.ndarray | None = None
        self._patch_luma: np.ndarray | None = None
        self.renders = 0  # how many times the overlay was drawn (about once a second)

    def set_officer(self, officer_id: str | None) -> None:
        self._info = (officer_id, self._info[1])

    def set_position(self, latitude: float | None, longitude: float | None) -> None:
        """The current GPS fix, or None/None when there is no fix."""
        position = None if latitude is None or longitude is None else (float(latitude), float(longitude))
        self._info = (self._info[0], position)

    def lines(self) -> list[str]:
        """The watermark's text as it would be rendered now."""
        officer_id, position = self._info
        if self._clock.status().get("quality") == ClockQuality.UNSET.value:
            since_boot_s = self._clock.mono_us() // 1_000_000
            time_line = f"{UNSET_CLOCK_TEXT}  T+{since_boot_s // 3600:d}:{since_boot_s // 60 % 60:02d}:" \
                        f"{since_boot_s % 60:02d}"
        else:
            wall = dt.datetime.fromtimestamp(self._clock.wall_us() // 1_000_000, tz=dt.UTC)
            time_line = wall.strftime("%Y-%m-%d %H:%M:%S UTC")
        ids_line = f"DEV {self._device_id}  OFC {officer_id or '-'}"
        if position is None:
            gps_line = "GPS NO FIX"
        else:
            lat, lon = position
            gps_line = f"GPS {abs(lat):.5f}{'N' if lat >= 0 else 'S'} {abs(lon):.5f}{'E' if lon >= 0 else 'W'}"
        return [time_line, ids_line, gps_line]

    def _render_if_due(self, frame_height: int) -> None:
        second = self._clock.wall_us() // 1_000_000
        key = (second, self._info, frame_height, self._clock.status().get("quality"))
        if key == self._rendered_key:
            return
        lines = self.lines()
        scale = max(0.35, frame_height / 1080 * 0.8)
        thickness = max(1, round(scale * 2))
        sizes = [cv2.getTextSize(line, _FONT, scale, thickness) for line in lines]
        line_height = max(h + base for (_w, h), base in sizes) + max(2, int(6 * scale))
        width = max(w for (w, _h), _b in sizes) + 2 * self._margin
        height = line_height * len(lines) + self._margin
        width += width % 2
        height += height % 2
        patch = np.zeros((height, width, 3), dtype=np.uint8)
        for i, line in enumerate(lines):
            baseline_y = self._margin // 2 + (i + 1) * line_height - max(2, int(6 * scale))
            cv2.putText(patch, line, (self._margin, baseline_y), _FONT, scale, (255, 255, 255), thickness,
                        cv2.LINE_AA)
        self._patch_bgr = patch
        self._patch_luma = cv2.cvtColor(patch, cv2.COLOR_BGR2GRAY)
        self._rendered_key = key
        self.renders += 1

    def region(self, frame_width: int, frame_height: int) -> tuple[int, int, int, int]:
        """(x, y, width, height) the overlay covers in a frame of this size (after at least one stamp)."""
        if self._patch_luma is None:
            self._render_if_due(frame_height)
        assert self._patch_luma is not None
        h, w = self._patch_luma.shape
        return self._margin, self._margin, min(w, frame_width - self._margin), min(h, frame_height - self._margin)

    def stamp_i420(self, frame: np.ndarray, width: int, height: int) -> None:
        """Stamp onto an I420 buffer shaped (height*3/2, stride), in place."""
        self._render_if_due(height)
        x, y, w, h = self.region(width, height)
        x -= x % 2
        y -= y % 2
        w -= w % 2
        h -= h % 2
        frame[y:y + h, x:x + w] = self._patch_luma[:h, :w]  # type: ignore[index]
        # Neutral chroma under the box, so the text is white on black whatever the scene's colour.
        stride = frame.shape[1]
        u_plane = frame[height:height + height // 4].reshape(height // 2, stride // 2)
        v_plane = frame[height + height // 4:height * 3 // 2].reshape(height // 2, stride // 2)
        u_plane[y // 2:(y + h) // 2, x // 2:(x + w) // 2] = 128
        v_plane[y // 2:(y + h) // 2, x // 2:(x + w) // 2] = 128

    def stamp_bgr(self, frame: np.ndarray) -> None:
        """Stamp onto an HxWx3 (BGR/RGB) or HxWx4 image, in place."""
        height, width = frame.shape[:2]
        self._render_if_due(height)
        x, y, w, h = self.region(width, height)
        frame[y:y + h, x:x + w, :3] = self._patch_bgr[:h, :w]  # type: ignore[index]
