"""Writer benchmark: what recording costs in the evidence store, beside the stock `age` + `sha256sum` tools.

Threads: everything runs in the main thread; child processes only for the shell pipeline and the strace pass.

For each bitrate it drives `EvidenceStore.open_segment()` / `OpenSegment.write_fragment()` / `close()`
with one fragment per second of footage (fsync per fragment, as on the device) and reports:
  - MB/s of footage (wall), CPU seconds (user+sys, getrusage) per hour of footage;
  - p50/p99 latency of `write_fragment` (its file fsync and its SQLite commit included);
  - bytes on disk beyond the footage: `free`-box padding, AEAD tags, age headers (% of footage);
  - fsync/fdatasync calls per fragment and per segment (one strace pass, when strace is installed);
  - the same bytes through `age -r R < plain > seg.age; sha256sum plain seg.age; sync seg.age`
    (plaintext staged in tmpfs first), CPU from RUSAGE_CHILDREN, and the ratio ours/theirs.

Fragment sizes: `vbr` (default) draws each 1 s fragment uniformly from 75-125 % of bitrate/8 bytes, as a
GOP's size varies; `fixed` uses exactly bitrate/8 bytes (1 MB at 8 Mbit/s). The padding depends on each
fragment's size modulo 64 KiB, so `fixed` sizes give an arbitrary figure (4.86 % at 2, 4 and 8 Mbit/s
alike, by coincidence of 10^6 mod 2^16); `vbr` gives the expected one.

    .venv/bin/python bench/bench_writer.py              # default run, about 2 minutes on 2 cores
    .venv/bin/python bench/bench_writer.py --quick      # smoke run, a few seconds
    .venv/bin/python bench/bench_writer.py --profile    # cProfile of the 8 Mbit/s writer, top functions
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import io
import json
import os
import platform
import pstats
import random
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.clock import SystemClock
from agent.evidence.age import CHUNK_SIZE, TAG_SIZE, Identity
from agent.storage.keys import PemFileSigner
from agent.storage.segment_writer import FragmentInfo, padding_for
from agent.storage.store import EvidenceStore

DEVICE_ID = "BWC-BENCH-0001"
FRAGMENT_SECONDS = 1.0
VBR_SPREAD = 0.25  # fragment size uniform in [1 - spread, 1 + spread] x mean
STRACE_FRAGMENTS = 120
MARKER = "getppid"  # a syscall nothing else makes here; brackets the traced region in the strace log


# --- machine and process accounting ---------------------------------------------------------------


def machine_info(data_dir: Path | None = None) -> dict[str, Any]:
    """What a figure was measured on: CPU, cores, Python, crypto library, filesystem, load, date."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        from cryptography.hazmat.backends.openssl.backend import backend
        openssl = backend.openssl_version_text()
    except Exception:  # an informational field only
        openssl = "unknown"
    import cryptography

    info: dict[str, Any] = {
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cryptography": f"{cryptography.__version__} ({openssl})",
        "age_cli": _tool_version(["age", "--version"]),
        "loadavg_at_start": os.getloadavg()[0],
        "code": code_version(),
    }
    if data_dir is not None:
        info["data_fs"] = filesystem_type(data_dir)
    return info


