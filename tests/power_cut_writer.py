"""The process that gets its power cut: records segments of random fragments until it is killed.

Used by tests/test_power_cut.py. Two ways to run it:
    python tests/power_cut_writer.py '<job json>'   write one job in this process
    python tests/power_cut_writer.py --serve        read one job per line on stdin and fork a writer
                                                    for each (the imports are paid once, so a hundred
                                                    power cuts stay fast); prints `EXIT <pid> <status>`
                                                    when that writer has died

A job: {"data_dir", "key" (device PEM), "recipient" (age1...), "run" (session number), "seed",
"max_segments", optionally "cut": {"point": <hw_sim.storage cut point>, "occurrence": n} or {"bytes": n}}.

The writer opens the store as the device does at start-up (open, recover), then records. Each line it
prints (one write() each, so a kill never leaves half a line) is a fact that was true when printed:
    START <pid>
    READY <head seq after recovery>
    OPEN <segment id>                                  the segment exists (file and index row)
    BEGIN <segment id> <n> <offset> <length> <sha256>  fragment n is about to be written at plaintext offset
    FRAG <segment id> <n> <offset> <length> <sha256>   fragment n is durable (write_fragment returned)
    CLOSING <segment id>
    CLOSED <segment id> <record seq>                   the segment record is committed
    DONE                                               max_segments written, exit 0 (the test kills earlier)

Threads: one, the writer's.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.clock import SystemClock  # noqa: E402
from agent.evidence.age import Recipient  # noqa: E402
from agent.storage.keys import PemFileSigner  # noqa: E402
from agent.storage.segment_writer import FragmentInfo  # noqa: E402
from agent.storage.store import EvidenceStore  # noqa: E402
from hw_sim.storage import SimStorage  # noqa: E402

DEVICE_ID = "BWC-POWERCUT-01"
FRAGMENT_BYTES = (20_000, 300_000)
FRAGMENTS_PER_SEGMENT = (2, 5)


def emit(*words: object) -> None:
    os.write(1, (" ".join(str(w) for w in words) + "\n").encode())


def write_job(job: dict[str, Any]) -> None:
    rng = random.Random(job["seed"])
    data_dir = Path(job["data_dir"])
    fs = SimStorage(data_dir) if job.get("cut") else None
    store = EvidenceStore(data_dir, DEVICE_ID, PemFileSigner.load(Path(job["key"])),
                          [Recipient.parse(job["recipient"])], SystemClock(), fs=fs)
    store.recover()
    emit("READY", store.ledger.head()[0])
    cut = job.get("cut")
    if fs is not None and cut:
        if "bytes" in cut:
            fs.cut_power_after_bytes(cut["bytes"])
        else:
            fs.cut_power_at(cut["point"], cut.get("occurrence", 1))
    session_id = f"R{job['run']:03d}"
    pts = 0
    for index in range(job["max_segments"]):
        seg = store.open_segment(session_id, index)
        emit("OPEN", seg.segment_id)
        for n in range(rng.randint(*FRAGMENTS_PER_SEGMENT)):
            data = rng.randbytes(rng.randint(*FRAGMENT_BYTES))
            facts = (seg.segment_id, n, seg.totals.plain_size, len(data), hashlib.sha256(data).hexdigest())
            emit("BEGIN", *facts)
            seg.write_fragment(data, FragmentInfo(video_frames=30, audio_samples=48_000, first_pts_us=pts,
                                                  last_pts_us=pts + 966_667))
            emit("FRAG", *facts)
            pts += 1_000_000
        emit("CLOSING", seg.segment_id)
        record = seg.close()
        emit("CLOSED", seg.segment_id, record.fields["seq"])
    store.close()
    emit("DONE")


def serve() -> None:
    """Fork one writer per job line; report how each ended. Ends when stdin closes."""
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            status = 0
            try:
                emit("START", os.getpid())
                write_job(job)
            except BaseException as exc:  # report, never hang the test: it waits for EXIT
                emit("ERROR", type(exc).__name__, str(exc).replace("\n", " "))
                status = 1
            os._exit(status)
        _, status = os.waitpid(pid, 0)
        how = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"code {os.WEXITSTATUS(status)}"
        emit("EXIT", pid, how)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # the test went away: die quietly
    if argv[1:] == ["--serve"]:
        serve()
        return 0
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    emit("START", os.getpid())
    write_job(json.loads(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
