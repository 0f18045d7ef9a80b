"""Lens-covered detection: frames that stay dark and flat for a while mean something is over the lens.

DESIGN.md "Interruptions" (R17): a lens covered for long is an automatic `obstruction`; the detector only
reports start and end (`LensCovered` / `LensUncovered`), the session state machine decides what it means.

Cheap by construction: each frame is judged from a sparse grid of about 2,000 luma samples (mean and
standard deviation), never the whole picture. Hysteresis: "covered" after `covered_after_s` of
consecutive dark-and-flat frames, "uncovered" after `cleared_after_s` of consecutive normal ones.

Threads: `observe_luma` runs on the camera's frame thread, before the OSD is stamped (the watermark is
bright text and would make a covered frame look busy). `on_event` is called on that thread and must only
enqueue.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from agent.events import LensCovered, LensUncovered

TARGET_SAMPLES = 2000


@dataclass(frozen=True)
class LensCoverSettings:
    covered_after_s: float = 5.0
    cleared_after_s: float = 1.0
    dark_luma: float = 40.0  # mean luma (0-255) below which a frame is dark
    flat_stddev: float = 8.0  # luma standard deviation below which a frame is flat

    def __post_init__(self) -> None:
        if not 0 < self.covered_after_s <= 3600:
            raise ValueError(f"lens covered_after_s must be in (0, 3600], got {self.covered_after_s}")
        if not 0 <= self.cleared_after_s <= 3600:
            raise ValueError(f"lens cleared_after_s must be in [0, 3600], got {self.cleared_after_s}")
        if not 0 < self.dark_luma < 255 or not 0 < self.flat_stddev < 128:
            raise ValueError(f"lens thresholds out of range: dark_luma={self.dark_luma}, "
                             f"flat_stddev={self.flat_stddev}")


class LensCoverDetector:
    """Feeds on luma planes with their capture time; calls `on_event` at each covered/uncovered transition.

    `LensCovered.at_us` is when the dark run began (the obstruction's start), `LensUncovered.at_us` when the
    normal run began; both on the media clock of the frames.
    """

    def __init__(self, on_event: Callable[[LensCovered | LensUncovered], None],
                 settings: LensCoverSettings | None = None) -> None:
        self._on_event = on_event
        self.settings = settings or LensCoverSettings()
        self.covered = False
        self._run_start_us: int | None = None  # start of the current run of frames that disagree with `covered`
        self.frames_observed = 0

    def observe_luma(self, luma: np.ndarray, at_us: int) -> None:
        """Judge one frame from its luma plane (2-D, any stride/view)."""
        height, width = luma.shape[:2]
        step = max(1, int((height * width / TARGET_SAMPLES) ** 0.5))
        sample = luma[step // 2::step, step // 2::step]
        self.frames_observed += 1
        dark_and_flat = float(sample.mean()) < self.settings.dark_luma and float(sample.std()) < \
            self.settings.flat_stddev
        if dark_and_flat == self.covered:
            self._run_start_us = None
            return
        if self._run_start_us is None:
            self._run_start_us = at_us
        needed_s = self.settings.covered_after_s if dark_and_flat else self.settings.cleared_after_s
        if at_us - self._run_start_us < needed_s * 1_000_000:
            return
        self.covered = dark_and_flat
        start_us, self._run_start_us = self._run_start_us, None
        self._on_event(LensCovered(at_us=start_us) if dark_and_flat else LensUncovered(at_us=start_us))
