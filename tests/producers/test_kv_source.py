"""KV source against the fake Workers KV API: what it sends (prefix on every list request, the
cursor followed through short and empty pages, bulk gets of at most 100 keys, single-get
fallback), error handling (429/971 retried, 10009 = gone, other errors raised with context),
the Telegram bot's mappers, the local modes (JSON export, wrangler's state) and the snapshot."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sluice.producers.kv_mapping import (
    KvEntry,
    MapContext,
    MappingError,
    compile_pattern,
    map_cache,
)
from sluice.producers.kv_source import (
    Counts,
    KvJsonFile,
    KvRestClient,
    KvSource,
    KvWranglerState,
    Problem,
)
from sluice.producers.registry import open_source
from sluice.shared.errors import KvError, SourceError
from sluice.shared.settings import Settings
from sluice.shared.wrangler import kv_index_path
from tests.conftest import Env
from tests.fakes.kv_server import FakeKV

NS = "0f2ac74b498b48028cb68387c421e279"
NOW_MS = 1_700_000_000_000


def client(fake: FakeKV, **kw: Any) -> KvRestClient:
    return KvRestClient(
        account_id=fake.account_id,
        namespace_id=NS,
        api_token=fake.token,
        base_url=fake.base_url,
        sleep=lambda s: None,
        **kw,
    )


def bot_data(users: int) -> dict[str, Any]:
    data: dict[str, Any] = {"chat_ids": [str(1000 + i) for i in range(users)]}
    for i in range(users):
        cid = str(1000 + i)
        data[f"watchlist:{cid}"] = ["SPY", "AAPL"][: 1 + i % 2]
        data[f"execution_history:{cid}"] = [
            {
                "signalType": "BUY",
                "ticker": "SPY",
                "executionPrice": 450.5,
                "executionDate": NOW_MS + i,
                "signalPrice": 450.0,
            }
        ]
        if i % 3 == 0:
            data[f"active_position:{cid}"] = {"ticker": "SPY", "entryPrice": 450.5}
    data["fear_greed_cache"] = {"data": {"score": 42}, "timestamp": NOW_MS}
    return data


def kv_source(settings: Settings, name: str = "bot") -> KvSource:
    source = open_source(settings, name)
    assert isinstance(source, KvSource)
    return source


def remote_config(fake: FakeKV, extra: str = "") -> str:
    return f"""
