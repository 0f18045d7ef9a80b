"""Verification of a device's data directory or an exported bundle (docs/FORMAT.md, "Verifying").

Shared by the device (`bwc-agent verify`) and the bureau (on ingest). It checks every signature, the
chain (seq continuity, prev hashes: no gap, fork or reorder), every record body against its schema,
and every segment file's size and ciphertext hash against its record; with the bureau's age identity
it also decrypts each segment and checks the plaintext hash. Files that no record accounts for are
failures too: footage must never be unaccounted for (R3, R5, R22).
"""

from __future__ import annotations

import base64
import hashlib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from agent.evidence.age import AgeDecryptor, AgeError, Identity
from agent.evidence.canonical import CanonicalJSONError, parse_canonical
from agent.evidence.records import GENESIS_PREV, RecordError, SignedRecord, check_envelope, validate_body
from agent.evidence.signing import SignatureError, key_id, load_public_key, public_key_der, verify_es256

SEGMENT_SUFFIX = ".age"
PART_SUFFIX = ".part"


@dataclass
class Problem:
    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


@dataclass
class Report:
    """What was checked and what failed. `ok` is True only if nothing failed."""

    source: str
    records: int = 0
    signatures_ok: int = 0
    segments: int = 0
    segments_ok: int = 0
    segments_purged: int = 0
    segments_truncated: int = 0
    decrypted: int = 0
    bytes_checked: int = 0
    key_id: str | None = None
    key_pinned: bool = False
    head_seq: int = 0
    head_hash: str = GENESIS_PREV
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.records > 0

    def fail(self, where: str, what: str) -> None:
        self.problems.append(Problem(where, what))

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "source": self.source, "records": self.records,
                "signatures_ok": self.signatures_ok, "segments": self.segments, "segments_ok": self.segments_ok,
                "segments_purged": self.segments_purged, "segments_truncated": self.segments_truncated,
                "decrypted": self.decrypted, "bytes_checked": self.bytes_checked, "key_id": self.key_id,
                "key_pinned": self.key_pinned, "head_seq": self.head_seq, "head_hash": self.head_hash,
                "problems": [str(p) for p in self.problems], "notes": self.notes}

    def render(self) -> str:
        origin = "pinned by caller" if self.key_pinned else "from the genesis record"
        lines = [f"Verification of {self.source}",
                 f"  signing key        {self.key_id or '-'} ({origin})",
                 f"  records            {self.records} (signatures valid: {self.signatures_ok}); "
                 f"head seq {self.head_seq}",
                 f"  chain head         {self.head_hash}",
                 f"  segments           {self.segments} recorded: {self.segments_ok} intact, "
                 f"{self.segments_purged} purged after receipt, {self.segments_truncated} truncated by power loss",
                 f"  decrypted          {self.decrypted} segment(s) with the bureau identity",
                 f"  bytes hashed       {self.bytes_checked}"]
        lines += [f"  note: {n}" for n in self.notes]
        if self.problems:
            lines.append(f"FAILED: {len(self.problems)} problem(s)")
            lines += [f"  - {p}" for p in self.problems[:200]]
            if len(self.problems) > 200:
                lines.append(f"  ... and {len(self.problems) - 200} more")
        else:
            lines.append("OK: every signature, the chain and every segment verified")
        return "\n".join(lines)


def _records_from_db(path: Path, report: Report) -> Iterator[tuple[str, SignedRecord]]:
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        rows = conn.execute("SELECT seq, data, sig FROM ledger ORDER BY seq").fetchall()
        conn.close()
    except sqlite3.DatabaseError as exc:
        report.fail(str(path), f"ledger database unreadable: {exc}")
        return
    for seq, data, sig in rows:
        yield f"record seq {seq}", SignedRecord(bytes(data), bytes(sig))


def _records_from_jsonl(path: Path, report: Report) -> Iterator[tuple[str, SignedRecord]]:
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield f"{path.name} line {lineno}", SignedRecord.from_line(line)
            except RecordError as exc:
                report.fail(f"{path.name} line {lineno}", str(exc))


