-- The durable transcript in chunks (ORCH-STATE-0062): one row per task and flush holding every
-- frame of that task the flush wrote (a JSON array of [seq, kind, data], ids first_seq up to
-- last_seq), not one row per frame: PostgreSQL's cost grew with the rows (an index entry and a
-- WAL record each). The rows are kept only while a task runs and for 2 minutes after (the
-- task's trace keeps its transcript), so the old ones are dropped, not converted.
DROP TABLE task_events;
CREATE TABLE task_events (
    task_id TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    frames TEXT NOT NULL,
    PRIMARY KEY (task_id, first_seq)
);
