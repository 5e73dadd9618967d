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
from urllib.parse import urlsplit

from tools.common import main, no_args, note, step
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


# -- the task API's suites against a PostgreSQL-backed server ----------------------------------


@contextlib.contextmanager
def suite_database(name: str) -> Iterator[str]:
    """A new database for one suite: on the server ``LLORCH_TEST_DATABASE_URL`` names, else on a
    private cluster of its own (started here, removed at the end)."""
    external = os.environ.get("LLORCH_TEST_DATABASE_URL")
    if not external:
        with private_cluster() as pg:
            yield pg.create_database(name)
        return
    # Imported here: xtask's own process has no driver; the tools run inside .venv.
    import psycopg
    from psycopg import sql

    unique = f"{name}_{os.getpid()}"
    with psycopg.connect(external, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(unique)))
    try:
        yield urlsplit(external)._replace(path=f"/{unique}").geturl()
    finally:
        with psycopg.connect(external, autocommit=True) as conn:
            drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
            conn.execute(drop.format(sql.Identifier(unique)))


def cmd_suites(args: list[str]) -> int:
    """``xtask.py suites-postgres``: schemathesis (``contract``) and the pact verification
    (``pact-verify``) once more, against a server whose ``database.url`` is a PostgreSQL
    database made for each."""
    # Imported here: both import the server's packages, which tools/postgres.py alone does not.
    from tools import contract, pact

    no_args("suites-postgres", args)
    with suite_database("llorch_contract") as url:
        step(f"contract on PostgreSQL ({url})")
        os.environ["LLORCH_DATABASE_URL"] = url  # the contract's server inherits it
        try:
            rc = contract.cmd_contract([])
        finally:
            del os.environ["LLORCH_DATABASE_URL"]
        rc = rc or _wrote_tasks(url, "contract")
    if rc != 0:
        return rc
    with suite_database("llorch_pact") as url:
        step(f"pact-verify on PostgreSQL ({url})")
        return pact.cmd_pact_verify([], database_url=url) or _wrote_tasks(url, "pact-verify")


def _wrote_tasks(url: str, suite: str) -> int:
    """0 when the suite's server kept its tasks in this database (it ran on PostgreSQL)."""
    import psycopg

    with psycopg.connect(url) as conn:
        found = conn.execute("SELECT count(*) FROM tasks").fetchone()
    count = int(found[0]) if found else 0
    step(f"{suite}: the server kept {count} tasks in PostgreSQL")
    if count == 0:
        note(f"{suite}: no task in {url}: the server did not run on PostgreSQL")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main("suites-postgres", cmd_suites))
