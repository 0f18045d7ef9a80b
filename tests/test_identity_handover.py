"""A device whose key is replaced (`provision --force`) goes on with the same ledger: the bureau accepts the
signed hand-over and everything recorded before and after is receipted and verifies (R5, R18)."""

from __future__ import annotations

from agent.clock import SystemClock
from agent.evidence.age import Identity, Recipient
from agent.evidence.receipts import ReceiptVerifier
from agent.evidence.signing import load_public_key
from agent.evidence.verify import Verifier
from agent.provision import provision
from agent.storage.keys import PemFileSigner
from agent.storage.store import EvidenceStore, SegmentState
from agent.sync.https import HttpsSession, client_ssl_context
from agent.sync.syncer import Syncer
from bureau.testing import running_bureau
from tests.conftest import write_segment

DEV = "BWC-HAND-01"


def enroll_and_sync(server, bureau_dir, tmp_path, session, force=False):
    token = server.service.enrollment.mint_token(DEV).token
    result = provision(bureau_url=server.base_url, token=token, device_id=DEV, data_dir=tmp_path / "dev",
                       config_file=tmp_path / "agent.toml", ca_file=bureau_dir / "ca.pem", force=force)
    store = EvidenceStore(tmp_path / "dev", DEV, PemFileSigner.load(result.key_file),
                          [Recipient.parse(r) for r in result.recipients], SystemClock())
    write_segment(store, session, 0)
    ctx = client_ssl_context(result.ca_file, result.cert_file, result.key_file)
    syncer = Syncer(store, server.base_url, HttpsSession(ctx, timeout_s=10),
                    ReceiptVerifier(load_public_key(result.receipt_key_file.read_bytes())), store.clock)
    outcome = syncer.sync_once()
    states = {r["segment_id"]: r["state"] for r in store.segments()}
    store.close()
    return outcome, states


def test_bureau_follows_the_ledger_across_an_identity_hand_over(tmp_path):
    bureau_dir = tmp_path / "bureau"
    with running_bureau(bureau_dir) as server:
        first, _ = enroll_and_sync(server, bureau_dir, tmp_path, "SOLD-1111")
        assert first.error is None and first.receipted
        second, states = enroll_and_sync(server, bureau_dir, tmp_path, "SNEW-2222", force=True)
        assert second.error is None, second.error
        assert set(states.values()) == {SegmentState.RECEIPTED}
        identity = Identity.load(bureau_dir / "keys" / "bureau-identity.txt")
        report = Verifier(identity).verify_path(bureau_dir / "store" / DEV)
        assert report.ok and report.decrypted == 2, report.problems
