"""ES256 (ECDSA P-256 over SHA-256, DER signatures): what every record and receipt is signed with.

Signatures verify with stock OpenSSL: `openssl dgst -sha256 -verify pub.pem -signature rec.sig rec.json`.
"""

from __future__ import annotations

import hashlib

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec


class SignatureError(ValueError):
    """A signature that does not verify, or a key that is not an ES256 key."""


def public_key_der(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_key_pem(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_id(key: ec.EllipticCurvePublicKey) -> str:
    """First 16 hex digits of SHA-256 over the SubjectPublicKeyInfo DER."""
    return hashlib.sha256(public_key_der(key)).hexdigest()[:16]


def load_public_key(data: bytes) -> ec.EllipticCurvePublicKey:
    """Load a P-256 public key from PEM or DER SubjectPublicKeyInfo, or from a PEM certificate."""
    try:
        if b"BEGIN CERTIFICATE" in data:
            from cryptography import x509

            key = x509.load_pem_x509_certificate(data).public_key()
        elif data.lstrip().startswith(b"-----"):
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_der_public_key(data)
    except ValueError as exc:
        raise SignatureError(f"cannot read public key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise SignatureError("key is not an ECDSA P-256 key (ES256 requires P-256)")
    return key


def verify_es256(key: ec.EllipticCurvePublicKey, data: bytes, signature: bytes) -> None:
    """Raise SignatureError unless `signature` (DER) is a valid ES256 signature of `data` by `key`."""
    try:
        key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise SignatureError("ES256 signature does not verify") from None
    except ValueError as exc:
        raise SignatureError(f"malformed DER signature: {exc}") from None
