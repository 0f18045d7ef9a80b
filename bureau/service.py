"""The bureau service's parts, wired together from one directory (docs/PROTOCOL.md; DESIGN.md, "Sync").

    DIR/ca.pem, receipt-key.pub.pem, recipients.txt   public material (give ca.pem to technicians)
    DIR/keys/                                         private keys, mode 0600 (CA, receipt, TLS, age identity)
    DIR/tls/server.pem                                the HTTPS server certificate (reissued when needed)
    DIR/bureau.db                                     SQLite: tokens, devices, ledger index, uploads, receipts
    DIR/incoming/<upload_id>                          uploads in progress (tus)
    DIR/store/<device_id>/ledger.jsonl, segments/     the final store: a verifiable bundle per device

Threads: built once by the main thread; afterwards every part is safe to call from request threads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bureau.db import BureauDatabase, SqliteBureauDatabase
from bureau.enrollment import Enrollment
from bureau.ingest import LedgerIngest
from bureau.keys import BureauKeys
from bureau.objects import FileObjectStore, ObjectStore, ObjectStoreError
from bureau.receipts import DeviceLocks, ReceiptIssuer
from bureau.uploads import UploadStore

log = logging.getLogger(__name__)

DEFAULT_PORT = 8443
DEFAULT_MAX_UPLOAD_BYTES = 8 * 1024**3
DEFAULT_MAX_LEDGER_BATCH_BYTES = 16 * 1024**2


@dataclass(frozen=True)
class BureauConfig:
    dir: Path
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    public_url: str | None = None  # how devices reach us (behind a proxy, or when binding 0.0.0.0)
    mqtt_url: str | None = None  # handed to devices at enrollment, e.g. mqtts://bureau.example:8883
    extra_names: tuple[str, ...] = ()  # more DNS names / IPs for the server certificate
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_ledger_batch_bytes: int = DEFAULT_MAX_LEDGER_BATCH_BYTES
    socket_timeout_s: float = 30.0  # tus 1.0 recommends 30 s
    max_connections: int = 64
    device_cert_days: int = 3 * 365

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_ledger_batch_bytes", "max_connections", "device_cert_days"):
            if getattr(self, name) <= 0:
                raise ValueError(f"bureau config {name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"bureau config port must be 0..65535, got {self.port}")
        if self.socket_timeout_s <= 0:
            raise ValueError(f"bureau config socket_timeout_s must be positive, got {self.socket_timeout_s}")


class BureauService:
    def __init__(self, config: BureauConfig, db: BureauDatabase | None = None, store: ObjectStore | None = None):
        self.config = config
        root = Path(config.dir)
        self.keys = BureauKeys.load_or_create(root)
        self.db: BureauDatabase = db or SqliteBureauDatabase(root / "bureau.db")
        self.store: ObjectStore = store or FileObjectStore(root / "store")
        self.uploads = UploadStore(root / "incoming", self.db)
        self.locks = DeviceLocks()
        self.issuer = ReceiptIssuer(self.db, self.store, self.uploads, self.keys, self.locks)
        self.ingest = LedgerIngest(self.db, self.store, self.issuer, self.locks)
        self.enrollment = Enrollment(self.keys, self.db, config.device_cert_days)

    def recover(self) -> None:
        """After a restart: finish ledger copies and commits that a crash interrupted."""
        for device_id in self.db.devices():
            try:
                self.store.sync_ledger(device_id, self.ingest.ledger_lines_from(device_id))
            except (OSError, ObjectStoreError) as exc:
                log.error("ledger copy of %s cannot be brought up to date: %s", device_id, exc)
        done = self.issuer.finalize_complete()
        if done:
            log.info("committed %d upload(s) left complete by a restart", len(done))

    def limits(self) -> dict[str, int]:
        return {"max_upload_bytes": self.config.max_upload_bytes,
                "max_ledger_batch_bytes": self.config.max_ledger_batch_bytes}

    def endpoints(self, base_url: str, device_id: str | None) -> dict[str, Any]:
        return {
            "base_url": base_url,
            "time": f"{base_url}/v1/time",
            "ledger": f"{base_url}/v1/ledger",
            "ledger_head": f"{base_url}/v1/ledger/head",
            "uploads": f"{base_url}/v1/uploads",
            "receipts": f"{base_url}/v1/receipts",
            "mqtt": {"url": self.config.mqtt_url,
                     "topic_prefix": f"bwc/v1/dev/{device_id}/" if device_id else "bwc/v1/dev/<device_id>/"},
        }

    def close(self) -> None:
        self.db.close()
