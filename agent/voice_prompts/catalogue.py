"""The voice-prompt catalogue: every sentence the device can say, with a stable id, in zh-CN and en.

Public API (no threads; pure data):
    LANGUAGES                      ("zh-CN", "en"): the languages every prompt exists in
    CATALOGUE[prompt_id]           PromptText(prompt_id, zh_cn, en, purpose, audience, expects)
    text(prompt_id, language)      the sentence; raises PromptError for an unknown id or language
    interruption_prompt(reason)    "interruption_<reason>"   (R17: said when recording is interrupted)
    reminder_prompt(kind)          "statement_reminder_<kind>"
    marker_prompt(step)            "marker_<step>"            (R9: said when a marker is confirmed)
    menu_step_prompt(step), menu_reason_prompt(reason)  labels read out by the MARK voice menu

Ids are part of the ledger (`prompt` records carry them), so an id is never renamed or reused for a
different meaning; change the wording freely, then re-render the audio (`python -m agent.voice_prompts.render`).
`expects` names the statement the device listens for after the prompt has finished playing (R16, R17), so
the session machine can arm the StatementDetector from the catalogue rather than from scattered ifs.

The marker steps mirror agent.policy.MARKER_STEPS and the interruption reasons mirror
agent.evidence.records.InterruptionReason; tests/test_voice_prompts.py fails if either drifts from this table.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from agent.policy import MARKER_STEPS

LANGUAGES: tuple[str, ...] = ("zh-CN", "en")

Audience = Literal["officer", "party"]


class PromptError(KeyError):
    """An unknown prompt id or language."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


class StatementKind(StrEnum):
    """What the officer must say aloud (the `kind` of a `statement` ledger record)."""

    OPENING = "opening"  # R16: time, place, officers, enforcement act, recording focus
    NOTICE = "notice"  # R16: the party and those present are told they are being recorded
    INTERRUPTION_REASON = "interruption_reason"  # R17: the reason, spoken when recording restarts


@dataclass(frozen=True)
class PromptText:
    prompt_id: str
    zh_cn: str
    en: str
    purpose: str  # the `purpose` field of the `prompt` ledger record
    audience: Audience = "officer"  # "party": meant to be played aloud to the people on scene
    expects: StatementKind | None = None  # listen for this statement once the prompt has played

    def text(self, language: str) -> str:
        if language == "zh-CN":
            return self.zh_cn
        if language == "en":
            return self.en
        raise PromptError(f"unknown prompt language {language!r}; known: {', '.join(LANGUAGES)}")

    def text_sha256(self, language: str) -> str:
        """Hash of the sentence, stored in the asset manifest so stale audio is detectable."""
        return hashlib.sha256(self.text(language).encode("utf-8")).hexdigest()


def _p(prompt_id: str, zh_cn: str, en: str, purpose: str, audience: Audience = "officer",
       expects: StatementKind | None = None) -> PromptText:
    return PromptText(prompt_id, zh_cn, en, purpose, audience, expects)


_K = StatementKind

_SESSION = (
    _p("session_started_opening_statement",
       "开始记录。请陈述时间、地点、执法人员、执法行为和记录重点。",
       "Recording started. State the time, the place, the officers present, the enforcement act, "
       "and what this recording focuses on.",
       "opening_statement", expects=_K.OPENING),
    _p("notice_prompt",
       "请告知当事人和在场人员，现场正在录音录像。",
       "Tell the party and everyone present that audio and video are being recorded.",
       "notice", expects=_K.NOTICE),
    _p("notice_to_party",
       "您好，我们是市场监督管理部门的执法人员。请注意，本次执法过程正在全程录音录像。",
       "Hello. We are market supervision enforcement officers. Please be aware that this enforcement "
       "action is being recorded on audio and video from start to finish.",
       "notice", audience="party"),
    _p("statement_reminder_opening",
       "提醒：请陈述时间、地点、执法人员、执法行为和记录重点，或按标记键确认。",
       "Reminder: state the time, place, officers, enforcement act and recording focus, or press MARK to confirm.",
       "statement"),
    _p("statement_reminder_notice",
       "提醒：请告知当事人正在录音录像，或按标记键确认。",
       "Reminder: tell the party that they are being recorded, or press MARK to confirm.",
       "statement"),
    _p("statement_reminder_interruption_reason",
       "提醒：请说明录像中断的原因，或按标记键确认。",
       "Reminder: state why recording was interrupted, or press MARK to confirm.",
       "statement"),
    _p("statement_missing",
       "未检测到陈述，已记入本次记录报告。",
       "No statement was detected. This is noted in the session report.",
       "statement"),
    _p("statement_confirmed",
       "陈述已确认。",
       "Statement confirmed.",
       "statement"),
    _p("session_stopped",
       "记录结束。",
       "Recording stopped. Session closed.",
       "session"),
    _p("full_process_stage_notice",
       "本环节须全程录音录像，停止录像需要长按确认。",
       "This stage requires full-process recording. Stopping needs a confirmed hold.",
       "policy"),
    _p("stop_refused_full_process",
       "本环节须全程录像，录像继续。如确需停止，请再次长按记录键。",
       "Full-process recording is required in this stage, so recording continues. "
       "To stop anyway, hold the record button again.",
       "policy"),
    _p("stop_confirmed_mandatory",
       "已确认停止。全程录像环节中的停止将被记录并报告。",
       "Stop confirmed. A stop during a full-process stage is recorded and reported.",
       "policy"),
)

