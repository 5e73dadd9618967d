-- Each owner's own view of an artifact (issue 15 F5). The body stays shared by digest, and the
-- artifacts row keeps what the first store said (shown when authentication is off, and to a
-- `control` key that stored nothing itself); every key that stored the content, or whose task
-- produced it, has its own kind, tags, parent, task, metadata and time here, and sees only that.
-- seq orders an owner's list by when that owner stored the content.
CREATE TABLE artifact_views (
    seq         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    artifact_id TEXT   NOT NULL REFERENCES artifacts (artifact_id),
    owner       TEXT   NOT NULL,
    kind        TEXT   NOT NULL,
    created_ms  BIGINT NOT NULL,
    tags        TEXT   NOT NULL DEFAULT '[]',
    parent      TEXT   REFERENCES artifacts (artifact_id),
    task_id     TEXT,
    metadata    TEXT   NOT NULL DEFAULT '{}',
    UNIQUE (artifact_id, owner)
);

CREATE INDEX artifact_views_by_owner ON artifact_views (owner, seq);

-- Every existing owner keeps the view it saw until now (the first store's), in the same order.
INSERT INTO artifact_views (artifact_id, owner, kind, created_ms, tags, parent, task_id, metadata)
SELECT a.artifact_id, o.owner, a.kind, a.created_ms, a.tags, a.parent, a.task_id, a.metadata
FROM artifact_owners o JOIN artifacts a ON a.artifact_id = o.artifact_id
ORDER BY a.seq, o.owner;

DROP TABLE artifact_owners;
