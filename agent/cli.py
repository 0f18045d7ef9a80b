"""`bwc-agent`: the device's command line.

  run        the daemon (systemd starts it)           provision  enroll with the bureau (technician)
  selftest   check every part, pass/fail table       status     what the device is doing
  report     compliance report (R24)                 verify     check signatures, chain, segments
  demo       a simulated shift end to end
"""

from __future__ import annotations

import argparse
import json
import logging
import sqlite3
import sys
from pathlib import Path

from agent.evidence.age import AgeError, Identity
from agent.evidence.signing import SignatureError
from agent.evidence.verify import Verifier, load_pinned_key


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        identity = Identity.load(args.identity) if args.identity else None
        pinned = load_pinned_key(args.pubkey)
        receipt_key = load_pinned_key(args.receipt_key)
        if args.from_seq > 1 and (not args.prev or not pinned):
            raise ValueError("an incremental bundle (--from-seq N) needs --prev (hash of record N-1) and --pubkey")
        report = Verifier(identity=identity, pinned_key=pinned, receipt_key=receipt_key).verify_path(
            args.path, start_seq=args.from_seq, start_prev=args.prev or "0" * 64, key=pinned)
    except (OSError, AgeError, SignatureError, ValueError) as exc:
        print(f"bwc-agent verify: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.render())
    return 0 if report.ok else 1


def cmd_report(args: argparse.Namespace) -> int:
    from agent.compliance import read_ledger, session_reports

    try:
        records = read_ledger(args.data_dir)
    except (OSError, sqlite3.DatabaseError) as exc:
        print(f"bwc-agent report: {exc}", file=sys.stderr)
        return 2
    reports = session_reports(records, args.session, args.day)
    if args.json:
        print(json.dumps([r.as_dict() for r in reports], indent=2, ensure_ascii=False))
    else:
        if not reports:
            print("no sessions match")
        for r in reports:
            print(r.render(zh=args.lang == "zh"))
            print()
        bad = sum(1 for r in reports if not r.compliant)
        print(f"{len(reports)} session(s), {len(reports) - bad} compliant, {bad} with findings")
    return 0 if reports or args.json else 1


def _config(args: argparse.Namespace):
    from agent.config import ConfigError, load_config

    try:
        return load_config(args.config)
    except ConfigError as exc:
        print(f"bwc-agent: invalid configuration:\n{exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _simulated(folder: Path):
    from agent.clock import SystemClock
    from hw_sim.scenario import SimulatedHardware

    sim = SimulatedHardware(folder, SystemClock())
    sim.add_dock(plugged=True)
    return sim


def pushed_config(cfg):
    """A config the bureau pushed (kept in the data directory) replaces the file's at start, if valid."""
    from agent.config import ConfigError, parse_config
    from agent.daemon import PUSHED_CONFIG

    path = cfg.device.data_dir / PUSHED_CONFIG
    if not path.exists():
        return cfg
    try:
        pushed = parse_config(json.loads(path.read_text())["config"], str(path))
    except (OSError, ValueError, KeyError, ConfigError) as exc:
        logging.getLogger(__name__).error("ignoring pushed config %s: %s", path, exc)
        return cfg
    if pushed.device.id != cfg.device.id:
        logging.getLogger(__name__).error("ignoring pushed config %s: it is for %s", path, pushed.device.id)
        return cfg
    return pushed


def cmd_run(args: argparse.Namespace) -> int:
    import signal
    import tempfile

    from agent.clock import SystemClock
    from agent.config import ConfigError
    from agent.daemon import Device, Hardware, load_credentials
    from agent.sdnotify import Notifier
    from agent.storage.db import DatabaseError
    from agent.storage.keys import IdentityKeyError

    cfg = _config(args)
    cfg = pushed_config(cfg)
    sim = _simulated(Path(tempfile.mkdtemp(prefix="bwc-sim-"))) if args.simulate else None
    try:
        creds = load_credentials(cfg)
    except (IdentityKeyError, OSError, ValueError) as exc:
        print(f"bwc-agent run: {exc}", file=sys.stderr)
        return 2
    device = Device(cfg, sim.hardware() if sim else Hardware(), sim.clock if sim else SystemClock(), creds,
                    notifier=Notifier())
    signal.signal(signal.SIGTERM, lambda *_: device.request_stop())
    signal.signal(signal.SIGINT, lambda *_: device.request_stop())
    try:
        device.start()
    except (DatabaseError, IdentityKeyError, ConfigError) as exc:
        print(f"bwc-agent run: cannot start: {exc}", file=sys.stderr)
        return 2
    try:
        device.run_forever()
    finally:
        device.stop()
        if sim:
            sim.close()
    return 0


def cmd_provision(args: argparse.Namespace) -> int:
    from agent.provision import ProvisionError, provision

    try:
        result = provision(bureau_url=args.bureau, token=args.token, device_id=args.device_id,
                           data_dir=args.data_dir, config_file=args.config, ca_file=args.ca_file,
                           ca_fingerprint_hex=args.ca_fingerprint, force=args.force)
    except ProvisionError as exc:
        print(f"bwc-agent provision: {exc}", file=sys.stderr)
        return 1
    print(f"provisioned {result.device_id}: key {result.key_file} ({'kept' if result.reused_key else 'new'}), "
          f"certificate {result.cert_file}, config {result.config_file}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from agent.status import collect, render

    cfg = None if args.data_dir else _config(args)
    data_dir = args.data_dir or cfg.device.data_dir
    try:
        status = collect(Path(data_dir), cfg.recording.bitrate_bps if cfg else 8_000_000)
    except (OSError, sqlite3.DatabaseError) as exc:
        print(f"bwc-agent status: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(status, indent=2, default=str) if args.json else render(status))
    return 0


def cmd_selftest(args: argparse.Namespace) -> int:
    import tempfile

    from agent.clock import SystemClock
    from agent.daemon import Hardware
    from agent.selftest import SelfTest, render

    cfg = _config(args)
    sim = _simulated(Path(tempfile.mkdtemp(prefix="bwc-sim-"))) if args.simulate else None
    try:
        checks = SelfTest(cfg, sim.hardware() if sim else Hardware(), sim.clock if sim else SystemClock()).run()
    finally:
        if sim:
            sim.close()
    print(json.dumps([c.as_dict() for c in checks], indent=2) if args.json else render(checks))
    return 1 if any(c.result == "FAIL" for c in checks) else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from agent.demo import run_demo

    return run_demo(workdir=args.workdir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bwc-agent", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    sub = parser.add_subparsers(dest="command", required=True)

    default_config = Path("/etc/bwc-agent/agent.toml")
    p = sub.add_parser("run", help="run the agent daemon")
    p.add_argument("--config", type=Path, default=default_config)
    p.add_argument("--simulate", action="store_true", help="use the hardware simulator (development)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("provision", help="generate the identity and enroll with the bureau")
    p.add_argument("--bureau", required=True, help="bureau base URL, https://...")
    p.add_argument("--token", required=True, help="one-time enrollment token from the bureau")
    p.add_argument("--device-id", required=True)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--ca-file", type=Path, help="the bureau CA certificate (PEM) brought by the technician")
    g.add_argument("--ca-fingerprint", help="SHA-256 fingerprint of the bureau CA, printed with the token")
    p.add_argument("--data-dir", type=Path, default=Path("/var/lib/bwc-agent"))
    p.add_argument("--config", type=Path, default=default_config, help="config file to write")
    p.add_argument("--force", action="store_true", help="replace an enrolled identity (the old key is kept)")
    p.set_defaults(func=cmd_provision)

    p = sub.add_parser("status", help="state, battery, storage, uploads, alarms")
    p.add_argument("--config", type=Path, default=default_config)
    p.add_argument("--data-dir", type=Path, help="read this data directory (default: from the config)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("selftest", help="check camera, audio, buttons, sensors, storage, keys, bureau")
    p.add_argument("--config", type=Path, default=default_config)
    p.add_argument("--simulate", action="store_true", help="check the simulator's stand-ins instead")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_selftest)

    p = sub.add_parser("verify", help="verify a data directory or exported bundle")
    p.add_argument("path", type=Path, help="device data dir (ledger.db) or bundle (ledger.jsonl) with segments/")
    p.add_argument("--identity", type=Path, help="bureau age identity file: also decrypt and check plaintext")
    p.add_argument("--pubkey", type=Path, help="device public key or certificate (PEM) to pin")
    p.add_argument("--receipt-key", type=Path, help="bureau receipt public key (PEM): also check stored receipts")
    p.add_argument("--from-seq", type=int, default=1, help="the bundle holds records from this seq on")
    p.add_argument("--prev", help="SHA-256 (hex) of record FROM_SEQ-1, the anchor of an incremental bundle")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("report", help="compliance report (R24) for a session or a day")
    p.add_argument("--data-dir", type=Path, default=Path("/var/lib/bwc-agent"), help="device data directory")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--session", help="one session id")
    g.add_argument("--day", help="every session opened on this local day (YYYY-MM-DD)")
    p.add_argument("--lang", choices=["en", "zh"], default="en")
    p.add_argument("--json", action="store_true", help="the same report for scripts")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="run a simulated shift end to end and print a summary")
    p.add_argument("--workdir", type=Path, help="keep everything under this directory (default: a temp dir)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