def code_version() -> str:
    """The commit measured, and whether agent/ had uncommitted changes (read-only git queries)."""
    repo = Path(__file__).resolve().parent.parent
    head = _tool_version(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"])
    dirty = _tool_version(["git", "-C", str(repo), "status", "--porcelain", "--", "agent"])
    return head + ("" if dirty in ("", "not installed") else " + uncommitted changes in agent/")


def _tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        lines = (out.stdout or out.stderr).strip().splitlines()
        return lines[0] if lines else ""
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding `path`, from /proc/mounts (longest matching mount point)."""
    path = path.resolve()
    best, kind = "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _dev, mnt, fstype = line.split()[:3]
            if (str(path) == mnt or str(path).startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                best, kind = mnt, fstype
    except OSError:
        pass
    return kind


def cpu_seconds(who: int = resource.RUSAGE_SELF) -> tuple[float, float]:
    """(user, system) CPU seconds so far, of this process or of its waited-for children."""
    r = resource.getrusage(who)
    return r.ru_utime, r.ru_stime


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile; values need not be sorted."""
    ordered = sorted(values)
    rank = max(1, int(round(pct / 100 * len(ordered) + 0.4999)))
    return ordered[min(rank, len(ordered)) - 1]


def work_dirs(args: argparse.Namespace, name: str) -> tuple[Path, Path]:
    """(work dir on the data filesystem, plaintext dir on tmpfs if `--shm` exists) for bench `name`."""
    base = Path(args.dir) if args.dir else Path("/var/tmp")
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"bwc-bench-{name}-", dir=base))
    shm_root = Path(args.shm) if Path(args.shm).is_dir() else work
    return work, Path(tempfile.mkdtemp(prefix=f"bwc-bench-{name}-plain-", dir=shm_root))


def chosen_parts(p: argparse.ArgumentParser, only: str | None, parts: tuple[str, ...]) -> set[str]:
    """The parts `--only` names (all by default); an unknown name is a usage error."""
    chosen = set((only or ",".join(parts)).split(","))
    unknown = chosen - set(parts)
    if unknown:
        p.error(f"unknown part(s) for --only: {', '.join(sorted(unknown))}")
    return chosen


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv])


# --- the footage ---------------------------------------------------------------------------------


@dataclass
class Footage:
    """`fragments` one-second fragments of random bytes at `bitrate_bps`, reproducible from `seed`.

    Every fragment is a slice of one random pool, so the same bytes can be handed to the store and
    staged as files for the shell pipeline without holding the whole footage in memory.
    """

    bitrate_bps: int
    sizes_mode: str
    sizes: list[int]
    offsets: list[int]
    pool: bytes = field(repr=False)

    @classmethod
    def make(cls, bitrate_bps: int, fragments: int, sizes_mode: str, seed: int = 1) -> Footage:
        rng = random.Random(seed * 1_000_003 + bitrate_bps)
        mean = int(bitrate_bps * FRAGMENT_SECONDS / 8)
        if sizes_mode == "fixed":
            sizes = [mean] * fragments
        elif sizes_mode == "vbr":
            sizes = [int(mean * rng.uniform(1 - VBR_SPREAD, 1 + VBR_SPREAD)) for _ in range(fragments)]
        else:
            raise ValueError(f"sizes mode must be 'fixed' or 'vbr', not {sizes_mode!r}")
        spare = 4 << 20
        pool = os.urandom(max(sizes) + spare)
        offsets = [rng.randrange(spare) for _ in range(fragments)]
        return cls(bitrate_bps, sizes_mode, sizes, offsets, pool)

    @property
    def fragments(self) -> int:
        return len(self.sizes)

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes)

    @property
    def seconds(self) -> float:
        return self.fragments * FRAGMENT_SECONDS

    def fragment(self, i: int) -> bytes:
        return self.pool[self.offsets[i] : self.offsets[i] + self.sizes[i]]

    def segment_ranges(self, per_segment: int) -> list[range]:
        return [range(s, min(s + per_segment, self.fragments)) for s in range(0, self.fragments, per_segment)]

    def stage_segments(self, folder: Path, per_segment: int) -> list[Path]:
        """Write each segment's footage (fragments concatenated, no padding) as a plaintext file."""
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for n, frags in enumerate(self.segment_ranges(per_segment)):
            path = folder / f"seg-{n:04d}.bin"
            with open(path, "wb") as fh:
                for i in frags:
                    fh.write(self.fragment(i))
            paths.append(path)
        return paths


