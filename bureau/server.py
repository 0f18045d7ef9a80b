"""The bureau's HTTPS server: enrollment, time, ledger ingest, tus 1.0 uploads, receipts (docs/PROTOCOL.md).

Built on the standard library's `http.server` and `ssl`: the whole service is a few routes, and the
parts that matter (streaming a PATCH body to disk in bounded memory, per-request mTLS identity,
cutting a stalled connection when its upload is resumed elsewhere) need direct access to the socket
that a framework would hide. No extra dependency to audit on the bureau's server.

Threads: `serve_forever` runs in one thread (the caller's, or the one `start()` makes) and only
accepts; each connection gets its own daemon thread, which performs the TLS handshake (so a slow
client cannot stall the accept loop) and then serves HTTP/1.1 requests on it until it closes or idles
past the socket timeout. At most `max_connections` connections are served at once; more are closed
at once and counted.

Authentication: the server presents a certificate issued by the bureau CA and asks every client for
one (CERT_OPTIONAL). Enrollment, time, bureau info and tus OPTIONS work without; every device endpoint
requires a certificate from the bureau CA whose subject CN is an enrolled device and whose serial is
that device's current certificate.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509

from agent.evidence.records import SIDECAR_TAGS
from agent.evidence.signing import public_key_pem
from bureau.db import DeviceRow, UploadRow, UploadState
from bureau.enrollment import EnrollmentRefused
from bureau.ingest import LedgerRejected
from bureau.keys import cert_common_name, cert_fingerprint, cert_serial_hex
from bureau.objects import ObjectStoreError
from bureau.service import BureauConfig, BureauService
from bureau.uploads import CHECKSUM_ALGORITHMS, ChecksumMismatch, UploadBusy, UploadInterrupted, UploadWriteError

log = logging.getLogger(__name__)

TUS_VERSION = "1.0.0"
TUS_EXTENSIONS = "creation,creation-with-upload,checksum"
TUS_CHECKSUMS = ",".join(CHECKSUM_ALGORITHMS)
OFFSET_STREAM = "application/offset+octet-stream"
MAX_JSON_BODY = 1024 * 1024
DRAIN_LIMIT = 8 * 1024 * 1024
MAX_RECEIPT_BATCH = 500
UPLOAD_PATH_RE = re.compile(r"^/v1/uploads/([0-9a-f]{32})$")
SEGMENT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
BWC_STATE = "Bwc-Upload-State"


class HttpError(Exception):
    """An error response: status, a stable machine-readable `code`, and a `detail` for people."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra


def _now_us() -> int:
    return time.time_ns() // 1000


def parse_upload_metadata(header: str) -> dict[str, str]:
    """tus Upload-Metadata: comma-separated `key base64value` pairs, unique keys, values UTF-8 here."""
    out: dict[str, str] = {}
    if not header.strip():
        return out
    for pair in header.split(","):
        parts = pair.strip().split(" ")
        if not parts[0] or len(parts) > 2:
            raise HttpError(400, "bad_metadata", f"Upload-Metadata pair {pair.strip()!r} must be 'key base64value'")
        key = parts[0]
        if key in out:
            raise HttpError(400, "bad_metadata", f"Upload-Metadata key {key!r} appears twice")
        try:
            out[key] = base64.b64decode(parts[1], validate=True).decode("utf-8") if len(parts) == 2 else ""
        except (binascii.Error, UnicodeDecodeError):
            raise HttpError(400, "bad_metadata", f"Upload-Metadata value of {key!r} is not base64 of UTF-8") from None
    return out


class BureauRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "bwc-bureau/0.1"
    sys_version = ""
    server: BureauHTTPServer

    def version_string(self) -> str:
        return self.server_version

    # --- plumbing ---------------------------------------------------------------------------------

    def parse_request(self) -> bool:
        self.received_us = _now_us()  # t2 of the time exchange: the request line has just arrived
        self._body_left = 0
        self._device_id: str | None = None
        self._tus = False
        return super().parse_request()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        log.debug("%s %s", self.address_string(), format % args)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        who = getattr(self, "_device_id", None) or self.address_string()  # a malformed request has no path
        log.info("%s %s %s -> %s", who, getattr(self, "command", None), getattr(self, "path", None), code)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors http.server finds itself (a malformed request line or headers), as JSON like ours."""
        self.close_connection = True
        self._body_left = 0
        self._tus = False
        with contextlib.suppress(OSError):
            self._json(code, {"error": "bad_http", "detail": message or explain or "malformed HTTP request"})

    @property
    def service(self) -> BureauService:
        return self.server.service

    def _send(self, status: int, body: bytes | None = None, headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        if self._body_left:
            self._drain_body()
        self.send_response(status)
        headers = headers or {}
        if self._tus and "Tus-Resumable" not in headers:  # tus 1.0: on every response but OPTIONS
            headers = {"Tus-Resumable": TUS_VERSION, **headers}
        for name, value in headers.items():
            self.send_header(name, value)
        if body is not None:
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
        elif status != 204 and self.command != "HEAD":
            self.send_header("Content-Length", "0")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if body is not None and self.command != "HEAD":
            self.wfile.write(body)

    def _drain_body(self) -> None:
        """Read and drop an unread request body before answering early (an error found from the headers).

        Closing with unread bytes in the socket would make the kernel reset the connection, and the
        client would lose our response. Bodies over DRAIN_LIMIT are not worth reading: the connection
        is closed after the response instead.
        """
        left, self._body_left = self._body_left, 0
        if left > DRAIN_LIMIT:
            self.close_connection = True
            return
        try:
            while left > 0:
                block = self.rfile.read(min(left, 64 * 1024))
                if not block:
                    break
                left -= len(block)
        except OSError:
            pass
        if left:
            self.close_connection = True

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj, indent=1).encode() + b"\n", headers)

    def _error(self, exc: HttpError) -> None:
        self._json(exc.status, {"error": exc.code, "detail": exc.detail, **exc.extra}, exc.headers)

    def _content_length(self) -> int:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True  # the body's extent is unknown: this connection cannot go on
            raise HttpError(411, "length_required", "chunked request bodies are not accepted; send Content-Length")
        raw = self.headers.get("Content-Length", "0").strip() or "0"
        if not raw.isdigit():
            self.close_connection = True
            raise HttpError(400, "bad_content_length", f"Content-Length {raw!r} is not a non-negative integer")
        return int(raw)

    def _read_body(self, limit: int) -> bytes:
        length = self._body_left
        if length > limit:
            raise HttpError(413, "body_too_large", f"request body of {length} bytes exceeds the limit of {limit}")
        data = self.rfile.read(length)
        self._body_left = 0
        if len(data) != length:
            self.close_connection = True
            raise HttpError(400, "truncated_body", f"request body ended after {len(data)} of {length} bytes")
        return data

    def _read_json(self) -> Any:
        data = self._read_body(MAX_JSON_BODY)
        try:
            return json.loads(data or b"{}")
        except (ValueError, UnicodeDecodeError) as exc:
            raise HttpError(400, "bad_json", f"request body is not JSON: {exc}") from None

    def _base_url(self) -> str:
        return self.server.base_url

    # --- dispatch ---------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_OPTIONS(self) -> None:
        self._dispatch("OPTIONS")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        try:
            self._body_left = self._content_length()
            override = self.headers.get("X-HTTP-Method-Override")
            if method == "POST" and override:  # tus 1.0: for clients that cannot send PATCH
                method = override.strip().upper()
            path = urlsplit(self.path).path
            handler = self._route(method, path)
            handler()
        except HttpError as exc:
            self._error(exc)
        except (ConnectionError, TimeoutError, ssl.SSLError) as exc:
            log.info("%s: connection lost during %s %s: %s", self.address_string(), method, self.path, exc)
            self.close_connection = True
        except Exception:
            log.exception("internal error serving %s %s", method, self.path)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self._json(500, {"error": "internal_error", "detail": "the bureau failed to handle this request; "
                                 "it is logged. Retry later."})

    def _route(self, method: str, path: str) -> Callable[[], None]:
        if path in ("/v1/uploads", "/v1/uploads/") or UPLOAD_PATH_RE.match(path):
            self._tus = True
            if method == "OPTIONS":
                return self._tus_options
            if self.headers.get("Tus-Resumable") != TUS_VERSION:
                raise HttpError(412, "tus_version", f"Tus-Resumable must be {TUS_VERSION}",
                                {"Tus-Version": TUS_VERSION, "Tus-Resumable": TUS_VERSION})
            match = UPLOAD_PATH_RE.match(path)
            if match is None and method == "POST":
                return self._tus_create
            if match is not None and method == "HEAD":
                return lambda: self._tus_head(match.group(1))
            if match is not None and method == "PATCH":
                return lambda: self._tus_patch(match.group(1))
            raise HttpError(405, "method_not_allowed", f"{method} is not allowed on {path}",
                            {"Tus-Resumable": TUS_VERSION})
        routes = {
            ("GET", "/v1/bureau"): self._info,
            ("POST", "/v1/enroll"): self._enroll,
            ("POST", "/v1/time"): self._time,
            ("GET", "/v1/ledger/head"): self._ledger_head,
            ("POST", "/v1/ledger"): self._ledger,
            ("GET", "/v1/receipts"): self._receipts,
        }
        handler = routes.get((method, path))
        if handler is None:
            if any(p == path for _, p in routes):
                raise HttpError(405, "method_not_allowed", f"{method} is not allowed on {path}")
            raise HttpError(404, "not_found", f"no such endpoint: {path}")
        return handler

    # --- authentication ---------------------------------------------------------------------------

    def _device(self) -> DeviceRow:
        der = self.connection.getpeercert(binary_form=True)  # type: ignore[attr-defined]
        if not der:
            raise HttpError(401, "client_certificate_required", "this endpoint needs the device certificate issued at "
                            "enrollment (mutual TLS)")
        cert = x509.load_der_x509_certificate(der)
        device_id = cert_common_name(cert) or ""
        device = self.service.db.get_device(device_id)
        if device is None:
            raise HttpError(403, "unknown_device", f"certificate subject {device_id!r} is not an enrolled device")
        if device.status != "active":
            raise HttpError(403, "device_revoked", f"device {device_id} is {device.status}")
        if device.cert_serial != cert_serial_hex(cert):
            raise HttpError(403, "certificate_superseded", f"this certificate of {device_id} was replaced by a later "
                            "enrollment; use the newest certificate")
        self._device_id = device_id
        return device

    # --- bureau, enrollment, time -----------------------------------------------------------------

    def _info(self) -> None:
        keys = self.service.keys
        self._json(200, {"ca_certificate": keys.ca_pem, "ca_sha256": cert_fingerprint(keys.ca_cert),
                         "receipt_public_key": public_key_pem(keys.receipt_public_key).decode(),
                         "receipt_key_id": keys.receipt_key_id,
                         "age_recipients": [str(r) for r in keys.recipients],
                         "endpoints": self.service.endpoints(self._base_url(), None),
                         "limits": self.service.limits(),
                         "tus": {"version": TUS_VERSION, "extensions": TUS_EXTENSIONS.split(","),
                                 "checksum_algorithms": TUS_CHECKSUMS.split(",")}})

    def _enroll(self) -> None:
        request = self._read_json()
        try:
            body = self.service.enrollment.enroll(
                request, lambda device_id: self.service.endpoints(self._base_url(), device_id), self.service.limits())
        except EnrollmentRefused as exc:
            raise HttpError(exc.status, exc.code, exc.detail) from None
        self._device_id = body["device_id"]
        log.info("enrolled %s (certificate serial %s%s)", body["device_id"], body["certificate_serial"],
                 ", a retry of the same enrollment" if body["replayed"] else "")
        self._json(200 if body["replayed"] else 201, body)

    def _time(self) -> None:
        request = self._read_json()
        t1 = request.get("t1_us") if isinstance(request, dict) else None
        if not isinstance(t1, int) or isinstance(t1, bool):
            raise HttpError(400, "bad_request", "body must be {\"t1_us\": <client transmit time, integer µs>}")
        t2 = self.received_us
        body = {"t1_us": t1, "t2_us": t2, "t3_us": 0}
        body["t3_us"] = _now_us()  # as late as possible: only serialisation and the write follow
        self._send(200, json.dumps(body).encode(), {"Cache-Control": "no-store"})

    # --- ledger -----------------------------------------------------------------------------------

    def _ledger_head(self) -> None:
        device = self._device()
        head = self.service.db.ledger_head(device.device_id)
        self._json(200, {"device_id": device.device_id, "head_seq": head.seq, "head_hash": head.hash})

    def _ledger(self) -> None:
        device = self._device()
        body = self._read_body(self.service.config.max_ledger_batch_bytes)
        try:
            result = self.service.ingest.ingest(device, body)
        except LedgerRejected as exc:
            log.warning("ledger upload from %s refused: %s %s", device.device_id, exc.code, exc.detail)
            raise HttpError(exc.status, exc.code, exc.detail, **exc.extra) from None
        self._json(200, {"device_id": device.device_id, **result.as_dict()})

    # --- receipts ---------------------------------------------------------------------------------

    def _receipts(self) -> None:
        device = self._device()
        query = parse_qs(urlsplit(self.path).query)
        ids: list[str] = []
        for value in query.get("segment_id", []):
            ids += [s for s in value.split(",") if s]
        if not ids:
            raise HttpError(400, "bad_request", "give one or more segment_id query parameters")
        if len(ids) > MAX_RECEIPT_BATCH:
            raise HttpError(400, "too_many", f"at most {MAX_RECEIPT_BATCH} segment ids per request, got {len(ids)}")
        for s in ids:
            if not SEGMENT_ID_RE.match(s):
                raise HttpError(400, "bad_segment_id", f"segment id {s!r} is not a valid id")
        results = [self.service.issuer.status(device.device_id, s, f"{self._base_url()}/v1/uploads/") for s in ids]
        self._json(200, {"device_id": device.device_id, "receipt_key_id": self.service.keys.receipt_key_id,
                         "results": results})

    # --- tus --------------------------------------------------------------------------------------

    def _tus_headers(self, **more: str) -> dict[str, str]:
        return {"Tus-Resumable": TUS_VERSION, **more}

    def _tus_options(self) -> None:
        self._send(204, None, {"Tus-Resumable": TUS_VERSION, "Tus-Version": TUS_VERSION,
                               "Tus-Extension": TUS_EXTENSIONS, "Tus-Checksum-Algorithm": TUS_CHECKSUMS,
                               "Tus-Max-Size": str(self.service.config.max_upload_bytes)})

    def _tus_error(self, status: int, code: str, detail: str, **headers: str) -> HttpError:
        return HttpError(status, code, detail, self._tus_headers(**headers))

    def _tus_create(self) -> None:
        device = self._device()
        service = self.service
        if "Upload-Defer-Length" in self.headers:
            raise self._tus_error(400, "defer_length_unsupported", "Upload-Defer-Length is not supported; segments "
                                  "have a known length: send Upload-Length")
        raw_length = (self.headers.get("Upload-Length") or "").strip()
        if not raw_length.isdigit():
            raise self._tus_error(400, "bad_upload_length", "Upload-Length (non-negative integer) is required")
        length = int(raw_length)
        if length > service.config.max_upload_bytes:
            raise self._tus_error(413, "upload_too_large", f"Upload-Length {length} exceeds Tus-Max-Size "
                                  f"{service.config.max_upload_bytes}")
        metadata_header = self.headers.get("Upload-Metadata", "")
        try:
            meta = parse_upload_metadata(metadata_header)
        except HttpError as exc:
            raise self._tus_error(exc.status, exc.code, exc.detail) from None
        segment_id, sha = meta.get("segment_id", ""), meta.get("sha256_cipher", "")
        if not SEGMENT_ID_RE.match(segment_id):
            raise self._tus_error(400, "bad_metadata", "Upload-Metadata must carry segment_id (a segment id)")
        if not HEX64_RE.match(sha):
            raise self._tus_error(400, "bad_metadata", "Upload-Metadata must carry sha256_cipher (64 lowercase hex)")
        if meta.get("device", device.device_id) != device.device_id:
            raise self._tus_error(403, "not_your_device", f"metadata names device {meta['device']!r}; this "
                                  f"certificate is for {device.device_id!r}")
        sidecar = meta.get("sidecar", "")
        if sidecar and sidecar not in SIDECAR_TAGS:
            raise self._tus_error(400, "bad_metadata", f"Upload-Metadata sidecar {sidecar!r} is not a sidecar kind "
                                  f"({', '.join(SIDECAR_TAGS)})")
        part = f"segment {segment_id}" + (f", its {sidecar} sidecar" if sidecar else "")
        record = service.db.get_segment(device.device_id, segment_id)
        if record is None:
            if service.db.segment_owners(segment_id):
                raise self._tus_error(403, "not_your_segment", f"segment {segment_id} belongs to another device; a "
                                      "device may only upload its own segments")
        else:
            named = record.sidecar(sidecar) if sidecar else record
            if named is None:
                raise self._tus_error(422, "record_mismatch", f"{part}: the signed record (seq {record.record_seq}) "
                                      f"names no {sidecar} sidecar")
            if named.size != length or named.sha256_cipher != sha:
                raise self._tus_error(422, "record_mismatch", f"{part}: the signed record (seq {record.record_seq}) "
                                      f"says {named.size} bytes, sha256 {named.sha256_cipher}; this upload declares "
                                      f"{length} bytes, sha256 {sha}")
        if service.db.get_receipt(device.device_id, segment_id) is not None:
            raise self._tus_error(409, "already_receipted", f"segment {segment_id} is already stored and receipted "
                                  "(with every sidecar its record names); fetch its receipt (GET /v1/receipts)")
        row = service.uploads.create(device.device_id, segment_id, length, metadata_header, sha, sidecar)
        location = f"{self._base_url()}/v1/uploads/{row.upload_id}"
        log.info("upload %s created for %s of %s (%d bytes)", row.upload_id, part, device.device_id, length)
        headers = self._tus_headers(Location=location)
        with_body = self.headers.get("Content-Type", "").split(";")[0].strip() == OFFSET_STREAM
        if with_body and self._body_left:  # creation-with-upload
            outcome = self._receive(row.upload_id, 0)
            if outcome is None:
                return
            headers.update(outcome)
        elif length == 0:
            headers[BWC_STATE] = self.service.issuer.finalize(row.upload_id).state.value
        self._send(201, None, headers)

    def _own_upload(self, upload_id: str, device: DeviceRow) -> UploadRow:
        row = self.service.db.get_upload(upload_id)
        if row is None:
            raise self._tus_error(404, "no_such_upload", f"no upload {upload_id}")
        if row.device_id != device.device_id:
            raise self._tus_error(403, "not_your_upload", "this upload belongs to another device")
        return row

    def _tus_head(self, upload_id: str) -> None:
        device = self._device()
        self._own_upload(upload_id, device)
        try:
            with self.service.uploads.claim(upload_id, self.connection):
                row = self.service.db.get_upload(upload_id)
        except UploadBusy as exc:
            raise self._tus_error(423, "upload_busy", str(exc)) from None
        assert row is not None
        headers = self._tus_headers(**{"Upload-Offset": str(row.offset), "Upload-Length": str(row.length),
                                       "Cache-Control": "no-store", BWC_STATE: row.state.value})
        if row.metadata:
            headers["Upload-Metadata"] = row.metadata
        self._send(200, None, headers)

    def _tus_patch(self, upload_id: str) -> None:
        device = self._device()
        if self.headers.get("Content-Type", "").split(";")[0].strip() != OFFSET_STREAM:
            raise self._tus_error(415, "unsupported_media_type", f"PATCH needs Content-Type: {OFFSET_STREAM}")
        raw_offset = (self.headers.get("Upload-Offset") or "").strip()
        if not raw_offset.isdigit():
            raise self._tus_error(400, "bad_upload_offset", "Upload-Offset (non-negative integer) is required")
        self._own_upload(upload_id, device)
        outcome = self._receive(upload_id, int(raw_offset))
        if outcome is not None:
            self._send(204, None, self._tus_headers(**outcome))

    def _checksum(self) -> tuple[str, bytes] | None:
        raw = self.headers.get("Upload-Checksum")
        if raw is None:
            return None
        parts = raw.strip().split(" ")
        if len(parts) != 2 or parts[0] not in CHECKSUM_ALGORITHMS:
            raise self._tus_error(400, "bad_checksum", f"Upload-Checksum must be '<algorithm> <base64>' with an "
                                  f"algorithm from {TUS_CHECKSUMS}")
        try:
            digest = base64.b64decode(parts[1], validate=True)
        except binascii.Error:
            raise self._tus_error(400, "bad_checksum", "Upload-Checksum value is not base64") from None
        if len(digest) != CHECKSUM_ALGORITHMS[parts[0]]().digest_size:
            raise self._tus_error(400, "bad_checksum", f"Upload-Checksum {parts[0]} digest has the wrong length")
        return parts[0], digest

    def _receive(self, upload_id: str, offset: int) -> dict[str, str] | None:
        """Apply this request's body at `offset`; returns response headers, or None if the body was cut."""
        checksum = self._checksum()
        length = self._body_left
        uploads = self.service.uploads
        try:
            with uploads.claim(upload_id, self.connection):
                row = self.service.db.get_upload(upload_id)
                assert row is not None
                if row.offset != offset:
                    raise self._tus_error(409, "offset_mismatch", f"Upload-Offset {offset} differs from the upload's "
                                          f"offset {row.offset}; resume from there (HEAD)",
                                          **{"Upload-Offset": str(row.offset)})
                if offset + length > row.length:
                    raise self._tus_error(413, "exceeds_upload_length", f"{length} bytes at offset {offset} would "
                                          f"exceed Upload-Length {row.length}")
                if length == 0 or row.state != UploadState.RECEIVING:
                    return {"Upload-Offset": str(row.offset), BWC_STATE: row.state.value}
                try:
                    new_offset = uploads.receive(row, self.rfile, length, checksum)
                    self._body_left = 0
                except UploadInterrupted as exc:
                    log.info("upload %s: %s", upload_id, exc)
                    self.close_connection = True
                    return None
                except ChecksumMismatch as exc:
                    self._body_left = 0
                    raise self._tus_error(460, "checksum_mismatch", str(exc)) from None
                except UploadWriteError as exc:
                    self._body_left = 0
                    self.close_connection = True
                    log.error("upload %s: %s", upload_id, exc)
                    raise self._tus_error(507, "insufficient_storage", str(exc)) from None
                state = UploadState.RECEIVING
                if new_offset == row.length:
                    try:
                        state = self.service.issuer.finalize(upload_id).state
                    except (OSError, ObjectStoreError) as exc:
                        log.error("upload %s complete but not committed yet (retried on the next receipts query or "
                                  "restart): %s", upload_id, exc)
                return {"Upload-Offset": str(new_offset), BWC_STATE: state.value}
        except UploadBusy as exc:
            raise self._tus_error(423, "upload_busy", str(exc)) from None


class BureauHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, service: BureauService, ssl_context: ssl.SSLContext):
        self.service = service
        self.ssl_context = ssl_context
        self.base_url = ""
        self.refused_connections = 0
        self._slots = threading.BoundedSemaphore(service.config.max_connections)
        super().__init__((service.config.host, service.config.port), BureauRequestHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused_connections += 1
            log.warning("connection from %s refused: %d connections already open (refused so far: %d)",
                        client_address, self.service.config.max_connections, self.refused_connections)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(self.service.config.socket_timeout_s)
        # Headers and body go out as separate writes; without this, Nagle plus the client's delayed
        # ACK add ~40 ms to every response.
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            tls = self.ssl_context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            log.info("TLS handshake with %s failed: %s", client_address, exc)
            return
        try:
            self.RequestHandlerClass(tls, client_address, self)
        finally:
            with contextlib.suppress(OSError):
                tls.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("unhandled error on the connection from %s", client_address)


def server_ssl_context(service: BureauService, names: list[str]) -> ssl.SSLContext:
    cert, key = service.keys.ensure_server_cert(names)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(cafile=str(service.keys.ca_cert_path(service.keys.root)))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


class BureauServer:
    """The service plus its HTTPS server. `start()` serves in a background thread; `stop()` ends it."""

    def __init__(self, config: BureauConfig, poll_interval_s: float = 0.5):
        self.config = config
        self.poll_interval_s = poll_interval_s  # how soon stop() takes effect
        self.service = BureauService(config)
        host = urlsplit(config.public_url).hostname if config.public_url else None
        names = [n for n in (config.host, host, *config.extra_names) if n and n not in ("0.0.0.0", "::", "")]
        self.httpd = BureauHTTPServer(self.service, server_ssl_context(self.service, names))
        port = self.httpd.server_address[1]
        if config.public_url:
            self.httpd.base_url = config.public_url.rstrip("/")
        else:
            shown = config.host if config.host not in ("0.0.0.0", "::", "") else socket.getfqdn()
            shown = f"[{shown}]" if ":" in shown else shown
            self.httpd.base_url = f"https://{shown}:{port}"
        self._thread: threading.Thread | None = None
        self._serving = threading.Event()
        self.service.recover()

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return self.httpd.base_url

    def serve_forever(self) -> None:
        """Serve until `stop()` is called from another thread."""
        self._serving.set()
        try:
            self.httpd.serve_forever(poll_interval=self.poll_interval_s)
        finally:
            self._serving.clear()

    def start(self) -> BureauServer:
        self._serving.set()  # before the thread runs, so an early stop() still shuts it down
        self._thread = threading.Thread(target=self.serve_forever, name="bureau-https", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._serving.is_set():
            self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.service.close()

    def __enter__(self) -> BureauServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
