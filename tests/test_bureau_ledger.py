"""Ledger ingest at the bureau: batches join the chain the bureau holds, checked by the shared verifier;
gaps, forks, foreign keys and other devices' records are refused and nothing of them is stored (R5, R22)."""

from __future__ import annotations

import shutil

import pytest

from agent.clock import SystemClock
from agent.evidence.records import SignedRecord
from agent.storage.keys import PemFileSigner
from agent.storage.store import EvidenceStore
from bureau.testing import make_device, running_bureau
from tests.conftest import write_segment


@pytest.fixture
def bureau(tmp_path):
    with running_bureau(tmp_path / "bureau") as server:
        yield server


@pytest.fixture
def device(bureau, tmp_path):
    dev = make_device(bureau.port, bureau.service.config.dir, "BWC-LED-0001", tmp_path / "devices")
    yield dev
    dev.close()


def stored_ledger(bureau, device_id):
    return (bureau.service.config.dir / "store" / device_id / "ledger.jsonl").read_bytes()


def post(device, body):
    return device.http.request("POST", "/v1/ledger", body, {"Content-Type": "application/x-ndjson"})


def test_batches_continue_the_chain_across_uploads(bureau, device):
    write_segment(device.store, "S1", 0, (2000,))
    first = post(device, device.ledger_batch(1))
    assert first.status == 200, first.body
    assert first.json()["accepted"] == 2 and first.json()["segments_recorded"] == ["S1-0000"]
    head = first.json()["head_seq"]

    write_segment(device.store, "S1", 1, (2000,))
    device.store.ledger.append("marker", {"session_id": "S1", "step": "inspection"})
    second = post(device, device.ledger_batch(head + 1))
    assert second.status == 200, second.body
    assert second.json()["accepted"] == 2 and second.json()["head_seq"] == device.store.ledger.head()[0]
    assert second.json()["head_hash"] == device.store.ledger.head()[1]
    assert stored_ledger(bureau, device.device_id) == device.ledger_batch(1)
    assert device.http.request("GET", "/v1/ledger/head").json()["head_seq"] == device.store.ledger.head()[0]


def test_resending_records_the_bureau_holds_is_harmless(bureau, device):
    write_segment(device.store, "S1", 0, (2000,))
    assert post(device, device.ledger_batch(1)).status == 200
    device.store.ledger.append("marker", {"session_id": "S1", "step": "inspection"})
    again = post(device, device.ledger_batch(1))  # a response lost in transit: the device resends everything
    assert again.status == 200
    assert again.json()["already_held"] == 2 and again.json()["accepted"] == 1
    assert stored_ledger(bureau, device.device_id) == device.ledger_batch(1)


def test_gap_is_refused_with_the_seq_to_send_from(bureau, device):
    for i in range(3):
        write_segment(device.store, "S1", i, (1000,))
    first_two = b"".join(r.to_line() for r in list(device.store.ledger.records(1))[:2])
    assert post(device, first_two).status == 200
    reply = post(device, device.ledger_batch(4))
    assert reply.status == 409
    assert reply.json()["error"] == "gap" and reply.json()["expected_seq"] == 3
    assert device.http.request("GET", "/v1/ledger/head").json()["head_seq"] == 2


def test_fork_is_refused_and_nothing_of_it_is_stored(bureau, device, tmp_path):
    write_segment(device.store, "S1", 0, (1000,))
    assert post(device, device.ledger_batch(1)).status == 200
    held = stored_ledger(bureau, device.device_id)
    # A copy of the device's data taken now, then both go on differently: same key, same seqs, other records.
    twin_dir = tmp_path / "twin"
    shutil.copytree(device.store.data_dir, twin_dir)
    twin = EvidenceStore(twin_dir, device.device_id, PemFileSigner.load(device.enrolled.key_file),
                         device.store.recipients, SystemClock())
    head = device.store.ledger.head()[0]
    device.store.ledger.append("marker", {"session_id": "S1", "step": "inspection"})
    twin.ledger.append("marker", {"session_id": "S1", "step": "sampling"})
    twin.ledger.append("marker", {"session_id": "S1", "step": "sampling"})
    assert post(device, device.ledger_batch(head + 1)).status == 200

    twin_batch = b"".join(r.to_line() for r in twin.ledger.records(head + 1))
    reply = post(device, twin_batch)
    assert reply.status == 409 and reply.json()["error"] == "fork"
    assert reply.json()["seq"] == head + 1 and "forked" in reply.json()["detail"]
    # the twin's second record alone does not chain to what the bureau holds either
    lone = b"".join(r.to_line() for r in twin.ledger.records(head + 2))
    reply = post(device, lone)
    assert reply.status == 409 and reply.json()["error"] == "fork"
    assert stored_ledger(bureau, device.device_id) == held + device.ledger_batch(head + 1)
    twin.close()


