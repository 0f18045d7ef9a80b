"""What technicians touch (issue 6, R18): provisioning against the real bureau, config validation with
errors that name the key, `status` and `selftest`."""

from __future__ import annotations

import json
import stat

import pytest

from agent.cli import main
from agent.config import ConfigError, load_config, parse_config
from agent.provision import ProvisionError, ca_fingerprint, provision
from bureau.server import BureauServer
from bureau.service import BureauConfig


@pytest.fixture
def bureau(tmp_path):
    server = BureauServer(BureauConfig(dir=tmp_path / "bureau", host="127.0.0.1", port=0), poll_interval_s=0.05)
    server.start()
    yield server
    server.stop()


def _provision(bureau, tmp_path, device_id="BWC-OPS-01", token=None, **kw):
    token = token or bureau.service.enrollment.mint_token(device_id).token
    return provision(bureau_url=bureau.base_url, token=token, device_id=device_id, data_dir=tmp_path / device_id,
                     config_file=tmp_path / f"{device_id}.toml", ca_file=tmp_path / "bureau" / "ca.pem", **kw)


def test_provision_writes_keys_with_modes_and_a_valid_config(bureau, tmp_path):
    result = _provision(bureau, tmp_path)
    assert stat.S_IMODE(result.key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(result.key_file.parent.stat().st_mode) == 0o700
    cfg = load_config(result.config_file)
    assert cfg.device.id == "BWC-OPS-01" and cfg.sync.bureau_url == bureau.base_url
    assert cfg.keys.recipients == result.recipients and cfg.keys.receipt_key == result.receipt_key_file


def test_selftest_on_the_simulator_passes_every_check_when_provisioned(bureau, tmp_path, capsys):
    result = _provision(bureau, tmp_path)
    rc = main(["selftest", "--config", str(result.config_file), "--simulate", "--json"])
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)}
    assert rc == 0, checks
    for name in ("keys", "storage", "camera", "microphone", "speaker", "buttons", "fuel gauge", "thermal",
                 "dock line", "bureau"):
        assert checks[name]["result"] == "PASS", checks[name]
    assert checks["gps"]["result"] == "SKIP"


def test_wrong_and_reused_tokens_are_refused_clearly(bureau, tmp_path):
    with pytest.raises(ProvisionError, match="invalid_token"):
        _provision(bureau, tmp_path, token="not-a-real-token-" + "x" * 26)
    token = bureau.service.enrollment.mint_token("BWC-OPS-02").token
    _provision(bureau, tmp_path, "BWC-OPS-02", token=token)
    with pytest.raises(ProvisionError, match="token_used"):
        provision(bureau_url=bureau.base_url, token=token, device_id="BWC-OPS-02", data_dir=tmp_path / "other",
                  config_file=tmp_path / "other.toml", ca_file=tmp_path / "bureau" / "ca.pem")


def test_rerunning_provision_is_safe_and_replacing_an_identity_needs_force(bureau, tmp_path):
    first = _provision(bureau, tmp_path)
    key_before = first.key_file.read_bytes()
    with pytest.raises(ProvisionError, match="already enrolled.*--force"):
        _provision(bureau, tmp_path)
    assert first.key_file.read_bytes() == key_before
    second = _provision(bureau, tmp_path, force=True)
    assert second.key_file.read_bytes() != key_before
    retired = [p for p in first.key_file.parent.glob("device-key.retired-*.pem") if ".cert" not in p.name]
    assert len(retired) == 1 and retired[0].read_bytes() == key_before  # never deleted


def test_interrupted_provisioning_resumes_with_the_same_key(bureau, tmp_path):
    from agent.storage.keys import PemFileSigner

    key = PemFileSigner.generate(tmp_path / "BWC-OPS-03" / "keys" / "device-key.pem")
    result = _provision(bureau, tmp_path, "BWC-OPS-03")
    assert result.reused_key and result.key_file.read_bytes() == key.path.read_bytes()


def test_ca_is_pinned_by_fingerprint_or_refused(bureau, tmp_path):
    fp = ca_fingerprint((tmp_path / "bureau" / "ca.pem").read_bytes())
    token = bureau.service.enrollment.mint_token("BWC-OPS-04").token
    with pytest.raises(ProvisionError, match="refusing to trust"):
        provision(bureau_url=bureau.base_url, token=token, device_id="BWC-OPS-04", data_dir=tmp_path / "d4",
                  config_file=tmp_path / "d4.toml", ca_fingerprint_hex="00" * 32)
    result = provision(bureau_url=bureau.base_url, token=token, device_id="BWC-OPS-04", data_dir=tmp_path / "d4",
                       config_file=tmp_path / "d4.toml", ca_fingerprint_hex=fp)
    assert result.ca_file.read_bytes() == (tmp_path / "bureau" / "ca.pem").read_bytes()


