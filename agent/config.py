"""Agent configuration: TOML at /etc/bwc-agent/agent.toml, validated at start.

Every key is declared with its type, default and bounds; an unknown key (a typo) is an error, not a silent
default. `load_config` raises ConfigError whose message names the key, the value and the rule broken.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.policy import PolicyError, stage

DEFAULT_PATH = Path("/etc/bwc-agent/agent.toml")


class ConfigError(ValueError):
    """The configuration file is unreadable or a key is invalid (the message names which and why)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeviceConfig(_Section):
    id: str = Field("BWC-UNPROVISIONED", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$",
                    description="device id, also the certificate CN and the MQTT topic segment")
    officer_id: str | None = Field(None, max_length=64, description="officer bound to sessions by default")
    data_dir: Path = Field(Path("/var/lib/bwc-agent"), description="ledger, segments, keys")
    language: Literal["zh-CN", "en"] = Field("zh-CN", description="voice prompt language")


class KeysConfig(_Section):
    identity_key: Path = Field(Path("/var/lib/bwc-agent/keys/device-key.pem"), description="ES256 key (0600)")
    recipients: list[str] = Field(default_factory=list, description="bureau age recipients (age1...)")
    receipt_key: Path | None = Field(None, description="bureau receipt public key (PEM), pinned")
    ca_cert: Path | None = None
    device_cert: Path | None = None

    @field_validator("recipients")
    @classmethod
    def _recipients_are_age_keys(cls, value: list[str]) -> list[str]:
        from agent.evidence.age import AgeError, Recipient

        for r in value:
            try:
                Recipient.parse(r)
            except AgeError as exc:
                raise ValueError(f"{r!r} is not an age X25519 recipient ({exc})") from None
        return value


class RecordingConfig(_Section):
    pre_event_s: int = Field(30, ge=0, le=120, description="seconds of footage kept before a start press")
    pre_event_audio: bool = True
    segment_s: int = Field(60, ge=2, le=600, description="target segment length; split only at a keyframe")
    bitrate_bps: int = Field(8_000_000, ge=250_000, le=25_000_000)
    width: int = Field(1920, ge=160, le=3840)
    height: int = Field(1080, ge=120, le=2160)
    fps: int = Field(30, ge=5, le=60)
    reminder_interval_s: int = Field(120, ge=0, le=3600, description="tone/vibration while recording; 0 = off")
    queue_packets: int = Field(600, ge=30, le=10_000, description="encoder-to-writer queue bound")


class SessionConfig(_Section):
    category: str | None = Field(None, description="default Annex category (penalty/compulsion/inspection)")
    stage: str | None = Field(None, description="default Annex stage code")
    double_press_s: float = Field(0.6, ge=0.2, le=1.5, description="max gap between the two presses of a start")
    stop_hold_s: float = Field(3.0, ge=1.0, le=10.0, description="RECORD hold that stops a session")
    confirm_window_s: float = Field(10.0, ge=3.0, le=60.0, description="time to confirm a mandatory-stage stop")
    menu_timeout_s: float = Field(8.0, ge=3.0, le=30.0)
    debounce_ms: int = Field(50, ge=5, le=300)
    play_notice_aloud: bool = Field(False, description="device plays the notice to the party itself")

    @model_validator(mode="after")
    def _stage_exists(self) -> SessionConfig:
        try:
            stage(self.category, self.stage)
        except PolicyError as exc:
            raise ValueError(str(exc)) from None
        return self


class StatementConfig(_Section):
    reminder_after_s: float = Field(20.0, ge=3.0, le=300.0, description="no speech this long -> reminder")
    missing_after_s: float = Field(40.0, ge=5.0, le=600.0, description="still none -> statement_missing")
    min_speech_s: float = Field(1.5, ge=0.3, le=10.0, description="shortest speech that counts as a statement")

    @model_validator(mode="after")
    def _order(self) -> StatementConfig:
        if self.missing_after_s <= self.reminder_after_s:
            raise ValueError(f"missing_after_s ({self.missing_after_s}) must exceed reminder_after_s "
                             f"({self.reminder_after_s})")
        return self


