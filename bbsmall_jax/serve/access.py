"""Who may call `bbsmall serve`: the API key, allowed origins and hosts, content types, header limits.

One pure ASGI middleware in front of the app. By default the server answers its own origin only: a browser
page from anywhere else gets 403 (cross-site requests carry an `Origin`), POSTs must be `application/json`
(a cross-site form or `text/plain` POST, which browsers send without asking, is refused), and on a loopback
address the `Host` header must name this machine (a DNS-rebinding page names its own). `--api-key` adds a
bearer key to every `/v1/` request, as OpenAI's clients send it. Refusals use OpenAI's error shape.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlsplit

from bbsmall_jax.errors import UsageError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
MAX_HEADERS = 100  # count of request headers; their size is bounded by uvicorn's parser
CORS_HEADERS = "authorization, content-type"


def is_loopback(host: str) -> bool:
    """Whether a listening address is this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def same_origin(origin: str, host: Optional[str]) -> bool:
    """Whether `origin` is the server's own (`host` as the request names it): the page this server sent."""
    return urlsplit(origin).netloc == host


def parse_origins(text: Optional[str]) -> tuple[str, ...]:
    """`--allowed-origins`: comma-separated `scheme://host[:port]`, or `*` for any; ValueError naming a bad one."""
    if not text:
        return ()
    origins = tuple(o.strip().rstrip("/") for o in text.split(",") if o.strip())
    for origin in origins:
        parts = urlsplit(origin)
        if origin != "*" and (parts.scheme not in ("http", "https") or not parts.hostname or parts.path):
            raise UsageError(f"--allowed-origins: {origin!r} is not an origin like https://example.com:8443 or *")
    return origins


@dataclass(frozen=True)
class AccessPolicy:
    """The server's rules; `check` says why a request is refused (status, message, code) or None."""

    api_key: Optional[str] = None
    allowed_origins: tuple[str, ...] = ()  # besides the server's own origin; "*" allows any
    bound_host: str = "127.0.0.1"

    def allowed_hosts(self) -> set[str]:
        names = {*LOOPBACK_NAMES, self.bound_host.strip("[]")}
        return names | {urlsplit(o).hostname for o in self.allowed_origins if o != "*"}

    def origin_allowed(self, origin: str, host: str) -> bool:
        return same_origin(origin, host) or "*" in self.allowed_origins or origin.rstrip("/") in self.allowed_origins

    def check(self, method: str, path: str, headers: dict[str, str], header_count: int):
        if header_count > MAX_HEADERS:
            return 431, f"The request has {header_count} headers; at most {MAX_HEADERS} are accepted", "headers_too_many"
        host = headers.get("host", "")
        name = urlsplit("//" + host).hostname or ""
        if is_loopback(self.bound_host) and name not in self.allowed_hosts():
            return 403, (f"Host {host!r} is not this server's: on a loopback address it answers "
                         f"{', '.join(sorted(self.allowed_hosts()))} (or the hosts of --allowed-origins)"), "host_not_allowed"
        origin = headers.get("origin")
        if origin is not None and not self.origin_allowed(origin, host):
            return 403, (f"Origin {origin!r} is not allowed; start the server with --allowed-origins "
                         f"{origin} to let its pages call it"), "origin_not_allowed"
        if method == "POST":
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                return 415, f"Content-Type must be application/json, got {kind or 'none'!r}", "unsupported_media_type"
        if self.api_key and path.startswith("/v1/") and method != "OPTIONS":
            given = headers.get("authorization", "")
            scheme, _, key = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
                why = "No API key given" if not given else "Incorrect API key given"
                return 401, (f"{why}: this server needs 'Authorization: Bearer KEY' with the key it was started "
                             "with (--api-key or BBSMALL_API_KEY)"), "invalid_api_key"
        return None


class AccessControl:
    """The middleware applying an AccessPolicy, answering CORS preflights of allowed origins."""

    def __init__(self, app, policy: AccessPolicy):
        self.app, self.policy = app, policy

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers: dict[str, str] = {}
        for key, value in scope["headers"]:
            headers.setdefault(key.decode("latin-1").lower(), value.decode("latin-1"))
        refusal = self.policy.check(scope["method"], scope["path"], headers, len(scope["headers"]))
        if refusal is not None:
            return await _respond(send, *refusal)
        origin = headers.get("origin")
        cors = [] if origin is None or same_origin(origin, headers.get("host")) else [
            (b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
        if scope["method"] == "OPTIONS" and cors:
            return await _respond(send, 204, None, None, cors + [
                (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
                (b"access-control-allow-headers", CORS_HEADERS.encode()), (b"access-control-max-age", b"600")])

        async def with_cors(message):
            if message["type"] == "http.response.start" and cors:
                message = dict(message, headers=list(message.get("headers", [])) + cors)
            await send(message)

        return await self.app(scope, receive, with_cors)


async def _respond(send, status: int, message: Optional[str], code: Optional[str], extra: list = ()) -> None:
    from bbsmall_jax.serve.schemas import error_body  # pydantic: not for the CLI's flag checks, which import this

    body = b"" if message is None else json.dumps(error_body(message, code=code)).encode()
    headers = [(b"content-length", str(len(body)).encode())] + list(extra)
    if body:
        headers.append((b"content-type", b"application/json"))
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
