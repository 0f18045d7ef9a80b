"""Print the worked example of docs/FORMAT.md, produced by the real evidence code.

It builds a tiny store in a temporary directory (fixed device id, fixed example keys, a fixed clock),
writes one closed segment, one segment cut short by a simulated power loss and recovered, a bureau
receipt and the purge it allows, and prints the bytes a verifier sees: a record's canonical bytes, its
SHA-256 and DER signature, the device public key, the `openssl` check and its output, the age header and
chunk layout of the segment, the plaintext box layout after `age -d`, the recovered record, the receipt,
an export line and the reference verifier's report.

Keys, ids and times are fixed, so the device_init record is identical on every run; ECDSA signatures,
age file keys and nonces are random, so hashes of ciphertext and signatures change per run. Every value
printed is internally consistent and checkable.

Usage:  .venv/bin/python tools/format_example.py [--keep DIR]
        (--keep leaves the data directory and the files the printed commands use under DIR)
        .venv/bin/python tools/format_example.py --check-tables
        (compares the record body tables of docs/FORMAT.md §8 with agent/evidence/records.py; exit 1 on a
        difference, e.g. an enumeration value added in the code but not in the document)
"""

from __future__ import annotations

import argparse
import base64
import enum
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import types
import typing
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from agent.evidence.age import CHUNK_SIZE, CIPHER_CHUNK_SIZE, NONCE_SIZE, Identity, read_header
from agent.evidence.receipts import ReceiptVerifier, receipt_bytes
from agent.evidence.records import BODY_SCHEMAS, HEX64, ID, SEGMENT_FILE, SIDECAR_FILE, Sidecar, SignedRecord
from agent.evidence.signing import key_id, public_key_pem
from agent.evidence.verify import Verifier
from agent.storage.keys import PemFileSigner
from agent.storage.segment_writer import FragmentInfo
from agent.storage.store import EvidenceStore

DEVICE_ID = "BWC-EXAMPLE-0001"
SESSION_ID = "S20250601T080000Z-0a1b2c"
START_WALL_US = 1_748_764_800_000_000  # 2025-06-01T08:00:00Z
START_MONO_US = 5_000_000_000
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


class ExampleClock:
    """A clock that advances 250 µs per reading, so the example's times are the same on every run."""

    def __init__(self) -> None:
        self._ticks = 0

    def _tick(self) -> int:
        self._ticks += 1
        return self._ticks * 250

    def wall_us(self) -> int:
        return START_WALL_US + self._tick()

    def mono_us(self) -> int:
        return START_MONO_US + self._tick()

    def status(self) -> dict[str, str]:
        return {"source": "bureau", "quality": "synced"}


def example_p256_key(label: str) -> ec.EllipticCurvePrivateKey:
    """A fixed, publicly known P-256 key: for this example only, never for a device."""
    scalar = int.from_bytes(hashlib.sha256(label.encode()).digest(), "big") % P256_ORDER
    return ec.derive_private_key(scalar, ec.SECP256R1())


def heading(title: str) -> None:
    print(f"\n== {title}")