class PowerConfig(_Section):
    warn_percent: list[int] = Field([20, 10], description="battery warnings, descending")
    low_percent: int = Field(5, ge=1, le=50, description="interrupt recording (low_battery) below this")
    critical_percent: int = Field(2, ge=0, le=20, description="finalise, sign and power off below this")

    @model_validator(mode="after")
    def _order(self) -> PowerConfig:
        if not self.critical_percent < self.low_percent:
            raise ValueError(f"critical_percent ({self.critical_percent}) must be below low_percent "
                             f"({self.low_percent})")
        if any(not (self.low_percent < w <= 100) for w in self.warn_percent):
            raise ValueError(f"warn_percent {self.warn_percent} must lie between low_percent and 100")
        return self


class StorageConfig(_Section):
    min_minutes_left: float = Field(5.0, ge=0.5, le=120.0, description="below this, interrupt (storage_full)")
    warn_minutes_left: float = Field(30.0, ge=1.0, le=600.0)


class ThermalConfig(_Section):
    max_cpu_c: float = Field(85.0, ge=50.0, le=110.0, description="over this, interrupt (device_fault)")
    resume_cpu_c: float = Field(75.0, ge=40.0, le=100.0)
    sysfs_path: Path = Path("/sys/class/thermal/thermal_zone0/temp")


class LensConfig(_Section):
    covered_s: float = Field(10.0, ge=1.0, le=600.0, description="dark, flat frames this long -> obstruction")


class SyncConfig(_Section):
    bureau_url: str | None = Field(None, pattern=r"^https://", description="bureau HTTPS base URL")
    mqtt_host: str | None = None
    mqtt_port: int = Field(8883, ge=1, le=65535)
    telemetry_period_s: float = Field(30.0, ge=2.0, le=600.0, description="MQTT telemetry and event cadence")
    dock_port: str | None = Field(None, description="dock serial line, e.g. /dev/bwc-dock")
    gps_port: str | None = Field(None, description="GPS serial line, e.g. /dev/bwc-gps")
    day_end_local: str = Field("23:59", pattern=r"^([01]\d|2[0-3]):[0-5]\d$", description="R20 same-day deadline")
    remote_grace_h: int = Field(24, ge=1, le=72, description="R20: hours after return for remote days")
    remote_day: bool = Field(False, description="R20: a remote/out-of-town day: the deadline is remote_grace_h "
                                                "after the first dock that follows the recording")


class HardwareConfig(_Section):
    camera: Literal["picamera2", "opencv", "sim"] = "picamera2"
    opencv_device: int = Field(0, ge=0, le=16)
    audio: Literal["pyaudio", "sim", "none"] = "pyaudio"
    buttons: Literal["gpio", "sim"] = "gpio"
    record_button_pin: int = Field(17, ge=0, le=40)
    mark_button_pin: int = Field(27, ge=0, le=40)
    vibration_pin: int | None = Field(22, ge=0, le=40, description="vibration motor driver; none = no motor")
    fuel_gauge_bus: int = Field(1, ge=0, le=10)
    fuel_gauge_address: int = Field(0x36, ge=0x03, le=0x77)
    power_off_command: list[str] = Field(["systemctl", "poweroff"], description="run after a critical-battery close")


class AgentConfig(_Section):
    device: DeviceConfig = DeviceConfig()
    keys: KeysConfig = KeysConfig()
    recording: RecordingConfig = RecordingConfig()
    session: SessionConfig = SessionConfig()
    statements: StatementConfig = StatementConfig()
    power: PowerConfig = PowerConfig()
    storage: StorageConfig = StorageConfig()
    thermal: ThermalConfig = ThermalConfig()
    lens: LensConfig = LensConfig()
    sync: SyncConfig = SyncConfig()
    hardware: HardwareConfig = HardwareConfig()


def _describe(err: dict[str, Any], source: str) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}' (typo? not a setting of this agent)"
    value = err.get("input")
    return f"{source}: key '{key}' = {value!r}: {err['msg']}"


def parse_config(data: dict[str, Any], source: str = "<config>") -> AgentConfig:
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("\n".join(_describe(e, source) for e in exc.errors(include_url=False))) from None


def load_config(path: Path = DEFAULT_PATH) -> AgentConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, str(path))