def find_ledger(root: Path) -> Path | None:
    for name in ("ledger.jsonl", "ledger.db"):
        if (root / name).exists():
            return root / name
    return None


class Verifier:
    def __init__(self, identity: Identity | None = None, pinned_key: ec.EllipticCurvePublicKey | None = None,
                 check_segments: bool = True):
        self.identity = identity
        self.pinned_key = pinned_key
        self.check_segments = check_segments

    def verify_path(self, root: Path) -> Report:
        """Verify a data directory (ledger.db) or bundle (ledger.jsonl) with a `segments/` folder."""
        report = Report(str(root))
        ledger = find_ledger(root)
        if ledger is None:
            report.fail(str(root), "no ledger.jsonl or ledger.db found")
            return report
        source = _records_from_jsonl if ledger.suffix == ".jsonl" else _records_from_db
        segments = self.verify_chain(source(ledger, report), report)
        if ledger.suffix == ".db" and (root / "journal.jsonl").exists():
            self.compare_journal(root / "journal.jsonl", ledger, report)
        if self.check_segments:
            self.verify_segments(root / "segments", segments, report)
        return report

    def verify_chain(self, records: Iterator[tuple[str, SignedRecord]], report: Report,
                     start_seq: int = 1, start_prev: str = GENESIS_PREV,
                     key: ec.EllipticCurvePublicKey | None = None) -> dict[str, dict[str, Any]]:
        """Check records in order; return segment bodies by file name (with a `purged` mark)."""
        expect_seq, expect_prev = start_seq, start_prev
        key = key or self.pinned_key
        report.key_pinned = self.pinned_key is not None
        device = None
        segments: dict[str, dict[str, Any]] = {}
        for where, rec in records:
            report.records += 1
            try:
                fields = parse_canonical(rec.data)
                check_envelope(fields)
            except (CanonicalJSONError, RecordError) as exc:
                report.fail(where, f"malformed record: {exc}")
                expect_seq += 1
                expect_prev = rec.hash
                continue
            where = f"record seq {fields['seq']} ({fields['type']})"
            if fields["seq"] != expect_seq:
                kind = "gap (records missing)" if fields["seq"] > expect_seq else "reordered or duplicated"
                report.fail(where, f"expected seq {expect_seq}: {kind}")
            if fields["prev"] != expect_prev:
                report.fail(where, "prev does not match the hash of the previous record (chain broken)")
            if device is None:
                device = fields["device"]
            elif fields["device"] != device:
                report.fail(where, f"device {fields['device']!r} differs from {device!r}")
            if fields["seq"] == 1 and fields["type"] != "device_init":
                report.fail(where, "the first record must be device_init")
            if fields["type"] == "device_init":
                try:
                    genesis_key = load_public_key(base64.b64decode(fields["body"].get("public_key", "")))
                except (SignatureError, ValueError) as exc:
                    report.fail(where, f"genesis public key unreadable: {exc}")
                    genesis_key = None
                if genesis_key is None:
                    pass
                elif key is None:
                    key = genesis_key
                elif self.pinned_key is not None and public_key_der(genesis_key) != public_key_der(self.pinned_key):
                    report.fail(where, "genesis key differs from the pinned device key")
            if key is None:
                report.fail(where, "no signing key known (ledger does not start with device_init)")
            else:
                try:
                    verify_es256(key, rec.data, rec.sig)
                    report.signatures_ok += 1
                except SignatureError as exc:
                    report.fail(where, str(exc))
            try:
                body = validate_body(fields["type"], fields["body"])
                if body != fields["body"]:
                    report.fail(where, "body is not in its schema's canonical form")
            except RecordError as exc:
                report.fail(where, str(exc))
                body = fields["body"]
            if fields["type"] == "key_change" and body.get("kind") == "identity" and body.get("public_key"):
                try:  # later records are signed by the new key
                    key = load_public_key(base64.b64decode(body["public_key"]))
                except (SignatureError, ValueError) as exc:
                    report.fail(where, f"new identity key unreadable: {exc}")
            elif fields["type"] == "segment":
                if body["file"] in segments:
                    report.fail(where, f"second record for segment file {body['file']}")
                segments[body["file"]] = dict(body, purged=False, where=where)
            elif fields["type"] == "purge":
                seg = segments.get(body["file"])
                if seg is None:
                    report.fail(where, f"purge of {body['file']} which has no earlier segment record")
                elif seg["sha256_cipher"] != body["sha256_cipher"]:
                    report.fail(where, "purge names a different ciphertext hash than the segment record")
                else:
                    seg["purged"] = True
            expect_seq = fields["seq"] + 1
            expect_prev = rec.hash
            report.head_seq, report.head_hash = fields["seq"], rec.hash
        report.key_id = key_id(key) if key is not None else None
        return segments

    def compare_journal(self, journal: Path, db: Path, report: Report) -> None:
        """A data directory keeps each record twice (ledger.db and journal.jsonl); they must agree."""
        db_hashes = {int(where.split()[-1]): rec.hash for where, rec in _records_from_db(db, Report(str(db)))}
        extra = 0
        for where, rec in _records_from_jsonl(journal, Report(str(journal))):
            try:
                seq = rec.fields["seq"]
            except (CanonicalJSONError, KeyError, TypeError):
                continue
            if seq not in db_hashes:
                extra += 1
            elif db_hashes[seq] != rec.hash:
                report.fail(f"journal.jsonl ({where})", f"record seq {seq} differs from ledger.db")
        if extra:
            report.fail("ledger.db", f"{extra} record(s) in journal.jsonl are missing from the database "
                                     "(start the agent to restore them)")

    def verify_segments(self, folder: Path, segments: dict[str, dict[str, Any]], report: Report) -> None:
        present = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
        for name in sorted(present):
            if name.endswith(PART_SUFFIX):
                report.fail(f"segments/{name}", "unfinished segment (open now, or not yet recovered after a crash)")
            elif name not in segments:
                report.fail(f"segments/{name}", "file is not accounted for by any segment record")
        for name, seg in segments.items():
            report.segments += 1
            if seg["truncated"]:
                report.segments_truncated += 1
            path = folder / name
            if name not in present:
                if seg["purged"]:
                    report.segments_purged += 1
                else:
                    report.fail(f"segments/{name}", f"missing (recorded at {seg['where']}, never purged)")
                continue
            if self._check_segment(path, seg, report):
                report.segments_ok += 1

    def _check_segment(self, path: Path, seg: dict[str, Any], report: Report) -> bool:
        where = f"segments/{path.name}"
        size = path.stat().st_size
        if size != seg["size"]:
            report.fail(where, f"size {size} differs from recorded {seg['size']}")
            return False
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
        report.bytes_checked += size
        if digest.hexdigest() != seg["sha256_cipher"]:
            report.fail(where, "ciphertext SHA-256 differs from the record (file altered or swapped)")
            return False
        if seg["truncated"] and seg["complete_size"] == 0:
            # Recovery found no complete age header (and payload nonce): a power cut while the segment was
            # being created leaves such a file. It holds no footage, unless fragments had been written.
            if seg["fragments"]:
                report.fail(where, f"no readable age header although {seg['fragments']} fragment(s) had been "
                                   "written: footage damaged before recovery")
                return False
            report.notes.append(f"{where}: cut before its age header was complete; holds no footage")
            return True
        if self.identity is None:
            return True
        plain = hashlib.sha256()
        plain_size = 0
        try:
            with open(path, "rb") as fh:
                for chunk in AgeDecryptor(self.identity).chunks(fh, allow_truncated=seg["truncated"]):
                    plain.update(chunk)
                    plain_size += len(chunk)
        except AgeError as exc:
            report.fail(where, f"decryption failed: {exc}")
            return False
        report.decrypted += 1
        if not seg["truncated"] and (plain.hexdigest() != seg["sha256_plain"] or plain_size != seg["plain_size"]):
            report.fail(where, "plaintext hash or size differs from the record")
            return False
        return True


def load_pinned_key(path: Path | None) -> ec.EllipticCurvePublicKey | None:
    if path is None:
        return None
    try:
        return load_public_key(path.read_bytes())
    except (OSError, SignatureError) as exc:
        raise SignatureError(f"{path}: {exc}") from exc
