"""Ledger ingest: a device's records arrive in batches and join the chain the bureau already holds.

A batch is the JSON Lines export (agent.storage.ledger; docs/FORMAT.md, "Ledger export"), from any
seq on. Records the bureau already holds may be resent (they must be byte-identical: anything else is
a fork); the first new record must follow the bureau's head. New records are checked with the shared
verifier (agent.evidence.verify.Verifier.verify_chain) anchored at the bureau's head: seq continuity,
prev hashes, every body's schema, and every signature against the device key pinned at enrollment
(the key in its certificate) or the key a signed `key_change` record handed over to. A batch is
stored whole or not at all (R5, R22). Each new segment record is indexed with the sidecars it names
(file, size, hash): uploads of the segment and of each sidecar are checked against that index, and
complete uploads that were waiting for the record are committed (bureau.receipts).

Threads: `ingest` runs in a request-handler thread under the device's lock (bureau.receipts.DeviceLocks).
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from agent.evidence.canonical import CanonicalJSONError
from agent.evidence.records import RecordError, SignedRecord, check_envelope
from agent.evidence.signing import SignatureError, load_public_key, public_key_der
from agent.evidence.verify import Report, Verifier
from bureau.db import BureauDatabase, BureauDatabaseError, DeviceRow, LedgerRow, SegmentRow, SidecarRow
from bureau.objects import SAFE_FILE_RE, ObjectStore
from bureau.receipts import DeviceLocks, ReceiptIssuer

log = logging.getLogger(__name__)


class LedgerRejected(Exception):
    """A batch the bureau refuses; nothing of it was stored. Rendered as a JSON error by the server."""

    def __init__(self, status: int, code: str, detail: str, **extra: Any):
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.extra = extra


@dataclass
class IngestResult:
    accepted: int
    already_held: int
    head_seq: int
    head_hash: str
    segments_recorded: list[str] = field(default_factory=list)
    receipted: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "already_held": self.already_held, "head_seq": self.head_seq,
                "head_hash": self.head_hash, "segments_recorded": self.segments_recorded,
                "receipted": self.receipted}


@dataclass
class _Line:
    lineno: int
    record: SignedRecord
    fields: dict[str, Any]

    @property
    def seq(self) -> int:
        return self.fields["seq"]


def _parse(body: bytes, device_id: str) -> list[_Line]:
    lines = []
    for lineno, raw in enumerate(body.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            rec = SignedRecord.from_line(raw)
            fields = rec.fields
            check_envelope(fields)
        except (RecordError, CanonicalJSONError) as exc:
            raise LedgerRejected(400, "malformed_record", f"line {lineno}: {exc}", line=lineno) from None
        if fields["device"] != device_id:
            raise LedgerRejected(403, "wrong_device", f"line {lineno}: record of device {fields['device']!r}; this "
                                 f"certificate is for {device_id!r}", line=lineno)
        lines.append(_Line(lineno, rec, fields))
    if not lines:
        raise LedgerRejected(400, "empty_batch", "the request body holds no records")
    for prev, cur in zip(lines, lines[1:], strict=False):
        if cur.seq != prev.seq + 1:
            raise LedgerRejected(400, "not_consecutive", f"line {cur.lineno}: seq {cur.seq} follows seq {prev.seq}; "
                                 "a batch must be consecutive records in seq order", line=cur.lineno)
    return lines


class LedgerIngest:
    def __init__(self, db: BureauDatabase, store: ObjectStore, issuer: ReceiptIssuer, locks: DeviceLocks):
        self.db = db
        self.store = store
        self.issuer = issuer
        self.locks = locks

    def ingest(self, device: DeviceRow, body: bytes) -> IngestResult:
        device_id = device.device_id
        lines = _parse(body, device_id)
        with self.locks(device_id):
            head = self.db.ledger_head(device_id)
            first = lines[0].seq
            if first > head.seq + 1:
                raise LedgerRejected(409, "gap", f"the bureau holds records up to seq {head.seq}; this batch starts at "
                                     f"seq {first}: send from seq {head.seq + 1}", head_seq=head.seq,
                                     expected_seq=head.seq + 1)
            held = [ln for ln in lines if ln.seq <= head.seq]
            if held:
                hashes = self.db.ledger_hashes(device_id, held[0].seq, held[-1].seq)
                for ln in held:
                    if hashes.get(ln.seq) != ln.record.hash:
                        raise LedgerRejected(409, "fork", f"line {ln.lineno}: record seq {ln.seq} differs from the "
                                             "record the bureau already holds at that seq: the ledger has forked",
                                             seq=ln.seq, head_seq=head.seq)
            new = [ln for ln in lines if ln.seq > head.seq]
            if not new:
                return IngestResult(0, len(held), head.seq, head.hash)
            if new[0].fields["prev"] != head.hash:
                raise LedgerRejected(409, "fork", f"line {new[0].lineno}: record seq {new[0].seq} does not chain "
                                     f"to the record seq {head.seq} the bureau holds (prev differs): the ledger has "
                                     "forked",
                                     seq=new[0].seq, head_seq=head.seq)
            cert_key = load_public_key(device.public_key_der)
            key = load_public_key(head.signing_key_der) if head.signing_key_der else cert_key
            report = Report(f"ledger upload from {device_id}")
            Verifier(pinned_key=cert_key).verify_chain(
                ((f"line {ln.lineno}", ln.record) for ln in new), report, start_seq=head.seq + 1,
                start_prev=head.hash, key=key)
            if report.problems:
                raise LedgerRejected(422, "ledger_rejected", f"{len(report.problems)} problem(s) in the batch; nothing "
                                     f"of it was stored: {report.problems[0]}",
                                     problems=[str(p) for p in report.problems[:50]])
            rows, segments, signing_key = self._index(device_id, new, key)
            try:
                self.db.append_ledger(device_id, head.seq, rows, segments, signing_key, time.time_ns() // 1000)
            except BureauDatabaseError as exc:
                raise LedgerRejected(409, "conflict", str(exc)) from None
            self.store.sync_ledger(device_id, self.ledger_lines_from(device_id))
            log.info("ledger %s: +%d records (seq %d..%d), %d segment records", device_id, len(rows), rows[0].seq,
                     rows[-1].seq, len(segments))
            receipted = self.issuer.finalize_complete(device_id) if segments else []
            return IngestResult(len(rows), len(held), rows[-1].seq, rows[-1].hash,
                                [s.segment_id for s in segments], receipted)

    def _index(self, device_id: str, new: list[_Line], key: Any) -> tuple[list[LedgerRow], list[SegmentRow], bytes]:
        signing_key = public_key_der(key)
        rows, segments = [], []
        for ln in new:
            rtype, body = ln.fields["type"], ln.fields["body"]
            rows.append(LedgerRow(ln.seq, ln.record.hash, rtype, ln.record.data, ln.record.sig))
            if rtype == "segment":
                if not SAFE_FILE_RE.match(body["file"]):
                    raise LedgerRejected(422, "ledger_rejected", f"line {ln.lineno}: segment file name "
                                         f"{body['file']!r} is not a plain file name")
                sidecars = tuple(SidecarRow(c["kind"], c["file"], c["size"], c["sha256_cipher"])
                                 for c in body.get("sidecars", []))
                for c in sidecars:
                    if not SAFE_FILE_RE.match(c.file):
                        raise LedgerRejected(422, "ledger_rejected", f"line {ln.lineno}: sidecar file name "
                                             f"{c.file!r} is not a plain file name")
                segments.append(SegmentRow(device_id, body["segment_id"], body["file"], body["size"],
                                           body["sha256_cipher"], ln.seq, ln.record.hash, sidecars))
            elif rtype == "key_change" and body.get("kind") == "identity" and body.get("public_key"):
                try:
                    signing_key = public_key_der(load_public_key(base64.b64decode(body["public_key"])))
                except (SignatureError, ValueError) as exc:  # the verifier already refused these
                    raise LedgerRejected(422, "ledger_rejected", f"line {ln.lineno}: {exc}") from None
        return rows, segments, signing_key

    def ledger_lines_from(self, device_id: str) -> Callable[[int], Iterator[bytes]]:
        def rows_from(seq: int) -> Iterator[bytes]:
            for row in self.db.ledger_rows(device_id, seq):
                yield SignedRecord(row.data, row.sig).to_line()

        return rows_from
