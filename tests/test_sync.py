"""Docked sync against the real reference bureau on 127.0.0.1 (R20–R22): everything uploaded, verified and
receipted; undock, bureau restart and a stalled link each resume without re-sending more than one request;
a bad receipt is refused and nothing is purged early."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from agent.evidence.age import Identity
from agent.evidence.receipts import ReceiptVerifier
from agent.evidence.signing import load_public_key
from agent.evidence.verify import Verifier
from agent.storage.segment_writer import FragmentInfo
from agent.storage.store import PurgeRefused, SegmentState
from agent.sync.https import HttpsSession, client_ssl_context
from agent.sync.syncer import Syncer
from bureau.testing import BureauProcess, make_device, running_bureau

MB = 1024 * 1024
S = SegmentState


def record_segments(store, session, sizes):
    for i, n in enumerate(sizes):
        seg = store.open_segment(session, i)
        for f in range(n):
            seg.write_fragment(os.urandom(300_000), FragmentInfo(30, 48000, f * 1_000_000, f * 1_000_000 + 966_000))
        seg.close()


class Rig:
    def __init__(self, tmp_path: Path, port: int, bureau_dir: Path, device_id: str = "BWC-SYNC-01"):
        self.bureau_dir = bureau_dir
        self.port = port
        self.dev = make_device(port, bureau_dir, device_id, tmp_path / "devices")
        e = self.dev.enrolled
        self.ctx = client_ssl_context(bureau_dir / "ca.pem", e.cert_file, e.key_file)
        self.receipt_key = load_public_key(e.enrollment["receipt_public_key"].encode())

    def syncer(self, port: int | None = None, **kw) -> Syncer:
        return Syncer(self.dev.store, f"https://127.0.0.1:{port or self.port}", HttpsSession(self.ctx, timeout_s=5),
                      ReceiptVerifier(kw.pop("receipt_key", self.receipt_key)), self.dev.store.clock,
                      request_bytes=kw.pop("request_bytes", 1 * MB), **kw)

    def states(self) -> dict[str, str]:
        return {r["segment_id"]: r["state"] for r in self.dev.store.segments()}


def test_docked_sync_uploads_verifies_and_receipts_everything(tmp_path):
    bureau_dir = tmp_path / "bureau"
    with running_bureau(bureau_dir) as server:
        rig = Rig(tmp_path, server.port, bureau_dir)
        store = rig.dev.store
        record_segments(store, "SOLD-aaaa", [3, 3])
        record_segments(store, "SNEW-bbbb", [2])
        store.set_flagged("SNEW-bbbb")
        progress = []
        syncer = rig.syncer(on_progress=lambda p: progress.append(p.as_dict(0)))
        result = syncer.sync_once()
        assert result.error is None and not result.interrupted
        assert result.uploaded[0].startswith("SNEW"), "flagged sessions go first"
        assert set(rig.states().values()) == {S.RECEIPTED}
        assert any(p["phase"] == "segments" for p in progress) and progress[-1]["phase"] == "done"
        assert [r.fields["body"]["source"] for r in store.ledger.records(rtype="clock_sync")] == ["bureau"]
        # The bureau's copy is a bundle that verifies and decrypts with the bureau identity.
        identity = Identity.load(bureau_dir / "keys" / "bureau-identity.txt")
        report = Verifier(identity).verify_path(bureau_dir / "store" / rig.dev.device_id)
        assert report.ok and report.decrypted == 3, report.problems
        # Receipted footage may now be purged, oldest first, each purge a record.
        purged = store.purge_for_space(store.fs.disk_usage(store.data_dir)[1] + 10**15)
        assert purged == ["SOLD-aaaa-0000", "SOLD-aaaa-0001", "SNEW-bbbb-0000"]
        assert len(list(store.ledger.records(rtype="purge"))) == len(purged)
        # A second pass sends the purge records (the bureau accepts purges of earlier batches' segments)
        # and nothing else.
        again = rig.syncer().sync_once()
        assert again.uploaded == [] and again.error is None and again.ledger_sent >= len(purged)
        rig.dev.close()


def test_undock_mid_upload_resumes_with_at_most_one_request_resent(tmp_path):
    bureau_dir = tmp_path / "bureau"
    with running_bureau(bureau_dir) as server:
        rig = Rig(tmp_path, server.port, bureau_dir)
        record_segments(rig.dev.store, "SUND-cccc", [12])
        size = rig.dev.store.segments()[0]["size"]
        docked = {"yes": True}
        first = rig.syncer(should_stop=lambda: not docked["yes"],
                           on_progress=lambda p: docked.update(yes=p.done_bytes < 2 * MB))
        result = first.sync_once()
        assert result.interrupted and rig.states() == {"SUND-cccc-0000": S.QUEUED}
        with pytest.raises(PurgeRefused):
            rig.dev.store.purge("SUND-cccc-0000")
        second = rig.syncer()
        result = second.sync_once()
        assert result.error is None and rig.states() == {"SUND-cccc-0000": S.RECEIPTED}
        resent = first.tus.bytes_sent + second.tus.bytes_sent - size
        assert 0 <= resent <= 1 * MB
        rig.dev.close()


def test_bureau_killed_mid_upload_resumes_after_restart(tmp_path):
    bureau_dir = tmp_path / "bureau"
    proc = BureauProcess(bureau_dir)
    try:
        rig = Rig(tmp_path, proc.port, bureau_dir)
        record_segments(rig.dev.store, "SKIL-dddd", [14])
        size = rig.dev.store.segments()[0]["size"]

        def kill_at_2mb(p) -> None:
            if p.done_bytes >= 2 * MB and proc.proc.poll() is None:
                proc.kill()

        first = rig.syncer(on_progress=kill_at_2mb)
        assert first.sync_once().interrupted
        port = proc.port
        proc = BureauProcess(bureau_dir, port=port)
        second = rig.syncer()
        result = second.sync_once()
        assert result.error is None and set(rig.states().values()) == {S.RECEIPTED}
        assert first.tus.bytes_sent + second.tus.bytes_sent - size <= 1 * MB
        rig.dev.close()
    finally:
        proc.stop()


class StallingProxy:
    """A loopback TCP proxy that forwards until told to stall, then holds connections without forwarding."""

    def __init__(self, target_port: int):
        self.target = target_port
        self.stalled = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.forwarded = 0
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:  # closed by close()
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        src.settimeout(0.2)
        deadline = time.monotonic() + 60
        while not self._stop.is_set() and time.monotonic() < deadline:
            if self.stalled.is_set():
                time.sleep(0.05)
                continue
            try:
                data = src.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            self.forwarded += len(data)
            try:
                dst.sendall(data)
            except OSError:
                break
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.close()

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


def test_stalled_link_times_out_and_resumes(tmp_path):
    bureau_dir = tmp_path / "bureau"
    with running_bureau(bureau_dir) as server:
        rig = Rig(tmp_path, server.port, bureau_dir)
        record_segments(rig.dev.store, "SSTL-eeee", [12])
        size = rig.dev.store.segments()[0]["size"]
        proxy = StallingProxy(server.port)
        # The bureau hands out absolute upload URLs: make them point through the proxy too, so the stall
        # hits a PATCH in flight and not only the requests around it.
        server.httpd.base_url = f"https://127.0.0.1:{proxy.port}"
        try:
            first = rig.syncer(port=proxy.port,
                               on_progress=lambda p: proxy.stalled.set() if p.done_bytes >= 2 * MB else None)
            started = time.monotonic()
            result = first.sync_once()
            assert result.interrupted and time.monotonic() - started < 30
            assert rig.states() == {"SSTL-eeee-0000": S.QUEUED}
            stalled_at = first.progress.done_bytes
            assert 2 * MB <= stalled_at < size, "the stall must cut the upload itself"
        finally:
            proxy.close()
            server.httpd.base_url = f"https://127.0.0.1:{server.port}"
        second = rig.syncer()
        assert second.sync_once().error is None
        assert rig.states() == {"SSTL-eeee-0000": S.RECEIPTED}
        assert first.tus.bytes_sent + second.tus.bytes_sent - size <= 2 * MB  # one request in flight + the stalled one
        rig.dev.close()


def test_receipt_signed_by_another_key_is_refused_and_nothing_purged(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec

    bureau_dir = tmp_path / "bureau"
    with running_bureau(bureau_dir) as server:
        rig = Rig(tmp_path, server.port, bureau_dir)
        record_segments(rig.dev.store, "SBAD-ffff", [2])
        impostor = ec.generate_private_key(ec.SECP256R1()).public_key()
        result = rig.syncer(receipt_key=impostor).sync_once()
        assert result.receipted == [] and rig.states() == {"SBAD-ffff-0000": S.UPLOADED}
        alarms = [r.fields["body"] for r in rig.dev.store.ledger.records(rtype="alarm")]
        assert alarms and alarms[0]["code"] == "receipt_refused"
        with pytest.raises(PurgeRefused):
            rig.dev.store.purge("SBAD-ffff-0000")
        assert rig.syncer().sync_once().receipted == ["SBAD-ffff-0000"]
        rig.dev.close()
