"""The README's main job: `bwc-agent demo` runs a whole simulated shift and reports a verified, fully
receipted shift (issue 6). Real time, about three minutes."""

from __future__ import annotations

import subprocess
import sys

from agent.cli import main


def test_demo_reports_a_verified_fully_receipted_shift(tmp_path, capsys):
    work = tmp_path / "demo"
    assert main(["demo", "--workdir", str(work)]) == 0
    out = capsys.readouterr().out
    assert "RESULT: shift recorded, uploaded, receipted and verified" in out
    assert "opening statement   given" in out and "reason stated" in out and "compliant           yes" in out
    assert "decodes cleanly: h264" in out
    assert "telemetry received" in out and "ledger event summaries" in out  # over the bureau's MQTT broker
    # The documented layout, checkable with the stock tools.
    for path in ("device/ledger.db", "device/journal.jsonl", "bureau-identity.txt", "agent.toml"):
        assert (work / path).exists(), path
    store = work / "bureau" / "store" / "BWC-DEMO-0001"
    verify = subprocess.run([sys.executable, "-m", "agent.cli", "verify", str(store), "--identity",
                             str(work / "bureau-identity.txt")], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout
    segment = sorted((store / "segments").glob("*.age"))[0]
    plain = subprocess.run(["age", "-d", "-i", str(work / "bureau-identity.txt"), str(segment)], capture_output=True,
                           check=True).stdout
    probe = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "stream=codec_name", "-of", "csv=p=0", "-"],
                           input=plain, capture_output=True, check=True)
    assert probe.stdout.split() == [b"h264", b"aac"]


def test_demo_refuses_a_non_empty_workdir(tmp_path):
    (tmp_path / "something").write_text("x")
    assert main(["demo", "--workdir", str(tmp_path)]) == 2
