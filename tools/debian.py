"""Debian tools the commands run (promtool, wrk): installed with apt-get when missing."""

from __future__ import annotations

import os
import shutil

from tools.common import TaskError, run, step

# `apt-get update` runs once per process, before the first install.
_UPDATED: list[bool] = []


def ensure_debian_tool(command: str, package: str) -> str:
    """The path of ``command``, installing Debian's ``package`` when it is not on PATH."""
    found = shutil.which(command)
    if found:
        return found
    step(f"{command} is not on PATH: apt-get install -y {package}")
    if os.geteuid() == 0:
        prefix: list[str] = []
    elif shutil.which("sudo") and run(["sudo", "-n", "true"], check=False, quiet=True) == 0:
        prefix = ["sudo", "-n"]
    else:
        raise TaskError(
            f"{command} is not on PATH and installing it needs root: run "
            f"`apt-get update && apt-get install -y {package}` as root (or put {command} on PATH)"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        if not _UPDATED:
            run([*prefix, "apt-get", "update"], env=env, quiet=True)
            _UPDATED.append(True)
        run([*prefix, "apt-get", "install", "-y", "--no-install-recommends", package], env=env)
    except TaskError as exc:
        raise TaskError(f"could not install {command} with apt-get: {exc}") from exc
    found = shutil.which(command)
    if not found:
        raise TaskError(f"apt-get installed {package} but {command} is still not on PATH")
    return found


def ensure_promtool() -> str:
    return ensure_debian_tool("promtool", "prometheus")


def ensure_wrk() -> str:
    """wrk, the admission benchmark's load generator (a C client, so never the limit)."""
    return ensure_debian_tool("wrk", "wrk")
