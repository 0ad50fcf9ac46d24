"""Bearer tokens: admin (everything, /metrics included), worker (register, heartbeat,
artifacts) and invoke (/invoke when `--invoke-auth` is on, and the records of its own async
calls through the key their 202 gave)."""

from __future__ import annotations

import hmac
import ipaddress
from functools import wraps
from pathlib import Path

from flask import current_app, request

from ..errors import DockyardError, Forbidden, Unauthorized
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
    kind = kind_of_header(header, tokens, data_root)
    if kind not in allowed:
        raise Forbidden(f"{with_article(kind)} token cannot use this route")


def kind_of_header(header: str, tokens: dict[str, str | None],
                   data_root: Path | None = None) -> str:
    """The kind of the token the Authorization header carries; Unauthorized when there is
    none or it is not one of this server's."""
    where = (f"{data_root / 'tokens' / 'admin'}" if data_root is not None
             else "tokens/admin in the server's data dir")
    if not header.startswith("Bearer "):
        raise Unauthorized("missing token: send 'Authorization: Bearer <token>' "
                           f"(the admin token is in {where})")
    kind = _kind_of(header[7:].strip(), tokens)
    if kind is None:
        raise Unauthorized(f"wrong token: not a token of this server (its admin token is in "
                           f"{where})")
    return kind


def with_article(word: str) -> str:
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


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
                 _data_root_for_caller())


def _data_root_for_caller() -> Path | None:
    return extension()["data"].root if is_local(request.remote_addr) else None


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


# -- reading the record of one's own call ------------------------------------------------
#
# An invocation id is a name, not a secret: lists, the dashboard, serve's log, job runs and the
# function itself (context.invocation_id) show it. What lets the caller of an async /invoke read
# its record is the key its 202 carries (`Location: /api/invocations/<id>?key=<key>`): an HMAC of
# the id under a secret derived from the admin token, so no other caller can make one (128 bits)
# and nothing is stored; every control plane sharing the tokens accepts it.

_KEY_CONTEXT = b"dockyard invocation record key v1"


def invocation_key(tokens: dict[str, str | None], invocation_id: str) -> str:
    admin = tokens.get("admin")
    if not admin:   # never a key anyone could compute
        raise DockyardError("this server has no admin token: restart `dockyard serve`")
    secret = hmac.new(admin.encode(), _KEY_CONTEXT, "sha256").digest()
    return hmac.new(secret, invocation_id.encode(), "sha256").hexdigest()[:32]


def record_location(invocation_id: str) -> str:
    """Where the caller of an async call reads its record."""
    key = invocation_key(extension()["tokens"], invocation_id)
    return f"/api/invocations/{invocation_id}?key={key}"


def check_record_read(invocation_id: str) -> None:
    """The admin token reads every record. The caller of an async /invoke reads the record of
    its call with the key its 202 gave, and the token /invoke takes (the admin or the invoke
    token under `--invoke-auth`; none needed without it)."""
    ext = extension()
    header = request.headers.get("Authorization", "")
    key = request.args.get("key")
    how = ("the caller of an async call reads its record at the Location its 202 answer gave "
           "(/api/invocations/<id>?key=…)")
    kind = None
    if header or current_app.config["INVOKE_AUTH"] or key is None:
        try:
            kind = kind_of_header(header, ext["tokens"], _data_root_for_caller())
        except Unauthorized as exc:
            raise Unauthorized(f"{exc.message}; {how}") from None
        if kind == "admin":
            return
        if kind not in INVOKE_KINDS:
            raise Forbidden(f"{with_article(kind)} token cannot use this route")
        if key is None:
            raise Forbidden(f"{with_article(kind)} token reads only the records of the calls "
                            f"made with it: {how}")
    if not hmac.compare_digest(key.encode(), invocation_key(ext["tokens"], invocation_id)
                               .encode()):
        raise Forbidden(f"wrong key for invocation '{invocation_id[:80]}': use the Location "
                        "of the 202 answer as it was given")


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
