"""An independent verifier written only from docs/FORMAT.md, run against stores the real code made (R5, R20-R23).

The verifier half of this module uses the Python standard library, the `openssl` command for ES256 and the
stock `age` command for decryption; it never imports `agent.evidence`. The record body tables it checks
against are parsed out of FORMAT.md itself. If it accepts what the device writes and rejects tampered
copies, FORMAT.md is enough to write a verifier, and its tables say what the code really stores.

The producer half (fixtures) drives the real store through `agent.storage` and `tests.conftest`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import sqlite3
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.storage.keys import PemFileSigner
from agent.storage.segment_writer import FragmentInfo, SegmentWriter
from tests.conftest import DEVICE_ID, write_segment

FORMAT_MD = Path(__file__).resolve().parents[1] / "docs" / "FORMAT.md"

# ---------------------------------------------------------------------------------------------------
# The verifier, from FORMAT.md
# ---------------------------------------------------------------------------------------------------

GENESIS_PREV = "0" * 64  # §7 rule 2
CHUNK = 65536  # §10.2
CIPHER_CHUNK = CHUNK + 16
ENVELOPE = {"v", "device", "seq", "prev", "type", "wall_us", "mono_us", "clock", "body"}  # §5
QUALITIES = {"synced", "free_running", "unset"}
RECEIPT_KEYS = {"v", "type", "device", "segment_id", "sha256_cipher", "size", "record_seq", "record_hash",
                "stored_wall_us", "bureau_key_id"}  # §13
HEX64 = re.compile(r"[0-9a-f]{64}")
ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")  # §8, matched as a whole
SEGMENT_FILE = re.compile(ID.pattern + r"\.age")  # §8 `segment file`
SIDECAR_FILE = re.compile(ID.pattern + r"\.(gps|context)\.age")  # §8 `sidecar file`
SIDECAR_TAG = {"gps_track": "gps", "context": "context"}  # §10.5
HASH_NAMED_SIDECAR = re.compile(r"([0-9a-f]{64})\.(context|note)\.age")  # §10.5
MAX_INT = 2**53 - 1


class NotCanonical(ValueError):
    pass


# --- §4 canonical JSON ------------------------------------------------------------------------------

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _jcs(value: Any, out: list[str]) -> None:
    if value is None or isinstance(value, bool):
        out.append({None: "null", True: "true", False: "false"}[value])
    elif isinstance(value, int):
        if not -MAX_INT <= value <= MAX_INT:
            raise NotCanonical(f"integer {value} out of range")
        out.append(str(value))
    elif isinstance(value, str):
        out.append('"' + "".join(_ESCAPES.get(c) or (f"\\u{ord(c):04x}" if c < " " else c) for c in value) + '"')
    elif isinstance(value, list):
        out.append("[")
        for i, item in enumerate(value):
            out.append("," if i else "")
            _jcs(item, out)
        out.append("]")
    elif isinstance(value, dict):
        out.append("{")
        for i, key in enumerate(sorted(value, key=lambda k: k.encode("utf-16-be", "surrogatepass"))):
            out.append("," if i else "")
            _jcs(key, out)
            out.append(":")
            _jcs(value[key], out)
        out.append("}")
    else:
        raise NotCanonical(f"{type(value).__name__} is not allowed")


def canonical(value: Any) -> bytes:
    out: list[str] = []
    _jcs(value, out)
    try:
        return "".join(out).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise NotCanonical("lone surrogate") from exc


def parse_canonical(data: bytes) -> Any:
    def no_floats(token: str) -> Any:
        raise NotCanonical(f"non-integer number {token}")

    try:
        value = json.loads(data.decode("utf-8"), parse_float=no_floats, parse_constant=no_floats)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NotCanonical(str(exc)) from exc
    if canonical(value) != data:
        raise NotCanonical("not the canonical encoding")
    return value


# --- §6 keys and signatures -------------------------------------------------------------------------


def spki_pem(der: bytes) -> bytes:
    b64 = base64.b64encode(der).decode()
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return ("-----BEGIN PUBLIC KEY-----\n" + "\n".join(lines) + "\n-----END PUBLIC KEY-----\n").encode()


def key_id_of_spki(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()[:16]


class OpenSSL:
    """ES256 checks with the stock `openssl` command, in a scratch directory."""

    def __init__(self, work: Path):
        self.work = work
        work.mkdir(parents=True, exist_ok=True)

    def pem_is_p256_key(self, pem: bytes) -> bool:
        (self.work / "probe.pem").write_bytes(pem)
        out = subprocess.run(["openssl", "pkey", "-pubin", "-in", "probe.pem", "-noout", "-text"], cwd=self.work,
                             capture_output=True, text=True)
        return out.returncode == 0 and ("P-256" in out.stdout or "prime256v1" in out.stdout)

    def verify(self, pem: bytes, data: bytes, sig: bytes) -> bool:
        (self.work / "key.pem").write_bytes(pem)
        (self.work / "msg").write_bytes(data)
        (self.work / "sig").write_bytes(sig)
        out = subprocess.run(["openssl", "dgst", "-sha256", "-verify", "key.pem", "-signature", "sig", "msg"],
                             cwd=self.work, capture_output=True, text=True)
        return out.returncode == 0 and "Verified OK" in out.stdout


# --- §10.2 Bech32 recipients, for recipient key ids ---------------------------------------------------

_BECH32 = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"


def recipient_key_id(recipient: str) -> str:
    """Key id of an `age1...` recipient: first 16 hex of SHA-256 of its 32-byte X25519 key (§6)."""
    text = recipient.lower()
    hrp, _, rest = text.rpartition("1")
    values = [_BECH32.index(c) for c in rest]
    chk = 1
    for v in [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp] + values:
        top = chk >> 25
        chk = (chk & 0x1FFFFFF) << 5 ^ v
        for i, g in enumerate((0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)):
            chk ^= g if (top >> i) & 1 else 0
    assert hrp == "age" and chk == 1, f"bad recipient {recipient}"
    acc = bits = 0
    raw = bytearray()
    for v in values[:-6]:
        acc, bits = (acc << 5) | v, bits + 5
        if bits >= 8:
            bits -= 8
            raw.append((acc >> bits) & 0xFF)
    assert len(raw) == 32
    return hashlib.sha256(bytes(raw)).hexdigest()[:16]


def read_age_header(path: Path) -> tuple[int, int] | None:
    """(header length, number of X25519 stanzas) read without a key (§10.2), or None if incomplete."""
    data = path.read_bytes()[: 64 * 1024]
    lines = data.split(b"\n")
    if len(lines) < 2 or lines[0] != b"age-encryption.org/v1":
        return None
    offset, stanzas, i = len(lines[0]) + 1, 0, 1
    while i < len(lines) - 1:
        line = lines[i]
        offset += len(line) + 1
        if line.startswith(b"--- "):
            return offset, stanzas
        if not line.startswith(b"-> "):
            return None
        stanzas += line.split(b" ")[1] == b"X25519"
        i += 1
        while i < len(lines) - 1:  # body lines: full 64-column lines, then a shorter one
            offset += len(lines[i]) + 1
            i += 1
            if len(lines[i - 1]) < 64:
                break
    return None


# --- §8 body tables, read from FORMAT.md --------------------------------------------------------------


@dataclass
class FieldSpec:
    type: str
    required: bool
    default: Any = None


def load_body_tables() -> tuple[dict[str, dict[str, FieldSpec]], set[str]]:
    """({schema name: {field: spec}}, record type names) from the '#### `name`' tables of FORMAT.md."""
    tables: dict[str, dict[str, FieldSpec]] = {}
    record_types: set[str] = set()
    current = None
    for line in FORMAT_MD.read_text(encoding="utf-8").splitlines():
        heading = re.match(r"^#### `([a-z_]+)`(.*)$", line)
        if heading:
            current = heading[1]
            tables[current] = {}
            if "sub-object" not in heading[2]:
                record_types.add(current)
            continue
        if line.startswith("#"):
            current = None
        elif current and line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            required = cells[2] == "yes"
            default = None if required else json.loads(re.search(r"default `(.*)`", cells[2])[1])
            tables[current][cells[0].strip("`")] = FieldSpec(cells[1].replace("`", ""), required, default)
    return tables, record_types


TABLES, RECORD_TYPES = load_body_tables()


def type_ok(t: str, v: Any) -> bool:
    if t.endswith(" or null"):
        return v is None or type_ok(t[: -len(" or null")], v)
    if t.startswith("one of "):
        return isinstance(v, str) and v in [x.strip() for x in t[len("one of "):].split(",")]
    if t.startswith("list of "):
        return isinstance(v, list) and all(type_ok(t[len("list of "):], x) for x in v)
    is_int = isinstance(v, int) and not isinstance(v, bool)
    simple = {"string": isinstance(v, str), "id": isinstance(v, str) and ID.fullmatch(v) is not None,
              "hex64": isinstance(v, str) and HEX64.fullmatch(v) is not None, "int": is_int,
              "segment file": isinstance(v, str) and SEGMENT_FILE.fullmatch(v) is not None,
              "sidecar file": isinstance(v, str) and SIDECAR_FILE.fullmatch(v) is not None,
              "int ≥ 0": is_int and v >= 0, "bool": isinstance(v, bool), "object": isinstance(v, dict)}
    if t in simple:
        return simple[t]
    if t in TABLES:  # a sub-object such as `sidecar`
        return isinstance(v, dict) and not body_problems(t, v)
    raise AssertionError(f"FORMAT.md uses an undefined type word {t!r}")


def body_problems(rtype: str, body: Any) -> list[str]:
    if rtype not in RECORD_TYPES and rtype != "sidecar":
        return [f"unknown record type {rtype!r}"]
    table = TABLES[rtype]
    if not isinstance(body, dict):
        return [f"{rtype} body is not an object"]
    out = []
    if set(body) != set(table):
        out.append(f"{rtype} body keys: missing {sorted(set(table) - set(body))}, "
                   f"unexpected {sorted(set(body) - set(table))}")
    out += [f"{rtype}.{name} = {body[name]!r} is not {spec.type}"
            for name, spec in table.items() if name in body and not type_ok(spec.type, body[name])]
    if not out and rtype in ("segment", "purge") and body["file"] != body["segment_id"] + ".age":
        out.append(f"{rtype}.file is not segment_id + .age")  # §8 `segment file`
    if not out and rtype == "segment":
        kinds = [sc["kind"] for sc in body["sidecars"]]
        if len(set(kinds)) != len(kinds) or any(
                sc["file"] != f"{body['segment_id']}.{SIDECAR_TAG[sc['kind']]}.age" for sc in body["sidecars"]):
            out.append("segment.sidecars: file names do not follow the segment id, or a kind twice")  # §8, §10.5
    return out


# --- §14 the verifier ---------------------------------------------------------------------------------


@dataclass
class Result:
    problems: list[str] = field(default_factory=list)
    records: int = 0
    signatures_ok: int = 0
    segments: int = 0
    purged: int = 0
    truncated: int = 0
    decrypted: int = 0
    receipts_checked: int = 0
    sidecars_decrypted: int = 0
    head: tuple[int, str] = (0, GENESIS_PREV)

    def fail(self, where: str, what: str) -> None:
        self.problems.append(f"{where}: {what}")


def read_ledger(root: Path, result: Result) -> list[tuple[str, bytes, bytes]]:
    """(where, record bytes, DER signature) in file order, from ledger.jsonl (§9) or ledger.db (§2)."""
    if (root / "ledger.jsonl").exists():
        out = []
        for n, raw in enumerate((root / "ledger.jsonl").read_bytes().split(b"\n"), 1):
            if not raw.strip():
                continue
            try:
                obj = parse_canonical(raw)
                if not isinstance(obj, dict) or set(obj) != {"rec", "sig"} or not isinstance(obj["sig"], str):
                    raise NotCanonical('not {"rec":...,"sig":"..."}')
                sig = base64.b64decode(obj["sig"], validate=True)
            except (NotCanonical, ValueError) as exc:
                result.fail(f"ledger.jsonl line {n}", f"bad export line: {exc}")
                continue
            data = raw[len(b'{"rec":') : raw.rindex(b',"sig":"')]
            assert data == canonical(obj["rec"])
            out.append((f"ledger.jsonl line {n}", data, sig))
        return out
    conn = sqlite3.connect(f"file:{root / 'ledger.db'}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT seq, data, sig FROM ledger ORDER BY seq").fetchall()
    finally:
        conn.close()
    return [(f"ledger.db seq {seq}", bytes(data), bytes(sig)) for seq, data, sig in rows]


def envelope_problem(rec: Any) -> str | None:
    """§5: exactly the nine keys, with their types."""
    if not isinstance(rec, dict) or set(rec) != ENVELOPE:
        return "envelope keys"
    checks = {
        "v": type(rec["v"]) is int and rec["v"] == 1,
        "device": isinstance(rec["device"], str),
        "seq": type(rec["seq"]) is int and rec["seq"] >= 1,
        "prev": isinstance(rec["prev"], str) and HEX64.fullmatch(rec["prev"]) is not None,
        "type": isinstance(rec["type"], str),
        "wall_us": type(rec["wall_us"]) is int,
        "mono_us": type(rec["mono_us"]) is int,
        "clock": isinstance(rec["clock"], dict) and set(rec["clock"]) == {"source", "quality"}
        and isinstance(rec["clock"]["source"], str) and rec["clock"]["quality"] in QUALITIES,
        "body": isinstance(rec["body"], dict),
    }
    bad = [k for k, ok in checks.items() if not ok]
    return f"bad envelope field(s) {bad}" if bad else None


@dataclass
class Chain:
    key_pem: bytes | None = None
    recipients: list[str] = field(default_factory=list)
    device: str | None = None
    segments: dict[str, dict[str, Any]] = field(default_factory=dict)  # by file name
    receipts: dict[str, str] = field(default_factory=dict)  # segment_id -> receipt_sha256
    recipient_sets: list[list[str]] = field(default_factory=list)  # key ids of every set in force so far (§14.1 C11)
    sidecars: dict[str, dict[str, Any]] = field(default_factory=dict)  # by file name (§10.5)
    hashed: set[str] = field(default_factory=set)  # "<sha256>.<kind>.age" names records carry (§10.5)


def verify_chain(records: list[tuple[str, bytes, bytes]], result: Result, ssl: OpenSSL,
                 pinned_pem: bytes | None = None) -> Chain:
    """§7 and §14.1 (C1-C11), plus the §14.3 checks that concern records."""
    chain = Chain(key_pem=pinned_pem)  # a pinned key is in force from the start (§14.1 C6)
    expect_seq, expect_prev = 1, GENESIS_PREV
    for where, data, sig in records:
        result.records += 1
        digest = hashlib.sha256(data).hexdigest()
        try:
            rec = parse_canonical(data)
            bad = envelope_problem(rec)
        except NotCanonical as exc:
            rec, bad = None, f"not canonical JSON: {exc}"
        if bad:
            result.fail(where, f"malformed record: {bad}")
            expect_seq, expect_prev = expect_seq + 1, digest
            continue
        seq, rtype, body = rec["seq"], rec["type"], rec["body"]
        where = f"record seq {seq} ({rtype})"
        if seq != expect_seq:
            result.fail(where, f"expected seq {expect_seq}: " + ("gap" if seq > expect_seq else "reordered"))
        if rec["prev"] != expect_prev:
            result.fail(where, "prev is not the SHA-256 of the previous record (chain broken)")
        chain.device = chain.device or rec["device"]
        if rec["device"] != chain.device:
            result.fail(where, "device differs from the first record's")
        if (seq == 1) != (rtype == "device_init"):
            result.fail(where, "device_init must be the record at seq 1, and only there")
        schema = body_problems(rtype, body)
        for problem in schema:
            result.fail(where, problem)
        if rtype == "device_init" and not schema:
            der = base64.b64decode(body["public_key"])
            pem = spki_pem(der)
            if not ssl.pem_is_p256_key(pem):
                result.fail(where, "genesis public key is not a P-256 key")
            if key_id_of_spki(der) != body["key_id"]:
                result.fail(where, "key_id is not the key id of public_key")
            if pinned_pem is not None and pem != pinned_pem:
                result.fail(where, "genesis key differs from the pinned device key")
            if seq == 1:
                chain.key_pem = chain.key_pem or pem
                chain.recipients = list(body["recipients"])
                chain.recipient_sets.append([recipient_key_id(r) for r in chain.recipients])
        if chain.key_pem is None:
            result.fail(where, "no signing key known")
        elif ssl.verify(chain.key_pem, data, sig):
            result.signatures_ok += 1
        else:
            result.fail(where, "ES256 signature does not verify")
        if not schema:
            note_record(chain, rtype, body, seq, digest, where, result)
        expect_seq, expect_prev = seq + 1, digest
        result.head = (seq, digest)
    return chain


def note_record(chain: Chain, rtype: str, body: dict[str, Any], seq: int, digest: str, where: str,
                result: Result) -> None:
    if rtype == "key_change" and body["kind"] == "identity" and body["public_key"] is not None:
        chain.key_pem = spki_pem(base64.b64decode(body["public_key"]))  # in force from the next record
    elif rtype == "key_change" and body["kind"] == "recipients" and body["recipients"] is not None:
        chain.recipients = list(body["recipients"])
        chain.recipient_sets.append([recipient_key_id(r) for r in chain.recipients])
    elif rtype == "segment":
        if body["file"] in chain.segments:
            result.fail(where, f"second segment record for {body['file']}")
        if body["recipients"] not in chain.recipient_sets:
            result.fail(where, f"recipients {body['recipients']} were never those in force")
        chain.segments[body["file"]] = dict(body, seq=seq, hash=digest, purged=False, where=where)
        for sc in body["sidecars"]:
            chain.sidecars[sc["file"]] = dict(sc, segment=body["file"])
    elif rtype == "receipt" and body["segment_id"] is not None:
        if body["segment_id"] not in {s["segment_id"] for s in chain.segments.values()}:
            result.fail(where, "receipt for a segment with no earlier segment record")
        chain.receipts[body["segment_id"]] = body["receipt_sha256"]
    elif rtype in ("session_open", "session_context") and body["context_sha256"] is not None:
        chain.hashed.add(f"{body['context_sha256']}.context.age")
    elif rtype == "marker" and body["note_sha256"] is not None:
        chain.hashed.add(f"{body['note_sha256']}.note.age")
    elif rtype == "purge":
        seg = chain.segments.get(body["file"])
        if seg is None or seg["sha256_cipher"] != body["sha256_cipher"]:
            result.fail(where, f"purge of {body['file']} matches no earlier segment record")
        elif chain.receipts.get(body["segment_id"]) != body["receipt_sha256"]:
            result.fail(where, "purge is not preceded by the receipt record it names")
        else:
            seg["purged"] = True


def sha256_prefix(path: Path, n: int) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read(n)).hexdigest()


def verify_segment_file(path: Path, seg: dict[str, Any], result: Result, identity: Path | None,
                        work: Path) -> None:
    """§14.2 S4-S7 and the §14.3 file checks."""
    where = f"segments/{path.name}"
    data = path.read_bytes()
    if len(data) != seg["size"]:
        result.fail(where, f"size {len(data)} differs from recorded {seg['size']}")
        return
    if hashlib.sha256(data).hexdigest() != seg["sha256_cipher"]:
        result.fail(where, "ciphertext SHA-256 differs from the record")
        return
    if seg["file"] != seg["segment_id"] + ".age":
        result.fail(where, "file name is not <segment_id>.age")
    size, chunks, complete = seg["size"], seg["chunks"], seg["complete_size"]
    if complete > size or sha256_prefix(path, complete) != seg["sha256_complete"]:
        result.fail(where, "complete_size / sha256_complete do not describe the file")
    header = read_age_header(path)
    if seg["truncated"]:
        result.truncated += 1
        if header is None:
            ok = chunks == 0 and complete == 0
        else:
            ok = complete == (header[0] + 16 + chunks * CIPHER_CHUNK if size >= header[0] + 16 else 0)
    else:
        last = size - (header[0] + 16) - (chunks - 1) * CIPHER_CHUNK if header else -1
        ok = header is not None and complete == size and seg["sha256_complete"] == seg["sha256_cipher"] and (
            17 <= last <= CIPHER_CHUNK or (chunks == 1 and last == 16))
    if not ok:
        result.fail(where, "chunks / complete_size do not match the file's chunk layout")
    if header is not None and header[1] != len(seg["recipients"]):
        result.fail(where, f"{header[1]} X25519 stanzas for {len(seg['recipients'])} recipients")
    if seg["truncated"] and complete == 0:  # S5a: cut while the file was being created
        if seg["fragments"]:
            result.fail(where, f"no readable age header although {seg['fragments']} fragment(s) were written")
        return
    if identity is None:
        return
    out = work / "plain"
    age = subprocess.run(["age", "-d", "-i", str(identity), "-o", str(out), str(path)], capture_output=True)
    plain = out.read_bytes() if out.exists() else b""
    out.unlink(missing_ok=True)
    if seg["truncated"]:
        if len(plain) < chunks * CHUNK:
            result.fail(where, f"only {len(plain)} plaintext bytes authentic, {chunks} chunks recorded")
            return
    elif age.returncode != 0:
        result.fail(where, f"decryption failed: {age.stderr.decode(errors='replace').strip()}")
        return
    elif len(plain) != seg["plain_size"] or hashlib.sha256(plain).hexdigest() != seg["sha256_plain"]:
        result.fail(where, "plaintext hash or size differs from the record")
        return
    result.decrypted += 1


def verify_receipts(root: Path, chain: Chain, receipt_pem: bytes, result: Result, ssl: OpenSSL) -> None:
    """§13: every receipt the device stored is the bureau's, and is the one its receipt record names."""
    conn = sqlite3.connect(f"file:{root / 'ledger.db'}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT segment_id, receipt, sig FROM receipts").fetchall()
    finally:
        conn.close()
    by_id = {s["segment_id"]: s for s in chain.segments.values()}
    for segment_id, receipt, sig in rows:
        where = f"receipt for {segment_id}"
        receipt, sig = bytes(receipt), bytes(sig)
        if not ssl.verify(receipt_pem, receipt, sig):
            result.fail(where, "not signed by the bureau receipt key")
            continue
        fields = parse_canonical(receipt)
        seg = by_id.get(segment_id)
        expected = seg and {"v": 1, "type": "segment_receipt", "device": chain.device, "segment_id": segment_id,
                            "sha256_cipher": seg["sha256_cipher"], "size": seg["size"],
                            "record_seq": seg["seq"], "record_hash": seg["hash"]}
        if set(fields) != RECEIPT_KEYS or not expected or any(fields[k] != v for k, v in expected.items()):
            result.fail(where, "receipt fields do not match the segment record")
        if chain.receipts.get(segment_id) != hashlib.sha256(receipt).hexdigest():
            result.fail(where, "receipt SHA-256 differs from its receipt record")
        result.receipts_checked += 1


