-- Sluice 0007: what `sluice prune` keeps when it deletes old rows.
-- Every statement is idempotent (IF NOT EXISTS): it applies twice.

-- Daily totals of source runs, written in the same transaction that deletes the runs, so a
-- total over this table plus the remaining `source_runs` is the total before the prune.
-- `day` is the UTC date of `started_at`; `seconds` sums finished_at - started_at.
CREATE TABLE IF NOT EXISTS source_runs_daily (
    day      DATE NOT NULL,
    source   TEXT NOT NULL,
    stream   TEXT NOT NULL,
    status   TEXT NOT NULL,
    runs     BIGINT NOT NULL DEFAULT 0,
    pages    BIGINT NOT NULL DEFAULT 0,
    records  BIGINT NOT NULL DEFAULT 0,
    seconds  DOUBLE PRECISION NOT NULL DEFAULT 0,
    PRIMARY KEY (day, source, stream, status)
);

-- Daily totals of a sink's pages (`ingestion_runs`), by the UTC date of `committed_at`, and by
-- `le`: the page-latency bucket (Prometheus' upper bound, "+Inf" beyond the largest) its
-- commit time fell in, so the latency histogram survives the prune too.
CREATE TABLE IF NOT EXISTS ingestion_runs_daily (
    day         DATE NOT NULL,
    sink        TEXT NOT NULL,
    stream      TEXT NOT NULL,
    source      TEXT NOT NULL,
    le          TEXT NOT NULL,
    pages       BIGINT NOT NULL DEFAULT 0,
    received    BIGINT NOT NULL DEFAULT 0,
    inserted    BIGINT NOT NULL DEFAULT 0,
    duplicates  BIGINT NOT NULL DEFAULT 0,
    invalid     BIGINT NOT NULL DEFAULT 0,
    updated     BIGINT NOT NULL DEFAULT 0,
    unchanged   BIGINT NOT NULL DEFAULT 0,
    deleted     BIGINT NOT NULL DEFAULT 0,
    attempts    BIGINT NOT NULL DEFAULT 0,
    seconds     DOUBLE PRECISION NOT NULL DEFAULT 0,
    PRIMARY KEY (day, sink, stream, source, le)
);

-- One row per prune of one target ("d1:SOURCE", "letters", "source_runs",
-- "ingestion_runs:SINK", "cache:SINK"): what it deleted, what it had to keep, how long it took.
CREATE TABLE IF NOT EXISTS prune_runs (
    id           BIGSERIAL PRIMARY KEY,
    target       TEXT NOT NULL,
    started_at   TIMESTAMPTZ NOT NULL,
    finished_at  TIMESTAMPTZ NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('ok', 'partial', 'failed')),
    deleted      BIGINT NOT NULL DEFAULT 0,
    kept         BIGINT NOT NULL DEFAULT 0,
    note         TEXT
);
CREATE INDEX IF NOT EXISTS idx_prune_runs_target_time ON prune_runs (target, started_at DESC);

-- What the prune selects by: pages by commit time.
CREATE INDEX IF NOT EXISTS idx_ingestion_runs_committed ON ingestion_runs (committed_at);
