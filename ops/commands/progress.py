"""Progress of long work (demo, backfill, bench, reconcile), on stderr so stdout stays the result.

On a terminal: click's progress bar (done/total, percent, time left, rate) with the work's
messages printed above it. Piped (a log, CI, a test): plain lines, at most one every
`interval` seconds plus the last, since a redrawn bar would fill a log with carriage returns.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING, TextIO

import click

if TYPE_CHECKING:
    from click._termui_impl import ProgressBar

#: Seconds between two plain progress lines when stderr is not a terminal.
LINE_INTERVAL = 2.0


class Progress:
    """Reports `done` of `total` units of work; `say` prints a message.

    `advance` and `say` fit the callbacks the library functions take (`run_demo`,
    `run_backfill`, `run_bench`). A `quiet` one prints nothing: under --json, demo and bench
    keep stderr for errors."""

    def __init__(
        self,
        label: str,
        unit: str,
        *,
        quiet: bool = False,
        stream: TextIO | None = None,
        interval: float = LINE_INTERVAL,
    ) -> None:
        self.label = label
        self.unit = unit
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.interval = interval
        self.tty = self.stream.isatty()
        self.bar: ProgressBar[str] | None = None
        self.started = time.monotonic()
        self.last_line = float("-inf")  # the first line is printed at once
        self.base: int | None = None  # `done` at the first report
        self.done = 0
        self.total = 0

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def rate(self) -> float:
        """Units per second since the first report (work done by an earlier run, which a
        resumed backfill starts with, is not counted)."""
        seconds = time.monotonic() - self.started
        return (self.done - (self.base or 0)) / seconds if seconds > 0 else 0.0

    def _speed(self, _item: str | None = None) -> str:
        """Rate and time left, e.g. `21,000 records/s, 4s left`."""
        rate = self.rate()
        text = f"{rate:,.{1 if rate < 10 else 0}f} {self.unit}/s"
        if 0 < self.done < self.total and rate > 0:
            text += f", {_duration((self.total - self.done) / rate)} left"
        return text

    def say(self, message: str) -> None:
        """A message line; on a terminal above the bar, which is drawn again below it."""
        if self.quiet:
            return
        if self.bar is None:
            click.echo(message, file=self.stream)
            return
        # Clear the bar's line, print the message, then the bar as it was.
        self.stream.write(f"\r\x1b[K{message}\n\r{self.bar.format_progress_line()}")
        self.stream.flush()

    def advance(self, done: int, total: int, detail: str = "") -> None:
        """`done` of `total` units are done. Piped, `detail` (when given) is printed as is,
        else a line of counts, rate and time left at most every `interval` seconds."""
        if self.base is None:
            self.base, self.started = done, time.monotonic()
        self.done, self.total = done, total
        if self.quiet:
            return
        if self.tty:
            self._draw(done, total)
            return
        if detail:
            click.echo(detail, file=self.stream)
            return
        if done == self.base:
            return  # the starting point: nothing done by this run yet
        now = time.monotonic()
        if done < total and now - self.last_line < self.interval:
            return
        self.last_line = now
        click.echo(self.line(), file=self.stream)

    def line(self) -> str:
        """The plain progress line: counts, percent, rate and time left."""
        head = f"{self.label}: {self.done:,}/{self.total:,} {self.unit}"
        if self.total:
            head += f" ({100 * self.done // self.total}%)"
        return f"{head}, {self._speed()}"

    def _draw(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = click.progressbar(
                length=max(total, 1),
                label=self.label,
                file=self.stream,
                show_pos=True,
                show_percent=True,
                show_eta=False,  # ours, in _speed: click's would count resumed work
                item_show_func=self._speed,
            )
            self.bar.render_progress()
        self.bar.length = max(total, 1)
        if done != self.bar.pos:
            self.bar.update(done - self.bar.pos)

    @contextlib.contextmanager
    def working(self, what: str) -> Iterator[None]:
        """For work that reports no counts: says `label: what` and, on a terminal, how long it
        has taken so far, redrawn every second until the block ends."""
        if self.quiet or not self.tty:
            self.say(f"{self.label}: {what}")
            yield
            return
        stop = threading.Event()
        t0 = time.monotonic()

        def tick() -> None:
            while True:
                spent = _duration(time.monotonic() - t0)
                self.stream.write(f"\r\x1b[K{self.label}: {what} {spent}")
                self.stream.flush()
                if stop.wait(1.0):
                    return

        thread = threading.Thread(target=tick, name="sluice-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def close(self) -> None:
        """End the bar's line (on a terminal)."""
        if self.bar is not None:
            self.bar.render_finish()
            self.bar = None


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