@dataclass
class BenchKeys:
    """A device identity key and a bureau age identity, in `folder`, for one benchmark run."""

    signer: PemFileSigner
    identity: Identity
    identity_file: Path

    @classmethod
    def create(cls, folder: Path) -> BenchKeys:
        folder.mkdir(parents=True, exist_ok=True)
        identity = Identity.generate()
        identity_file = folder / "bureau-identity.txt"
        identity_file.write_text(f"# benchmark bureau identity (throwaway)\n{identity}\n")
        return cls(PemFileSigner.generate(folder / "device-key.pem"), identity, identity_file)


def open_store(data_dir: Path, keys: BenchKeys) -> EvidenceStore:
    return EvidenceStore(data_dir, DEVICE_ID, keys.signer, [keys.identity.recipient], SystemClock())


def fragment_info(i: int) -> FragmentInfo:
    pts = int(i * FRAGMENT_SECONDS * 1_000_000)
    return FragmentInfo(video_frames=30, audio_samples=48_000, first_pts_us=pts, last_pts_us=pts + 966_667)


# --- our writer ----------------------------------------------------------------------------------


def write_with_store(footage: Footage, store: EvidenceStore, per_segment: int,
                     session_id: str = "SBENCH") -> dict[str, Any]:
    """Write the footage through an open store; time and CPU are summed over the store calls only."""
    latencies: list[float] = []
    opens: list[float] = []
    closes: list[float] = []
    user = system = wall = 0.0
    plain = cipher = chunks = 0
    loop_cpu0, loop_t0 = cpu_seconds(), time.perf_counter()

    def timed(call, sink: list[float]):
        nonlocal user, system, wall
        u0, s0 = cpu_seconds()
        t0 = time.perf_counter()
        result = call()
        elapsed = time.perf_counter() - t0
        u1, s1 = cpu_seconds()
        user, system, wall = user + u1 - u0, system + s1 - s0, wall + elapsed
        sink.append(elapsed)
        return result

    for index, frags in enumerate(footage.segment_ranges(per_segment)):
        seg = timed(lambda index=index: store.open_segment(session_id, index), opens)
        for i in frags:
            data = footage.fragment(i)
            info = fragment_info(i)
            timed(lambda data=data, info=info, seg=seg: seg.write_fragment(data, info), latencies)
        timed(seg.close, closes)
        plain, cipher, chunks = plain + seg.totals.plain_size, cipher + seg.totals.cipher_size, \
            chunks + seg.totals.chunks
    loop_cpu1, loop_wall = cpu_seconds(), time.perf_counter() - loop_t0
    on_disk = sum(p.stat().st_size for p in store.segments_dir.iterdir())
    cpu = user + system
    padding = plain - footage.total_bytes
    tags = chunks * TAG_SIZE
    return {
        "fragments": footage.fragments, "segments": len(opens), "footage_bytes": footage.total_bytes,
        "wall_s": wall, "mb_per_s": footage.total_bytes / 1e6 / wall, "x_real_time": footage.seconds / wall,
        "cpu_user_s": user, "cpu_sys_s": system, "cpu_s": cpu,
        "cpu_s_per_footage_hour": cpu / footage.seconds * 3600,
        "core_pct_at_real_time": 100 * cpu / footage.seconds,
        "loop_wall_s": loop_wall, "loop_cpu_s": sum(loop_cpu1) - sum(loop_cpu0),
        "write_ms_p50": 1000 * percentile(latencies, 50), "write_ms_p99": 1000 * percentile(latencies, 99),
        "write_ms_max": 1000 * max(latencies),
        "open_ms_p50": 1000 * percentile(opens, 50), "close_ms_p50": 1000 * percentile(closes, 50),
        "bytes_on_disk": on_disk, "padding_bytes": padding, "tag_bytes": tags,
        "header_bytes": cipher - plain - tags,
        "overhead_pct": 100 * (on_disk - footage.total_bytes) / footage.total_bytes,
        "padding_pct": 100 * padding / footage.total_bytes,
        "_latencies": latencies,
    }


