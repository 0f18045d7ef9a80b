"""The per-session compliance report (R24): what the rule asked of this session and whether it happened.

A pure function of the session's ledger records, so the device (at session close, as a signed record),
`bwc-agent report` and the bureau (from the uploaded ledger) all compute the same answer.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from agent.evidence.records import INTERRUPTION_LABELS, InterruptionReason, SignedRecord

GAP_TOLERANCE_US = 1_100_000  # a split may leave up to one frame/fragment boundary; more is a gap


@dataclass
class InterruptionSummary:
    interruption_id: str
    reason: str
    source: str
    start_wall_us: int
    start_mono_us: int
    end_wall_us: int | None = None
    end_mono_us: int | None = None
    resumed: bool | None = None
    explained: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ComplianceReport:
    session_id: str
    officer_id: str | None = None
    category: str | None = None
    stage: str | None = None
    opened_wall_us: int | None = None
    closed_wall_us: int | None = None
    outcome: str | None = None
    opening_statement: str = "missing"  # given | confirmed | missing
    opening_statement_wall_us: int | None = None
    notice: str = "missing"  # given | confirmed | played_by_device | missing
    notice_wall_us: int | None = None
    interruptions: list[InterruptionSummary] = field(default_factory=list)
    stops_refused: int = 0
    stops_during_mandatory: int = 0
    written_explanation_required: bool = False
    markers: dict[str, int] = field(default_factory=dict)
    segments: int = 0
    truncated_segments: int = 0
    recorded_us: int = 0
    gaps: list[dict[str, int]] = field(default_factory=list)

    @property
    def findings(self) -> list[str]:
        out = []
        if self.opening_statement == "missing":
            out.append("opening_statement_missing (R16)")
        if self.notice == "missing":
            out.append("notice_to_party_missing (R16)")
        for i in self.interruptions:
            if i.resumed and not i.explained:
                out.append(f"interruption_{i.interruption_id}_{i.reason}_not_explained (R17)")
        if self.written_explanation_required:
            out.append("written_explanation_required (R17)")
        if self.stops_during_mandatory:
            out.append(f"stopped_during_full_process_stage x{self.stops_during_mandatory} (R14)")
        if self.truncated_segments:
            out.append(f"truncated_segments x{self.truncated_segments} (R5)")
        if self.gaps:
            out.append(f"unexplained_gaps x{len(self.gaps)} (R5)")
        return out

    @property
    def compliant(self) -> bool:
        return not self.findings

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "interruptions"}
        d["interruptions"] = [i.as_dict() for i in self.interruptions]
        d["findings"] = self.findings
        d["compliant"] = self.compliant
        return d

    def as_record_body(self) -> dict[str, Any]:
        report = {k: v for k, v in self.as_dict().items() if k not in ("findings", "compliant", "session_id")}
        return {"session_id": self.session_id, "compliant": self.compliant, "findings": self.findings,
                "report": report}

    def render(self, zh: bool = False) -> str:
        def yn(v: str) -> str:
            return "MISSING" if v == "missing" else v

        lines = [f"Session {self.session_id}  officer {self.officer_id or '-'}  stage "
                 f"{self.category or '-'}/{self.stage or '-'}  outcome {self.outcome or 'open'}",
                 f"  recorded            {self.recorded_us / 60e6:.1f} min in {self.segments} segment(s)"
                 + (f", {self.truncated_segments} truncated" if self.truncated_segments else ""),
                 f"  opening statement   {yn(self.opening_statement)}   (R16)",
                 f"  notice to party     {yn(self.notice)}   (R16)"]
        for i in self.interruptions:
            zh_label, en_label = INTERRUPTION_LABELS[InterruptionReason(i.reason)]
            label = zh_label if zh else en_label
            lines.append(f"  interruption {i.interruption_id:<5} {label} ({i.source}); "
                         f"{'resumed' if i.resumed else 'not resumed'}; "
                         f"{'reason stated' if i.explained else 'reason NOT stated'}   (R17)")
        if self.stops_refused or self.stops_during_mandatory:
            lines.append(f"  full-process stops  {self.stops_during_mandatory} confirmed, "
                         f"{self.stops_refused} refused first hold(s)   (R14)")
        if self.markers:
            lines.append("  markers             " + ", ".join(f"{k} x{v}" for k, v in sorted(self.markers.items())))
        if self.written_explanation_required:
            lines.append("  WRITTEN EXPLANATION REQUIRED (R17)")
        lines.append("  compliant           " + ("yes" if self.compliant else "NO: " + "; ".join(self.findings)))
        return "\n".join(lines)


def report_from_records(session_id: str, records: list[SignedRecord]) -> ComplianceReport:
    rep = ComplianceReport(session_id)
    markers: Counter[str] = Counter()
    by_id: dict[str, InterruptionSummary] = {}
    explained: set[str] = set()
    segs: list[dict[str, Any]] = []
    for rec in records:
        f = rec.fields
        body, rtype, wall = f["body"], f["type"], f["wall_us"]
        if body.get("session_id") != session_id:
            continue
        if rtype == "session_open":
            rep.officer_id, rep.category, rep.stage = body["officer_id"], body["category"], body["stage"]
            rep.opened_wall_us = wall
        elif rtype == "session_context":
            rep.officer_id, rep.category, rep.stage = body["officer_id"], body["category"], body["stage"]
        elif rtype == "session_close":
            rep.closed_wall_us, rep.outcome = wall, body["outcome"]
            rep.written_explanation_required |= body["written_explanation_required"]
        elif rtype == "statement":
            given = {"end": "given", "confirmed": "confirmed"}.get(body["event"])
            if body["detected_by"] == "device":
                given = "played_by_device"
            if given and body["kind"] == "opening":
                rep.opening_statement, rep.opening_statement_wall_us = given, wall
            elif given and body["kind"] == "notice":
                rep.notice, rep.notice_wall_us = given, wall
            elif given and body["kind"] == "interruption_reason" and body["interruption_id"]:
                explained.add(body["interruption_id"])
        elif rtype == "interruption_start":
            summary = InterruptionSummary(body["interruption_id"], body["reason"], body["source"], wall, f["mono_us"])
            by_id[summary.interruption_id] = summary
            rep.interruptions.append(summary)
        elif rtype == "interruption_end" and body["interruption_id"] in by_id:
            by_id[body["interruption_id"]].end_wall_us = wall
            by_id[body["interruption_id"]].end_mono_us = f["mono_us"]
            by_id[body["interruption_id"]].resumed = body["resumed"]
        elif rtype == "policy_flag":
            if body["flag"] == "stop_refused":
                rep.stops_refused += 1
            elif body["flag"] == "stop_during_mandatory":
                rep.stops_during_mandatory += 1
            elif body["flag"] == "written_explanation_required":
                rep.written_explanation_required = True
        elif rtype == "marker":
            markers[body["step"]] += 1
        elif rtype == "segment":
            segs.append(body)
    for i in rep.interruptions:
        i.explained = i.interruption_id in explained
    rep.markers = dict(markers)
    _account_segments(rep, segs)
    return rep


def _account_segments(rep: ComplianceReport, segs: list[dict[str, Any]]) -> None:
    segs.sort(key=lambda b: b["index"])
    rep.segments = len(segs)
    rep.truncated_segments = sum(1 for b in segs if b["truncated"])
    for b in segs:
        if b["first_pts_us"] is not None and b["last_pts_us"] is not None:
            rep.recorded_us += b["last_pts_us"] - b["first_pts_us"]
    # Media timestamps and record `mono_us` share the monotonic clock, so a gap between two segments is
    # explained when an interruption that paused recording covers it.
    for a, b in zip(segs, segs[1:], strict=False):
        if a["last_pts_us"] is None or b["first_pts_us"] is None:
            continue
        gap = b["first_pts_us"] - a["last_pts_us"]
        if gap <= GAP_TOLERANCE_US:
            continue
        covered = any(i.start_mono_us <= a["last_pts_us"] + GAP_TOLERANCE_US
                      and (i.end_mono_us is None or i.end_mono_us >= b["first_pts_us"] - GAP_TOLERANCE_US)
                      for i in rep.interruptions)
        if not covered:
            rep.gaps.append({"after_index": a["index"], "gap_us": gap})


def build_report(ledger, session_id: str) -> ComplianceReport:
    rows = ledger.db.query_rows("SELECT data, sig FROM ledger WHERE session_id=? ORDER BY seq", (session_id,))
    return report_from_records(session_id, [SignedRecord(bytes(d), bytes(s)) for d, s in rows])


def read_ledger(data_dir) -> list[SignedRecord]:
    """All records of a device data directory, read-only (the agent may be running)."""
    import sqlite3
    from pathlib import Path

    path = Path(data_dir) / "ledger.db"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no ledger database (is {data_dir} a device data directory?)")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT data, sig FROM ledger ORDER BY seq").fetchall()
    finally:
        conn.close()
    return [SignedRecord(bytes(d), bytes(s)) for d, s in rows]


def session_reports(records: list[SignedRecord], session_id: str | None = None,
                    day: str | None = None) -> list[ComplianceReport]:
    """Reports for one session, or for every session opened on `day` (YYYY-MM-DD, local time), or all."""
    from datetime import datetime

    wanted = []
    for rec in records:
        f = rec.fields
        if f["type"] != "session_open":
            continue
        sid = f["body"]["session_id"]
        opened_day = datetime.fromtimestamp(f["wall_us"] / 1e6).strftime("%Y-%m-%d")
        if (session_id is None or sid == session_id) and (day is None or opened_day == day):
            wanted.append(sid)
    return [report_from_records(sid, records) for sid in wanted]
