-- llorch schema, version 1: sessions with their committed budgets, and tasks.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE sessions (
    session_id        TEXT PRIMARY KEY,
    created_ms        INTEGER NOT NULL,
    last_used_ms      INTEGER NOT NULL,
    ttl_ms            INTEGER NOT NULL,
    turns             INTEGER NOT NULL DEFAULT 0,
    max_turns         INTEGER NOT NULL,
    tokens_remaining  INTEGER NOT NULL,
    time_ms_remaining INTEGER NOT NULL,
    cost_remaining    REAL    NOT NULL,
    last_pool_id      TEXT,
    last_replica_id   TEXT,
    deleted           INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE tasks (
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id           TEXT    NOT NULL UNIQUE,
    session_id        TEXT    NOT NULL,
    pool_id           TEXT    NOT NULL,
    model             TEXT    NOT NULL,
    priority          TEXT    NOT NULL,
    state             TEXT    NOT NULL,
    request_json      TEXT    NOT NULL,
    request_digest    TEXT    NOT NULL,
    correlation_id    TEXT    NOT NULL,
    created_ms        INTEGER NOT NULL,
    started_ms        INTEGER,
    ended_ms          INTEGER,
    ttft_ms           INTEGER,
    decode_time_ms    INTEGER,
    replica_id        TEXT,
    tokens_in         INTEGER NOT NULL DEFAULT 0,
    tokens_out        INTEGER NOT NULL DEFAULT 0,
    cost              REAL    NOT NULL DEFAULT 0,
    finish_reason     TEXT,
    error_code        TEXT,
    error_message     TEXT,
    error_retriable   INTEGER,
    trace_artifact_id TEXT
);

CREATE INDEX tasks_by_session ON tasks (session_id, seq);
CREATE INDEX tasks_by_state ON tasks (state, seq);