[sources.bot]
kind = "kv"
mode = "remote"
account_id = "{fake.account_id}"
namespace_id = "{NS}"
base_url = "{fake.base_url}"
list_limit = 10
{extra}
"""


@pytest.fixture
def fake() -> Iterator[FakeKV]:
    with FakeKV() as f:
        yield f


def settings_for(tmp_path: Path, text: str, token: str = "") -> Settings:
    path = tmp_path / "sluice.toml"
    path.write_text(text)
    return Settings.load({"SLUICE_CONFIG": str(path), "CLOUDFLARE_API_TOKEN": token})


@pytest.mark.parametrize("last_cursor", ["empty", "null", "absent"])
def test_list_follows_the_cursor_through_short_and_empty_pages(
    fake: FakeKV, last_cursor: Any
) -> None:
    for i in range(25):
        fake.put(NS, f"watchlist:{i:03d}", ["SPY"])
    fake.put(NS, "other:1", "x")
    fake.page_cap = 3  # short pages while keys remain
    fake.empty_pages = 1  # and an empty page with a cursor before each of them
    fake.last_cursor = last_cursor
    names = [k.name for k in client(fake).list_keys("watchlist:")]
    assert names == [f"watchlist:{i:03d}" for i in range(25)]
    lists = fake.requests_to("list")
    assert len(lists) == 2 * 9  # 9 short pages, each after an empty one
    for r in lists:  # the prefix and the limit are sent every time, the cursor after the first
        assert "prefix=watchlist%3A" in r.path and "limit=10" in r.path
    assert "cursor=" not in lists[0].path
    assert all("cursor=" in r.path for r in lists[1:])


def test_a_repeated_cursor_stops_with_an_error(fake: FakeKV) -> None:
    for i in range(30):
        fake.put(NS, f"k{i:02d}", "1")
    c = client(fake)
    page = json.dumps(
        {
            "success": True,
            "errors": [],
            "messages": [],
            "result": [{"name": "k00"}],
            "result_info": {"count": 1, "cursor": "same"},
        }
    )
    fake.fail_next("body", count=2, route="list", body=page)
    with pytest.raises(KvError, match="cursor repeated"):
        list(c.list_keys(""))


def test_bulk_get_sends_at_most_100_keys_as_text_with_metadata(fake: FakeKV) -> None:
    keys = [f"k{i:03d}" for i in range(250)]
    for k in keys:
        fake.put(NS, k, {"v": k})
    got = client(fake).get_values(keys)
    assert got == {k: json.dumps({"v": k}) for k in keys}
    bulks = fake.requests_to("bulk_get")
    assert [len(r.body["keys"]) for r in bulks] == [100, 100, 50]
    assert all(r.body["type"] == "text" and r.body["withMetadata"] is True for r in bulks)
    assert all(r.method == "POST" for r in bulks)
    assert fake.requests_to("value") == []


def test_rate_limit_971_is_retried_and_missing_keys_are_gone(fake: FakeKV) -> None:
    fake.put(NS, "a", "1")
    fake.put(NS, "b", "2")
    fake.fail_next("rate_limit", count=2, route="bulk_get", retry_after=0)
    fake.fail_next("rate_limit", route="list", retry_after=0)
    c = client(fake)
    assert [k.name for k in c.list_keys("")] == ["a", "b"]
    got = c.get_values(["a", "b", "nope"])
    assert got == {"a": "1", "b": "2", "nope": None}
    assert len(fake.requests_to("bulk_get")) == 3
    # The key bulk get did not return is asked for once, alone; 404/10009 means gone.
    singles = fake.requests_to("value")
    assert [r.path.rsplit("/", 1)[1] for r in singles] == ["nope"]


def test_bulk_get_refused_falls_back_to_single_gets(fake: FakeKV) -> None:
    fake.put(NS, "text", "hello")
    fake.put(NS, "bin", b"\xff\xfe\x00")
    fake.put(NS, "a/b:c%d", "odd key")
    c = client(fake)
    got = c.get_values(["text", "bin", "a/b:c%d"])
    assert got == {"text": "hello", "bin": b"\xff\xfe\x00", "a/b:c%d": "odd key"}
    assert len(fake.requests_to("value")) == 3
    # The key is percent-encoded in the path, as the API requires for names with / or :.
    assert any(r.path.endswith("/values/a%2Fb%3Ac%25d") for r in fake.requests_to("value"))
    assert c.anomalies and "bulk get refused" in c.anomalies[0]


def test_errors_carry_status_code_and_are_not_retried_when_permanent(fake: FakeKV) -> None:
    c = KvRestClient(
        account_id=fake.account_id,
        namespace_id="no-such-namespace",
        api_token=fake.token,
        base_url=fake.base_url,
        sleep=lambda s: None,
    )
    with pytest.raises(KvError) as caught:
        list(c.list_keys(""))
    assert caught.value.code == 10013 and caught.value.status == 404
    assert not caught.value.transient
    assert fake.token not in str(caught.value)
    fake.put(NS, "a", "1")
    fake.fail_next("server_error", count=5, route="list")
    with pytest.raises(KvError) as exhausted:
        list(client(fake, max_attempts=3).list_keys(""))
    assert exhausted.value.transient and exhausted.value.context["attempts"] == 3


def test_success_false_inside_200_is_an_error(fake: FakeKV) -> None:
    fake.put(NS, "a", "1")
    fake.fail_next("success_false", route="list", code=10000, message="Authentication error")
    with pytest.raises(KvError, match="Authentication error"):
        list(client(fake).list_keys(""))


# -- mapping ----------------------------------------------------------------------


def test_patterns_match_whole_keys_and_give_their_prefix() -> None:
    rx, prefix = compile_pattern("watchlist:{chatId}")
    assert prefix == "watchlist:"
    m = rx.match("watchlist:-100123:x")
    assert m is not None and m.group("chatId") == "-100123:x"
    assert rx.match("watchlist:") is None
    rx2, prefix2 = compile_pattern("chat_ids")
    assert prefix2 == "chat_ids" and rx2.match("chat_ids_old") is None


def test_cache_expiry_from_kv_expiration_else_timestamp_plus_ttl() -> None:
    ctx = MapContext(now_ms=NOW_MS, cache_ttl_ms=60_000)
    value = {"data": {"score": 1}, "timestamp": 1_700_000_000}  # seconds
    with_exp = map_cache(KvEntry("fear_greed_cache", value, 1_800_000_000), {}, ctx)
    assert with_exp.rows[0]["expires_at"] == 1_800_000_000_000
    assert with_exp.rows[0]["updated_at"] == 1_700_000_000_000
    without = map_cache(KvEntry("fear_greed_cache", value), {}, ctx)
    assert without.rows[0]["expires_at"] == 1_700_000_060_000
    assert json.loads(without.rows[0]["cache_value"]) == value


def test_source_maps_every_key_parents_first_and_reports_problems(
    tmp_path: Path, fake: FakeKV
) -> None:
    data = bot_data(4)
    data["watchlist:bad"] = "not json {"
    data["execution_history:1000"] = [data["execution_history:1000"][0], "junk"]
    data["active_position:1001"] = [1, 2]
    data["chat_ids_backup"] = ["x"]  # listed under the chat_ids prefix, matches no pattern
    for k, v in data.items():
        fake.put(NS, k, v if k != "watchlist:bad" else v.encode())
    settings = settings_for(tmp_path, remote_config(fake), fake.token)
    source = kv_source(settings)
    problems: list[Problem] = []
    out = list(source.records(NOW_MS, problems.append))
    streams = [s.name for s, _ in out]
    # Streams without a parent first (users, cache); then the configured order.
    assert streams == sorted(
        streams,
        key=["users", "cache", "watchlists", "executions", "active_positions"].index,
    )
    assert streams.count("users") == 4
    assert streams.count("watchlists") == 1 + 2 + 1 + 2
    assert streams.count("executions") == 4  # "junk" is a problem, not a row
    assert streams.count("active_positions") == 2  # 1000 and 1003; 1001 has a bad one
    assert streams.count("cache") == 1
    assert sorted(p.key for p in problems) == [
        "active_position:1001",
        "execution_history:1000",
        "watchlist:bad",
    ]
    assert source.counts.keys_unmapped == 1
    assert source.counts.keys_seen == len(data)
    user = next(r for s, r in out if s.name == "users")
    assert user == ["1000", 1, NOW_MS, NOW_MS]
    execution = next(r for s, r in out if s.name == "executions")
    assert execution == ["1000", NOW_MS, "SPY", "BUY", 450.5, 450.0, NOW_MS]
    source.close()


def test_snapshot_is_read_only_and_complete(tmp_path: Path, fake: FakeKV) -> None:
    for k, v in bot_data(3).items():
        fake.put(NS, k, v)
    settings = settings_for(tmp_path, remote_config(fake), fake.token)
    source = kv_source(settings)
    snap = list(source.snapshot())
    methods = {r.method for r in fake.requests}
    assert methods <= {"GET", "POST"}
    # Only reads: list, bulk get, single get (no PUT, DELETE or bulk write).
    routes = {r.path.split("?")[0].split(NS + "/")[1].split("/")[0] for r in fake.requests}
    assert routes <= {"keys", "bulk", "values"}
    assert all(r.path.split("?")[0].endswith("/bulk/get") for r in fake.requests_to("bulk_get"))
    by_stream: dict[str, int] = {}
    for name, row in snap:
        by_stream[name] = by_stream.get(name, 0) + 1
        assert len(row) == len(settings.stream(name).column_names)
    assert by_stream == {
        "users": 3,
        "watchlists": 1 + 2 + 1,
        "executions": 3,
        "active_positions": 1,
        "cache": 1,
    }
    source.close()


def test_mapping_errors_name_the_expected_shape() -> None:
    from sluice.producers.kv_mapping import map_users

    with pytest.raises(MappingError, match="JSON array of chat ids"):
        map_users(KvEntry("chat_ids", {"a": 1}), {}, MapContext(NOW_MS, 0))
    mapped = map_users(KvEntry("chat_ids", ["1", 2, None, True]), {}, MapContext(NOW_MS, 0))
    assert [r["chat_id"] for r in mapped.rows] == ["1", "2"]
    assert len(mapped.problems) == 2


# -- local modes ----------------------------------------------------------------------


def test_json_export_skips_expired_and_lists_in_byte_order(tmp_path: Path) -> None:
    export = tmp_path / "kv.json"
    export.write_text(
        json.dumps(
            [
                {"key": "watchlist:2", "value": '["SPY"]'},
                {"key": "watchlist:1", "value": ["AAPL"], "metadata": {"m": 1}},
                {"key": "watchlist:é", "value": "[]"},
                {"key": "watchlist:old", "value": "[]", "expiration": 1},
            ]
        )
    )
    store = KvJsonFile(export)
    keys = list(store.list_keys("watchlist:"))
    assert [k.name for k in keys] == ["watchlist:1", "watchlist:2", "watchlist:é"]
    assert keys[0].metadata == {"m": 1}
    assert store.get_values(["watchlist:1", "nope"]) == {"watchlist:1": '["AAPL"]', "nope": None}


def test_wrangler_state_layout_is_read(tmp_path: Path) -> None:
    state = tmp_path / ".wrangler" / "state"
    index = kv_index_path(state, NS)
    index.parent.mkdir(parents=True)
    blobs = state / "v3" / "kv" / NS / "blobs"
    blobs.mkdir(parents=True)
    conn = sqlite3.connect(index)
    conn.execute(
        "CREATE TABLE _mf_entries (key TEXT PRIMARY KEY, blob_id TEXT NOT NULL,"
        " expiration INTEGER, metadata TEXT)"
    )
    for key, blob, exp, value in [
        ("chat_ids", "b1", None, b'["7","8"]'),
        ("watchlist:7", "b2", None, b'["SPY"]'),
        ("watchlist:8", "b3", 1000, b'["OLD"]'),  # expired (milliseconds)
        ("zzz", "b4", None, b"1"),
    ]:
        conn.execute("INSERT INTO _mf_entries VALUES (?, ?, ?, NULL)", (key, blob, exp))
        (blobs / blob).write_bytes(value)
    conn.commit()
    conn.close()
    config = f"""
