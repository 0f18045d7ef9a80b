"""A tus 1.0 resumable-upload client (core + creation, checksum when the server offers sha256).

Thread: runs on the sync thread; one upload at a time. Memory is bounded by `request_bytes`: a file is
streamed from disk in PATCH requests of at most that size, so an interrupted upload re-sends at most one
request's worth of data (the server's Upload-Offset says where to resume). Every socket has a timeout,
and TCP_USER_TIMEOUT where the OS has it, so a stalled link fails instead of hanging.

tus facts used (tus.io protocol 1.0.0): `Tus-Resumable: 1.0.0` on every request but OPTIONS; creation is
`POST` with `Upload-Length` and `Upload-Metadata` (comma-separated `key base64(value)`), answered 201 with
`Location`; `HEAD` answers `Upload-Offset`; `PATCH` carries `Upload-Offset` and
`Content-Type: application/offset+octet-stream` and is answered 204 with the new `Upload-Offset`; checksum
is `Upload-Checksum: <algorithm> <base64 digest>` of the request body, and a mismatch is 460.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urljoin, urlsplit, urlunsplit

from agent.sync.https import HttpsSession, LinkError, client_ssl_context  # noqa: F401 - re-exported

log = logging.getLogger(__name__)

TUS_VERSION = "1.0.0"
DEFAULT_REQUEST_BYTES = 8 * 1024 * 1024
READ_BLOCK = 256 * 1024


class TusError(RuntimeError):
    """The server refused or answered something the protocol does not allow."""


class TusInterrupted(TusError):
    """The connection failed mid-upload; call `upload` again with the same URL to resume."""


@dataclass
class TusServerInfo:
    versions: list[str]
    extensions: list[str]
    checksum_algorithms: list[str]
    max_size: int | None


class _LimitedReader:
    """Reads at most `limit` bytes from `fh`, in blocks, feeding an optional running hash."""

    def __init__(self, fh: BinaryIO, limit: int, on_block: Callable[[int], None] | None = None):
        self.fh = fh
        self.remaining = limit
        self.on_block = on_block

    def read(self, size: int = READ_BLOCK) -> bytes:
        if self.remaining <= 0:
            return b""
        block = self.fh.read(min(size if size > 0 else READ_BLOCK, self.remaining, READ_BLOCK))
        self.remaining -= len(block)
        if self.on_block:
            self.on_block(len(block))
        return block


def encode_metadata(meta: dict[str, str]) -> str:
    for key in meta:
        if not key or " " in key or "," in key:
            raise ValueError(f"tus metadata key {key!r} may not be empty or contain spaces or commas")
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in meta.items())


class TusClient:
    def __init__(self, creation_url: str, ssl_context: ssl.SSLContext | None = None, timeout_s: float = 30.0,
                 request_bytes: int = DEFAULT_REQUEST_BYTES, user_timeout_ms: int = 30_000,
                 headers: dict[str, str] | None = None, session: HttpsSession | None = None):
        self.creation_url = creation_url
        self.session = session or HttpsSession(ssl_context, timeout_s, user_timeout_ms)
        self.request_bytes = request_bytes
        self.extra_headers = headers or {}
        self.bytes_sent = 0  # every body byte put on the wire, including re-sends

    def close(self) -> None:
        self.session.close()

    def _request(self, method: str, url: str, headers: dict[str, str], body=None,
                 content_length: int | None = None) -> http.client.HTTPResponse:
        hdrs = {**self.extra_headers, **headers}
        if method != "OPTIONS":
            hdrs["Tus-Resumable"] = TUS_VERSION
        try:
            resp, _ = self.session.request(method, url, hdrs, body, content_length)
        except LinkError as exc:
            raise TusInterrupted(str(exc)) from exc
        return resp

    # --- protocol ---------------------------------------------------------------------------------

    def options(self) -> TusServerInfo:
        resp = self._request("OPTIONS", self.creation_url, {})
        if resp.status not in (200, 204):
            raise TusError(f"OPTIONS {self.creation_url}: HTTP {resp.status}")

        def split(name: str) -> list[str]:
            return [v.strip() for v in (resp.getheader(name) or "").split(",") if v.strip()]

        max_size = resp.getheader("Tus-Max-Size")
        return TusServerInfo(split("Tus-Version"), split("Tus-Extension"), split("Tus-Checksum-Algorithm"),
                             int(max_size) if max_size and max_size.isdigit() else None)

    def create(self, length: int, metadata: dict[str, str]) -> str:
        resp = self._request("POST", self.creation_url, {"Upload-Length": str(length),
                                                         "Upload-Metadata": encode_metadata(metadata)},
                             content_length=0)
        location = resp.getheader("Location")
        if resp.status != 201 or not location:
            raise TusError(f"creation refused: HTTP {resp.status} {resp.reason}")
        return same_origin(self.creation_url, urljoin(self.creation_url, location))

    def offset(self, upload_url: str) -> int:
        resp = self._request("HEAD", upload_url, {})
        if resp.status in (404, 410):
            raise TusError(f"upload {upload_url} is gone (HTTP {resp.status}); create it again")
        value = resp.getheader("Upload-Offset")
        if resp.status not in (200, 204) or value is None or not value.isdigit():
            raise TusError(f"HEAD {upload_url}: HTTP {resp.status}, Upload-Offset {value!r}")
        return int(value)

    def upload(self, path: Path, metadata: dict[str, str], upload_url: str | None = None,
               on_created: Callable[[str], None] | None = None,
               on_progress: Callable[[int, int], None] | None = None, use_checksum: bool = True) -> str:
        """Send `path` completely; returns the upload URL. Resumes from the server's offset if `upload_url`
        is given. `on_created(url)` lets the caller persist the URL before any byte is sent (resume after a
        restart). Raises TusInterrupted on a network failure (call again with the URL) or TusError."""
        size = path.stat().st_size
        checksum = use_checksum and "sha256" in self._checksums()
        if upload_url is None:
            upload_url = self.create(size, metadata)
            if on_created:
                on_created(upload_url)
            offset = 0
        else:
            offset = self.offset(upload_url)
        if offset > size:
            raise TusError(f"server offset {offset} beyond file size {size} for {path.name}")
        with open(path, "rb") as fh:
            while offset < size:
                n = min(self.request_bytes, size - offset)
                headers = {"Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream"}
                if checksum:
                    headers["Upload-Checksum"] = "sha256 " + base64.b64encode(_hash_range(fh, offset, n)).decode()
                fh.seek(offset)
                reader = _LimitedReader(fh, n, self._count)
                resp = self._request("PATCH", upload_url, headers, body=reader, content_length=n)
                if resp.status == 409:  # offset conflict: ask the server where it is and go on from there
                    offset = self.offset(upload_url)
                    continue
                if resp.status == 460:
                    raise TusError(f"PATCH {upload_url}: checksum mismatch reported by the server (460)")
                new = resp.getheader("Upload-Offset")
                if resp.status != 204 or new is None or not new.isdigit():
                    raise TusError(f"PATCH {upload_url}: HTTP {resp.status} {resp.reason}")
                if int(new) != offset + n:
                    log.warning("server took %d of %d bytes", int(new) - offset, n)
                offset = int(new)
                if on_progress:
                    on_progress(offset, size)
        return upload_url

    def _count(self, n: int) -> None:
        self.bytes_sent += n

    def _checksums(self) -> list[str]:
        try:
            info = self.options()
        except TusError:
            return []
        return info.checksum_algorithms if "checksum" in info.extensions else []


def same_origin(base_url: str, url: str) -> str:
    """`url` moved onto `base_url`'s scheme, host and port. Evidence only ever goes to the configured bureau,
    whatever absolute Location an upload was given (a proxy, a renumbered port, a hostile answer)."""
    base, target = urlsplit(base_url), urlsplit(url)
    if (base.scheme, base.netloc) != (target.scheme, target.netloc):
        log.warning("upload URL %s is not on %s://%s; using its path there", url, base.scheme, base.netloc)
    return urlunsplit((base.scheme, base.netloc, target.path, target.query, ""))


def _hash_range(fh: BinaryIO, offset: int, length: int) -> bytes:
    h = hashlib.sha256()
    fh.seek(offset)
    remaining = length
    while remaining:
        block = fh.read(min(READ_BLOCK, remaining))
        if not block:
            raise TusError("file shrank while uploading")
        h.update(block)
        remaining -= len(block)
    return h.digest()