def write_fresh_store(footage: Footage, data_dir: Path, keys: BenchKeys, per_segment: int) -> dict[str, Any]:
    """A new data dir and store (its setup not measured), the footage written, the store closed."""
    store = open_store(data_dir, keys)
    try:
        return write_with_store(footage, store, per_segment)
    finally:
        store.close()


# --- the stock tools -------------------------------------------------------------------------------


# Per segment: encrypt to the bureau, make it durable once (age has no per-fragment flush), then hash
# the plaintext and the ciphertext as the segment record needs. Two scripts, so each tool's share shows.
SHELL_ENCRYPT = r"""
set -euo pipefail
for f in "$IN"/*.bin; do
  o="$OUT/$(basename "$f" .bin).age"
  age -r "$RECIPIENT" < "$f" > "$o"
  sync "$o"
done
"""
SHELL_HASH = r"""
set -euo pipefail
for f in "$IN"/*.bin; do
  sha256sum "$f" "$OUT/$(basename "$f" .bin).age"
done > "$OUT/SHA256SUMS"
"""


def run_shell(script: str, env: dict[str, str]) -> dict[str, float]:
    """Run a bash script; wall time and the CPU of every process it started (RUSAGE_CHILDREN)."""
    u0, s0 = cpu_seconds(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(["bash", "-c", script], env={**os.environ, **env}, check=True, timeout=1800)
    wall = time.perf_counter() - t0
    u1, s1 = cpu_seconds(resource.RUSAGE_CHILDREN)
    return {"wall_s": wall, "cpu_user_s": u1 - u0, "cpu_sys_s": s1 - s0, "cpu_s": u1 - u0 + s1 - s0}


def write_with_shell(staged: Path, out_dir: Path, keys: BenchKeys, footage: Footage) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {"IN": str(staged), "OUT": str(out_dir), "RECIPIENT": str(keys.identity.recipient)}
    encrypt = run_shell(SHELL_ENCRYPT, env)
    hashing = run_shell(SHELL_HASH, env)
    result: dict[str, Any] = {key: encrypt[key] + hashing[key] for key in encrypt}
    result.update({"age_wall_s": encrypt["wall_s"], "age_cpu_s": encrypt["cpu_s"],
                   "sha256sum_wall_s": hashing["wall_s"], "sha256sum_cpu_s": hashing["cpu_s"]})
    on_disk = sum(p.stat().st_size for p in out_dir.glob("*.age"))
    result.update({
        "mb_per_s": footage.total_bytes / 1e6 / result["wall_s"],
        "cpu_s_per_footage_hour": result["cpu_s"] / footage.seconds * 3600,
        "overhead_pct": 100 * (on_disk - footage.total_bytes) / footage.total_bytes,
    })
    return result


# --- fsync count (strace) ---------------------------------------------------------------------------


def classify_sync_target(path: str) -> str:
    if path.endswith("-wal"):
        return "sqlite_wal"
    if path.endswith(".db") or path.endswith("-journal"):
        return "sqlite_db"
    if ".age" in path:
        return "segment_file"
    return "directory" if "." not in Path(path).name else "other"


def count_syncs(footage_args: list[str], work: Path) -> dict[str, Any] | None:
    """Re-run a short write under strace and count fsync/fdatasync by target, between two markers."""
    if shutil.which("strace") is None:
        return None
    log = work / "strace.log"
    cmd = ["strace", "-f", "-qq", "-y", "-e", f"trace=fsync,fdatasync,{MARKER}", "-o", str(log),
           sys.executable, __file__, "--strace-child", "--dir", str(work), *footage_args]
    subprocess.run(cmd, check=True, timeout=600, stdout=subprocess.DEVNULL)
    counts: dict[str, int] = {}
    inside = False
    call = re.compile(r"(fsync|fdatasync)\(\d+<([^>]*)>\)")
    for line in log.read_text().splitlines():
        if f"{MARKER}()" in line:
            inside = not inside
            continue
        m = call.search(line)
        if inside and m:
            kind = f"{m[1]}:{classify_sync_target(m[2])}"
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def strace_child(args: argparse.Namespace) -> None:
    """The traced process: set up, mark, write STRACE_FRAGMENTS fragments in segments, mark."""
    work = Path(args.dir)
    footage = Footage.make(args.bitrates[0] * 1_000_000, STRACE_FRAGMENTS, args.sizes, args.seed)
    keys = BenchKeys.create(work / "keys-child")
    store = open_store(work / "data-child", keys)
    os.getppid()
    write_with_store(footage, store, args.segment_fragments)
    os.getppid()
    store.close()


# --- padding model (no I/O) ------------------------------------------------------------------------


def padding_model(bitrates_mbps: list[float], samples: int = 20_000, seed: int = 7) -> list[dict[str, Any]]:
    """Expected free-box padding per fragment, from the writer's own padding rule, fixed and VBR sizes."""
    rng = random.Random(seed)
    rows = []
    for mbps in bitrates_mbps:
        mean = int(mbps * 1e6 * FRAGMENT_SECONDS / 8)
        vbr = [int(mean * rng.uniform(1 - VBR_SPREAD, 1 + VBR_SPREAD)) for _ in range(samples)]
        vbr_pad = sum(padding_for(s) for s in vbr) / sum(vbr)
        rows.append({"bitrate_mbps": mbps, "fragment_bytes": mean,
                     "fixed_pad_bytes": padding_for(mean), "fixed_pad_pct": 100 * padding_for(mean) / mean,
                     "vbr_pad_pct": 100 * vbr_pad,
                     "vbr_pad_mb_per_hour": vbr_pad * mean * 3600 / 1e6})
    return rows


# --- output ----------------------------------------------------------------------------------------


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    cells = [[f"{c:.3g}" if isinstance(c, float) and abs(c) < 100 else
              f"{c:.0f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  " + "  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for r in cells:
        print("  " + "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of every numeric figure across repeats; latency percentiles over all fragments pooled."""
    out: dict[str, Any] = {}
    for key in runs[0]:
        if key.startswith("_"):
            continue
        values = [r[key] for r in runs]
        out[key] = statistics.median(values) if isinstance(values[0], (int, float)) else values[0]
    if "_latencies" in runs[0]:
        pooled = [x for r in runs for x in r["_latencies"]]
        out["write_ms_p50"] = 1000 * percentile(pooled, 50)
        out["write_ms_p99"] = 1000 * percentile(pooled, 99)
        out["write_ms_max"] = 1000 * max(pooled)
    out["repeats"] = len(runs)
    return out


def profile_writer(footage: Footage, work: Path, keys: BenchKeys, per_segment: int, top: int) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    write_fresh_store(footage, work / "data-profile", keys, per_segment)
    profiler.disable()
    buf = io.StringIO()
    pstats.Stats(profiler, stream=buf).strip_dirs().sort_stats("tottime").print_stats(top)
    return buf.getvalue()


# --- main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bitrates", type=lambda s: [float(x) for x in s.split(",")], default=[8.0, 4.0, 2.0],
                   help="Mbit/s, comma-separated (default 8,4,2)")
    p.add_argument("--fragments", type=int, default=600, help="1 s fragments per run (default 600 = 10 min)")
    p.add_argument("--segment-fragments", type=int, default=60, help="fragments per segment (default 60)")
    p.add_argument("--sizes", choices=["vbr", "fixed"], default="vbr", help="fragment size model")
    p.add_argument("--also-fixed", action=argparse.BooleanOptionalAction, default=True,
                   help="add a fixed-size run at the first bitrate (default on)")
    p.add_argument("--repeat", type=int, default=3, help="runs per row; medians reported (default 3)")
    p.add_argument("--shell", action=argparse.BooleanOptionalAction, default=True,
                   help="compare with age + sha256sum (default on)")
    p.add_argument("--strace", action=argparse.BooleanOptionalAction, default=True,
                   help="count fsyncs in a short strace pass (default on)")
    p.add_argument("--profile", action="store_true", help="also print a cProfile of the first row")
    p.add_argument("--profile-top", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="120 fragments, 1 repeat: a smoke run")
    p.add_argument("--dir", help="where to write (a disk, not tmpfs); default a temp dir under /var/tmp")
    p.add_argument("--shm", default="/dev/shm", help="RAM filesystem for the shell pipeline's plaintext")
    p.add_argument("--keep", action="store_true", help="keep the written files")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", help="also write the figures as JSON to this file")
    p.add_argument("--strace-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.fragments, args.repeat = 120, 1
    if args.fragments < 1 or args.segment_fragments < 1 or args.repeat < 1:
        p.error("--fragments, --segment-fragments and --repeat must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.strace_child:
        strace_child(args)
        return 0
    work, shm = work_dirs(args, "writer")
    machine = machine_info(work)
    machine["plaintext_fs"] = filesystem_type(shm)
    if machine["data_fs"] == "tmpfs":
        print("warning: --dir is on tmpfs; fsync costs nothing there", file=sys.stderr)
    keys = BenchKeys.create(work / "keys")
    has_age = shutil.which("age") is not None and shutil.which("sha256sum") is not None
    if args.shell and not has_age:
        print("warning: age or sha256sum not installed; no shell comparison", file=sys.stderr)

    plan = [(mbps, args.sizes) for mbps in args.bitrates]
    if args.also_fixed and args.sizes == "vbr":
        plan.insert(0, (args.bitrates[0], "fixed"))
    results: list[dict[str, Any]] = []
    try:
        # Warm-up, not reported: imports, first file creation, the disk's first flushes.
        write_fresh_store(Footage.make(1_000_000, 30, "vbr", args.seed), work / "warmup", keys,
                          args.segment_fragments)
        for n, (mbps, sizes) in enumerate(plan):
            footage = Footage.make(int(mbps * 1_000_000), args.fragments, sizes, args.seed)
            staged = footage.stage_segments(shm / f"row{n}", args.segment_fragments)[0].parent \
                if args.shell and has_age else None
            ours, theirs = [], []
            for r in range(args.repeat):
                ours.append(write_fresh_store(footage, work / f"ours-{n}-{r}", keys, args.segment_fragments))
                if staged is not None:
                    theirs.append(write_with_shell(staged, work / f"theirs-{n}-{r}", keys, footage))
                if not args.keep:
                    shutil.rmtree(work / f"ours-{n}-{r}", ignore_errors=True)
                    shutil.rmtree(work / f"theirs-{n}-{r}", ignore_errors=True)
            if staged is not None:
                shutil.rmtree(staged, ignore_errors=True)
            row: dict[str, Any] = {"bitrate_mbps": mbps, "sizes": sizes, "ours": median_run(ours)}
            if theirs:
                row["theirs"] = median_run(theirs)
                row["ratio_cpu"] = row["ours"]["cpu_s"] / row["theirs"]["cpu_s"]
                row["ratio_wall"] = row["ours"]["wall_s"] / row["theirs"]["wall_s"]
            results.append(row)
            print(f"  done {mbps:g} Mbit/s {sizes}", file=sys.stderr)

        syncs = None
        if args.strace:
            fargs = ["--bitrates", str(args.bitrates[0]), "--sizes", args.sizes,
                     "--segment-fragments", str(args.segment_fragments), "--seed", str(args.seed)]
            syncs = count_syncs(fargs, work)
        profile = None
        if args.profile:
            footage = Footage.make(int(args.bitrates[0] * 1_000_000), args.fragments, args.sizes, args.seed)
            profile = profile_writer(footage, work, keys, args.segment_fragments, args.profile_top)
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        if args.keep:
            print(f"  kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    report = {"bench": "writer", "command": command_line(), "machine": machine,
              "config": {"fragments": args.fragments, "segment_fragments": args.segment_fragments,
                         "repeat": args.repeat, "fragment_seconds": FRAGMENT_SECONDS, "vbr_spread": VBR_SPREAD,
                         "chunk_size": CHUNK_SIZE},
              "rows": results, "padding_model": padding_model([1, 2, 4, 6, 8, 12, 16])}
    if syncs is not None:
        segments = -(-STRACE_FRAGMENTS // args.segment_fragments)
        report["syncs"] = {"fragments": STRACE_FRAGMENTS, "segments": segments, "by_target": syncs,
                           "per_fragment": sum(syncs.values()) / STRACE_FRAGMENTS}
    print_report(report, profile)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def print_report(report: dict[str, Any], profile: str | None) -> None:
    m = report["machine"]
    print(f"$ {report['command']}")
    print(f"{m['date_utc']}  {m['nproc']} CPUs  {m['cpu_model']}  Python {m['python']}  "
          f"cryptography {m['cryptography']}  age {m['age_cli']}  data on {m['data_fs']}  "
          f"load {m['loadavg_at_start']:.2f}  code {m['code']}")
    rows = report["rows"]
    print_table("Writer (EvidenceStore, fsync per 1 s fragment, medians; CPU = user+sys of the store calls)",
                ["Mbit/s", "sizes", "MB/s", "x real time", "CPU s/h", "user s", "sys s", "p50 ms", "p99 ms",
                 "open ms", "close ms", "overhead %", "pad %"],
                [[r["bitrate_mbps"], r["sizes"], r["ours"]["mb_per_s"], r["ours"]["x_real_time"],
                  r["ours"]["cpu_s_per_footage_hour"],
                  r["ours"]["cpu_user_s"], r["ours"]["cpu_sys_s"], r["ours"]["write_ms_p50"],
                  r["ours"]["write_ms_p99"], r["ours"]["open_ms_p50"], r["ours"]["close_ms_p50"],
                  r["ours"]["overhead_pct"], r["ours"]["padding_pct"]] for r in rows])
    if any("theirs" in r for r in rows):
        print_table("Side by side, same bytes: per segment age -r R < plain > seg.age; sync seg.age; "
                    "sha256sum plain seg.age",
                    ["Mbit/s", "sizes", "ours MB/s", "theirs MB/s", "ours CPU s/h", "theirs CPU s/h",
                     "(age", "sha256sum)", "CPU ours/theirs", "wall ours/theirs"],
                    [[r["bitrate_mbps"], r["sizes"], r["ours"]["mb_per_s"], r["theirs"]["mb_per_s"],
                      r["ours"]["cpu_s_per_footage_hour"], r["theirs"]["cpu_s_per_footage_hour"],
                      r["theirs"]["age_cpu_s"] / r["ours"]["fragments"] * 3600,
                      r["theirs"]["sha256sum_cpu_s"] / r["ours"]["fragments"] * 3600,
                      r["ratio_cpu"], r["ratio_wall"]] for r in rows if "theirs" in r])
    if "syncs" in report:
        s = report["syncs"]
        print(f"\nfsync/fdatasync during {s['fragments']} fragments in {s['segments']} segments (strace): "
              f"{s['per_fragment']:.2f} per fragment")
        print("  " + "  ".join(f"{k}={v}" for k, v in sorted(s["by_target"].items())))
    print_table("Padding model (free boxes to a 64 KiB chunk per fragment; no I/O)",
                ["Mbit/s", "fragment B", "fixed pad B", "fixed %", "VBR %", "VBR MB/h"],
                [[p["bitrate_mbps"], p["fragment_bytes"], p["fixed_pad_bytes"], p["fixed_pad_pct"],
                  p["vbr_pad_pct"], p["vbr_pad_mb_per_hour"]] for p in report["padding_model"]])
    if profile:
        print("\ncProfile of the writer (first bitrate), by own time:")
        print(profile)


if __name__ == "__main__":
    sys.exit(main())
