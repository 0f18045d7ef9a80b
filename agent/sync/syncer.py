"""What happens at the dock (DESIGN.md, "Sync"; R20): time sync, ledger upload, segment uploads in
priority order, receipts verified against the pinned bureau key, and nothing more.

Thread: `Syncer.sync_once()` runs on the sync thread (started when the dock reports presence); it checks
`should_stop()` between requests so an undock ends it within one request. It never purges on its own:
purging receipted footage is the space controller's decision, and only for receipted segments.

Order: the ledger first (the bureau verifies a segment against its signed record), then segments of
flagged sessions (mandatory stages, flags), then the oldest first. Each segment travels with its
sidecars (docs/FORMAT.md §10.5): its own file, then every sidecar its signed record names, each a tus
upload of its own that resumes the same way; the bureau receipts the segment only when it holds all of
them. Upload URLs are persisted in the `uploads` table before any byte is sent, keyed by the segment id
for the segment's own file and by the file name for a sidecar (`<segment_id>.gps.age`).
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.clock import Clock
from agent.evidence.receipts import ReceiptError, ReceiptVerifier
from agent.evidence.records import SignedRecord
from agent.storage.store import EvidenceStore, SegmentState, StateError
from agent.sync.https import BureauError, HttpsSession, LinkError
from agent.sync.tus import TusClient, TusError, TusInterrupted, same_origin

log = logging.getLogger(__name__)
S = SegmentState
RECEIPT_BATCH = 200
LEDGER_BATCH_BYTES = 4 * 1024 * 1024
PENDING = (S.CLOSED, S.QUEUED, S.UPLOADING, S.UPLOADED)


@dataclass
class SyncProgress:
    queued_bytes: int = 0
    done_bytes: int = 0
    started_mono_us: int = 0
    segments_total: int = 0
    segments_sent: int = 0
    receipted: int = 0
    rejected: int = 0
    phase: str = "idle"  # idle | time | ledger | segments | receipts | done | blocked
    error: str | None = None

    def eta_s(self, now_mono_us: int) -> int | None:
        elapsed = (now_mono_us - self.started_mono_us) / 1e6
        if self.done_bytes <= 0 or elapsed <= 0:
            return None
        rate = self.done_bytes / elapsed
        return int((self.queued_bytes - self.done_bytes) / rate) if rate > 0 else None

    def as_dict(self, now_mono_us: int) -> dict[str, Any]:
        return {"phase": self.phase, "queued_bytes": self.queued_bytes, "done_bytes": self.done_bytes,
                "eta_s": self.eta_s(now_mono_us), "segments_total": self.segments_total,
                "segments_sent": self.segments_sent, "receipted": self.receipted, "rejected": self.rejected,
                "error": self.error}


@dataclass(frozen=True)
class UploadPart:
    """One file of a segment to upload: the segment's own file or one of its recorded sidecars."""

    key: str  # its row in the `uploads` table: the segment id, or the sidecar's file name
    file: str  # name in segments/
    size: int
    metadata: dict[str, str]  # tus Upload-Metadata (docs/PROTOCOL.md, "Uploads")


@dataclass
class SyncResult:
    clock_offset_us: int | None = None
    ledger_sent: int = 0
    uploaded: list[str] = field(default_factory=list)
    receipted: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    interrupted: bool = False
    error: str | None = None


