"""The docking station's end of the dock line (docs/PROTOCOL.md, "Dock line").

Runs on a small board in the dock (`python -m dock.dock_station --port /dev/ttyUSB0`) and inside the
simulator (hw_sim.serial_devices.SimulatedDock). It pings, answers the device's HELLO, shows the device's
STATUS on its LEDs, sends the undock button press, and passes hints (its UTC time, whether its uplink is up).
It has no authority over evidence: there is no message by which it could delete or change anything.

Threads: one "dock-station" thread (the shared `LineEndpoint` loop) owns the port, the timers and every
write. `press_undock_button`, `set_pinging` and `set_link_up` may be called from any thread: they only set
state under the lock, which the line thread acts on within one read timeout. `on_event` runs on the line
thread. Program mode adds the main thread, which waits for SIGTERM/SIGINT and takes SIGUSR1 as the button.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent.sync.dockline import (
    ID_PATTERN,
    PROTOCOL_VERSION,
    Ack,
    Hello,
    Hint,
    LineEndpoint,
    LineTiming,
    Phase,
    Ping,
    SerialFactory,
    Status,
    UndockIntent,
    _Message,
)

log = logging.getLogger(__name__)

EVENT_LOG_SIZE = 256


@dataclass(frozen=True)
class DockEvent:
    """Something the dock saw: arrived, left, status, undock_sent, undock_acked, undock_unanswered, refused."""

    kind: str
    device_id: str | None
    detail: dict[str, Any]
    mono_s: float


@dataclass(frozen=True)
class LedState:
    """What the dock's LEDs show. sync: off | blink (uploading) | on (all done); amber: blocked; red: alarm."""

    present: bool
    sync: str
    safe_to_remove: bool
    amber: bool
    red: bool


def leds_for(present: bool, status: Status | None) -> LedState:
    if not present or status is None:
        return LedState(present, "off", safe_to_remove=False, amber=False, red=False)
    sync = {Phase.SYNCING: "blink", Phase.FINISHING: "blink", Phase.DONE: "on"}.get(status.phase, "off")
    return LedState(present, sync, status.safe_to_remove, amber=status.phase == Phase.BLOCKED, red=status.alarm)


def system_time_hint() -> tuple[int | None, str]:
    return time.time_ns() // 1000, "ntp"


def no_time_hint() -> tuple[int | None, str]:
    return None, "none"


def interface_link_probe(iface: str) -> Callable[[], bool | None]:
    """Link probe for a Linux network interface: its operstate is "up" (None if the interface is absent)."""
    path = Path("/sys/class/net") / iface / "operstate"

    def probe() -> bool | None:
        try:
            return path.read_text().strip() == "up"
        except OSError:
            return None

    return probe


