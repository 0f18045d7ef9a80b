"""Simulated MAX17048 fuel gauge behind smbus2's SMBus API, with a scriptable battery.

`SimBattery` drains linearly with simulated time (or is set directly), can be swapped for a full one, can
charge, and can be made to fail I2C reads. `FakeSMBus(battery)` answers `read_i2c_block_data` for the
gauge's address like the real chip (big-endian registers).
"""

from __future__ import annotations

import errno
import threading

from agent.monitors import MAX17048_SOC, MAX17048_VCELL, MAX17048_VERSION


class SimBattery:
    def __init__(self, percent: float = 100.0, drain_percent_per_hour: float = 12.0):
        self._lock = threading.Lock()
        self.percent = percent
        self.drain_percent_per_hour = drain_percent_per_hour
        self.charging = False
        self.i2c_fault = False

    def advance(self, seconds: float) -> None:
        with self._lock:
            rate = -self.drain_percent_per_hour if not self.charging else 40.0
            self.percent = max(0.0, min(100.0, self.percent + rate * seconds / 3600))

    def set(self, percent: float) -> None:
        with self._lock:
            self.percent = percent

    def swap(self) -> None:
        """A technician or officer puts in a charged battery."""
        self.set(100.0)

    def millivolts(self) -> int:
        return int(3300 + 9 * self.percent)  # 3.3 V empty .. 4.2 V full, close enough for a gauge


class FakeSMBus:
    def __init__(self, battery: SimBattery, address: int = 0x36):
        self.battery = battery
        self.address = address

    def read_i2c_block_data(self, address: int, register: int, length: int) -> list[int]:
        if address != self.address or self.battery.i2c_fault:
            raise OSError(errno.EREMOTEIO, "Remote I/O error")
        if register == MAX17048_SOC:
            value = int(round(self.battery.percent * 256))
        elif register == MAX17048_VCELL:
            value = self.battery.millivolts() * 1000 * 1000 // 78125
        elif register == MAX17048_VERSION:
            value = 0x0012
        else:
            value = 0
        return [(value >> 8) & 0xFF, value & 0xFF][:length]

    def close(self) -> None:
        pass


class FakeSMBusModule:
    """Stands in for the `smbus2` module: `FakeSMBusModule(battery).SMBus(1)`."""

    def __init__(self, battery: SimBattery):
        self.battery = battery

    def SMBus(self, bus: int) -> FakeSMBus:  # noqa: N802 - mirrors smbus2's class name
        return FakeSMBus(self.battery)
