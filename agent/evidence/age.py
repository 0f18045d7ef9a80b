"""The age v1 file format (C2SP age spec), X25519 recipients only, written and read incrementally.

The device only ever encrypts (it holds recipients, never an identity); the bureau and the verifier
decrypt. `AgeEncryptor` exposes the STREAM chunking so that the segment writer can make every media
fragment boundary a chunk boundary and fsync it (docs/FORMAT.md, "Segment files").

Layout of a file:
    age-encryption.org/v1\\n
    -> X25519 <ephemeral share, base64 no padding>\\n
    <file key wrapped with ChaCha20-Poly1305, base64 no padding, 64-column lines>\\n
    ... one stanza per recipient ...
    --- <HMAC-SHA-256 of the header, base64 no padding>\\n
    <16-byte payload nonce><chunks of 64 KiB plaintext + 16-byte tag; last chunk flagged>
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

VERSION_LINE = b"age-encryption.org/v1"
CHUNK_SIZE = 64 * 1024
TAG_SIZE = 16
CIPHER_CHUNK_SIZE = CHUNK_SIZE + TAG_SIZE
NONCE_SIZE = 16
X25519_LABEL = b"age-encryption.org/v1/X25519"
RECIPIENT_HRP = "age"
IDENTITY_HRP = "age-secret-key-"
MAX_COUNTER = 2**88 - 1


class AgeError(ValueError):
    """A malformed, truncated or unauthentic age file, or a bad key string."""


# --- Bech32 (BIP-173), as age uses it for keys; no length limit -------------------------------------

_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_GEN = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)


def _polymod(values: Iterable[int]) -> int:
    chk = 1
    for v in values:
        top = chk >> 25
        chk = (chk & 0x1FFFFFF) << 5 ^ v
        for i in range(5):
            chk ^= _GEN[i] if (top >> i) & 1 else 0
    return chk


def _hrp_expand(hrp: str) -> list[int]:
    return [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]


def _convert_bits(data: Iterable[int], frm: int, to: int, pad: bool) -> list[int]:
    acc = bits = 0
    out = []
    maxv = (1 << to) - 1
    for value in data:
        acc = (acc << frm) | value
        bits += frm
        while bits >= to:
            bits -= to
            out.append((acc >> bits) & maxv)
    if pad and bits:
        out.append((acc << (to - bits)) & maxv)
    elif not pad and (bits >= frm or (acc << (to - bits)) & maxv):
        raise AgeError("bech32: invalid padding")
    return out


def bech32_encode(hrp: str, data: bytes) -> str:
    values = _convert_bits(data, 8, 5, True)
    polymod = _polymod(_hrp_expand(hrp) + values + [0] * 6) ^ 1
    checksum = [(polymod >> 5 * (5 - i)) & 31 for i in range(6)]
    return hrp + "1" + "".join(_CHARSET[v] for v in values + checksum)


def bech32_decode(text: str) -> tuple[str, bytes]:
    if text.lower() != text and text.upper() != text:
        raise AgeError("bech32: mixed case")
    text = text.lower()
    pos = text.rfind("1")
    if pos < 1 or pos + 7 > len(text):
        raise AgeError("bech32: missing separator or checksum")
    hrp, rest = text[:pos], text[pos + 1 :]
    try:
        values = [_CHARSET.index(c) for c in rest]
    except ValueError as exc:
        raise AgeError(f"bech32: invalid character in {text!r}") from exc
    if _polymod(_hrp_expand(hrp) + values) != 1:
        raise AgeError("bech32: bad checksum")
    return hrp, bytes(_convert_bits(values[:-6], 5, 8, False))


# --- keys -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipient:
    """An X25519 recipient (`age1...`): the bureau's public encryption key."""

    public: bytes

    @classmethod
    def parse(cls, text: str) -> Recipient:
        hrp, data = bech32_decode(text.strip())
        if hrp != RECIPIENT_HRP or len(data) != 32:
            raise AgeError(f"not an X25519 age recipient: {text.strip()!r}")
        return cls(data)

    def __str__(self) -> str:
        return bech32_encode(RECIPIENT_HRP, self.public)

    @property
    def key_id(self) -> str:
        """Short stable id recorded in segment records: first 16 hex digits of SHA-256(public key)."""
        return hashlib.sha256(self.public).hexdigest()[:16]


