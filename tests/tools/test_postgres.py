"""The private PostgreSQL cluster the scale-out tests run on."""

from __future__ import annotations

import pytest

from tools.postgres import ClusterError, _wrote_tasks, private_cluster, suite_database


def test_a_private_cluster_keeps_committed_rows_across_a_crash() -> None:
    with private_cluster() as pg:
        assert pg.url().startswith("postgresql://llorch@127.0.0.1:")
        pg.create_database("t1")
        pg.psql("CREATE TABLE rows (n int); INSERT INTO rows VALUES (1), (2)", database="t1")

        pg.stop(mode="immediate")  # no shutdown checkpoint: recovery replays the WAL
        assert not pg.running()
        with pytest.raises(ClusterError):
            pg.psql("SELECT 1", database="t1")
        pg.start()

        assert pg.psql("SELECT sum(n) FROM rows", database="t1") == "3"
        assert pg.psql("SHOW listen_addresses") == "127.0.0.1"
    assert not pg.running()
    assert not pg.root.exists()


def test_a_suite_database_is_new_and_dropped_on_the_server_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with private_cluster() as pg:
        monkeypatch.setenv("LLORCH_TEST_DATABASE_URL", pg.url())
        with suite_database("llorch_suite") as url:
            name = url.rsplit("/", 1)[1]
            assert url == pg.url(name) and name.startswith("llorch_suite_")
            pg.psql("CREATE TABLE tasks (task_id text)", name)
            assert _wrote_tasks(url, "a suite") == 1  # a server that kept nothing here
            pg.psql("INSERT INTO tasks VALUES ('t-1')", name)
            assert _wrote_tasks(url, "a suite") == 0
        listed = pg.psql("SELECT count(*) FROM pg_database WHERE datname = '" + name + "'")
        assert listed == "0"
