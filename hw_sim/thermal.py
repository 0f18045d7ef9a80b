"""Simulated CPU temperature: a sysfs-style file holding millidegrees, which the agent reads as on a Pi."""

from __future__ import annotations

import os
from pathlib import Path


class SimThermal:
    def __init__(self, path: Path, celsius: float = 45.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.set(celsius)

    def set(self, celsius: float) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(f"{int(celsius * 1000)}\n")
        os.replace(tmp, self.path)

    def write_garbage(self, text: str = "not-a-number\n") -> None:
        self.path.write_text(text)
