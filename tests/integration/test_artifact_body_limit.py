"""An artifact body that cannot fit is refused while it arrives, over a real socket."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import SettingsFactory
from tests.support import live_server, pool

pytestmark = [pytest.mark.wire]

MAX_BYTES = 4096  # artifacts.max_bytes
MAX_BODY = 1024  # server.max_body_bytes: the allowance for the rest of the request


CONFIG = {
    "server": {"max_body_bytes": MAX_BODY, "body_timeout_s": 20},
    "artifacts": {"max_bytes": MAX_BYTES},
    "pools": [pool()],
}


@pytest.mark.req("ORCH-SEC-0052", "ORCH-SEC-0051")
def test_an_artifact_body_that_cannot_fit_is_413_before_the_rest_of_it_is_sent(
    settings_for: SettingsFactory,
) -> None:
    # 20,000 bytes of plain content, within the raw limit escaped content may need (6 x 4096 +
    # 1024) but never within 4096 once decoded. Only 8,000 bytes are sent: the server must
    # answer from those, not wait for the rest to parse the whole.
    body = json.dumps({"kind": "other", "content": "x" * 20_000}).encode()
    with live_server(settings_for(CONFIG)) as url:
        address = urlsplit(url)
        assert address.hostname is not None and address.port is not None
        with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
            head = (
                b"POST /v1/artifacts HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
            )
            started = time.monotonic()
            sock.sendall(head + body[:8000])
            answer = b""
            try:
                while b"\r\n\r\n" not in answer and (data := sock.recv(65536)):
                    answer += data
            except TimeoutError:
                pytest.fail("the server waited for the rest of the body")
            elapsed = time.monotonic() - started

    status_line, _, _ = answer.partition(b"\r\n")
    assert status_line.split(b" ", 2)[1] == b"413", answer[:300]
    assert elapsed < 5


@pytest.mark.req("ORCH-SEC-0052", "ORCH-SEC-0051")
def test_content_escaped_to_six_times_its_size_is_still_accepted_within_the_limit(
    settings_for: SettingsFactory,
) -> None:
    # A control character travels as \u0001: six bytes of JSON for one byte of content.
    with live_server(settings_for(CONFIG)) as url, httpx.Client(base_url=url) as c:
        at = c.post("/v1/artifacts", json={"kind": "other", "content": "\x01" * MAX_BYTES})
        past = c.post("/v1/artifacts", json={"kind": "other", "content": "\x01" * (MAX_BYTES + 1)})
        plain = c.post("/v1/artifacts", json={"kind": "other", "content": "y" * (MAX_BYTES + 1)})

    assert len(at.request.content) > 6 * MAX_BYTES
    assert at.status_code == 201, at.text
    assert at.json()["size_bytes"] == MAX_BYTES
    for refused in (past, plain):
        assert refused.status_code == 413, refused.text
        assert refused.json()["code"] == "PAYLOAD_TOO_LARGE"
