"""The JSON API's blueprints."""

# The largest whole number the store keeps (SQLite's INTEGER, PostgreSQL's bigint): a number
# in a request is checked against it before it reaches a query.
MAX_INTEGER = 2 ** 63 - 1
# How many rows a list answers with when asked (`?limit=`), and at most.
DEFAULT_LIMIT = 50
MAX_LIMIT = 1000


def page_limit(args, default: int = DEFAULT_LIMIT) -> int:
    """`?limit=N`: a whole number from 1 to MAX_LIMIT, else a 400 that says so."""
    from ...errors import BadRequest

    text = args.get("limit")
    if text is None:
        return default
    try:
        limit = int(text)
    except ValueError:
        raise BadRequest(f"limit must be a whole number from 1 to {MAX_LIMIT}") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise BadRequest(f"limit must be a whole number from 1 to {MAX_LIMIT}")
    return limit
