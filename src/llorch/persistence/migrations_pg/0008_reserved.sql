-- Placeholder on branch pg-fanout only: number 8 is the database queue's (branch pg-queue). Delete
-- this file when that branch's 0008 is merged; it changes nothing.
SELECT 1;
