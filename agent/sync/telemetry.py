"""What the device tells the bureau over MQTT, and what it accepts from it (docs/PROTOCOL.md, "MQTT").

- Message models: the JSON bodies of `status`, `telemetry`, `event`, `ack`, `cmd/resp`, `config/desired` and
  `config/reported`, one definition that the device builds with and the bureau's consumer
  (bureau/mqtt_consumer.py) validates with.
- `DeviceTelemetry`: publishes telemetry, the retained status, config/reported, and a summary of every ledger
  record (type, seq, session, alarm code/severity; never names, case references, GPS or free text, R23).
- `CommandRouter`: the four bureau commands (sync_now, assign_officer, set_session_context, push_config)
  validated and handed to callables the daemon supplies, plus `ack` receipt hints.
- `RunningConfig`: the running config's hash and version, and the last push's outcome, for config/reported.

Event summaries are not pushed by the ledger (it has no observers): each period the telemetry thread asks
the ledger for records after the last summarised seq. That seq is stored in the outbox database in the same
transaction as the queued summaries, so a restart or a power cut neither repeats nor skips one. The ledger is
the buffer: when the outbox is over its high-water mark no summaries are queued, so none is ever dropped.

Threads:
- "mqtt-telemetry" (`DeviceTelemetry.run`): every `period_s`, or at once when poked (on every (re)connect),
  samples the status callable, sends telemetry and, when changed, the retained status and config/reported,
  and queues event summaries. It reads the ledger through the database lock and writes only the outbox.
- paho's network thread: `CommandRouter.__call__` (MqttLink's command handler) and `receipt_hint` (its
  `on_ack` hook) validate, then call the daemon's callables, which must only post events or set flags.
  `DeviceTelemetry.status_fields` (MqttLink's hook) returns the last sampled status without calling out.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.clock import Clock
from agent.config import AgentConfig, ConfigError, parse_config
from agent.events import SetContext
from agent.evidence.records import ID
from agent.policy import PolicyError, stage
from agent.sync.mqtt import Command, CommandError, MqttLink

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024
ID_PATTERN = ID  # device, officer, session, segment ids: the ledger's id pattern
ID_RE = re.compile(ID_PATTERN)
EVENTS_CURSOR = "events.last_seq"
DEVICE_STATES = ("READY", "RECORDING", "INTERRUPTED", "DOCKED")

# --- message models ---------------------------------------------------------------------------------------


class _Message(BaseModel):
    # strict: "5" is not 5 and 1 is not true; unknown members are ignored (room for additions within v1)
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)


class StatusMessage(_Message):
    """`status`, retained. The Last Will and a clean shutdown carry only v, state, device and reason."""

    v: int = PROTOCOL_VERSION
    state: Literal["online", "offline"]
    device: str | None = Field(None, pattern=ID_PATTERN)
    reason: str | None = Field(None, max_length=200, description="why offline: 'connection lost' or 'shutdown'")
    device_state: Literal["READY", "RECORDING", "INTERRUPTED", "DOCKED"] | None = None
    session_id: str | None = Field(None, pattern=ID_PATTERN)
    docked: bool | None = None
    alarms: list[str] = Field(default_factory=list, max_length=50)
    at_wall_us: int | None = None
    software: str | None = Field(None, max_length=64)


class StorageTelemetry(_Message):
    minutes_left: float | None = Field(None, ge=0)
    free_bytes: int | None = Field(None, ge=0)
    unreceipted_bytes: int | None = Field(None, ge=0)
    purgeable_bytes: int | None = Field(None, ge=0)


class ClockTelemetry(_Message):
    source: str | None = Field(None, max_length=32)
    quality: Literal["synced", "free_running", "unset"] | None = None
    offset_us: int | None = Field(None, description="bureau minus device at the last sync")
    synced_at_wall_us: int | None = None


class UploadTelemetry(_Message):
    phase: str = Field("idle", max_length=32)
    queued_bytes: int = Field(0, ge=0)
    done_bytes: int = Field(0, ge=0)
    eta_s: int | None = Field(None, ge=0)
    segments_total: int = Field(0, ge=0)
    segments_sent: int = Field(0, ge=0)
    receipted: int = Field(0, ge=0)
    rejected: int = Field(0, ge=0)


class TelemetryMessage(_Message):
    v: int = PROTOCOL_VERSION
    device: str = Field(pattern=ID_PATTERN)
    at_wall_us: int
    battery_percent: int | None = Field(None, ge=0, le=100)
    temperature_c: float | None = Field(None, ge=-60, le=150)
    storage: StorageTelemetry = StorageTelemetry()
    clock: ClockTelemetry = ClockTelemetry()
    upload: UploadTelemetry = UploadTelemetry()
    segments: dict[str, int] = Field(default_factory=dict, max_length=16, description="segment count per state")
    docked: bool | None = None
    ledger_head_seq: int | None = Field(None, ge=0)
    outbox_pending: int | None = Field(None, ge=0)


SummaryValue = str | int | bool | None | list[str]


class EventMessage(_Message):
    v: int = PROTOCOL_VERSION
    device: str = Field(pattern=ID_PATTERN)
    seq: int = Field(ge=1)
    type: str = Field(pattern=r"^[a-z][a-z_]{0,39}$")
    wall_us: int
    clock_quality: str | None = Field(None, max_length=32)
    session_id: str | None = Field(None, pattern=ID_PATTERN)
    summary: dict[str, SummaryValue] = Field(default_factory=dict, max_length=16)


class ReceiptHint(_Message):
    """`ack`: the bureau holds receipts for these segments. Only a hint to fetch them over HTTPS."""

    v: int = PROTOCOL_VERSION
    segment_ids: list[str] = Field(default_factory=list, max_length=500)
    ledger_head_seq: int | None = Field(None, ge=0)


class PushOutcome(_Message):
    version: int | str | None = None
    ok: bool
    error: str | None = None
    config_sha256: str | None = None


class ConfigReported(_Message):
    v: int = PROTOCOL_VERSION
    device: str = Field(pattern=ID_PATTERN)
    at_wall_us: int
    config_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    version: int | str | None = None
    source: Literal["file", "bureau", "technician"] = "file"
    last_push: PushOutcome | None = None


class CommandAnswer(_Message):
    """`cmd/resp`: ok, the command's name, and either `error` or the command's answer fields."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True)
    ok: bool
    command: str = Field(max_length=64)
    error: str | None = Field(None, max_length=2000)


