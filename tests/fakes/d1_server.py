"""A fake Cloudflare D1 REST API on 127.0.0.1, backed by real SQLite files.

Behaves as the real API does: the Cloudflare v4 envelope (`success`, `errors`, `messages`,
`result`) and bearer-token auth; `/query` and `/raw` bodies with their `meta`; D1's limits and the
statements it rejects, with one transaction per request; and faults injected on demand (429s,
5xx, truncated bodies, resets, delays).

    with FakeD1() as fake:
        fake.add_database("db-1", tmp_path / "d1.sqlite")
        fake.fail_next("rate_limit", retry_after=3)      # next query request gets a 429
        fake.fail_on(2, "server_error", status=502)      # the 2nd query request gets HTML 502
        client = D1Client(account_id=fake.account_id, database_id="db-1",
                          api_token=fake.token, base_url=fake.base_url)
"""

from __future__ import annotations

import email.utils
import http.server
import json
import re
import secrets
import socket
import sqlite3
import struct
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

JSON_CONTENT_TYPE = "application/json; charset=UTF-8"
HTML_CONTENT_TYPE = "text/html; charset=UTF-8"
ROUTE = re.compile(r"^/client/v4/accounts/([^/]+)/d1/database/([^/]+)/(query|raw)$")

MAX_STATEMENT_BYTES = 100_000
MAX_PARAMS = 100
MAX_SAFE_INTEGER = 2**53

# The message workerd (D1's runtime) answers SQL-level transactions with, word for word.
TRANSACTION_MESSAGE = (
    "To execute a transaction, please use the state.storage.transaction() or "
    "state.storage.transactionSync() APIs instead of the SQL BEGIN TRANSACTION or SAVEPOINT "
    "statements. The JavaScript API is safer because it will automatically roll back on "
    "exceptions, and because it interacts correctly with Durable Objects' automatic atomic "
    "write coalescing."
)
TRANSACTION_KEYWORDS = frozenset({"BEGIN", "COMMIT", "END", "ROLLBACK", "SAVEPOINT", "RELEASE"})
DDL_KEYWORDS = frozenset({"CREATE", "DROP", "ALTER"})
# workerd's ALLOWED_PRAGMAS plus the table-info pragmas D1 documents
# (https://developers.cloudflare.com/d1/sql-api/sql-statements/).
ALLOWED_PRAGMAS = frozenset(
    {
        "data_version",
        "case_sensitive_like",
        "foreign_keys",
        "defer_foreign_keys",
        "ignore_check_constraints",
        "legacy_alter_table",
        "recursive_triggers",
        "reverse_unordered_selects",
        "foreign_key_check",
        "foreign_key_list",
        "index_info",
        "index_list",
        "index_xinfo",
        "quick_check",
        "optimize",
        "table_info",
        "table_xinfo",
        "table_list",
    }
)
DENIED_FUNCTIONS = frozenset({"sqlite_version", "load_extension"})

DEFAULT_TRANSIENT_MESSAGE = "D1 DB is overloaded. Requests queued for too long."
DEFAULT_FAILURE_MESSAGE = "Injected failure from the fake D1 server"

