"""`bwc-agent provision`: make a device known to the bureau (R18: named staff keep the devices).

Steps, each idempotent and resumable (a run interrupted anywhere can simply be run again):
1. the identity key: generated here (PEM, 0600) unless one exists; a device that is already enrolled is
   refused unless `force` is given (a new identity starts a new ledger; the old one stays on disk);
2. the bureau CA: pinned from a file the technician brings, or fetched from `GET /v1/bureau` and accepted only
   if its SHA-256 fingerprint matches the one the bureau printed with the token;
3. enrollment: `POST /v1/enroll` with the one-time token and a CSR for the key (docs/PROTOCOL.md);
4. everything to pin is written with the right modes: device certificate, CA, receipt key, age recipients,
   and the agent's config TOML pointing at them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.storage.keys import PemFileSigner
from agent.sync.https import BureauError, HttpsSession, LinkError


class ProvisionError(RuntimeError):
    """Provisioning cannot go on; the message says which step and why. Nothing half-written is left."""


@dataclass
class ProvisionResult:
    device_id: str
    key_file: Path
    cert_file: Path
    ca_file: Path
    receipt_key_file: Path
    recipients_file: Path
    config_file: Path
    recipients: list[str]
    bureau_url: str
    mqtt_url: str | None
    reused_key: bool


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write atomically (temp + rename + fsync) with `mode`; the file is never seen half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def ca_fingerprint(pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(pem)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def make_csr(key: ec.EllipticCurvePrivateKey, device_id: str) -> str:
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def _pin_ca(bureau_url: str, ca_file: Path | None, fingerprint: str | None) -> bytes:
    if ca_file is not None:
        try:
            pem = ca_file.read_bytes()
            x509.load_pem_x509_certificate(pem)
        except (OSError, ValueError) as exc:
            raise ProvisionError(f"bureau CA {ca_file}: not a readable PEM certificate ({exc})") from None
        if fingerprint and ca_fingerprint(pem) != fingerprint.lower().replace(":", ""):
            raise ProvisionError(f"bureau CA {ca_file} does not match fingerprint {fingerprint}")
        return pem
    if not fingerprint:
        raise ProvisionError("give the bureau CA (--ca-file) or its fingerprint (--ca-fingerprint) to trust it")
    insecure = ssl.create_default_context()
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE  # only to fetch the CA, accepted solely by its fingerprint below
    try:
        info = HttpsSession(insecure, timeout_s=15).json("GET", f"{bureau_url}/v1/bureau")
    except (LinkError, BureauError) as exc:
        raise ProvisionError(f"cannot reach the bureau at {bureau_url}: {exc}") from None
    pem = str(info.get("ca_certificate", "")).encode()
    try:
        got = ca_fingerprint(pem)
    except ValueError:
        raise ProvisionError("the bureau's answer holds no readable CA certificate") from None
    if got != fingerprint.lower().replace(":", ""):
        raise ProvisionError(f"bureau CA fingerprint is {got}, expected {fingerprint}: refusing to trust it")
    return pem


def provision(*, bureau_url: str, token: str, device_id: str, data_dir: Path, config_file: Path,
              ca_file: Path | None = None, ca_fingerprint_hex: str | None = None, force: bool = False,
              extra_config: dict[str, Any] | None = None) -> ProvisionResult:
    bureau_url = bureau_url.rstrip("/")
    keys = data_dir / "keys"
    key_file, cert_file = keys / "device-key.pem", keys / "device-cert.pem"
    if cert_file.exists() and not force:
        raise ProvisionError(f"{device_id}: already enrolled ({cert_file} exists); re-provisioning replaces "
                             "the device identity, so it needs --force")
    reused = key_file.exists() and not force
    retired: Path | None = None
    if key_file.exists() and force:
        # Never delete an identity: keep the old key beside the new one, and start a fresh one.
        retired = key_file.with_name(f"device-key.retired-{int(os.path.getmtime(key_file))}.pem")
        os.replace(key_file, retired)
        if cert_file.exists():
            os.replace(cert_file, cert_file.with_name(f"{retired.stem}.cert.pem"))
    signer = PemFileSigner.load(key_file) if reused else PemFileSigner.generate(key_file)
    os.chmod(keys, 0o700)
    key = signer._key  # noqa: SLF001 - the PEM signer's own key, to sign the CSR

    ca_pem = _pin_ca(bureau_url, ca_file, ca_fingerprint_hex)
    pinned_ca = keys / "bureau-ca.pem"
    _write(pinned_ca, ca_pem, 0o644)
    ctx = ssl.create_default_context(cafile=str(pinned_ca))
    try:
        answer = HttpsSession(ctx, timeout_s=20).json("POST", f"{bureau_url}/v1/enroll", {
            "token": token, "csr": make_csr(key, device_id), "device_id": device_id})
    except BureauError as exc:
        raise ProvisionError(f"enrollment refused: {exc.code}: {exc.detail}") from None
    except LinkError as exc:
        raise ProvisionError(f"cannot reach the bureau at {bureau_url}: {exc}") from None

    for name in ("certificate", "receipt_public_key", "age_recipients", "ca_certificate"):
        if name not in answer:
            raise ProvisionError(f"enrollment answer lacks {name!r}")
    cert = x509.load_pem_x509_certificate(answer["certificate"].encode())
    cert_key = cert.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
    own_key = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if cert_key != own_key:
        raise ProvisionError("the bureau issued a certificate for another key; not installed")
    if answer["ca_certificate"].encode().strip() != ca_pem.strip():
        raise ProvisionError("the bureau's CA in the enrollment answer differs from the pinned one")
    _write(cert_file, answer["certificate"].encode(), 0o644)
    receipt_file = keys / "bureau-receipt-key.pem"
    _write(receipt_file, answer["receipt_public_key"].encode(), 0o644)
    recipients = [str(r) for r in answer["age_recipients"]]
    recipients_file = keys / "bureau-recipients.txt"
    _write(recipients_file, ("\n".join(recipients) + "\n").encode(), 0o644)
    endpoints = answer.get("endpoints") if isinstance(answer.get("endpoints"), dict) else {}
    mqtt = endpoints.get("mqtt") if isinstance(endpoints.get("mqtt"), dict) else {}
    mqtt_url = mqtt.get("url") if isinstance(mqtt.get("url"), str) else None
    extra = {name: dict(values) for name, values in (extra_config or {}).items()}
    if mqtt_url:
        parts = urlsplit(mqtt_url)
        if parts.scheme == "mqtts" and parts.hostname:
            extra.setdefault("sync", {}).setdefault("mqtt_host", parts.hostname)
            extra["sync"].setdefault("mqtt_port", parts.port or 8883)
    if retired is not None and (data_dir / "ledger.db").exists():
        hand_over_identity(data_dir, device_id, PemFileSigner.load(retired), signer, recipients)
    _write(config_file, render_config(device_id, data_dir, key_file, cert_file, pinned_ca, receipt_file,
                                      recipients, bureau_url, extra, existing=config_file).encode(), 0o640)
    _give_to_agent_user(data_dir, keys, config_file)
    return ProvisionResult(device_id, key_file, cert_file, pinned_ca, receipt_file, recipients_file, config_file,
                           recipients, bureau_url, mqtt_url, reused)


def _give_to_agent_user(data_dir: Path, keys: Path, config_file: Path, user: str = "bwc") -> None:
    """Run as root on a device: the agent's user owns its data and keys; the config is root's, group bwc."""
    if os.geteuid() != 0:
        return
    try:
        import grp
        import pwd

        uid, gid = pwd.getpwnam(user).pw_uid, grp.getgrnam(user).gr_gid
    except KeyError:
        return  # no agent user on this machine (a workstation, a test): leave owners as they are
    for root, dirs, files in os.walk(data_dir):
        for name in [*dirs, *files]:
            os.chown(os.path.join(root, name), uid, gid)
    os.chown(data_dir, uid, gid)
    os.chown(config_file, 0, gid)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)


def hand_over_identity(data_dir: Path, device_id: str, old: PemFileSigner, new: PemFileSigner,
                       recipients: list[str]) -> None:
    """The device's ledger goes on under the new key: a `key_change` record signed by the old key names the
    new one, so every verifier follows the chain across the change (docs/FORMAT.md, chain rules)."""
    from agent.clock import SystemClock
    from agent.evidence.age import Recipient
    from agent.evidence.signing import key_id, public_key_der
    from agent.storage.store import EvidenceStore

    store = EvidenceStore(data_dir, device_id, old, [Recipient.parse(r) for r in recipients], SystemClock())
    try:
        pub = new.public_key()
        store.ledger.append("key_change", {
            "kind": "identity", "key_ids": [key_id(pub)],
            "public_key": base64.b64encode(public_key_der(pub)).decode(),
            "detail": f"identity replaced by provisioning (--force); signed by the previous key {old.key_id}"})
    finally:
        store.close()


def render_config(device_id: str, data_dir: Path, key_file: Path, cert_file: Path, ca_file: Path, receipt_file: Path,
                  recipients: list[str], bureau_url: str, extra: dict[str, dict[str, Any]],
                  existing: Path | None = None) -> str:
    """The agent.toml provisioning writes; `extra` adds or overrides keys per section. Settings of an
    `existing` config (a technician's hand edits) are kept unless provisioning sets them."""
    import tomllib

    sections: dict[str, dict[str, Any]] = {}
    if existing is not None and existing.exists():
        try:
            old = tomllib.loads(existing.read_text(encoding="utf-8"))
            sections = {name: dict(values) for name, values in old.items() if isinstance(values, dict)}
        except (OSError, tomllib.TOMLDecodeError):
            sections = {}
    provisioned: dict[str, dict[str, Any]] = {
        "device": {"id": device_id, "data_dir": str(data_dir)},
        "keys": {"identity_key": str(key_file), "device_cert": str(cert_file), "ca_cert": str(ca_file),
                 "receipt_key": str(receipt_file), "recipients": recipients},
        "sync": {"bureau_url": bureau_url},
    }
    for source in (provisioned, extra):
        for name, values in source.items():
            sections.setdefault(name, {}).update(values)
    lines = ["# Written by `bwc-agent provision`. Every key is validated at start (agent/config.py).", ""]
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)
