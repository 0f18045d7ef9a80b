"""The verifier reports hostile or damaged input and never crashes on it (R5: a damaged ledger gives a clear
report; R22: nothing outside the evidence is ever touched because a record names it).

Hostile records here are validly signed by the device's own key and chained in place, so only their
structure is wrong: whatever the verifier says about them comes from its structural checks, not from a
broken signature or chain.
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.evidence.canonical import canonical_bytes
from agent.evidence.records import BODY_SCHEMAS, SignedRecord
from agent.evidence.verify import Report, Verifier
from agent.storage.keys import PemFileSigner
from tests.conftest import DEVICE_ID, write_segment

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - the fuzz tests below need hypothesis (dev extra)
    given = None


@pytest.fixture
def bundle(tmp_path, store):
    """A bundle of device_init + one closed segment (S1-0000)."""
    write_segment(store, "S1", 0)
    out = tmp_path / "bundle"
    shutil.copytree(store.segments_dir, out / "segments")
    store.ledger.export_jsonl(out / "ledger.jsonl")
    return out


def _envelope(seq: int, prev: str, rtype: Any, body: Any) -> dict[str, Any]:
    return {"v": 1, "device": DEVICE_ID, "seq": seq, "prev": prev, "type": rtype, "wall_us": 1_750_000_000_000_000,
            "mono_us": 5_000_000, "clock": {"source": "system", "quality": "synced"}, "body": body}


def append_signed(bundle: Path, signer: PemFileSigner, make: Callable[[int, str], dict[str, Any] | bytes]) -> int:
    """Append one record `make(seq, prev)` (a dict, or raw record bytes), signed with the device key and
    chained to the bundle's last record; returns its seq."""
    path = bundle / "ledger.jsonl"
    lines = path.read_bytes().splitlines()
    seq = len(lines) + 1  # one record per line, from seq 1
    made = make(seq, SignedRecord.from_line(lines[-1]).hash)
    data = made if isinstance(made, bytes) else canonical_bytes(made)
    with open(path, "ab") as fh:
        fh.write(SignedRecord(data, signer.sign(data)).to_line())
    return seq


def problems_of(path: Path, **kwargs: Any) -> tuple[Report, list[str]]:
    report = Verifier(**kwargs).verify_path(path)
    return report, [str(p) for p in report.problems]


def segment_body(**changes: Any) -> dict[str, Any]:
    body = {"segment_id": "S9-0000", "session_id": "S9", "index": 0, "file": "S9-0000.age", "size": 0,
            "sha256_cipher": "ab" * 32, "plain_size": None, "sha256_plain": None, "chunks": 0, "complete_size": 0,
            "sha256_complete": "ab" * 32, "fragments": 0, "first_pts_us": None, "last_pts_us": None,
            "video_frames": 0, "audio_samples": 0, "recipients": [], "truncated": True, "recovered": True,
            "sidecars": []}
    body.update(changes)
    return body


def purge_body(**changes: Any) -> dict[str, Any]:
    body = {"segment_id": "S1-0000", "file": "S1-0000.age", "sha256_cipher": "ab" * 32,
            "receipt_sha256": "cd" * 32, "reason": "space_needed"}
    body.update(changes)
    return body


def _with(rtype: Any = "boot", body: Any = None, **envelope: Any) -> Callable[[int, str], dict[str, Any]]:
    def make(seq: int, prev: str) -> dict[str, Any]:
        rec = _envelope(seq, prev, rtype, body if body is not None else
                        {"boot_id": "b1", "software": "x", "previous_shutdown": "clean"})
        for key, value in envelope.items():
            if key == "clock_quality":
                rec["clock"] = {"source": "system", "quality": value}
            elif key == "clock_source":
                rec["clock"] = {"source": value, "quality": "synced"}
            else:
                rec[key] = value
        return rec

    return make


VALID_INIT = {"public_key": "", "key_id": "0" * 16, "recipients": [], "software": "x"}

