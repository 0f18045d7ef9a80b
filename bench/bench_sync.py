"""Sync benchmark: uploading to the reference bureau over loopback HTTPS (issue 5), beside `curl`.

Threads: the main thread drives everything. The bureau runs as a child process (`python -m bureau serve`,
127.0.0.1, stops by itself after `--bureau-exit-after` s), so its CPU is counted apart from the client's;
each measured upload (ours and curl's) runs in a child process of its own, so its CPU and peak RSS come
from `wait4`. The cut trials run a loopback TCP proxy in two daemon threads per connection.

Figures (every one also in `--json`):
  1. Throughput: the same random file sent to the same bureau in the same run, interleaved, `--repeat`
     times (medians): ours (`agent.sync.tus.TusClient`, device certificate, as the Syncer runs it: 4 MiB
     PATCH requests with a sha256 `Upload-Checksum`), ours in one request without checksum, and `curl`
     (POST to create, then one `PATCH -T file`, the same certificate, key and CA). MB/s, client CPU s/GB,
     bureau CPU s/GB, the ratio ours / curl.
  2. Memory: peak RSS (VmHWM, sampled) of the uploading process while it sends a 2 GiB segment (a sparse
     file), ours beside curl, and ours before the upload began.
  3. Bytes re-sent after a cut: an upload through a proxy that, at a random point, resets both sides,
     or stalls (stops forwarding; the client's socket timeout ends it), or the bureau is SIGKILLed and
     restarted; the client resumes (HEAD, then PATCH from the bureau's offset). Re-sent = body bytes
     the client sent in all - file size; with and without per-request checksum.
  4. Last byte to verified receipt: real segments (written by EvidenceStore, ledger uploaded), each
     uploaded with the Syncer's own methods; from the moment the last body byte is handed to the socket
     to the PATCH answer (the bureau hashes, commits and signs), and to the receipt fetched, verified
     against the pinned key and recorded (segment RECEIPTED); once per segment, and once as
     `Syncer.sync_once()` does it (receipts fetched after the whole batch).

    .venv/bin/python bench/bench_sync.py              # default run, about 4 minutes on 2 cores
    .venv/bin/python bench/bench_sync.py --quick      # smoke run, under a minute
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import os
import random
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_writer import chosen_parts, command_line, machine_info, percentile, print_table

MB = 1024 * 1024
SYNCER_REQUEST_BYTES = 4 * MB  # agent.sync.syncer.Syncer's default, which the daemon uses
DEVICE_ID = "BWC-BENCH-SYNC"


def proc_status(key: str, pid: int | str = "self") -> int:
    """A kB figure from /proc/<pid>/status (VmRSS, VmHWM, ...), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def write_random_file(path: Path, size: int, seed: int) -> Path:
    rng = random.Random(seed)
    block = 4 * MB
    with open(path, "wb") as fh:
        left = size
        while left:
            n = min(block, left)
            fh.write(rng.randbytes(n))
            left -= n
    return path


def metadata(segment_id: str) -> dict[str, str]:
    # The bureau holds no record for these files, so it keeps them complete but unreceipted
    # ("awaiting ledger") and never hashes them at the end: the figure is the transfer alone.
    return {"segment_id": segment_id, "sha256_cipher": "0" * 64, "device": DEVICE_ID}


# --- the bureau and the device's credentials -------------------------------------------------------


@dataclass
class Bench:
    work: Path
    bureau_dir: Path
    bureau: Any  # bureau.testing.BureauProcess
    device: Any  # bureau.testing.SimDevice
    ca_file: Path
    exit_after_s: float

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.bureau.port}/v1/uploads"

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.bureau.port}"

    def ssl_context(self) -> Any:
        from agent.sync.https import client_ssl_context

        e = self.device.enrolled
        return client_ssl_context(self.ca_file, e.cert_file, e.key_file)

    def restart_bureau(self) -> None:
        from bureau.testing import BureauProcess

        port = self.bureau.port
        self.bureau.stop()
        self.bureau = BureauProcess(self.bureau_dir, port=port, exit_after_s=self.exit_after_s)

    def drop_incoming(self) -> None:
        """Remove finished transfer files of the throughput runs (this bench's own temp bureau)."""
        for path in (self.bureau_dir / "incoming").iterdir():
            with contextlib.suppress(OSError):
                path.unlink()