# Fault kinds and the options each accepts.
FAULT_OPTIONS: dict[str, frozenset[str]] = {
    # 429, body code 971. retry_after: header value (seconds, may be a float or any string);
    # retry_after_ms: `retry-after-ms` value; retry_after_date: seconds from now, sent as an
    # HTTP-date `Retry-After`. None of them: no header at all.
    "rate_limit": frozenset({"retry_after", "retry_after_ms", "retry_after_date"}),
    # 5xx with a Cloudflare-edge-style HTML page. status defaults to 503.
    "server_error": frozenset({"status"}),
    # Any status with a Cloudflare JSON error envelope: status (required), code, message, headers.
    "error": frozenset({"status", "code", "message", "headers"}),
    # HTTP 200 with {"success": false, "errors": [{code, message}]}.
    "success_false": frozenset({"code", "message"}),
    # HTTP 200, envelope success, but result[0] has success=false and an "error" string.
    "statement_false": frozenset({"message"}),
    # D1 transient error: code 7500, status 400 by default, retryable message.
    "d1_transient": frozenset({"status", "message"}),
    # Runs the request, then sends only `keep` bytes (default half) with a matching
    # Content-Length: the client sees a complete response whose JSON is cut off.
    "truncated": frozenset({"keep"}),
    # Runs the request, then declares the full Content-Length but sends half and closes.
    "short_body": frozenset(),
    # Waits `seconds` (default 1.0) before handling the request normally.
    "delay": frozenset({"seconds"}),
    # Closes the socket with a TCP RST without answering or running the request.
    "reset": frozenset(),
    # Exactly this answer: body (str or bytes, default empty), status (default 200),
    # content_type (default JSON), headers. For empty, invalid or wrongly typed bodies.
    "body": frozenset({"body", "status", "content_type", "headers"}),
}

HTML_PAGE = (
    "<!DOCTYPE html>\n<html><head><title>{status} {reason} | api.cloudflare.com</title></head>"
    "<body><h1>Error {status}</h1><p>{reason}</p><p>cloudflare</p></body></html>\n"
)


@dataclass(frozen=True)
class Fault:
    kind: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RecordedRequest:
    """One request the fake received. The bearer token itself is not kept."""

    number: int | None  # 1-based count of query/raw requests; None for other paths
    method: str
    path: str
    headers: dict[str, str]  # Authorization replaced by "Bearer [redacted]"
    authorized: bool  # whether the Authorization header carried the right token
    body: Any  # parsed JSON body, or None if it did not parse
    raw_body: bytes


class FaultPlan:
    """Faults to inject, by query-request number or for the next N query requests.

    Numbered faults win over queued ones and do not consume the queue.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: deque[Fault] = deque()
        self._numbered: dict[int, Fault] = {}

    @staticmethod
    def _make(kind: str, options: dict[str, Any]) -> Fault:
        if kind not in FAULT_OPTIONS:
            raise ValueError(f"unknown fault kind {kind!r}; one of {sorted(FAULT_OPTIONS)}")
        unknown = set(options) - FAULT_OPTIONS[kind]
        if unknown:
            raise TypeError(f"fault {kind!r} does not take {sorted(unknown)}")
        if kind == "error" and "status" not in options:
            raise TypeError("fault 'error' needs status=")
        return Fault(kind, dict(options))

    def fail_next(self, kind: str, count: int = 1, **options: Any) -> None:
        """Inject `kind` into each of the next `count` query requests."""
        fault = self._make(kind, options)
        with self._lock:
            self._queue.extend([fault] * count)

    def fail_on(self, request_number: int | Iterable[int], kind: str, **options: Any) -> None:
        """Inject `kind` into the given 1-based query request number(s)."""
        fault = self._make(kind, options)
        numbers = [request_number] if isinstance(request_number, int) else list(request_number)
        with self._lock:
            for number in numbers:
                self._numbered[number] = fault

    def clear(self) -> None:
        with self._lock:
            self._queue.clear()
            self._numbered.clear()

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._queue) + len(self._numbered)

    def take(self, number: int) -> Fault | None:
        with self._lock:
            if number in self._numbered:
                return self._numbered.pop(number)
            return self._queue.popleft() if self._queue else None


class _Failure(Exception):
    """An error the fake answers with a Cloudflare error envelope."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _sql_failure(message: str) -> _Failure:
    return _Failure(400, 7500, message)


@dataclass
class _Database:
    path: Path
    lock: threading.Lock = field(default_factory=threading.Lock)


def envelope(result: Any = None, *, errors: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "result": result,
        "errors": errors or [],
        "messages": [],
        "success": not errors,
    }


def split_statements(sql: str) -> list[str]:
    """Split on semicolons that end a complete statement (quotes, triggers, comments respected)."""
    pieces: list[str] = []
    start = 0
    for index, char in enumerate(sql):
        if char == ";" and sqlite3.complete_statement(sql[start : index + 1]):
            pieces.append(sql[start : index + 1])
            start = index + 1
    pieces.append(sql[start:])
    return [piece for piece in pieces if _first_keyword(piece)]