# (name, record maker, text the problem about that record must contain)
HOSTILE_RECORDS = [
    ("type is a list", _with(["segment"]), "malformed record: type must be a string"),
    ("type is an object", _with({"t": 1}), "malformed record: type must be a string"),
    ("clock.quality is a list", _with(clock_quality=["synced"]), "malformed record: clock must be"),
    ("clock.quality unknown", _with(clock_quality="perfect"), "malformed record: clock must be"),
    ("clock.source is a number", _with(clock_source=7), "malformed record: clock must be"),
    ("clock is a list", _with(clock=["system", "synced"]), "malformed record: clock must be"),
    ("v is true", _with(v=True), "malformed record: v must be the integer 1, got True"),
    ("v is 2", _with(v=2), "malformed record: v must be the integer 1"),
    ("seq is true", _with(seq=True), "malformed record: seq must be an integer"),
    ("wall_us is a string", _with(wall_us="now"), "malformed record: wall_us must be an integer"),
    ("mono_us is null", _with(mono_us=None), "malformed record: mono_us must be an integer"),
    ("device is a number", _with(device=1), "malformed record: device must be a string"),
    ("device is null", _with(device=None), "malformed record: device must be a string"),
    ("prev in upper case", _with(prev="AB" * 32), "malformed record: prev must be 64 lowercase hex digits"),
    ("prev is a list", _with(prev=["0" * 64]), "malformed record: prev must be 64 lowercase hex digits"),
    ("seq is zero", _with(seq=0), "malformed record: seq starts at 1"),
    ("body is a list", _with("segment", ["file"]), "malformed record: body must be an object, got list"),
    ("body is a string", _with("boot", "boot"), "malformed record: body must be an object, got str"),
    ("device_init body is a list", _with("device_init", [1, 2]), "malformed record: body must be an object"),
    ("device_init body of the wrong shape", _with("device_init", {"public_key": 5}), "device_init body invalid"),
    ("device_init after seq 1", _with("device_init", VALID_INIT), "device_init appears only at seq 1"),
    ("unknown type", _with("nope", {}), "unknown record type 'nope'"),
    ("type with a newline", _with("segment\n", {}), "unknown record type 'segment\\n'"),
    ("segment body without file", _with("segment", {k: v for k, v in segment_body().items() if k != "file"}),
     "segment body invalid: file: Field required"),
    ("segment file leaving segments/", _with("segment", segment_body(file="../x.age")),
     "segment body invalid: file: String should match pattern"),
    ("segment file that is absolute", _with("segment", segment_body(file="/tmp/x.age")),
     "segment body invalid: file: String should match pattern"),
    ("segment file of another segment", _with("segment", segment_body(file="S1-0000.age")),
     "must be the segment id plus .age"),
    ("segment file is a number", _with("segment", segment_body(file=3)), "segment body invalid: file"),
    ("sidecar not named after its segment", _with("segment", segment_body(sidecars=[
        {"kind": "gps_track", "file": "S1-0000.gps.age", "size": 1, "sha256_cipher": "ab" * 32}])),
     "sidecar file 'S1-0000.gps.age' must be 'S9-0000.gps.age'"),
    ("sidecar with a path", _with("segment", segment_body(sidecars=[
        {"kind": "gps_track", "file": "../S9-0000.gps.age", "size": 1, "sha256_cipher": "ab" * 32}])),
     "sidecars.0.file: String should match pattern"),
    ("purge body without file", _with("purge", {k: v for k, v in purge_body().items() if k != "file"}),
     "purge body invalid: file: Field required"),
    ("purge of a path outside", _with("purge", purge_body(file="../../etc/passwd")), "purge body invalid: file"),
    ("purge of another segment's file", _with("purge", purge_body(segment_id="S2-0000")),
     "must be the segment id plus .age"),
    ("purge without a receipt", _with("purge", purge_body()), "purge names a different ciphertext hash"),
    ("receipt for an unknown segment", _with("receipt", {"segment_id": "S7-0000", "ledger_upto_seq": None,
                                                         "receipt_sha256": "cd" * 32, "bureau_key_id": "k"}),
     "receipt for segment S7-0000 which has no earlier segment record"),
    ("identity key_change with an unreadable key", _with("key_change", {
        "kind": "identity", "key_ids": [], "detail": "", "public_key": "AAAA", "recipients": None}),
     "new identity key unreadable"),
    ("recipients key_change with a bad recipient", _with("key_change", {
        "kind": "recipients", "key_ids": [], "detail": "", "public_key": None, "recipients": ["age1nope"]}),
     "recipient unreadable"),
]


