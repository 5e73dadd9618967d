"""``xtask.py contract``: the schemathesis CLI against a live server on a free loopback port.

Both planes are run one by one, then together (so the stateful phase can follow links across
them). Authentication is on (tests/configs/contract.yaml): a fresh key for this run is given to
the server in its environment and to schemathesis as a header; its `ignored_auth` check then
proves that each protected operation refuses the same request without it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path

from llorch.contracts import merged_openapi
from tools import server
from tools.common import ROOT, TaskError, main, no_args, note, run, step, venv_tool

CONTRACT_SPECS = ("contracts/openapi/data.yaml", "contracts/openapi/control.yaml")
CONTRACT_CONFIG = "tests/configs/contract.yaml"
READY_PATH = "/readyz"  # public: the contract server runs with authentication on


def _loopback_env() -> dict[str, str]:
    """Schemathesis uses requests, which honours *_PROXY: keep loopback traffic direct."""
    env = dict(os.environ)
    for key in ("NO_PROXY", "no_proxy"):
        env[key] = ",".join(filter(None, [env.get(key, ""), "127.0.0.1", "localhost"]))
    return env


def _schemathesis(specs: list[str], base_url: str, key: str) -> bool:
    env = _loopback_env()
    for spec in specs:
        step(f"schemathesis: st run {spec}")
        # The spec's paths start with /v1 already, so the URL has no base path.
        cmd: list[str | Path] = [venv_tool("st"), "run", spec, "--url", base_url]
        cmd += ["--checks", "all", "--header", f"Authorization: Bearer {key}"]
        cmd += ["--max-examples", "60", "--request-timeout", "10", "--no-color"]
        rc = run(cmd, check=False, env=env)
        if rc != 0:
            note(f"schemathesis failed on {spec} (exit {rc})")
            return False
    return True


def cmd_contract(args: list[str]) -> int:
    no_args("contract", args)
    for relative in (*CONTRACT_SPECS, CONTRACT_CONFIG):
        if not (ROOT / relative).is_file():
            raise TaskError(f"{relative} is missing")
    port = server.free_port()
    base_url = f"http://127.0.0.1:{port}"
    data_dir = Path(tempfile.mkdtemp(prefix="llorch-contract-"))
    log = data_dir / "server.log"
    key = secrets.token_urlsafe(24)
    env = dict(os.environ, LLORCH_CONTRACT_KEY=key)
    argv = server.llorch_argv(port, config=CONTRACT_CONFIG, data_dir=data_dir)
    step(f"starting the server on {base_url} (data dir {data_dir})")
    ok = False
    try:
        with server.running(argv, log=log, ready_url=base_url + READY_PATH, env=env):
            step("the server is ready")
            both = data_dir / "both-planes.json"
            both.write_text(json.dumps(merged_openapi()), encoding="utf-8")
            ok = _schemathesis([*CONTRACT_SPECS, str(both)], base_url, key)
            step("stopping the server")
    except server.ServerError as exc:
        note(str(exc))
    finally:
        if not ok:
            print(server.log_tail(log), flush=True)
        shutil.rmtree(data_dir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main("contract", cmd_contract))
