"""A fake Pact Broker on 127.0.0.1: the HAL resources the pact CLI and verifier use, recorded.

No broker can be installed on these machines (it needs rubygems or Docker), so the publish
and verification-result paths are proven against this endpoint. It answers the way the Pact
Broker's API documents (index relations, ``POST /contracts/publish``, pacts for verification,
verification results) and keeps every request it received, body included.

    with FakeBroker(pacts=[pact]) as broker:
        run_the_publisher(broker.url)
    [publish] = broker.received("POST", "/contracts/publish")
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

PACT_PATH = "/pacts/provider/{provider}/consumer/{consumer}/pact-version/{n}"


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class FakeBroker:
    """Serves `pacts` for verification and records every request (see the module docstring)."""

    def __init__(self, pacts: list[dict[str, Any]] | None = None) -> None:
        self.pacts = list(pacts or [])
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-broker")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    def __enter__(self) -> FakeBroker:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def received(self, method: str, path: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if (r.method, r.path) == (method, path)]

    def record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    # -- resources ---------------------------------------------------------------------------

    def answer(self, request: Request) -> tuple[int, dict[str, Any]]:
        if (request.method, request.path) == ("GET", "/"):
            return 200, self._index()
        if (request.method, request.path) == ("POST", "/contracts/publish"):
            return 200, self._published(request.json())
        if request.path.endswith("/for-verification"):
            # The verifier GETs the resource for its `self` link, then POSTs its selectors there.
            if request.method == "GET":
                return 200, {"_links": {"self": {"href": self._href(request.path)}}}
            return 200, self._for_verification()
        for n, pact in enumerate(self.pacts):
            path = self._pact_path(pact, n)
            if (request.method, request.path) == ("GET", path):
                provider = "/pacticipants/" + pact["provider"]["name"]
                links = {
                    "pb:provider": {"name": pact["provider"]["name"], "href": self._href(provider)},
                    "pb:publish-verification-results": {"href": self._href(path, "/results")},
                }
                return 200, pact | {"_links": links}
            if (request.method, request.path) == ("POST", path + "/results"):
                return 201, {"success": request.json().get("success"), "_links": {}}
        if request.path.startswith("/pacticipants/"):
            return 200, self._pacticipant(request.path)
        return 404, {"error": f"the fake broker has no {request.method} {request.path}"}

    def _href(self, path: str, suffix: str = "") -> str:
        return self.url + path + suffix

    def _pact_path(self, pact: dict[str, Any], n: int) -> str:
        names = {"provider": pact["provider"]["name"], "consumer": pact["consumer"]["name"]}
        return PACT_PATH.format(**names, n=n)

    def _pacticipant(self, path: str) -> dict[str, Any]:
        name = path.split("/")[2]
        branch_version = f"/pacticipants/{name}/branches/{{branch}}/versions/{{version}}"
        return {
            "name": name,
            "_links": {
                "self": {"href": self._href(path)},
                "pb:branch-version": {"href": self._href(branch_version), "templated": True},
            },
        }

    def _index(self) -> dict[str, Any]:
        return {
            "_links": {
                "self": {"href": self.url},
                "pb:publish-contracts": {
                    "title": "Publish contracts",
                    "href": self._href("/contracts/publish"),
                },
                "pb:provider-pacts-for-verification": {
                    "title": "Pact versions to be verified for the specified provider",
                    "href": self._href("/pacts/provider/{provider}/for-verification"),
                    "templated": True,
                },
            }
        }

    def _published(self, body: dict[str, Any]) -> dict[str, Any]:
        name, version = body["pacticipantName"], body["pacticipantVersionNumber"]
        version_href = self._href(f"/pacticipants/{name}/versions/{version}")
        return {
            "notices": [{"type": "success", "text": f"Pact published for {name} {version}"}],
            "_embedded": {
                "pacticipant": {"name": name, "_links": {"self": {"href": version_href}}},
                "version": {
                    "number": version,
                    "branch": body.get("branch"),
                    "_links": {"self": {"href": version_href}},
                },
            },
            "_links": {
                "pb:pacticipant": {"name": name, "href": self._href(f"/pacticipants/{name}")},
                "pb:pacticipant-version": {"name": version, "href": version_href},
                "pb:contracts": [
                    {"name": f"Pact between {name} ({version}) and {c['providerName']}"}
                    | {"href": self._href(f"/pacts/provider/{c['providerName']}")}
                    for c in body.get("contracts", [])
                ],
            },
        }

    def _for_verification(self) -> dict[str, Any]:
        pacts = [
            {
                "shortDescription": "latest from main",
                "verificationProperties": {"pending": False, "notices": []},
                "_links": {"self": {"href": self._href(self._pact_path(pact, n))}},
            }
            for n, pact in enumerate(self.pacts)
        ]
        return {"_embedded": {"pacts": pacts}, "_links": {"self": {"href": self.url}}}


def _handler(broker: FakeBroker) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            headers = {name.lower(): value for name, value in self.headers.items()}
            request = Request(self.command, self.path, headers, self.rfile.read(length))
            broker.record(request)
            status, body = broker.answer(request)
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/hal+json;charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_PATCH = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the test reports what matters

    return Handler
