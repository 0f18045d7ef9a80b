"""The dock line: the serial control line between the device and its docking station (docs/PROTOCOL.md, "Dock line").

One JSON object per line, followed by its CRC32:  `{"t":"PING","seq":7,...} *1a2b3c4d\\n`  at 115200 8N1.
This module holds everything both ends share (framing, the message models, the serial loop that survives
unplugging) and the device end, `DockLink`. The dock end, `dock.dock_station.DockStation`, imports it, so the
protocol is written down in code exactly once.

Threads: each endpoint (`DockLink` here, `DockStation` on the dock) runs one thread, "dock-line", which owns
the serial port: it opens it, re-opens it after a failure with bounded backoff, reads and decodes frames,
runs the protocol timers and does every write. Other threads only set state under the endpoint's lock
(`DockLink.set_status`) and wait on its condition. Callbacks (`on_docked`, `on_undocked`, `on_undock_intent`,
`on_hint`) run on the dock-line thread: they must return quickly, and an exception in one is logged and
counted, never allowed to stop the line.

The dock has no authority over evidence: nothing it sends can delete, purge or alter anything. Its time and
link hints are hints; what the device does with them (a ledger `clock_sync` record, starting the uploader) is
decided elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any, Literal

import serial
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from agent import __version__

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
BAUD_RATE = 115200
MAX_FRAME_BYTES = 1024  # a whole frame, "\n" included
FRAME_START = b'{"t":"'  # every frame begins with these bytes: the resynchronisation point
CRC_TRAILER_LEN = 10  # b" *" + 8 hex digits
MAX_SEQ = 0xFFFFFFFF
MAX_SAFE_INTEGER = 2**53 - 1
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"


# --- messages -----------------------------------------------------------------------------------------


class _Message(BaseModel):
    # Strict: a float, a string where an int belongs, or a number out of range is a bad frame. Unknown
    # fields are ignored so a later minor revision can add fields without a protocol version bump.
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)

    seq: int = Field(ge=0, le=MAX_SEQ, description="sender's frame counter, +1 per frame, wraps to 0")


class Hello(_Message):
    """Device -> dock, on every (re)open and every second until acknowledged."""

    t: Literal["HELLO"] = "HELLO"
    proto: int = Field(ge=1, le=65535)
    device: str = Field(pattern=ID_PATTERN)
    sw: str = Field(default="", max_length=64)


class Ack(_Message):
    """Acknowledges the peer's frame `ack` of type `of`. For HELLO it carries the dock's id and protocol."""

    t: Literal["ACK"] = "ACK"
    of: Literal["HELLO", "UNDOCK_INTENT"]
    ack: int = Field(ge=0, le=MAX_SEQ)
    ok: bool = True
    reason: str = Field(default="", max_length=160)
    dock: str | None = Field(default=None, pattern=ID_PATTERN)
    proto: int | None = Field(default=None, ge=1, le=65535)


class Ping(_Message):
    """Both directions, once a second. `device`, from the dock, names the device it holds a session with."""

    t: Literal["PING"] = "PING"
    dock: str | None = Field(default=None, pattern=ID_PATTERN)
    device: str | None = Field(default=None, pattern=ID_PATTERN)


class Phase(StrEnum):
    IDLE = "idle"  # docked, nothing to upload or not started yet
    SYNCING = "syncing"  # uploading / waiting for receipts
    FINISHING = "finishing"  # undock requested: finishing the current request
    DONE = "done"  # everything receipted
    BLOCKED = "blocked"  # cannot upload (no link, bureau unreachable)


class Status(_Message):
    """Device -> dock, for the dock's LEDs: on change and at least every `status_interval_s`."""

    t: Literal["STATUS"] = "STATUS"
    phase: Annotated[Phase, Field(strict=False)]  # strict mode would refuse the JSON string for an enum
    queued_bytes: int = Field(ge=0, le=MAX_SAFE_INTEGER, description="bytes still to upload")
    done_bytes: int = Field(ge=0, le=MAX_SAFE_INTEGER, description="bytes uploaded in this docking")
    eta_s: int | None = Field(default=None, ge=0, le=MAX_SAFE_INTEGER)
    safe_to_remove: bool
    alarm: bool = False