def test_records_signed_by_another_key_are_refused(bureau, device, tmp_path):
    write_segment(device.store, "S1", 0, (1000,))
    records = list(device.store.ledger.records(1))
    assert post(device, b"".join(r.to_line() for r in records[:1])).status == 200
    stranger = PemFileSigner.generate(tmp_path / "stranger.pem")
    forged = SignedRecord(records[1].data, stranger.sign(records[1].data))
    reply = post(device, forged.to_line())
    assert reply.status == 422 and reply.json()["error"] == "ledger_rejected"
    assert any("signature" in p for p in reply.json()["problems"])
    assert device.http.request("GET", "/v1/ledger/head").json()["head_seq"] == 1


def test_ledger_whose_genesis_key_is_not_the_enrolled_key_is_refused(bureau, tmp_path):
    device = make_device(bureau.port, bureau.service.config.dir, "BWC-LED-0002", tmp_path / "devices")
    other = EvidenceStore(tmp_path / "other", "BWC-LED-0002", PemFileSigner.generate(tmp_path / "k2.pem"),
                          device.store.recipients, SystemClock())
    reply = post(device, b"".join(r.to_line() for r in other.ledger.records(1)))
    assert reply.status == 422
    assert any("pinned" in p for p in reply.json()["problems"])
    other.close()
    device.close()


def test_a_device_cannot_upload_another_devices_ledger(bureau, device, tmp_path):
    other = make_device(bureau.port, bureau.service.config.dir, "BWC-LED-0003", tmp_path / "devices")
    reply = post(other, device.ledger_batch(1))
    assert reply.status == 403 and reply.json()["error"] == "wrong_device"
    assert other.http.request("GET", "/v1/ledger/head").json()["head_seq"] == 0
    other.close()


def test_damaged_batch_is_refused_with_the_line_that_is_wrong(bureau, device):
    write_segment(device.store, "S1", 0, (1000,))
    lines = device.ledger_batch(1).splitlines(keepends=True)
    reply = post(device, lines[0] + b'{"rec":{"v":1},"sig":"AAAA"}\n')
    assert reply.status == 400 and reply.json()["error"] == "malformed_record" and reply.json()["line"] == 2
    tampered = lines[1].replace(b'"truncated":false', b'"truncated":true')
    reply = post(device, lines[0] + tampered)
    assert reply.status == 422
    assert device.http.request("GET", "/v1/ledger/head").json()["head_seq"] == 0


def test_oversized_batch_is_refused(tmp_path):
    with running_bureau(tmp_path / "bureau", max_ledger_batch_bytes=1000) as server:
        dev = make_device(server.port, server.service.config.dir, "BWC-LED-0004", tmp_path / "devices")
        write_segment(dev.store, "S1", 0, (1000,))
        reply = post(dev, dev.ledger_batch(1))
        assert reply.status == 413 and reply.json()["error"] == "body_too_large"
        dev.close()


def test_ledger_copy_torn_by_a_crash_is_completed_at_restart(tmp_path):
    bureau_dir = tmp_path / "bureau"
    with running_bureau(bureau_dir) as server:
        dev = make_device(server.port, bureau_dir, "BWC-LED-0005", tmp_path / "devices")
        write_segment(dev.store, "S1", 0, (1000,))
        assert post(dev, dev.ledger_batch(1)).status == 200
    copy = bureau_dir / "store" / dev.device_id / "ledger.jsonl"
    whole = copy.read_bytes()
    with open(copy, "r+b") as fh:  # the state a power cut leaves mid-append: the last line half written
        fh.truncate(len(whole) - 40)
    with running_bureau(bureau_dir):
        assert copy.read_bytes() == whole == dev.ledger_batch(1)
    dev.close()
