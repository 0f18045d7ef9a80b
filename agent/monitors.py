"""Hardware health: battery fuel gauge (I2C), CPU temperature (sysfs), free storage vs bitrate.

Thread: `HealthMonitor` runs its own thread, reads each sensor every `interval_s`, and posts readings
(agent.events) to the state machine, which alone decides what they mean. A sensor that fails to read is
reported once per episode as a fault event and retried; it never stops the thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent import events as ev

log = logging.getLogger(__name__)

MAX17048_VCELL = 0x02  # 78.125 uV per LSB
MAX17048_SOC = 0x04  # high byte: percent; low byte: 1/256 percent
MAX17048_VERSION = 0x08


class SensorError(RuntimeError):
    """A sensor could not be read (I2C error, missing sysfs file, nonsense value)."""


class FuelGauge:
    """A MAX17048-class fuel gauge on I2C through smbus2 (or hw_sim's fake SMBus with the same API)."""

    def __init__(self, bus: Any, address: int = 0x36):
        self.bus = bus
        self.address = address

    @classmethod
    def open(cls, bus_number: int, address: int = 0x36, smbus_module: Any = None) -> FuelGauge:
        if smbus_module is None:
            import smbus2 as smbus_module  # only on the device
        return cls(smbus_module.SMBus(bus_number), address)

    def _word(self, register: int) -> int:
        try:
            hi, lo = self.bus.read_i2c_block_data(self.address, register, 2)
        except OSError as exc:
            raise SensorError(f"fuel gauge at 0x{self.address:02x}: I2C read of register 0x{register:02x} "
                              f"failed: {exc}") from exc
        return (hi << 8) | lo

    def percent(self) -> float:
        soc = self._word(MAX17048_SOC) / 256.0
        if not 0.0 <= soc <= 110.0:  # the gauge may report a little over 100 % right after charge
            raise SensorError(f"fuel gauge state of charge {soc:.1f}% is out of range")
        return min(soc, 100.0)

    def millivolts(self) -> int:
        return self._word(MAX17048_VCELL) * 78125 // 1_000_000

    def version(self) -> int:
        return self._word(MAX17048_VERSION)


class Thermal:
    """CPU temperature from sysfs (millidegrees Celsius as text)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def celsius(self) -> float:
        try:
            raw = self.path.read_text().strip()
        except OSError as exc:
            raise SensorError(f"{self.path}: cannot read temperature: {exc.strerror}") from exc
        try:
            return int(raw) / 1000.0
        except ValueError:
            raise SensorError(f"{self.path}: {raw!r} is not a millidegree value") from None


class HealthMonitor:
    def __init__(self, post: Callable[[ev.Event], Any], gauge: FuelGauge | None, thermal: Thermal | None,
                 space: Callable[[], tuple[float, float]] | None, interval_s: float = 5.0):
        self.post = post
        self.gauge = gauge
        self.thermal = thermal
        self.space = space  # () -> (minutes_left, purgeable_minutes)
        self.interval_s = interval_s
        self.failing: set[str] = set()
        self.last: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _read(self, name: str, component: str, read: Callable[[], ev.Event]) -> None:
        try:
            event = read()
        except SensorError as exc:
            if name not in self.failing:
                self.failing.add(name)
                log.error("%s", exc)
                self.post(ev.PipelineFault(component, f"{name}_unreadable", str(exc)))
            return
        self.failing.discard(name)
        self.post(event)

    def sample(self) -> None:
        """Read every sensor once and post the readings."""
        if self.gauge is not None:
            self._read("fuel_gauge", "battery", lambda: ev.BatteryReading(int(self.gauge.percent())))
        if self.thermal is not None:
            self._read("thermal", "thermal", lambda: ev.ThermalReading(self.thermal.celsius()))
        if self.space is not None:
            minutes, purgeable = self.space()
            self.last["minutes_left"] = minutes
            self.post(ev.StorageReading(minutes, purgeable))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception:
                log.exception("health sampling failed")
            self._stop.wait(self.interval_s)
