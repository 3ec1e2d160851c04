-- Sluice 0006 for SQLite, D1-compatible: what dead-letter paging, run history and repairs of
-- dead letters need.
-- sluice: applies once
-- SQLite has no ADD COLUMN IF NOT EXISTS, so this file changes tables once: `sluice migrate`
-- (or `wrangler d1 migrations apply`) records it as applied in the same transaction and never
-- runs it again. No BEGIN/COMMIT, no PRAGMA, no ATTACH.

-- A run is a scheduled or manual run of a source ("produce") or a backfill of a range;
-- `detail` holds a backfill's progress (windows done and total) as JSON text.
ALTER TABLE source_runs ADD COLUMN kind TEXT NOT NULL DEFAULT 'produce';
ALTER TABLE source_runs ADD COLUMN detail TEXT;

-- A dead letter repaired by hand or re-read from its source: the record as it was queued, and
-- when. `record` itself stays as it arrived, so every repair can be audited.
ALTER TABLE failed_ingestions ADD COLUMN fixed_record BLOB;
ALTER TABLE failed_ingestions ADD COLUMN fixed_how TEXT;
ALTER TABLE failed_ingestions ADD COLUMN fixed_at TEXT;
-- The run whose page carried the record, so a run shows every dead letter it left.
ALTER TABLE failed_ingestions ADD COLUMN run_id TEXT;

-- Run history newest first, keyset on (started_at, run_id): all runs, or one source's, one
-- status's, one kind's.
CREATE INDEX IF NOT EXISTS idx_source_runs_keyset ON source_runs (started_at DESC, run_id DESC);
CREATE INDEX IF NOT EXISTS idx_source_runs_source_keyset
    ON source_runs (source, started_at DESC, run_id DESC);
CREATE INDEX IF NOT EXISTS idx_source_runs_status_keyset
    ON source_runs (status, started_at DESC, run_id DESC);
CREATE INDEX IF NOT EXISTS idx_source_runs_kind_keyset
    ON source_runs (kind, started_at DESC, run_id DESC);

-- Grouped counts per error class with their first and last time, read from the index alone.
CREATE INDEX IF NOT EXISTS idx_failed_ingestions_class_times
    ON failed_ingestions (status, error_class, first_failed_at, last_failed_at);
-- A run's dead letters: by its id, or (letters stored before they carried it) by its pages.
CREATE INDEX IF NOT EXISTS idx_failed_ingestions_run ON failed_ingestions (run_id);
CREATE INDEX IF NOT EXISTS idx_failed_ingestions_page ON failed_ingestions (page_id);
