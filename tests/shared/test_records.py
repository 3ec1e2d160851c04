"""Validation and dedupe of a page's records: what reaches the sinks, what becomes a dead letter."""

from __future__ import annotations

import hashlib
import math
import os
import re
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluice.shared.database import libpq_dsn
from sluice.shared.records import CHUNK_ROWS, Rejected, Validator, dedupe, record_key
from sluice.shared.streams import USAGE_EVENTS, Column, Stream

COLUMNS = USAGE_EVENTS.column_names
FIELD = {name: i for i, name in enumerate(COLUMNS)}


def event(**values: Any) -> list[Any]:
    """A valid, already-normalised usage event as a row; keyword arguments override columns."""
    base: dict[str, Any] = {
        "id": "evt-1",
        "organisation_id": "org-1",
        "project_id": "proj-1",
        "idempotency_key": "key-1",
        "metric_name": "api_calls",
        "metric_value": 3.0,
        "unit": "count",
        "timestamp": "2024-03-01T10:00:00+00:00",
        "metadata": '{"region":"eu"}',
    }
    unknown = set(values) - set(base)
    assert not unknown, unknown
    base.update(values)
    return [base[c] for c in COLUMNS]


def validate(*rows: Any, columns: tuple[str, ...] = COLUMNS) -> tuple[list[Any], list[Rejected]]:
    return Validator(USAGE_EVENTS).validate(columns, list(rows))


def one_value(column: str, value: Any) -> Any:
    """The normalised value of `column` when it is `value` in an otherwise valid event."""
    good, bad = validate(event(**{column: value}))
    assert bad == [], bad
    return good[0][FIELD[column]]


def one_rejection(column: str, value: Any) -> Rejected:
    good, bad = validate(event(**{column: value}))
    assert good == []
    assert len(bad) == 1
    return bad[0]


# --- the bad-input catalogue ---------------------------------------------------------------------

BAD = [
    # text
    pytest.param("metric_name", "api\x00calls", "NUL byte", id="nul-in-text"),
    pytest.param("project_id", "p\x00", "NUL byte", id="nul-in-optional-text"),
    pytest.param("metric_name", "m" * 256, "longer than 255 characters (256)", id="text-too-long"),
    pytest.param("unit", "u" * 65, "longer than 64 characters (65)", id="unit-too-long"),
    pytest.param("idempotency_key", "", "empty but required", id="empty-key"),
    pytest.param("id", "", "empty but required", id="empty-id"),
    pytest.param("organisation_id", None, "is required", id="missing-required"),
    pytest.param("idempotency_key", None, "is required", id="missing-key"),
    pytest.param("metric_name", 1.5, "expected text, got float", id="float-for-text"),
    pytest.param("metric_name", True, "expected text, got bool", id="bool-for-text"),
    pytest.param("metric_name", ["a"], "expected text, got list", id="list-for-text"),
    # numbers
    pytest.param("metric_value", "1.5", "expected a number, got str", id="str-for-float"),
    pytest.param("metric_value", True, "expected a number, got bool", id="bool-for-number"),
    pytest.param("metric_value", False, "expected a number, got bool", id="false-for-number"),
    pytest.param("metric_value", math.nan, "not a finite number", id="nan"),
    pytest.param("metric_value", math.inf, "not a finite number", id="infinity"),
    pytest.param("metric_value", -math.inf, "not a finite number", id="minus-infinity"),
    pytest.param("metric_value", None, "is required", id="missing-number"),
    # timestamps
    pytest.param("timestamp", "yesterday", "not an ISO-8601 timestamp", id="garbage-time"),
    pytest.param("timestamp", "2024-13-01T00:00:00Z", "not an ISO-8601", id="month-13"),
    pytest.param("timestamp", "", "not an ISO-8601 timestamp", id="empty-time"),
    pytest.param("timestamp", "2024-03-01\x00", "not an ISO-8601 timestamp", id="nul-in-time"),
    pytest.param("timestamp", "2024-03-01T10:00:00" + "0" * 60, "not an ISO-8601", id="long"),
    pytest.param("timestamp", ["2024"], "expected a timestamp, got list", id="list-time"),
    pytest.param("timestamp", True, "expected a timestamp, got bool", id="bool-time"),
    pytest.param("timestamp", math.nan, "not a valid epoch time", id="nan-epoch"),
    pytest.param("timestamp", 1e20, "out of range for a timestamp", id="huge-epoch"),
    pytest.param(
        "timestamp", "0001-01-01T00:00:00+01:00", "out of range for a timestamp", id="before-year-1"
    ),
    pytest.param(
        "timestamp", "9999-12-31T23:00:00-05:00", "out of range for a timestamp", id="after-9999"
    ),
    # JSON
    pytest.param("metadata", '{"region": "eu"', "not valid JSON", id="invalid-json"),
    pytest.param("metadata", "NaN", "not valid JSON", id="json-nan"),
    pytest.param("metadata", '{"a": "\\u0000"}', "NUL character", id="escaped-nul-in-json"),
    pytest.param("metadata", {"a": "x\x00y"}, "NUL character", id="nul-in-json-object"),
    pytest.param(
        "metadata", "[" + "1," * 50_000 + "1]", "JSON longer than 100000", id="json-text-too-long"
    ),
    pytest.param(
        "metadata", {"a": "x" * 100_000}, "JSON longer than 100000", id="json-object-too-long"
    ),
    pytest.param("metadata", {1: "a"}, "cannot be encoded as JSON", id="json-non-str-keys"),
    pytest.param("metadata", 42, "expected JSON text or an object, got int", id="int-for-json"),
]


