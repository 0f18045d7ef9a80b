"""docs/OPERATIONS.md stays true to the code (issue 6, R18: the staff who keep the devices work from it).

The doc must list every configuration key with the type, default and bounds `agent/config.py` declares,
explain every alarm and fault code the agent can write into the ledger (with the rule it serves), cover
every `bwc-agent` subcommand and its options, every `status` line, every `selftest` check and every
voice-menu item.

`python tests/test_operations_doc.py` prints the configuration table (key, type, default, bounds) to paste
into the doc after a change to agent/config.py; the meaning column is written by hand.
"""

from __future__ import annotations

import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from pydantic.fields import FieldInfo

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from agent.config import AgentConfig  # noqa: E402

DOC = ROOT / "docs" / "OPERATIONS.md"
AGENT = ROOT / "agent"

# --- the configuration table, generated from agent/config.py -------------------------------------------------


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_type_name(a) for a in inner) + (" or unset" if len(inner) < len(args) else "")
    if origin is typing.Literal:
        return "one of " + ", ".join(f'`"{a}"`' for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}s"
    return {bool: "bool", int: "int", float: "float", str: "string", Path: "path"}.get(annotation,
                                                                                     getattr(annotation, "__name__",
                                                                                             str(annotation)))


def _toml(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return f'"{value}"'


def _default(field: FieldInfo) -> str:
    value = field.default_factory() if field.default_factory is not None else field.default
    shown = _toml(value)
    return shown if shown == "unset" else f"`{shown}`"


def _bounds(field: FieldInfo) -> str:
    parts, low, high = [], None, None
    for meta in field.metadata:
        low = getattr(meta, "ge", low)
        high = getattr(meta, "le", high)
        if getattr(meta, "max_length", None) is not None:
            parts.append(f"at most {meta.max_length} characters")
        if getattr(meta, "pattern", None) is not None:
            parts.append(f"matches `{meta.pattern}`")
    if low is not None or high is not None:
        parts.insert(0, f"{_toml(low)} to {_toml(high)}")
    return "; ".join(parts) if parts else "—"


def _escape(cell: str) -> str:
    return cell.replace("|", "\\|")  # GitHub tables split on every unescaped pipe, even in code spans


def config_rows() -> list[tuple[str, str, str, str]]:
    """(key, type, default, bounds) for every key of AgentConfig, in declaration order."""
    rows = []
    for section, section_field in AgentConfig.model_fields.items():
        model = section_field.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel), section
        for name, field in model.model_fields.items():
            rows.append((f"{section}.{name}", _escape(_type_name(field.annotation)), _escape(_default(field)),
                         _escape(_bounds(field))))
    return rows


def render_config_table() -> str:
    lines = ["| key | type | default | bounds | meaning |", "|---|---|---|---|---|"]
    lines += [f"| `{key}` | {t} | {d} | {b} | … |" for key, t, d, b in config_rows()]
    return "\n".join(lines)


# --- reading the doc ---------------------------------------------------------------------------------------


def doc_text() -> str:
    return DOC.read_text(encoding="utf-8")


def doc_section(title: str) -> str:
    """The text of the `## <title>` section, up to the next `## ` heading."""
    text = doc_text()
    match = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"docs/OPERATIONS.md has no '## {title}' section"
    return match.group(1)


def table_cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def documented_config_rows() -> dict[str, list[str]]:
    rows = {}
    for line in doc_section("Configuration reference").splitlines():
        m = re.match(r"^\| `([a-z_]+\.[a-z_]+)` \|", line)
        if m:
            rows[m.group(1)] = table_cells(line)
    return rows


# --- what the code can write -----------------------------------------------------------------------------

_CODE_PATTERNS = (
    re.compile(r'"code":\s*"([a-z0-9_]+)"'),  # alarm and fault record bodies written directly
    re.compile(r'PipelineFault\(\s*(?:component=)?[^,()]+,\s*(?:code=)?"([a-z0-9_]+)"'),  # fault events
    re.compile(r'\bcode\s*=\s*"([a-z0-9_]+)"\s+if\s+[^\n]+?\s+else\s+"([a-z0-9_]+)"'),  # a code chosen at runtime
    re.compile(r'self\._fault\(\s*"([a-z0-9_]+)"'),  # capture writer faults (WriterFault -> fault record)
)