def verify_sidecar_decrypts(path: Path, result: Result, identity: Path) -> None:
    age = subprocess.run(["age", "-d", "-i", str(identity), str(path)], capture_output=True)
    if age.returncode != 0:
        result.fail(f"segments/{path.name}", f"sidecar decryption failed: {age.stderr.decode(errors='replace')}")
    else:
        result.sidecars_decrypted += 1


def verify(root: Path, work: Path, identity: Path | None = None, pinned_pem: bytes | None = None,
           receipt_pem: bytes | None = None) -> Result:
    """Verify a data directory or a bundle as FORMAT.md §14 says."""
    result = Result()
    ssl = OpenSSL(work)
    chain = verify_chain(read_ledger(root, result), result, ssl, pinned_pem)
    folder = root / "segments"
    present = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    for name in sorted(present):
        if name.endswith(".part"):
            result.fail(f"segments/{name}", "unfinished segment")
        elif name not in chain.segments and name not in chain.sidecars and name not in chain.hashed:
            result.fail(f"segments/{name}", "not accounted for by any segment record")
    for name, sidecar in chain.sidecars.items():  # §14.2 S8
        if name not in present:
            if not chain.segments[sidecar["segment"]]["purged"]:
                result.fail(f"segments/{name}", "sidecar missing and its segment never purged")
            continue
        data = (folder / name).read_bytes()
        if len(data) != sidecar["size"] or hashlib.sha256(data).hexdigest() != sidecar["sha256_cipher"]:
            result.fail(f"segments/{name}", "sidecar size or SHA-256 differs from its segment record")
        elif identity is not None:
            verify_sidecar_decrypts(folder / name, result, identity)
    for name in sorted(chain.hashed):  # §14.2 S9
        if name not in present:
            result.fail(f"segments/{name}", "missing sidecar whose hash a record carries")
        elif hashlib.sha256((folder / name).read_bytes()).hexdigest() != HASH_NAMED_SIDECAR.fullmatch(name)[1]:
            result.fail(f"segments/{name}", "SHA-256 differs from its name")
        elif identity is not None:
            verify_sidecar_decrypts(folder / name, result, identity)
    for name, seg in chain.segments.items():
        result.segments += 1
        if name not in present:
            if seg["purged"]:
                result.purged += 1
            else:
                result.fail(f"segments/{name}", "missing and never purged")
            continue
        verify_segment_file(folder / name, seg, result, identity, work)
    if receipt_pem is not None and (root / "ledger.db").exists():
        verify_receipts(root, chain, receipt_pem, result, ssl)
    if result.records == 0:
        result.fail(str(root), "no records")
    return result