def open_bench(work: Path, exit_after_s: float) -> Bench:
    from bureau.testing import BureauProcess, make_device

    bureau_dir = work / "bureau"
    bureau = BureauProcess(bureau_dir, exit_after_s=exit_after_s)
    device = make_device(bureau.port, bureau_dir, DEVICE_ID, work / "devices")
    return Bench(work, bureau_dir, bureau, device, bureau_dir / "ca.pem", exit_after_s)


# --- 1 + 2. one upload in a child process: ours or curl ---------------------------------------------


def upload_child(args: argparse.Namespace) -> None:
    """The child: send one file with TusClient, print what it cost (its own CPU around the upload)."""
    from agent.sync.https import client_ssl_context
    from agent.sync.tus import TusClient

    if args.blocksize:
        # What-if only: http.client hands a body to the socket in `blocksize` pieces (8 KiB by default);
        # agent.sync.https does not set it. Changed here for this child process alone.
        http.client.HTTPSConnection.__init__.__kwdefaults__["blocksize"] = args.blocksize
    ctx = client_ssl_context(Path(args.ca), Path(args.cert), Path(args.key))
    client = TusClient(args.url, ctx, timeout_s=60, request_bytes=args.request_bytes)
    rss_before = proc_status("VmRSS")
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    client.upload(Path(args.file), metadata(args.segment_id), use_checksum=args.checksum)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    client.close()
    print(json.dumps({"wall_s": wall, "cpu_user_s": r1.ru_utime - r0.ru_utime, "cpu_sys_s": r1.ru_stime - r0.ru_stime,
                      "bytes_sent": client.bytes_sent, "rss_before_upload": rss_before,
                      "vm_hwm": proc_status("VmHWM")}))


