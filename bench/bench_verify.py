"""Verify benchmark: `Verifier` over a data dir, with and without decryption, beside `sha256sum` and `age -d`.

Threads: everything runs in the main thread; child processes only for the shell pipeline.

Builds a data dir of about `--size-mb` of footage through the EvidenceStore (8 Mbit/s VBR fragments, 60 per
segment; not timed), reads every segment once so all runs see a warm page cache, then measures in turn:
  ours   hash      Verifier().verify_path(dir): ledger signatures and chain, ciphertext SHA-256 per segment
  ours   decrypt   Verifier(identity).verify_path(dir): the above, plus decrypt and plaintext SHA-256
  theirs hash      sha256sum -c SHA256SUMS (the ciphertext hashes from the segment records)
  theirs decrypt   the above, plus `age -d -i ID seg.age | sha256sum` per segment
CPU is user+sys from getrusage (RUSAGE_SELF for ours, RUSAGE_CHILDREN for theirs); MB/s is ciphertext
bytes over wall time.

    .venv/bin/python bench/bench_verify.py            # default: 1 GB, 3 repeats, about 1 minute
    .venv/bin/python bench/bench_verify.py --quick    # 200 MB, 1 repeat
    .venv/bin/python bench/bench_verify.py --data-dir DIR --identity FILE   # an existing data dir
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_writer import (
    BenchKeys,
    Footage,
    command_line,
    cpu_seconds,
    filesystem_type,
    machine_info,
    print_table,
    run_shell,
    write_fresh_store,
)

from agent.evidence.age import Identity
from agent.evidence.verify import Verifier

BUILD_BITRATE_BPS = 8_000_000

SHELL_HASH = r"""
set -euo pipefail
cd "$SEGMENTS"
sha256sum --quiet -c "$SUMS"
"""
SHELL_DECRYPT = SHELL_HASH + r"""
for f in *.age; do
  age -d -i "$IDENTITY" "$f" | sha256sum > /dev/null
