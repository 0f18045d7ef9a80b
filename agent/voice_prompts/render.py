"""Render the catalogue to audio, offline: espeak-ng -> 16 kHz mono -> Ogg Opus files shipped in the package.

    python -m agent.voice_prompts.render            re-render every prompt into agent/voice_prompts/assets/
    python -m agent.voice_prompts.render --check    check the shipped assets match the catalogue (no espeak-ng)
    python -m agent.voice_prompts.render --out DIR  render somewhere else (e.g. to compare two renders)

Runs once, in the foreground; no threads. Only the render needs espeak-ng; the device only decodes.

Why Ogg Opus and not WAV: 16 kHz 16-bit WAV is 32 kB per second of speech, so the ~150 clips of the two
languages would add ~10 MB to every checkout and image; Opus at 16 kbit/s ("voip" mode, which is made for
speech) is 2 kB per second with no audible loss for synthetic speech, and PyAV (already a media dependency)
decodes it. Decoding a prompt costs a few milliseconds on a Pi, once; the library caches the PCM.

Deterministic: the same espeak-ng and libopus builds give byte-identical files (fixed voices and speed,
libswresample resampling, fixed bitrate, the container's `bitexact` flag so no random stream serial or
encoder tag). `manifest.json` records, per file, the hash of the sentence it was rendered from, so a test
catches audio that is stale after a wording change even on a machine with a different espeak-ng build.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import wave
from collections.abc import Iterable
from pathlib import Path

import av
import numpy as np

from agent.voice_prompts.catalogue import CATALOGUE, LANGUAGES

ASSETS_DIR = Path(__file__).with_name("assets")
MANIFEST_NAME = "manifest.json"
SAMPLE_RATE = 16_000
OPUS_BITRATE = 16_000
FILE_SUFFIX = ".opus"  # Ogg-encapsulated Opus (RFC 7845)
# espeak-ng voice and speed (words per minute) per prompt language.
VOICES: dict[str, tuple[str, int]] = {"zh-CN": ("cmn", 165), "en": ("en", 165)}
# Leading/trailing silence kept around the spoken part, so prompts start promptly but do not clip.
LEAD_S, TAIL_S = 0.04, 0.12
SILENCE_THRESHOLD = 300  # |sample| below this (-40 dBFS) counts as silence when trimming


class RenderError(RuntimeError):
    """espeak-ng is missing or failed, or an asset could not be encoded."""


def espeak_version() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RenderError("espeak-ng is not installed (apt-get install espeak-ng)")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False, timeout=30).stdout
    # "eSpeak NG text-to-speech: 1.51  Data at: ..."
    return out.split(":", 1)[1].split("Data")[0].strip() if ":" in out else out.strip()


def resample(pcm: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """int16 mono -> int16 mono at `rate_out`, with libswresample (deterministic)."""
    if rate_in == rate_out or pcm.size == 0:
        return pcm.astype(np.int16, copy=True)
    resampler = av.AudioResampler(format="s16", layout="mono", rate=rate_out)
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm, dtype=np.int16).reshape(1, -1),
                                       format="s16", layout="mono")
    frame.sample_rate = rate_in
    frame.pts = 0
    out = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame) + resampler.resample(None)]
    return np.concatenate(out).astype(np.int16) if out else np.zeros(0, np.int16)


def synthesize(text: str, voice: str, speed_wpm: int = 165, rate: int = SAMPLE_RATE) -> np.ndarray:
    """Speak `text` with espeak-ng; returns int16 mono PCM at `rate`. Raises RenderError on failure."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RenderError("espeak-ng is not installed (apt-get install espeak-ng)")
    with tempfile.TemporaryDirectory(prefix="espeak-") as tmp:
        wav_path = Path(tmp) / "out.wav"
        # Text on stdin, not argv: no length limit and nothing is read as an option.
        proc = subprocess.run([exe, "-v", voice, "-s", str(speed_wpm), "-w", str(wav_path)],
                              input=text.encode("utf-8"), capture_output=True, check=False, timeout=60)
        if proc.returncode != 0 or not wav_path.exists():
            detail = proc.stderr.decode(errors="replace").strip()
            raise RenderError(f"espeak-ng -v {voice} failed ({proc.returncode}): {detail}")
        with wave.open(str(wav_path), "rb") as w:
            if w.getsampwidth() != 2 or w.getnchannels() != 1:
                raise RenderError(f"espeak-ng produced {w.getnchannels()} ch x {w.getsampwidth() * 8} bit, "
                                  "expected 16-bit mono")
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
            rate_in = w.getframerate()
    return resample(pcm, rate_in, rate)


def trim_silence(pcm: np.ndarray, rate: int) -> np.ndarray:
    loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > SILENCE_THRESHOLD)
    if loud.size == 0:
        raise RenderError("synthesised prompt is silent")
    first = max(0, int(loud[0]) - int(LEAD_S * rate))
    last = min(pcm.size, int(loud[-1]) + int(TAIL_S * rate))
    return pcm[first:last]


