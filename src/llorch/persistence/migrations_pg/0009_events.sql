-- The durable transcript of running tasks (ORCH-STATE-0041): every frame of a task's event stream
-- under its stream id, appended in batches by the instance that runs it, so that a client on any
-- instance reads it (and resumes with Last-Event-ID). Rows of a task ended more than the retention
-- ago (persistence/pg_events.py, 2 minutes) are deleted; its trace artifact keeps the transcript.
CREATE TABLE task_events (
    task_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (task_id, seq)
);
-- A cancel asked of an instance that does not run the task (milliseconds, the asking instance's
-- clock): the running instance is told with a NOTIFY, and reads it when it starts the task.
ALTER TABLE tasks ADD COLUMN cancel_requested_ms BIGINT;
