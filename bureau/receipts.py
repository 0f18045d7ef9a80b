"""Committing uploaded segments and issuing receipts: the bureau's only acknowledgement (R20, R22).

A segment is receipted only after, in this order: every byte has arrived; the device's signed segment
record is in the verified ledger; the file's size and ciphertext SHA-256 equal that record's (and the
hash the client declared); the file is committed to the final store. Then a receipt
(agent.evidence.receipts.receipt_bytes) is signed ES256 with the receipt key and stored. A tus
completion on its own is never an ack: if the ledger has not arrived the upload waits, and says so.

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
from bureau.db import BureauDatabase, ReceiptRow, UploadRow, UploadState
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


class ReceiptIssuer:
    def __init__(self, db: BureauDatabase, store: ObjectStore, uploads: UploadStore, keys: BureauKeys,
                 locks: DeviceLocks):
        self.db = db
        self.store = store
        self.uploads = uploads
        self.keys = keys
        self.locks = locks

    def finalize(self, upload_id: str) -> UploadRow:
        """Commit and receipt a complete upload if its record is here; returns the upload's state after.

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
                    log.info("upload %s (%s/%s) complete; waiting for its segment record", upload_id, row.device_id,
                             row.segment_id)
                return self.db.get_upload(upload_id)  # type: ignore[return-value]
            path = self.uploads.path(upload_id)
            size, digest = _sha256_file(path)
            problem = None
            if size != record.size:
                problem = (f"received {size} bytes but the signed segment record (seq {record.record_seq}) says "
                           f"{record.size}")
            elif digest != record.sha256_cipher:
                problem = (f"ciphertext SHA-256 {digest} differs from the signed segment record (seq "
                           f"{record.record_seq}): {record.sha256_cipher}")
            elif row.sha256_cipher != record.sha256_cipher:
                problem = "the sha256_cipher declared at upload creation differs from the signed segment record"
            if problem:
                self.db.set_upload_state(upload_id, UploadState.REJECTED, problem, _now_us())
                log.warning("upload %s (%s/%s) rejected: %s; bytes kept in %s", upload_id, row.device_id,
                            row.segment_id, problem, path)
                return self.db.get_upload(upload_id)  # type: ignore[return-value]
            receipt = self.db.get_receipt(row.device_id, row.segment_id)
            stored = self.store.put_segment(row.device_id, record.file, path, record.size, record.sha256_cipher)
            if receipt is None:
                stored_us = _now_us()
                data = receipt_bytes(device=row.device_id, segment_id=row.segment_id,
                                     sha256_cipher=record.sha256_cipher, size=record.size,
                                     record_seq=record.record_seq, record_hash=record.record_hash,
                                     stored_wall_us=stored_us, bureau_key=self.keys.receipt_public_key)
                receipt = ReceiptRow(row.device_id, row.segment_id, data, self.keys.sign_receipt(data),
                                     hashlib.sha256(data).hexdigest(), stored_us, upload_id)
            self.db.commit_receipt(upload_id, receipt, _now_us())
            self.uploads.release_transfer_name(upload_id, Path(stored.location))
            log.info("segment %s/%s committed to %s; receipt %s", row.device_id, row.segment_id, stored.location,
                     receipt.sha256[:16])
            return self.db.get_upload(upload_id)  # type: ignore[return-value]

    def finalize_complete(self, device_id: str | None = None) -> list[str]:
        """Finalize every complete upload (of one device, or all); returns the segment ids now receipted."""
        done = []
        for row in self.db.complete_uploads(device_id):
            try:
                after = self.finalize(row.upload_id)
            except (OSError, RuntimeError) as exc:
                log.error("upload %s (%s/%s): cannot commit yet: %s", row.upload_id, row.device_id, row.segment_id,
                          exc)
                continue
            if after.state == UploadState.COMMITTED:
                done.append(row.segment_id)
        return done

    def status(self, device_id: str, segment_id: str, upload_url: str) -> dict[str, Any]:
        """What the bureau can say about one of the device's segments (docs/PROTOCOL.md, "Receipts")."""
        receipt = self.db.get_receipt(device_id, segment_id)
        if receipt is None:
            upload = self.db.latest_upload(device_id, segment_id)
            if upload is not None and upload.offset == upload.length and upload.state in (
                    UploadState.RECEIVING, UploadState.AWAITING_LEDGER):
                try:  # a commit that failed earlier (store error) is retried here
                    self.finalize(upload.upload_id)
                except (OSError, RuntimeError) as exc:
                    log.error("upload %s: cannot commit yet: %s", upload.upload_id, exc)
                receipt = self.db.get_receipt(device_id, segment_id)
        if receipt is not None:
            return {"segment_id": segment_id, "status": "receipted",
                    "receipt": base64.b64encode(receipt.data).decode(), "sig": base64.b64encode(receipt.sig).decode(),
                    "receipt_sha256": receipt.sha256}
        upload = self.db.latest_upload(device_id, segment_id)
        if upload is None:
            known = self.db.get_segment(device_id, segment_id) is not None
            return {"segment_id": segment_id, "status": "not_uploaded" if known else "unknown"}
        if upload.state == UploadState.RECEIVING:
            return {"segment_id": segment_id, "status": "uploading", "offset": upload.offset, "length": upload.length,
                    "upload_url": upload_url + upload.upload_id}
        return {"segment_id": segment_id, "status": upload.state.value, "detail": upload.detail,
                "upload_url": upload_url + upload.upload_id}