def alarm_and_fault_codes() -> dict[str, str]:
    """Every alarm/fault code a module under agent/ can put into an `alarm` or `fault` record -> its file."""
    found: dict[str, str] = {}
    for path in sorted(AGENT.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for pattern in _CODE_PATTERNS:
            for match in pattern.finditer(text):
                for code in match.groups():
                    found.setdefault(code, str(path.relative_to(ROOT)))
        if "{name}_unreadable" in text:  # HealthMonitor: one code per sensor it reads
            for match in re.finditer(r'self\._read\(\s*"([a-z_]+)"', text):
                found.setdefault(f"{match.group(1)}_unreadable", str(path.relative_to(ROOT)))
    return found


# --- the specification -------------------------------------------------------------------------------------


def test_doc_lists_every_config_key_with_the_type_default_and_bounds_of_agent_config():
    documented = documented_config_rows()
    expected = config_rows()
    missing = [key for key, *_ in expected if key not in documented]
    assert not missing, f"config keys not in docs/OPERATIONS.md (run python {Path(__file__).name}): {missing}"
    for key, type_name, default, bounds in expected:
        cells = documented[key]
        assert cells[1:4] == [type_name, default, bounds], (
            f"{key}: the doc says {cells[1:4]}, agent/config.py says {[type_name, default, bounds]}")
        assert len(cells) == 5 and cells[4] not in ("", "…"), f"{key}: no meaning written"
    stale = sorted(set(documented) - {key for key, *_ in expected})
    assert not stale, f"docs/OPERATIONS.md documents keys agent/config.py does not have: {stale}"


def test_doc_explains_every_alarm_and_fault_code_the_agent_can_write_with_its_rule():
    codes = alarm_and_fault_codes()
    # The scan itself must keep working: these are written today, by the modules named.
    for known in ("battery_low", "upload_overdue", "ledger_fork", "receipt_refused", "segment_rejected",
                  "written_explanation_required", "queue_full", "storage_full", "over_temperature",
                  "camera_stalled", "thermal_unreadable"):
        assert known in codes, f"the scan of agent/ no longer finds {known!r}; update _CODE_PATTERNS"
    section = doc_section("Alarms and faults")
    rows = {m.group(1): line for line in section.splitlines()
            if (m := re.match(r"^\| `([a-z0-9_]+)` \|", line))}
    for code, source in sorted(codes.items()):
        assert code in rows, f"{code} (written by {source}) is not explained in docs/OPERATIONS.md"
        assert re.search(r"\bR\d+\b", rows[code]), f"{code}: the doc names no rule (R-id) it serves"


def test_doc_covers_every_bwc_agent_subcommand():
    from agent.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")  # noqa: SLF001 - argparse keeps them here
    text = doc_text()
    for name in sub.choices:
        assert f"bwc-agent {name}" in text, f"`bwc-agent {name}` is not in docs/OPERATIONS.md"


def test_doc_names_every_option_of_every_subcommand():
    from agent.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")  # noqa: SLF001 - argparse keeps them here
    text = doc_text()
    for name, subparser in sub.choices.items():
        for action in subparser._actions:  # noqa: SLF001
            for option in action.option_strings:
                if option.startswith("--") and option != "--help":
                    assert re.search(rf"{re.escape(option)}\b", text), (
                        f"`bwc-agent {name} {option}` is not in docs/OPERATIONS.md")


def test_doc_explains_every_status_line():
    from agent.status import render

    rendered = render({"state": "READY", "live": None, "segments": {}, "unreceipted_bytes": 0,
                       "storage": {"free_bytes": 0, "minutes_left": 0.0}, "last_sync": None, "clock": None,
                       "ledger_head_seq": 0, "alarms": []})
    labels = [re.split(r"\s{2,}", line)[0] for line in rendered.splitlines()]
    section = doc_section("Reading `bwc-agent status`")
    for label in labels:
        assert f"| `{label}` |" in section, f"status line {label!r} is not explained"


def test_doc_explains_every_selftest_check():
    source = (AGENT / "selftest.py").read_text(encoding="utf-8")
    names = re.findall(r'\("([a-z ]+)", self\.\w+\)', source)
    assert len(names) >= 13, names
    section = doc_section("Reading `bwc-agent selftest`")
    for name in names:
        assert f"| `{name}` |" in section, f"selftest check {name!r} is not explained"


def test_doc_lists_every_voice_menu_item_and_interruption_reason():
    from agent.controls import MENU_ITEMS
    from agent.evidence.records import InterruptionReason

    buttons = doc_section("Buttons")
    for _, value in MENU_ITEMS:
        assert f"`{value}`" in buttons, f"voice menu item {value!r} is not in the buttons section"
    interruptions = doc_section("Interruptions and the compliance report")
    for reason in InterruptionReason:
        assert f"`{reason.value}`" in interruptions, f"interruption reason {reason.value!r} is not explained"


@pytest.mark.parametrize("cell,expected", [
    ("`^a|b$`", ["x", "`^a\\|b$`", "y"]),
])
def test_table_cells_keep_escaped_pipes_inside_a_cell(cell, expected):
    assert table_cells(f"| x | {_escape(cell)} | y |") == expected


if __name__ == "__main__":
    print(render_config_table())
