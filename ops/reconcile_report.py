"""What `sluice reconcile` found, as data, and the table it prints.

ops/reconcile.py compares and fills a ReconcileReport; this module only shapes it: `as_dict()`
is the JSON document (`sluice reconcile --json`), `render_reconcile` the table and its notes.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

Key = tuple[Any, ...]


@dataclass(frozen=True)
class KeyList:
    """The keys of one problem: how many there are, and the first few in key order."""

    total: int
    keys: list[Key]

    @classmethod
    def of(cls, keys: Collection[Key], limit: int) -> KeyList:
        return cls(len(keys), sorted(keys)[:limit])

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "keys": [list(k) for k in self.keys]}


@dataclass(frozen=True)
class Repairs:
    """Sink rows that are an operator's edit of a dead letter's record and not the source's
    row: how many, and the first few keys in key order with the letter of each."""

    total: int
    keys: list[Key]
    letters: list[int]  # the letter of each listed key

    @classmethod
    def of(cls, found: dict[Key, int], limit: int) -> Repairs:
        keys = sorted(found)[:limit]
        return cls(len(found), keys, [found[k] for k in keys])

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "keys": [list(k) for k in self.keys],
            "letters": list(self.letters),
        }


@dataclass(frozen=True)
class Difference:
    """A sampled key whose sink row differs from the source's in `column`."""

    key: Key
    column: str
    source: Any
    sink: Any

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": list(self.key),
            "column": self.column,
            "source": self.source,
            "sink": self.sink,
        }


@dataclass(frozen=True)
class Orphans:
    """Child rows in the sink whose parent row is missing, through the stream's foreign keys
    (`parent` names them; None when the stream has none)."""

    total: int
    keys: list[Key]
    parent: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "keys": [list(k) for k in self.keys], "parent": self.parent}


@dataclass(frozen=True)
class SinkComparison:
    """One stream in one sink, against the source."""

    sink: str
    rows: int  # keys the sink holds
    count: int  # of the source's keys, those the sink holds
    missing: KeyList  # source keys the sink lacks, no pending dead letter accounting for them
    dead_lettered: KeyList  # source keys the sink lacks, with a pending dead letter
    extra: KeyList | None  # keys only the sink holds; None: not checked (shared stream)
    checked: int  # sampled keys compared field by field
    differ: int  # of those, keys whose row differs
    differences: list[Difference]  # the first few differences
    orphans: Orphans
    deleted_at_source: KeyList | None = None  # kept in the sink by design (capture mode)
    # Edited by an operator and so not the source's row: reported, not a mismatch.
    repaired_by_edit: Repairs = field(default_factory=lambda: Repairs(0, [], []))

    @property
    def ok(self) -> bool:
        extra = self.extra.total if self.extra is not None else 0
        return not (self.missing.total or extra or self.differ or self.orphans.total)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "rows": self.rows,
            "count": self.count,
            "missing": self.missing.as_dict(),
            "dead_lettered": self.dead_lettered.as_dict(),
            "extra": self.extra.as_dict() if self.extra is not None else None,
            "sample": {
                "checked": self.checked,
                "differ": self.differ,
                "differences": [d.as_dict() for d in self.differences],
            },
            "orphans": self.orphans.as_dict(),
        }
        if self.deleted_at_source is not None:
            out["deleted_at_source"] = self.deleted_at_source.as_dict()
        out["repaired_by_edit"] = self.repaired_by_edit.as_dict()
        out["ok"] = self.ok
        return out


@dataclass
class StreamComparison:
    """One stream the source feeds: what the source holds, and each sink against it."""

    source: str  # the source's name
    stream: str
    records: int  # records in the snapshot
    keys: int  # distinct valid keys
    invalid: int  # records the pipeline's validation rejects (dead letters, not missing)
    skipped_columns: str | None  # columns the source cannot know, and why
    others: list[str]  # other configured sources feeding the stream: extra keys not checked
    dead_letters: dict[str, int]  # pending dead letters of this source, per sink
    sinks: dict[str, SinkComparison] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.sinks.values())

    @property
    def extra_note(self) -> str:
        if self.others:
            return (
                f"not checked: {', '.join(self.others)} also feed(s) {self.stream}, and rows do"
                " not record their source"
            )
        return f"checked: {self.source} is the only configured source of {self.stream}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": {"records": self.records, "keys": self.keys, "invalid": self.invalid},
            "skipped_columns": self.skipped_columns or "none",
            "extra_checked": not self.others,
            "extra_note": self.extra_note,
            "dead_letters": dict(self.dead_letters),
            "sinks": {name: s.as_dict() for name, s in self.sinks.items()},
        }