CONFIG_CASES = [
    ({"recording": {"segmnt_s": 60}}, "unknown key 'recording.segmnt_s'"),
    ({"devise": {"id": "X"}}, "unknown key 'devise'"),
    ({"recording": {"pre_event_s": 121}}, "'recording.pre_event_s' = 121: Input should be less than or equal to 120"),
    ({"recording": {"segment_s": "sixty"}}, "'recording.segment_s' = 'sixty'"),
    ({"recording": {"bitrate_bps": 100}}, "'recording.bitrate_bps' = 100: Input should be greater than or equal"),
    ({"device": {"id": "bad id!"}}, "'device.id' = 'bad id!': String should match pattern"),
    ({"device": {"language": "fr"}}, "'device.language' = 'fr'"),
    ({"session": {"category": "penalty", "stage": "teatime"}}, "unknown enforcement stage penalty/teatime"),
    ({"statements": {"reminder_after_s": 30, "missing_after_s": 20}}, "missing_after_s (20.0) must exceed"),
    ({"power": {"critical_percent": 10, "low_percent": 5}}, "critical_percent (10) must be below low_percent (5)"),
    ({"power": {"warn_percent": [3]}}, "warn_percent [3] must lie between low_percent and 100"),
    ({"keys": {"recipients": ["age1nope"]}}, "is not an age X25519 recipient"),
    ({"sync": {"bureau_url": "http://bureau"}}, "'sync.bureau_url' = 'http://bureau': String should match pattern"),
    ({"sync": {"day_end_local": "25:00"}}, "'sync.day_end_local' = '25:00'"),
    ({"hardware": {"camera": "gopro"}}, "'hardware.camera' = 'gopro'"),
]


@pytest.mark.parametrize("data,message", CONFIG_CASES, ids=[m[:40] for _, m in CONFIG_CASES])
def test_each_invalid_config_gives_its_specific_error(data, message):
    with pytest.raises(ConfigError) as err:
        parse_config(data, "agent.toml")
    assert message in str(err.value) and str(err.value).startswith("agent.toml: ")


def test_unreadable_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[recording\nsegment_s = 5\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_cli_reports_invalid_config_and_exits_2(tmp_path, capsys):
    bad = tmp_path / "agent.toml"
    bad.write_text("[recording]\nsegmnt_s = 5\n")
    with pytest.raises(SystemExit) as exc:
        main(["selftest", "--config", str(bad)])
    assert exc.value.code == 2 and "unknown key 'recording.segmnt_s'" in capsys.readouterr().err


def test_status_shows_queue_storage_and_alarms(store, capsys):
    from tests.conftest import write_segment

    write_segment(store, "S1", 0)
    store.ledger.append("alarm", {"code": "upload_overdue", "severity": "critical", "detail": "1 segment late"})
    assert main(["status", "--data-dir", str(store.data_dir)]) == 0
    out = capsys.readouterr().out
    assert "CLOSED 1" in out and "critical: upload_overdue" in out and "min of recording left" in out
    assert main(["status", "--data-dir", str(store.data_dir), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["segments"] == {"CLOSED": 1} and data["ledger_head_seq"] == 3


def test_provision_takes_the_mqtt_endpoint_from_the_enrollment_answer(tmp_path):
    server = BureauServer(BureauConfig(dir=tmp_path / "bureau", host="127.0.0.1", port=0,
                                       mqtt_url="mqtts://127.0.0.1:18883"), poll_interval_s=0.05)
    server.start()
    try:
        cfg = load_config(_provision(server, tmp_path, "BWC-OPS-05").config_file)
    finally:
        server.stop()
    assert (cfg.sync.mqtt_host, cfg.sync.mqtt_port) == ("127.0.0.1", 18883)


def test_replacing_an_identity_hands_the_ledger_over_with_a_signed_key_change(bureau, tmp_path):
    from agent.clock import SystemClock
    from agent.evidence.age import Recipient
    from agent.evidence.verify import Verifier
    from agent.storage.keys import PemFileSigner
    from agent.storage.store import EvidenceStore
    from tests.conftest import write_segment

    first = _provision(bureau, tmp_path)
    recipients = [Recipient.parse(r) for r in first.recipients]
    store = EvidenceStore(tmp_path / "BWC-OPS-01", "BWC-OPS-01", PemFileSigner.load(first.key_file), recipients,
                          SystemClock())
    write_segment(store, "S1", 0)
    store.close()
    with open(first.config_file, "a") as fh:
        fh.write("\n[lens]\ncovered_s = 42.0\n")  # a technician's hand edit
    second = _provision(bureau, tmp_path, force=True)
    assert load_config(second.config_file).lens.covered_s == 42.0  # kept
    # the agent with the new key starts on the same ledger, and the chain verifies across the change
    again = EvidenceStore(tmp_path / "BWC-OPS-01", "BWC-OPS-01", PemFileSigner.load(second.key_file), recipients,
                          SystemClock())
    write_segment(again, "S2", 0)
    changes = [r.fields["body"] for r in again.ledger.records(rtype="key_change") if
               r.fields["body"]["kind"] == "identity"]
    again.close()
    assert len(changes) == 1 and "previous key" in changes[0]["detail"]
    report = Verifier().verify_path(tmp_path / "BWC-OPS-01")
    assert report.ok, report.problems
