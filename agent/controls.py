"""The officer's buttons (RECORD and MARK) and the press grammar that turns edges into intentions.

Grammar (docs/OPERATIONS.md, "Buttons"), chosen so nothing starts or stops by accident:
- RECORD double press (two short presses, the second within `double_press_s`): start a session, or resume
  after an interruption the officer declared. A single press does nothing.
- RECORD held `stop_hold_s` (3 s): stop. In a full-process stage the first hold is refused and a second hold
  within the confirmation window stops (the state machine decides that, not the buttons).
- MARK short press: confirm the statement being waited for, else a general marker.
- MARK held 2 s: voice menu. Each short MARK press speaks the next item; a short RECORD press selects it;
  no press for `menu_timeout_s` closes the menu. Items: the R9 steps to mark, then the R17 interruption
  reasons to declare.
- Both buttons down at once: ignored (a pocket or a grip); whatever was pending is cancelled.
Edges closer than `debounce_ms` to the previous edge of the same button are contact bounce and dropped.

Threads: gpiozero calls `GpioControls` edge callbacks on its own thread; `poll()` runs on the controls
thread every 50 ms; both go through a lock into the pure `PressGrammar`. Intentions leave through `emit`
(the session runner's `post`, which never blocks).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from agent import events as ev
from agent.clock import Clock
from agent.config import SessionConfig
from agent.evidence.records import InterruptionReason
from agent.policy import MARKER_STEPS

US = 1_000_000
SHORT_PRESS_US = 800_000
MENU_HOLD_US = 2 * US
RECORD, MARK = "record", "mark"

MENU_ITEMS: list[tuple[str, str]] = [("marker", step) for step in MARKER_STEPS if step != "general"] + [
    ("interruption", r.value) for r in (InterruptionReason.SEVERE_WEATHER, InterruptionReason.OBSTRUCTION,
                                        InterruptionReason.DEVICE_DAMAGE, InterruptionReason.OTHER)]


def menu_prompt(kind: str, value: str) -> str:
    """The voice prompt id that reads out a menu item (agent/voice_prompts/catalogue.py)."""
    return f"menu_step_{value}" if kind == "marker" else f"menu_reason_{value}"


@dataclass
class _Button:
    down: bool = False  # the debounced state
    down_at: int = 0
    level: bool = False  # the raw contact, as the last edge left it
    level_at: int = -(10**12)
    hold_fired: bool = False
    spoiled: bool = False  # pressed together with the other button


class PressGrammar:
    """Pure: feed edges and time, get intentions (agent.events) and menu speech back through callbacks."""

    def __init__(self, cfg: SessionConfig, emit: Callable[[ev.Event], None], speak: Callable[[str], None]):
        self.cfg = cfg
        self.emit = emit
        self.speak = speak
        self.buttons = {RECORD: _Button(), MARK: _Button()}
        self.first_tap_at: int | None = None
        self.menu_index: int | None = None
        self.menu_last_us = 0
        self.bounces = 0

    def edge(self, name: str, pressed: bool, t_us: int) -> None:
        """A raw contact change. It counts only once the contact has stayed put for `debounce_ms`
        (`settle`, called from `poll`), so a burst of chatter is one change or none, never a stuck button."""
        b = self.buttons[name]
        if t_us - b.level_at < self.cfg.debounce_ms * 1000:
            self.bounces += 1
        b.level, b.level_at = pressed, t_us

    def _settle(self, t_us: int) -> None:
        for name, b in self.buttons.items():
            if b.level != b.down and t_us - b.level_at >= self.cfg.debounce_ms * 1000:
                self._accept(name, b.level, b.level_at)

    def _accept(self, name: str, pressed: bool, t_us: int) -> None:
        b = self.buttons[name]
        other = self.buttons[MARK if name == RECORD else RECORD]
        if pressed:
            b.down, b.down_at, b.hold_fired, b.spoiled = True, t_us, False, other.down
            if other.down:
                other.spoiled = True
                self.first_tap_at = None
            return
        b.down = False
        if b.spoiled or b.hold_fired or t_us - b.down_at > SHORT_PRESS_US:
            return
        self._short_press(name, t_us)

    def _short_press(self, name: str, t_us: int) -> None:
        if self.menu_index is not None:
            self.menu_last_us = t_us
            if name == MARK:
                self.menu_index = (self.menu_index + 1) % len(MENU_ITEMS)
                self._speak_item()
            else:
                kind, value = MENU_ITEMS[self.menu_index]
                self.menu_index = None
                self.emit(ev.MarkerSelected(value) if kind == "marker"
                          else ev.InterruptionDeclared(InterruptionReason(value), "declared from the voice menu"))
            return
        if name == MARK:
            self.emit(ev.MarkPressed())
        elif self.first_tap_at is not None and t_us - self.first_tap_at <= self.cfg.double_press_s * US:
            self.first_tap_at = None
            self.emit(ev.StartPressed())
        else:
            self.first_tap_at = t_us

    def _speak_item(self) -> None:
        kind, value = MENU_ITEMS[self.menu_index]
        if kind == "interruption" and MENU_ITEMS[self.menu_index - 1][0] != "interruption":
            self.speak("menu_declare_interruption")  # entering the second part of the menu
        self.speak(menu_prompt(kind, value))

    def poll(self, t_us: int) -> None:
        self._settle(t_us)
        rec, mark = self.buttons[RECORD], self.buttons[MARK]
        if rec.down and not rec.spoiled and not rec.hold_fired and t_us - rec.down_at >= self.cfg.stop_hold_s * US:
            rec.hold_fired = True
            self.first_tap_at = None
            self.menu_index = None
            self.emit(ev.StopHeld())
        if mark.down and not mark.spoiled and not mark.hold_fired and t_us - mark.down_at >= MENU_HOLD_US:
            mark.hold_fired = True
            self.menu_index, self.menu_last_us = 0, t_us
            self.speak("menu_mark_step")
            self._speak_item()
        if self.menu_index is not None and t_us - self.menu_last_us > self.cfg.menu_timeout_s * US:
            self.menu_index = None
            self.speak("menu_cancelled")
        if self.first_tap_at is not None and t_us - self.first_tap_at > self.cfg.double_press_s * US:
            self.first_tap_at = None  # a lone single press: deliberately nothing


class GpioControls:
    """Binds gpiozero buttons to a PressGrammar. Pass `pin_factory` (e.g. gpiozero's MockFactory) in tests."""

    def __init__(self, cfg: SessionConfig, record_pin: int, mark_pin: int, clock: Clock,
                 emit: Callable[[ev.Event], None], speak: Callable[[str], None], pin_factory=None,
                 poll_s: float = 0.05):
        from gpiozero import Button  # imported here so the agent runs where gpiozero is absent (bureau, CI)

        self.clock = clock
        self.grammar = PressGrammar(cfg, emit, speak)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._poll_s = poll_s
        # bounce_time=None: debouncing is ours, in PressGrammar, where tests can see it.
        self.buttons = {name: Button(pin, pull_up=True, bounce_time=None, pin_factory=pin_factory)
                        for name, pin in ((RECORD, record_pin), (MARK, mark_pin))}
        for name, button in self.buttons.items():
            button.when_pressed = lambda n=name: self._edge(n, True)
            button.when_released = lambda n=name: self._edge(n, False)
        self._thread = threading.Thread(target=self._run, name="controls", daemon=True)
        self._thread.start()

    def _edge(self, name: str, pressed: bool) -> None:
        with self._lock:
            self.grammar.edge(name, pressed, self.clock.mono_us())

    def _run(self) -> None:
        while not self._stop.wait(self._poll_s):
            with self._lock:
                self.grammar.poll(self.clock.mono_us())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        for b in self.buttons.values():
            b.close()


# Vibration patterns: (on ms, off ms) pulses. Distinct enough to tell apart through a uniform pocket.
PATTERNS: dict[str, tuple[tuple[int, int], ...]] = {
    "start": ((400, 0),),
    "stop": ((150, 150), (150, 150), (150, 0)),
    "mark": ((80, 0),),
    "interrupt": ((600, 200), (600, 0)),
    "reminder": ((100, 100), (100, 0)),
}


class Haptics:
    """The vibration motor on a GPIO pin (gpiozero). `vibrate(pattern)` returns at once; a pulse train runs
    on gpiozero's background thread and a new pattern replaces the one still running."""

    def __init__(self, pin: int, pin_factory=None):
        from gpiozero import DigitalOutputDevice

        self.motor = DigitalOutputDevice(pin, pin_factory=pin_factory)
        self.played: list[str] = []

    def __call__(self, pattern: str) -> None:
        self.vibrate(pattern)

    def vibrate(self, pattern: str) -> None:
        pulses = PATTERNS.get(pattern)
        if pulses is None:
            return
        self.played.append(pattern)
        on_ms, off_ms = pulses[0]
        # gpiozero's blink runs its own thread: n pulses of the first shape (every pattern is uniform).
        self.motor.blink(on_time=on_ms / 1000, off_time=max(off_ms, 1) / 1000, n=len(pulses), background=True)

    def close(self) -> None:
        self.motor.close()
