"""Enrollment: a one-time token plus a CSR buys a device certificate from the bureau CA (R18).

A technician mints a token for one device id (`python -m bureau token`); only its SHA-256 is stored.
The token works once, until it expires, and only for that device id. The device sends it with a CSR
for its identity key (the key that also signs its ledger) and receives its certificate and everything
it must pin: the CA, the receipt key, the age recipients to encrypt to, and the endpoints. Enrolling
an id again (a replaced key, a lost certificate) needs a fresh token; the new certificate supersedes
the old one, which the bureau refuses from then on.

Threads: `enroll` runs in a request-handler thread; the token is consumed and the device stored in
one database transaction, so a token raced by two requests is granted to only one.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.evidence.signing import key_id, public_key_der, public_key_pem
from bureau.db import BureauDatabase, DeviceRow, TokenProblem
from bureau.keys import BureauKeys, CsrError, cert_common_name, cert_fingerprint, cert_serial_hex, check_device_id

TOKEN_BYTES = 32
DEFAULT_TOKEN_TTL_S = 24 * 3600

_TOKEN_MESSAGES = {
    TokenProblem.UNKNOWN: "enrollment token is not valid for this bureau and device id",
    TokenProblem.USED: "enrollment token was already used; a token works once: mint a new one "
                       "(python -m bureau token --device-id ...)",
    TokenProblem.EXPIRED: "enrollment token has expired; mint a new one (python -m bureau token --device-id ...)",
}


class EnrollmentRefused(Exception):
    """Rendered as a JSON error: `code` is stable for programs, `detail` says what to do."""

    def __init__(self, status: int, code: str, detail: str):
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class MintedToken:
    token: str
    device_id: str
    expires_us: int


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class Enrollment:
    def __init__(self, keys: BureauKeys, db: BureauDatabase, device_cert_days: int):
        self.keys = keys
        self.db = db
        self.device_cert_days = device_cert_days

    def mint_token(self, device_id: str, ttl_s: int = DEFAULT_TOKEN_TTL_S) -> MintedToken:
        """A new single-use token for `device_id`; only its hash is stored."""
        check_device_id(device_id)
        if ttl_s <= 0:
            raise ValueError(f"token lifetime must be positive, got {ttl_s} s")
        token = secrets.token_urlsafe(TOKEN_BYTES)
        now = time.time_ns() // 1000
        expires = now + ttl_s * 1_000_000
        self.db.add_token(hash_token(token), device_id, now, expires)
        return MintedToken(token, device_id, expires)

    def enroll(self, request: Any, endpoints: Callable[[str], dict[str, Any]],
               limits: dict[str, int]) -> dict[str, Any]:
        """Handle a decoded POST /v1/enroll body; returns the response body or raises EnrollmentRefused."""
        if not isinstance(request, dict):
            raise EnrollmentRefused(400, "bad_request", "body must be a JSON object {token, csr[, device_id]}")
        token, csr = request.get("token"), request.get("csr")
        if not isinstance(token, str) or not token:
            raise EnrollmentRefused(400, "bad_request", "'token' (string) is required")
        if not isinstance(csr, str) or "BEGIN CERTIFICATE REQUEST" not in csr:
            raise EnrollmentRefused(400, "bad_request", "'csr' (PEM certificate signing request) is required")
        digest = hash_token(token)
        row = self.db.get_token(digest)
        now = time.time_ns() // 1000
        if row is None:
            raise EnrollmentRefused(403, TokenProblem.UNKNOWN.value, _TOKEN_MESSAGES[TokenProblem.UNKNOWN])
        asked = request.get("device_id")
        if asked is not None and asked != row.device_id:
            raise EnrollmentRefused(403, TokenProblem.UNKNOWN.value,
                                    f"this token was minted for another device id, not {asked!r}")
        if row.used_us is not None:
            replay = self._replay(row.device_id, row.used_by_serial, csr)
            if replay is None:
                raise EnrollmentRefused(403, TokenProblem.USED.value, _TOKEN_MESSAGES[TokenProblem.USED])
            return self._response(replay, endpoints, limits, replayed=True)
        if row.expires_us <= now:
            raise EnrollmentRefused(403, TokenProblem.EXPIRED.value, _TOKEN_MESSAGES[TokenProblem.EXPIRED])
        try:
            cert = self.keys.issue_device_cert(csr.encode(), row.device_id, self.device_cert_days)
        except CsrError as exc:
            raise EnrollmentRefused(400, "bad_csr", str(exc)) from None
        cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        device = DeviceRow(row.device_id, cert_pem, cert_serial_hex(cert), public_key_der(cert.public_key()), now,
                           "active")
        problem = self.db.enroll(digest, now, device)
        if problem is not None:
            raise EnrollmentRefused(403, problem.value, _TOKEN_MESSAGES[problem])
        return self._response(cert, endpoints, limits, replayed=False)

    def _replay(self, device_id: str, serial: str | None, csr_pem: str) -> x509.Certificate | None:
        """The certificate a used token bought, if this is the same request again (same key) and that
        certificate is still the device's current one: a provisioning run that lost the response may
        retry. A used token never buys a certificate for another key."""
        device = self.db.get_device(device_id)
        if device is None or serial is None or device.cert_serial != serial or device.status != "active":
            return None
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode())
            if not csr.is_signature_valid or public_key_der(csr.public_key()) != device.public_key_der:
                return None
        except (ValueError, TypeError):
            return None
        return x509.load_pem_x509_certificate(device.cert_pem.encode())

    def _response(self, cert: x509.Certificate, endpoints: Callable[[str], dict[str, Any]],
                  limits: dict[str, int], replayed: bool) -> dict[str, Any]:
        device_id = cert_common_name(cert) or ""
        cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        receipt_key = self.keys.receipt_public_key
        return {
            "device_id": device_id,
            "replayed": replayed,
            "certificate": cert_pem,
            "certificate_serial": cert_serial_hex(cert),
            "certificate_sha256": cert_fingerprint(cert),
            "device_key_id": key_id(cert.public_key()),
            "ca_certificate": self.keys.ca_pem,
            "ca_sha256": cert_fingerprint(self.keys.ca_cert),
            "receipt_public_key": public_key_pem(receipt_key).decode(),
            "receipt_key_id": key_id(receipt_key),
            "age_recipients": [str(r) for r in self.keys.recipients],
            "endpoints": endpoints(device_id),
            "limits": limits,
        }
