-- Streams of the HTTP sources: historical_prices (Binance, CoinGecko, CryptoCompare) and
-- timeseries (ACE IoT), with the views the market-data reports query (latest_prices,
-- data_coverage, ingestion_performance).
-- Every statement is idempotent (IF NOT EXISTS, CREATE OR REPLACE) so the file can be applied twice.

CREATE TABLE IF NOT EXISTS historical_prices (
    source        TEXT NOT NULL,
    symbol        TEXT NOT NULL,
    resolution    TEXT NOT NULL,
    "timestamp"   TIMESTAMPTZ NOT NULL,
    open          DOUBLE PRECISION,
    high          DOUBLE PRECISION,
    low           DOUBLE PRECISION,
    close         DOUBLE PRECISION NOT NULL,
    volume        DOUBLE PRECISION,
    quote_volume  DOUBLE PRECISION,
    market_cap    DOUBLE PRECISION,
    trades        BIGINT,
    ingested_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (source, symbol, resolution, "timestamp")
);
CREATE INDEX IF NOT EXISTS idx_historical_prices_symbol_time
    ON historical_prices (symbol, "timestamp");

CREATE TABLE IF NOT EXISTS timeseries (
    site          TEXT NOT NULL,
    point_name    TEXT NOT NULL,
    "timestamp"   TIMESTAMPTZ NOT NULL,
    value         TEXT,
    ingested_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (point_name, "timestamp")
);
CREATE INDEX IF NOT EXISTS idx_timeseries_site_time ON timeseries (site, "timestamp");

-- The newest price per source, symbol and resolution.
CREATE OR REPLACE VIEW latest_prices AS
SELECT p.source, p.symbol, p.resolution, p.close AS price, p."timestamp" AS latest_timestamp
FROM historical_prices p
JOIN (
    SELECT source, symbol, resolution, max("timestamp") AS newest
    FROM historical_prices GROUP BY source, symbol, resolution
) m ON m.source = p.source AND m.symbol = p.symbol AND m.resolution = p.resolution
   AND m.newest = p."timestamp";

-- What history we hold, per source, symbol and resolution.
CREATE OR REPLACE VIEW data_coverage AS
SELECT source, symbol, resolution, count(*) AS data_points,
       min("timestamp") AS first_timestamp, max("timestamp") AS last_timestamp
FROM historical_prices
GROUP BY source, symbol, resolution;

-- Pages written per stream, source and sink (from ingestion_runs): volume, duplicates and speed.
CREATE OR REPLACE VIEW ingestion_performance AS
SELECT stream, source, sink,
       count(*) AS pages,
       sum(received) AS received,
       sum(inserted) AS inserted,
       sum(duplicates) AS duplicates,
       sum(invalid) AS invalid,
       min(started_at) AS first_started_at,
       max(committed_at) AS last_committed_at,
       round(avg(extract(epoch FROM committed_at - started_at))::numeric, 3) AS avg_page_seconds,
       round((sum(received) / nullif(sum(extract(epoch FROM committed_at - started_at)), 0))
             ::numeric, 1) AS rows_per_second
FROM ingestion_runs
GROUP BY stream, source, sink;
