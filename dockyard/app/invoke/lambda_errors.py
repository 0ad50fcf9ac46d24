"""Errors of the Lambda-compatible API as botocore reads them: the name in the
`x-amzn-errortype` header, `{"Type": "User"|"Service", "Message": …}` as the body, and the
status the Lambda API gives that name (so boto3 raises `client.exceptions.<name>`)."""

from __future__ import annotations

from http import HTTPStatus

from ...common.frames import dumps
from ...errors import DockyardError, Unavailable


class LambdaError(Exception):
    def __init__(self, status: int, code: str, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


# dockyard's status of an error that ran nothing → Lambda's name and status for it.
_BY_STATUS = {
    400: (400, "InvalidRequestContentException"),
    401: (403, "AccessDeniedException"),
    403: (403, "AccessDeniedException"),
    404: (404, "ResourceNotFoundException"),
    409: (409, "ResourceConflictException"),
    413: (413, "RequestTooLargeException"),
    429: (429, "TooManyRequestsException"),
    503: (502, "ResourceNotReadyException"),
}


def from_dockyard(exc: DockyardError, status: int | None = None,
                  type: str | None = None) -> LambdaError:  # noqa: A002 - the error's field
    """A dockyard error (raised, or a call's outcome of `status` and error `type`) under
    its Lambda name."""
    status = status or exc.status
    if type == "FunctionNotFound":
        status = 404
    code_status, code = _BY_STATUS.get(status, (500, "ServiceException"))
    retry = getattr(exc, "retry_after", None) if isinstance(exc, Unavailable) else None
    if status in (429, 503) and retry is None:
        retry = 1
    return LambdaError(code_status, code, exc.message, retry_after=retry)


def not_found(message: str) -> LambdaError:
    return LambdaError(404, "ResourceNotFoundException", message)


def answer_error(exc: LambdaError):
    headers = [("Content-Type", "application/json"), ("x-amzn-errortype", exc.code)]
    if exc.retry_after is not None:
        headers.append(("Retry-After", str(exc.retry_after)))
    kind = "Service" if exc.status >= 500 else "User"
    body = {"Type": kind, "Message": exc.message, "message": exc.message}
    if exc.code == "TooManyRequestsException":
        body["Reason"] = "ConcurrentInvocationLimitExceeded"
        if exc.retry_after is not None:
            body["retryAfterSeconds"] = str(exc.retry_after)
    return status_line(exc.status), headers, dumps(body)


def status_line(code: int) -> str:
    return f"{code} {HTTPStatus(code).phrase}"
