"""Records the (operationId, status) of every response the tests receive from llorch.

httpx is the only HTTP client of the suite (in process over ASGITransport, or against a live
uvicorn), so the recorder wraps ``httpx.Client.send`` and ``httpx.AsyncClient.send`` and maps
each request's method and path to its operation with the path templates of both OpenAPI
documents. Only answers carrying ``X-Correlation-Id`` (every llorch answer has it) are counted,
and none from the pact consumer tests (their answers come from pact's mock server). At the end
of the session the pairs are written to ``var/status-coverage/recorded.json``, which
``xtask.py status-coverage`` reads.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = (ROOT / "contracts/openapi/data.yaml", ROOT / "contracts/openapi/control.yaml")
RECORD = ROOT / "var" / "status-coverage" / "recorded.json"
_METHODS = ("get", "put", "post", "delete", "patch")


@functools.cache
def _operations() -> list[tuple[str, re.Pattern[str], str, frozenset[int]]]:
    found = []
    for path in DOCUMENTS:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
        for template, item in document["paths"].items():
            pattern = re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$")
            for method in _METHODS:
                if method in item:
                    operation = item[method]
                    statuses = frozenset(int(s) for s in operation["responses"] if s.isdigit())
                    found.append((method.upper(), pattern, operation["operationId"], statuses))
    return found


def declared() -> set[tuple[str, int]]:
    """Every (operationId, status) both documents declare."""
    return {(op, status) for _m, _p, op, statuses in _operations() for status in statuses}


def operation_of(method: str, path: str) -> str | None:
    return next((op for m, p, op, _s in _operations() if m == method and p.match(path)), None)


class Recorder:
    def __init__(self) -> None:
        self.pairs: set[tuple[str, int]] = set()
        self.enabled = True

    def saw(self, response: httpx.Response) -> None:
        if not self.enabled or "x-correlation-id" not in response.headers:
            return
        request = response.request
        operation = operation_of(request.method, request.url.path)
        if operation is not None:
            self.pairs.add((operation, response.status_code))


RECORDER = Recorder()


def _wrap_sync(send: Callable[..., httpx.Response]) -> Callable[..., httpx.Response]:
    @functools.wraps(send)
    def wrapper(self: httpx.Client, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        response = send(self, request, **kwargs)
        RECORDER.saw(response)
        return response

    return wrapper


def _wrap_async(send: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(send)
    async def wrapper(
        self: httpx.AsyncClient, request: httpx.Request, **kwargs: Any
    ) -> httpx.Response:
        response: httpx.Response = await send(self, request, **kwargs)
        RECORDER.saw(response)
        return response

    return wrapper


def pytest_configure(config: pytest.Config) -> None:
    # Parse the documents now, not inside the session's first response: that parse (a few
    # hundred ms of pure-Python YAML, holding the GIL a live server's thread needs) delayed the
    # first test's next request past the end of a short task.
    _operations()
    httpx.Client.send = _wrap_sync(httpx.Client.send)  # type: ignore[method-assign]
    httpx.AsyncClient.send = _wrap_async(httpx.AsyncClient.send)  # type: ignore[method-assign]
    try:
        # The official openai SDK (tests/api/test_openai.py) speaks through httpx2, whose
        # responses have the same surface as httpx's.
        import httpx2
    except ImportError:
        return
    httpx2.Client.send = _wrap_sync(httpx2.Client.send)  # type: ignore[method-assign,arg-type,assignment]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    RECORDER.enabled = "pact" not in item.path.parts


def pytest_sessionfinish(session: pytest.Session) -> None:
    if not RECORDER.pairs:
        return
    RECORD.parent.mkdir(parents=True, exist_ok=True)
    previous: set[tuple[str, int]] = set()
    # Runs of parts of the suite add up; `xtask.py test` starts from an empty record.
    if RECORD.is_file():
        previous = {(op, int(status)) for op, status in json.loads(RECORD.read_text())["pairs"]}
    pairs = sorted(previous | RECORDER.pairs)
    RECORD.write_text(json.dumps({"pairs": pairs}, indent=1) + "\n", encoding="utf-8")
