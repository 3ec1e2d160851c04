"""D1 REST client against the fake D1 server over real HTTP on 127.0.0.1."""

from __future__ import annotations

import email.utils
import json
import sqlite3
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from sluice.shared import cloudflare
from sluice.shared.cloudflare import D1Client, iter_row_chunks, rows_per_statement
from sluice.shared.errors import D1Error
from tests.fakes.d1_server import TRANSACTION_MESSAGE, FakeD1

# A /query answer in the real envelope (tests/fixtures/README.md); db_path holds its row.
FIXTURE = Path(__file__).parents[1] / "fixtures" / "cloudflare" / "d1-query-select-1row.json"
DB_ID = "11111111-2222-3333-4444-555555555555"

pytestmark = pytest.mark.timeout(30)

MakeClient = Callable[..., D1Client]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    path = tmp_path / "d1.sqlite"
    with sqlite3.connect(path) as conn:
        conn.executescript(
            """
            CREATE TABLE deliveries (
                delivery_id TEXT PRIMARY KEY,
                classification TEXT NOT NULL,
                received_at TEXT NOT NULL
            );
            INSERT INTO deliveries VALUES ('9d41c2b7-5e08-4f6a-a3c1-7b2e90d4f615', 'irrelevant',
                                           '2025-03-14T09:26:53.589000+00:00');
            CREATE TABLE prices (symbol TEXT NOT NULL, ts INTEGER NOT NULL, close REAL,
                                 PRIMARY KEY (symbol, ts));
            """
        )
    conn.close()
    return path


@pytest.fixture
def fake(db_path: Path) -> Iterator[FakeD1]:
    with FakeD1() as server:
        server.add_database(DB_ID, db_path)
        yield server


@pytest.fixture
def delays() -> list[float]:
    return []


@pytest.fixture
def make_client(fake: FakeD1, delays: list[float]) -> Iterator[MakeClient]:
    clients: list[D1Client] = []

    def make(**overrides: Any) -> D1Client:
        options: dict[str, Any] = {
            "account_id": fake.account_id,
            "database_id": DB_ID,
            "api_token": fake.token,
            "base_url": fake.base_url,
            "timeout": (2.0, 5.0),
            "sleep": delays.append,
        }
        options.update(overrides)
        client = D1Client(**options)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def client(make_client: MakeClient) -> D1Client:
    return make_client()


