"""Enrollment, mTLS and time at the bureau: a device gets its certificate only with a valid one-time token (R18),
and only that certificate opens the device endpoints (R23). Real HTTPS on 127.0.0.1."""

from __future__ import annotations

import json
import ssl
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from agent.evidence.age import Recipient
from agent.evidence.signing import key_id, load_public_key
from agent.storage.keys import PemFileSigner
from bureau.__main__ import main as bureau_main
from bureau.db import SqliteBureauDatabase
from bureau.enrollment import Enrollment, hash_token
from bureau.keys import BureauKeys
from bureau.testing import DeviceHttp, make_csr, running_bureau

DEVICE = "BWC-ENR-0001"


@pytest.fixture
def bureau(tmp_path):
    with running_bureau(tmp_path / "bureau") as server:
        yield server


def mint(bureau_dir, device_id=DEVICE, ttl_s=3600):
    db = SqliteBureauDatabase(bureau_dir / "bureau.db")
    try:
        return Enrollment(BureauKeys.load_or_create(bureau_dir), db, 1).mint_token(device_id, ttl_s).token
    finally:
        db.close()


@pytest.fixture
def key_file(tmp_path):
    return PemFileSigner.generate(tmp_path / "device" / "key.pem").path


def anonymous(server):
    return DeviceHttp("127.0.0.1", server.port, server.service.config.dir / "ca.pem")


def test_enrollment_issues_a_ca_signed_certificate_and_the_keys_to_pin(bureau, key_file, tmp_path):
    bureau_dir = bureau.service.config.dir
    token = mint(bureau_dir)
    reply = anonymous(bureau).post_json("/v1/enroll", {"token": token, "csr": make_csr(key_file, DEVICE)})
    assert reply.status == 201, reply.body
    body = reply.json()

    cert = x509.load_pem_x509_certificate(body["certificate"].encode())
    ca = x509.load_pem_x509_certificate(body["ca_certificate"].encode())
    cert.verify_directly_issued_by(ca)
    assert ca == x509.load_pem_x509_certificate((bureau_dir / "ca.pem").read_bytes())
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == DEVICE
    device_key = PemFileSigner.load(key_file).public_key()
    assert key_id(cert.public_key()) == key_id(device_key) == body["device_key_id"]
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    receipt_key = load_public_key(body["receipt_public_key"].encode())
    assert key_id(receipt_key) == body["receipt_key_id"] == bureau.service.keys.receipt_key_id
    assert receipt_key.public_numbers() != ca.public_key().public_numbers()  # separate keys, separate jobs
    assert [str(Recipient.parse(r)) for r in body["age_recipients"]] == [str(bureau.service.keys.identity.recipient)]
    assert body["endpoints"]["uploads"] == f"{bureau.base_url}/v1/uploads"
    assert body["endpoints"]["mqtt"]["topic_prefix"] == f"bwc/v1/dev/{DEVICE}/"

    cert_file = tmp_path / "device.crt"
    cert_file.write_text(body["certificate"])
    device = DeviceHttp("127.0.0.1", bureau.port, bureau_dir / "ca.pem", cert_file, key_file)
    head = device.request("GET", "/v1/ledger/head")
    assert head.status == 200 and head.json() == {"device_id": DEVICE, "head_seq": 0, "head_hash": "0" * 64}


def test_token_is_stored_only_as_its_hash(bureau):
    bureau_dir = bureau.service.config.dir
    token = mint(bureau_dir)
    raw = (bureau_dir / "bureau.db").read_bytes() + b"".join(p.read_bytes() for p in bureau_dir.glob("bureau.db-*"))
    assert token.encode() not in raw
    assert bureau.service.db.get_token(hash_token(token)).device_id == DEVICE


def test_wrong_token_is_refused_with_a_clear_error(bureau, key_file):
    mint(bureau.service.config.dir)
    reply = anonymous(bureau).post_json("/v1/enroll", {"token": "not-a-token", "csr": make_csr(key_file, DEVICE)})
    assert reply.status == 403
    assert reply.json()["error"] == "invalid_token" and "not valid" in reply.json()["detail"]
    assert bureau.service.db.get_device(DEVICE) is None


