"""Synthetic camera frames that prove which frame they are, and how the fake devices pace themselves.

A frame shows a static test pattern, a bar that moves one step per frame, a human-readable line (frame number
and sensor time) and, along the bottom, a machine-readable barcode of the frame number: 24 bits of frame
number plus a CRC-8, each bit a flat block of luma (black = 0, white = 1) sized to survive H.264 at normal
bitrates. `read_frame_number` recovers the number from a decoded frame's Y plane, so a test can decode what
was written and say exactly which camera frames it holds.

The fake camera and microphone pace themselves with `wait_until` on whatever clock they are given
(`hw_sim.clock.SimClock` stepped or accelerated, or real time), so a test can run a long scenario in a short
time, or step it exactly, and the media timestamps are the same either way.

Threads: the drawing functions are pure and run on the caller's thread (the fake camera's event-loop thread);
`wait_until` runs on the waiting device's thread.
"""

from __future__ import annotations

import threading
from typing import Any

import cv2
import numpy as np

BARCODE_NUMBER_BITS = 24
BARCODE_CRC_BITS = 8
BARCODE_GUARD = (1, 0)  # a white then a black block before the payload: a frame without them is not ours
BARCODE_BLOCKS = len(BARCODE_GUARD) + BARCODE_NUMBER_BITS + BARCODE_CRC_BITS
FRAME_NUMBER_LIMIT = 1 << BARCODE_NUMBER_BITS
COVERED_LUMA = 10  # what a hand over the lens looks like: almost black and flat

_WHITE = 235  # video-range luma
_BLACK = 16


# --- pacing ---------------------------------------------------------------------------------------------------

POLL_S = 0.002  # how often a waiting device looks at a clock it cannot wait on


def wait_until(clock: Any, mono_us: int, stop: threading.Event) -> bool:
    """Block until `clock.mono_us()` reaches `mono_us` (True) or `stop` is set (False).

    Works with any `agent.clock.Clock`: `hw_sim.clock.SimClock` stepped or accelerated, or the system clock.
    A clock with its own `wait_until(mono_us, stop)` is asked directly.
    """
    own_wait = getattr(clock, "wait_until", None)
    if own_wait is not None:
        return bool(own_wait(mono_us, stop))
    while True:
        remaining_us = mono_us - clock.mono_us()
        if remaining_us <= 0:
            return not stop.is_set()
        if stop.wait(min(remaining_us / 1e6, POLL_S)):
            return False


# --- the barcode ----------------------------------------------------------------------------------------------


def crc8(data: bytes) -> int:
    """CRC-8 (polynomial 0x07, initial 0): catches a misread barcode."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def barcode_geometry(width: int, height: int) -> tuple[int, int, int]:
    """(block size, x of the first block, y of the strip) for a frame of this size; blocks are 8-px aligned."""
    block = max(8, (width // (BARCODE_BLOCKS + 6)) // 8 * 8)
    if block * BARCODE_BLOCKS > width or 3 * block > height:
        raise ValueError(f"frame {width}x{height} is too small for the frame-number barcode")
    y = (height - 2 * block) // 8 * 8
    return block, 0, y


def _barcode_bits(frame_number: int) -> list[int]:
    number = frame_number % FRAME_NUMBER_LIMIT
    payload = number.to_bytes(3, "big")
    bits = [(number >> (BARCODE_NUMBER_BITS - 1 - i)) & 1 for i in range(BARCODE_NUMBER_BITS)]
    check = crc8(payload)
    bits += [(check >> (BARCODE_CRC_BITS - 1 - i)) & 1 for i in range(BARCODE_CRC_BITS)]
    return list(BARCODE_GUARD) + bits


def draw_barcode(y_plane: np.ndarray, frame_number: int) -> None:
    height, width = y_plane.shape[:2]
    block, x0, y0 = barcode_geometry(width, height)
    for i, bit in enumerate(_barcode_bits(frame_number)):
        y_plane[y0:y0 + block, x0 + i * block:x0 + (i + 1) * block] = _WHITE if bit else _BLACK


def read_frame_number(y_plane: np.ndarray) -> int | None:
    """The frame number drawn into a (decoded) frame's Y plane, or None if the barcode is absent or damaged."""
    height, width = y_plane.shape[:2]
    block, x0, y0 = barcode_geometry(width, height)
    inner = block // 4
    bits = []
    for i in range(BARCODE_BLOCKS):
        cell = y_plane[y0 + inner:y0 + block - inner, x0 + i * block + inner:x0 + (i + 1) * block - inner]
        bits.append(1 if float(cell.mean()) > 128 else 0)
    if tuple(bits[:len(BARCODE_GUARD)]) != BARCODE_GUARD:
        return None
    payload = bits[len(BARCODE_GUARD):]
    number = int("".join(map(str, payload[:BARCODE_NUMBER_BITS])), 2)
    check = int("".join(map(str, payload[BARCODE_NUMBER_BITS:])), 2)
    if crc8(number.to_bytes(3, "big")) != check:
        return None
    return number