@pytest.mark.parametrize(("column", "value", "rule"), BAD)
def test_bad_value_is_rejected_naming_field_and_rule(column: str, value: Any, rule: str) -> None:
    row = event(**{column: value})
    r = one_rejection(column, value)
    assert r.field == column
    assert rule in r.rule
    assert r.error_class == "ValidationError"
    assert list(r.row) == row, "the dead letter keeps the record as received"


INT_STREAM = Stream(
    name="counters",
    table="counters",
    columns=(Column("name", "text"), Column("n", "int"), Column("note", "text", required=False)),
    key=("name",),
)


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        (2**53 + 1, "outside ±2^53"),
        (-(2**53) - 1, "outside ±2^53"),
        (2**64, "outside ±2^53"),
        (1e300, "outside ±2^53"),
        (1.5, "expected an integer, got 1.5"),
        (math.nan, "expected an integer"),
        (math.inf, "expected an integer"),
        ("3", "expected an integer, got str"),
        (True, "expected an integer, got bool"),
    ],
)
def test_int_column_rejects(value: Any, rule: str) -> None:
    good, bad = Validator(INT_STREAM).validate(("name", "n", "note"), [["a", value, None]])
    assert good == []
    assert [(r.field, rule in r.rule) for r in bad] == [("n", True)], bad


@pytest.mark.parametrize(
    ("value", "stored"),
    [(0, 0), (-7, -7), (2**53 - 1, 2**53 - 1), (-(2**53) + 1, -(2**53) + 1), (3.0, 3)],
)
def test_int_column_accepts_safe_integers(value: Any, stored: int) -> None:
    good, bad = Validator(INT_STREAM).validate(("name", "n", "note"), [["a", value, None]])
    assert bad == []
    assert good == [["a", stored, None]]
    assert type(good[0][1]) is int


def test_row_of_the_wrong_length_is_rejected() -> None:
    short = event()[:-1]
    long = [*event(), "extra"]
    good, bad = validate(short, long)
    assert good == []
    assert [(r.field, r.rule) for r in bad] == [(None, "record must be a list of 9 values")] * 2
    assert [list(r.row) for r in bad] == [short, long]


@pytest.mark.parametrize(
    "raw", [{"id": "evt-1"}, "evt-1", None, 42], ids=["dict", "str", "none", "int"]
)
def test_a_row_that_is_not_a_list_is_rejected(raw: Any) -> None:
    good, bad = validate(raw)
    assert good == []
    assert len(bad) == 1
    assert bad[0].field is None
    assert bad[0].rule == "record must be a list of 9 values"
    assert list(bad[0].row) == [raw]