def test_reused_token_is_refused_and_the_first_certificate_stands(bureau, key_file, tmp_path):
    token = mint(bureau.service.config.dir)
    first = anonymous(bureau).post_json("/v1/enroll", {"token": token, "csr": make_csr(key_file, DEVICE)})
    assert first.status == 201
    other_key = PemFileSigner.generate(tmp_path / "other" / "key.pem").path
    again = anonymous(bureau).post_json("/v1/enroll", {"token": token, "csr": make_csr(other_key, DEVICE)})
    assert again.status == 403 and again.json()["error"] == "token_used"
    assert "works once" in again.json()["detail"]
    assert bureau.service.db.get_device(DEVICE).cert_serial == first.json()["certificate_serial"]


def test_identical_retry_of_a_used_token_returns_the_same_certificate_and_issues_none(bureau, key_file):
    token = mint(bureau.service.config.dir)
    request = {"token": token, "csr": make_csr(key_file, DEVICE)}
    first = anonymous(bureau).post_json("/v1/enroll", request)
    retry = anonymous(bureau).post_json("/v1/enroll", {"token": token, "csr": make_csr(key_file, DEVICE)})
    assert first.status == 201 and retry.status == 200  # a provisioning run that lost the first response
    assert retry.json()["replayed"] is True and first.json()["replayed"] is False
    assert retry.json()["certificate"] == first.json()["certificate"]
    assert bureau.service.db.get_device(DEVICE).cert_serial == first.json()["certificate_serial"]


def test_expired_token_is_refused(bureau, key_file):
    token = "an-old-token-minted-two-days-ago"
    now = time.time_ns() // 1000
    bureau.service.db.add_token(hash_token(token), DEVICE, now - 2 * 86_400_000_000, now - 86_400_000_000)
    reply = anonymous(bureau).post_json("/v1/enroll", {"token": token, "csr": make_csr(key_file, DEVICE)})
    assert reply.status == 403 and reply.json()["error"] == "token_expired"


def test_token_is_only_good_for_the_device_id_it_was_minted_for(bureau, key_file):
    token = mint(bureau.service.config.dir, device_id=DEVICE)
    reply = anonymous(bureau).post_json("/v1/enroll", {"token": token, "csr": make_csr(key_file, "BWC-OTHER")})
    assert reply.status == 400 and reply.json()["error"] == "bad_csr"
    assert "BWC-OTHER" in reply.json()["detail"]
    # the token was not consumed by the refused request
    ok = anonymous(bureau).post_json("/v1/enroll", {"token": token, "csr": make_csr(key_file, DEVICE)})
    assert ok.status == 201


def test_csr_for_a_non_p256_key_is_refused(bureau, tmp_path):
    from cryptography.hazmat.primitives import hashes, serialization

    key = ec.generate_private_key(ec.SECP384R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, DEVICE)]))
           .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode())
    reply = anonymous(bureau).post_json("/v1/enroll", {"token": mint(bureau.service.config.dir), "csr": csr})
    assert reply.status == 400 and "P-256" in reply.json()["detail"]


def test_reenrollment_needs_a_fresh_token_and_supersedes_the_old_certificate(bureau, key_file, tmp_path):
    bureau_dir = bureau.service.config.dir
    ca = bureau_dir / "ca.pem"
    old = anonymous(bureau).post_json("/v1/enroll", {"token": mint(bureau_dir), "csr": make_csr(key_file, DEVICE)})
    old_cert = tmp_path / "old.crt"
    old_cert.write_text(old.json()["certificate"])
    new = anonymous(bureau).post_json("/v1/enroll", {"token": mint(bureau_dir), "csr": make_csr(key_file, DEVICE)})
    assert new.status == 201
    new_cert = tmp_path / "new.crt"
    new_cert.write_text(new.json()["certificate"])

    stale = DeviceHttp("127.0.0.1", bureau.port, ca, old_cert, key_file).request("GET", "/v1/ledger/head")
    assert stale.status == 403 and stale.json()["error"] == "certificate_superseded"
    fresh = DeviceHttp("127.0.0.1", bureau.port, ca, new_cert, key_file).request("GET", "/v1/ledger/head")
    assert fresh.status == 200