_LEADING = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*", re.DOTALL)


def _first_keyword(sql: str) -> str:
    rest = sql[_LEADING.match(sql).end() :]  # type: ignore[union-attr]
    match = re.match(r"[A-Za-z]+", rest)
    return match.group(0).upper() if match else ""


def _authorizer(action: int, arg1: str | None, arg2: str | None, _db: Any, _trig: Any) -> int:
    # Mirrors workerd's restrictions: no ATTACH, no _cf_ names, allowlisted
    # pragmas, no version probing. Denials surface as "not authorized" errors.
    if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH):
        return sqlite3.SQLITE_DENY
    if action in (sqlite3.SQLITE_TRANSACTION, sqlite3.SQLITE_SAVEPOINT):
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_PRAGMA and (arg1 or "").lower() not in ALLOWED_PRAGMAS:
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in DENIED_FUNCTIONS:
        return sqlite3.SQLITE_DENY
    for name in (arg1, arg2):
        if name and name.lower().startswith("_cf_"):
            return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


def _sqlite_message(exc: sqlite3.Error) -> str:
    """Format like D1: '<sqlite text>: SQLITE_<PRIMARY>' (+ extended code for some)."""
    name = getattr(exc, "sqlite_errorname", None) or "SQLITE_ERROR"
    primary = "_".join(name.split("_")[:2])
    if isinstance(exc, sqlite3.IntegrityError):
        primary = "SQLITE_CONSTRAINT"
    if str(exc) == "not authorized":
        primary = "SQLITE_AUTH"  # SQLite says SQLITE_SCHEMA for some denied DDL; D1 says AUTH
    message = f"{exc}: {primary}"
    if name in ("SQLITE_CONSTRAINT_FOREIGNKEY", "SQLITE_CONSTRAINT_DATATYPE"):
        message += f" (extended: {name})"
    return message


def _placeholder_offset(sql: str, nth: int) -> int:
    """Offset of the nth '?' (1-based), for the 'too many SQL variables at offset N' text."""
    seen = 0
    for index, char in enumerate(sql):
        if char == "?":
            seen += 1
            if seen == nth:
                return index
    return len(sql)


