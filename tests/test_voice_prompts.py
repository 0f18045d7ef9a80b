"""Voice prompts and spoken-statement detection (R16, R17; DESIGN.md "Voice prompts and spoken statements").

Prompts: every catalogue id has shipped audio in every language, fresh, audible and of plausible length;
the render is deterministic; playback goes through the PyAudio API into hw_sim's speaker log.
Statements: VAD on microphone PCM finds the statement's start and end in silence and street noise, never
takes noise, bangs, coughs or the device's own prompt for a statement, and runs the timeout -> reminder ->
missing sequence; MARK confirms. Audio comes from hw_sim.speech (espeak-ng speech, generated noise).
"""

from __future__ import annotations

import functools
import hashlib
import json
import queue
import re
import shutil
import threading
from pathlib import Path

import av
import numpy as np
import pytest

from agent.evidence.records import InterruptionReason, validate_body
from agent.voice_prompts import render
from agent.voice_prompts.assets import PromptLibrary
from agent.voice_prompts.catalogue import (
    CATALOGUE,
    LANGUAGES,
    MARKER_STEPS,
    PromptError,
    StatementKind,
    interruption_prompt,
    marker_prompt,
    menu_reason_prompt,
    menu_step_prompt,
    reminder_prompt,
)
from agent.voice_prompts.detection import (
    PcmFormatError,
    SpeechEvent,
    StatementDetector,
    StatementEvent,
    StatementListener,
    VadConfig,
)
from agent.voice_prompts.playback import PlaybackResult, PromptPlayer, SpeakerActivity
from hw_sim import speech
from hw_sim.speaker import SpeakerLog

US = 1_000_000
T0 = 5 * US  # monotonic time of the first microphone sample in each scenario
START_TOLERANCE_S = 0.3
END_TOLERANCE_S = 0.5
LIBRARY = PromptLibrary()


@functools.cache
def spoken(text: str, language: str, rate: int, variant: str | None = None, speed_wpm: int = 160) -> np.ndarray:
    return speech.synthesize(text, language, rate, speed_wpm, variant)


