"""A fake Cloudflare Workers KV REST API on 127.0.0.1: the key list, bulk get and single-value
routes, answering as the real API does.

Shares the D1 fake's envelope, fault injection (429 with code 971, 5xx HTML, `success:false`
in a 2xx, truncated bodies, resets, delays), request log and lifecycle: it is a FakeD1 whose
request handler serves KV routes instead of D1 queries.

    with FakeKV() as kv:
        kv.put("ns-1", "chat_ids", ["1", "2"])
        kv.page_cap = 3            # list pages hold at most 3 keys whatever `limit` says
        kv.empty_pages = 1         # one empty page (with a cursor) before each real page
        kv.fail_next("rate_limit", route="bulk_get", retry_after=0)
"""

from __future__ import annotations

import base64
import bisect
import json
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

from tests.fakes.d1_server import (
    JSON_CONTENT_TYPE,
    FakeD1,
    FaultPlan,
    RecordedRequest,
    _Failure,
    _Handler,
    envelope,
)

ROUTE = re.compile(
    r"^/client/v4/accounts/([^/]+)/storage/kv/namespaces/([^/]+)/"
    r"(keys|values/[^/]+|metadata/[^/]+|bulk/get)$"
)
ROUTES = ("list", "value", "metadata", "bulk_get")
BULK_GET_MAX = 100


@dataclass
class _Pair:
    value: bytes
    expiration: int | None
    metadata: Any


class _Namespace:
    def __init__(self) -> None:
        self.pairs: dict[str, _Pair] = {}
        self.order: list[bytes] = []  # keys as UTF-8 bytes, sorted (KV's list order)
        self.dirty = False

    def sorted_keys(self) -> list[bytes]:
        if self.dirty:
            self.order = sorted(k.encode() for k in self.pairs)
            self.dirty = False
        return self.order


