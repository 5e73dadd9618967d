-- The queues of the pools and the slots of the engine replicas, shared by every instance on the
-- database (ORCH-STATE-0030 .. 0039). A task waits in queue_entries from its admission until an
-- instance claims it (or it ends queued); a non-terminal task without an entry belongs to the
-- instance named by tasks.instance_id (it runs it, or is ending it). band: 0 interactive, 1
-- batch. Times are milliseconds of the admitting instance's clock.
CREATE TABLE queue_entries (
    task_id       TEXT    PRIMARY KEY,
    pool_id       TEXT    NOT NULL,
    band          INTEGER NOT NULL,
    flow          TEXT    NOT NULL,
    weight        INTEGER NOT NULL DEFAULT 1,
    seq           BIGINT  NOT NULL,
    wait_until_ms BIGINT,
    deadline_ms   BIGINT
);
CREATE INDEX queue_entries_by_pool ON queue_entries (pool_id, band, seq);

-- How many tasks of each flow a pool's band dispatched: the least served flow goes first.
CREATE TABLE queue_flows (
    pool_id TEXT   NOT NULL,
    band    INTEGER NOT NULL,
    flow    TEXT   NOT NULL,
    served  BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (pool_id, band, flow)
);

-- Per pool: interactive dispatches since the last batch one while batch waited (the guaranteed
-- share of batch, queue.batch_min_share).
CREATE TABLE queue_pools (
    pool_id     TEXT   PRIMARY KEY,
    since_batch BIGINT NOT NULL DEFAULT 0
);

-- One row per task holding a slot of an engine replica; a lease lasts while its instance's
-- heartbeat does.
CREATE TABLE slot_leases (
    task_id     TEXT PRIMARY KEY,
    pool_id     TEXT NOT NULL,
    replica_id  TEXT NOT NULL,
    instance_id TEXT NOT NULL
);
CREATE INDEX slot_leases_by_replica ON slot_leases (pool_id, replica_id);
CREATE INDEX slot_leases_by_instance ON slot_leases (instance_id);

-- The tasks queued before this migration wait in the shared queue, in their order.
INSERT INTO queue_entries (task_id, pool_id, band, flow, weight, seq)
SELECT task_id, pool_id, CASE priority WHEN 'batch' THEN 1 ELSE 0 END, coalesce(owner, ''), 1, seq
FROM tasks WHERE state = 'queued';
