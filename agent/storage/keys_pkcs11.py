"""ES256 signing with a key that lives in a PKCS#11 token and never leaves it (TPM 2.0 via tpm2-pkcs11,
a secure element via cryptoauthlib's PKCS#11, or SoftHSM2 in tests). Implements `agent.storage.keys.Signer`.

The token signs a SHA-256 digest with CKM_ECDSA (the mechanism every one of those tokens offers); the raw
r||s result is converted to the DER form the ledger uses.
"""

from __future__ import annotations

import hashlib
import threading

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from agent.evidence.signing import key_id
from agent.storage.keys import IdentityKeyError

CURVE_BYTES = 32


class Pkcs11Signer:
    def __init__(self, module_path: str, token_label: str, pin: str, key_label: str = "bwc-identity"):
        import pkcs11  # only needed where a token is configured

        self._pkcs11 = pkcs11
        self._lock = threading.Lock()  # a PKCS#11 session is not safe for concurrent operations
        try:
            lib = pkcs11.lib(module_path)
            token = lib.get_token(token_label=token_label)
            self._session = token.open(user_pin=pin, rw=True)
        except (pkcs11.PKCS11Error, RuntimeError, OSError) as exc:
            raise IdentityKeyError(f"PKCS#11 token {token_label!r} via {module_path}: cannot open: "
                                   f"{exc.__class__.__name__} {exc}") from exc
        self.key_label = key_label
        self._private = self._find(pkcs11.ObjectClass.PRIVATE_KEY)
        public = self._find(pkcs11.ObjectClass.PUBLIC_KEY)
        if self._private is None or public is None:
            self._session.close()
            raise IdentityKeyError(f"PKCS#11 token {token_label!r} has no key pair labelled {key_label!r}; generate "
                                   "one inside it with Pkcs11Signer.generate (see docs/OPERATIONS.md, key store)")
        from pkcs11.util.ec import encode_ec_public_key

        self._public = serialization.load_der_public_key(encode_ec_public_key(public))
        if not isinstance(self._public, ec.EllipticCurvePublicKey) or self._public.curve.name != "secp256r1":
            raise IdentityKeyError(f"PKCS#11 key {key_label!r} is not an ECDSA P-256 key")

    def _find(self, cls):
        objs = list(self._session.get_objects({self._pkcs11.Attribute.CLASS: cls,
                                               self._pkcs11.Attribute.LABEL: self.key_label}))
        return objs[0] if objs else None

    @staticmethod
    def generate(module_path: str, token_label: str, pin: str, key_label: str = "bwc-identity") -> Pkcs11Signer:
        """Generate a P-256 key pair inside the token (private key sensitive and never extractable)."""
        import pkcs11
        from pkcs11.util.ec import encode_named_curve_parameters

        token = pkcs11.lib(module_path).get_token(token_label=token_label)
        with token.open(user_pin=pin, rw=True) as session:
            existing = list(session.get_objects({pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY,
                                                 pkcs11.Attribute.LABEL: key_label}))
            if existing:
                raise IdentityKeyError(f"token {token_label!r} already holds a key labelled {key_label!r}")
            params = session.create_domain_parameters(
                pkcs11.KeyType.EC, {pkcs11.Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
                local=True)
            params.generate_keypair(store=True, label=key_label, private_template={
                pkcs11.Attribute.SENSITIVE: True, pkcs11.Attribute.EXTRACTABLE: False, pkcs11.Attribute.SIGN: True})
        return Pkcs11Signer(module_path, token_label, pin, key_label)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    @property
    def key_id(self) -> str:
        return key_id(self._public)

    def sign(self, data: bytes) -> bytes:
        digest = hashlib.sha256(data).digest()
        with self._lock:
            raw = self._private.sign(digest, mechanism=self._pkcs11.Mechanism.ECDSA)
        if len(raw) != 2 * CURVE_BYTES:
            raise IdentityKeyError(f"PKCS#11 token returned a {len(raw)}-byte ECDSA signature, expected 64")
        return encode_dss_signature(int.from_bytes(raw[:CURVE_BYTES], "big"), int.from_bytes(raw[CURVE_BYTES:], "big"))

    def close(self) -> None:
        with self._lock:
            self._session.close()
