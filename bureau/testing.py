"""Test support for the bureau: run it on loopback, enroll a device, speak HTTPS with the device certificate.

Used by tests/test_bureau_*.py (and usable by other tests that need a real bureau). The device's real
uploader lives in agent/sync/; `DeviceHttp` is only the plain http.client + ssl a test needs.

Threads: `running_bureau` serves in a background thread and stops it when the block ends;
`BureauProcess` runs `python -m bureau serve` as a child process that also stops by itself
(--exit-after) should a test die before stopping it.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bureau.server import BureauServer
from bureau.service import BureauConfig


def make_csr(key_path: Path, device_id: str) -> str:
    """A PEM CSR for the P-256 key in `key_path`, subject CN = device id."""
    key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class DeviceHttp:
    """One HTTPS request per call to the bureau, with the device certificate if given."""

    def __init__(self, host: str, port: int, ca_file: Path, cert_file: Path | None = None,
                 key_file: Path | None = None, timeout: float = 20.0):
        self.host, self.port, self.timeout = host, port, timeout
        self.context = ssl.create_default_context(cafile=str(ca_file))
        if cert_file is not None:
            self.context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)

    def connect(self) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(self.host, self.port, context=self.context, timeout=self.timeout)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> Reply:
        conn = self.connect()
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
            return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
        finally:
            conn.close()

    def post_json(self, path: str, obj: Any) -> Reply:
        return self.request("POST", path, json.dumps(obj).encode(), {"Content-Type": "application/json"})


@dataclass
class EnrolledDevice:
    device_id: str
    key_file: Path
    cert_file: Path
    enrollment: dict[str, Any]

    def http(self, server_port: int, ca_file: Path) -> DeviceHttp:
        return DeviceHttp("127.0.0.1", server_port, ca_file, self.cert_file, self.key_file)


def enroll(port: int, ca_file: Path, bureau_dir: Path, device_id: str, key_file: Path, out_dir: Path) -> EnrolledDevice:
    """Mint a token in `bureau_dir`, enroll `key_file` as `device_id`, write the certificate to `out_dir`."""
    from bureau.db import SqliteBureauDatabase
    from bureau.enrollment import Enrollment
    from bureau.keys import BureauKeys

    db = SqliteBureauDatabase(bureau_dir / "bureau.db")
    try:
        token = Enrollment(BureauKeys.load_or_create(bureau_dir), db, 1).mint_token(device_id).token
    finally:
        db.close()
    reply = DeviceHttp("127.0.0.1", port, ca_file).post_json("/v1/enroll", {"token": token,
                                                                          "csr": make_csr(key_file, device_id)})
    if reply.status != 201:
        raise AssertionError(f"enrollment of {device_id} failed: {reply.status} {reply.body!r}")
    body = reply.json()
    out_dir.mkdir(parents=True, exist_ok=True)
    cert_file = out_dir / f"{device_id}.crt.pem"
    cert_file.write_text(body["certificate"])
    return EnrolledDevice(device_id, key_file, cert_file, body)


@contextmanager
def running_bureau(bureau_dir: Path, **config: Any) -> Iterator[BureauServer]:
    """A bureau on 127.0.0.1 and an ephemeral port, serving until the block ends."""
    server = BureauServer(BureauConfig(dir=bureau_dir, host="127.0.0.1", port=0, **config), poll_interval_s=0.02)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class BureauProcess:
    """`python -m bureau serve` as a child process on 127.0.0.1 (so it can be killed like a real server)."""

    def __init__(self, bureau_dir: Path, port: int = 0, exit_after_s: float = 120.0, ready_timeout_s: float = 30.0):
        self.bureau_dir = bureau_dir
        cmd = [sys.executable, "-m", "bureau", "serve", "--dir", str(bureau_dir), "--host", "127.0.0.1",
               "--port", str(port), "--exit-after", str(exit_after_s)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                           os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        self.port = self._wait_ready(ready_timeout_s)

    def _wait_ready(self, timeout_s: float) -> int:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        line = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                line = self.proc.stdout.readline()
                if b"listening on" in line:
                    return int(line.split(b"(port ")[1].split(b")")[0])
                if not line:
                    break
        self.kill()
        raise RuntimeError(f"bureau process did not start (last output {line!r}, exit {self.proc.poll()})")

    def kill(self) -> None:
        """SIGKILL: the bureau gets no chance to tidy up (a crash or power cut)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class SimDevice:
    """An enrolled device with a real evidence store that encrypts to the bureau's recipients."""

    enrolled: EnrolledDevice
    store: Any  # agent.storage.store.EvidenceStore
    http: DeviceHttp

    @property
    def device_id(self) -> str:
        return self.enrolled.device_id

    def ledger_batch(self, from_seq: int = 1) -> bytes:
        """The ledger export (JSON Lines) from `from_seq` on, as the device would upload it."""
        return b"".join(rec.to_line() for rec in self.store.ledger.records(from_seq))

    def close(self) -> None:
        self.store.close()


def make_device(port: int, bureau_dir: Path, device_id: str, work_dir: Path) -> SimDevice:
    from agent.clock import SystemClock
    from agent.evidence.age import Recipient
    from agent.storage.keys import PemFileSigner
    from agent.storage.store import EvidenceStore

    home = work_dir / device_id
    signer = PemFileSigner.generate(home / "keys" / "device-key.pem")
    ca_file = bureau_dir / "ca.pem"
    enrolled = enroll(port, ca_file, bureau_dir, device_id, signer.path, home / "keys")
    recipients = [Recipient.parse(r) for r in enrolled.enrollment["age_recipients"]]
    store = EvidenceStore(home / "data", device_id, signer, recipients, SystemClock())
    return SimDevice(enrolled, store, enrolled.http(port, ca_file))
