"""Our tus uploader against a tus server written elsewhere (@tus/server, Node), over mutual TLS on
127.0.0.1: complete upload, and resume after the server is killed mid-upload (R20)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.sync.tus import TusClient, TusError, TusInterrupted, client_ssl_context
from tests.pki import make_pki

INTEROP = Path(__file__).parent / "interop"
pytestmark = pytest.mark.skipif(shutil.which("node") is None or not (INTEROP / "node_modules").is_dir(),
                                reason="node and tests/interop/node_modules are installed by ./dev")

MB = 1024 * 1024


class NodeTus:
    def __init__(self, store: Path, pki: Path, port: int = 0):
        self.proc = subprocess.Popen(["node", str(INTEROP / "tus_server.mjs"), str(store), str(pki), str(port)],
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.startswith("PORT "), f"tus server did not start: {line!r}"
        self.port = int(line.split()[1])

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def env(tmp_path):
    pki = make_pki(tmp_path / "pki")
    store = tmp_path / "tus-store"
    store.mkdir()
    data = tmp_path / "segment.age"
    data.write_bytes(os.urandom(12 * MB + 12345))
    ctx = client_ssl_context(pki / "ca.crt", pki / "BWC-TEST-0001.crt", pki / "BWC-TEST-0001.key")
    servers: list[NodeTus] = []
    yield pki, store, data, ctx, servers
    for s in servers:
        s.kill()


def stored_file(store: Path, url: str) -> Path:
    return store / url.rstrip("/").rsplit("/", 1)[1]


def test_upload_to_reference_tus_server_arrives_intact(env):
    pki, store, data, ctx, servers = env
    servers.append(NodeTus(store, pki))
    client = TusClient(f"https://127.0.0.1:{servers[0].port}/files", ctx, request_bytes=2 * MB)
    info = client.options()
    assert "1.0.0" in info.versions and "creation" in info.extensions
    progress = []
    url = client.upload(data, {"segment_id": "S1-0001", "filename": data.name},
                        on_progress=lambda done, total: progress.append(done))
    assert stored_file(store, url).read_bytes() == data.read_bytes()
    assert progress[-1] == data.stat().st_size and len(progress) == 7
    assert client.bytes_sent == data.stat().st_size


def test_upload_resumes_after_the_server_dies_mid_upload(env):
    pki, store, data, ctx, servers = env
    first = NodeTus(store, pki)
    servers.append(first)
    client = TusClient(f"https://127.0.0.1:{first.port}/files", ctx, request_bytes=1 * MB, timeout_s=10)
    created: list[str] = []

    def kill_after_three(done: int, total: int) -> None:
        if done >= 3 * MB and first.proc.poll() is None:
            first.kill()

    with pytest.raises(TusInterrupted):
        client.upload(data, {"segment_id": "S1-0002"}, on_created=created.append, on_progress=kill_after_three)
    sent_before = client.bytes_sent
    servers.append(NodeTus(store, pki, first.port))  # restarted on the same port and store
    client.upload(data, {"segment_id": "S1-0002"}, upload_url=created[0])
    assert hashlib.sha256(stored_file(store, created[0]).read_bytes()).digest() == \
        hashlib.sha256(data.read_bytes()).digest()
    resent = client.bytes_sent - data.stat().st_size
    assert sent_before >= 3 * MB and 0 <= resent <= 1 * MB  # at most one request's worth re-sent


def test_client_without_certificate_is_refused(env):
    pki, store, data, _ctx, servers = env
    servers.append(NodeTus(store, pki))
    anonymous = client_ssl_context(pki / "ca.crt", None, None)
    with pytest.raises((TusInterrupted, TusError)):
        TusClient(f"https://127.0.0.1:{servers[0].port}/files", anonymous).upload(data, {"segment_id": "x"})


def test_upload_urls_never_leave_the_configured_bureau():
    from agent.sync.tus import same_origin

    base = "https://bureau.example:8443/v1/uploads"
    assert same_origin(base, "https://evil.example/v1/uploads/ab12") == "https://bureau.example:8443/v1/uploads/ab12"
    assert same_origin(base, "https://bureau.example:8443/v1/uploads/ab12") == \
        "https://bureau.example:8443/v1/uploads/ab12"