class FakeKV(FakeD1):
    """Loopback fake of the Workers KV REST API. Use as a context manager."""

    def __init__(self, *, account_id: str = "023e105f4ecef8ad9ca31a8372d0c353") -> None:
        super().__init__(account_id=account_id)
        self._namespaces: dict[str, _Namespace] = {}
        self._kv_lock = threading.Lock()
        self.route_faults = {route: FaultPlan() for route in ROUTES}
        self.page_cap: int | None = None  # a list page holds at most this many keys
        self.empty_pages = 0  # empty pages (with a cursor) served before each non-empty page
        self.last_cursor: Literal["empty", "null", "absent"] = "empty"
        self.bulk_get_binary_fails = True  # a bulk get touching a binary value is refused
        self.counts = dict.fromkeys(ROUTES, 0)

    # -- data -----------------------------------------------------------------------------------

    def namespace_url(self, namespace_id: str) -> str:
        return f"{self.base_url}/accounts/{self.account_id}/storage/kv/namespaces/{namespace_id}"

    def put(
        self,
        namespace_id: str,
        key: str,
        value: Any,
        *,
        expiration: int | None = None,
        metadata: Any = None,
    ) -> None:
        """Store `value`: bytes as they are, a str as UTF-8, anything else as its JSON."""
        if isinstance(value, bytes):
            data = value
        elif isinstance(value, str):
            data = value.encode("utf-8", "surrogatepass")
        else:
            data = json.dumps(value).encode()
        with self._kv_lock:
            ns = self._namespaces.setdefault(namespace_id, _Namespace())
            ns.pairs[key] = _Pair(data, expiration, metadata)
            ns.dirty = True

    def put_many(self, namespace_id: str, items: Iterable[tuple[str, Any]]) -> None:
        for key, value in items:
            self.put(namespace_id, key, value)

    def delete(self, namespace_id: str, key: str) -> None:
        with self._kv_lock:
            ns = self._namespaces[namespace_id]
            del ns.pairs[key]
            ns.dirty = True

    def fail_next(
        self, kind: str, count: int = 1, route: str | None = None, **options: Any
    ) -> None:
        """Inject `kind` into the next `count` requests (of `route` only, when given)."""
        if route is None:
            self.faults.fail_next(kind, count, **options)
        else:
            self.route_faults[route].fail_next(kind, count, **options)

    def requests_to(self, route: str) -> list[RecordedRequest]:
        return [r for r in self.requests if _route_of(r.path) == route]

    # -- request handling -----------------------------------------------------------------------

    def _handle(self, handler: _Handler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length > 0 else b""
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = None
        split = urlsplit(handler.path)
        route = _route_of(split.path)
        authorized = handler.headers.get("Authorization") == f"Bearer {self.token}"
        headers = {
            k: ("Bearer [redacted]" if k.lower() == "authorization" else v)
            for k, v in handler.headers.items()
        }
        with self._lock:
            self._count += 1
            number = self._count
            if route is not None:
                self.counts[route] += 1
            self.requests.append(
                RecordedRequest(
                    number, handler.command, handler.path, headers, authorized, body, raw
                )
            )
        fault = self.faults.take(number)
        if fault is None and route is not None:
            fault = self.route_faults[route].take(self.counts[route])
        if fault is not None and self._inject(handler, fault):
            return
        if self._closing.is_set():
            return
        try:
            status, data, content_type, extra = self._kv_respond(
                handler.command, split.path, split.query, authorized, body
            )
        except _Failure as failure:
            payload = envelope(None, errors=[{"code": failure.code, "message": failure.message}])
            status, data, content_type, extra = (
                failure.status,
                json.dumps(payload).encode(),
                JSON_CONTENT_TYPE,
                {},
            )
        self._send_body(handler, fault, status, data, content_type, extra)

    def _namespace(self, account: str, namespace_id: str) -> _Namespace:
        if account != self.account_id:
            raise _Failure(
                404,
                7003,
                f"Could not route to /accounts/{account}/storage/kv/namespaces/{namespace_id},"
                " perhaps your object identifier is invalid?",
            )
        ns = self._namespaces.get(namespace_id)
        if ns is None:
            raise _Failure(404, 10013, "namespace not found")
        return ns

    def _kv_respond(
        self, method: str, path: str, query: str, authorized: bool, body: Any
    ) -> tuple[int, bytes, str, dict[str, str]]:
        m = ROUTE.match(path)
        if m is None:
            raise _Failure(404, 7003, "No route for that URI")
        if not authorized:
            raise _Failure(401, 10000, "Authentication error")
        account, namespace_id, rest = m.groups()
        with self._kv_lock:
            ns = self._namespace(account, unquote(namespace_id))
            if rest == "keys" and method == "GET":
                return self._list(ns, parse_qs(query, keep_blank_values=True))
            if rest == "bulk/get" and method == "POST":
                return self._bulk_get(ns, body)
            if rest.startswith("values/") and method == "GET":
                pair = ns.pairs.get(unquote(rest[len("values/") :]))
                if pair is None:
                    raise _Failure(404, 10009, "get: 'key not found'")
                extra = {"expiration": str(pair.expiration)} if pair.expiration else {}
                return 200, pair.value, "application/octet-stream", extra
            if rest.startswith("metadata/") and method == "GET":
                pair = ns.pairs.get(unquote(rest[len("metadata/") :]))
                if pair is None:
                    raise _Failure(404, 10009, "get: 'key not found'")
                return 200, json.dumps(envelope(pair.metadata)).encode(), JSON_CONTENT_TYPE, {}
        raise _Failure(405, 10000, f"method {method} not allowed here")

    def _list(
        self, ns: _Namespace, q: dict[str, list[str]]
    ) -> tuple[int, bytes, str, dict[str, str]]:
        prefix = q.get("prefix", [""])[0]
        limit_text = q.get("limit", ["1000"])[0]
        try:
            limit = int(limit_text)
        except ValueError:
            raise _Failure(400, 10001, f"invalid limit {limit_text!r}") from None
        if not 10 <= limit <= 1000:
            raise _Failure(400, 10001, "limit must be between 10 and 1000")
        cursor = q.get("cursor", [""])[0]
        after, empties = b"", 0
        if cursor:
            try:
                state = json.loads(base64.urlsafe_b64decode(cursor.encode()))
                after, empties = base64.b64decode(state["a"]), int(state["e"])
            except (ValueError, KeyError, TypeError):
                raise _Failure(400, 10025, "invalid cursor") from None
        keys = ns.sorted_keys()
        pfx = prefix.encode()
        # Keys with the prefix are contiguous in byte order; continue after the cursor's key.
        start = max(bisect.bisect_left(keys, pfx), bisect.bisect_right(keys, after) if after else 0)

        def remains(i: int) -> bool:
            return i < len(keys) and keys[i].startswith(pfx)

        page: list[bytes] = []
        if empties < self.empty_pages and remains(start):
            empties += 1  # a page of tombstones: nothing to show, but more remains
        else:
            empties = 0
            size = min(limit, self.page_cap or limit)
            while remains(start) and len(page) < size:
                page.append(keys[start])
                start += 1
        more = remains(start)
        result = []
        for k in page:
            name = k.decode()
            pair = ns.pairs[name]
            item: dict[str, Any] = {"name": name}
            if pair.expiration is not None:
                item["expiration"] = pair.expiration
            if pair.metadata is not None:
                item["metadata"] = pair.metadata
            result.append(item)
        info: dict[str, Any] = {"count": len(result)}
        if more:
            last = page[-1] if page else after
            token = json.dumps({"a": base64.b64encode(last).decode(), "e": empties})
            info["cursor"] = base64.urlsafe_b64encode(token.encode()).decode()
        elif self.last_cursor == "empty":
            info["cursor"] = ""
        elif self.last_cursor == "null":
            info["cursor"] = None
        payload = envelope(result)
        payload["result_info"] = info
        return 200, json.dumps(payload).encode(), JSON_CONTENT_TYPE, {}

    def _bulk_get(self, ns: _Namespace, body: Any) -> tuple[int, bytes, str, dict[str, str]]:
        if not isinstance(body, dict) or not isinstance(body.get("keys"), list):
            raise _Failure(400, 10001, "request body must be an object with 'keys'")
        keys = body["keys"]
        if len(keys) > BULK_GET_MAX:
            raise _Failure(400, 10001, f"at most {BULK_GET_MAX} keys per bulk get")
        kind = body.get("type", "text")
        with_meta = bool(body.get("withMetadata"))
        values: dict[str, Any] = {}
        for key in keys:
            pair = ns.pairs.get(key)
            if pair is None:
                values[key] = None
                continue
            try:
                text = pair.value.decode("utf-8")
            except UnicodeDecodeError:
                if self.bulk_get_binary_fails:
                    raise _Failure(400, 10001, "bulk get does not support binary values") from None
                values[key] = None
                continue
            if kind == "json":
                try:
                    value: Any = json.loads(text)
                except ValueError:
                    raise _Failure(400, 10001, f"value of {key!r} is not JSON") from None
            else:
                value = text
            if with_meta:
                item: dict[str, Any] = {"value": value, "metadata": pair.metadata}
                if pair.expiration is not None:
                    item["expiration"] = pair.expiration
                values[key] = item
            else:
                values[key] = value
        return 200, json.dumps(envelope({"values": values})).encode(), JSON_CONTENT_TYPE, {}


def _route_of(path: str) -> str | None:
    m = ROUTE.match(urlsplit(path).path)
    if m is None:
        return None
    rest = m.group(3)
    if rest == "keys":
        return "list"
    if rest == "bulk/get":
        return "bulk_get"
    return "value" if rest.startswith("values/") else "metadata"