# ---------------------------------------------------------------------------------------------------
# Producing evidence with the real code
# ---------------------------------------------------------------------------------------------------


@dataclass
class Evidence:
    data_dir: Path
    bundle: Path
    device_pem: bytes
    receipt_pem: bytes
    signer: PemFileSigner


def export_line(data: bytes, sig: bytes) -> bytes:
    """One ledger.jsonl line, as FORMAT.md §9 writes it."""
    return b'{"rec":' + data + b',"sig":"' + base64.b64encode(sig) + b'"}\n'


def spki_der(signer: PemFileSigner) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return signer.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)


def make_receipt(store, segment_id: str, receipt_signer: PemFileSigner):
    """A bureau receipt built from FORMAT.md §13, accepted through the device's real receipt check."""
    from agent.evidence.receipts import ReceiptVerifier  # producer side only: the device's own check

    seq, data = next((s, bytes(d)) for s, d in store.db.query_rows("SELECT seq, data FROM ledger WHERE type='segment'")
                     if json.loads(d)["body"]["segment_id"] == segment_id)
    body = json.loads(data)["body"]
    receipt = canonical({"v": 1, "type": "segment_receipt", "device": DEVICE_ID, "segment_id": segment_id,
                         "sha256_cipher": body["sha256_cipher"], "size": body["size"], "record_seq": seq,
                         "record_hash": hashlib.sha256(data).hexdigest(), "stored_wall_us": 1_750_000_000_000_000,
                         "bureau_key_id": key_id_of_spki(spki_der(receipt_signer))})
    return ReceiptVerifier(receipt_signer.public_key()).verify(
        receipt, receipt_signer.sign(receipt), device=DEVICE_ID, segment_id=segment_id,
        sha256_cipher=body["sha256_cipher"], size=body["size"])