def run(cmd: list[str], cwd: Path, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    """Run a command, print it as typed and its output as seen."""
    shown = " ".join(cmd)
    print(f"$ {shown}")
    proc = subprocess.run(cmd, cwd=cwd, input=stdin, capture_output=True)
    out = (proc.stdout + proc.stderr).decode(errors="replace")
    if len(proc.stdout) > 2000:
        out = f"({len(proc.stdout)} bytes of output)\n" + proc.stderr.decode(errors="replace")
    for line in out.rstrip("\n").splitlines():
        print(line)
    print(f"(exit status {proc.returncode})")
    return proc


def describe_signature(sig: bytes) -> str:
    """The DER layout: SEQUENCE { INTEGER r, INTEGER s }, with lengths."""
    if sig[0] != 0x30 or sig[2] != 0x02:
        return "not a DER ECDSA signature"
    r_len = sig[3]
    s_len = sig[5 + r_len]
    return (f"30 {sig[1]:02x} (SEQUENCE, {sig[1]} bytes) | 02 {r_len:02x} r ({r_len} bytes) | "
            f"02 {s_len:02x} s ({s_len} bytes); total {len(sig)} bytes")


def fragment(label: bytes, size: int) -> bytes:
    """Example fragment bytes: one ISO-BMFF `mdat` box (real footage has the muxer's moof+mdat here)."""
    body = (label * (size // len(label) + 1))[: size - 8]
    return struct.pack(">I4s", size, b"mdat") + body


def list_boxes(plain: bytes) -> list[tuple[int, int, str]]:
    boxes, offset = [], 0
    while offset + 8 <= len(plain):
        size, kind = struct.unpack(">I4s", plain[offset : offset + 8])
        boxes.append((offset, size, kind.decode("ascii", "replace")))
        if size < 8:
            break
        offset += size
    return boxes


def chunk_layout(path: Path) -> tuple[int, list[tuple[int, int, int]]]:
    """(payload offset, [(file offset, ciphertext bytes, plaintext bytes)]) from sizes alone."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        payload = read_header(fh).payload_offset
    chunks, offset = [], payload
    while offset < size:
        n = min(CIPHER_CHUNK_SIZE, size - offset)
        chunks.append((offset, n, max(n - 16, 0)))
        offset += n
    return payload, chunks


def show_record(rec: SignedRecord, title: str) -> None:
    heading(title)
    print(f"canonical bytes ({len(rec.data)} bytes, UTF-8, no trailing newline):")
    print(rec.data.decode())
    print(f"SHA-256 (this record's hash; the next record's prev): {rec.hash}")
    print(f"DER signature, base64: {base64.b64encode(rec.sig).decode()}")


FORMAT_MD = Path(__file__).resolve().parents[1] / "docs" / "FORMAT.md"


def documented_tables() -> dict[str, list[tuple[str, str, str]]]:
    """{schema: [(field, type word, required cell)]} from the '#### `name`' tables of FORMAT.md §8."""
    tables: dict[str, list[tuple[str, str, str]]] = {}
    current = None
    for line in FORMAT_MD.read_text(encoding="utf-8").splitlines():
        heading = re.match(r"^#### `([a-z_]+)`", line)
        if heading:
            current = heading[1]
            tables[current] = []
        elif line.startswith("#"):
            current = None
        elif current and line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            tables[current].append((cells[0].strip("`"), cells[1].replace("`", ""), cells[2]))
    return tables


def type_word(annotation: typing.Any, metadata: list[typing.Any]) -> str:
    """The FORMAT.md §8 type word for a pydantic field."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        return type_word(next(a for a in args if a is not type(None)), metadata) + " or null"
    if origin is typing.Literal:
        return "one of " + ", ".join(args)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(m.value for m in annotation)
    if origin is list:
        return "list of " + type_word(args[0], [])
    if origin is dict:
        return "object"
    if annotation is Sidecar:
        return "sidecar"
    if annotation is bool:
        return "bool"
    if annotation is int:
        return "int ≥ 0" if any(getattr(m, "ge", None) == 0 for m in metadata) else "int"
    if annotation is str:
        pattern = next((m.pattern for m in metadata if getattr(m, "pattern", None)), None)
        return {None: "string", HEX64: "hex64", ID: "id", SEGMENT_FILE: "segment file",
                SIDECAR_FILE: "sidecar file"}.get(pattern, f"string matching {pattern}")
    return f"<{annotation}>"


def check_tables() -> list[str]:
    """Differences between FORMAT.md §8 and the record schemas in agent/evidence/records.py."""
    models = dict(BODY_SCHEMAS, sidecar=Sidecar)
    documented = documented_tables()
    diffs = [f"{name}: {'not in FORMAT.md' if name in models else 'not in records.py'}"
             for name in sorted(set(models) ^ set(documented))]
    for name in sorted(set(models) & set(documented)):
        doc = {f: (t, req) for f, t, req in documented[name]}
        for field_name in sorted(set(models[name].model_fields) ^ set(doc)):
            diffs.append(f"{name}.{field_name}: only in {'FORMAT.md' if field_name in doc else 'records.py'}")
        for field_name, info in models[name].model_fields.items():
            if field_name not in doc:
                continue
            word = type_word(info.annotation, info.metadata)
            required = "yes" if info.is_required() else f"no, default `{json.dumps(info.default)}`"
            if (word, required) != doc[field_name]:
                diffs.append(f"{name}.{field_name}: records.py says {word} / {required}; "
                             f"FORMAT.md says {doc[field_name][0]} / {doc[field_name][1]}")
    return diffs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="write everything under this (new) directory and keep it")
    parser.add_argument("--check-tables", action="store_true", help="compare FORMAT.md §8 with records.py")
    args = parser.parse_args(argv)
    if args.check_tables:
        diffs = check_tables()
        print("\n".join(diffs) or "FORMAT.md §8 matches agent/evidence/records.py")
        return 1 if diffs else 0
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=False)
        work = args.keep
    else:
        work = Path(tempfile.mkdtemp(prefix="bwc-format-example-"))
    try:
        return build_and_print(work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def build_and_print(work: Path) -> int:
    data_dir = work / "device"
    check = work / "check"
    check.mkdir()
    device_key = example_p256_key("bwc-agent docs/FORMAT.md example device identity key")
    receipt_key = example_p256_key("bwc-agent docs/FORMAT.md example bureau receipt key")
    bureau = Identity(hashlib.sha256(b"bwc-agent docs/FORMAT.md example bureau age identity").digest())
    (check / "bureau-identity.txt").write_text(f"# example bureau identity (publicly known: never use)\n{bureau}\n")
    (check / "device-pub.pem").write_bytes(public_key_pem(device_key.public_key()))

    heading("Keys (fixed example keys: publicly known, never use them for anything else)")
    print(f"device id: {DEVICE_ID}")
    print("device identity public key, check/device-pub.pem:")
    print(public_key_pem(device_key.public_key()).decode().rstrip())
    print(f"device key_id (first 16 hex of SHA-256 of the SPKI DER): {key_id(device_key.public_key())}")
    print(f"bureau age recipient: {bureau.recipient}")
    print(f"bureau recipient key_id (first 16 hex of SHA-256 of the 32-byte X25519 key): {bureau.recipient.key_id}")
    print(f"bureau age identity, check/bureau-identity.txt: {bureau}")
    print(f"bureau receipt key_id: {key_id(receipt_key.public_key())}")

    clock = ExampleClock()
    store = EvidenceStore(data_dir, DEVICE_ID, PemFileSigner(device_key), [bureau.recipient], clock)
    genesis = next(store.ledger.records())
    show_record(genesis, "Record seq 1 (device_init)")
    print(f"wall_us {genesis.fields['wall_us']} = "
          f"{datetime.fromtimestamp(genesis.fields['wall_us'] // 1_000_000, UTC).isoformat()} "
          f"+ {genesis.fields['wall_us'] % 1_000_000} µs")
    print(f"DER signature, hex: {genesis.sig.hex()}")
    print(f"DER layout: {describe_signature(genesis.sig)}")
    (check / "rec1.json").write_bytes(genesis.data)
    (check / "rec1.sig").write_bytes(genesis.sig)
    heading("Checking the signature with stock OpenSSL (run in check/)")
    run(["openssl", "dgst", "-sha256", "-verify", "device-pub.pem", "-signature", "rec1.sig", "rec1.json"], check)
    run(["openssl", "asn1parse", "-inform", "DER", "-in", "rec1.sig"], check)
    (check / "rec1-edited.json").write_bytes(genesis.data.replace(b'"seq":1', b'"seq":2'))
    print("# the same record with \"seq\":1 changed to \"seq\":2:")
    run(["openssl", "dgst", "-sha256", "-verify", "device-pub.pem", "-signature", "rec1.sig", "rec1-edited.json"],
        check)

    heading("Export line for this record (ledger.jsonl line 1)")
    print(genesis.to_line().decode().rstrip("\n"))

    # --- a closed segment of two fragments -------------------------------------------------------------
    seg = store.open_segment(SESSION_ID, 0)
    seg.write_fragment(fragment(b"fragment-1 ", 1000), FragmentInfo(30, 48000, 0, 966_667))
    seg.write_fragment(fragment(b"fragment-2 ", 70000), FragmentInfo(30, 48000, 1_000_000, 1_966_667))
    closed = seg.close()
    show_record(closed, f"Record seq {closed.fields['seq']} (segment, closed normally)")
    print(f"prev = SHA-256 of record seq 1: {closed.fields['prev'] == genesis.hash}")
    (check / f"rec{closed.fields['seq']}.json").write_bytes(closed.data)
    (check / f"rec{closed.fields['seq']}.sig").write_bytes(closed.sig)
    run(["openssl", "dgst", "-sha256", "-verify", "device-pub.pem", "-signature", f"rec{closed.fields['seq']}.sig",
         f"rec{closed.fields['seq']}.json"], check)

    seg_path = store.segments_dir / closed.fields["body"]["file"]
    shutil.copy(seg_path, check / seg_path.name)
    heading(f"Segment file segments/{seg_path.name}: age header (no key needed to read it)")
    with open(seg_path, "rb") as fh:
        header = read_header(fh)
        header_text = seg_path.read_bytes()[: header.length]
        nonce = seg_path.read_bytes()[header.length : header.length + NONCE_SIZE]
    print(header_text.decode("ascii"), end="")
    print(f"(header: {header.length} bytes; payload nonce: {nonce.hex()}; payload starts at byte "
          f"{header.payload_offset})")
    payload, chunks = chunk_layout(seg_path)
    print("chunks (from sizes alone: every chunk but the last is 65552 bytes = 65536 plaintext + 16 tag):")
    for i, (off, n, plain) in enumerate(chunks):
        last = i == len(chunks) - 1
        print(f"  chunk {i}: file offset {off:>6}, {n:>5} ciphertext bytes -> {plain:>5} plaintext bytes, "
              f"nonce {i.to_bytes(11, 'big').hex()}{'01' if last else '00'}{'  (last)' if last else ''}")
    print(f"file size {seg_path.stat().st_size} = {payload} + {' + '.join(str(c[1]) for c in chunks)}")
    print(f"sha256 of the file: {hashlib.sha256(seg_path.read_bytes()).hexdigest()} (= body.sha256_cipher)")

    heading("Decrypting with the stock age tool (run in check/)")
    out = run(["age", "-d", "-i", "bureau-identity.txt", "-o", "segment.plain", seg_path.name], check)
    if out.returncode == 0:
        plain = (check / "segment.plain").read_bytes()
        print(f"plaintext: {len(plain)} bytes (= body.plain_size), sha256 {hashlib.sha256(plain).hexdigest()} "
              "(= body.sha256_plain)")
        print("plaintext boxes (offset, size, type): every fragment is followed by a free box that ends it on "
              "a 65536-byte boundary; the file ends with an 8-byte free box")
        for off, size, kind in list_boxes(plain):
            boundary = " <- chunk boundary" if off and off % CHUNK_SIZE == 0 else ""
            print(f"  {off:>6} {size:>6} {kind}{boundary}")
        print(f"last 8 bytes: {plain[-8:].hex()}")

    # --- a segment cut short by a power loss, closed by recovery ---------------------------------------
    cut = store.open_segment(SESSION_ID, 1)
    cut.write_fragment(fragment(b"fragment-3 ", 500), FragmentInfo(30, 48000, 2_000_000, 2_966_667))
    cut.writer.abandon()  # power lost: the process never closes the segment
    with open(cut.writer.part_path, "ab") as fh:  # ...while the next chunk was only partly on disk
        fh.write(os.urandom(1000))
    part_size = cut.writer.part_path.stat().st_size
    store.close()
    store = EvidenceStore(data_dir, DEVICE_ID, PemFileSigner(device_key), [bureau.recipient], clock)
    recovered = store.recover()
    heading(f"Power loss: segments/{cut.writer.part_path.name} left at {part_size} bytes "
            f"(1 complete chunk + 1000 bytes of a torn one); recover() at the next start writes:")
    for rec in recovered:
        show_record(rec, f"Record seq {rec.fields['seq']} ({rec.fields['type']})")
    cut_path = store.segments_dir / recovered[0].fields["body"]["file"]
    shutil.copy(cut_path, check / cut_path.name)
    heading("age on the truncated segment: every authentic chunk is written out, then an error")
    run(["age", "-d", "-i", "bureau-identity.txt", "-o", "truncated.plain", cut_path.name], check)
    print(f"plaintext written: {(check / 'truncated.plain').stat().st_size} bytes "
          f"(= chunks x 65536 = {recovered[0].fields['body']['chunks'] * CHUNK_SIZE})")

    # --- the bureau's receipt for the closed segment, and the purge it allows ---------------------------
    body = closed.fields["body"]
    receipt = receipt_bytes(device=DEVICE_ID, segment_id=body["segment_id"], sha256_cipher=body["sha256_cipher"],
                            size=body["size"], record_seq=closed.fields["seq"], record_hash=closed.hash,
                            stored_wall_us=START_WALL_US + 3_600_000_000, bureau_key=receipt_key.public_key())
    verified = ReceiptVerifier(receipt_key.public_key()).verify(
        receipt, PemFileSigner(receipt_key).sign(receipt), device=DEVICE_ID, segment_id=body["segment_id"],
        sha256_cipher=body["sha256_cipher"], size=body["size"])
    heading("Bureau receipt for the closed segment (canonical bytes, signed ES256 by the bureau receipt key)")
    print(receipt.decode())
    print(f"receipt SHA-256 (= receipt_sha256 in the receipt and purge records): {verified.sha256}")
    print(f"receipt signature, base64: {base64.b64encode(verified.sig).decode()}")
    (check / "receipt.json").write_bytes(receipt)
    (check / "receipt.sig").write_bytes(verified.sig)
    (check / "bureau-receipt-pub.pem").write_bytes(public_key_pem(receipt_key.public_key()))
    run(["openssl", "dgst", "-sha256", "-verify", "bureau-receipt-pub.pem", "-signature", "receipt.sig",
         "receipt.json"], check)
    show_record(store.record_receipt(body["segment_id"], verified), "receipt record")
    show_record(store.purge(body["segment_id"], "space_needed"), "purge record (the segment file is now gone)")

    heading("Reference verifier over the data directory (bwc-agent verify device --identity "
            "check/bureau-identity.txt)")
    report = Verifier(identity=bureau).verify_path(data_dir)
    print(report.render().replace(str(work) + "/", ""))
    store.close()
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
