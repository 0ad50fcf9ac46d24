"""Named errors raised anywhere in dockyard; the API turns them into the one JSON error shape
and the CLI into one-line messages."""


class DockyardError(Exception):
    status = 500
    type = "InternalError"

    def __init__(self, message: str, **detail):
        super().__init__(message)
        self.message = message
        self.detail = detail

    def to_dict(self) -> dict:
        return {"type": self.type, "message": self.message, **self.detail}


class BadRequest(DockyardError):
    status = 400
    type = "BadRequest"


class BadPackage(BadRequest):
    type = "BadPackage"


class Unauthorized(DockyardError):
    status = 401
    type = "Unauthorized"


class Forbidden(DockyardError):
    status = 403
    type = "Forbidden"


class NotFound(DockyardError):
    status = 404
    type = "NotFound"


class Conflict(DockyardError):
    status = 409
    type = "Conflict"


class TooLarge(DockyardError):
    status = 413
    type = "TooLarge"


class Unavailable(DockyardError):
    """No ready instance right now; the caller should retry after `retry_after` seconds."""

    status = 503
    type = "Unavailable"

    def __init__(self, message: str, retry_after: int = 1, **detail):
        super().__init__(message, **detail)
        self.retry_after = retry_after
