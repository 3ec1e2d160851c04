"""ACE IoT FlightDeck timeseries: `GET /sites/{site}/timeseries/paginated` into the timeseries
stream, a window at a time, following `next_cursor` while `has_more`.

- Auth: `Authorization: Bearer <key>`; the key comes from the environment (`api_key_env`).
- Values stay strings, as sent; times are naive UTC (`2025-10-16T00:05:00`, sometimes with
  microseconds or a trailing `Z`): all read as UTC.
- Samples of every point come interleaved by time; `points` keeps only the named ones. Samples
  outside the window and repeats (the same point and time on two pages) are dropped. A sample
  that cannot be placed (not an object, no name, a time that does not parse) is a dead letter;
  the rest of the page goes on.
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

from sluice.producers.http_client import Retry
from sluice.producers.http_source import HttpSource, Row, WindowRead, floor_time, iso_utc
from sluice.producers.source import SourceReject
from sluice.shared.errors import HttpSourceError
from sluice.shared.settings import AceIotSourceConfig, Settings
from sluice.shared.streams import Stream

BUCKET = timedelta(minutes=5)  # what the API serves unless raw_data (and reportedly even then)
SECOND = timedelta(seconds=1)


def parse_ace_time(value: Any) -> datetime:
    t = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def _placed(sample: Any) -> tuple[str, datetime] | str:
    """A sample's point name and time, or why it cannot be placed."""
    if not isinstance(sample, dict):
        return f"sample is a JSON {type(sample).__name__}, not an object"
    name = sample.get("name")
    if not isinstance(name, str) or not name:
        return f"sample has no point name ({str(name)[:40]!r})"
    if not isinstance(sample.get("time"), str):
        return f"time {str(sample.get('time'))[:40]!r} is not an ISO-8601 text"
    try:
        return name, parse_ace_time(sample["time"])
    except ValueError:
        return f"time {sample['time'][:40]!r} is not an ISO-8601 time"


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

    def read_window(self, partition: str, start: datetime, end: datetime) -> WindowRead:
        path = f"/sites/{quote(partition, safe='')}/timeseries/paginated"
        context = {"source": self.name, "partition": partition}
        base = {
            "start_time": _ace_time(start),
            "end_time": _ace_time(end),
            "page_size": self.cfg.page_size,
            "raw_data": "true" if self.cfg.raw_data else "false",
        }
        rows: dict[tuple[str, str], Row] = {}
        rejected: list[SourceReject] = []
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
            for i, sample in enumerate(body["point_samples"]):
                placed = _placed(sample)
                if isinstance(placed, str):
                    where = f"sample #{i} of a page of {_ace_time(start)}..{_ace_time(end)}"
                    rejected.append(self.reject(partition, sample, placed, where))
                    continue
                name, t = placed
                last_time = t
                if self.wanted and name not in self.wanted:
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
                why = "has_more with a null next_cursor"
                return self._cut(rows, rejected, start, end, last_time, why)
            if nxt == cursor or nxt in sent:
                why = f"next_cursor did not advance ({nxt[:40]})"
                return self._cut(rows, rejected, start, end, last_time, why)
            cursor = str(nxt)
        else:
            why = f"still has_more after {self.cfg.max_pages_per_window} pages"
            return self._cut(rows, rejected, start, end, last_time, why)
        return WindowRead(self._sorted(rows), end, rejected)

    def _cut(
        self,
        rows: dict[tuple[str, str], Row],
        rejected: list[SourceReject],
        start: datetime,
        end: datetime,
        last_time: datetime | None,
        why: str,
    ) -> WindowRead:
        """Stop the window: complete up to the newest sample time seen (that time's samples may
        continue on the page we could not get, so they are read again next run)."""
        upto = start if last_time is None else min(max(floor_time(last_time, SECOND), start), end)
        self.anomaly(
            f"aceiot paging stopped: {why}; window complete up to {_ace_time(upto)}",
            site=self.cfg.site,
            window=f"{_ace_time(start)}..{_ace_time(end)}",
        )
        kept = {k: r for k, r in rows.items() if parse_ace_time(r[2]) < upto}
        return WindowRead(self._sorted(kept), upto, rejected)

    @staticmethod
    def _sorted(rows: dict[tuple[str, str], Row]) -> list[Row]:
        return [rows[k] for k in sorted(rows, key=lambda k: (k[1], k[0]))]
