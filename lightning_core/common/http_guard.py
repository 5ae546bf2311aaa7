"""Checks the collector and the gateway share on who is asking: loopback clients, bearer tokens,
and browsers (Origin, Host) driving a server that listens on loopback without a token."""

from __future__ import annotations

import hashlib
import ipaddress
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:  # agents' environments import bearer() and may have no starlette
    from starlette.requests import Request

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}  # bind addresses that need no token


def is_loopback_name(host: str) -> bool:
    """Whether a host name or address (no port; IPv6 without brackets) is this machine's loopback."""
    host = host.strip().lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def agent_token(admin_token: str) -> str:
    """The token agents send to the model routes of a gateway whose admin token is ``admin_token``: made from it, so
    every host that holds ``gateway.token`` agrees on it without a setting of its own, and it gives no way back to the
    admin token. The gateway takes it on the model routes only."""
    return "agent-" + hashlib.sha256(b"arclight agent token\0" + admin_token.encode()).hexdigest()


def bearer(token: str | None) -> dict[str, str]:
    """The ``Authorization`` header a client sends with ``token``; no header when there is no token."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def has_token(request: Request, token: str | None) -> bool:
    """Whether the request carries ``Authorization: Bearer <token>`` (False when no token is set)."""
    return token is not None and request.headers.get("authorization", "") == f"Bearer {token}"


def trusted(request: Request, token: str | None) -> bool:
    """Whether to show a caller details such as paths and URLs: the token when one is set, else a loopback client."""
    if token is not None:
        return has_token(request, token)
    return request.client is not None and is_loopback_name(request.client.host)


def foreign_browser(request: Request) -> str | None:
    """Why a request to a token-less loopback server looks like a web page driving it; None when it does not.

    As local dev servers do: the Host header must name this machine (a page that rebinds its own
    DNS name to 127.0.0.1 sends its name), and an Origin header, when a browser sends one, must
    be a loopback origin (a cross-origin form or text/plain POST needs no preflight).
    """
    host = request.headers.get("host", "")
    name = urlsplit(f"//{host}").hostname or ""
    if not _ip_literal(name) and not is_loopback_name(name):
        return f"Host {host!r} is not this machine: a token-less gateway answers only requests addressed to localhost or an IP"
    origin = request.headers.get("origin")
    if origin is not None:
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not is_loopback_name(parts.hostname or ""):
            return (f"Origin {origin!r} is not a page on this machine: a token-less gateway refuses admin calls from "
                    "other sites (set gateway.token to allow them with the token)")
    return None


def _ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def json_depth_over(value: Any, limit: int) -> bool:
    """Whether a parsed JSON value nests lists and objects more than ``limit`` deep (no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False
