"""`bwc-agent verify` detects every kind of tampering the rule cares about (R5, R22)."""

from __future__ import annotations

import hashlib
import re
import shutil
import sqlite3

import pytest

from agent.capture.gps import GpsTrackRecorder
from agent.cli import main
from agent.evidence.age import Identity, encrypt_bytes
from agent.evidence.canonical import canonical_bytes
from agent.evidence.receipts import ReceiptError, ReceiptVerifier
from agent.evidence.records import SignedRecord
from agent.evidence.signing import key_id
from agent.evidence.verify import Verifier, verify_batch
from agent.storage.keys import PemFileSigner
from agent.storage.segment_writer import FragmentInfo
from agent.storage.store import SegmentState
from tests.conftest import DEVICE_ID, write_segment


@pytest.fixture
def bundle(tmp_path, store):
    """A bundle (ledger.jsonl + segments/) of three closed segments."""
    for i in range(3):
        write_segment(store, "S1", i)
    out = tmp_path / "bundle"
    shutil.copytree(store.segments_dir, out / "segments")
    store.ledger.export_jsonl(out / "ledger.jsonl")
    return out


def problems(path, identity=None):
    report = Verifier(identity=identity).verify_path(path)
    return report, [str(p) for p in report.problems]


def test_untouched_data_dir_and_bundle_verify(store, bundle, bureau_identity):
    report, errs = problems(store.data_dir, bureau_identity)
    assert errs == [] and report.ok and report.segments_ok == 3 and report.decrypted == 3
    report, errs = problems(bundle, bureau_identity)
    assert errs == [] and report.records == 4


def test_cli_exit_codes(store, identity_file, capsys):
    write_segment(store, "S1", 0)
    assert main(["verify", str(store.data_dir), "--identity", str(identity_file)]) == 0
    assert "OK:" in capsys.readouterr().out
    seg = next(store.segments_dir.glob("*.age"))
    data = bytearray(seg.read_bytes())
    data[-100] ^= 1
    seg.write_bytes(bytes(data))
    assert main(["verify", str(store.data_dir)]) == 1
    assert "ciphertext SHA-256 differs" in capsys.readouterr().out


