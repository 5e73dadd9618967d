-- Artifact metadata. The bodies are files named by their digest (llorch.artifacts); a row is
-- written only once its file is durably in place, so every row names a body that was complete.
-- tags is a JSON array of strings and metadata a JSON object of strings, kept as the text they
-- were given (not jsonb, which would rewrite it), as in SQLite.
CREATE TABLE artifacts (
    seq         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    artifact_id TEXT   NOT NULL UNIQUE,
    digest      TEXT   NOT NULL,
    kind        TEXT   NOT NULL,
    size_bytes  BIGINT NOT NULL,
    created_ms  BIGINT NOT NULL,
    tags        TEXT   NOT NULL DEFAULT '[]',
    parent      TEXT   REFERENCES artifacts (artifact_id),
    task_id     TEXT,
    metadata    TEXT   NOT NULL DEFAULT '{}'
);

CREATE INDEX artifacts_by_kind ON artifacts (kind, seq);
CREATE INDEX artifacts_by_task ON artifacts (task_id, seq);
