"""The JSON API's blueprints."""

# The largest whole number the store keeps (SQLite's INTEGER, PostgreSQL's bigint): a number
# in a request is checked against it before it reaches a query.
MAX_INTEGER = 2 ** 63 - 1