def feed(detector: StatementDetector, pcm: np.ndarray, start_us: int = T0, chunk_s: float = 0.02) -> list:
    """Deliver `pcm` the way the capture thread does: fixed-size chunks stamped with their first sample."""
    rate = detector.cfg.sample_rate
    step = int(chunk_s * rate)
    events = []
    for i in range(0, pcm.size, step):
        events += detector.process(pcm[i:i + step].tobytes(), start_us + i * US // rate)
    return events


def with_speech(voice: np.ndarray, at: float, rate: int = 16_000, after_s: float = 4.0) -> np.ndarray:
    """Silence with `voice` placed at `at` seconds and `after_s` of silence after it."""
    return speech.mix(speech.silence(at + voice.size / rate + after_s, rate), voice, at, rate)


def statements(events: list) -> list[tuple[str, str]]:
    return [(e.event, e.detected_by) for e in events if isinstance(e, StatementEvent)]


def at_s(events: list, event: str) -> float:
    [match] = [e for e in events if isinstance(e, StatementEvent) and e.event == event]
    return (match.at_us - T0) / US


# --- catalogue and shipped audio --------------------------------------------------------------------


def test_every_prompt_has_fresh_audio_in_every_language():
    assert LIBRARY.missing(LANGUAGES) == []
    assert render.check() == []  # rendered from the current wording, files untouched since


def test_prompt_audio_is_audible_mono_speech_of_plausible_length():
    seconds_per_char = {"zh-CN": (0.15, 0.8), "en": (0.03, 0.15)}
    for prompt_id, prompt in CATALOGUE.items():
        for language in LANGUAGES:
            with av.open(str(LIBRARY.path(prompt_id, language))) as container:
                assert container.streams.audio[0].codec_context.layout.nb_channels == 1
            pcm = np.frombuffer(LIBRARY.pcm(prompt_id, language, 16_000), dtype="<i2").astype(np.float64)
            seconds = pcm.size / 16_000
            chars = len(prompt.text(language))
            low, high = seconds_per_char[language]
            assert low * chars <= seconds <= high * chars + 0.5, (prompt_id, language, seconds)
            rms_dbfs = 20 * np.log10(np.sqrt(np.mean(pcm ** 2)) / 32768)
            assert rms_dbfs > -35, (prompt_id, language, rms_dbfs)
            # speech, not a click: at least a third of it is loud
            frames = pcm[: pcm.size // 480 * 480].reshape(-1, 480)
            assert np.mean(np.sqrt(np.mean(frames ** 2, axis=1)) > 300) > 0.33, (prompt_id, language)


def test_shipped_prompt_audio_stays_small():
    manifest = json.loads((render.ASSETS_DIR / render.MANIFEST_NAME).read_text())
    total = sum(e["size"] for e in manifest["assets"].values())
    assert manifest["sample_rate"] == 16_000 and manifest["format"] == "ogg-opus"
    assert total < 2 * 1024 * 1024  # 16 kHz WAV of the same speech would be ~15 MB


def test_render_is_deterministic_and_matches_the_shipped_files_on_the_same_toolchain(tmp_path):
    ids = ["docked", "interruption_obstruction"]
    render.render(tmp_path / "a", ids)
    render.render(tmp_path / "b", ids)
    shipped = json.loads((render.ASSETS_DIR / render.MANIFEST_NAME).read_text())
    for pid in ids:
        for lang in LANGUAGES:
            name = render.asset_name(pid, lang)
            first, second = (tmp_path / "a" / name).read_bytes(), (tmp_path / "b" / name).read_bytes()
            assert first == second
            same_tools = (shipped["espeak_ng"] == render.espeak_version()
                          and shipped["libavcodec"] == ".".join(map(str, av.library_versions["libavcodec"])))
            if same_tools:
                assert hashlib.sha256(first).hexdigest() == shipped["assets"][name]["sha256"]


def test_render_check_names_stale_and_missing_audio(tmp_path):
    assets = tmp_path / "assets"
    shutil.copytree(render.ASSETS_DIR, assets)
    manifest = json.loads((assets / render.MANIFEST_NAME).read_text())
    manifest["assets"]["en/docked.opus"]["text_sha256"] = "0" * 64  # as if the wording changed after rendering
    (assets / render.MANIFEST_NAME).write_text(json.dumps(manifest))
    (assets / "zh-CN" / "upload_complete.opus").unlink()
    problems = render.check(assets)
    assert problems == ["en/docked.opus: stale, the catalogue text changed since it was rendered",
                        "zh-CN/upload_complete.opus: no audio rendered"]
    assert render.main(["--check", "--out", str(assets)]) == 1


def test_catalogue_covers_r16_r17_r9_and_the_voice_menu():
    from agent.policy import MARKER_STEPS as POLICY_MARKER_STEPS  # the session side's list of markable steps

    for reason in InterruptionReason:
        assert CATALOGUE[interruption_prompt(reason.value)].zh_cn.startswith("录像中断")
        menu_reason_prompt(reason.value)
    assert set(MARKER_STEPS) == set(POLICY_MARKER_STEPS)
    for step in POLICY_MARKER_STEPS:
        marker_prompt(step)
        menu_step_prompt(step)
    for kind in StatementKind:
        reminder_prompt(kind)
    expects = {p.expects for p in CATALOGUE.values() if p.expects}
    assert expects == set(StatementKind)
    assert CATALOGUE["session_started_opening_statement"].expects is StatementKind.OPENING
    assert CATALOGUE["state_interruption_reason"].expects is StatementKind.INTERRUPTION_REASON
    assert CATALOGUE["notice_to_party"].audience == "party"
    for pid in ("statement_missing", "session_stopped", "stop_refused_full_process", "stop_confirmed_mandatory",
                "unable_to_continue", "written_explanation_required", "recording_reminder", "battery_warning",
                "battery_very_low", "critical_battery_shutdown", "storage_low", "docked", "upload_started",
                "upload_complete", "safe_to_remove", "upload_overdue", "menu_mark_step",
                "menu_declare_interruption"):
        assert CATALOGUE[pid].zh_cn and CATALOGUE[pid].en
    with pytest.raises(PromptError, match="unknown prompt id 'no_such_prompt'"):
        LIBRARY.path("no_such_prompt", "en")
    with pytest.raises(PromptError, match="unknown prompt language 'fr'"):
        LIBRARY.path("docked", "fr")


def test_every_prompt_the_session_machine_says_is_in_the_catalogue():
    source = (Path(__file__).parents[1] / "agent" / "session.py").read_text()
    literal_ids = set(re.findall(r"""(?:play|_say)\(\s*"([a-z0-9_]+)\"""", source))
    if not literal_ids:
        pytest.skip("the session machine names no prompt ids literally any more")
    assert sorted(literal_ids - set(CATALOGUE)) == []


# --- playback through the PyAudio API -----------------------------------------------------------------


def _player(speaker: SpeakerLog, results: queue.Queue, activity: SpeakerActivity | None = None,
            language: str = "zh-CN") -> PromptPlayer:
    clock = iter(range(10 * US, 10**12, 100_000))  # each reading 0.1 s later
    return PromptPlayer(speaker, LIBRARY, language, clock_mono_us=lambda: next(clock),
                        on_finished=results.put, activity=activity)


def test_player_plays_prompts_in_order_and_the_speaker_log_identifies_them():
    speaker, results, activity = SpeakerLog(), queue.Queue(), SpeakerActivity()
    player = _player(speaker, results, activity)
    player.start()
    try:
        ids = ["session_started_opening_statement", "notice_prompt", "marker_questioning"]
        for pid in ids:
            assert player.play(pid)
        assert player.play("upload_complete", language="en")
        assert speaker.wait_for_clips(4, timeout=10)
    finally:
        player.stop()
    assert speaker.played_prompts(LIBRARY) == ids + ["upload_complete"]
    clips = speaker.clips
    assert all(c.rate == 16_000 and c.channels == 1 and c.sample_width == 2 for c in clips)
    assert clips[0].pcm == LIBRARY.pcm("session_started_opening_statement", "zh-CN")
    done = [results.get(timeout=5) for _ in range(4)]
    assert [r.prompt_id for r in done] == ids + ["upload_complete"]
    assert all(r.completed and r.error is None for r in done)
    first = done[0]
    assert first.ended_us - first.started_us >= int(LIBRARY.duration_s(first.prompt_id, "zh-CN") * US) - 1
    # the detector will ignore the microphone while each prompt sounds
    assert activity.overlaps(first.started_us + 1, first.started_us + 2)
    assert activity.overlaps(first.ended_us, first.ended_us + 1)  # echo tail


def test_interrupting_prompt_cuts_the_current_one_and_drops_the_queue():
    gate = threading.Event()
    speaker, results = SpeakerLog(pace=lambda _s: gate.wait(5)), queue.Queue()
    player = _player(speaker, results)
    player.start()
    try:
        player.play("session_started_opening_statement")
        player.play("recording_reminder")
        # the first chunk of the long prompt is being written (its write blocks on the gate)
        for _ in range(500):
            if speaker.clips:
                break
            threading.Event().wait(0.01)
        player.play("critical_battery_shutdown", interrupt=True)
        gate.set()
        assert speaker.wait_for_clips(2, timeout=10)
    finally:
        player.stop()
    assert speaker.played_prompts(LIBRARY) == ["?", "critical_battery_shutdown"]  # the first was cut short
    cut, played = results.get(timeout=5), results.get(timeout=5)
    assert (cut.prompt_id, cut.completed) == ("session_started_opening_statement", False)
    assert (played.prompt_id, played.completed) == ("critical_battery_shutdown", True)
    assert results.empty()  # the reminder queued before the interruption was dropped


def test_speaker_fault_is_reported_and_playback_recovers():
    speaker, results = SpeakerLog(), queue.Queue()
    speaker.fail_open = True
    player = _player(speaker, results, language="en")
    player.start()
    try:
        player.play("docked")
        failed: PlaybackResult = results.get(timeout=5)
        speaker.fail_open = False
        player.play("safe_to_remove")
        ok: PlaybackResult = results.get(timeout=5)
    finally:
        player.stop()
    assert failed.completed is False and "Invalid output device" in failed.error
    assert ok.completed and speaker.played_prompts(LIBRARY, "en") == ["safe_to_remove"]
    assert player.failures == 1


def test_play_rejects_unknown_prompt_and_counts_a_full_queue():
    player = PromptPlayer(SpeakerLog(), LIBRARY, "en", clock_mono_us=lambda: 0, max_queued=1)  # not started
    with pytest.raises(PromptError):
        player.play("no_such_prompt")
    assert player.play("docked") is True
    assert player.play("docked") is False
    assert player.dropped == 1


# --- statement detection ----------------------------------------------------------------------------


@pytest.mark.parametrize("language,rate,noise_dbfs,variant,speed_wpm", [
    ("zh-CN", 16_000, None, None, 160), ("zh-CN", 48_000, -32.0, None, 160), ("zh-CN", 16_000, -32.0, "f3", 200),
    ("en", 16_000, -32.0, None, 160), ("en", 48_000, None, None, 160), ("en", 16_000, -30.0, "f2", 130)])
def test_statement_start_and_end_are_found_in_silence_and_street_noise(language, rate, noise_dbfs, variant,
                                                                       speed_wpm):
    text = speech.INTERRUPTION_EXPLANATIONS[language][0] if language == "zh-CN" else speech.OPENING_STATEMENTS["en"][0]
    voice = spoken(text, language, rate, variant, speed_wpm)
    first, last = speech.speech_extent(voice, rate)
    lead = 4.0
    length = lead + voice.size / rate + 4.0
    bed = speech.silence(length, rate) if noise_dbfs is None else speech.street_noise(length, rate, noise_dbfs, seed=7)
    detector = StatementDetector(VadConfig(sample_rate=rate))
    detector.expect("opening", since_us=T0)
    events = feed(detector, speech.mix(bed, voice, lead, rate))
    assert statements(events) == [("start", "vad"), ("end", "vad")]
    assert at_s(events, "start") == pytest.approx(lead + first, abs=START_TOLERANCE_S)
    assert at_s(events, "end") == pytest.approx(lead + last, abs=END_TOLERANCE_S)
    assert detector.expecting is None
    body = next(e for e in events if isinstance(e, StatementEvent)).record_body("S-1")
    assert validate_body("statement", body)["kind"] == "opening"


def test_interruption_explanation_on_resume_is_logged_with_its_interruption():
    voice = spoken(speech.INTERRUPTION_EXPLANATIONS["zh-CN"][1], "zh-CN", 16_000)
    detector = StatementDetector(VadConfig())
    detector.expect(StatementKind.INTERRUPTION_REASON, since_us=T0, interruption_id="I2")
    bed = speech.street_noise(voice.size / 16_000 + 6, 16_000, -40, seed=3)
    events = feed(detector, speech.mix(bed, voice, 2.0))
    found = [e for e in events if isinstance(e, StatementEvent)]
    assert [(e.kind, e.event, e.interruption_id) for e in found] == [
        ("interruption_reason", "start", "I2"), ("interruption_reason", "end", "I2")]


NOISE_S = 32.0


def _door_slams_in_the_street(rate: int) -> np.ndarray:
    scene = speech.street_noise(NOISE_S, rate, -40, seed=11)
    for k in range(10):
        scene = speech.mix(scene, speech.door_slam(rate, seed=k), 1 + 3 * k, rate)
    return scene


def _coughs(rate: int) -> np.ndarray:
    scene = speech.silence(NOISE_S, rate)
    for k in range(10):
        scene = speech.mix(scene, speech.cough(rate, seed=k), 1 + 3 * k, rate)
    return scene


def _car_horns(rate: int) -> np.ndarray:
    scene = speech.street_noise(NOISE_S, rate, -40, seed=12, horn=False)
    for k in range(4):
        scene = speech.mix(scene, speech.car_horn(0.5 + k, rate), 1 + 7 * k, rate)  # held 0.5 s to 3.5 s
    return scene


@pytest.mark.parametrize("scene", ["silence", "street_noise", "loud_street_noise", "white_noise", "door_slams",
                                   "coughs", "car_horns"])
@pytest.mark.parametrize("rate", [16_000, 48_000])
def test_noise_silence_and_short_bangs_are_never_a_statement(scene, rate):
    audio = {
        "silence": lambda: speech.silence(NOISE_S, rate),
        "street_noise": lambda: speech.street_noise(NOISE_S, rate, -38, seed=1, vehicles=4),
        "loud_street_noise": lambda: speech.street_noise(NOISE_S, rate, -22, seed=2, vehicles=4),
        "white_noise": lambda: speech.white_noise(NOISE_S, rate, -30),
        "door_slams": lambda: _door_slams_in_the_street(rate),
        "coughs": lambda: _coughs(rate),
        "car_horns": lambda: _car_horns(rate),
    }[scene]()
    detector = StatementDetector(VadConfig(sample_rate=rate, reminder_after_s=10, missing_after_s=30))
    detector.expect("opening", since_us=T0)
    events = feed(detector, audio)
    assert [e for e in events if isinstance(e, SpeechEvent)] == []
    assert statements(events) == [("reminder", "timeout"), ("missing", "timeout")]


def test_a_single_word_is_not_a_statement_but_what_follows_is():
    word = spoken("喂？", "zh-CN", 16_000)
    voice = spoken(speech.INTERRUPTION_EXPLANATIONS["zh-CN"][0], "zh-CN", 16_000)
    scene = speech.mix(with_speech(voice, 5.0), word, 1.0)
    detector = StatementDetector(VadConfig())
    detector.expect("interruption_reason", since_us=T0)
    events = feed(detector, scene)
    assert statements(events) == [("start", "vad"), ("end", "vad")]
    assert at_s(events, "start") == pytest.approx(5.0 + speech.speech_extent(voice)[0], abs=START_TOLERANCE_S)


def test_no_speech_gives_a_reminder_then_missing_at_the_configured_timeouts():
    detector = StatementDetector(VadConfig(reminder_after_s=5, missing_after_s=12))
    detector.expect("notice", since_us=T0 + 1 * US)
    events = feed(detector, speech.street_noise(20, 16_000, -40, seed=5))
    assert statements(events) == [("reminder", "timeout"), ("missing", "timeout")]
    assert at_s(events, "reminder") == pytest.approx(6.0, abs=0.05)
    assert at_s(events, "missing") == pytest.approx(13.0, abs=0.05)
    assert detector.expecting is None


def test_statement_after_the_reminder_is_still_detected():
    voice = spoken(speech.NOTICES["zh-CN"][0], "zh-CN", 16_000)
    detector = StatementDetector(VadConfig(reminder_after_s=4, missing_after_s=30))
    detector.expect("notice", since_us=T0)
    events = feed(detector, with_speech(voice, 6.0))
    assert statements(events) == [("reminder", "timeout"), ("start", "vad"), ("end", "vad")]


def test_timeout_waits_for_speech_that_has_just_begun():
    voice = spoken(speech.INTERRUPTION_EXPLANATIONS["en"][0], "en", 16_000)
    detector = StatementDetector(VadConfig(reminder_after_s=5, missing_after_s=30))
    detector.expect("interruption_reason", since_us=T0)
    # speech starts 0.4 s before the reminder is due; the VAD needs ~0.6 s to be sure it is speech
    events = feed(detector, with_speech(voice, 4.6 - speech.speech_extent(voice)[0]))
    assert statements(events) == [("start", "vad"), ("end", "vad")]


def test_mark_confirms_a_statement_the_vad_did_not_hear():
    detector = StatementDetector(VadConfig(reminder_after_s=5, missing_after_s=10))
    detector.expect("opening", since_us=T0)
    events = feed(detector, speech.silence(3, 16_000))
    events += detector.confirm_by_mark(T0 + 3 * US)
    events += feed(detector, speech.silence(30, 16_000), start_us=T0 + 3 * US)
    assert statements(events) == [("confirmed", "mark")]
    assert at_s(events, "confirmed") == 3.0
    assert detector.expecting is None


def test_mark_during_the_statement_keeps_its_start_and_end():
    voice = spoken(speech.OPENING_STATEMENTS["en"][0], "en", 16_000)
    scene = with_speech(voice, 2.0)
    detector = StatementDetector(VadConfig())
    detector.expect("opening", since_us=T0)
    events = feed(detector, scene[: 6 * 16_000])
    events += detector.confirm_by_mark(T0 + 6 * US)
    events += feed(detector, scene[6 * 16_000:], start_us=T0 + 6 * US)
    assert statements(events) == [("start", "vad"), ("confirmed", "mark"), ("end", "vad")]


def test_mark_with_no_statement_expected_is_not_a_confirmation():
    detector = StatementDetector(VadConfig())
    assert detector.confirm_by_mark(T0) == []


def test_the_devices_own_prompt_on_the_microphone_is_not_the_statement():
    prompt = np.frombuffer(LIBRARY.pcm("session_started_opening_statement", "zh-CN"), dtype="<i2")
    voice = spoken(speech.NOTICES["zh-CN"][0], "zh-CN", 16_000)
    prompt_s = prompt.size / 16_000
    activity = SpeakerActivity()
    activity.add(T0 + US, T0 + US + int(prompt_s * US))
    statement_at = 1.0 + prompt_s + 2.0
    scene = speech.mix(with_speech(voice, statement_at), prompt, 1.0)
    detector = StatementDetector(VadConfig(), activity=activity)
    detector.expect("opening", since_us=T0)  # armed when the prompt was requested, before it played
    events = feed(detector, scene)
    assert statements(events) == [("start", "vad"), ("end", "vad")]
    assert at_s(events, "start") == pytest.approx(statement_at + speech.speech_extent(voice)[0], abs=START_TOLERANCE_S)


def test_a_stalled_microphone_still_gets_reminder_and_missing_from_ticks():
    detector = StatementDetector(VadConfig(reminder_after_s=5, missing_after_s=10))
    detector.expect("opening", since_us=T0)
    events = feed(detector, speech.silence(1, 16_000))
    events += detector.tick(T0 + 6 * US)
    events += detector.tick(T0 + 11 * US)
    assert statements(events) == [("reminder", "timeout"), ("missing", "timeout")]


def test_a_gap_in_the_audio_restarts_framing_at_the_new_timestamps():
    voice = spoken(speech.NOTICES["en"][0], "en", 16_000)
    detector = StatementDetector(VadConfig(reminder_after_s=60, missing_after_s=120))
    detector.expect("notice", since_us=T0)
    events = feed(detector, speech.silence(2.01, 16_000))
    gap_start = T0 + 10 * US  # 8 s of samples never arrived (a microphone overflow)
    events += feed(detector, with_speech(voice, 1.0), start_us=gap_start)
    assert detector.discontinuities == 1
    start = next(e for e in events if isinstance(e, StatementEvent) and e.event == "start")
    assert (start.at_us - gap_start) / US == pytest.approx(1.0 + speech.speech_extent(voice)[0], abs=START_TOLERANCE_S)


def test_bad_pcm_and_bad_config_are_clear_errors():
    detector = StatementDetector(VadConfig())
    with pytest.raises(PcmFormatError, match="not whole 16-bit samples"):
        detector.process(b"\x00\x01\x02", T0)
    with pytest.raises(ValueError, match="missing_after_s"):
        VadConfig(reminder_after_s=30, missing_after_s=20)
    with pytest.raises(ValueError, match="sample_rate"):
        VadConfig(sample_rate=44_100)
    with pytest.raises(ValueError, match="unexpected|extra"):
        VadConfig(agressiveness=3)


def test_listener_detects_on_its_own_thread_and_never_blocks_the_capture_thread():
    voice = spoken(speech.NOTICES["en"][0], "en", 48_000)
    scene = with_speech(voice, 1.0, 48_000)
    received: queue.Queue = queue.Queue()
    threads = set()

    def on_event(event):
        threads.add(threading.current_thread().name)
        received.put(event)

    step = 960  # 20 ms chunks, as a 48 kHz PyAudio callback would deliver them
    detector = StatementDetector(VadConfig(sample_rate=48_000))
    listener = StatementListener(detector, on_event, clock_mono_us=lambda: T0, max_chunks=scene.size // step + 1)
    listener.expect("notice", since_us=T0)
    for i in range(0, scene.size, step):
        assert listener.offer(scene[i:i + step].tobytes(), T0 + i * US // 48_000)
    listener.start()
    try:
        got = []
        while not any(isinstance(e, StatementEvent) and e.event == "end" for e in got):
            got.append(received.get(timeout=10))
    finally:
        listener.stop()
    assert [(e.event, e.detected_by) for e in got if isinstance(e, StatementEvent)] == [("start", "vad"),
                                                                                       ("end", "vad")]
    assert [e.event for e in got if isinstance(e, SpeechEvent)] == ["started", "ended"]
    assert threads == {"statement-vad"}

    full = StatementListener(StatementDetector(VadConfig()), on_event, lambda: T0, max_chunks=2)  # not started
    assert [full.offer(b"\x00\x00" * 320, T0 + i * 20_000) for i in range(3)] == [True, True, False]
    assert full.dropped_chunks == 1


def test_synthesised_statement_wavs_carry_their_true_speech_times(tmp_path):
    clips = speech.write_statement_wavs(tmp_path, rate=16_000, noise_dbfs=-40)
    assert {(c.kind, c.language) for c in clips} == {(k, lang) for k in ("opening", "notice", "interruption_reason")
                                                    for lang in ("zh-CN", "en")}
    for clip in clips:
        pcm, rate = speech.read_wav(clip.path)
        detector = StatementDetector(VadConfig(sample_rate=rate, reminder_after_s=60, missing_after_s=120))
        detector.expect(clip.kind, since_us=T0)
        events = feed(detector, pcm)
        assert statements(events) == [("start", "vad"), ("end", "vad")], clip.path.name
        assert at_s(events, "start") == pytest.approx(clip.speech_start_s, abs=START_TOLERANCE_S)
        assert at_s(events, "end") == pytest.approx(clip.speech_end_s, abs=END_TOLERANCE_S)


def test_time_the_device_spends_talking_does_not_count_toward_the_timeouts():
    activity = SpeakerActivity(tail_us=300_000)
    activity.add(T0 + 1 * US, T0 + 11 * US)  # a 10 s prompt, requested at T0
    detector = StatementDetector(VadConfig(reminder_after_s=5, missing_after_s=12), activity=activity)
    detector.expect("opening", since_us=T0)
    events = feed(detector, speech.silence(40, 16_000))
    assert statements(events) == [("reminder", "timeout"), ("missing", "timeout")]
    assert at_s(events, "reminder") == pytest.approx(5 + 10.3, abs=0.05)
    assert at_s(events, "missing") == pytest.approx(12 + 10.3, abs=0.05)


def test_statement_spoken_into_the_simulated_microphone_is_detected_off_the_capture_thread(tmp_path):
    from hw_sim.clock import SimClock
    from hw_sim.pyaudio import AudioSimulator, WavSignal

    rate = 48_000
    voice = spoken(speech.NOTICES["en"][0], "en", rate)
    scene = speech.mix(speech.street_noise(2.0 + voice.size / rate + 3.0, rate, -42, seed=4), voice, 2.0, rate)
    clock = SimClock()
    mic = AudioSimulator(clock, WavSignal(speech.write_wav(tmp_path / "notice.wav", scene, rate)))
    received: queue.Queue = queue.Queue()
    listener = StatementListener(StatementDetector(VadConfig(sample_rate=rate)), received.put, clock.mono_us,
                                 max_chunks=512)
    capture_threads = set()

    def on_audio(data, frame_count, time_info, status):  # PortAudio's callback thread: hand over and return
        capture_threads.add(threading.current_thread().name)
        listener.offer(data, round(time_info["input_buffer_adc_time"] * US))
        return None, mic.module.paContinue

    stream_start = clock.mono_us()
    listener.expect("notice", since_us=stream_start)
    listener.start()
    pa = mic.module.PyAudio()
    stream = pa.open(format=mic.module.paInt16, channels=1, rate=rate, input=True, frames_per_buffer=960,
                     stream_callback=on_audio)
    clock.set_rate(20)  # 20x real time
    try:
        got = []
        while not any(isinstance(e, StatementEvent) and e.event == "end" for e in got):
            got.append(received.get(timeout=20))
    finally:
        stream.close()
        pa.terminate()
        listener.stop()
    start = next(e for e in got if isinstance(e, StatementEvent) and e.event == "start")
    first, last = speech.speech_extent(voice, rate)
    assert (start.at_us - stream_start) / US == pytest.approx(2.0 + first, abs=START_TOLERANCE_S)
    assert capture_threads == {"sim-portaudio"} and listener.dropped_chunks == 0
