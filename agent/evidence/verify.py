"""Verification of a device's data directory or an exported bundle (docs/FORMAT.md, "Verifying").

Shared by the device (`bwc-agent verify`) and the bureau (on ingest). It checks every signature, the
chain (seq continuity, prev hashes: no gap, fork or reorder), every record body against its schema,
and every segment and sidecar file's size and ciphertext hash against its record; with the bureau's age
identity it also decrypts each file and checks the plaintext hash. Files that no record accounts for are
failures too: footage must never be unaccounted for (R3, R5, R22).

Input is untrusted: a damaged or hostile record, line, database row or file becomes a `Problem` naming
where it is, and checking goes on, so one report lists everything. Nothing here raises on bad input,
and nothing outside `segments/` is ever opened on a record's say-so (names are plain file names; links
are not followed).

Threads: none of its own; a `Verifier` is used by one thread at a time.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import sqlite3
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec

from agent.evidence.age import CHUNK_SIZE, CIPHER_CHUNK_SIZE, AgeDecryptor, AgeError, Identity, Recipient, read_header
from agent.evidence.canonical import CanonicalJSONError, parse_canonical
from agent.evidence.receipts import ReceiptError, ReceiptVerifier
from agent.evidence.records import (
    BODY_SCHEMAS,
    GENESIS_PREV,
    SEGMENT_FILE,
    SIDECAR_FILE,
    RecordError,
    SignedRecord,
    check_envelope,
    validate_body,
)
from agent.evidence.signing import SignatureError, key_id, load_public_key, public_key_der, verify_es256

SEGMENT_SUFFIX = ".age"
PART_SUFFIX = ".part"
# A sidecar a record refers to by hash only (session context, marker note): `<sha256>.<kind>.age`.
HASHED_SIDECAR_RE = re.compile(r"([0-9a-f]{64})\.(context|note)\.age")
_PLAIN_NAME_RES = (re.compile(SEGMENT_FILE), re.compile(SIDECAR_FILE), HASHED_SIDECAR_RE)
_HEX64_RE = re.compile(r"[0-9a-f]{64}")
_READ_BLOCK = 1 << 20


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
    sidecars: int = 0
    sidecars_ok: int = 0
    receipts_checked: int = 0
    decrypted: int = 0
    bytes_checked: int = 0
    key_id: str | None = None
    key_pinned: bool = False
    first_seq: int = 1
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
                "sidecars": self.sidecars, "sidecars_ok": self.sidecars_ok,
                "receipts_checked": self.receipts_checked,
                "decrypted": self.decrypted, "bytes_checked": self.bytes_checked, "key_id": self.key_id,
                "key_pinned": self.key_pinned, "first_seq": self.first_seq, "head_seq": self.head_seq,
                "head_hash": self.head_hash, "problems": [str(p) for p in self.problems], "notes": self.notes}

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
        if self.first_seq != 1:
            lines.insert(2, f"  first seq          {self.first_seq} (incremental: anchored at the caller's "
                            "previous hash and key)")
        if self.sidecars:
            lines.append(f"  sidecars           {self.sidecars} recorded: {self.sidecars_ok} intact")
        if self.receipts_checked:
            lines.append(f"  stored receipts    {self.receipts_checked} checked")
        lines += [f"  note: {n}" for n in self.notes]
        if self.problems:
            lines.append(f"FAILED: {len(self.problems)} problem(s)")
            lines += [f"  - {p}" for p in self.problems[:200]]
            if len(self.problems) > 200:
                lines.append(f"  ... and {len(self.problems) - 200} more")
        else:
            lines.append("OK: every signature, the chain and every segment verified")
        return "\n".join(lines)


@dataclass
class ChainState:
    """What the walk over the records learnt that the file checks need."""

    complete: bool  # the walk started at seq 1, so "no earlier record" means there is none
    device: str | None = None
    segments: dict[str, dict[str, Any]] = field(default_factory=dict)  # by file: body + purged/where/seq/hash
    files_by_segment_id: dict[str, str] = field(default_factory=dict)
    sidecars: dict[str, dict[str, Any]] = field(default_factory=dict)  # by file: sidecar + segment/where
    hashed_sidecars: dict[str, set[str]] = field(default_factory=lambda: {"context": set(), "note": set()})
    receipts: dict[str, set[str]] = field(default_factory=dict)  # segment_id -> receipt_sha256 of receipt records
    recipient_sets: list[list[str]] = field(default_factory=list)  # key ids of every recipient set in force


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_only_rows(path: Path, sql: str) -> list[tuple]:
    """Rows of a query on a device database, opened read-only (the agent may be running)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def _records_from_db(path: Path, report: Report) -> Iterator[tuple[str, SignedRecord]]:
    try:
        rows = _read_only_rows(path, "SELECT seq, data, sig FROM ledger ORDER BY seq")
    except sqlite3.Error as exc:
        report.fail(str(path), f"ledger database unreadable: {exc}")
        return
    for seq, data, sig in rows:
        where = f"record seq {_short(seq)}"
        if not isinstance(data, bytes) or not isinstance(sig, bytes):
            report.fail(where, "ledger row's data or sig is not a BLOB (database edited)")
            continue
        yield where, SignedRecord(data, sig)