@pytest.mark.parametrize("name, make, expected", HOSTILE_RECORDS, ids=[h[0] for h in HOSTILE_RECORDS])
def test_hostile_validly_signed_record_is_reported_by_name_and_verification_goes_on(bundle, signer, name, make,
                                                                                    expected, monkeypatch):
    seq = append_signed(bundle, signer, make)
    follower = append_signed(bundle, signer, _with("boot"))  # a valid record after it is still checked
    opened = []
    real_open = os.open

    def recording_open(path, *args, **kwargs):
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", recording_open)
    report, errs = problems_of(bundle)
    monkeypatch.undo()
    where = f"ledger.jsonl line {seq}" if "malformed" in expected else f"record seq {seq} ("
    assert any(e.startswith(where) and expected in e for e in errs), errs
    assert report.records == follower and report.head_seq == follower
    assert report.signatures_ok >= follower - 1  # the hostile record is signed; only a malformed one is not checked
    assert not any(f"seq {follower} " in e and "malformed" in e for e in errs)
    assert report.segments_ok == 1  # S1-0000 still verified
    segments = str((bundle / "segments").resolve())
    assert all(os.path.realpath(p).startswith(segments) for p in opened if "segments" in p or ".age" in p), opened


DAMAGED_LINES = [
    ("not JSON", b"garbage\n", "export line is not canonical JSON"),
    ("not UTF-8", b'{"rec":"\xff\xfe","sig":""}\n', "export line is not canonical JSON"),
    ("empty object", b"{}\n", 'export line must be {"rec":...,"sig":"..."}'),
    ("sig not a string", b'{"rec":{},"sig":1}\n', 'export line must be {"rec":...,"sig":"..."}'),
    ("sig not base64", b'{"rec":{},"sig":"!!"}\n', "signature is not base64"),
    ("rec a string", b'{"rec":"x","sig":""}\n', "malformed record: record envelope must have keys"),
    ("rec an array", b'{"rec":[1],"sig":""}\n', "malformed record: record envelope must have keys"),
    ("NUL bytes", b'\x00\x00{"rec":{},"sig":""}\n', "export line is not canonical JSON"),
    ("deeply nested", b'{"rec":' + b"[" * 50_000 + b"]" * 50_000 + b',"sig":""}\n', "nested too deeply"),
    ("a JSON number", b"12\n", 'export line must be {"rec":...,"sig":"..."}'),
]


@pytest.mark.parametrize("name, line, expected", DAMAGED_LINES, ids=[d[0] for d in DAMAGED_LINES])
def test_damaged_export_line_is_reported_with_its_line_number_and_the_rest_is_checked(bundle, name, line, expected):
    path = bundle / "ledger.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + line + lines[1])
    report, errs = problems_of(bundle)
    assert any(e.startswith("ledger.jsonl line 2: ") and expected in e for e in errs), errs
    assert report.head_seq == 2 and report.segments_ok == 1


def test_truncated_last_line_is_reported_not_raised(bundle):
    path = bundle / "ledger.jsonl"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    report, errs = problems_of(bundle)
    assert any(e.startswith("ledger.jsonl line 2: export line is not canonical JSON") for e in errs)
    assert any("S1-0000.age: file is not accounted for" in e for e in errs)


def test_ledger_path_that_is_a_directory_is_reported(tmp_path):
    (tmp_path / "b" / "ledger.jsonl").mkdir(parents=True)
    report, errs = problems_of(tmp_path / "b")
    assert not report.ok and any(e.startswith("ledger.jsonl: cannot read") for e in errs)