@pytest.fixture
def evidence(tmp_path, open_store, signer, bureau_identity) -> Evidence:
    """A device that recorded three segments, lost power three times with a segment open, recovered, and
    purged one receipted segment; plus a bundle exported from it."""
    store = open_store()
    for i in range(3):
        write_segment(store, "S1", i)
    # Power cut mid-fragment: a whole chunk on disk, then part of the next one.
    cut = store.open_segment("S1", 3)
    cut.write_fragment(bytes(range(256)) * 400, FragmentInfo(30, 48000, 3_000_000, 3_966_667))
    cut.writer.abandon()
    with open(cut.writer.part_path, "ab") as fh:
        fh.write(b"\x5a" * 777)
    # Power cut before the segment's index row was committed: a .part nobody knows about.
    orphan = SegmentWriter(store.segments_dir / "S2-0000.age", [bureau_identity.recipient])
    orphan.write_fragment(b"\x00\x00\x00\x10mdat" + b"x" * 8)
    orphan.abandon()
    # Power cut while a segment file was being created: its age header is torn.
    (store.segments_dir / "S3-0000.age.part").write_bytes(b"age-encryption.org/v1\n-> X25519 ")
    store.close()

    store = open_store()
    assert len(store.recover()) == 6  # three segment records and three recovery records
    receipt_signer = PemFileSigner.generate(tmp_path / "keys" / "bureau-receipt.pem")
    first = store.segments()[0]["segment_id"]
    store.record_receipt(first, make_receipt(store, first, receipt_signer))
    store.purge(first)
    bundle = tmp_path / "bundle"
    shutil.copytree(store.segments_dir, bundle / "segments")
    store.ledger.export_jsonl(bundle / "ledger.jsonl")
    store.close()
    return Evidence(store.data_dir, bundle, spki_pem(spki_der(signer)), spki_pem(spki_der(receipt_signer)), signer)