def test_one_flipped_byte_in_a_segment_is_detected(bundle):
    seg = sorted((bundle / "segments").iterdir())[1]
    data = bytearray(seg.read_bytes())
    data[len(data) // 2] ^= 0x01
    seg.write_bytes(bytes(data))
    _, errs = problems(bundle)
    assert any(seg.name in e and "SHA-256 differs" in e for e in errs)


def test_removed_duplicated_and_swapped_segments_are_detected(bundle):
    a, b, c = sorted((bundle / "segments").iterdir())
    a.unlink()
    shutil.copy(b, bundle / "segments" / "copy.age")
    b_bytes, c_bytes = b.read_bytes(), c.read_bytes()
    b.write_bytes(c_bytes)
    c.write_bytes(b_bytes)
    _, errs = problems(bundle)
    assert any(a.name in e and "missing" in e for e in errs)
    assert any("copy.age" in e and "not accounted for" in e for e in errs)
    assert any(b.name in e for e in errs) and any(c.name in e for e in errs)


def _rewrite_lines(bundle, fn):
    path = bundle / "ledger.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(fn(lines)))


def test_edited_record_is_detected(bundle):
    _rewrite_lines(bundle, lambda ls: ls[:2] + [ls[2].replace(b'"video_frames":90', b'"video_frames":91')] + ls[3:])
    _, errs = problems(bundle)
    assert any("seq 3" in e and "signature" in e for e in errs)
    assert any("seq 4" in e and "chain broken" in e for e in errs)


def test_removed_record_is_detected(bundle):
    _rewrite_lines(bundle, lambda ls: ls[:2] + ls[3:])
    _, errs = problems(bundle)
    assert any("expected seq 3: gap" in e for e in errs)


def test_reordered_records_are_detected(bundle):
    _rewrite_lines(bundle, lambda ls: [ls[0], ls[2], ls[1], ls[3]])
    _, errs = problems(bundle)
    assert any("reordered" in e or "gap" in e for e in errs)
    assert any("chain broken" in e for e in errs)


def test_record_resigned_with_another_key_is_detected(bundle, tmp_path):
    other = PemFileSigner.generate(tmp_path / "other.pem")

    def resign(lines):
        rec = SignedRecord.from_line(lines[2])
        return lines[:2] + [SignedRecord(rec.data, other.sign(rec.data)).to_line()] + lines[3:]

    _rewrite_lines(bundle, resign)
    _, errs = problems(bundle)
    assert errs == ["record seq 3 (segment): ES256 signature does not verify"]


def test_whole_ledger_forged_with_another_key_fails_against_pinned_key(bundle, signer, tmp_path):
    from agent.evidence.signing import public_key_pem

    pem = tmp_path / "pub.pem"
    pem.write_bytes(public_key_pem(PemFileSigner.generate(tmp_path / "x.pem").public_key()))
    assert main(["verify", str(bundle), "--pubkey", str(pem)]) == 1
    pem.write_bytes(public_key_pem(signer.public_key()))
    assert main(["verify", str(bundle), "--pubkey", str(pem)]) == 0


def test_wrong_identity_cannot_decrypt(bundle):
    _, errs = problems(bundle, Identity.generate())
    assert errs and all("no stanza for this identity" in e for e in errs)


def test_database_refuses_edits_and_deletes(store):
    write_segment(store, "S1", 0)
    for sql in ("UPDATE ledger SET type='x' WHERE seq=2", "DELETE FROM ledger WHERE seq=2",
                "DELETE FROM segments"):
        with pytest.raises(sqlite3.DatabaseError, match="never"):
            store.db.conn.execute(sql)


# --- receipts (docs/FORMAT.md §13; R20, R22) -----------------------------------------------------------


@pytest.fixture
def receipt_signer(tmp_path):
    return PemFileSigner.generate(tmp_path / "keys" / "bureau-receipt.pem")


def _segment_record(store, segment_id):
    return next(r for r in store.ledger.records(rtype="segment") if r.fields["body"]["segment_id"] == segment_id)


def _receipt_fields(store, segment_id, receipt_signer):
    rec = _segment_record(store, segment_id)
    body = rec.fields["body"]
    return {"v": 1, "type": "segment_receipt", "device": DEVICE_ID, "segment_id": segment_id,
            "sha256_cipher": body["sha256_cipher"], "size": body["size"], "record_seq": rec.fields["seq"],
            "record_hash": rec.hash, "stored_wall_us": 1_750_000_000_000_000,
            "bureau_key_id": key_id(receipt_signer.public_key())}


def _receipt(store, segment_id, receipt_signer, **changes):
    data = canonical_bytes(_receipt_fields(store, segment_id, receipt_signer) | changes)
    return data, receipt_signer.sign(data)


@pytest.mark.parametrize("changes, error", [
    ({"v": True}, "unsupported receipt version True"),
    ({"v": 2}, "unsupported receipt version 2"),
    ({"record_seq": 0}, "record_seq 0 is not an integer >= 1"),
    ({"record_seq": True}, "record_seq True is not an integer >= 1"),
    ({"record_seq": "2"}, "record_seq '2' is not an integer >= 1"),
    ({"record_hash": "AB" * 32}, "is not 64 lowercase hex digits"),
    ({"record_hash": None}, "record_hash None is not 64 lowercase hex digits"),
    ({"stored_wall_us": "today"}, "stored_wall_us 'today' is not an integer"),
    ({"record_seq": 1}, "record_seq is 1, expected 2"),
    ({"record_hash": "ab" * 32}, "record_hash is"),
    ({"size": True}, "size is True, expected"),
])
def test_receipt_is_refused_unless_its_version_and_record_reference_are_well_formed_and_ours(
        store, receipt_signer, changes, error):
    write_segment(store, "S1", 0)
    rec = _segment_record(store, "S1-0000")
    body = rec.fields["body"]
    verifier = ReceiptVerifier(receipt_signer.public_key())
    expect = dict(device=DEVICE_ID, segment_id="S1-0000", sha256_cipher=body["sha256_cipher"], size=body["size"],
                  record_seq=rec.fields["seq"], record_hash=rec.hash)
    good = verifier.verify(*_receipt(store, "S1-0000", receipt_signer), **expect)
    assert good.fields["record_seq"] == 2
    with pytest.raises(ReceiptError, match=re.escape(error)):
        verifier.verify(*_receipt(store, "S1-0000", receipt_signer, **changes), **expect)


def test_stored_receipts_are_checked_against_their_records_and_the_receipt_key(store, receipt_signer, tmp_path):
    write_segment(store, "S1", 0)
    write_segment(store, "S1", 1)
    rec = _segment_record(store, "S1-0000")
    verified = ReceiptVerifier(receipt_signer.public_key()).verify(
        *_receipt(store, "S1-0000", receipt_signer), device=DEVICE_ID, segment_id="S1-0000",
        sha256_cipher=rec.fields["body"]["sha256_cipher"], size=rec.fields["body"]["size"])
    store.record_receipt("S1-0000", verified)
    store.purge("S1-0000")
    report = Verifier(receipt_key=receipt_signer.public_key()).verify_path(store.data_dir)
    assert report.problems == [] and report.receipts_checked == 1 and report.segments_purged == 1

    impostor = PemFileSigner.generate(tmp_path / "impostor.pem")
    report = Verifier(receipt_key=impostor.public_key()).verify_path(store.data_dir)
    assert [str(p) for p in report.problems] == [
        "ledger.db receipts ('S1-0000'): receipt for S1-0000: not signed by the pinned bureau key "
        "(ES256 signature does not verify)"]

    other, other_sig = _receipt(store, "S1-0000", receipt_signer, stored_wall_us=1)
    store.db.conn.execute("UPDATE receipts SET receipt=?, sig=? WHERE segment_id='S1-0000'", (other, other_sig))
    report = Verifier().verify_path(store.data_dir)
    assert [str(p) for p in report.problems] == [
        "ledger.db receipts ('S1-0000'): stored receipt's SHA-256 is not the receipt_sha256 of a receipt record "
        "for this segment"]


def test_purge_not_preceded_by_its_receipt_record_is_reported(bundle, signer):
    body = SignedRecord.from_line((bundle / "ledger.jsonl").read_bytes().splitlines()[1]).fields["body"]
    lines = (bundle / "ledger.jsonl").read_bytes().splitlines(keepends=True)
    last = SignedRecord.from_line(lines[-1])
    data = canonical_bytes({"v": 1, "device": DEVICE_ID, "seq": len(lines) + 1, "prev": last.hash, "type": "purge",
                            "wall_us": 1, "mono_us": 1, "clock": {"source": "system", "quality": "synced"},
                            "body": {"segment_id": body["segment_id"], "file": body["file"],
                                     "sha256_cipher": body["sha256_cipher"], "receipt_sha256": "cd" * 32,
                                     "reason": "space_needed"}})
    with open(bundle / "ledger.jsonl", "ab") as fh:
        fh.write(SignedRecord(data, signer.sign(data)).to_line())
    (bundle / "segments" / body["file"]).unlink()
    _, errs = problems(bundle)
    assert errs == [f"record seq {len(lines) + 1} (purge): purge is not preceded by a receipt record for this "
                    "segment with the same receipt_sha256 (only receipted footage may be purged, R22)",
                    f"segments/{body['file']}: missing (recorded at record seq 2 (segment), never purged)"]


# --- incremental batches (docs/FORMAT.md §3, §14.3) ----------------------------------------------------


def test_incremental_batch_verifies_from_its_anchor_and_a_wrong_anchor_is_reported(store, signer, receipt_signer,
                                                                                   tmp_path):
    for i in range(3):
        write_segment(store, "S1", i)
    head_seq, head_hash = store.ledger.head()  # the bureau holds records up to here
    rec = _segment_record(store, "S1-0000")
    store.record_receipt("S1-0000", ReceiptVerifier(receipt_signer.public_key()).verify(
        *_receipt(store, "S1-0000", receipt_signer), device=DEVICE_ID, segment_id="S1-0000",
        sha256_cipher=rec.fields["body"]["sha256_cipher"], size=rec.fields["body"]["size"]))
    store.purge("S1-0000")
    write_segment(store, "S1", 3)
    batch = tmp_path / "batch"
    (batch / "segments").mkdir(parents=True)
    assert store.ledger.export_jsonl(batch / "ledger.jsonl", from_seq=head_seq + 1) == 3
    shutil.copy(store.segments_dir / "S1-0003.age", batch / "segments")
    key = signer.public_key()

    report = verify_batch(batch / "ledger.jsonl", start_seq=head_seq + 1, start_prev=head_hash, key=key)
    assert report.ok and report.records == 3 and report.head_seq == head_seq + 3 and report.first_seq == 5
    assert report.notes == ["record seq 5 (receipt): receipt for segment S1-0000 which has no earlier segment "
                            "record in this batch (it may be in an earlier one; not checked)",
                            "record seq 6 (purge): purge of S1-0000.age which has no earlier segment record in "
                            "this batch (it may be in an earlier one; not checked)"]
    assert "first seq          5" in report.render()
    report = verify_batch(batch, start_seq=head_seq + 1, start_prev=head_hash, key=key)
    assert report.ok and report.segments_ok == 1

    wrong = verify_batch(batch / "ledger.jsonl", start_seq=head_seq + 1, start_prev="0" * 64, key=key)
    assert [str(p) for p in wrong.problems] == [
        "record seq 5 (receipt): prev does not match the hash of the previous record (chain broken)"]
    late = verify_batch(batch / "ledger.jsonl", start_seq=head_seq, start_prev=head_hash, key=key)
    assert "record seq 5 (receipt): expected seq 4: gap (records missing)" in [str(p) for p in late.problems]
    stranger = verify_batch(batch / "ledger.jsonl", start_seq=head_seq + 1, start_prev=head_hash,
                            key=PemFileSigner.generate(tmp_path / "x.pem").public_key())
    assert len(stranger.problems) == 3 and all("ES256 signature does not verify" in str(p)
                                               for p in stranger.problems)
    with pytest.raises(ValueError, match="start_prev must be 64 lowercase hex digits"):
        verify_batch(batch, start_seq=5, start_prev="nope", key=key)


# --- recovery records what it cannot close once (docs/FORMAT.md §11, §12) ------------------------------


def _crash_with_open_segment(open_store, session, index):
    store = open_store()
    seg = store.open_segment(session, index)
    seg.write_fragment(b"\x00" * 70_000, FragmentInfo(30, 48_000, 0, 966_667))
    seg.writer.abandon()
    store.close()
    return seg.writer.part_path


def _recover_twice(open_store):
    store = open_store()
    first = store.recover()
    store.close()
    store = open_store()
    second = store.recover()
    return store, first, second


def test_segment_row_whose_file_is_lost_is_recorded_once_and_left_unresolved(open_store):
    part = _crash_with_open_segment(open_store, "SL", 0)
    part.unlink()
    store, first, second = _recover_twice(open_store)
    assert [(r.fields["type"], r.fields["body"]["action"], r.fields["body"]["detail"]) for r in first] == [
        ("recovery", "unknown_file", "segment row without a file")]
    assert second == [] and store.row("SL-0000")["state"] == SegmentState.UNRESOLVED
    store.close()
    report = Verifier().verify_path(store.data_dir)
    assert report.ok and report.segments == 0


def test_part_and_final_that_differ_are_recorded_once_left_in_place_and_flagged_by_verify(open_store):
    part = _crash_with_open_segment(open_store, "SD", 0)
    final = part.with_name("SD-0000.age")
    final.write_bytes(b"something else")
    before = (part.read_bytes(), final.read_bytes())
    store, first, second = _recover_twice(open_store)
    assert [r.fields["body"]["detail"] for r in first] == [
        "SD-0000.age.part and SD-0000.age are different files; both left in place"]
    assert second == [] and store.row("SD-0000")["state"] == SegmentState.UNRESOLVED
    assert (part.read_bytes(), final.read_bytes()) == before
    store.close()
    _, errs = problems(store.data_dir)
    assert errs == ["segments/SD-0000.age: file is not accounted for by any segment record",
                    "segments/SD-0000.age.part: unfinished segment (open now, or not yet recovered after a crash)"]


def test_stray_files_are_recorded_once_and_never_adopted_under_a_name_that_is_not_a_segment_file(open_store):
    store = open_store()
    write_segment(store, "SS", 0)
    store.close()
    for name in ("junk.age", "odd name.age.part", "SS-0000.gps.age", "SS-0001.gps.age.part"):
        (store.segments_dir / name).write_bytes(b"x")
    store, first, second = _recover_twice(open_store)
    assert sorted(r.fields["body"]["detail"] for r in first) == [
        "SS-0000.gps.age: sidecar named by no record; left in place",
        "SS-0001.gps.age.part: unfinished file recovery cannot close; left in place",
        "junk.age: file with no segment row; left in place",
        "odd name.age.part: unfinished file recovery cannot close; left in place"]
    assert second == [] and [r["segment_id"] for r in store.segments()] == ["SS-0000"]
    store.close()


# --- sidecars (docs/FORMAT.md §10.5) ---------------------------------------------------------------


def test_sidecar_of_a_recovered_segment_is_listed_in_its_record_and_verified(open_store, bureau_identity):
    store = open_store()
    seg = store.open_segment("SG", 0)
    seg.write_fragment(b"\x00" * 70_000, FragmentInfo(30, 48_000, 0, 966_667))
    track = GpsTrackRecorder()
    track.add(None, mono_us=500_000)
    sidecar = track.seal("SG-0000", 0, 1_000_000, [bureau_identity.recipient]).write(store.segments_dir)
    seg.writer.abandon()
    store.close()
    store, first, second = _recover_twice(open_store)
    assert first[0].fields["body"]["sidecars"] == [sidecar.model_dump()] and second == []
    store.close()
    report, errs = problems(store.data_dir, bureau_identity)
    assert errs == [] and report.sidecars == report.sidecars_ok == 1 and report.decrypted == 2

    path = store.segments_dir / sidecar.file
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    _, errs = problems(store.data_dir)
    assert errs == ["segments/SG-0000.gps.age: sidecar size or SHA-256 differs from its segment record "
                    "(record seq 2 (segment))"]
    path.unlink()
    _, errs = problems(store.data_dir)
    assert errs == ["segments/SG-0000.gps.age: missing sidecar (recorded at record seq 2 (segment), segment never "
                    "purged)"]


def test_hash_named_context_sidecar_is_accounted_for_by_the_record_carrying_its_hash(store, bureau_identity):
    ciphertext = encrypt_bytes(b'{"case":"2025-0042"}', [bureau_identity.recipient])
    digest = hashlib.sha256(ciphertext).hexdigest()
    store.ledger.append("session_open", {"session_id": "SC", "trigger": "button", "pre_event_us": 0,
                                         "context_sha256": digest})
    path = store.segments_dir / f"{digest}.context.age"
    path.write_bytes(ciphertext)
    assert store.recover() == []  # a record names it: not a stray
    report, errs = problems(store.data_dir, bureau_identity)
    assert errs == [] and report.decrypted == 1
    path.write_bytes(ciphertext + b"x")
    _, errs = problems(store.data_dir)
    assert errs == [f"segments/{digest}.context.age: SHA-256 differs from the hash in its name (file altered or "
                    "swapped)"]
    path.unlink()
    _, errs = problems(store.data_dir)
    assert errs == [f"segments/{digest}.context.age: missing: a record carries this context sidecar's hash"]


def test_cli_verifies_an_incremental_bundle_anchored_at_the_previous_record(tmp_path, store, signer):
    from agent.evidence.signing import public_key_pem

    for i in range(3):
        write_segment(store, "S1", i)
    records = list(store.ledger.records())
    out = tmp_path / "batch"
    (out / "segments").mkdir(parents=True)
    for rec in records[2:]:
        seg = store.segments_dir / rec.fields["body"]["file"]
        shutil.copy(seg, out / "segments" / seg.name)
    (out / "ledger.jsonl").write_bytes(b"".join(r.to_line() for r in records[2:]))
    pem = tmp_path / "device.pem"
    pem.write_bytes(public_key_pem(signer.public_key()))
    args = ["verify", str(out), "--pubkey", str(pem), "--from-seq", "3"]
    assert main(args + ["--prev", records[1].hash]) == 0
    assert main(args + ["--prev", records[0].hash]) == 1  # wrong anchor: the chain does not continue
    assert main(["verify", str(out), "--from-seq", "3"]) == 2  # an anchor is required
