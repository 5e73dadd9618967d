-- Artifact metadata. The bodies are files named by their digest (llorch.artifacts); a row is
-- written only once its file is durably in place, so every row names a body that was complete.
-- tags is a JSON array of strings and metadata a JSON object of strings.
CREATE TABLE artifacts (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    artifact_id TEXT    NOT NULL UNIQUE,
    digest      TEXT    NOT NULL,
    kind        TEXT    NOT NULL,
    size_bytes  INTEGER NOT NULL,
    created_ms  INTEGER NOT NULL,
    tags        TEXT    NOT NULL DEFAULT '[]',
    parent      TEXT    REFERENCES artifacts (artifact_id),
    task_id     TEXT,
    metadata    TEXT    NOT NULL DEFAULT '{}'
);

CREATE INDEX artifacts_by_kind ON artifacts (kind, seq);
CREATE INDEX artifacts_by_task ON artifacts (task_id, seq);
