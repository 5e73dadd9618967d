-- llorch schema, version 1 (PostgreSQL): sessions with their committed budgets, and tasks.
-- The same tables as migrations/0001_initial.sql: SQLite's INTEGER is 64 bits (BIGINT here), its
-- REAL a double, its AUTOINCREMENT an identity that is never reused.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE sessions (
    session_id        TEXT PRIMARY KEY,
    created_ms        BIGINT           NOT NULL,
    last_used_ms      BIGINT           NOT NULL,
    ttl_ms            BIGINT           NOT NULL,
    turns             BIGINT           NOT NULL DEFAULT 0,
    max_turns         BIGINT           NOT NULL,
    tokens_remaining  BIGINT           NOT NULL,
    time_ms_remaining BIGINT           NOT NULL,
    cost_remaining    DOUBLE PRECISION NOT NULL,
    last_pool_id      TEXT,
    last_replica_id   TEXT,
    deleted           INTEGER          NOT NULL DEFAULT 0
);

CREATE TABLE tasks (
    seq               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id           TEXT             NOT NULL UNIQUE,
    session_id        TEXT             NOT NULL,
    pool_id           TEXT             NOT NULL,
    model             TEXT             NOT NULL,
    priority          TEXT             NOT NULL,
    state             TEXT             NOT NULL,
    request_json      TEXT             NOT NULL,
    request_digest    TEXT             NOT NULL,
    correlation_id    TEXT             NOT NULL,
    created_ms        BIGINT           NOT NULL,
    started_ms        BIGINT,
    ended_ms          BIGINT,
    ttft_ms           BIGINT,
    decode_time_ms    BIGINT,
    replica_id        TEXT,
    tokens_in         BIGINT           NOT NULL DEFAULT 0,
    tokens_out        BIGINT           NOT NULL DEFAULT 0,
    cost              DOUBLE PRECISION NOT NULL DEFAULT 0,
    finish_reason     TEXT,
    error_code        TEXT,
    error_message     TEXT,
    error_retriable   BOOLEAN,
    trace_artifact_id TEXT
);

CREATE INDEX tasks_by_session ON tasks (session_id, seq);
CREATE INDEX tasks_by_state ON tasks (state, seq);
