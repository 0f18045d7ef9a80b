"""The bureau's MQTT broker: mosquitto configured as docs/PROTOCOL.md ("MQTT", "ACL") says.

TLS with the bureau CA, a client certificate required from everyone, the certificate's CN as the username,
and the production ACL: a device may publish only its own reports and read only what the bureau sends it;
the bureau's consumer (CN `bureau`) may use every device topic. `BureauBroker` writes the configuration
under `<bureau dir>/mqtt/`, issues the consumer's certificate from the bureau CA, and runs mosquitto as a
child process on the given address (`python -m bureau serve` deployments run the same files under
systemd's mosquitto unit instead).
"""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bureau.keys import BureauKeys

CONSUMER_CN = "bureau"

ACL = """\
# Written by bureau/broker.py: docs/PROTOCOL.md, "ACL". %u is the client certificate's CN.
user bureau
topic readwrite bwc/v1/#

pattern write bwc/v1/dev/%u/status
pattern write bwc/v1/dev/%u/telemetry
pattern write bwc/v1/dev/%u/event
pattern write bwc/v1/dev/%u/cmd/resp
pattern write bwc/v1/dev/%u/config/reported
pattern read bwc/v1/dev/%u/cmd/req/+
pattern read bwc/v1/dev/%u/ack
pattern read bwc/v1/dev/%u/config/desired
"""


class BrokerError(RuntimeError):
    """mosquitto is missing or would not start; the message says why."""


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BureauBroker:
    def __init__(self, root: Path, keys: BureauKeys, host: str = "127.0.0.1", port: int = 0):
        if shutil.which("mosquitto") is None:
            raise BrokerError("mosquitto is not installed (Debian package `mosquitto`)")
        self.folder = root / "mqtt"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.keys = keys
        self.host = host
        self.port = port or _free_port(host)
        self.proc: subprocess.Popen | None = None
        cert, key = keys.ensure_server_cert([host])
        self.consumer_cert, self.consumer_key = self._consumer_identity()
        (self.folder / "acl").write_text(ACL)
        (self.folder / "mosquitto.conf").write_text(
            f"# Written by bureau/broker.py (docs/PROTOCOL.md, MQTT).\n"
            f"# Run as whoever starts it (it reads the bureau's server key).\nuser {getpass.getuser()}\n"
            f"per_listener_settings false\nallow_anonymous false\npersistence false\n"
            f"log_dest file {self.folder / 'mosquitto.log'}\n"
            f"listener {self.port} {host}\ncafile {keys.ca_cert_path(keys.root)}\ncertfile {cert}\n"
            f"keyfile {key}\nrequire_certificate true\nuse_identity_as_username true\n"
            f"acl_file {self.folder / 'acl'}\n")

    @property
    def url(self) -> str:
        return f"mqtts://{self.host}:{self.port}"

    def _consumer_identity(self) -> tuple[Path, Path]:
        """The bureau consumer's client certificate (CN `bureau`), issued once from the bureau CA."""
        cert_path, key_path = self.folder / "consumer-cert.pem", self.folder / "consumer-key.pem"
        if cert_path.exists() and key_path.exists():
            return cert_path, key_path
        key = ec.generate_private_key(ec.SECP256R1())
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key_path.chmod(0o600)
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CONSUMER_CN)]))
               .sign(key, hashes.SHA256()))
        cert = self.keys.issue_device_cert(csr.public_bytes(serialization.Encoding.PEM), CONSUMER_CN, 365)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert_path, key_path

    def start(self, timeout_s: float = 10.0) -> BureauBroker:
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.folder / "mosquitto.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                socket.create_connection((self.host, self.port), 0.2).close()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    log = self.folder / "mosquitto.log"
                    raise BrokerError(f"mosquitto exited: {log.read_text()[-500:] if log.exists() else ''}") from None
                time.sleep(0.05)
        self.stop()
        raise BrokerError(f"mosquitto did not listen on {self.host}:{self.port} within {timeout_s} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
