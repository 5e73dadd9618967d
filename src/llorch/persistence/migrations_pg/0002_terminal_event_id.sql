-- The id of a task's terminal stream event, so that a stream rebuilt from the database (once its
-- events have left memory) keeps its original id and Last-Event-ID resumes still reach it.
ALTER TABLE tasks ADD COLUMN terminal_event_id BIGINT;