class Syncer:
    def __init__(self, store: EvidenceStore, bureau_url: str, session: HttpsSession, receipts: ReceiptVerifier,
                 clock: Clock, request_bytes: int = 4 * 1024 * 1024,
                 on_progress: Callable[[SyncProgress], None] | None = None,
                 should_stop: Callable[[], bool] = lambda: False):
        self.store = store
        self.base = bureau_url.rstrip("/")
        self.http = session
        self.receipts = receipts
        self.clock = clock
        self.tus = TusClient(f"{self.base}/v1/uploads", session=session, request_bytes=request_bytes)
        self.on_progress = on_progress or (lambda p: None)
        self.should_stop = should_stop
        self.progress = SyncProgress()

    # --- one pass ---------------------------------------------------------------------------------

    def sync_once(self) -> SyncResult:
        """One full pass; safe to interrupt at any point and to run again (everything resumes)."""
        result = SyncResult()
        self.progress = SyncProgress(started_mono_us=self.clock.mono_us())
        try:
            self._phase("time")
            result.clock_offset_us = self.time_sync()
            self._phase("ledger")
            result.ledger_sent = self.upload_ledger()
            self._phase("segments")
            self.upload_segments(result)
            self._phase("receipts")
            self.fetch_receipts(result)
            result.ledger_sent += self.upload_ledger()  # the receipt records themselves
            self._phase("done")
        except (TusInterrupted, LinkError) as exc:
            result.interrupted, result.error = True, str(exc)
            self.progress.error = str(exc)
            self._phase("blocked")
            log.warning("sync interrupted: %s", exc)
        except (BureauError, TusError) as exc:
            result.error = str(exc)
            self.progress.error = str(exc)
            self._phase("blocked")
            log.error("sync failed: %s", exc)
        finally:
            self._requeue_uploading()
        return result

    def _phase(self, phase: str) -> None:
        self.progress.phase = phase
        self.on_progress(self.progress)

    def _stopping(self) -> bool:
        if self.should_stop():
            raise TusInterrupted("sync stopped (undocked or shutting down)")
        return False

    # --- time -------------------------------------------------------------------------------------

    def time_sync(self, exchanges: int = 4) -> int:
        """NTP-style offset against the bureau (PROTOCOL.md, "POST /v1/time"); recorded, never applied
        to recorded timestamps."""
        self.http.json("POST", f"{self.base}/v1/time", {"t1_us": self.clock.wall_us()})  # warm the connection
        best: tuple[int, int] | None = None
        for _ in range(exchanges):
            t1 = self.clock.wall_us()
            answer = self.http.json("POST", f"{self.base}/v1/time", {"t1_us": t1})
            t4 = self.clock.wall_us()
            t2, t3 = answer.get("t2_us"), answer.get("t3_us")
            if not isinstance(t2, int) or not isinstance(t3, int) or answer.get("t1_us") != t1:
                raise BureauError(200, "bad_time_answer", f"unexpected /v1/time answer {answer!r}")
            offset, rtt = ((t2 - t1) + (t3 - t4)) // 2, (t4 - t1) - (t3 - t2)
            if best is None or rtt < best[1]:
                best = (offset, rtt)
        assert best is not None
        self.store.ledger.append("clock_sync", {"source": "bureau", "offset_us": best[0], "rtt_us": best[1],
                                                "applied": False})
        if hasattr(self.clock, "mark_synced") and abs(best[0]) < 2_000_000:
            self.clock.mark_synced("bureau")
        return best[0]

    # --- ledger -----------------------------------------------------------------------------------

    def upload_ledger(self) -> int:
        head = self.http.json("GET", f"{self.base}/v1/ledger/head")
        head_seq = int(head.get("head_seq", 0))
        if head_seq:
            ours = next(iter(self.store.ledger.records(head_seq)), None)
            if ours is None or ours.hash != head.get("head_hash"):
                self.store.ledger.append("alarm", {"code": "ledger_fork", "severity": "critical",
                                                   "detail": f"bureau head seq {head_seq} differs from ours"})
                raise BureauError(409, "fork", f"bureau head {head_seq} is not our record {head_seq}")
        sent = 0
        batch: list[bytes] = []
        size = 0
        for rec in self.store.ledger.records(head_seq + 1):
            line = rec.to_line()
            if batch and size + len(line) > LEDGER_BATCH_BYTES:
                sent += self._post_ledger(batch)
                batch, size = [], 0
            batch.append(line)
            size += len(line)
        if batch:
            sent += self._post_ledger(batch)
        return sent

    def _post_ledger(self, lines: list[bytes]) -> int:
        self._stopping()
        answer = self.http.json("POST", f"{self.base}/v1/ledger", body=b"".join(lines),
                                content_type="application/x-ndjson")
        return int(answer.get("accepted", 0))

    # --- segments ---------------------------------------------------------------------------------

    def ordered_pending(self) -> list[dict[str, Any]]:
        """Segments not yet receipted, flagged sessions first, then oldest first."""
        rows = self.store.segments(PENDING)
        return sorted(rows, key=lambda r: (-(r["flagged"] or 0), r["opened_wall_us"] or 0, r["segment_id"]))

    def upload_parts(self, row: dict[str, Any]) -> list[UploadPart]:
        """The files to send for a segment, in order: its own file, then each sidecar its signed record
        names (the record, not the directory, says which: nothing else is evidence of this segment)."""
        sid = row["segment_id"]
        meta = {"segment_id": sid, "sha256_cipher": row["sha256_cipher"], "device": self.store.device_id}
        parts = [UploadPart(sid, row["file"], row["size"] or 0, meta)]
        found = self.store.db.query_rows("SELECT data, sig FROM ledger WHERE seq=? AND type='segment'",
                                         (row["record_seq"],))
        record = SignedRecord(bytes(found[0][0]), bytes(found[0][1])) if found else None
        if record is None or record.fields["body"]["segment_id"] != sid:
            log.error("segment %s: its segment record (seq %s) is not in the ledger; sending the file alone", sid,
                      row["record_seq"])
            return parts
        for sidecar in record.fields["body"].get("sidecars", []):
            parts.append(UploadPart(sidecar["file"], sidecar["file"], sidecar["size"],
                                    {"segment_id": sid, "sidecar": sidecar["kind"],
                                     "sha256_cipher": sidecar["sha256_cipher"], "device": self.store.device_id}))
        return parts

    def upload_segments(self, result: SyncResult) -> None:
        rows = [r for r in self.ordered_pending() if r["state"] != S.UPLOADED]
        self.progress.queued_bytes = sum(p.size for r in rows for p in self.upload_parts(r))
        self.progress.segments_total = len(rows)
        for row in rows:
            self._stopping()
            self.upload_segment(row)
            if self.store.row(row["segment_id"])["state"] == S.UPLOADED:
                result.uploaded.append(row["segment_id"])
                self.progress.segments_sent += 1
                # Its receipt now, not after the whole batch: an undock later in the pass must not leave
                # every segment of the pass without one (bench_sync: 59 ms p50 from last byte to receipt).
                self.fetch_receipts(result, only=[row["segment_id"]])
            self.on_progress(self.progress)

    def upload_segment(self, row: dict[str, Any]) -> bool:
        """Send a segment's file and then each of its sidecars (resuming any the bureau has part of); the
        segment is UPLOADED on return True. False: a sidecar its record names is not on the device (alarm
        raised; the segment is requeued at the end of the pass; what was sent stays at the bureau)."""
        sid = row["segment_id"]
        parts = self.upload_parts(row)
        if row["state"] == S.CLOSED:
            self.store.transition(sid, S.QUEUED, "docked")
        self.store.transition(sid, S.UPLOADING)
        for part in parts:
            self._stopping()
            if not self._upload_part(part):
                return False
        self.store.transition(sid, S.UPLOADED, "tus upload complete (not an acknowledgement)")
        return True

    def _upload_part(self, part: UploadPart) -> bool:
        path = self.store.segments_dir / part.file
        if not path.is_file():
            detail = f"{part.metadata['segment_id']}: {part.file}, named by its segment record, is not in segments/"
            log.error("cannot upload: %s", detail)
            self.store.ledger.append("alarm", {"code": "sidecar_missing", "severity": "critical", "detail": detail})
            return False
        stored = self.store.db.query_rows("SELECT upload_url FROM uploads WHERE segment_id=?", (part.key,))
        url = same_origin(self.tus.creation_url, stored[0][0]) if stored else None
        base_done = self.progress.done_bytes

        def remember(new_url: str) -> None:
            with self.store.db.transaction() as conn:
                conn.execute("INSERT OR REPLACE INTO uploads (segment_id, upload_url, created_wall_us) VALUES (?,?,?)",
                             (part.key, new_url, self.clock.wall_us()))

        def progress(done: int, total: int) -> None:
            self.progress.done_bytes = base_done + done
            self.on_progress(self.progress)
            self._stopping()

        try:
            self.tus.upload(path, part.metadata, upload_url=url, on_created=remember, on_progress=progress)
        except TusError as exc:
            if url is not None and "gone" in str(exc):
                with self.store.db.transaction() as conn:
                    conn.execute("DELETE FROM uploads WHERE segment_id=?", (part.key,))
                self.tus.upload(path, part.metadata, on_created=remember, on_progress=progress)
            else:
                raise
        self.progress.done_bytes = base_done + part.size  # also when the bureau already had every byte
        return True

    def _requeue_uploading(self) -> None:
        for row in self.store.segments([S.UPLOADING]):
            try:
                self.store.transition(row["segment_id"], S.QUEUED, "upload interrupted; resumes at next dock")
            except StateError:
                log.exception("could not requeue %s", row["segment_id"])

    # --- receipts ---------------------------------------------------------------------------------

    def fetch_receipts(self, result: SyncResult, only: list[str] | None = None) -> None:
        rows = {r["segment_id"]: r for r in self.store.segments(PENDING)
                if only is None or r["segment_id"] in only}
        ids = list(rows)
        for i in range(0, len(ids), RECEIPT_BATCH):
            self._stopping()
            batch = ids[i:i + RECEIPT_BATCH]
            query = "&".join(f"segment_id={s}" for s in batch)
            answer = self.http.json("GET", f"{self.base}/v1/receipts?{query}")
            for item in answer.get("results", []):
                if isinstance(item, dict) and item.get("segment_id") in rows:
                    self._take_receipt(rows[item["segment_id"]], item, result)

    def _take_receipt(self, row: dict[str, Any], item: dict[str, Any], result: SyncResult) -> None:
        sid, status = row["segment_id"], item.get("status")
        if status == "receipted":
            try:
                data = base64.b64decode(item.get("receipt", ""), validate=True)
                sig = base64.b64decode(item.get("sig", ""), validate=True)
                verified = self.receipts.verify(data, sig, device=self.store.device_id, segment_id=sid,
                                                sha256_cipher=row["sha256_cipher"], size=row["size"])
            except (ReceiptError, ValueError) as exc:
                log.error("receipt for %s refused: %s", sid, exc)
                self.store.ledger.append("alarm", {"code": "receipt_refused", "severity": "warning",
                                                   "detail": f"{sid}: {exc}"})
                return
            self.store.record_receipt(sid, verified)
            result.receipted.append(sid)
            self.progress.receipted += 1
        elif status == "awaiting_sidecar" and row["state"] == S.UPLOADED:
            # The bureau holds the footage but not every sidecar (a commit failed there, or an older agent
            # sent the segment alone): queue it so the next pass sends what is missing.
            self.store.transition(sid, S.QUEUED, str(item.get("detail", "bureau awaits a sidecar")))
        elif status == "rejected":
            if row["state"] in (S.UPLOADING, S.UPLOADED):
                self.store.transition(sid, S.REJECTED, str(item.get("detail", "")))
            self.store.ledger.append("alarm", {"code": "segment_rejected", "severity": "critical",
                                               "detail": f"{sid}: {item.get('detail', '')}"})
            result.rejected.append(sid)
            self.progress.rejected += 1

