"""Chunked request bodies over a real socket: answered exactly like the same body with a length."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import SettingsFactory
from tests.support import live_server, pool, task_body

pytestmark = [pytest.mark.wire]

MAX_BODY = 4096


@contextmanager
def chunked_server(settings_for: SettingsFactory) -> Iterator[str]:
    pools = [pool(models=["mock-large"]), pool(id="drained")]
    settings = settings_for({"server": {"max_body_bytes": MAX_BODY}, "pools": pools})
    with live_server(settings) as url:
        yield url


def chunked(body: bytes, parts: int) -> bytes:
    """``body`` in ``parts`` chunks of the chunked transfer coding, and the last, empty chunk."""
    size = -(-len(body) // parts)
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def post_chunked(url: str, path: str, document: Any, parts: int = 3) -> tuple[int, Any]:
    """POST ``document`` as JSON with ``Transfer-Encoding: chunked`` and no Content-Length."""
    address = urlsplit(url)
    assert address.hostname is not None and address.port is not None
    body = document if isinstance(document, bytes) else json.dumps(document).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    with socket.create_connection((address.hostname, address.port), timeout=30) as sock:
        sock.sendall(head + chunked(body, parts))
        answer = b""
        while data := sock.recv(65536):
            answer += data
    head_bytes, _, payload = answer.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" not in head_bytes.lower(), head_bytes
    return int(head_bytes.split(b" ", 2)[1]), json.loads(payload) if payload else None


@pytest.mark.req("ORCH-DATA-0017")
def test_a_chunked_task_submission_is_admitted_like_one_with_a_length(
    settings_for: SettingsFactory,
) -> None:
    with chunked_server(settings_for) as url:
        status, task = post_chunked(url, "/v1/tasks", task_body(), parts=3)
        assert status == 202, task
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.get(f"/v1/tasks/{task['task_id']}").status_code == 200


SAME_ANSWER = [
    ("/v1/tasks", task_body(max_tokens="many")),
    ("/v1/tasks", {"model": "mock"}),
    ("/v1/pools/drained/drain", {"deadline_ms": "soon"}),
    ("/v1/pools/nope/drain", {"deadline_ms": 10}),
    ("/v1/pools/default/reload", {}),
    ("/v1/pools/nope/reload", {"model": "mock-large"}),
]


@pytest.mark.req("ORCH-DATA-0017")
def test_chunked_bodies_are_validated_and_answered_like_ones_with_a_length(
    settings_for: SettingsFactory,
) -> None:
    with chunked_server(settings_for) as url, httpx.Client(base_url=url, timeout=30) as client:
        for path, document in SAME_ANSWER:
            status, answer = post_chunked(url, path, document, parts=2)
            with_length = client.post(path, json=document)
            assert status == with_length.status_code and status >= 400, (path, answer)
            expected = with_length.json()
            assert answer.pop("correlation_id") and expected.pop("correlation_id")
            assert answer == expected, path


@pytest.mark.req("ORCH-DATA-0017")
def test_a_chunked_drain_and_reload_are_accepted(settings_for: SettingsFactory) -> None:
    with chunked_server(settings_for) as url:
        status, answer = post_chunked(url, "/v1/pools/drained/drain", {"deadline_ms": 10}, 2)
        assert status == 202, answer
        status, answer = post_chunked(url, "/v1/pools/default/reload", {"model": "mock-large"})
        assert status == 202, answer


@pytest.mark.req("ORCH-DATA-0017")
def test_a_chunked_body_over_the_limit_is_413(settings_for: SettingsFactory) -> None:
    with chunked_server(settings_for) as url:
        big = task_body(prompt="a" * (2 * MAX_BODY))
        status, refused = post_chunked(url, "/v1/tasks", big, parts=3)
        assert status == 413, refused
        assert refused["code"] == "PAYLOAD_TOO_LARGE"
        assert refused["correlation_id"]
