"""The device identity key behind a small signer interface.

The default keeps the ECDSA P-256 key in a PEM file with mode 0600. A hardware key store (TPM,
secure element, PKCS#11) implements `Signer` the same way: the private key never leaves it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.evidence.signing import key_id


class IdentityKeyError(RuntimeError):
    """The identity key is missing, unreadable, of the wrong kind or too widely readable."""


class Signer(Protocol):
    """Signs bytes with ES256 and returns a DER signature. Implementations must be thread-safe."""

    def public_key(self) -> ec.EllipticCurvePublicKey: ...

    def sign(self, data: bytes) -> bytes: ...


class PemFileSigner:
    """An ES256 signer whose P-256 private key is a PEM file readable only by its owner."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, path: Path | None = None):
        self._key = key
        self.path = path

    @classmethod
    def generate(cls, path: Path) -> PemFileSigner:
        """Create a new key at `path` (mode 0600). Refuses to overwrite an existing file."""
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
            fh.flush()
            os.fsync(fh.fileno())
        return cls(key, path)

    @classmethod
    def load(cls, path: Path, allow_group_readable: bool = False) -> PemFileSigner:
        try:
            st = path.stat()
            data = path.read_bytes()
        except OSError as exc:
            raise IdentityKeyError(f"identity key {path}: cannot read: {exc.strerror}") from exc
        loose = stat.S_IMODE(st.st_mode) & (0o077 if not allow_group_readable else 0o007)
        if loose:
            raise IdentityKeyError(f"identity key {path}: mode {stat.S_IMODE(st.st_mode):o} lets others read it; "
                            "expected 0600 (chmod 600)")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise IdentityKeyError(f"identity key {path}: not a readable unencrypted PEM private key ({exc})") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            found = (f"EC {key.curve.name}" if isinstance(key, ec.EllipticCurvePrivateKey)
                     else type(key).__name__.removesuffix("PrivateKey"))
            raise IdentityKeyError(f"identity key {path}: key type {found}; ES256 needs an ECDSA P-256 "
                                   "(secp256r1) key")
        return cls(key, path)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()

    @property
    def key_id(self) -> str:
        return key_id(self.public_key())

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data, ec.ECDSA(hashes.SHA256()))