class DockStation(LineEndpoint):
    """The dock end. Device present = it said HELLO (acknowledged) and its last PING is within the timeout."""

    def __init__(self, port: str, dock_id: str, *, timing: LineTiming | None = None,
                 time_hint: Callable[[], tuple[int | None, str]] = no_time_hint,
                 link_probe: Callable[[], bool | None] = lambda: None,
                 on_event: Callable[[DockEvent], None] | None = None,
                 serial_factory: SerialFactory | None = None):
        super().__init__(port, name="dock-station", timing=timing or LineTiming(), serial_factory=serial_factory)
        try:
            Ping(seq=0, dock=dock_id)
        except ValidationError:
            raise ValueError(f"dock id {dock_id!r} cannot be sent on the dock line: it must match "
                             f"{ID_PATTERN}") from None
        self.dock_id = dock_id
        self.time_hint = time_hint
        self.link_probe = link_probe
        self.on_event = on_event
        self._pinging = True
        self._link_up: bool | None = None
        self._link_override: bool | None = None
        self._button_presses = 0
        self._events: collections.deque[DockEvent] = collections.deque(maxlen=EVENT_LOG_SIZE)
        self._device_id: str | None = None
        self._present = False
        self._status: Status | None = None
        self._reset_line_state()

    # public, any thread ----------------------------------------------------------------------------------

    @property
    def device_id(self) -> str | None:
        with self._lock:
            return self._device_id if self._present else None

    @property
    def present(self) -> bool:
        with self._lock:
            return self._present

    @property
    def last_status(self) -> Status | None:
        with self._lock:
            return self._status

    def leds(self) -> LedState:
        with self._lock:
            return leds_for(self._present, self._status)

    def events(self, kind: str | None = None) -> list[DockEvent]:
        with self._lock:
            return [e for e in self._events if kind is None or e.kind == kind]

    def press_undock_button(self) -> None:
        """The undock button: UNDOCK_INTENT goes out within one read timeout, re-sent until acknowledged."""
        with self._lock:
            self._button_presses += 1

    def set_pinging(self, on: bool) -> None:
        """Simulator switch: a dock whose firmware stopped pinging."""
        with self._lock:
            self._pinging = on

    def set_link_up(self, up: bool | None) -> None:
        """Override the link probe (None: use the probe again)."""
        with self._lock:
            self._link_override = up

    # dock-line thread -------------------------------------------------------------------------------------

    def _reset_line_state(self) -> None:
        self._last_ping_rx: float | None = None
        self._next_ping_at = 0.0
        self._next_hint_at: float | None = None
        self._undock_seq: int | None = None
        self._undock_tries = 0
        self._next_undock_at = 0.0
        self._presses_seen = self._button_presses

    def _event(self, kind: str, **detail: Any) -> None:
        event = DockEvent(kind, self._device_id, detail, time.monotonic())
        with self._changed:
            self._events.append(event)
            self._changed.notify_all()
        self._callback("on_event", self.on_event, event)

    def _on_open(self) -> None:
        self._reset_line_state()
        self._forget_device("line_lost")

    def _on_message(self, message: _Message) -> None:
        now = time.monotonic()
        if isinstance(message, Hello):
            if message.proto != PROTOCOL_VERSION:
                self._send(lambda seq: Ack(seq=seq, of="HELLO", ack=message.seq, ok=False, dock=self.dock_id,
                                           proto=PROTOCOL_VERSION,
                                           reason=f"protocol {message.proto} not supported; this dock speaks "
                                                  f"{PROTOCOL_VERSION}"))
                self._event("refused", device=message.device, proto=message.proto)
                return
            if self._device_id not in (None, message.device):
                self._forget_device("replaced")
            with self._lock:
                self._device_id = message.device
            self._last_ping_rx = now  # the HELLO opens the presence window
            self._send(lambda seq: Ack(seq=seq, of="HELLO", ack=message.seq, ok=True, dock=self.dock_id,
                                       proto=PROTOCOL_VERSION))
            self._next_hint_at = now  # hints follow the handshake at once
        elif isinstance(message, Ping):
            if self._device_id is not None and message.device == self._device_id:
                self._last_ping_rx = now
        elif isinstance(message, Status):
            if self._device_id is None:
                return  # a device we have no session with; it will say HELLO after our next PING
            with self._changed:
                changed = self._status is None or self._status.model_copy(update={"seq": 0}) != \
                    message.model_copy(update={"seq": 0})
                self._status = message
                self._changed.notify_all()
            if changed:
                self._event("status", **message.model_dump(mode="json", exclude={"seq", "t"}))
        elif isinstance(message, Ack) and message.of == "UNDOCK_INTENT":
            if message.ack == self._undock_seq:
                self._undock_seq = None
                self._event("undock_acked", ok=message.ok)
        else:
            self._reject_unexpected(message)
        self._update_presence(now)

    def _on_tick(self) -> None:
        now = time.monotonic()
        self._update_presence(now)
        with self._lock:
            pinging, presses = self._pinging, self._button_presses
            link_up = self._link_override
        if pinging and now >= self._next_ping_at:
            self._send(lambda seq: Ping(seq=seq, dock=self.dock_id, device=self._device_id))
            self._next_ping_at = now + self.timing.ping_interval_s
        if presses != self._presses_seen:
            self._presses_seen = presses
            if self._present:
                self._undock_tries = 0
                self._next_undock_at = now
                self._undock_seq = -1  # pending: sent below
            else:
                self._event("undock_ignored", why="no device docked")
        if self._undock_seq is not None and now >= self._next_undock_at:
            if self._undock_tries >= self.timing.undock_max_tries:
                self._event("undock_unanswered", tries=self._undock_tries)
                self._undock_seq = None
            else:
                self._undock_seq = self._send(lambda seq: UndockIntent(seq=seq)).seq
                self._undock_tries += 1
                self._next_undock_at = now + self.timing.undock_retry_s
                if self._undock_tries == 1:
                    self._event("undock_sent")
        if self._present and self._next_hint_at is not None:
            if link_up is None:
                link_up = self.link_probe()
            if now >= self._next_hint_at or link_up != self._link_up:
                self._link_up = link_up
                wall_us, source = self.time_hint()
                self._send(lambda seq: Hint(seq=seq, wall_us=wall_us, time_source=source, link_up=link_up))
                self._next_hint_at = now + self.timing.hint_interval_s

    def _update_presence(self, now: float) -> None:
        fresh = self._last_ping_rx is not None and now - self._last_ping_rx <= self.timing.presence_timeout_s
        if self._device_id is not None and fresh and not self._present:
            with self._changed:
                self._present = True
                self._changed.notify_all()
            log.info("dock-station: device %s docked", self._device_id)
            self._event("arrived")
        elif self._device_id is not None and not fresh:
            self._count("presence_timeouts")
            self._forget_device("ping_timeout")

    def _forget_device(self, reason: str) -> None:
        was_present = self._present
        with self._changed:
            self._present = False
            self._status = None
            self._changed.notify_all()
        if was_present:
            log.info("dock-station: device %s left (%s)", self._device_id, reason)
            self._event("left", reason=reason)
        with self._lock:
            self._device_id = None
        self._last_ping_rx = None
        self._next_hint_at = None
        self._undock_seq = None

    def _on_lost(self, reason: str) -> None:
        self._forget_device(reason)


