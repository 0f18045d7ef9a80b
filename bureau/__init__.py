"""The reference bureau service: what receives, verifies and keeps a device's footage (DESIGN.md, "Sync").

One command runs it (`python -m bureau serve --dir DIR`). Its parts, one job each:

    keys.py        the CA (device and server certificates), the receipt key, the age identity
    enrollment.py  one-time tokens and CSR -> device certificate
    ingest.py      ledger batches joined to the chain already held, via the shared verifier
    uploads.py     resumable uploads on disk (tus 1.0), persisted across restarts
    receipts.py    verify a complete upload against its signed record, commit it, sign the receipt
    objects.py     the final store (filesystem; an interface so S3 can replace it)
    db.py          the database (SQLite; an interface so PostgreSQL can replace it)
    service.py     the parts wired together from one directory
    server.py      the HTTPS server (mTLS) and its routes; docs/PROTOCOL.md specifies them

Everything about the evidence format itself (records, signatures, receipts, verification) is imported
from `agent.evidence`, so the device and the bureau share one definition of it.
"""