def price_count(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        (count,) = conn.execute("SELECT count(*) FROM prices").fetchone()
    conn.close()
    return int(count)


def shape(value: Any) -> Any:
    """Keys and value types, recursively: two responses with the same shape compare equal."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


def assert_token_hidden(exc: BaseException, token: str) -> None:
    text = "".join(traceback.format_exception(exc)) + repr(exc) + str(exc)
    assert token not in text


# -- happy paths ------------------------------------------------------------------------------


def test_query_returns_rows_like_the_fixture(fake: FakeD1, client: D1Client) -> None:
    real = json.loads(FIXTURE.read_text())
    sql = "SELECT delivery_id, classification, received_at FROM deliveries WHERE delivery_id = ?"
    delivery_id = real["result"][0]["results"][0]["delivery_id"]

    rows = client.query(sql, [delivery_id])

    assert rows == real["result"][0]["results"]
    sent = fake.requests[-1]
    assert sent.method == "POST"
    assert sent.path.endswith(f"/accounts/{fake.account_id}/d1/database/{DB_ID}/query")
    assert sent.authorized
    assert sent.body == {"sql": sql, "params": [delivery_id]}
    assert fake.token not in json.dumps(sent.headers)

    # The fake's whole envelope has the same keys and value types as the real API's (fixture).
    response = requests.post(
        fake.query_url(DB_ID),
        json={"sql": sql, "params": [delivery_id]},
        headers={"Authorization": f"Bearer {fake.token}"},
        timeout=5,
    )
    assert response.headers["Content-Type"] == "application/json; charset=UTF-8"
    assert shape(response.json()) == shape(real)


def test_params_are_converted(fake: FakeD1, client: D1Client) -> None:
    rows = client.query(
        "SELECT ? AS a, ? AS b, ? AS c, ? AS d, ? AS e", [True, False, None, 1.5, "x"]
    )

    assert rows == [{"a": 1, "b": 0, "c": None, "d": 1.5, "e": "x"}]
    assert fake.requests[-1].body["params"] == [1, 0, None, 1.5, "x"]


@pytest.mark.parametrize("bad", [object(), b"bytes", [1], {"a": 1}, 2**60, float("nan")])
def test_unsupported_param_is_rejected_naming_its_index(
    fake: FakeD1, client: D1Client, bad: object
) -> None:
    with pytest.raises(D1Error) as caught:
        client.query("SELECT ?, ?, ?", ["ok", 1, bad])

    assert caught.value.transient is False
    assert "parameter 2" in str(caught.value)
    assert fake.requests == []


def test_batch_returns_one_result_per_statement(
    fake: FakeD1, client: D1Client, db_path: Path
) -> None:
    results = client.batch(
        [
            ("INSERT INTO prices (symbol, ts, close) VALUES (?, ?, ?)", ["BTCUSDT", 1, 35000.5]),
            ("INSERT INTO prices (symbol, ts, close) VALUES (?, ?, ?)", ["BTCUSDT", 2, 35001]),
            ("SELECT count(*) AS n FROM prices", []),
        ]
    )

    assert [r["results"] for r in results] == [[], [], [{"n": 2}]]
    assert results[1]["meta"]["changes"] == 1
    assert results[1]["meta"]["last_row_id"] == 2
    assert results[1]["meta"]["changed_db"] is True
    assert results[1]["meta"]["size_after"] == db_path.stat().st_size
    assert results[2]["meta"]["changed_db"] is False
    assert len(fake.requests) == 1
    assert set(fake.requests[0].body) == {"batch"}


def test_failing_batch_rolls_back_every_statement(
    fake: FakeD1, client: D1Client, db_path: Path
) -> None:
    insert = "INSERT INTO prices (symbol, ts, close) VALUES (?, ?, ?)"

    with pytest.raises(D1Error) as caught:
        # The 2nd statement repeats the 1st one's primary key.
        client.batch([(insert, ["ETHUSDT", 1, 1.0]), (insert, ["ETHUSDT", 1, 2.0])])

    error = caught.value
    assert error.transient is False
    assert (error.status, error.code) == (400, 7500)
    assert error.message == (
        "UNIQUE constraint failed: prices.symbol, prices.ts: SQLITE_CONSTRAINT"
    )
    assert price_count(db_path) == 0
    assert len(fake.requests) == 1  # SQL errors are not retried


def test_multi_statement_sql_is_one_transaction(
    fake: FakeD1, client: D1Client, db_path: Path
) -> None:
    with pytest.raises(D1Error, match="no such table: nope: SQLITE_ERROR"):
        client.query("INSERT INTO prices VALUES ('A', 1, 1.0); INSERT INTO nope VALUES (1);")

    assert price_count(db_path) == 0


# -- D1 limits ---------------------------------------------------------------------------------


def test_101_params_rejected_client_side_and_by_the_fake(fake: FakeD1, client: D1Client) -> None:
    sql = "SELECT " + ", ".join("?" for _ in range(101))

    with pytest.raises(D1Error, match=r"101 bound parameters.*limit of 100") as caught:
        client.query(sql, list(range(101)))
    assert caught.value.transient is False
    assert fake.requests == []

    response = requests.post(
        fake.query_url(DB_ID),
        json={"sql": sql, "params": list(range(101))},
        headers={"Authorization": f"Bearer {fake.token}"},
        timeout=5,
    )
    assert response.status_code == 400
    assert response.json() == {
        "result": [],
        "errors": [{"code": 7500, "message": "too many SQL variables at offset 307: SQLITE_ERROR"}],
        "messages": [],
        "success": False,
    }


def test_100_params_are_fine(client: D1Client) -> None:
    sql = "SELECT " + " + ".join("?" for _ in range(100)) + " AS total"
    assert client.query(sql, [1] * 100) == [{"total": 100}]


def test_statement_over_100kb_rejected_client_side_and_by_the_fake(
    fake: FakeD1, client: D1Client
) -> None:
    sql = "SELECT '" + "x" * 100_000 + "'"

    with pytest.raises(D1Error, match="100009 bytes, over D1's limit of 100000") as caught:
        client.query(sql)
    assert caught.value.transient is False
    with pytest.raises(D1Error, match="statement 1 of batch"):
        client.batch([("SELECT 1", []), (sql, [])])
    assert fake.requests == []

    response = requests.post(
        fake.query_url(DB_ID),
        json={"sql": sql},
        headers={"Authorization": f"Bearer {fake.token}"},
        timeout=5,
    )
    assert response.status_code == 400
    assert response.json()["errors"] == [
        {"code": 7500, "message": "statement too long: SQLITE_TOOBIG"}
    ]


def test_multibyte_statement_size_counts_utf8_bytes(fake: FakeD1, client: D1Client) -> None:
    sql = "SELECT '" + "é" * 50_000 + "'"  # 50,009 characters, 100,009 bytes
    with pytest.raises(D1Error, match="100009 bytes"):
        client.query(sql)


def test_rows_per_statement_and_chunks() -> None:
    assert rows_per_statement(3) == 33
    assert rows_per_statement(1) == 100
    assert rows_per_statement(100) == 1
    assert rows_per_statement(150) == 1
    with pytest.raises(ValueError):
        rows_per_statement(0)
    chunks = list(iter_row_chunks(list(range(70)), 3))
    assert [len(c) for c in chunks] == [33, 33, 4]
    assert [row for chunk in chunks for row in chunk] == list(range(70))


def test_chunked_insert_round_trip(client: D1Client, db_path: Path) -> None:
    rows = [("BTCUSDT", ts, float(ts)) for ts in range(250)]
    statements = []
    for chunk in iter_row_chunks(rows, 3):
        values = ", ".join("(?, ?, ?)" for _ in chunk)
        params = [value for row in chunk for value in row]
        statements.append((f"INSERT INTO prices (symbol, ts, close) VALUES {values}", params))

    client.batch(statements)

    assert price_count(db_path) == 250


# -- retries -----------------------------------------------------------------------------------

SELECT_ONE = "SELECT 1 AS one"


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"retry_after": 7}, 7.0),
        ({"retry_after": "1.5"}, 1.5),
        ({"retry_after_ms": 250}, 0.25),
        ({"retry_after_ms": 250, "retry_after": 9}, 0.25),
    ],
)
def test_429_with_retry_after_is_honoured(
    fake: FakeD1, client: D1Client, delays: list[float], options: dict[str, Any], expected: float
) -> None:
    fake.fail_next("rate_limit", **options)

    assert client.query(SELECT_ONE) == [{"one": 1}]

    assert delays == [expected]
    assert fake.request_count == 2


def test_429_with_http_date_retry_after(
    fake: FakeD1, client: D1Client, delays: list[float]
) -> None:
    fake.fail_next("rate_limit", retry_after_date=30)

    assert client.query(SELECT_ONE) == [{"one": 1}]

    # HTTP-dates have whole-second resolution.
    assert len(delays) == 1
    assert 28.0 <= delays[0] <= 30.0


def test_parse_retry_after_http_date() -> None:
    now = 1_700_000_000.0
    header = email.utils.formatdate(now + 12, usegmt=True)
    assert cloudflare.parse_retry_after({"retry-after": header}, now=now) == 12.0
    assert cloudflare.parse_retry_after({"retry-after": "soon"}) is None
    assert cloudflare.parse_retry_after({}) is None


def test_429_without_header_uses_exponential_backoff(
    fake: FakeD1,
    make_client: MakeClient,
    delays: list[float],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cloudflare, "_jitter", lambda: 1.0)  # jitter at its maximum
    fake.fail_next("rate_limit", count=4)

    assert make_client(max_attempts=5).query(SELECT_ONE) == [{"one": 1}]

    assert delays == [0.5, 1.0, 2.0, 4.0]


@pytest.mark.parametrize("options", [{"retry_after": 120}, {"retry_after": 0}, {"retry_after": -3}])
def test_out_of_range_retry_after_falls_back_to_backoff(
    fake: FakeD1, client: D1Client, delays: list[float], options: dict[str, Any]
) -> None:
    fake.fail_next("rate_limit", count=2, **options)

    client.query(SELECT_ONE)

    # Full jitter: anywhere between 0 and the cap for that retry.
    assert len(delays) == 2
    assert 0 <= delays[0] <= 0.5
    assert 0 <= delays[1] <= 1.0


def test_backoff_is_capped_at_8_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cloudflare, "_jitter", lambda: 1.0)
    assert [cloudflare.retry_delay(n) for n in (0, 3, 4, 10, 5000)] == [0.5, 4.0, 8.0, 8.0, 8.0]


@pytest.mark.parametrize("status", [500, 502, 503])
def test_html_5xx_is_retried_then_succeeds(
    fake: FakeD1, client: D1Client, delays: list[float], status: int
) -> None:
    fake.fail_on([1, 2], "server_error", status=status)

    assert client.query(SELECT_ONE) == [{"one": 1}]

    assert fake.request_count == 3
    assert len(delays) == 2


def test_retries_exhausted_raise_transient_error(
    fake: FakeD1, make_client: MakeClient, delays: list[float]
) -> None:
    fake.fail_next("server_error", count=3, status=503)

    with pytest.raises(D1Error) as caught:
        make_client(max_attempts=3).query(SELECT_ONE)

    error = caught.value
    assert error.transient is True
    assert error.status == 503
    assert "non-JSON body (text/html" in error.message
    assert error.context["attempts"] == 3
    assert fake.request_count == 3
    assert len(delays) == 2


def test_rate_limit_exhausted_reports_code_971(fake: FakeD1, make_client: MakeClient) -> None:
    fake.fail_next("rate_limit", count=2, retry_after=1)

    with pytest.raises(D1Error) as caught:
        make_client(max_attempts=2).query(SELECT_ONE)

    assert (caught.value.transient, caught.value.status, caught.value.code) == (True, 429, 971)
    assert "throttling" in caught.value.message


def test_d1_transient_7500_message_is_retried(
    fake: FakeD1, client: D1Client, delays: list[float]
) -> None:
    fake.fail_next("d1_transient")
    fake.fail_next("d1_transient", message="Network connection lost.", status=500)

    assert client.query(SELECT_ONE) == [{"one": 1}]
    assert fake.request_count == 3


def test_success_false_in_http_200_raises(fake: FakeD1, client: D1Client) -> None:
    fake.fail_next("success_false", code=7500, message="no such table: x: SQLITE_ERROR")

    with pytest.raises(D1Error) as caught:
        client.query(SELECT_ONE)

    assert caught.value.transient is False
    assert (caught.value.status, caught.value.code) == (200, 7500)
    assert caught.value.message == "no such table: x: SQLITE_ERROR"
    assert fake.request_count == 1


def test_success_false_with_transient_message_is_retried(fake: FakeD1, client: D1Client) -> None:
    fake.fail_next("success_false", message="D1 DB is overloaded. Too many requests queued.")
    assert client.query(SELECT_ONE) == [{"one": 1}]
    assert fake.request_count == 2


def test_per_statement_success_false_raises(fake: FakeD1, client: D1Client) -> None:
    fake.fail_next("statement_false", message="something broke")

    with pytest.raises(D1Error, match="statement 0 failed: something broke") as caught:
        client.query(SELECT_ONE)
    assert caught.value.transient is False


def test_truncated_json_is_retried(fake: FakeD1, client: D1Client) -> None:
    fake.fail_next("truncated")
    assert client.query(SELECT_ONE) == [{"one": 1}]
    assert fake.request_count == 2


def test_truncated_json_reported_clearly_when_it_persists(
    fake: FakeD1, make_client: MakeClient
) -> None:
    fake.fail_next("truncated", count=2, keep=20)

    client = make_client(max_attempts=2)
    with pytest.raises(D1Error) as caught:
        client.query(SELECT_ONE)

    error = caught.value
    assert error.transient is True
    assert error.status == 200
    assert error.message.startswith(
        f"malformed JSON in HTTP 200 response from POST {client.endpoint}"
    )
    assert "20 bytes" in error.message


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("", "Expecting value"),
        ("null", "top level is NoneType"),
        ("[]", "top level is list"),
        ('{"success": true, "result": NaN}', "non-standard JSON constant NaN"),
        (b"\xff\xfe", "codec can't decode"),
    ],
)
def test_unparsable_200_bodies_are_transient(
    fake: FakeD1, make_client: MakeClient, body: str | bytes, problem: str
) -> None:
    fake.fail_next("body", body=body)

    with pytest.raises(D1Error) as caught:
        make_client(max_attempts=1).query(SELECT_ONE)

    assert caught.value.transient is True
    assert "malformed JSON in HTTP 200 response" in caught.value.message
    assert problem in caught.value.message


def test_json_of_the_wrong_shape_is_not_retried(fake: FakeD1, client: D1Client) -> None:
    fake.fail_next("body", body='{"success": true, "errors": [], "messages": [], "result": {}}')

    with pytest.raises(D1Error, match="unexpected response shape") as caught:
        client.query(SELECT_ONE)

    assert caught.value.transient is False
    assert fake.request_count == 1


def test_html_404_is_not_retried(fake: FakeD1, client: D1Client) -> None:
    fake.fail_next("body", status=404, body="<html>nope</html>", content_type="text/html")

    with pytest.raises(D1Error, match="HTTP 404 with non-JSON body") as caught:
        client.query(SELECT_ONE)

    assert (caught.value.transient, caught.value.status) == (False, 404)
    assert fake.request_count == 1


def test_short_body_is_retried(fake: FakeD1, client: D1Client) -> None:
    fake.fail_next("short_body")
    assert client.query(SELECT_ONE) == [{"one": 1}]
    assert fake.request_count == 2


def test_read_timeout_is_retried(
    fake: FakeD1, make_client: MakeClient, delays: list[float]
) -> None:
    fake.fail_next("delay", seconds=2.0)
    client = make_client(timeout=(1.0, 0.2))

    started = time.monotonic()
    assert client.query(SELECT_ONE) == [{"one": 1}]

    assert time.monotonic() - started < 1.5
    assert fake.request_count == 2
    assert len(delays) == 1


def test_connection_reset_is_retried(fake: FakeD1, client: D1Client) -> None:
    fake.fail_next("reset")
    assert client.query(SELECT_ONE) == [{"one": 1}]
    assert fake.request_count == 2


def test_connection_refused_is_transient(fake: FakeD1, delays: list[float]) -> None:
    with FakeD1(token=fake.token) as gone:
        base_url = gone.base_url
    client = D1Client(
        account_id=fake.account_id,
        database_id=DB_ID,
        api_token=fake.token,
        base_url=base_url,
        max_attempts=2,
        sleep=delays.append,
    )

    with pytest.raises(D1Error) as caught:
        client.query(SELECT_ONE)

    assert caught.value.transient is True
    assert "connection failed" in caught.value.message
    assert len(delays) == 1
    assert_token_hidden(caught.value, fake.token)


def test_x_should_retry_header_overrides(fake: FakeD1, client: D1Client) -> None:
    fake.fail_next(
        "error", status=400, code=7500, message="odd", headers={"x-should-retry": "true"}
    )
    assert client.query(SELECT_ONE) == [{"one": 1}]

    fake.fail_next("error", status=503, message="nope", headers={"x-should-retry": "false"})
    with pytest.raises(D1Error) as caught:
        client.query(SELECT_ONE)
    assert caught.value.transient is False
    assert fake.request_count == 3


# -- permanent errors and the token ---------------------------------------------------------------


def test_401_is_not_retried_and_token_stays_secret(
    fake: FakeD1, make_client: MakeClient, delays: list[float]
) -> None:
    wrong = "wrong-token-" + "s3cr3t" * 4
    client = make_client(api_token=wrong)

    with pytest.raises(D1Error) as caught:
        client.query(SELECT_ONE)

    error = caught.value
    assert (error.transient, error.status, error.code) == (False, 401, 10000)
    assert error.message == "Authentication error"
    assert fake.request_count == 1
    assert delays == []
    assert not fake.requests[0].authorized
    assert_token_hidden(error, wrong)
    assert wrong not in repr(client)


def test_token_absent_from_every_error(fake: FakeD1, make_client: MakeClient) -> None:
    client = make_client(max_attempts=1, timeout=(1.0, 0.2))
    fake.fail_next("server_error")
    fake.fail_next("reset")
    fake.fail_next("delay", seconds=1.0)
    fake.fail_next("truncated")
    fake.fail_next("error", status=400, code=7500, message=f"echoed Bearer {fake.token}")
    for _ in range(5):
        with pytest.raises(D1Error) as caught:
            client.query(SELECT_ONE)
        assert_token_hidden(caught.value, fake.token)
    assert fake.token not in repr(client)


def test_unknown_database_is_404_7404(fake: FakeD1, make_client: MakeClient) -> None:
    with pytest.raises(D1Error) as caught:
        make_client(database_id="no-such-db").query(SELECT_ONE)

    assert (caught.value.transient, caught.value.status, caught.value.code) == (False, 404, 7404)
    assert fake.request_count == 1


# -- the fake's D1 dialect -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("BEGIN TRANSACTION", TRANSACTION_MESSAGE),
        ("SAVEPOINT sp1", TRANSACTION_MESSAGE),
        ("ATTACH DATABASE 'other.db' AS other", "not authorized: SQLITE_AUTH"),
        ("CREATE TABLE _cf_x (id INTEGER)", "not authorized: SQLITE_AUTH"),
        ("PRAGMA journal_mode", "not authorized: SQLITE_AUTH"),
        (
            "SELECT sqlite_version()",
            "not authorized to use function: sqlite_version: SQLITE_ERROR",
        ),
    ],
)
def test_fake_rejects_what_d1_rejects(client: D1Client, sql: str, message: str) -> None:
    with pytest.raises(D1Error) as caught:
        client.query(sql)
    assert caught.value.message == message
    assert (caught.value.status, caught.value.code) == (400, 7500)


def test_fake_allows_documented_pragmas_and_enforces_foreign_keys(client: D1Client) -> None:
    assert {"name": "symbol"}.items() <= client.query("PRAGMA table_info(prices)")[0].items()
    client.batch(
        [
            ("CREATE TABLE parent (id INTEGER PRIMARY KEY)", []),
            (
                "CREATE TABLE child (id INTEGER PRIMARY KEY, parent_id INTEGER REFERENCES parent)",
                [],
            ),
        ]
    )
    with pytest.raises(D1Error, match=r"FOREIGN KEY constraint failed: SQLITE_CONSTRAINT"):
        client.query("INSERT INTO child VALUES (1, 42)")


def test_fake_raw_endpoint_and_param_types(fake: FakeD1) -> None:
    auth = {"Authorization": f"Bearer {fake.token}"}
    response = requests.post(
        fake.query_url(DB_ID, "raw"),
        json={"sql": "SELECT delivery_id, classification FROM deliveries WHERE 0"},
        headers=auth,
        timeout=5,
    )
    assert response.json()["result"][0]["results"] == {
        "columns": ["delivery_id", "classification"],
        "rows": [],
    }

    response = requests.post(
        fake.query_url(DB_ID),
        json={"sql": "SELECT ?", "params": [{"a": 1}]},
        headers=auth,
        timeout=5,
    )
    assert response.status_code == 400
    assert response.json()["errors"][0]["message"].startswith("D1_TYPE_ERROR: Type 'object'")

    response = requests.post(fake.query_url(DB_ID), json={"sql": "SELECT 1"}, timeout=5)
    assert response.status_code == 401
    assert response.json()["errors"] == [{"code": 10000, "message": "Authentication error"}]


def test_fake_rounds_integers_beyond_2_pow_53(client: D1Client) -> None:
    assert client.query("SELECT 9007199254740993 AS n") == [{"n": 9007199254740992}]