class UndockIntent(_Message):
    """Dock -> device: the undock button was pressed. Re-sent every second until acknowledged (max 5)."""

    t: Literal["UNDOCK_INTENT"] = "UNDOCK_INTENT"


class Hint(_Message):
    """Dock -> device: after the handshake, on change and every `hint_interval_s`. Hints only."""

    t: Literal["HINT"] = "HINT"
    wall_us: int | None = Field(default=None, ge=0, le=MAX_SAFE_INTEGER, description="dock's UTC time")
    time_source: Literal["ntp", "gps", "rtc", "none"] = "none"
    link_up: bool | None = Field(default=None, description="dock's uplink to the bureau; null = unknown")


Message = Annotated[Hello | Ack | Ping | Status | UndockIntent | Hint, Field(discriminator="t")]
_MESSAGE_ADAPTER: TypeAdapter[Any] = TypeAdapter(Message)
MESSAGE_TYPES = ("HELLO", "ACK", "PING", "STATUS", "UNDOCK_INTENT", "HINT")


# --- framing ------------------------------------------------------------------------------------------


class Reject(StrEnum):
    """Why a received line was not a frame. Each is counted in `LineStats.rejected` and logged."""

    GARBAGE = "garbage"  # bytes that do not start with FRAME_START
    TRUNCATED = "truncated"  # a frame start without its CRC trailer (cut off, or followed by a new frame)
    OVERSIZED = "oversized"  # more than MAX_FRAME_BYTES without a line end
    CRC_MISMATCH = "crc_mismatch"  # trailer present, CRC32 does not match the JSON bytes
    BAD_JSON = "bad_json"  # CRC fine, but not ASCII JSON (or duplicate keys, NaN)
    UNKNOWN_TYPE = "unknown_type"  # valid JSON whose "t" this protocol version does not know
    BAD_FIELDS = "bad_fields"  # a known type whose fields break the schema (missing, wrong type, float...)
    UNEXPECTED = "unexpected"  # a valid message this end never receives (e.g. STATUS sent to the device)


class FrameError(ValueError):
    def __init__(self, reason: Reject, detail: str):
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Rejected:
    reason: Reject
    detail: str
    sample: bytes  # the first bytes of what was rejected, for the log


def encode_frame(message: _Message) -> bytes:
    """The bytes of one frame: compact ASCII JSON with "t" first, " *", CRC32 as 8 lowercase hex, "\\n"."""
    body = message.model_dump(mode="json", exclude_none=True)
    ordered = {"t": body.pop("t"), **body}
    payload = json.dumps(ordered, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")
    frame = payload + b" *" + f"{zlib.crc32(payload):08x}".encode("ascii") + b"\n"
    if len(frame) > MAX_FRAME_BYTES:
        raise FrameError(Reject.OVERSIZED, f"{message.t} frame would be {len(frame)} bytes")
    return frame


def _reject_constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def decode_frame(line: bytes) -> _Message:
    """Decode one line (without its "\\n"), which must start with FRAME_START. Raises FrameError."""
    if len(line) + 1 > MAX_FRAME_BYTES:
        raise FrameError(Reject.OVERSIZED, f"{len(line) + 1} bytes")
    trailer = line[-CRC_TRAILER_LEN:]
    hex_digits = trailer[2:]
    if (len(line) <= CRC_TRAILER_LEN or trailer[:2] != b" *"
            or not all(c in b"0123456789abcdefABCDEF" for c in hex_digits)):
        raise FrameError(Reject.TRUNCATED, "no ' *<crc32>' trailer")
    payload = line[:-CRC_TRAILER_LEN]
    expected = int(hex_digits, 16)
    actual = zlib.crc32(payload)
    if actual != expected:
        raise FrameError(Reject.CRC_MISMATCH,
                         f"crc32 of {len(payload)} bytes is {actual:08x}, frame says {expected:08x}")
    try:
        # Decimal, not float: no number is rounded, and the strict models refuse it where an int belongs.
        obj = json.loads(payload.decode("ascii"), parse_float=Decimal, parse_constant=_reject_constant,
                         object_pairs_hook=_no_duplicate_keys)
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise FrameError(Reject.BAD_JSON, str(exc)) from None
    if not isinstance(obj, dict) or not isinstance(obj.get("t"), str):
        raise FrameError(Reject.BAD_JSON, "not an object with a string 't'")
    if obj["t"] not in MESSAGE_TYPES:
        raise FrameError(Reject.UNKNOWN_TYPE, f"type {obj['t'][:32]!r}")
    try:
        return _MESSAGE_ADAPTER.validate_python(obj)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}"
                             for e in exc.errors(include_url=False))
        raise FrameError(Reject.BAD_FIELDS, f"{obj['t']}: {problems}") from None