def _json_type(value: object) -> str:
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, bool):
        return "boolean"
    return type(value).__name__


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # a delayed handler must not hold up shutdown

    def __init__(self, fake: FakeD1) -> None:
        self.fake = fake
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"  # one request per connection keeps faults simple

    def do_POST(self) -> None:
        self.server.fake._handle(self)

    def do_GET(self) -> None:
        self.server.fake._handle(self)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class FakeD1:
    """Loopback fake of the D1 REST query API. Use as a context manager."""

    def __init__(
        self,
        *,
        account_id: str = "023e105f4ecef8ad9ca31a8372d0c353",
        token: str | None = None,
        lossy_ints: bool = True,
    ) -> None:
        self.account_id = account_id
        self.token = token if token is not None else "fake-d1-" + secrets.token_urlsafe(24)
        # Integers beyond 2**53 come back rounded, as D1's JavaScript doubles do.
        self.lossy_ints = lossy_ints
        self.faults = FaultPlan()
        self.requests: list[RecordedRequest] = []
        self._databases: dict[str, _Database] = {}
        self._lock = threading.Lock()
        self._count = 0
        self._closing = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> FakeD1:
        if self._server is not None:
            return self
        self._closing.clear()
        self._server = _Server(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fake-d1",
            daemon=True,
        )
        self._thread.start()
        return self

    def close(self) -> None:
        self._closing.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeD1:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("FakeD1 is not running")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/client/v4"

    def query_url(self, database_id: str, endpoint: str = "query") -> str:
        return f"{self.base_url}/accounts/{self.account_id}/d1/database/{database_id}/{endpoint}"

    # -- configuration ------------------------------------------------------------------------

    def add_database(self, database_id: str, path: Path) -> None:
        """Serve `database_id` from the SQLite file at `path` (created if missing)."""
        path = Path(path)
        sqlite3.connect(path).close()
        with self._lock:
            self._databases[database_id] = _Database(path)

    def fail_next(self, kind: str, count: int = 1, **options: Any) -> None:
        self.faults.fail_next(kind, count, **options)

    def fail_on(self, request_number: int | Iterable[int], kind: str, **options: Any) -> None:
        self.faults.fail_on(request_number, kind, **options)

    @property
    def request_count(self) -> int:
        """How many query/raw requests arrived so far."""
        with self._lock:
            return self._count

    # -- request handling ---------------------------------------------------------------------

    def _handle(self, handler: _Handler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length > 0 else b""
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = None
        path = urlsplit(handler.path).path
        route = ROUTE.match(path) if handler.command == "POST" else None
        authorized = handler.headers.get("Authorization") == f"Bearer {self.token}"
        headers = dict(handler.headers.items())
        for key in list(headers):
            if key.lower() == "authorization":
                headers[key] = "Bearer [redacted]"
        with self._lock:
            number: int | None = None
            if route is not None:
                self._count += 1
                number = self._count
            self.requests.append(
                RecordedRequest(
                    number, handler.command, handler.path, headers, authorized, body, raw
                )
            )

        fault = self.faults.take(number) if number is not None else None
        if fault is not None and self._inject(handler, fault):
            return
        if self._closing.is_set():
            return
        status, payload, extra = self._respond(route, authorized, body)
        data = json.dumps(payload).encode("utf-8")
        self._send_body(handler, fault, status, data, JSON_CONTENT_TYPE, extra)

    def _send_body(
        self,
        handler: _Handler,
        fault: Fault | None,
        status: int,
        data: bytes,
        content_type: str,
        extra: dict[str, str],
    ) -> None:
        """Send a real answer, cut short when the fault asks for a broken body."""
        if fault is not None and fault.kind == "truncated":
            keep = int(fault.options.get("keep", len(data) // 2))
            self._send(handler, status, data[:keep], content_type, extra)
        elif fault is not None and fault.kind == "short_body":
            self._send(handler, status, data[: len(data) // 2], content_type, extra, len(data))
        else:
            self._send(handler, status, data, content_type, extra)

    def _inject(self, handler: _Handler, fault: Fault) -> bool:
        """Answer with `fault`; False if the request should still be handled normally."""
        opts = fault.options
        kind = fault.kind
        if kind in ("truncated", "short_body"):
            return False
        if kind == "delay":
            # Returns early (no answer) if the fake shuts down while waiting.
            return self._closing.wait(float(opts.get("seconds", 1.0)))
        if kind == "reset":
            # SO_LINGER 0 makes close() send RST instead of FIN.
            handler.connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            handler.close_connection = True
            handler.connection.close()
            return True
        if kind == "rate_limit":
            headers: dict[str, str] = {}
            if opts.get("retry_after") is not None:
                headers["Retry-After"] = str(opts["retry_after"])
            if opts.get("retry_after_ms") is not None:
                headers["retry-after-ms"] = str(opts["retry_after_ms"])
            if opts.get("retry_after_date") is not None:
                when = time.time() + float(opts["retry_after_date"])
                headers["Retry-After"] = email.utils.formatdate(when, usegmt=True)
            message = "Please wait and consider throttling your request speed"
            self._send_error(handler, 429, 971, message, headers)
        elif kind == "server_error":
            status = int(opts.get("status", 503))
            reason = http.server.BaseHTTPRequestHandler.responses.get(status, ("Error",))[0]
            page = HTML_PAGE.format(status=status, reason=reason).encode("utf-8")
            self._send(handler, status, page, HTML_CONTENT_TYPE, {})
        elif kind == "error":
            self._send_error(
                handler,
                int(opts["status"]),
                int(opts.get("code", 7500)),
                str(opts.get("message", DEFAULT_FAILURE_MESSAGE)),
                dict(opts.get("headers", {})),
            )
        elif kind == "success_false":
            code = int(opts.get("code", 7500))
            message = str(opts.get("message", DEFAULT_FAILURE_MESSAGE))
            self._send_error(handler, 200, code, message, {})
        elif kind == "statement_false":
            message = str(opts.get("message", DEFAULT_FAILURE_MESSAGE))
            item = {"success": False, "error": message, "results": [], "meta": {}}
            data = json.dumps(envelope([item])).encode("utf-8")
            self._send(handler, 200, data, JSON_CONTENT_TYPE, {})
        elif kind == "body":
            data = opts.get("body", b"")
            self._send(
                handler,
                int(opts.get("status", 200)),
                data.encode("utf-8") if isinstance(data, str) else bytes(data),
                str(opts.get("content_type", JSON_CONTENT_TYPE)),
                dict(opts.get("headers", {})),
            )
        elif kind == "d1_transient":
            message = str(opts.get("message", DEFAULT_TRANSIENT_MESSAGE))
            status = int(opts.get("status", 400))
            self._send_error(handler, status, 7500, message, {"cf-d1": "err=7500"})
        return True

    def _send_error(
        self, handler: _Handler, status: int, code: int, message: str, headers: dict[str, str]
    ) -> None:
        payload = envelope(None, errors=[{"code": code, "message": message}])
        if code == 7500:
            payload["result"] = []  # the real API's query errors carry an empty result
        data = json.dumps(payload).encode("utf-8")
        self._send(handler, status, data, JSON_CONTENT_TYPE, headers)

    @staticmethod
    def _send(
        handler: _Handler,
        status: int,
        data: bytes,
        content_type: str,
        headers: dict[str, str],
        declared_length: int | None = None,
    ) -> None:
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", content_type)
            length = declared_length if declared_length is not None else len(data)
            handler.send_header("Content-Length", str(length))
            for name, value in headers.items():
                handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(data)
        except OSError:
            pass  # the client gave up (timeout) before we answered

    def _respond(
        self, route: re.Match[str] | None, authorized: bool, body: Any
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        try:
            if route is None:
                raise _Failure(404, 7003, "No route for that URI")
            account_id, database_id, endpoint = route.groups()
            if not authorized:
                raise _Failure(401, 10000, "Authentication error")
            if account_id != self.account_id:
                raise _Failure(
                    404,
                    7003,
                    f"Could not route to /accounts/{account_id}/d1/database/{database_id}/"
                    f"{endpoint}, perhaps your object identifier is invalid?",
                )
            with self._lock:
                database = self._databases.get(database_id)
            if database is None:
                raise _Failure(404, 7404, "D1 database not found")
            statements = self._parse_body(body)
            results = self._execute(database, statements, raw=endpoint == "raw")
        except _Failure as failure:
            payload = envelope(None, errors=[{"code": failure.code, "message": failure.message}])
            extra: dict[str, str] = {}
            if failure.code == 7500:
                payload["result"] = []
                extra["cf-d1"] = "err=7500"
            return failure.status, payload, extra
        return 200, envelope(results), {}

    @staticmethod
    def _parse_body(body: Any) -> list[tuple[str, list[Any]]]:
        if not isinstance(body, dict):
            raise _Failure(400, 7400, "The request is malformed: body must be a JSON object")
        if "batch" in body:
            items = body["batch"]
            if not isinstance(items, list) or not items:
                raise _Failure(
                    400, 7400, "The request is malformed: batch must be a non-empty list"
                )
        elif "sql" in body:
            items = [body]
        else:
            raise _Failure(400, 7400, "The request is malformed: expected 'sql' or 'batch'")

        statements: list[tuple[str, list[Any]]] = []
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("sql"), str):
                raise _Failure(400, 7400, "The request is malformed: each statement needs 'sql'")
            params = item.get("params", [])
            if params is None:
                params = []
            if not isinstance(params, list):
                raise _Failure(400, 7400, "The request is malformed: params must be an array")
            for value in params:
                if value is not None and (
                    isinstance(value, bool) or not isinstance(value, str | int | float)
                ):
                    raise _sql_failure(
                        f"D1_TYPE_ERROR: Type '{_json_type(value)}' not supported for value "
                        f"'{json.dumps(value)}'"
                    )
            pieces = split_statements(item["sql"])
            if not pieces:
                raise _sql_failure("No SQL statements detected.")
            if len(pieces) > 1 and params:
                # How the real D1 binds params across several statements in one `sql` is not
                # documented, so the fake refuses the combination rather than guess.
                raise _sql_failure(
                    "fake D1: params with a multi-statement sql are not supported; use batch"
                )
            statements.extend((piece, params) for piece in pieces)
        return statements

    def _execute(
        self, database: _Database, statements: list[tuple[str, list[Any]]], *, raw: bool
    ) -> list[dict[str, Any]]:
        """Run all statements in one transaction; any failure rolls every one of them back."""
        with database.lock:
            conn = sqlite3.connect(database.path, isolation_level=None, check_same_thread=False)
            try:
                conn.execute("PRAGMA foreign_keys=ON")
                conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, MAX_PARAMS)
                conn.execute("BEGIN IMMEDIATE")
                conn.set_authorizer(_authorizer)
                try:
                    results = [self._run_one(conn, sql, params, raw) for sql, params in statements]
                    conn.set_authorizer(None)
                    conn.execute("COMMIT")
                except BaseException:
                    conn.set_authorizer(None)
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:  # e.g. a deferred foreign key failing at COMMIT
                raise _sql_failure(_sqlite_message(exc)) from exc
            finally:
                conn.close()
            size = database.path.stat().st_size
        for result in results:
            result["meta"]["size_after"] = size
        return results

    def _run_one(
        self, conn: sqlite3.Connection, sql: str, params: list[Any], raw: bool
    ) -> dict[str, Any]:
        if len(sql.encode("utf-8")) > MAX_STATEMENT_BYTES:
            raise _sql_failure("statement too long: SQLITE_TOOBIG")
        if len(params) > MAX_PARAMS:
            offset = _placeholder_offset(sql, MAX_PARAMS + 1)
            raise _sql_failure(f"too many SQL variables at offset {offset}: SQLITE_ERROR")
        keyword = _first_keyword(sql)
        if keyword in TRANSACTION_KEYWORDS:
            raise _sql_failure(TRANSACTION_MESSAGE)
        before = conn.total_changes
        started = time.perf_counter()
        try:
            cursor = conn.execute(sql, params)
            rows = cursor.fetchall()
        except sqlite3.Error as exc:
            raise _sql_failure(_sqlite_message(exc)) from exc
        duration = round((time.perf_counter() - started) * 1000, 4)
        changes = conn.total_changes - before
        columns = [d[0] for d in cursor.description] if cursor.description else []
        values = [[self._json_value(v) for v in row] for row in rows]
        meta = {
            "served_by": "v3-prod",
            "served_by_region": "ENAM",
            "served_by_colo": "IAD",
            "served_by_primary": True,
            "timings": {"sql_duration_ms": duration},
            "duration": duration,
            "changes": changes,
            "last_row_id": cursor.lastrowid or 0,
            "changed_db": changes > 0 or keyword in DDL_KEYWORDS,
            "size_after": 0,  # filled in after COMMIT
            "rows_read": len(rows),  # approximate: real D1 counts rows scanned
            "rows_written": changes,
            "total_attempts": 1,
        }
        results: Any
        if raw:
            results = {"columns": columns, "rows": values}
        else:
            results = [dict(zip(columns, row, strict=True)) for row in values]
        return {"results": results, "success": True, "meta": meta}

    def _json_value(self, value: Any) -> Any:
        if isinstance(value, bytes):
            return list(value)  # D1 returns BLOBs as arrays of byte values
        if self.lossy_ints and isinstance(value, int) and abs(value) > MAX_SAFE_INTEGER:
            return int(float(value))
        return value