# ---------------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------------


def test_independent_verifier_accepts_the_data_directory_the_device_wrote(evidence, identity_file, tmp_path):
    result = verify(evidence.data_dir, tmp_path / "work", identity_file, evidence.device_pem, evidence.receipt_pem)
    assert result.problems == []
    # device_init, 3 segments, 3 x (segment + recovery), receipt, purge
    assert result.records == result.signatures_ok == 12
    assert (result.segments, result.purged, result.truncated, result.decrypted) == (6, 1, 3, 4)
    assert result.receipts_checked == 1


def test_independent_verifier_accepts_the_exported_bundle(evidence, identity_file, tmp_path):
    result = verify(evidence.bundle, tmp_path / "work", identity_file, evidence.device_pem)
    assert result.problems == [] and result.records == 12 and result.decrypted == 4
    assert result.head[0] == 12


def _lines(bundle: Path) -> list[bytes]:
    return (bundle / "ledger.jsonl").read_bytes().splitlines(keepends=True)


def test_independent_verifier_rejects_an_edited_record(evidence, tmp_path):
    lines = _lines(evidence.bundle)
    assert b'"video_frames":90' in lines[2]
    lines[2] = lines[2].replace(b'"video_frames":90', b'"video_frames":91')
    (evidence.bundle / "ledger.jsonl").write_bytes(b"".join(lines))
    problems = verify(evidence.bundle, tmp_path / "work").problems
    assert "record seq 3 (segment): ES256 signature does not verify" in problems
    assert "record seq 4 (segment): prev is not the SHA-256 of the previous record (chain broken)" in problems
    assert len(problems) == 2