class FrameDecoder:
    """Splits a byte stream into messages and rejections. Memory is bounded by MAX_FRAME_BYTES.

    Resynchronisation: a frame always starts with FRAME_START, and those bytes cannot occur inside a frame
    (a '"' inside a JSON string is escaped, and no message has a nested object). So whatever precedes the
    last FRAME_START on a line is rejected on its own, and the frame after it still gets through.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._overflowing = False

    def feed(self, data: bytes) -> list[_Message | Rejected]:
        self._buf += data
        out: list[_Message | Rejected] = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) >= MAX_FRAME_BYTES:
                    self._overflow(out)
                    continue
                return out
            line = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            if self._overflowing:
                # The head of this line is the tail of the oversized run, already counted.
                self._overflowing = False
                start = line.rfind(FRAME_START)
                if start < 0:
                    continue
                line = line[start:]
            out.extend(self._line(line))

    def _overflow(self, out: list[_Message | Rejected]) -> None:
        start = self._buf.rfind(FRAME_START)
        if not self._overflowing:
            out.append(Rejected(Reject.OVERSIZED, f"over {MAX_FRAME_BYTES} bytes without a line end",
                                bytes(self._buf[:48])))
        if start > 0 and len(self._buf) - start < MAX_FRAME_BYTES:
            del self._buf[:start]  # a new frame starts inside the run: keep it
            self._overflowing = False
        else:
            del self._buf[: len(self._buf) - (len(FRAME_START) - 1)]  # keep bytes that may begin a frame
            self._overflowing = True

    @staticmethod
    def _line(line: bytes) -> list[_Message | Rejected]:
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            return []  # blank lines are allowed as line-noise padding
        out: list[_Message | Rejected] = []
        start = line.rfind(FRAME_START)
        if start != 0:
            head = line if start < 0 else line[:start]
            if len(head) >= MAX_FRAME_BYTES:
                kind = Reject.OVERSIZED
            elif head.startswith(FRAME_START):
                kind = Reject.TRUNCATED
            else:
                kind = Reject.GARBAGE
            out.append(Rejected(kind, f"{len(head)} bytes before a frame start" if start > 0
                                else f"{len(head)} bytes with no frame start", head[:48]))
            if start < 0:
                return out
            line = line[start:]
        try:
            out.append(decode_frame(line))
        except FrameError as exc:
            out.append(Rejected(exc.reason, exc.detail, line[:48]))
        return out


# --- the serial loop both ends share ------------------------------------------------------------------


@dataclass(frozen=True)
class LineTiming:
    """Protocol timers in seconds. The defaults are the protocol's; tests and the simulator may scale them."""

    ping_interval_s: float = 1.0
    presence_timeout_s: float = 3.0
    hello_retry_s: float = 1.0
    status_interval_s: float = 2.0
    hint_interval_s: float = 10.0
    undock_retry_s: float = 1.0
    undock_max_tries: int = 5
    read_timeout_s: float = 0.05  # how long one read may block: bounds the latency of timers and sends
    write_timeout_s: float = 1.0
    reopen_backoff_s: tuple[float, float] = (0.2, 5.0)  # first and largest delay between open attempts

    def scaled(self, factor: float) -> LineTiming:
        """All protocol timers multiplied by `factor` (e.g. 0.2 for fast tests); the read timeout is kept."""
        return LineTiming(self.ping_interval_s * factor, self.presence_timeout_s * factor,
                          self.hello_retry_s * factor, self.status_interval_s * factor,
                          self.hint_interval_s * factor, self.undock_retry_s * factor, self.undock_max_tries,
                          self.read_timeout_s, self.write_timeout_s,
                          (self.reopen_backoff_s[0] * factor, self.reopen_backoff_s[1] * factor))


