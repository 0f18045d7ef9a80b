"""firmware_hooks scripts install into a scratch root, are idempotent, and write nothing in dry-run."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

HOOKS = Path(__file__).parent.parent / "firmware_hooks"


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=True)


def test_install_into_scratch_root_is_complete_and_idempotent(tmp_path):
    root = tmp_path / "root"
    (root / "boot/firmware").mkdir(parents=True)
    (root / "boot/firmware/config.txt").write_text("[all]\narm_64bit=1\n")
    run(str(HOOKS / "install.sh"), "--root", str(root))
    first = tree(root)
    for path in ("etc/systemd/system/bwc-agent.service", "etc/udev/rules.d/99-bwc-serial.rules",
                 "usr/lib/tmpfiles.d/bwc-agent.conf", "usr/lib/sysusers.d/bwc-agent.conf",
                 "etc/systemd/system.conf.d/bwc-watchdog.conf", "usr/lib/bwc-agent/critical-battery-poweroff",
                 "etc/polkit-1/rules.d/50-bwc-poweroff.rules"):
        assert path in first, path
    config = first["boot/firmware/config.txt"].decode()
    assert config.startswith("[all]\narm_64bit=1\n") and "dtparam=watchdog=on" in config
    again = run(str(HOOKS / "install.sh"), "--root", str(root))
    assert tree(root) == first and again.stdout == ""
    assert config.count(">>> bwc-agent >>>") == 1


def test_dry_run_writes_nothing(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    out = run(str(HOOKS / "install.sh"), "--root", str(root), "--dry-run").stdout
    assert "would install" in out and tree(root) == {}
    out = run(str(HOOKS / "readonly-root"), "--root", str(root), "--dry-run").stdout
    assert "boot=overlay" in out and tree(root) == {}
    assert "systemctl poweroff" in run(str(HOOKS / "critical-battery-poweroff"), "--dry-run").stdout


def test_readonly_root_keeps_evidence_on_its_own_partition(tmp_path):
    root = tmp_path / "root"
    (root / "boot/firmware").mkdir(parents=True)
    (root / "boot/firmware/cmdline.txt").write_text("console=serial0,115200 root=PARTUUID=1234-02 rootwait\n")
    for _ in range(2):
        run(str(HOOKS / "readonly-root"), "--root", str(root), "--data", "bwc-data")
    fstab = (root / "etc/fstab").read_text().splitlines()
    assert fstab == ["LABEL=bwc-data /var/lib/bwc-agent ext4 "
                     "defaults,noatime,nodev,nosuid,noexec,errors=remount-ro,data=ordered 0 2"]
    assert (root / "boot/firmware/cmdline.txt").read_text() == \
        "console=serial0,115200 root=PARTUUID=1234-02 rootwait boot=overlay\n"


def test_udev_rules_name_the_dock_and_gps_lines():
    rules = (HOOKS / "udev/99-bwc-serial.rules").read_text()
    assert 'SYMLINK+="bwc-dock"' in rules and 'SYMLINK+="bwc-gps"' in rules
    pair = re.compile(r'^(ATTRS\{\w+\}|ENV\{\w+\}|[A-Z]+)(==|\+=|=)"[^"]*"$')
    for line in rules.splitlines():
        if line.strip() and not line.startswith("#"):
            for item in line.split(", "):
                assert pair.match(item.strip()), f"bad udev key/value {item!r} in {line!r}"