@pytest.mark.parametrize("which", ["closed", "truncated"])
def test_independent_verifier_rejects_a_flipped_segment_byte(evidence, identity_file, tmp_path, which):
    names = sorted(p.name for p in (evidence.bundle / "segments").iterdir())
    name = names[0] if which == "closed" else "S1-0003.age"
    path = evidence.bundle / "segments" / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    problems = verify(evidence.bundle, tmp_path / "work", identity_file).problems
    assert problems == [f"segments/{name}: ciphertext SHA-256 differs from the record"]


def test_independent_verifier_rejects_removed_records_and_unaccounted_or_missing_files(evidence, tmp_path):
    lines = _lines(evidence.bundle)
    (evidence.bundle / "ledger.jsonl").write_bytes(b"".join(lines[:3] + lines[4:]))  # drop seq 4
    (evidence.bundle / "segments" / "S1-0001.age").rename(evidence.bundle / "segments" / "renamed.age")
    problems = verify(evidence.bundle, tmp_path / "work").problems
    assert "record seq 5 (segment): expected seq 4: gap" in problems
    assert "segments/S1-0002.age: not accounted for by any segment record" in problems  # its record is gone
    assert "segments/renamed.age: not accounted for by any segment record" in problems
    assert "segments/S1-0001.age: missing and never purged" in problems