def test_device_endpoints_require_the_device_certificate(bureau, tmp_path):
    plain = anonymous(bureau)
    for method, path in [("GET", "/v1/ledger/head"), ("POST", "/v1/ledger"), ("GET", "/v1/receipts?segment_id=x")]:
        reply = plain.request(method, path, b"" if method == "POST" else None)
        assert reply.status == 401 and reply.json()["error"] == "client_certificate_required", (method, path)


def test_certificate_from_another_ca_fails_the_tls_handshake(bureau, tmp_path, key_file):
    rogue = BureauKeys.load_or_create(tmp_path / "rogue-bureau")
    cert = rogue.issue_device_cert(make_csr(key_file, DEVICE).encode(), DEVICE, 30)
    from cryptography.hazmat.primitives import serialization

    cert_file = tmp_path / "rogue.crt"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    client = DeviceHttp("127.0.0.1", bureau.port, bureau.service.config.dir / "ca.pem", cert_file, key_file)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        client.request("GET", "/v1/ledger/head")


def test_time_exchange_gives_the_four_timestamps_for_the_offset(bureau):
    t1 = time.time_ns() // 1000
    reply = anonymous(bureau).post_json("/v1/time", {"t1_us": t1})
    t4 = time.time_ns() // 1000
    assert reply.status == 200 and reply.headers["cache-control"] == "no-store"
    body = reply.json()
    assert body["t1_us"] == t1
    assert t1 <= body["t2_us"] <= body["t3_us"] <= t4  # one machine, one clock
    offset = ((body["t2_us"] - t1) + (body["t3_us"] - t4)) // 2
    assert abs(offset) <= t4 - t1


def test_time_exchange_without_t1_is_a_clear_error(bureau):
    reply = anonymous(bureau).post_json("/v1/time", {"t1": 1.5})
    assert reply.status == 400 and "t1_us" in reply.json()["detail"]


def test_token_command_mints_a_usable_token(tmp_path, capsys, key_file):
    bureau_dir = tmp_path / "bureau"
    assert bureau_main(["token", "--dir", str(bureau_dir), "--device-id", DEVICE, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["device_id"] == DEVICE and out["ca_certificate"].endswith("ca.pem")
    with running_bureau(bureau_dir) as server:
        reply = anonymous(server).post_json("/v1/enroll", {"token": out["token"], "csr": make_csr(key_file, DEVICE)})
        assert reply.status == 201
    assert bureau_main(["token", "--dir", str(bureau_dir), "--device-id", "bad id/.."]) == 2


def test_bureau_keys_are_created_once_and_private_keys_are_owner_only(tmp_path):
    first = BureauKeys.load_or_create(tmp_path / "b")
    second = BureauKeys.load_or_create(tmp_path / "b")
    assert first.ca_cert == second.ca_cert and first.receipt_key_id == second.receipt_key_id
    assert str(first.identity) == str(second.identity)
    for private in (tmp_path / "b" / "keys").iterdir():
        assert private.stat().st_mode & 0o077 == 0, private


def test_garbage_on_the_wire_gets_a_clear_error_and_the_bureau_keeps_serving(bureau):
    import os
    import socket

    with socket.create_connection(("127.0.0.1", bureau.port), timeout=10) as raw:  # not even TLS
        raw.sendall(os.urandom(2000))
    context = ssl.create_default_context(cafile=str(bureau.service.config.dir / "ca.pem"))
    with context.wrap_socket(socket.create_connection(("127.0.0.1", bureau.port), timeout=10),
                             server_hostname="127.0.0.1") as tls:
        tls.sendall(b"POST /v1/enroll HTTP/1.1\r\nHost: x\r\nContent-Length: many\r\n\r\n")
        reply = b""
        while chunk := tls.recv(4096):  # the bureau closes this connection after answering
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 400") and b"bad_content_length" in reply
    client = anonymous(bureau)
    assert client.request("POST", "/v1/enroll", b"{not json", {}).json()["error"] == "bad_json"
    assert client.request("GET", "/v1/nowhere").status == 404
    assert client.request("GET", "/v1/bureau").status == 200
