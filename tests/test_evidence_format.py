"""The evidence format against independent implementations: age CLI, pyrage, openssl, rfc8785 (R5, R22)."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess

import pyrage
import pytest
import rfc8785

from agent.evidence.age import AgeDecryptor, AgeError, Identity, Recipient, encrypt_bytes
from agent.evidence.canonical import CanonicalJSONError, canonical_bytes, parse_canonical
from agent.evidence.signing import public_key_pem
from agent.storage.segment_writer import CHUNK_SIZE, SegmentWriter, free_box
from tests.conftest import write_segment

SAMPLES = [
    {"b": 1, "a": [True, False, None], "c": {"z": "x", "é": "ü", "\u20ac": "€", "\U0001f600": "😀"}},
    {"ctrl": "a\u0001b\u001fc\td\ne\"f\\g\u2028h\u007f", "n": -9007199254740991, "m": 0, "k": []},
    {"\u00e9": 1, "e\u0301": 2, "\U0001f600": 3, "\uff01": 4, "aa": 5, "a": 6, "": 7},
]


@pytest.mark.parametrize("value", SAMPLES)
def test_canonical_json_matches_independent_rfc8785_implementation(value):
    assert canonical_bytes(value) == rfc8785.dumps(value)
    assert parse_canonical(canonical_bytes(value)) == value


@pytest.mark.parametrize("bad", [{"x": 1.5}, {"x": 2**53}, {1: "a"}, {"x": "\ud800"}, {"x": object()}])
def test_canonical_json_refuses_values_that_cannot_be_signed(bad):
    with pytest.raises(CanonicalJSONError):
        canonical_bytes(bad)


def test_parse_canonical_refuses_non_canonical_text():
    with pytest.raises(CanonicalJSONError):
        parse_canonical(b'{"b":1, "a":2}')
    with pytest.raises(CanonicalJSONError):
        parse_canonical(b'{"a":1,"a":2}')


@pytest.mark.parametrize("size", [0, 1, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 3 * CHUNK_SIZE + 17])
def test_age_files_interoperate_with_age_cli_and_pyrage(tmp_path, size, identity_file, bureau_identity):
    data = os.urandom(size)
    other = Identity.generate()
    path = tmp_path / "x.age"
    path.write_bytes(encrypt_bytes(data, [other.recipient, bureau_identity.recipient]))
    out = subprocess.run(["age", "-d", "-i", str(identity_file), str(path)], capture_output=True, check=True)
    assert out.stdout == data
    assert pyrage.decrypt(path.read_bytes(), [pyrage.x25519.Identity.from_str(str(bureau_identity))]) == data
    # and the other direction: the stock tool encrypts, our reader decrypts
    cli = subprocess.run(["age", "-r", str(bureau_identity.recipient)], input=data, capture_output=True, check=True)
    assert b"".join(AgeDecryptor(bureau_identity).chunks(io.BytesIO(cli.stdout))) == data


def test_keys_round_trip_with_age_keygen(tmp_path):
    subprocess.run(["age-keygen", "-o", str(tmp_path / "k.txt")], capture_output=True, check=True)
    ident = Identity.load(tmp_path / "k.txt")
    pub = subprocess.run(["age-keygen", "-y", str(tmp_path / "k.txt")], capture_output=True, check=True, text=True)
    assert str(ident.recipient) == pub.stdout.strip()
    assert Recipient.parse(pub.stdout) == ident.recipient
    text = pub.stdout.strip()
    with pytest.raises(AgeError):
        Recipient.parse(text[:-1] + ("q" if text[-1] != "q" else "p"))  # one character off: bad checksum


def test_segment_decrypts_with_stock_age_to_exactly_the_fragments_plus_free_boxes(tmp_path, store, identity_file):
    record, frags = write_segment(store, "S1", 1)
    body = record.fields["body"]
    path = store.segments_dir / body["file"]
    plain = subprocess.run(["age", "-d", "-i", str(identity_file), str(path)], capture_output=True,
                           check=True).stdout
    # Each fragment starts at a chunk boundary and is followed by a free box up to the next one.
    offset = 0
    for frag in frags:
        assert plain[offset:offset + len(frag)] == frag
        offset += len(frag)
        pad = -offset % CHUNK_SIZE
        if pad:
            if pad < 8:
                pad += CHUNK_SIZE
            assert plain[offset:offset + 8] == free_box(pad)[:8]
            offset += pad
    assert plain[offset:] == free_box(8)
    assert body["plain_size"] == len(plain) and body["size"] == path.stat().st_size
    assert body["fragments"] == 3 and body["video_frames"] == 90 and not body["truncated"]


def test_fragment_is_on_disk_before_write_fragment_returns(tmp_path, bureau_identity):
    writer = SegmentWriter(tmp_path / "s.age", [bureau_identity.recipient])
    data = os.urandom(100_000)
    writer.write_fragment(data)
    on_disk = writer.part_path.read_bytes()
    got = b"".join(AgeDecryptor(bureau_identity).chunks(io.BytesIO(on_disk), allow_truncated=True))
    assert got[: len(data)] == data


def test_record_signature_verifies_with_openssl(tmp_path, store, signer):
    record, _ = write_segment(store, "S1", 1)
    (tmp_path / "rec.json").write_bytes(record.data)
    (tmp_path / "rec.sig").write_bytes(record.sig)
    (tmp_path / "pub.pem").write_bytes(public_key_pem(signer.public_key()))
    ok = subprocess.run(["openssl", "dgst", "-sha256", "-verify", str(tmp_path / "pub.pem"), "-signature",
                         str(tmp_path / "rec.sig"), str(tmp_path / "rec.json")], capture_output=True, text=True)
    assert ok.returncode == 0 and "Verified OK" in ok.stdout
    (tmp_path / "rec.json").write_bytes(record.data.replace(b'"segment"', b'"Segment"'))
    bad = subprocess.run(["openssl", "dgst", "-sha256", "-verify", str(tmp_path / "pub.pem"), "-signature",
                          str(tmp_path / "rec.sig"), str(tmp_path / "rec.json")], capture_output=True, text=True)
    assert bad.returncode != 0


def test_export_lines_hold_the_exact_signed_bytes(tmp_path, store):
    write_segment(store, "S1", 1)
    n = store.ledger.export_jsonl(tmp_path / "ledger.jsonl")
    lines = (tmp_path / "ledger.jsonl").read_bytes().splitlines()
    assert n == len(lines) == 2
    for line, rec in zip(lines, store.ledger.records(), strict=True):
        obj = json.loads(line)
        assert canonical_bytes(obj["rec"]) == rec.data
        assert base64.b64decode(obj["sig"]) == rec.sig