def encode_opus(pcm: np.ndarray, rate: int = SAMPLE_RATE, bitrate: int = OPUS_BITRATE) -> bytes:
    """int16 mono PCM -> Ogg Opus bytes, byte-identical for identical input on the same libopus build."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="ogg", options={"fflags": "+bitexact"}) as out:
        stream = out.add_stream("libopus", rate=rate, layout="mono")
        stream.bit_rate = bitrate
        stream.codec_context.options = {"application": "voip"}
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm, dtype=np.int16).reshape(1, -1),
                                           format="s16", layout="mono")
        frame.sample_rate = rate
        frame.pts = 0
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def asset_name(prompt_id: str, language: str) -> str:
    return f"{language}/{prompt_id}{FILE_SUFFIX}"


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def render(out_dir: Path = ASSETS_DIR, prompt_ids: Iterable[str] | None = None,
           languages: Iterable[str] = LANGUAGES) -> dict:
    """Render prompts into `out_dir` and (re)write its manifest; returns the manifest.

    With `prompt_ids`, only those are re-rendered and the other manifest entries are kept. Files of ids no
    longer in the catalogue are removed (they are assets, not evidence)."""
    ids = sorted(CATALOGUE) if prompt_ids is None else sorted(set(prompt_ids))
    for pid in ids:
        if pid not in CATALOGUE:
            raise RenderError(f"unknown prompt id {pid!r}")
    manifest_path = out_dir / MANIFEST_NAME
    entries: dict[str, dict] = {}
    if prompt_ids is not None and manifest_path.exists():
        entries = json.loads(manifest_path.read_text("utf-8")).get("assets", {})
    for language in languages:
        voice, speed = VOICES[language]
        for pid in ids:
            prompt = CATALOGUE[pid]
            pcm = trim_silence(synthesize(prompt.text(language), voice, speed, SAMPLE_RATE), SAMPLE_RATE)
            data = encode_opus(pcm)
            name = asset_name(pid, language)
            _write_atomic(out_dir / name, data)
            entries[name] = {"prompt_id": pid, "language": language, "text_sha256": prompt.text_sha256(language),
                             "samples": int(pcm.size), "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    wanted = {asset_name(pid, lang) for pid in CATALOGUE for lang in LANGUAGES}
    entries = {name: e for name, e in entries.items() if name in wanted}
    for lang in LANGUAGES:
        for stale in sorted((out_dir / lang).glob(f"*{FILE_SUFFIX}")) if (out_dir / lang).is_dir() else []:
            if f"{lang}/{stale.name}" not in wanted:
                stale.unlink()
    manifest = {
        "format": "ogg-opus",
        "sample_rate": SAMPLE_RATE,
        "bitrate": OPUS_BITRATE,
        "voices": {lang: {"espeak_voice": v, "speed_wpm": s} for lang, (v, s) in VOICES.items()},
        "espeak_ng": espeak_version(),
        "libavcodec": ".".join(str(x) for x in av.library_versions["libavcodec"]),
        "assets": dict(sorted(entries.items())),
    }
    _write_atomic(manifest_path, (json.dumps(manifest, ensure_ascii=False, indent=1, sort_keys=True) + "\n").encode())
    return manifest


def check(assets_dir: Path = ASSETS_DIR) -> list[str]:
    """Problems with the shipped assets (empty = good): missing, stale (text changed) or altered files."""
    manifest_path = assets_dir / MANIFEST_NAME
    if not manifest_path.exists():
        return [f"{manifest_path} is missing: run python -m agent.voice_prompts.render"]
    try:
        entries = json.loads(manifest_path.read_text("utf-8"))["assets"]
    except (ValueError, KeyError) as exc:
        return [f"{manifest_path} is not a valid manifest: {exc}"]
    problems = []
    for pid, prompt in sorted(CATALOGUE.items()):
        for language in LANGUAGES:
            name = asset_name(pid, language)
            entry = entries.get(name)
            path = assets_dir / name
            if entry is None or not path.exists():
                problems.append(f"{name}: no audio rendered")
            elif entry.get("text_sha256") != prompt.text_sha256(language):
                problems.append(f"{name}: stale, the catalogue text changed since it was rendered")
            elif hashlib.sha256(path.read_bytes()).hexdigest() != entry.get("sha256"):
                problems.append(f"{name}: file does not match the manifest hash")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.voice_prompts.render", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ASSETS_DIR, help="assets directory (default: the package's)")
    parser.add_argument("--check", action="store_true", help="only check the assets against the catalogue")
    parser.add_argument("--only", nargs="+", metavar="PROMPT_ID", help="re-render just these prompt ids")
    args = parser.parse_args(argv)
    try:
        if args.check:
            problems = check(args.out)
            for p in problems:
                print(p, file=sys.stderr)
            print(f"{len(CATALOGUE) * len(LANGUAGES)} prompt assets checked, {len(problems)} problems")
            return 1 if problems else 0
        manifest = render(args.out, args.only)
    except RenderError as exc:
        print(f"render failed: {exc}", file=sys.stderr)
        return 1
    total = sum(e["size"] for e in manifest["assets"].values())
    seconds = sum(e["samples"] for e in manifest["assets"].values()) / SAMPLE_RATE
    print(f"rendered {len(manifest['assets'])} assets into {args.out}: "
          f"{total / 1024:.0f} KiB, {seconds:.0f} s of speech")
    return 0


if __name__ == "__main__":
    sys.exit(main())