@dataclass
class ReconcileReport:
    """A source against every sink its streams write to. `ok` is False on any mismatch."""

    source: str
    kind: str
    capture: str | None  # the capture mode, for a kind that has them
    sample: int
    seed: int
    limit: int
    streams: dict[str, StreamComparison]
    source_seconds: float  # reading the source
    total_seconds: float

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.streams.values())

    def as_dict(self) -> dict[str, Any]:
        """The JSON document: `sluice reconcile --json`."""
        return {
            "source": self.source,
            "kind": self.kind,
            "capture": self.capture,
            "ok": self.ok,
            "sample": self.sample,
            "seed": self.seed,
            "limit": self.limit,
            "streams": {name: s.as_dict() for name, s in self.streams.items()},
            "seconds": {
                "source": round(self.source_seconds, 2),
                "total": round(self.total_seconds, 2),
            },
        }


# -- the table ------------------------------------------------------------------------------------


def _key(k: Sequence[Any]) -> str:
    return "|".join(str(v) for v in k)


def _keys(found: KeyList) -> str:
    return ", ".join(_key(k) for k in found.keys)


def render_reconcile(report: ReconcileReport) -> str:
    """A line per stream and sink, then each problem with its first keys, then notes."""
    capture = f", {report.capture} capture" if report.capture else ""
    lines = [
        f"reconcile {report.source} ({report.kind}{capture}):"
        f" {'OK' if report.ok else 'MISMATCH'}"
        f" — sample {report.sample} per stream, seed {report.seed};"
        f" source read in {round(report.source_seconds, 2)}s,"
        f" total {round(report.total_seconds, 2)}s",
        "",
        f"{'stream':<18}{'sink':<10}{'source':>9}{'invalid':>9}{'in sink':>9}{'missing':>9}"
        f"{'dead-let':>9}{'extra':>7}{'sampled':>9}{'differ':>8}{'orphans':>9}",
    ]
    details: list[str] = []
    notes: list[str] = []
    for name, s in report.streams.items():
        for sink, d in s.sinks.items():
            lines.append(_row(s, d))
            details += _problems(name, d)
            gone = d.deleted_at_source
            if gone is not None and gone.total:
                notes.append(
                    f"{name}: kept in {sink} though gone from the table ({report.capture} capture"
                    f" never deletes) ({gone.total}): {_keys(gone)}"
                )
            fixed = d.repaired_by_edit
            if fixed.total:
                notes.append(
                    f"repaired by edit, differs from the source: {name} in {sink}"
                    f" ({fixed.total}): "
                    + ", ".join(
                        f"{_key(k)} (letter {n})"
                        for k, n in zip(fixed.keys, fixed.letters, strict=True)
                    )
                )
        if s.dead_letters:
            notes.append(
                f"{name}: dead letters pending for {report.source}: "
                + ", ".join(f"{k} {v}" for k, v in s.dead_letters.items())
            )
        notes.append(
            f"{name}: skipped columns: {s.skipped_columns or 'none'}; extra keys {s.extra_note}"
        )
    return "\n".join([*lines, *(["", *details] if details else []), "", *notes])


def _row(s: StreamComparison, d: SinkComparison) -> str:
    extra = "-" if d.extra is None else str(d.extra.total)
    orphans = "-" if d.orphans.parent is None else str(d.orphans.total)
    return (
        f"{s.stream:<18}{d.sink:<10}{s.keys:>9}{s.invalid:>9}{d.count:>9}"
        f"{d.missing.total:>9}{d.dead_lettered.total:>9}{extra:>7}"
        f"{d.checked:>9}{d.differ:>8}{orphans:>9}"
        f"  {'ok' if d.ok else 'MISMATCH'}"
    )


def _problems(name: str, d: SinkComparison) -> list[str]:
    where = f"{name} in {d.sink}"
    out: list[str] = []
    if d.missing.total:
        out.append(f"missing {where} ({d.missing.total}): {_keys(d.missing)}")
    if d.dead_lettered.total:
        out.append(
            f"dead-lettered, not in {d.sink}: {name} ({d.dead_lettered.total}): "
            + _keys(d.dead_lettered)
        )
    if d.extra is not None and d.extra.total:
        out.append(f"extra {where} ({d.extra.total}): {_keys(d.extra)}")
    for diff in d.differences:
        out.append(
            f"differs {where}: key {_key(diff.key)} {diff.column}:"
            f" source {diff.source!r}, sink {diff.sink!r}"
        )
    if d.orphans.total:
        out.append(
            f"orphans {where} ({d.orphans.total}, {d.orphans.parent} missing): "
            + ", ".join(_key(k) for k in d.orphans.keys)
        )
    return out
