"""`bwc-agent demo`: a simulated shift, end to end, through the same code that runs on a Pi.

An embedded reference bureau on 127.0.0.1; a device provisioned against it with a one-time token; the
simulator as its hardware; an officer's shift scripted in real time (arrive, start, opening statement,
notice, markers, an interruption and resume with the reason stated, leave); then the dock: upload,
receipts; then verification of both copies. Everything stays under the work directory:

    DIR/device/                 the device's data directory (ledger.db, journal.jsonl, segments/, keys/)
    DIR/bureau/                 the bureau's directory; its copy of the evidence in DIR/bureau/store/<device>/
    DIR/bureau-identity.txt     the demo bureau's age identity (a throwaway test key) to decrypt footage
    DIR/agent.toml              the device's configuration, as provisioning wrote it
    DIR/sim/                    simulator state (pty links, thermal file)
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agent.clock import SystemClock
from agent.compliance import report_from_records
from agent.config import load_config
from agent.evidence.age import AgeDecryptor, Identity
from agent.evidence.signing import load_public_key
from agent.evidence.verify import Verifier
from agent.provision import provision

DEVICE_ID = "BWC-DEMO-0001"
OFFICER_ID = "OFF-3107"


class Progress:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {text}", flush=True)


def run_demo(workdir: Path | None = None, quiet_logs: bool = True) -> int:
    from bureau.server import BureauServer
    from bureau.service import BureauConfig
    from hw_sim.scenario import ShiftScript, SimulatedHardware
    from hw_sim.speech import STATEMENTS, synthesize

    if quiet_logs:
        logging.getLogger().setLevel(logging.ERROR)
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="bwc-demo-"))
    if work.exists() and any(work.iterdir()):
        print(f"bwc-agent demo: {work} is not empty; give a new or empty --workdir", file=sys.stderr)
        return 2
    work.mkdir(parents=True, exist_ok=True)
    say = Progress()
    say(f"work directory {work}")

    broker, consumer = start_mqtt(work / "bureau", say)
    server = BureauServer(BureauConfig(dir=work / "bureau", host="127.0.0.1", port=0,
                                       mqtt_url=broker.url if broker else None), poll_interval_s=0.1)
    server.start()
    device = hw = None
    try:
        say(f"bureau service listening on {server.base_url}")
        shutil.copy(work / "bureau" / "keys" / "bureau-identity.txt", work / "bureau-identity.txt")
        token = server.service.enrollment.mint_token(DEVICE_ID).token
        say(f"technician minted a one-time enrollment token for {DEVICE_ID}")
        sim_dir = work / "sim"
        hw = SimulatedHardware(sim_dir, SystemClock())
        dock_port = hw.add_dock()
        gps_port = hw.add_gps()
        result = provision(
            bureau_url=server.base_url, token=token, device_id=DEVICE_ID, data_dir=work / "device",
            config_file=work / "agent.toml", ca_file=work / "bureau" / "ca.pem",
            extra_config={
                "device": {"officer_id": OFFICER_ID, "language": "zh-CN"},
                "recording": {"width": 640, "height": 360, "fps": 15, "bitrate_bps": 1_000_000,
                              "pre_event_s": 10, "segment_s": 20},
                "session": {"category": "penalty", "stage": "on_site"},
                "sync": {"dock_port": dock_port, "gps_port": gps_port, "telemetry_period_s": 5},
                "hardware": {"camera": "sim", "audio": "sim", "buttons": "sim"},
            })
        say(f"provisioned: certificate {result.cert_file.name}, {len(result.recipients)} bureau recipient(s), "
            f"config {result.config_file.name}")
        cfg = load_config(result.config_file)
        device = start_device(cfg, hw, result)
        say("device booted: buffering the pre-event ring (officer walking to the scene)")

        script = ShiftScript(hw, cfg.hardware.record_button_pin, cfg.hardware.mark_button_pin, log=say)
        opening = synthesize(STATEMENTS["opening"]["zh-CN"][0], "zh-CN")
        notice = synthesize(STATEMENTS["notice"]["zh-CN"][0], "zh-CN")
        reason = synthesize(STATEMENTS["interruption_reason"]["zh-CN"][0], "zh-CN")
        script.wait(12, "arriving at the scene")
        script.start()
        script.wait_prompts()
        script.say(opening, "opening statement (time, place, officers, act, focus)")
        script.wait_prompts()
        script.say(notice, "notice to the party that they are being recorded")
        script.menu("marker", "show_id")
        script.wait(4, "inspecting the premises")
        script.menu("marker", "inspection")
        script.wait(3, "heavy rain starts")
        script.menu("interruption", "severe_weather")
        script.wait(8, "sheltering from the rain; not recording")
        script.start()
        script.wait_prompts()
        script.say(reason, "reason for the interruption")
        script.menu("marker", "evidence_taking")
        script.wait(6, "taking evidence")
        script.stop()
        script.wait(2, "leaving the scene")
        say("shift over: the device goes into the dock")
        hw.dock.plug()
        synced = device.wait_synced(180)
        say("dock reports: " + ("everything receipted, safe to remove" if synced else "sync did not finish"))
        time.sleep(1)  # the last telemetry and event summaries leave the outbox
        device.stop()
        device = None
        return summarise(work, cfg, server, synced, say, consumer)
    finally:
        if device is not None:
            device.stop()
        if hw is not None:
            hw.close()
        server.stop()
        if consumer is not None:
            consumer.stop()
        if broker is not None:
            broker.stop()


def start_mqtt(bureau_dir: Path, say):
    """The bureau's mosquitto and its consumer, when mosquitto is installed (./dev installs it)."""
    from agent.sync.https import client_ssl_context
    from bureau.broker import BrokerError, BureauBroker
    from bureau.keys import BureauKeys
    from bureau.mqtt_consumer import MqttConsumer, MqttFeedDatabase

    keys = BureauKeys.load_or_create(bureau_dir)
    try:
        broker = BureauBroker(bureau_dir, keys).start()
    except BrokerError as exc:
        say(f"no MQTT in this demo: {exc}")
        return None, None
    consumer = MqttConsumer(MqttFeedDatabase(bureau_dir / "mqtt.db"), broker.host, broker.port,
                            client_ssl_context(keys.ca_cert_path(bureau_dir), broker.consumer_cert,
                                               broker.consumer_key))
    consumer.start()
    consumer.wait_ready(10)
    say(f"bureau MQTT broker on {broker.url} (TLS, client certificates, per-device ACL)")
    return broker, consumer


