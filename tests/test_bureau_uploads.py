"""Segment uploads at the bureau (tus 1.0 over mTLS) and the receipts that are the only ack (R20, R22).

A minimal tus client written here with http.client, plus the official Python tus client (tuspy), talk to
the real HTTPS server on 127.0.0.1; a restart test runs `python -m bureau serve` as a process and kills it.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from agent.evidence.receipts import ReceiptError, ReceiptVerifier
from agent.evidence.signing import load_public_key
from agent.storage.store import SegmentState
from bureau.testing import BureauProcess, make_device, running_bureau
from bureau.uploads import COMMIT_EVERY_BYTES
from tests.conftest import write_segment

TUS = {"Tus-Resumable": "1.0.0"}
STREAM = "application/offset+octet-stream"


# --- a minimal tus client --------------------------------------------------------------------------


def metadata(**values: str) -> str:
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in values.items())


def create(dev, seg, length=None, **meta):
    meta = {"segment_id": seg["segment_id"], "sha256_cipher": seg["sha256_cipher"], **meta}
    return dev.http.request("POST", "/v1/uploads", b"", {
        **TUS, "Upload-Length": str(seg["size"] if length is None else length), "Upload-Metadata": metadata(**meta)})


def path_of(reply) -> str:
    assert reply.status == 201, reply.body
    return urlsplit(reply.headers["location"]).path


def patch(device, path, offset, data, checksum=None, headers=None):
    h = {**TUS, "Upload-Offset": str(offset), "Content-Type": STREAM, **(headers or {})}
    if checksum:
        h["Upload-Checksum"] = checksum
    return device.http.request("PATCH", path, data, h)


def head(device, path):
    return device.http.request("HEAD", path, None, TUS)


def upload(device, seg, data, chunk=100_000):
    path = path_of(create(device, seg))
    offset = 0
    reply = None
    while offset < len(data):
        reply = patch(device, path, offset, data[offset:offset + chunk])
        assert reply.status == 204, reply.body
        offset = int(reply.headers["upload-offset"])
    return path, reply


def segment(device, index=0, sizes=(150_000, 150_000)):
    record, _ = write_segment(device.store, "S1", index, sizes)
    body = record.fields["body"]
    return body, (device.store.segments_dir / body["file"]).read_bytes()


def send_ledger(device):
    reply = device.http.request("POST", "/v1/ledger", device.ledger_batch(1))
    assert reply.status == 200, reply.body
    return reply.json()


def receipts(device, *segment_ids):
    reply = device.http.request("GET", "/v1/receipts?" + "&".join(f"segment_id={s}" for s in segment_ids))
    assert reply.status == 200, reply.body
    return {r["segment_id"]: r for r in reply.json()["results"]}


def verify_receipt(device, seg, result):
    pinned = load_public_key(device.enrolled.enrollment["receipt_public_key"].encode())
    return ReceiptVerifier(pinned).verify(base64.b64decode(result["receipt"]), base64.b64decode(result["sig"]),
                                          device=device.device_id, segment_id=seg["segment_id"],
                                          sha256_cipher=seg["sha256_cipher"], size=seg["size"])


def raw_tls(device, port):
    return device.http.context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=20),
                                           server_hostname="127.0.0.1")


def start_patch(device, port, path, offset, total, first_bytes, checksum=None):
    """Send a PATCH's headers and only the first part of its body; the caller decides what happens next."""
    conn = raw_tls(device, port)
    lines = [f"PATCH {path} HTTP/1.1", "Host: 127.0.0.1", "Tus-Resumable: 1.0.0", f"Upload-Offset: {offset}",
             f"Content-Type: {STREAM}", f"Content-Length: {total}"]
    if checksum:
        lines.append(f"Upload-Checksum: {checksum}")
    conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + first_bytes)
    return conn


