"""Prometheus metrics, derived from the databases at scrape time.

Nothing is counted in process memory: every counter is a sum over the sinks' own `ingestion_runs`
tables (PostgreSQL for the postgres sink, the SQLite file for the sqlite sink), written in the
same transaction as the records. So the counters survive worker restarts, never count a page
twice (a redelivered page finds its row and adds nothing), and any number of `sluice serve`
processes report the same values. The one exception is the ingest delay histogram, observed per
record as each page commits: the workers add it up in Redis (shared/ingest_delay.py).

Cost: each scrape aggregates the whole `ingestion_runs` table of each sink once (one row per page
per sink: about 1,000 rows per million records at the default page size), plus a count and
min() over a local D1 source's unprocessed rows (one row read on a remote D1). That is
milliseconds for millions of records and grows linearly. `sluice prune` keeps the tables short
(`[retention] runs_days`): the pages and runs it removes are counted from their daily totals.

| metric | type | labels |
|---|---|---|
| sluice_queue_depth | gauge: waiting + unacked | queue |
| sluice_queue_waiting, sluice_queue_unacked | gauge (unacked: Redis only) | queue |
| sluice_records_received_total | counter | stream, sink |
| sluice_records_inserted_total | counter | stream, sink |
| sluice_records_duplicates_total | counter | stream, sink |
| sluice_records_invalid_total | counter | stream, sink |
| sluice_records_dead_lettered_total | counter: failures in failed_ingestions | stream, sink |
| sluice_page_seconds | histogram: committed_at - started_at per page | stream, sink |
| sluice_dead_letters_pending | gauge | stream, sink, error_class |
| sluice_source_runs_total | counter | source, status |
| sluice_source_backlog_age_seconds | gauge: oldest item still to process, 0: caught up | source |
| sluice_ingest_delay_seconds | histogram: commit time - record time, per record | stream, sink |
| sluice_source_last_commit_timestamp_seconds | gauge | source |
| sluice_source_unprocessed_rows | gauge (local D1 sources) | source |
| sluice_source_pages_in_flight | gauge | source |
| sluice_source_oldest_in_flight_seconds | gauge (0 when none) | source |
| sluice_d1_database_size_bytes | gauge (local D1 sources) | source |
| sluice_collector_up | gauge: 1 if the part could be read | part |
| sluice_scrape_duration_seconds | gauge | — |

A part that cannot be read (PostgreSQL down, say) is left out of that scrape (never reported as
zero, which would look like a counter reset) and `sluice_collector_up{part=…}` is 0.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy import text
from sqlalchemy.engine import Engine

from sluice.ops.d1_size import d1_database_sizes
from sluice.ops.status import (
    broker_queue_depths,
    collect_sources,
    ops_engine,
    ops_state,
    sqlite_reader,
    uses_postgres,
)
from sluice.shared import ingest_delay
from sluice.shared.context import Context

log = logging.getLogger("sluice.metrics")

# Page latency buckets, seconds. A page of 1,000 records usually commits in 50-500 ms.
BUCKETS: tuple[float, ...] = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

T = TypeVar("T")


@dataclass
class RunTotals:
    received: int = 0
    inserted: int = 0
    duplicates: int = 0
    invalid: int = 0
    pages: int = 0
    seconds: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))


def _totals_sql(duration: str, count_if: Callable[[str], str]) -> str:
    cols = ", ".join(count_if(f"d <= {b!r}") for b in BUCKETS)
    return (
        "SELECT stream, sum(received), sum(inserted), sum(duplicates), sum(invalid), count(*),"
        f" sum(d), {cols} FROM (SELECT stream, received, inserted, duplicates, invalid,"
        f" {duration} AS d FROM ingestion_runs WHERE sink = :sink) runs GROUP BY stream"
    )


# started_at comes from the worker's clock and committed_at from the database's: clock skew can
# make d slightly negative, so it is clamped at 0.
_PG_TOTALS = _totals_sql(
    "greatest(extract(epoch FROM committed_at - started_at)::float8, 0)",
    lambda cond: f"count(*) FILTER (WHERE {cond})",
)
_SQLITE_TOTALS = _totals_sql(
    "max((julianday(committed_at) - julianday(started_at)) * 86400.0, 0)",
    lambda cond: f"sum(CASE WHEN {cond} THEN 1 ELSE 0 END)",
).replace(":sink", "?")


def _totals(rows: Sequence[Sequence[Any]]) -> dict[str, RunTotals]:
    out = {}
    for r in rows:
        out[str(r[0])] = RunTotals(
            received=int(r[1] or 0),
            inserted=int(r[2] or 0),
            duplicates=int(r[3] or 0),
            invalid=int(r[4] or 0),
            pages=int(r[5] or 0),
            seconds=float(r[6] or 0.0),
            buckets=[int(v or 0) for v in r[7:]],
        )
    return out


def postgres_totals(engine: Engine, sink: str = "postgres") -> dict[str, RunTotals]:
    """Per stream, the rows the postgres sink wrote into its own ingestion_runs table, and the
    daily totals of those `sluice prune` removed."""
    with engine.connect() as conn:
        out = _totals(conn.execute(text(_PG_TOTALS), {"sink": sink}).all())
        return with_rollups(out, conn.execute(text(_ROLLUPS), {"sink": sink}).all())


def sqlite_totals(conn: sqlite3.Connection, sink: str = "sqlite") -> dict[str, RunTotals]:
    out = _totals(conn.execute(_SQLITE_TOTALS, (sink,)).fetchall())
    return with_rollups(out, conn.execute(_ROLLUPS.replace(":sink", "?"), (sink,)).fetchall())


# Pages `sluice prune` rolled up into daily totals, by latency bucket (`le`: a bucket's upper
# bound, or "+Inf"): the counters keep counting them, so a prune is never a counter reset.
_ROLLUPS = (
    "SELECT stream, le, sum(pages), sum(received), sum(inserted), sum(duplicates),"
    " sum(invalid), sum(seconds) FROM ingestion_runs_daily WHERE sink = :sink GROUP BY 1, 2"
)


def with_rollups(out: dict[str, RunTotals], rows: Sequence[Sequence[Any]]) -> dict[str, RunTotals]:
    """The totals with the rolled-up pages added, each in its latency bucket and those above."""
    for stream, le, pages, received, inserted, duplicates, invalid, seconds in rows:
        t = out.setdefault(str(stream), RunTotals())
        t.pages += int(pages or 0)
        t.received += int(received or 0)
        t.inserted += int(inserted or 0)
        t.duplicates += int(duplicates or 0)
        t.invalid += int(invalid or 0)
        t.seconds += float(seconds or 0.0)
        bound = float(le)
        for i, b in enumerate(BUCKETS):
            if bound <= b:
                t.buckets[i] += int(pages or 0)
    return out


class SluiceCollector(Collector):
    def __init__(self, ctx: Context, engine: Engine | None = None) -> None:
        self.ctx = ctx
        # PostgreSQL only when the deployment has it (a SQLite-only one must not start one).
        if engine is None and uses_postgres(ctx.settings):
            engine = ops_engine(ctx.postgres_url)
        self.engine = engine
        self.state = ops_state(ctx.settings, engine)

    def _read(self, up: GaugeMetricFamily, part: str, fn: Callable[[], T]) -> T | None:
        try:
            value = fn()
        except Exception as exc:
            log.warning("metrics: cannot read %s: %s", part, exc)
            up.add_metric([part], 0)
            return None
        up.add_metric([part], 1)
        return value

    def _sqlite_totals(self) -> dict[str, RunTotals]:
        conn = sqlite_reader(self.ctx.settings.sqlite_path)
        try:
            return sqlite_totals(conn)
        finally:
            conn.close()

    def _state(self) -> dict[str, list[Any]]:
        with self.state.read() as conn:
            return {
                "dead_lettered": list(
                    conn.execute(
                        text(
                            "SELECT stream, sink, sum(attempts) FROM failed_ingestions"
                            " GROUP BY 1, 2"
                        )
                    ).all()
                ),
                "pending": list(
                    conn.execute(
                        text(
                            "SELECT stream, sink, error_class, count(*) FROM failed_ingestions"
                            " WHERE status = 'pending' GROUP BY 1, 2, 3"
                        )
                    ).all()
                ),
                "runs": list(
                    conn.execute(
                        text(
                            "SELECT source, status, sum(n) FROM (SELECT source, status, count(*)"
                            " AS n FROM source_runs GROUP BY 1, 2 UNION ALL SELECT source, status,"
                            " sum(runs) FROM source_runs_daily GROUP BY 1, 2) r GROUP BY 1, 2"
                        )
                    ).all()
                ),
            }

    def collect(self) -> Iterator[Metric]:
        t0 = time.perf_counter()
        up = GaugeMetricFamily(
            "sluice_collector_up", "1 if this part could be read at this scrape", labels=["part"]
        )
        yield from self._queues(up)

        sinks_used = {s for st in self.ctx.settings.streams.values() for s in st.sinks}
        totals: dict[str, dict[str, RunTotals]] = {}
        engine = self.engine
        pg = None
        if engine is not None:
            pg = self._read(up, "postgres", lambda: postgres_totals(engine))
        if pg is not None and "postgres" in sinks_used:
            totals["postgres"] = pg
        if "sqlite" in sinks_used:
            lite = self._read(up, "sqlite", self._sqlite_totals)
            if lite is not None:
                totals["sqlite"] = lite
        yield from self._runs(totals)
        yield from self._ingest_delays(up)

        state = self._read(up, "state", self._state)
        if state is not None:
            yield from self._dead_letters(state)
        yield from self._sources(up, pg_up=pg is not None, state_up=state is not None)
        yield from self._d1_sizes(up)

        yield up
        took = GaugeMetricFamily("sluice_scrape_duration_seconds", "Time this scrape took")
        took.add_metric([], time.perf_counter() - t0)
        yield took

    def _queues(self, up: GaugeMetricFamily) -> Iterator[Metric]:
        depths = self._read(up, "broker", lambda: broker_queue_depths(self.ctx))
        if depths is None:
            return
        depth = GaugeMetricFamily(
            "sluice_queue_depth",
            "Pages waiting in the queue plus held by workers",
            labels=["queue"],
        )
        waiting = GaugeMetricFamily(
            "sluice_queue_waiting", "Pages waiting in the queue", labels=["queue"]
        )
        unacked = GaugeMetricFamily(
            "sluice_queue_unacked",
            "Pages delivered to a worker and not yet acknowledged (Redis broker only)",
            labels=["queue"],
        )
        for q, d in depths.items():
            depth.add_metric([q], float(d.total))
            waiting.add_metric([q], float(d.waiting))
            if d.unacked is not None:
                unacked.add_metric([q], float(d.unacked))
        yield depth
        yield waiting
        yield unacked

    def _runs(self, totals: dict[str, dict[str, RunTotals]]) -> Iterator[Metric]:
        labels = ["stream", "sink"]
        families = {
            name: CounterMetricFamily(f"sluice_records_{name}", doc, labels=labels)
            for name, doc in (
                ("received", "Records received in pages, per sink"),
                ("inserted", "Records newly written to the sink"),
                ("duplicates", "Valid records the sink already had (or repeated within a page)"),
                ("invalid", "Records that failed validation"),
            )
        }
        hist = HistogramMetricFamily(
            "sluice_page_seconds",
            "Page latency: from the worker starting the page to its commit",
            labels=labels,
        )
        for sink, per_stream in sorted(totals.items()):
            for stream, t in sorted(per_stream.items()):
                for name, fam in families.items():
                    fam.add_metric([stream, sink], getattr(t, name))
                buckets = [
                    (repr(float(b)), float(n)) for b, n in zip(BUCKETS, t.buckets, strict=True)
                ]
                buckets.append(("+Inf", float(t.pages)))
                hist.add_metric([stream, sink], buckets, t.seconds)
        yield from families.values()
        yield hist

    def _dead_letters(self, state: dict[str, list[Any]]) -> Iterator[Metric]:
        lettered = CounterMetricFamily(
            "sluice_records_dead_lettered",
            "Record failures recorded in failed_ingestions (a record failing again after a"
            " replay counts again)",
            labels=["stream", "sink"],
        )
        for stream, sink, n in state["dead_lettered"]:
            lettered.add_metric([stream, sink], float(n or 0))
        yield lettered
        pending = GaugeMetricFamily(
            "sluice_dead_letters_pending",
            "Dead letters waiting for replay or discard",
            labels=["stream", "sink", "error_class"],
        )
        for stream, sink, error_class, n in state["pending"]:
            pending.add_metric([stream, sink, error_class], float(n))
        yield pending
        runs = CounterMetricFamily(
            "sluice_source_runs",
            "Producer runs of a source, by outcome",
            labels=["source", "status"],
        )
        for source, status, n in state["runs"]:
            runs.add_metric([source, status], float(n))
        yield runs

    def _ingest_delays(self, up: GaugeMetricFamily) -> Iterator[Metric]:
        """The histogram the consumers keep in Redis (shared/ingest_delay.py)."""
        found = self._read(up, "ingest_delay", lambda: ingest_delay.read(self.ctx.redis))
        if found is None:
            return
        hist = HistogramMetricFamily(
            "sluice_ingest_delay_seconds",
            "Ingest delay per record: from its own time (its stream's first timestamp column)"
            " to the commit of its page in the sink",
            labels=["stream", "sink"],
        )
        for (stream, sink), h in sorted(found.items()):
            hist.add_metric([stream, sink], h.cumulative(), h.total)
        yield hist

    def _sources(self, up: GaugeMetricFamily, pg_up: bool, state_up: bool) -> Iterator[Metric]:
        age = GaugeMetricFamily(
            "sluice_source_backlog_age_seconds",
            "Age of the oldest item the source has not processed yet, 0 when caught up: a D1"
            " table's oldest unprocessed row (its event time), an HTTP source's cursor furthest"
            " behind, a KV migration still running (since it started)",
            labels=["source"],
        )
        commit = GaugeMetricFamily(
            "sluice_source_last_commit_timestamp_seconds",
            "When a page of the source was last committed (Unix time)",
            labels=["source"],
        )
        backlog = GaugeMetricFamily(
            "sluice_source_unprocessed_rows",
            "Rows the source has not processed yet (local D1 sources)",
            labels=["source"],
        )
        flight = GaugeMetricFamily(
            "sluice_source_pages_in_flight",
            "Pages published and not yet committed by every sink",
            labels=["source"],
        )
        oldest = GaugeMetricFamily(
            "sluice_source_oldest_in_flight_seconds",
            "Age of the source's oldest page in flight (read again after inflight_lease)",
            labels=["source"],
        )
        # The same facts `sluice status` shows, each source's kind saying how its lag is measured
        # and whether it counts a backlog; its last run is left out (runs are counted above).
        errors: dict[str, str] = {}
        sources = collect_sources(
            self.ctx,
            self.engine if pg_up else None,
            self.state if state_up else None,
            errors,
            runs=False,
            lag=False,
        )
        for name, s in sources.items():
            errors.update({f"{fact}:{name}": message for fact, message in s.errors.items()})
        for part, message in errors.items():
            log.warning("metrics: cannot read %s: %s", part, message)
        for name, s in sources.items():
            if s.backlog_age_seconds is not None:
                age.add_metric([name], s.backlog_age_seconds)
            if s.last_commit is not None:
                commit.add_metric([name], s.last_commit.timestamp())
            if s.unprocessed is not None:
                backlog.add_metric([name], float(s.unprocessed))
            if s.pages_in_flight is not None:
                flight.add_metric([name], float(s.pages_in_flight))
                oldest.add_metric([name], s.oldest_in_flight_seconds or 0.0)
        up.add_metric(["sources"], 0 if errors else 1)
        yield from (age, commit, backlog, flight, oldest)

    def _d1_sizes(self, up: GaugeMetricFamily) -> Iterator[Metric]:
        size = GaugeMetricFamily(
            "sluice_d1_database_size_bytes",
            "Size of a local D1 source's database (D1 refuses writes past 10 GB)",
            labels=["source"],
        )
        errors: dict[str, str] = {}
        for name, n in d1_database_sizes(self.ctx.settings, errors).items():
            size.add_metric([name], float(n))
        for part, message in errors.items():
            log.warning("metrics: cannot read %s: %s", part, message)
        up.add_metric(["d1_size"], 0 if errors else 1)
        yield size


def registry_for(ctx: Context, engine: Engine | None = None) -> CollectorRegistry:
    """A registry holding only our collector (no process metrics of the serving process)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SluiceCollector(ctx, engine))
    return registry
