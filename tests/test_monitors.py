"""Battery, thermal and storage readings reach the state machine; a broken sensor is a logged fault (R17)."""

from __future__ import annotations

import pytest

from agent import events as ev
from agent.monitors import FuelGauge, HealthMonitor, SensorError, Thermal
from hw_sim.battery import FakeSMBusModule, SimBattery
from hw_sim.thermal import SimThermal


def test_fuel_gauge_reads_state_of_charge_like_a_max17048():
    battery = SimBattery(73.5)
    gauge = FuelGauge.open(1, smbus_module=FakeSMBusModule(battery))
    assert gauge.percent() == pytest.approx(73.5, abs=0.01)
    assert 3900 < gauge.millivolts() < 4000
    battery.advance(3600)
    assert gauge.percent() == pytest.approx(61.5, abs=0.01)


def test_i2c_failure_is_a_sensor_error_naming_the_address():
    battery = SimBattery()
    battery.i2c_fault = True
    with pytest.raises(SensorError, match="0x36"):
        FuelGauge.open(1, smbus_module=FakeSMBusModule(battery)).percent()


def test_thermal_reads_sysfs_and_rejects_garbage(tmp_path):
    sim = SimThermal(tmp_path / "temp", 61.2)
    thermal = Thermal(sim.path)
    assert thermal.celsius() == pytest.approx(61.2)
    sim.write_garbage()
    with pytest.raises(SensorError, match="not a millidegree"):
        thermal.celsius()


def test_monitor_posts_readings_and_reports_a_failing_sensor_once(tmp_path):
    battery, sim = SimBattery(50), SimThermal(tmp_path / "temp", 50)
    posted: list = []
    mon = HealthMonitor(posted.append, FuelGauge.open(1, smbus_module=FakeSMBusModule(battery)),
                        Thermal(sim.path), lambda: (120.0, 30.0))
    mon.sample()
    assert posted == [ev.BatteryReading(50), ev.ThermalReading(50.0), ev.StorageReading(120.0, 30.0)]
    posted.clear()
    battery.i2c_fault = True
    mon.sample()
    mon.sample()
    faults = [e for e in posted if isinstance(e, ev.PipelineFault)]
    assert len(faults) == 1 and faults[0].component == "battery"
    battery.i2c_fault = False
    posted.clear()
    mon.sample()
    assert ev.BatteryReading(50) in posted
