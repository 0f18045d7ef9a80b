"""Ledger records: the envelope, every record type's body schema, signing and parsing.

A record is canonical JSON (RFC 8785) of the envelope below; its signature is ES256 (DER) over exactly
those bytes; `prev` is the SHA-256 of the previous record's canonical bytes. docs/FORMAT.md, "Ledger".
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.evidence.canonical import CanonicalJSONError, canonical_bytes, parse_canonical

SCHEMA_VERSION = 1
GENESIS_PREV = "0" * 64
HEX64 = r"^[0-9a-f]{64}$"
ID = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"
# File names in segments/ are derived from ids, so they are plain names: no separator, never "." or "..".
SEGMENT_FILE = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}\.age$"
SIDECAR_FILE = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}\.(gps|context)\.age$"
SEGMENT_SUFFIX = ".age"
# A segment's sidecar is `<segment_id>.<tag>.age` (docs/FORMAT.md, "Sidecars").
SIDECAR_TAGS = {"gps_track": "gps", "context": "context"}


class RecordError(ValueError):
    """A record that is malformed, not canonical, or whose body does not match its type's schema."""


class InterruptionReason(StrEnum):
    """R17's reasons, plus `other` (with a note)."""

    DEVICE_FAULT = "device_fault"
    DEVICE_DAMAGE = "device_damage"
    LOW_BATTERY = "low_battery"
    STORAGE_FULL = "storage_full"
    SEVERE_WEATHER = "severe_weather"
    OBSTRUCTION = "obstruction"
    OTHER = "other"


INTERRUPTION_LABELS: dict[InterruptionReason, tuple[str, str]] = {
    InterruptionReason.DEVICE_FAULT: ("设备故障", "device fault"),
    InterruptionReason.DEVICE_DAMAGE: ("设备损坏", "device damage"),
    InterruptionReason.LOW_BATTERY: ("电量不足", "low battery"),
    InterruptionReason.STORAGE_FULL: ("存储空间已满", "storage full"),
    InterruptionReason.SEVERE_WEATHER: ("恶劣天气", "severe weather"),
    InterruptionReason.OBSTRUCTION: ("现场人员阻挠", "obstruction by people on scene"),
    InterruptionReason.OTHER: ("其他", "other"),
}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


SessionId = Field(pattern=ID)


class DeviceInit(_Body):
    """Genesis record (seq 1): binds the ledger to the identity key that signs it."""

    public_key: str = Field(description="base64 DER SubjectPublicKeyInfo of the ES256 identity key")
    key_id: str
    recipients: list[str] = Field(description="age recipients (age1...) segments are encrypted to")
    software: str


class Boot(_Body):
    boot_id: str = Field(pattern=ID)
    software: str
    previous_shutdown: Literal["clean", "unclean", "first_boot"]


class Shutdown(_Body):
    reason: Literal["requested", "critical_battery", "signal", "docked_power_off", "fault"]


class Recovery(_Body):
    segment_id: str | None = None
    action: Literal["closed_truncated", "closed_complete", "unknown_file", "session_closed", "index_rebuilt"]
    detail: str = ""


class ConfigChange(_Body):
    sha256: str = Field(pattern=HEX64)
    changed_keys: list[str]
    source: Literal["file", "bureau", "technician", "officer"]


class KeyChange(_Body):
    kind: Literal["identity", "recipients", "receipt_key", "certificate", "ca"]
    key_ids: list[str]
    detail: str = ""
    public_key: str | None = Field(default=None, description="new identity key (base64 SPKI DER)")
    recipients: list[str] | None = None


class ClockSync(_Body):
    source: Literal["bureau", "gps", "dock", "rtc"]
    offset_us: int = Field(description="reference minus device clock, microseconds")
    rtt_us: int | None = None
    applied: bool


class SessionOpen(_Body):
    session_id: str = SessionId
    officer_id: str | None = None
    category: str | None = None
    stage: str | None = None
    trigger: Literal["button", "command", "auto"]
    pre_event_us: int = Field(ge=0)
    context_sha256: str | None = Field(default=None, pattern=HEX64,
                                       description="hash of the encrypted context sidecar (case ref, names)")