# --- program mode -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dock.dock_station",
                                     description="Docking station end of the body-worn camera dock line.")
    parser.add_argument("--port", required=True, help="serial device of the dock line, e.g. /dev/ttyUSB0")
    parser.add_argument("--dock-id", default="DOCK-1", help="this dock's id (letters, digits, ._:-)")
    parser.add_argument("--uplink-iface", help="network interface whose state is reported as link_up")
    parser.add_argument("--time-source", choices=["ntp", "rtc", "none"], default="none",
                        help="how this board's clock is set; 'none' sends no time hint")
    parser.add_argument("--ping-interval", type=float, default=1.0,
                        help="seconds between PINGs (the protocol's value is 1; other timers scale with it)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not 0.05 <= args.ping_interval <= 10:
        parser.error(f"--ping-interval must be between 0.05 and 10 s, got {args.ping_interval}")

    def time_hint() -> tuple[int | None, str]:
        return (None, "none") if args.time_source == "none" else (time.time_ns() // 1000, args.time_source)

    def print_event(event: DockEvent) -> None:
        # One JSON line per event on stdout: the board's LED driver or log collector reads these.
        print(json.dumps({"event": event.kind, "device": event.device_id, **event.detail,
                          "leds": asdict(station.leds())}), flush=True)

    try:
        station = DockStation(args.port, args.dock_id, timing=LineTiming().scaled(args.ping_interval),
                              time_hint=time_hint,
                              link_probe=interface_link_probe(args.uplink_iface) if args.uplink_iface else lambda: None,
                              on_event=print_event)
    except ValueError as exc:
        parser.error(str(exc))
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    signal.signal(signal.SIGUSR1, lambda *_: station.press_undock_button())  # wire the button to `kill -USR1`
    station.start()
    log.info("dock %s on %s (protocol %d); SIGUSR1 = undock button", args.dock_id, args.port, PROTOCOL_VERSION)
    while not done.wait(0.5):
        pass
    station.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
