"""Time for records and media: a wall clock (UTC) and a monotonic clock, plus how far to trust the wall clock.

Recorded timestamps are never rewritten; a clock correction is itself a ledger record (DESIGN.md, "Time").
The simulator swaps in its own clock with the same interface.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

from agent.evidence.records import ClockQuality

# Any wall time before this is certainly an unset RTC (Pi boards have no battery-backed clock by default).
PLAUSIBLE_EPOCH_US = 1_735_689_600_000_000  # 2025-01-01T00:00:00Z
SYNC_VALID_US = 24 * 3600 * 1_000_000


class Clock(Protocol):
    def wall_us(self) -> int: ...

    def mono_us(self) -> int: ...

    def status(self) -> dict[str, str]: ...


class SystemClock:
    """The OS clocks. Quality is `unset` until the wall clock is plausible, `synced` for 24 h after a sync."""

    def __init__(self, source: str = "system") -> None:
        self._lock = threading.Lock()
        self._source = source
        self._synced_at_mono: int | None = None

    def wall_us(self) -> int:
        return time.time_ns() // 1000

    def mono_us(self) -> int:
        return time.monotonic_ns() // 1000

    def mark_synced(self, source: str) -> None:
        with self._lock:
            self._source = source
            self._synced_at_mono = self.mono_us()

    def status(self) -> dict[str, str]:
        with self._lock:
            if self.wall_us() < PLAUSIBLE_EPOCH_US:
                quality = ClockQuality.UNSET
            elif self._synced_at_mono is not None and self.mono_us() - self._synced_at_mono < SYNC_VALID_US:
                quality = ClockQuality.SYNCED
            else:
                quality = ClockQuality.FREE_RUNNING
            return {"source": self._source, "quality": quality.value}
