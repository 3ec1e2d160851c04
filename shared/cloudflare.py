"""Cloudflare REST client (envelope, auth, retries) and the D1 query API on top of it.

`CloudflareClient` is the transport every Cloudflare API shares (D1 here, Workers KV in
producers/kv_source.py): Bearer auth, the `{"success","errors","result","result_info"}` envelope
(`success:false` inside a 2xx is a failure), and retries that follow the official Cloudflare Python
SDK (429/408/409/5xx, code 971, connection errors, `retry-after-ms` / `retry-after`, capped
exponential backoff).

`D1Client`: `POST {base}/accounts/{account}/d1/database/{database}/query` with either
`{"sql", "params"}` or `{"batch": [...]}` (one D1 transaction), plus D1's documented transient 7500
messages.

Retries re-send the whole request, and a timed-out or truncated request may already have been
committed by D1, so writes sent through this client must be idempotent (UPSERT, not plain INSERT).
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

import requests

from sluice.shared.errors import CloudflareError, D1Error

log = logging.getLogger(__name__)

T = TypeVar("T")

# D1's limits per statement (https://developers.cloudflare.com/d1/platform/limits/): 100 bound
# parameters and 100,000 bytes of SQL. Checked before sending so a caller's bug never costs a
# round trip.
MAX_BOUND_PARAMS = 100
MAX_STATEMENT_BYTES = 100_000
# D1 moves numbers through JS doubles: larger integers would be stored silently rounded.
MAX_SAFE_INTEGER = 2**53 - 1

# Cloudflare SDK retry constants (`_constants.py`).
INITIAL_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 8.0
MAX_HONOURED_RETRY_AFTER = 60.0
RETRY_STATUSES = frozenset({408, 409, 429})
RATE_LIMIT_CODE = 971

# D1 errors its documentation calls retryable
# (https://developers.cloudflare.com/d1/observability/debug-d1/#error-list); they arrive with
# code 7500 like SQL errors, so they are recognised by their message.
TRANSIENT_D1_MESSAGES = (
    "Network connection lost.",
    "D1 DB reset because its code was updated.",
    "Internal error while starting up D1 DB storage caused object to be reset.",
    "Internal error in D1 DB storage caused object to be reset.",
    "Cannot resolve D1 DB due to transient issue on remote node.",
    "D1 DB is overloaded. Requests queued for too long.",
    "D1 DB is overloaded. Too many requests queued.",
    "D1 DB storage operation exceeded timeout which caused object to be reset.",
)

Param = str | int | float | None


def rows_per_statement(n_columns: int, max_params: int = MAX_BOUND_PARAMS) -> int:
    """How many rows one multi-row statement may carry: floor(100 / columns), at least 1."""
    if n_columns < 1:
        raise ValueError(f"n_columns must be >= 1, got {n_columns}")
    return max(1, max_params // n_columns)


def iter_row_chunks(rows: Sequence[T], n_columns: int) -> Iterator[Sequence[T]]:
    """Split `rows` into slices that each fit one statement's bound-parameter limit.

    The byte limit still applies: `D1Client` rejects a statement over 100,000 bytes before sending.
    """
    size = rows_per_statement(n_columns)
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def is_transient_d1_message(message: str) -> bool:
    """True for the D1 error messages its docs say to retry."""
    return any(known in message for known in TRANSIENT_D1_MESSAGES)


def parse_retry_after(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """Seconds the server asked us to wait, as the SDK reads it: `retry-after-ms`, `retry-after`."""
    if headers is None:
        return None
    try:
        return float(headers.get("retry-after-ms", "")) / 1000
    except ValueError:
        pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    parsed = email.utils.parsedate_tz(value)
    if parsed is None:
        return None
    return float(email.utils.mktime_tz(parsed) - (time.time() if now is None else now))


def _jitter() -> float:
    # Separate function so tests can make the backoff deterministic.
    return random.random()


def retry_delay(retries_done: int, headers: Mapping[str, str] | None = None) -> float:
    """Delay before the next attempt: the server's hint if 0 < hint <= 60 s, else backoff.

    Backoff is min(0.5 * 2**n, 8) seconds with full jitter (n = retries already done).
    """
    hint = parse_retry_after(headers)
    if hint is not None and 0 < hint <= MAX_HONOURED_RETRY_AFTER:
        return hint
    base = min(INITIAL_RETRY_DELAY * 2.0 ** min(retries_done, 1000), MAX_RETRY_DELAY)
    return base * _jitter()


@dataclass
class _Retryable:
    """A failed attempt that may succeed if sent again."""

    message: str
    status: int | None = None
    code: int | None = None
    headers: Mapping[str, str] | None = None
    cause: BaseException | None = None


def encode_param(value: object, index: int) -> Param:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):  # before int: bool is an int subclass
        return int(value)
    if isinstance(value, int):
        if abs(value) > MAX_SAFE_INTEGER:
            raise D1Error(
                f"parameter {index}: integer outside +/-(2**53-1); D1 stores numbers as doubles "
                "and would round it silently",
                transient=False,
                param_index=index,
            )
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise D1Error(
                f"parameter {index}: {value} cannot be sent as JSON",
                transient=False,
                param_index=index,
            )
        return float(value)
    raise D1Error(
        f"parameter {index} has unsupported type {type(value).__name__}; "
        "D1 accepts str, int, float, bool or None",
        transient=False,
        param_index=index,
    )


def _statement(sql: str, params: Sequence[object], where: str) -> dict[str, Any]:
    """Validate one statement against D1's limits and encode it for the request body."""
    if not isinstance(sql, str) or not sql.strip():
        raise D1Error(f"{where}: empty SQL statement", transient=False)
    if isinstance(params, str | bytes) or not isinstance(params, Sequence):
        raise D1Error(f"{where}: params must be a sequence of values", transient=False)
    size = len(sql.encode("utf-8"))
    if size > MAX_STATEMENT_BYTES:
        raise D1Error(
            f"{where}: SQL statement is {size} bytes, over D1's limit of {MAX_STATEMENT_BYTES} "
            "bytes per statement; split it",
            transient=False,
        )
    if len(params) > MAX_BOUND_PARAMS:
        raise D1Error(
            f"{where}: {len(params)} bound parameters, over D1's limit of {MAX_BOUND_PARAMS} "
            "per statement; split the statement (see rows_per_statement)",
            transient=False,
        )
    encoded = []
    for i, value in enumerate(params):
        try:
            encoded.append(encode_param(value, i))
        except D1Error as exc:
            raise D1Error(f"{where}: {exc.message}", transient=False, param_index=i) from None
    return {"sql": sql, "params": encoded}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _snippet(body: bytes, limit: int = 200) -> str:
    text = " ".join(body[:limit].decode("utf-8", "replace").split())
    return text + ("..." if len(body) > limit else "")


