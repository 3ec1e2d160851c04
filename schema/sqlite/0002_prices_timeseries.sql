-- Streams of the HTTP sources, D1-compatible: historical_prices (Binance, CoinGecko,
-- CryptoCompare) and timeseries (ACE IoT), with the views the market-data reports query.
-- No BEGIN/COMMIT, no PRAGMA, no ATTACH; IF NOT EXISTS everywhere so applying twice is harmless.
-- Times are ISO-8601 UTC text.

CREATE TABLE IF NOT EXISTS historical_prices (
    source        TEXT NOT NULL,
    symbol        TEXT NOT NULL,
    resolution    TEXT NOT NULL,
    "timestamp"   TEXT NOT NULL,
    open          REAL,
    high          REAL,
    low           REAL,
    close         REAL NOT NULL,
    volume        REAL,
    quote_volume  REAL,
    market_cap    REAL,
    trades        INTEGER,
    ingested_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (source, symbol, resolution, "timestamp")
);
CREATE INDEX IF NOT EXISTS idx_historical_prices_symbol_time
    ON historical_prices (symbol, "timestamp");

CREATE TABLE IF NOT EXISTS timeseries (
    site          TEXT NOT NULL,
    point_name    TEXT NOT NULL,
    "timestamp"   TEXT NOT NULL,
    value         TEXT,
    ingested_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (point_name, "timestamp")
);
CREATE INDEX IF NOT EXISTS idx_timeseries_site_time ON timeseries (site, "timestamp");

-- The newest price per source, symbol and resolution.
CREATE VIEW IF NOT EXISTS latest_prices AS
SELECT p.source, p.symbol, p.resolution, p.close AS price, p."timestamp" AS latest_timestamp
FROM historical_prices p
JOIN (
    SELECT source, symbol, resolution, max("timestamp") AS newest
    FROM historical_prices GROUP BY source, symbol, resolution
) m ON m.source = p.source AND m.symbol = p.symbol AND m.resolution = p.resolution
   AND m.newest = p."timestamp";

-- What history we hold, per source, symbol and resolution.
CREATE VIEW IF NOT EXISTS data_coverage AS
SELECT source, symbol, resolution, count(*) AS data_points,
       min("timestamp") AS first_timestamp, max("timestamp") AS last_timestamp
FROM historical_prices
GROUP BY source, symbol, resolution;

-- Pages written per stream, source and sink (from ingestion_runs): volume, duplicates and speed.
CREATE VIEW IF NOT EXISTS ingestion_performance AS
SELECT stream, source, sink,
       count(*) AS pages,
       sum(received) AS received,
       sum(inserted) AS inserted,
       sum(duplicates) AS duplicates,
       sum(invalid) AS invalid,
       min(started_at) AS first_started_at,
       max(committed_at) AS last_committed_at,
       round(avg((julianday(committed_at) - julianday(started_at)) * 86400.0), 3)
           AS avg_page_seconds,
       round(sum(received) / nullif(sum((julianday(committed_at) - julianday(started_at))
             * 86400.0), 0), 1) AS rows_per_second
FROM ingestion_runs
GROUP BY stream, source, sink;