def test_independent_verifier_rejects_a_ledger_not_signed_by_the_pinned_device_key(evidence, tmp_path):
    other = PemFileSigner.generate(tmp_path / "other.pem")
    result = verify(evidence.bundle, tmp_path / "work", pinned_pem=spki_pem(spki_der(other)))
    assert "record seq 1 (device_init): genesis key differs from the pinned device key" in result.problems
    assert result.signatures_ok == 0


# --- the body tables of FORMAT.md against what the code accepts and stores ---------------------------

SAMPLES = {"string": "x", "id": "ID-1", "hex64": "ab" * 32, "int": -7, "int ≥ 0": 0, "bool": True,
           "object": {"k": 1}, "segment file": "ID-1.age", "sidecar file": "ID-1.gps.age"}


def sample(t: str, choice: int = 0) -> Any:
    """A value of documented type `t` (the `choice`-th value of an enumeration)."""
    if t.endswith(" or null"):
        return sample(t[: -len(" or null")], choice)
    if t.startswith("one of "):
        values = [x.strip() for x in t[len("one of "):].split(",")]
        return values[choice % len(values)]
    if t.startswith("list of "):
        return [sample(t[len("list of "):], choice)]
    if t in TABLES:
        return {name: sample(spec.type, choice) for name, spec in TABLES[t].items()}
    return SAMPLES[t]


def enum_size(t: str) -> int:
    t = t.removesuffix(" or null").removeprefix("list of ")
    if t.startswith("one of "):
        return len(t.split(","))
    if t in TABLES:
        return max([enum_size(s.type) for s in TABLES[t].values()] + [1])
    return 1