done
"""


def build_data_dir(data_dir: Path, keys: BenchKeys, size_mb: int, per_segment: int, seed: int) -> dict[str, Any]:
    fragments = max(1, round(size_mb * 1e6 * 8 / BUILD_BITRATE_BPS))
    footage = Footage.make(BUILD_BITRATE_BPS, fragments, "vbr", seed)
    t0 = time.perf_counter()
    write_fresh_store(footage, data_dir, keys, per_segment)
    return {"fragments": fragments, "footage_seconds": footage.seconds, "footage_bytes": footage.total_bytes,
            "build_wall_s": time.perf_counter() - t0}


def warm_cache(segments: Path) -> int:
    total = 0
    for path in sorted(segments.iterdir()):
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                total += len(block)
    return total


def sums_file(data_dir: Path, out: Path) -> None:
    """SHA256SUMS for `sha256sum -c`: the ciphertext hashes the segment records hold."""
    conn = sqlite3.connect(f"file:{data_dir / 'ledger.db'}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT data FROM ledger WHERE type='segment' ORDER BY seq").fetchall()
    finally:
        conn.close()
    bodies = [json.loads(bytes(data))["body"] for (data,) in rows]
    out.write_text("".join(f"{b['sha256_cipher']}  {b['file']}\n" for b in bodies))


def run_ours(data_dir: Path, identity: Identity | None) -> dict[str, Any]:
    u0, s0 = cpu_seconds()
    t0 = time.perf_counter()
    report = Verifier(identity=identity).verify_path(data_dir)
    wall = time.perf_counter() - t0
    u1, s1 = cpu_seconds()
    if not report.ok:
        raise SystemExit(f"verification failed, figures would be meaningless:\n{report.render()}")
    return {"wall_s": wall, "cpu_user_s": u1 - u0, "cpu_sys_s": s1 - s0, "cpu_s": u1 - u0 + s1 - s0,
            "bytes": report.bytes_checked, "segments": report.segments_ok, "decrypted": report.decrypted,
            "records": report.records}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=int, default=1024, help="footage to build, MB (default 1024)")
    p.add_argument("--segment-fragments", type=int, default=60)
    p.add_argument("--repeat", type=int, default=3, help="runs of each measurement; medians (default 3)")
    p.add_argument("--shell", action=argparse.BooleanOptionalAction, default=True,
                   help="compare with sha256sum and age -d (default on)")
    p.add_argument("--quick", action="store_true", help="200 MB, 1 repeat")
    p.add_argument("--dir", help="where to build the data dir; default a temp dir under /var/tmp")
    p.add_argument("--data-dir", help="verify this existing data dir instead of building one")
    p.add_argument("--identity", help="bureau age identity file for --data-dir")
    p.add_argument("--keep", action="store_true", help="keep the built data dir")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", help="also write the figures as JSON to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.size_mb, args.repeat = 200, 1
    if bool(args.data_dir) != bool(args.identity):
        p.error("--data-dir and --identity go together")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = Path(args.dir) if args.dir else Path("/var/tmp")
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bwc-bench-verify-", dir=base))
    try:
        if args.data_dir:
            data_dir, identity_file = Path(args.data_dir), Path(args.identity)
            identity = Identity.load(identity_file)
            build = {"footage_seconds": None}
        else:
            keys = BenchKeys.create(work / "keys")
            data_dir, identity, identity_file = work / "data", keys.identity, keys.identity_file
            build = build_data_dir(data_dir, keys, args.size_mb, args.segment_fragments, args.seed)
            print(f"  built {build['footage_bytes'] / 1e6:.0f} MB of footage in {build['build_wall_s']:.1f} s",
                  file=sys.stderr)
        machine = machine_info(data_dir)
        sums = work / "SHA256SUMS"
        sums_file(data_dir, sums)
        cipher_bytes = warm_cache(data_dir / "segments")
        has_tools = shutil.which("age") is not None and shutil.which("sha256sum") is not None
        env = {"SEGMENTS": str(data_dir / "segments"), "SUMS": str(sums), "IDENTITY": str(identity_file)}
        cases: dict[str, list[dict[str, Any]]] = {"ours hash": [], "ours decrypt": []}
        if args.shell and has_tools:
            cases.update({"theirs hash": [], "theirs decrypt": []})
        for _ in range(args.repeat):  # interleaved, so drift in machine load hits every case alike
            cases["ours hash"].append(run_ours(data_dir, None))
            cases["ours decrypt"].append(run_ours(data_dir, identity))
            if "theirs hash" in cases:
                cases["theirs hash"].append(run_shell(SHELL_HASH, env))
                cases["theirs decrypt"].append(run_shell(SHELL_DECRYPT, env))
    finally:
        if args.keep:
            print(f"  kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    hours = (build["footage_seconds"] or 0) / 3600
    results: dict[str, dict[str, Any]] = {}
    for name, runs in cases.items():
        med = {k: statistics.median(r[k] for r in runs) for k in ("wall_s", "cpu_user_s", "cpu_sys_s", "cpu_s")}
        med["mb_per_s"] = cipher_bytes / 1e6 / med["wall_s"]
        med["cpu_s_per_gb"] = med["cpu_s"] / (cipher_bytes / 1e9)
        if hours:
            med["cpu_s_per_footage_hour"] = med["cpu_s"] / hours
        results[name] = med
    for kind in ("hash", "decrypt"):
        if f"theirs {kind}" in results:
            results[f"ratio {kind}"] = {
                "cpu": results[f"ours {kind}"]["cpu_s"] / results[f"theirs {kind}"]["cpu_s"],
                "wall": results[f"ours {kind}"]["wall_s"] / results[f"theirs {kind}"]["wall_s"]}
    report = {"bench": "verify", "command": command_line(), "machine": machine,
              "config": {"size_mb": args.size_mb, "repeat": args.repeat, "bitrate_bps": BUILD_BITRATE_BPS,
                         "data_fs": filesystem_type(data_dir)},
              "data": {"cipher_bytes": cipher_bytes, "segments": cases["ours hash"][0]["segments"],
                       "records": cases["ours hash"][0]["records"], **build},
              "results": results}
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def print_report(report: dict[str, Any]) -> None:
    m, d, res = report["machine"], report["data"], report["results"]
    print(f"$ {report['command']}")
    print(f"{m['date_utc']}  {m['nproc']} CPUs  {m['cpu_model']}  Python {m['python']}  "
          f"cryptography {m['cryptography']}  age {m['age_cli']}  data on {m['data_fs']} (warm page cache)  "
          f"load {m['loadavg_at_start']:.2f}  code {m['code']}")
    print(f"data dir: {d['cipher_bytes'] / 1e6:.0f} MB ciphertext in {d['segments']} segments, "
          f"{d['records']} ledger records")
    names = [n for n in res if not n.startswith("ratio")]
    print_table("Verify (medians)", ["case", "MB/s", "wall s", "CPU s", "user s", "sys s", "CPU s/GB",
                                     "CPU s/h footage"],
                [[n, res[n]["mb_per_s"], res[n]["wall_s"], res[n]["cpu_s"], res[n]["cpu_user_s"],
                  res[n]["cpu_sys_s"], res[n]["cpu_s_per_gb"], res[n].get("cpu_s_per_footage_hour", "-")]
                 for n in names])
    ratios = [[k.removeprefix("ratio "), v["cpu"], v["wall"]] for k, v in res.items() if k.startswith("ratio")]
    if ratios:
        print_table("Ours / theirs", ["case", "CPU", "wall"], ratios)


if __name__ == "__main__":
    sys.exit(main())