@dataclass
class LineStats:
    frames_rx: int = 0
    frames_tx: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    opens: int = 0
    open_failures: int = 0
    line_losses: int = 0
    presence_timeouts: int = 0
    refused: int = 0  # HELLOs refused by the dock (protocol version)
    callback_errors: int = 0
    internal_errors: int = 0

    def copy(self) -> LineStats:
        return LineStats(self.frames_rx, self.frames_tx, Counter(self.rejected), self.opens, self.open_failures,
                         self.line_losses, self.presence_timeouts, self.refused, self.callback_errors,
                         self.internal_errors)


SerialFactory = Callable[..., Any]

_REJECT_LOG_WINDOW_S = 5.0


class LineEndpoint:
    """One end of the dock line: the dock-line thread, the port, reconnects, counters, rate-limited logging.

    Subclasses implement the protocol in `_on_open`, `_on_message`, `_on_tick` and `_on_lost`, all called on
    the dock-line thread, and send with `_send`, which only that thread calls.
    """

    def __init__(self, port: str, *, name: str, timing: LineTiming, serial_factory: SerialFactory | None):
        self.port = port
        self.timing = timing
        self._name = name
        self._serial_factory = serial_factory or serial.Serial
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._serial: Any = None
        self._seq = 0
        self._stats = LineStats()
        self._reject_log: dict[str, tuple[float, int]] = {}

    # public ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"{self._name} already started")
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        """Stop the thread and close the port; returns once both are done (or after `timeout`)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("%s: thread did not stop within %.1f s", self._name, timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> LineStats:
        with self._lock:
            return self._stats.copy()

    def _count(self, name: str) -> None:
        """Add one to a counter in `LineStats` and wake waiters."""
        with self._changed:
            setattr(self._stats, name, getattr(self._stats, name) + 1)
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Block until `predicate()` (evaluated under the endpoint's lock) is true; False after `timeout`."""
        with self._changed:
            return self._changed.wait_for(predicate, timeout)

    # the dock-line thread --------------------------------------------------------------------------------

    def _run(self) -> None:
        delay = self.timing.reopen_backoff_s[0]
        failures_logged = 0
        while not self._stop.is_set():
            try:
                port = self._serial_factory(self.port, baudrate=BAUD_RATE, bytesize=serial.EIGHTBITS,
                                            parity=serial.PARITY_NONE, stopbits=serial.STOPBITS_ONE,
                                            timeout=self.timing.read_timeout_s,
                                            write_timeout=self.timing.write_timeout_s)
            except (serial.SerialException, OSError, ValueError) as exc:
                self._count("open_failures")
                # Log the first failures loudly, then quietly: an empty dock bay is the normal state.
                (log.warning if failures_logged < 3 else log.debug)("%s: cannot open %s: %s (retry in %.2f s)",
                                                                     self._name, self.port, exc, delay)
                failures_logged += 1
                self._stop.wait(delay)
                delay = min(delay * 2, self.timing.reopen_backoff_s[1])
                continue
            delay = self.timing.reopen_backoff_s[0]
            failures_logged = 0
            try:
                self._serve(port)
            except Exception:  # a bug or a driver surprise: log it, back off, open again
                self._count("internal_errors")
                log.exception("%s: line loop failed; re-opening", self._name)
                self._stop.wait(delay)

    def _serve(self, port: Any) -> None:
        decoder = FrameDecoder()
        reason = "stopped"
        self._serial = port
        self._count("opens")
        log.info("%s: opened %s", self._name, self.port)
        try:
            self._guarded(self._on_open)
            while not self._stop.is_set():
                data = port.read(max(1, port.in_waiting))
                if data:
                    for item in decoder.feed(data):
                        self._dispatch(item)
                self._guarded(self._on_tick)
                with self._changed:  # waiters re-check their predicates at least once per read timeout
                    self._changed.notify_all()
        except (serial.SerialException, OSError) as exc:  # unplugged, I/O error, or a write that timed out
            reason = "line_lost"
            self._count("line_losses")
            log.warning("%s: line %s lost: %s", self._name, self.port, exc)
        finally:
            self._serial = None
            with contextlib.suppress(Exception):  # closing a dead port may fail in any way; it is gone anyway
                port.close()
            self._guarded(lambda: self._on_lost(reason))

    def _guarded(self, fn: Callable[[], None]) -> None:
        """Run protocol code; a bug in it is logged and counted, never allowed to end the line."""
        try:
            fn()
        except (serial.SerialException, OSError):
            raise  # the line itself failed: `_serve` handles that
        except Exception:
            self._count("internal_errors")
            log.exception("%s: internal error (line kept up)", self._name)

    def _dispatch(self, item: _Message | Rejected) -> None:
        if isinstance(item, Rejected):
            self._count_reject(item)
            return
        self._count("frames_rx")
        self._guarded(lambda: self._on_message(item))

    def _count_reject(self, item: Rejected) -> None:
        now = time.monotonic()
        since, suppressed = self._reject_log.get(item.reason.value, (0.0, 0))
        if now - since >= _REJECT_LOG_WINDOW_S:
            more = f" ({suppressed} more since last report)" if suppressed else ""
            log.warning("%s: rejected frame (%s): %s; starts %r%s", self._name, item.reason.value, item.detail,
                        item.sample, more)
            self._reject_log[item.reason.value] = (now, 0)
        else:
            self._reject_log[item.reason.value] = (since, suppressed + 1)
        with self._changed:  # counted after logging, so a waiter on the count also finds the log line
            self._stats.rejected[item.reason.value] += 1
            self._changed.notify_all()

    def _reject_unexpected(self, message: _Message) -> None:
        self._count_reject(Rejected(Reject.UNEXPECTED, f"{message.t} is not sent to this end", b""))

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq = 0 if seq == MAX_SEQ else seq + 1
        return seq

    def _send(self, make: Callable[[int], _Message]) -> _Message:
        """Build the message with the next seq and write it. Only the dock-line thread calls this."""
        message = make(self._next_seq())
        if self._serial is None:
            raise serial.SerialException("port not open")
        self._serial.write(encode_frame(message))
        self._count("frames_tx")
        return message

    def _callback(self, name: str, fn: Callable[..., None] | None, *args: Any) -> None:
        if fn is None:
            return
        try:
            fn(*args)
        except Exception:
            self._count("callback_errors")
            log.exception("%s: %s callback raised (ignored)", self._name, name)

    # protocol hooks ---------------------------------------------------------------------------------------

    def _on_open(self) -> None:
        raise NotImplementedError

    def _on_message(self, message: _Message) -> None:
        raise NotImplementedError

    def _on_tick(self) -> None:
        raise NotImplementedError

    def _on_lost(self, reason: str) -> None:
        raise NotImplementedError