class SessionContext(_Body):
    session_id: str | None = None
    officer_id: str | None = None
    category: str | None = None
    stage: str | None = None
    mandatory: bool
    source: Literal["officer", "bureau", "config"]
    context_sha256: str | None = Field(default=None, pattern=HEX64)


class SessionClose(_Body):
    session_id: str = SessionId
    outcome: Literal["completed", "unable_to_continue", "docked", "shutdown", "recovered"]
    stop: Literal["normal", "confirmed_hold", "forced", "crash"]
    written_explanation_required: bool = False


class Prompt(_Body):
    session_id: str | None = None
    prompt_id: str
    language: str
    purpose: str


class Statement(_Body):
    session_id: str = SessionId
    kind: Literal["opening", "notice", "interruption_reason"]
    event: Literal["start", "end", "confirmed", "reminder", "missing"]
    detected_by: Literal["vad", "mark", "timeout", "device"]
    at_us: int = Field(description="monotonic time of the event, microseconds")
    interruption_id: str | None = None


class Marker(_Body):
    session_id: str = SessionId
    step: str
    note_sha256: str | None = Field(default=None, pattern=HEX64)


class InterruptionStart(_Body):
    session_id: str = SessionId
    interruption_id: str = Field(pattern=ID)
    reason: InterruptionReason
    source: Literal["auto", "officer"]
    detail: str = ""


class InterruptionEnd(_Body):
    session_id: str = SessionId
    interruption_id: str = Field(pattern=ID)
    reason: InterruptionReason
    resumed: bool
    spoken_reason_given: bool | None = None


class PolicyFlag(_Body):
    session_id: str = SessionId
    flag: Literal["stop_during_mandatory", "mandatory_stage_left_early", "stop_refused", "statement_missing",
                  "written_explanation_required"]
    stage: str | None = None
    detail: str = ""


def segment_file_name(segment_id: str) -> str:
    """The name of a segment's file in `segments/`."""
    return segment_id + SEGMENT_SUFFIX


def sidecar_file_name(segment_id: str, kind: str) -> str:
    """The name of a segment's sidecar of `kind` in `segments/`."""
    return f"{segment_id}.{SIDECAR_TAGS[kind]}{SEGMENT_SUFFIX}"


class Sidecar(_Body):
    kind: Literal["gps_track", "context"]
    file: str = Field(pattern=SIDECAR_FILE)
    size: int = Field(ge=0)
    sha256_cipher: str = Field(pattern=HEX64)


class Segment(_Body):
    """One encrypted media file. Times are on the device's monotonic media clock, in microseconds."""

    segment_id: str = Field(pattern=ID)
    session_id: str | None = None
    index: int = Field(ge=0, description="0-based position of the segment within its session")
    file: str = Field(pattern=SEGMENT_FILE)
    size: int = Field(ge=0, description="ciphertext bytes on disk")
    sha256_cipher: str = Field(pattern=HEX64)
    plain_size: int | None = Field(default=None, ge=0)
    sha256_plain: str | None = Field(default=None, pattern=HEX64)
    chunks: int = Field(ge=0, description="complete age STREAM chunks in the file")
    complete_size: int = Field(ge=0, description="ciphertext bytes up to the end of the last complete chunk")
    sha256_complete: str = Field(pattern=HEX64)
    fragments: int = Field(ge=0)
    first_pts_us: int | None = None
    last_pts_us: int | None = None
    video_frames: int = Field(ge=0)
    audio_samples: int = Field(ge=0)
    recipients: list[str]
    truncated: bool
    recovered: bool
    sidecars: list[Sidecar] = []

    @model_validator(mode="after")
    def _names_follow_the_segment_id(self) -> Segment:
        if self.file != segment_file_name(self.segment_id):
            raise ValueError(f"file {self.file!r} must be the segment id plus .age "
                             f"({segment_file_name(self.segment_id)!r})")
        kinds = [s.kind for s in self.sidecars]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"at most one sidecar of each kind, got {kinds}")
        for sidecar in self.sidecars:
            if sidecar.file != sidecar_file_name(self.segment_id, sidecar.kind):
                raise ValueError(f"sidecar file {sidecar.file!r} must be "
                                 f"{sidecar_file_name(self.segment_id, sidecar.kind)!r}")
        return self


