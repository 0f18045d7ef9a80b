"""The pre-event buffer: the last N seconds of encoded footage, in RAM, as whole GOPs (DESIGN.md, "Recording").

Thread: owned by the capture writer thread (pipeline.py); `seconds`/`nbytes` may be read from others
for stats (plain int/float reads).

While the device is READY every completed GOP is pushed here; on a start press the pipeline drains
the ring into the new session's first segment, then carries on with live packets, so the session
begins up to N seconds before the press without a gap. The ring keeps the fewest whole GOPs that
cover at least `seconds` (so the footage before a press is never shorter than configured, and at most
one GOP longer). The oldest GOP is evicted whole, together with any piece that continues it (a piece
without a keyframe cannot be decoded without its GOP's start).
"""

from __future__ import annotations

from collections import deque

from agent.capture.segmenter import Gop

MAX_PRE_EVENT_SECONDS = 120.0
DEFAULT_PRE_EVENT_SECONDS = 30.0


class PreEventRing:
    def __init__(self, seconds: float = DEFAULT_PRE_EVENT_SECONDS, include_audio: bool = True):
        if not 0 <= seconds <= MAX_PRE_EVENT_SECONDS:
            raise ValueError(f"pre-event buffer of {seconds} s is outside 0..{MAX_PRE_EVENT_SECONDS:g} s")
        self.limit_us = int(seconds * 1_000_000)
        self.include_audio = include_audio
        self._gops: deque[Gop] = deque()
        self._duration_us = 0
        self.nbytes = 0
        self.evicted_gops = 0
        self.evicted_packets = 0

    @property
    def seconds(self) -> float:
        return self._duration_us / 1e6

    def __len__(self) -> int:
        return len(self._gops)

    def push(self, gop: Gop) -> None:
        """Add a completed GOP, then evict from the old end while the rest still covers the limit."""
        if not self.include_audio:
            gop = gop.without_audio()
        if not self._gops and not gop.keyframe_led:
            self._count_evicted(gop)  # a continuation whose start is gone: undecodable on its own
            return
        self._gops.append(gop)
        self._duration_us += gop.duration_us
        self.nbytes += gop.nbytes
        while self._gops and self._duration_us - self._head_group_us() >= self.limit_us:
            self._evict_head_group()

    def _head_group(self) -> list[Gop]:
        group = [self._gops[0]]
        for gop in list(self._gops)[1:]:
            if gop.keyframe_led:
                break
            group.append(gop)
        return group

    def _head_group_us(self) -> int:
        return sum(g.duration_us for g in self._head_group())

    def _evict_head_group(self) -> None:
        for _ in range(len(self._head_group())):
            gop = self._gops.popleft()
            self._duration_us -= gop.duration_us
            self.nbytes -= gop.nbytes
            self._count_evicted(gop)

    def _count_evicted(self, gop: Gop) -> None:
        self.evicted_gops += 1
        self.evicted_packets += len(gop.video) + len(gop.audio)

    def drain(self) -> list[Gop]:
        """Hand over every buffered GOP, oldest first, and leave the ring empty."""
        out = list(self._gops)
        self._gops.clear()
        self._duration_us = 0
        self.nbytes = 0
        return out
