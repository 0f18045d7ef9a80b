"""`bwc-agent verify` detects every kind of tampering the rule cares about (R5, R22)."""

from __future__ import annotations

import shutil
import sqlite3

import pytest

from agent.cli import main
from agent.evidence.age import Identity
from agent.evidence.records import SignedRecord
from agent.evidence.verify import Verifier
from agent.storage.keys import PemFileSigner
from tests.conftest import write_segment


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
