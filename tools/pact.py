"""``xtask.py pact-verify`` and ``xtask.py pact-publish``: the pact against the real server, and
the Pact Broker.

pact-verify serves the real app in the test profile (tests/configs/pact.yaml), wrapped with the
provider-state route of tests/pact/provider_states.py, and verifies every pact in
contracts/pacts. With PACT_BROKER_BASE_URL set, the pacts the broker holds for llorch are
verified as well and the results are published with this checkout's version and branch: a
broker records results only for pacts it served (a local file has nowhere to report to).
"""

from __future__ import annotations

import os
import subprocess
import sys

from tools.common import ROOT, TaskError, main, no_args, rel, run, step, venv_tool

PACT_DIR = ROOT / "contracts" / "pacts"
PACT_CONFIG = ROOT / "tests" / "configs" / "pact.yaml"


def _git(*args: str) -> str:
    """The stripped output of a git command in the repository ("" when git fails)."""
    try:
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return ""
    return proc.stdout.strip() if proc.returncode == 0 else ""


def app_version() -> str:
    """This checkout's version for the broker: `git describe --always --dirty`."""
    version = _git("describe", "--always", "--dirty")
    if not version:
        raise TaskError("cannot version the pacts: `git describe --always --dirty` failed")
    return version


def app_branch() -> str:
    """The current git branch; on a detached HEAD (CI checkouts) the CI's branch name."""
    branch = _git("branch", "--show-current")
    branch = branch or os.environ.get("GITHUB_HEAD_REF") or os.environ.get("GITHUB_REF_NAME", "")
    if not branch:
        raise TaskError("cannot tell the git branch (detached HEAD and no GITHUB_REF_NAME)")
    return branch


def _broker_url() -> str | None:
    return os.environ.get("PACT_BROKER_BASE_URL", "").strip() or None


def _pacts() -> list[str]:
    pacts = sorted(PACT_DIR.glob("*.json"))
    if not pacts:
        raise TaskError(f"no pact in {rel(PACT_DIR)}: run the consumer tests (tests/pact)")
    return [str(p) for p in pacts]


def cmd_pact_verify(args: list[str], database_url: str | None = None) -> int:
    """Serve the real app with the provider-state route (test profile) and verify every pact;
    on the PostgreSQL database ``database_url`` when given (tools/postgres.py)."""
    no_args("pact-verify", args)
    pacts = _pacts()
    argv = [sys.executable, "-m", "tests.pact.verify", "--config", str(PACT_CONFIG), *pacts]
    if database_url is not None:
        argv += ["--database-url", database_url]
    broker_url = _broker_url()
    if broker_url is not None:
        version, branch = app_version(), app_branch()
        argv += ["--broker-url", broker_url, "--version", version, "--branch", branch]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLORCH_")}
    env["PACT_DO_NOT_TRACK"] = "true"
    step(f"verifying {', '.join(os.path.basename(p) for p in pacts)}")
    if broker_url is not None:
        step(f"and the broker's pacts for llorch ({broker_url}), publishing the results")
    return run(argv, check=False, env=env)


def cmd_pact_publish(args: list[str]) -> int:
    """Publish contracts/pacts/*.json to the Pact Broker at PACT_BROKER_BASE_URL."""
    no_args("pact-publish", args)
    broker_url = _broker_url()
    if broker_url is None:
        raise TaskError(
            "PACT_BROKER_BASE_URL is not set: it names the Pact Broker to publish to "
            "(and PACT_BROKER_TOKEN its bearer token)"
        )
    pacts = _pacts()
    version, branch = app_version(), app_branch()
    pact = venv_tool("pact")
    if not pact.is_file():
        raise TaskError(f"{pact} is missing: pact-python-cli provides it")
    names = ", ".join(os.path.basename(p) for p in pacts)
    step(f"publishing {names} to {broker_url} as {version} on {branch}")
    # The pact CLI reads PACT_BROKER_TOKEN (or _USERNAME/_PASSWORD) from its environment: the
    # secret stays off the command line, where `ps` and CI logs would show it.
    cmd = [str(pact), "broker", "publish", rel(PACT_DIR)]
    cmd += ["--broker-base-url", broker_url, "--consumer-app-version", version, "--branch", branch]
    return run(cmd, check=False)


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    actions = {"pact-verify": cmd_pact_verify, "pact-publish": cmd_pact_publish}
    if command not in actions:
        raise SystemExit(f"usage: python -m tools.pact {{{','.join(actions)}}}")
    raise SystemExit(main(command, actions[command], sys.argv[2:]))