def message_problem(model: type[BaseModel], payload: bytes) -> str:
    """Why `payload` is not a valid `model` message, in one line (for logs and rejection counters)."""
    if len(payload) > MAX_MESSAGE_BYTES:
        return f"payload of {len(payload)} bytes exceeds {MAX_MESSAGE_BYTES}"
    try:
        model.model_validate_json(payload)
    except ValidationError as exc:
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'payload'}: {e['msg']}"
                         for e in exc.errors(include_url=False, include_input=False)[:3])
    return ""


# --- event summaries --------------------------------------------------------------------------------------

# Per record type, the body members an event may repeat: codes, ids, counts and flags only. Free text
# (`detail`), officer ids, dock ids, case context and anything positional stay in the signed ledger,
# which reaches the bureau over HTTPS (R23).
SUMMARY_FIELDS: dict[str, tuple[str, ...]] = {
    "alarm": ("code", "severity", "cleared"),
    "fault": ("component", "code"),
    "interruption_start": ("interruption_id", "reason", "source"),
    "interruption_end": ("interruption_id", "reason", "resumed", "spoken_reason_given"),
    "policy_flag": ("flag", "stage"),
    "session_open": ("trigger", "category", "stage"),
    "session_context": ("category", "stage", "mandatory", "source"),
    "session_close": ("outcome", "stop", "written_explanation_required"),
    "segment": ("segment_id", "index", "size", "truncated", "recovered"),
    "statement": ("kind", "event", "detected_by"),
    "marker": ("step",),
    "dock": ("event",),
    "receipt": ("segment_id", "ledger_upto_seq"),
    "purge": ("segment_id", "reason"),
    "clock_sync": ("source", "offset_us", "applied"),
    "boot": ("previous_shutdown",),
    "shutdown": ("reason",),
    "recovery": ("action", "segment_id"),
    "config_change": ("source", "changed_keys"),
    "key_change": ("kind", "key_ids"),
    "lens_covered": ("event",),
    "prompt": ("prompt_id", "purpose"),
    "compliance_report": ("compliant",),
}


