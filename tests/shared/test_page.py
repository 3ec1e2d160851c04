"""The page on the wire: packed once by the producer, opened once by the ingest task, exactly."""

from __future__ import annotations

import math

import msgpack
import pytest
from kombu.exceptions import EncodeError

from sluice.consumers.ingest import ingest
from sluice.shared.celery_app import app, send_page
from sluice.shared.errors import MessageError
from sluice.shared.letters import decode_record
from sluice.shared.migrations import migrate_sqlite
from sluice.shared.page import Page, decode
from sluice.shared.settings import Settings
from sluice.shared.streams import USAGE_EVENTS
from tests.conftest import Env
from tests.helpers import pg_rows, run_queued_tasks


def page_of(rows: list[list[object]]) -> Page:
    return Page(
        "p-1",
        "usage_events",
        "postgres",
        "src",
        "run-1",
        list(USAGE_EVENTS.column_names),
        rows,
        seq=7,
        orders=[3, None],
    )


def test_a_packed_page_comes_back_exactly_as_it_was_sent() -> None:
    rows: list[list[object]] = [
        ["a\x00b", "\u200b\U0001f600", None, "k\\u0000", "é" * 300, -0.0, "", "2026", '{"a":1}'],
        [b"\xff\xfe not utf-8", 2**63 - 1, -(2**63), math.inf, 5e-324, True, 0, "\r\n\t", "[]"],
    ]
    page = page_of(rows)
    back = decode(page.pack())
    assert back == page
    assert [type(v) for r in back.rows for v in r] == [type(v) for r in rows for v in r]
    zero = back.rows[0][5]
    assert isinstance(zero, float) and math.copysign(1.0, zero) == -1.0


def test_a_page_sent_unpacked_by_an_older_producer_still_decodes() -> None:
    page = page_of([["x"] * 9, ["y"] * 9])
    assert decode(page.encode()) == page


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"\xc1", "page body is not msgpack"),
        (b"\x01\x02", "page body is not msgpack"),  # a value, then bytes after it
        (msgpack.packb([1, 2]), "page body must be a mapping, got list"),
        (msgpack.packb({"v": 99}), "unsupported page version 99"),
    ],
)
def test_bytes_that_are_no_page_raise_an_error_naming_what_is_wrong(body: bytes, says: str) -> None:
    with pytest.raises(MessageError, match=says):
        decode(body)


@pytest.mark.parametrize(
    "value", ["\ud800 unpaired", 2**64], ids=["unpaired-surrogate", "beyond-64-bits"]
)
def test_a_value_the_queue_cannot_carry_is_an_encode_error_before_anything_is_sent(
    value: object,
) -> None:
    # The producer catches kombu's EncodeError and sends the page's other rows on their own.
    with pytest.raises(EncodeError):
        send_page(page_of([[value] * 9, ["ok"] * 9]))


def test_a_message_that_is_no_page_is_kept_whole_as_one_dead_letter(env: Env) -> None:
    env.write_config("")
    ctx = app.configure(Settings.load(env.vars))
    migrate_sqlite(env.sqlite_path)
    body = b"\xc1\x00 not a page \xff"
    assert ingest.apply(args=[body]).get()["status"] == "malformed"
    run_queued_tasks(ctx)  # the dead-letter task stores it
    [(key, error_class, message, record)] = pg_rows(
        env.pg_url,
        "SELECT record_key, error_class, error_message, record FROM failed_ingestions",
    )
    assert (key, error_class) == ("message:unknown", "MessageError")
    assert "not msgpack" in str(message)
    assert isinstance(record, bytes | memoryview)
    assert decode_record(bytes(record)) == {"message": body}
