"""A real mosquitto broker for tests: TLS on 127.0.0.1, client certificates required, the certificate CN
as the username, and an ACL that confines each device to bwc/v1/dev/<its id>/# (the bureau sees all)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

ACL = """\
user bureau
topic readwrite bwc/v1/#

pattern readwrite bwc/v1/dev/%u/#
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mosquitto:
    def __init__(self, folder: Path, pki: Path, port: int | None = None):
        if shutil.which("mosquitto") is None:
            raise RuntimeError("mosquitto is not installed (./dev installs it)")
        self.folder, self.pki = folder, pki
        self.port = port or free_port()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "acl").write_text(ACL)
        (folder / "mosquitto.conf").write_text(
            f"user root\nper_listener_settings false\nallow_anonymous false\npersistence false\n"
            f"log_dest file {folder / 'mosquitto.log'}\nlog_type all\n"
            f"listener {self.port} 127.0.0.1\ncafile {pki / 'ca.crt'}\ncertfile {pki / 'server.crt'}\n"
            f"keyfile {pki / 'server.key'}\nrequire_certificate true\nuse_identity_as_username true\n"
            f"acl_file {folder / 'acl'}\n")
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.folder / "mosquitto.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mosquitto exited: {self.log()[-2000:]}") from None
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening in 10 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def log(self) -> str:
        return (self.folder / "mosquitto.log").read_text(errors="replace")