@dataclass(frozen=True)
class Identity:
    """An X25519 identity (`AGE-SECRET-KEY-1...`). Only the bureau (and tests) ever hold one."""

    secret: bytes

    @classmethod
    def generate(cls) -> Identity:
        key = X25519PrivateKey.generate()
        return cls(key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                     serialization.NoEncryption()))

    @classmethod
    def parse(cls, text: str) -> Identity:
        hrp, data = bech32_decode(text.strip())
        if hrp != IDENTITY_HRP or len(data) != 32:
            raise AgeError("not an X25519 age identity")
        return cls(data)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Identity:
        """Read the first identity from an age identity file (comment lines start with '#')."""
        with open(path, encoding="ascii") as fh:
            for line in fh:
                if line.strip() and not line.startswith("#"):
                    return cls.parse(line)
        raise AgeError(f"{path}: no identity found")

    def __str__(self) -> str:
        return bech32_encode(IDENTITY_HRP, self.secret).upper()

    @property
    def recipient(self) -> Recipient:
        pub = X25519PrivateKey.from_private_bytes(self.secret).public_key()
        return Recipient(pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(ikm)


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data).rstrip(b"=")


def _unb64(data: bytes) -> bytes:
    if b"=" in data or b"\r" in data:
        raise AgeError("non-canonical base64 in header")
    try:
        decoded = base64.b64decode(data + b"=" * (-len(data) % 4), validate=True)
    except ValueError as exc:
        raise AgeError(f"invalid base64 in header: {exc}") from exc
    if _b64(decoded) != data:
        raise AgeError("non-canonical base64 in header")
    return decoded


def _wrap_lines(data: bytes) -> bytes:
    enc = _b64(data)
    lines = [enc[i : i + 64] for i in range(0, len(enc), 64)]
    if not lines or len(lines[-1]) == 64:
        lines.append(b"")  # the body's last line is always shorter than 64 columns
    return b"\n".join(lines) + b"\n"


def _chunk_nonce(counter: int, last: bool) -> bytes:
    if counter > MAX_COUNTER:
        raise AgeError("STREAM counter overflow")
    return counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


# --- writing ----------------------------------------------------------------------------------------


class AgeEncryptor:
    """Encrypts one file. `header()` once, then `seal_chunk()` per chunk in order, last one flagged.

    The caller owns buffering; every non-last chunk must be exactly CHUNK_SIZE bytes and the last chunk
    may be shorter but only empty if it is the only chunk (age spec, "Payload").
    """

    def __init__(self, recipients: Iterable[Recipient]):
        self.recipients = list(recipients)
        if not self.recipients:
            raise AgeError("at least one recipient is required")
        self._file_key = os.urandom(16)
        self._counter = 0
        self._finished = False
        nonce = os.urandom(NONCE_SIZE)
        self._header = self._build_header() + nonce
        self._aead = ChaCha20Poly1305(_hkdf(self._file_key, nonce, b"payload"))

    def _build_header(self) -> bytes:
        parts = [VERSION_LINE + b"\n"]
        for r in self.recipients:
            eph = X25519PrivateKey.generate()
            share = eph.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            shared = eph.exchange(X25519PublicKey.from_public_bytes(r.public))
            if shared == bytes(32):
                raise AgeError("X25519 produced an all-zero shared secret (bad recipient key)")
            wrap_key = _hkdf(shared, share + r.public, X25519_LABEL)
            body = ChaCha20Poly1305(wrap_key).encrypt(bytes(12), self._file_key, None)
            parts.append(b"-> X25519 " + _b64(share) + b"\n" + _wrap_lines(body))
        parts.append(b"---")
        header = b"".join(parts)
        mac = hmac.new(_hkdf(self._file_key, b"", b"header"), header, hashlib.sha256).digest()
        return header + b" " + _b64(mac) + b"\n"

    def header(self) -> bytes:
        """The header and the payload nonce: the first bytes of the file."""
        return self._header

    def seal_chunk(self, plaintext: bytes, last: bool) -> bytes:
        if self._finished:
            raise AgeError("chunk after the last chunk")
        if not last and len(plaintext) != CHUNK_SIZE:
            raise AgeError(f"non-last chunk must be {CHUNK_SIZE} bytes, got {len(plaintext)}")
        if last and (len(plaintext) > CHUNK_SIZE or (not plaintext and self._counter)):
            raise AgeError(f"bad last chunk size {len(plaintext)}")
        sealed = self._aead.encrypt(_chunk_nonce(self._counter, last), plaintext, None)
        self._counter += 1
        self._finished = last
        return sealed


def encrypt_bytes(data: bytes, recipients: Iterable[Recipient]) -> bytes:
    """Encrypt a whole small file in memory (sidecars, tests)."""
    enc = AgeEncryptor(recipients)
    out = [enc.header()]
    chunks = [data[i : i + CHUNK_SIZE] for i in range(0, len(data), CHUNK_SIZE)] or [b""]
    for i, chunk in enumerate(chunks):
        out.append(enc.seal_chunk(chunk, last=i == len(chunks) - 1))
    return b"".join(out)


# --- reading ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AgeHeader:
    """The parsed header: `length` bytes of header text, then the 16-byte payload nonce."""

    length: int
    stanzas: list[tuple[list[bytes], bytes]]
    mac: bytes
    mac_input: bytes

    @property
    def payload_offset(self) -> int:
        return self.length + NONCE_SIZE


