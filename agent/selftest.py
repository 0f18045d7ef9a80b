"""`bwc-agent selftest`: every part a technician can check before a device goes out (R18).

Each check opens the real part through the same adapter the daemon uses (or the simulator's stand-in with
`--simulate`), reports PASS / FAIL / SKIP with a detail line, and never writes evidence: the storage check
writes and removes a scratch file beside the data, not in `segments/`. Exit status is non-zero on any FAIL.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import AgentConfig
from agent.daemon import Hardware


@dataclass
class Check:
    name: str
    result: str  # PASS | FAIL | SKIP
    detail: str

    def as_dict(self) -> dict[str, str]:
        return dict(self.__dict__)


def _run(name: str, fn: Callable[[], str | tuple[str, str]]) -> Check:
    try:
        out = fn()
    except Exception as exc:  # a failing part is a FAIL line, never a crash of the selftest
        return Check(name, "FAIL", f"{exc.__class__.__name__}: {exc}")
    if isinstance(out, tuple):
        return Check(name, out[0], out[1])
    return Check(name, "PASS", out)


class SelfTest:
    def __init__(self, cfg: AgentConfig, hw: Hardware, clock: Any):
        self.cfg = cfg
        self.hw = hw
        self.clock = clock

    def run(self) -> list[Check]:
        checks = [("keys", self.keys), ("storage", self.storage), ("clock", self.clock_check),
                  ("camera", self.camera), ("microphone", self.microphone), ("speaker", self.speaker),
                  ("buttons", self.buttons), ("fuel gauge", self.fuel_gauge), ("thermal", self.thermal),
                  ("gps", self.gps), ("dock line", self.dock), ("bureau", self.bureau), ("broker", self.broker)]
        return [_run(name, fn) for name, fn in checks]

    # --- checks -----------------------------------------------------------------------------------

    def keys(self) -> str:
        from agent.evidence.age import Recipient
        from agent.evidence.signing import key_id, load_public_key, public_key_der, verify_es256
        from agent.storage.keys import PemFileSigner

        k = self.cfg.keys
        signer = PemFileSigner.load(k.identity_key)
        probe = b"bwc-agent selftest " + os.urandom(16)
        verify_es256(signer.public_key(), probe, signer.sign(probe))
        detail = f"identity {key_id(signer.public_key())} signs and verifies"
        if k.device_cert:
            cert_key = load_public_key(k.device_cert.read_bytes())
            if public_key_der(cert_key) != public_key_der(signer.public_key()):
                raise ValueError(f"{k.device_cert} is for another key")
            detail += ", certificate matches"
        if not k.recipients:
            raise ValueError("no bureau recipients: segments could not be encrypted (run provision)")
        for r in k.recipients:
            Recipient.parse(r)
        if k.receipt_key:
            load_public_key(k.receipt_key.read_bytes())
        return detail + f", {len(k.recipients)} recipient(s)"

    def storage(self) -> str:
        data = self.cfg.device.data_dir
        data.mkdir(parents=True, exist_ok=True)
        scratch = data / ".selftest-scratch"
        block = os.urandom(1 << 20)
        started = time.monotonic()
        fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            fsyncs = []
            for _ in range(16):
                os.write(fd, block)
                t = time.monotonic()
                os.fsync(fd)
                fsyncs.append(time.monotonic() - t)
        finally:
            os.close(fd)
            scratch.unlink()  # a scratch file of the selftest, never evidence
        elapsed = time.monotonic() - started
        free = os.statvfs(data)
        free_bytes = free.f_bavail * free.f_frsize
        minutes = free_bytes * 8 / self.cfg.recording.bitrate_bps / 60
        mbps = self.cfg.recording.bitrate_bps / 1e6
        detail = (f"{16 / elapsed:.0f} MB/s with fsync per MB (worst fsync {max(fsyncs) * 1000:.0f} ms), "
                  f"{free_bytes / 1e9:.1f} GB free = {minutes:.0f} min at {mbps:g} Mbit/s")
        if minutes < self.cfg.storage.warn_minutes_left:
            return "FAIL", detail + " (below storage.warn_minutes_left)"
        return detail

    def clock_check(self) -> tuple[str, str]:
        status = self.clock.status()
        result = "FAIL" if status["quality"] == "unset" else "PASS"
        wall = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(self.clock.wall_us() / 1e6))
        return result, f"wall clock {wall} UTC, quality {status['quality']} ({status['source']})"

    def camera(self) -> str:
        from agent.capture.camera_picamera2 import CameraSettings, Picamera2VideoSource

        rec = self.cfg.recording
        settings = CameraSettings(width=rec.width, height=rec.height, fps=rec.fps, bitrate=rec.bitrate_bps)
        if self.cfg.hardware.camera == "opencv" and self.hw.picamera2 is None:
            import cv2

            from agent.capture.camera_opencv import OpenCVVideoSource

            device = self.cfg.hardware.opencv_device
            src = OpenCVVideoSource(None, clock=self.clock, settings=settings,
                                    capture_factory=lambda: cv2.VideoCapture(device))
        else:
            src = Picamera2VideoSource(None, clock=self.clock, picamera2_module=self.hw.picamera2, settings=settings)
        src.start()
        try:
            params = src.wait_video_params(8)
        finally:
            src.stop()
        return f"H.264 keyframe received, {params.width}x{params.height}@{params.fps}"

    def microphone(self) -> tuple[str, str] | str:
        if self.hw.pyaudio is None and self.cfg.hardware.audio == "none":
            return "SKIP", "audio disabled in config"
        from agent.capture.audio_pyaudio import PyAudioSource

        got: list[Any] = []
        src = PyAudioSource(got.append, clock=self.clock, pyaudio_module=self.hw.pyaudio)
        src.start()
        try:
            deadline = time.monotonic() + 3
            while not got and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            src.stop()
        if not got:
            raise RuntimeError("no audio within 3 s")
        return f"{len(got)} AAC frames in the first seconds at {src.settings.sample_rate} Hz"

    def speaker(self) -> tuple[str, str] | str:
        if self.hw.speaker is None and self.hw.pyaudio is None and self.cfg.hardware.audio == "none":
            return "SKIP", "audio disabled in config"
        from agent.voice_prompts.assets import PromptLibrary
        from agent.voice_prompts.playback import PromptPlayer

        done: list[Any] = []
        module = self.hw.speaker if self.hw.speaker is not None else self.hw.pyaudio
        if module is None:
            import pyaudio as module  # noqa: PLC0415 - only on a device
        player = PromptPlayer(module, PromptLibrary(), self.cfg.device.language, self.clock.mono_us,
                              on_finished=done.append)
        player.start()
        try:
            player.play("menu_cancelled")
            deadline = time.monotonic() + 10
            while not done and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            player.stop()
        if not done or not done[0].completed:
            raise RuntimeError(f"prompt not played ({done[0].error if done else 'timeout'})")
        return f"played a {self.cfg.device.language} prompt"

    def buttons(self) -> str:
        from gpiozero import Button

        hw = self.cfg.hardware
        buttons = [Button(pin, pull_up=True, bounce_time=None, pin_factory=self.hw.pin_factory)
                   for pin in (hw.record_button_pin, hw.mark_button_pin)]
        try:
            stuck = [pin for pin, b in zip((hw.record_button_pin, hw.mark_button_pin), buttons, strict=True)
                     if b.is_pressed]
        finally:
            for b in buttons:
                b.close()
        if stuck:
            raise RuntimeError(f"button on GPIO {stuck} reads as pressed (stuck or shorted)")
        return f"RECORD (GPIO {hw.record_button_pin}) and MARK (GPIO {hw.mark_button_pin}) released"

    def fuel_gauge(self) -> str:
        from agent.monitors import FuelGauge

        hw = self.cfg.hardware
        gauge = FuelGauge.open(hw.fuel_gauge_bus, hw.fuel_gauge_address, self.hw.smbus)
        return f"{gauge.percent():.0f}%, {gauge.millivolts()} mV (chip version 0x{gauge.version():04x})"

    def thermal(self) -> tuple[str, str]:
        from agent.monitors import Thermal

        celsius = Thermal(self.hw.thermal_path or self.cfg.thermal.sysfs_path).celsius()
        ok = celsius < self.cfg.thermal.max_cpu_c
        return ("PASS" if ok else "FAIL"), f"CPU {celsius:.1f} C (limit {self.cfg.thermal.max_cpu_c:.0f} C)"

    def gps(self) -> tuple[str, str] | str:
        port = self.cfg.sync.gps_port
        if not port:
            return "SKIP", "no sync.gps_port configured"
        import serial

        with serial.Serial(port, 9600, timeout=1) as line:
            deadline = time.monotonic() + 4
            while time.monotonic() < deadline:
                raw = line.readline()
                if raw.startswith(b"$") and b"*" in raw:
                    return f"NMEA from {port}: {raw[:6].decode(errors='replace')}"
        raise RuntimeError(f"no NMEA sentence on {port} within 4 s")

    def dock(self) -> tuple[str, str] | str:
        port = self.hw.dock_port or self.cfg.sync.dock_port
        if not port:
            return "SKIP", "no sync.dock_port configured"
        if not Path(port).exists():
            raise RuntimeError(f"{port} does not exist (udev rule firmware_hooks/udev/99-bwc-serial.rules?)")
        return f"{port} present (presence is checked when docked)"

    def bureau(self) -> tuple[str, str] | str:
        url, k = self.cfg.sync.bureau_url, self.cfg.keys
        if not url or not k.ca_cert:
            return "SKIP", "not provisioned (no sync.bureau_url / keys.ca_cert)"
        from agent.sync.https import HttpsSession, client_ssl_context

        http = HttpsSession(client_ssl_context(k.ca_cert, k.device_cert, k.identity_key), timeout_s=8)
        try:
            head = http.json("GET", f"{url.rstrip('/')}/v1/ledger/head")
        finally:
            http.close()
        return f"{url} answers with the device certificate; bureau holds ledger up to seq {head.get('head_seq')}"

    def broker(self) -> tuple[str, str] | str:
        host = self.cfg.sync.mqtt_host
        if not host:
            return "SKIP", "no sync.mqtt_host configured"
        import socket

        from agent.sync.https import client_ssl_context

        k = self.cfg.keys
        ctx = client_ssl_context(k.ca_cert, k.device_cert, k.identity_key)
        with socket.create_connection((host, self.cfg.sync.mqtt_port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as tls:
            return f"TLS to {host}:{self.cfg.sync.mqtt_port} ({tls.version()})"


def render(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{'CHECK':<{width}}  RESULT  DETAIL"]
    lines += [f"{c.name:<{width}}  {c.result:<6}  {c.detail}" for c in checks]
    failed = [c.name for c in checks if c.result == "FAIL"]
    lines.append("")
    lines.append(f"{len(checks) - len(failed)} of {len(checks)} checks passed or skipped"
                 + (f"; FAILED: {', '.join(failed)}" if failed else "; device ready"))
    return "\n".join(lines)