def _records_from_jsonl(path: Path, report: Report) -> Iterator[tuple[str, SignedRecord]]:
    try:
        with open(path, "rb") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{path.name} line {lineno}", SignedRecord.from_line(line)
                except RecordError as exc:
                    report.fail(f"{path.name} line {lineno}", str(exc))
    except OSError as exc:
        report.fail(path.name, f"cannot read: {exc}")


def find_ledger(root: Path) -> Path | None:
    for name in ("ledger.jsonl", "ledger.db"):
        if (root / name).exists():
            return root / name
    return None


def _is_plain_name(name: str) -> bool:
    """A name that can only mean a file directly inside `segments/` (no separator, never . or ..)."""
    return ("/" not in name and "\\" not in name and "\0" not in name
            and any(r.fullmatch(name) for r in _PLAIN_NAME_RES))


def _recipient_key_ids(recipients: list[str]) -> list[str]:
    return [Recipient.parse(r).key_id for r in recipients]


class Verifier:
    def __init__(self, identity: Identity | None = None, pinned_key: ec.EllipticCurvePublicKey | None = None,
                 check_segments: bool = True, receipt_key: ec.EllipticCurvePublicKey | None = None):
        """`identity`: the bureau's age identity (decrypt and check plaintext); `pinned_key`: the device
        key from its certificate (the genesis key must equal it); `receipt_key`: the bureau receipt key
        (check the receipts a data directory stores, §13)."""
        self.identity = identity
        self.pinned_key = pinned_key
        self.check_segments = check_segments
        self.receipt_key = receipt_key

    # --- entry points -------------------------------------------------------------------------------

    def verify_path(self, root: Path, *, start_seq: int = 1, start_prev: str = GENESIS_PREV,
                    key: ec.EllipticCurvePublicKey | None = None) -> Report:
        """Verify a data directory (ledger.db) or bundle (ledger.jsonl) with a `segments/` folder.

        For an incremental bundle (records from seq `start_seq` on), pass the SHA-256 of record
        `start_seq` − 1 as `start_prev` and the signing key in force there as `key` (or pin it)."""
        _check_anchor(start_seq, start_prev)
        report = Report(str(root), first_seq=start_seq)
        ledger = find_ledger(root)
        if ledger is None:
            report.fail(str(root), "no ledger.jsonl or ledger.db found")
            return report
        source = _records_from_jsonl if ledger.suffix == ".jsonl" else _records_from_db
        state = self._walk(source(ledger, report), report, start_seq, start_prev, key)
        if ledger.suffix == ".db":
            if (root / "journal.jsonl").exists():
                self.compare_journal(root / "journal.jsonl", ledger, report)
            if state.complete:
                self._check_stored_receipts(ledger, state, report)
        if self.check_segments:
            self._check_files(root / "segments", state, report)
        return report

    def verify_chain(self, records: Iterable[tuple[str, SignedRecord]], report: Report,
                     start_seq: int = 1, start_prev: str = GENESIS_PREV,
                     key: ec.EllipticCurvePublicKey | None = None) -> dict[str, dict[str, Any]]:
        """Check records in order; return segment bodies by file name (with a `purged` mark).

        `start_seq`/`start_prev`/`key` anchor a batch that continues a chain held elsewhere (the bureau's
        ingest): the first record must have seq `start_seq` and prev `start_prev`, and is checked with
        `key` (or the pinned key)."""
        return self._walk(records, report, start_seq, start_prev, key).segments

    def verify_segments(self, folder: Path, segments: dict[str, dict[str, Any]], report: Report) -> None:
        """Check the files in `folder` against segment bodies as returned by `verify_chain`."""
        state = ChainState(complete=True, segments=segments)
        for name, seg in segments.items():
            for sidecar in seg.get("sidecars", []):
                state.sidecars[sidecar["file"]] = dict(sidecar, segment=name, where=seg.get("where", name))
        self._check_files(folder, state, report)

    # --- the chain ----------------------------------------------------------------------------------

    def _walk(self, records: Iterable[tuple[str, SignedRecord]], report: Report, start_seq: int, start_prev: str,
              key: ec.EllipticCurvePublicKey | None) -> ChainState:
        state = ChainState(complete=start_seq == 1)
        expect_seq, expect_prev = start_seq, start_prev
        key = key or self.pinned_key
        report.key_pinned = self.pinned_key is not None
        genesis_seen = False
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
            seq, rtype = fields["seq"], fields["type"]
            where = f"record seq {seq} ({rtype if rtype in BODY_SCHEMAS else _short(rtype)})"
            if seq != expect_seq:
                kind = "gap (records missing)" if seq > expect_seq else "reordered or duplicated"
                report.fail(where, f"expected seq {expect_seq}: {kind}")
            if fields["prev"] != expect_prev:
                report.fail(where, "prev does not match the hash of the previous record (chain broken)")
            if state.device is None:
                state.device = fields["device"]
            elif fields["device"] != state.device:
                report.fail(where, f"device {_short(fields['device'])} differs from {state.device!r}")
            body = self._checked_body(fields, where, report)
            if seq == 1 and rtype != "device_init":
                report.fail(where, "the first record must be device_init")
            if rtype == "device_init":
                if seq != 1 or genesis_seen:
                    report.fail(where, "device_init appears only at seq 1; its key is not used")
                else:
                    genesis_seen = True
                    if body is not None:
                        key = self._genesis(body, key, where, report, state)
            if key is None:
                report.fail(where, "no signing key known (ledger does not start with a valid device_init)")
            else:
                try:
                    verify_es256(key, rec.data, rec.sig)
                    report.signatures_ok += 1
                except SignatureError as exc:
                    report.fail(where, str(exc))
            if body is not None:  # a body that failed its schema is reported above and used for nothing
                key = self._apply(rtype, body, seq, rec, where, key, report, state)
            expect_seq = seq + 1
            expect_prev = rec.hash
            report.head_seq, report.head_hash = seq, rec.hash
        report.key_id = key_id(key) if key is not None else None
        return state

    @staticmethod
    def _checked_body(fields: dict[str, Any], where: str, report: Report) -> dict[str, Any] | None:
        """The body in its schema's form, or None (reported) if it does not match its type's schema."""
        try:
            body = validate_body(fields["type"], fields["body"])
        except RecordError as exc:
            report.fail(where, str(exc))
            return None
        if body != fields["body"]:
            report.fail(where, "body is not in its schema's canonical form")
        return body

    def _genesis(self, body: dict[str, Any], key: ec.EllipticCurvePublicKey | None, where: str, report: Report,
                 state: ChainState) -> ec.EllipticCurvePublicKey | None:
        try:
            genesis_key = load_public_key(base64.b64decode(body["public_key"], validate=True))
        except (SignatureError, ValueError, UnsupportedAlgorithm) as exc:
            report.fail(where, f"genesis public key unreadable: {exc}")
            return key
        if body["key_id"] != key_id(genesis_key):
            report.fail(where, f"key_id {_short(body['key_id'])} is not the key id of public_key "
                               f"({key_id(genesis_key)})")
        self._note_recipients(body["recipients"], where, report, state)
        if key is None:
            return genesis_key
        if self.pinned_key is not None and public_key_der(genesis_key) != public_key_der(self.pinned_key):
            report.fail(where, "genesis key differs from the pinned device key")
        return key

    @staticmethod
    def _note_recipients(recipients: list[str], where: str, report: Report, state: ChainState) -> None:
        try:
            state.recipient_sets.append(_recipient_key_ids(recipients))
        except AgeError as exc:
            report.fail(where, f"recipient unreadable: {exc}")

    def _apply(self, rtype: str, body: dict[str, Any], seq: int, rec: SignedRecord, where: str,
               key: ec.EllipticCurvePublicKey | None, report: Report,
               state: ChainState) -> ec.EllipticCurvePublicKey | None:
        """Type-specific rules of a schema-valid record (§7, §12, §14.1); returns the key for later records."""
        if rtype == "key_change":
            if body["kind"] == "identity" and body["public_key"]:
                try:  # this record was signed by the old key; later records by the new one
                    return load_public_key(base64.b64decode(body["public_key"], validate=True))
                except (SignatureError, ValueError, UnsupportedAlgorithm) as exc:
                    report.fail(where, f"new identity key unreadable: {exc}")
            elif body["kind"] == "recipients" and body["recipients"] is not None:
                self._note_recipients(body["recipients"], where, report, state)
        elif rtype == "segment":
            self._segment_record(body, seq, rec, where, report, state)
        elif rtype == "receipt" and body["segment_id"] is not None:
            if body["segment_id"] not in state.files_by_segment_id:
                self._unanchored(where, f"receipt for segment {body['segment_id']} which has no earlier segment "
                                        "record", report, state)
            state.receipts.setdefault(body["segment_id"], set()).add(body["receipt_sha256"])
        elif rtype == "purge":
            self._purge_record(body, where, report, state)
        elif rtype in ("session_open", "session_context") and body["context_sha256"] is not None:
            state.hashed_sidecars["context"].add(body["context_sha256"])
        elif rtype == "marker" and body["note_sha256"] is not None:
            state.hashed_sidecars["note"].add(body["note_sha256"])
        return key

    @staticmethod
    def _unanchored(where: str, what: str, report: Report, state: ChainState) -> None:
        """A reference to an earlier record that is not here: a failure in a whole ledger; in a batch
        that starts later, the record may be in an earlier batch (noted, not checkable here)."""
        if state.complete:
            report.fail(where, what)
        else:
            report.notes.append(f"{where}: {what} in this batch (it may be in an earlier one; not checked)")

    def _segment_record(self, body: dict[str, Any], seq: int, rec: SignedRecord, where: str, report: Report,
                        state: ChainState) -> None:
        name = body["file"]
        if name in state.segments or name in state.sidecars:
            report.fail(where, f"second record for segment file {name}")
            return
        state.segments[name] = dict(body, purged=False, where=where, record_seq=seq, record_hash=rec.hash)
        state.files_by_segment_id[body["segment_id"]] = name
        if state.complete and state.recipient_sets and body["recipients"] not in state.recipient_sets:
            report.fail(where, f"encrypted to recipients {body['recipients']}, which were never the recipients "
                               "in force (device_init / key_change recipients)")
        for sidecar in body["sidecars"]:
            if sidecar["file"] in state.sidecars or sidecar["file"] in state.segments:
                report.fail(where, f"sidecar file {sidecar['file']} is already named by an earlier record")
                continue
            state.sidecars[sidecar["file"]] = dict(sidecar, segment=name, where=where)

    @staticmethod
    def _purge_record(body: dict[str, Any], where: str, report: Report, state: ChainState) -> None:
        seg = state.segments.get(body["file"])
        if seg is None:
            Verifier._unanchored(where, f"purge of {body['file']} which has no earlier segment record", report, state)
            return
        if seg["sha256_cipher"] != body["sha256_cipher"]:
            report.fail(where, "purge names a different ciphertext hash than the segment record")
            return
        if body["receipt_sha256"] not in state.receipts.get(body["segment_id"], set()):
            report.fail(where, "purge is not preceded by a receipt record for this segment with the same "
                               "receipt_sha256 (only receipted footage may be purged, R22)")
            return
        if seg["purged"]:
            report.fail(where, f"second purge of {body['file']}")
        seg["purged"] = True

    # --- the two copies of the ledger in a data directory ---------------------------------------------

    def compare_journal(self, journal: Path, db: Path, report: Report) -> None:
        """A data directory keeps each record twice (ledger.db and journal.jsonl); they must agree."""
        db_hashes: dict[Any, str] = {}
        for where, rec in _records_from_db(db, Report(str(db))):
            db_hashes[where.split()[-1]] = rec.hash
        extra = 0
        for where, rec in _records_from_jsonl(journal, Report(str(journal))):
            try:
                seq = rec.fields["seq"]
            except (CanonicalJSONError, KeyError, TypeError):
                continue
            if type(seq) is not int:
                continue
            if str(seq) not in db_hashes:
                extra += 1
            elif db_hashes[str(seq)] != rec.hash:
                report.fail(f"journal.jsonl ({where})", f"record seq {seq} differs from ledger.db")
        if extra:
            report.fail("ledger.db", f"{extra} record(s) in journal.jsonl are missing from the database "
                                     "(start the agent to restore them)")

    def _check_stored_receipts(self, db: Path, state: ChainState, report: Report) -> None:
        """Receipts the device stored (§13) must be those its `receipt` records hash, and, given the
        bureau receipt key, signed by it for exactly the recorded segment."""
        try:
            rows = _read_only_rows(db, "SELECT segment_id, receipt, sig FROM receipts ORDER BY segment_id")
        except sqlite3.Error as exc:
            report.fail(f"{db.name} receipts", f"unreadable: {exc}")
            return
        verifier = ReceiptVerifier(self.receipt_key) if self.receipt_key is not None else None
        for segment_id, data, sig in rows:
            where = f"{db.name} receipts ({_short(segment_id)})"
            if not isinstance(segment_id, str) or not isinstance(data, bytes) or not isinstance(sig, bytes):
                report.fail(where, "row is not (text, blob, blob): database edited")
                continue
            report.receipts_checked += 1
            if hashlib.sha256(data).hexdigest() not in state.receipts.get(segment_id, set()):
                report.fail(where, "stored receipt's SHA-256 is not the receipt_sha256 of a receipt record for "
                                   "this segment")
                continue
            seg = state.segments.get(state.files_by_segment_id.get(segment_id, ""))
            if verifier is None or seg is None or state.device is None:
                continue
            try:
                verifier.verify(data, sig, device=state.device, segment_id=segment_id,
                                sha256_cipher=seg["sha256_cipher"], size=seg["size"], record_seq=seg["record_seq"],
                                record_hash=seg["record_hash"])
            except ReceiptError as exc:
                report.fail(where, str(exc))

    # --- files ----------------------------------------------------------------------------------------

    def _check_files(self, folder: Path, state: ChainState, report: Report) -> None:
        entries: dict[str, os.DirEntry[str]] = {}
        if folder.is_dir():
            try:
                with os.scandir(folder) as it:
                    entries = {e.name: e for e in it}
            except OSError as exc:
                report.fail(f"{folder.name}/", f"cannot list: {exc}")
        for name in sorted(entries):
            where = f"segments/{name}"
            if name.endswith(PART_SUFFIX):
                report.fail(where, "unfinished segment (open now, or not yet recovered after a crash)")
            elif name in state.segments or name in state.sidecars:
                continue  # checked below, against its record
            elif (m := HASHED_SIDECAR_RE.fullmatch(name)) and m[1] in state.hashed_sidecars[m[2]]:
                self._check_hashed_sidecar(folder, name, m[1], report)
            else:
                report.fail(where, "file is not accounted for by any segment record")
        for kind, hashes in state.hashed_sidecars.items():
            for digest in sorted(hashes):
                if f"{digest}.{kind}{SEGMENT_SUFFIX}" not in entries:
                    report.fail(f"segments/{digest}.{kind}{SEGMENT_SUFFIX}",
                                f"missing: a record carries this {kind} sidecar's hash")
        for name, seg in state.segments.items():
            report.segments += 1
            if seg["truncated"]:
                report.segments_truncated += 1
            if name not in entries:
                if seg["purged"]:
                    report.segments_purged += 1
                else:
                    report.fail(f"segments/{name}", f"missing (recorded at {seg['where']}, never purged)")
                continue
            if self._check_segment(folder, name, seg, report):
                report.segments_ok += 1
        for name, sidecar in state.sidecars.items():
            report.sidecars += 1
            owner = state.segments.get(sidecar["segment"], {})
            if name not in entries:
                if not owner.get("purged"):
                    report.fail(f"segments/{name}", f"missing sidecar (recorded at {sidecar['where']}, "
                                                    "segment never purged)")
                continue
            if self._check_sidecar(folder, name, sidecar, report):
                report.sidecars_ok += 1

    @staticmethod
    def _open(folder: Path, name: str, report: Report) -> BinaryIO | None:
        """Open `segments/<name>` for reading, or report why not. Never leaves the folder: the name must be
        a plain file name and the entry a regular file (a symbolic link is not followed)."""
        where = f"segments/{name}"
        if not _is_plain_name(name):
            report.fail(where, "refusing to open: not a plain file name inside segments/")
            return None
        try:
            fd = os.open(folder / name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError as exc:
            report.fail(where, f"cannot open (a symbolic link or unreadable): {exc.strerror or exc}")
            return None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            report.fail(where, "not a regular file: not opened")
            return None
        return os.fdopen(fd, "rb")

    def _hash_file(self, fh: BinaryIO, prefix: int = 0) -> tuple[str, str, int]:
        """SHA-256 of the whole file and of its first `prefix` bytes, and its length, in one pass."""
        whole, head = hashlib.sha256(), hashlib.sha256()
        pos = 0
        while block := fh.read(_READ_BLOCK):
            whole.update(block)
            if pos < prefix:
                head.update(block[: prefix - pos])
            pos += len(block)
        return whole.hexdigest(), head.hexdigest(), pos

    def _decrypt(self, fh: BinaryIO, truncated: bool) -> tuple[str, int]:
        assert self.identity is not None
        plain, size = hashlib.sha256(), 0
        for chunk in AgeDecryptor(self.identity).chunks(fh, allow_truncated=truncated):
            plain.update(chunk)
            size += len(chunk)
        return plain.hexdigest(), size

    def _check_segment(self, folder: Path, name: str, seg: dict[str, Any], report: Report) -> bool:
        where = f"segments/{name}"
        fh = self._open(folder, name, report)
        if fh is None:
            return False
        with fh:
            try:
                size = os.fstat(fh.fileno()).st_size
                if size != seg["size"]:
                    report.fail(where, f"size {size} differs from recorded {seg['size']}")
                    return False
                try:
                    header = read_header(fh)
                except AgeError:
                    header = None
                fh.seek(0)
                cipher, complete, _ = self._hash_file(fh, seg["complete_size"])
                report.bytes_checked += size
                if cipher != seg["sha256_cipher"]:
                    report.fail(where, "ciphertext SHA-256 differs from the record (file altered or swapped)")
                    return False
                if not self._layout_holds(seg, header, complete, where, report):
                    return False
                if seg["truncated"] and seg["complete_size"] == 0:
                    # Recovery found no complete age header (and payload nonce): a power cut while the segment
                    # was being created leaves such a file. It holds no footage, unless fragments had been written.
                    if seg["fragments"]:
                        report.fail(where, f"no readable age header although {seg['fragments']} fragment(s) had "
                                           "been written: footage damaged before recovery")
                        return False
                    report.notes.append(f"{where}: cut before its age header was complete; holds no footage")
                    return True
                if self.identity is None:
                    return True
                fh.seek(0)
                try:
                    plain, plain_size = self._decrypt(fh, seg["truncated"])
                except ValueError as exc:  # AgeError, or a hostile key share X25519 refuses
                    report.fail(where, f"decryption failed: {exc}")
                    return False
            except OSError as exc:
                report.fail(where, f"read error: {exc}")
                return False
        report.decrypted += 1
        if seg["truncated"]:
            if plain_size < seg["chunks"] * CHUNK_SIZE:
                report.fail(where, f"decrypted {plain_size} bytes, fewer than its {seg['chunks']} complete chunk(s) "
                                   f"hold ({seg['chunks'] * CHUNK_SIZE})")
                return False
        elif plain != seg["sha256_plain"] or plain_size != seg["plain_size"]:
            report.fail(where, "plaintext hash or size differs from the record")
            return False
        return True

    @staticmethod
    def _layout_holds(seg: dict[str, Any], header: Any, complete_digest: str, where: str, report: Report) -> bool:
        """The relations of §10.4 that need no key: complete_size/sha256_complete, chunk arithmetic,
        one X25519 stanza per recorded recipient."""
        size, chunks, complete_size = seg["size"], seg["chunks"], seg["complete_size"]
        problems = []
        if complete_size > size:
            problems.append(f"complete_size {complete_size} exceeds size {size}")
        elif complete_digest != seg["sha256_complete"]:
            problems.append("sha256_complete differs from the SHA-256 of the first complete_size bytes")
        if not seg["truncated"] and (complete_size != size or seg["sha256_complete"] != seg["sha256_cipher"]):
            problems.append("a segment that is not truncated must have complete_size = size and "
                            "sha256_complete = sha256_cipher")
        if seg["truncated"] and complete_size == 0:
            pass  # no header survived: nothing more to relate (S5a decides)
        elif header is None:
            problems.append("age header unreadable")
        else:
            start = header.payload_offset
            if seg["truncated"]:
                if complete_size != start + chunks * CIPHER_CHUNK_SIZE:
                    problems.append(f"complete_size {complete_size} is not the payload start {start} plus "
                                    f"{chunks} whole chunk(s)")
            else:
                last = size - start - (chunks - 1) * CIPHER_CHUNK_SIZE
                if chunks < 1 or not (16 < last <= CIPHER_CHUNK_SIZE or (last == 16 and chunks == 1)):
                    problems.append(f"size {size} is not the payload start {start} plus {chunks} chunk(s), "
                                    "the last one short and not empty")
            stanzas = len(header.stanzas)
            x25519 = sum(1 for args, _ in header.stanzas if args[0] == b"X25519")
            if stanzas != x25519 or stanzas != len(seg["recipients"]):
                problems.append(f"header has {x25519} X25519 stanza(s) of {stanzas}; the record lists "
                                f"{len(seg['recipients'])} recipient(s)")
        for what in problems:
            report.fail(where, what)
        return not problems

    def _check_sidecar(self, folder: Path, name: str, sidecar: dict[str, Any], report: Report) -> bool:
        where = f"segments/{name}"
        fh = self._open(folder, name, report)
        if fh is None:
            return False
        with fh:
            try:
                digest, _, size = self._hash_file(fh)
                report.bytes_checked += size
                if size != sidecar["size"] or digest != sidecar["sha256_cipher"]:
                    report.fail(where, f"sidecar size or SHA-256 differs from its segment record ({sidecar['where']})")
                    return False
                if self.identity is not None:
                    fh.seek(0)
                    self._decrypt(fh, truncated=False)
                    report.decrypted += 1
            except ValueError as exc:
                report.fail(where, f"sidecar decryption failed: {exc}")
                return False
            except OSError as exc:
                report.fail(where, f"read error: {exc}")
                return False
        return True

    def _check_hashed_sidecar(self, folder: Path, name: str, digest: str, report: Report) -> None:
        where = f"segments/{name}"
        fh = self._open(folder, name, report)
        if fh is None:
            return
        with fh:
            try:
                actual, _, size = self._hash_file(fh)
                report.bytes_checked += size
                if actual != digest:
                    report.fail(where, "SHA-256 differs from the hash in its name (file altered or swapped)")
                    return
                if self.identity is not None:
                    fh.seek(0)
                    self._decrypt(fh, truncated=False)
                    report.decrypted += 1
            except ValueError as exc:
                report.fail(where, f"sidecar decryption failed: {exc}")
            except OSError as exc:
                report.fail(where, f"read error: {exc}")


def _check_anchor(start_seq: int, start_prev: str) -> None:
    """Caller errors (not data errors): the anchor of a batch must be a real position."""
    if type(start_seq) is not int or start_seq < 1:
        raise ValueError(f"start_seq must be an integer >= 1, got {start_seq!r}")
    if not isinstance(start_prev, str) or not _HEX64_RE.fullmatch(start_prev):
        raise ValueError("start_prev must be 64 lowercase hex digits")


def verify_batch(path: Path, *, start_seq: int, start_prev: str, key: ec.EllipticCurvePublicKey,
                 identity: Identity | None = None) -> Report:
    """Verify an incremental export: records from `start_seq` on, continuing a chain the caller holds.

    `start_prev` is the SHA-256 of record `start_seq` − 1 and `key` the device key in force there (both
    known from the earlier batches). `path` is a `ledger.jsonl` file (chain only) or a bundle directory
    (chain, then the segment files its records name). Raises ValueError only for a bad anchor; every
    problem with the data is in the report."""
    verifier = Verifier(identity=identity)
    if path.is_dir():
        return verifier.verify_path(path, start_seq=start_seq, start_prev=start_prev, key=key)
    _check_anchor(start_seq, start_prev)
    report = Report(str(path), first_seq=start_seq)
    verifier.verify_chain(_records_from_jsonl(path, report), report, start_seq, start_prev, key)
    return report


def load_pinned_key(path: Path | None) -> ec.EllipticCurvePublicKey | None:
    if path is None:
        return None
    try:
        return load_public_key(path.read_bytes())
    except (OSError, SignatureError) as exc:
        raise SignatureError(f"{path}: {exc}") from exc
