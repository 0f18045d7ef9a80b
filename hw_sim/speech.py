"""Sound for the simulated microphone: spoken statements, silence and scene noise, as 16-bit mono PCM or WAV.

    pcm = synthesize(OPENING_STATEMENTS["zh-CN"][0], "zh-CN", rate=48000)   espeak-ng, resampled
    bed = street_noise(30.0, 48000, level_dbfs=-38, seed=1)                 traffic rumble, passing cars, a horn
    scene = mix(bed, pcm, at_s=5.0, rate=48000)                             speech placed into the noise
    write_wav(path, scene, 48000)                                           for the fake PyAudio microphone
    write_statement_wavs(out_dir, 16000)   -> [InjectedClip(path, language, kind, speech_start_s, speech_end_s)]

The statements are what an officer of a market-supervision bureau actually says on arrival (R16: time,
place, officers, act, focus; the notice to the party) and on resuming after an interruption (R17), in Chinese
(espeak-ng `cmn`) and English. Noise is deterministic for a given seed. `speech_extent` gives the ground truth
(first and last audible sample of a clean clip) that detection tests compare against.

Pure functions; no threads. Needs espeak-ng only for `synthesize`.
"""

from __future__ import annotations

import math
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.voice_prompts.render import VOICES
from agent.voice_prompts.render import synthesize as _espeak

OPENING_STATEMENTS: dict[str, list[str]] = {
    "zh-CN": [
        "现在是二零二六年一月一日上午十点，我们在江城市东湖区建设路八十八号华联超市。"
        "执法人员张伟，执法证号四二零一零零一二；李娜，执法证号四二零一零零三五，已向当事人出示执法证件。"
        "我们依法对该超市进行食品安全现场检查，本次记录重点是经营场所环境、食品标签和进货查验记录。",
        "现在是下午两点二十分，地点是江城市青山区和平大道一百零六号一家餐饮店的后厨。"
        "执法人员王强和陈静。本次对该店使用过期食品原料的行为采取查封扣押措施，记录重点是涉案物品和清点过程。",
    ],
    "en": [
        "It is ten a.m. on the first of January, twenty twenty-six. We are at the Hualian supermarket, "
        "eighty-eight Jianshe Road, Donghu District. Officers Zhang Wei, badge four two zero one zero zero one two, "
        "and Li Na, badge four two zero one zero zero three five, have shown their identification. "
        "We are carrying out an on-site food safety inspection. This recording focuses on the premises, "
        "the food labels, and the purchase inspection records.",
    ],
}

NOTICES: dict[str, list[str]] = {
    "zh-CN": ["您好，我们是江城市市场监督管理局的执法人员，现在告知您，本次执法全过程进行录音录像。"],
    "en": ["Hello, we are officers of the Jiangcheng market supervision bureau. "
           "Please be aware that this inspection is being recorded on audio and video."],
}

INTERRUPTION_EXPLANATIONS: dict[str, list[str]] = {
    "zh-CN": [
        "刚才录像中断，原因是执法记录仪电量不足，现已更换电池，继续录像。",
        "刚才因当事人阻挠，录像中断了大约两分钟，现在恢复录像。",
        "刚才因为暴雨，设备暂停录像，现在已经转移到室内继续录像。",
    ],
    "en": [
        "Recording was interrupted because the camera battery ran low. The battery has been replaced "
        "and recording continues.",
        "Recording stopped for about two minutes because a person on scene blocked the camera. Recording has resumed.",
    ],
}

STATEMENTS: dict[str, dict[str, list[str]]] = {
    "opening": OPENING_STATEMENTS,
    "notice": NOTICES,
    "interruption_reason": INTERRUPTION_EXPLANATIONS,
}


def synthesize(text: str, language: str, rate: int = 16_000, speed_wpm: int = 160,
               variant: str | None = None) -> np.ndarray:
    """Speak `text` in `language` ("zh-CN" or "en") with espeak-ng; int16 mono at `rate`.
    `variant` picks another speaker (espeak-ng variants: "f3" a woman's voice, "m7", "croak", ...)."""
    voice, _ = VOICES[language]
    return _espeak(text, f"{voice}+{variant}" if variant else voice, speed_wpm, rate)