def documented_bodies() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(type, body with only the required fields, body as FORMAT.md says it is stored), every enum value once."""
    out = []
    for rtype in sorted(RECORD_TYPES):
        table = TABLES[rtype]
        for choice in range(max(enum_size(s.type) for s in table.values())):
            given = {n: sample(s.type, choice) for n, s in table.items() if s.required}
            stored = {n: given[n] if s.required else s.default for n, s in table.items()}
            out.append((rtype, given, stored))
    return out


def test_format_md_documents_every_record_type_with_a_body_table():
    glance = set()
    text = FORMAT_MD.read_text(encoding="utf-8")
    section = text[text.index("Record types at a glance"): text.index("#### `device_init`")]
    for line in section.splitlines():
        m = re.match(r"^\| `([a-z_]+)` \|", line)
        if m:
            glance.add(m[1])
    assert glance == RECORD_TYPES and len(RECORD_TYPES) >= 24 and "sidecar" in TABLES


def test_every_documented_body_is_accepted_and_stored_exactly_as_documented(store):
    for rtype, given, _ in documented_bodies():
        if rtype != "device_init":
            store.ledger.append(rtype, given)
    stored = [json.loads(r.data) for r in store.ledger.records(from_seq=2)]
    expected = [(rtype, body) for rtype, _, body in documented_bodies() if rtype != "device_init"]
    assert [(r["type"], r["body"]) for r in stored] == expected
    assert all(envelope_problem(r) is None and body_problems(r["type"], r["body"]) == [] for r in stored)


@pytest.mark.parametrize("change", ["drop a defaulted field", "add a field", "value outside the enumeration",
                                    "string where an integer belongs", "id with a trailing newline"])
def test_body_outside_the_documented_table_is_rejected_even_when_validly_signed(store, signer, tmp_path, change):
    write_segment(store, "S1", 0)
    genesis, segment = store.ledger.records()
    rec = json.loads(segment.data)
    body = rec["body"]
    if change == "drop a defaulted field":
        del body["sidecars"]
    elif change == "add a field":
        body["note"] = "x"
    elif change == "value outside the enumeration":
        rec["type"], rec["body"] = "dock", {"dock_id": None, "event": "parked"}
    elif change == "string where an integer belongs":
        body["video_frames"] = "90"
    else:
        body["segment_id"] += "\n"
    data = canonical(rec)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "ledger.jsonl").write_bytes(export_line(genesis.data, genesis.sig) + export_line(data, signer.sign(data)))
    result = Result()
    verify_chain(read_ledger(bundle, result), result, OpenSSL(tmp_path / "work"))
    assert result.signatures_ok == 2
    assert len(result.problems) == 1 and result.problems[0].startswith("record seq 2 (")


def test_worked_example_in_format_md_checks_out(tmp_path):
    """§15's pasted bytes: every record canonical, hashed, chained and signed as the document says."""
    text = FORMAT_MD.read_text(encoding="utf-8")
    example = text[text.index("<!-- BEGIN tools/format_example.py output -->"):
                   text.index("<!-- END tools/format_example.py output -->")]
    lines = example.splitlines()
    pem_start = lines.index("-----BEGIN PUBLIC KEY-----")
    pem = ("\n".join(lines[pem_start : lines.index("-----END PUBLIC KEY-----") + 1]) + "\n").encode()
    der = base64.b64decode("".join(lines[pem_start + 1 : lines.index("-----END PUBLIC KEY-----")]))
    ssl = OpenSSL(tmp_path / "work")
    records = []
    for i, line in enumerate(lines):
        if line.startswith("canonical bytes ("):
            data = lines[i + 1].encode()
            assert f"canonical bytes ({len(data)} bytes" in line
            assert lines[i + 2].endswith(hashlib.sha256(data).hexdigest())
            sig = base64.b64decode(lines[i + 3].removeprefix("DER signature, base64: "), validate=True)
            assert ssl.verify(pem, data, sig), f"signature of {lines[i + 1][:60]}..."
            records.append(parse_canonical(data) | {"hash": hashlib.sha256(data).hexdigest()})
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1)) and len(records) >= 6
    assert [r["prev"] for r in records] == [GENESIS_PREV] + [r["hash"] for r in records[:-1]]
    for r in records:
        assert envelope_problem({k: v for k, v in r.items() if k != "hash"}) is None
        assert body_problems(r["type"], r["body"]) == []
    genesis = records[0]["body"]
    assert base64.b64decode(genesis["public_key"]) == der and genesis["key_id"] == key_id_of_spki(der)
    receipt_line = lines[next(i for i, x in enumerate(lines) if x.startswith("== Bureau receipt")) + 1].encode()
    receipt = parse_canonical(receipt_line)
    assert set(receipt) == RECEIPT_KEYS
    by_type = {r["type"]: r for r in records}
    assert by_type["receipt"]["body"]["receipt_sha256"] == hashlib.sha256(receipt_line).hexdigest()
    assert by_type["purge"]["body"]["receipt_sha256"] == hashlib.sha256(receipt_line).hexdigest()
    closed = next(r for r in records if r["type"] == "segment" and not r["body"]["truncated"])
    assert (receipt["record_seq"], receipt["record_hash"]) == (closed["seq"], closed["hash"])
    sizes = next(x for x in lines if x.startswith("file size "))
    total, parts = sizes.removeprefix("file size ").split(" = ")
    assert int(total) == sum(int(p) for p in parts.split(" + ")) == closed["body"]["size"]


def test_format_md_tables_name_every_field_and_value_the_code_schemas_have():
    """Keeps §8 in step with agent/evidence/records.py in the other direction too (a value added in the code).
    Runs in a subprocess: it is a document check, not part of the independent verifier above."""
    tool = Path(__file__).resolve().parents[1] / "tools" / "format_example.py"
    out = subprocess.run([sys.executable, str(tool), "--check-tables"], capture_output=True, text=True,
                         cwd=tool.parents[1])
    assert out.returncode == 0, out.stdout + out.stderr


def test_independent_verifier_accounts_for_a_gps_sidecar_and_decrypts_it_with_stock_age(open_store, bureau_identity,
                                                                                      identity_file, tmp_path):
    """§10.5: a segment's sidecar, written by the GPS helper and listed by recovery, is found by its name,
    hashed and decrypted by the stock `age` tool; a hash-named context sidecar no record carries is not."""
    from agent.capture.gps import GpsTrackRecorder

    store = open_store()
    seg = store.open_segment("SG", 0)
    seg.write_fragment(b"\x00" * 70_000, FragmentInfo(30, 48_000, 0, 966_667))
    GpsTrackRecorder().seal("SG-0000", 0, 1_000_000, [bureau_identity.recipient]).write(store.segments_dir)
    seg.writer.abandon()
    store.close()
    store = open_store()
    store.recover()
    store.close()
    result = verify(store.data_dir, tmp_path / "work", identity_file)
    assert result.problems == [] and result.sidecars_decrypted == 1
    (store.segments_dir / f"{'ab' * 32}.context.age").write_bytes(b"x")
    result = verify(store.data_dir, tmp_path / "work")
    assert result.problems == [f"segments/{'ab' * 32}.context.age: not accounted for by any segment record"]
