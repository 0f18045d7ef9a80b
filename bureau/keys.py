"""The bureau's keys: its certificate authority, its receipt-signing key and its age identity.

Three separate keys with separate jobs, each created once on first start in the bureau directory and
never replaced silently:

- the **CA** (ECDSA P-256) issues device certificates (mTLS for HTTPS and MQTT, R23) and the
  server's TLS certificate;
- the **receipt key** (ECDSA P-256, ES256) signs segment receipts, the only ack a device accepts
  (DESIGN.md, "Sync"); the device pins it at enrollment;
- the **age identity** (X25519) is the only key that can decrypt footage (R22, R23); devices
  encrypt to its recipient.

Private keys are files of mode 0600 under `DIR/keys/`; public material sits at the top of DIR.
Everything here is called from one thread at a time (start-up, or the enrollment handler under the
database's token transaction); issuing a certificate is a pure function of its inputs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.evidence.age import Identity, Recipient
from agent.evidence.signing import key_id, public_key_pem

DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")  # records.ID: also a directory name
CA_VALID_DAYS = 20 * 365
SERVER_CERT_VALID_DAYS = 365
SERVER_CERT_RENEW_DAYS = 30
DEVICE_ORG = "BWC devices"


class BureauKeyError(RuntimeError):
    """A bureau key file that is unreadable, of the wrong kind, or too widely readable."""


class CsrError(ValueError):
    """A certificate signing request the CA refuses to sign; the message says why."""


def check_device_id(device_id: str) -> str:
    if not isinstance(device_id, str) or not DEVICE_ID_RE.match(device_id):
        raise ValueError(f"device id {device_id!r} must match {DEVICE_ID_RE.pattern} (letters, digits, . _ : -)")
    return device_id


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` with `mode` and fsync it and its directory; never replaces an existing file."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _replace(path: Path, data: bytes, mode: int) -> None:
    """Atomically write a file that may be regenerated (the server certificate)."""
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        tmp.unlink()
    _write_new(tmp, data, mode)
    os.replace(tmp, path)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise BureauKeyError(f"{path}: mode {mode:o} lets others read a bureau private key; expected 0600")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise BureauKeyError(f"{path}: not an unencrypted PEM private key ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise BureauKeyError(f"{path}: not an ECDSA P-256 key")
    return key


def _load_or_create_key(path: Path) -> ec.EllipticCurvePrivateKey:
    if path.exists():
        return _load_private_key(path)
    key = ec.generate_private_key(ec.SECP256R1())
    _write_new(path, _private_pem(key), 0o600)
    return key


def cert_fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 over the certificate's DER, hex: what `openssl x509 -fingerprint -sha256` shows."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def cert_common_name(cert: x509.Certificate | x509.CertificateSigningRequest) -> str | None:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def cert_serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


@dataclass
class BureauKeys:
    """The bureau's key material, loaded from (or created in) a bureau directory."""

    root: Path
    ca_key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate
    receipt_key: ec.EllipticCurvePrivateKey
    identity: Identity

    # --- paths --------------------------------------------------------------------------------

    @staticmethod
    def ca_cert_path(root: Path) -> Path:
        return root / "ca.pem"

    @staticmethod
    def identity_path(root: Path) -> Path:
        return root / "keys" / "bureau-identity.txt"

    @staticmethod
    def receipt_public_path(root: Path) -> Path:
        return root / "receipt-key.pub.pem"

    @property
    def server_cert_path(self) -> Path:
        return self.root / "tls" / "server.pem"

    @property
    def server_key_path(self) -> Path:
        return self.root / "keys" / "server-key.pem"

    # --- loading ------------------------------------------------------------------------------

    @classmethod
    def load_or_create(cls, root: Path) -> BureauKeys:
        """Load the keys under `root`, creating whichever are missing. Existing keys are never replaced."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True, mode=0o750)
        keys_dir = root / "keys"
        keys_dir.mkdir(exist_ok=True, mode=0o700)
        ca_key = _load_or_create_key(keys_dir / "ca-key.pem")
        ca_path = cls.ca_cert_path(root)
        if ca_path.exists():
            ca_cert = x509.load_pem_x509_certificate(ca_path.read_bytes())
            if ca_cert.public_key().public_numbers() != ca_key.public_key().public_numbers():
                raise BureauKeyError(f"{ca_path} does not belong to {keys_dir / 'ca-key.pem'}; refusing to start")
        else:
            ca_cert = _self_signed_ca(ca_key)
            _write_new(ca_path, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
        receipt_key = _load_or_create_key(keys_dir / "receipt-key.pem")
        pub_path = cls.receipt_public_path(root)
        if not pub_path.exists():
            _write_new(pub_path, public_key_pem(receipt_key.public_key()), 0o644)
        ident_path = cls.identity_path(root)
        if ident_path.exists():
            if ident_path.stat().st_mode & 0o077:
                raise BureauKeyError(f"{ident_path}: the footage decryption key must be mode 0600")
            identity = Identity.load(ident_path)
        else:
            identity = Identity.generate()
            _write_new(ident_path, (f"# bwc bureau age identity; public key: {identity.recipient}\n"
                                    f"{identity}\n").encode(), 0o600)
        recipients_path = root / "recipients.txt"
        if not recipients_path.exists():
            _write_new(recipients_path, f"{identity.recipient}\n".encode(), 0o644)
        return cls(root, ca_key, ca_cert, receipt_key, identity)

    # --- public facts -------------------------------------------------------------------------

    @property
    def ca_pem(self) -> str:
        return self.ca_cert.public_bytes(serialization.Encoding.PEM).decode()

    @property
    def receipt_public_key(self) -> ec.EllipticCurvePublicKey:
        return self.receipt_key.public_key()

    @property
    def receipt_key_id(self) -> str:
        return key_id(self.receipt_public_key)

    @property
    def recipients(self) -> list[Recipient]:
        return [self.identity.recipient]

    def sign_receipt(self, data: bytes) -> bytes:
        """ES256 (DER) over receipt bytes with the receipt key."""
        return self.receipt_key.sign(data, ec.ECDSA(hashes.SHA256()))

    # --- issuing ------------------------------------------------------------------------------

    def ensure_server_cert(self, names: list[str]) -> tuple[Path, Path]:
        """A CA-issued TLS server certificate covering `names` (host names or IP addresses).

        Reissued when missing, not covering every name, or within 30 days of expiry. Returns
        (certificate path, key path).
        """
        key = _load_or_create_key(self.server_key_path)
        wanted = sorted(set(names) | {"localhost", "127.0.0.1"})
        if self.server_cert_path.exists():
            cert = x509.load_pem_x509_certificate(self.server_cert_path.read_bytes())
            try:
                san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                have = {str(n) for n in san.get_values_for_type(x509.DNSName)}
                have |= {str(n) for n in san.get_values_for_type(x509.IPAddress)}
            except x509.ExtensionNotFound:
                have = set()
            fresh = cert.not_valid_after_utc - _now() > dt.timedelta(days=SERVER_CERT_RENEW_DAYS)
            same_key = cert.public_key().public_numbers() == key.public_key().public_numbers()
            if set(wanted) <= have and fresh and same_key and self._issued_by_us(cert):
                return self.server_cert_path, self.server_key_path
        alt: list[x509.GeneralName] = []
        for name in wanted:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alt.append(x509.DNSName(name))
        now = _now()
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bwc bureau server")]))
                .issuer_name(self.ca_cert.subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=SERVER_CERT_VALID_DAYS))
                .add_extension(x509.SubjectAlternativeName(alt), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(_leaf_key_usage(), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .add_extension(self._aki(), critical=False)
                .sign(self.ca_key, hashes.SHA256()))
        self.server_cert_path.parent.mkdir(parents=True, exist_ok=True)
        _replace(self.server_cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return self.server_cert_path, self.server_key_path

    def _issued_by_us(self, cert: x509.Certificate) -> bool:
        try:
            cert.verify_directly_issued_by(self.ca_cert)
            return True
        except (ValueError, TypeError, InvalidSignature):
            return False

    def _aki(self) -> x509.AuthorityKeyIdentifier:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key())

    def issue_device_cert(self, csr_pem: bytes, device_id: str, valid_days: int) -> x509.Certificate:
        """Sign a device certificate for the key in `csr_pem`. Subject CN = device id; client auth only.

        Raises CsrError if the CSR is unreadable, its self-signature fails, its key is not P-256
        (the device signs its ledger with the same key, ES256), or its CN names another device.
        """
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise CsrError(f"csr is not a PEM certificate signing request: {exc}") from None
        if not csr.is_signature_valid:
            raise CsrError("csr signature does not verify (the CSR must be signed by the key it certifies)")
        key = csr.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
            raise CsrError("csr key must be ECDSA P-256: the same key signs the device ledger (ES256)")
        cn = cert_common_name(csr)
        if cn is not None and cn != device_id:
            raise CsrError(f"csr subject CN {cn!r} differs from the device id {device_id!r} the token was minted for")
        now = _now()
        return (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id),
                                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, DEVICE_ORG)]))
                .issuer_name(self.ca_cert.subject)
                .public_key(key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=valid_days))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(_leaf_key_usage(), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
                .add_extension(self._aki(), critical=False)
                .sign(self.ca_key, hashes.SHA256()))


def _leaf_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                         encipher_only=False, decipher_only=False)


def _self_signed_ca(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "BWC Bureau CA"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "bwc bureau")])
    now = _now()
    return (x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
