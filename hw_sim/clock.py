"""The simulator's clock: agent.clock.Clock with time that tests step or accelerate, and a settable quality.

Threads: any thread may read the clock; the scenario/test thread steps it. A lock keeps wall and
monotonic time consistent with each other.

Time is `start + rate * (real monotonic time elapsed) + everything advanced`. With the default
rate 0 the clock stands still between `advance()` calls, so a test decides exactly when time passes;
a rate of 60 runs an hour-long shift in a minute of real time.
"""

from __future__ import annotations

import threading
import time

from agent.clock import PLAUSIBLE_EPOCH_US
from agent.evidence.records import ClockQuality

DEFAULT_WALL_START_US = 1_767_261_600_000_000  # 2026-01-01T10:00:00Z: a plausible, synced-looking date
UNSET_WALL_US = 946_684_800_000_000  # 2000-01-01T00:00:00Z: what a Pi without an RTC might report


class SimClock:
    """A Clock (wall_us, mono_us, status) driven by the simulator."""

    def __init__(self, wall_start_us: int = DEFAULT_WALL_START_US, mono_start_us: int = 1_000_000,
                 rate: float = 0.0, quality: ClockQuality = ClockQuality.FREE_RUNNING, source: str = "sim"):
        if rate < 0:
            raise ValueError(f"clock rate must be >= 0, got {rate}")
        self._lock = threading.Lock()
        self._wall_base = wall_start_us
        self._mono_base = mono_start_us
        self._rate = rate
        self._real_base_ns = time.monotonic_ns()
        self._quality = ClockQuality(quality)
        self._source = source

    def _flowed_us(self) -> int:
        if not self._rate:
            return 0
        return int((time.monotonic_ns() - self._real_base_ns) / 1000 * self._rate)

    def wall_us(self) -> int:
        with self._lock:
            return self._wall_base + self._flowed_us()

    def mono_us(self) -> int:
        with self._lock:
            return self._mono_base + self._flowed_us()

    def status(self) -> dict[str, str]:
        with self._lock:
            return {"source": self._source, "quality": self._quality.value}

    # --- switches ---------------------------------------------------------------------------------

    def advance(self, us: int) -> None:
        """Let `us` microseconds pass at once on both clocks (never backwards)."""
        if us < 0:
            raise ValueError(f"time only moves forward; advance({us})")
        with self._lock:
            self._wall_base += us
            self._mono_base += us

    def set_rate(self, rate: float) -> None:
        """Change how fast time flows with real time from now on (0 = only `advance` moves it)."""
        if rate < 0:
            raise ValueError(f"clock rate must be >= 0, got {rate}")
        with self._lock:
            flowed = self._flowed_us()
            self._wall_base += flowed
            self._mono_base += flowed
            self._real_base_ns = time.monotonic_ns()
            self._rate = rate

    def step_wall(self, delta_us: int) -> None:
        """Jump the wall clock only (an RTC reset or a correction); monotonic time is unaffected."""
        with self._lock:
            self._wall_base += delta_us

    def set_quality(self, quality: ClockQuality, source: str | None = None) -> None:
        with self._lock:
            self._quality = ClockQuality(quality)
            if source is not None:
                self._source = source

    def set_unset(self) -> None:
        """A board that booted without a time source: wall time near 2000-01-01, quality `unset`."""
        with self._lock:
            self._wall_base = UNSET_WALL_US - self._flowed_us()
            self._quality = ClockQuality.UNSET

    def mark_synced(self, source: str, wall_us: int | None = None) -> None:
        """A successful sync (same name as SystemClock's): optionally set the wall time, quality `synced`."""
        with self._lock:
            if wall_us is not None:
                self._wall_base = wall_us - self._flowed_us()
            self._source = source
            self._quality = ClockQuality.SYNCED

    def set_free_running(self) -> None:
        with self._lock:
            self._quality = ClockQuality.FREE_RUNNING

    @property
    def wall_plausible(self) -> bool:
        return self.wall_us() >= PLAUSIBLE_EPOCH_US
