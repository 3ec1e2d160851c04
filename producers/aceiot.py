"""ACE IoT FlightDeck timeseries (apis.md §7): `GET /sites/{site}/timeseries/paginated` into the
timeseries stream, a window at a time, following `next_cursor` while `has_more`.

- Auth: `Authorization: Bearer <key>`; the key comes from the environment (`api_key_env`).
- Values stay strings, as sent; times are naive UTC (`2025-10-16T00:05:00`, sometimes with
  microseconds or a trailing `Z`): all read as UTC.
- Samples of every point come interleaved by time; `points` keeps only the named ones. Samples
  outside the window and repeats (the same point and time on two pages) are dropped.
- The server's cursor can fail to advance (it then serves the same page forever), and `has_more`
  can come with a null cursor. Either stops the window there: the samples read so far are kept,
  the window counts as complete only up to the newest sample time seen (the cursor moves that
  far, the next run resumes from there with a new `start_time`), and the anomaly is logged and
  recorded in the run's `error`. A window never takes more than `max_pages_per_window` calls.
- 404 "No data for time period" is an empty window.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

from producers.http_client import Retry
from producers.http_source import HttpSource, Row, floor_time, iso_utc
from shared.errors import HttpSourceError
from shared.settings import AceIotSourceConfig, Settings
from shared.streams import Stream

BUCKET = timedelta(minutes=5)  # what the API serves unless raw_data (and reportedly even then)
SECOND = timedelta(seconds=1)


def parse_ace_time(value: Any) -> datetime:
    t = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def _ace_time(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value)


def _page_shape(body: Any) -> Retry | None:
    if not isinstance(body, dict) or not isinstance(body.get("point_samples"), list):
        return Retry(f"timeseries body without point_samples: {str(body)[:100]}")
    return None


class AceIotSource(HttpSource):
    api = "aceiot"
    cfg: AceIotSourceConfig

    def __init__(self, name: str, cfg: AceIotSourceConfig, stream: Stream, settings: Settings):
        super().__init__(name, cfg, stream, settings)
        self.step = SECOND if cfg.raw_data else BUCKET
        key = self.secret()
        self.http = self.make_api(headers={"Authorization": f"Bearer {key}"} if key else None)
        self.wanted = set(cfg.points)

    def partitions(self) -> list[str]:
        return [self.cfg.site]

    def window(self) -> timedelta:
        return timedelta(seconds=self.cfg.window_seconds)

    def closed_until(self, now: datetime) -> datetime:
        return floor_time(now, self.step)

    def initial_start(self) -> datetime:
        return floor_time(super().initial_start(), SECOND)

    def fetch(self, partition: str, start: datetime, end: datetime) -> list[Row]:
        return self.fetch_window(partition, start, end)[0]

    def fetch_window(
        self, partition: str, start: datetime, end: datetime
    ) -> tuple[list[Row], datetime]:
        path = f"/sites/{quote(partition, safe='')}/timeseries/paginated"
        context = {"source": self.name, "partition": partition}
        base = {
            "start_time": _ace_time(start),
            "end_time": _ace_time(end),
            "page_size": self.cfg.page_size,
            "raw_data": "true" if self.cfg.raw_data else "false",
        }
        rows: dict[tuple[str, str], Row] = {}
        cursor: str | None = None
        sent: set[str] = set()
        last_time: datetime | None = None
        for _ in range(self.cfg.max_pages_per_window):
            params = dict(base, cursor=cursor) if cursor is not None else base
            try:
                body = self.http.get_json(path, params, check=_page_shape, context=context)
            except HttpSourceError as exc:
                if exc.status == 404 and "no data" in str(exc).lower():
                    break  # an empty window (or no more data after a cursor)
                raise
            for sample in body["point_samples"]:
                name = str(sample.get("name") or "")
                t = parse_ace_time(sample["time"])
                last_time = t
                if not name or (self.wanted and name not in self.wanted):
                    continue
                if start <= t < end:
                    ts = iso_utc(t)
                    rows[(name, ts)] = [partition, name, ts, _text(sample.get("value"))]
            if not body.get("has_more"):
                break
            nxt = body.get("next_cursor")
            if cursor is not None:
                sent.add(cursor)
            if not nxt:
                return self._cut(rows, start, end, last_time, "has_more with a null next_cursor")
            if nxt == cursor or nxt in sent:
                return self._cut(
                    rows, start, end, last_time, f"next_cursor did not advance ({nxt[:40]})"
                )
            cursor = str(nxt)
        else:
            return self._cut(
                rows,
                start,
                end,
                last_time,
                f"still has_more after {self.cfg.max_pages_per_window} pages",
            )
        return self._sorted(rows), end

    def _cut(
        self,
        rows: dict[tuple[str, str], Row],
        start: datetime,
        end: datetime,
        last_time: datetime | None,
        why: str,
    ) -> tuple[list[Row], datetime]:
        """Stop the window: complete up to the newest sample time seen (that time's samples may
        continue on the page we could not get, so they are read again next run)."""
        upto = start if last_time is None else min(max(floor_time(last_time, SECOND), start), end)
        self.anomaly(
            f"aceiot paging stopped: {why}; window complete up to {_ace_time(upto)}",
            site=self.cfg.site,
            window=f"{_ace_time(start)}..{_ace_time(end)}",
        )
        kept = {k: r for k, r in rows.items() if parse_ace_time(r[2]) < upto}
        return self._sorted(kept), upto

    @staticmethod
    def _sorted(rows: dict[tuple[str, str], Row]) -> list[Row]:
        return [rows[k] for k in sorted(rows, key=lambda k: (k[1], k[0]))]