def wait_for_size(path: Path, size: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size >= size:
            return
        time.sleep(0.02)
    raise AssertionError(f"{path} never reached {size} bytes")


# --- fixtures --------------------------------------------------------------------------------------


@pytest.fixture
def bureau(tmp_path):
    with running_bureau(tmp_path / "bureau") as server:
        yield server


@pytest.fixture
def device(bureau, tmp_path):
    dev = make_device(bureau.port, bureau.service.config.dir, "BWC-UPL-0001", tmp_path / "devices")
    yield dev
    dev.close()


# --- tests -----------------------------------------------------------------------------------------


def test_options_advertise_version_extensions_checksums_and_max_size(bureau, device):
    reply = device.http.request("OPTIONS", "/v1/uploads")
    assert reply.status == 204
    assert reply.headers["tus-version"] == "1.0.0"
    assert {"creation", "checksum"} <= set(reply.headers["tus-extension"].split(","))
    assert {"sha1", "sha256"} <= set(reply.headers["tus-checksum-algorithm"].split(","))
    assert int(reply.headers["tus-max-size"]) == bureau.service.config.max_upload_bytes


def test_uploaded_segment_is_committed_then_receipted_and_the_receipt_verifies(bureau, device):
    seg, data = segment(device)
    send_ledger(device)
    path, last = upload(device, seg, data)
    assert last.headers["bwc-upload-state"] == "committed"

    result = receipts(device, seg["segment_id"])[seg["segment_id"]]
    assert result["status"] == "receipted"
    verified = verify_receipt(device, seg, result)
    assert verified.fields["record_hash"] == device.store.ledger.records(rtype="segment").__next__().hash
    device.store.record_receipt(seg["segment_id"], verified)  # the device's own state machine accepts it
    assert device.store.row(seg["segment_id"])["state"] == SegmentState.RECEIPTED

    stored = bureau.service.config.dir / "store" / device.device_id / "segments" / seg["file"]
    assert stored.read_bytes() == data
    assert not list((bureau.service.config.dir / "incoming").iterdir())
    assert head(device, path).headers["upload-offset"] == str(len(data))


def test_bureau_copy_verifies_with_bwc_agent_verify_and_decrypts_with_stock_age(bureau, device):
    segs = [segment(device, i) for i in range(2)]
    send_ledger(device)
    for seg, data in segs:
        upload(device, seg, data)
    bureau_dir = bureau.service.config.dir
    identity = bureau_dir / "keys" / "bureau-identity.txt"
    copy = bureau_dir / "store" / device.device_id
    run = subprocess.run([sys.executable, "-m", "agent.cli", "verify", str(copy), "--identity", str(identity),
                          "--pubkey", str(device.enrolled.cert_file)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "OK: every signature" in run.stdout and "2 intact" in run.stdout and "decrypted          2" in run.stdout
    assert shutil.which("age"), "the stock age tool is part of the dev setup (./dev installs it)"
    seg = segs[0][0]
    plain = subprocess.run(["age", "-d", "-i", str(identity), str(copy / "segments" / seg["file"])],
                           capture_output=True, timeout=60, check=True).stdout
    assert hashlib.sha256(plain).hexdigest() == seg["sha256_plain"]


def test_completed_upload_waits_for_its_signed_record_before_any_receipt(bureau, device):
    seg, data = segment(device)
    path, last = upload(device, seg, data)  # the ledger has not been sent yet
    assert last.headers["bwc-upload-state"] == "awaiting_ledger"
    pending = receipts(device, seg["segment_id"])[seg["segment_id"]]
    assert pending["status"] == "awaiting_ledger" and "ledger" in pending["detail"]
    assert "receipt" not in pending

    assert send_ledger(device)["receipted"] == [seg["segment_id"]]
    result = receipts(device, seg["segment_id"])[seg["segment_id"]]
    verify_receipt(device, seg, result)


def test_bytes_that_differ_from_the_signed_record_get_no_receipt(bureau, device):
    seg, data = segment(device)
    send_ledger(device)
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 1
    path, last = upload(device, seg, bytes(bad))
    assert last.headers["bwc-upload-state"] == "rejected"
    result = receipts(device, seg["segment_id"])[seg["segment_id"]]
    assert result["status"] == "rejected" and "SHA-256" in result["detail"] and "receipt" not in result
    assert not (bureau.service.config.dir / "store" / device.device_id / "segments" / seg["file"]).exists()
    # the bad bytes are kept for inspection; the device may upload again and get its receipt
    assert (bureau.service.config.dir / "incoming" / path.rsplit("/", 1)[1]).read_bytes() == bytes(bad)
    upload(device, seg, data)
    verify_receipt(device, seg, receipts(device, seg["segment_id"])[seg["segment_id"]])


def test_receipt_is_not_accepted_for_other_bytes_or_from_another_key(bureau, device, tmp_path):
    seg, data = segment(device)
    send_ledger(device)
    upload(device, seg, data)
    result = receipts(device, seg["segment_id"])[seg["segment_id"]]
    with pytest.raises(ReceiptError, match="sha256_cipher"):
        verify_receipt(device, dict(seg, sha256_cipher="0" * 64), result)
    with running_bureau(tmp_path / "other-bureau") as other:
        impostor = ReceiptVerifier(other.service.keys.receipt_public_key)
        with pytest.raises(ReceiptError, match="pinned"):
            impostor.verify(base64.b64decode(result["receipt"]), base64.b64decode(result["sig"]),
                            device=device.device_id, segment_id=seg["segment_id"],
                            sha256_cipher=seg["sha256_cipher"], size=seg["size"])


def test_creation_contradicting_the_signed_record_is_refused(bureau, device):
    seg, _ = segment(device)
    send_ledger(device)
    reply = create(device, seg, length=seg["size"] + 1)
    assert reply.status == 422 and reply.json()["error"] == "record_mismatch"
    reply = create(device, dict(seg, sha256_cipher="ab" * 32))
    assert reply.status == 422


def test_receipts_are_idempotent_and_say_why_a_segment_has_none(bureau, device):
    done, data = segment(device, 0)
    waiting, waiting_data = segment(device, 1)
    never, _ = segment(device, 2)
    send_ledger(device)
    upload(device, done, data)
    path = path_of(create(device, waiting))
    assert patch(device, path, 0, waiting_data[:1000]).status == 204

    ids = [done["segment_id"], waiting["segment_id"], never["segment_id"], "S9-0000"]
    first = device.http.request("GET", "/v1/receipts?segment_id=" + ",".join(ids))
    second = device.http.request("GET", "/v1/receipts?segment_id=" + ",".join(ids))
    assert first.status == second.status == 200 and first.body == second.body
    results = {r["segment_id"]: r for r in first.json()["results"]}
    assert results[done["segment_id"]]["status"] == "receipted"
    assert results[waiting["segment_id"]]["status"] == "uploading"
    assert results[waiting["segment_id"]]["offset"] == 1000
    assert results[never["segment_id"]]["status"] == "not_uploaded"
    assert results["S9-0000"]["status"] == "unknown"


def test_receipted_segment_is_not_uploaded_again(bureau, device):
    seg, data = segment(device)
    send_ledger(device)
    upload(device, seg, data)
    reply = create(device, seg)
    assert reply.status == 409 and reply.json()["error"] == "already_receipted"


def test_upload_as_another_device_is_refused(bureau, device, tmp_path):
    seg, data = segment(device)
    send_ledger(device)
    path = path_of(create(device, seg))
    intruder = make_device(bureau.port, bureau.service.config.dir, "BWC-UPL-0002", tmp_path / "devices")
    reply = create(intruder, seg)
    assert reply.status == 403 and reply.json()["error"] == "not_your_segment"
    assert head(intruder, path).status == 403
    reply = patch(intruder, path, 0, data[:1000])
    assert reply.status == 403 and reply.json()["error"] == "not_your_upload"
    reply = create(intruder, {"segment_id": "S7-0000", "sha256_cipher": "ab" * 32, "size": 10},
                   device=device.device_id)
    assert reply.status == 403 and reply.json()["error"] == "not_your_device"
    assert head(device, path).headers["upload-offset"] == "0"
    intruder.close()


@pytest.mark.parametrize("case", ["no_version", "content_type", "offset", "too_long", "unknown", "algorithm"])
def test_tus_protocol_errors_have_the_specified_status(bureau, device, case):
    seg, data = segment(device, sizes=(3000,))
    path = path_of(create(device, seg))
    if case == "no_version":
        reply = device.http.request("PATCH", path, data, {"Upload-Offset": "0", "Content-Type": STREAM})
        assert reply.status == 412 and reply.headers["tus-version"] == "1.0.0"
    elif case == "content_type":
        assert patch(device, path, 0, data, headers={"Content-Type": "application/octet-stream"}).status == 415
    elif case == "offset":
        reply = patch(device, path, 5, data[5:])
        assert reply.status == 409 and reply.headers["upload-offset"] == "0"
    elif case == "too_long":
        assert patch(device, path, 0, data + b"x").status == 413
    elif case == "unknown":
        assert patch(device, "/v1/uploads/" + "0" * 32, 0, data).status == 404
    elif case == "algorithm":
        assert patch(device, path, 0, data, checksum="md5 " + base64.b64encode(b"x" * 16).decode()).status == 400
    assert head(device, path).headers["upload-offset"] == "0"


def test_creation_needs_length_within_the_maximum_and_the_segment_metadata(tmp_path):
    with running_bureau(tmp_path / "bureau", max_upload_bytes=10_000) as server:
        dev = make_device(server.port, server.service.config.dir, "BWC-UPL-0003", tmp_path / "devices")
        seg, _ = segment(dev, sizes=(3000,))
        assert create(dev, seg, length=10_001).status == 413
        reply = dev.http.request("POST", "/v1/uploads", b"", {**TUS, "Upload-Length": "10"})
        assert reply.status == 400 and "segment_id" in reply.json()["detail"]
        reply = dev.http.request("POST", "/v1/uploads", b"", {**TUS, "Upload-Defer-Length": "1"})
        assert reply.status == 400
        dev.close()


def test_checksum_mismatch_discards_the_chunk_and_a_good_one_is_kept(bureau, device):
    seg, data = segment(device)
    send_ledger(device)
    path = path_of(create(device, seg))
    chunk = data[:50_000]
    wrong = "sha256 " + base64.b64encode(hashlib.sha256(b"other").digest()).decode()
    reply = patch(device, path, 0, chunk, checksum=wrong)
    assert reply.status == 460 and reply.json()["error"] == "checksum_mismatch"
    assert head(device, path).headers["upload-offset"] == "0"
    right = "sha256 " + base64.b64encode(hashlib.sha256(chunk).digest()).decode()
    assert patch(device, path, 0, chunk, checksum=right).headers["upload-offset"] == "50000"
    rest = data[50_000:]
    sha1 = "sha1 " + base64.b64encode(hashlib.sha1(rest).digest()).decode()
    assert patch(device, path, 50_000, rest, checksum=sha1).headers["bwc-upload-state"] == "committed"


def test_creation_with_upload_takes_the_first_bytes_in_the_post(bureau, device):
    seg, data = segment(device)
    send_ledger(device)
    reply = device.http.request("POST", "/v1/uploads", data[:70_000], {
        **TUS, "Upload-Length": str(len(data)), "Content-Type": STREAM,
        "Upload-Metadata": metadata(segment_id=seg["segment_id"], sha256_cipher=seg["sha256_cipher"])})
    assert reply.status == 201 and reply.headers["upload-offset"] == "70000"
    assert patch(device, path_of(reply), 70_000, data[70_000:]).headers["bwc-upload-state"] == "committed"


def test_stalled_upload_is_taken_over_by_the_resuming_request(bureau, device):
    seg, data = segment(device, sizes=(400_000, 400_000))
    send_ledger(device)
    path = path_of(create(device, seg))
    incoming = bureau.service.config.dir / "incoming" / path.rsplit("/", 1)[1]
    sent = 300_000
    stalled = start_patch(device, bureau.port, path, 0, len(data), data[:sent])  # then stops sending, stays open
    wait_for_size(incoming, 200_000)  # the bureau is in the middle of that request
    reply = head(device, path)  # without the takeover this would wait for the stalled request and get 423
    assert reply.status == 200
    offset = int(reply.headers["upload-offset"])
    assert 200_000 <= offset <= sent  # what arrived is kept (no checksum): nothing is sent twice
    assert patch(device, path, offset, data[offset:]).headers["bwc-upload-state"] == "committed"
    verify_receipt(device, seg, receipts(device, seg["segment_id"])[seg["segment_id"]])
    stalled.close()


def test_cut_request_with_a_checksum_keeps_nothing_of_its_body(bureau, device):
    seg, data = segment(device)
    send_ledger(device)
    path = path_of(create(device, seg))
    assert patch(device, path, 0, data[:10_000]).status == 204
    checksum = "sha256 " + base64.b64encode(hashlib.sha256(data[10_000:]).digest()).decode()
    cut = start_patch(device, bureau.port, path, 10_000, len(data) - 10_000, data[10_000:100_000], checksum)
    cut.close()
    assert head(device, path).headers["upload-offset"] == "10000"


def test_upload_resumes_after_the_bureau_is_killed_mid_upload(tmp_path):
    bureau_dir = tmp_path / "bureau"
    first = BureauProcess(bureau_dir)
    port = first.port
    device = make_device(port, bureau_dir, "BWC-UPL-0004", tmp_path / "devices")
    try:
        seg, data = segment(device, sizes=(1_500_000, 1_500_000))
        send_ledger(device)
        path = path_of(create(device, seg))
        acked = 1_000_000
        assert patch(device, path, 0, data[:acked]).status == 204
        incoming = bureau_dir / "incoming" / path.rsplit("/", 1)[1]
        conn = start_patch(device, port, path, acked, len(data) - acked, data[acked:acked + 1_000_000])
        wait_for_size(incoming, acked + 500_000)  # the bureau is writing the second request when it dies
        first.kill()
        conn.close()

        second = BureauProcess(bureau_dir, port=port)
        try:
            offset = int(head(device, path).headers["upload-offset"])
            assert acked <= offset <= acked + 1_000_000  # acknowledged bytes survived; at most one request re-sent
            if COMMIT_EVERY_BYTES > 1_000_000:
                assert offset == acked  # the cut request was never made durable, so it is simply re-sent
            reply = patch(device, path, offset, data[offset:])
            assert reply.status == 204 and reply.headers["bwc-upload-state"] == "committed"
            verify_receipt(device, seg, receipts(device, seg["segment_id"])[seg["segment_id"]])
        finally:
            second.stop()
        stored = bureau_dir / "store" / device.device_id / "segments" / seg["file"]
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == seg["sha256_cipher"]
    finally:
        first.kill()
        device.close()


def test_official_python_tus_client_uploads_to_the_bureau(bureau, device, monkeypatch):
    from tusclient import client as tusclient  # tuspy, the official Python tus client (dev dependency)

    seg, data = segment(device, sizes=(200_000, 200_000))
    send_ledger(device)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bureau.service.config.dir / "ca.pem"))
    client = tusclient.TusClient(f"{bureau.base_url}/v1/uploads",
                                 client_cert=(str(device.enrolled.cert_file), str(device.enrolled.key_file)))
    uploader = client.uploader(file_path=str(device.store.segments_dir / seg["file"]), chunk_size=128 * 1024,
                               metadata={"segment_id": seg["segment_id"], "sha256_cipher": seg["sha256_cipher"]},
                               upload_checksum=True)  # tuspy sends sha1 per chunk
    uploader.upload()
    assert uploader.offset == len(data)
    assert uploader.request.response_headers["bwc-upload-state"] == "committed"
    verify_receipt(device, seg, receipts(device, seg["segment_id"])[seg["segment_id"]])
