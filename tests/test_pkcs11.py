"""The identity key inside a real PKCS#11 token (SoftHSM2): generated there, never exported, and the
ledger it signs verifies like any other (issue 6, firmware_hooks key store)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.evidence.verify import Verifier
from agent.storage.keys import IdentityKeyError
from tests.conftest import write_segment

MODULE = next((p for p in ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
                           "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so") if Path(p).exists()), None)
pytestmark = pytest.mark.skipif(MODULE is None or shutil.which("softhsm2-util") is None,
                                reason="softhsm2 is installed by ./dev")


TOKENS = ("bwc-a", "bwc-b", "bwc-c")


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """SoftHSM reads its configuration once per process, so every token is made before the first use."""
    folder = tmp_path_factory.mktemp("softhsm")
    (folder / "tokens").mkdir()
    conf = folder / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {folder / 'tokens'}\nobjectstore.backend = file\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    for label in TOKENS:
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", "1234",
                        "--so-pin", "5678"], check=True, capture_output=True)
    return list(TOKENS)


@pytest.fixture
def token(tokens):
    return tokens.pop(0)


def test_key_generated_in_token_signs_a_verifiable_ledger(tmp_path, token, bureau_identity):
    from agent.clock import SystemClock
    from agent.storage.keys_pkcs11 import Pkcs11Signer
    from agent.storage.store import EvidenceStore

    signer = Pkcs11Signer.generate(MODULE, token, "1234")
    store = EvidenceStore(tmp_path / "dev", "BWC-HSM", signer, [bureau_identity.recipient], SystemClock())
    write_segment(store, "S1", 0)
    report = Verifier(bureau_identity).verify_path(store.data_dir)
    assert report.ok and report.signatures_ok == 2, report.problems
    signer.close()
    # the same key is found again after a restart
    again = Pkcs11Signer(MODULE, token, "1234")
    assert again.key_id == signer.key_id
    again.close()


def test_private_key_cannot_be_extracted(token):
    import pkcs11

    from agent.storage.keys_pkcs11 import Pkcs11Signer

    Pkcs11Signer.generate(MODULE, token, "1234").close()
    with pkcs11.lib(MODULE).get_token(token_label=token).open(user_pin="1234") as session:
        priv = next(session.get_objects({pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY}))
        assert priv[pkcs11.Attribute.SENSITIVE] and not priv[pkcs11.Attribute.EXTRACTABLE]
        with pytest.raises(pkcs11.PKCS11Error):
            priv[pkcs11.Attribute.VALUE]


def test_wrong_pin_and_missing_key_are_clear_errors(token):
    from agent.storage.keys_pkcs11 import Pkcs11Signer

    with pytest.raises(IdentityKeyError, match="cannot open"):
        Pkcs11Signer(MODULE, token, "0000")
    with pytest.raises(IdentityKeyError, match="no key pair labelled"):
        Pkcs11Signer(MODULE, token, "1234")
    Pkcs11Signer.generate(MODULE, token, "1234").close()
    with pytest.raises(IdentityKeyError, match="already holds"):
        Pkcs11Signer.generate(MODULE, token, "1234")
