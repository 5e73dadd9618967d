-- Budgets atomic across instances (ORCH-STATE-0050): the open reservations of a session live on
-- its row, changed only under the row's lock, and each task keeps its own reservation until its
-- end releases it (NULL: nothing held, its usage already committed or never to be).
ALTER TABLE sessions
    ADD COLUMN tokens_reserved  BIGINT           NOT NULL DEFAULT 0,
    ADD COLUMN time_ms_reserved BIGINT           NOT NULL DEFAULT 0,
    ADD COLUMN cost_reserved    DOUBLE PRECISION NOT NULL DEFAULT 0;
ALTER TABLE tasks
    ADD COLUMN reserved_tokens  BIGINT,
    ADD COLUMN reserved_time_ms BIGINT,
    ADD COLUMN reserved_cost    DOUBLE PRECISION;
-- Tasks open when the migration runs held their reservation in a process's memory: they keep
-- an empty one, so that their end still commits their usage once.
UPDATE tasks SET reserved_tokens = 0, reserved_time_ms = 0, reserved_cost = 0
    WHERE state NOT IN ('succeeded', 'failed', 'canceled');

-- The control plane of the cluster (ORCH-STATE-0052): each pool's desired state, written by the
-- operation (drain, resume, reload) on any instance with the next generation, and applied by
-- every instance that has not applied that generation yet. Times by the database's clock.
CREATE TABLE pool_control (
    pool_id           TEXT    PRIMARY KEY,
    generation        BIGINT  NOT NULL,
    draining          BOOLEAN NOT NULL DEFAULT false,
    drain_deadline_ms BIGINT  NOT NULL DEFAULT 0,
    model             TEXT,
    updated_ms        BIGINT  NOT NULL
);

-- Artifact bodies, by digest, shared by every instance (ORCH-STATE-0054): in cluster mode
-- they are not files of one instance's data directory.
CREATE TABLE artifact_bodies (
    digest TEXT  PRIMARY KEY,
    body   BYTEA NOT NULL
);