class Dock(_Body):
    dock_id: str | None = None
    event: Literal["docked", "undocked", "undock_intent"]


class Receipt(_Body):
    segment_id: str | None = None
    ledger_upto_seq: int | None = None
    receipt_sha256: str = Field(pattern=HEX64)
    bureau_key_id: str


class Purge(_Body):
    segment_id: str = Field(pattern=ID)
    file: str = Field(pattern=SEGMENT_FILE)
    sha256_cipher: str = Field(pattern=HEX64)
    receipt_sha256: str = Field(pattern=HEX64)
    reason: Literal["space_needed", "bureau_request", "decommission"]

    @model_validator(mode="after")
    def _file_follows_the_segment_id(self) -> Purge:
        if self.file != segment_file_name(self.segment_id):
            raise ValueError(f"file {self.file!r} must be the segment id plus .age "
                             f"({segment_file_name(self.segment_id)!r})")
        return self


class Alarm(_Body):
    code: str
    severity: Literal["info", "warning", "critical"]
    detail: str = ""
    cleared: bool = False


class Fault(_Body):
    component: Literal["camera", "encoder", "microphone", "speaker", "storage", "gps", "dock", "battery",
                       "thermal", "clock", "queue", "other"]
    code: str
    detail: str = ""
    session_id: str | None = None


class LensCovered(_Body):
    session_id: str | None = None
    event: Literal["start", "end"]
    at_us: int


class ComplianceReport(_Body):
    session_id: str = SessionId
    compliant: bool
    findings: list[str]
    report: dict[str, Any]


BODY_SCHEMAS: dict[str, type[_Body]] = {
    "device_init": DeviceInit,
    "boot": Boot,
    "shutdown": Shutdown,
    "recovery": Recovery,
    "config_change": ConfigChange,
    "key_change": KeyChange,
    "clock_sync": ClockSync,
    "session_open": SessionOpen,
    "session_context": SessionContext,
    "session_close": SessionClose,
    "prompt": Prompt,
    "statement": Statement,
    "marker": Marker,
    "interruption_start": InterruptionStart,
    "interruption_end": InterruptionEnd,
    "policy_flag": PolicyFlag,
    "segment": Segment,
    "dock": Dock,
    "receipt": Receipt,
    "purge": Purge,
    "alarm": Alarm,
    "fault": Fault,
    "lens_covered": LensCovered,
    "compliance_report": ComplianceReport,
}


class ClockQuality(StrEnum):
    SYNCED = "synced"  # offset to the bureau measured at the last dock and within tolerance
    FREE_RUNNING = "free_running"  # was set once, not synced recently
    UNSET = "unset"  # never set: wall times are not trustworthy