def run_child(cmd: list[str], timeout_s: float) -> tuple[str, Any, int]:
    """Run a command; return (stdout, its rusage from wait4, its peak RSS).

    The peak is VmHWM read from /proc every 20 ms while it runs, not ru_maxrss: Linux carries the
    parent's high-water mark into a child across exec, so ru_maxrss of a child of this (large) process
    says how big the parent was.
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    timer = threading.Timer(timeout_s, proc.kill)
    timer.start()
    peak = {"hwm": 0}
    running = threading.Event()
    running.set()

    def sample() -> None:
        while running.is_set():
            with contextlib.suppress(OSError, ValueError):
                peak["hwm"] = max(peak["hwm"], proc_status("VmHWM", proc.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, name="rss-sampler", daemon=True)
    sampler.start()
    try:
        out, err = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
        running.clear()  # before the child is reaped, so its pid is not read after reuse
        sampler.join()
        _pid, status, usage = os.wait4(proc.pid, 0)
    finally:
        running.clear()
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited {proc.returncode}: {err[-2000:]}")
    return out, usage, peak["hwm"]


def upload_ours(bench: Bench, path: Path, segment_id: str, request_bytes: int, checksum: bool,
                blocksize: int = 0) -> dict[str, Any]:
    e = bench.device.enrolled
    cmd = [sys.executable, __file__, "--upload-child", "--url", bench.url, "--file", str(path), "--ca",
           str(bench.ca_file), "--cert", str(e.cert_file), "--key", str(e.key_file), "--segment-id", segment_id,
           "--request-bytes", str(request_bytes), "--blocksize", str(blocksize)]
    if checksum:
        cmd.append("--checksum")
    server0 = proc_cpu(bench.bureau.proc.pid)
    t0 = time.perf_counter()
    out, usage, peak = run_child(cmd, 1800)
    wall = time.perf_counter() - t0
    server = proc_cpu(bench.bureau.proc.pid) - server0
    child = json.loads(out.strip().splitlines()[-1])
    size = path.stat().st_size
    cpu = child["cpu_user_s"] + child["cpu_sys_s"]
    return {"size": size, "wall_s": child["wall_s"], "mb_per_s": size / 1e6 / child["wall_s"],
            "cpu_s": cpu, "cpu_user_s": child["cpu_user_s"], "cpu_sys_s": child["cpu_sys_s"],
            "cpu_s_per_gb": cpu / (size / 1e9),
            "process_cpu_s": usage.ru_utime + usage.ru_stime, "process_wall_s": wall,
            "server_cpu_s_per_gb": server / (size / 1e9), "max_rss": max(peak, child["vm_hwm"]),
            "rss_before_upload": child["rss_before_upload"], "bytes_sent": child["bytes_sent"]}


def curl_base(bench: Bench) -> list[str]:
    e = bench.device.enrolled
    return ["curl", "-sS", "--fail", "--cacert", str(bench.ca_file), "--cert", str(e.cert_file), "--key",
            str(e.key_file), "-H", "Tus-Resumable: 1.0.0"]


def upload_curl(bench: Bench, path: Path, segment_id: str) -> dict[str, Any]:
    """tus with curl: POST (creation) and one PATCH streaming the file (-T reads it in 64 KiB blocks)."""
    size = path.stat().st_size
    meta = ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in metadata(segment_id).items())
    server0 = proc_cpu(bench.bureau.proc.pid)
    t0 = time.perf_counter()
    out, create, _peak = run_child([*curl_base(bench), "-X", "POST", "-H", f"Upload-Length: {size}", "-H",
                             f"Upload-Metadata: {meta}", "-H", "Content-Length: 0", "-D", "-", "-o", "/dev/null",
                             bench.url], 60)
    location = next(line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.lower().startswith("location:"))
    t1 = time.perf_counter()
    out, patch, peak = run_child([*curl_base(bench), "-X", "PATCH", "-H", "Upload-Offset: 0", "-H",
                            "Content-Type: application/offset+octet-stream", "-H", "Expect:", "-T", str(path),
                            "-o", "/dev/null", "-w", "%{http_code}", location], 1800)
    t2 = time.perf_counter()
    if out.strip() != "204":
        raise RuntimeError(f"curl PATCH answered {out.strip()}")
    server = proc_cpu(bench.bureau.proc.pid) - server0
    cpu_user = create.ru_utime + patch.ru_utime
    cpu_sys = create.ru_stime + patch.ru_stime
    return {"size": size, "wall_s": t2 - t0, "mb_per_s": size / 1e6 / (t2 - t0), "create_wall_s": t1 - t0,
            "cpu_s": cpu_user + cpu_sys, "cpu_user_s": cpu_user, "cpu_sys_s": cpu_sys,
            "cpu_s_per_gb": (cpu_user + cpu_sys) / (size / 1e9),
            "server_cpu_s_per_gb": server / (size / 1e9), "max_rss": peak}


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        out[key] = statistics.median(values) if isinstance(values[0], (int, float)) else values[0]
    out["repeats"] = len(runs)
    return out


THROUGHPUT_CASES = [
    # name, request bytes (0 = whole file), checksum, http.client blocksize (0 = default), what-if
    ("ours: Syncer defaults (4 MiB PATCHes, sha256 checksum)", SYNCER_REQUEST_BYTES, True, 0, False),
    ("ours: one PATCH, no checksum (as curl)", 0, False, 0, False),
    ("curl: one PATCH -T file", 0, False, 0, False),
    ("what-if: Syncer defaults, http.client blocksize 256 KiB", SYNCER_REQUEST_BYTES, True, 256 * 1024, True),
]


def run_throughput(bench: Bench, size: int, repeat: int, seed: int, what_if: bool) -> list[dict[str, Any]]:
    path = write_random_file(bench.work / "throughput.bin", size, seed)
    cases = [c for c in THROUGHPUT_CASES if what_if or not c[4]]
    runs: dict[str, list[dict[str, Any]]] = {c[0]: [] for c in cases}
    # Warm-up, not reported: page cache, the bureau's first connection.
    upload_ours(bench, path, "TPUT-warmup", SYNCER_REQUEST_BYTES, True)
    bench.drop_incoming()
    for r in range(repeat):
        for n, (name, request, checksum, blocksize, _what_if) in enumerate(cases):
            sid = f"TPUT-{r}-{n}"
            if name.startswith("curl"):
                runs[name].append(upload_curl(bench, path, sid))
            else:
                runs[name].append(upload_ours(bench, path, sid, request or size, checksum, blocksize))
            bench.drop_incoming()
        print(f"  throughput round {r + 1}/{repeat} done", file=sys.stderr)
    path.unlink()
    rows = [{"case": name, **median_of(values)} for name, values in runs.items()]
    curl = next(r for r in rows if r["case"].startswith("curl"))
    for r in rows:
        r["cpu_ratio_to_curl"] = r["cpu_s"] / curl["cpu_s"]
        r["wall_ratio_to_curl"] = r["wall_s"] / curl["wall_s"]
    return rows


def run_memory(bench: Bench, size: int) -> dict[str, Any]:
    path = bench.work / "big-segment.age"
    with open(path, "wb") as fh:
        fh.truncate(size)  # sparse: reading it costs no disk; the upload's memory does not depend on content
    ours = upload_ours(bench, path, "BIG-ours", SYNCER_REQUEST_BYTES, True)
    bench.drop_incoming()
    curl = upload_curl(bench, path, "BIG-curl")
    bench.drop_incoming()
    bureau_hwm = proc_status("VmHWM", bench.bureau.proc.pid)
    path.unlink()
    return {"size": size, "ours_max_rss": ours["max_rss"], "ours_rss_before_upload": ours["rss_before_upload"],
            "ours_mb_per_s": ours["mb_per_s"], "ours_bytes_sent": ours["bytes_sent"],
            "curl_max_rss": curl["max_rss"], "curl_mb_per_s": curl["mb_per_s"], "bureau_vm_hwm": bureau_hwm,
            "request_bytes": SYNCER_REQUEST_BYTES}


# --- 3. cuts --------------------------------------------------------------------------------------


class CuttingProxy:
    """A loopback TCP proxy that forwards until `cut_after` client->server bytes, then resets both sides
    ("reset") or stops forwarding and holds the connection ("stall"). One connection at a time matters."""

    def __init__(self, target_port: int, cut_after: int, mode: str):
        self.target_port = target_port
        self.cut_after = cut_after
        self.mode = mode
        self.forwarded_up = 0
        self.cut = threading.Event()
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, name="cut-proxy-accept", daemon=True).start()

    def _accept(self) -> None:
        deadline = time.monotonic() + 300
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                client, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        src.settimeout(0.2)
        deadline = time.monotonic() + 300
        while not self._stop.is_set() and time.monotonic() < deadline:
            if self.cut.is_set():
                if self.mode == "reset":
                    break
                time.sleep(0.05)  # stall: hold the connection, forward nothing
                continue
            try:
                data = src.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            if up and self.forwarded_up + len(data) >= self.cut_after:
                data = data[: max(0, self.cut_after - self.forwarded_up)]
                self.cut.set()
            try:
                dst.sendall(data)
            except OSError:
                break
            if up:
                self.forwarded_up += len(data)
        if self.mode == "reset":
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
                with contextlib.suppress(OSError):
                    s.close()

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.sock.close()
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.close()


def cut_trial(bench: Bench, path: Path, kind: str, checksum: bool, cut_at: int, n: int,
              timeout_s: float) -> dict[str, Any]:
    """One upload cut at `cut_at` bytes, then resumed directly; bytes sent in all.

    The upload is created directly and then sent to the proxy's port: the bureau's Location is an
    absolute URL of its own port, so an upload created through the proxy would bypass it.
    """
    from agent.sync.https import HttpsSession
    from agent.sync.tus import TusClient, TusInterrupted

    size = path.stat().st_size
    ctx = bench.ssl_context()
    sid = f"CUT-{kind}-{int(checksum)}-{n}"
    creator = TusClient(bench.url, ctx, timeout_s=30)
    upload_url = creator.create(size, metadata(sid))
    creator.close()
    first_url = upload_url
    proxy = None
    if kind in ("reset", "stall"):
        proxy = CuttingProxy(bench.bureau.port, cut_at, kind)
        first_url = upload_url.replace(f":{bench.bureau.port}/", f":{proxy.port}/")
    first = TusClient(bench.url, session=HttpsSession(ctx, timeout_s=timeout_s, user_timeout_ms=int(timeout_s * 1000)),
                      request_bytes=SYNCER_REQUEST_BYTES)
    if kind == "kill":
        def kill_when_sent() -> None:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and first.bytes_sent < cut_at:
                time.sleep(0.0005)
            if first.bytes_sent < size:
                bench.bureau.proc.send_signal(signal.SIGKILL)

        threading.Thread(target=kill_when_sent, name="kill-bureau", daemon=True).start()
    t0 = time.perf_counter()
    interrupted = False
    try:
        first.upload(path, metadata(sid), upload_url=first_url, use_checksum=checksum)
    except TusInterrupted:
        interrupted = True
    t_cut = time.perf_counter()
    first.close()
    if proxy is not None:
        proxy.close()
    if kind == "kill":
        bench.bureau.proc.wait(10)
        bench.restart_bureau()
    if not interrupted:
        return {"kind": kind, "checksum": checksum, "interrupted": False, "cut_at": cut_at, "size": size}
    second = TusClient(bench.url, ctx, timeout_s=30, request_bytes=SYNCER_REQUEST_BYTES)
    offset_after_cut = second.offset(upload_url)
    t1 = time.perf_counter()
    second.upload(path, metadata(sid), upload_url=upload_url, use_checksum=checksum)
    t2 = time.perf_counter()
    second.close()
    sent = first.bytes_sent + second.bytes_sent
    return {"kind": kind, "checksum": checksum, "interrupted": True, "cut_at": cut_at, "size": size,
            "sent_before_cut": first.bytes_sent, "offset_after_cut": offset_after_cut,
            "resent": sent - size, "resent_mib": (sent - size) / MB,
            "lost_in_flight": first.bytes_sent - offset_after_cut,
            "cut_detected_s": t_cut - t0, "resume_wall_s": t2 - t1}


def run_cuts(bench: Bench, size: int, trials: dict[str, int], seed: int, timeout_s: float) -> dict[str, Any]:
    rng = random.Random(seed)
    path = write_random_file(bench.work / "cut.bin", size, seed + 1)
    rows: list[dict[str, Any]] = []
    plan = [(kind, checksum) for kind in ("reset", "kill", "stall") for checksum in (True, False)
            if trials.get(kind, 0) and (kind != "stall" or checksum)]
    for kind, checksum in plan:
        for n in range(trials[kind]):
            cut_at = int(size * rng.uniform(0.1, 0.9))
            row = cut_trial(bench, path, kind, checksum, cut_at, n, timeout_s)
            rows.append(row)
            bench.drop_incoming()
        print(f"  cut trials {kind} checksum={checksum} done", file=sys.stderr)
    path.unlink()
    summary = []
    for kind, checksum in plan:
        done = [r for r in rows if r["kind"] == kind and r["checksum"] == checksum and r["interrupted"]]
        if not done:
            continue
        resent = [r["resent"] / MB for r in done]
        summary.append({"kind": kind, "checksum": checksum, "trials": len(done),
                        "resent_mib_median": statistics.median(resent), "resent_mib_max": max(resent),
                        "resent_mib_min": min(resent),
                        "lost_in_flight_mib_median": statistics.median(r["lost_in_flight"] / MB for r in done),
                        "cut_detected_s_median": statistics.median(r["cut_detected_s"] for r in done),
                        "resume_wall_s_median": statistics.median(r["resume_wall_s"] for r in done)})
    return {"size": size, "request_bytes": SYNCER_REQUEST_BYTES, "timeout_s": timeout_s, "summary": summary,
            "trials": rows}


# --- 4. last byte -> verified receipt ----------------------------------------------------------------


def timed_session_class() -> type:
    from agent.sync.https import HttpsSession

    class EndMarker:
        """A request body that notes when http.client has sent its last block (the read after it is empty)."""

        def __init__(self, inner: Any, session: Any):
            self.inner, self.session, self.marked = inner, session, False

        def read(self, size: int = -1) -> bytes:
            data = self.inner.read(size)
            if not data and not self.marked:
                self.marked = True
                self.session.last_body_end = time.perf_counter()
            return data

    class TimedSession(HttpsSession):
        last_body_end = 0.0

        def request(self, method: str, url: str, headers: dict[str, str] | None = None, body: Any = None,
                    content_length: int | None = None) -> Any:
            if body is not None and hasattr(body, "read"):
                body = EndMarker(body, self)
            return super().request(method, url, headers, body, content_length)

    return TimedSession


def record_segments(store: Any, session_id: str, count: int, fragments: int, seed: int) -> None:
    """`count` real segments of `fragments` 1 s fragments (1 MB each, 8 Mbit/s) through the evidence store."""
    from agent.storage.segment_writer import FragmentInfo

    rng = random.Random(seed)
    pool = rng.randbytes(4 * MB)
    for index in range(count):
        seg = store.open_segment(session_id, index)
        for f in range(fragments):
            start = rng.randrange(3 * MB)
            seg.write_fragment(pool[start: start + 1_000_000],
                               FragmentInfo(30, 48_000, f * 1_000_000, f * 1_000_000 + 966_667))
        seg.close()


def run_receipts(bench: Bench, count: int, fragments: int, seed: int) -> dict[str, Any]:
    from agent.evidence.receipts import ReceiptVerifier
    from agent.evidence.signing import load_public_key
    from agent.sync.syncer import PENDING, Syncer, SyncResult

    store = bench.device.store
    receipt_key = load_public_key(bench.device.enrolled.enrollment["receipt_public_key"].encode())
    receipted_at: dict[str, float] = {}
    original = store.record_receipt

    def record_receipt(segment_id: str, receipt: Any) -> Any:
        out = original(segment_id, receipt)
        receipted_at[segment_id] = time.perf_counter()
        return out

    store.record_receipt = record_receipt  # instrumentation: note when each receipt is durable
    session_class = timed_session_class()

    def new_syncer() -> tuple[Syncer, Any]:
        session = session_class(bench.ssl_context(), timeout_s=30)
        return Syncer(store, bench.base_url, session, ReceiptVerifier(receipt_key), store.clock,
                      request_bytes=SYNCER_REQUEST_BYTES), session

    # (a) one segment at a time: upload, then fetch and verify its receipt at once.
    record_segments(store, "SRCPT-one", count, fragments, seed)
    syncer, session = new_syncer()
    syncer.time_sync()
    syncer.upload_ledger()
    per_segment = []
    for row in [r for r in syncer.ordered_pending() if r["segment_id"].startswith("SRCPT-one")]:
        t0 = time.perf_counter()
        syncer.upload_segment(row)
        answered = time.perf_counter()
        last_byte = session.last_body_end
        syncer.fetch_receipts(SyncResult())
        sid = row["segment_id"]
        per_segment.append({"segment_id": sid, "size": row["size"], "upload_wall_s": answered - t0,
                            "to_answer_ms": 1000 * (answered - last_byte),
                            "to_receipt_ms": 1000 * (receipted_at[sid] - last_byte)})
    # (b) as Syncer.sync_once does it: every segment, then the receipts.
    record_segments(store, "SRCPT-batch", count, fragments, seed + 1)
    syncer, session = new_syncer()
    last_bytes: dict[str, float] = {}
    original_upload = syncer.upload_segment

    def upload_segment(row: dict[str, Any]) -> None:
        original_upload(row)
        last_bytes[row["segment_id"]] = session.last_body_end

    syncer.upload_segment = upload_segment  # type: ignore[method-assign]
    t0 = time.perf_counter()
    result = syncer.sync_once()
    batch_wall = time.perf_counter() - t0
    if result.error:
        raise RuntimeError(f"sync_once failed: {result.error}")
    batch = [{"segment_id": sid, "to_receipt_ms": 1000 * (receipted_at[sid] - t)} for sid, t in last_bytes.items()]
    batch_bytes = sum(r["size"] for r in store.segments() if r["segment_id"].startswith("SRCPT-batch"))
    left = store.segments(PENDING)

    def dist(values: list[float]) -> dict[str, float]:
        return {"p50": percentile(values, 50), "p99": percentile(values, 99), "max": max(values)}

    return {"segments": count, "segment_mb": statistics.median(r["size"] for r in per_segment) / 1e6,
            "per_segment_to_answer_ms": dist([r["to_answer_ms"] for r in per_segment]),
            "per_segment_to_receipt_ms": dist([r["to_receipt_ms"] for r in per_segment]),
            "per_segment_upload_mb_per_s": statistics.median(r["size"] / 1e6 / r["upload_wall_s"]
                                                             for r in per_segment),
            "sync_once_to_receipt_ms": dist([r["to_receipt_ms"] for r in batch]),
            "sync_once_wall_s": batch_wall, "sync_once_mb_per_s": batch_bytes / 1e6 / batch_wall,
            "not_receipted_after": len(left), "per_segment": per_segment}


# --- main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=int, default=512, help="MiB sent per throughput upload (default 512)")
    p.add_argument("--repeat", type=int, default=3, help="throughput runs per case, medians (default 3)")
    p.add_argument("--big-mb", type=int, default=2048, help="MiB of the segment for the memory figure (2048)")
    p.add_argument("--cut-mb", type=int, default=32, help="MiB of the file in the cut trials (default 32)")
    p.add_argument("--cuts", type=int, default=8, help="trials per cut kind and checksum setting (default 8; "
                   "bureau kills and stalls use half)")
    p.add_argument("--cut-timeout", type=float, default=5.0, help="client socket timeout in the cut trials, s")
    p.add_argument("--segments", type=int, default=10, help="segments per receipt-latency batch (default 10)")
    p.add_argument("--fragments", type=int, default=60, help="1 MB fragments per segment (default 60)")
    p.add_argument("--what-if", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the what-if throughput variant (default on)")
    p.add_argument("--only", help="comma-separated parts: throughput,memory,cuts,receipts (default all)")
    p.add_argument("--quick", action="store_true", help="smoke run: 64 MiB, 1 repeat, 256 MiB big file, 2 cuts")
    p.add_argument("--dir", help="where to work (a disk); default a temp dir under /var/tmp")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--bureau-exit-after", type=float, default=1800.0, help="the bureau process stops by itself")
    p.add_argument("--json", help="also write the figures as JSON to this file")
    # the upload child
    p.add_argument("--upload-child", action="store_true", help=argparse.SUPPRESS)
    for name in ("--url", "--file", "--ca", "--cert", "--key", "--segment-id"):
        p.add_argument(name, help=argparse.SUPPRESS)
    p.add_argument("--request-bytes", type=int, default=SYNCER_REQUEST_BYTES, help=argparse.SUPPRESS)
    p.add_argument("--checksum", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--blocksize", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.size_mb, args.repeat, args.big_mb, args.cuts, args.segments, args.fragments = 64, 1, 256, 2, 3, 20
    for name in ("size_mb", "repeat", "big_mb", "cut_mb", "cuts", "segments", "fragments"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    args.parts = chosen_parts(p, args.only, ("throughput", "memory", "cuts", "receipts"))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.upload_child:
        upload_child(args)
        return 0
    if shutil.which("curl") is None:
        print("curl is needed for the comparison", file=sys.stderr)
        return 2
    base = Path(args.dir) if args.dir else Path("/var/tmp")
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bwc-bench-sync-", dir=base))
    machine = machine_info(work)
    machine["curl"] = subprocess.run(["curl", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    report: dict[str, Any] = {"bench": "sync", "command": command_line(), "machine": machine}
    bench = open_bench(work, args.bureau_exit_after)
    try:
        if "throughput" in args.parts:
            report["throughput"] = {"size": args.size_mb * MB,
                                    "rows": run_throughput(bench, args.size_mb * MB, args.repeat, args.seed,
                                                           args.what_if)}
        if "memory" in args.parts:
            report["memory"] = run_memory(bench, args.big_mb * MB)
            print("  memory done", file=sys.stderr)
        if "cuts" in args.parts:
            trials = {"reset": args.cuts, "kill": max(1, args.cuts // 2), "stall": max(1, args.cuts // 2)}
            report["cuts"] = run_cuts(bench, args.cut_mb * MB, trials, args.seed, args.cut_timeout)
        if "receipts" in args.parts:
            report["receipts"] = run_receipts(bench, args.segments, args.fragments, args.seed)
            print("  receipts done", file=sys.stderr)
        report["bureau_cpu_s_total"] = proc_cpu(bench.bureau.proc.pid)
    finally:
        with contextlib.suppress(Exception):
            bench.device.close()
        bench.bureau.stop()
        if args.keep:
            print(f"  kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def print_report(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(f"$ {report['command']}")
    print(f"{m['date_utc']}  {m['nproc']} CPUs  {m['cpu_model']}  Python {m['python']}  "
          f"cryptography {m['cryptography']}  {m['curl']}  data on {m['data_fs']}  "
          f"load {m['loadavg_at_start']:.2f}  code {m['code']}")
    if "throughput" in report:
        t = report["throughput"]
        print_table(f"Upload throughput, loopback HTTPS (TLS, client certificate), {t['size'] / MB:.0f} MiB random "
                    f"file, bureau as a separate process, medians of {t['rows'][0]['repeats']}",
                    ["case", "MB/s", "client CPU s", "(user", "sys)", "client CPU s/GB", "bureau CPU s/GB",
                     "CPU / curl", "wall / curl"],
                    [[r["case"], r["mb_per_s"], r["cpu_s"], r["cpu_user_s"], r["cpu_sys_s"], r["cpu_s_per_gb"],
                      r["server_cpu_s_per_gb"], r["cpu_ratio_to_curl"], r["wall_ratio_to_curl"]]
                     for r in t["rows"]])
    if "memory" in report:
        mm = report["memory"]
        print_table(f"Peak RSS of the uploading process, one {mm['size'] / MB:.0f} MiB segment (sparse file)",
                    ["uploader", "peak RSS MB", "RSS before the upload MB", "MB/s"],
                    [["ours (TusClient, 4 MiB requests, checksum)", mm["ours_max_rss"] / 1e6,
                      mm["ours_rss_before_upload"] / 1e6, mm["ours_mb_per_s"]],
                     ["curl -T", mm["curl_max_rss"] / 1e6, "", mm["curl_mb_per_s"]],
                     ["(the bureau process, peak so far)", mm["bureau_vm_hwm"] / 1e6, "", ""]])
    if "cuts" in report:
        c = report["cuts"]
        print_table(f"Bytes re-sent after a cut ({c['size'] / MB:.0f} MiB file, {c['request_bytes'] / MB:.0f} MiB "
                    f"requests, cut at a uniform 10-90 %, client timeout {c['timeout_s']:g} s)",
                    ["cut", "checksum", "trials", "re-sent MiB median", "min", "max", "lost in flight MiB",
                     "cut noticed after s", "resume s"],
                    [[s["kind"], "sha256" if s["checksum"] else "none", s["trials"], s["resent_mib_median"],
                      s["resent_mib_min"], s["resent_mib_max"], s["lost_in_flight_mib_median"],
                      s["cut_detected_s_median"], s["resume_wall_s_median"]] for s in c["summary"]])
    if "receipts" in report:
        r = report["receipts"]
        print_table(f"Last body byte -> verified receipt ({r['segments']} segments of {r['segment_mb']:.1f} MB per "
                    "batch)",
                    ["", "p50 ms", "p99 ms", "max ms"],
                    [["per segment: last byte -> PATCH answered (bureau hashed, committed, signed)",
                      *r["per_segment_to_answer_ms"].values()],
                     ["per segment: last byte -> receipt verified and recorded",
                      *r["per_segment_to_receipt_ms"].values()],
                     ["Syncer.sync_once: last byte -> receipt recorded", *r["sync_once_to_receipt_ms"].values()]])
        print(f"  sync_once: {r['sync_once_wall_s']:.1f} s for the batch, {r['sync_once_mb_per_s']:.0f} MB/s end "
              f"to end; per-segment uploads {r['per_segment_upload_mb_per_s']:.0f} MB/s; not receipted after: "
              f"{r['not_receipted_after']}")


if __name__ == "__main__":
    sys.exit(main())
