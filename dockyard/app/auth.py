"""Bearer tokens: admin (everything, /metrics included), worker (register, heartbeat,
artifacts) and invoke (/invoke when `--invoke-auth` is on)."""

from __future__ import annotations

import hmac
import ipaddress
from functools import wraps
from pathlib import Path

from flask import current_app, request

from ..errors import Forbidden, Unauthorized
from .state import extension


def _kind_of(token: str, tokens: dict[str, str | None]) -> str | None:
    for kind, expected in tokens.items():
        if expected and hmac.compare_digest(token.encode(), expected.encode()):
            return kind
    return None


def check_header(header: str, tokens: dict[str, str | None], allowed: set[str],
                 data_root: Path | None = None) -> None:
    """Raise Unauthorized / Forbidden unless the Authorization header carries a token of an
    allowed kind (shared by the Flask routes and the synchronous invoke route). `data_root`:
    the server's data dir, named in the message (given for local callers only)."""
    where = (f"{data_root / 'tokens' / 'admin'}" if data_root is not None
             else "tokens/admin in the server's data dir")
    if not header.startswith("Bearer "):
        raise Unauthorized("missing token: send 'Authorization: Bearer <token>' "
                           f"(the admin token is in {where})")
    kind = _kind_of(header[7:].strip(), tokens)
    if kind is None:
        raise Unauthorized(f"wrong token: not a token of this server (its admin token is in "
                           f"{where})")
    if kind not in allowed:
        raise Forbidden(f"a {kind} token cannot use this route")


def require(*kinds: str):
    """Allow the route to the admin token and to the token kinds named."""
    allowed = {"admin", *kinds}

    def decorate(view):
        @wraps(view)
        def wrapper(*args, **kwargs):
            check(allowed)
            return view(*args, **kwargs)
        return wrapper
    return decorate


def check(allowed: set[str]) -> None:
    ext = extension()
    check_header(request.headers.get("Authorization", ""), ext["tokens"], allowed,
                 ext["data"].root if is_local(request.remote_addr) else None)


def is_local(address: str | None) -> bool:
    """A caller on this host may learn where the data dir is; a remote one is not told."""
    try:
        return ipaddress.ip_address(address or "").is_loopback
    except ValueError:
        return False


INVOKE_KINDS = {"admin", "invoke"}   # the tokens /invoke takes under --invoke-auth


def check_invoke() -> None:
    if current_app.config["INVOKE_AUTH"]:
        check(INVOKE_KINDS)


METRICS_KINDS = {"admin"}   # the tokens /metrics takes, unless `serve --public-metrics`


def check_metrics() -> None:
    """/metrics names every container and job with its call counts: the admin token reads
    it, unless `serve --public-metrics` (config PUBLIC_METRICS) opens it to anyone."""
    if current_app.config.get("PUBLIC_METRICS"):
        return
    try:
        check(METRICS_KINDS)
    except Unauthorized as exc:
        raise Unauthorized(f"/metrics needs the admin token: {exc.message}; or start "
                           "`dockyard serve --public-metrics` to let anyone read it") from None


def init_app(app) -> None:  # noqa: ARG001 - kept for symmetry with the other extensions
    return None
