"""The systemd units are valid and sandboxed (issue 6), and the notify protocol reaches systemd's socket."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agent.sdnotify import Notifier, watchdog_interval_s

UNITS = Path(__file__).parent.parent / "systemd"
needs_systemd = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd is installed by ./dev")


def installed_copy(tmp_path: Path, name: str) -> Path:
    """The unit as it would be installed, with ExecStart pointing at this checkout's executable."""
    exe = Path(sys.executable).parent / "bwc-agent"
    text = re.sub(r"/usr/local/bin/bwc-(agent|bureau)", str(exe), (UNITS / name).read_text())
    out = tmp_path / name
    out.write_text(text)
    return out


@needs_systemd
@pytest.mark.parametrize("name", ["bwc-agent.service", "bwc-bureau.service"])
def test_units_pass_systemd_analyze_verify(tmp_path, name):
    proc = subprocess.run(["systemd-analyze", "verify", str(installed_copy(tmp_path, name))],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr


@needs_systemd
@pytest.mark.parametrize("name,ceiling", [("bwc-agent.service", 2.0), ("bwc-bureau.service", 1.5)])
def test_units_are_sandboxed(tmp_path, name, ceiling):
    proc = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--json=short",
                           str(installed_copy(tmp_path, name))], capture_output=True, text=True)
    checks = {c["name"]: c for c in json.loads(proc.stdout)}
    for must in ("NoNewPrivileges=", "ProtectSystem=", "PrivateTmp=", "CapabilityBoundingSet=~CAP_SYS_ADMIN"):
        assert checks[must]["set"], must
    text = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(installed_copy(tmp_path, name))],
                          capture_output=True, text=True).stdout
    score = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", text).group(1))
    assert score <= ceiling


def test_agent_unit_is_notify_with_watchdog_and_restart():
    text = (UNITS / "bwc-agent.service").read_text()
    for line in ("Type=notify", "Restart=on-failure", "ReadWritePaths=/var/lib/bwc-agent", "DevicePolicy=closed",
                 "SupplementaryGroups=video audio gpio i2c dialout", "User=bwc"):
        assert line in text.splitlines(), line
    assert re.search(r"^WatchdogSec=\d+", text, re.M)


def test_notifier_sends_ready_and_watchdog_datagrams(tmp_path, monkeypatch):
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        server.settimeout(2)
        n = Notifier(str(path))
        assert n.ready("recording ready") and n.watchdog()
        assert server.recv(1024) == b"READY=1\nSTATUS=recording ready"
        assert server.recv(1024) == b"WATCHDOG=1"
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval_s() == 10.0
    assert not Notifier("").watchdog()