def silence(seconds: float, rate: int = 16_000) -> np.ndarray:
    return np.zeros(int(round(seconds * rate)), np.int16)


def _scale_to(x: np.ndarray, level_dbfs: float) -> np.ndarray:
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) or 1.0
    return x * (32768 * 10 ** (level_dbfs / 20) / rms)


def _to_int16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x), -32768, 32767).astype(np.int16)


def _shaped_noise(n: int, rate: int, rng: np.random.Generator, slope: float, lo_hz: float = 20.0,
                  hi_hz: float | None = None, block: int = 1 << 15) -> np.ndarray:
    """Gaussian noise with power ~ 1/f**slope between lo_hz and hi_hz.

    Shaped in the frequency domain block by block (independent blocks, sine-windowed, 50 % overlap-add, so
    the variance stays constant): one FFT of a whole minute at 48 kHz is slow and cache-hostile."""
    freqs = np.fft.rfftfreq(block, 1 / rate)
    gain = np.zeros_like(freqs)
    band = freqs >= lo_hz
    if hi_hz is not None:
        band &= freqs <= hi_hz
    gain[band] = freqs[band] ** (-slope / 2)
    window = np.sin(np.pi * (np.arange(block) + 0.5) / block)
    hop = block // 2
    out = np.zeros(n + block)
    for start in range(-hop, n, hop):
        piece = np.fft.irfft(np.fft.rfft(rng.standard_normal(block)) * gain, block) * window
        lo = max(start, 0)
        out[lo:start + block] += piece[lo - start:]
    return out[:n]


