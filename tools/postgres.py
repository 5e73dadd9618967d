"""A private PostgreSQL cluster for tests and benchmarks: its own directory, a free port on
127.0.0.1, nothing shared with the machine's own clusters, and stopped at the end::

    with private_cluster() as pg:
        url = pg.create_database("t1")   # postgresql://llorch@127.0.0.1:PORT/t1
        pg.stop(mode="immediate")         # a crash: no shutdown checkpoint
        pg.start()                        # recovery from the WAL

Debian's ``postgresql-15`` provides the binaries (installed with apt-get when missing).
``initdb`` refuses to run as root, so as root the cluster runs as the ``postgres`` user, in a
directory that user owns (see ``STACK-NOTES.md``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tools.debian import ensure_debian_tool
from tools.server import free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")
USER = "llorch"  # the cluster's superuser, trusted on the loopback interface only

StopMode = Literal["smart", "fast", "immediate"]


class ClusterError(Exception):
    """The cluster could not be made, started or stopped."""


def ensure_postgres() -> Path:
    """The directory of PostgreSQL 15's server binaries, installing Debian's package if needed."""
    ensure_debian_tool(str(PG_BIN / "initdb"), "postgresql-15")
    return PG_BIN


@dataclass
class Cluster:
    root: Path
    port: int
    bin_dir: Path = PG_BIN

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", USER, "-E", "UTF8")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-o", options, "start")

    def stop(self, mode: StopMode = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.data), "status", check=False) == 0

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run ``sql`` with psql (unaligned, tuples only) and return its output."""
        argv = [str(shutil.which("psql") or self.bin_dir / "psql"), "-X", "-q", "-A", "-t"]
        argv += ["-v", "ON_ERROR_STOP=1", "-d", self.url(database), "-c", sql]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ClusterError(f"psql failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout.strip()

    def create_database(self, name: str) -> str:
        """A new, empty database; its URL."""
        self.psql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def _run(self, program: str, *args: str, check: bool = True) -> int:
        argv: Sequence[str] = [str(self.bin_dir / program), *args]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if check and done.returncode != 0:
            raise ClusterError(
                f"{program} {args[-1]} failed ({done.returncode}): {done.stderr.strip()}\n"
                f"{self.log.read_text(errors='replace')[-2000:] if self.log.exists() else ''}"
            )
        return done.returncode


@contextlib.contextmanager
def private_cluster() -> Iterator[Cluster]:
    """A new cluster in a temporary directory of its own, started; stopped and removed at the
    end. (Not under pytest's ``tmp_path``: that is private to root, and the server runs as
    ``postgres``.)"""
    bin_dir = ensure_postgres()
    root = Path(tempfile.mkdtemp(prefix="llorch-pg-"))
    try:
        if os.geteuid() == 0:
            shutil.chown(root, user="postgres")
        cluster = Cluster(root=root, port=free_port(), bin_dir=bin_dir)
        cluster.init()
        cluster.start()
        try:
            yield cluster
        finally:
            if cluster.running():
                cluster.stop(mode="immediate")
    finally:
        shutil.rmtree(root, ignore_errors=True)
