"""Publishing to a Pact Broker: the pact (`xtask.py pact-publish`) and verification results.

No broker can run on these machines, so both paths are proven against the fake broker of
tests/pact/broker.py on 127.0.0.1, which records what the real pact binaries send.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys

import pytest

from tests.pact.broker import FakeBroker
from tests.pact.conftest import PACT_FILE, ROOT
from tests.pact.verify import Publish, serving, verify_and_publish

pytestmark = pytest.mark.contract

PACT_CONFIG = ROOT / "tests" / "configs" / "pact.yaml"
CI_BRANCH = "ci-branch"  # what a detached checkout's CI would name the branch


def _git(*args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True)
    return proc.stdout.strip()


def _xtask_env(**extra: str) -> dict[str, str]:
    """The test's environment without any real broker's settings (or proxies), plus `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PACT_BROKER_", "GITHUB_")) and not k.lower().endswith("_proxy")
    }
    env["NO_PROXY"] = "127.0.0.1,localhost"
    env["GITHUB_REF_NAME"] = CI_BRANCH
    env.update(extra)
    return env


def _xtask(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # The venv's interpreter is the one xtask's stamp was made with: it keeps .venv as it is.
    return subprocess.run(
        [sys.executable, str(ROOT / "xtask.py"), *args],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_pact_publish_sends_the_committed_pact_to_the_broker() -> None:
    token = secrets.token_urlsafe(16)
    with FakeBroker() as broker:
        version_before = _git("describe", "--always", "--dirty")
        done = _xtask(
            "pact-publish", env=_xtask_env(PACT_BROKER_BASE_URL=broker.url, PACT_BROKER_TOKEN=token)
        )
        version_after = _git("describe", "--always", "--dirty")
    assert done.returncode == 0, done.stdout + done.stderr
    assert token not in done.stdout + done.stderr  # the secret stays off the command line

    # HAL: the index first (for the publish relation), then the broker's publish API.
    assert [(r.method, r.path) for r in broker.requests] == [
        ("GET", "/"),
        ("POST", "/contracts/publish"),
    ]
    assert all(r.headers["authorization"] == f"Bearer {token}" for r in broker.requests)
    [publish] = broker.received("POST", "/contracts/publish")
    assert publish.headers["content-type"] == "application/json"
    body = publish.json()
    assert body["pacticipantName"] == "llorch-cli"
    assert body["pacticipantVersionNumber"] in (version_before, version_after)
    assert body["branch"] == (_git("branch", "--show-current") or CI_BRANCH)

    [contract] = body["contracts"]
    assert contract["consumerName"] == "llorch-cli"
    assert contract["providerName"] == "llorch"
    assert (contract["specification"], contract["contentType"]) == ("pact", "application/json")
    # The CLI re-serialises the pact compactly: compare documents, not bytes.
    published = json.loads(base64.b64decode(contract["content"], validate=True))
    assert published == json.loads(PACT_FILE.read_text(encoding="utf-8"))


def test_pact_publish_without_a_broker_url_fails_and_says_why() -> None:
    done = _xtask("pact-publish", env=_xtask_env(PACT_BROKER_TOKEN="unused"))
    assert done.returncode == 1
    assert "PACT_BROKER_BASE_URL is not set" in done.stderr


@pytest.mark.wire
def test_verification_results_are_published_with_the_provider_version_and_branch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    token = secrets.token_urlsafe(16)
    monkeypatch.setenv("PACT_BROKER_TOKEN", token)
    for name in ("PACT_BROKER_USERNAME", "PACT_BROKER_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    # The broker serves the committed pact cut down to its probes, which verify in milliseconds.
    pact = json.loads(PACT_FILE.read_text(encoding="utf-8"))
    pact["interactions"] = [
        i
        for i in pact["interactions"]
        if i["description"].startswith(("livez answered 200", "readyz answered 200"))
    ]
    assert len(pact["interactions"]) == 2
    with FakeBroker(pacts=[pact]) as broker, serving(PACT_CONFIG) as (url, _log):
        ok, output = verify_and_publish(url, Publish(broker.url, "1.4.0-3-gabc1234", "feature-x"))
    assert ok, output

    assert all(r.headers["authorization"] == f"Bearer {token}" for r in broker.requests)
    [selection] = broker.received("POST", "/pacts/provider/llorch/for-verification")
    assert selection.json()["providerVersionBranch"] == "feature-x"
    assert {"mainBranch": True} in selection.json()["consumerVersionSelectors"]
    # The provider version is created on its branch, then the results are posted to the link
    # the broker gave with the pact.
    assert broker.received(
        "PUT", "/pacticipants/llorch/branches/feature-x/versions/1.4.0-3-gabc1234"
    )
    [results] = broker.received(
        "POST", "/pacts/provider/llorch/consumer/llorch-cli/pact-version/0/results"
    )
    assert results.json()["success"] is True
    assert results.json()["providerApplicationVersion"] == "1.4.0-3-gabc1234"
