"""Verify pact files against a running llorch: `python tests/pact/verify.py URL PACT...`.

Run by `xtask.py pact-verify` (which starts the server) and by the gate test that proves a
broken provider fails. Exit 0 when every interaction passes; otherwise the verifier's report.
"""

from __future__ import annotations

import os
import sys

from pact import Verifier

STATE_PATH = "/_pact/provider-states"


def verify(base_url: str, pacts: list[str]) -> tuple[bool, str]:
    os.environ.setdefault("PACT_DO_NOT_TRACK", "true")
    verifier = Verifier("llorch", host="127.0.0.1").add_transport(url=base_url)
    for pact in pacts:
        verifier.add_source(pact)
    verifier.state_handler(base_url + STATE_PATH, teardown=True, body=True)
    verifier.set_request_timeout(30_000)
    try:
        verifier.verify()
    except RuntimeError:
        return False, verifier.output(strip_ansi=True)
    return True, verifier.output(strip_ansi=True)


def main(argv: list[str]) -> int:
    ok, output = verify(argv[0], argv[1:])
    print(output)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
