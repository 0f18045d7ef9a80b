"""One keep-alive HTTPS connection to the bureau, with a timeout on every socket operation and
TCP_USER_TIMEOUT where the OS has it, so a stalled link fails instead of hanging (DESIGN.md, "Sync").

Thread: used by the sync thread only (one request at a time).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

SEND_BLOCK = 256 * 1024


class LinkError(RuntimeError):
    """The connection failed (refused, reset, timed out); the request may be retried."""


class BureauError(RuntimeError):
    """The bureau answered with an error: `status`, the stable `code` and its `detail`."""

    def __init__(self, status: int, code: str, detail: str, body: dict[str, Any] | None = None):
        super().__init__(f"HTTP {status} {code}: {detail}")
        self.status, self.code, self.detail, self.body = status, code, detail, body or {}


class HttpsSession:
    def __init__(self, ssl_context: ssl.SSLContext | None, timeout_s: float = 30.0, user_timeout_ms: int = 30_000):
        self.ssl_context = ssl_context
        self.timeout_s = timeout_s
        self.user_timeout_ms = user_timeout_ms
        self._conn: http.client.HTTPConnection | None = None
        self._key: tuple[str, str] | None = None

    def connection(self, url: str) -> tuple[http.client.HTTPConnection, str]:
        parts = urlsplit(url)
        key = (parts.scheme, parts.netloc)
        if self._conn is None or self._key != key:
            self.close()
            if parts.scheme == "https":
                # 256 KiB send blocks: http.client's default 8 KiB costs ~27 % more CPU per GB (bench_sync).
                conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                    parts.netloc, timeout=self.timeout_s, context=self.ssl_context, blocksize=SEND_BLOCK)
            elif parts.scheme == "http":
                conn = http.client.HTTPConnection(parts.netloc, timeout=self.timeout_s, blocksize=SEND_BLOCK)
            else:
                raise LinkError(f"unsupported URL scheme in {url!r}")
            try:
                conn.connect()
            except (OSError, http.client.HTTPException) as exc:
                raise LinkError(f"connect to {parts.netloc}: {exc.__class__.__name__}: {exc}") from exc
            if hasattr(socket, "TCP_USER_TIMEOUT") and conn.sock is not None:
                conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, self.user_timeout_ms)
            self._conn, self._key = conn, key
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return self._conn, path

    def request(self, method: str, url: str, headers: dict[str, str] | None = None, body: Any = None,
                content_length: int | None = None) -> tuple[http.client.HTTPResponse, bytes]:
        """Send one request and read the whole (small) response body."""
        hdrs = dict(headers or {})
        if content_length is not None:
            hdrs["Content-Length"] = str(content_length)
        try:
            conn, path = self.connection(url)
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            data = resp.read()
            if (resp.getheader("Connection") or "").lower() == "close":
                self.close()
            return resp, data
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise LinkError(f"{method} {url}: {exc.__class__.__name__}: {exc}") from exc

    def json(self, method: str, url: str, obj: Any = None, body: bytes | None = None,
             content_type: str = "application/json") -> dict[str, Any]:
        """A JSON request; raises BureauError for a non-2xx answer (with the bureau's error code)."""
        payload = body if body is not None else (json.dumps(obj).encode() if obj is not None else b"")
        resp, data = self.request(method, url, {"Content-Type": content_type, "Accept": "application/json"},
                                  payload if method != "GET" else None,
                                  len(payload) if method != "GET" else None)
        try:
            parsed = json.loads(data) if data else {}
        except json.JSONDecodeError:
            parsed = None
        if not 200 <= resp.status < 300:
            if isinstance(parsed, dict):
                raise BureauError(resp.status, str(parsed.get("error", "unknown")), str(parsed.get("detail", "")),
                                  parsed)
            raise BureauError(resp.status, "not_json", data[:200].decode(errors="replace"))
        if not isinstance(parsed, dict):
            raise BureauError(resp.status, "bad_response", f"expected a JSON object, got {data[:80]!r}")
        return parsed

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None


def client_ssl_context(ca_file: Path, cert_file: Path | None, key_file: Path | None) -> ssl.SSLContext:
    """TLS 1.2+ context that trusts only the bureau CA and presents the device certificate."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=os.fspath(ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        ctx.load_cert_chain(os.fspath(cert_file), os.fspath(key_file) if key_file else None)
    return ctx
