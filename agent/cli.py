"""`bwc-agent`: the device's command line (verify, demo; more commands arrive with their capabilities)."""

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
    except (OSError, AgeError, SignatureError) as exc:
        print(f"bwc-agent verify: {exc}", file=sys.stderr)
        return 2
    report = Verifier(identity=identity, pinned_key=pinned).verify_path(args.path)
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


def cmd_demo(args: argparse.Namespace) -> int:
    from agent.demo import run_demo

    return run_demo(workdir=args.workdir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bwc-agent", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("verify", help="verify a data directory or exported bundle")
    p.add_argument("path", type=Path, help="device data dir (ledger.db) or bundle (ledger.jsonl) with segments/")
    p.add_argument("--identity", type=Path, help="bureau age identity file: also decrypt and check plaintext")
    p.add_argument("--pubkey", type=Path, help="device public key or certificate (PEM) to pin")
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
