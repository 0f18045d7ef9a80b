"""`python -m bureau`: run the reference bureau service, and its admin commands.

    python -m bureau serve --dir DIR [--host 127.0.0.1] [--port 8443] [--public-url URL] [--mqtt-url URL]
    python -m bureau token --dir DIR --device-id ID [--ttl-hours 24] [--json]
    python -m bureau info  --dir DIR [--json]

Threads: `serve` runs the HTTPS server in a background thread while the main thread waits for
SIGINT/SIGTERM or the optional --exit-after deadline, then stops the server and exits.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from bureau.db import BureauDatabaseError
from bureau.keys import BureauKeyError, BureauKeys, cert_fingerprint
from bureau.service import DEFAULT_MAX_LEDGER_BATCH_BYTES, DEFAULT_MAX_UPLOAD_BYTES, DEFAULT_PORT, BureauConfig


def cmd_serve(args: argparse.Namespace) -> int:
    from bureau.server import BureauServer

    config = BureauConfig(dir=args.dir, host=args.host, port=args.port, public_url=args.public_url,
                          mqtt_url=args.mqtt_url, extra_names=tuple(args.san or ()),
                          max_upload_bytes=args.max_upload_bytes, max_ledger_batch_bytes=args.max_ledger_batch_bytes,
                          socket_timeout_s=args.socket_timeout)
    server = BureauServer(config)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    print(f"bureau: listening on {server.base_url} (port {server.port}); CA {BureauKeys.ca_cert_path(args.dir)}",
          flush=True)
    stop.wait(timeout=args.exit_after)
    server.stop()
    print("bureau: stopped", flush=True)
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from bureau.db import SqliteBureauDatabase
    from bureau.enrollment import Enrollment

    keys = BureauKeys.load_or_create(args.dir)
    db = SqliteBureauDatabase(Path(args.dir) / "bureau.db")
    try:
        minted = Enrollment(keys, db, device_cert_days=1).mint_token(args.device_id, int(args.ttl_hours * 3600))
    except ValueError as exc:
        print(f"bureau token: {exc}", file=sys.stderr)
        return 2
    finally:
        db.close()
    expires = dt.datetime.fromtimestamp(minted.expires_us / 1e6, dt.UTC).isoformat(timespec="seconds")
    ca_sha256 = cert_fingerprint(keys.ca_cert)
    if args.json:
        print(json.dumps({"token": minted.token, "device_id": minted.device_id, "expires": expires,
                          "ca_sha256": ca_sha256, "ca_certificate": str(BureauKeys.ca_cert_path(args.dir))}))
    else:
        print(minted.token)
        print(f"# one-time enrollment token for device {minted.device_id}, valid until {expires}", file=sys.stderr)
        print(f"# bureau CA {BureauKeys.ca_cert_path(args.dir)} sha256 {ca_sha256}", file=sys.stderr)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    keys = BureauKeys.load_or_create(args.dir)
    info = {"ca_certificate": str(BureauKeys.ca_cert_path(args.dir)), "ca_sha256": cert_fingerprint(keys.ca_cert),
            "receipt_public_key": str(BureauKeys.receipt_public_path(args.dir)), "receipt_key_id": keys.receipt_key_id,
            "age_recipients": [str(r) for r in keys.recipients],
            "age_identity": str(BureauKeys.identity_path(args.dir)), "store": str(Path(args.dir) / "store")}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for name, value in info.items():
            print(f"{name:20} {', '.join(value) if isinstance(value, list) else value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bureau", description="Reference bureau service for bwc-agent")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the HTTPS service (creates the CA and keys in DIR on first start)")
    p.add_argument("--dir", type=Path, required=True, help="bureau directory (keys, database, store)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 = any free port)")
    p.add_argument("--public-url", help="base URL devices use, if not https://HOST:PORT")
    p.add_argument("--mqtt-url", help="MQTT broker URL handed to devices at enrollment (e.g. mqtts://host:8883)")
    p.add_argument("--san", action="append", help="extra DNS name or IP for the server certificate (repeatable)")
    p.add_argument("--max-upload-bytes", type=int, default=DEFAULT_MAX_UPLOAD_BYTES, help="Tus-Max-Size")
    p.add_argument("--max-ledger-batch-bytes", type=int, default=DEFAULT_MAX_LEDGER_BATCH_BYTES,
                   help="largest ledger upload body")
    p.add_argument("--socket-timeout", type=float, default=30.0, help="seconds a connection may stall (default 30)")
    p.add_argument("--exit-after", type=float, default=None, help="stop by itself after this many seconds")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("token", help="mint a one-time enrollment token for a device id")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--device-id", required=True)
    p.add_argument("--ttl-hours", type=float, default=24.0, help="lifetime of the token (default 24 h)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("info", help="print the bureau's public keys and where things are")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (BureauKeyError, BureauDatabaseError, OSError) as exc:
        print(f"python -m bureau {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
