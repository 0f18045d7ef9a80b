"""The press grammar: deliberate gestures start and stop, accidental ones never change state (issue 4)."""

from __future__ import annotations

import time

import pytest

from agent import events as ev
from agent.clock import SystemClock
from agent.config import SessionConfig
from agent.controls import MARK, MENU_ITEMS, RECORD, GpioControls, PressGrammar, menu_prompt
from agent.evidence.records import InterruptionReason

MS = 1000


class Harness:
    def __init__(self, **cfg):
        self.events: list = []
        self.spoken: list[str] = []
        self.g = PressGrammar(SessionConfig(**cfg), self.events.append, self.spoken.append)
        self.t = 0

    def press(self, name, ms=150, gap_after=100):
        self.g.edge(name, True, self.t)
        self.advance(ms)
        self.g.edge(name, False, self.t)
        self.advance(gap_after)

    def advance(self, ms):
        end = self.t + ms * MS
        while self.t < end:
            self.t = min(end, self.t + 20 * MS)
            self.g.poll(self.t)

    def kinds(self):
        return [type(e).__name__ for e in self.events]


def test_double_press_starts():
    h = Harness()
    h.press(RECORD, gap_after=200)
    h.press(RECORD)
    assert h.kinds() == ["StartPressed"]


def test_single_press_and_slow_double_press_do_nothing():
    h = Harness()
    h.press(RECORD, gap_after=2000)
    h.press(RECORD, gap_after=700)
    h.press(RECORD, gap_after=2000)
    assert h.events == []


def test_contact_bounce_is_not_a_second_press():
    h = Harness()
    # one physical press that chatters: down/up/down within a few ms, then a clean release
    h.g.edge(RECORD, True, h.t)
    h.g.edge(RECORD, False, h.t + 3 * MS)
    h.g.edge(RECORD, True, h.t + 6 * MS)
    h.advance(150)
    h.g.edge(RECORD, False, h.t)
    h.advance(1000)
    assert h.events == [] and h.g.bounces >= 2


def test_hold_stops_once_and_short_holds_do_not():
    h = Harness()
    h.press(RECORD, ms=2500, gap_after=1000)
    assert h.events == []
    h.press(RECORD, ms=6000)
    assert h.kinds() == ["StopHeld"]


def test_both_buttons_together_change_nothing():
    h = Harness()
    h.g.edge(RECORD, True, h.t)
    h.advance(30)
    h.g.edge(MARK, True, h.t)
    h.advance(5000)  # long enough for a stop hold and a menu hold
    h.g.edge(RECORD, False, h.t)
    h.g.edge(MARK, False, h.t + 60 * MS)
    h.advance(1000)
    assert h.events == [] and h.spoken == []


def test_mark_short_press_marks():
    h = Harness()
    h.press(MARK)
    assert h.kinds() == ["MarkPressed"]


def test_menu_declares_an_interruption_reason_by_voice():
    h = Harness()
    h.press(MARK, ms=2200)
    assert h.spoken[:2] == ["menu_mark_step", menu_prompt(*MENU_ITEMS[0])]
    target = MENU_ITEMS.index(("interruption", "severe_weather"))
    for _ in range(target):
        h.press(MARK)
    h.press(RECORD)
    assert h.events == [ev.InterruptionDeclared(InterruptionReason.SEVERE_WEATHER, "declared from the voice menu")]


def test_menu_marks_an_r9_step_and_times_out():
    h = Harness()
    h.press(MARK, ms=2200)
    h.press(MARK)
    h.press(RECORD)
    assert h.events == [ev.MarkerSelected(MENU_ITEMS[1][1])]
    h.press(MARK, ms=2200)
    h.advance(9000)
    assert h.spoken[-1] == "menu_cancelled"
    h.press(RECORD)  # after the timeout a RECORD tap is just a (harmless) single press
    assert len(h.events) == 1


def test_gpiozero_buttons_drive_the_grammar():
    from gpiozero.pins.mock import MockFactory

    factory = MockFactory()
    got: list = []
    controls = GpioControls(SessionConfig(stop_hold_s=1.0), 17, 27, SystemClock(), got.append, lambda _: None,
                            pin_factory=factory)
    try:
        pin = factory.pin(17)
        for _ in range(2):
            pin.drive_low()
            time.sleep(0.1)
            pin.drive_high()
            time.sleep(0.1)
        pin.drive_low()
        deadline = time.monotonic() + 3
        while len(got) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        pin.drive_high()
    finally:
        controls.close()
    assert [type(e).__name__ for e in got] == ["StartPressed", "StopHeld"]


@pytest.mark.parametrize("step", ["show_id", "questioning", "sampling"])
def test_menu_items_cover_r9_steps(step):
    assert ("marker", step) in MENU_ITEMS


def test_every_menu_prompt_exists_in_the_catalogue():
    from agent.voice_prompts.catalogue import prompt

    for kind, value in MENU_ITEMS:
        prompt(menu_prompt(kind, value))
    for pid in ("menu_mark_step", "menu_declare_interruption", "menu_cancelled"):
        prompt(pid)


def test_a_burst_of_chatter_shorter_than_the_debounce_leaves_no_button_stuck():
    h = Harness()
    for i in range(6):  # down/up/down/up/down/up, 2 ms apart: ends released
        h.g.edge(RECORD, i % 2 == 0, h.t + i * 2 * MS)
    h.advance(5000)
    assert h.events == [] and not h.g.buttons[RECORD].down
    h.press(RECORD, gap_after=200)
    h.press(RECORD)
    assert h.kinds() == ["StartPressed"]  # the next deliberate double press still works


def test_vibration_patterns_drive_the_motor_pin():
    from gpiozero.pins.mock import MockFactory

    from agent.controls import Haptics

    factory = MockFactory()
    haptics = Haptics(22, pin_factory=factory)
    pin = factory.pin(22)
    try:
        haptics.vibrate("stop")  # three short pulses
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and sum(1 for s in pin.states if s.state) < 3:
            time.sleep(0.05)
        time.sleep(0.2)
        assert sum(1 for s in pin.states if s.state) == 3 and not pin.state
        haptics.vibrate("no_such_pattern")
        assert haptics.played == ["stop"]
    finally:
        haptics.close()
