"""`bwc-agent status`: what the device is doing, for a technician or a script.

Read-only and safe while the agent runs: live figures (state, battery, upload progress) come from the
`status.json` the daemon rewrites every few seconds in the data directory; the rest from the ledger and the
segment index (opened read-only).
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from agent.evidence.records import SignedRecord

STATUS_FILE = "status.json"
LIVE_MAX_AGE_S = 30


def collect(data_dir: Path, bitrate_bps: int = 8_000_000) -> dict[str, Any]:
    db = data_dir / "ledger.db"
    if not db.exists():
        raise FileNotFoundError(f"{db}: no ledger database (is {data_dir} a device data directory?)")
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        counts = dict(conn.execute("SELECT state, COUNT(*) FROM segments GROUP BY state").fetchall())
        unreceipted = conn.execute("SELECT COALESCE(SUM(size),0) FROM segments WHERE state NOT IN "
                                   "('RECEIPTED','PURGED')").fetchone()[0]
        head = conn.execute("SELECT seq FROM ledger ORDER BY seq DESC LIMIT 1").fetchone()
        recent = [SignedRecord(bytes(d), bytes(s)) for d, s in conn.execute(
            "SELECT data, sig FROM ledger WHERE type IN ('alarm','clock_sync','session_open','session_close',"
            "'dock','boot') ORDER BY seq DESC LIMIT 200").fetchall()]
    finally:
        conn.close()
    out: dict[str, Any] = {"data_dir": str(data_dir), "ledger_head_seq": head[0] if head else 0,
                           "segments": counts, "unreceipted_bytes": unreceipted}
    import shutil

    free = shutil.disk_usage(data_dir).free
    out["storage"] = {"free_bytes": free, "minutes_left": round(free * 8 / bitrate_bps / 60, 1)}
    last_sync = next((r.fields for r in recent if r.fields["type"] == "clock_sync"), None)
    out["last_sync"] = ({"wall_us": last_sync["wall_us"], "offset_us": last_sync["body"]["offset_us"]}
                        if last_sync else None)
    newest = recent[0].fields if recent else None
    out["clock"] = newest["clock"] if newest else None
    day_ago = time.time_ns() // 1000 - 24 * 3600 * 1_000_000
    out["alarms"] = [{"code": r.fields["body"]["code"], "severity": r.fields["body"]["severity"],
                      "detail": r.fields["body"]["detail"], "wall_us": r.fields["wall_us"]}
                     for r in recent if r.fields["type"] == "alarm" and r.fields["wall_us"] >= day_ago]
    opened = {r.fields["body"]["session_id"] for r in recent if r.fields["type"] == "session_open"}
    closed = {r.fields["body"]["session_id"] for r in recent if r.fields["type"] == "session_close"}
    out["open_session"] = next(iter(opened - closed), None)
    live = read_live(data_dir)
    out["live"] = live
    out["state"] = live["state"] if live else ("RECORDING?" if out["open_session"] else "not running")
    return out


def read_live(data_dir: Path) -> dict[str, Any] | None:
    path = data_dir / STATUS_FILE
    try:
        live = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if time.time() - path.stat().st_mtime > LIVE_MAX_AGE_S:
        return None
    return live


def render(status: dict[str, Any]) -> str:
    live = status.get("live") or {}
    seg = status["segments"]
    rows = [
        ("state", status["state"] + (f" (session {live.get('session_id')})" if live.get("session_id") else "")),
        ("battery", f"{live['battery_percent']}%" if live.get("battery_percent") is not None else "unknown"),
        ("storage", f"{status['storage']['free_bytes'] / 1e9:.1f} GB free, "
                    f"~{status['storage']['minutes_left']:.0f} min of recording left"),
        ("upload queue", ", ".join(f"{k} {v}" for k, v in sorted(seg.items())) or "empty"),
        ("not receipted", f"{status['unreceipted_bytes'] / 1e6:.1f} MB"),
        ("upload progress", _progress(live.get("upload") or {})),
        ("last sync", "never" if not status["last_sync"] else
            f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(status['last_sync']['wall_us'] / 1e6))}, "
            f"clock offset {status['last_sync']['offset_us'] / 1000:+.0f} ms"),
        ("clock", f"{status['clock']['quality']} ({status['clock']['source']})" if status["clock"] else "unknown"),
        ("ledger", f"{status['ledger_head_seq']} records"),
        ("alarms (24 h)", "; ".join(f"{a['severity']}: {a['code']} {a['detail']}" for a in status["alarms"]) or "none"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _progress(upload: dict[str, Any]) -> str:
    if not upload:
        return "-"
    done, queued = upload.get("done_bytes", 0), upload.get("queued_bytes", 0)
    eta = upload.get("eta_s")
    return (f"{upload.get('phase')}: {done / 1e6:.1f} of {queued / 1e6:.1f} MB"
            + (f", ETA {eta} s" if eta is not None else ""))