def test_a_tuple_row_is_accepted() -> None:
    good, bad = validate(tuple(event()))
    assert bad == []
    assert good == [event()]


# --- normalisation -------------------------------------------------------------------------------

T = datetime(2024, 3, 1, 10, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        ("2024-03-01T12:00:00+02:00", "2024-03-01T10:00:00+00:00"),
        ("2024-03-01T05:00:00-05:00", "2024-03-01T10:00:00+00:00"),
        ("2024-03-01T10:00:00Z", "2024-03-01T10:00:00+00:00"),
        ("2024-03-01T10:00:00", "2024-03-01T10:00:00+00:00"),  # naive: UTC
        ("2024-03-01 10:00:00", "2024-03-01T10:00:00+00:00"),  # SQLite's datetime('now')
        ("2024-03-01T10:00:00.250Z", "2024-03-01T10:00:00.250000+00:00"),
        ("2024-03-01", "2024-03-01T00:00:00+00:00"),
        (int(T.timestamp()), "2024-03-01T10:00:00+00:00"),  # epoch seconds
        (int(T.timestamp()) * 1000, "2024-03-01T10:00:00+00:00"),  # epoch milliseconds
        (T.timestamp() + 0.5, "2024-03-01T10:00:00.500000+00:00"),
        (0, "1970-01-01T00:00:00+00:00"),
    ],
)
def test_timestamps_are_normalised_to_utc(value: Any, stored: str) -> None:
    assert one_value("timestamp", value) == stored


def test_json_objects_are_serialised_compactly() -> None:
    assert one_value("metadata", {"b": 1, "a": [1, 2], "s": "é"}) == '{"b":1,"a":[1,2],"s":"é"}'
    assert one_value("metadata", [1, "x", None]) == '[1,"x",null]'
    assert one_value("metadata", {}) == "{}"


def test_json_text_is_kept_as_written() -> None:
    assert one_value("metadata", '{"a": 1,  "b": [true]}') == '{"a": 1,  "b": [true]}'
    assert one_value("metadata", "null") == "null"


def test_numbers_become_floats_and_integer_ids_become_text() -> None:
    assert one_value("metric_value", 3) == 3.0
    assert type(one_value("metric_value", 3)) is float
    assert one_value("metric_value", -0.5) == -0.5
    assert one_value("id", 42) == "42"
    assert one_value("organisation_id", 7) == "7"


def test_optional_columns_may_be_null_or_empty() -> None:
    good, bad = validate(event(project_id=None, unit=None, metadata=None), event(unit=""))
    assert bad == []
    assert good == [event(project_id=None, unit=None, metadata=None), event(unit="")]


def test_limits_are_inclusive() -> None:
    assert one_value("metric_name", "m" * 255) == "m" * 255
    assert one_value("unit", "u" * 64) == "u" * 64


def test_valid_records_pass_unchanged() -> None:
    rows = [event(id=f"evt-{i}", idempotency_key=f"key-{i}") for i in range(5)]
    good, bad = validate(*rows)
    assert bad == []
    assert good == rows


def test_one_bad_record_does_not_affect_the_others() -> None:
    rows = [event(id=f"evt-{i}", idempotency_key=f"key-{i}") for i in range(5)]
    rows[2][FIELD["metric_value"]] = "lots"
    rows[4][FIELD["timestamp"]] = "0001-01-01T00:00:00+01:00"
    good, bad = validate(*rows)
    assert good == [rows[0], rows[1], rows[3]]
    assert [(r.row[FIELD["id"]], r.field) for r in bad] == [
        ("evt-2", "metric_value"),
        ("evt-4", "timestamp"),
    ]


def test_a_record_is_rejected_for_its_first_bad_field_only() -> None:
    good, bad = validate(event(organisation_id=None, metric_value=math.nan))
    assert good == []
    assert [r.field for r in bad] == ["organisation_id"]


# --- pages whose columns differ from the stream's ------------------------------------------------


def test_columns_in_another_order_are_remapped() -> None:
    row = event()
    columns = tuple(reversed(COLUMNS))
    good, bad = validate(list(reversed(row)), columns=columns)
    assert bad == []
    assert good == [row]