def _short(value: Any, limit: int = 60) -> str:
    """repr() of a value from an untrusted record, cut to a length fit for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validate_body(rtype: Any, body: Any) -> dict[str, Any]:
    """Check `body` against its type's schema and return it in its canonical dict form.

    Raises RecordError (never anything else) for any input: an unknown or non-string type, a body that
    is not an object, or one that does not match the schema."""
    model = BODY_SCHEMAS.get(rtype) if isinstance(rtype, str) else None
    if model is None:
        raise RecordError(f"unknown record type {_short(rtype)}")
    if not isinstance(body, dict):
        raise RecordError(f"{rtype} body must be an object, got {type(body).__name__}")
    try:
        parsed = model.model_validate_json(canonical_bytes(body))
    except CanonicalJSONError as exc:
        raise RecordError(f"{rtype} body: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}"
                             for e in exc.errors(include_url=False, include_input=False)[:5])
        raise RecordError(f"{rtype} body invalid: {problems}") from None
    return parsed.model_dump(mode="json")


@dataclass(frozen=True)
class SignedRecord:
    """A record as stored: its canonical bytes and the DER signature over them."""

    data: bytes
    sig: bytes

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def fields(self) -> dict[str, Any]:
        return parse_canonical(self.data)

    def to_line(self) -> bytes:
        """One JSON Lines line of the export: {"rec":<record>,"sig":"<base64 DER>"}."""
        return b'{"rec":' + self.data + b',"sig":"' + base64.b64encode(self.sig) + b'"}\n'

    @classmethod
    def from_line(cls, line: bytes) -> SignedRecord:
        try:
            obj = parse_canonical(line.rstrip(b"\n"))
        except CanonicalJSONError as exc:
            raise RecordError(f"export line is not canonical JSON: {exc}") from None
        if not isinstance(obj, dict) or set(obj) != {"rec", "sig"} or not isinstance(obj["sig"], str):
            raise RecordError('export line must be {"rec":...,"sig":"..."}')
        try:
            sig = base64.b64decode(obj["sig"], validate=True)
        except ValueError:
            raise RecordError("signature is not base64") from None
        return cls(canonical_bytes(obj["rec"]), sig)


ENVELOPE_KEYS = {"v", "device", "seq", "prev", "type", "wall_us", "mono_us", "clock", "body"}


def build_record(*, device: str, seq: int, prev: str, rtype: str, wall_us: int, mono_us: int,
                 clock: dict[str, Any], body: dict[str, Any]) -> bytes:
    """Canonical bytes of a new record (validated). The caller signs them."""
    rec = {
        "v": SCHEMA_VERSION,
        "device": device,
        "seq": seq,
        "prev": prev,
        "type": rtype,
        "wall_us": wall_us,
        "mono_us": mono_us,
        "clock": clock,
        "body": validate_body(rtype, body),
    }
    check_envelope(rec)
    return canonical_bytes(rec)


def check_envelope(rec: Any) -> None:
    """Raise RecordError unless `rec` has exactly the envelope fields, each of its type (docs/FORMAT.md §5).

    Any JSON value may be passed: the only exception raised is RecordError. A JSON boolean is never an
    integer here (`"v":true` is not version 1)."""
    if not isinstance(rec, dict) or set(rec) != ENVELOPE_KEYS:
        got = sorted(map(str, rec)) if isinstance(rec, dict) else type(rec).__name__
        raise RecordError(f"record envelope must have keys {sorted(ENVELOPE_KEYS)}, got {got}")
    if type(rec["v"]) is not int or rec["v"] != SCHEMA_VERSION:
        raise RecordError(f"v must be the integer {SCHEMA_VERSION}, got {_short(rec['v'])}")
    for key in ("device", "type"):
        if not isinstance(rec[key], str):
            raise RecordError(f"{key} must be a string, got {_short(rec[key])}")
    for key in ("seq", "wall_us", "mono_us"):
        if type(rec[key]) is not int:
            raise RecordError(f"{key} must be an integer, got {_short(rec[key])}")
    if rec["seq"] < 1:
        raise RecordError(f"seq starts at 1, got {rec['seq']}")
    if not isinstance(rec["prev"], str) or not _HEX64_RE.fullmatch(rec["prev"]):
        raise RecordError(f"prev must be 64 lowercase hex digits, got {_short(rec['prev'])}")
    clock = rec["clock"]
    if (not isinstance(clock, dict) or set(clock) != {"source", "quality"} or not isinstance(clock["source"], str)
            or not isinstance(clock["quality"], str) or clock["quality"] not in _CLOCK_QUALITIES):
        raise RecordError("clock must be {source: string, quality: synced/free_running/unset}, got "
                          f"{_short(clock)}")
    if not isinstance(rec["body"], dict):
        raise RecordError(f"body must be an object, got {type(rec['body']).__name__}")


_HEX64_RE = re.compile(r"[0-9a-f]{64}")
_CLOCK_QUALITIES = frozenset(q.value for q in ClockQuality)