[sources.bot]
kind = "kv"
mode = "local"
wrangler_state = "{state}"
namespace_id = "{NS}"
"""
    source = kv_source(settings_for(tmp_path, config))
    assert isinstance(source.store, KvWranglerState)
    rows = [(s, r[:2]) for s, r in source.snapshot()]
    assert rows == [("users", ["7", 1]), ("users", ["8", 1]), ("watchlists", ["7", "SPY"])]
    source.close()


def test_acknowledging_needs_no_token_and_twice_counts_once(env: Env, fake: FakeKV) -> None:
    env.vars.pop("CLOUDFLARE_API_TOKEN", None)
    env.write_config(remote_config(fake))
    source = kv_source(Settings.load(env.vars))
    try:
        source.state.start("bot", "a1")
        source.state.enqueued("bot", "a1", Counts(keys_seen=3), pages=2)
        source.acknowledge({"attempt": "a1", "page": 0})
        source.acknowledge({"attempt": "a1", "page": 0})  # a redelivered ack
        state = source.state.get("bot")
        assert state is not None and (state["status"], state["pages_acked"]) == ("enqueued", 1)
        source.acknowledge({"attempt": "old", "page": 1})  # an earlier attempt's page
        assert source.state.get("bot")["status"] == "enqueued"  # type: ignore[index]
        source.acknowledge({"attempt": "a1", "page": 1})
        assert source.state.get("bot")["status"] == "complete"  # type: ignore[index]
        with pytest.raises(SourceError, match="API token"):
            next(iter(source.store.list_keys("")))
    finally:
        source.close()


def test_a_blob_id_pointing_outside_the_blobs_folder_is_not_read(tmp_path: Path) -> None:
    """The index is data: an entry whose blob id is a path elsewhere (`/etc/passwd`, `../..`)
    becomes a problem naming the key, and that file is never read into a dead letter."""
    state = tmp_path / ".wrangler" / "state"
    index = kv_index_path(state, NS)
    index.parent.mkdir(parents=True)
    blobs = state / "v3" / "kv" / NS / "blobs"
    blobs.mkdir(parents=True)
    secret = tmp_path / "secret.txt"
    secret.write_text('["not for a dead letter"]')
    conn = sqlite3.connect(index)
    conn.execute(
        "CREATE TABLE _mf_entries (key TEXT PRIMARY KEY, blob_id TEXT NOT NULL,"
        " expiration INTEGER, metadata TEXT)"
    )
    (blobs / "ok").write_bytes(b'["SPY"]')
    for key, blob in [
        ("watchlist:1", "ok"),
        ("watchlist:2", str(secret)),
        ("watchlist:3", "../../../../../secret.txt"),
        ("watchlist:4", "/etc/passwd"),
    ]:
        conn.execute("INSERT INTO _mf_entries VALUES (?, ?, NULL, NULL)", (key, blob))
    conn.commit()
    conn.close()
    config = f"""
[sources.bot]
kind = "kv"
mode = "local"
wrangler_state = "{state}"
namespace_id = "{NS}"
"""
    source = kv_source(settings_for(tmp_path, config))
    problems: list[Problem] = []
    rows = [r for _, r in source.records(NOW_MS, problems.append)]
    source.close()
    assert [r[:2] for r in rows] == [["1", "SPY"]]
    assert sorted(p.key for p in problems) == ["watchlist:2", "watchlist:3", "watchlist:4"]
    assert all("outside the blobs folder" in p.message and p.value is None for p in problems)
