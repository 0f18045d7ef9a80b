"""Committing uploaded segments and their sidecars, and issuing receipts: the bureau's only
acknowledgement (R20, R22).

Each file of a segment — the segment's own file and every sidecar its record names (docs/FORMAT.md
§10.5) — is uploaded on its own and committed on its own, after, in this order: every byte has
arrived; the device's signed segment record is in the verified ledger; the file's size and ciphertext
SHA-256 equal what that record says of it (and the hash the client declared); the file is committed to
the final store beside the segment. A segment is receipted only once its file AND every sidecar its
record names are committed; then a receipt (agent.evidence.receipts.receipt_bytes) is signed ES256 with
the receipt key and stored. The receipt names the segment record by seq and hash, and that record
carries the sidecars' hashes, so one receipt covers them all. A tus completion on its own is never an
ack: if the ledger has not arrived the upload waits, and a stored segment whose sidecar is missing
waits too (`awaiting_sidecar`), and each says so.

Threads: `finalize` is called from request-handler threads (the PATCH that completes an upload, the
ledger upload that brings a record, a receipts query) and once at start-up. Work on one device is
serialised by its lock in `DeviceLocks`; different devices proceed in parallel.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
import time
from pathlib import Path
from typing import Any

from agent.evidence.receipts import receipt_bytes
from bureau.db import BureauDatabase, ReceiptRow, SegmentRow, UploadRow, UploadState
from bureau.keys import BureauKeys
from bureau.objects import ObjectStore
from bureau.uploads import UploadStore

log = logging.getLogger(__name__)

AWAITING_LEDGER_DETAIL = ("every byte has arrived, but the bureau does not hold the device's signed segment record "
                          "yet; upload the ledger (POST /v1/ledger) and the receipt follows")


class DeviceLocks:
    """One re-entrant lock per device: ledger ingest and segment commits of a device never interleave."""

    def __init__(self) -> None:
        self._locks: dict[str, threading.RLock] = {}
        self._guard = threading.Lock()

    def __call__(self, device_id: str) -> threading.RLock:
        with self._guard:
            return self._locks.setdefault(device_id, threading.RLock())


def _now_us() -> int:
    return time.time_ns() // 1000


def _sha256_file(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def _part_name(row: UploadRow) -> str:
    return f"{row.device_id}/{row.segment_id}" + (f" ({row.sidecar} sidecar)" if row.sidecar else "")


class ReceiptIssuer:
    def __init__(self, db: BureauDatabase, store: ObjectStore, uploads: UploadStore, keys: BureauKeys,
                 locks: DeviceLocks):
        self.db = db
        self.store = store
        self.uploads = uploads
        self.keys = keys
        self.locks = locks

    def finalize(self, upload_id: str) -> UploadRow:
        """Commit a complete upload if its record is here, and receipt its segment once every part of it
        is committed; returns the upload's state after.

        Idempotent: safe to call again after a crash at any point (the store accepts the same bytes
        twice, the receipt is stored once). Store errors propagate and leave the upload to retry.
        """
        row = self.db.get_upload(upload_id)
        if row is None:
            raise KeyError(upload_id)
        with self.locks(row.device_id):
            row = self.db.get_upload(upload_id)
            assert row is not None
            if row.state in (UploadState.COMMITTED, UploadState.REJECTED) or row.offset != row.length:
                return row
            record = self.db.get_segment(row.device_id, row.segment_id)
            if record is None:
                if row.state != UploadState.AWAITING_LEDGER:
                    self.db.set_upload_state(upload_id, UploadState.AWAITING_LEDGER, AWAITING_LEDGER_DETAIL, _now_us())
                    log.info("upload %s (%s) complete; waiting for its segment record", upload_id, _part_name(row))
                return self._reread(upload_id)
            if row.state == UploadState.AWAITING_SIDECAR:  # the segment's bytes are stored: only the receipt waits
                self._receipt_if_complete(row, record)
                return self._reread(upload_id)
            expected = self._expected(row, record)
            if isinstance(expected, str):
                return self._reject(row, expected)
            file_name, size, sha256 = expected
            path = self.uploads.path(upload_id)
            got_size, digest = _sha256_file(path)
            problem = None
            what = f"the signed segment record (seq {record.record_seq})"
            if got_size != size:
                problem = f"received {got_size} bytes of {file_name} but {what} says {size}"
            elif digest != sha256:
                problem = f"ciphertext SHA-256 {digest} of {file_name} differs from {what}: {sha256}"
            elif row.sha256_cipher != sha256:
                problem = f"the sha256_cipher declared at upload creation differs from {what}"
            if problem:
                return self._reject(row, problem)
            stored = self.store.put_segment(row.device_id, file_name, path, size, sha256)
            if row.sidecar:
                self.db.set_upload_state(upload_id, UploadState.COMMITTED, "", _now_us())
                log.info("sidecar %s of %s/%s committed to %s", file_name, row.device_id, row.segment_id,
                         stored.location)
                segment_upload = self.db.latest_upload(row.device_id, row.segment_id, "",
                                                       (UploadState.AWAITING_SIDECAR,))
                if segment_upload is not None:
                    self._receipt_if_complete(segment_upload, record)
            else:
                self._receipt_if_complete(row, record)
            self.uploads.release_transfer_name(upload_id, Path(stored.location))
            return self._reread(upload_id)

    def _reread(self, upload_id: str) -> UploadRow:
        return self.db.get_upload(upload_id)  # type: ignore[return-value]

    @staticmethod
    def _expected(row: UploadRow, record: SegmentRow) -> tuple[str, int, str] | str:
        """(file name, size, SHA-256) the record says the upload's file must be, or why it names none."""
        if not row.sidecar:
            return record.file, record.size, record.sha256_cipher
        sidecar = record.sidecar(row.sidecar)
        if sidecar is None:
            return f"the signed segment record (seq {record.record_seq}) names no {row.sidecar} sidecar"
        return sidecar.file, sidecar.size, sidecar.sha256_cipher

    def _reject(self, row: UploadRow, problem: str) -> UploadRow:
        self.db.set_upload_state(row.upload_id, UploadState.REJECTED, problem, _now_us())
        log.warning("upload %s (%s) rejected: %s; bytes kept in %s", row.upload_id, _part_name(row), problem,
                    self.uploads.path(row.upload_id))
        return self._reread(row.upload_id)

    def missing_sidecars(self, record: SegmentRow) -> list[str]:
        """Kinds of the sidecars `record` names that are not committed to the store yet."""
        return [s.kind for s in record.sidecars
                if self.db.latest_upload(record.device_id, record.segment_id, s.kind, (UploadState.COMMITTED,))
                is None]

    def _receipt_if_complete(self, segment_upload: UploadRow, record: SegmentRow) -> bool:
        """With the segment's own file stored (`segment_upload` verified and committed to the store): issue
        and store its receipt if every sidecar is committed too, else mark it awaiting_sidecar."""
        missing = self.missing_sidecars(record)
        if missing:
            detail = (f"the segment is stored, but not yet its sidecar(s) "
                      f"{', '.join(record.sidecar(k).file for k in missing)}; upload them "  # type: ignore[union-attr]
                      "(tus, metadata `sidecar`) and the receipt follows")
            if segment_upload.state != UploadState.AWAITING_SIDECAR or segment_upload.detail != detail:
                self.db.set_upload_state(segment_upload.upload_id, UploadState.AWAITING_SIDECAR, detail, _now_us())
                log.info("segment %s/%s stored; waiting for sidecar(s) %s", record.device_id, record.segment_id,
                         missing)
            return False
        receipt = self.db.get_receipt(record.device_id, record.segment_id)
        if receipt is None:
            stored_us = _now_us()
            data = receipt_bytes(device=record.device_id, segment_id=record.segment_id,
                                 sha256_cipher=record.sha256_cipher, size=record.size,
                                 record_seq=record.record_seq, record_hash=record.record_hash,
                                 stored_wall_us=stored_us, bureau_key=self.keys.receipt_public_key)
            receipt = ReceiptRow(record.device_id, record.segment_id, data, self.keys.sign_receipt(data),
                                 hashlib.sha256(data).hexdigest(), stored_us, segment_upload.upload_id)
        self.db.commit_receipt(segment_upload.upload_id, receipt, _now_us())
        log.info("segment %s/%s committed with %d sidecar(s); receipt %s", record.device_id, record.segment_id,
                 len(record.sidecars), receipt.sha256[:16])
        return True

    def finalize_complete(self, device_id: str | None = None) -> list[str]:
        """Finalize every complete upload (of one device, or all); returns the segment ids now receipted."""
        done: list[str] = []
        for row in self.db.complete_uploads(device_id):
            had_receipt = self.db.get_receipt(row.device_id, row.segment_id) is not None
            try:
                self.finalize(row.upload_id)
            except (OSError, RuntimeError) as exc:
                log.error("upload %s (%s): cannot commit yet: %s", row.upload_id, _part_name(row), exc)
                continue
            if (not had_receipt and row.segment_id not in done
                    and self.db.get_receipt(row.device_id, row.segment_id) is not None):
                done.append(row.segment_id)
        return done

    def _retry_commits(self, device_id: str, segment_id: str, kinds: list[str]) -> None:
        """Finish commits of the segment's parts that failed earlier (store error) or wait for a sidecar."""
        for kind in ["", *kinds]:
            upload = self.db.latest_upload(device_id, segment_id, kind)
            if upload is not None and upload.offset == upload.length and upload.state in (
                    UploadState.RECEIVING, UploadState.AWAITING_LEDGER, UploadState.AWAITING_SIDECAR):
                try:
                    self.finalize(upload.upload_id)
                except (OSError, RuntimeError) as exc:
                    log.error("upload %s: cannot commit yet: %s", upload.upload_id, exc)

    def status(self, device_id: str, segment_id: str, upload_url: str) -> dict[str, Any]:
        """What the bureau can say about one of the device's segments (docs/PROTOCOL.md, "Receipts")."""
        receipt = self.db.get_receipt(device_id, segment_id)
        record = self.db.get_segment(device_id, segment_id)
        if receipt is None:
            self._retry_commits(device_id, segment_id, [s.kind for s in record.sidecars] if record else [])
            receipt = self.db.get_receipt(device_id, segment_id)
        if receipt is not None:
            return {"segment_id": segment_id, "status": "receipted",
                    "receipt": base64.b64encode(receipt.data).decode(), "sig": base64.b64encode(receipt.sig).decode(),
                    "receipt_sha256": receipt.sha256}
        upload = self.db.latest_upload(device_id, segment_id)
        if upload is None:
            return {"segment_id": segment_id, "status": "not_uploaded" if record is not None else "unknown"}
        if upload.state == UploadState.RECEIVING:
            return {"segment_id": segment_id, "status": "uploading", "offset": upload.offset, "length": upload.length,
                    "upload_url": upload_url + upload.upload_id}
        answer = {"segment_id": segment_id, "status": upload.state.value, "detail": upload.detail,
                  "upload_url": upload_url + upload.upload_id}
        if upload.state == UploadState.AWAITING_SIDECAR and record is not None:
            parts = [self._sidecar_status(device_id, segment_id, s.kind, s.file, upload_url) for s in record.sidecars]
            answer["sidecars"] = parts
            rejected = next((p for p in parts if p["status"] == "rejected"), None)
            if rejected is not None:  # the device sent a sidecar that is not what its record says: say so
                answer["status"] = "rejected"
                answer["detail"] = f"sidecar {rejected['file']}: {rejected['detail']}"
        return answer

    def _sidecar_status(self, device_id: str, segment_id: str, kind: str, file: str,
                        upload_url: str) -> dict[str, Any]:
        upload = self.db.latest_upload(device_id, segment_id, kind, (UploadState.COMMITTED,)) or \
            self.db.latest_upload(device_id, segment_id, kind)
        part: dict[str, Any] = {"sidecar": kind, "file": file}
        if upload is None:
            return {**part, "status": "not_uploaded"}
        part.update(status="uploading" if upload.state == UploadState.RECEIVING else upload.state.value,
                    offset=upload.offset, length=upload.length, upload_url=upload_url + upload.upload_id)
        if upload.detail:
            part["detail"] = upload.detail
        return part