def test_a_missing_optional_column_is_null() -> None:
    columns = tuple(c for c in COLUMNS if c not in ("unit", "metadata"))
    row = [v for c, v in zip(COLUMNS, event(), strict=True) if c in columns]
    good, bad = validate(row, columns=columns)
    assert bad == []
    assert good == [event(unit=None, metadata=None)]


def test_a_missing_required_column_rejects_every_record() -> None:
    columns = tuple(c for c in COLUMNS if c != "metric_name")
    rows = [[v for c, v in zip(COLUMNS, event(), strict=True) if c != "metric_name"]] * 2
    good, bad = validate(*rows, columns=columns)
    assert good == []
    assert [(r.field, r.rule) for r in bad] == [("metric_name", "is required")] * 2


def test_extra_columns_of_the_source_are_ignored() -> None:
    columns = (*COLUMNS, "created_at", "processed_at")  # the D1 table has these too
    good, bad = validate([*event(), "2024-03-01T10:00:01Z", None], columns=columns)
    assert bad == []
    assert good == [event()]


# --- dedupe --------------------------------------------------------------------------------------


def keyed(key: str, value: float) -> list[Any]:
    return event(id=f"{key}-{value}", idempotency_key=key, metric_value=value)


def test_dedupe_ignore_keeps_the_first_and_sorts_by_key() -> None:
    rows = [keyed("b", 1), keyed("a", 2), keyed("b", 3), keyed("c", 4), keyed("a", 5)]
    assert dedupe(USAGE_EVENTS, rows) == [keyed("a", 2), keyed("b", 1), keyed("c", 4)]


def test_dedupe_update_keeps_the_last() -> None:
    stream = USAGE_EVENTS.with_settings(sinks=("sqlite",), conflict="update")
    rows = [keyed("b", 1), keyed("a", 2), keyed("b", 3), keyed("c", 4), keyed("a", 5)]
    assert dedupe(stream, rows) == [keyed("a", 5), keyed("b", 3), keyed("c", 4)]


VERSIONED = Stream(
    name="prices",
    table="prices",
    columns=(Column("symbol", "text"), Column("price", "float"), Column("version", "int", False)),
    key=("symbol",),
    conflict="newer",
    version_column="version",
)


def test_dedupe_newer_keeps_the_highest_version() -> None:
    rows = [
        ["XYZ", 1.0, 2],
        ["ABC", 5.0, None],
        ["XYZ", 3.0, 5],
        ["ABC", 6.0, 1],  # any version beats none
        ["XYZ", 2.0, 4],
        ["ABC", 7.0, None],  # none never beats a version
        ["XYZ", 9.0, 5],  # a tie keeps the first
    ]
    assert dedupe(VERSIONED, rows) == [["ABC", 6.0, 1], ["XYZ", 3.0, 5]]


def test_dedupe_composite_keys() -> None:
    stream = Stream(
        name="readings",
        table="readings",
        columns=(Column("site", "text"), Column("point", "text"), Column("value", "float")),
        key=("site", "point"),
        conflict="update",
    )
    rows = [
        ["s2", "a", 1.0],
        ["s1", "b", 2.0],
        ["s1", "a", 3.0],
        ["s2", "a", 4.0],
        ["s1", "b", 5.0],
    ]
    assert dedupe(stream, rows) == [["s1", "a", 3.0], ["s1", "b", 5.0], ["s2", "a", 4.0]]


def test_dedupe_of_nothing_is_nothing() -> None:
    assert dedupe(USAGE_EVENTS, []) == []


# --- record_key ----------------------------------------------------------------------------------

SHA1 = re.compile(r"^sha1:[0-9a-f]{40}$")


def test_record_key_is_the_key_text() -> None:
    assert record_key(USAGE_EVENTS, event(idempotency_key="key-42")) == "key-42"
    assert record_key(USAGE_EVENTS, event(idempotency_key=42)) == "42"
    composite = Stream("r", "r", (Column("a", "text"), Column("b", "text")), key=("a", "b"))
    assert record_key(composite, ["s1", "p7"]) == "s1|p7"


