-- The llorch instance that admitted a task, and each instance's last heartbeat (milliseconds of
-- the database's clock, so instances' clocks need not agree): a start-up reconciles only the
-- tasks of instances whose heartbeat expired (and its own).
ALTER TABLE tasks ADD COLUMN instance_id TEXT;
CREATE TABLE instances (
    instance_id TEXT PRIMARY KEY,
    heartbeat_ms BIGINT NOT NULL
);
