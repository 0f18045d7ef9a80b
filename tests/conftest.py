"""Shared fixtures: a bureau age identity, a device identity key, and an evidence store on tmp_path."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.clock import SystemClock
from agent.evidence.age import Identity
from agent.storage.keys import PemFileSigner
from agent.storage.segment_writer import FragmentInfo
from agent.storage.store import EvidenceStore

DEVICE_ID = "BWC-TEST-0001"


@pytest.fixture
def bureau_identity(tmp_path: Path) -> Identity:
    return Identity.generate()


@pytest.fixture
def identity_file(tmp_path: Path, bureau_identity: Identity) -> Path:
    path = tmp_path / "bureau-identity.txt"
    path.write_text(f"# test bureau identity\n{bureau_identity}\n")
    return path


@pytest.fixture
def signer(tmp_path: Path) -> PemFileSigner:
    return PemFileSigner.generate(tmp_path / "keys" / "device-key.pem")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "device"


@pytest.fixture
def open_store(data_dir: Path, signer: PemFileSigner, bureau_identity: Identity) -> Callable[..., EvidenceStore]:
    def _open(**kwargs) -> EvidenceStore:
        return EvidenceStore(data_dir, DEVICE_ID, signer, [bureau_identity.recipient], SystemClock(), **kwargs)

    return _open


@pytest.fixture
def store(open_store) -> EvidenceStore:
    st = open_store()
    yield st
    st.close()


def write_segment(store: EvidenceStore, session_id: str, index: int, fragment_sizes=(3000, 70000, 150000)):
    """Write a closed segment of random fragments; returns (record, plaintext fragments)."""
    seg = store.open_segment(session_id, index)
    frags = [os.urandom(n) for n in fragment_sizes]
    for i, frag in enumerate(frags):
        seg.write_fragment(frag, FragmentInfo(video_frames=30, audio_samples=48000,
                                              first_pts_us=i * 1_000_000, last_pts_us=i * 1_000_000 + 966_667))
    return seg.close(), frags