@pytest.mark.parametrize(
    "key",
    [None, 1.5, True, {"k": 1}, "", "k\x00ey", "k" * 501],
    ids=["missing", "float", "bool", "dict", "empty", "nul", "too-long-for-an-index"],
)
def test_record_key_is_a_digest_when_the_key_is_unusable(key: Any) -> None:
    row = event(idempotency_key=key)
    k = record_key(USAGE_EVENTS, row)
    assert SHA1.match(k), k
    assert k == f"sha1:{hashlib.sha1(orjson.dumps(row, default=repr)).hexdigest()}"
    assert record_key(USAGE_EVENTS, list(row)) == k, "the same record, the same key"
    other = event(idempotency_key=key, metric_value=99.0)
    assert record_key(USAGE_EVENTS, other) != k, "different records, different keys"


@pytest.mark.parametrize("row", [[], ["only-one"], event()[:3]], ids=["empty", "one", "short"])
def test_record_key_of_a_short_row_is_a_digest(row: list[Any]) -> None:
    assert SHA1.match(record_key(USAGE_EVENTS, row))


def test_every_rejected_record_key_fits_the_dead_letter_table(pg_url: str) -> None:
    """failed_ingestions indexes record_key (dead letters are found by it): keys must fit."""
    rows = [event(**{column: value}) for column, value, _ in (p.values for p in BAD)]
    rows += [
        event(idempotency_key="".join(chr(0x4E00 + i) for i in range(500))),  # 1,500 bytes
        event(idempotency_key=os.urandom(4000).hex()),  # incompressible, 8,000 bytes
        event(idempotency_key="k" * 70_000),
    ]
    _, bad = validate(*rows, [1, 2], None)
    assert len(bad) == len(rows) + 2
    keys = [record_key(USAGE_EVENTS, r.row) for r in bad]
    conn = psycopg2.connect(libpq_dsn(pg_url))
    try:
        with conn, conn.cursor() as cur:
            for i, k in enumerate(keys):
                cur.execute(
                    "INSERT INTO failed_ingestions (stream, sink, record_key, source, page_id,"
                    " payload, error_class, error_message, record_hash) VALUES (%s, 'postgres',"
                    " %s, 's', 'p', '{}', 'ValidationError', 'm', %s)",
                    (f"s{i}", k, str(i)),
                )
    finally:
        conn.close()


# --- property: validate + dedupe -----------------------------------------------------------------

KEYS = [f"key-{i}" for i in range(8)]
CORRUPTIONS: list[tuple[str, Any]] = [
    ("metric_value", "NaN"),
    ("metric_value", math.nan),
    ("metric_value", True),
    ("timestamp", "not a time"),
    ("metadata", "{"),
    ("metric_name", "a\x00b"),
    ("idempotency_key", ""),
    ("idempotency_key", None),
    ("organisation_id", 1.5),
    ("unit", "u" * 65),
]
valid_rows = st.builds(
    lambda key, n, value: event(id=f"{key}-{n}", idempotency_key=key, metric_value=value),
    st.sampled_from(KEYS),
    st.integers(0, 3),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
)


def corrupted(key: str, fault: tuple[str, Any]) -> list[Any]:
    row = event(idempotency_key=key)
    row[FIELD[fault[0]]] = fault[1]
    return row


invalid_rows = st.one_of(
    st.builds(corrupted, st.sampled_from(KEYS), st.sampled_from(CORRUPTIONS)),
    st.builds(lambda key: event(idempotency_key=key)[:-2], st.sampled_from(KEYS)),
    st.sampled_from([None, "row", {"idempotency_key": "key-0"}, 7]),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.one_of(valid_rows.map(lambda r: (True, r)), invalid_rows.map(lambda r: (False, r))),
        max_size=40,
    ),
    st.data(),
)
def test_validate_then_dedupe_gives_one_row_per_distinct_valid_key(
    tagged: list[tuple[bool, Any]], data: st.DataObject
) -> None:
    # Repeat some entries verbatim, as a redelivered or overlapping read would.
    if tagged:
        tagged += data.draw(st.lists(st.sampled_from(tagged), max_size=10))
        tagged = data.draw(st.permutations(tagged))
    rows = [r for _, r in tagged]
    valid = [r for ok, r in tagged if ok]
    good, bad = Validator(USAGE_EVENTS).validate(COLUMNS, rows)
    assert len(bad) == len(rows) - len(valid)
    assert good == valid
    out = dedupe(USAGE_EVENTS, good)
    key = FIELD["idempotency_key"]
    distinct = sorted({r[key] for r in valid})
    assert [r[key] for r in out] == distinct
    first: dict[str, list[Any]] = {}
    for r in valid:
        first.setdefault(r[key], r)
    assert out == [first[k] for k in distinct]