def start_device(cfg, hw, result):
    from agent.daemon import Device, load_credentials

    device = Device(cfg, hw.hardware(), hw.clock, load_credentials(cfg))
    device.start()
    return device


def summarise(work: Path, cfg, server, synced: bool, say, consumer=None) -> int:
    identity = Identity.load(work / "bureau-identity.txt")
    pub = cfg.keys.device_cert
    dev_report = Verifier(identity, load_public_key(pub.read_bytes())).verify_path(work / "device")
    bureau_copy = work / "bureau" / "store" / DEVICE_ID
    bur_report = Verifier(identity, load_public_key(pub.read_bytes())).verify_path(bureau_copy)
    records = [rec for _, rec in _jsonl(bureau_copy / "ledger.jsonl")]
    sessions = [r.fields["body"]["session_id"] for r in records if r.fields["type"] == "session_open"]
    segs = [r.fields["body"] for r in records if r.fields["type"] == "segment"]
    receipts = [r for r in records if r.fields["type"] == "receipt"]
    frames = sum(s["video_frames"] for s in segs)
    seconds = sum((s["last_pts_us"] or 0) - (s["first_pts_us"] or 0) for s in segs) / 1e6
    probe = ffprobe_first_segment(bureau_copy, segs, identity)
    print()
    print("=" * 78)
    print(f"Simulated shift of {DEVICE_ID} (officer {OFFICER_ID})")
    print("=" * 78)
    for sid in sessions:
        print(report_from_records(sid, records).render())
    print()
    print(f"segments          {len(segs)} ({seconds / 60:.1f} min of footage, {frames} video frames, "
          f"{sum(1 for s in segs if s['truncated'])} truncated)")
    print(f"receipts          {len(receipts)} of {len(segs)} segments receipted by the bureau (signed, verified)")
    tracks = sum(len(s.get("sidecars", [])) for s in segs)
    print(f"GPS tracks        {tracks} encrypted track sidecar(s), uploaded and verified with their segments")
    print(f"ffprobe           {probe}")
    if consumer is not None:
        feed = consumer.db
        status = feed.latest_status(DEVICE_ID) or {}
        events = feed.events(DEVICE_ID)
        print(f"MQTT at bureau    last status {status.get('state', 'none')} (device off after the dock), telemetry "
              f"{'received' if feed.latest_telemetry(DEVICE_ID) else 'none'}, {len(events)} ledger event "
              f"summaries (e.g. {', '.join(sorted({e['type'] for e in events})[:4])})")
    print(f"device copy       {'VERIFIED' if dev_report.ok else 'FAILED'}: {dev_report.records} records, "
          f"{dev_report.signatures_ok} signatures, {dev_report.segments_ok} intact + "
          f"{dev_report.segments_purged} purged segments" + _problems(dev_report))
    print(f"bureau copy       {'VERIFIED' if bur_report.ok else 'FAILED'}: {bur_report.records} records, "
          f"{bur_report.decrypted} files (segments and tracks) decrypted and checked" + _problems(bur_report))
    print()
    print("Artefacts (check them with standard tools):")
    print(f"  device data     {work / 'device'}")
    print(f"  bureau store    {bureau_copy}")
    print(f"  bureau key      {work / 'bureau-identity.txt'}  (a throwaway demo key)")
    print(f"  bwc-agent verify {bureau_copy} --identity {work / 'bureau-identity.txt'}")
    if segs:
        print(f"  age -d -i {work / 'bureau-identity.txt'} {bureau_copy / 'segments' / segs[0]['file']} | ffprobe -")
    ok = synced and dev_report.ok and bur_report.ok and len(receipts) == len(segs) and len(segs) > 0
    print()
    print("RESULT: " + ("shift recorded, uploaded, receipted and verified" if ok else "something failed (see above)"))
    return 0 if ok else 1


def _problems(report) -> str:
    return "" if report.ok else "\n    " + "\n    ".join(str(p) for p in report.problems[:10])


def _jsonl(path: Path):
    from agent.evidence.records import SignedRecord

    with open(path, "rb") as fh:
        for i, line in enumerate(fh, 1):
            yield i, SignedRecord.from_line(line)


def ffprobe_first_segment(folder: Path, segs: list[dict], identity: Identity) -> str:
    if not segs or shutil.which("ffprobe") is None:
        return "skipped (no segments or no ffprobe)"
    path = folder / "segments" / segs[0]["file"]
    with open(path, "rb") as fh:
        plain = b"".join(AgeDecryptor(identity).chunks(fh))
    out = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-show_entries",
                          "stream=codec_name,width,height,nb_read_frames", "-of", "csv=p=0", "-"],
                         input=plain, capture_output=True, timeout=120)
    if out.returncode != 0:
        return f"FAILED on {path.name}: {out.stderr.decode(errors='replace').strip()[:200]}"
    streams = " + ".join(line for line in out.stdout.decode().split() if line)
    return f"{path.name} decodes cleanly: {streams}"
