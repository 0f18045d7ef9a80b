"""The shipped prompt audio, decoded on demand to 16-bit mono PCM at the rate the speaker is opened with.

Public API:
    library = PromptLibrary()                  the package's assets (or PromptLibrary(some_dir))
    library.missing(languages)                 [(prompt_id, language), ...] with no audio file
    library.pcm(prompt_id, language, rate)     bytes of s16le mono PCM (decoded once, then cached)
    library.duration_s(prompt_id, language)

Threads: any thread may call it; decoding and the cache are guarded by one lock (decoding a prompt takes a
few milliseconds, and only the playback thread normally calls it).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path

import av
import numpy as np

from agent.voice_prompts.catalogue import CATALOGUE, LANGUAGES, PromptError, prompt
from agent.voice_prompts.render import ASSETS_DIR, asset_name


class PromptAudioError(RuntimeError):
    """A prompt's audio file is missing or cannot be decoded."""


class PromptLibrary:
    def __init__(self, assets_dir: Path = ASSETS_DIR) -> None:
        self.assets_dir = Path(assets_dir)
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str, int], bytes] = {}

    def path(self, prompt_id: str, language: str) -> Path:
        prompt(prompt_id).text(language)  # raises PromptError for an unknown id or language
        return self.assets_dir / asset_name(prompt_id, language)

    def missing(self, languages: Iterable[str] = LANGUAGES) -> list[tuple[str, str]]:
        return [(pid, lang) for lang in languages for pid in sorted(CATALOGUE)
                if not self.path(pid, lang).is_file()]

    def pcm(self, prompt_id: str, language: str, rate: int = 16_000) -> bytes:
        """s16le mono PCM of the prompt at `rate`. Raises PromptError (unknown id) or PromptAudioError."""
        key = (prompt_id, language, rate)
        with self._lock:
            cached = self._cache.get(key)
            if cached is None:
                cached = self._cache[key] = decode_to_pcm(self.path(prompt_id, language), rate)
            return cached

    def duration_s(self, prompt_id: str, language: str) -> float:
        return len(self.pcm(prompt_id, language)) / 2 / 16_000


def decode_to_pcm(path: Path, rate: int) -> bytes:
    """Decode any audio file PyAV can read to s16le mono at `rate`."""
    if not path.is_file():
        raise PromptAudioError(f"prompt audio {path} is missing: run python -m agent.voice_prompts.render")
    chunks: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise PromptAudioError(f"{path} has no audio stream")
            resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
            for frame in container.decode(audio=0):
                chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
            chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    except (av.FFmpegError, OSError) as exc:
        raise PromptAudioError(f"cannot decode prompt audio {path}: {exc}") from exc
    if not chunks:
        raise PromptAudioError(f"{path} decoded to no audio")
    return np.concatenate(chunks).astype("<i2").tobytes()


__all__ = ["PromptAudioError", "PromptError", "PromptLibrary", "decode_to_pcm"]