def read_header(stream: BinaryIO, limit: int = 64 * 1024) -> AgeHeader:
    """Parse the header text from the start of `stream` (no key needed); leaves stream after it."""
    consumed = 0

    def line() -> bytes:
        nonlocal consumed
        raw = stream.readline(limit - consumed + 1)
        consumed += len(raw)
        if consumed > limit:
            raise AgeError("header too long")
        if not raw.endswith(b"\n"):
            raise AgeError("truncated header")
        return raw[:-1]

    if line() != VERSION_LINE:
        raise AgeError("not an age v1 file (bad version line)")
    stanzas: list[tuple[list[bytes], bytes]] = []
    mac_input = VERSION_LINE + b"\n"
    while True:
        raw = line()
        if raw.startswith(b"--- "):
            mac = _unb64(raw[4:])
            if len(mac) != 32:
                raise AgeError("bad header MAC length")
            mac_input += b"---"
            return AgeHeader(consumed, stanzas, mac, mac_input)
        if not raw.startswith(b"-> "):
            raise AgeError(f"unexpected header line {raw[:40]!r}")
        args = raw[3:].split(b" ")
        if not all(args):
            raise AgeError("empty stanza argument")
        mac_input += raw + b"\n"
        body_lines = []
        while True:
            body = line()
            mac_input += body + b"\n"
            body_lines.append(body)
            if len(body) > 64:
                raise AgeError("stanza body line longer than 64 columns")
            if len(body) < 64:
                break
        stanzas.append((args, _unb64(b"".join(body_lines))))


class AgeDecryptor:
    """Decrypts with an X25519 identity; yields plaintext chunk by chunk, authenticating each."""

    def __init__(self, identity: Identity):
        self.identity = identity
        self._priv = X25519PrivateKey.from_private_bytes(identity.secret)

    def _unwrap(self, header: AgeHeader) -> bytes:
        ours = self.identity.recipient.public
        for args, body in header.stanzas:
            if args[0] != b"X25519":
                continue
            if len(args) != 2 or len(body) != 32:
                raise AgeError("malformed X25519 stanza")
            share = _unb64(args[1])
            if len(share) != 32:
                raise AgeError("bad X25519 share length")
            shared = self._priv.exchange(X25519PublicKey.from_public_bytes(share))
            wrap_key = _hkdf(shared, share + ours, X25519_LABEL)
            try:
                file_key = ChaCha20Poly1305(wrap_key).decrypt(bytes(12), body, None)
            except Exception:
                continue  # a stanza for another recipient
            expect = hmac.new(_hkdf(file_key, b"", b"header"), header.mac_input, hashlib.sha256).digest()
            if not hmac.compare_digest(expect, header.mac):
                raise AgeError("header MAC mismatch: header was altered")
            return file_key
        raise AgeError("no stanza for this identity")

    def chunks(self, stream: BinaryIO, allow_truncated: bool = False) -> Iterator[bytes]:
        """Yield authenticated plaintext chunks.

        With `allow_truncated`, a file that ends without a last-flagged chunk (a segment closed by crash
        recovery) yields every complete authentic chunk and then stops; trailing bytes that do not form
        a whole chunk are ignored. Without it, that is an error.
        """
        header = read_header(stream)
        file_key = self._unwrap(header)
        nonce = stream.read(NONCE_SIZE)
        if len(nonce) != NONCE_SIZE:
            if allow_truncated:
                return
            raise AgeError("truncated file: missing payload nonce")
        aead = ChaCha20Poly1305(_hkdf(file_key, nonce, b"payload"))
        counter = 0
        pending = stream.read(CIPHER_CHUNK_SIZE)
        while True:
            nxt = stream.read(CIPHER_CHUNK_SIZE) if len(pending) == CIPHER_CHUNK_SIZE else b""
            is_last_candidate = not nxt
            if is_last_candidate:
                try:
                    yield aead.decrypt(_chunk_nonce(counter, True), pending, None)
                    return
                except Exception:
                    pass
                if len(pending) == CIPHER_CHUNK_SIZE:
                    try:
                        plain = aead.decrypt(_chunk_nonce(counter, False), pending, None)
                    except Exception:
                        raise AgeError(f"chunk {counter} failed authentication") from None
                    if allow_truncated:
                        yield plain
                        return
                    raise AgeError(f"truncated file: chunk {counter} is not flagged last")
                if allow_truncated:
                    return
                raise AgeError(f"chunk {counter} failed authentication or file is truncated")
            try:
                yield aead.decrypt(_chunk_nonce(counter, False), pending, None)
            except Exception:
                raise AgeError(f"chunk {counter} failed authentication") from None
            counter += 1
            pending = nxt