def _first_error(envelope: Mapping[str, Any]) -> tuple[int | None, str | None]:
    errors = envelope.get("errors")
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        code = errors[0].get("code")
        message = errors[0].get("message")
        return (
            code if isinstance(code, int) and not isinstance(code, bool) else None,
            str(message) if message is not None else None,
        )
    return None, None


def _override(default: bool, headers: Mapping[str, str]) -> bool:
    # The SDK lets the server force the decision either way.
    hint = headers.get("x-should-retry", "").strip().lower()
    if hint == "true":
        return True
    if hint == "false":
        return False
    return default


def _retryable_status(status: int) -> bool:
    return status in RETRY_STATUSES or status >= 500


class CloudflareClient:
    """Sends requests to one Cloudflare API with the SDK's retry rules; raises `error_type`.

    Uses one `requests.Session`, which is not guaranteed thread-safe: one client per thread.
    """

    error_type: type[CloudflareError] = CloudflareError

    def __init__(
        self,
        *,
        api_token: str,
        base_url: str = "https://api.cloudflare.com/client/v4",
        session: requests.Session | None = None,
        timeout: tuple[float, float] = (5.0, 60.0),
        max_attempts: int = 5,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not api_token:
            raise ValueError("api_token must not be empty")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.base_url = base_url.rstrip("/")
        self._token = api_token
        self._owns_session = session is None
        self._session = session if session is not None else requests.Session()
        self._timeout = timeout
        self._max_attempts = max_attempts
        self._sleep = sleep

    def close(self) -> None:
        if self._owns_session:
            self._session.close()

    def request(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        raw: bool = False,
        check: Callable[[dict[str, Any], int, Mapping[str, str]], Any] | None = None,
    ) -> Any:
        """Send until success or a permanent error. Returns the parsed envelope (after `check`,
        which may return a `_Retryable`), or with `raw` the 2xx `requests.Response` itself
        (KV values are raw bytes, not an envelope; errors still are)."""
        payload = None
        if body is not None:
            data = json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
            payload = data.encode("utf-8")
        attempt = 1
        while True:
            outcome = self._attempt(method, url, params, payload, raw, check)
            if not isinstance(outcome, _Retryable):
                return outcome
            if attempt >= self._max_attempts:
                raise self.error_type(
                    self._redact(outcome.message),
                    status=outcome.status,
                    code=outcome.code,
                    transient=True,
                    endpoint=url,
                    attempts=attempt,
                ) from outcome.cause
            delay = retry_delay(attempt - 1, outcome.headers)
            log.warning(
                "Cloudflare request %s %s failed (%s); retrying in %.2fs (attempt %d of %d)",
                method,
                url,
                self._redact(outcome.message),
                delay,
                attempt + 1,
                self._max_attempts,
            )
            self._sleep(delay)
            attempt += 1

    def _attempt(
        self,
        method: str,
        url: str,
        params: Mapping[str, str] | None,
        payload: bytes | None,
        raw: bool,
        check: Callable[[dict[str, Any], int, Mapping[str, str]], Any] | None,
    ) -> Any:
        headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        try:
            response = self._session.request(
                method, url, params=params, data=payload, headers=headers, timeout=self._timeout
            )
        except requests.Timeout as exc:
            return _Retryable(f"request timed out ({type(exc).__name__})", cause=exc)
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
            return _Retryable(f"connection failed: {type(exc).__name__}: {exc}", cause=exc)
        except requests.RequestException as exc:
            raise self.error_type(
                self._redact(f"request could not be sent: {type(exc).__name__}: {exc}"),
                transient=False,
                endpoint=url,
            ) from exc
        if raw and 200 <= response.status_code < 300:
            return response
        return self._handle(method, url, response, check)

    def _handle(
        self,
        method: str,
        url: str,
        response: requests.Response,
        check: Callable[[dict[str, Any], int, Mapping[str, str]], Any] | None,
    ) -> Any:
        status = response.status_code
        headers = response.headers
        ok = 200 <= status < 300
        envelope: Any = None
        problem: str | None = None
        try:
            # Cloudflare declares charset=UTF-8; decoding explicitly stops json guessing UTF-16/32.
            text = response.content.decode("utf-8")
            envelope = json.loads(text, parse_constant=_reject_constant)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError alike
            problem = str(exc)
        else:
            if not isinstance(envelope, dict):
                problem = f"top level is {type(envelope).__name__}, not an object"

        if problem is not None:
            content_type = headers.get("Content-Type") or "no content type"
            if ok:
                # A 2xx whose body does not parse is most likely a proxy or connection hiccup.
                message = (
                    f"malformed JSON in HTTP {status} response from {method} {url}: "
                    f"{problem} ({content_type}, {len(response.content)} bytes, "
                    f"body starts {_snippet(response.content, 80)!r})"
                )
                retry = _override(True, headers)
            else:
                message = (
                    f"HTTP {status} with non-JSON body ({content_type}): "
                    f"{_snippet(response.content)!r}"
                )
                retry = _override(_retryable_status(status), headers)
            if retry:
                return _Retryable(message, status=status, headers=headers)
            raise self.error_type(self._redact(message), status=status, endpoint=url)

        if not ok or envelope.get("success") is not True:
            code, server_message = _first_error(envelope)
            reason = server_message or (
                f"HTTP {status} with success={envelope.get('success')!r} and no errors"
            )
            transient = (
                _retryable_status(status)
                or code == RATE_LIMIT_CODE
                or self._transient_message(reason)
            )
            if _override(transient, headers):
                return _Retryable(reason, status=status, code=code, headers=headers)
            raise self.error_type(self._redact(reason), status=status, code=code, endpoint=url)
        return check(envelope, status, headers) if check is not None else envelope

    def _transient_message(self, message: str) -> bool:
        return False

    def _shape_error(self, url: str, detail: str) -> CloudflareError:
        return self.error_type(
            f"unexpected response shape from {url}: {detail}", transient=False, endpoint=url
        )

    def _redact(self, text: str) -> str:
        # Defence in depth: nothing we build should contain the token, but bodies are server text.
        return text.replace(self._token, "[redacted]")


class D1Client(CloudflareClient):
    """Runs SQL on one D1 database over the REST API."""

    error_type = D1Error

    def __init__(
        self,
        *,
        account_id: str,
        database_id: str,
        api_token: str,
        base_url: str = "https://api.cloudflare.com/client/v4",
        session: requests.Session | None = None,
        timeout: tuple[float, float] = (5.0, 60.0),
        max_attempts: int = 5,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        for name, value in (
            ("account_id", account_id),
            ("database_id", database_id),
            ("api_token", api_token),
        ):
            if not value:
                raise ValueError(f"{name} must not be empty")
        super().__init__(
            api_token=api_token,
            base_url=base_url,
            session=session,
            timeout=timeout,
            max_attempts=max_attempts,
            sleep=sleep,
        )
        self.account_id = account_id
        self.database_id = database_id
        self.endpoint = (
            f"{self.base_url}/accounts/{quote(account_id, safe='')}"
            f"/d1/database/{quote(database_id, safe='')}/query"
        )

    def __repr__(self) -> str:
        # Deliberately leaves out the token.
        return (
            f"D1Client(account_id={self.account_id!r}, database_id={self.database_id!r}, "
            f"base_url={self.base_url!r})"
        )

    def __enter__(self) -> D1Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def query(self, sql: str, params: Sequence[object] = ()) -> list[dict[str, Any]]:
        """Run one statement; return its rows as dicts (`result[0]["results"]`)."""
        result = self._post(_statement(sql, params, "query"))
        rows = result[0].get("results") if result else None
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            raise self._shape_error(
                f"POST {self.endpoint}", "result[0].results is not a list of row objects"
            )
        return rows

    def batch(self, statements: Sequence[tuple[str, Sequence[object]]]) -> list[dict[str, Any]]:
        """Run statements as one D1 transaction; return one result object per statement.

        Each result has "results" (rows) and "meta" (changes, last_row_id, ...). If any statement
        fails, D1 rolls back the whole batch and this raises.
        """
        if not statements:
            return []
        body = [
            _statement(sql, params, f"statement {i} of batch")
            for i, (sql, params) in enumerate(statements)
        ]
        return self._post({"batch": body})

    def _post(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.request(
            "POST", self.endpoint, body=body, check=self._check_result
        )
        return result

    def _transient_message(self, message: str) -> bool:
        return is_transient_d1_message(message)

    def _check_result(
        self, envelope: dict[str, Any], status: int, headers: Mapping[str, str]
    ) -> list[dict[str, Any]] | _Retryable:
        result = envelope.get("result")
        if not isinstance(result, list) or not all(isinstance(item, dict) for item in result):
            raise self._shape_error(
                f"POST {self.endpoint}",
                f"'result' is {type(result).__name__}, not a list of objects",
            )
        for index, item in enumerate(result):
            if item.get("success") is False:
                # D1 can report a statement failure inside an otherwise successful envelope.
                code, server_message = _first_error(envelope)
                detail = item.get("error") or server_message or "success=false without a message"
                text = f"statement {index} failed: {detail}"
                if _override(is_transient_d1_message(text), headers):
                    return _Retryable(text, status=status, code=code, headers=headers)
                raise D1Error(self._redact(text), status=status, code=code, endpoint=self.endpoint)
        return result
