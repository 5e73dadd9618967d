"""What survives a restart of the server on the same database."""

from __future__ import annotations

import pytest

from tests.conftest import SettingsFactory
from tests.support import BUSY, fill_slots, in_process, pool


@pytest.mark.req("ORCH-DATA-0011")
async def test_queued_tasks_run_after_a_restart(settings_for: SettingsFactory) -> None:
    busy = settings_for(
        {"server": {"shutdown_grace_s": 0}, "pools": [pool(slots_per_replica=1, mock=BUSY)]}
    )
    async with in_process(busy) as api:
        [running] = await fill_slots(api, 1)
        queued = (await api.submit(max_tokens=3)).json()
        session_before = (await api.client.get(f"/v1/sessions/{queued['session_id']}")).json()

    # The same database, now with a replica that answers at once.
    fast = settings_for({"pools": [pool(slots_per_replica=1)]})
    assert fast.database_path == busy.database_path
    async with in_process(fast) as api:
        events = await api.events(queued["task_id"])
        assert events[0].event == "started" and events[-1].event == "end"
        assert (await api.client.get(f"/v1/tasks/{queued['task_id']}")).json()["state"] == (
            "succeeded"
        )
        # The task running at shutdown was canceled and recorded, not left open.
        assert (await api.client.get(f"/v1/tasks/{running}")).json()["state"] == "canceled"
        session = (await api.client.get(f"/v1/sessions/{queued['session_id']}")).json()
        assert session["turns"] == session_before["turns"]