def summarise_record(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The `event` message for one ledger record (its decoded fields)."""
    body = fields.get("body") or {}
    summary: dict[str, Any] = {}
    for name in SUMMARY_FIELDS.get(fields["type"], ()):
        value = body.get(name)
        if isinstance(value, list):
            value = [str(v)[:80] for v in value[:20]]
        elif isinstance(value, str):
            value = value[:80]
        elif not isinstance(value, int | bool) and value is not None:
            continue
        summary[name] = value
    return {"v": PROTOCOL_VERSION, "device": fields["device"], "seq": fields["seq"], "type": fields["type"],
            "wall_us": fields["wall_us"], "clock_quality": (fields.get("clock") or {}).get("quality"),
            "session_id": _id_or_none(body.get("session_id")), "summary": summary}


class LedgerReader(Protocol):
    def records_after(self, seq: int, limit: int) -> list[dict[str, Any]]: ...

    def head_seq(self) -> int: ...


class StoreLedgerReader:
    """Reads a device Ledger's records through its database lock, so a record another thread is still
    appending (an uncommitted transaction on the shared connection) is never seen."""

    def __init__(self, ledger: Any):
        self.db = ledger.db

    def records_after(self, seq: int, limit: int) -> list[dict[str, Any]]:
        rows = self.db.query_rows("SELECT data FROM ledger WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit))
        return [json.loads(bytes(data)) for (data,) in rows]

    def head_seq(self) -> int:
        rows = self.db.query_rows("SELECT MAX(seq) FROM ledger")
        return int(rows[0][0] or 0) if rows else 0


# --- running config ---------------------------------------------------------------------------------------


def config_fingerprint(config: AgentConfig) -> str:
    """SHA-256 (hex) of the validated config with every default filled in, as JSON with sorted keys and no
    whitespace (Python's json.dumps(sort_keys=True, separators=(",", ":")))."""
    text = json.dumps(config.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


class RunningConfig:
    """The config the device runs, its version (as the bureau numbered it; None for a local file) and the
    outcome of the last push. Any thread may call any method."""

    def __init__(self, config: AgentConfig, version: int | str | None = None,
                 source: Literal["file", "bureau", "technician"] = "file"):
        self._lock = threading.Lock()
        self._config, self._version, self._source = config, version, source
        self._sha = config_fingerprint(config)
        self._last_push: PushOutcome | None = None

    @property
    def config(self) -> AgentConfig:
        with self._lock:
            return self._config

    @property
    def sha256(self) -> str:
        with self._lock:
            return self._sha

    def accept(self, config: AgentConfig, version: int | str | None,
               source: Literal["file", "bureau", "technician"] = "bureau") -> None:
        """The daemon calls this once `config` is in effect."""
        with self._lock:
            self._config, self._version, self._source = config, version, source
            self._sha = config_fingerprint(config)

    def record_push(self, version: int | str | None, ok: bool, error: str | None, sha: str | None) -> None:
        with self._lock:
            self._last_push = PushOutcome(version=version, ok=ok, error=error, config_sha256=sha)

    def report(self, device_id: str, wall_us: int) -> dict[str, Any]:
        """The `config/reported` message."""
        with self._lock:
            return ConfigReported(device=device_id, at_wall_us=wall_us, config_sha256=self._sha,
                                  version=self._version, source=self._source,
                                  last_push=self._last_push).model_dump(mode="json")


# --- telemetry ----------------------------------------------------------------------------------------------


def _num(mapping: Any, key: str, kind: type | tuple[type, ...] = int) -> Any:
    """mapping[key] if it is a number of `kind` (never a bool), else None."""
    if not isinstance(mapping, Mapping):
        return None
    value = mapping.get(key)
    if isinstance(value, bool) or not isinstance(value, kind):
        return None
    return value


def _count(mapping: Any, key: str) -> int | None:
    """mapping[key] if it is a non-negative integer, else None."""
    value = _num(mapping, key)
    return value if value is not None and value >= 0 else None


def telemetry_from_status(device_id: str, status: Mapping[str, Any], wall_us: int) -> dict[str, Any]:
    """A `telemetry` message from a status snapshot (agent.daemon.DeviceStatus.as_dict(), optionally with
    `temperature_c`). Missing or ill-typed values become null rather than failing the whole sample."""
    storage, clock = status.get("storage") or {}, status.get("clock") or {}
    upload, last_sync = status.get("upload") or {}, status.get("last_sync") or {}
    minutes = _num(storage, "minutes_left", (int, float))
    minutes = minutes if minutes is None or minutes >= 0 else None
    temperature = _num(status, "temperature_c", (int, float))
    battery = _num(status, "battery_percent")
    if temperature is not None and not -60 <= temperature <= 150:
        temperature = None  # a sensor glitch, not a reading
    if battery is not None and not 0 <= battery <= 100:
        battery = None
    quality = clock.get("quality") if clock.get("quality") in ("synced", "free_running", "unset") else None
    message = {
        "v": PROTOCOL_VERSION, "device": device_id, "at_wall_us": wall_us,
        "battery_percent": battery,
        "temperature_c": None if temperature is None else round(float(temperature), 1),
        "storage": {"minutes_left": None if minutes is None else round(float(minutes), 1),
                    **{k: _count(storage, k) for k in ("free_bytes", "unreceipted_bytes", "purgeable_bytes")}},
        "clock": {"source": clock.get("source") if isinstance(clock.get("source"), str) else None,
                  "quality": quality, "offset_us": _num(last_sync, "clock_offset_us"),
                  "synced_at_wall_us": _num(last_sync, "at_wall_us")},
        "upload": {"phase": upload.get("phase") if isinstance(upload.get("phase"), str) else "idle",
                   "eta_s": _count(upload, "eta_s"),
                   **{k: _count(upload, k) or 0 for k in ("queued_bytes", "done_bytes", "segments_total",
                                                         "segments_sent", "receipted", "rejected")}},
        "segments": {str(k): v for k, v in (status.get("queue") or {}).items()
                     if isinstance(v, int) and not isinstance(v, bool)},
        "docked": status.get("docked") if isinstance(status.get("docked"), bool) else None,
    }
    return TelemetryMessage.model_validate(message).model_dump(mode="json")


def status_from_snapshot(device_id: str, status: Mapping[str, Any], wall_us: int,
                         software: str | None) -> dict[str, Any]:
    """The retained `status` message (online) from a status snapshot."""
    state = status.get("state")
    alarms = [a for a in status.get("alarms") or [] if isinstance(a, str)]
    message = {"v": PROTOCOL_VERSION, "state": "online", "device": device_id,
               "device_state": state if state in DEVICE_STATES else None,
               "session_id": _id_or_none(status.get("session_id")),
               "docked": status.get("docked") if isinstance(status.get("docked"), bool) else None,
               "alarms": sorted(set(alarms))[:50], "at_wall_us": wall_us, "software": software}
    return StatusMessage.model_validate(message).model_dump(mode="json")


@dataclass
class TelemetryCounters:
    telemetry_sent: int = 0
    telemetry_skipped_offline: int = 0
    status_sent: int = 0
    config_sent: int = 0
    events_queued: int = 0
    events_deferred: int = 0  # ticks when the outbox was over its high-water mark
    sample_errors: int = 0


class DeviceTelemetry:
    def __init__(self, link: MqttLink, status: Callable[[], Mapping[str, Any]], ledger: LedgerReader,
                 clock: Clock, running_config: RunningConfig | None = None, period_s: float = 30.0,
                 events_per_tick: int = 500, outbox_high_water: int = 2000, software: str | None = None):
        if period_s <= 0 or events_per_tick <= 0 or outbox_high_water <= 0:
            raise ValueError("period_s, events_per_tick and outbox_high_water must be positive")
        self.link = link
        self.device_id = link.device_id
        self.status = status
        self.ledger = ledger
        self.clock = clock
        self.running_config = running_config
        self.period_s = period_s
        self.events_per_tick = events_per_tick
        self.outbox_high_water = outbox_high_water
        self.software = software
        self.counters = TelemetryCounters()
        self._last_status: dict[str, Any] | None = None  # last status sent (without at_wall_us)
        self._cached_status: dict[str, Any] = {}
        self._last_config: dict[str, Any] | None = None
        self._resend = True
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._tick_lock = threading.Lock()
        self._thread = threading.Thread(target=self.run, name="mqtt-telemetry", daemon=True)
        link.status_fields = self.status_fields
        link.on_connected = self.poke

    # --- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stops the thread; what is queued stays in the outbox for the next start."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def poke(self) -> None:
        """Publish at once (called on every (re)connect, and by the daemon after a change)."""
        self._resend = True
        self._wake.set()

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # a bad sample must not end telemetry; the next period tries again
                self.counters.sample_errors += 1
                log.exception("telemetry tick failed")
            self._wake.wait(self.period_s)
            self._wake.clear()

    # --- one period -------------------------------------------------------------------------------

    def status_fields(self) -> dict[str, Any]:
        """MqttLink hook (paho thread): the last sampled status, for the online status on (re)connect."""
        return dict(self._cached_status)

    def tick(self) -> None:
        """One period: event summaries, then status, config/reported and telemetry."""
        with self._tick_lock:
            resend, self._resend = self._resend, False
            self.queue_events()
            snapshot = self.status()
            now = self.clock.wall_us()
            status = status_from_snapshot(self.device_id, snapshot, now, self.software)
            self._cached_status = status
            bare = {k: v for k, v in status.items() if k != "at_wall_us"}
            if resend or bare != self._last_status:
                if self.link.publish_now("status", status, retain=True):
                    self._last_status = bare
                    self.counters.status_sent += 1
                else:
                    self._resend = True
            if self.running_config is not None:
                report = self.running_config.report(self.device_id, now)
                bare = {k: v for k, v in report.items() if k != "at_wall_us"}
                if resend or bare != self._last_config:
                    if self.link.publish_now("config/reported", report, retain=True):
                        self._last_config = bare
                        self.counters.config_sent += 1
                    else:
                        self._resend = True
            message = telemetry_from_status(self.device_id, snapshot, now)
            message["ledger_head_seq"] = self.ledger.head_seq()
            message["outbox_pending"] = len(self.link.outbox)
            if self.link.publish_now("telemetry", message):
                self.counters.telemetry_sent += 1
            else:
                self.counters.telemetry_skipped_offline += 1

    def queue_events(self) -> int:
        """Queue summaries of records after the stored cursor, with the cursor, in batches; returns count."""
        queued = 0
        while queued < self.events_per_tick:
            room = self.outbox_high_water - len(self.link.outbox)
            if room <= 0:
                self.counters.events_deferred += 1
                log.info("outbox holds %d messages; event summaries wait in the ledger", len(self.link.outbox))
                break
            after = self.link.outbox.cursor(EVENTS_CURSOR) or 0
            records = self.ledger.records_after(after, min(100, room, self.events_per_tick - queued))
            if not records:
                break
            self.link.publish_batch([("event", summarise_record(r)) for r in records],
                                    cursor=(EVENTS_CURSOR, records[-1]["seq"]))
            queued += len(records)
        self.counters.events_queued += queued
        return queued


# --- commands -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionContextValue:
    officer_id: str | None
    category: str | None
    stage: str | None


ALLOWED_ARGS: dict[str, set[str]] = {
    "sync_now": {"reason"},
    "assign_officer": {"officer_id"},
    "set_session_context": {"category", "stage", "officer_id"},
    "push_config": {"config", "version"},
}


class CommandRouter:
    """The MqttLink command handler. Each command's arguments are checked here (unknown members, officer id
    pattern, Annex stage, config schema); a CommandError names the problem and becomes the `error` of a
    `cmd/resp` with ok=false. Valid commands go to the daemon's callables:

    - `sync_now(reason)` starts a sync if the device can (returns answer fields, e.g. {"started": true});
    - `set_context(SetContext)` posts to the session state machine (assign_officer, set_session_context);
    - `current_context()` gives the context a partial change keeps;
    - `apply_config(config, version)` takes a validated pushed config over (now or at restart; it records the
      config_change in the ledger and calls running_config.accept once the config is in effect);
    - `on_receipt_hint(hint)` may start an HTTPS receipt fetch; a hint never marks anything receipted.
    """

    def __init__(self, device_id: str, *, sync_now: Callable[[str | None], dict[str, Any] | None],
                 set_context: Callable[[SetContext], None], current_context: Callable[[], SessionContextValue],
                 apply_config: Callable[[AgentConfig, int | str | None], dict[str, Any] | None],
                 running_config: RunningConfig,
                 on_receipt_hint: Callable[[ReceiptHint], None] | None = None):
        self.device_id = device_id
        self.sync_now = sync_now
        self.set_context = set_context
        self.current_context = current_context
        self.apply_config = apply_config
        self.running_config = running_config
        self.on_receipt_hint = on_receipt_hint
        self.rejected_hints = 0

    def attach(self, link: MqttLink) -> None:
        link.handler = self
        link.on_ack = self.receipt_hint

    def __call__(self, command: Command) -> dict[str, Any]:
        unknown = set(command.args) - ALLOWED_ARGS[command.name]
        if unknown:
            raise CommandError(f"{command.name}: unknown field(s) {', '.join(sorted(unknown))}; allowed: "
                               f"{', '.join(sorted(ALLOWED_ARGS[command.name])) or 'none'}")
        return getattr(self, f"_{command.name}")(command.args)

    def _sync_now(self, args: dict[str, Any]) -> dict[str, Any]:
        reason = args.get("reason")
        if reason is not None and (not isinstance(reason, str) or len(reason) > 120):
            raise CommandError("sync_now: reason must be a string of at most 120 characters")
        return self.sync_now(reason) or {}

    def _assign_officer(self, args: dict[str, Any]) -> dict[str, Any]:
        officer = _officer_id("assign_officer", args["officer_id"])
        now = self.current_context()
        self.set_context(SetContext(officer, now.category, now.stage, source="bureau"))
        return {"officer_id": officer, "queued": True}

    def _set_session_context(self, args: dict[str, Any]) -> dict[str, Any]:
        category, code = args["category"], args["stage"]
        for name, value in (("category", category), ("stage", code)):
            if value is not None and not isinstance(value, str):
                raise CommandError(f"set_session_context: {name} must be a string or null, got {value!r}")
        if (category is None) != (code is None):
            raise CommandError("set_session_context: category and stage must both be set or both be null "
                               f"(got category={category!r}, stage={code!r})")
        try:
            found = stage(category, code)
        except PolicyError as exc:
            raise CommandError(f"set_session_context: {exc}") from None
        officer = (_officer_id("set_session_context", args["officer_id"]) if "officer_id" in args
                   else self.current_context().officer_id)
        self.set_context(SetContext(officer, category, code, source="bureau"))
        return {"officer_id": officer, "category": category, "stage": code,
                "mandatory": bool(found and found.mandatory), "queued": True}

    def _push_config(self, args: dict[str, Any]) -> dict[str, Any]:
        version = args.get("version")
        try:
            if version is not None and (isinstance(version, bool) or not isinstance(version, int | str)
                                        or (isinstance(version, str) and not 0 < len(version) <= 64)
                                        or (isinstance(version, int) and version < 0)):
                raise CommandError(f"push_config: version must be a non-negative integer or a string of 1-64 "
                                   f"characters, got {version!r}")
            config = args["config"]
            if not isinstance(config, dict):
                raise CommandError(f"push_config: config must be a JSON object (the agent.toml document), "
                                   f"got {type(config).__name__}")
            try:
                parsed = parse_config(config, source="push_config")
            except ConfigError as exc:
                raise CommandError(str(exc)) from None
            if parsed.device.id != self.device_id:
                raise CommandError(f"push_config: key 'device.id' = {parsed.device.id!r} is not this device "
                                   f"({self.device_id!r}); a pushed config cannot change the device identity")
            sha = config_fingerprint(parsed)
            if sha == self.running_config.sha256:
                self.running_config.record_push(version, True, None, sha)
                return {"config_sha256": sha, "version": version, "already_running": True}
            answer = self.apply_config(parsed, version) or {}
        except CommandError as exc:
            self.running_config.record_push(version if _plain(version) else None, False, str(exc), None)
            raise
        self.running_config.record_push(version, True, None, sha)
        return {"config_sha256": sha, "version": version, **answer}

    # --- ack (paho thread) ------------------------------------------------------------------------

    def receipt_hint(self, payload: bytes) -> None:
        """MqttLink's on_ack hook: validate the hint and pass it on; a bad one is logged and counted."""
        problem = message_problem(ReceiptHint, payload)
        if problem:
            self.rejected_hints += 1
            log.warning("receipt hint rejected: %s", problem)
            return
        hint = ReceiptHint.model_validate_json(payload)
        bad = [s for s in hint.segment_ids if not ID_RE.match(s)]
        if bad:
            self.rejected_hints += 1
            log.warning("receipt hint rejected: segment id %r is not an id", bad[0][:80])
            return
        if self.on_receipt_hint is not None:
            self.on_receipt_hint(hint)


def _officer_id(command: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not ID_RE.match(value):
        raise CommandError(f"{command}: officer_id {str(value)[:80]!r} does not match {ID_PATTERN} "
                           "(letters, digits, '.', '_', ':', '-'; at most 64)")
    return value


def _id_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and ID_RE.match(value) else None


def _plain(version: Any) -> bool:
    return version is None or (isinstance(version, int | str) and not isinstance(version, bool)
                               and len(str(version)) <= 64)