# Values for the page-at-once path to meet: the plain ones it takes, and every kind it must
# hand back to the per-value checks.
ODD_VALUES = st.sampled_from(
    [
        None,
        "",
        "x\x00",
        "m" * 300,
        "not json {",
        '{"a": "\\u0000"}',
        "2026-11-25T12:00:00",
        "2026-11-25T12:00:00+02:00",
        "yesterday",
        7,
        7.5,
        float("nan"),
        True,
        [1],
        {"k": "v"},
    ]
)


@given(
    # A page spanning several chunks, with odd values at any rows of it.
    length=st.integers(1, 3 * CHUNK_ROWS + 7),
    odd=st.dictionaries(
        st.integers(0, 3 * CHUNK_ROWS + 6), st.tuples(st.integers(0, 8), ODD_VALUES), max_size=8
    ),
    shape=st.sampled_from(["list", "tuple", "short"]),
    with_orders=st.booleans(),
)
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_page_at_once_matches_value_by_value(
    length: int, odd: dict[int, tuple[int, object]], shape: str, with_orders: bool
) -> None:
    """Whatever the page holds, validate() gives exactly what the per-value checks give: the
    same rows (with their source orders) and the same rejections, each at its place in the
    page."""
    base = [
        "id-1",
        "org_1",
        "proj_1",
        "k-1",
        "api_calls",
        1.5,
        "count",
        "2026-11-25T12:00:00.123+00:00",
        '{"region":"eu"}',
    ]
    page: list[Any] = []
    for i in range(length):
        r: list[Any] = [f"id-{i}", *base[1:3], f"k-{i}", *base[4:]]
        if i in odd:
            col, value = odd[i]
            r[col] = value
        page.append(tuple(r) if shape == "tuple" else r[:8] if shape == "short" and i in odd else r)
    v = Validator(USAGE_EVENTS)
    orders = range(1000, 1000 + len(page)) if with_orders else None
    names = USAGE_EVENTS.column_names
    assert v.validate(names, page, orders) == v._each(names, page, orders)


@pytest.mark.parametrize(
    "text",
    [
        '{"a":"\\\\u0000"}',  # an escaped backslash before u0000: six characters, not a NUL
        '{"n":1e400}',  # beyond a double, still JSON (jsonb keeps it exactly)
        "[123456789012345678901234567890]",
    ],
)
def test_valid_json_that_orjson_or_a_naive_check_refuses_is_kept(text: str) -> None:
    good, bad = validate(event(metadata=text))
    assert bad == [] and good[0][8] == text


def test_a_json_nul_escape_is_still_refused() -> None:
    r = one_rejection("metadata", '{"a":"x\\\\\\u0000"}')  # \\ then \u0000: a NUL
    assert "NUL character" in r.rule


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("2026-01-01T00:00:00.1234567Z", False),
        ("2026-01-01T00:00:00.123456789+00:00", False),
        ("2026-01-01T00:00:00.1234560Z", True),  # zeros beyond microseconds lose nothing
        ("2026-01-01T00:00:00.123456Z", True),
    ],
)
def test_a_time_finer_than_a_microsecond_is_refused_not_cut(value: str, ok: bool) -> None:
    good, bad = validate(event(timestamp=value))
    if ok:
        assert bad == [] and good[0][7].startswith("2026-01-01T00:00:00.123456")
    else:
        assert good == [] and "finer than a microsecond" in bad[0].rule
