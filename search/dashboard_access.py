"""Who may do what through ``search dashboard``: read-only by default, a token to go further.

optuna-dashboard's API can delete studies, rename them, tell trials and write notes; served
as is on a network, anyone who reaches the port can do all of it. :class:`AccessGuard` wraps
its WSGI app:

- without ``allow_writes`` every request that is not ``GET``/``HEAD``/``OPTIONS`` is refused
  (``403``): the dashboard shows studies and changes nothing;
- with a ``token`` every request must carry it: ``Authorization: Bearer TOKEN``, or once
  ``?token=TOKEN`` on any page, which sets an ``HttpOnly`` ``SameSite=Strict`` cookie for the
  rest of the session (``401`` otherwise).

The command requires a token to listen beyond loopback and to allow writes.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
COOKIE = "yolo_mpq_dashboard"
#: Where the token can come from instead of the command line (which other users may see in ``ps``).
TOKEN_ENV = "YOLO_MPQ_DASHBOARD_TOKEN"

StartResponse = Callable[..., Any]


class AccessGuard:
    """A WSGI middleware: read-only unless ``allow_writes``; every request needs ``token`` when one is set."""

    def __init__(self, app: Callable[[dict[str, Any], StartResponse], Iterable[bytes]], *,
                 allow_writes: bool = False, token: str | None = None) -> None:
        if allow_writes and not token:
            raise ValueError("allowing writes needs a token")
        self.app = app
        self.allow_writes = allow_writes
        self.token = token

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = str(environ.get("REQUEST_METHOD", "GET")).upper()
        set_cookie = None
        if self.token is not None:
            given = self._token_of(environ)
            if given is None or not hmac.compare_digest(given.encode(), self.token.encode()):
                return _deny(start_response, "401 Unauthorized",
                             "this dashboard needs its token: open it once with ?token=TOKEN")
            if self._query_token(environ) is not None:
                set_cookie = f"{COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/"
        if method not in READ_METHODS and not self.allow_writes:
            return _deny(start_response, "403 Forbidden",
                         "the dashboard is read-only; restart it with --allow-writes --token TOKEN to change studies")
        if set_cookie is None:
            return self.app(environ, start_response)

        def with_cookie(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            return start_response(status, [*headers, ("Set-Cookie", set_cookie)], exc_info)

        return self.app(environ, with_cookie)

    @staticmethod
    def _query_token(environ: dict[str, Any]) -> str | None:
        values = parse_qs(str(environ.get("QUERY_STRING", ""))).get("token")
        return values[0] if values else None

    def _token_of(self, environ: dict[str, Any]) -> str | None:
        auth = str(environ.get("HTTP_AUTHORIZATION", ""))
        if auth.lower().startswith("bearer "):
            return auth[7:].strip()
        query = self._query_token(environ)
        if query is not None:
            return query
        cookie = SimpleCookie(str(environ.get("HTTP_COOKIE", "")))
        return cookie[COOKIE].value if COOKIE in cookie else None


def _deny(start_response: StartResponse, status: str, message: str) -> list[bytes]:
    body = (message + "\n").encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
    return [body]
