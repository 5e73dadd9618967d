-- The durable transcript and the remote cancel of several instances on PostgreSQL
-- (migrations_pg/0009_events.sql). One instance on SQLite keeps its streams in memory and leaves
-- both empty.
CREATE TABLE task_events (
    task_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (task_id, seq)
);
ALTER TABLE tasks ADD COLUMN cancel_requested_ms INTEGER;
