-- The llorch instance that admitted a task, and each instance's last heartbeat: with several
-- instances on one PostgreSQL database, a start-up reconciles only the tasks of instances whose
-- heartbeat expired (and its own). One instance on SQLite leaves both empty.
ALTER TABLE tasks ADD COLUMN instance_id TEXT;
CREATE TABLE instances (
    instance_id TEXT PRIMARY KEY,
    heartbeat_ms INTEGER NOT NULL
);
