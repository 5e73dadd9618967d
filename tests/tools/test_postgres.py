"""The private PostgreSQL cluster the scale-out tests run on."""

from __future__ import annotations

import pytest

from tools.postgres import ClusterError, private_cluster


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
