"""The Annex recording checklist as data: enforcement categories, their stages, and what each stage
requires of the recording (R14 and the Annex of REQUIREMENTS.md).

`full_process` stages are mandatory from start to end: stopping needs a confirmed long hold and every
such stop is flagged in the ledger and the compliance report. The rest stop normally.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Recording(StrEnum):
    FULL_PROCESS = "full_process"  # 全过程 mandatory (R14)
    AS_REQUIRED = "as_required"  # 根据需要/按规定 recorded as required
    AS_SITUATION_REQUIRES = "as_situation_requires"  # 根据情况 as the situation requires


@dataclass(frozen=True)
class Stage:
    category: str
    code: str
    zh: str
    en: str
    recording: Recording

    @property
    def mandatory(self) -> bool:
        return self.recording is Recording.FULL_PROCESS

    @property
    def key(self) -> str:
        return f"{self.category}/{self.code}"


@dataclass(frozen=True)
class Category:
    code: str
    zh: str
    en: str


CATEGORIES: dict[str, Category] = {
    "penalty": Category("penalty", "行政处罚", "administrative penalty"),
    "compulsion": Category("compulsion", "行政强制", "administrative compulsion"),
    "inspection": Category("inspection", "行政检查", "inspection"),
}

_R = Recording
ANNEX: tuple[Stage, ...] = (
    Stage("penalty", "on_site", "执法现场", "on-site enforcement", _R.AS_SITUATION_REQUIRES),
    Stage("penalty", "evidence_preservation", "先行登记保存", "registering evidence for preservation", _R.AS_REQUIRED),
    Stage("penalty", "sampling", "抽样取证（必要时）", "sampling evidence (when needed)", _R.AS_REQUIRED),
    Stage("penalty", "hearing", "听证会", "hearing", _R.AS_REQUIRED),
    Stage("penalty", "service", "送达（留置、公告送达）", "service (by leaving / by notice)", _R.AS_REQUIRED),
    Stage("penalty", "order_to_correct", "责令改正（必要时）", "order to correct (when needed)", _R.AS_REQUIRED),
    Stage("compulsion", "compulsory_measures", "采取强制措施", "taking compulsory measures", _R.FULL_PROCESS),
    Stage("compulsion", "sealed_property", "处理查封扣押设施或财物", "handling sealed or seized facilities or property",
          _R.FULL_PROCESS),
    Stage("inspection", "on_site", "执法现场", "on-site enforcement", _R.AS_REQUIRED),
    Stage("inspection", "order_to_correct", "责令改正（必要时）", "order to correct (when needed)", _R.AS_REQUIRED),
)
STAGES: dict[str, Stage] = {s.key: s for s in ANNEX}


class PolicyError(ValueError):
    """An unknown category or stage."""


def stage(category: str | None, code: str | None) -> Stage | None:
    """The Annex stage for (category, code); None when no context is set. Raises PolicyError if unknown."""
    if category is None and code is None:
        return None
    found = STAGES.get(f"{category}/{code}")
    if found is None:
        valid = ", ".join(sorted(STAGES))
        raise PolicyError(f"unknown enforcement stage {category}/{code}; valid: {valid}")
    return found


# R9 steps and R15 focus points an officer can mark while recording (the MARK voice menu).
MARKER_STEPS: dict[str, tuple[str, str]] = {
    "show_id": ("出示执法证件", "officers' identity shown"),
    "questioning": ("询问", "questioning"),
    "inspection": ("现场检查", "on-site inspection"),
    "evidence_taking": ("调取证据", "evidence taking"),
    "sampling": ("抽样", "sampling"),
    "testing": ("检测", "testing"),
    "evidence_preservation": ("先行登记保存", "registering evidence for preservation"),
    "compulsory_measure": ("实施强制措施", "compulsory measure taken"),
    "rights_informed": ("告知权利", "party informed of rights"),
    "hearing": ("听证", "hearing"),
    "expert_review": ("鉴定", "expert review"),
    "document_service": ("送达文书", "service of documents"),
    "key_evidence": ("关键证据", "key evidence"),  # R15: key evidence and its features
    "general": ("标记", "general marker"),
}
