"""Who may use the console, and proof that a form was sent by the console itself.

Credentials come from the environment only: `SLUICE_CONSOLE_TOKEN` (sent as
`Authorization: Bearer …`, or typed into the login form, which then sets a session cookie) and
`SLUICE_CONSOLE_USER` / `SLUICE_CONSOLE_PASSWORD` (HTTP basic auth, or the login form). Every
comparison takes the same time whatever the input, so a guess learns nothing from the clock.

State-changing requests (POST) carry a CSRF token: a random value in a cookie that the page also
writes into each form (double submit). Another site can make a browser send the cookie, but it
cannot read it, so it cannot put the same value in the form. A request authenticated with the
Bearer header needs none: a browser never adds that header on its own.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

from sluice.shared.errors import SluiceError

SESSION_COOKIE = "sluice_session"
CSRF_COOKIE = "sluice_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
SESSION_SECONDS = 12 * 3600


class ConsoleAuthError(SluiceError):
    """The console's credentials are set inconsistently."""


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


@dataclass(frozen=True)
class ConsoleAuth:
    """The configured credentials; none at all means the console is open (loopback only)."""

    token: str | None = None
    user: str | None = None
    password: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ConsoleAuth:
        token = env.get("SLUICE_CONSOLE_TOKEN") or None
        user = env.get("SLUICE_CONSOLE_USER") or None
        password = env.get("SLUICE_CONSOLE_PASSWORD") or None
        if bool(user) != bool(password):
            raise ConsoleAuthError(
                "set both SLUICE_CONSOLE_USER and SLUICE_CONSOLE_PASSWORD, or neither"
            )
        return cls(token, user, password)

    @property
    def configured(self) -> bool:
        return bool(self.token or self.user)

    @property
    def methods(self) -> list[str]:
        return [m for m, on in (("token", self.token), ("password", self.user)) if on]

    def token_ok(self, given: str) -> bool:
        return self.token is not None and _same(given, self.token)

    def password_ok(self, user: str, password: str) -> bool:
        if self.user is None or self.password is None:
            return False
        # Both compared every time: which of the two was wrong must not show in the timing.
        user_ok = _same(user, self.user)
        password_ok = _same(password, self.password)
        return user_ok and password_ok

    def basic_ok(self, header: str) -> bool:
        """An `Authorization: Basic …` header's value (after the scheme)."""
        try:
            decoded = base64.b64decode(header.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return False
        user, sep, password = decoded.partition(":")
        return bool(sep) and self.password_ok(user, password)


class Sessions:
    """Logged-in browsers: a random id per login, kept in this process (a restart logs
    everyone out). Only a hash of each id is kept, so the table holds nothing a cookie could be
    rebuilt from."""

    def __init__(self, lifetime: float = SESSION_SECONDS) -> None:
        self.lifetime = lifetime
        self._expiry: dict[str, float] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(session_id: str) -> str:
        return hashlib.sha256(session_id.encode()).hexdigest()

    def start(self) -> str:
        session_id = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            self._expiry = {k: t for k, t in self._expiry.items() if t > now}
            self._expiry[self._key(session_id)] = now + self.lifetime
        return session_id

    def valid(self, session_id: str) -> bool:
        with self._lock:
            expiry = self._expiry.get(self._key(session_id))
        return expiry is not None and expiry > time.monotonic()

    def end(self, session_id: str) -> None:
        with self._lock:
            self._expiry.pop(self._key(session_id), None)


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def csrf_ok(cookie: str | None, sent: str | None) -> bool:
    return bool(cookie) and bool(sent) and _same(str(sent), str(cookie))