# --- the device end -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DockSession:
    dock_id: str
    proto: int


@dataclass(frozen=True)
class DockHint:
    wall_us: int | None
    time_source: str
    link_up: bool | None
    received_mono_us: int  # device monotonic time when the hint arrived (to age the time hint)


class DockLink(LineEndpoint):
    """The device's end of the dock line.

    Docked = the dock acknowledged our HELLO and its last PING is at most `presence_timeout_s` old.
    Undocked reasons given to `on_undocked`: "ping_timeout", "line_lost" (the port failed or vanished),
    "stopped".
    """

    def __init__(self, port: str, device_id: str, *, software: str = __version__,
                 timing: LineTiming | None = None,
                 on_docked: Callable[[DockSession], None] | None = None,
                 on_undocked: Callable[[str], None] | None = None,
                 on_undock_intent: Callable[[], None] | None = None,
                 on_hint: Callable[[DockHint], None] | None = None,
                 serial_factory: SerialFactory | None = None):
        super().__init__(port, name="dock-line", timing=timing or LineTiming(), serial_factory=serial_factory)
        try:
            Hello(seq=0, proto=PROTOCOL_VERSION, device=device_id, sw=software[:64])
        except ValidationError:
            raise ValueError(f"device id {device_id!r} cannot be sent on the dock line: it must match "
                             f"{ID_PATTERN}") from None
        self.device_id = device_id
        self.software = software[:64]
        self.on_docked = on_docked
        self.on_undocked = on_undocked
        self.on_undock_intent = on_undock_intent
        self.on_hint = on_hint
        self._status: Status | None = None
        self._status_dirty = False
        self._docked = False  # published state (any thread, under the lock)
        self._line_docked = False  # the dock-line thread's own view, ahead of the published one
        self._session: DockSession | None = None
        self._last_hint: DockHint | None = None
        self._undock_intents = 0
        self._reset_line_state()

    # public, any thread ----------------------------------------------------------------------------------

    @property
    def docked(self) -> bool:
        with self._lock:
            return self._docked

    @property
    def session(self) -> DockSession | None:
        with self._lock:
            return self._session if self._docked else None

    @property
    def last_hint(self) -> DockHint | None:
        with self._lock:
            return self._last_hint

    @property
    def undock_intents(self) -> int:
        """How many distinct undock button presses have reached the device."""
        with self._lock:
            return self._undock_intents

    def set_status(self, *, phase: Phase | str, queued_bytes: int, done_bytes: int, eta_s: int | None,
                   safe_to_remove: bool, alarm: bool = False) -> None:
        """Publish the sync state for the dock's LEDs; sent within one read timeout, then periodically."""
        status = Status(seq=0, phase=Phase(phase), queued_bytes=queued_bytes, done_bytes=done_bytes, eta_s=eta_s,
                        safe_to_remove=safe_to_remove, alarm=alarm)
        with self._lock:
            self._status = status
            self._status_dirty = True

    def wait_docked(self, timeout: float) -> bool:
        return self.wait_for(lambda: self._docked, timeout)

    def wait_undocked(self, timeout: float) -> bool:
        return self.wait_for(lambda: not self._docked, timeout)

    # dock-line thread -------------------------------------------------------------------------------------

    def _reset_line_state(self) -> None:
        self._hello_seq: int | None = None
        self._acked: DockSession | None = None
        self._last_ping_rx: float | None = None
        self._next_hello_at = 0.0
        self._next_ping_at = 0.0
        self._next_status_at = 0.0
        self._last_intent_seq: int | None = None

    def _on_open(self) -> None:
        self._reset_line_state()
        self._send_hello(time.monotonic())

    def _send_hello(self, now: float) -> None:
        hello = self._send(lambda seq: Hello(seq=seq, proto=PROTOCOL_VERSION, device=self.device_id, sw=self.software))
        self._hello_seq = hello.seq
        self._next_hello_at = now + self.timing.hello_retry_s

    def _on_message(self, message: _Message) -> None:
        now = time.monotonic()
        if isinstance(message, Ping):
            self._last_ping_rx = now
            if self._acked is not None and message.device != self.device_id and now >= self._next_hello_at:
                # The dock no longer knows us (it restarted): say HELLO again, staying docked meanwhile.
                log.info("dock-line: dock %s lost our session; saying HELLO again", message.dock)
                self._send_hello(now)
        elif isinstance(message, Ack) and message.of == "HELLO":
            if message.ack != self._hello_seq:
                return  # an answer to an older HELLO; the latest one's answer follows
            if not message.ok or message.dock is None or message.proto != PROTOCOL_VERSION:
                self._count("refused")
                log.error("dock-line: dock %s refused HELLO (proto %s): %s", message.dock, message.proto,
                          message.reason or "no reason given")
                self._next_hello_at = now + 10 * self.timing.hello_retry_s
                return
            self._acked = DockSession(message.dock, message.proto)
            self._next_ping_at = now
            self._next_status_at = now
        elif isinstance(message, UndockIntent):
            self._send(lambda seq: Ack(seq=seq, of="UNDOCK_INTENT", ack=message.seq, ok=self._acked is not None))
            if message.seq != self._last_intent_seq:  # re-sent copies of one press are acknowledged, not repeated
                self._last_intent_seq = message.seq
                self._callback("on_undock_intent", self.on_undock_intent)
                with self._changed:
                    self._undock_intents += 1
                    self._changed.notify_all()
        elif isinstance(message, Hint):
            hint = DockHint(message.wall_us, message.time_source, message.link_up, time.monotonic_ns() // 1000)
            self._callback("on_hint", self.on_hint, hint)
            with self._changed:
                self._last_hint = hint
                self._changed.notify_all()
        else:
            self._reject_unexpected(message)
        self._update_presence(now)

    def _on_tick(self) -> None:
        now = time.monotonic()
        self._update_presence(now)
        if self._acked is None:
            if now >= self._next_hello_at:
                self._send_hello(now)
            return
        if now >= self._next_ping_at:
            self._send(lambda seq: Ping(seq=seq, device=self.device_id))
            self._next_ping_at = now + self.timing.ping_interval_s
        with self._lock:
            status, dirty = self._status, self._status_dirty
            self._status_dirty = False
        if status is not None and (dirty or now >= self._next_status_at):
            self._send(lambda seq: status.model_copy(update={"seq": seq}))
            self._next_status_at = now + self.timing.status_interval_s

    def _update_presence(self, now: float) -> None:
        fresh = self._last_ping_rx is not None and now - self._last_ping_rx <= self.timing.presence_timeout_s
        present = self._acked is not None and fresh
        if present and not self._line_docked:
            self._line_docked = True
            log.info("dock-line: docked at %s (protocol %d)", self._acked.dock_id, self._acked.proto)
            self._callback("on_docked", self.on_docked, self._acked)
            self._publish_docked(self._acked)
        elif not present and self._line_docked:
            self._count("presence_timeouts")
            self._line_docked = False
            log.warning("dock-line: no PING from the dock for %.1f s: undocked", self.timing.presence_timeout_s)
            self._callback("on_undocked", self.on_undocked, "ping_timeout")
            self._publish_docked(None)
        if self._acked is not None and not fresh and self._last_ping_rx is not None:
            self._acked = None  # the dock went quiet: handshake again (every hello_retry_s) until it speaks
            self._last_ping_rx = None
            self._next_hello_at = now

    def _publish_docked(self, session: DockSession | None) -> None:
        """Make a presence change visible to other threads, after its callback ran (so a waiter that
        returns from `wait_docked`/`wait_undocked` knows `on_docked`/`on_undocked` has run)."""
        with self._changed:
            self._docked = session is not None
            self._session = session
            self._changed.notify_all()

    def _on_lost(self, reason: str) -> None:
        self._reset_line_state()
        if self._line_docked:
            self._line_docked = False
            log.warning("dock-line: undocked (%s)", reason)
            self._callback("on_undocked", self.on_undocked, reason)
            self._publish_docked(None)
