"""Simulated serial hardware: real pty pairs, a simulated dock and a simulated GPS receiver.

`PtyNullModem` joins two pseudo-terminals with a relay, like `socat pty pty` or a null-modem cable, so
both ends are ordinary serial ports that `serial.Serial(path)` opens: the device code under test opens
one, the simulated peripheral the other. Each end is reached through a stable symlink (as udev would
give the real lines stable names, firmware_hooks/), so "unplugging" the device end can really remove its
pty (reads and writes then fail with EIO, which pyserial raises as SerialException) and "plugging it
back" creates a new pty behind the same name.

Threads: each `PtyNullModem` runs one relay thread copying bytes both ways; `SimulatedDock` adds the
`DockStation` line thread; `SimulatedGps` adds an emitter thread when `run()` is used (`emit_epoch()`
steps it from the caller's thread instead). Every switch may be called from any thread.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import select
import threading
import tty
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import serial

from agent.sync.dockline import LineTiming
from dock.dock_station import DockStation

RELAY_POLL_S = 0.05
RELAY_READ_BYTES = 4096


class _PtyEnd:
    """One pseudo-terminal: the relay holds the master and keeps the slave open, so the slave side keeps
    its raw settings while the user's port is closed and re-opened, and the master sees no hang-up."""

    def __init__(self, link: Path):
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        self.tty_name = os.ttyname(self.slave)
        tmp = link.with_name(link.name + ".new")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(self.tty_name)
        os.replace(tmp, link)  # the stable name now points at this pty
        self.link = link

    def close(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if os.readlink(self.link) == self.tty_name:
                self.link.unlink()
        os.close(self.master)
        os.close(self.slave)


class PtyNullModem:
    """Two ptys joined by a relay thread. `device_port` and `peer_port` are the paths to open."""

    def __init__(self, directory: Path, name: str):
        directory.mkdir(parents=True, exist_ok=True)
        self.device_port = str(directory / f"{name}-device")
        self.peer_port = str(directory / f"{name}-peer")
        self._lock = threading.Lock()
        self._generation = 0
        self._device_end: _PtyEnd | None = _PtyEnd(Path(self.device_port))
        self._peer_end: _PtyEnd | None = _PtyEnd(Path(self.peer_port))
        self.dropped_bytes = 0  # bytes lost because the receiving end was unplugged or its buffer was full
        self.relayed_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._relay, name=f"pty-relay-{name}", daemon=True)
        self._thread.start()

    @property
    def plugged(self) -> bool:
        with self._lock:
            return self._device_end is not None

    def unplug(self) -> None:
        """Pull the device end's cable: its pty disappears, so the device's open port fails with EIO."""
        with self._lock:
            if self._device_end is not None:
                self._device_end.close()
                self._device_end = None
                self._generation += 1

    def plug(self) -> None:
        """Plug the device end back in: a new pty behind the same `device_port` path."""
        with self._lock:
            if self._device_end is None:
                self._device_end = _PtyEnd(Path(self.device_port))
                self._generation += 1

    def inject_to_device(self, data: bytes) -> None:
        """Put raw bytes on the line towards the device, as if its peer sent them (fault injection)."""
        with self._lock:
            self._write(self._device_end, data)

    def inject_to_peer(self, data: bytes) -> None:
        with self._lock:
            self._write(self._peer_end, data)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        with self._lock:
            for end in (self._device_end, self._peer_end):
                if end is not None:
                    end.close()
            self._device_end = self._peer_end = None
            self._generation += 1

    def _write(self, end: _PtyEnd | None, data: bytes) -> None:
        """Called with the lock held. A full buffer drops bytes, as a UART without flow control would."""
        if end is None:
            self.dropped_bytes += len(data)
            return
        view = memoryview(data)
        while view:
            try:
                n = os.write(end.master, view)
            except BlockingIOError:
                self.dropped_bytes += len(view)
                return
            except OSError as exc:
                if exc.errno != errno.EIO:
                    raise
                self.dropped_bytes += len(view)
                return
            self.relayed_bytes += n
            view = view[n:]

    def _relay(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                generation = self._generation
                ends = [e for e in (self._device_end, self._peer_end) if e is not None]
                fds = [e.master for e in ends]
            if not fds:
                self._stop.wait(RELAY_POLL_S)
                continue
            try:
                readable, _, _ = select.select(fds, [], [], RELAY_POLL_S)
            except (OSError, ValueError):
                continue  # an fd was closed by unplug() during select: look again
            with self._lock:
                if generation != self._generation:
                    continue  # the ends changed while we waited: these fds may be stale
                for fd in readable:
                    try:
                        data = os.read(fd, RELAY_READ_BYTES)
                    except (BlockingIOError, OSError):
                        continue
                    if not data:
                        continue
                    if self._device_end is not None and fd == self._device_end.master:
                        self._write(self._peer_end, data)
                    else:
                        self._write(self._device_end, data)


# --- the dock -----------------------------------------------------------------------------------------


class SimulatedDock:
    """A docking station on a pty pair running the real dock program (`DockStation`) on its end.

    The device opens `device_port`. Switches: `unplug()`/`plug()` (the device leaves/enters the bay),
    `inject()` (garbage or hand-made frames towards the device), `set_pinging(False)` (a dock whose
    firmware stopped pinging), `press_undock_button()`, `set_link_up()`.
    """

    def __init__(self, directory: Path, *, dock_id: str = "DOCK-SIM-1", timing: LineTiming | None = None,
                 wall_us: Callable[[], int] | None = None, link_up: bool | None = True):
        self.modem = PtyNullModem(directory, "dock")
        self.device_port = self.modem.device_port
        self.station = DockStation(
            self.modem.peer_port, dock_id, timing=timing,
            time_hint=(lambda: (wall_us(), "ntp")) if wall_us else (lambda: (None, "none")))
        self.station.set_link_up(link_up)
        self.station.start()
        # Ready when constructed: pyserial flushes input on open, so bytes sent before would be lost.
        if not self.station.wait_for(lambda: self.station._stats.opens >= 1, 5.0):
            self.close()
            raise RuntimeError(f"simulated dock could not open {self.modem.peer_port}")

    def unplug(self) -> None:
        self.modem.unplug()

    def plug(self) -> None:
        self.modem.plug()

    def inject(self, data: bytes) -> None:
        self.modem.inject_to_device(data)

    def set_pinging(self, on: bool) -> None:
        self.station.set_pinging(on)

    def press_undock_button(self) -> None:
        self.station.press_undock_button()

    def set_link_up(self, up: bool | None) -> None:
        self.station.set_link_up(up)

    def close(self) -> None:
        self.station.stop()
        self.modem.close()

    def __enter__(self) -> SimulatedDock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- the GPS receiver ---------------------------------------------------------------------------------

METRES_PER_DEGREE_LAT = 111_320.0
KNOTS_PER_MPS = 3600 / 1852


def nmea_checksum(body: str) -> str:
    value = 0
    for ch in body.encode("ascii"):
        value ^= ch
    return f"{value:02X}"


def nmea_sentence(body: str) -> bytes:
    """`$<body>*<checksum>\\r\\n` for a body such as 'GPGGA,...'."""
    return f"${body}*{nmea_checksum(body)}\r\n".encode("ascii")


def _nmea_angle(micro_degrees: int, degree_digits: int) -> str:
    # ddmm.mmmmm: five decimals of a minute are exactly 6 units per micro-degree, so the value round-trips.
    ude = abs(micro_degrees)
    minutes_e5 = (ude % 1_000_000) * 6
    return f"{ude // 1_000_000:0{degree_digits}d}{minutes_e5 // 100_000:02d}.{minutes_e5 % 100_000:05d}"


@dataclass(frozen=True)
class GpsTruth:
    """What the simulated receiver reported in one epoch (what a test expects the device to have)."""

    utc: datetime
    fix: bool
    lat_ude: int
    lon_ude: int
    alt_mm: int
    sats: int


class SimulatedGps:
    """A GPS receiver on a pty pair emitting NMEA 0183 GGA + RMC once per (simulated) second.

    The track starts at `start` (micro-degrees) and moves at `speed_mps` on `heading_deg`. Switches:
    `set_fix(False)` (loss of fix: quality 0 / status V and empty positions), `inject()` (raw bytes),
    `garbage_next`/`bad_checksum_next` (counts of faulty sentences for the next epochs), `unplug()`/`plug()`.
    `run(speed=10)` emits ten epochs per wall second (accelerated time); `emit_epoch()` emits one now.
    """

    def __init__(self, directory: Path, *, start: tuple[int, int] = (31_230_416, 121_473_701),
                 altitude_mm: int = 12_500, speed_mps: float = 1.4, heading_deg: float = 45.0,
                 start_utc: datetime = datetime(2025, 6, 1, 8, 0, 0, tzinfo=UTC), talker: str = "GP"):
        self.modem = PtyNullModem(directory, "gps")
        self.device_port = self.modem.device_port
        self._port = serial.Serial(self.modem.peer_port, 9600, timeout=0.1, write_timeout=1.0)
        self._lock = threading.Lock()
        self._lat = float(start[0])
        self._lon = float(start[1])
        self._alt_mm = altitude_mm
        self.speed_mps = speed_mps
        self.heading_deg = heading_deg
        self._utc = start_utc
        self._talker = talker
        self._fix = True
        self.garbage_next = 0
        self.bad_checksum_next = 0
        self.emitted: list[GpsTruth] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def set_fix(self, fix: bool) -> None:
        with self._lock:
            self._fix = fix

    def inject(self, data: bytes) -> None:
        self.modem.inject_to_device(data)

    def unplug(self) -> None:
        self.modem.unplug()

    def plug(self) -> None:
        self.modem.plug()

    def emit_epoch(self) -> GpsTruth:
        """Advance one simulated second and write that epoch's sentences; returns what was reported."""
        with self._lock:
            truth = GpsTruth(self._utc, self._fix, round(self._lat), round(self._lon), self._alt_mm,
                             9 if self._fix else 0)
            lines = self._sentences(truth)
            if self.garbage_next > 0:
                self.garbage_next -= 1
                lines.insert(1, b"\x00\xff$GPG\xfe\x13garbage,,*ZZ\r\n")
            if self.bad_checksum_next > 0:
                self.bad_checksum_next -= 1
                good = lines[0]
                lines.insert(0, good[:-4] + (b"00" if good[-4:-2] != b"00" else b"01") + b"\r\n")
            self.emitted.append(truth)
            self._advance()
        self._port.write(b"".join(lines))
        self._port.flush()
        return truth

    def run(self, speed: float = 1.0) -> None:
        """Emit epochs from a thread, `speed` simulated seconds per wall second, until `stop()`."""
        if self._thread is not None:
            raise RuntimeError("already running")
        if not 0.1 <= speed <= 1000:
            raise ValueError(f"speed must be within 0.1..1000, got {speed}")
        interval = 1.0 / speed
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(interval):
                with contextlib.suppress(serial.SerialException):
                    self.emit_epoch()

        self._thread = threading.Thread(target=loop, name="sim-gps", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
            self._thread = None

    def close(self) -> None:
        self.stop()
        self._port.close()
        self.modem.close()

    def __enter__(self) -> SimulatedGps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _advance(self) -> None:
        heading = math.radians(self.heading_deg)
        north_m = self.speed_mps * math.cos(heading)
        east_m = self.speed_mps * math.sin(heading)
        self._lat += north_m / METRES_PER_DEGREE_LAT * 1e6
        self._lon += east_m / (METRES_PER_DEGREE_LAT * math.cos(math.radians(self._lat / 1e6))) * 1e6
        self._utc += timedelta(seconds=1)

    def _sentences(self, truth: GpsTruth) -> list[bytes]:
        hhmmss = truth.utc.strftime("%H%M%S") + f".{truth.utc.microsecond // 10_000:02d}"
        ddmmyy = truth.utc.strftime("%d%m%y")
        t = self._talker
        if not truth.fix:
            return [nmea_sentence(f"{t}GGA,{hhmmss},,,,,0,00,99.99,,,,,,"),
                    nmea_sentence(f"{t}RMC,{hhmmss},V,,,,,,,{ddmmyy},,,N")]
        lat = _nmea_angle(truth.lat_ude, 2) + ("," + ("N" if truth.lat_ude >= 0 else "S"))
        lon = _nmea_angle(truth.lon_ude, 3) + ("," + ("E" if truth.lon_ude >= 0 else "W"))
        alt = f"{truth.alt_mm // 1000}.{truth.alt_mm % 1000 // 100}"
        knots = f"{self.speed_mps * KNOTS_PER_MPS:.3f}"
        return [nmea_sentence(f"{t}GGA,{hhmmss},{lat},{lon},1,{truth.sats:02d},0.9,{alt},M,8.1,M,,"),
                nmea_sentence(f"{t}RMC,{hhmmss},A,{lat},{lon},{knots},{self.heading_deg:.1f},{ddmmyy},,,A")]
