"""Voice prompts and spoken statements (R16, R17; DESIGN.md "Voice prompts and spoken statements").

    catalogue   prompt ids with zh-CN and en text, what each is for, which statement it asks for (pure data)
    render      `python -m agent.voice_prompts.render [--check]`: espeak-ng -> shipped Ogg Opus assets
    assets      PromptLibrary: decode the shipped audio to PCM for the speaker
    playback    PromptPlayer (PyAudio output on the "prompt-playback" thread) and SpeakerActivity
    detection   StatementDetector (VAD -> statement start/end, reminder, missing, MARK) and
                StatementListener (runs it on the "statement-vad" thread, fed by the capture thread)

Nothing is imported here, so reading the catalogue does not load PyAV, numpy or webrtcvad.
"""
