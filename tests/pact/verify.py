"""Verify pacts against llorch: `python -m tests.pact.verify (--config FILE | --url URL) PACT...`.

`xtask.py pact-verify` runs it with `--config tests/configs/pact.yaml`: it serves the real app
(test profile, a fresh data dir) on a loopback port, wrapped with the provider-state route of
tests/pact/provider_states.py, and verifies against it. `--url` verifies a server that is
already running (the gate test that proves a broken provider fails calls :func:`verify`).
Exit 0 when every interaction passes; otherwise the verifier's report.

BROKER is `--broker-url URL --version V --branch B`: after the local pacts pass, the pacts the
broker selects for llorch (its consumers' main branches, the branch matching B, and whatever is
deployed or released) are verified too, and the results are published as provider version V on
branch B. Only broker-served pacts carry the link results are published to. The token comes
from PACT_BROKER_TOKEN (or PACT_BROKER_USERNAME and PACT_BROKER_PASSWORD).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pact import Verifier
from tests.pact.provider_states import WithProviderStates
from tests.support import live_server, make_settings

PROVIDER = "llorch"
STATE_PATH = "/_pact/provider-states"


@dataclass(frozen=True)
class Publish:
    """Where to fetch pacts from and how to label the published verification results."""

    broker_url: str
    version: str
    branch: str


def _verifier(base_url: str) -> Verifier:
    os.environ.setdefault("PACT_DO_NOT_TRACK", "true")
    verifier = Verifier(PROVIDER, host="127.0.0.1").add_transport(url=base_url)
    verifier.state_handler(base_url + STATE_PATH, teardown=True, body=True)
    verifier.set_request_timeout(30_000)
    return verifier


def _run(verifier: Verifier) -> tuple[bool, str]:
    try:
        verifier.verify()
    except RuntimeError:
        return False, verifier.output(strip_ansi=True)
    return True, verifier.output(strip_ansi=True)


def verify(base_url: str, pacts: list[str], *, only: str | None = None) -> tuple[bool, str]:
    """Verify pact files; `only` is a regex of the interaction descriptions to verify."""
    verifier = _verifier(base_url)
    for pact in pacts:
        verifier.add_source(pact)
    if only is not None:
        verifier.filter(only)
    return _run(verifier)


def verify_and_publish(
    base_url: str, publish: Publish, *, only: str | None = None
) -> tuple[bool, str]:
    """Verify the broker's pacts for llorch and publish the results to it."""
    verifier = _verifier(base_url)
    (
        verifier.broker_source(publish.broker_url, selector=True)
        .provider_branch(publish.branch)
        .consumer_version(main_branch=True)
        .consumer_version(matching_branch=True)
        .consumer_version(deployed_or_released=True)
        .build()
    )
    verifier.set_publish_options(version=publish.version, branch=publish.branch)
    if only is not None:
        verifier.filter(only)
    return _run(verifier)


@contextmanager
def serving(config: Path, database_url: str | None = None) -> Iterator[tuple[str, Path]]:
    """The real app configured by ``config`` (test profile), with the provider-state route;
    on the PostgreSQL database ``database_url`` when given, else on SQLite.

    Yields its URL and the file its logs go to (the verifier's report stays readable; the
    log is printed when verification fails).
    """
    raw: dict[str, Any] = yaml.safe_load(config.read_text(encoding="utf-8"))
    if database_url is not None:
        raw["database"] = {**raw.get("database", {}), "url": database_url}
    with tempfile.TemporaryDirectory(prefix="llorch-pact-") as data_dir:
        log = Path(data_dir) / "server.log"
        handler = logging.FileHandler(log, encoding="utf-8")
        logging.getLogger().addHandler(handler)
        try:
            settings = make_settings(Path(data_dir) / "var", raw)
            with live_server(settings, wrap=WithProviderStates) as url:
                yield url, log
        finally:
            logging.getLogger().removeHandler(handler)
            handler.close()


def _verify_all(url: str, args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    ok, output = verify(url, args.pacts)
    print(output)
    if not ok or args.broker_url is None:
        return 0 if ok else 1
    if not args.version or not args.branch:
        parser.error("--broker-url needs --version and --branch")
    ok, output = verify_and_publish(url, Publish(args.broker_url, args.version, args.branch))
    print(output)
    return 0 if ok else 1


def main(argv: list[str]) -> int:
    summary = (__doc__ or "").splitlines()[0]
    parser = argparse.ArgumentParser(prog="python -m tests.pact.verify", description=summary)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", type=Path, help="serve the app with this configuration")
    where.add_argument("--url", help="a running server's base URL")
    parser.add_argument("pacts", nargs="+", help="pact files")
    parser.add_argument("--broker-url", help="also verify the broker's pacts; publish results")
    parser.add_argument("--version", help="the provider version the results are published as")
    parser.add_argument("--branch", help="the provider branch the results are published on")
    parser.add_argument("--database-url", help="with --config: serve on this PostgreSQL database")
    args = parser.parse_args(argv)
    if args.url is not None:
        return _verify_all(args.url, args, parser)
    with serving(args.config, args.database_url) as (url, log):
        rc = _verify_all(url, args, parser)
        if rc != 0:
            tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-60:]
            print("---- last lines of the server log ----", *tail, sep="\n")
        return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
