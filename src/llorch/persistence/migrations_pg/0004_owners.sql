-- Owners: the name of the API key that created a task or a session (NULL while authentication
-- is off). An artifact is content-addressed, so several keys may store the same body: each key
-- that stored it (or whose task produced it) has a row in artifact_owners.
ALTER TABLE tasks ADD COLUMN owner TEXT;
ALTER TABLE sessions ADD COLUMN owner TEXT;

CREATE INDEX tasks_by_owner ON tasks (owner, seq);

CREATE TABLE artifact_owners (
    artifact_id TEXT NOT NULL REFERENCES artifacts (artifact_id),
    owner       TEXT NOT NULL,
    PRIMARY KEY (artifact_id, owner)
);