def white_noise(seconds: float, rate: int = 16_000, level_dbfs: float = -40.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return _to_int16(_scale_to(rng.standard_normal(int(seconds * rate)), level_dbfs))


def street_noise(seconds: float, rate: int = 16_000, level_dbfs: float = -38.0, seed: int = 0,
                 vehicles: int = 3, horn: bool = True) -> np.ndarray:
    """A kerbside bed: brown-noise traffic rumble, pink ambience, cars passing (slow swells of low-passed
    noise, +10 dB at their closest), and optionally one short horn. RMS of the whole is `level_dbfs`."""
    n = int(round(seconds * rate))
    rng = np.random.default_rng(seed)
    t = np.arange(n) / rate
    rumble = _scale_to(_shaped_noise(n, rate, rng, 2.0, 20, 2000), -6)
    ambience = _scale_to(_shaped_noise(n, rate, rng, 1.0, 100, min(7000, rate / 2 - 1)), -14)
    bed = rumble + ambience
    engine_noise = _scale_to(_shaped_noise(n, rate, rng, 1.5, 40, 1200), -2)
    for _ in range(vehicles):
        centre, width = rng.uniform(0, seconds), rng.uniform(2.0, 5.0)
        envelope = np.exp(-0.5 * ((t - centre) / (width / 2.5)) ** 2)
        bed = bed + np.roll(engine_noise, int(rng.integers(0, n))) * envelope * 3.0
    if horn and seconds > 1.0:
        start = rng.uniform(0, seconds - 0.5)
        idx = (t >= start) & (t < start + 0.35)
        tone = sum(np.sin(2 * math.pi * f * t[idx]) / k for k, f in enumerate((420.0, 840.0, 1260.0), 1))
        bed[idx] += _scale_to(tone, -3) * np.hanning(idx.sum())
    return _to_int16(_scale_to(bed, level_dbfs))


def door_slam(rate: int = 16_000, peak_dbfs: float = -3.0, seed: int = 0) -> np.ndarray:
    """A door slamming near the microphone: a broadband crack, a low thump and a short rattle (~0.5 s)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(0.5 * rate)) / rate
    crack = rng.standard_normal(t.size) * np.exp(-t / 0.004)
    thump = np.sin(2 * math.pi * 75 * t) * np.exp(-t / 0.08)
    rattle = _shaped_noise(t.size, rate, rng, 0.5, 200, min(5000, rate / 2 - 1)) * np.exp(-t / 0.06)
    x = crack + 0.8 * thump + 0.5 * rattle / (np.max(np.abs(rattle)) or 1)
    return _to_int16(x / np.max(np.abs(x)) * 32767 * 10 ** (peak_dbfs / 20))


def car_horn(seconds: float = 2.0, rate: int = 16_000, level_dbfs: float = -12.0) -> np.ndarray:
    """A held car horn: a steady two-tone chord (420 and 500 Hz with harmonics), perfectly periodic."""
    t = np.arange(int(seconds * rate)) / rate
    tone = sum(np.sin(2 * math.pi * f * k * t) / k for f in (420.0, 500.0) for k in (1, 2, 3))
    ramp = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.02)
    return _to_int16(_scale_to(tone * ramp, level_dbfs))


def cough(rate: int = 16_000, peak_dbfs: float = -6.0, seed: int = 0) -> np.ndarray:
    """A double cough: two ~0.15 s bursts of voiced-noise (a 180 Hz buzz under band-limited noise)."""
    rng = np.random.default_rng(seed)
    burst_t = np.arange(int(0.15 * rate)) / rate
    envelope = np.sin(math.pi * burst_t / burst_t[-1]) ** 2
    bursts = []
    for _ in range(2):
        noise = _shaped_noise(burst_t.size, rate, rng, 0.8, 300, min(3500, rate / 2 - 1))
        buzz = np.sign(np.sin(2 * math.pi * 180 * burst_t)) * 0.3 * np.max(np.abs(noise))
        bursts += [(noise + buzz) * envelope, np.zeros(int(0.12 * rate))]
    x = np.concatenate(bursts)
    return _to_int16(x / np.max(np.abs(x)) * 32767 * 10 ** (peak_dbfs / 20))


def mix(base: np.ndarray, clip: np.ndarray, at_s: float, rate: int = 16_000, gain_db: float = 0.0) -> np.ndarray:
    """`base` with `clip` added from `at_s` (extended with silence if the clip runs past its end)."""
    start = int(round(at_s * rate))
    out = np.zeros(max(base.size, start + clip.size), np.float64)
    out[:base.size] = base
    out[start:start + clip.size] += clip.astype(np.float64) * 10 ** (gain_db / 20)
    return _to_int16(out)


def speech_extent(clip: np.ndarray, rate: int = 16_000, threshold: int = 300) -> tuple[float, float]:
    """(first, last) audible sample of a clean clip, in seconds from its start."""
    loud = np.flatnonzero(np.abs(clip.astype(np.int32)) > threshold)
    if loud.size == 0:
        raise ValueError("clip is silent")
    return loud[0] / rate, (loud[-1] + 1) / rate


def write_wav(path: Path, pcm: np.ndarray, rate: int = 16_000) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.asarray(pcm, dtype="<i2").tobytes())
    return path


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise ValueError(f"{path}: expected 16-bit mono WAV, "
                             f"got {w.getnchannels()} ch x {w.getsampwidth() * 8} bit")
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").copy(), w.getframerate()


@dataclass(frozen=True)
class InjectedClip:
    path: Path
    language: str
    kind: str  # opening | notice | interruption_reason
    speech_start_s: float  # ground truth, from the start of the file
    speech_end_s: float


def write_statement_wavs(out_dir: Path, rate: int = 16_000, lead_s: float = 2.0, tail_s: float = 3.0,
                         noise_dbfs: float | None = -42.0, seed: int = 0) -> list[InjectedClip]:
    """One WAV per statement text: `lead_s` of scene noise (or silence), the statement, `tail_s` more."""
    clips = []
    for kind, by_language in STATEMENTS.items():
        for language, texts in by_language.items():
            for i, text in enumerate(texts):
                speech = synthesize(text, language, rate)
                first, last = speech_extent(speech, rate)
                length = lead_s + speech.size / rate + tail_s
                bed = (silence(length, rate) if noise_dbfs is None
                       else street_noise(length, rate, noise_dbfs, seed=seed + i, horn=False))
                path = write_wav(Path(out_dir) / f"{kind}_{language}_{i}.wav", mix(bed, speech, lead_s, rate), rate)
                clips.append(InjectedClip(path, language, kind, lead_s + first, lead_s + last))
    return clips
