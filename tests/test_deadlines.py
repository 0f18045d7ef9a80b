"""R20: footage not receipted by the end of the day, or within 24 h of returning on a remote day, is overdue."""

from __future__ import annotations

from datetime import datetime

from agent.config import SyncConfig
from agent.daemon import overdue_segments


def us(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1e6)


ROWS = [{"segment_id": "morning", "opened_wall_us": us("2026-12-04T09:00")},
        {"segment_id": "evening", "opened_wall_us": us("2026-12-04T23:59:30")}]


def test_same_day_deadline():
    sync = SyncConfig(day_end_local="22:00")
    assert overdue_segments(ROWS, [], sync, datetime.fromisoformat("2026-12-04T20:00")) == []
    # recorded after the day's deadline: due by the next day's
    assert overdue_segments(ROWS, [], sync, datetime.fromisoformat("2026-12-05T00:00:30")) == ["morning"]
    later = overdue_segments(ROWS, [], sync, datetime.fromisoformat("2026-12-05T22:01"))
    assert later == ["morning", "evening"]


def test_remote_day_counts_from_the_first_dock_after_the_recording():
    sync = SyncConfig(remote_day=True, remote_grace_h=24)
    at = datetime.fromisoformat
    assert overdue_segments(ROWS, [], sync, at("2026-12-09T00:00")) == []  # not back yet: not overdue
    docks = [us("2026-12-01T08:00"), us("2026-12-06T18:00")]  # an earlier dock does not count
    assert overdue_segments(ROWS, docks, sync, at("2026-12-07T17:59")) == []
    assert overdue_segments(ROWS, docks, sync, at("2026-12-07T18:01")) == ["morning", "evening"]
