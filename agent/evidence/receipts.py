"""Bureau receipts: the only acknowledgement that lets a device consider a segment safe (and later purge it).

A receipt is canonical JSON signed ES256 by the bureau's receipt key, which is pinned on the device at
provisioning. The bureau issues it only after it has checked the ciphertext hash, the record's signature
and the chain, and committed the object to its final store. docs/FORMAT.md, "Receipts".
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from agent.evidence.canonical import CanonicalJSONError, canonical_bytes, parse_canonical
from agent.evidence.signing import SignatureError, key_id, verify_es256

RECEIPT_VERSION = 1
RECEIPT_KEYS = {"v", "type", "device", "segment_id", "sha256_cipher", "size", "record_seq", "record_hash",
                "stored_wall_us", "bureau_key_id"}


class ReceiptError(ValueError):
    """A receipt that is malformed, unsigned by the pinned key, or not for the segment we hold."""


@dataclass(frozen=True)
class VerifiedReceipt:
    """Only `ReceiptVerifier.verify` makes these: holding one means the checks passed."""

    data: bytes
    sig: bytes
    fields: dict[str, Any]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def receipt_bytes(*, device: str, segment_id: str, sha256_cipher: str, size: int, record_seq: int,
                  record_hash: str, stored_wall_us: int, bureau_key: ec.EllipticCurvePublicKey) -> bytes:
    """Canonical bytes of a receipt for the bureau to sign."""
    return canonical_bytes({
        "v": RECEIPT_VERSION, "type": "segment_receipt", "device": device, "segment_id": segment_id,
        "sha256_cipher": sha256_cipher, "size": size, "record_seq": record_seq, "record_hash": record_hash,
        "stored_wall_us": stored_wall_us, "bureau_key_id": key_id(bureau_key),
    })


_HEX64_RE = re.compile(r"[0-9a-f]{64}")


class ReceiptVerifier:
    """Checks a bureau receipt against the pinned receipt key and the segment it claims (docs/FORMAT.md §13)."""

    def __init__(self, bureau_key: ec.EllipticCurvePublicKey):
        self.bureau_key = bureau_key
        self.bureau_key_id = key_id(bureau_key)

    def verify(self, data: bytes, sig: bytes, *, device: str, segment_id: str, sha256_cipher: str,
               size: int, record_seq: int | None = None, record_hash: str | None = None) -> VerifiedReceipt:
        """Return the receipt if every check passes, else raise ReceiptError naming the first that failed.

        `record_seq`/`record_hash`: the seq and SHA-256 of the device's own `segment` record for this
        segment; when given, the receipt must name exactly that record."""
        try:
            verify_es256(self.bureau_key, data, sig)
        except SignatureError as exc:
            raise ReceiptError(f"receipt for {segment_id}: not signed by the pinned bureau key ({exc})") from None
        try:
            fields = parse_canonical(data)
        except CanonicalJSONError as exc:
            raise ReceiptError(f"receipt for {segment_id}: {exc}") from None
        if not isinstance(fields, dict) or set(fields) != RECEIPT_KEYS or fields.get("type") != "segment_receipt":
            raise ReceiptError(f"receipt for {segment_id}: unexpected fields")
        if type(fields["v"]) is not int or fields["v"] != RECEIPT_VERSION:
            raise ReceiptError(f"receipt for {segment_id}: unsupported receipt version {fields['v']!r}")
        seq, digest = fields["record_seq"], fields["record_hash"]
        if type(seq) is not int or seq < 1:
            raise ReceiptError(f"receipt for {segment_id}: record_seq {seq!r} is not an integer >= 1")
        if not isinstance(digest, str) or not _HEX64_RE.fullmatch(digest):
            raise ReceiptError(f"receipt for {segment_id}: record_hash {digest!r} is not 64 lowercase hex digits")
        if type(fields["stored_wall_us"]) is not int:
            raise ReceiptError(f"receipt for {segment_id}: stored_wall_us {fields['stored_wall_us']!r} is not an "
                               "integer")
        expected: dict[str, Any] = {"device": device, "segment_id": segment_id, "sha256_cipher": sha256_cipher,
                                    "size": size, "bureau_key_id": self.bureau_key_id}
        if record_seq is not None:
            expected["record_seq"] = record_seq
        if record_hash is not None:
            expected["record_hash"] = record_hash
        for name, want in expected.items():
            # type() too: a receipt saying `"size": true` does not acknowledge 1 byte
            if fields[name] != want or type(fields[name]) is not type(want):
                raise ReceiptError(f"receipt for {segment_id}: {name} is {fields[name]!r}, expected {want!r}")
        return VerifiedReceipt(data, sig, fields)
