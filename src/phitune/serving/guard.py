"""What keeps other web pages away from a server on localhost (ASGI middleware in front of every route).

A page on any site can make the visitor's browser send requests to 127.0.0.1. Two ways in are closed here:
- DNS rebinding: a name the attacker controls is made to resolve to 127.0.0.1, so the browser treats the
  server as that site and lets its page read the answers. The browser still sends that name as Host; only
  names of this server are served: localhost, 127.0.0.1, ::1, the address it was started on, any IP
  address (a page can only reach an IP address as itself: no other site's page can read it), and what
  --allowed_hosts adds.
- Cross-site writes: a form or fetch() from another origin can POST without reading the answer (a
  `text/plain` body needs no permission from the server). A POST must come from this server's own origin
  when the browser names one (Origin), and carry JSON (Content-Type: application/json).
"""
from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Optional
from urllib.parse import urlsplit

from phitune.serving.schemas import ApiError

LOCAL = ("localhost", "127.0.0.1", "::1")


def host_name(value: str) -> str:
    """'Example.com:8000' -> 'example.com'; '[::1]:8000' -> '::1'."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class Guard:
    """Refuses requests for other host names (403), cross-origin POSTs (403) and POSTs that are not JSON (415).

    host None: the app is not bound to a known address (an app built in code or a test client): Host is not
    checked, the rest is."""

    def __init__(self, app, host: Optional[str] = None, allowed_hosts: Sequence[str] = ()):
        self.app = app
        self.check_host = host is not None and "*" not in allowed_hosts
        self.names = {host_name(h) for h in (*LOCAL, host or "", *allowed_hosts) if h}
        self.extra = {host_name(h) for h in allowed_hosts if h and h != "*"}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            try:
                self.check(scope["method"], headers)
            except ApiError as e:
                from fastapi.responses import JSONResponse
                await JSONResponse(e.body(), status_code=e.status)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def host_allowed(self, name: str) -> bool:
        return not self.check_host or name in self.names or _is_ip(name)

    def check(self, method: str, headers: dict) -> None:
        host = headers.get("host", "")
        if host and not self.host_allowed(host_name(host)):
            raise ApiError(403, f"Host {host!r} is not a name of this server; if you reach it by this name, "
                                f"start it with --allowed_hosts {host_name(host)}", code="host_not_allowed",
                           kind="permission_error")
        if method != "POST":
            return
        origin = headers.get("origin")
        if origin is not None and not self.same_site(origin, host):
            raise ApiError(403, f"cross-origin request from {origin} refused: only this server's own page may "
                                f"post to it (or a site named in --allowed_hosts)", code="cross_origin",
                           kind="permission_error")
        kind = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if kind != "application/json":
            raise ApiError(415, f"Content-Type must be application/json, got {kind or 'none'} (with curl: "
                                f"-H 'Content-Type: application/json')", code="unsupported_media_type")

    def same_site(self, origin: str, host: str) -> bool:
        """The browser's Origin is this server (the Host it asked for) or a site named in --allowed_hosts."""
        parts = urlsplit(origin.strip().lower())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return False  # "null": a sandboxed frame, a file, a redirect across sites
        return parts.netloc == host.strip().lower() or host_name(parts.netloc) in self.extra