def test_edited_database_rows_are_reported_not_raised(store, tmp_path):
    write_segment(store, "S1", 0)
    store.close()
    copy = tmp_path / "copy"
    shutil.copytree(store.data_dir, copy)
    (copy / "journal.jsonl").unlink()
    conn = sqlite3.connect(copy / "ledger.db")
    conn.execute("DROP TRIGGER ledger_no_update")
    conn.execute("UPDATE ledger SET data=CAST(data AS TEXT) WHERE seq=2")
    conn.execute("INSERT INTO receipts (segment_id, receipt, sig) VALUES (5, 'x', NULL)")
    conn.commit()
    conn.close()
    report, errs = problems_of(copy)
    assert "record seq 2: ledger row's data or sig is not a BLOB (database edited)" in errs
    assert any(e.startswith("ledger.db receipts ('5'): row is not (text, blob, blob)") for e in errs)
    assert "segments/S1-0000.age: file is not accounted for by any segment record" in errs


NON_CANONICAL = [
    ("a float in the body", b'"body":{"x":1.5}', "malformed record: non-integer number 1.5"),
    ("nested 100 000 deep", b'"body":{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    ("whitespace", b'"body": {}', "malformed record: JSON is valid but not in RFC 8785 canonical form"),
    ("duplicate key", b'"body":{"a":1,"a":1}', "malformed record: JSON is valid but not in RFC 8785 canonical form"),
    ("not UTF-8", b'"body":{"a":"\xff"}', "malformed record: not valid JSON"),
]


@pytest.mark.parametrize("name, body, expected", NON_CANONICAL, ids=[n[0] for n in NON_CANONICAL])
def test_signed_record_bytes_that_are_not_canonical_json_are_reported(store, signer, name, body, expected):
    """ledger.db holds raw record bytes (an export line could not even carry these): each is reported."""
    write_segment(store, "S1", 0)
    seq, prev = store.ledger.head()
    data = canonical_bytes(_envelope(seq + 1, prev, "boot", {})).replace(b'"body":{}', body)
    store.db.conn.execute("INSERT INTO ledger (seq, type, hash, data, sig) VALUES (?,?,?,?,?)",
                          (seq + 1, "boot", "x", data, signer.sign(data)))
    store.close()
    report, errs = problems_of(store.data_dir)
    assert any(e.startswith(f"record seq {seq + 1}: ") and expected in e for e in errs), errs
    assert report.records == seq + 1 and report.segments_ok == 1


def test_odd_entries_in_segments_are_reported_and_never_followed(bundle, tmp_path):
    """A directory, a symbolic link to a file outside, and a FIFO, each under a name a record could claim:
    reported without reading anything through them (a FIFO would block an unguarded open)."""
    outside = tmp_path / "outside.age"
    outside.write_bytes(b"not evidence")
    seg = bundle / "segments" / "S1-0000.age"
    seg.unlink()
    seg.symlink_to(outside)
    (bundle / "segments" / "S1-0001.age").mkdir()
    os.mkfifo(bundle / "segments" / "S1-0002.age")
    report, errs = problems_of(bundle)
    assert any(e.startswith("segments/S1-0000.age: cannot open (a symbolic link") for e in errs), errs
    assert "segments/S1-0001.age: file is not accounted for by any segment record" in errs
    assert "segments/S1-0002.age: file is not accounted for by any segment record" in errs
    assert report.bytes_checked == 0


def test_a_segment_name_that_would_leave_segments_is_never_opened(bundle, tmp_path):
    """Defence in depth below the schema: even handed such a name directly, the file checks only open
    entries they listed inside `segments/`."""
    (bundle / "outside.age").write_bytes(b"not evidence")
    report = Report("direct")
    seg = {"size": 12, "sha256_cipher": "ab" * 32, "truncated": False, "purged": False, "where": "test",
           "sidecars": []}
    Verifier().verify_segments(bundle / "segments", {"../outside.age": seg, "/etc/passwd": seg}, report)
    assert [str(p) for p in report.problems] == [
        "segments/S1-0000.age: file is not accounted for by any segment record",
        "segments/../outside.age: missing (recorded at test, never purged)",
        "segments//etc/passwd: missing (recorded at test, never purged)"]
    assert report.bytes_checked == 0


def test_genesis_whose_key_id_does_not_match_its_key_is_reported(tmp_path, signer):
    bundle = tmp_path / "b"
    bundle.mkdir()
    pub = base64.b64encode(signer.public_key().public_bytes(
        *_spki())).decode()
    data = canonical_bytes(_envelope(1, "0" * 64, "device_init", {
        "public_key": pub, "key_id": "0123456789abcdef", "recipients": [], "software": "x"}))
    (bundle / "ledger.jsonl").write_bytes(SignedRecord(data, signer.sign(data)).to_line())
    report, errs = problems_of(bundle)
    assert len(errs) == 1 and errs[0].startswith("record seq 1 (device_init): key_id '0123456789abcdef' is not")
    assert report.signatures_ok == 1


def _spki() -> tuple[Any, Any]:
    from cryptography.hazmat.primitives import serialization

    return serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo


# --- fuzz: random JSON where the structure should be, validly signed ---------------------------------

if given is not None:
    JSON_LEAVES = (st.none() | st.booleans() | st.integers(-(2**53 - 1), 2**53 - 1)
                   | st.text(max_size=12))
    JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=4)
                               | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
    RECORD_TYPES = st.sampled_from(sorted(BODY_SCHEMAS)) | JSON_VALUES
    ENVELOPE_VALUES = {
        "v": st.just(1) | JSON_VALUES, "device": st.just(DEVICE_ID) | JSON_VALUES,
        "prev": st.just("0" * 64) | JSON_VALUES, "wall_us": st.integers(0, 2**53 - 1) | JSON_VALUES,
        "mono_us": st.integers(0, 2**53 - 1) | JSON_VALUES,
        "clock": st.fixed_dictionaries({"source": JSON_VALUES, "quality": st.sampled_from(
            ["synced", "unset"]) | JSON_VALUES}) | JSON_VALUES,
    }

    def _body_for(rtype: Any) -> Any:
        """Random bodies that often carry the type's own field names, so schema paths get exercised."""
        model = BODY_SCHEMAS.get(rtype) if isinstance(rtype, str) else None
        if model is None:
            return JSON_VALUES
        names = sorted(model.model_fields)
        return st.dictionaries(st.sampled_from(names) | st.text(max_size=6), JSON_VALUES, max_size=len(names) + 1)

    SCRATCH = Path(tempfile.mkdtemp(prefix="bwc-verify-fuzz-"))
    atexit.register(shutil.rmtree, SCRATCH, True)
    FUZZ_SIGNER = PemFileSigner.generate(SCRATCH / "key.pem")
    FUZZ_SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

    @FUZZ_SETTINGS
    @given(data=st.data())
    def test_verify_never_raises_on_random_validly_signed_records(data):
        records = []
        prev = "0" * 64
        for seq in range(1, data.draw(st.integers(1, 4)) + 1):
            rtype = data.draw(RECORD_TYPES)
            rec = {key: data.draw(strategy) for key, strategy in ENVELOPE_VALUES.items()}
            rec.update(seq=data.draw(st.just(seq) | JSON_VALUES), type=rtype, body=data.draw(_body_for(rtype)))
            if data.draw(st.booleans()):
                rec["prev"] = prev
            if data.draw(st.booleans()):
                del rec[data.draw(st.sampled_from(sorted(rec)))]
            raw = canonical_bytes(rec)
            signed = SignedRecord(raw, FUZZ_SIGNER.sign(raw))
            records.append((f"fuzz {seq}", signed))
            prev = signed.hash
        report = Report("fuzz")
        segments = Verifier().verify_chain(iter(records), report)
        assert report.records == len(records) and isinstance(segments, dict)
        Verifier().verify_segments(SCRATCH / "segments", segments, report)

    @FUZZ_SETTINGS
    @given(lines=st.lists(st.binary(max_size=80) | JSON_VALUES.map(lambda v: json.dumps(v).encode()), max_size=5))
    def test_verify_never_raises_on_random_export_lines(lines):
        bundle = SCRATCH / "bundle"
        bundle.mkdir(exist_ok=True)
        (bundle / "ledger.jsonl").write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines))
        report = Verifier().verify_path(bundle)
        assert not report.ok or report.records > 0