# --- frames ---------------------------------------------------------------------------------------------------


class SyntheticScene:
    """Draws frame n of a synthetic scene into I420 (YUV420 planar) buffers of one size.

    The static background is computed once; per frame only the moving bar, the text line and the barcode
    are drawn, so 1080p30 costs little beside the encoder.
    """

    def __init__(self, width: int, height: int) -> None:
        if width % 2 or height % 2:
            raise ValueError(f"I420 frames need even dimensions, got {width}x{height}")
        barcode_geometry(width, height)  # fail early on a too-small size
        self.width = width
        self.height = height
        xs = np.linspace(40, 200, width, dtype=np.float32)
        ys = np.linspace(0, 30, height, dtype=np.float32)[:, None]
        self._background_y = (xs[None, :] + ys).astype(np.uint8)
        # Eight colour bars in chroma, so the picture is not grey.
        bars_u = np.array([128, 44, 156, 72, 184, 100, 212, 128], dtype=np.uint8)
        bars_v = np.array([128, 140, 44, 58, 198, 212, 114, 128], dtype=np.uint8)
        bar_index = (np.arange(width // 2) * 8 // (width // 2)).astype(np.intp)
        self._background_u = np.repeat(bars_u[bar_index][None, :], height // 2, axis=0)
        self._background_v = np.repeat(bars_v[bar_index][None, :], height // 2, axis=0)
        self._bar_width = max(8, width // 40) // 2 * 2
        self._text_scale = max(0.4, height / 720)

    def new_i420(self) -> np.ndarray:
        return np.empty((self.height * 3 // 2, self.width), dtype=np.uint8)

    def draw_i420(self, out: np.ndarray, frame_number: int, sensor_time_us: int, *, covered: bool = False) -> None:
        """Fill `out` (shape (h*3/2, w), I420) with frame `frame_number` of the scene."""
        h, w = self.height, self.width
        y_plane = out[:h]
        u_plane = out[h:h + h // 4].reshape(h // 2, w // 2)
        v_plane = out[h + h // 4:].reshape(h // 2, w // 2)
        if covered:
            y_plane[:] = COVERED_LUMA
            u_plane[:] = 128
            v_plane[:] = 128
            return
        y_plane[:] = self._background_y
        u_plane[:] = self._background_u
        v_plane[:] = self._background_v
        bar_x = (frame_number * 8) % max(1, w - self._bar_width)
        y_plane[h // 4:h * 3 // 4, bar_x:bar_x + self._bar_width] = _WHITE
        seconds, micros = divmod(sensor_time_us, 1_000_000)
        text = f"FRAME {frame_number:07d}  T {seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" \
               f".{micros // 1000:03d}"
        y_text = int(h * 0.6)
        cv2.putText(y_plane, text, (w // 20, y_text), cv2.FONT_HERSHEY_SIMPLEX, self._text_scale, _BLACK,
                    max(1, int(3 * self._text_scale)), cv2.LINE_8)
        cv2.putText(y_plane, text, (w // 20, y_text), cv2.FONT_HERSHEY_SIMPLEX, self._text_scale, _WHITE,
                    max(1, int(self._text_scale)), cv2.LINE_8)
        draw_barcode(y_plane, frame_number)

    def draw_bgr(self, frame_number: int, sensor_time_us: int, *, covered: bool = False) -> np.ndarray:
        """Frame `frame_number` as an HxWx3 BGR image (what OpenCV and picamera2's RGB888 give)."""
        i420 = self.new_i420()
        self.draw_i420(i420, frame_number, sensor_time_us, covered=covered)
        return cv2.cvtColor(i420, cv2.COLOR_YUV2BGR_I420)


def y_plane_of(image: np.ndarray) -> np.ndarray:
    """The luma of a decoded frame: the top rows of an I420 array, or BGR converted to grey."""
    if image.ndim == 2:
        return image
    return cv2.cvtColor(image[:, :, :3], cv2.COLOR_BGR2GRAY)
