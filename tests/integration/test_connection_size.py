"""What every open connection costs llorch's protocol (an open stream is one): a guard that
keeps uvicorn's attributes in CPython's key-sharing dict, and pipelined requests still
answered in order by the list that replaces uvicorn's deque."""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import uvicorn

from llorch.api.http import GuardedProtocol, HttpLimits, protocol_class
from tests.support import free_port

pytestmark = [pytest.mark.wire]


async def echo_path(scope: Any, receive: Any, send: Any) -> None:
    body = scope["path"].encode()
    headers = [(b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@contextmanager
def guarded_server() -> Iterator[tuple[uvicorn.Server, int]]:
    limits = HttpLimits(
        max_head_bytes=32_768, head_timeout_s=30, body_timeout_s=30, max_connections=64
    )
    port = free_port()
    config = uvicorn.Config(
        echo_path, port=port, http=protocol_class(limits), log_level="warning", lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield server, port
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def read_responses(sock: socket.socket, count: int) -> list[bytes]:
    """The bodies of ``count`` responses of ``echo_path`` (each ends with its path)."""
    data = b""
    while data.count(b"HTTP/1.1 200") < count or not data.endswith(b"/%d" % count):
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return [part.rsplit(b"\r\n\r\n", 1)[1] for part in data.split(b"HTTP/1.1 200")[1:]]


def test_a_kept_alive_connection_keeps_a_small_attribute_dict() -> None:
    with guarded_server() as (server, port), socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_responses(sock, 1) == [b"/1"]
        (protocol,) = server.server_state.connections
        assert isinstance(protocol, GuardedProtocol)
        # 30 attributes or more and CPython gives the instance a dict of its own (~1.6 KiB
        # against ~0.3): the guard adds one attribute to uvicorn's 28.
        assert sys.getsizeof(vars(protocol)) < 1024, sorted(vars(protocol))


def test_pipelined_requests_are_answered_in_order() -> None:
    with guarded_server() as (_server, port), socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(1, 6)))
        assert read_responses(sock, 5) == [b"/1", b"/2", b"/3", b"/4", b"/5"]
