"""Sluice's own exception types.

Every error carries the context an operator needs to act on it: which source, stream, sink or key.
`transient` tells the consumer whether retrying the same work can succeed (a database restart, a
429) or not (a constraint violation, a malformed value).
"""

from __future__ import annotations

from collections.abc import Mapping


class SluiceError(Exception):
    """Base of every error Sluice raises on purpose."""

    transient: bool = False

    def __init__(self, message: str, **context: object) -> None:
        self.message = message
        self.context = {k: v for k, v in context.items() if v is not None}
        super().__init__(self.__str__())

    def __str__(self) -> str:
        if not self.context:
            return self.message
        where = ", ".join(f"{k}={v}" for k, v in self.context.items())
        return f"{self.message} ({where})"


class ConfigError(SluiceError):
    """The configuration is wrong; `problems` lists every mistake found (file, key, expectation)."""

    def __init__(self, problems: list[str], file: str | None = None) -> None:
        self.problems = problems
        head = f"invalid configuration in {file}" if file else "invalid configuration"
        super().__init__(head + ":\n  - " + "\n  - ".join(problems))


class ServiceError(SluiceError):
    """An embedded service (Redis, PostgreSQL) could not be started or reached."""


class SourceError(SluiceError):
    """Reading from a source failed."""


class TransientSourceError(SourceError):
    transient = True


class MissingSecretError(SourceError):
    """A remote source's secret (an API token) is not in this process's environment: what it
    would read is unknown here, which is not a failure of the source where it runs."""


class CloudflareError(SourceError):
    """A Cloudflare REST API answered with an error (HTTP status, Cloudflare code, message)."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: int | None = None,
        transient: bool = False,
        **context: object,
    ) -> None:
        self.status = status
        self.code = code
        self.transient = transient
        super().__init__(message, status=status, code=code, **context)


class D1Error(CloudflareError):
    """The D1 REST API answered with an error."""


class KvError(CloudflareError):
    """The Workers KV REST API (or a local KV store) answered with an error; context names the
    namespace and, when known, the key."""


class SinkError(SluiceError):
    """Writing a page to a sink failed."""


class TransientSinkError(SinkError):
    """The sink is unreachable, busy or asked us to retry: the same page may succeed later."""

    transient = True


class RejectedBySinkError(SinkError):
    """The database rejected the page's data (a constraint, a value out of range)."""


class ForeignKeyViolationError(RejectedBySinkError):
    """A record's parent row is missing. Permanent for the record, but the parent may be on its
    way in another page (parents and children travel in parallel): the consumer retries a few
    times before dead-lettering (consumers/ingest.py)."""


class UnknownStreamError(SluiceError):
    """A page names a stream the settings do not define."""


class MessageError(SluiceError):
    """A queue message body could not be decoded into a page."""


class HttpSourceError(SourceError):
    """An HTTP API answered with an error, or not at all. Context names the API, the source,
    the partition (symbol, point) and the URL without its query string (keys may travel there)."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        transient: bool = False,
        where: Mapping[str, object] | None = None,
    ) -> None:
        self.status = status
        self.transient = transient
        super().__init__(message, status=status, **dict(where or {}))


class ApiBannedError(HttpSourceError):
    """The API banned us (Binance 418) or asked for a wait longer than a run may sleep: every
    process stops calling it until `until` (epoch seconds)."""

    def __init__(self, message: str, *, until: float, where: Mapping[str, object]) -> None:
        self.until = until
        super().__init__(message, transient=True, where=where)
