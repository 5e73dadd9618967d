-- When a running task's progress (its tokens_out so far) was last checkpointed, so that a restart
-- charges a task it cut short for the tokens it had produced and the time it had run.
ALTER TABLE tasks ADD COLUMN progress_ms INTEGER;