# R17's reasons (agent.evidence.records.InterruptionReason): (zh label, en label).
_REASONS: dict[str, tuple[str, str]] = {
    "device_fault": ("设备故障", "device fault"),
    "device_damage": ("设备损坏", "device damage"),
    "low_battery": ("电量不足", "low battery"),
    "storage_full": ("存储空间已满", "storage full"),
    "severe_weather": ("恶劣天气", "severe weather"),
    "obstruction": ("现场人员阻挠", "obstruction by people on scene"),
    "other": ("其他原因", "other reason"),
}

_INTERRUPTIONS = tuple(
    _p(f"interruption_{code}", f"录像中断：{zh}。", f"Recording interrupted: {en}.", "interruption")
    for code, (zh, en) in _REASONS.items()
) + (
    _p("state_interruption_reason",
       "录像已恢复。请说明录像中断的原因。",
       "Recording resumed. State the reason for the interruption.",
       "interruption_reason", expects=_K.INTERRUPTION_REASON),
    _p("unable_to_continue",
       "录像无法继续，请事后作出书面说明。",
       "Recording cannot continue. A written explanation is required.",
       "interruption"),
    _p("written_explanation_required",
       "上次执法记录未能继续，需要作出书面说明，已报告执法机构。",
       "The last session could not continue recording. A written explanation is required, "
       "and the bureau has been told.",
       "interruption"),
)

_DEVICE = (
    _p("recording_reminder", "正在录像。", "Recording in progress.", "reminder"),
    _p("battery_warning", "电量低，请尽快更换电池或充电。", "Battery low. Swap or charge the battery soon.", "battery"),
    _p("battery_very_low", "电量严重不足，录像即将停止。", "Battery very low. Recording will stop soon.", "battery"),
    _p("critical_battery_shutdown",
       "电量耗尽，正在保存录像并关机。",
       "Battery exhausted. Saving the recording and shutting down.",
       "battery"),
    _p("storage_low", "存储空间不足，请尽快连接底座上传。", "Storage is running low. Dock the device to upload soon.",
       "storage"),
    _p("docked", "已连接底座。", "Docked.", "dock"),
    _p("upload_started", "开始上传。", "Upload started.", "dock"),
    _p("upload_complete", "上传完成。", "Upload complete.", "dock"),
    _p("safe_to_remove", "可以取下设备。", "Safe to remove the device.", "dock"),
    _p("upload_overdue",
       "有录像超过规定时限尚未上传，请立即连接底座上传。",
       "Some footage is overdue for upload. Dock the device to upload it now.",
       "upload_deadline"),
)

# R9 steps and R15 focus points: (zh label, en label), from the one table in agent.policy.
_STEPS: dict[str, tuple[str, str]] = MARKER_STEPS

_MARKERS = tuple(
    _p(f"marker_{code}", f"已标记：{zh}。", f"Marked: {en}.", "marker") for code, (zh, en) in _STEPS.items()
)

_MENU = (
    _p("menu_mark_step", "标记执法环节。", "Mark a step.", "menu"),
    _p("menu_declare_interruption", "声明录像中断原因。", "Declare an interruption reason.", "menu"),
    _p("menu_cancelled", "已取消。", "Cancelled.", "menu"),
) + tuple(
    _p(f"menu_step_{code}", f"{zh}。", f"{en[0].upper()}{en[1:]}.", "menu") for code, (zh, en) in _STEPS.items()
) + tuple(
    _p(f"menu_reason_{code}", f"{zh}。", f"{en[0].upper()}{en[1:]}.", "menu") for code, (zh, en) in _REASONS.items()
)


def _index(*groups: tuple[PromptText, ...]) -> dict[str, PromptText]:
    table: dict[str, PromptText] = {}
    for group in groups:
        for prompt in group:
            if prompt.prompt_id in table:
                raise ValueError(f"duplicate prompt id {prompt.prompt_id!r} in the catalogue")
            table[prompt.prompt_id] = prompt
    return table


CATALOGUE: dict[str, PromptText] = _index(_SESSION, _INTERRUPTIONS, _DEVICE, _MARKERS, _MENU)
INTERRUPTION_REASONS: tuple[str, ...] = tuple(_REASONS)
MARKER_STEPS: tuple[str, ...] = tuple(_STEPS)


def prompt(prompt_id: str) -> PromptText:
    try:
        return CATALOGUE[prompt_id]
    except KeyError:
        raise PromptError(f"unknown prompt id {prompt_id!r}") from None


def text(prompt_id: str, language: str) -> str:
    return prompt(prompt_id).text(language)


def _checked(prompt_id: str) -> str:
    prompt(prompt_id)
    return prompt_id


def interruption_prompt(reason: str) -> str:
    return _checked(f"interruption_{reason}")


def reminder_prompt(kind: str) -> str:
    try:
        return _checked(f"statement_reminder_{StatementKind(kind).value}")
    except ValueError:
        raise PromptError(f"unknown statement kind {kind!r}") from None


def marker_prompt(step: str) -> str:
    return _checked(f"marker_{step}")


def menu_step_prompt(step: str) -> str:
    return _checked(f"menu_step_{step}")


def menu_reason_prompt(reason: str) -> str:
    return _checked(f"menu_reason_{reason}")
