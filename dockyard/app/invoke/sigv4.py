"""AWS Signature Version 4, checked on the receiving side: the canonical request rebuilt from
the WSGI environ as the AWS SDKs build it for a non-S3 service (botocore's SigV4Auth: the path
normalised and percent-encoded once more, the query's pairs encoded and sorted, the signed
headers' values trimmed, the body's SHA-256), then the string to sign and the HMAC chain keyed
by the secret that the access key id names. Only the Authorization header form is taken (no
presigned URLs); the clock may be off by at most MAX_SKEW_S either way."""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from urllib.parse import quote, unquote, urlsplit

ALGORITHM = "AWS4-HMAC-SHA256"
MAX_SKEW_S = 300
TIMESTAMP = "%Y%m%dT%H%M%SZ"
_AUTH_RE = re.compile(
    r"AWS4-HMAC-SHA256\s+Credential=(?P<credential>[^,\s]+)\s*,\s*"
    r"SignedHeaders=(?P<headers>[^,\s]+)\s*,\s*Signature=(?P<signature>[0-9a-fA-F]+)\s*")


class SignatureError(Exception):
    """A request whose signature does not hold: `code` is the error name AWS gives it."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Authorization:
    access_key: str
    date: str
    region: str
    service: str
    signed_headers: tuple[str, ...]
    signature: str


def parse_authorization(header: str) -> Authorization:
    if not header:
        raise SignatureError(403, "MissingAuthenticationTokenException",
                             "missing authentication: sign the request with SigV4 (access key "
                             "id 'invoke' or 'admin', the token of that kind as the secret key)")
    match = _AUTH_RE.fullmatch(header.strip())
    if not match:
        raise SignatureError(400, "IncompleteSignatureException",
                             "the Authorization header is not a SigV4 header "
                             "'AWS4-HMAC-SHA256 Credential=…, SignedHeaders=…, Signature=…'")
    parts = match["credential"].split("/")
    if len(parts) != 5 or parts[4] != "aws4_request":
        raise SignatureError(400, "IncompleteSignatureException",
                             "the credential must be KEY/DATE/REGION/SERVICE/aws4_request")
    headers = tuple(match["headers"].split(";"))
    if "host" not in headers:
        raise SignatureError(400, "IncompleteSignatureException",
                             "the signed headers must include 'host'")
    return Authorization(parts[0], parts[1], parts[2], parts[3], headers,
                         match["signature"].lower())


def request_time(environ) -> str:
    """The signing time as SigV4 writes it (YYYYMMDDTHHMMSSZ): X-Amz-Date, else Date."""
    stamp = environ.get("HTTP_X_AMZ_DATE", "").strip()
    if stamp:
        try:
            datetime.strptime(stamp, TIMESTAMP)
        except ValueError:
            raise SignatureError(400, "IncompleteSignatureException",
                                 f"X-Amz-Date '{stamp[:40]}' is not YYYYMMDDTHHMMSSZ") from None
        return stamp
    date = environ.get("HTTP_DATE", "").strip()
    try:
        return parsedate_to_datetime(date).astimezone(timezone.utc).strftime(TIMESTAMP)
    except (TypeError, ValueError):
        raise SignatureError(400, "IncompleteSignatureException",
                             "the request has no X-Amz-Date (or Date) header") from None


def canonical_uri(environ) -> str:
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw:
        path = urlsplit(raw).path
    else:   # re-encode the decoded path (WSGI gives it as latin-1 text)
        path = quote(environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""),
                     safe="/~:@!$&'()*+,;=", encoding="latin-1")
    return quote(_remove_dot_segments(path or "/"), safe="/~")


def _remove_dot_segments(path: str) -> str:
    # As botocore's normalize_url_path: dot segments and empty segments go.
    kept: list[str] = []
    for part in path.split("/"):
        if part and part != ".":
            if part == "..":
                if kept:
                    kept.pop()
            else:
                kept.append(part)
    first = "/" if path.startswith("/") else ""
    last = "/" if path.endswith("/") and kept else ""
    return first + "/".join(kept) + last


def canonical_query(query: str) -> str:
    pairs = []
    for pair in query.split("&") if query else ():
        if not pair:
            continue
        key, _, value = pair.partition("=")
        pairs.append((quote(unquote(key), safe="-_.~"), quote(unquote(value), safe="-_.~")))
    return "&".join(f"{k}={v}" for k, v in sorted(pairs))


def _header(environ, name: str) -> str:
    if name == "content-type":
        value = environ.get("CONTENT_TYPE")
    elif name == "content-length":
        value = environ.get("CONTENT_LENGTH")
    else:
        value = environ.get("HTTP_" + name.upper().replace("-", "_"))
    if value is None:
        raise SignatureError(403, "InvalidSignatureException",
                             f"the signed header '{name[:60]}' is not in the request")
    return ",".join(" ".join(v.split()) for v in value.split(","))


def canonical_request(environ, auth: Authorization, body: bytes) -> str:
    headers = "".join(f"{name}:{_header(environ, name)}\n" for name in auth.signed_headers)
    payload = environ.get("HTTP_X_AMZ_CONTENT_SHA256") or hashlib.sha256(body).hexdigest()
    return "\n".join([environ.get("REQUEST_METHOD", "GET").upper(), canonical_uri(environ),
                      canonical_query(environ.get("QUERY_STRING", "")), headers,
                      ";".join(auth.signed_headers), payload])


def signature(secret: str, auth: Authorization, stamp: str, canonical: str) -> str:
    scope = f"{auth.date}/{auth.region}/{auth.service}/aws4_request"
    to_sign = "\n".join([ALGORITHM, stamp, scope,
                         hashlib.sha256(canonical.encode("utf-8")).hexdigest()])
    key = f"AWS4{secret}".encode()
    for part in (auth.date, auth.region, auth.service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, to_sign.encode("utf-8"), hashlib.sha256).hexdigest()


def verify(environ, body: bytes, secrets: dict[str, str | None], service: str,
           now: float | None = None) -> str:
    """The access key id of a request whose signature holds under the secret that key names
    in `secrets`; SignatureError otherwise."""
    auth = parse_authorization(environ.get("HTTP_AUTHORIZATION", ""))
    secret = secrets.get(auth.access_key)
    if not secret:
        raise SignatureError(403, "UnrecognizedClientException",
                             f"unknown access key id '{auth.access_key[:40]}': use the kind of "
                             "token ('invoke' or 'admin') as the access key id and that token "
                             "as the secret key")
    if auth.service != service:
        raise SignatureError(403, "InvalidSignatureException",
                             f"the credential scope names service '{auth.service[:40]}', "
                             f"not '{service}'")
    stamp = request_time(environ)
    if stamp[:8] != auth.date:
        raise SignatureError(403, "InvalidSignatureException",
                             f"the credential scope's date {auth.date[:20]} is not the "
                             f"request's date {stamp[:8]}")
    signed_at = datetime.strptime(stamp, TIMESTAMP).replace(tzinfo=timezone.utc).timestamp()
    t = time.time() if now is None else now
    if abs(t - signed_at) > MAX_SKEW_S:
        raise SignatureError(403, "InvalidSignatureException",
                             f"Signature expired: {stamp} is more than {MAX_SKEW_S // 60} "
                             "minutes from the server's time; check the client's clock")
    expected = signature(secret, auth, stamp, canonical_request(environ, auth, body))
    if not hmac.compare_digest(expected, auth.signature):
        raise SignatureError(403, "InvalidSignatureException",
                             "The request signature we calculated does not match the "
                             "signature you provided: check the secret key (the token of the "
                             f"kind '{auth.access_key}' names)")
    return auth.access_key
